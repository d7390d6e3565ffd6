//! Live-pool test support: a balancer whose pools are discovered, with an
//! offload, a `tcp` and a `passthrough` listener in front of them (its log
//! captured to a file); backends that answer every request with their own
//! id, over HTTP/1.1, TLS and WebSocket, and count what they served; and
//! keep-alive HTTPS clients that stay on their first connection and count
//! which backend answered.
//!
//! Everything async runs on a runtime the test owns (`runtime()`); test
//! bodies stay synchronous, so blocking admin calls never stall a backend.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use fleetgate::discovery::{Announcer, AnnouncerOptions, NodeState, Service, Token};
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::runtime::Runtime;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;

use super::discovery::{generate_token, pool_members, status, status_node, CLUSTER};
use super::pki::{client_config, server_config, Ca, Leaf};
use super::web::tls_connect;
use super::{free_addr, http_get, Balancer};

/// The name the balancer's and the backends' certificates carry.
pub const HOST: &str = "device.example";
/// Services the nodes announce: plain HTTP (pool `ums`, behind the offload
/// and the tcp listeners) and the same over TLS (pool `ums-tls`, behind
/// the passthrough listener).
pub const WEB: &str = "web";
pub const WEB_TLS: &str = "web-tls";
pub const POOL: &str = "ums";
pub const POOL_TLS: &str = "ums-tls";
/// The path active health checks probe on the backends.
pub const HEALTH_PATH: &str = "/health";

/// A runtime for backends, clients and announcers.
pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(3)
        .enable_all()
        .build()
        .unwrap()
}

/// A test CA and the server certificate (for `HOST`) that the offload
/// listener and the TLS backends present.
pub struct Pki {
    pub ca: Ca,
    pub server: Leaf,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        let ca = Ca::new(dir, "test");
        let server = ca.server(dir, "server", &[HOST, "localhost"]);
        Pki { ca, server }
    }

    /// A client config trusting the CA, speaking HTTP/1.1.
    pub fn client(&self) -> Arc<rustls::ClientConfig> {
        client_config(&self.ca, None, &[b"http/1.1"])
    }
}

/// What to put into the balancer's configuration.
pub struct LiveOptions {
    pub interval: Duration,
    pub miss_limit: u32,
    /// Appended to pool `ums` (e.g. a `health_check`).
    pub pool_extra: String,
    /// Appended to the offload listener's table.
    pub web_extra: String,
}

impl LiveOptions {
    pub fn new(interval: Duration) -> LiveOptions {
        LiveOptions {
            interval,
            miss_limit: 3,
            pool_extra: String::new(),
            web_extra: String::new(),
        }
    }
}

/// A running `fleetgate run` with `[discovery]` and three listeners:
/// `web` (offload, every path to pool `ums`), `l4` (tcp, pool `ums`) and
/// `pt` (passthrough, pool `ums-tls`). Its output goes to a file, shown
/// when a test fails.
pub struct LiveLb {
    pub lb: Balancer,
    pub web: SocketAddr,
    pub l4: SocketAddr,
    pub pt: SocketAddr,
    /// Where heartbeats go.
    pub disc: SocketAddr,
    pub token: Token,
    pub interval: Duration,
    pub pki: Pki,
    pub log: PathBuf,
}

/// The configuration text of a `LiveLb` (`{admin}` left for the caller).
#[allow(clippy::too_many_arguments)]
pub fn live_config(
    o: &LiveOptions,
    dir: &Path,
    token: &Path,
    disc: SocketAddr,
    web: SocketAddr,
    l4: SocketAddr,
    pt: SocketAddr,
) -> String {
    format!(
        r#"[admin]
bind = "{{admin}}"

[discovery]
bind = "{disc}"
cluster = "{CLUSTER}"
token_file = "{token}"
interval = "{interval}ms"
miss_limit = {miss_limit}

[[listener]]
name = "web"
bind = "{web}"
mode = "offload"
tls = {{ cert = "{cert}", key = "{key}" }}
{web_extra}

  [[listener.route]]
  name = "all"
  path_prefix = "/"
  pool = "{POOL}"

[[listener]]
name = "l4"
bind = "{l4}"
mode = "tcp"
pool = "{POOL}"

[[listener]]
name = "pt"
bind = "{pt}"
mode = "passthrough"
pool = "{POOL_TLS}"

[[pool]]
name = "{POOL}"
algorithm = "round_robin"
discovery = {{ service = "{WEB}" }}
connect_timeout = "1s"
retries = 2
{pool_extra}

[[pool]]
name = "{POOL_TLS}"
algorithm = "round_robin"
discovery = {{ service = "{WEB_TLS}" }}
connect_timeout = "1s"
retries = 2
"#,
        token = token.display(),
        interval = o.interval.as_millis(),
        miss_limit = o.miss_limit,
        cert = dir.join("server.pem").display(),
        key = dir.join("server.key").display(),
        web_extra = o.web_extra,
        pool_extra = o.pool_extra,
    )
}

