//! Side-by-side TLS benchmark: fleetgate against HAProxy and nginx, each
//! offloading TLS in front of a plain HTTP origin nginx, passing TLS
//! through to a TLS origin, and verifying/forwarding client certificates,
//! all on 127.0.0.1. Run with `cargo bench --bench tls`; see
//! benches/README.md. It prints figures, it asserts nothing.

// Shared with the L4 bench (benches/l4/); items only that bench uses are
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

mod client;
mod measure;
mod report;
mod setup;
mod syslog;

use std::env;
use std::path::Path;
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use measure::Clients;
use report::{Samples, Test};
use setup::{Origin, Running, Target};
use syslog::SyslogSink;

/// Unrecorded warm-up run through each proxy, so first-touch costs don't
/// land in round 1.
const WARMUP_SECS: u64 = 2;

/// Quiet gap between runs, so one run's teardown doesn't spill into the
/// next one's CPU figures.
const SETTLE: Duration = Duration::from_secs(1);

struct Settings {
    rounds: u32,
    secs: u64,
    targets: Vec<Target>,
    tests: Vec<Test>,
    idle_conns: usize,
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
            targets: env_list("PROXIES", &Target::ALL, |t| t.key())?,
            tests: env_list("TESTS", &Test::ALL, |t| t.key())?,
            idle_conns: env_number("IDLE_CONNS", 8000)? as usize,
            keep_tmp: env::var("KEEP_TMP").is_ok_and(|v| v != "0" && !v.is_empty()),
        })
    }

    fn estimate(&self) -> Duration {
        let per_run = self.secs + SETTLE.as_secs() + 1;
        let targets = self.targets.len() as u64;
        let runs = self.rounds as u64 * targets * self.tests.len() as u64;
        let idle = if self.idle_conns > 0 {
            self.rounds as u64 * targets * (8 + self.idle_conns as u64 / 1000)
        } else {
            0
        };
        Duration::from_secs(runs * per_run + targets * (WARMUP_SECS + 2) + idle)
    }
}

