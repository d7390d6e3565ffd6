//! `fleetgate --version` names what the build can do, and a real offload
//! listener does what it says: every TLS version, cipher suite and key
//! exchange group it lists completes a handshake with a client that offers
//! that one alone. `fleetgate manpages` writes one page per command.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use common::pki::Ca;
use common::web::tls_connect;
use common::*;
use rustls::crypto::{ring, CryptoProvider, SupportedKxGroup};
use rustls::{SupportedCipherSuite, SupportedProtocolVersion};

fn fleetgate(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
        .args(args)
        .output()
        .expect("run fleetgate");
    assert!(out.status.success(), "fleetgate {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// The first line, and the `name: value` feature lines after it.
fn version() -> (String, BTreeMap<String, String>) {
    let text = fleetgate(&["--version"]);
    let mut lines = text.lines();
    let first = lines.next().unwrap().to_string();
    let features = lines
        .map(|l| {
            let (name, value) = l.trim().split_once(": ").unwrap_or_else(|| panic!("{l:?}"));
            (name.to_string(), value.trim().to_string())
        })
        .collect();
    (first, features)
}

fn list(value: &str) -> Vec<&str> {
    value.split(", ").collect()
}

#[test]
fn version_names_the_features_of_this_build() {
    let (first, f) = version();
    assert_eq!(first, format!("fleetgate {}", env!("CARGO_PKG_VERSION")));
    for name in [
        "target",
        "l4 relay",
        "tls",
        "tls 1.3 suites",
        "tls 1.2 suites",
        "tls groups",
        "http",
        "stores",
        "systemd",
        "allocator",
    ] {
        assert!(f.contains_key(name), "no {name:?} line in {f:?}");
    }
    assert!(
        f["target"].starts_with(&format!(
            "{}-{}",
            std::env::consts::ARCH,
            std::env::consts::OS
        )),
        "{}",
        f["target"]
    );
    assert_eq!(
        f["l4 relay"].contains("splice(2)"),
        cfg!(target_os = "linux"),
        "{}",
        f["l4 relay"]
    );
    assert!(
        f["tls"].starts_with("rustls, ring provider"),
        "{}",
        f["tls"]
    );
    assert!(f["tls"].ends_with("; TLS 1.3, TLS 1.2"), "{}", f["tls"]);
    let stores = list(&f["stores"]);
    assert!(stores[0].starts_with("sqlite 3."), "{stores:?}");
    assert_eq!(stores[1], "postgresql");
    assert_eq!(f["allocator"], "mimalloc");
    assert!(f["systemd"].starts_with("notify"), "{}", f["systemd"]);
}

#[test]
fn short_version_is_one_line() {
    assert_eq!(
        fleetgate(&["-V"]),
        format!("fleetgate {}\n", env!("CARGO_PKG_VERSION"))
    );
}

fn suite(name: &str) -> SupportedCipherSuite {
    *ring::ALL_CIPHER_SUITES
        .iter()
        .find(|s| format!("{:?}", s.suite()) == name)
        .unwrap_or_else(|| panic!("--version lists {name}, which ring does not have"))
}

fn group(name: &str) -> &'static dyn SupportedKxGroup {
    *ring::ALL_KX_GROUPS
        .iter()
        .find(|g| format!("{:?}", g.name()) == name)
        .unwrap_or_else(|| panic!("--version lists group {name}, which ring does not have"))
}

/// A client that offers exactly one version, one suite and one group.
fn only(
    ca: &Ca,
    version: &'static SupportedProtocolVersion,
    suite: SupportedCipherSuite,
    group: &'static dyn SupportedKxGroup,
) -> Arc<rustls::ClientConfig> {
    let provider = CryptoProvider {
        cipher_suites: vec![suite],
        kx_groups: vec![group],
        ..ring::default_provider()
    };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(ca.roots())
        .with_no_client_auth();
    Arc::new(config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offload_listener_speaks_what_version_lists() {
    let (_, f) = version();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "server");
    // rcgen (with ring) makes ECDSA keys: the ECDHE_RSA suites need an RSA
    // certificate and are not tried here.
    let leaf = ca.server(dir.path(), "server", &["localhost"]);
    let front = free_addr();
    let _lb = Balancer::start(&format!(
        r#"[admin]
bind = "{{admin}}"

[[listener]]
name = "tls"
bind = "{front}"
mode = "offload"
tls = {{ cert = "{}", key = "{}" }}

  [[listener.route]]
  path_prefix = "/"
  pool = "web"

[[pool]]
name = "web"
backends = [{{ address = "{}" }}]
"#,
        leaf.cert_path.display(),
        leaf.key_path.display(),
        free_addr()
    ));
    wait_listening(front);

    let groups: Vec<_> = list(&f["tls groups"]).into_iter().map(group).collect();
    let versions = [
        (&rustls::version::TLS13, "tls 1.3 suites"),
        (&rustls::version::TLS12, "tls 1.2 suites"),
    ];
    let mut tried = 0;
    for (version, line) in versions {
        for name in list(&f[line]) {
            if name.contains("_RSA_") {
                continue;
            }
            let suite = suite(name);
            assert_eq!(suite.version(), version, "{name} listed under {line:?}");
            for &g in &groups {
                let tls = tls_connect(front, "localhost", only(&ca, version, suite, g))
                    .await
                    .unwrap_or_else(|e| panic!("{name} with {:?}: {e}", g.name()));
                let (_, conn) = tls.get_ref();
                assert_eq!(conn.negotiated_cipher_suite(), Some(suite));
                assert_eq!(conn.protocol_version(), Some(version.version));
                tried += 1;
            }
        }
    }
    // 3 TLS 1.3 suites and 3 ECDSA TLS 1.2 suites, each with 3 groups.
    assert!(tried >= 18, "only {tried} handshakes tried");
}

#[test]
fn manpages_has_one_page_per_command() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("man");
    let written = fleetgate(&["manpages", out.to_str().unwrap()]);

    // The commands `--help` lists (clap's `help` aside), and `token`'s.
    let mut expected = vec!["fleetgate".to_string()];
    for (help, prefix) in [
        (fleetgate(&["--help"]), "fleetgate"),
        (fleetgate(&["token", "--help"]), "fleetgate-token"),
    ] {
        let commands = help.split("Commands:\n").nth(1).unwrap();
        for line in commands.lines().take_while(|l| l.starts_with("  ")) {
            let name = line.split_whitespace().next().unwrap();
            if name != "help" {
                expected.push(format!("{prefix}-{name}"));
            }
        }
    }
    expected.sort();

    let mut pages: Vec<String> = written
        .lines()
        .map(|p| {
            let p = Path::new(p);
            assert_eq!(p.parent(), Some(out.as_path()));
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .strip_suffix(".1")
                .unwrap()
                .to_string()
        })
        .collect();
    pages.sort();
    assert_eq!(pages, expected);
    assert!(expected.contains(&"fleetgate-token-generate".to_string()));

    for page in &pages {
        let text = std::fs::read_to_string(out.join(format!("{page}.1"))).unwrap();
        assert!(text.contains(&format!(".TH {page} 1")), "{page}: {text}");
        // The synopsis starts with what one types.
        let typed = format!(".SH SYNOPSIS\n\\fB{}\\fR", page.replace('-', " "));
        assert!(text.contains(&typed), "{page}: no {typed:?} in {text}");
    }
    let check = std::fs::read_to_string(out.join("fleetgate-check.1")).unwrap();
    assert!(check.contains("\\-\\-config"), "{check}");
}