impl LiveLb {
    pub fn start(o: &LiveOptions) -> LiveLb {
        let dir = tempfile::tempdir().unwrap();
        let (token_path, token) = generate_token(dir.path());
        let pki = Pki::new(dir.path());
        let (web, l4, pt, disc) = (free_addr(), free_addr(), free_addr(), free_addr());
        let config = live_config(o, dir.path(), &token_path, disc, web, l4, pt);
        let (lb, log) = start_logged(dir, &config);
        LiveLb {
            lb,
            web,
            l4,
            pt,
            disc,
            token,
            interval: o.interval,
            pki,
            log,
        }
    }

    /// Announcer options for `node` serving `backend` (both services), in
    /// `state`, heartbeats every `interval` to this balancer.
    pub fn announce(&self, node: &str, backend: &IdBackend, state: NodeState) -> AnnouncerOptions {
        announce_to(self.disc, &self.token, self.interval, node, backend, state)
    }

    /// Start announcing (call with the test runtime entered).
    pub fn join(&self, node: &str, backend: &IdBackend, state: NodeState) -> Announcer {
        Announcer::start(self.announce(node, backend, state)).expect("start announcer")
    }

    pub fn status(&self) -> Value {
        status(self.lb.admin)
    }

    pub fn node_state(&self, id: &str) -> Option<String> {
        status_node(&self.status(), id).and_then(|n| n["state"].as_str().map(str::to_string))
    }

    /// Addresses of pool `pool`'s members as `/status` lists them.
    pub fn members(&self, pool: &str) -> Vec<String> {
        pool_members(&self.status(), pool)
            .iter()
            .filter_map(|m| m["address"].as_str().map(str::to_string))
            .collect()
    }

    /// Pool `ums`'s entry for `addr` in `/status`, if it is a member.
    pub fn member(&self, addr: SocketAddr) -> Option<Value> {
        pool_members(&self.status(), POOL)
            .into_iter()
            .find(|m| m["address"] == addr.to_string().as_str())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The sum of every `fleetgate_backend_connect_duration_seconds_count` series of
    /// pool `pool` (a histogram's count: one per upstream connect).
    pub fn connects(&self, pool: &str) -> f64 {
        connect_counts(&self.lb.metrics(), pool).values().sum()
    }
}

impl Drop for LiveLb {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("--- fleetgate log ---\n{}--- end ---", self.log());
        }
    }
}

/// `fleetgate_backend_connect_duration_seconds_count` of pool `pool`, by backend.
pub fn connect_counts(metrics: &str, pool: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("fleetgate_backend_connect_duration_seconds_count{")
        else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |k: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{k}=\"")))
                .map(|v| v.trim_end_matches('"').to_string())
        };
        if label("pool").as_deref() == Some(pool) {
            if let (Some(b), Ok(v)) = (label("backend"), value.trim().parse::<f64>()) {
                *out.entry(b).or_insert(0.0) += v;
            }
        }
    }
    out
}

pub fn announce_to(
    disc: SocketAddr,
    token: &Token,
    interval: Duration,
    node: &str,
    backend: &IdBackend,
    state: NodeState,
) -> AnnouncerOptions {
    AnnouncerOptions {
        cluster: CLUSTER.into(),
        node: node.into(),
        addr: None,
        weight: 100,
        services: vec![
            Service {
                name: WEB.into(),
                port: backend.addr.port(),
                tls: false,
            },
            Service {
                name: WEB_TLS.into(),
                port: backend.tls_addr.port(),
                tls: true,
            },
        ],
        targets: vec![disc],
        interval,
        state,
        token: token.clone(),
    }
}

