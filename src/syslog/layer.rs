//! The tracing layer that copies the event log to syslog: every event
//! that passes the configured level (the same ones written to the
//! console) becomes one message with MSGID `event`.
//!
//! The level maps to the severity (ERROR → err, WARN → warning, INFO →
//! info, DEBUG and TRACE → debug). MSG reads as the console line does,
//! the message then `name=value` for each field; the same fields, and the
//! event's target, are also the SD-PARAMs of one `fleetgate@32473`
//! element, for receivers that index structured data.

use std::fmt::Write as _;
use std::time::SystemTime;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::layer::{Context, Layer};

use super::message::{severity, Record};
use super::metrics::Stream;

pub struct SyslogLayer;

impl<S: Subscriber> Layer<S> for SyslogLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        // Without a `[syslog]` section this is the whole cost.
        if !super::running() {
            return;
        }
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let mut fields = Fields::default();
        event.record(&mut fields);
        let mut msg = fields.message;
        let mut sd = Vec::with_capacity(fields.fields.len() + 1);
        sd.push(("target".to_string(), meta.target().to_string()));
        for (name, value) in fields.fields {
            let _ = if value.contains([' ', '"', '=']) || value.is_empty() {
                write!(msg, " {name}={value:?}")
            } else {
                write!(msg, " {name}={value}")
            };
            sd.push((name.to_string(), value));
        }
        let time = SystemTime::now();
        super::send(Stream::Events, || Record {
            time,
            severity: level_severity(meta.level()),
            msgid: "event",
            fields: sd,
            msg: msg.trim_start().to_string(),
        });
    }
}

fn level_severity(level: &Level) -> u8 {
    match *level {
        Level::ERROR => severity::ERR,
        Level::WARN => severity::WARNING,
        Level::INFO => severity::INFO,
        _ => severity::DEBUG,
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    fields: Vec<(&'static str, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.keep(field, value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.keep(field, format!("{value:?}"));
    }
}

impl Fields {
    fn keep(&mut self, field: &Field, value: String) {
        match field.name() {
            "message" => self.message = value,
            // What the `log` bridge adds (target, file, line): the target
            // is already taken from the normalized metadata.
            name if name.starts_with("log.") => {}
            name => self.fields.push((name, value)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn severities() {
        assert_eq!(level_severity(&Level::ERROR), 3);
        assert_eq!(level_severity(&Level::WARN), 4);
        assert_eq!(level_severity(&Level::INFO), 6);
        assert_eq!(level_severity(&Level::TRACE), 7);
    }
}
