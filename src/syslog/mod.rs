//! RFC 5424 syslog export of the event log (and optionally access lines).

mod settings;

pub use settings::{SyslogPlan, Transport, FACILITIES};
