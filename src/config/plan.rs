//! The validated configuration: addresses parsed, names resolved. The
//! runtime is built from a `Plan` only, never from the raw file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use super::schema::{Algorithm, CheckKind};
use crate::acl::Acl;

#[derive(Debug, Clone)]
pub struct Plan {
    pub source: PathBuf,
    pub log_level: String,
    pub drain_timeout: Duration,
    pub worker_threads: usize,
    pub admin_bind: SocketAddr,
    pub listeners: Vec<ListenerPlan>,
    pub pools: Vec<PoolPlan>,
}

impl Plan {
    pub fn pool(&self, name: &str) -> Option<&PoolPlan> {
        self.pools.iter().find(|p| p.name == name)
    }
}

/// What a listener does with an accepted connection. Later modes
/// (TLS passthrough, offload) add variants here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenerMode {
    /// Plain L4: pick a backend from `pool` and pump bytes.
    Tcp { pool: String },
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
    pub idle_timeout: Duration,
    pub acl: Acl,
    pub socket: SocketOptions,
    pub splice: bool,
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

#[derive(Debug, Clone, PartialEq)]
pub struct PoolPlan {
    pub name: String,
    pub algorithm: Algorithm,
    pub backends: Vec<BackendPlan>,
    pub max_fails: u32,
    pub fail_timeout: Duration,
    pub connect_timeout: Duration,
    pub retries: u32,
    pub health_check: Option<HealthPlan>,
}
