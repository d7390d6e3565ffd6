//! Reload (SIGHUP) under load and graceful drain (SIGTERM), through the
//! real binary.

mod common;
mod support_l4;

use std::collections::{BTreeMap, BTreeSet};
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{ask, eventually, free_addr, Balancer, NamedBackend};
use support_l4::{config, echo_round_trip, must, sample, EchoBackend};

/// `ok` + `error` reloads so far (0 while neither series exists).
fn reloads(fg: &Balancer) -> (f64, f64) {
    let text = fg.metrics();
    let get = |r| sample(&text, "fleetgate_config_reloads_total", &[("result", r)]).unwrap_or(0.0);
    (get("ok"), get("error"))
}

/// Send SIGHUP and wait until the balancer has counted that reload.
/// Returns whether it succeeded.
fn reload(fg: &Balancer) -> bool {
    let (ok, err) = reloads(fg);
    fg.signal("HUP");
    let mut now = (ok, err);
    assert!(
        eventually(Duration::from_secs(5), || {
            now = reloads(fg);
            now.0 + now.1 > ok + err
        }),
        "SIGHUP was not acted on"
    );
    assert_eq!(now.0 + now.1, ok + err + 1.0, "one SIGHUP, one reload");
    now.0 > ok
}

/// Ask until every name in `set` has answered, checking that no other
/// name does. Run from the test thread, after the reload was counted, so
/// every connection here was accepted under the new plan. (The load
/// threads share the round-robin counter, so which backend a given ask
/// reaches is not predictable: keep asking, up to a bound.)
fn assert_only(front: SocketAddr, set: &BTreeSet<&str>, when: &str) {
    let mut seen: BTreeSet<String> = BTreeSet::new();
    for _ in 0..200 {
        let name = ask(front).unwrap_or_else(|e| panic!("{when}: ask failed: {e}"));
        assert!(
            set.contains(name.as_str()),
            "{when}: {name:?} answered, want only {set:?}"
        );
        seen.insert(name);
        if seen.len() == set.len() {
            return;
        }
    }
    panic!("{when}: in 200 connections only {seen:?} of {set:?} answered");
}

#[test]
fn reloads_under_load_lose_no_connection() {
    let names = ["a", "b", "c", "d"];
    let backends: BTreeMap<&str, NamedBackend> =
        names.iter().map(|&n| (n, NamedBackend::start(n))).collect();
    let front = free_addr();
    let config_for = |set: &[&str]| {
        let addrs: Vec<SocketAddr> = set.iter().map(|n| backends[n].addr).collect();
        config(front, &addrs, "", "")
    };
    let fg = Balancer::start(&config_for(&["a", "b"]));
    let mut current: BTreeSet<&str> = ["a", "b"].into();
    assert_only(front, &current, "at start");

    // Continuous load: connect, read the name, close; every failure and
    // every unknown answer is recorded.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let load: Vec<_> = (0..3)
        .map(|_| {
            let (stop, failures) = (stop.clone(), failures.clone());
            thread::spawn(move || {
                let mut ok = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    match ask(front) {
                        Ok(n) if ["a", "b", "c", "d"].contains(&n.as_str()) => ok += 1,
                        Ok(n) => failures.lock().unwrap().push(format!("answer {n:?}")),
                        Err(e) => failures.lock().unwrap().push(e.to_string()),
                    }
                    thread::sleep(Duration::from_millis(1));
                }
                ok
            })
        })
        .collect();

    let valid: [&[&str]; 10] = [
        &["b", "c"],
        &["c"],
        &["c", "d"],
        &["d", "a"],
        &["a"],
        &["a", "b", "c"],
        &["b"],
        &["b", "d"],
        &["a", "b", "c", "d"],
        &["a", "c"],
    ];
    let mut invalid_count = 0.0;
    for (i, set) in valid.iter().enumerate() {
        // A valid reload that changes the backend set...
        fg.write_config(&config_for(set));
        assert!(reload(&fg), "reload {} to {set:?} was refused", 2 * i + 1);
        current = set.iter().copied().collect();
        assert_only(front, &current, &format!("after reload to {set:?}"));

        // ...then an invalid one, which must leave that set in place.
        let broken = if i % 2 == 0 {
            format!("{}\n[[listener]\nname = \"broken\"\n", config_for(set))
        } else {
            config_for(set).replace("pool = \"p\"", "pool = \"gone\"")
        };
        fg.write_config(&broken);
        assert!(
            !reload(&fg),
            "reload {} of a broken config succeeded",
            2 * i + 2
        );
        invalid_count += 1.0;
        assert_only(
            front,
            &current,
            &format!("after a refused reload, still {set:?}"),
        );
        let text = fg.metrics();
        assert_eq!(
            must(
                &text,
                "fleetgate_config_reloads_total",
                &[("result", "error")]
            ),
            invalid_count
        );
    }

    stop.store(true, Ordering::Relaxed);
    let served: Vec<usize> = load.into_iter().map(|h| h.join().unwrap()).collect();
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} client connections failed during reloads, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    for (i, n) in served.iter().enumerate() {
        assert!(*n >= 20, "load thread {i} made only {n} connections");
    }
    let text = fg.metrics();
    assert_eq!(
        must(&text, "fleetgate_config_reloads_total", &[("result", "ok")]),
        10.0
    );
    assert_eq!(
        must(
            &text,
            "fleetgate_config_reloads_total",
            &[("result", "error")]
        ),
        10.0
    );
    assert_eq!(
        must(
            &text,
            "fleetgate_connections_rejected_total",
            &[("listener", "front"), ("reason", "no_backend")]
        ),
        0.0
    );
    // Backends that left the configuration leave the metrics too.
    for (name, b) in &backends {
        let l = [("pool", "p"), ("backend", &*b.addr.to_string())];
        let present = sample(&text, "fleetgate_backend_up", &l).is_some();
        assert_eq!(
            present,
            current.contains(name),
            "backend_up series of {name}"
        );
    }
}

