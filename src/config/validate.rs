//! Semantic checks that turn the parsed file into a `Plan`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::error::{Seg, SemanticError};
use super::first_start::FirstStart;
use super::plan::*;
use super::schema::{self, File};
use crate::acl::Acl;
use crate::key_path;

/// Upper bound on a backend weight: keeps the round-robin schedule small.
pub use crate::balance::MAX_WEIGHT;

/// `running`: the plan of the process being reloaded, whose modules keep
/// their revocation lists (a first load or a check makes new ones).
/// Reads files (certificates, keys, tokens) but never writes: what a
/// first start must create is returned in `Plan::first_start`.
pub fn validate(
    file: File,
    source: &Path,
    kinds: &[&str],
    running: Option<&Plan>,
) -> Result<Plan, SemanticError> {
    // Relative file names (certificates, keys) are relative to the
    // configuration file, as in nginx and HAProxy.
    let base = source.parent().unwrap_or(Path::new("."));
    let admin_bind = parse_addr(&file.admin.bind, key_path!["admin", "bind"])?;
    check_log_level(&file.global.log_level)?;
    check_cpu_affinity(&file.global.cpu_affinity)?;

    let discovery = match &file.discovery {
        None => None,
        Some(d) => Some(discovery(d, base)?),
    };
    let mut pools = Vec::new();
    let mut pool_names = HashSet::new();
    for (i, p) in file.pools.into_iter().enumerate() {
        if p.discovery.is_some() && discovery.is_none() {
            return Err(SemanticError::new(
                key_path!["pool", i, "discovery"],
                "a pool with `discovery` needs a [discovery] table",
            ));
        }
        if !pool_names.insert(p.name.clone()) {
            return Err(SemanticError::new(
                key_path!["pool", i, "name"],
                format!("duplicate pool name {:?}", p.name),
            ));
        }
        pools.push(pool(p, i, base)?);
    }

    let mut modules = Vec::new();
    for (name, table) in &file.module {
        let kind = match table.get("kind") {
            None => name.clone(),
            Some(toml::Value::String(k)) => k.clone(),
            Some(_) => {
                return Err(SemanticError::new(
                    key_path!["module", name.as_str(), "kind"],
                    "kind must be a string",
                ))
            }
        };
        if !table.is_table() {
            return Err(SemanticError::new(
                key_path!["module", name.as_str()],
                "must be a table",
            ));
        }
        let required = match table.get("required") {
            None => true,
            Some(toml::Value::Boolean(r)) => *r,
            Some(_) => {
                return Err(SemanticError::new(
                    key_path!["module", name.as_str(), "required"],
                    "required must be true or false",
                ))
            }
        };
        if !kinds.contains(&kind.as_str()) {
            return Err(SemanticError::new(
                key_path!["module", name.as_str()],
                format!(
                    "no module kind {kind:?} (available: {})",
                    if kinds.is_empty() {
                        "none".to_string()
                    } else {
                        kinds.join(", ")
                    }
                ),
            ));
        }
        // The module and the listeners trusting its CA share this list:
        // the running module's on a reload, a new one otherwise.
        let revocations = running
            .and_then(|r| r.modules.iter().find(|m| &m.name == name))
            .map(|m| m.revocations.clone())
            .unwrap_or_default();
        modules.push(ModulePlan {
            name: name.clone(),
            kind,
            config: table.clone(),
            required,
            revocations,
        });
    }
    let module_names: HashSet<String> = file.module.keys().cloned().collect();
    let data_dir = base.join(&file.global.data_dir);
    let control_socket = control_socket(file.global.control_socket.as_deref(), base, &data_dir)?;
    let mut env = Env {
        base,
        data_dir: &data_dir,
        modules: &modules,
        first_start: FirstStart::default(),
    };

    let syslog = super::logs::syslog(file.syslog.as_ref())?;
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
        let mode = mode(&l, i, &pool_names, &module_names, &mut env)?;
        let proxy_protocol = super::proxy_protocol::accept(&l, i)?;
        let access_log =
            super::logs::access_log(l.access_log.as_ref(), i, env.base, syslog.is_some())?;
        listeners.push(ListenerPlan {
            access_log,
            proxy_protocol,
            name: l.name,
            bind,
            mode,
            max_connections: l.max_connections,
            per_source: per_source(l.per_source.as_ref(), i)?,
            idle_timeout: l.idle_timeout.0,
            acl,
            socket: SocketOptions {
                reuse_port: l.reuse_port,
                backlog: l.backlog,
                nodelay: l.nodelay,
                keepalive: l.keepalive,
            },
            splice: l.splice.unwrap_or_default(),
        });
    }

    super::proxy_protocol::check_send_proxy(&listeners, &pools)?;
    if listeners.is_empty() {
        return Err(SemanticError::new(
            Vec::new(),
            "no [[listener]]: a balancer without listeners serves nothing",
        ));
    }
    Ok(Plan {
        source: source.to_path_buf(),
        log_level: file.global.log_level.clone(),
        drain_timeout: file.global.drain_timeout.0,
        drain_notice: file.global.drain_notice.0,
        worker_threads: file.global.worker_threads,
        cpu_affinity: file.global.cpu_affinity.clone(),
        transparent_huge_pages: file.global.transparent_huge_pages,
        admin_bind,
        listeners,
        pools,
        data_dir: data_dir.clone(),
        modules: modules.clone(),
        discovery,
        descriptor_reserve: file.global.descriptor_reserve,
        control_socket,
        syslog,
        first_start: env.first_start,
        origin: Default::default(),
    })
}

