//! Discovery test support: a network token made by the real CLI, a
//! balancer whose pool is learned from heartbeats, heartbeats sent from the
//! test process (the library `Announcer`, or raw `wire::encode`), `/status`
//! as JSON, and a backend that holds its connection and echoes.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use fleetgate::discovery::{AnnouncerOptions, NodeState, Service, Token};
use serde_json::Value;

use super::{free_addr, http_get, Balancer};

pub const CLUSTER: &str = "fleet";
pub const SERVICE: &str = "device-tls";
pub const POOL: &str = "ums";

/// Announcer options for node `node` serving `SERVICE` in plain TCP on
/// `port` of the heartbeat's source address, in state normal every 200 ms,
/// sent to the discovery socket `target`.
pub fn announce_to(target: SocketAddr, token: Token, node: &str, port: u16) -> AnnouncerOptions {
    AnnouncerOptions {
        cluster: CLUSTER.into(),
        node: node.into(),
        addr: None,
        weight: 100,
        services: vec![Service {
            name: SERVICE.into(),
            port,
            tls: false,
        }],
        targets: vec![target],
        interval: Duration::from_millis(200),
        state: NodeState::Normal,
        token,
    }
}

/// A UDP port for a balancer's discovery socket. That socket has
/// SO_REUSEADDR, so two balancers could share a port without an error: the
/// shared allocator hands each caller a port no other test is given.
pub fn free_udp_addr() -> SocketAddr {
    super::free_addr()
}

