//! The syslog counters. Logging starts before the `Metrics` registry
//! exists (loading the configuration already logs), so the counters live
//! here from the first message and `crate::metrics` registers them into
//! its registry when that is built.

use std::sync::LazyLock;

use prometheus::{IntCounterVec, Opts, Registry};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Events,
    Access,
}

impl Stream {
    fn label(self) -> &'static str {
        match self {
            Stream::Events => "events",
            Stream::Access => "access",
        }
    }
}

pub const QUEUE_FULL: &str = "queue_full";
pub const UNREACHABLE: &str = "unreachable";

struct Counters {
    messages: IntCounterVec,
    dropped: IntCounterVec,
}

static COUNTERS: LazyLock<Counters> = LazyLock::new(|| {
    let messages = IntCounterVec::new(
        Opts::new(
            "syslog_messages_total",
            "Messages handed to the syslog server's socket, by stream (events, access).",
        ),
        &["stream"],
    )
    .expect("metric definition");
    let dropped = IntCounterVec::new(
        Opts::new(
            "syslog_dropped_total",
            "Syslog messages dropped, by reason (queue_full, unreachable).",
        ),
        &["reason"],
    )
    .expect("metric definition");
    // Every series from the start, so that the first drop shows in rate().
    for s in [Stream::Events, Stream::Access] {
        messages.with_label_values(&[s.label()]);
    }
    for r in [QUEUE_FULL, UNREACHABLE] {
        dropped.with_label_values(&[r]);
    }
    Counters { messages, dropped }
});

/// Add the syslog counters to `registry` (the one `/metrics` renders).
pub fn register(registry: &Registry) {
    let c = &*COUNTERS;
    for m in [&c.messages, &c.dropped] {
        registry
            .register(Box::new(m.clone()))
            .expect("metric registration");
    }
}

pub fn sent(stream: Stream) {
    COUNTERS.messages.with_label_values(&[stream.label()]).inc();
}

pub fn dropped(reason: &str, n: u64) {
    if n > 0 {
        COUNTERS.dropped.with_label_values(&[reason]).inc_by(n);
    }
}

#[cfg(test)]
pub fn dropped_total(reason: &str) -> u64 {
    COUNTERS.dropped.with_label_values(&[reason]).get()
}

#[cfg(test)]
pub fn sent_total(stream: Stream) -> u64 {
    COUNTERS.messages.with_label_values(&[stream.label()]).get()
}
