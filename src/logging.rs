//! Logging setup and a rate limiter for lines that an attacker or a broken
//! network could otherwise turn into a flood.

use std::sync::atomic::{AtomicU64, Ordering};

use tracing_log::log;
use tracing_log::{AsLog, LogTracer};
use tracing_subscriber::EnvFilter;

use crate::clock::now_ms;

/// `RUST_LOG` wins over the configured level, as operators expect.
pub fn init(level: &str) {
    let _ = set_level(level);
}

type Handle = tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>;

static LEVEL: std::sync::OnceLock<Handle> = std::sync::OnceLock::new();

/// The filter for `global.log_level` (or `RUST_LOG`), in `RUST_LOG`
/// syntax. Field values in span filters match literally rather than as
/// regular expressions: compiled into a DFA, a short pattern in a
/// configuration file took gigabytes and many seconds (found by the
/// `config` fuzz target). Non-ASCII is refused: targets are module paths,
/// and the directive parser panics on some non-ASCII input (it slices at
/// offsets taken after trimming).
pub fn filter(directives: &str) -> Result<EnvFilter, String> {
    if let Some(c) = directives
        .chars()
        .find(|c| !c.is_ascii() || c.is_ascii_control())
    {
        return Err(format!("unexpected character {c:?}"));
    }
    EnvFilter::builder()
        .with_regex(false)
        .parse(directives)
        .map_err(|e| e.to_string())
}

/// Install the subscriber on first use, then change its level: logging
/// starts before the configuration is read (so loading it can log, e.g.
/// a generated certificate's fingerprint) and follows `global.log_level`
/// on start and on reload. `RUST_LOG`, when set, always wins.
pub fn set_level(level: &str) -> Result<(), String> {
    use tracing_subscriber::prelude::*;
    let from_env = std::env::var_os("RUST_LOG").is_some();
    let wanted = || {
        std::env::var("RUST_LOG")
            .ok()
            .and_then(|env| filter(&env).ok())
            .or_else(|| filter(level).ok())
            .unwrap_or_else(|| EnvFilter::new("info"))
    };
    let handle = LEVEL.get_or_init(|| {
        let (layer, handle) = tracing_subscriber::reload::Layer::new(wanted());
        let subscriber = tracing_subscriber::registry()
            .with(layer)
            .with(tracing_subscriber::fmt::layer().with_target(false))
            // Silent until `[syslog]` configures a server.
            .with(crate::syslog::SyslogLayer);
        if tracing::subscriber::set_global_default(subscriber).is_ok() {
            // What `try_init` would install, with the flood limits.
            let _ = log::set_boxed_logger(Box::new(LogBridge::new(1000)));
        }
        handle
    });
    let changed = if from_env {
        Ok(())
    } else {
        handle.modify(|f| *f = wanted()).map_err(|e| e.to_string())
    };
    // `log` skips records above its own maximum before they reach tracing.
    log::set_max_level(tracing::level_filters::LevelFilter::current().as_log());
    changed
}

/// The `log` records of dependencies (rustls logs through `log`) on their
/// way into tracing. rustls warns once per connection about what a client
/// sent, an IP address as SNI above all (wrk and many scripts send one on
/// every connection), so its warnings are rate-limited as rejected
/// connections are: SNI lines and the rest each get one line per period,
/// which says how many were held back.
struct LogBridge {
    tracer: LogTracer,
    sni: RateLimit,
    other: RateLimit,
}

/// What happens to one `log` record.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Pass,
    Drop,
    /// Pass, noting how many like it were dropped since the last one.
    PassAfter(u64),
}

impl LogBridge {
    fn new(period_ms: u64) -> Self {
        LogBridge {
            tracer: LogTracer::new(),
            sni: RateLimit::new(period_ms),
            other: RateLimit::new(period_ms),
        }
    }

    fn verdict(&self, record: &log::Record<'_>) -> Verdict {
        if record.level() != log::Level::Warn || !record.target().starts_with("rustls") {
            return Verdict::Pass;
        }
        let args = record.args();
        let text = args
            .as_str()
            .map(std::borrow::Cow::Borrowed)
            .unwrap_or_else(|| args.to_string().into());
        let limit = if text.starts_with("Illegal SNI") {
            &self.sni
        } else {
            &self.other
        };
        match limit.allow() {
            Some(held) => Verdict::PassAfter(held),
            None => Verdict::Drop,
        }
    }
}

impl log::Log for LogBridge {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.tracer.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        match self.verdict(record) {
            Verdict::Pass => self.tracer.log(record),
            Verdict::Drop => {}
            Verdict::PassAfter(0) => self.tracer.log(record),
            Verdict::PassAfter(held) => self.tracer.log(
                &log::Record::builder()
                    .metadata(record.metadata().clone())
                    .module_path(record.module_path())
                    .file(record.file())
                    .line(record.line())
                    .args(format_args!(
                        "{} ({held} similar lines suppressed)",
                        record.args()
                    ))
                    .build(),
            ),
        }
    }

    fn flush(&self) {}
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

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(bridge: &LogBridge, level: log::Level, target: &str, text: &str) -> Verdict {
        bridge.verdict(
            &log::Record::builder()
                .level(level)
                .target(target)
                .args(format_args!("{text}"))
                .build(),
        )
    }

    const SNI: &str =
        "Illegal SNI extension: ignoring IP address presented as hostname (3132372e302e302e31)";
    const HANDSHAKE: &str = "rustls::msgs::handshake";

    #[test]
    fn rustls_sni_warnings_pass_once_per_period() {
        let bridge = LogBridge::new(60_000);
        let warn = log::Level::Warn;
        assert_eq!(
            verdict(&bridge, warn, HANDSHAKE, SNI),
            Verdict::PassAfter(0)
        );
        for _ in 0..3 {
            assert_eq!(verdict(&bridge, warn, HANDSHAKE, SNI), Verdict::Drop);
        }
        let bad_name = "Illegal SNI hostname received \"a b\"";
        assert_eq!(verdict(&bridge, warn, HANDSHAKE, bad_name), Verdict::Drop);
        // Other rustls warnings have their own allowance.
        let alert = "TLS alert warning received: Alert { .. }";
        assert_eq!(
            verdict(&bridge, warn, "rustls::common_state", alert),
            Verdict::PassAfter(0)
        );
        assert_eq!(
            verdict(&bridge, warn, "rustls::common_state", alert),
            Verdict::Drop
        );
        // Other levels and crates are not limited.
        assert_eq!(
            verdict(&bridge, log::Level::Debug, HANDSHAKE, SNI),
            Verdict::Pass
        );
        assert_eq!(
            verdict(&bridge, log::Level::Error, HANDSHAKE, SNI),
            Verdict::Pass
        );
        assert_eq!(verdict(&bridge, warn, "hyper::proto", SNI), Verdict::Pass);
    }

    #[test]
    fn the_next_line_counts_the_suppressed_ones() {
        let bridge = LogBridge::new(50);
        let warn = log::Level::Warn;
        assert_eq!(
            verdict(&bridge, warn, HANDSHAKE, SNI),
            Verdict::PassAfter(0)
        );
        for _ in 0..4 {
            assert_eq!(verdict(&bridge, warn, HANDSHAKE, SNI), Verdict::Drop);
        }
        std::thread::sleep(std::time::Duration::from_millis(120));
        assert_eq!(
            verdict(&bridge, warn, HANDSHAKE, SNI),
            Verdict::PassAfter(4)
        );
    }
}
