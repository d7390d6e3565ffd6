//! Side-by-side L4 benchmark: fleetgate against HAProxy (plain and with
//! splice) and nginx `stream`, all forwarding to the same origin nginx and
//! iperf3 server on 127.0.0.1. Run with `cargo bench --bench l4`; see
//! benches/README.md. It prints figures, it asserts nothing.

// Shared with the TLS bench (benches/tls/); items only that bench uses are
// dead code here.
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

mod load;
mod measure;
mod report;
mod targets;

use std::env;
use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use measure::Test;
use report::Samples;
use targets::{Backends, ProxyOptions, Running, Target};

/// Length of the unrecorded warm-up run through each target, so first-touch
/// costs (page faults, lazy allocations) don't land in round 1.
const WARMUP_SECS: u64 = 2;

/// Quiet gap between runs so one run's connection teardown (FINs, proxy
/// cleanup) doesn't spill into the next run's CPU figures.
const SETTLE: Duration = Duration::from_secs(1);

/// Knobs read from the environment.
struct Settings {
    rounds: u32,
    secs: u64,
    targets: Vec<Target>,
    fleetgate_splice: String,
    /// Leave the temp dir (configs, logs) behind for a look afterwards.
    keep_tmp: bool,
}

impl Settings {
    fn from_env() -> Result<Settings> {
        let rounds = env_number("ROUNDS", 3)?;
        let secs = env_number("DURATION", 10)?;
        if rounds == 0 || secs == 0 {
            bail!("ROUNDS and DURATION must be at least 1");
        }
        Ok(Settings {
            rounds: rounds as u32,
            secs,
            targets: targets_from_env()?,
            fleetgate_splice: splice_from_env()?,
            keep_tmp: env_flag("KEEP_TMP", false),
        })
    }

