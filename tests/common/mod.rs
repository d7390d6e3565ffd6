//! Test support: run the real `fleetgate` binary on a temporary config,
//! and small real backends (TCP servers) for it to balance over.
#![allow(dead_code)]

pub mod devices;
pub mod discovery;
pub mod live;
pub mod netns;
pub mod pg;
pub mod pki;
pub mod web;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// A port on 127.0.0.1 that is free now and that the kernel will not hand
/// out on its own: it comes from below the ephemeral range (32768 and up on
/// Linux), so a later `bind(":0")` or an outgoing connection in another test
/// cannot take it between this call and the balancer binding it. Each test
/// process walks the range from its own pid-derived start, and a port is
/// only returned when both its TCP and UDP sides bind.
pub fn free_port() -> u16 {
    const FIRST: u32 = 10_000;
    const SPAN: u32 = 22_000; // up to 31_999
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let start = std::process::id().wrapping_mul(7_919) % SPAN;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed) as u32;
        let port = (FIRST + (start + n) % SPAN) as u16;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if TcpListener::bind(addr).is_ok() && std::net::UdpSocket::bind(addr).is_ok() {
            return port;
        }
    }
}

pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A running `fleetgate run` process; killed on drop.
pub struct Balancer {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub admin: SocketAddr,
}

impl Balancer {
    /// Start fleetgate on `config` (TOML text; `{admin}` is replaced by a
    /// free admin address) and wait until its admin port answers.
    pub fn start(config: &str) -> Balancer {
        Self::start_with(config, &[])
    }

    /// Like `start`, with a command prefix such as `["prlimit", "--nofile=64"]`.
    pub fn start_with(config: &str, prefix: &[&str]) -> Balancer {
        let dir = tempfile::tempdir().unwrap();
        let admin = free_addr();
        let path = dir.path().join("fleetgate.toml");
        std::fs::write(&path, config.replace("{admin}", &admin.to_string())).unwrap();
        let bin = env!("CARGO_BIN_EXE_fleetgate");
        let mut cmd = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = cmd
            .arg("run")
            .arg("-c")
            .arg(&path)
            .env(
                "RUST_LOG",
                std::env::var("FLEETGATE_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn fleetgate");
        let b = Balancer {
            child,
            dir,
            config: path,
            admin,
        };
        b.wait_ready();
        b
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(body) = http_get(self.admin, "/healthz") {
                if body.starts_with("HTTP/1.1 200") {
                    return;
                }
            }
            thread::sleep(Duration::from_millis(20));
        }
        panic!("fleetgate did not become ready on {}", self.admin);
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Replace the config file (same `{admin}` substitution) without reloading.
    pub fn write_config(&self, config: &str) {
        std::fs::write(
            &self.config,
            config.replace("{admin}", &self.admin.to_string()),
        )
        .unwrap();
    }

    /// The Prometheus text from `/metrics`.
    pub fn metrics(&self) -> String {
        let resp = http_get(self.admin, "/metrics").expect("GET /metrics");
        resp.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default()
    }

    /// The value of one series, e.g. `fleetgate_connections_accepted_total{listener="x"}`.
    pub fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics(), series)
    }

    /// Wait for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of `series` (`name{a="x",b="y"}`, labels in any order) in a
/// Prometheus text exposition; 0 when the series has not appeared yet.
pub fn metric_value(text: &str, series: &str) -> f64 {
    let key = |s: &str| -> (String, Vec<String>) {
        let (name, labels) = s.split_once('{').unwrap_or((s, ""));
        let mut l: Vec<String> = labels
            .trim_end_matches('}')
            .split("\",")
            .filter(|x| !x.is_empty())
            .map(|x| x.trim_end_matches('"').to_string())
            .collect();
        l.sort();
        (name.to_string(), l)
    };
    let want = key(series);
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (s, v) = l.rsplit_once(' ')?;
            (key(s) == want).then(|| v.trim().parse().unwrap())
        })
        .unwrap_or(0.0)
}