/// The control socket's path: a Unix socket address holds at most 107
/// bytes of path (`sun_path`), which a deep data directory can exceed.
fn control_socket(
    configured: Option<&str>,
    base: &Path,
    data_dir: &Path,
) -> Result<PathBuf, SemanticError> {
    const SUN_PATH_MAX: usize = 107;
    let path = match configured {
        Some("") => {
            return Err(SemanticError::new(
                key_path!["global", "control_socket"],
                "control_socket must not be empty",
            ))
        }
        Some(p) => base.join(p),
        None => data_dir.join("control.sock"),
    };
    let len = path.as_os_str().len();
    if len > SUN_PATH_MAX {
        return Err(SemanticError::new(
            key_path!["global", "control_socket"],
            format!(
                "{} is {len} bytes long; a Unix socket path holds at most {SUN_PATH_MAX} (set global.control_socket to a shorter path)",
                path.display()
            ),
        ));
    }
    if path.is_dir() {
        return Err(SemanticError::new(
            key_path!["global", "control_socket"],
            format!("{} is a directory", path.display()),
        ));
    }
    Ok(path)
}

fn pool(p: schema::Pool, i: usize, base: &Path) -> Result<PoolPlan, SemanticError> {
    if p.backends.is_empty() && p.discovery.is_none() {
        return Err(SemanticError::new(
            key_path!["pool", i, "backends"],
            format!(
                "pool {:?} has no backends (list `backends`, or learn them with `discovery`)",
                p.name
            ),
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
    let tls = match &p.tls {
        None => None,
        Some(t) => Some(super::tls::upstream(t, base, key_path!["pool", i, "tls"])?),
    };
    Ok(PoolPlan {
        tls,
        discovery_service: p.discovery.map(|d| d.service),
        send_proxy: p.send_proxy,
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

fn parse_addr(s: &str, path: Vec<Seg>) -> Result<SocketAddr, SemanticError> {
    s.parse().map_err(|_| {
        SemanticError::new(
            path,
            format!("{s:?} is not an IP address with a port (e.g. \"127.0.0.1:8080\" or \"[::1]:8080\")"),
        )
    })
}

fn check_cpu_affinity(a: &crate::workers::CpuAffinity) -> Result<(), SemanticError> {
    let crate::workers::CpuAffinity::Cpus(cpus) = a else {
        return Ok(());
    };
    let at = || key_path!["global", "cpu_affinity"];
    if cpus.is_empty() {
        return Err(SemanticError::new(
            at(),
            "an empty CPU list pins nothing: list CPU numbers, or say \"off\"",
        ));
    }
    let allowed = crate::workers::allowed_cpus();
    if let Some(cpu) = cpus.iter().find(|c| !allowed.contains(c)) {
        return Err(SemanticError::new(
            at(),
            format!("CPU {cpu} is not available to this process (it may run on {allowed:?})"),
        ));
    }
    Ok(())
}

fn check_log_level(level: &str) -> Result<(), SemanticError> {
    crate::logging::filter(level).map(|_| ()).map_err(|e| {
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

fn pool_ref(name: &str, pools: &HashSet<String>, path: Vec<Seg>) -> Result<String, SemanticError> {
    if pools.contains(name) {
        Ok(name.to_string())
    } else {
        Err(SemanticError::new(
            path,
            format!("no pool named {name:?} (defined pools: {})", list(pools)),
        ))
    }
}

/// Keys that only make sense in some modes must not be set in others: a
/// silently ignored key is a misconfiguration waiting to surprise.
fn only_in(l: &schema::Listener, i: usize) -> Result<(), SemanticError> {
    use schema::Mode::*;
    let misplaced = |key: &str, modes: &str| {
        Err(SemanticError::new(
            key_path!["listener", i, key],
            format!(
                "`{key}` applies to {modes} listeners only (this one is {:?})",
                l.mode
            ),
        ))
    };
    if l.mode != Passthrough && !l.sni.is_empty() {
        return misplaced("sni", "passthrough");
    }
    if l.mode != Offload {
        if l.tls.is_some() {
            return misplaced("tls", "offload");
        }
        if !l.route.is_empty() {
            return misplaced("route", "offload");
        }
    }
    if l.mode == Offload && l.splice.is_some() {
        return misplaced("splice", "tcp and passthrough");
    }
    Ok(())
}

fn mode(
    l: &schema::Listener,
    i: usize,
    pools: &HashSet<String>,
    modules: &HashSet<String>,
    env: &mut Env,
) -> Result<ListenerMode, SemanticError> {
    only_in(l, i)?;
    let default_pool = match &l.pool {
        Some(p) => Some(pool_ref(p, pools, key_path!["listener", i, "pool"])?),
        None => None,
    };
    match l.mode {
        schema::Mode::Tcp => match default_pool {
            Some(pool) => Ok(ListenerMode::Tcp { pool }),
            None => Err(SemanticError::new(
                key_path!["listener", i],
                format!("listener {:?} (mode tcp) needs `pool`", l.name),
            )),
        },
        schema::Mode::Passthrough => {
            let mut rules = Vec::new();
            for (j, r) in l.sni.iter().enumerate() {
                let m = HostMatch::parse(&r.server_name).map_err(|e| {
                    SemanticError::new(key_path!["listener", i, "sni", j, "server_name"], e)
                })?;
                rules.push((
                    m,
                    pool_ref(&r.pool, pools, key_path!["listener", i, "sni", j, "pool"])?,
                ));
            }
            if rules.is_empty() && default_pool.is_none() {
                return Err(SemanticError::new(
                    key_path!["listener", i],
                    format!("passthrough listener {:?} needs `pool` or at least one [[listener.sni]] rule", l.name),
                ));
            }
            Ok(ListenerMode::Passthrough(PassthroughPlan {
                rules,
                default_pool,
                reject_no_sni: l.no_sni == schema::NoSni::Reject,
                hello_timeout: l.hello_timeout.0,
                hello_max_bytes: l.hello_max_bytes,
            }))
        }
        schema::Mode::Offload => offload(l, i, pools, modules, default_pool, env)
            .map(|o| ListenerMode::Offload(Box::new(o))),
    }
}

fn offload(
    l: &schema::Listener,
    i: usize,
    pools: &HashSet<String>,
    modules: &HashSet<String>,
    default_pool: Option<String>,
    env: &mut Env,
) -> Result<OffloadPlan, SemanticError> {
    let Some(tls) = &l.tls else {
        return Err(SemanticError::new(
            key_path!["listener", i],
            format!(
                "offload listener {:?} needs a `tls` table (cert, key)",
                l.name
            ),
        ));
    };
    let (server, revocation, certificates) =
        super::tls::server(tls, env, key_path!["listener", i, "tls"])?;
    let header = |v: &str, k: &str| -> Result<Option<hyper::header::HeaderName>, SemanticError> {
        if v.is_empty() {
            return Ok(None);
        }
        hyper::header::HeaderName::from_bytes(v.as_bytes())
            .map(Some)
            .map_err(|_| {
                SemanticError::new(
                    key_path!["listener", i, "tls", k],
                    format!("{v:?} is not a valid header name"),
                )
            })
    };
    let cert_headers = CertHeaders {
        cert: header(&tls.forward_cert_header, "forward_cert_header")?,
        subject: header(
            tls.forward_subject_header.as_deref().unwrap_or(""),
            "forward_subject_header",
        )?,
        fingerprint: header(
            tls.forward_fingerprint_header.as_deref().unwrap_or(""),
            "forward_fingerprint_header",
        )?,
    };

    let mut routes = Vec::new();
    for (j, r) in l.route.iter().enumerate() {
        let at = |k: &str| key_path!["listener", i, "route", j, k];
        let path = match (&r.path_prefix, &r.path_regex) {
            (Some(_), Some(_)) => {
                return Err(SemanticError::new(
                    at("path_regex"),
                    "give path_prefix or path_regex, not both",
                ))
            }
            (Some(p), None) => {
                if !p.starts_with('/') {
                    return Err(SemanticError::new(
                        at("path_prefix"),
                        format!("{p:?} must start with '/'"),
                    ));
                }
                PathMatch::Prefix(p.clone())
            }
            (None, Some(re)) => PathMatch::Regex(regex::Regex::new(re).map_err(|e| {
                SemanticError::new(at("path_regex"), format!("invalid regex: {e}"))
            })?),
            (None, None) => PathMatch::Prefix("/".into()),
        };
        let host = match &r.host {
            Some(h) => Some(HostMatch::parse(h).map_err(|e| SemanticError::new(at("host"), e))?),
            None => None,
        };
        let target = match (&r.pool, &r.module) {
            (Some(p), None) => Target::Pool(pool_ref(p, pools, at("pool"))?),
            (None, Some(m)) => {
                if !modules.contains(m) {
                    return Err(SemanticError::new(
                        at("module"),
                        format!("no module named {m:?} (configure it in a [module.{m}] table)"),
                    ));
                }
                Target::Module(m.clone())
            }
            _ => {
                return Err(SemanticError::new(
                    key_path!["listener", i, "route", j],
                    "a route needs exactly one of `pool` or `module`",
                ))
            }
        };
        routes.push(RoutePlan {
            name: r.name.clone().unwrap_or_else(|| format!("route{j}")),
            host,
            path,
            target,
            forward_cert: r.forward_cert,
        });
    }
    if let Some(pool) = default_pool {
        routes.push(RoutePlan {
            name: "default".into(),
            host: None,
            path: PathMatch::Prefix("/".into()),
            target: Target::Pool(pool),
            forward_cert: true,
        });
    }
    if routes.is_empty() {
        return Err(SemanticError::new(
            key_path!["listener", i],
            format!(
                "offload listener {:?} needs `pool` or at least one [[listener.route]]",
                l.name
            ),
        ));
    }

    let nets = |list: &[String], key: &str| -> Result<Vec<ipnet::IpNet>, SemanticError> {
        list.iter()
            .enumerate()
            .map(|(j, s)| {
                s.parse::<ipnet::IpNet>()
                    .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        SemanticError::new(
                            key_path!["listener", i, key, j],
                            format!("{s:?} is not an IP address or CIDR network"),
                        )
                    })
            })
            .collect()
    };
    let allowed_hosts = if l.allowed_hosts.is_empty() {
        None
    } else {
        Some(
            l.allowed_hosts
                .iter()
                .enumerate()
                .map(|(j, h)| {
                    HostMatch::parse(h).map_err(|e| {
                        SemanticError::new(key_path!["listener", i, "allowed_hosts", j], e)
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
        )
    };
    let hsts = l.hsts_max_age.map(|age| {
        let sub = if l.hsts_include_subdomains {
            "; includeSubDomains"
        } else {
            ""
        };
        hyper::header::HeaderValue::from_str(&format!("max-age={}{sub}", age.0.as_secs()))
            .expect("ASCII header value")
    });
    if l.max_header_bytes < 1024 {
        return Err(SemanticError::new(
            key_path!["listener", i, "max_header_bytes"],
            "max_header_bytes must be at least 1024",
        ));
    }
    if l.max_headers == 0 {
        return Err(SemanticError::new(
            key_path!["listener", i, "max_headers"],
            "max_headers must be at least 1",
        ));
    }
    Ok(OffloadPlan {
        tls: server,
        revocation,
        certificates,
        cert_headers,
        routes,
        http: HttpPlan {
            trusted_proxies: nets(&l.trusted_proxies, "trusted_proxies")?,
            allowed_hosts,
            hsts,
            max_header_bytes: l.max_header_bytes,
            max_headers: l.max_headers,
            header_timeout: l.header_timeout.0,
            response_timeout: l.response_timeout.0,
            upgrade_idle_timeout: l.upgrade_idle_timeout.0,
            upstream_keepalive: l.upstream_keepalive,
            upstream_idle_timeout: l.upstream_idle_timeout.0,
            handshake_timeout: l.handshake_timeout.0,
            allow_underscores_in_headers: l.allow_underscores_in_headers,
            http2: http2_limits(&l.http2, i)?,
            hello_max_bytes: offload_hello_max_bytes(l, i)?,
        },
    })
}

/// `[listener.http2]`: every bound must leave room for ordinary clients.
fn http2_limits(
    h: &schema::Http2Limits,
    i: usize,
) -> Result<crate::http::h2_guard::Http2Plan, SemanticError> {
    let at_least = |key: &str, v: usize, min: usize| {
        if v < min {
            Err(SemanticError::new(
                key_path!["listener", i, "http2", key],
                format!("{key} must be at least {min}"),
            ))
        } else {
            Ok(())
        }
    };
    at_least(
        "max_concurrent_streams",
        h.max_concurrent_streams as usize,
        1,
    )?;
    at_least(
        "max_pending_accept_reset_streams",
        h.max_pending_accept_reset_streams,
        1,
    )?;
    at_least(
        "max_local_error_reset_streams",
        h.max_local_error_reset_streams,
        1,
    )?;
    at_least("max_send_buf_size", h.max_send_buf_size, 1024)?;
    at_least("control_frame_burst", h.control_frame_burst as usize, 10)?;
    at_least(
        "control_frames_per_second",
        h.control_frames_per_second as usize,
        1,
    )?;
    Ok(h.into())
}

/// `hello_max_bytes` on an offload listener: the ClientHello is measured
/// before rustls parses it, and a limit below what real clients send
/// (about 2 KiB with a post-quantum key share) would lock them out.
fn offload_hello_max_bytes(l: &schema::Listener, i: usize) -> Result<usize, SemanticError> {
    const MIN: usize = 4096;
    if l.hello_max_bytes < MIN {
        return Err(SemanticError::new(
            key_path!["listener", i, "hello_max_bytes"],
            format!("hello_max_bytes must be at least {MIN} on offload listeners"),
        ));
    }
    Ok(l.hello_max_bytes)
}

/// What TLS settings may refer to besides files next to the config.
pub struct Env<'a> {
    pub base: &'a Path,
    pub data_dir: &'a Path,
    pub modules: &'a [ModulePlan],
    /// Files the listeners need that a first start will write.
    pub first_start: FirstStart,
}

fn discovery(d: &schema::Discovery, base: &Path) -> Result<DiscoveryPlan, SemanticError> {
    let at = |k: &str| key_path!["discovery", k];
    let bind = parse_addr(&d.bind, at("bind"))?;
    let token_file = base.join(&d.token_file);
    let token = crate::discovery::token::load(&token_file)
        .map_err(|e| SemanticError::new(at("token_file"), e.to_string()))?;
    if d.interval.0.is_zero() {
        return Err(SemanticError::new(
            at("interval"),
            "interval must be greater than zero",
        ));
    }
    if d.miss_limit == 0 {
        return Err(SemanticError::new(
            at("miss_limit"),
            "miss_limit must be at least 1",
        ));
    }
    let multicast = match &d.multicast {
        None => None,
        Some(m) => match m.parse::<std::net::Ipv4Addr>() {
            Ok(ip) if ip.is_multicast() => Some(ip),
            _ => {
                return Err(SemanticError::new(
                    at("multicast"),
                    format!("{m:?} is not an IPv4 multicast group (224.0.0.0/4)"),
                ))
            }
        },
    };
    if d.cluster.is_empty() || d.cluster.len() > 64 {
        return Err(SemanticError::new(
            at("cluster"),
            "cluster must be 1 to 64 bytes",
        ));
    }
    Ok(DiscoveryPlan {
        bind,
        cluster: d.cluster.clone(),
        token,
        token_file,
        interval: d.interval.0,
        miss_limit: d.miss_limit,
        multicast,
        max_clock_skew: d.max_clock_skew.0,
    })
}

/// `[listener.per_source]`: at least one limit, prefixes that are prefix
/// lengths, a table that is neither useless nor huge.
fn per_source(
    p: Option<&schema::PerSource>,
    i: usize,
) -> Result<Option<crate::source_limits::PerSourcePlan>, SemanticError> {
    let Some(p) = p else { return Ok(None) };
    let at = |k: &str| key_path!["listener", i, "per_source", k];
    if p.max_connections == 0 && p.rate == 0 {
        return Err(SemanticError::new(
            key_path!["listener", i, "per_source"],
            "per_source sets no limit: give max_connections and/or rate",
        ));
    }
    if p.rate > 1_000_000 {
        return Err(SemanticError::new(
            at("rate"),
            "rate must be at most 1000000 connections per second",
        ));
    }
    let burst = p.burst.unwrap_or(p.rate.max(1));
    if burst == 0 {
        return Err(SemanticError::new(at("burst"), "burst must be at least 1"));
    }
    if p.burst.is_some() && p.rate == 0 {
        return Err(SemanticError::new(
            at("burst"),
            "burst applies to a rate: set `rate` too",
        ));
    }
    if !(1..=32).contains(&p.prefix_v4) {
        return Err(SemanticError::new(
            at("prefix_v4"),
            format!("prefix_v4 must be 1 to 32, got {}", p.prefix_v4),
        ));
    }
    if !(1..=128).contains(&p.prefix_v6) {
        return Err(SemanticError::new(
            at("prefix_v6"),
            format!("prefix_v6 must be 1 to 128, got {}", p.prefix_v6),
        ));
    }
    if !(256..=1 << 24).contains(&p.table_size) {
        return Err(SemanticError::new(
            at("table_size"),
            format!(
                "table_size must be 256 to 16777216 slots, got {}",
                p.table_size
            ),
        ));
    }
    Ok(Some(crate::source_limits::PerSourcePlan {
        rate: p.rate,
        burst,
        max_connections: p.max_connections,
        prefix_v4: p.prefix_v4,
        prefix_v6: p.prefix_v6,
        table_size: p.table_size,
    }))
}

#[cfg(test)]
mod module_tests {
    use std::path::Path;

    #[test]
    fn modules_are_required_unless_told_otherwise() {
        let plan = |extra: &str| {
            let text = format!(
                "{}[module.devices]\nkind = \"devices\"\n{extra}",
                super::control_socket_tests::BASE
            );
            crate::config::parse(&text, Path::new("/etc/fg/f.toml"))
        };
        assert!(plan("").unwrap().modules[0].required);
        assert!(!plan("required = false").unwrap().modules[0].required);
        let e = plan("required = \"no\"").unwrap_err();
        assert_eq!(e.key.as_str(), "module.devices.required", "{e}");
    }
}

#[cfg(test)]
mod control_socket_tests {
    use std::path::Path;

    pub(super) const BASE: &str = "[[pool]]\nname = \"p\"\nbackends = [{ address = \"127.0.0.1:9\" }]\n\n[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:1\"\nmode = \"tcp\"\npool = \"p\"\n";

    #[test]
    fn the_control_socket_defaults_to_the_data_dir_and_fits_a_socket_address() {
        let plan = crate::config::parse(BASE, Path::new("/etc/fg/f.toml")).unwrap();
        assert_eq!(plan.control_socket, Path::new("/etc/fg/data/control.sock"));
        let set = format!("[global]\ncontrol_socket = \"/run/fg.sock\"\n{BASE}");
        let plan = crate::config::parse(&set, Path::new("/etc/fg/f.toml")).unwrap();
        assert_eq!(plan.control_socket, Path::new("/run/fg.sock"));
        let long = format!(
            "[global]\ncontrol_socket = \"/{}/c.sock\"\n{BASE}",
            "d".repeat(110)
        );
        let e = crate::config::parse(&long, Path::new("/etc/fg/f.toml")).unwrap_err();
        assert_eq!(e.key.as_str(), "global.control_socket", "{e}");
        assert!(e.message.contains("at most 107"), "{e}");
    }
}
