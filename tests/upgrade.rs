//! `fleetgate upgrade` with real processes: the running binary hands its
//! listening sockets (by fd passing) and its SQLite store to a copy of
//! itself, under load, and drains; a new binary that fails leaves the old
//! process serving.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::devices::ADMIN_TOKEN;
use common::pki::{client_config, Ca, Leaf};
use common::web::{echo_backend, tls_connect, websocket_backend};
use common::{free_addr, http_get};
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

const DRAIN: Duration = Duration::from_secs(4);

/// The running process (`fleetgate run`, logging at info into `log`),
/// and the processes that replace it; all killed on drop.
struct Balancer {
    dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    admin: SocketAddr,
    old: Child,
    new_pids: Vec<u32>,
}

impl Balancer {
    fn start(dir: &Path, config: &str) -> Balancer {
        Self::start_env(dir, config, &[])
    }

    fn start_env(dir: &Path, config: &str, env: &[(&str, &Path)]) -> Balancer {
        let admin = free_addr();
        let path = dir.join("fleetgate.toml");
        std::fs::write(&path, config.replace("{admin}", &admin.to_string())).unwrap();
        let log = dir.join("fleetgate.log");
        let out = std::fs::File::create(&log).unwrap();
        let old = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
            .args(["run", "-c"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let b = Balancer {
            dir: dir.to_path_buf(),
            config: path,
            log,
            admin,
            old,
            new_pids: Vec::new(),
        };
        b.wait_healthy();
        b
    }

    fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !http_get(self.admin, "/healthz").is_ok_and(|r| r.starts_with("HTTP/1.1 200")) {
            assert!(Instant::now() < deadline, "not ready: {}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn write_config(&self, config: &str) {
        let text = config.replace("{admin}", &self.admin.to_string());
        std::fs::write(&self.config, text).unwrap();
    }

    /// A copy of the binary, as a package upgrade would install.
    fn copy_binary(&self) -> PathBuf {
        let copy = self.dir.join("fleetgate-new");
        std::fs::copy(env!("CARGO_BIN_EXE_fleetgate"), &copy).unwrap();
        copy
    }

    /// `fleetgate upgrade`: (exit success, stdout, stderr).
    fn upgrade(&mut self, binary: Option<&Path>) -> (bool, String, String) {
        let config = self.config.clone();
        self.upgrade_with(&config, binary)
    }

    /// `fleetgate upgrade -c CONFIG`: the command reads only the control
    /// socket's path from CONFIG; the new process reads the running
    /// one's configuration file.
    fn upgrade_with(&mut self, config: &Path, binary: Option<&Path>) -> (bool, String, String) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetgate"));
        cmd.args(["upgrade", "-c"]).arg(config);
        if let Some(b) = binary {
            cmd.arg("--binary").arg(b);
        }
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if let Some(pid) = new_pid(&stdout) {
            self.new_pids.push(pid);
        }
        (
            out.status.success(),
            stdout,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn old_exited_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.old.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.old.kill();
        let _ = self.old.wait();
        for pid in &self.new_pids {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

fn new_pid(stdout: &str) -> Option<u32> {
    stdout
        .strip_prefix("upgraded: process ")?
        .split(' ')
        .next()?
        .parse()
        .ok()
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// What the load saw.
#[derive(Default)]
struct Stats {
    ok: AtomicU64,
    /// Idle keep-alive connections the drain closed (a FIN between
    /// requests); the client reconnects.
    closed_idle: AtomicU64,
    /// WebSockets closed with 1012 that reconnected and echoed again.
    ws_restarted: AtomicU64,
    failures: Mutex<Vec<String>>,
}

impl Stats {
    fn fail(&self, what: String) {
        self.failures.lock().unwrap().push(what);
    }
}

/// A TCP echo server (the L4 listener's backend).
async fn tcp_echo() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// Requests on keep-alive connections, reconnecting when the server
/// closes one.
async fn keepalive_client(
    front: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    stop: Arc<AtomicBool>,
    stats: Arc<Stats>,
) {
    while !stop.load(Ordering::Relaxed) {
        let io = match tls_connect(front, "localhost", tls.clone()).await {
            Ok(io) => io,
            Err(e) => {
                stats.fail(format!("keep-alive connect: {e}"));
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await
        else {
            stats.fail("keep-alive handshake".into());
            continue;
        };
        tokio::spawn(conn);
        while !stop.load(Ordering::Relaxed) {
            if sender.ready().await.is_err() {
                stats.closed_idle.fetch_add(1, Ordering::Relaxed);
                break;
            }
            let req = Request::get("/echo")
                .header("host", "localhost")
                .body(Empty::<Bytes>::new())
                .unwrap();
            match sender.send_request(req).await {
                Ok(resp) => {
                    let status = resp.status();
                    let close = resp
                        .headers()
                        .get("connection")
                        .is_some_and(|v| v == "close");
                    match resp.into_body().collect().await {
                        Ok(_) if status == 200 => stats.ok.fetch_add(1, Ordering::Relaxed),
                        other => {
                            stats.fail(format!("keep-alive: {status} {:?}", other.err()));
                            break;
                        }
                    };
                    if close {
                        break;
                    }
                }
                // The server closed the idle connection as this request
                // went out (a FIN, not a reset): HTTP/1.1's race that
                // every client retries.
                Err(e) if e.is_incomplete_message() || e.is_canceled() => {
                    stats.closed_idle.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Err(e) => {
                    stats.fail(format!("keep-alive request: {e:?}"));
                    break;
                }
            }
        }
    }
}

/// A new TLS connection per request.
async fn new_connection_client(
    front: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    stop: Arc<AtomicBool>,
    stats: Arc<Stats>,
) {
    while !stop.load(Ordering::Relaxed) {
        let result = async {
            let io = tls_connect(front, "localhost", tls.clone())
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            tokio::spawn(conn);
            let req = Request::get("/new")
                .header("host", "localhost")
                .header("connection", "close")
                .body(Empty::<Bytes>::new())
                .unwrap();
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| format!("request: {e:?}"))?;
            let status = resp.status();
            resp.into_body()
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?;
            if status != 200 {
                return Err(format!("status {status}"));
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => stats.ok.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                stats.fail(format!("new connection: {e}"));
                0
            }
        };
    }
}

/// L4 connections opened one after another, each echoing a line.
async fn l4_client(l4: SocketAddr, stop: Arc<AtomicBool>, stats: Arc<Stats>) {
    while !stop.load(Ordering::Relaxed) {
        let result = async {
            let mut s = tokio::net::TcpStream::connect(l4).await?;
            s.write_all(b"ping\n").await?;
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await?;
            if &buf != b"ping\n" {
                return Err(std::io::Error::other("wrong echo"));
            }
            Ok::<_, std::io::Error>(())
        }
        .await;
        match result {
            Ok(()) => stats.ok.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                stats.fail(format!("l4: {e}"));
                0
            }
        };
    }
}

/// One WebSocket through the offload listener, echoing a message every
/// 250 ms; closed with 1012, it reconnects and goes on.
async fn websocket_client(
    front: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    stop: Arc<AtomicBool>,
    stats: Arc<Stats>,
) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut n = 0u64;
    'connect: while !stop.load(Ordering::Relaxed) {
        let io = match tls_connect(front, "localhost", tls.clone()).await {
            Ok(io) => io,
            Err(e) => return stats.fail(format!("ws connect: {e}")),
        };
        let req = "wss://localhost/ws".into_client_request().unwrap();
        let mut ws = match tokio_tungstenite::client_async(req, io).await {
            Ok((ws, _)) => ws,
            Err(e) => return stats.fail(format!("ws handshake: {e}")),
        };
        // The backend's hello (the upgrade request's headers).
        if !matches!(ws.next().await, Some(Ok(Message::Text(_)))) {
            return stats.fail("ws: no hello".into());
        }
        loop {
            if stop.load(Ordering::Relaxed) {
                let _ = ws.close(None).await;
                return;
            }
            n += 1;
            if let Err(e) = ws.send(Message::text(n.to_string())).await {
                return stats.fail(format!("ws send: {e}"));
            }
            match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) if t.as_str() == n.to_string() => {
                    stats.ok.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Some(Ok(Message::Close(Some(f))))) if f.code == CloseCode::Restart => {
                    // Answer the close, then come back to the same address.
                    while let Ok(Some(_)) =
                        tokio::time::timeout(Duration::from_secs(2), ws.next()).await
                    {
                    }
                    stats.ws_restarted.fetch_add(1, Ordering::Relaxed);
                    continue 'connect;
                }
                other => return stats.fail(format!("ws: {other:?}")),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

fn failures(stats: &Stats) -> Vec<String> {
    stats.failures.lock().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_under_load_drops_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new(d, "server");
    let server = ca.server(d, "server", &["localhost"]);
    let echo = echo_backend("echo", None).await;
    let ws = websocket_backend().await;
    let l4_backend = tcp_echo().await;
    let (front, l4) = (free_addr(), free_addr());
    let config = format!(
        r#"[global]
drain_timeout = "{drain}s"
data_dir = "data"

[admin]
bind = "{{admin}}"

[[pool]]
name = "echo"
backends = [{{ address = "{echo}" }}]

[[pool]]
name = "ws"
backends = [{{ address = "{ws}" }}]

[[pool]]
name = "l4"
backends = [{{ address = "{l4_backend}" }}]

[[listener]]
name = "front"
bind = "{front}"
mode = "offload"
tls = {{ cert = "{cert}", key = "{key}" }}

  [[listener.route]]
  path_prefix = "/ws"
  pool = "ws"

  [[listener.route]]
  path_prefix = "/"
  pool = "echo"

[[listener]]
name = "l4"
bind = "{l4}"
mode = "tcp"
pool = "l4"
"#,
        drain = DRAIN.as_secs(),
        cert = server.cert_path.display(),
        key = server.key_path.display(),
    );
    let mut lb = Balancer::start(d, &config);
    let old_pid = lb.old.id();
    let tls = client_config(&ca, None, &[b"http/1.1"]);
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(Stats::default());
    let mut tasks = Vec::new();
    for _ in 0..3 {
        tasks.push(tokio::spawn(keepalive_client(
            front,
            tls.clone(),
            stop.clone(),
            stats.clone(),
        )));
    }
    for _ in 0..2 {
        tasks.push(tokio::spawn(new_connection_client(
            front,
            tls.clone(),
            stop.clone(),
            stats.clone(),
        )));
        tasks.push(tokio::spawn(l4_client(l4, stop.clone(), stats.clone())));
    }
    const WEBSOCKETS: u64 = 200;
    for _ in 0..WEBSOCKETS {
        tasks.push(tokio::spawn(websocket_client(
            front,
            tls.clone(),
            stop.clone(),
            stats.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = stats.ok.load(Ordering::Relaxed);
    assert!(before > 0, "the load runs: {:?}", failures(&stats));

    let copy = lb.copy_binary();
    let (ok, stdout, stderr) = tokio::task::block_in_place(|| lb.upgrade(Some(&copy)));
    assert!(ok, "upgrade failed: {stdout}{stderr}\n{}", lb.log_text());
    let new = new_pid(&stdout).expect("the new pid is printed");
    assert_ne!(new, old_pid);
    // The drain ends at drain_timeout at the latest.
    let exited =
        tokio::task::block_in_place(|| lb.old_exited_within(DRAIN + Duration::from_secs(1)));
    assert!(
        exited,
        "the old process is still running: {}",
        lb.log_text()
    );
    let at_exit = stats.ok.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(15), t).await;
    }
    let failed = failures(&stats);
    assert!(
        failed.is_empty(),
        "{} failures: {:?}",
        failed.len(),
        &failed[..failed.len().min(20)]
    );
    assert!(
        stats.ok.load(Ordering::Relaxed) > at_exit,
        "the new process serves"
    );
    assert!(alive(new), "the new process runs");
    assert_eq!(
        stats.ws_restarted.load(Ordering::Relaxed),
        WEBSOCKETS,
        "every WebSocket was closed with 1012 and reconnected"
    );
    let metrics = http_get(lb.admin, "/metrics").unwrap();
    assert!(
        common::metric_value(
            &metrics,
            "fleetgate_connections_accepted_total{listener=\"l4\"}"
        ) > 0.0,
        "the new process accepts on the inherited L4 socket"
    );
    eprintln!(
        "requests and echoes: {} ({} before the upgrade), idle keep-alive connections closed by the drain: {}, WebSockets restarted: {}",
        stats.ok.load(Ordering::Relaxed),
        before,
        stats.closed_idle.load(Ordering::Relaxed),
        stats.ws_restarted.load(Ordering::Relaxed)
    );
}

// --- the devices module ---------------------------------------------

fn devices_config(front: SocketAddr, extra: &str) -> String {
    let drain = format!("drain_timeout = \"{}s\"", DRAIN.as_secs());
    common::devices::config(&drain, "{admin}", front, extra)
}

/// A device fleet's view of the balancer: the admin API, enrolment and
/// the command channel.
struct Fleet {
    front: SocketAddr,
    admin: SocketAddr,
    ca: Ca,
}

struct Device {
    id: String,
    leaf: Leaf,
}

impl Fleet {
    async fn request<S>(
        io: S,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> (u16, Value)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        if !bytes.is_empty() {
            req = req.header("content-type", "application/json");
        }
        let resp = sender
            .send_request(req.body(Full::new(Bytes::from(bytes))).unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let tcp = tokio::net::TcpStream::connect(self.admin).await.unwrap();
        let auth = format!("Bearer {ADMIN_TOKEN}");
        let path = format!("/modules/devices/{path}");
        Self::request(tcp, method, &path, &[("authorization", &auth)], body).await
    }

    async fn enrol(&self, name: &str) -> Device {
        let (s, t) = self.admin("POST", "tokens", Some(json!({"uses": 1}))).await;
        assert_eq!(s, 201, "{t}");
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let tls = tls_connect(
            self.front,
            "localhost",
            client_config(&self.ca, None, &[b"http/1.1"]),
        )
        .await
        .unwrap();
        let body = json!({"token": t["secret"], "csr": csr, "name": name});
        let (s, v) = Self::request(tls, "POST", "/api/v1/enrol", &[], Some(body)).await;
        assert_eq!(s, 201, "{v}");
        let cert_pem = v["certificate"].as_str().unwrap().to_string();
        Device {
            id: v["device_id"].as_str().unwrap().to_string(),
            leaf: Leaf {
                der: common::devices::pem_der(&cert_pem),
                cert_pem,
                key_pem: key.serialize_pem(),
                key_der: key.serialize_der(),
                cert_path: PathBuf::new(),
                key_path: PathBuf::new(),
            },
        }
    }

    async fn channel(
        &self,
        device: &Device,
    ) -> Result<
        tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
        String,
    > {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let tls = client_config(&self.ca, Some(&device.leaf), &[b"http/1.1"]);
        let io = tls_connect(self.front, "localhost", tls)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let req = "wss://localhost/api/v1/commands/ws"
            .into_client_request()
            .unwrap();
        let (ws, _) = tokio_tungstenite::client_async(req, io)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        Ok(ws)
    }
}

/// What one device saw on its command channel(s).
#[derive(Default, Debug)]
struct Seen {
    commands: Vec<String>,
    close_codes: Vec<u16>,
    errors: Vec<String>,
}

/// A device that keeps its channel open, acknowledges every command at
/// once and reconnects when the channel is closed, until `stop`.
async fn device_loop(fleet: Arc<Fleet>, device: Device, stop: Arc<AtomicBool>) -> Seen {
    let mut seen = Seen::default();
    while !stop.load(Ordering::Relaxed) {
        let mut ws = match fleet.channel(&device).await {
            Ok(ws) => ws,
            Err(e) => {
                seen.errors.push(e);
                return seen;
            }
        };
        loop {
            let msg = tokio::select! {
                m = ws.next() => m,
                () = tokio::time::sleep(Duration::from_millis(100)) => {
                    if stop.load(Ordering::Relaxed) {
                        let _ = ws.close(None).await;
                        return seen;
                    }
                    continue;
                }
            };
            match msg {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v["type"] == "command" {
                        let id = v["id"].as_str().unwrap().to_string();
                        seen.commands.push(id.clone());
                        let ack = json!({"type": "ack", "id": id, "status": "ok"});
                        let _ = ws.send(Message::text(ack.to_string())).await;
                    }
                }
                Some(Ok(Message::Close(f))) => {
                    seen.close_codes.push(f.map_or(0, |f| u16::from(f.code)));
                    while let Ok(Some(_)) =
                        tokio::time::timeout(Duration::from_secs(2), ws.next()).await
                    {
                    }
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    seen.errors.push(format!("channel: {e}"));
                    break;
                }
                None => {
                    seen.errors.push("channel ended without a close".into());
                    break;
                }
            }
        }
    }
    seen
}

fn devices_fixture(d: &Path) -> (Ca, SocketAddr) {
    let ca = Ca::new(d, "server");
    ca.server(d, "server", &["localhost"]);
    // The listener trusts the module's CA, read when the config loads:
    // the first start creates it as the module would.
    let data = d.join("data/devices");
    std::fs::create_dir_all(&data).unwrap();
    fleetgate::module::devices::ca::DeviceCa::load_or_create(&data, "devices").unwrap();
    (ca, free_addr())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_store_moves_and_commands_arrive_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ca, front) = devices_fixture(d);
    let mut lb = Balancer::start(d, &devices_config(front, ""));
    let fleet = Arc::new(Fleet {
        front,
        admin: lb.admin,
        ca,
    });
    const DEVICES: usize = 5;
    let mut ids = Vec::new();
    let stop = Arc::new(AtomicBool::new(false));
    let mut loops = Vec::new();
    for i in 0..DEVICES {
        let device = fleet.enrol(&format!("dev{i}")).await;
        ids.push(device.id.clone());
        loops.push(tokio::spawn(device_loop(
            fleet.clone(),
            device,
            stop.clone(),
        )));
    }
    // Every channel is open before the upgrade.
    let deadline = Instant::now() + Duration::from_secs(10);
    while fleet_channels(&lb) < DEVICES as f64 {
        assert!(Instant::now() < deadline, "channels did not open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let copy = lb.copy_binary();
    let upgrade = {
        let config = lb.config.clone();
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_fleetgate"))
                .args(["upgrade", "-c"])
                .arg(&config)
                .arg("--binary")
                .arg(&copy)
                .output()
                .unwrap()
        })
    };
    // Commands queued while the upgrade is under way: whichever process
    // the admin request reaches stores it, and it is delivered once.
    let mut queued = Vec::new();
    for round in 0..3 {
        for id in &ids {
            let (s, c) = fleet
                .admin(
                    "POST",
                    &format!("devices/{id}/commands"),
                    Some(json!({"kind": "message", "payload": {"text": format!("round {round}")}})),
                )
                .await;
            // 503: the request reached the old process after it released
            // the store; an operator retries, as this does once.
            if s == 503 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let (s, c) = fleet
                    .admin(
                        "POST",
                        &format!("devices/{id}/commands"),
                        Some(json!({"kind": "message", "payload": {"text": format!("round {round}")}})),
                    )
                    .await;
                assert_eq!(s, 201, "{c}");
                queued.push(c["id"].as_str().unwrap().to_string());
                continue;
            }
            assert_eq!(s, 201, "{c}");
            queued.push(c["id"].as_str().unwrap().to_string());
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let out = upgrade.await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        lb.log_text()
    );
    lb.new_pids.extend(new_pid(&stdout));
    let exited =
        tokio::task::block_in_place(|| lb.old_exited_within(DRAIN + Duration::from_secs(1)));
    assert!(
        exited,
        "the old process is still running: {}",
        lb.log_text()
    );
    // A command queued on the new process after the handover.
    for id in &ids {
        let (s, c) = fleet
            .admin(
                "POST",
                &format!("devices/{id}/commands"),
                Some(json!({"kind": "reboot"})),
            )
            .await;
        assert_eq!(s, 201, "{c}");
        queued.push(c["id"].as_str().unwrap().to_string());
    }
    // Until every command is acknowledged (the store says so).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut pending = 0;
        for id in &ids {
            let (s, v) = fleet.admin("GET", &format!("devices/{id}"), None).await;
            assert_eq!(s, 200, "{v}");
            pending += v["pending_commands"].as_i64().unwrap_or(0);
        }
        if pending == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{pending} commands still pending"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut received = Vec::new();
    for l in loops {
        let seen = l.await.unwrap();
        assert!(seen.errors.is_empty(), "{seen:?}");
        assert!(
            !seen.close_codes.is_empty() && seen.close_codes.iter().all(|&c| c == 1012),
            "every channel on the old process is closed with 1012: {seen:?}"
        );
        received.extend(seen.commands);
    }
    received.sort();
    let mut expected = queued.clone();
    expected.sort();
    assert_eq!(received, expected, "every command arrives exactly once");

    // One process at a time had the database: the old one released it
    // before the new one opened it, and nothing met a locked database.
    let log = lb.log_text();
    let released = log.find("devices: SQLite store released").expect(&log);
    let ready_after = log[released..].contains("devices: ready");
    assert!(
        ready_after,
        "the new process opened the store after the release:\n{log}"
    );
    assert_eq!(log.matches("devices: ready").count(), 2, "{log}");
    for bad in ["SQLITE_BUSY", "database is locked"] {
        assert!(!log.contains(bad), "{bad}:\n{log}");
    }
}

fn fleet_channels(lb: &Balancer) -> f64 {
    let metrics = http_get(lb.admin, "/metrics").unwrap_or_default();
    common::metric_value(
        &metrics,
        "fleetgate_devices_channels_open{module=\"devices\"}",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_new_binary_leaves_the_old_process_serving() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ca, front) = devices_fixture(d);
    let config = devices_config(front, "");
    let mut lb = Balancer::start(d, &config);
    let fleet = Fleet {
        front,
        admin: lb.admin,
        ca,
    };
    let first = fleet.enrol("first").await;
    let old_pid = lb.old.id();

    // A binary that exits at once.
    let exits = d.join("exits");
    std::fs::write(&exits, "#!/bin/sh\necho 'not a fleetgate' >&2\nexit 3\n").unwrap();
    std::fs::set_permissions(&exits, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (ok, _, err) = tokio::task::block_in_place(|| lb.upgrade(Some(&exits)));
    assert!(!ok);
    assert!(err.contains("exited (exit status: 3)"), "{err}");

    // A configuration the new process refuses (the command itself
    // reads a valid copy, as it would check a bad one first).
    let good = d.join("good.toml");
    std::fs::copy(&lb.config, &good).unwrap();
    lb.write_config(&format!("{config}\nbogus = 1\n"));
    let copy = lb.copy_binary();
    let (ok, _, err) = tokio::task::block_in_place(|| lb.upgrade_with(&good, Some(&copy)));
    assert!(!ok);
    assert!(err.contains("bogus"), "the reason is printed: {err}");

    // A new process that fails after the old one released its store:
    // its new listener's address is taken.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let extra = format!(
        "{config}\n[[pool]]\nname = \"p\"\nbackends = [{{ address = \"127.0.0.1:9\" }}]\n\n[[listener]]\nname = \"taken\"\nbind = \"{}\"\nmode = \"tcp\"\npool = \"p\"\n",
        taken.local_addr().unwrap()
    );
    lb.write_config(&extra);
    let (ok, _, err) = tokio::task::block_in_place(|| lb.upgrade(Some(&copy)));
    assert!(!ok);
    assert!(err.contains("cannot bind"), "{err}");
    let log = lb.log_text();
    assert!(log.contains("devices: SQLite store released"), "{log}");
    assert!(log.contains("devices: SQLite store reopened"), "{log}");

    // The old process still serves, with its store: enrolment writes.
    assert_eq!(lb.old.try_wait().unwrap(), None);
    let second = fleet.enrol("second").await;
    let (s, list) = fleet.admin("GET", "devices", None).await;
    assert_eq!(s, 200, "{list}");
    let text = list.to_string();
    assert!(
        text.contains(&first.id) && text.contains(&second.id),
        "{text}"
    );
    // Its command channels deliver again.
    let mut ws = fleet.channel(&second).await.unwrap();
    let (s, c) = fleet
        .admin(
            "POST",
            &format!("devices/{}/commands", second.id),
            Some(json!({"kind": "reboot"})),
        )
        .await;
    assert_eq!(s, 201, "{c}");
    let got = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    let Ok(Some(Ok(Message::Text(t)))) = got else {
        panic!("no command: {got:?}")
    };
    assert!(t.contains(c["id"].as_str().unwrap()), "{t}");

    // And its control socket answers: a good upgrade goes through.
    lb.write_config(&config);
    let (ok, out, err) = tokio::task::block_in_place(|| lb.upgrade(Some(&copy)));
    assert!(ok, "{out}{err}\n{}", lb.log_text());
    assert_ne!(new_pid(&out), Some(old_pid));
}

/// SIGUSR2 upgrades to the executable the process was started from; the
/// old process tells systemd the new main pid, and the new one says
/// READY=1 only after that (systemd accepts it from the main pid only).
#[test]
fn sigusr2_upgrades_and_systemd_follows_the_new_main_pid() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let notify = d.join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let l4 = free_addr();
    let config = format!(
        "[global]\ndrain_timeout = \"2s\"\n\n[admin]\nbind = \"{{admin}}\"\n\n[[pool]]\nname = \"p\"\nbackends = [{{ address = \"127.0.0.1:9\" }}]\n\n[[listener]]\nname = \"l4\"\nbind = \"{l4}\"\nmode = \"tcp\"\npool = \"p\"\n"
    );
    let mut lb = Balancer::start_env(d, &config, &[("NOTIFY_SOCKET", &notify)]);
    let old = lb.old.id();
    let mut notes: Vec<String> = Vec::new();
    let next = |notes: &mut Vec<String>, want: &dyn Fn(&str) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = sock.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                notes.push(text.clone());
                if text.lines().any(want) {
                    return text;
                }
            }
        }
        panic!("not received; got {notes:?}");
    };
    next(&mut notes, &|l| l == "READY=1");
    let ok = Command::new("kill")
        .args(["-USR2", &old.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let main = next(&mut notes, &|l| l.starts_with("MAINPID="));
    let new: u32 = main
        .lines()
        .find_map(|l| l.strip_prefix("MAINPID="))
        .unwrap()
        .parse()
        .unwrap();
    lb.new_pids.push(new);
    assert_ne!(new, old);
    next(&mut notes, &|l| l == "READY=1");
    assert!(
        lb.old_exited_within(Duration::from_secs(3)),
        "{}",
        lb.log_text()
    );
    assert!(alive(new));
    // The new process accepts on the inherited sockets, admin included.
    lb.wait_healthy();
    std::net::TcpStream::connect(l4).expect("the L4 listener accepts");
    let log = lb.log_text();
    assert!(log.contains("SIGUSR2: upgrading"), "{log}");
    assert!(
        !notes.iter().any(|n| n.contains("STOPPING=1")),
        "the old process said nothing more: {notes:?}"
    );
}
