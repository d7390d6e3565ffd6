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
    /// `[module.NAME]` tables: each configures one in-process module; its
    /// `kind` (default: NAME) selects the implementation.
    #[serde(default)]
    pub module: std::collections::BTreeMap<String, toml::Value>,
    /// Learn backends from signed UDP heartbeats.
    #[serde(default)]
    pub discovery: Option<Discovery>,
    /// Send the event log (and access lines that ask for it) to syslog.
    #[serde(default)]
    pub syslog: Option<Syslog>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Syslog {
    /// `udp://HOST:PORT`, `tcp://HOST:PORT` or `unix:///dev/log`.
    pub address: String,
    #[serde(default = "default_syslog_facility")]
    pub facility: String,
    #[serde(default = "default_syslog_app_name")]
    pub app_name: String,
}

fn default_syslog_facility() -> String {
    "daemon".into()
}

fn default_syslog_app_name() -> String {
    "fleetgate".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLog {
    /// A file (relative to the config file), `stdout` or `syslog`.
    pub path: String,
    #[serde(default)]
    pub format: crate::access_log::Format,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Discovery {
    #[serde(default = "default_discovery_bind")]
    pub bind: String,
    pub cluster: String,
    /// The shared network token (`fleetgate token generate FILE`).
    pub token_file: String,
    #[serde(default = "default_discovery_interval")]
    pub interval: ConfigDuration,
    #[serde(default = "default_miss_limit")]
    pub miss_limit: u32,
    /// IPv4 multicast group to join (for networks without broadcast).
    #[serde(default)]
    pub multicast: Option<String>,
    /// Heartbeats whose sent-at time is further off are refused.
    #[serde(default = "default_max_clock_skew")]
    pub max_clock_skew: ConfigDuration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolDiscovery {
    /// The service name nodes announce.
    pub service: String,
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
    /// After SIGTERM, how long `/healthz` answers 503 while the listeners
    /// still accept, before the drain: the time a health checker in front
    /// (keepalived, a cloud load balancer) needs to move traffic away.
    #[serde(default)]
    pub drain_notice: ConfigDuration,
    /// Connection workers (a thread and event loop each); 0 means one per core.
    #[serde(default)]
    pub worker_threads: usize,
    /// CPUs the connection workers are pinned to.
    #[serde(default)]
    pub cpu_affinity: crate::workers::CpuAffinity,
    /// Whether the heap may use transparent huge pages (src/huge_pages.rs).
    #[serde(default = "default_true")]
    pub transparent_huge_pages: bool,
    /// Where modules keep their files; relative to the config file.
    #[serde(default = "default_data_dir")]
    pub data_dir: String,
    /// Descriptors below the open-file limit that proxied connections may
    /// not take (default: 64, at most a quarter of the limit).
    #[serde(default)]
    pub descriptor_reserve: Option<u64>,
    /// The Unix socket `fleetgate upgrade` talks to (mode 0600); relative
    /// to the config file. Default: `<data_dir>/control.sock`.
    #[serde(default)]
    pub control_socket: Option<String>,
}

impl Default for Global {
    fn default() -> Self {
        Global {
            log_level: default_log_level(),
            drain_timeout: default_drain_timeout(),
            drain_notice: ConfigDuration::default(),
            worker_threads: 0,
            cpu_affinity: Default::default(),
            transparent_huge_pages: true,
            data_dir: default_data_dir(),
            descriptor_reserve: None,
            control_socket: None,
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
    /// L4: bytes to a pool's backend.
    Tcp,
    /// TLS left intact; routed on the ClientHello's SNI.
    Passthrough,
    /// TLS terminated here; HTTP routed by host and path.
    Offload,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub name: String,
    pub bind: String,
    #[serde(default = "default_mode")]
    pub mode: Mode,
    /// tcp: the pool. passthrough: the pool for no matching SNI rule.
    /// offload: a catch-all route after the `route` list.
    #[serde(default)]
    pub pool: Option<String>,
    /// 0 means unlimited.
    #[serde(default)]
    pub max_connections: usize,
    /// Limits per client address (or network): `[listener.per_source]`.
    #[serde(default)]
    pub per_source: Option<PerSource>,
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
    /// Move bytes with splice(2) on Linux (`true`), through a buffer
    /// (`false`), or splice bulk transfers only (`"auto"`, the default).
    /// `None` when the key is absent, so that `check` can tell an offload
    /// listener that sets it.
    #[serde(default)]
    pub splice: Option<crate::l4::SpliceMode>,
    /// Sources that must start their connections with a PROXY header.
    #[serde(default)]
    pub proxy_protocol: Option<ProxyProtocol>,
    /// One line per request (offload) or connection (tcp, passthrough).
    #[serde(default)]
    pub access_log: Option<AccessLog>,

    // --- passthrough ---
    #[serde(default)]
    pub sni: Vec<SniRule>,
    /// What to do with a ClientHello without SNI: use `pool`, or reject.
    #[serde(default)]
    pub no_sni: NoSni,
    #[serde(default = "default_hello_timeout")]
    pub hello_timeout: ConfigDuration,
    #[serde(default = "default_hello_max_bytes")]
    pub hello_max_bytes: usize,

    // --- offload ---
    #[serde(default)]
    pub tls: Option<ListenerTls>,
    #[serde(default)]
    pub route: Vec<Route>,
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Strict-Transport-Security max-age; 0 withdraws HSTS; unset sends none.
    #[serde(default)]
    pub hsts_max_age: Option<ConfigDuration>,
    #[serde(default)]
    pub hsts_include_subdomains: bool,
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    #[serde(default = "default_header_timeout")]
    pub header_timeout: ConfigDuration,
    #[serde(default = "default_response_timeout")]
    pub response_timeout: ConfigDuration,
    #[serde(default = "default_upgrade_idle_timeout")]
    pub upgrade_idle_timeout: ConfigDuration,
    #[serde(default = "default_upstream_keepalive")]
    pub upstream_keepalive: usize,
    #[serde(default = "default_upstream_idle_timeout")]
    pub upstream_idle_timeout: ConfigDuration,
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: ConfigDuration,
    /// Keep request headers whose names contain `_` (dropped by default:
    /// CGI-style backends read `X_SSL_CERT` as `X-SSL-CERT`).
    #[serde(default)]
    pub allow_underscores_in_headers: bool,
    #[serde(default)]
    pub http2: Http2Limits,
}

/// `[listener.http2]`: bounds on what one HTTP/2 client connection may
/// make the balancer hold or do (rapid reset, CONTINUATION and SETTINGS
/// floods).
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct Http2Limits {
    pub max_concurrent_streams: u32,
    pub max_pending_accept_reset_streams: usize,
    pub max_local_error_reset_streams: usize,
    pub max_send_buf_size: usize,
    /// SETTINGS, PING and RST_STREAM frames a client may send at once...
    pub control_frame_burst: u32,
    /// ...and per second after that, before its connection is closed.
    pub control_frames_per_second: u32,
}

impl Default for Http2Limits {
    fn default() -> Self {
        Http2Limits {
            max_concurrent_streams: 100,
            max_pending_accept_reset_streams: 20,
            max_local_error_reset_streams: 128,
            max_send_buf_size: 64 * 1024,
            control_frame_burst: 1000,
            control_frames_per_second: 100,
        }
    }
}

/// `[listener.per_source]`: what one source may open.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerSource {
    /// Concurrent connections per source; 0 means unlimited.
    #[serde(default)]
    pub max_connections: u32,
    /// New connections per second per source; 0 means unlimited.
    #[serde(default)]
    pub rate: u32,
    /// Connections a source may open at once above the rate (default: rate).
    #[serde(default)]
    pub burst: Option<u32>,
    /// Sources are addresses masked to these prefix lengths.
    #[serde(default = "default_prefix_v4")]
    pub prefix_v4: u8,
    #[serde(default = "default_prefix_v6")]
    pub prefix_v6: u8,
    /// Slots of the fixed table that holds the counts (16 bytes each).
    #[serde(default = "default_source_table_size")]
    pub table_size: usize,
}

fn default_prefix_v4() -> u8 {
    32
}
fn default_prefix_v6() -> u8 {
    128
}
fn default_source_table_size() -> usize {
    crate::source_limits::DEFAULT_TABLE_SIZE
}

/// A listener's `proxy_protocol = { from = [...] }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyProtocol {
    /// Addresses or CIDR networks of the proxies in front.
    pub from: Vec<String>,
    /// Default: `handshake_timeout` on offload, `hello_timeout` elsewhere.
    #[serde(default)]
    pub timeout: Option<ConfigDuration>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum NoSni {
    #[default]
    Default,
    Reject,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniRule {
    /// `a.example` or `*.example`.
    pub server_name: String,
    pub pool: String,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    #[default]
    Off,
    Optional,
    Required,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertPair {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// The default certificate chain (PEM), or "auto": a self-signed
    /// certificate made in the data directory on first start.
    pub cert: String,
    #[serde(default)]
    pub key: Option<String>,
    /// Names for the "auto" certificate (default: localhost).
    #[serde(default)]
    pub auto_names: Vec<String>,
    /// Further certificates, chosen by SNI against their names.
    #[serde(default)]
    pub certificates: Vec<CertPair>,
    #[serde(default)]
    pub client_auth: ClientAuth,
    #[serde(default)]
    pub client_ca: Option<String>,
    #[serde(default = "default_cert_header")]
    pub forward_cert_header: String,
    #[serde(default)]
    pub forward_subject_header: Option<String>,
    #[serde(default)]
    pub forward_fingerprint_header: Option<String>,
    #[serde(default)]
    pub min_version: Option<String>,
    #[serde(default)]
    pub ciphers: Vec<String>,
    #[serde(default = "default_alpn")]
    pub alpn: Vec<String>,
    /// Re-read the certificate, key and CA files when they change (a
    /// renewal), without a SIGHUP. Off: only a reload re-reads them.
    #[serde(default = "default_true")]
    pub watch: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub path_prefix: Option<String>,
    #[serde(default)]
    pub path_regex: Option<String>,
    #[serde(default)]
    pub pool: Option<String>,
    #[serde(default)]
    pub module: Option<String>,
    /// Add the client-certificate header(s) on this route.
    #[serde(default = "default_true")]
    pub forward_cert: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolTls {
    /// CA bundle that backend certificates must chain to.
    pub ca: String,
    /// Name presented (SNI) and verified; defaults to the backend IP.
    #[serde(default)]
    pub server_name: Option<String>,
    #[serde(default)]
    pub min_version: Option<String>,
    /// Client certificate the balancer presents to backends.
    #[serde(default)]
    pub cert: Option<String>,
    #[serde(default)]
    pub key: Option<String>,
    /// As a listener's `tls.watch`: re-read `ca`, `cert` and `key` when
    /// they change.
    #[serde(default = "default_true")]
    pub watch: bool,
}

pub use crate::balance::Algorithm;

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
    /// Re-encrypt to the backends (offload listeners).
    #[serde(default)]
    pub tls: Option<PoolTls>,
    /// Add the nodes that announce this service by heartbeat.
    #[serde(default)]
    pub discovery: Option<PoolDiscovery>,
    /// Send a PROXY header (`"v1"` or `"v2"`) on every backend connection.
    #[serde(default)]
    pub send_proxy: Option<crate::proxy_protocol::Version>,
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

pub use crate::balance::CheckKind;

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
fn default_hello_timeout() -> ConfigDuration {
    ConfigDuration::from_secs(5)
}
fn default_hello_max_bytes() -> usize {
    16 * 1024
}
fn default_max_header_bytes() -> usize {
    16 * 1024
}
fn default_max_headers() -> usize {
    100
}
fn default_header_timeout() -> ConfigDuration {
    ConfigDuration::from_secs(30)
}
fn default_response_timeout() -> ConfigDuration {
    ConfigDuration::from_secs(60)
}
fn default_upgrade_idle_timeout() -> ConfigDuration {
    ConfigDuration::from_secs(3600)
}
fn default_upstream_keepalive() -> usize {
    32
}
fn default_upstream_idle_timeout() -> ConfigDuration {
    ConfigDuration::from_secs(60)
}
fn default_handshake_timeout() -> ConfigDuration {
    ConfigDuration::from_secs(10)
}
fn default_cert_header() -> String {
    "X-SSL-CERT".into()
}
fn default_alpn() -> Vec<String> {
    vec!["h2".into(), "http/1.1".into()]
}
fn default_data_dir() -> String {
    "data".into()
}
fn default_discovery_bind() -> String {
    "0.0.0.0:6155".into()
}
fn default_discovery_interval() -> ConfigDuration {
    ConfigDuration::from_secs(1)
}
fn default_miss_limit() -> u32 {
    3
}
fn default_max_clock_skew() -> ConfigDuration {
    ConfigDuration::from_secs(60)
}
