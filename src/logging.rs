//! Logging setup and a rate limiter for lines that an attacker or a broken
//! network could otherwise turn into a flood.

use std::sync::atomic::{AtomicU64, Ordering};

use tracing_subscriber::EnvFilter;

use crate::balance::backend::now_ms;

/// `RUST_LOG` wins over the configured level, as operators expect.
pub fn init(level: &str) {
    let _ = set_level(level);
}

type Handle = tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>;

static LEVEL: std::sync::OnceLock<Handle> = std::sync::OnceLock::new();

/// Install the subscriber on first use, then change its level: logging
/// starts before the configuration is read (so loading it can log, e.g.
/// a generated certificate's fingerprint) and follows `global.log_level`
/// on start and on reload. `RUST_LOG`, when set, always wins.
pub fn set_level(level: &str) -> Result<(), String> {
    use tracing_subscriber::prelude::*;
    let from_env = std::env::var_os("RUST_LOG").is_some();
    let wanted = || {
        EnvFilter::try_from_default_env()
            .or_else(|_| EnvFilter::try_new(level))
            .unwrap_or_else(|_| EnvFilter::new("info"))
    };
    let handle = LEVEL.get_or_init(|| {
        let (layer, handle) = tracing_subscriber::reload::Layer::new(wanted());
        let _ = tracing_subscriber::registry()
            .with(layer)
            .with(tracing_subscriber::fmt::layer().with_target(false))
            .try_init();
        handle
    });
    if from_env {
        return Ok(());
    }
    handle.modify(|f| *f = wanted()).map_err(|e| e.to_string())
}

/// Lets one log line through per period and counts the ones held back, so
/// the next line can say how many were suppressed.
pub struct RateLimit {
    period_ms: u64,
    last_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimit {
    pub const fn new(period_ms: u64) -> Self {
        RateLimit {
            period_ms,
            last_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(suppressed since the last line)` when a line may be written.
    pub fn allow(&self) -> Option<u64> {
        let now = now_ms();
        let last = self.last_ms.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= self.period_ms)
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}
