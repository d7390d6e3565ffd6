//! Collected samples and the markdown tables made from them.

use std::collections::HashMap;

use crate::measure::Test;
use crate::table::{format_ratio, format_value, markdown, median};
use crate::targets::Target;

/// How samples from several rounds/tests become one number.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Combine {
    Median,
    Max,
    Sum,
}

/// What one row of a load test shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Measure {
    /// Requests/s, connections/s or Gbit/s.
    Rate,
    P50,
    P99,
    /// The proxy's own CPU per request / connection / GB.
    ProxyCpu,
    /// The whole machine's busy time (irq and softirq included) per unit.
    MachineCpu,
    /// The same less the "other processes" share: proxy, server, client,
    /// irq and softirq; what is left when another job shares the machine.
    MachineLessOthers,
    /// CPU, % of a core, of the proxy, of the server behind it, and of the
    /// load generator.
    ProxyLoad,
    BackendLoad,
    ClientLoad,
}

impl Measure {
    const HTTP: [Measure; 9] = [
        Measure::Rate,
        Measure::P50,
        Measure::P99,
        Measure::ProxyCpu,
        Measure::MachineCpu,
        Measure::MachineLessOthers,
        Measure::ProxyLoad,
        Measure::BackendLoad,
        Measure::ClientLoad,
    ];
    const BULK: [Measure; 6] = [
        Measure::Rate,
        Measure::ProxyCpu,
        Measure::MachineCpu,
        Measure::MachineLessOthers,
        Measure::ProxyLoad,
        Measure::BackendLoad,
    ];
}

/// One row of the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Figure {
    Load(Test, Measure),
    /// RSS growth ÷ connections held, on a freshly started proxy.
    IdleKibPerConn,
    /// RSS of the fresh proxy before the idle connections.
    IdleRssBefore,
    RssMax,
    OthersLoad,
    ClientErrors,
}

/// A row's label ends in ↑ when higher is better, ↓ when lower is better,
/// and has no arrow when it is context (how busy a process was).
struct Info {
    label: String,
    combine: Combine,
    decimals: usize,
    /// Meaningless without a proxy process (CPU, RSS of the proxy).
    proxy_only: bool,
}

fn info(label: String, decimals: usize, proxy_only: bool) -> Info {
    Info {
        label,
        combine: Combine::Median,
        decimals,
        proxy_only,
    }
}

impl Figure {
    /// Every row, in report order.
    fn all() -> Vec<Figure> {
        let mut all = Vec::new();
        for test in Test::ALL {
            let measures: &[Measure] = if test.is_bulk() {
                &Measure::BULK
            } else {
                &Measure::HTTP
            };
            all.extend(measures.iter().map(|&m| Figure::Load(test, m)));
        }
        all.extend([
            Figure::IdleKibPerConn,
            Figure::IdleRssBefore,
            Figure::RssMax,
            Figure::OthersLoad,
            Figure::ClientErrors,
        ]);
        all
    }

    fn info(self) -> Info {
        match self {
            Figure::Load(test, measure) => load_info(test, measure),
            Figure::IdleKibPerConn => info("idle L4 connection, KiB each ↓".into(), 2, true),
            Figure::IdleRssBefore => info("idle test: fresh proxy RSS, MiB".into(), 1, true),
            Figure::RssMax => Info {
                combine: Combine::Max,
                ..info("proxy RSS max under load, MiB ↓".into(), 1, true)
            },
            Figure::OthersLoad => info("other processes' CPU, % of a core".into(), 0, false),
            Figure::ClientErrors => Info {
                combine: Combine::Sum,
                ..info("wrk errors, all runs (socket + non-2xx) ↓".into(), 0, false)
            },
        }
    }
}

