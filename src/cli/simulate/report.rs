//! What a simulation measured, per phase, as markdown or JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies in microseconds, 1 µs to 10 min, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

pub fn record(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record((d.as_micros() as u64).max(1));
}

/// Error counts by kind.
pub type Errors = BTreeMap<String, u64>;

pub fn count(errors: &mut Errors, kind: String) {
    *errors.entry(kind).or_default() += 1;
}

pub fn merge(into: &mut Errors, from: Errors) {
    for (k, n) in from {
        *into.entry(k).or_default() += n;
    }
}

/// A latency distribution in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            count: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct StormReport {
    /// Devices that enrolled and fetched their settings.
    pub devices_ok: u64,
    pub devices_failed: u64,
    /// From the first enrolment request until the last device had its settings.
    pub seconds: f64,
    /// Devices per second over the whole storm.
    pub devices_per_second: f64,
    /// Key + CSR + TLS handshake + `POST /api/v1/enrol`.
    pub enrol: Latency,
    /// mTLS handshake + `GET /api/v1/settings`.
    pub settings: Latency,
    pub errors: Errors,
    /// Stopped by `--storm-timeout` before every device was done.
    pub timed_out: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct WebSocketReport {
    pub opened: u64,
    pub failed: u64,
    /// Time to open them all.
    pub open_seconds: f64,
    /// mTLS handshake + upgrade.
    pub open: Latency,
    /// Still open when the run ended.
    pub held_at_end: u64,
    /// Closed by the server (or failed) during the run.
    pub lost: u64,
    pub commands_received: u64,
    pub acks_sent: u64,
    pub acks_confirmed: u64,
    /// With several `--url`s: channels opened again (on the same address
    /// or the next) after they were lost.
    #[serde(skip_serializing_if = "is_zero")]
    pub reopened: u64,
    /// Commands received again with an id the device had already seen
    /// (sent, not acknowledged before a loss): acknowledged again, not
    /// counted in `commands_received`.
    #[serde(skip_serializing_if = "is_zero")]
    pub redelivered: u64,
    pub errors: Errors,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct HeartbeatReport {
    pub interval_ms: u64,
    pub jitter_ms: u64,
    /// What the devices would send at their schedule: N / (interval + jitter/2).
    pub offered_per_second: f64,
    pub seconds: f64,
    pub sent: u64,
    pub ok: u64,
    /// Successful heartbeats per second.
    pub per_second: f64,
    /// Request to answer (an answer means committed).
    pub latency: Latency,
    /// The same, for each device's first heartbeat of the phase only: the
    /// balancer has not seen the device since the storm (cold caches), so
    /// this is what a balancer restart or a failover costs.
    pub first_latency: Latency,
    /// The same, for every heartbeat after a device's first (warm).
    pub later_latency: Latency,
    /// How late heartbeats left against their schedule (simulator saturation).
    pub schedule_lag: Latency,
    pub reconnects: u64,
    /// With several `--url`s: connections that went to the next address
    /// because the current one failed.
    #[serde(skip_serializing_if = "is_zero")]
    pub failovers: u64,
    pub commands_polled: u64,
    pub acks_sent: u64,
    pub errors: Errors,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub url: String,
    pub devices: u64,
    pub concurrency: u64,
    pub storm: StormReport,
    pub websockets: Option<WebSocketReport>,
    pub heartbeats: Option<HeartbeatReport>,
}

fn latency_row(out: &mut String, name: &str, l: &Latency) {
    let _ = writeln!(
        out,
        "| {name} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
        l.count, l.mean_ms, l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms
    );
}

fn errors_line(out: &mut String, errors: &Errors) {
    if errors.is_empty() {
        let _ = writeln!(out, "\nErrors: none");
    } else {
        let list: Vec<String> = errors.iter().map(|(k, n)| format!("{k}: {n}")).collect();
        let _ = writeln!(out, "\nErrors: {}", list.join(", "));
    }
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "# fleetgate simulate\n\n{} devices against {}, concurrency {}\n",
            self.devices, self.url, self.concurrency
        );
        let s = &self.storm;
        let _ = writeln!(o, "## Enrolment storm (enrol + fetch settings)\n");
        let _ = writeln!(
            o,
            "{} enrolled and fetched settings, {} failed, in {:.2} s: **{:.0} devices/s**{}\n",
            s.devices_ok,
            s.devices_failed,
            s.seconds,
            s.devices_per_second,
            if s.timed_out {
                " (stopped by --storm-timeout)"
            } else {
                ""
            }
        );
        let head = "| step | count | mean ms | p50 | p90 | p99 | p99.9 | max |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |";
        let _ = writeln!(o, "{head}");
        latency_row(&mut o, "enrol", &s.enrol);
        latency_row(&mut o, "settings", &s.settings);
        errors_line(&mut o, &s.errors);
        if let Some(w) = &self.websockets {
            let _ = writeln!(o, "\n## Command WebSockets\n");
            let _ = writeln!(
                o,
                "{} opened ({} failed) in {:.2} s; **{} held at the end**, {} lost during the run; \
                 {} commands received, {} acknowledged ({} confirmed)\n",
                w.opened,
                w.failed,
                w.open_seconds,
                w.held_at_end,
                w.lost,
                w.commands_received,
                w.acks_sent,
                w.acks_confirmed
            );
            if w.reopened + w.redelivered > 0 {
                let _ = writeln!(
                    o,
                    "{} reopened after a loss, {} commands received again (deduplicated by id)\n",
                    w.reopened, w.redelivered
                );
            }
            let _ = writeln!(o, "{head}");
            latency_row(&mut o, "open", &w.open);
            errors_line(&mut o, &w.errors);
        }
        if let Some(h) = &self.heartbeats {
            let _ = writeln!(o, "\n## Steady heartbeats\n");
            let _ = writeln!(
                o,
                "every {} ms + up to {} ms jitter (offered {:.0}/s), for {:.2} s: {} sent, {} ok: \
                 **{:.0} heartbeats/s**, p99 **{:.2} ms**; {} reconnects; {} commands polled, {} acknowledged\n",
                h.interval_ms,
                h.jitter_ms,
                h.offered_per_second,
                h.seconds,
                h.sent,
                h.ok,
                h.per_second,
                h.latency.p99_ms,
                h.reconnects,
                h.commands_polled,
                h.acks_sent
            );
            if h.failovers > 0 {
                let _ = writeln!(o, "{} failovers to the next address\n", h.failovers);
            }
            let _ = writeln!(o, "{head}");
            latency_row(&mut o, "heartbeat", &h.latency);
            latency_row(&mut o, "first per device", &h.first_latency);
            latency_row(&mut o, "later", &h.later_latency);
            latency_row(&mut o, "schedule lag", &h.schedule_lag);
            errors_line(&mut o, &h.errors);
        }
        o
    }
}
