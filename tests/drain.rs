//! The graceful drain through the real binary (SIGTERM with `kill`):
//! idle keep-alive connections close at once, a request in flight
//! finishes with `Connection: close`, HTTP/2 gets GOAWAY, proxied
//! WebSockets and the devices module's command channels get a Close
//! 1001 "going away", and the process exits as soon as all of that is
//! done rather than at `drain_timeout`.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pki::{client_config, Ca};
use common::web::{echo_backend, tls_connect};
use common::*;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

/// Generous: the drains here take well under a second, the timeout is
/// 20 s; only a drain that waits out its timeout fails this.
const EXITS_WITHIN: Duration = Duration::from_secs(10);

struct Fixture {
    _dir: tempfile::TempDir,
    server_ca: Ca,
    lb: Balancer,
    front: SocketAddr,
}

impl Fixture {
    fn client(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        client_config(&self.server_ca, None, alpn)
    }

    /// SIGTERM; the time until the process is gone.
    fn term_and_wait(&mut self) -> Duration {
        let sent = Instant::now();
        self.lb.signal("TERM");
        let status = self
            .lb
            .wait_exit(Duration::from_secs(30))
            .expect("the process exits");
        assert!(status.success(), "exit status {status:?}");
        sent.elapsed()
    }
}

/// An offload listener: `/slow` to a backend that answers after 2 s,
/// `/ws` to a WebSocket backend, the rest to an echo backend.
async fn fixture(drain_timeout: &str, ws_backend: SocketAddr) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server_ca = Ca::new(d, "server");
    let server = server_ca.server(d, "server", &["device.example"]);
    let echo = echo_backend("echo", None).await;
    let slow = slow_backend(Duration::from_secs(2)).await;
    let front = free_addr();
    let config = format!(
        r#"[global]
drain_timeout = "{drain_timeout}"

[admin]
bind = "{{admin}}"

[[listener]]
name = "front"
bind = "{front}"
mode = "offload"
tls = {{ cert = "{}", key = "{}" }}

  [[listener.route]]
  path_prefix = "/slow"
  pool = "slow"

  [[listener.route]]
  path_prefix = "/ws"
  pool = "ws"

  [[listener.route]]
  path_prefix = "/"
  pool = "echo"

[[pool]]
name = "echo"
backends = [{{ address = "{echo}" }}]

[[pool]]
name = "slow"
backends = [{{ address = "{slow}" }}]

[[pool]]
name = "ws"
backends = [{{ address = "{ws_backend}" }}]
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

/// An HTTP/1.1 backend answering "slow" after `delay`.
async fn slow_backend(delay: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    tokio::time::sleep(delay).await;
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from("slow"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

/// A WebSocket echo backend that reports the close code it receives.
async fn ws_backend() -> (SocketAddr, mpsc::UnboundedReceiver<Option<CloseCode>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if let Message::Close(frame) = msg {
                        let _ = tx.send(frame.map(|f| f.code));
                        // tungstenite answers the Close; the stream then ends.
                        while ws.next().await.is_some() {}
                        return;
                    }
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// One HTTP/1.1 response with a Content-Length body; returns (head in
/// lower case, body).
async fn read_response<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> (String, String) {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .expect("content-length");
            while buf.len() < end + 4 + len {
                read_more(s, buf).await;
            }
            let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
            buf.drain(..end + 4 + len);
            return (head, body);
        }
        read_more(s, buf).await;
    }
}

async fn read_more<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) {
    let mut chunk = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
        .await
        .expect("response in time")
        .unwrap();
    assert!(n > 0, "closed before a whole response");
    buf.extend_from_slice(&chunk[..n]);
}

/// Until the peer closes; what it sent meanwhile (a TLS close_notify or
/// a bare FIN both count as closed).
async fn read_until_closed<S: AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
    let mut rest = Vec::new();
    let read = tokio::time::timeout(EXITS_WITHIN, s.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the connection was not closed");
    rest
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: device.example\r\n\r\n")
}

/// (a) A keep-alive connection idle after its response does not hold the
/// process for `drain_timeout`: it is closed at once.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_keep_alive_connection_closes_and_the_process_exits_early() {
    let (ws, _) = ws_backend().await;
    let mut f = fixture("20s", ws).await;
    let mut s = tls_connect(f.front, "device.example", f.client(&[b"http/1.1"]))
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.write_all(get("/one").as_bytes()).await.unwrap();
    let (head, _) = read_response(&mut s, &mut buf).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    // Long enough for the connection to be put away between requests.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let took = tokio::task::block_in_place(|| f.term_and_wait());
    assert!(took < EXITS_WITHIN, "the drain took {took:?}");
    let rest = read_until_closed(&mut s).await;
    assert!(rest.is_empty(), "unexpected bytes: {rest:?}");
}

/// (b) A request in flight when the drain starts gets its response, which
/// says `Connection: close`; then the connection closes and the process
/// exits.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_in_flight_completes_with_connection_close() {
    let (ws, _) = ws_backend().await;
    let mut f = fixture("20s", ws).await;
    let mut s = tls_connect(f.front, "device.example", f.client(&[b"http/1.1"]))
        .await
        .unwrap();
    s.write_all(get("/slow").as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let lb = tokio::task::spawn_blocking(move || {
        let took = f.term_and_wait();
        (f, took)
    });
    let mut buf = Vec::new();
    let (head, body) = read_response(&mut s, &mut buf).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(body, "slow");
    let rest = read_until_closed(&mut s).await;
    assert!(rest.is_empty(), "unexpected bytes: {rest:?}");
    let (_f, took) = lb.await.unwrap();
    assert!(took < EXITS_WITHIN, "the drain took {took:?}");
}