/// `fleetgate token generate DIR/network.token` with the real binary; the
/// file must come out mode 0600. Returns its path and the token.
pub fn generate_token(dir: &Path) -> (PathBuf, Token) {
    let path = dir.join("network.token");
    let out = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
        .args(["token", "generate"])
        .arg(&path)
        .output()
        .expect("run fleetgate token generate");
    assert!(
        out.status.success(),
        "token generate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "token file mode");
    let token = fleetgate::discovery::token::load(&path).expect("load the generated token");
    (path, token)
}

/// A balancer with `[discovery]` on a free UDP port of 127.0.0.1 and one
/// TCP listener in front of pool `ums`, which learns service `device-tls`.
pub struct DiscoveryLb {
    pub lb: Balancer,
    pub front: SocketAddr,
    /// Where heartbeats go.
    pub disc: SocketAddr,
    pub token: Token,
    pub token_path: PathBuf,
    pub interval: Duration,
    pub miss_limit: u32,
    /// Holds the token file.
    pub dir: tempfile::TempDir,
}

impl DiscoveryLb {
    /// `pool_extra` is appended to the `[[pool]]` table (e.g. `retries = 2`).
    pub fn start(interval: Duration, miss_limit: u32, pool_extra: &str) -> DiscoveryLb {
        let dir = tempfile::tempdir().unwrap();
        let (token_path, token) = generate_token(dir.path());
        let front = free_addr();
        let disc = free_udp_addr();
        let config = format!(
            r#"[admin]
bind = "{{admin}}"

[discovery]
bind = "{disc}"
cluster = "{CLUSTER}"
token_file = "{token}"
interval = "{interval}ms"
miss_limit = {miss_limit}

[[listener]]
name = "front"
bind = "{front}"
pool = "{POOL}"

[[pool]]
name = "{POOL}"
algorithm = "round_robin"
discovery = {{ service = "{SERVICE}" }}
{pool_extra}
"#,
            token = token_path.display(),
            interval = interval.as_millis(),
        );
        let lb = Balancer::start(&config);
        DiscoveryLb {
            lb,
            front,
            disc,
            token,
            token_path,
            interval,
            miss_limit,
            dir,
        }
    }

    /// Announcer options for node `node` serving `device-tls` on `port` of
    /// the heartbeat's source address (127.0.0.1), sent to this balancer.
    pub fn announce(&self, node: &str, port: u16, state: NodeState) -> AnnouncerOptions {
        let mut o = announce_to(self.disc, self.token.clone(), node, port);
        o.interval = self.interval;
        o.state = state;
        o
    }

    pub fn status(&self) -> Value {
        status(self.lb.admin)
    }

    /// The node as `/status` lists it under `discovery.nodes`.
    pub fn node(&self, id: &str) -> Option<Value> {
        status_node(&self.status(), id)
    }

    /// The backends of pool `ums` as `/status` lists them.
    pub fn members(&self) -> Vec<Value> {
        pool_members(&self.status(), POOL)
    }

    /// The addresses pool `ums` would pick from right now.
    pub fn member_addrs(&self) -> Vec<String> {
        eligible_addrs(&self.members())
    }

    /// One series of `/metrics`.
    pub fn metric(&self, series: &str) -> f64 {
        self.lb.metric(series)
    }

    pub fn rejected(&self, reason: &str) -> f64 {
        self.metric(&format!(
            "fleetgate_discovery_heartbeats_rejected_total{{reason=\"{reason}\"}}"
        ))
    }

    pub fn accepted(&self) -> f64 {
        self.metric("fleetgate_discovery_heartbeats_total")
    }
}

/// `GET /status` on an admin address, parsed.
pub fn status(admin: SocketAddr) -> Value {
    let resp = http_get(admin, "/status").expect("GET /status");
    let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or_else(|e| panic!("/status is not JSON ({e}): {resp}"))
}

pub fn status_node(status: &Value, id: &str) -> Option<Value> {
    status["discovery"]["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["id"] == id)
        .cloned()
}

pub fn pool_members(status: &Value, pool: &str) -> Vec<Value> {
    status["pools"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == pool))
        .and_then(|p| p["backends"].as_array().cloned())
        .unwrap_or_default()
}

/// A tokio runtime for announcers (they spawn their sending task).
pub fn tokio_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// A backend that answers its name and a newline, then echoes whatever the
/// client sends until the client closes. Counts connections accepted.
pub struct EchoBackend {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl EchoBackend {
    pub fn start(name: &str) -> EchoBackend {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (count, greeting) = (accepted.clone(), format!("{name}\n"));
        thread::spawn(move || {
            for c in listener.incoming() {
                let Ok(mut c) = c else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                let greeting = greeting.clone();
                thread::spawn(move || {
                    let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
                    if c.write_all(greeting.as_bytes()).is_err() {
                        return;
                    }
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 || c.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        EchoBackend { addr, accepted }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Connect through the balancer and read the first line (the backend's
/// name); the connection stays open for the caller. An empty name means
/// the balancer closed without a backend.
pub fn open_line(front: SocketAddr) -> std::io::Result<(String, BufReader<TcpStream>)> {
    let s = TcpStream::connect_timeout(&front, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    Ok((line.trim().to_string(), r))
}

/// Send `msg` plus a newline on a held connection and read the echo back.
pub fn echo(conn: &mut BufReader<TcpStream>, msg: &str) -> std::io::Result<String> {
    conn.get_mut().write_all(format!("{msg}\n").as_bytes())?;
    let mut line = String::new();
    conn.read_line(&mut line)?;
    Ok(line.trim_end().to_string())
}

/// User plus system CPU time of a process so far, from /proc/PID/stat.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime), counted from 1; `rest` starts at 3.
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_micros(ticks * 1_000_000 / hz)
}

/// One counter of the kernel's UDP statistics (`/proc/net/snmp`), e.g.
/// `RcvbufErrors`: datagrams dropped because a socket's buffer was full.
pub fn udp_stat(name: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut rows = text.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(head), Some(vals)) = (rows.next(), rows.next()) else {
        return 0;
    };
    head.split_whitespace()
        .zip(vals.split_whitespace())
        .find(|(h, _)| *h == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Milliseconds, for reports.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Node states by name, for readable assertions on `/status`.
pub fn state_of(node: &Option<Value>) -> Option<String> {
    node.as_ref()
        .and_then(|n| n["state"].as_str().map(str::to_string))
}

/// The addresses of the members that take new connections (a draining
/// node stays listed, resting, with its state).
pub fn eligible_addrs(members: &[Value]) -> Vec<String> {
    members
        .iter()
        .filter(|m| m["role"] != "resting")
        .filter_map(|m| m["address"].as_str().map(str::to_string))
        .collect()
}
