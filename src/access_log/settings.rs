//! What a listener's `access_log` asks for, once validated.

use std::path::PathBuf;

/// The line format: JSON lines, or nginx's `combined`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    #[default]
    Json,
    Combined,
}

/// Where a listener's lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// Appended to a file, reopened on SIGUSR1 (for logrotate).
    File(PathBuf),
    Stdout,
    /// To the `[syslog]` server (validation requires that section).
    Syslog,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogPlan {
    pub destination: Destination,
    pub format: Format,
}
