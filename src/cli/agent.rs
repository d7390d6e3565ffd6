//! `fleetgate agent -c agent.toml`: the sidecar on a management server.
//! It checks the local server's ports and announces the node: `normal`
//! while every check passes, `draining` while one fails; on SIGTERM or
//! SIGINT `draining` for a moment (balancers stop sending new connections
//! while established ones finish), then `leaving`, then it exits.
//!
//! An optional state file lets an operator or an update script say
//! `draining` or `update` without stopping the agent.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;
use tokio::sync::mpsc;

use fleetgate::config::duration::ConfigDuration;
use fleetgate::discovery::announcer::{Announcer, AnnouncerOptions};
use fleetgate::discovery::token;
use fleetgate::discovery::wire::{self, Heartbeat, NodeState, Service};

/// The agent's file. Keys and defaults are described in conf/agent.toml.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub cluster: String,
    /// Relative paths are taken from the config file's directory.
    pub token_file: PathBuf,
    /// `host:port` each: broadcast, multicast group or balancer addresses.
    pub targets: Vec<String>,
    #[serde(default = "default_interval")]
    pub interval: ConfigDuration,
    /// Default: the host name.
    #[serde(default)]
    pub node_id: Option<String>,
    /// Advertised address; default: balancers use the datagram's source.
    #[serde(default)]
    pub address: Option<IpAddr>,
    #[serde(default = "default_weight")]
    pub weight: u16,
    /// Where checks connect, unless a check says otherwise.
    #[serde(default = "default_check_host")]
    pub check_host: IpAddr,
    #[serde(default = "default_check_timeout")]
    pub check_timeout: ConfigDuration,
    /// Default: `interval`.
    #[serde(default)]
    pub check_interval: Option<ConfigDuration>,
    /// How long `draining` is announced on shutdown before `leaving`.
    /// Default: twice `interval`.
    #[serde(default)]
    pub drain_time: Option<ConfigDuration>,
    /// If this file exists, its content overrides the state: `draining`
    /// (also an empty file) or `update`.
    #[serde(default)]
    pub state_file: Option<PathBuf>,
    #[serde(default = "default_log_level")]
    pub log_level: String,
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: String,
    pub port: u16,
    /// Announced TLS flag; default: true for a `tls` check.
    #[serde(default)]
    pub tls: Option<bool>,
    #[serde(default)]
    pub check: CheckConfig,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    /// The port accepts a TCP connection.
    #[default]
    Tcp,
    /// A TLS handshake completes (the certificate is not judged).
    Tls,
    /// An HTTP/1.1 GET answers with the expected status.
    Http,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CheckConfig {
    pub kind: CheckKind,
    /// HTTP only; default "/".
    #[serde(default)]
    pub path: Option<String>,
    /// HTTP only; default 200.
    #[serde(default)]
    pub expect: Option<u16>,
    /// Default: `check_host`.
    #[serde(default)]
    pub host: Option<IpAddr>,
    /// Default: the service's port.
    #[serde(default)]
    pub port: Option<u16>,
    /// Default: `check_timeout`.
    #[serde(default)]
    pub timeout: Option<ConfigDuration>,
    /// TLS only: SNI name; default: none (the address).
    #[serde(default)]
    pub server_name: Option<String>,
}

fn default_interval() -> ConfigDuration {
    ConfigDuration::from_secs(1)
}
fn default_weight() -> u16 {
    100
}
fn default_check_host() -> IpAddr {
    IpAddr::V4(Ipv4Addr::LOCALHOST)
}
fn default_check_timeout() -> ConfigDuration {
    ConfigDuration::from_secs(1)
}
fn default_log_level() -> String {
    "info".into()
}

/// Read and parse an agent file; errors name the file, line and key.
pub fn load_config(path: &Path) -> anyhow::Result<AgentConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read agent config {}", path.display()))?;
    parse_config(&text, path)
}

