//! One measurement: run a load generator through a target while watching
//! the CPU time of the proxy, of the server behind it, and of the whole
//! machine.

use std::time::Instant;

use anyhow::Result;

use crate::load::{iperf, wrk, wrk_passthrough, BulkResult, HttpResult};
use crate::procs::{cpu_ticks, machine_ticks, reaped_children_ticks, rss_kib, MachineTicks};
use crate::report::{Figure, Measure, Samples};
use crate::targets::{Backends, Running};

/// The load shapes, run in this order for each target in each round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Test {
    KeepAlive,
    NewConn,
    Bulk1,
    Bulk4,
    Passthrough,
}

impl Test {
    pub const ALL: [Test; 5] = [
        Test::KeepAlive,
        Test::NewConn,
        Test::Bulk1,
        Test::Bulk4,
        Test::Passthrough,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Test::KeepAlive => "keep-alive",
            Test::NewConn => "new-conn",
            Test::Bulk1 => "bulk 1 stream",
            Test::Bulk4 => "bulk 4 streams",
            Test::Passthrough => "passthrough keep-alive",
        }
    }

    /// Name accepted by the TESTS environment variable.
    pub fn key(self) -> &'static str {
        match self {
            Test::KeepAlive => "keep-alive",
            Test::NewConn => "new-conn",
            Test::Bulk1 => "bulk1",
            Test::Bulk4 => "bulk4",
            Test::Passthrough => "passthrough",
        }
    }

    pub fn is_bulk(self) -> bool {
        matches!(self, Test::Bulk1 | Test::Bulk4)
    }

    /// What CPU time is divided by.
    pub fn unit(self) -> &'static str {
        match self {
            Test::KeepAlive | Test::Passthrough => "µs/request",
            Test::NewConn => "µs/connection",
            Test::Bulk1 | Test::Bulk4 => "s/GB",
        }
    }
}

/// CPU seconds used during one run, per party.
struct CpuUse {
    /// None for the no-proxy baseline.
    proxy: Option<f64>,
    /// The origin nginx or the iperf3 server.
    backend: f64,
    /// wrk or the iperf3 client.
    client: f64,
    /// Everything the machine did, interrupts and softirq included.
    machine: f64,
    /// Everything else on the machine: a measure of how noisy the run was.
    others: f64,
    wall: f64,
}

impl CpuUse {
    /// CPU seconds as a percentage of one core over the run.
    fn load(&self, cpu_secs: f64) -> f64 {
        100.0 * cpu_secs / self.wall
    }
}

/// CPU counters read right before a run, in clock ticks.
struct CpuProbe {
    proxy_pid: Option<u32>,
    backend_pid: u32,
    proxy: Option<u64>,
    backend: u64,
    client: u64,
    machine: MachineTicks,
    started: Instant,
    ticks_per_sec: f64,
}

impl CpuProbe {
    fn start(proxy_pid: Option<u32>, backend_pid: u32, ticks_per_sec: f64) -> Result<CpuProbe> {
        Ok(CpuProbe {
            proxy_pid,
            backend_pid,
            proxy: proxy_pid.map(cpu_ticks).transpose()?,
            backend: cpu_ticks(backend_pid)?,
            client: reaped_children_ticks()?,
            machine: machine_ticks()?,
            started: Instant::now(),
            ticks_per_sec,
        })
    }

    /// Reads the counters again once the client has exited and been reaped.
    fn finish(self) -> Result<CpuUse> {
        let wall = self.started.elapsed().as_secs_f64();
        let secs = |ticks: u64| ticks as f64 / self.ticks_per_sec;
        let proxy = match (self.proxy_pid, self.proxy) {
            (Some(pid), Some(start)) => Some(secs(cpu_ticks(pid)? - start)),
            _ => None,
        };
        let backend = secs(cpu_ticks(self.backend_pid)? - self.backend);
        let client = secs(reaped_children_ticks()? - self.client);
        let now = machine_ticks()?;
        // "others" keeps leaving interrupt time out, as it always has: it is
        // a noise indicator, and our own loopback softirq is not noise.
        let without_irq = secs(now.busy_without_irq - self.machine.busy_without_irq);
        let others = (without_irq - proxy.unwrap_or(0.0) - backend - client).max(0.0);
        Ok(CpuUse {
            proxy,
            backend,
            client,
            machine: secs(now.busy - self.machine.busy),
            others,
            wall,
        })
    }
}