/// Start `fleetgate run` on `config` (written into `dir`, `{admin}`
/// replaced by a free address) with stdout and stderr going to
/// `dir/fleetgate.log`; wait until `/healthz` answers.
pub fn start_logged(dir: tempfile::TempDir, config: &str) -> (Balancer, PathBuf) {
    let admin = free_addr();
    let path = dir.path().join("fleetgate.toml");
    std::fs::write(&path, config.replace("{admin}", &admin.to_string())).unwrap();
    let log = dir.path().join("fleetgate.log");
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
        .arg("run")
        .arg("-c")
        .arg(&path)
        .env(
            "RUST_LOG",
            std::env::var("FLEETGATE_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("spawn fleetgate");
    let lb = Balancer {
        child,
        dir,
        config: path,
        admin,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if http_get(admin, "/healthz").is_ok_and(|r| r.starts_with("HTTP/1.1 200")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "fleetgate did not become ready on {admin}: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(20));
    }
    (lb, log)
}

/// Counters of one `IdBackend`.
#[derive(Default)]
struct Counters {
    /// Requests served, health probes not counted.
    requests: AtomicUsize,
    /// TCP connections accepted (plain and TLS).
    connections: AtomicUsize,
    /// WebSockets open now.
    websockets: AtomicUsize,
    /// Health probes answered.
    probes: AtomicUsize,
}

/// A backend answering every request with its id as the body, on a plain
/// port and a TLS port (the test server certificate). `GET /health` gets
/// the status set with `set_health` (200 at first); a WebSocket upgrade is
/// accepted, the id sent as the first message, then every message echoed.
pub struct IdBackend {
    pub id: String,
    pub addr: SocketAddr,
    pub tls_addr: SocketAddr,
    counters: Arc<Counters>,
    health: Arc<AtomicU16>,
}

impl IdBackend {
    pub fn start(rt: &Runtime, id: &str, pki: &Pki) -> IdBackend {
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tls = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (addr, tls_addr) = (plain.local_addr().unwrap(), tls.local_addr().unwrap());
        plain.set_nonblocking(true).unwrap();
        tls.set_nonblocking(true).unwrap();
        let counters = Arc::new(Counters::default());
        let health = Arc::new(AtomicU16::new(200));
        let shared = Arc::new(Shared {
            id: id.to_string(),
            counters: counters.clone(),
            health: health.clone(),
        });
        let server_tls = server_config(&pki.server, false);
        for (sock, tls) in [(plain, None), (tls, Some(server_tls))] {
            let shared = shared.clone();
            rt.spawn(async move {
                let listener = tokio::net::TcpListener::from_std(sock).unwrap();
                while let Ok((tcp, _)) = listener.accept().await {
                    shared.counters.connections.fetch_add(1, Ordering::SeqCst);
                    let (shared, tls) = (shared.clone(), tls.clone());
                    tokio::spawn(async move {
                        let svc =
                            hyper::service::service_fn(move |req| handle(shared.clone(), req));
                        let http = hyper::server::conn::http1::Builder::new();
                        match tls {
                            None => {
                                let _ = http
                                    .serve_connection(TokioIo::new(tcp), svc)
                                    .with_upgrades()
                                    .await;
                            }
                            Some(cfg) => {
                                let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
                                if let Ok(s) = acceptor.accept(tcp).await {
                                    let _ = http
                                        .serve_connection(TokioIo::new(s), svc)
                                        .with_upgrades()
                                        .await;
                                }
                            }
                        }
                    });
                }
            });
        }
        IdBackend {
            id: id.to_string(),
            addr,
            tls_addr,
            counters,
            health,
        }
    }

    pub fn requests(&self) -> usize {
        self.counters.requests.load(Ordering::SeqCst)
    }

    pub fn connections(&self) -> usize {
        self.counters.connections.load(Ordering::SeqCst)
    }

    pub fn websockets(&self) -> usize {
        self.counters.websockets.load(Ordering::SeqCst)
    }

    pub fn probes(&self) -> usize {
        self.counters.probes.load(Ordering::SeqCst)
    }

    pub fn set_health(&self, status: u16) {
        self.health.store(status, Ordering::SeqCst);
    }
}

struct Shared {
    id: String,
    counters: Arc<Counters>,
    health: Arc<AtomicU16>,
}

type Answer = Response<Full<Bytes>>;

async fn handle(s: Arc<Shared>, mut req: Request<Incoming>) -> Result<Answer, Infallible> {
    let text = |status: u16, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = StatusCode::from_u16(status).unwrap();
        r
    };
    if req.uri().path() == HEALTH_PATH {
        s.counters.probes.fetch_add(1, Ordering::SeqCst);
        return Ok(text(s.health.load(Ordering::SeqCst), s.id.clone()));
    }
    let upgrade = req
        .headers()
        .get(hyper::header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if upgrade {
        let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
            return Ok(text(400, "no key".into()));
        };
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(up) = on.await else { return };
            let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                TokioIo::new(up),
                Role::Server,
                None,
            )
            .await;
            s.counters.websockets.fetch_add(1, Ordering::SeqCst);
            if ws.send(Message::text(s.id.clone())).await.is_ok() {
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_close() {
                        break;
                    }
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        break;
                    }
                }
            }
            s.counters.websockets.fetch_sub(1, Ordering::SeqCst);
        });
        let mut r = text(101, String::new());
        let h = r.headers_mut();
        h.insert(hyper::header::UPGRADE, "websocket".parse().unwrap());
        h.insert(hyper::header::CONNECTION, "Upgrade".parse().unwrap());
        h.insert("sec-websocket-accept", accept.parse().unwrap());
        return Ok(r);
    }
    s.counters.requests.fetch_add(1, Ordering::SeqCst);
    let _ = req.into_body().collect().await;
    Ok(text(200, s.id.clone()))
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