pub fn parse_config(text: &str, path: &Path) -> anyhow::Result<AgentConfig> {
    let de = toml::Deserializer::new(text);
    let cfg: AgentConfig = serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let at = inner.span().map_or(String::new(), |s| {
            let (line, col) = fleetgate::config::locate::line_col(text, s.start);
            format!(":{line}:{col}")
        });
        anyhow::anyhow!(
            "{}{at}: {}{}",
            path.display(),
            if key == "." {
                String::new()
            } else {
                format!("{key}: ")
            },
            inner.message()
        )
    })?;
    check_config(&cfg).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(cfg)
}

/// Rules serde cannot express. Format limits (id lengths, weight, service
/// count, datagram size) are checked later by encoding a trial heartbeat.
fn check_config(cfg: &AgentConfig) -> Result<(), String> {
    if cfg.targets.is_empty() {
        return Err("targets: list at least one, e.g. [\"255.255.255.255:6155\"]".into());
    }
    if cfg.interval.0.is_zero() {
        return Err("interval: must be more than zero".into());
    }
    if cfg.check_interval.is_some_and(|d| d.0.is_zero()) {
        return Err("check_interval: must be more than zero".into());
    }
    if cfg.services.is_empty() {
        return Err("no [[service]]: announce at least one port".into());
    }
    for (i, s) in cfg.services.iter().enumerate() {
        let at = format!("service[{i}] ({})", s.name);
        let c = &s.check;
        if c.kind != CheckKind::Http && (c.path.is_some() || c.expect.is_some()) {
            return Err(format!(
                "{at}.check: path and expect are for kind = \"http\""
            ));
        }
        if c.kind != CheckKind::Tls && c.server_name.is_some() {
            return Err(format!("{at}.check: server_name is for kind = \"tls\""));
        }
        if c.path.as_ref().is_some_and(|p| !p.starts_with('/')) {
            return Err(format!("{at}.check.path: must start with /"));
        }
        if c.expect.is_some_and(|e| !(100..=599).contains(&e)) {
            return Err(format!("{at}.check.expect: not an HTTP status"));
        }
        if c.port == Some(0) {
            return Err(format!("{at}.check.port: must not be 0"));
        }
        if c.timeout.is_some_and(|d| d.0.is_zero()) {
            return Err(format!("{at}.check.timeout: must be more than zero"));
        }
    }
    Ok(())
}

/// One prepared check.
struct Probe {
    service: String,
    kind: CheckKind,
    addr: SocketAddr,
    path: String,
    expect: u16,
    timeout: Duration,
    server_name: Option<String>,
}

/// A validated agent, ready to run.
pub struct Agent {
    options: AnnouncerOptions,
    probes: Vec<Arc<Probe>>,
    check_interval: Duration,
    drain_time: Duration,
    state_file: Option<PathBuf>,
    tls: Arc<rustls::ClientConfig>,
}

