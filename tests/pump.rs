//! The L4 pump and the accept path, end to end through the real binary on
//! loopback: half-close, bulk integrity on both the splice and the copy
//! path, idle timeout, connection limit, ACLs and descriptor exhaustion.
//!
//! Run with `cargo test --release --test pump`: the integrity tests move
//! 256 MiB each way.

mod common;
mod support_l4;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{ask_from, eventually, free_addr, Balancer, HoldingBackend, NamedBackend};
use support_l4::{config, echo_round_trip, must, pipe_fds, EchoBackend, Prng};

/// The two bulk transfers share two cores with everything else: run them
/// one at a time so neither starves the timing tests more than it must.
static BULK: Mutex<()> = Mutex::new(());

/// The listener line for a pump mode: `true` (splice), `false` (buffered
/// copy) or `"auto"` (splice for bulk transfers only, the default).
fn splice_line(splice: &str) -> String {
    format!("splice = {splice}")
}

fn connect(front: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&front, Duration::from_secs(3)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn connect_from(front: SocketAddr, ip: IpAddr) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::new(ip, 0).into()).unwrap();
    sock.connect_timeout(&front.into(), Duration::from_secs(3))
        .unwrap();
    sock.into()
}

/// A connection the balancer refuses is accepted by the kernel and then
/// closed at once: the client reads EOF or a reset, well before `within`.
fn assert_closed_at_once(mut s: TcpStream, within: Duration, what: &str) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => {}
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
            ) => {}
        Ok(n) => panic!("{what}: got {:?} instead of a close", &buf[..n]),
        Err(e) => panic!("{what}: not closed: {e}"),
    }
    assert!(
        started.elapsed() < within,
        "{what}: closed only after {:?}",
        started.elapsed()
    );
}

fn read_line(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match s.read(&mut byte) {
            Ok(0) => break,
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => out.push(byte[0]),
            Err(e) => panic!(
                "reading a line: {e} (so far {:?})",
                String::from_utf8_lossy(&out)
            ),
        }
    }
    String::from_utf8(out).unwrap()
}

// ---------------------------------------------------------------- half-close

/// Reads the request until EOF, then answers `LEN CRC32\n` followed by the
/// request echoed back, then closes: only works if the client's FIN reaches
/// it while the way back stays open.
fn start_digest_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for c in listener.incoming() {
            let Ok(mut c) = c else { continue };
            thread::spawn(move || {
                let mut request = Vec::new();
                if c.read_to_end(&mut request).is_err() {
                    return;
                }
                let head = format!("{} {:08x}\n", request.len(), crc32fast::hash(&request));
                let _ = c.write_all(head.as_bytes());
                let _ = c.write_all(&request);
            });
        }
    });
    addr
}

fn half_close(splice: &str) {
    let backend = start_digest_backend();
    let front = free_addr();
    let _fg = Balancer::start(&config(front, &[backend], &splice_line(splice), ""));
    let mut big = vec![0u8; 3 * 1024 * 1024 + 5];
    Prng::new(7).fill(&mut big[..3 * 1024 * 1024]);
    for request in [b"hello".to_vec(), Vec::new(), big] {
        let mut s = connect(front);
        // The writer thread lets a request larger than the socket buffers
        // through even if the proxy applied backpressure the wrong way.
        let mut w = s.try_clone().unwrap();
        let req = request.clone();
        let writer = thread::spawn(move || {
            w.write_all(&req).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        });
        let mut response = Vec::new();
        s.read_to_end(&mut response)
            .expect("response after half-close");
        writer.join().unwrap();
        let want_head = format!("{} {:08x}\n", request.len(), crc32fast::hash(&request));
        assert!(
            response.starts_with(want_head.as_bytes()),
            "splice={splice}, {} byte request: response starts {:?}, want {want_head:?}",
            request.len(),
            String::from_utf8_lossy(&response[..response.len().min(40)])
        );
        assert!(
            response[want_head.len()..] == request[..],
            "splice={splice}: the echoed request differs ({} bytes back, {} sent)",
            response.len() - want_head.len(),
            request.len()
        );
    }
}