/// An HTTP/1.1 connection over TLS to `front` (SNI `HOST`).
pub async fn connect(front: SocketAddr, tls: Arc<rustls::ClientConfig>) -> std::io::Result<Sender> {
    let s = tls_connect(front, HOST, tls).await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    Ok(sender)
}

/// One GET on an established connection: the body of a 200, else an error.
pub async fn get(sender: &mut Sender, path: &str) -> Result<String, String> {
    sender
        .ready()
        .await
        .map_err(|e| format!("not ready: {e}"))?;
    let req = Request::get(path)
        .header("host", HOST)
        .body(Empty::new())
        .unwrap();
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    if status == 200 {
        Ok(body)
    } else {
        Err(format!("status {status}: {body}"))
    }
}

/// One GET on a new TLS connection to `addr` (SNI `HOST`): the answering
/// backend's id, or an error text.
pub async fn get_once(addr: SocketAddr, tls: Arc<rustls::ClientConfig>) -> Result<String, String> {
    let mut s = connect(addr, tls)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    get(&mut s, "/").await
}

#[derive(Default)]
struct LoadState {
    stop: AtomicBool,
    by_id: Mutex<BTreeMap<String, u64>>,
    errors: Mutex<Vec<String>>,
    /// Connections opened after the first one of each client.
    reconnects: AtomicUsize,
    connected: AtomicUsize,
}

/// `n` keep-alive HTTPS clients, each on one connection for its whole
/// life, sending `GET path` one after the other (with `pause` between).
/// A failed request is recorded and the client reconnects (counted).
pub struct KeepAliveLoad {
    state: Arc<LoadState>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl KeepAliveLoad {
    /// Start the clients and return once every one has its connection and
    /// a first answer (so they were connected before whatever follows).
    pub fn start(
        rt: &Runtime,
        front: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        n: usize,
        path: &str,
        pause: Duration,
    ) -> KeepAliveLoad {
        let state = Arc::new(LoadState::default());
        let tasks = (0..n)
            .map(|_| {
                let (state, tls, path) = (state.clone(), tls.clone(), path.to_string());
                rt.spawn(async move { client(front, tls, &path, pause, &state).await })
            })
            .collect();
        let load = KeepAliveLoad { state, tasks };
        let deadline = Instant::now() + Duration::from_secs(15);
        while load.state.connected.load(Ordering::SeqCst) < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} clients got a first answer; errors {:?}",
                load.state.connected.load(Ordering::SeqCst),
                load.errors()
            );
            thread::sleep(Duration::from_millis(10));
        }
        load
    }

    /// Answers so far, by backend id.
    pub fn by_id(&self) -> BTreeMap<String, u64> {
        self.state.by_id.lock().unwrap().clone()
    }

    pub fn total(&self) -> u64 {
        self.by_id().values().sum()
    }

    pub fn errors(&self) -> Vec<String> {
        self.state.errors.lock().unwrap().clone()
    }

    pub fn reconnects(&self) -> usize {
        self.state.reconnects.load(Ordering::SeqCst)
    }

    /// Stop the clients and wait for them (bounded).
    pub fn stop(self, rt: &Runtime) -> LoadSummary {
        self.state.stop.store(true, Ordering::SeqCst);
        rt.block_on(async {
            for t in self.tasks {
                let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
            }
        });
        LoadSummary {
            by_id: self.state.by_id.lock().unwrap().clone(),
            errors: self.state.errors.lock().unwrap().clone(),
            reconnects: self.state.reconnects.load(Ordering::SeqCst),
        }
    }
}