impl Agent {
    /// Load the token, resolve the targets and the node id, and check that
    /// the heartbeat fits the format. `base` is the config file's folder.
    pub async fn new(cfg: AgentConfig, base: &Path) -> anyhow::Result<Agent> {
        let token_path = base.join(&cfg.token_file);
        let token = token::load(&token_path)?;
        let node = match cfg.node_id {
            Some(id) => id,
            None => hostname()
                .context("node_id is not set and the host name cannot be read: set node_id")?,
        };
        let mut targets = Vec::new();
        for t in &cfg.targets {
            targets.push(resolve(t).await?);
        }
        let services: Vec<Service> = cfg
            .services
            .iter()
            .map(|s| Service {
                name: s.name.clone(),
                port: s.port,
                tls: s.tls.unwrap_or(s.check.kind == CheckKind::Tls),
            })
            .collect();
        let trial = Heartbeat {
            cluster: cfg.cluster.clone(),
            node: node.clone(),
            boot_id: 0,
            seq: 0,
            sent_at_ms: 0,
            state: NodeState::Normal,
            weight: cfg.weight,
            load: None,
            addr: cfg.address,
            services: services.clone(),
        };
        if let Err(e) = wire::encode(&trial, &token) {
            bail!("{e} (cluster {:?}, node_id {node:?})", cfg.cluster);
        }
        let probes = cfg
            .services
            .iter()
            .map(|s| {
                let c = &s.check;
                Arc::new(Probe {
                    service: s.name.clone(),
                    kind: c.kind,
                    addr: SocketAddr::new(
                        c.host.unwrap_or(cfg.check_host),
                        c.port.unwrap_or(s.port),
                    ),
                    path: c.path.clone().unwrap_or_else(|| "/".into()),
                    expect: c.expect.unwrap_or(200),
                    timeout: c.timeout.unwrap_or(cfg.check_timeout).0,
                    server_name: c.server_name.clone(),
                })
            })
            .collect();
        let interval = cfg.interval.0;
        Ok(Agent {
            options: AnnouncerOptions {
                cluster: cfg.cluster,
                node,
                addr: cfg.address,
                weight: cfg.weight,
                services,
                targets,
                interval,
                state: NodeState::Draining,
                token,
            },
            probes,
            check_interval: cfg.check_interval.map_or(interval, |d| d.0),
            drain_time: cfg.drain_time.map_or(interval * 2, |d| d.0),
            state_file: cfg.state_file.map(|p| base.join(p)),
            tls: Arc::new(tls_probe_config()),
        })
    }

    #[cfg(test)]
    fn node_id(&self) -> &str {
        &self.options.node
    }

    /// Announce until the first message on `shutdown` (a signal), then
    /// drain for `drain_time` (a second message cuts it short), leave and
    /// return. A closed channel counts as a message.
    pub async fn run(mut self, mut shutdown: mpsc::Receiver<()>) -> anyhow::Result<()> {
        let mut report = String::new();
        // Check before the first heartbeat: never announce a dead server.
        self.options.state = self.evaluate(&mut report).await;
        tracing::info!(
            node = %self.options.node,
            cluster = %self.options.cluster,
            targets = ?self.options.targets,
            token = %self.options.token.fingerprint(),
            state = %self.options.state,
            "agent announcing"
        );
        let announcer = Announcer::start(self.options.clone())?;
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + self.check_interval,
            self.check_interval,
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.recv() => break,
                _ = tick.tick() => {
                    let state = self.evaluate(&mut report).await;
                    announcer.set_state(state);
                }
            }
        }
        tracing::info!(
            "shutting down: announcing draining for {:?}, then leaving",
            self.drain_time
        );
        announcer.set_state(NodeState::Draining);
        tokio::select! {
            _ = tokio::time::sleep(self.drain_time) => {}
            _ = shutdown.recv() => tracing::info!("second signal: leaving now"),
        }
        announcer.leave().await;
        tracing::info!("left the cluster");
        Ok(())
    }

    /// Run every check at once and decide the state. `report` holds the
    /// last verdict so only changes are logged.
    async fn evaluate(&self, report: &mut String) -> NodeState {
        let mut set = tokio::task::JoinSet::new();
        for p in &self.probes {
            let (p, tls) = (p.clone(), self.tls.clone());
            set.spawn(async move {
                let r = tokio::time::timeout(p.timeout, probe(&p, &tls))
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {:?}", p.timeout)));
                (p.service.clone(), r)
            });
        }
        let mut failures: Vec<String> = Vec::new();
        while let Some(done) = set.join_next().await {
            match done {
                Ok((_, Ok(()))) => {}
                Ok((service, Err(why))) => failures.push(format!("{service}: {why}")),
                Err(e) => failures.push(format!("check task: {e}")),
            }
        }
        failures.sort();
        let forced = self.forced_state().await;
        let state = match forced {
            Some(NodeState::Draining) => NodeState::Draining,
            _ if !failures.is_empty() => NodeState::Draining,
            Some(s) => s,
            None => NodeState::Normal,
        };
        let verdict = format!("{state} {forced:?} {failures:?}");
        if verdict != *report {
            *report = verdict;
            let from_file = forced.map_or(String::new(), |s| format!(" (state file says {s})"));
            if failures.is_empty() {
                tracing::info!("all checks pass: announcing {state}{from_file}");
            } else {
                tracing::warn!(
                    "check failed: {}: announcing {state}{from_file}",
                    failures.join("; ")
                );
            }
        }
        state
    }

    /// The state file's word, if the file exists.
    async fn forced_state(&self) -> Option<NodeState> {
        let path = self.state_file.as_ref()?;
        match tokio::fs::read(path).await {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                match text.trim() {
                    "" | "draining" => Some(NodeState::Draining),
                    "update" => Some(NodeState::Update),
                    "normal" => None,
                    other => {
                        tracing::warn!(
                            file = %path.display(),
                            "state file says {:?}: expected draining, update or normal; draining",
                            other.chars().take(32).collect::<String>()
                        );
                        Some(NodeState::Draining)
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                // Someone meant to say something: the safe reading is drain.
                tracing::warn!(file = %path.display(), "state file unreadable: {e}; draining");
                Some(NodeState::Draining)
            }
        }
    }
}

