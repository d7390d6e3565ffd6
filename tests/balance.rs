//! Balancing algorithms through the real binary and real sockets.

mod common;

use std::collections::HashMap;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use common::*;

fn count(front: SocketAddr, n: usize) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for _ in 0..n {
        let name = ask(front).expect("connection through the balancer");
        *seen.entry(name).or_insert(0) += 1;
    }
    seen
}

#[test]
fn round_robin_spreads_evenly() {
    let backends: Vec<NamedBackend> = ["a", "b", "c"]
        .iter()
        .map(|n| NamedBackend::start(n))
        .collect();
    let front = free_addr();
    let list: Vec<_> = backends.iter().map(|b| (b.addr, 1)).collect();
    let _lb = Balancer::start(&tcp_config(front, "round_robin", &list, ""));
    let seen = count(front, 1000);
    assert_eq!(seen.len(), 3, "{seen:?}");
    for (name, n) in &seen {
        // Strict rotation: 1000 over 3 gives 333 or 334 each.
        assert!((333..=334).contains(n), "{name} got {n}: {seen:?}");
    }
}

#[test]
fn weights_are_honoured() {
    let a = NamedBackend::start("a");
    let b = NamedBackend::start("b");
    for algorithm in ["weighted_round_robin", "round_robin"] {
        let front = free_addr();
        let _lb = Balancer::start(&tcp_config(
            front,
            algorithm,
            &[(a.addr, 1), (b.addr, 3)],
            "",
        ));
        let seen = count(front, 400);
        assert_eq!(seen["a"], 100, "{algorithm}: {seen:?}");
        assert_eq!(seen["b"], 300, "{algorithm}: {seen:?}");
    }
}

/// A backend that holds every connection open (and answers its name), so
/// that its connection count stays up.
fn hold(front: SocketAddr, n: usize) -> Vec<(String, TcpStream)> {
    (0..n)
        .map(|_| {
            let mut s = TcpStream::connect(front).unwrap();
            let mut buf = [0u8; 8];
            let k = s.read(&mut buf).unwrap();
            (String::from_utf8_lossy(&buf[..k]).trim().to_string(), s)
        })
        .collect()
}

#[test]
fn least_conn_prefers_the_idle_backend() {
    let a = HoldingBackend::start("a");
    let b = HoldingBackend::start("b");
    let front = free_addr();
    let _lb = Balancer::start(&tcp_config(
        front,
        "least_conn",
        &[(a.addr, 1), (b.addr, 1)],
        "",
    ));
    // Two long-lived connections spread one each; then close b's.
    let held = hold(front, 2);
    let names: Vec<&str> = held.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.contains(&"a") && names.contains(&"b"), "{names:?}");
    let (keep, drop_b): (Vec<_>, Vec<_>) = held.into_iter().partition(|(n, _)| n == "a");
    drop(drop_b);
    // The proxy notices b's connection closed once the client is gone.
    assert!(eventually(Duration::from_secs(5), || b.open() == 0));
    // a has one open connection, b none: the next five all go to b while
    // a's stays open... until b has as many as a.
    let next = hold(front, 1);
    assert_eq!(next[0].0, "b");
    let more = hold(front, 4);
    let to_a = more.iter().filter(|(n, _)| n == "a").count();
    assert_eq!(
        to_a,
        2,
        "least_conn must alternate once loads are equal: {:?}",
        more.iter().map(|x| &x.0).collect::<Vec<_>>()
    );
    drop(keep);
}

#[test]
fn p2c_uses_every_backend_and_prefers_the_idle_one() {
    let a = HoldingBackend::start("a");
    let b = HoldingBackend::start("b");
    let front = free_addr();
    let _lb = Balancer::start(&tcp_config(front, "p2c", &[(a.addr, 1), (b.addr, 1)], ""));
    // With two backends p2c compares both every time: it behaves like
    // least_conn, so 20 held connections split 10/10.
    let held = hold(front, 20);
    let to_a = held.iter().filter(|(n, _)| n == "a").count();
    assert!((9..=11).contains(&to_a), "a got {to_a} of 20");
}

#[test]
fn hash_keeps_a_client_on_one_backend_and_moves_few_on_removal() {
    let backends: Vec<NamedBackend> = ["a", "b", "c", "d"]
        .iter()
        .map(|n| NamedBackend::start(n))
        .collect();
    let front = free_addr();
    let list: Vec<_> = backends.iter().map(|b| (b.addr, 1)).collect();
    let lb = Balancer::start(&tcp_config(front, "hash_client_ip", &list, ""));
    let clients: Vec<IpAddr> = (0..200u32)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8)))
        .collect();
    let first: Vec<String> = clients
        .iter()
        .map(|&c| ask_from(front, Some(c)).unwrap())
        .collect();
    // Stable: the same client goes to the same backend every time.
    for (c, want) in clients.iter().zip(&first).take(50) {
        for _ in 0..3 {
            assert_eq!(&ask_from(front, Some(*c)).unwrap(), want);
        }
    }
    let mut spread: HashMap<&str, usize> = HashMap::new();
    for f in &first {
        *spread.entry(f.as_str()).or_insert(0) += 1;
    }
    assert_eq!(spread.len(), 4, "{spread:?}");
    // Remove d by reloading: only d's clients move (≈1/4 of them).
    let three: Vec<_> = backends[..3].iter().map(|b| (b.addr, 1)).collect();
    lb.write_config(&tcp_config(front, "hash_client_ip", &three, ""));
    lb.signal("HUP");
    assert!(eventually(Duration::from_secs(5), || {
        lb.metric("fleetgate_config_reloads_total{result=\"ok\"}") >= 1.0
    }));
    let mut moved = 0;
    for (c, before) in clients.iter().zip(&first) {
        let after = ask_from(front, Some(*c)).unwrap();
        if &after != before {
            assert_eq!(before, "d", "a client of {before} moved to {after}");
            moved += 1;
        }
    }
    assert_eq!(moved, spread["d"]);
    let share = moved as f64 / clients.len() as f64;
    assert!((0.1..0.4).contains(&share), "moved {share}");
}
