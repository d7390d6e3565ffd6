//! Access log: one line per request (offload), per WebSocket session,
//! and per connection (tcp, passthrough), written off the connection's
//! path.
//!
//! A line is formatted on the connection's thread into a reused
//! per-thread buffer and copied into its destination's bounded queue
//! (`writer`); a thread per destination writes it out. Nothing on the
//! connection path waits for I/O, and a full queue drops the line and
//! counts it.

mod combined;
mod json;
mod record;
mod settings;
mod writer;

use std::cell::RefCell;
use std::sync::Arc;

use prometheus::IntCounter;

pub use record::{Kind, Record};
pub use settings::{AccessLogPlan, Destination, Format};
pub use writer::{flush_all, reopen_all, QUEUE_BYTES};

use crate::metrics::Metrics;

/// One listener's access log, built when a plan is applied: its format,
/// its destination's shared sink and its counters.
pub struct AccessLog {
    pub plan: AccessLogPlan,
    sink: Arc<writer::Sink>,
    slot: u16,
    lines: IntCounter,
    dropped: IntCounter,
}

thread_local! {
    /// The line being formatted: one buffer per thread, reused.
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(1024));
}

impl AccessLog {
    /// The access log of `listener` as `plan` asks. Listeners logging to
    /// the same destination share its writer.
    pub fn new(
        plan: &AccessLogPlan,
        listener: &str,
        metrics: &Metrics,
    ) -> std::io::Result<Arc<AccessLog>> {
        let sink = writer::Sink::shared(&plan.destination)?;
        let lines = metrics.access_log_lines.with_label_values(&[listener]);
        let dropped = metrics.access_log_dropped.with_label_values(&[listener]);
        let slot = sink.slot(listener, &dropped);
        Ok(Arc::new(AccessLog {
            plan: plan.clone(),
            sink,
            slot,
            lines,
            dropped,
        }))
    }

    /// Format `r` and queue it; a full queue drops it (counted).
    pub fn emit(&self, r: &Record) {
        LINE.with(|line| {
            let Ok(mut line) = line.try_borrow_mut() else {
                return;
            };
            line.clear();
            match self.plan.format {
                Format::Json => json::write(r, &mut line),
                Format::Combined => combined::write(r, &mut line),
            }
            line.push(b'\n');
            if self.sink.push(self.slot, &line) {
                self.lines.inc();
            } else {
                self.dropped.inc();
            }
            // A huge line (a long URL) does not keep its buffer.
            if line.capacity() > 64 * 1024 {
                *line = Vec::with_capacity(1024);
            }
        });
    }
}
