//! Every input kept in `fuzz/corpus/TARGET/` (and any crash saved in
//! `fuzz/artifacts/TARGET/`) goes through the same check its fuzz target
//! runs, so the fuzzers' findings are replayed by `cargo test` on stable.

#[path = "../fuzz/checks/mod.rs"]
mod checks;

use std::path::{Path, PathBuf};

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// A target added to `fuzz/Cargo.toml` without a check here would never
/// be replayed.
#[test]
fn every_fuzz_target_is_replayed() {
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/Cargo.toml"))
            .unwrap();
    let mut bins: Vec<&str> = manifest
        .lines()
        .filter_map(|l| l.trim().strip_prefix("name = \""))
        .filter_map(|rest| rest.strip_suffix('"'))
        .filter(|name| *name != "fleetgate-fuzz" && *name != "fleetgate_fuzz")
        .collect();
    bins.sort_unstable();
    let mut checked: Vec<&str> = checks::TARGETS.iter().map(|(name, _)| *name).collect();
    checked.sort_unstable();
    assert_eq!(bins, checked);
}

#[test]
fn every_corpus_input_passes_its_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut failures = Vec::new();
    for (target, check) in checks::TARGETS {
        let corpus = inputs(&root.join("corpus").join(target));
        assert!(
            !corpus.is_empty(),
            "fuzz/corpus/{target} is empty: each target keeps its corpus in the repository"
        );
        let artifacts = inputs(&root.join("artifacts").join(target));
        let count = corpus.len() + artifacts.len();
        for file in corpus.iter().chain(&artifacts) {
            let data = std::fs::read(file).unwrap();
            if std::panic::catch_unwind(|| check(&data)).is_err() {
                failures.push(file.display().to_string());
            }
        }
        println!("{target}: {count} inputs replayed");
    }
    assert!(failures.is_empty(), "inputs that fail: {failures:#?}");
}
