//! Passive health and retry: a backend that dies under load costs no
//! client connection, and comes back after `fail_timeout`.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;

const POLICY: &str = "max_fails = 1\nfail_timeout = \"1s\"\nconnect_timeout = \"1s\"\nretries = 2";

#[test]
fn killing_a_backend_under_load_fails_no_client() {
    let a = NamedBackend::start("a");
    let b = NamedBackend::start("b");
    let mut c = NamedBackend::start("c");
    let c_addr = c.addr;
    let front = free_addr();
    let lb = Balancer::start(&tcp_config(
        front,
        "round_robin",
        &[(a.addr, 1), (b.addr, 1), (c.addr, 1)],
        POLICY,
    ));

    let done = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let (done, failed) = (done.clone(), failed.clone());
            thread::spawn(move || {
                for _ in 0..400 {
                    match ask(front) {
                        Ok(name) if !name.is_empty() => {}
                        other => {
                            eprintln!("client failure: {other:?}");
                            failed.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    assert!(eventually(Duration::from_secs(20), || done
        .load(Ordering::SeqCst)
        >= 300));
    c.stop();
    for t in clients {
        t.join().unwrap();
    }
    assert_eq!(failed.load(Ordering::SeqCst), 0, "clients saw errors");
    let series =
        format!("fleetgate_backend_connect_failures_total{{backend=\"{c_addr}\",pool=\"p\"}}");
    assert!(lb.metric(&series) >= 1.0, "the failed connect was counted");

    // c comes back: after fail_timeout it is tried again and serves.
    let c2 = NamedBackend::start_on("c", c_addr);
    assert!(
        eventually(Duration::from_secs(5), || {
            let _ = ask(front);
            c2.served() > 0
        }),
        "c was never used again after fail_timeout"
    );
    let up = format!("fleetgate_backend_up{{backend=\"{c_addr}\",pool=\"p\"}}");
    assert!(eventually(Duration::from_secs(3), || lb.metric(&up) == 1.0));
}

#[test]
fn no_backend_up_closes_at_once_and_counts() {
    let dead = free_addr();
    let front = free_addr();
    let lb = Balancer::start(&tcp_config(front, "round_robin", &[(dead, 1)], POLICY));
    let started = std::time::Instant::now();
    let got = ask(front).unwrap_or_default();
    assert_eq!(got, "");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(eventually(Duration::from_secs(2), || {
        lb.metric("fleetgate_connections_rejected_total{listener=\"front\",reason=\"no_backend\"}")
            == 1.0
    }));
}
