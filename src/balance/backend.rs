//! One backend server and its health state. The state is written by
//! passive failures and active probes and read lock-free on every pick.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use prometheus::{Histogram, IntCounter, IntGauge};

use super::keepalive::KeepAlive;
use crate::metrics::Metrics;

/// The monotonic millisecond clock (see clock.rs), named here for the
/// pool and backend code that reads it.
pub use crate::clock::now_ms;

/// Label handles resolved once, so the connection path does no lookups.
pub struct BackendMetrics {
    pub up: IntGauge,
    pub active: IntGauge,
    pub connect_failures: IntCounter,
    pub connect_seconds: Histogram,
    pub selections: IntCounter,
    pub checks_ok: IntCounter,
    pub checks_fail: IntCounter,
}

impl BackendMetrics {
    fn new(m: &Metrics, pool: &str, addr: &str) -> Self {
        let l = &[pool, addr];
        BackendMetrics {
            up: m.backend_up.with_label_values(l),
            active: m.backend_active.with_label_values(l),
            connect_failures: m.backend_connect_failures.with_label_values(l),
            connect_seconds: m.backend_connect_seconds.with_label_values(l),
            selections: m.pool_selections.with_label_values(l),
            checks_ok: m.health_checks.with_label_values(&[pool, addr, "ok"]),
            checks_fail: m.health_checks.with_label_values(&[pool, addr, "fail"]),
        }
    }
}

pub struct Backend {
    pub addr: SocketAddr,
    pub pool: String,
    pub metrics: BackendMetrics,
    /// Open connections (for least_conn and p2c).
    active: AtomicU32,
    /// Passive health: failures counted since `window_start_ms`.
    fails: AtomicU32,
    window_start_ms: AtomicU64,
    /// Passive health: out of rotation until this time (0 = not out).
    down_until_ms: AtomicU64,
    /// Active health: last verdict of the probes (true without probes).
    check_up: AtomicBool,
    /// What the state watcher last reported, to log transitions once.
    reported_up: AtomicBool,
    /// False once the backend has left its pool. A resting (draining)
    /// backend stays in rotation for keep-alive: its idle connections are
    /// reused as soon as it is back, and its server closes them itself
    /// if it wants them gone.
    in_rotation: AtomicBool,
    /// Idle HTTP/1.1 connections to this backend, per worker thread.
    pub keepalive: KeepAlive,
    /// The last active probe, for the status page (once per interval, so
    /// a lock costs nothing on the connection path, which never reads it).
    last_check: std::sync::Mutex<Option<LastCheck>>,
}

/// The outcome of the last active health probe.
#[derive(Debug, Clone)]
pub struct LastCheck {
    pub at: std::time::SystemTime,
    /// `Ok`, or why the probe failed.
    pub result: Result<(), String>,
}

/// Passive-health thresholds, copied from the pool plan.
#[derive(Debug, Clone, Copy)]
pub struct PassivePolicy {
    pub max_fails: u32,
    pub fail_timeout: Duration,
}

impl Backend {
    pub fn new(m: &Metrics, pool: &str, addr: SocketAddr) -> Self {
        let metrics = BackendMetrics::new(m, pool, &addr.to_string());
        metrics.up.set(1);
        Backend {
            addr,
            pool: pool.to_string(),
            metrics,
            active: AtomicU32::new(0),
            fails: AtomicU32::new(0),
            window_start_ms: AtomicU64::new(0),
            down_until_ms: AtomicU64::new(0),
            check_up: AtomicBool::new(true),
            reported_up: AtomicBool::new(true),
            in_rotation: AtomicBool::new(true),
            keepalive: KeepAlive::default(),
            last_check: std::sync::Mutex::new(None),
        }
    }

    /// Eligible for new connections right now.
    pub fn is_up(&self) -> bool {
        self.is_up_at(now_ms())
    }

    pub fn is_up_at(&self, now: u64) -> bool {
        self.check_up.load(Ordering::Relaxed) && self.down_until_ms.load(Ordering::Relaxed) <= now
    }

