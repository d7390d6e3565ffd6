//! Side-by-side L4 benchmark: fleetgate (in one or several `splice` modes)
//! against HAProxy (plain and with splice) and nginx `stream`, all
//! forwarding to the same origin nginx and iperf3 server on 127.0.0.1, as
//! plain TCP and as TLS passthrough routed on SNI; plus the memory an idle
//! L4 connection costs each. Run with `cargo bench --bench l4`; see
//! benches/README.md. It prints figures, it asserts nothing.

// Shared with the TLS bench (benches/tls/); items only that bench uses are
// dead code here.
#[path = "../common/certs.rs"]
mod certs;
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

mod idle;
mod load;
mod measure;
mod report;
mod splice;
mod targets;
mod tls_probe;

use std::env;
use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use measure::Test;
use report::Samples;
use splice::Splice;
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
    /// The proxies, in column order, then `Direct`.
    targets: Vec<Target>,
    /// The load tests to run, in their fixed order.
    tests: Vec<Test>,
    /// Idle connections of the memory test; 0 skips it.
    idle_conns: usize,
    /// Leave the temp dir (configs, logs) behind for a look afterwards.
    keep_tmp: bool,
    /// FLEETGATE_WORKERS: fleetgate's `worker_threads` (unset: its
    /// default, one per core).
    fleetgate_workers: Option<u64>,
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
            targets: targets_from_env(&splice::modes_from_env()?)?,
            tests: tests_from_env()?,
            idle_conns: env_number("IDLE_CONNS", 9500)? as usize,
            keep_tmp: env_flag("KEEP_TMP", false),
            fleetgate_workers: match env::var("FLEETGATE_WORKERS") {
                Ok(_) => Some(env_number("FLEETGATE_WORKERS", 0)?),
                Err(_) => None,
            },
        })
    }

    /// The targets that are proxies, in column order.
    fn proxies(&self) -> Vec<Target> {
        let proxies = self.targets.iter().copied();
        proxies.filter(|&t| t != Target::Direct).collect()
    }

    /// Rough wall time, to print before committing to a long run.
    fn estimate(&self) -> Duration {
        let per_run = self.secs + SETTLE.as_secs() + 1;
        let targets = self.targets.len() as u64;
        let runs = self.rounds as u64 * targets * self.tests.len() as u64;
        // Every round starts its proxies afresh and warms them up.
        let warm_up = self.rounds as u64 * targets * (2 * WARMUP_SECS + 2);
        // Start, 1 s, opening (about 3,000 connections/s), 2 s, teardown.
        let idle = if self.idle_conns > 0 {
            self.rounds as u64 * (targets - 1) * (6 + self.idle_conns as u64 / 3000)
        } else {
            0
        };
        Duration::from_secs(runs * per_run + warm_up + idle)
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

/// TESTS=keep-alive,passthrough runs only those load tests (empty: none,
/// e.g. for the idle test alone); unset: all of them.
fn tests_from_env() -> Result<Vec<Test>> {
    let Ok(list) = env::var("TESTS") else {
        return Ok(Test::ALL.to_vec());
    };
    let keys: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if let Some(unknown) = keys
        .iter()
        .find(|k| !Test::ALL.iter().any(|t| t.key() == **k))
    {
        bail!("TESTS: unknown {unknown:?}");
    }
    Ok(Test::ALL
        .into_iter()
        .filter(|t| keys.contains(&t.key()))
        .collect())
}

fn env_flag(name: &str, default: bool) -> bool {
    env::var(name).map_or(default, |v| v != "0" && !v.is_empty())
}

/// PROXIES=fleetgate,nginx limits the run to those proxies (`fleetgate`
/// is one instance per splice mode); the no-proxy baseline is always
/// measured because the table is read against it. Column order: the
/// fleetgate instances, HAProxy, HAProxy(splice), nginx.
fn targets_from_env(splice_modes: &[Splice]) -> Result<Vec<Target>> {
    let mut all: Vec<Target> = splice_modes.iter().map(|&m| Target::Fleetgate(m)).collect();
    all.extend(Target::OTHERS);
    let mut targets = match env::var("PROXIES") {
        Err(_) => all,
        Ok(list) => {
            let keys: Vec<&str> = list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect();
            if let Some(unknown) = keys.iter().find(|k| !all.iter().any(|t| t.key() == **k)) {
                bail!("PROXIES: unknown {unknown:?}");
            }
            all.into_iter()
                .filter(|t| keys.contains(&t.key()))
                .collect()
        }
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
    tools::check_installed(&["haproxy", "nginx", "wrk", "iperf3", "openssl"])?;
    // The idle test holds thousands of connections in this process, the
    // proxy and the origin; they inherit the raised limit.
    let fd_limit = procs::raise_fd_limit()?;
    let fleetgate_bin = fleetgate_bin();
    print_header(&settings, &fleetgate_bin, fd_limit);

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
        fleetgate_workers: settings.fleetgate_workers,
    };
    let ticks_per_sec = procs::clock_ticks_per_sec()?;

    let mut samples = Samples::default();
    for round in 0..settings.rounds {
        if !settings.tests.is_empty() {
            // Fresh proxies every round: where the scheduler places a
            // proxy's threads next to wrk and the origin on a small
            // machine holds for a process's life and moved a proxy's CPU
            // per request by up to 20 % from one start to the next, so
            // the median over rounds must sample starts, not only runs.
            let instance = format!("-r{round}");
            let mut running =
                start_targets(&settings.targets, &instance, dir.path(), &backends, &opts);
            warm_up(&mut running);
            run_round(
                round,
                &settings,
                &mut running,
                &backends,
                ticks_per_sec,
                &mut samples,
            );
        }
        if settings.idle_conns > 0 {
            idle_round(round, &settings, dir.path(), &backends, &opts, &mut samples);
        }
    }

    println!("\n## Results\n");
    println!("{}", report::proxy_table(&samples, &settings.proxies()));
    println!("{}\n", report::notes(settings.rounds, settings.idle_conns));
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

fn print_header(settings: &Settings, fleetgate_bin: &std::path::Path, fd_limit: u64) {
    println!("# fleetgate L4 benchmark\n");
    for (name, value) in tools::machine() {
        println!("- {name}: {value}");
    }
    for (name, value) in tools::versions(fleetgate_bin, &["wrk", "iperf3"]) {
        println!("- {name}: {value}");
    }
    let names: Vec<&str> = settings.targets.iter().map(|t| t.label()).collect();
    let tests: Vec<&str> = settings.tests.iter().map(|t| t.key()).collect();
    println!(
        "- settings: ROUNDS={} DURATION={}s IDLE_CONNS={}, targets: {}, tests: {}, fd limit {fd_limit}",
        settings.rounds,
        settings.secs,
        settings.idle_conns,
        names.join(", "),
        tests.join(","),
    );
    let workers = settings.fleetgate_workers;
    println!(
        "- fleetgate worker_threads: {} (HAProxy: nbthread 1)",
        workers.map_or("default, one per core".to_string(), |n| n.to_string())
    );
    println!(
        "- passthrough: wrk to https://{}:PORT/ (the SNI every proxy routes on)",
        targets::PASS_SNI
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
    instance: &str,
    dir: &std::path::Path,
    backends: &Backends,
    opts: &ProxyOptions,
) -> Vec<Running> {
    let mut running = Vec::new();
    for &target in wanted {
        match targets::start(target, instance, dir, backends, opts) {
            Ok(r) => running.push(r),
            Err(e) => eprintln!("warning: {} left out: {e:#}", target.label()),
        }
    }
    running
}

fn warm_up(running: &mut [Running]) {
    for r in running.iter() {
        let plain = load::wrk(r.http_port, WARMUP_SECS, false);
        let tls = load::wrk_passthrough(r.pass_port, WARMUP_SECS);
        if let Err(e) = plain.and(tls) {
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
        for &test in &settings.tests {
            thread::sleep(SETTLE);
            let result = measure::run(test, r, backends, settings.secs, ticks_per_sec, samples);
            let line = result.unwrap_or_else(|e| format!("FAILED: {e:#}"));
            eprintln!(
                "[round {}/{}] {:<17} {:<22} {line}",
                round + 1,
                settings.rounds,
                r.target.label(),
                test.label()
            );
        }
    }
}

/// The idle-connection memory test, once per proxy and round, each on a
/// freshly started instance; the order rotates like the load tests'.
fn idle_round(
    round: u32,
    settings: &Settings,
    dir: &std::path::Path,
    backends: &Backends,
    opts: &ProxyOptions,
    samples: &mut Samples,
) {
    let proxies = settings.proxies();
    let count = proxies.len();
    for i in 0..count {
        let target = proxies[(i + round as usize) % count];
        thread::sleep(SETTLE);
        let result = idle::run(
            target,
            round,
            dir,
            backends,
            opts,
            settings.idle_conns,
            samples,
        );
        let line = result.unwrap_or_else(|e| format!("FAILED: {e:#}"));
        eprintln!(
            "[round {}/{}] {:<17} {:<22} {line}",
            round + 1,
            settings.rounds,
            target.label(),
            "idle connections"
        );
    }
}
