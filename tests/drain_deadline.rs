//! Every stop ends within `drain_timeout` plus a small bound, whatever the
//! peers do: clients that never read, backends that never answer, TLS
//! handshakes and request heads left half-sent, a WebSocket whose client
//! floods without reading, a passthrough ClientHello cut short. Each of
//! these holds a connection (or a write) open forever on its own; the
//! drain must give up on them at its deadline and the process must exit.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::pki::{client_config, Ca};
use common::web::{tls_connect, websocket_backend};
use common::*;
use futures_util::SinkExt;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// The bound the process gets after `drain_timeout` to stop its modules,
/// flush its logs and exit.
const GRACE: Duration = Duration::from_secs(1);

/// A backend that accepts and then neither reads nor writes: its receive
/// window fills and requests sent to it are never answered.
fn mute_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    thread::spawn(move || {
        for c in listener.incoming().flatten() {
            held.lock().unwrap().push(c);
        }
    });
    addr
}

/// A backend that answers every connection with an endless HTTP body (and
/// keeps writing endless bytes to an L4 peer).
fn flood_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for c in listener.incoming().flatten() {
            thread::spawn(move || flood(c));
        }
    });
    addr
}

fn flood(mut c: TcpStream) {
    let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000000\r\n\r\n");
    let chunk = vec![b'x'; 64 * 1024];
    while c.write_all(&chunk).is_ok() {}
}