fn load_info(test: Test, measure: Measure) -> Info {
    let name = test.label();
    let unit = test.unit();
    let per_unit_decimals = if test.is_bulk() { 3 } else { 2 };
    let backend = if test.is_bulk() {
        "iperf3 server"
    } else {
        "origin"
    };
    match measure {
        Measure::Rate => match test {
            Test::KeepAlive => info("keep-alive requests/s ↑".into(), 0, false),
            Test::NewConn => info("new connections/s ↑".into(), 0, false),
            Test::Passthrough => info(format!("{name} requests/s ↑"), 0, false),
            Test::Bulk1 | Test::Bulk4 => info(format!("{name} Gbit/s ↑"), 2, false),
        },
        Measure::P50 => info(format!("{name} p50 latency, ms ↓"), 3, false),
        Measure::P99 => info(format!("{name} p99 latency, ms ↓"), 3, false),
        Measure::ProxyCpu => info(
            format!("{name} proxy CPU {unit} ↓"),
            per_unit_decimals,
            true,
        ),
        Measure::MachineCpu => info(
            format!("{name} machine CPU {unit} ↓"),
            per_unit_decimals,
            false,
        ),
        Measure::MachineLessOthers => info(
            format!("{name} machine CPU less others {unit} ↓"),
            per_unit_decimals,
            false,
        ),
        Measure::ProxyLoad => info(format!("{name} proxy CPU, % of a core"), 0, true),
        Measure::BackendLoad => info(format!("{name} {backend} CPU, % of a core"), 0, false),
        Measure::ClientLoad => info(format!("{name} wrk CPU, % of a core"), 0, false),
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

    /// The lowest and highest of `a` ÷ `b` round by round (round i of one
    /// against round i of the other), for a median figure measured in
    /// every round of both: the noise band to read the median ratio
    /// against. None with a single round or a missing sample.
    pub fn ratio_range(&self, a: Target, b: Target, figure: Figure) -> Option<(f64, f64)> {
        if figure.info().combine != Combine::Median {
            return None;
        }
        let (xs, ys) = (
            self.values.get(&(a, figure))?,
            self.values.get(&(b, figure))?,
        );
        if xs.len() < 2 || xs.len() != ys.len() {
            return None;
        }
        let ratios = xs
            .iter()
            .zip(ys)
            .filter(|(_, &y)| y != 0.0)
            .map(|(x, y)| x / y);
        ratios.fold(None, |range, r| match range {
            None => Some((r, r)),
            Some((lo, hi)) => Some((f64::min(lo, r), f64::max(hi, r))),
        })
    }
}

/// The ratio columns: every fleetgate instance against HAProxy, and the
/// first one against nginx too (more would make the table too wide to read
/// in a terminal); only against proxies that were run.
fn ratio_pairs(proxies: &[Target]) -> Vec<(Target, Target)> {
    let fleetgates: Vec<Target> = proxies
        .iter()
        .copied()
        .filter(|t| matches!(t, Target::Fleetgate(_)))
        .collect();
    let mut pairs = Vec::new();
    if proxies.contains(&Target::Haproxy) {
        pairs.extend(fleetgates.iter().map(|&f| (f, Target::Haproxy)));
    }
    if let (Some(&first), true) = (fleetgates.first(), proxies.contains(&Target::Nginx)) {
        pairs.push((first, Target::Nginx));
    }
    pairs
}

/// The main table: one row per figure, one column per proxy, then ratios.
pub fn proxy_table(samples: &Samples, proxies: &[Target]) -> String {
    let pairs = ratio_pairs(proxies);
    let mut header: Vec<String> = vec!["figure".into()];
    header.extend(proxies.iter().map(|t| t.label().to_string()));
    header.extend(
        pairs
            .iter()
            .map(|(a, b)| format!("{}/{}", a.label(), b.label())),
    );
    let mut rows = vec![header];
    for figure in Figure::all() {
        let info = figure.info();
        let mut row = vec![info.label.clone()];
        for &target in proxies {
            row.push(format_value(samples.value(target, figure), info.decimals));
        }
        for &(a, b) in &pairs {
            let mut cell = format_ratio(samples.value(a, figure), samples.value(b, figure));
            if let Some((lo, hi)) = samples.ratio_range(a, b, figure) {
                cell.push_str(&format!(" ({lo:.2}–{hi:.2})"));
            }
            row.push(cell);
        }
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
    for figure in Figure::all() {
        let info = figure.info();
        if info.proxy_only {
            continue;
        }
        let value = samples.value(Target::Direct, figure);
        rows.push(vec![info.label, format_value(value, info.decimals)]);
    }
    markdown(&rows)
}

/// Text printed under the main table.
pub fn notes(rounds: u32, idle_conns: usize) -> String {
    format!(
        "Notes:\n\
         - The ratio columns are fleetgate ÷ other on every row. On ↑ rows (higher \
         is better: requests/s, connections/s, Gbit/s) a ratio above 1 favours \
         fleetgate. On ↓ rows (lower is better: latency, CPU per \
         request/connection/GB, RSS, errors) the ratio is still fleetgate ÷ other, \
         so there a ratio below 1 favours fleetgate. With more than one round, \
         a ratio is followed by the lowest and highest of the per-round ratios \
         (round i of one proxy against round i of the other): a median ratio \
         inside a band that spans 1 is not a difference this run can show.\n\
         - \"proxy CPU\" is the proxy process's own utime+stime. \"machine CPU\" \
         is the busy time of all CPUs from /proc/stat (user, nice, system, irq, \
         softirq, steal) over the run: proxy, server, load generator and the \
         kernel's loopback TCP work, which is often charged to no process or to \
         another one. Both are divided by the requests (connections, GB) served.\n\
         - Machine CPU counts whatever else ran during the run too: compare it \
         between proxies only when \"other processes\" is near 0 (a quiet \
         machine); the direct table gives the client and origin's own share. \
         \"machine CPU less others\" takes the \"other processes\" share of \
         each run out again (what remains: proxy, server, load generator, irq, \
         softirq), which holds up on a shared machine.\n\
         - Rows without an arrow are context: how busy each process was (CPU \
         time ÷ wall time of the run; 100 = one core fully busy). \"other \
         processes\" is the machine's busy time without irq/softirq minus proxy, \
         server and load generator, over all runs: well above 0 means the figures \
         were taken on a shared, noisy machine.\n\
         - Every round starts each proxy afresh. Each value is the median of \
         {rounds} rounds, except RSS under load (max \
         of all samples, taken at the end of every run) and wrk errors (sum over \
         all runs).\n\
         - Idle L4 connection: per round a freshly started proxy, VmRSS 1 s after \
         the start and 2 s after {idle_conns} plain TCP connections through its \
         HTTP port each made one keep-alive request and went idle; the difference \
         ÷ connections.\n\
         - Load generator, proxy and servers share this machine's cores.\n\
         - GB = 10^9 bytes received by the iperf3 server."
    )
}
