//! One measurement: run a load generator through a target while watching
//! the CPU time of the proxy and of the origin behind it.

use std::time::Instant;

use anyhow::Result;

use crate::load::{iperf, wrk, BulkResult, HttpResult};
use crate::procs::{cpu_ticks, machine_busy_ticks, reaped_children_ticks, rss_kib};
use crate::report::{Figure, Samples};
use crate::targets::{Backends, Running};

/// The four load shapes, run in this order for each target in each round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Test {
    KeepAlive,
    NewConn,
    Bulk1,
    Bulk4,
}

impl Test {
    pub const ALL: [Test; 4] = [Test::KeepAlive, Test::NewConn, Test::Bulk1, Test::Bulk4];

    pub fn label(self) -> &'static str {
        match self {
            Test::KeepAlive => "keep-alive",
            Test::NewConn => "new-conn",
            Test::Bulk1 => "bulk x1",
            Test::Bulk4 => "bulk x4",
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
    machine: u64,
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
            machine: machine_busy_ticks()?,
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
        let machine = secs(machine_busy_ticks()? - self.machine);
        let others = (machine - proxy.unwrap_or(0.0) - backend - client).max(0.0);
        Ok(CpuUse {
            proxy,
            backend,
            client,
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
    let backend_pid = match test {
        Test::KeepAlive | Test::NewConn => backends.origin.pid(),
        Test::Bulk1 | Test::Bulk4 => backends.iperf.pid(),
    };
    let probe = CpuProbe::start(proxy_pid, backend_pid, ticks_per_sec)?;
    let summary = match test {
        Test::KeepAlive | Test::NewConn => {
            let close = test == Test::NewConn;
            let result = wrk(running.http_port, secs, close)?;
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
    let [rate, p50, p99, per_unit, proxy_load, origin_load, client_load] =
        if test == Test::KeepAlive {
            [
                Figure::KeepAliveRate,
                Figure::KeepAliveP50,
                Figure::KeepAliveP99,
                Figure::KeepAliveCpuPerReq,
                Figure::KeepAliveProxyLoad,
                Figure::KeepAliveOriginLoad,
                Figure::KeepAliveClientLoad,
            ]
        } else {
            [
                Figure::NewConnRate,
                Figure::NewConnP50,
                Figure::NewConnP99,
                Figure::NewConnCpuPerConn,
                Figure::NewConnProxyLoad,
                Figure::NewConnOriginLoad,
                Figure::NewConnClientLoad,
            ]
        };
    let target = running.target;
    samples.add(target, rate, result.requests_per_sec);
    samples.add(target, p50, result.p50_us / 1e3);
    samples.add(target, p99, result.p99_us / 1e3);
    samples.add(target, origin_load, cpu.load(cpu.backend));
    samples.add(target, client_load, cpu.load(cpu.client));
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
        let us_per_req = proxy_cpu * 1e6 / result.requests.max(1) as f64;
        samples.add(target, per_unit, us_per_req);
        samples.add(target, proxy_load, cpu.load(proxy_cpu));
        summary += &format!(
            ", proxy {:.0} ({us_per_req:.2} µs/req)",
            cpu.load(proxy_cpu)
        );
    }
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
    let [rate, per_gb, proxy_load, server_load] = if test == Test::Bulk1 {
        [
            Figure::Bulk1Gbps,
            Figure::Bulk1CpuPerGb,
            Figure::Bulk1ProxyLoad,
            Figure::Bulk1ServerLoad,
        ]
    } else {
        [
            Figure::Bulk4Gbps,
            Figure::Bulk4CpuPerGb,
            Figure::Bulk4ProxyLoad,
            Figure::Bulk4ServerLoad,
        ]
    };
    let target = running.target;
    samples.add(target, rate, result.gbit_per_sec);
    samples.add(target, server_load, cpu.load(cpu.backend));
    samples.add(target, Figure::OthersLoad, cpu.load(cpu.others));
    let mut summary = format!(
        "{:.2} Gbit/s | CPU %: iperf3 client {:.0}, server {:.0}, others {:.0}",
        result.gbit_per_sec,
        cpu.load(cpu.client),
        cpu.load(cpu.backend),
        cpu.load(cpu.others),
    );
    if let Some(proxy_cpu) = cpu.proxy {
        let per = proxy_cpu / (result.bytes as f64 / 1e9).max(1e-9);
        samples.add(target, per_gb, per);
        samples.add(target, proxy_load, cpu.load(proxy_cpu));
        summary += &format!(", proxy {:.0} ({per:.3} s/GB)", cpu.load(proxy_cpu));
    }
    summary
}