/// A comma list of keys out of `all` (all of them when unset), in the
/// order of `all`.
fn env_list<T: Copy + PartialEq>(
    name: &str,
    all: &[T],
    key: impl Fn(T) -> &'static str,
) -> Result<Vec<T>> {
    let Ok(list) = env::var(name) else {
        return Ok(all.to_vec());
    };
    let chosen = list
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|k| {
            all.iter()
                .copied()
                .find(|&t| key(t) == k)
                .with_context(|| format!("{name}: unknown {k:?}"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(all.iter().copied().filter(|t| chosen.contains(t)).collect())
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

fn main() {
    if let Err(error) = run() {
        eprintln!("tls bench: {error:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let settings = Settings::from_env()?;
    tools::check_installed(&["haproxy", "nginx", "wrk", "openssl"])?;
    // 8,000 idle connections need more than the usual 1,024 fds in this
    // process (the client) and in the proxies, which inherit the limit.
    let fd_limit = procs::raise_fd_limit()?;
    let fleetgate_bin = setup::fleetgate_bin();
    print_header(&settings, &fleetgate_bin, fd_limit);

    // Everything started below lives in Guards owned by this frame, so it
    // is killed on return, on error and on panic alike.
    let dir = tempfile::Builder::new()
        .prefix("fleetgate-tls-")
        .disable_cleanup(settings.keep_tmp)
        .tempdir()?;
    if settings.keep_tmp {
        eprintln!("configs and logs kept in {}", dir.path().display());
    }
    setup::make_certificates(dir.path())?;
    let clients = Clients::new(dir.path())?;
    let origin = setup::start_origin(dir.path())?;
    let syslog = SyslogSink::start()?;
    let mut running = Vec::new();
    for &target in &settings.targets {
        match setup::start(
            target,
            "",
            dir.path(),
            &origin,
            &fleetgate_bin,
            &clients.full,
            &syslog,
        ) {
            Ok(r) => running.push(r),
            Err(e) => eprintln!("warning: {} left out: {e:#}", target.label()),
        }
    }
    let ticks_per_sec = procs::clock_ticks_per_sec()?;

    for r in &running {
        let url = format!("https://127.0.0.1:{}/", r.offload_port);
        if let Err(e) = wrk::wrk(&url, WARMUP_SECS, false) {
            eprintln!(
                "warning: warm-up through {} failed: {e:#}",
                r.target.label()
            );
        }
    }
    let mut samples = Samples::default();
    for round in 0..settings.rounds {
        run_round(
            round,
            &settings,
            &mut running,
            &origin,
            &clients,
            ticks_per_sec,
            &mut samples,
        );
        if settings.idle_conns > 0 {
            idle_round(
                round,
                &settings,
                dir.path(),
                &origin,
                &fleetgate_bin,
                &clients,
                &syslog,
                &mut samples,
            );
        }
    }

    println!("\n## Results\n");
    println!("{}", report::proxy_table(&samples));
    if settings.tests.contains(&Test::OffloadLogged) {
        println!("{}", report::access_log(&samples));
    }
    println!("{}", report::targets(&samples));
    println!("{}", report::saturation(&samples));
    println!("{}\n", report::notes(settings.rounds, settings.idle_conns));
    println!("Load average after the run: {}", tools::load_average());
    Ok(())
}

fn print_header(settings: &Settings, fleetgate_bin: &Path, fd_limit: u64) {
    println!("# fleetgate TLS benchmark\n");
    for (name, value) in tools::machine() {
        println!("- {name}: {value}");
    }
    for (name, value) in tools::versions(fleetgate_bin, &["wrk"]) {
        println!("- {name}: {value}");
    }
    println!(
        "- openssl: {}",
        procs::command_text("openssl", &["version"])
    );
    let names: Vec<&str> = settings.targets.iter().map(|t| t.label()).collect();
    println!(
        "- settings: ROUNDS={} DURATION={}s IDLE_CONNS={}, proxies: {}, tests: {}, fd limit {fd_limit}",
        settings.rounds,
        settings.secs,
        settings.idle_conns,
        names.join(", "),
        settings
            .tests
            .iter()
            .map(|t| t.key())
            .collect::<Vec<_>>()
            .join(",")
    );
    println!("- certificate: ECDSA P-256, self-signed, for every server");
    println!("- load average before the run: {}", tools::load_average());
    println!(
        "- expected wall time: about {} min\n",
        settings.estimate().as_secs().div_ceil(60)
    );
}

/// One round: every proxy runs every test; the proxy that goes first
/// rotates from round to round.
fn run_round(
    round: u32,
    settings: &Settings,
    running: &mut [Running],
    origin: &Origin,
    clients: &Clients,
    ticks_per_sec: f64,
    samples: &mut Samples,
) {
    let count = running.len();
    for i in 0..count {
        let r = &mut running[(i + round as usize) % count];
        for &test in &settings.tests {
            thread::sleep(SETTLE);
            let result = measure::run(
                test,
                r,
                origin,
                clients,
                settings.secs,
                ticks_per_sec,
                samples,
            );
            let line = result.unwrap_or_else(|e| format!("FAILED: {e:#}"));
            eprintln!(
                "[round {}/{}] {:<9} {:<24} {line}",
                round + 1,
                settings.rounds,
                r.target.label(),
                test.label()
            );
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn idle_round(
    round: u32,
    settings: &Settings,
    dir: &Path,
    origin: &Origin,
    fleetgate_bin: &Path,
    clients: &Clients,
    syslog: &SyslogSink,
    samples: &mut Samples,
) {
    let count = settings.targets.len();
    for i in 0..count {
        let target = settings.targets[(i + round as usize) % count];
        thread::sleep(SETTLE);
        let result = measure::idle(
            target,
            round,
            dir,
            origin,
            fleetgate_bin,
            clients,
            syslog,
            settings.idle_conns,
            samples,
        );
        let line = result.unwrap_or_else(|e| format!("FAILED: {e:#}"));
        eprintln!(
            "[round {}/{}] {:<9} {:<24} {line}",
            round + 1,
            settings.rounds,
            target.label(),
            "idle connections"
        );
    }
}
