//! The descriptor reserve through the real binary under a small
//! open-file limit: proxied connections are refused before the process
//! runs out, and the admin listener still answers.

mod common;

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{free_addr, http_get, Balancer, HoldingBackend};

const LIMIT: u64 = 128;
const RESERVE: u64 = 32;

fn config(front: SocketAddr, backend: SocketAddr) -> String {
    format!(
        r#"[global]
descriptor_reserve = {RESERVE}

[admin]
bind = "{{admin}}"

[[listener]]
name = "front"
bind = "{front}"
pool = "p"

[[pool]]
name = "p"
max_fails = 1000
backends = [{{ address = "{backend}" }}]
"#
    )
}

#[test]
fn the_admin_listener_answers_while_the_proxy_holds_every_descriptor_it_may() {
    let backend = HoldingBackend::start("held");
    let front = free_addr();
    let limit = format!("--nofile={LIMIT}:{LIMIT}");
    let fg = Balancer::start_with(&config(front, backend.addr), &["prlimit", &limit]);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", fg.pid())).unwrap();
    assert!(
        limits.lines().any(|l| l.starts_with("Max open files")
            && l.split_whitespace().nth(3) == Some(&*LIMIT.to_string())),
        "the limit did not apply:\n{limits}"
    );

    // Open held connections one by one until one is refused. Each takes
    // at least two descriptors (client and backend socket), so fewer than
    // LIMIT / 2 fit.
    let mut held = Vec::new();
    let started = Instant::now();
    let refused = loop {
        assert!(
            held.len() < LIMIT as usize,
            "{} connections held under a {LIMIT}-descriptor limit and none refused",
            held.len()
        );
        assert!(started.elapsed() < Duration::from_secs(60), "too slow");
        let mut s = TcpStream::connect_timeout(&front, Duration::from_secs(3)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut line = [0u8; 5];
        match s.read(&mut line) {
            Ok(n) if n > 0 => held.push(s),
            Ok(_) => break true,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break true,
            Err(e) => panic!("connection {} neither served nor refused: {e}", held.len()),
        }
    };
    assert!(refused);
    eprintln!(
        "{} connections held before the reserve refused one",
        held.len()
    );
    assert!(held.len() >= 10, "only {} connections served", held.len());

    // The operator and the health checker still see in.
    for path in ["/healthz", "/metrics"] {
        let resp = http_get(fg.admin, path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert!(resp.starts_with("HTTP/1.1 200"), "GET {path}: {resp}");
    }
    let text = fg.metrics();
    let series = |s: &str| common::metric_value(&text, s);
    assert!(
        series("fleetgate_connections_rejected_total{listener=\"front\",reason=\"descriptor_reserve\"}")
            >= 1.0,
        "refusal not counted:\n{text}"
    );
    assert_eq!(
        series("fleetgate_connections_active{listener=\"front\"}"),
        held.len() as f64
    );
    // Not one proxied connection was lost to the reserve.
    assert_eq!(backend.open(), held.len());

    // Once the clients go, connections are served again.
    drop(held);
    assert!(
        common::eventually(Duration::from_secs(10), || {
            let Ok(mut s) = TcpStream::connect_timeout(&front, Duration::from_secs(2)) else {
                return false;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut line = [0u8; 5];
            s.read_exact(&mut line).is_ok() && &line == b"held\n"
        }),
        "not served again after the clients closed"
    );
}
