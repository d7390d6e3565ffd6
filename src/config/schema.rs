//! The TOML file as written by the operator: serde types only, no checks
//! beyond shape. `validate` turns this into a `Plan`.

use serde::Deserialize;

use super::duration::ConfigDuration;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct File {
    #[serde(default)]
    pub global: Global,
    #[serde(default)]
    pub admin: Admin,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<Listener>,
    #[serde(default, rename = "pool")]
    pub pools: Vec<Pool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Global {
    /// `error`, `warn`, `info`, `debug`, `trace` or a full tracing filter;
    /// `RUST_LOG` wins when set.
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// How long SIGTERM waits for established connections before exiting.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: ConfigDuration,
    /// Tokio worker threads; 0 means one per core.
    #[serde(default)]
    pub worker_threads: usize,
}

impl Default for Global {
    fn default() -> Self {
        Global {
            log_level: default_log_level(),
            drain_timeout: default_drain_timeout(),
            worker_threads: 0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    #[serde(default = "default_admin_bind")]
    pub bind: String,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            bind: default_admin_bind(),
        }
    }
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Tcp,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub name: String,
    pub bind: String,
    #[serde(default = "default_mode")]
    pub mode: Mode,
    pub pool: String,
    /// 0 means unlimited.
    #[serde(default)]
    pub max_connections: usize,
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: ConfigDuration,
    #[serde(default)]
    pub allow: Vec<String>,
    #[serde(default)]
    pub deny: Vec<String>,
    #[serde(default)]
    pub reuse_port: bool,
    #[serde(default = "default_backlog")]
    pub backlog: u32,
    #[serde(default = "default_true")]
    pub nodelay: bool,
    #[serde(default = "default_true")]
    pub keepalive: bool,
    /// Move bytes with splice(2) on Linux; false forces the buffered copy.
    #[serde(default = "default_true")]
    pub splice: bool,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    #[default]
    RoundRobin,
    WeightedRoundRobin,
    LeastConn,
    P2c,
    HashClientIp,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    pub name: String,
    #[serde(default)]
    pub algorithm: Algorithm,
    #[serde(default)]
    pub backends: Vec<Backend>,
    #[serde(default = "default_max_fails")]
    pub max_fails: u32,
    #[serde(default = "default_fail_timeout")]
    pub fail_timeout: ConfigDuration,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: ConfigDuration,
    #[serde(default = "default_retries")]
    pub retries: u32,
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub address: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub backup: bool,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    Tcp,
    Tls,
    Http,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    pub kind: CheckKind,
    #[serde(default = "default_check_path")]
    pub path: String,
    /// Expected HTTP status.
    #[serde(default = "default_expect")]
    pub expect: u16,
    /// Host header for HTTP checks (defaults to the backend address).
    #[serde(default)]
    pub host: Option<String>,
    /// SNI for TLS checks.
    #[serde(default)]
    pub server_name: Option<String>,
    #[serde(default = "default_check_interval")]
    pub interval: ConfigDuration,
    #[serde(default = "default_check_timeout")]
    pub timeout: ConfigDuration,
    #[serde(default = "default_rise")]
    pub rise: u32,
    #[serde(default = "default_fall")]
    pub fall: u32,
}

fn default_log_level() -> String {
    "info".into()
}
fn default_drain_timeout() -> ConfigDuration {
    ConfigDuration::from_secs(30)
}
fn default_admin_bind() -> String {
    "127.0.0.1:9900".into()
}
fn default_mode() -> Mode {
    Mode::Tcp
}
fn default_idle_timeout() -> ConfigDuration {
    ConfigDuration::from_secs(600)
}
fn default_backlog() -> u32 {
    1024
}
fn default_true() -> bool {
    true
}
fn default_max_fails() -> u32 {
    1
}
fn default_fail_timeout() -> ConfigDuration {
    ConfigDuration::from_secs(10)
}
fn default_connect_timeout() -> ConfigDuration {
    ConfigDuration::from_secs(5)
}
fn default_retries() -> u32 {
    2
}
fn default_weight() -> u32 {
    1
}
fn default_check_path() -> String {
    "/".into()
}
fn default_expect() -> u16 {
    200
}
fn default_check_interval() -> ConfigDuration {
    ConfigDuration::from_secs(2)
}
fn default_check_timeout() -> ConfigDuration {
    ConfigDuration::from_secs(1)
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}