/// Write to `s` until the write blocks for good (the peer never reads),
/// in a thread of its own; the stream stays open until the test ends.
fn write_forever(mut s: TcpStream) {
    thread::spawn(move || {
        let _ = s.set_write_timeout(Some(Duration::from_secs(60)));
        let chunk = vec![b'y'; 64 * 1024];
        while s.write_all(&chunk).is_ok() {}
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stop_ends_at_the_drain_deadline_whatever_the_peers_do() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new(d, "server");
    let server = ca.server(d, "server", &["device.example"]);
    let (mute, flooder, ws) = (mute_backend(), flood_backend(), websocket_backend().await);
    let (l4, l4_flood, offload, passthrough) = (free_addr(), free_addr(), free_addr(), free_addr());
    let config = format!(
        r#"[global]
drain_timeout = "{}s"

[admin]
bind = "{{admin}}"

[[listener]]
name = "l4"
bind = "{l4}"
mode = "tcp"
pool = "mute"

[[listener]]
name = "l4-flood"
bind = "{l4_flood}"
mode = "tcp"
pool = "flood"

[[listener]]
name = "pass"
bind = "{passthrough}"
mode = "passthrough"
pool = "mute"

[[listener]]
name = "offload"
bind = "{offload}"
mode = "offload"
tls = {{ cert = "{}", key = "{}" }}

  [[listener.route]]
  path_prefix = "/hang"
  pool = "mute"

  [[listener.route]]
  path_prefix = "/big"
  pool = "flood"

  [[listener.route]]
  path_prefix = "/ws"
  pool = "ws"

[[pool]]
name = "mute"
backends = [{{ address = "{mute}" }}]

[[pool]]
name = "flood"
backends = [{{ address = "{flooder}" }}]

[[pool]]
name = "ws"
backends = [{{ address = "{ws}" }}]
"#,
        DRAIN_TIMEOUT.as_secs(),
        server.cert_path.display(),
        server.key_path.display(),
    );
    let mut lb = tokio::task::spawn_blocking(move || Balancer::start(&config))
        .await
        .unwrap();
    let client = client_config(&ca, None, &[b"http/1.1"]);
    let mut held: Vec<Box<dyn std::any::Any + Send>> = Vec::new();

    // L4: a client writing to a backend that never reads, and a client
    // that never reads what a backend floods it with.
    write_forever(TcpStream::connect(l4).unwrap());
    held.push(Box::new(TcpStream::connect(l4_flood).unwrap()));

    // Passthrough: a ClientHello cut after its record header.
    let mut cut = TcpStream::connect(passthrough).unwrap();
    cut.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).unwrap();
    held.push(Box::new(cut));

    // Offload: a TCP connection that never starts its handshake; a request
    // head never finished; a request to a backend that never answers; a
    // response body the client never reads.
    held.push(Box::new(TcpStream::connect(offload).unwrap()));
    let mut half = tls_connect(offload, "device.example", client.clone())
        .await
        .unwrap();
    half.write_all(b"GET / HTTP/1.1\r\nHost: device.example\r\n")
        .await
        .unwrap();
    held.push(Box::new(half));
    for path in ["/hang", "/big"] {
        let mut s = tls_connect(offload, "device.example", client.clone())
            .await
            .unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: device.example\r\n\r\n").as_bytes())
            .await
            .unwrap();
        s.flush().await.unwrap();
        held.push(Box::new(s));
    }

    // A WebSocket whose client sends without ever reading: the echoes
    // back up, and the drain's Close frame is never answered.
    let tls = tls_connect(offload, "device.example", client.clone())
        .await
        .unwrap();
    let (mut socket, _) = tokio_tungstenite::client_async("wss://device.example/ws", tls)
        .await
        .expect("WebSocket upgrade through the balancer");
    let flooding = tokio::spawn(async move {
        let payload = "z".repeat(16 * 1024);
        while socket.send(Message::text(payload.clone())).await.is_ok() {}
        socket
    });

    // Let every connection reach its stuck state: the backends' and the
    // clients' buffers fill.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        open_connections(&lb) >= 8.0,
        "the stuck connections are open before the stop:\n{}",
        lb.metrics()
    );

    let sent = Instant::now();
    lb.signal("TERM");
    // While it drains, the process tells health checkers to look elsewhere.
    let admin = lb.admin;
    let health = tokio::task::spawn_blocking(move || {
        let mut last = String::new();
        let draining = eventually(Duration::from_secs(1), || {
            last = http_get(admin, "/healthz").unwrap_or_default();
            last.starts_with("HTTP/1.1 503")
        });
        (draining, last)
    })
    .await
    .unwrap();
    assert!(health.0, "/healthz while draining: {}", health.1);
    assert!(health.1.ends_with("draining\n"), "{}", health.1);
    let status = tokio::task::spawn_blocking(move || {
        let status = lb.wait_exit(Duration::from_secs(30));
        (status, lb)
    })
    .await
    .unwrap();
    let took = sent.elapsed();
    let (status, _lb) = status;
    let status = status.expect("the process exits");
    eprintln!("stopped in {took:.2?} (drain_timeout {DRAIN_TIMEOUT:?})");
    assert!(status.success(), "exit status {status:?}");
    assert!(
        took >= DRAIN_TIMEOUT.mul_f64(0.9),
        "the stuck connections were waited for until the deadline, took {took:?}"
    );
    assert!(
        took <= DRAIN_TIMEOUT + GRACE,
        "the stop took {took:?}, more than drain_timeout {DRAIN_TIMEOUT:?} + {GRACE:?}"
    );
    flooding.abort();
    drop(held);
}

/// Connections open across every listener, from the per-listener gauges
/// (an upgraded WebSocket counts as an upgraded stream).
fn open_connections(lb: &Balancer) -> f64 {
    lb.metrics()
        .lines()
        .filter(|l| {
            l.starts_with("fleetgate_connections_active{")
                || l.starts_with("fleetgate_http_upgraded_streams_active{")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_stop_with_nothing_open_is_immediate() {
    let front = free_addr();
    let backend = mute_backend();
    let config = tcp_config(front, "round_robin", &[(backend, 1)], "")
        .replace("[admin]", "[global]\ndrain_timeout = \"30s\"\n\n[admin]");
    let mut lb = Balancer::start(&config);
    let sent = Instant::now();
    lb.signal("TERM");
    let status = lb.wait_exit(Duration::from_secs(30)).expect("exits");
    assert!(status.success());
    let took = sent.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "nothing open: the 30 s drain is not waited out (took {took:?})"
    );
    assert!(
        TcpStream::connect(front).is_err(),
        "the listener is closed after the exit"
    );
}
