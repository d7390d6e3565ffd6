//! The two result tables.

use crate::changes::{CpuRound, WallSample};
use crate::churn::Run;
use crate::table::{format_ratio, format_value, markdown, median, percentile};

/// Everything part 1 collected.
#[derive(Default)]
pub struct ChangeSamples {
    pub cpu: Vec<CpuRound>,
    pub wall: Vec<WallSample>,
    /// size of the /status document
    pub status_bytes: usize,
}

/// name, median, p90, pooled (if any), sample count.
fn stats_row(name: &str, values: &[f64], pooled: Option<f64>, decimals: usize) -> Vec<String> {
    let pooled = pooled.map_or(String::new(), |v| format_value(Some(v), decimals));
    if values.is_empty() {
        return vec![name.into(), "n/a".into(), "n/a".into(), pooled, "0".into()];
    }
    vec![
        name.into(),
        format_value(Some(median(values)), decimals),
        format_value(Some(percentile(values, 90.0)), decimals),
        pooled,
        values.len().to_string(),
    ]
}

pub fn changes_table(s: &ChangeSamples, pools: usize, nodes: usize, changes: usize) -> String {
    let cpu = |f: fn(&CpuRound) -> f64| s.cpu.iter().map(f).collect::<Vec<f64>>();
    let total_changes: f64 = cpu(|r| r.changes as f64).iter().sum();
    // Per change: each round's window difference over its changes; pooled:
    // all rounds' differences over all their changes, which the clock
    // tick's quantisation affects least.
    let per_change = |f: fn(&CpuRound) -> f64| {
        let values: Vec<f64> = s.cpu.iter().map(|r| f(r) / r.changes as f64).collect();
        let pooled = (total_changes > 0.0).then(|| cpu(f).iter().sum::<f64>() / total_changes);
        (values, pooled)
    };
    let (ticks, ticks_pooled) = per_change(|r| r.ticks_ms);
    let (sched, sched_pooled) = per_change(|r| r.sched_ms);
    let wall: Vec<f64> = s.wall.iter().map(|w| w.ms).collect();
    let polls: Vec<f64> = s.wall.iter().map(|w| f64::from(w.polls)).collect();
    let idle_status: Vec<f64> = s.wall.iter().map(|w| w.idle_status_ms).collect();
    let excess: Vec<f64> = s.wall.iter().map(|w| w.ms - w.idle_status_ms).collect();
    let rows = vec![
        vec![
            format!("one discovery change ({pools} pools × {nodes} discovered backends)"),
            "median".into(),
            "p90".into(),
            "pooled".into(),
            "samples".into(),
        ],
        stats_row(
            "fleetgate CPU per change, ms (utime+stime) ↓",
            &ticks,
            ticks_pooled,
            3,
        ),
        stats_row(
            "fleetgate CPU per change, ms (scheduler run time) ↓",
            &sched,
            sched_pooled,
            3,
        ),
        stats_row("heartbeat sent → /status shows it, ms ↓", &wall, None, 2),
        stats_row(
            "  the same minus the idle /status request before it, ms ↓",
            &excess,
            None,
            2,
        ),
        stats_row("/status polls until shown", &polls, None, 0),
        stats_row("one /status request while idle, ms", &idle_status, None, 2),
        stats_row(
            "fleetgate idle (no change), % of a core",
            &cpu(|r| r.idle_core_pct),
            None,
            2,
        ),
        stats_row(
            "other processes during the windows, % of a core",
            &cpu(|r| r.others_pct),
            None,
            1,
        ),
    ];
    let mut out = markdown(&rows);
    let applied: Vec<f64> = cpu(|r| r.applied_ratio);
    // NaN (no counter in this build) prints as NaN rather than hiding.
    if let Some(worst) = applied.iter().copied().reduce(|a, b| {
        if a.is_nan() || b.is_nan() {
            f64::NAN
        } else {
            a.min(b)
        }
    }) {
        out += &format!(
            "\nCPU rows: one sample per round: (CPU in a window of {changes} changes − CPU in \
             an idle window as long) ÷ {changes}; pooled = the same over all rounds together. \
             utime+stime moves in clock ticks (10 ms), so per round it can only show \
             multiples of 10 ms ÷ {changes}; the scheduler's run time is exact. Heartbeats \
             applied ÷ changes sent, worst round: {worst:.2} (1.00 = every change arrived and \
             was applied).\n"
        );
    }
    if !s.wall.is_empty() {
        out += &format!(
            "The wall time ends when the response showing the change has been read, so it \
             includes one /status request ({} KiB here, generated on the same control thread \
             that applies the change) and up to the 1 ms poll period: it cannot resolve \
             differences smaller than the idle /status row. The \"minus\" row subtracts, \
             change by change, the /status request timed just before that change: an \
             estimate of the change's own share (noisy where the /status time varies).\n",
            s.status_bytes / 1024
        );
    }
    out
}

pub fn churn_table(steady: &[Run], churn: &[Run]) -> String {
    type Figure = fn(&Run) -> f64;
    let figures: [(&str, Figure, usize); 6] = [
        ("requests/s ↑", |r| r.wrk.requests_per_sec, 0),
        ("p50 latency, ms ↓", |r| r.wrk.p50_us / 1e3, 3),
        ("p99 latency, ms ↓", |r| r.wrk.p99_us / 1e3, 3),
        ("fleetgate CPU, µs/request ↓", |r| r.cpu_us_per_request, 2),
        ("state changes during the run", |r| r.changes as f64, 0),
        ("other processes, % of a core", |r| r.others_pct, 1),
    ];
    let med = |runs: &[Run], f: Figure| {
        (!runs.is_empty()).then(|| median(&runs.iter().map(f).collect::<Vec<_>>()))
    };
    let mut rows = vec![vec![
        format!(
            "offload keep-alive, wrk -c{} (median of rounds)",
            crate::churn::CONNECTIONS
        ),
        "no churn".into(),
        "churn (1 change/s)".into(),
        "churn / no churn".into(),
    ]];
    for (name, f, decimals) in figures {
        let (a, b) = (med(steady, f), med(churn, f));
        rows.push(vec![
            name.into(),
            format_value(a, decimals),
            format_value(b, decimals),
            // Context rows (no arrow) get no ratio.
            if name.contains(['↑', '↓']) {
                format_ratio(b, a)
            } else {
                String::new()
            },
        ]);
    }
    let errors = |runs: &[Run]| runs.iter().map(|r| r.wrk.errors).sum::<u64>();
    rows.push(vec![
        "wrk errors, sum ↓".into(),
        errors(steady).to_string(),
        errors(churn).to_string(),
        String::new(),
    ]);
    markdown(&rows)
}