/// The `fleetgate agent -c FILE` entry point.
pub async fn run_agent(path: &Path) -> anyhow::Result<()> {
    let cfg = load_config(path)?;
    fleetgate::logging::init(&cfg.log_level);
    // Handlers first: a SIGTERM during start-up must drain, not kill.
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            if tx.send(()).await.is_err() {
                break;
            }
        }
    });
    let base = path.parent().unwrap_or(Path::new("."));
    let agent = Agent::new(cfg, base)
        .await
        .with_context(|| format!("agent config {}", path.display()))?;
    agent.run(rx).await
}

async fn resolve(target: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(a) = target.parse() {
        return Ok(a);
    }
    tokio::net::lookup_host(target)
        .await
        .ok()
        .and_then(|mut it| it.next())
        .with_context(|| {
            format!("target {target:?}: not an address or a resolvable host:port (e.g. \"255.255.255.255:6155\")")
        })
}

/// The host name, without unsafe code: Linux exposes it under /proc.
fn hostname() -> Option<String> {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_string())
        .find(|s| !s.is_empty())
}

async fn probe(p: &Probe, tls: &Arc<rustls::ClientConfig>) -> Result<(), String> {
    use fleetgate::balance::health::{probe_once, Target};
    let kind = match p.kind {
        CheckKind::Tcp => fleetgate::config::CheckKind::Tcp,
        CheckKind::Tls => fleetgate::config::CheckKind::Tls,
        CheckKind::Http => fleetgate::config::CheckKind::Http,
    };
    let target = Target {
        kind,
        addr: p.addr,
        path: &p.path,
        expect: p.expect,
        host: None,
        server_name: p.server_name.as_deref(),
        user_agent: "fleetgate-agent",
    };
    probe_once(&target, tls).await
}