    /// Rough wall time, to print before committing to a long run.
    fn estimate(&self) -> Duration {
        let per_run = self.secs + SETTLE.as_secs() + 1;
        let runs = self.rounds as u64 * self.targets.len() as u64 * Test::ALL.len() as u64;
        Duration::from_secs(runs * per_run + self.targets.len() as u64 * (WARMUP_SECS + 2))
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

/// FLEETGATE_SPLICE: 1 (default) → `splice = true`, 0 → `false`, auto →
/// `"auto"`; the value as it goes into fleetgate's config.
fn splice_from_env() -> Result<String> {
    Ok(match env::var("FLEETGATE_SPLICE").as_deref() {
        Err(_) | Ok("1") | Ok("true") => "true".into(),
        Ok("0") | Ok("false") => "false".into(),
        Ok("auto") => "\"auto\"".into(),
        Ok(other) => bail!("FLEETGATE_SPLICE={other:?}: use 1, 0 or auto"),
    })
}

fn env_flag(name: &str, default: bool) -> bool {
    env::var(name).map_or(default, |v| v != "0" && !v.is_empty())
}

/// PROXIES=fleetgate,nginx limits the run to those proxies; the no-proxy
/// baseline is always measured because the table is read against it.
fn targets_from_env() -> Result<Vec<Target>> {
    let mut targets = match env::var("PROXIES") {
        Err(_) => Target::PROXIES.to_vec(),
        Ok(list) => list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|key| {
                Target::PROXIES
                    .into_iter()
                    .find(|t| t.key() == key)
                    .with_context(|| format!("PROXIES: unknown {key:?}"))
            })
            .collect::<Result<Vec<_>>>()?,
    };
    targets.push(Target::Direct);
    Ok(targets)
}

fn main() {
    if let Err(error) = run() {
        eprintln!("l4 bench: {error:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let settings = Settings::from_env()?;
    tools::check_installed(&["haproxy", "nginx", "wrk", "iperf3"])?;
    let fleetgate_bin = fleetgate_bin();
    print_header(&settings, &fleetgate_bin);

    // Everything started below lives in Guards owned by this frame, so it
    // is killed on return, on error and on panic alike.
    let dir = tempfile::Builder::new()
        .prefix("fleetgate-l4-")
        .disable_cleanup(settings.keep_tmp)
        .tempdir()?;
    if settings.keep_tmp {
        eprintln!("configs and logs kept in {}", dir.path().display());
    }
    let backends = targets::start_backends(dir.path())?;
    let opts = ProxyOptions {
        fleetgate_bin,
        fleetgate_splice: settings.fleetgate_splice.clone(),
    };
    let mut running = start_targets(&settings.targets, dir.path(), &backends, &opts);
    let ticks_per_sec = procs::clock_ticks_per_sec()?;

    warm_up(&mut running);
    let mut samples = Samples::default();
    for round in 0..settings.rounds {
        run_round(
            round,
            &settings,
            &mut running,
            &backends,
            ticks_per_sec,
            &mut samples,
        );
    }

    println!("\n## Results\n");
    println!("{}", report::proxy_table(&samples));
    println!("{}\n", report::notes(settings.rounds));
    println!("### Reference: client straight to the origin, no proxy\n");
    println!("{}", report::direct_table(&samples));
    println!("Load average after the run: {}", tools::load_average());
    Ok(())
}

/// The binary cargo built next to this bench, unless FLEETGATE_BIN points
/// at another build (e.g. a saved copy of an older commit, for comparison).
fn fleetgate_bin() -> PathBuf {
    env::var_os("FLEETGATE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_fleetgate")))
}

fn print_header(settings: &Settings, fleetgate_bin: &std::path::Path) {
    println!("# fleetgate L4 benchmark\n");
    for (name, value) in tools::machine() {
        println!("- {name}: {value}");
    }
    for (name, value) in tools::versions(fleetgate_bin, &["wrk", "iperf3"]) {
        println!("- {name}: {value}");
    }
    let names: Vec<&str> = settings.targets.iter().map(|t| t.label()).collect();
    println!(
        "- settings: ROUNDS={} DURATION={}s, targets: {}, fleetgate splice={}",
        settings.rounds,
        settings.secs,
        names.join(", "),
        settings.fleetgate_splice
    );
    println!("- load average before the run: {}", tools::load_average());
    println!(
        "- expected wall time: about {} min\n",
        settings.estimate().as_secs().div_ceil(60)
    );
}

/// Starts every target; one that fails to come up (fleetgate while it is
/// still being written, say) is reported and left out, and its column
/// reads n/a.
fn start_targets(
    wanted: &[Target],
    dir: &std::path::Path,
    backends: &Backends,
    opts: &ProxyOptions,
) -> Vec<Running> {
    let mut running = Vec::new();
    for &target in wanted {
        match targets::start(target, dir, backends, opts) {
            Ok(r) => running.push(r),
            Err(e) => eprintln!("warning: {} left out: {e:#}", target.label()),
        }
    }
    running
}

fn warm_up(running: &mut [Running]) {
    for r in running.iter() {
        if let Err(e) = load::wrk(r.http_port, WARMUP_SECS, false) {
            eprintln!(
                "warning: warm-up through {} failed: {e:#}",
                r.target.label()
            );
        }
    }
}

/// One round: every target runs every test. The starting target rotates
/// each round so no proxy always goes first (or last) on a warming or
/// throttling machine.
fn run_round(
    round: u32,
    settings: &Settings,
    running: &mut [Running],
    backends: &Backends,
    ticks_per_sec: f64,
    samples: &mut Samples,
) {
    if running.is_empty() {
        return;
    }
    let count = running.len();
    for i in 0..count {
        let r = &mut running[(i + round as usize) % count];
        for test in Test::ALL {
            thread::sleep(SETTLE);
            let result = measure::run(test, r, backends, settings.secs, ticks_per_sec, samples);
            let line = result.unwrap_or_else(|e| format!("FAILED: {e:#}"));
            eprintln!(
                "[round {}/{}] {:<17} {:<10} {line}",
                round + 1,
                settings.rounds,
                r.target.label(),
                test.label()
            );
        }
    }
}
