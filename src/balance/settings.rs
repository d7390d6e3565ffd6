//! What a pool is told by the configuration: its algorithm, timeouts,
//! health checks and static backends. Defined here, next to what uses it,
//! so that balancing depends on no configuration or discovery type; the
//! configuration builds these values and re-exports them.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::tls::upstream::UpstreamTls;

/// The largest weight a backend may have (static or announced).
pub const MAX_WEIGHT: u32 = 1000;

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

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    Tcp,
    Tls,
    Http,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BackendPlan {
    pub addr: SocketAddr,
    pub weight: u32,
    pub backup: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HealthPlan {
    pub kind: CheckKind,
    pub path: String,
    pub expect: u16,
    pub host: Option<String>,
    pub server_name: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

#[derive(Clone)]
pub struct PoolPlan {
    pub name: String,
    pub algorithm: Algorithm,
    pub backends: Vec<BackendPlan>,
    pub max_fails: u32,
    pub fail_timeout: Duration,
    pub connect_timeout: Duration,
    pub retries: u32,
    pub health_check: Option<HealthPlan>,
    /// Re-encryption settings for HTTP upstream connections.
    pub tls: Option<UpstreamTls>,
    /// Service whose announcing nodes join this pool.
    pub discovery_service: Option<String>,
    /// PROXY header written on each new backend connection (L4 only).
    pub send_proxy: Option<crate::proxy_protocol::Version>,
}

impl std::fmt::Debug for PoolPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolPlan")
            .field("name", &self.name)
            .field("algorithm", &self.algorithm)
            .field("backends", &self.backends)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}
