//! One measurement: a load run through a proxy while watching the CPU time
//! of the proxy, the origin and the client.

use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Result;
use rustls::ClientConfig;

use crate::client::{self, LoadResult};
use crate::procs::{cpu_ticks, machine_busy_ticks, reaped_children_ticks, rss_kib};
use crate::report::{Figure, Kind, Samples, Test};
use crate::setup::{self, Origin, Running, Target};
use crate::syslog::SyslogSink;
use crate::wrk::{wrk, HttpResult};

/// Concurrent connections of every load run (as wrk's -c50).
const CONNECTIONS: usize = 50;

/// How long after a logged run its last lines get to reach the file or the
/// syslog receiver before they are counted.
const LOG_CATCH_UP: Duration = Duration::from_millis(300);

/// The rustls client configs the tests use.
pub struct Clients {
    /// TLS 1.3, no resumption: every connection a full handshake.
    pub full: Arc<ClientConfig>,
    /// TLS 1.3, presenting the bench's client certificate.
    pub with_cert: Arc<ClientConfig>,
}

impl Clients {
    pub fn new(dir: &Path) -> Result<Clients> {
        Ok(Clients {
            full: client::client_config(
                dir,
                &client::TlsOptions {
                    tls13_only: true,
                    resume: false,
                    client_cert: None,
                },
            )?,
            with_cert: client::client_config(
                dir,
                &client::TlsOptions {
                    tls13_only: true,
                    resume: false,
                    client_cert: Some(setup::CLIENT_CERT),
                },
            )?,
        })
    }
}

/// Counters read right before a run, in clock ticks.
struct CpuProbe {
    proxy: u64,
    origin: u64,
    children: u64,
    machine: u64,
    started: Instant,
}

/// CPU seconds used by each party during a run, and its wall time.
struct CpuUse {
    proxy: f64,
    origin: f64,
    /// Reaped children (wrk); the bench client reports its own.
    children: f64,
    machine: f64,
    wall: f64,
}

impl CpuProbe {
    fn start(proxy_pid: u32, origin_pid: u32) -> Result<CpuProbe> {
        Ok(CpuProbe {
            proxy: cpu_ticks(proxy_pid)?,
            origin: cpu_ticks(origin_pid)?,
            children: reaped_children_ticks()?,
            machine: machine_busy_ticks()?,
            started: Instant::now(),
        })
    }

    fn finish(self, proxy_pid: u32, origin_pid: u32, ticks_per_sec: f64) -> Result<CpuUse> {
        let wall = self.started.elapsed().as_secs_f64();
        let secs = |ticks: u64| ticks as f64 / ticks_per_sec;
        Ok(CpuUse {
            proxy: secs(cpu_ticks(proxy_pid)? - self.proxy),
            origin: secs(cpu_ticks(origin_pid)? - self.origin),
            children: secs(reaped_children_ticks()? - self.children),
            machine: secs(machine_busy_ticks()? - self.machine),
            wall,
        })
    }
}

/// What every test reports, whichever client ran it.
struct Outcome {
    requests: u64,
    rate: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
    client_cpu: Option<f64>,
    detail: String,
}

impl From<HttpResult> for Outcome {
    fn from(r: HttpResult) -> Outcome {
        Outcome {
            requests: r.requests,
            rate: r.requests_per_sec,
            p50_us: r.p50_us,
            p99_us: r.p99_us,
            errors: r.errors,
            client_cpu: None,
            detail: String::new(),
        }
    }
}

impl From<LoadResult> for Outcome {
    fn from(r: LoadResult) -> Outcome {
        Outcome {
            requests: r.requests,
            rate: r.requests_per_sec,
            p50_us: r.p50_us,
            p99_us: r.p99_us,
            errors: r.errors,
            client_cpu: Some(r.client_cpu_secs),
            detail: format!(
                ", handshakes full {} resumed {}",
                r.full_handshakes, r.resumed_handshakes
            ),
        }
    }
}

