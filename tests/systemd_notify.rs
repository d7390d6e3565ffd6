//! systemd's notify protocol, received the way systemd receives it: a Unix
//! datagram socket named in `NOTIFY_SOCKET`.

mod common;

use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The datagrams the balancer sent, one `KEY=VALUE` list each.
struct Notifications {
    sock: UnixDatagram,
}

impl Notifications {
    /// The next datagram, within `within`.
    fn next(&self, within: Duration) -> Option<Vec<String>> {
        self.sock.set_read_timeout(Some(within)).unwrap();
        let mut buf = [0u8; 4096];
        let n = self.sock.recv(&mut buf).ok()?;
        let text = std::str::from_utf8(&buf[..n]).expect("UTF-8 notification");
        Some(text.lines().map(str::to_string).collect())
    }

    /// Datagrams up to and including the first that has `line`; the
    /// watchdog's pings may come in between.
    fn until(&self, line: &str) -> Vec<Vec<String>> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            if let Some(d) = self.next(Duration::from_millis(200)) {
                let done = d.iter().any(|l| l == line);
                seen.push(d);
                if done {
                    return seen;
                }
            }
        }
        panic!("no {line}; got {seen:?}");
    }
}

#[test]
fn ready_reloading_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let notes = Notifications {
        sock: UnixDatagram::bind(&socket_path).unwrap(),
    };
    let backend = NamedBackend::start("a");
    let front = free_addr();
    let admin = free_addr();
    let config = tcp_config(front, "round_robin", &[(backend.addr, 1)], "")
        .replace("{admin}", &admin.to_string());
    let path = dir.path().join("fleetgate.toml");
    std::fs::write(&path, &config).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
        .args(["run", "-c"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .env("NOTIFY_SOCKET", &socket_path)
        // 300 ms: pings every 150 ms.
        .env("WATCHDOG_USEC", "300000")
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn fleetgate");
    let lb = Balancer {
        child,
        dir: tempfile::tempdir().unwrap(),
        config: path,
        admin,
    };

    // READY=1 only once the listeners accept: nothing earlier said it.
    let first = notes.until("READY=1");
    assert_eq!(first.len(), 1, "something before READY=1: {first:?}");
    TcpStream::connect(front).expect("READY=1 before the listener accepts");
    let ready = &first[0];
    assert!(
        ready
            .iter()
            .any(|l| l.starts_with("STATUS=") && l.contains("connections open")),
        "{ready:?}"
    );

    // The watchdog pings, at about half of WATCHDOG_USEC.
    let pings = notes.until("WATCHDOG=1");
    assert!(pings.iter().all(|d| !d.contains(&"READY=1".to_string())));
    notes.until("WATCHDOG=1");

    // A reload: RELOADING=1 with the monotonic time, then READY=1 whose
    // status gives the result.
    lb.signal("HUP");
    let reloading = notes.until("RELOADING=1");
    let d = reloading.last().unwrap();
    let usec = d
        .iter()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC with RELOADING=1: {d:?}"));
    assert!(usec.parse::<u64>().unwrap() > 0);
    let after = notes.until("READY=1");
    let d = after.last().unwrap();
    assert!(
        d.iter()
            .any(|l| l == "STATUS=0 connections open; last reload ok"),
        "{d:?}"
    );

    // A refused reload is READY=1 again (the old configuration serves),
    // and says so.
    lb.write_config("[[listener]]\nname = 1\n");
    lb.signal("HUP");
    notes.until("RELOADING=1");
    let after = notes.until("READY=1");
    let d = after.last().unwrap();
    assert!(
        d.iter()
            .any(|l| l.starts_with("STATUS=") && l.contains("last reload refused")),
        "{d:?}"
    );

    // SIGTERM: STOPPING=1, then the process exits.
    lb.signal("TERM");
    notes.until("STOPPING=1");
    let mut lb = lb;
    let deadline = Instant::now() + Duration::from_secs(10);
    while lb.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "still running after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}
