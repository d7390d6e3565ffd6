//! Collected samples and the markdown tables made from them.

use std::collections::HashMap;

use crate::table::{format_ratio, format_value, markdown, median};
use crate::targets::Target;

/// How samples from several rounds/tests become one number.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Combine {
    Median,
    Max,
    Sum,
}

/// One row of the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Figure {
    KeepAliveRate,
    KeepAliveP50,
    KeepAliveP99,
    KeepAliveCpuPerReq,
    KeepAliveProxyLoad,
    KeepAliveOriginLoad,
    KeepAliveClientLoad,
    NewConnRate,
    NewConnP50,
    NewConnP99,
    NewConnCpuPerConn,
    NewConnProxyLoad,
    NewConnOriginLoad,
    NewConnClientLoad,
    Bulk1Gbps,
    Bulk1CpuPerGb,
    Bulk1ProxyLoad,
    Bulk1ServerLoad,
    Bulk4Gbps,
    Bulk4CpuPerGb,
    Bulk4ProxyLoad,
    Bulk4ServerLoad,
    RssMax,
    OthersLoad,
    ClientErrors,
}

/// A row's label ends in ↑ when higher is better, ↓ when lower is better,
/// and has no arrow when it is context (how busy a process was).
struct Info {
    label: &'static str,
    combine: Combine,
    decimals: usize,
    /// Meaningless without a proxy process (CPU, RSS of the proxy).
    proxy_only: bool,
}

const fn info(label: &'static str, decimals: usize, proxy_only: bool) -> Info {
    Info {
        label,
        combine: Combine::Median,
        decimals,
        proxy_only,
    }
}

impl Figure {
    const ALL: [Figure; 25] = [
        Figure::KeepAliveRate,
        Figure::KeepAliveP50,
        Figure::KeepAliveP99,
        Figure::KeepAliveCpuPerReq,
        Figure::KeepAliveProxyLoad,
        Figure::KeepAliveOriginLoad,
        Figure::KeepAliveClientLoad,
        Figure::NewConnRate,
        Figure::NewConnP50,
        Figure::NewConnP99,
        Figure::NewConnCpuPerConn,
        Figure::NewConnProxyLoad,
        Figure::NewConnOriginLoad,
        Figure::NewConnClientLoad,
        Figure::Bulk1Gbps,
        Figure::Bulk1CpuPerGb,
        Figure::Bulk1ProxyLoad,
        Figure::Bulk1ServerLoad,
        Figure::Bulk4Gbps,
        Figure::Bulk4CpuPerGb,
        Figure::Bulk4ProxyLoad,
        Figure::Bulk4ServerLoad,
        Figure::RssMax,
        Figure::OthersLoad,
        Figure::ClientErrors,
    ];

    fn info(self) -> Info {
        match self {
            Figure::KeepAliveRate => info("keep-alive requests/s ↑", 0, false),
            Figure::KeepAliveP50 => info("keep-alive p50 latency, ms ↓", 3, false),
            Figure::KeepAliveP99 => info("keep-alive p99 latency, ms ↓", 3, false),
            Figure::KeepAliveCpuPerReq => info("keep-alive proxy CPU µs/request ↓", 2, true),
            Figure::KeepAliveProxyLoad => info("keep-alive proxy CPU, % of a core", 0, true),
            Figure::KeepAliveOriginLoad => info("keep-alive origin CPU, % of a core", 0, false),
            Figure::KeepAliveClientLoad => info("keep-alive wrk CPU, % of a core", 0, false),
            Figure::NewConnRate => info("new connections/s ↑", 0, false),
            Figure::NewConnP50 => info("new-conn p50 latency, ms ↓", 3, false),
            Figure::NewConnP99 => info("new-conn p99 latency, ms ↓", 3, false),
            Figure::NewConnCpuPerConn => info("new-conn proxy CPU µs/connection ↓", 2, true),
            Figure::NewConnProxyLoad => info("new-conn proxy CPU, % of a core", 0, true),
            Figure::NewConnOriginLoad => info("new-conn origin CPU, % of a core", 0, false),
            Figure::NewConnClientLoad => info("new-conn wrk CPU, % of a core", 0, false),
            Figure::Bulk1Gbps => info("bulk 1 stream Gbit/s ↑", 2, false),
            Figure::Bulk1CpuPerGb => info("bulk 1 stream proxy CPU s/GB ↓", 3, true),
            Figure::Bulk1ProxyLoad => info("bulk 1 stream proxy CPU, % of a core", 0, true),
            Figure::Bulk1ServerLoad => {
                info("bulk 1 stream iperf3 server CPU, % of a core", 0, false)
            }
            Figure::Bulk4Gbps => info("bulk 4 streams Gbit/s ↑", 2, false),
            Figure::Bulk4CpuPerGb => info("bulk 4 streams proxy CPU s/GB ↓", 3, true),
            Figure::Bulk4ProxyLoad => info("bulk 4 streams proxy CPU, % of a core", 0, true),
            Figure::Bulk4ServerLoad => {
                info("bulk 4 streams iperf3 server CPU, % of a core", 0, false)
            }
            Figure::RssMax => Info {
                combine: Combine::Max,
                ..info("proxy RSS max, MiB ↓", 1, true)
            },
            Figure::OthersLoad => info("other processes' CPU, % of a core", 0, false),
            Figure::ClientErrors => Info {
                combine: Combine::Sum,
                ..info("wrk errors, all runs (socket + non-2xx) ↓", 0, false)
            },
        }
    }
}

