//! Semantic checks that turn the parsed file into a `Plan`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;

use super::error::SemanticError;
use super::plan::*;
use super::schema::{self, File};
use crate::acl::Acl;
use crate::key_path;

/// Upper bound on a backend weight: keeps the round-robin schedule small.
pub const MAX_WEIGHT: u32 = 1000;

pub fn validate(file: File, source: &Path) -> Result<Plan, SemanticError> {
    let admin_bind = parse_addr(&file.admin.bind, key_path!["admin", "bind"])?;
    check_log_level(&file.global.log_level)?;

    let mut pools = Vec::new();
    let mut pool_names = HashSet::new();
    for (i, p) in file.pools.into_iter().enumerate() {
        if !pool_names.insert(p.name.clone()) {
            return Err(SemanticError::new(
                key_path!["pool", i, "name"],
                format!("duplicate pool name {:?}", p.name),
            ));
        }
        pools.push(pool(p, i)?);
    }

    let mut listeners = Vec::new();
    let mut names = HashSet::new();
    let mut binds: HashMap<SocketAddr, String> = HashMap::new();
    for (i, l) in file.listeners.into_iter().enumerate() {
        if !names.insert(l.name.clone()) {
            return Err(SemanticError::new(
                key_path!["listener", i, "name"],
                format!("duplicate listener name {:?}", l.name),
            ));
        }
        let bind = parse_addr(&l.bind, key_path!["listener", i, "bind"])?;
        if let Some(other) = binds.insert(bind, l.name.clone()) {
            return Err(SemanticError::new(
                key_path!["listener", i, "bind"],
                format!("{bind} is already bound by listener {other:?}"),
            ));
        }
        if bind == admin_bind {
            return Err(SemanticError::new(
                key_path!["listener", i, "bind"],
                format!("{bind} is the admin address"),
            ));
        }
        if !pool_names.contains(&l.pool) {
            return Err(SemanticError::new(
                key_path!["listener", i, "pool"],
                format!(
                    "no pool named {:?} (defined pools: {})",
                    l.pool,
                    list(&pool_names)
                ),
            ));
        }
        let acl = Acl::parse(&l.allow, &l.deny).map_err(|(field, idx, msg)| {
            SemanticError::new(key_path!["listener", i, field, idx], msg)
        })?;
        if l.backlog == 0 {
            return Err(SemanticError::new(
                key_path!["listener", i, "backlog"],
                "backlog must be at least 1",
            ));
        }
        if l.idle_timeout.0.is_zero() {
            return Err(SemanticError::new(
                key_path!["listener", i, "idle_timeout"],
                "idle_timeout must be greater than zero",
            ));
        }
        let mode = match l.mode {
            schema::Mode::Tcp => ListenerMode::Tcp { pool: l.pool },
        };
        listeners.push(ListenerPlan {
            name: l.name,
            bind,
            mode,
            max_connections: l.max_connections,
            idle_timeout: l.idle_timeout.0,
            acl,
            socket: SocketOptions {
                reuse_port: l.reuse_port,
                backlog: l.backlog,
                nodelay: l.nodelay,
                keepalive: l.keepalive,
            },
            splice: l.splice,
        });
    }

    Ok(Plan {
        source: source.to_path_buf(),
        log_level: file.global.log_level,
        drain_timeout: file.global.drain_timeout.0,
        worker_threads: file.global.worker_threads,
        admin_bind,
        listeners,
        pools,
    })
}

fn pool(p: schema::Pool, i: usize) -> Result<PoolPlan, SemanticError> {
    if p.backends.is_empty() {
        return Err(SemanticError::new(
            key_path!["pool", i, "backends"],
            format!("pool {:?} has no backends", p.name),
        ));
    }
    let mut seen = HashSet::new();
    let mut backends = Vec::new();
    for (j, b) in p.backends.iter().enumerate() {
        let addr = parse_addr(&b.address, key_path!["pool", i, "backends", j, "address"])?;
        if !seen.insert(addr) {
            return Err(SemanticError::new(
                key_path!["pool", i, "backends", j, "address"],
                format!("backend {addr} is listed twice in pool {:?}", p.name),
            ));
        }
        if b.weight == 0 || b.weight > MAX_WEIGHT {
            return Err(SemanticError::new(
                key_path!["pool", i, "backends", j, "weight"],
                format!(
                    "weight must be between 1 and {MAX_WEIGHT}, got {}",
                    b.weight
                ),
            ));
        }
        backends.push(BackendPlan {
            addr,
            weight: b.weight,
            backup: b.backup,
        });
    }
    if p.max_fails == 0 {
        return Err(SemanticError::new(
            key_path!["pool", i, "max_fails"],
            "max_fails must be at least 1",
        ));
    }
    if p.connect_timeout.0.is_zero() {
        return Err(SemanticError::new(
            key_path!["pool", i, "connect_timeout"],
            "connect_timeout must be greater than zero",
        ));
    }
    let health_check = match p.health_check {
        None => None,
        Some(h) => Some(health(h, i)?),
    };
    Ok(PoolPlan {
        name: p.name,
        algorithm: p.algorithm,
        backends,
        max_fails: p.max_fails,
        fail_timeout: p.fail_timeout.0,
        connect_timeout: p.connect_timeout.0,
        retries: p.retries,
        health_check,
    })
}

fn health(h: schema::HealthCheck, i: usize) -> Result<HealthPlan, SemanticError> {
    let at = |k: &str| key_path!["pool", i, "health_check", k];
    if h.rise == 0 {
        return Err(SemanticError::new(at("rise"), "rise must be at least 1"));
    }
    if h.fall == 0 {
        return Err(SemanticError::new(at("fall"), "fall must be at least 1"));
    }
    if h.interval.0.is_zero() {
        return Err(SemanticError::new(
            at("interval"),
            "interval must be greater than zero",
        ));
    }
    if h.timeout.0.is_zero() {
        return Err(SemanticError::new(
            at("timeout"),
            "timeout must be greater than zero",
        ));
    }
    if !h.path.starts_with('/') {
        return Err(SemanticError::new(
            at("path"),
            format!("path must start with '/', got {:?}", h.path),
        ));
    }
    if !(100..=599).contains(&h.expect) {
        return Err(SemanticError::new(
            at("expect"),
            format!("expect must be an HTTP status (100-599), got {}", h.expect),
        ));
    }
    Ok(HealthPlan {
        kind: h.kind,
        path: h.path,
        expect: h.expect,
        host: h.host,
        server_name: h.server_name,
        interval: h.interval.0,
        timeout: h.timeout.0,
        rise: h.rise,
        fall: h.fall,
    })
}

fn parse_addr(s: &str, path: Vec<super::error::Seg>) -> Result<SocketAddr, SemanticError> {
    s.parse().map_err(|_| {
        SemanticError::new(
            path,
            format!("{s:?} is not an IP address with a port (e.g. \"127.0.0.1:8080\" or \"[::1]:8080\")"),
        )
    })
}

fn check_log_level(level: &str) -> Result<(), SemanticError> {
    tracing_subscriber::EnvFilter::try_new(level)
        .map(|_| ())
        .map_err(|e| {
            SemanticError::new(
                key_path!["global", "log_level"],
                format!("invalid log level {level:?}: {e} (use error, warn, info, debug or trace)"),
            )
        })
}

fn list(names: &HashSet<String>) -> String {
    if names.is_empty() {
        return "none".into();
    }
    let mut v: Vec<&str> = names.iter().map(String::as_str).collect();
    v.sort_unstable();
    v.join(", ")
}