pub struct LoadSummary {
    pub by_id: BTreeMap<String, u64>,
    pub errors: Vec<String>,
    pub reconnects: usize,
}

impl LoadSummary {
    pub fn total(&self) -> u64 {
        self.by_id.values().sum()
    }
}

async fn client(
    front: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    path: &str,
    pause: Duration,
    state: &LoadState,
) {
    let mut first = true;
    let mut counted = false;
    while !state.stop.load(Ordering::SeqCst) {
        let mut sender = match connect(front, tls.clone()).await {
            Ok(s) => s,
            Err(e) => {
                state.errors.lock().unwrap().push(format!("connect: {e}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if !first {
            state.reconnects.fetch_add(1, Ordering::SeqCst);
        }
        first = false;
        while !state.stop.load(Ordering::SeqCst) {
            match get(&mut sender, path).await {
                Ok(id) => {
                    *state.by_id.lock().unwrap().entry(id).or_insert(0) += 1;
                    if !counted {
                        counted = true;
                        state.connected.fetch_add(1, Ordering::SeqCst);
                    }
                }
                Err(e) => {
                    state.errors.lock().unwrap().push(e);
                    break;
                }
            }
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// A WebSocket through the offload listener, with the id of the backend
/// that took it (its first message).
pub struct HeldSocket {
    pub backend: String,
    ws: tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
}

impl HeldSocket {
    pub async fn open(
        front: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<HeldSocket, String> {
        let s = tls_connect(front, HOST, tls)
            .await
            .map_err(|e| format!("tls: {e}"))?;
        let url = format!("wss://{HOST}:{}/ws", front.port());
        let (mut ws, resp) = tokio_tungstenite::client_async(url, s)
            .await
            .map_err(|e| format!("upgrade: {e}"))?;
        if resp.status().as_u16() != 101 {
            return Err(format!("status {}", resp.status()));
        }
        let first = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .map_err(|_| "no first message".to_string())?
            .ok_or("closed before the first message")?
            .map_err(|e| format!("first message: {e}"))?;
        let backend = first.into_text().map_err(|e| e.to_string())?.to_string();
        Ok(HeldSocket { backend, ws })
    }

    /// `n` WebSockets opened one after the other; panics naming the one
    /// that failed.
    pub async fn open_many(
        front: SocketAddr,
        tls: &Arc<rustls::ClientConfig>,
        n: usize,
    ) -> Vec<HeldSocket> {
        let mut v = Vec::with_capacity(n);
        for i in 0..n {
            v.push(
                HeldSocket::open(front, tls.clone())
                    .await
                    .unwrap_or_else(|e| panic!("websocket {i}: {e}")),
            );
        }
        v
    }

    /// Send `msg` and expect it back.
    pub async fn echo(&mut self, msg: &str) -> Result<(), String> {
        self.ws
            .send(Message::text(msg.to_string()))
            .await
            .map_err(|e| format!("send: {e}"))?;
        let got = tokio::time::timeout(Duration::from_secs(5), self.ws.next())
            .await
            .map_err(|_| "no echo within 5 s".to_string())?
            .ok_or("closed")?
            .map_err(|e| format!("receive: {e}"))?;
        match got.into_text() {
            Ok(t) if t.as_str() == msg => Ok(()),
            other => Err(format!("echo {other:?}, sent {msg:?}")),
        }
    }
}

/// Backend request counts, by id, of `backends`.
pub fn served(backends: &[&IdBackend]) -> BTreeMap<String, usize> {
    backends
        .iter()
        .map(|b| (b.id.clone(), b.requests()))
        .collect()
}

/// Requests each backend served between two `served` snapshots.
pub fn served_since(
    before: &BTreeMap<String, usize>,
    backends: &[&IdBackend],
) -> BTreeMap<String, usize> {
    backends
        .iter()
        .map(|b| {
            (
                b.id.clone(),
                b.requests() - before.get(&b.id).copied().unwrap_or(0),
            )
        })
        .collect()
}

/// Poll `cond` every 10 ms until it holds or `within` passes.
pub fn within(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}