/// Every sample taken, per target and figure.
#[derive(Default)]
pub struct Samples {
    values: HashMap<(Target, Figure), Vec<f64>>,
}

impl Samples {
    pub fn add(&mut self, target: Target, figure: Figure, value: f64) {
        if value.is_finite() {
            self.values.entry((target, figure)).or_default().push(value);
        }
    }

    /// The figure for `target` over all rounds, None if never measured.
    pub fn value(&self, target: Target, figure: Figure) -> Option<f64> {
        let samples = self.values.get(&(target, figure))?;
        if samples.is_empty() {
            return None;
        }
        Some(match figure.info().combine {
            Combine::Median => median(samples),
            Combine::Max => samples.iter().copied().fold(f64::MIN, f64::max),
            Combine::Sum => samples.iter().sum(),
        })
    }
}

/// The main table: one row per figure, one column per proxy, then ratios.
pub fn proxy_table(samples: &Samples) -> String {
    let mut header: Vec<String> = vec!["figure".into()];
    header.extend(Target::PROXIES.iter().map(|t| t.label().to_string()));
    header.push("fleetgate/HAProxy".into());
    header.push("fleetgate/nginx".into());
    let mut rows = vec![header];
    for figure in Figure::ALL {
        let info = figure.info();
        let mut row = vec![info.label.to_string()];
        for target in Target::PROXIES {
            row.push(format_value(samples.value(target, figure), info.decimals));
        }
        let fleetgate = samples.value(Target::Fleetgate, figure);
        row.push(format_ratio(
            fleetgate,
            samples.value(Target::Haproxy, figure),
        ));
        row.push(format_ratio(
            fleetgate,
            samples.value(Target::Nginx, figure),
        ));
        rows.push(row);
    }
    markdown(&rows)
}

/// The no-proxy reference: what the client and origin do on their own.
pub fn direct_table(samples: &Samples) -> String {
    let mut rows = vec![vec![
        "figure".to_string(),
        Target::Direct.label().to_string(),
    ]];
    for figure in Figure::ALL {
        let info = figure.info();
        if info.proxy_only {
            continue;
        }
        let value = samples.value(Target::Direct, figure);
        rows.push(vec![
            info.label.to_string(),
            format_value(value, info.decimals),
        ]);
    }
    markdown(&rows)
}

/// Text printed under the main table.
pub fn notes(rounds: u32) -> String {
    format!(
        "Notes:\n\
         - The ratio columns are fleetgate ÷ other on every row. On ↑ rows (higher \
         is better: requests/s, connections/s, Gbit/s) a ratio above 1 favours \
         fleetgate. On ↓ rows (lower is better: latency, proxy CPU per \
         request/connection/GB, RSS, errors) the ratio is still fleetgate ÷ other, \
         so there a ratio below 1 favours fleetgate.\n\
         - Rows without an arrow are context: how busy each process was (CPU \
         time ÷ wall time of the run; 100 = one core fully busy). \"other \
         processes\" is the machine's busy time minus proxy, server and load \
         generator, over all runs: well above 0 means the figures were taken on a \
         shared, noisy machine.\n\
         - Each value is the median of {rounds} rounds, except RSS (max of all \
         samples, taken at the end of every run) and wrk errors (sum over all runs).\n\
         - Load generator, proxy and servers share this machine's cores.\n\
         - GB = 10^9 bytes received by the iperf3 server."
    )
}