/// A minimal blocking HTTP/1.1 GET; returns the whole response text.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// A backend that answers every connection with its name and a newline,
/// then closes; counts the connections it served.
pub struct NamedBackend {
    pub addr: SocketAddr,
    pub served: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl NamedBackend {
    pub fn start(name: &str) -> NamedBackend {
        // Bind here rather than trust a port `free_port` found free: a
        // port can be taken between that check and this bind, and here a
        // taken port costs only another try.
        loop {
            match TcpListener::bind(free_addr()) {
                Ok(listener) => return Self::serve(name, listener),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
                Err(e) => panic!("test backend bind: {e}"),
            }
        }
    }

    pub fn start_on(name: &str, addr: SocketAddr) -> NamedBackend {
        Self::serve(name, TcpListener::bind(addr).unwrap())
    }

    fn serve(name: &str, listener: TcpListener) -> NamedBackend {
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let served = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, st2, name) = (served.clone(), stop.clone(), format!("{name}\n"));
        let handle = thread::spawn(move || {
            while !st2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut c, _)) => {
                        s2.fetch_add(1, Ordering::Relaxed);
                        let _ = c.set_nonblocking(false);
                        let _ = c.write_all(name.as_bytes());
                    }
                    Err(_) => thread::sleep(Duration::from_millis(1)),
                }
            }
            // Serve what is already queued so that stopping looks like a
            // closed port to new connects, not a reset to accepted ones.
            while let Ok((mut c, _)) = listener.accept() {
                s2.fetch_add(1, Ordering::Relaxed);
                let _ = c.set_nonblocking(false);
                let _ = c.write_all(name.as_bytes());
            }
        });
        NamedBackend {
            addr,
            served,
            stop,
            handle: Some(handle),
        }
    }

    pub fn served(&self) -> usize {
        self.served.load(Ordering::Relaxed)
    }

    /// Close the listening socket: later connects are refused.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().unwrap();
        }
    }
}

impl Drop for NamedBackend {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Connect through the balancer and read the backend's name.
pub fn ask(front: SocketAddr) -> std::io::Result<String> {
    ask_from(front, None)
}

/// Like `ask`, from a chosen source address (any 127.x.y.z works on Linux).
pub fn ask_from(front: SocketAddr, source: Option<std::net::IpAddr>) -> std::io::Result<String> {
    let mut s = match source {
        None => TcpStream::connect_timeout(&front, Duration::from_secs(3))?,
        Some(ip) => {
            let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            sock.bind(&SocketAddr::new(ip, 0).into())?;
            sock.connect_timeout(&front.into(), Duration::from_secs(3))?;
            sock.into()
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out.trim().to_string())
}

/// Wait until `cond` holds or `timeout` passes.
pub fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// Wait until something accepts on `addr`.
pub fn wait_listening(addr: SocketAddr) {
    assert!(
        eventually(Duration::from_secs(10), || TcpStream::connect(addr).is_ok()),
        "{addr} never accepted"
    );
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A one-pool TCP config: `{admin}` stays for `Balancer::start`.
pub fn tcp_config(
    front: SocketAddr,
    algorithm: &str,
    backends: &[(SocketAddr, u32)],
    extra_pool: &str,
) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|(a, w)| format!("{{ address = \"{a}\", weight = {w} }}"))
        .collect();
    format!(
        r#"[admin]
bind = "{{admin}}"

[[listener]]
name = "front"
bind = "{front}"
mode = "tcp"
pool = "p"

[[pool]]
name = "p"
algorithm = "{algorithm}"
backends = [{}]
{extra_pool}
"#,
        list.join(", ")
    )
}

/// A backend that answers its name and then keeps the connection open
/// until the client closes; `open()` counts connections still open.
pub struct HoldingBackend {
    pub addr: SocketAddr,
    open: Arc<AtomicUsize>,
}

impl HoldingBackend {
    pub fn start(name: &str) -> HoldingBackend {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicUsize::new(0));
        let (o, name) = (open.clone(), format!("{name}\n"));
        thread::spawn(move || {
            for c in listener.incoming() {
                let Ok(mut c) = c else { continue };
                let o = o.clone();
                let name = name.clone();
                o.fetch_add(1, Ordering::SeqCst);
                thread::spawn(move || {
                    let _ = c.write_all(name.as_bytes());
                    let mut buf = [0u8; 1024];
                    while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        HoldingBackend { addr, open }
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

/// A tiny HTTP/1.1 server: every request gets `status` (changeable at run
/// time) with its name as the body. Stands for a management server whose
/// port stays open while its application is stopped.
pub struct HttpBackend {
    pub addr: SocketAddr,
    status: Arc<std::sync::atomic::AtomicU16>,
}

impl HttpBackend {
    pub fn start(name: &str) -> HttpBackend {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let status = Arc::new(std::sync::atomic::AtomicU16::new(200));
        let (st, name) = (status.clone(), name.to_string());
        thread::spawn(move || {
            for c in listener.incoming() {
                let Ok(mut c) = c else { continue };
                let (st, name) = (st.clone(), name.clone());
                thread::spawn(move || {
                    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut req = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match c.read(&mut buf) {
                            Ok(n) if n > 0 => req.extend_from_slice(&buf[..n]),
                            _ => return,
                        }
                    }
                    let code = st.load(Ordering::SeqCst);
                    let _ = write!(
                        c,
                        "HTTP/1.1 {code} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{name}",
                        name.len()
                    );
                });
            }
        });
        HttpBackend { addr, status }
    }

    pub fn set_status(&self, code: u16) {
        self.status.store(code, Ordering::SeqCst);
    }
}

/// GET / through the balancer; returns (status, body).
pub fn http_ask(front: SocketAddr) -> std::io::Result<(u16, String)> {
    let text = http_get(front, "/")?;
    let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}
