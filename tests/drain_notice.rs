//! `global.drain_notice`: after SIGTERM, `/healthz` fails at once while the
//! listeners still accept, so that a health checker in front (keepalived,
//! a cloud load balancer) moves traffic away before they close; then the
//! usual drain. A second SIGTERM cuts the notice short.

mod common;

use std::time::Duration;

use common::*;

fn config(front: std::net::SocketAddr, backend: std::net::SocketAddr, notice: &str) -> String {
    format!(
        "[global]\ndrain_timeout = \"2s\"\ndrain_notice = \"{notice}\"\n\n{}",
        tcp_config(front, "round_robin", &[(backend, 1)], "")
    )
}

#[test]
fn health_fails_first_and_the_listener_serves_until_the_notice_ends() {
    let backend = NamedBackend::start("b1");
    let front = free_addr();
    let mut lb = Balancer::start(&config(front, backend.addr, "3s"));
    wait_listening(front);
    assert_eq!(ask(front).unwrap(), "b1");

    lb.signal("TERM");
    let admin = lb.admin;
    let mut last = String::new();
    assert!(
        eventually(Duration::from_secs(1), || {
            last = http_get(admin, "/healthz").unwrap_or_default();
            last.starts_with("HTTP/1.1 503")
        }),
        "/healthz during the notice: {last}"
    );
    assert!(last.ends_with("draining\n"), "{last}");
    // Health says go away, yet a device that has not heard is still served.
    assert_eq!(ask(front).unwrap(), "b1", "served during the notice");
    // Then the drain closes the listener, and the process exits cleanly.
    assert!(
        eventually(Duration::from_secs(10), || ask(front).is_err()),
        "the listener closes once the notice is over"
    );
    let status = lb.wait_exit(Duration::from_secs(15)).expect("exits");
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_second_sigterm_cuts_the_notice_short() {
    let backend = NamedBackend::start("b1");
    let front = free_addr();
    // A notice far longer than the wait below: only the second signal can
    // end it in time.
    let mut lb = Balancer::start(&config(front, backend.addr, "10m"));
    wait_listening(front);
    lb.signal("TERM");
    let admin = lb.admin;
    assert!(eventually(Duration::from_secs(2), || http_get(
        admin, "/healthz"
    )
    .unwrap_or_default()
    .starts_with("HTTP/1.1 503")));
    assert_eq!(ask(front).unwrap(), "b1", "served during the notice");
    lb.signal("TERM");
    let status = lb
        .wait_exit(Duration::from_secs(20))
        .expect("the second SIGTERM ends the notice; the drain follows");
    assert!(status.success(), "{status:?}");
}
