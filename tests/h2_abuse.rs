//! HTTP/2 abuse against the real binary, with raw frames over TLS (ALPN
//! h2): rapid reset (HEADERS then RST_STREAM, repeated), a CONTINUATION
//! flood and a SETTINGS flood. Each attacking connection must be closed,
//! the balancer's memory must stay bounded, and other clients must be
//! served meanwhile.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::pki::{client_config, Ca};
use common::web::{echo_backend, https_get, tls_connect};
use common::{free_addr, Balancer};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// GET https://localhost/ in HPACK, static-table indexes and one literal.
fn get_block() -> Vec<u8> {
    let mut b = vec![0x82, 0x87, 0x84, 0x41, 9];
    b.extend_from_slice(b"localhost");
    b
}

struct Fixture {
    _dir: tempfile::TempDir,
    server_ca: Ca,
    lb: Balancer,
    front: SocketAddr,
}

impl Fixture {
    async fn start() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let server_ca = Ca::new(d, "server");
        let server = server_ca.server(d, "server", &["localhost"]);
        let echo = echo_backend("echo", None).await;
        let front = free_addr();
        let config = format!(
            r#"[admin]
bind = "{{admin}}"

[[listener]]
name = "front"
bind = "{front}"
mode = "offload"
pool = "p"
tls = {{ cert = "{}", key = "{}" }}

[[pool]]
name = "p"
backends = [{{ address = "{echo}" }}]
"#,
            server.cert_path.display(),
            server.key_path.display(),
        );
        let lb = tokio::task::spawn_blocking(move || Balancer::start(&config))
            .await
            .unwrap();
        Fixture {
            _dir: dir,
            server_ca,
            lb,
            front,
        }
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.lb.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// An HTTP/2 connection past the preface and an empty SETTINGS.
    async fn attacker(&self) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let tls = client_config(&self.server_ca, None, &[b"h2"]);
        let mut s = tls_connect(self.front, "localhost", tls).await.unwrap();
        assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        s.write_all(PREFACE).await.unwrap();
        s.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
        s
    }

    /// Send `batch()` until the balancer stops taking it or `rounds` run
    /// out, reading (and dropping) what it sends meanwhile; true if the
    /// connection was then closed by the balancer within a bounded time.
    async fn attack(&self, rounds: usize, mut batch: impl FnMut(usize) -> Vec<u8>) -> bool {
        let s = self.attacker().await;
        let (mut r, mut w) = tokio::io::split(s);
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match r.read(&mut buf).await {
                    Ok(0) | Err(_) => return true,
                    Ok(_) => {}
                }
            }
        });
        for i in 0..rounds {
            let sent = tokio::time::timeout(Duration::from_secs(10), w.write_all(&batch(i))).await;
            if !matches!(sent, Ok(Ok(()))) {
                break;
            }
        }
        let _ = w.flush().await;
        matches!(
            tokio::time::timeout(Duration::from_secs(20), reader).await,
            Ok(Ok(true))
        )
    }

    /// An ordinary client gets its answer, over HTTP/1.1 and HTTP/2.
    async fn served(&self) {
        let tls = client_config(&self.server_ca, None, &[b"http/1.1"]);
        let (code, body) = https_get(self.front, "localhost", tls, "/", &[])
            .await
            .unwrap();
        assert_eq!(code, 200, "{body}");
        let tls = client_config(&self.server_ca, None, &[b"h2"]);
        let stream = tls_connect(self.front, "localhost", tls).await.unwrap();
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::get("https://localhost/")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
    }

    /// Run `attacks` connections of one kind while ordinary clients are
    /// served; every attacking connection must end.
    async fn under_attack<F>(self: &Arc<Self>, attacks: usize, make: F)
    where
        F: Fn(&Arc<Fixture>) -> tokio::task::JoinHandle<bool>,
    {
        let handles: Vec<_> = (0..attacks).map(|_| make(self)).collect();
        for _ in 0..5 {
            self.served().await;
        }
        for h in handles {
            assert!(h.await.unwrap(), "an attacking connection was left open");
        }
        self.served().await;
    }
}

fn rapid_reset(f: &Arc<Fixture>) -> tokio::task::JoinHandle<bool> {
    let f = f.clone();
    tokio::spawn(async move {
        let block = get_block();
        f.attack(500, |i| {
            let mut out = Vec::new();
            for k in 0..100u32 {
                let id = 1 + 2 * (i as u32 * 100 + k);
                out.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, &block));
                out.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
            }
            out
        })
        .await
    })
}

fn continuation_flood(f: &Arc<Fixture>) -> tokio::task::JoinHandle<bool> {
    let f = f.clone();
    tokio::spawn(async move {
        f.attack(500, |i| {
            let mut out = Vec::new();
            if i == 0 {
                // A header block that is never ended.
                out.extend(frame(HEADERS, END_STREAM, 1, &get_block()));
            }
            for _ in 0..200 {
                out.extend(frame(CONTINUATION, 0, 1, &[0x40, 1, b'a', 1, b'b']));
            }
            out
        })
        .await
    })
}

fn settings_flood(f: &Arc<Fixture>) -> tokio::task::JoinHandle<bool> {
    let f = f.clone();
    tokio::spawn(async move {
        f.attack(500, |_| {
            let mut out = Vec::new();
            for _ in 0..200 {
                // SETTINGS_MAX_CONCURRENT_STREAMS = 100, again and again.
                out.extend(frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]));
            }
            out
        })
        .await
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_end_their_connection_and_others_are_served() {
    let f = Arc::new(Fixture::start().await);
    f.served().await;
    let before = f.rss_kib();

    f.under_attack(4, rapid_reset).await;
    f.under_attack(4, continuation_flood).await;
    f.under_attack(4, settings_flood).await;

    let closed = f.lb.metric(
        "fleetgate_http2_connections_closed_total{listener=\"front\",reason=\"control_frames\"}",
    );
    assert!(
        closed >= 4.0,
        "SETTINGS floods closed by the budget: {closed}"
    );
    let after = f.rss_kib();
    eprintln!("RSS before {before} KiB, after {after} KiB");
    assert!(
        after < before + 20 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
}