/// The balancer's TLS probe config: does a handshake complete? The
/// certificate is not judged (the local server's clients judge it).
fn tls_probe_config() -> rustls::ClientConfig {
    fleetgate::balance::health::tls_probe_config()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetgate::discovery::{Discovery, DiscoveryOptions, Registry, Snapshot};
    use std::os::unix::fs::PermissionsExt;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    const SAMPLE: &str = r#"
cluster = "fleet"
token_file = "network.token"
targets = ["255.255.255.255:6155"]   # broadcast; or unicast balancer addresses, or a multicast group
interval = "1s"

[[service]]
name = "device-tls"
port = 8443
check = { kind = "tcp" }             # also "tls" and { kind = "http", path = "/health", expect = 200 }
"#;

    fn parse(text: &str) -> anyhow::Result<AgentConfig> {
        parse_config(text, Path::new("agent.toml"))
    }

    #[test]
    fn the_documented_sample_parses() {
        let c = parse(SAMPLE).unwrap();
        assert_eq!(c.cluster, "fleet");
        assert_eq!(c.interval.0, Duration::from_secs(1));
        assert_eq!(c.services.len(), 1);
        assert_eq!(c.services[0].check.kind, CheckKind::Tcp);
        assert_eq!(c.weight, 100);
        assert_eq!(c.check_host, IpAddr::V4(Ipv4Addr::LOCALHOST));
        let http = SAMPLE.replace(
            r#"{ kind = "tcp" }"#,
            r#"{ kind = "http", path = "/health", expect = 200 }"#,
        );
        assert_eq!(
            parse(&http).unwrap().services[0].check.path.as_deref(),
            Some("/health")
        );
        let tls = SAMPLE.replace(r#"{ kind = "tcp" }"#, r#"{ kind = "tls" }"#);
        assert_eq!(parse(&tls).unwrap().services[0].check.kind, CheckKind::Tls);
    }

    #[test]
    fn the_shipped_conf_parses() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/agent.toml");
        let c = load_config(&p).unwrap();
        assert_eq!(c.cluster, "fleet");
        assert_eq!(c.targets, ["255.255.255.255:6155"]);
    }

    #[test]
    fn mistakes_are_named() {
        let err = |text: &str| parse(text).unwrap_err().to_string();
        let e = err(&format!("{SAMPLE}\nbogus = 1"));
        assert!(e.contains("bogus"), "{e}");
        let e = err(&SAMPLE.replace(r#"kind = "tcp""#, r#"kind = "udp""#));
        assert!(e.contains("udp") && e.contains("agent.toml:"), "{e}");
        let e = err(&SAMPLE.replace(r#"kind = "tcp""#, r#"kind = "tcp", path = "/x""#));
        assert!(e.contains("path and expect"), "{e}");
        let e = err(&SAMPLE.replace(r#""1s""#, r#""1 parsec""#));
        assert!(e.contains("interval"), "{e}");
        let e = err(&SAMPLE.replace(r#"["255.255.255.255:6155"]"#, "[]"));
        assert!(e.contains("targets"), "{e}");
        let e = err(&SAMPLE.replace("port = 8443", "port = 70000"));
        assert!(e.contains("port"), "{e}");
        let e = err(r#"cluster = "x"
token_file = "t"
targets = ["127.0.0.1:1"]"#);
        assert!(e.contains("[[service]]"), "{e}");
    }

    fn token_file(dir: &Path) {
        token::generate(&dir.join("network.token"), false).unwrap();
    }

    #[tokio::test]
    async fn agent_checks_limits_and_token_mode() {
        let dir = tempfile::tempdir().unwrap();
        token_file(dir.path());
        let a = Agent::new(parse(SAMPLE).unwrap(), dir.path())
            .await
            .unwrap();
        assert!(!a.node_id().is_empty(), "host name as default node id");
        assert_eq!(a.drain_time, Duration::from_secs(2));
        let long = format!("node_id = \"{}\"\n{SAMPLE}", "n".repeat(65));
        let e = Agent::new(parse(&long).unwrap(), dir.path())
            .await
            .err()
            .unwrap();
        assert!(e.to_string().contains("node id"), "{e}");
        let p = dir.path().join("network.token");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Agent::new(parse(SAMPLE).unwrap(), dir.path())
            .await
            .err()
            .unwrap();
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }

    fn probe_for(kind: CheckKind, addr: SocketAddr, expect: u16) -> Probe {
        Probe {
            service: "s".into(),
            kind,
            addr,
            path: "/health".into(),
            expect,
            timeout: Duration::from_secs(2),
            server_name: None,
        }
    }

    /// A one-shot-per-connection HTTP server answering `status`.
    async fn http_server(status: u16) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
                    let resp = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        addr
    }

    async fn tls_server() -> SocketAddr {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _ = acceptor.accept(s).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn probes() {
        let tls = Arc::new(tls_probe_config());
        let ok = http_server(200).await;
        let bad = http_server(503).await;
        let tls_addr = tls_server().await;
        let closed = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        assert_eq!(
            probe(&probe_for(CheckKind::Tcp, ok, 200), &tls).await,
            Ok(())
        );
        assert!(probe(&probe_for(CheckKind::Tcp, closed, 200), &tls)
            .await
            .is_err());
        assert_eq!(
            probe(&probe_for(CheckKind::Http, ok, 200), &tls).await,
            Ok(())
        );
        let e = probe(&probe_for(CheckKind::Http, bad, 200), &tls)
            .await
            .unwrap_err();
        assert!(e.contains("503"), "{e}");
        assert_eq!(
            probe(&probe_for(CheckKind::Http, bad, 503), &tls).await,
            Ok(())
        );
        assert_eq!(
            probe(&probe_for(CheckKind::Tls, tls_addr, 200), &tls).await,
            Ok(())
        );
        // A plain HTTP port does not complete a TLS handshake.
        assert!(probe(&probe_for(CheckKind::Tls, ok, 200), &tls)
            .await
            .is_err());
    }

    async fn wait_for(reg: &Registry, within: Duration, what: impl Fn(&Snapshot) -> bool) {
        let mut rx = reg.subscribe();
        let deadline = tokio::time::Instant::now() + within;
        while !what(&reg.snapshot()) {
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                panic!(
                    "condition not reached within {within:?}: {:?}",
                    reg.snapshot()
                );
            }
        }
    }

    /// The whole agent against a real receiver: normal while the local
    /// port answers, draining when it stops or the state file says so,
    /// then draining and gone on shutdown.
    #[tokio::test]
    async fn agent_end_to_end() {
        let dir = tempfile::tempdir().unwrap();
        token_file(dir.path());
        let token = token::load(&dir.path().join("network.token")).unwrap();
        let mut o = DiscoveryOptions::new("127.0.0.1:0".parse().unwrap(), "fleet", token);
        o.interval = Duration::from_millis(200);
        let disc = Discovery::start(o).await.unwrap();
        let reg = disc.registry().clone();
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = server.local_addr().unwrap().port();
        let text = format!(
            r#"
cluster = "fleet"
token_file = "network.token"
targets = ["{}"]
interval = "200ms"
check_interval = "50ms"
drain_time = "300ms"
node_id = "ums-07"
state_file = "state"

[[service]]
name = "device-tls"
port = {port}
check = {{ kind = "tcp", timeout = "500ms" }}
"#,
            disc.local_addr()
        );
        let agent = Agent::new(parse(&text).unwrap(), dir.path()).await.unwrap();
        let (tx, rx) = mpsc::channel(4);
        let task = tokio::spawn(agent.run(rx));
        let state =
            |s: NodeState| move |snap: &Snapshot| snap.node("ums-07").is_some_and(|n| n.state == s);
        wait_for(&reg, Duration::from_secs(2), state(NodeState::Normal)).await;
        let eps = reg.endpoints("device-tls");
        assert_eq!(eps[0].addr.port(), port);
        assert!(!eps[0].tls);

        std::fs::write(dir.path().join("state"), "update\n").unwrap();
        wait_for(&reg, Duration::from_secs(2), state(NodeState::Update)).await;
        std::fs::remove_file(dir.path().join("state")).unwrap();
        wait_for(&reg, Duration::from_secs(2), state(NodeState::Normal)).await;

        drop(server);
        wait_for(&reg, Duration::from_secs(2), state(NodeState::Draining)).await;

        tx.send(()).await.unwrap();
        wait_for(&reg, Duration::from_secs(2), |s| s.nodes.is_empty()).await;
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}