#[test]
fn half_close_from_client_splice() {
    half_close("true");
}

#[test]
fn half_close_from_client_copy() {
    half_close("false");
}

#[test]
fn half_close_from_client_auto() {
    half_close("\"auto\"");
}

/// The other way round: the backend sends a banner and closes its write
/// side first; the client must see EOF yet still be able to send, and the
/// backend must get every byte.
fn backend_half_close(splice: &str) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        c.write_all(b"banner\n").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        let r = c.read_to_end(&mut got).map(|_| got);
        tx.send(r.map_err(|e| e.to_string())).unwrap();
    });
    let front = free_addr();
    let _fg = Balancer::start(&config(front, &[backend], &splice_line(splice), ""));
    let mut s = connect(front);
    let mut banner = Vec::new();
    s.read_to_end(&mut banner).expect("EOF after the banner");
    assert_eq!(banner, b"banner\n");
    let mut payload = vec![0u8; 1024 * 1024];
    Prng::new(11).fill(&mut payload);
    s.write_all(&payload)
        .expect("the client's side stays open after the backend's FIN");
    s.shutdown(Shutdown::Write).unwrap();
    let got = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("backend finished")
        .expect("backend read");
    assert_eq!(got.len(), payload.len(), "splice={splice}");
    assert!(got == payload, "splice={splice}: payload altered");
}

#[test]
fn half_close_from_backend_splice() {
    backend_half_close("true");
}

#[test]
fn half_close_from_backend_copy() {
    backend_half_close("false");
}

#[test]
fn half_close_from_backend_auto() {
    backend_half_close("\"auto\"");
}

// ----------------------------------------------------------------- integrity

const BULK_BYTES: u64 = 256 * 1024 * 1024;
const CHUNK: usize = 1024 * 1024;

/// Write `total` bytes of the stream seeded with `seed`; return its CRC.
fn send_stream(s: &mut TcpStream, seed: u64, total: u64) -> std::io::Result<u32> {
    let mut prng = Prng::new(seed);
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut left = total;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        prng.fill(&mut buf[..n]);
        crc.update(&buf[..n]);
        s.write_all(&buf[..n])?;
        left -= n as u64;
    }
    s.shutdown(Shutdown::Write)?;
    Ok(crc.finalize())
}

/// Read to EOF; return the byte count and CRC.
fn receive_stream(s: &mut TcpStream) -> std::io::Result<(u64, u32)> {
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok((total, crc.finalize()));
        }
        crc.update(&buf[..n]);
        total += n as u64;
    }
}

struct BackendReport {
    received: (u64, u32),
    sent_crc: u32,
}

/// Accepts one connection; sends `BULK_BYTES` of its own stream while
/// reading the client's, both at once.
fn start_duplex_backend(seed: u64) -> (SocketAddr, mpsc::Receiver<BackendReport>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(50))).unwrap();
        let mut w = c.try_clone().unwrap();
        let writer = thread::spawn(move || send_stream(&mut w, seed, BULK_BYTES));
        let received = receive_stream(&mut c).expect("backend read");
        let sent_crc = writer.join().unwrap().expect("backend write");
        let _ = tx.send(BackendReport { received, sent_crc });
    });
    (addr, rx)
}

