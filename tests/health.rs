//! Active health checks and backup backends.

mod common;

use std::time::Duration;

use common::*;

const HTTP_CHECK: &str = "health_check = { kind = \"http\", path = \"/health\", expect = 200, interval = \"100ms\", timeout = \"500ms\", rise = 2, fall = 2 }";

#[test]
fn http_check_takes_out_a_503_backend_and_brings_it_back() {
    let a = HttpBackend::start("a");
    let b = HttpBackend::start("b");
    let front = free_addr();
    let lb = Balancer::start(&tcp_config(
        front,
        "round_robin",
        &[(a.addr, 1), (b.addr, 1)],
        HTTP_CHECK,
    ));
    let b_up = format!("fleetgate_backend_up{{backend=\"{}\",pool=\"p\"}}", b.addr);

    // The port stays open, the application answers 503: only the HTTP
    // probe can tell, and it takes b out after `fall` probes.
    b.set_status(503);
    assert!(
        eventually(Duration::from_secs(5), || lb.metric(&b_up) == 0.0),
        "b never went down"
    );
    for _ in 0..20 {
        let (status, body) = http_ask(front).unwrap();
        assert_eq!((status, body.as_str()), (200, "a"));
    }
    // Healthy again: back after `rise` good probes.
    b.set_status(200);
    assert!(
        eventually(Duration::from_secs(5), || lb.metric(&b_up) == 1.0),
        "b never came back"
    );
    let bodies: Vec<String> = (0..10).map(|_| http_ask(front).unwrap().1).collect();
    assert!(bodies.iter().any(|x| x == "b"), "{bodies:?}");
    let fails = format!(
        "fleetgate_health_checks_total{{backend=\"{}\",pool=\"p\",result=\"fail\"}}",
        b.addr
    );
    assert!(lb.metric(&fails) >= 2.0);
}

#[test]
fn tcp_check_marks_a_closed_port_down() {
    let a = NamedBackend::start("a");
    let mut b = NamedBackend::start("b");
    let b_addr = b.addr;
    let front = free_addr();
    let check = "health_check = { kind = \"tcp\", interval = \"100ms\", rise = 1, fall = 1 }";
    let lb = Balancer::start(&tcp_config(
        front,
        "round_robin",
        &[(a.addr, 1), (b.addr, 1)],
        check,
    ));
    b.stop();
    let b_up = format!("fleetgate_backend_up{{backend=\"{b_addr}\",pool=\"p\"}}");
    assert!(eventually(Duration::from_secs(5), || lb.metric(&b_up) == 0.0));
    let served_before = a.served();
    for _ in 0..10 {
        assert_eq!(ask(front).unwrap(), "a");
    }
    // At least the ten (the TCP probes connect to a too).
    assert!(a.served() >= served_before + 10);
    // No connect was wasted on b: the probe had already taken it out.
    let failures =
        format!("fleetgate_backend_connect_failures_total{{backend=\"{b_addr}\",pool=\"p\"}}");
    assert_eq!(lb.metric(&failures), 0.0);
}

#[test]
fn backup_serves_only_while_every_primary_is_down() {
    let p1 = HttpBackend::start("p1");
    let p2 = HttpBackend::start("p2");
    let bk = HttpBackend::start("backup");
    let front = free_addr();
    let config = format!(
        r#"[admin]
bind = "{{admin}}"

[[listener]]
name = "front"
bind = "{front}"
pool = "p"

[[pool]]
name = "p"
backends = [{{ address = "{}" }}, {{ address = "{}" }}, {{ address = "{}", backup = true }}]
{HTTP_CHECK}
"#,
        p1.addr, p2.addr, bk.addr
    );
    let lb = Balancer::start(&config);
    let up = |addr| format!("fleetgate_backend_up{{backend=\"{addr}\",pool=\"p\"}}");
    let bodies = |n| {
        (0..n)
            .map(|_| http_ask(front).unwrap().1)
            .collect::<Vec<_>>()
    };

    assert!(bodies(20).iter().all(|b| b != "backup"));
    p1.set_status(503);
    assert!(eventually(Duration::from_secs(5), || lb
        .metric(&up(p1.addr))
        == 0.0));
    assert!(
        bodies(10).iter().all(|b| b == "p2"),
        "one primary is still up"
    );
    p2.set_status(503);
    assert!(eventually(Duration::from_secs(5), || lb
        .metric(&up(p2.addr))
        == 0.0));
    assert!(
        bodies(10).iter().all(|b| b == "backup"),
        "every primary is down"
    );
    p1.set_status(200);
    assert!(eventually(Duration::from_secs(5), || lb
        .metric(&up(p1.addr))
        == 1.0));
    assert!(bodies(10).iter().all(|b| b == "p1"), "a primary is back");
}
