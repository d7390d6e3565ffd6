//! The validated configuration: addresses parsed, names resolved. The
//! runtime is built from a `Plan` only, never from the raw file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::acl::Acl;
pub use crate::balance::{Algorithm, BackendPlan, CheckKind, HealthPlan, PoolPlan};
pub use crate::http::headers::CertHeaders;
pub use crate::http::upstream::UpstreamTls;
pub use crate::http::{HostMatch, HttpPlan, PathMatch, RoutePlan, Target};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct Plan {
    pub source: PathBuf,
    pub log_level: String,
    pub drain_timeout: Duration,
    pub drain_notice: Duration,
    pub worker_threads: usize,
    pub cpu_affinity: crate::workers::CpuAffinity,
    pub transparent_huge_pages: bool,
    pub admin_bind: SocketAddr,
    pub listeners: Vec<ListenerPlan>,
    pub pools: Vec<PoolPlan>,
    pub data_dir: PathBuf,
    pub modules: Vec<ModulePlan>,
    pub discovery: Option<DiscoveryPlan>,
    /// `None`: the default reserve (see `shortage::set_reserve`).
    pub descriptor_reserve: Option<u64>,
    /// Where `fleetgate upgrade` reaches the running process.
    pub control_socket: PathBuf,
    pub syslog: Option<crate::syslog::SyslogPlan>,
    /// Files this plan's TLS configs hold in memory that are not on disk
    /// yet; the runtime writes them when it starts.
    pub first_start: super::FirstStart,
    /// The text this plan was validated from and the files it read that
    /// are watched for changes.
    pub origin: Origin,
}

/// Where a plan came from. A renewed certificate is applied by validating
/// this text again, not the configuration file as it is now: an
/// operator's half-edited file must not go live because a certificate
/// changed.
#[derive(Clone, Default)]
pub struct Origin {
    pub text: Arc<str>,
    /// Certificate, key and CA files of the listeners and pools whose
    /// `tls.watch` is on, each once, sorted.
    pub watched: Vec<PathBuf>,
    /// Each watched file as it was when this plan read it: the watch
    /// starts from these, so that a file that changed between the read
    /// and the watch's first look is still seen.
    pub read_as: std::collections::BTreeMap<PathBuf, super::FileStamp>,
}

impl std::fmt::Debug for Origin {
    /// The files only: the text is the whole configuration.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origin")
            .field("watched", &self.watched)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub struct DiscoveryPlan {
    pub bind: SocketAddr,
    pub cluster: String,
    pub token: crate::discovery::Token,
    pub token_file: PathBuf,
    pub interval: Duration,
    pub miss_limit: u32,
    pub multicast: Option<std::net::Ipv4Addr>,
    pub max_clock_skew: Duration,
}

impl DiscoveryPlan {
    /// Whether running with `other` would need a new receiver (a restart).
    pub fn same_receiver(&self, other: &DiscoveryPlan) -> bool {
        self.bind == other.bind
            && self.cluster == other.cluster
            && self.token.fingerprint() == other.token.fingerprint()
            && self.interval == other.interval
            && self.miss_limit == other.miss_limit
            && self.multicast == other.multicast
            && self.max_clock_skew == other.max_clock_skew
    }
}

/// An in-process module: built once at start from its own TOML table.
#[derive(Debug, Clone)]
pub struct ModulePlan {
    pub name: String,
    pub kind: String,
    pub config: toml::Value,
    /// `required` (default true): while the module is not ready
    /// (`Module::ready`), the balancer is not healthy (`/healthz` 503).
    /// `false` for a module the balancer's other work does not need.
    pub required: bool,
    /// Shared with the listeners whose `client_ca` is this module's CA;
    /// handed to the module at start (`ModuleEnv::revocations`).
    pub revocations: crate::tls::revocation::RevocationList,
}

/// Two module plans are the same configuration whatever their lists hold.
impl PartialEq for ModulePlan {
    fn eq(&self, other: &ModulePlan) -> bool {
        self.name == other.name && self.kind == other.kind && self.config == other.config
    }
}

impl Plan {
    pub fn pool(&self, name: &str) -> Option<&PoolPlan> {
        self.pools.iter().find(|p| p.name == name)
    }
}

/// What a listener does with an accepted connection.
#[derive(Debug, Clone)]
pub enum ListenerMode {
    /// Plain L4: pick a backend from `pool` and pump bytes.
    Tcp { pool: String },
    /// Route on the ClientHello's SNI, then pump bytes untouched.
    Passthrough(PassthroughPlan),
    /// Terminate TLS and proxy HTTP by route.
    Offload(Box<OffloadPlan>),
}

impl ListenerMode {
    /// Every pool this listener can send to.
    pub fn pools(&self) -> Vec<&str> {
        match self {
            ListenerMode::Tcp { pool } => vec![pool.as_str()],
            ListenerMode::Passthrough(p) => p
                .rules
                .iter()
                .map(|(_, pool)| pool.as_str())
                .chain(p.default_pool.as_deref())
                .collect(),
            ListenerMode::Offload(o) => o
                .routes
                .iter()
                .filter_map(|r| match &r.target {
                    Target::Pool(p) => Some(p.as_str()),
                    Target::Module(_) => None,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct PassthroughPlan {
    pub rules: Vec<(HostMatch, String)>,
    pub default_pool: Option<String>,
    pub reject_no_sni: bool,
    pub hello_timeout: Duration,
    pub hello_max_bytes: usize,
}

#[derive(Clone)]
pub struct OffloadPlan {
    pub tls: Arc<rustls::ServerConfig>,
    /// Checked after every handshake (resumed sessions skip the verifier).
    pub revocation: Option<crate::tls::revocation::RevocationList>,
    /// The certificates `tls` was built from, for the inventory.
    pub certificates: crate::tls::inventory::UsedCerts,
    pub cert_headers: CertHeaders,
    pub http: HttpPlan,
    pub routes: Vec<RoutePlan>,
}

impl std::fmt::Debug for OffloadPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OffloadPlan")
            .field("cert_headers", &self.cert_headers)
            .field("http", &self.http)
            .field("routes", &self.routes)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketOptions {
    pub reuse_port: bool,
    pub backlog: u32,
    pub nodelay: bool,
    pub keepalive: bool,
}

#[derive(Debug, Clone)]
pub struct ListenerPlan {
    pub name: String,
    pub bind: SocketAddr,
    pub mode: ListenerMode,
    /// 0 means unlimited.
    pub max_connections: usize,
    pub per_source: Option<crate::source_limits::PerSourcePlan>,
    pub idle_timeout: Duration,
    pub acl: Acl,
    pub socket: SocketOptions,
    pub splice: crate::l4::SpliceMode,
    /// Sources that must send a PROXY header, and how long they have.
    pub proxy_protocol: Option<crate::proxy_protocol::accept::AcceptPlan>,
    pub access_log: Option<crate::access_log::AccessLogPlan>,
}
