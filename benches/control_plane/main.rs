//! Control-plane benchmark: what a discovery change costs fleetgate (CPU
//! and wall time until the pools show it, with many discovered pools), and
//! what one change per second does to TLS-offload keep-alive traffic. It
//! drives any fleetgate binary from outside (config file, heartbeats,
//! `/status`, /proc), so two builds can be compared. Run with
//! `cargo bench --bench control_plane`; see benches/README.md. It prints
//! figures, it asserts nothing.

// Shared with the other benches; items only they use are dead code here.
#[allow(dead_code)]
#[path = "../common/config.rs"]
mod config;
#[allow(dead_code)]
#[path = "../common/procs.rs"]
mod procs;
#[allow(dead_code)]
#[path = "../common/table.rs"]
mod table;
#[allow(dead_code)]
#[path = "../common/tools.rs"]
mod tools;
#[allow(dead_code)]
#[path = "../common/wrk.rs"]
mod wrk;

mod admin;
mod changes;
mod churn;
mod heartbeats;
mod report;

use std::env;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use report::ChangeSamples;

/// Unrecorded wrk run before the churn rounds.
const WARMUP_SECS: u64 = 2;

struct Settings {
    rounds: usize,
    secs: u64,
    changes: usize,
    pools: usize,
    nodes: usize,
    gap: Duration,
    part_changes: bool,
    part_churn: bool,
    keep_tmp: bool,
}

impl Settings {
    fn from_env() -> Result<Settings> {
        let rounds = env_number("ROUNDS", 3)? as usize;
        let secs = env_number("DURATION", 10)?;
        // Changes come in draining/normal pairs: an even count leaves
        // every node `normal` at the end of a round.
        let changes = env_number("CHANGES", 30)?.next_multiple_of(2) as usize;
        let gap = Duration::from_millis(env_number("CHANGE_GAP_MS", 200)?);
        if rounds == 0 || secs == 0 || changes == 0 || gap.is_zero() {
            bail!("ROUNDS, DURATION, CHANGES and CHANGE_GAP_MS must be at least 1");
        }
        let parts = env::var("PARTS").unwrap_or_else(|_| "changes,churn".into());
        let parts: Vec<&str> = parts.split(',').map(str::trim).collect();
        if let Some(bad) = parts.iter().find(|p| !["changes", "churn"].contains(p)) {
            bail!("PARTS: unknown {bad:?} (changes, churn)");
        }
        Ok(Settings {
            rounds,
            secs,
            changes,
            pools: env_number("POOLS", 50)? as usize,
            nodes: env_number("NODES", 20)? as usize,
            gap,
            part_changes: parts.contains(&"changes"),
            part_churn: parts.contains(&"churn"),
            keep_tmp: env::var("KEEP_TMP").is_ok_and(|v| v != "0" && !v.is_empty()),
        })
    }

    fn estimate(&self) -> Duration {
        let mut secs = 0;
        if self.part_changes {
            let window = self.gap.as_secs_f64() * self.changes as f64;
            // Two windows, a wall-time round (~30 ms a change), refreshes.
            let round = 2.0 * window + self.changes as f64 * 0.03 + 4.0;
            secs += (self.rounds as f64 * round) as u64 + 5;
        }
        if self.part_churn {
            secs += WARMUP_SECS + self.rounds as u64 * 2 * (self.secs + 3) + 5;
        }
        Duration::from_secs(secs)
    }
}

fn env_number(name: &str, default: u64) -> Result<u64> {
    match env::var(name) {
        Ok(text) => text
            .trim()
            .parse()
            .with_context(|| format!("{name}={text:?} is not a whole number")),
        Err(_) => Ok(default),
    }
}

/// The fleetgate binary cargo built next to this bench, unless
/// FLEETGATE_BIN points at another build.
fn fleetgate_bin() -> PathBuf {
    env::var_os("FLEETGATE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_fleetgate")))
}