fn integrity(splice: &str) {
    let _one_at_a_time = BULK.lock().unwrap_or_else(|e| e.into_inner());
    let (backend, report) = start_duplex_backend(0xdead_beef);
    let front = free_addr();
    let fg = Balancer::start(&config(front, &[backend], &splice_line(splice), ""));
    let pipes_before = pipe_fds(fg.pid());
    let started = Instant::now();
    let mut s = connect(front);
    s.set_read_timeout(Some(Duration::from_secs(50))).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = thread::spawn(move || send_stream(&mut w, 0x5eed, BULK_BYTES));
    let (down_bytes, down_crc) = receive_stream(&mut s).expect("client read");
    let up_crc = writer.join().unwrap().expect("client write");
    let report = report
        .recv_timeout(Duration::from_secs(30))
        .expect("backend report");
    let took = started.elapsed();
    eprintln!("splice={splice}: 2 x {} MiB in {took:?}", BULK_BYTES >> 20);

    assert_eq!(
        report.received.0, BULK_BYTES,
        "splice={splice}: upstream byte count"
    );
    assert_eq!(
        report.received.1, up_crc,
        "splice={splice}: upstream checksum"
    );
    assert_eq!(
        down_bytes, BULK_BYTES,
        "splice={splice}: downstream byte count"
    );
    assert_eq!(
        down_crc, report.sent_crc,
        "splice={splice}: downstream checksum"
    );

    let text = fg.metrics();
    let bytes = |dir: &str| {
        must(
            &text,
            "fleetgate_proxied_bytes_total",
            &[("listener", "front"), ("direction", dir)],
        )
    };
    assert_eq!(bytes("upstream"), BULK_BYTES as f64, "splice={splice}");
    assert_eq!(bytes("downstream"), BULK_BYTES as f64, "splice={splice}");

    // Which path moved the bytes: splice leaves its pipes in the pool, the
    // copy path never opens one.
    let pipes = pipe_fds(fg.pid());
    if splice != "false" {
        assert!(
            pipes > pipes_before,
            "splice=true but the balancer opened no pipe ({pipes_before} before, {pipes} after)"
        );
    } else {
        assert_eq!(
            pipes, pipes_before,
            "splice=false but the balancer opened pipes ({pipes_before} before, {pipes} after)"
        );
    }
}

#[test]
fn integrity_256mib_each_way_splice() {
    integrity("true");
}

#[test]
fn integrity_256mib_each_way_copy() {
    integrity("false");
}

#[test]
fn integrity_256mib_each_way_auto() {
    integrity("\"auto\"");
}

// -------------------------------------------------------------- idle timeout

#[test]
fn idle_timeout_closes_idle_and_spares_active() {
    let backend = EchoBackend::start();
    let front = free_addr();
    let fg = Balancer::start(&config(
        front,
        &[backend.addr],
        r#"idle_timeout = "500ms""#,
        "",
    ));

    // The active one: a byte every 100 ms for 2 s, each echoed back.
    let active = thread::spawn(move || {
        let mut s = connect(front);
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let started = Instant::now();
        let mut sent = 0;
        while started.elapsed() < Duration::from_secs(2) {
            echo_round_trip(&mut s, b"k").unwrap_or_else(|e| {
                panic!(
                    "active connection died after {sent} bytes, {:?}: {e}",
                    started.elapsed()
                )
            });
            sent += 1;
            thread::sleep(Duration::from_millis(100));
        }
        (sent, s)
    });

    // The idle one: one round trip, then silence.
    let mut idle = connect(front);
    echo_round_trip(&mut idle, b"x").unwrap();
    let last_activity = Instant::now();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16];
    match idle.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Ok(n) => panic!("idle connection received {:?}", &buf[..n]),
        Err(e) => panic!("idle connection was not closed within 5 s: {e}"),
    }
    let after = last_activity.elapsed();
    assert!(
        after >= Duration::from_millis(450),
        "closed after {after:?}, before the 500ms idle timeout"
    );
    assert!(
        after <= Duration::from_millis(1500),
        "idle connection closed only after {after:?}"
    );

    // The active connection stays open (held here) while the gauge is read.
    let (sent, _still_open) = active.join().expect("the active connection survived 2 s");
    assert!(sent >= 15, "only {sent} round trips in 2 s");
    // Both went to the backend: the idle one was closed by the proxy,
    // not refused.
    assert_eq!(backend.accepted(), 2);
    assert_eq!(
        must(
            &fg.metrics(),
            "fleetgate_connections_active",
            &[("listener", "front")]
        ),
        1.0,
        "the active connection is still open, the idle one is gone"
    );
}