/// Runs `test` through `running` for `secs` seconds and records its figures.
/// Returns a one-line summary for the progress log.
pub fn run(
    test: Test,
    running: &mut Running,
    backends: &Backends,
    secs: u64,
    ticks_per_sec: f64,
    samples: &mut Samples,
) -> Result<String> {
    let proxy_pid = running.proxy.as_ref().map(|p| p.pid());
    let backend_pid = if test.is_bulk() {
        backends.iperf.pid()
    } else {
        backends.origin.pid()
    };
    let probe = CpuProbe::start(proxy_pid, backend_pid, ticks_per_sec)?;
    let summary = match test {
        Test::KeepAlive | Test::NewConn | Test::Passthrough => {
            let result = match test {
                Test::Passthrough => wrk_passthrough(running.pass_port, secs)?,
                _ => wrk(running.http_port, secs, test == Test::NewConn)?,
            };
            let cpu = probe.finish()?;
            record_http(test, running, &result, &cpu, samples)
        }
        Test::Bulk1 | Test::Bulk4 => {
            let streams = if test == Test::Bulk1 { 1 } else { 4 };
            let result = iperf(running.bulk_port, secs, streams)?;
            let cpu = probe.finish()?;
            record_bulk(test, running, &result, &cpu, samples)
        }
    };
    // RSS at the end of the run, when the proxy's buffers are at their
    // fullest; the report keeps the max.
    if let Some(pid) = proxy_pid {
        samples.add(
            running.target,
            Figure::RssMax,
            rss_kib(pid)? as f64 / 1024.0,
        );
    }
    if let Some(proxy) = running.proxy.as_mut() {
        proxy.ensure_running()?;
    }
    Ok(summary)
}

fn record_http(
    test: Test,
    running: &Running,
    result: &HttpResult,
    cpu: &CpuUse,
    samples: &mut Samples,
) -> String {
    let target = running.target;
    let figure = |m| Figure::Load(test, m);
    let per_request = |cpu_secs: f64| cpu_secs * 1e6 / result.requests.max(1) as f64;
    let machine_per_req = per_request(cpu.machine);
    samples.add(target, figure(Measure::Rate), result.requests_per_sec);
    samples.add(target, figure(Measure::P50), result.p50_us / 1e3);
    samples.add(target, figure(Measure::P99), result.p99_us / 1e3);
    samples.add(target, figure(Measure::MachineCpu), machine_per_req);
    let less_others = per_request(cpu.machine - cpu.others);
    samples.add(target, figure(Measure::MachineLessOthers), less_others);
    samples.add(target, figure(Measure::BackendLoad), cpu.load(cpu.backend));
    samples.add(target, figure(Measure::ClientLoad), cpu.load(cpu.client));
    samples.add(target, Figure::OthersLoad, cpu.load(cpu.others));
    samples.add(target, Figure::ClientErrors, result.errors as f64);
    let mut summary = format!(
        "{:.0} req/s, p50 {:.3} ms, p99 {:.3} ms | CPU %: wrk {:.0}, origin {:.0}, others {:.0}",
        result.requests_per_sec,
        result.p50_us / 1e3,
        result.p99_us / 1e3,
        cpu.load(cpu.client),
        cpu.load(cpu.backend),
        cpu.load(cpu.others),
    );
    if let Some(proxy_cpu) = cpu.proxy {
        let us_per_req = per_request(proxy_cpu);
        samples.add(target, figure(Measure::ProxyCpu), us_per_req);
        samples.add(target, figure(Measure::ProxyLoad), cpu.load(proxy_cpu));
        summary += &format!(
            ", proxy {:.0} ({us_per_req:.2} µs/req)",
            cpu.load(proxy_cpu)
        );
    }
    summary += &format!(" | machine {machine_per_req:.2} µs/req ({less_others:.2} less others)");
    if result.errors > 0 {
        summary += &format!(", {} errors", result.errors);
    }
    summary
}

fn record_bulk(
    test: Test,
    running: &Running,
    result: &BulkResult,
    cpu: &CpuUse,
    samples: &mut Samples,
) -> String {
    let target = running.target;
    let figure = |m| Figure::Load(test, m);
    let per_gb = |cpu_secs: f64| cpu_secs / (result.bytes as f64 / 1e9).max(1e-9);
    let machine_per_gb = per_gb(cpu.machine);
    samples.add(target, figure(Measure::Rate), result.gbit_per_sec);
    samples.add(target, figure(Measure::MachineCpu), machine_per_gb);
    let less_others = per_gb(cpu.machine - cpu.others);
    samples.add(target, figure(Measure::MachineLessOthers), less_others);
    samples.add(target, figure(Measure::BackendLoad), cpu.load(cpu.backend));
    samples.add(target, Figure::OthersLoad, cpu.load(cpu.others));
    let mut summary = format!(
        "{:.2} Gbit/s | CPU %: iperf3 client {:.0}, server {:.0}, others {:.0}",
        result.gbit_per_sec,
        cpu.load(cpu.client),
        cpu.load(cpu.backend),
        cpu.load(cpu.others),
    );
    if let Some(proxy_cpu) = cpu.proxy {
        let per = per_gb(proxy_cpu);
        samples.add(target, figure(Measure::ProxyCpu), per);
        samples.add(target, figure(Measure::ProxyLoad), cpu.load(proxy_cpu));
        summary += &format!(", proxy {:.0} ({per:.3} s/GB)", cpu.load(proxy_cpu));
    }
    summary += &format!(" | machine {machine_per_gb:.3} s/GB ({less_others:.3} less others)");
    summary
}
