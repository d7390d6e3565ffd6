//! Access log: one line per request (offload) or connection (tcp,
//! passthrough), written off the connection's path.

mod settings;

pub use settings::{AccessLogPlan, Destination, Format};