    /// `up`, or why the backend is out: for operators reading /status.
    pub fn state_label(&self) -> &'static str {
        let now = now_ms();
        if !self.check_up.load(Ordering::Relaxed) {
            "down: health check"
        } else if self.down_until_ms.load(Ordering::Relaxed) > now {
            "down: connect failures"
        } else {
            "up"
        }
    }

    /// Why the backend is out, in words, or `None` when it is up.
    pub fn down_reason(&self) -> Option<String> {
        let now = now_ms();
        if !self.check_up.load(Ordering::Relaxed) {
            let why = match self.last_check() {
                Some(LastCheck {
                    result: Err(why), ..
                }) => format!(": {why}"),
                _ => String::new(),
            };
            Some(format!("health check failing{why}"))
        } else {
            let until = self.down_until_ms.load(Ordering::Relaxed);
            (until > now).then(|| {
                format!(
                    "connect failures: out for {:.1} s more",
                    (until - now) as f64 / 1000.0
                )
            })
        }
    }

    /// Record the result of one active probe.
    pub fn record_check(&self, result: Result<(), String>) {
        let check = LastCheck {
            at: std::time::SystemTime::now(),
            result,
        };
        *self.last_check.lock().unwrap_or_else(|e| e.into_inner()) = Some(check);
    }

    /// The last active probe, if the pool has health checks.
    pub fn last_check(&self) -> Option<LastCheck> {
        self.last_check
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether connections to it may be kept for reuse.
    pub fn in_rotation(&self) -> bool {
        self.in_rotation.load(Ordering::Relaxed)
    }

    /// Out of rotation (gone from its pool): its idle connections are
    /// closed, and none is kept from now on.
    pub fn set_in_rotation(&self, yes: bool) {
        self.in_rotation.store(yes, Ordering::Relaxed);
        if !yes {
            self.keepalive.close();
        }
    }

    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    /// Count an open connection until the guard is dropped.
    pub fn track(self: &std::sync::Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.metrics.active.inc();
        ActiveGuard(self.clone())
    }

    /// A connect to this backend failed: nginx semantics, `max_fails`
    /// failures within `fail_timeout` take it out for `fail_timeout`.
    /// Returns true when this failure took the backend out.
    pub fn record_failure(&self, policy: PassivePolicy) -> bool {
        self.metrics.connect_failures.inc();
        let now = now_ms();
        let window = policy.fail_timeout.as_millis() as u64;
        let start = self.window_start_ms.load(Ordering::Relaxed);
        let fails = if start == 0 || now.saturating_sub(start) > window {
            self.window_start_ms.store(now, Ordering::Relaxed);
            self.fails.store(1, Ordering::Relaxed);
            1
        } else {
            self.fails.fetch_add(1, Ordering::Relaxed) + 1
        };
        if fails >= policy.max_fails && self.down_until_ms.load(Ordering::Relaxed) <= now {
            self.down_until_ms
                .store(now + window.max(1), Ordering::Relaxed);
            self.fails.store(0, Ordering::Relaxed);
            self.window_start_ms.store(0, Ordering::Relaxed);
            self.metrics.up.set(0);
            if self.reported_up.swap(false, Ordering::Relaxed) {
                tracing::warn!(pool = %self.pool, backend = %self.addr, fails, "backend down: connect failures (out for {:?})", policy.fail_timeout);
            }
            return true;
        }
        false
    }

    /// The last verdict of active probes (true without probes).
    pub fn check_up(&self) -> bool {
        self.check_up.load(Ordering::Relaxed)
    }

    /// The verdict of active probes (rise/fall already applied).
    pub fn set_check_up(&self, up: bool) {
        self.check_up.store(up, Ordering::Relaxed);
        self.refresh();
    }

    /// Update the `up` gauge and log a transition; called by the state
    /// watcher because passive outages end by the clock, not by an event.
    pub fn refresh(&self) {
        let up = self.is_up();
        self.metrics.up.set(up as i64);
        if self.reported_up.swap(up, Ordering::Relaxed) != up {
            if up {
                tracing::info!(pool = %self.pool, backend = %self.addr, "backend up");
            } else {
                tracing::warn!(pool = %self.pool, backend = %self.addr, "backend down: health check failed");
            }
        }
    }
}

pub struct ActiveGuard(std::sync::Arc<Backend>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.active.dec();
    }
}