/// Runs `test` through `running` for `secs` seconds, records its figures
/// and returns a one-line summary for the progress log.
pub fn run(
    test: Test,
    running: &mut Running,
    origin: &Origin,
    clients: &Clients,
    secs: u64,
    ticks_per_sec: f64,
    samples: &mut Samples,
) -> Result<String> {
    let proxy_pid = running.proxy.pid();
    let origin_pid = origin.guard.pid();
    let https = |port: u16| format!("https://127.0.0.1:{port}/");
    let log_mark = running.log.mark()?;
    let probe = CpuProbe::start(proxy_pid, origin_pid)?;
    let mut outcome: Outcome = match test {
        Test::Offload => wrk(&https(running.offload_port), secs, false)?.into(),
        Test::OffloadLogged => wrk(&https(running.logged_port), secs, false)?.into(),
        Test::ResumedHandshake => wrk(&https(running.offload_port), secs, true)?.into(),
        Test::Passthrough => wrk(&https(running.pass_port), secs, false)?.into(),
        Test::FullHandshake => client::load(
            running.offload_port,
            clients.full.clone(),
            CONNECTIONS,
            secs,
            true,
            ticks_per_sec,
        )?
        .into(),
        Test::ClientCert => client::load(
            running.mtls_port,
            clients.with_cert.clone(),
            CONNECTIONS,
            secs,
            false,
            ticks_per_sec,
        )?
        .into(),
    };
    let cpu = probe.finish(proxy_pid, origin_pid, ticks_per_sec)?;
    running.proxy.ensure_running()?;
    if test == Test::OffloadLogged {
        // Writers that batch (or a receiver thread) may still be a moment
        // behind the last response.
        thread::sleep(LOG_CATCH_UP);
        let lines = running.log.lines_since(log_mark)?;
        let per_request = lines as f64 / outcome.requests.max(1) as f64;
        samples.add(running.target, Figure::LogLinesPerRequest, per_request);
        outcome.detail += &format!(", {lines} log lines ({per_request:.2} per request)");
    }

    let client_cpu = outcome.client_cpu.unwrap_or(cpu.children);
    let load = |secs: f64| 100.0 * secs / cpu.wall;
    let others = (cpu.machine - cpu.proxy - cpu.origin - client_cpu).max(0.0);
    let per_unit = cpu.proxy * 1e6 / outcome.requests.max(1) as f64;
    let target = running.target;
    let mut add = |kind, value| samples.add(target, Figure::Run(test, kind), value);
    add(Kind::Rate, outcome.rate);
    add(Kind::P50, outcome.p50_us / 1e3);
    add(Kind::P99, outcome.p99_us / 1e3);
    add(Kind::CpuPerUnit, per_unit);
    add(Kind::ProxyLoad, load(cpu.proxy));
    add(Kind::ClientLoad, load(client_cpu));
    add(Kind::OriginLoad, load(cpu.origin));
    add(Kind::OthersLoad, load(others));
    samples.add(target, Figure::OthersLoad, load(others));
    samples.add(target, Figure::Errors, outcome.errors as f64);
    let mut line = format!(
        "{:.0}/s, p50 {:.3} ms, p99 {:.3} ms | CPU %: proxy {:.0} ({per_unit:.1} µs each), {} {:.0}, origin {:.0}, others {:.0}{}",
        outcome.rate,
        outcome.p50_us / 1e3,
        outcome.p99_us / 1e3,
        load(cpu.proxy),
        test.client_name(),
        load(client_cpu),
        load(cpu.origin),
        load(others),
        outcome.detail,
    );
    if outcome.errors > 0 {
        line += &format!(", {} errors", outcome.errors);
    }
    Ok(line)
}

/// The idle-connection memory test on a freshly started `target`: RSS
/// before and with `count` idle offloaded TLS connections.
#[allow(clippy::too_many_arguments)]
pub fn idle(
    target: Target,
    round: u32,
    dir: &Path,
    origin: &Origin,
    fleetgate_bin: &Path,
    clients: &Clients,
    syslog: &SyslogSink,
    count: usize,
    samples: &mut Samples,
) -> Result<String> {
    let mut running = setup::start(
        target,
        &format!("-idle{round}"),
        dir,
        origin,
        fleetgate_bin,
        &clients.full,
        syslog,
    )?;
    let pid = running.proxy.pid();
    thread::sleep(Duration::from_secs(1));
    let before = rss_kib(pid)?;
    let started = Instant::now();
    let conns = client::hold_idle(running.offload_port, clients.full.clone(), count, 50)?;
    let opened_in = started.elapsed();
    thread::sleep(Duration::from_secs(2));
    let after = rss_kib(pid)?;
    running.proxy.ensure_running()?;
    let held = conns.len();
    drop(conns);
    drop(running);
    let per_conn = (after as f64 - before as f64) / held as f64;
    samples.add(target, Figure::IdleKibPerConn, per_conn);
    samples.add(target, Figure::IdleRssBefore, before as f64 / 1024.0);
    Ok(format!(
        "{held} idle connections (opened in {:.1} s): RSS {before} → {after} KiB, {per_conn:.1} KiB/connection",
        opened_in.as_secs_f64()
    ))
}