/// (c) HTTP/2: the client gets GOAWAY (its connection ends cleanly and
/// takes no new request), and the request in flight completes.
#[tokio::test(flavor = "multi_thread")]
async fn http2_gets_goaway_and_its_stream_in_flight_completes() {
    use http_body_util::{BodyExt, Empty};
    let (ws, _) = ws_backend().await;
    let mut f = fixture("20s", ws).await;
    let tls = tls_connect(f.front, "device.example", f.client(&[b"h2"]))
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let req = hyper::Request::get("https://device.example/slow")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let in_flight = tokio::spawn(sender.send_request(req));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let lb = tokio::task::spawn_blocking(move || {
        let took = f.term_and_wait();
        (f, took)
    });
    let resp = in_flight
        .await
        .unwrap()
        .expect("the stream in flight completes");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"slow");
    let ended = tokio::time::timeout(EXITS_WITHIN, conn)
        .await
        .expect("the connection ends after GOAWAY")
        .unwrap();
    assert!(ended.is_ok(), "not a clean end: {ended:?}");
    let after = hyper::Request::get("https://device.example/")
        .body(Empty::<Bytes>::new())
        .unwrap();
    assert!(sender.send_request(after).await.is_err());
    let (_f, took) = lb.await.unwrap();
    assert!(took < EXITS_WITHIN, "the drain took {took:?}");
}

/// (d) A proxied WebSocket: the client gets a Close 1001 before the
/// drain deadline, so does the backend, and the process exits once both
/// close handshakes are done.
#[tokio::test(flavor = "multi_thread")]
async fn a_proxied_websocket_is_told_to_go_away_at_both_ends() {
    let (ws_addr, mut backend_closes) = ws_backend().await;
    let drain_timeout = Duration::from_secs(6);
    let mut f = fixture("6s", ws_addr).await;
    let tls = tls_connect(f.front, "device.example", f.client(&[b"http/1.1"]))
        .await
        .unwrap();
    let url = format!("wss://device.example:{}/ws", f.front.port());
    let (mut ws, resp) = tokio_tungstenite::client_async(url, tls)
        .await
        .expect("websocket upgrade");
    assert_eq!(resp.status().as_u16(), 101);
    ws.send(Message::text("before")).await.unwrap();
    let echoed = ws.next().await.unwrap().unwrap();
    assert_eq!(echoed.into_text().unwrap().as_str(), "before");

    let sent = Instant::now();
    let lb = tokio::task::spawn_blocking(move || {
        let took = f.term_and_wait();
        (f, took)
    });
    let close = loop {
        let msg = tokio::time::timeout(drain_timeout, ws.next())
            .await
            .expect("a message before the deadline")
            .expect("a Close before the end")
            .expect("no error before the Close");
        if let Message::Close(frame) = msg {
            break frame.expect("a close code");
        }
    };
    assert!(
        sent.elapsed() < drain_timeout,
        "closed at {:?}",
        sent.elapsed()
    );
    assert_eq!(close.code, CloseCode::Away);
    assert_eq!(close.reason.as_str(), "balancer draining, reconnect");
    // tungstenite answered the Close; the balancer then hangs up.
    let end = tokio::time::timeout(EXITS_WITHIN, ws.next())
        .await
        .expect("the stream ends");
    assert!(!matches!(end, Some(Ok(_))), "more after the Close: {end:?}");

    let backend_saw = tokio::time::timeout(EXITS_WITHIN, backend_closes.recv())
        .await
        .expect("the backend got a Close")
        .unwrap();
    assert_eq!(backend_saw, Some(CloseCode::Away));
    let (_f, took) = lb.await.unwrap();
    assert!(took < drain_timeout, "the drain took {took:?}");
}

/// (e) The devices module's command channel gets a Close 1001, and the
/// drain ends once it is closed. The module runs in-process here (as the
/// devices tests run it): the drain is the one SIGTERM starts.
#[tokio::test(flavor = "multi_thread")]
async fn a_command_channel_is_told_to_go_away() {
    use common::devices::DevicesLb;
    let dir = tempfile::tempdir().unwrap();
    let lb = DevicesLb::start(dir.path(), "").await;
    let device = lb.enrol("drain-1").await;
    let mut channel = lb.channel(&device).await;
    // The channel counts once the hub holds it.
    let mut held = false;
    for _ in 0..250 {
        let (s, v) = lb.admin("GET", "status", None).await;
        assert_eq!(s, 200, "{v}");
        if v["channels_here"] == 1 {
            held = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(held, "the channel never registered");

    let drain_timeout = Duration::from_secs(3);
    let rt = lb.runtime.clone();
    let started = Instant::now();
    let drained = tokio::spawn(async move { fleetgate::runtime::drain(&rt, drain_timeout).await });
    let close = loop {
        let msg = tokio::time::timeout(drain_timeout, channel.ws.next())
            .await
            .expect("a message before the deadline")
            .expect("a Close before the end")
            .expect("no error before the Close");
        if let Message::Close(frame) = msg {
            break frame.expect("a close code");
        }
    };
    assert_eq!(close.code, CloseCode::Away);
    assert_eq!(close.reason.as_str(), "balancer draining, reconnect");
    // Reading on sends tungstenite's answer to the Close; then the
    // balancer hangs up.
    let end = tokio::time::timeout(EXITS_WITHIN, channel.ws.next())
        .await
        .expect("the stream ends");
    assert!(!matches!(end, Some(Ok(_))), "more after the Close: {end:?}");
    tokio::time::timeout(EXITS_WITHIN, drained)
        .await
        .expect("the drain ends once the channel closed")
        .unwrap();
    assert!(started.elapsed() < drain_timeout);
}