#[test]
fn connection_outlives_the_removal_of_its_backend() {
    let echo = EchoBackend::start();
    let other = NamedBackend::start("other");
    let front = free_addr();
    let fg = Balancer::start(&config(front, &[echo.addr], "", ""));

    let mut long = TcpStream::connect(front).unwrap();
    long.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    echo_round_trip(&mut long, b"before").unwrap();

    fg.write_config(&config(front, &[other.addr], "", ""));
    assert!(reload(&fg));
    assert_eq!(
        ask(front).unwrap(),
        "other",
        "new connections use the new set"
    );

    // The old connection still reaches its (now unconfigured) backend,
    // both ways, including a transfer larger than the socket buffers.
    echo_round_trip(&mut long, b"after").unwrap();
    let big: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let mut w = long.try_clone().unwrap();
    let payload = big.clone();
    let writer = thread::spawn(move || std::io::Write::write_all(&mut w, &payload));
    let mut back = vec![0u8; big.len()];
    std::io::Read::read_exact(&mut long, &mut back).unwrap();
    writer.join().unwrap().unwrap();
    assert!(back == big, "bytes altered after the reload");
    assert_eq!(echo.accepted(), 1);
    // Only the long-lived connection is open (the `ask` one ends once the
    // balancer has seen the client close, a moment after `ask` returned).
    assert!(
        eventually(Duration::from_secs(5), || must(
            &fg.metrics(),
            "fleetgate_connections_active",
            &[("listener", "front")]
        ) == 1.0),
        "want exactly the long-lived connection open"
    );
    echo_round_trip(&mut long, b"still").unwrap();
}

fn drain_config(front: SocketAddr, backend: SocketAddr, drain_timeout: &str) -> String {
    format!(
        "[global]\ndrain_timeout = \"{drain_timeout}\"\n\n{}",
        config(front, &[backend], "", "")
    )
}

fn refused(front: SocketAddr) -> bool {
    matches!(
        TcpStream::connect_timeout(&front, Duration::from_secs(1)),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused
    )
}

#[test]
fn sigterm_drains_then_exits_0() {
    let echo = EchoBackend::start();
    let front = free_addr();
    let mut fg = Balancer::start(&drain_config(front, echo.addr, "30s"));
    let mut open = TcpStream::connect(front).unwrap();
    open.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    echo_round_trip(&mut open, b"hello").unwrap();

    fg.signal("TERM");
    assert!(
        eventually(Duration::from_secs(5), || refused(front)),
        "new connections are still accepted after SIGTERM"
    );
    // The open connection keeps working while the process drains.
    for i in 0..5 {
        echo_round_trip(&mut open, format!("draining {i}").as_bytes())
            .expect("the open connection works during the drain");
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        fg.child.try_wait().unwrap().is_none(),
        "exited with a connection still open"
    );
    assert!(refused(front));
    // The admin endpoint answers during the drain.
    assert!(fg.metrics().contains("fleetgate_connections_active"));

    let closed_at = Instant::now();
    drop(open);
    let status = fg
        .wait_exit(Duration::from_secs(5))
        .expect("did not exit after its last connection closed");
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(closed_at.elapsed() < Duration::from_secs(3));
}

#[test]
fn sigterm_exits_at_drain_timeout() {
    let echo = EchoBackend::start();
    let front = free_addr();
    let mut fg = Balancer::start(&drain_config(front, echo.addr, "1s"));
    let mut open = TcpStream::connect(front).unwrap();
    open.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    echo_round_trip(&mut open, b"hello").unwrap();

    let term_at = Instant::now();
    fg.signal("TERM");
    let status = fg
        .wait_exit(Duration::from_secs(6))
        .expect("did not exit by its drain timeout");
    let took = term_at.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "exited after {took:?}, before the 1 s drain timeout, with a connection open"
    );
    assert!(took < Duration::from_secs(3), "exited only after {took:?}");
    assert_eq!(status.code(), Some(0), "{status:?}");
    // The connection ends with the process.
    let mut buf = [0u8; 8];
    match std::io::Read::read(&mut open, &mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("connection still open after exit: {other:?}"),
    }
}