/// Traffic in one direction only (the backend streaming to a silent client)
/// is activity too.
#[test]
fn idle_timeout_counts_one_way_traffic() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = listener.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        while !st.load(Ordering::Relaxed) {
            if c.write_all(b".").is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(100));
        }
    });
    let front = free_addr();
    let _fg = Balancer::start(&config(front, &[backend], r#"idle_timeout = "500ms""#, ""));
    let mut s = connect(front);
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let started = Instant::now();
    let mut got = 0;
    let mut buf = [0u8; 64];
    while started.elapsed() < Duration::from_secs(2) {
        match s.read(&mut buf) {
            Ok(0) => panic!(
                "closed after {:?} although the backend kept sending",
                started.elapsed()
            ),
            Ok(n) => got += n,
            Err(e) => panic!("read failed after {:?}: {e}", started.elapsed()),
        }
    }
    stop.store(true, Ordering::Relaxed);
    assert!(got >= 15, "only {got} bytes in 2 s");
}

// ---------------------------------------------------------- connection limit

#[test]
fn connection_limit_rejects_the_sixth_and_recovers() {
    let backend = HoldingBackend::start("held");
    let front = free_addr();
    let fg = Balancer::start(&config(front, &[backend.addr], "max_connections = 5", ""));
    let rejected = |fg: &Balancer| {
        must(
            &fg.metrics(),
            "fleetgate_connections_rejected_total",
            &[("listener", "front"), ("reason", "limit")],
        )
    };

    let mut held: Vec<TcpStream> = (0..5)
        .map(|i| {
            let mut s = connect(front);
            assert_eq!(read_line(&mut s), "held", "connection {i} within the limit");
            s
        })
        .collect();
    assert_eq!(rejected(&fg), 0.0);

    assert_closed_at_once(connect(front), Duration::from_secs(1), "sixth connection");
    assert_eq!(rejected(&fg), 1.0);
    assert!(
        eventually(Duration::from_secs(2), || backend.open() == 5),
        "the backend saw {} connections, want 5",
        backend.open()
    );

    // The five still work.
    for s in &mut held {
        s.write_all(b"still here").unwrap();
    }

    // Closing one makes room for exactly one more.
    drop(held.pop());
    assert!(
        eventually(Duration::from_secs(5), || must(
            &fg.metrics(),
            "fleetgate_connections_active",
            &[("listener", "front")]
        ) == 4.0),
        "the closed connection is still counted"
    );
    let mut again = connect(front);
    assert_eq!(read_line(&mut again), "held", "a slot was freed");
    held.push(again);
    assert_closed_at_once(
        connect(front),
        Duration::from_secs(1),
        "over the limit again",
    );
    assert_eq!(rejected(&fg), 2.0);
    assert_eq!(
        must(
            &fg.metrics(),
            "fleetgate_connections_accepted_total",
            &[("listener", "front")]
        ),
        8.0
    );
}

// ----------------------------------------------------------------------- ACL

#[test]
fn acl_deny_closes_denied_sources_at_once() {
    let backend = NamedBackend::start("b");
    let front = free_addr();
    let fg = Balancer::start(&config(
        front,
        &[backend.addr],
        r#"deny = ["127.0.0.2/32"]"#,
        "",
    ));
    let denied: IpAddr = "127.0.0.2".parse().unwrap();

    assert_closed_at_once(
        connect_from(front, denied),
        Duration::from_secs(1),
        "denied 127.0.0.2",
    );
    assert_eq!(
        ask_from(front, Some("127.0.0.1".parse().unwrap())).unwrap(),
        "b"
    );
    assert_eq!(
        ask_from(front, Some("127.0.0.3".parse().unwrap())).unwrap(),
        "b"
    );
    assert_closed_at_once(
        connect_from(front, denied),
        Duration::from_secs(1),
        "denied again",
    );

    let text = fg.metrics();
    let reason = |r: &str| {
        must(
            &text,
            "fleetgate_connections_rejected_total",
            &[("listener", "front"), ("reason", r)],
        )
    };
    assert_eq!(reason("acl"), 2.0);
    assert_eq!(reason("limit"), 0.0);
    assert_eq!(reason("no_backend"), 0.0);
    // The backend never saw the denied ones.
    assert_eq!(backend.served(), 2);
}

#[test]
fn acl_allow_admits_only_listed_sources() {
    let backend = NamedBackend::start("b");
    let front = free_addr();
    let fg = Balancer::start(&config(
        front,
        &[backend.addr],
        r#"allow = ["127.0.0.3/32"]"#,
        "",
    ));

    assert_eq!(
        ask_from(front, Some("127.0.0.3".parse().unwrap())).unwrap(),
        "b"
    );
    for src in ["127.0.0.1", "127.0.0.4"] {
        assert_closed_at_once(
            connect_from(front, src.parse().unwrap()),
            Duration::from_secs(1),
            &format!("{src} is not in allow"),
        );
    }
    assert_eq!(
        ask_from(front, Some("127.0.0.3".parse().unwrap())).unwrap(),
        "b"
    );
    assert_eq!(
        must(
            &fg.metrics(),
            "fleetgate_connections_rejected_total",
            &[("listener", "front"), ("reason", "acl")],
        ),
        2.0
    );
    assert_eq!(backend.served(), 2);
}

// -------------------------------------------------------------------- EMFILE

/// Answers `held` to every connection and keeps it open until the client
/// closes; counts every connection it ever accepted.
struct CountingHolder {
    addr: SocketAddr,
    reached: Arc<std::sync::atomic::AtomicUsize>,
}

fn start_counting_holder() -> CountingHolder {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let reached = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let r = reached.clone();
    thread::spawn(move || {
        for c in listener.incoming() {
            let Ok(mut c) = c else { continue };
            r.fetch_add(1, Ordering::SeqCst);
            thread::spawn(move || {
                let _ = c.write_all(b"held\n");
                let mut buf = [0u8; 1024];
                while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
    CountingHolder { addr, reached }
}

/// A fresh connection that reads the backend's line, then closes.
fn served_now(front: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&front, Duration::from_secs(2)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut line = [0u8; 5];
    s.read_exact(&mut line).is_ok() && &line == b"held\n"
}

/// Open 100 connections that stay open against a balancer limited to 64
/// descriptors, wait until it stops making progress, and sort the clients
/// into served (got the backend's line), waiting (still in the listen
/// queue) and closed.
fn exhaust(
    front: SocketAddr,
    reached: &std::sync::atomic::AtomicUsize,
) -> (Vec<TcpStream>, [usize; 3]) {
    let mut clients: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect_timeout(&front, Duration::from_secs(3)).expect("connect"))
        .collect();
    let mut last = usize::MAX;
    let mut stable_since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline && stable_since.elapsed() < Duration::from_secs(1) {
        let now = reached.load(Ordering::SeqCst);
        if now != last {
            last = now;
            stable_since = Instant::now();
        }
        thread::sleep(Duration::from_millis(50));
    }
    let mut counts = [0usize; 3];
    for c in &mut clients {
        c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let mut buf = [0u8; 16];
        let k = match c.read(&mut buf) {
            Ok(n) if n > 0 => 0,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => 1,
            _ => 2,
        };
        counts[k] += 1;
    }
    (clients, counts)
}

fn start_limited(front: SocketAddr, backend: SocketAddr, pool_extra: &str) -> Balancer {
    // No descriptor reserve: these tests exhaust the descriptors on
    // purpose (tests/descriptor_reserve.rs covers the reserve).
    let fg = Balancer::start_with(
        &format!(
            "[global]\ndescriptor_reserve = 0\n{}",
            config(front, &[backend], "", pool_extra)
        ),
        &["prlimit", "--nofile=64:64"],
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", fg.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        line.split_whitespace().nth(3),
        Some("64"),
        "the limit did not apply: {line}"
    );
    fg
}

/// Under `prlimit --nofile=64`, a hundred held connections exhaust the
/// descriptors: accept fails with EMFILE. The process must live on, count
/// the errors, never tear down a connection it already proxied, and serve
/// again once the clients are gone.
///
/// `max_fails` is raised so that connects failing for want of a descriptor
/// do not take the backend out: that is a separate defect, covered by
/// `descriptor_exhaustion_is_not_blamed_on_the_backend` below.
#[test]
fn accept_survives_descriptor_exhaustion() {
    let backend = start_counting_holder();
    let front = free_addr();
    let mut fg = start_limited(front, backend.addr, "max_fails = 1000");

    let (clients, [served, waiting, closed]) = exhaust(front, &backend.reached);
    let reached = backend.reached.load(Ordering::SeqCst);
    eprintln!(
        "held: served {served}, waiting {waiting}, closed {closed}; reached the backend {reached}"
    );
    assert!(
        (5..100).contains(&served),
        "{served} of 100 connections were served under a 64-descriptor limit"
    );
    assert!(
        waiting > 0,
        "no connection is left waiting: accept never ran out"
    );
    assert_eq!(
        reached,
        served,
        "{} connections reached the backend but were torn down",
        reached - served
    );
    assert!(
        fg.child.try_wait().unwrap().is_none(),
        "fleetgate exited under descriptor exhaustion"
    );

    drop(clients);
    assert!(
        eventually(Duration::from_secs(10), || served_now(front)),
        "not served again after the clients closed"
    );
    let text = fg.metrics();
    let emfile = must(
        &text,
        "fleetgate_accept_errors_total",
        &[("listener", "front"), ("kind", "emfile")],
    );
    assert!(emfile > 0.0, "no EMFILE counted:\n{text}");
    assert!(fg.child.try_wait().unwrap().is_none());
    // Everything drains: no connection is left counted as open.
    assert!(
        eventually(Duration::from_secs(10), || must(
            &fg.metrics(),
            "fleetgate_connections_active",
            &[("listener", "front")]
        ) == 0.0),
        "connections still counted as active after all clients left"
    );
}

/// A connect that fails because the balancer itself is out of descriptors
/// (socket(2) returns EMFILE) says nothing about the backend, yet
/// `balance::connect::first_success` records it as a backend failure: with
/// the default `max_fails = 1` the only backend goes out for
/// `fail_timeout` (10 s) and every later client is refused `no_backend`,
/// long after the descriptors are free again. Ignored until that is fixed
/// in src/balance/connect.rs (not owned by these tests).
#[test]
fn descriptor_exhaustion_is_not_blamed_on_the_backend() {
    let backend = start_counting_holder();
    let front = free_addr();
    let fg = start_limited(front, backend.addr, "");
    let (clients, _) = exhaust(front, &backend.reached);
    drop(clients);
    assert!(
        eventually(Duration::from_secs(3), || served_now(front)),
        "still refused 3 s after the clients closed"
    );
    let text = fg.metrics();
    let label = [("pool", "p"), ("backend", &*backend.addr.to_string())];
    assert_eq!(must(&text, "fleetgate_backend_up", &label), 1.0);
    assert_eq!(
        must(&text, "fleetgate_backend_connect_failures_total", &label),
        0.0,
        "the balancer's own EMFILE was counted against the backend"
    );
}

/// `splice = "auto"` moves small exchanges through its buffer (no pipe is
/// ever opened for them) and still splices a bulk transfer.
#[test]
fn auto_splices_only_bulk_transfers() {
    splices_only_bulk_transfers(&splice_line("\"auto\""));
}

/// Without a `splice` key a listener runs as `"auto"`.
#[test]
fn the_default_splices_only_bulk_transfers() {
    splices_only_bulk_transfers("");
}

fn splices_only_bulk_transfers(listener_lines: &str) {
    let backend = EchoBackend::start();
    let front = free_addr();
    let fg = Balancer::start(&config(front, &[backend.addr], listener_lines, ""));
    let before = pipe_fds(fg.pid());
    let mut s = connect(front);
    for i in 0..200u32 {
        echo_round_trip(&mut s, format!("request {i}\n").as_bytes()).unwrap();
    }
    assert_eq!(
        pipe_fds(fg.pid()),
        before,
        "small request/response exchanges went through a pipe"
    );
    let mut bulk = vec![0u8; 8 * 1024 * 1024];
    Prng::new(3).fill(&mut bulk);
    let mut w = s.try_clone().unwrap();
    let sent = bulk.clone();
    let writer = thread::spawn(move || w.write_all(&sent).unwrap());
    let mut back = vec![0u8; bulk.len()];
    s.read_exact(&mut back).unwrap();
    writer.join().unwrap();
    assert!(back == bulk, "bulk echo came back altered");
    assert!(
        pipe_fds(fg.pid()) > before,
        "an 8 MiB transfer in auto mode opened no pipe"
    );
}
