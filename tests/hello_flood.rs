//! ClientHellos that declare a huge handshake message, sent to the real
//! binary on an offload and a passthrough listener: each is refused at
//! once and counted, the process's memory does not grow with what they
//! declare, and normal clients are served throughout.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::pki::{client_config, server_config, Ca};
use common::web::{echo_backend, https_get, tls_connect};
use common::*;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const OFFLOAD: &str = "hello-offload";
const PASSTHROUGH: &str = "hello-passthrough";
/// Handshake lengths the hellos declare: just past 64 KiB (the most rustls
/// takes), 1 MiB, a random-looking 12 MB, and the 24-bit maximum.
const DECLARED: [u32; 4] = [0x1_0000, 0x10_0000, 0xb7_01fc, 0xff_ffff];
/// Growth of the resident set allowed after the hellos: far below what
/// any of them declares, above the noise of a warmed-up process.
const RSS_SLACK_KIB: u64 = 1024;
const WAIT: Duration = Duration::from_secs(10);

struct Fixture {
    _dir: tempfile::TempDir,
    ca: Ca,
    lb: Balancer,
    offload: SocketAddr,
    passthrough: SocketAddr,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new(d, "hello");
    let front = ca.server(d, "front", &["front.example"]);
    let back = ca.server(d, "back", &["back.example"]);
    let plain = echo_backend("plain", None).await;
    let tls = echo_backend("tls", Some(server_config(&back, false))).await;
    let offload = free_addr();
    let passthrough = free_addr();
    let config = format!(
        r#"[admin]
bind = "{{admin}}"

[[listener]]
name = "{OFFLOAD}"
bind = "{offload}"
mode = "offload"
pool = "plain"
tls = {{ cert = "{}", key = "{}" }}

[[listener]]
name = "{PASSTHROUGH}"
bind = "{passthrough}"
mode = "passthrough"
pool = "tls"

[[pool]]
name = "plain"
backends = [{{ address = "{plain}" }}]

[[pool]]
name = "tls"
backends = [{{ address = "{tls}" }}]
"#,
        front.cert_path.display(),
        front.key_path.display(),
    );
    // Backtraces on, as many service units have them: a panic on the
    // handshake path then also symbolizes the binary's debug info, which
    // stays resident.
    let lb = tokio::task::spawn_blocking(move || {
        Balancer::start_with(&config, &["env", "RUST_BACKTRACE=1"])
    })
    .await
    .unwrap();
    Fixture {
        _dir: dir,
        ca,
        lb,
        offload,
        passthrough,
    }
}

impl Fixture {
    fn client(&self) -> Arc<rustls::ClientConfig> {
        client_config(&self.ca, None, &[b"http/1.1"])
    }

    /// One complete request through each listener.
    async fn normal_clients_work(&self) {
        let (status, _) = tokio::time::timeout(
            WAIT,
            https_get(self.offload, "front.example", self.client(), "/x", &[]),
        )
        .await
        .expect("offload request in time")
        .expect("offload request");
        assert_eq!(status, 200);
        let mut tls = tokio::time::timeout(
            WAIT,
            tls_connect(self.passthrough, "back.example", self.client()),
        )
        .await
        .expect("passthrough handshake in time")
        .expect("passthrough handshake");
        tls.write_all(b"GET /y HTTP/1.1\r\nhost: back.example\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut resp = Vec::new();
        let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut resp)).await;
        assert!(
            resp.starts_with(b"HTTP/1.1 200"),
            "passthrough answer: {}",
            String::from_utf8_lossy(&resp)
        );
    }

    fn rejected(&self, listener: &str) -> f64 {
        self.lb.metric(&format!(
            "fleetgate_tls_client_hello_rejected_total{{listener=\"{listener}\",reason=\"too_large\"}}"
        ))
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.lb.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// The resident set once the process has settled after a burst.
    async fn settled_rss_kib(&self) -> u64 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.rss_kib()
    }
}

/// A real rustls ClientHello whose handshake length (bytes 6..9 of the
/// record) is overwritten with `declared`.
fn lying_hello(declared: u32) -> Vec<u8> {
    let config = rustls::ClientConfig::builder_with_provider(common::pki::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = ServerName::try_from("front.example").unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).unwrap();
    }
    assert_eq!(hello[5], 0x01, "a ClientHello");
    hello[6..9].copy_from_slice(&declared.to_be_bytes()[1..]);
    hello
}

/// Send `hello` and wait until the balancer closes the connection (the
/// client keeps its side open: the close must come from the balancer).
async fn send_and_expect_close(addr: SocketAddr, hello: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(hello).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
            Err(_) => panic!("{addr}: connection not closed within {WAIT:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

async fn warm_up(f: &Fixture) {
    for _ in 0..3 {
        f.normal_clients_work().await;
    }
    // As many handshakes at once as the burst below sends hellos, so that
    // the allocator already holds what 50 connections need.
    let mut tasks = Vec::new();
    for (addr, name) in [
        (f.offload, "front.example"),
        (f.passthrough, "back.example"),
    ] {
        for _ in 0..50 {
            let client = f.client();
            tasks.push(tokio::spawn(async move {
                tokio::time::timeout(WAIT, tls_connect(addr, name, client))
                    .await
                    .expect("warm-up handshake in time")
                    .expect("warm-up handshake")
            }));
        }
    }
    // All 100 connections are open at once before any closes.
    let mut open = Vec::new();
    for t in tasks {
        open.push(t.await.unwrap());
    }
    drop(open);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_hellos_are_refused_without_memory_growth() {
    let f = fixture().await;
    warm_up(&f).await;
    // Every case runs; the figures and what went wrong are reported together.
    let mut figures = Vec::new();
    let mut wrong = Vec::new();

    for (listener, addr) in [(OFFLOAD, f.offload), (PASSTHROUGH, f.passthrough)] {
        for declared in DECLARED {
            let case = format!("{listener}, declared {declared:#x}");
            let before_count = f.rejected(listener);
            let before = f.settled_rss_kib().await;
            let answer = send_and_expect_close(addr, &lying_hello(declared)).await;
            let after = f.settled_rss_kib().await;
            figures.push(format!("{case}: RSS {before} -> {after} KiB"));
            if after >= before + RSS_SLACK_KIB {
                wrong.push(format!("{case}: RSS grew {before} -> {after} KiB"));
            }
            if f.rejected(listener) != before_count + 1.0 {
                wrong.push(format!("{case}: not counted as too_large"));
            }
            // Offload answers with a fatal decode_error alert.
            if listener == OFFLOAD && answer != [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x32] {
                wrong.push(format!("{case}: answer {answer:02x?}, not decode_error"));
            }
        }

        let case = format!("{listener}, 50 at once");
        let before_count = f.rejected(listener);
        let before = f.settled_rss_kib().await;
        let mut burst = Vec::new();
        for i in 0..50 {
            let hello = lying_hello(DECLARED[i % DECLARED.len()]);
            burst.push(tokio::spawn(async move {
                send_and_expect_close(addr, &hello).await
            }));
        }
        for b in burst {
            b.await.unwrap();
        }
        let after = f.settled_rss_kib().await;
        figures.push(format!("{case}: RSS {before} -> {after} KiB"));
        if after >= before + RSS_SLACK_KIB {
            wrong.push(format!("{case}: RSS grew {before} -> {after} KiB"));
        }
        if f.rejected(listener) != before_count + 50.0 {
            wrong.push(format!("{case}: not all counted as too_large"));
        }
    }

    f.normal_clients_work().await;
    println!("{}", figures.join("\n"));
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
