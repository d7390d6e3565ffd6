//! What the status page reports that no other part keeps: when the
//! running configuration was loaded, how the last reload went, the
//! listener rates sampled from their counters, and the certificate
//! expiry series set last (to remove the ones no longer in use).

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use prometheus::core::Collector;

use crate::config::Plan;
use crate::metrics::Metrics;
use crate::tls::inventory;

/// How often listener rates are sampled: the rates shown are over the
/// last interval.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Certificates that run out soon are logged at start, at every reload
/// and once a day.
const WARN_EVERY: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone)]
pub struct Reload {
    pub at: SystemTime,
    /// `Ok`, or the error as logged.
    pub result: Result<(), String>,
}

/// Per-second rates of one listener over the last sampling interval.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rates {
    pub connections: f64,
    pub requests: f64,
}

/// Connections accepted and requests answered, by listener.
type Counts = HashMap<String, (f64, f64)>;

#[derive(Default)]
struct Inner {
    loaded_at: Option<SystemTime>,
    last_reload: Option<Reload>,
    cert_series: HashSet<[String; 4]>,
    warned_at: Option<Instant>,
    last_sample: Option<(Instant, Counts)>,
    rates: HashMap<String, Rates>,
}

#[derive(Default)]
pub struct Record {
    inner: Mutex<Inner>,
}

impl Record {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `plan` is running now (at start, and after a reload that applied):
    /// note the time, publish the certificate expiry gauge and warn about
    /// certificates that run out soon.
    pub fn applied(&self, metrics: &Metrics, plan: &Plan) {
        let certs = inventory::inventory(plan);
        let mut inner = self.lock();
        inner.loaded_at = Some(SystemTime::now());
        inner.cert_series = inventory::publish(metrics, &certs, &inner.cert_series);
        inventory::warn_expiring(&certs, inventory::unix_now());
        inner.warned_at = Some(Instant::now());
    }

    /// A reload ended with `result`; on success `plan` is the new one.
    pub fn reloaded(&self, result: &anyhow::Result<()>, metrics: &Metrics, plan: &Plan) {
        if result.is_ok() {
            self.applied(metrics, plan);
        }
        self.lock().last_reload = Some(Reload {
            at: SystemTime::now(),
            result: result.as_ref().map(|_| ()).map_err(|e| format!("{e:#}")),
        });
    }

    pub fn loaded_at(&self) -> Option<SystemTime> {
        self.lock().loaded_at
    }

    pub fn last_reload(&self) -> Option<Reload> {
        self.lock().last_reload.clone()
    }

    pub fn rates(&self, listener: &str) -> Option<Rates> {
        self.lock().rates.get(listener).copied()
    }

    /// Sample the listener counters (rates since the last sample) and
    /// repeat the certificate warnings once a day.
    pub fn tick(&self, metrics: &Metrics, plan: &Plan) {
        let counts = listener_counts(metrics);
        let now = Instant::now();
        let mut inner = self.lock();
        if let Some((at, before)) = &inner.last_sample {
            let secs = now.duration_since(*at).as_secs_f64().max(0.001);
            inner.rates = counts
                .iter()
                .map(|(name, (conns, reqs))| {
                    let (c0, r0) = before.get(name).copied().unwrap_or((*conns, *reqs));
                    let rates = Rates {
                        connections: (conns - c0).max(0.0) / secs,
                        requests: (reqs - r0).max(0.0) / secs,
                    };
                    (name.clone(), rates)
                })
                .collect();
        }
        inner.last_sample = Some((now, counts));
        if inner.warned_at.is_some_and(|t| t.elapsed() >= WARN_EVERY) {
            inner.warned_at = Some(now);
            drop(inner);
            inventory::warn_expiring(&inventory::inventory(plan), inventory::unix_now());
        }
    }
}

/// Connections accepted and HTTP requests answered, per listener.
pub fn listener_counts(metrics: &Metrics) -> Counts {
    let mut out = Counts::new();
    for (name, n) in sum_by_listener(&metrics.connections_accepted) {
        out.entry(name).or_default().0 += n;
    }
    for (name, n) in sum_by_listener(&metrics.http_requests) {
        out.entry(name).or_default().1 += n;
    }
    out
}

/// Read through `collect` rather than `with_label_values`, which would
/// create the series it asks for.
fn sum_by_listener(vec: &prometheus::IntCounterVec) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for family in vec.collect() {
        for m in family.get_metric() {
            if let Some(l) = m.get_label().iter().find(|l| l.get_name() == "listener") {
                out.push((l.get_value().to_string(), m.get_counter().get_value()));
            }
        }
    }
    out
}