fn main() {
    if let Err(error) = run() {
        eprintln!("control_plane bench: {error:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let settings = Settings::from_env()?;
    if settings.part_churn {
        tools::check_installed(&["nginx", "wrk"])?;
    }
    let bin = fleetgate_bin();
    print_header(&settings, &bin);
    let dir = tempfile::Builder::new()
        .prefix("fleetgate-control-plane-")
        .disable_cleanup(settings.keep_tmp)
        .tempdir()?;
    if settings.keep_tmp {
        eprintln!("configs and logs kept in {}", dir.path().display());
    }
    let ticks_per_sec = procs::clock_ticks_per_sec()?;
    let started = std::time::Instant::now();

    println!("\n## Results\n");
    if settings.part_changes {
        let samples = measure_changes(&settings, dir.path(), &bin, ticks_per_sec)?;
        println!(
            "{}",
            report::changes_table(&samples, settings.pools, settings.nodes, settings.changes)
        );
    }
    if settings.part_churn {
        let (steady, churn) = measure_churn(&settings, dir.path(), &bin, ticks_per_sec)?;
        println!("{}", report::churn_table(&steady, &churn));
    }
    // The harness shares the cores with what it measures: say what it took.
    let own = procs::cpu_ticks(std::process::id())? as f64 / ticks_per_sec;
    let children = procs::reaped_children_ticks()? as f64 / ticks_per_sec;
    let wall = started.elapsed().as_secs_f64();
    println!(
        "Harness CPU: {own:.1} s in {wall:.0} s ({:.1} % of a core), wrk {children:.1} s.",
        own / wall * 100.0
    );
    println!("Load average after the run: {}", tools::load_average());
    Ok(())
}

fn print_header(settings: &Settings, bin: &Path) {
    println!("# fleetgate control-plane benchmark\n");
    for (name, value) in tools::machine() {
        println!("- {name}: {value}");
    }
    let version = procs::command_text(&bin.to_string_lossy(), &["--version"]);
    println!("- fleetgate: {version} ({})", bin.display());
    if settings.part_churn {
        let wrk = procs::command_text(&tools::path_of("wrk").to_string_lossy(), &["-v"]);
        println!("- wrk: {}", wrk.lines().next().unwrap_or(""));
    }
    println!(
        "- settings: ROUNDS={} CHANGES={} CHANGE_GAP_MS={} POOLS={} NODES={} DURATION={}s",
        settings.rounds,
        settings.changes,
        settings.gap.as_millis(),
        settings.pools,
        settings.nodes,
        settings.secs,
    );
    println!("- load average before the run: {}", tools::load_average());
    println!(
        "- expected wall time: about {} min",
        settings.estimate().as_secs().div_ceil(60)
    );
}

fn measure_changes(
    settings: &Settings,
    dir: &Path,
    bin: &Path,
    ticks_per_sec: f64,
) -> Result<ChangeSamples> {
    let shape = changes::Shape {
        pools: settings.pools,
        nodes: settings.nodes,
    };
    let mut setup = changes::start(dir, bin, shape)?;
    eprintln!(
        "[changes] {} pools, {} nodes announced and shown",
        settings.pools,
        setup.nodes()
    );
    let mut samples = ChangeSamples::default();
    for round in 0..settings.rounds {
        let label = format!("[changes round {}/{}]", round + 1, settings.rounds);
        let cpu = setup.cpu_round(
            settings.changes,
            settings.gap,
            round % 2 == 0,
            ticks_per_sec,
        )?;
        eprintln!(
            "{label} CPU per change {:.3} ms (ticks) {:.3} ms (sched), idle {:.2} % core, \
             applied {:.2}, others {:.1} % core",
            cpu.ticks_ms / cpu.changes as f64,
            cpu.sched_ms / cpu.changes as f64,
            cpu.idle_core_pct,
            cpu.applied_ratio,
            cpu.others_pct
        );
        samples.cpu.push(cpu);
        let wall = setup.wall_round(settings.changes)?;
        let ms: Vec<f64> = wall.iter().map(|w| w.ms).collect();
        eprintln!(
            "{label} heartbeat → /status: median {:.2} ms, max {:.2} ms",
            table::median(&ms),
            ms.iter().copied().fold(0.0, f64::max)
        );
        samples.wall.extend(wall);
    }
    samples.status_bytes = setup.status_size()?;
    setup.fleetgate.ensure_running()?;
    Ok(samples)
}

fn measure_churn(
    settings: &Settings,
    dir: &Path,
    bin: &Path,
    ticks_per_sec: f64,
) -> Result<(Vec<churn::Run>, Vec<churn::Run>)> {
    let mut setup = churn::start(dir, bin)?;
    setup.warm_up(WARMUP_SECS)?;
    let (mut steady, mut churned) = (Vec::new(), Vec::new());
    for round in 0..settings.rounds {
        // Which run goes first alternates from round to round.
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for with_churn in order {
            let run = setup.run(settings.secs, with_churn, ticks_per_sec)?;
            eprintln!(
                "[churn round {}/{}] {:<8} {:.0} requests/s, p99 {:.2} ms, {:.1} µs/request, \
                 {} changes, {} errors, others {:.0} % core",
                round + 1,
                settings.rounds,
                if with_churn { "churn" } else { "no churn" },
                run.wrk.requests_per_sec,
                run.wrk.p99_us / 1e3,
                run.cpu_us_per_request,
                run.changes,
                run.wrk.errors,
                run.others_pct
            );
            if with_churn {
                churned.push(run);
            } else {
                steady.push(run);
            }
        }
    }
    setup.fleetgate.ensure_running()?;
    Ok((steady, churned))
}
