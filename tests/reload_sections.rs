//! Reloads (SIGHUP) section by section, through the real binary: a change
//! that needs a restart is refused and names its key; harmless changes
//! under keep-alive load with 200 WebSockets open cost nothing; a new
//! route applies to the next request of an established connection.

mod common;

use std::net::SocketAddr;
use std::thread;
use std::time::Duration;

use common::live::*;
use common::{eventually, free_addr, Balancer};
use fleetgate::discovery::NodeState;

const INTERVAL: Duration = Duration::from_millis(200);

/// `ok` and `error` reloads counted so far.
fn reloads(lb: &Balancer) -> (f64, f64) {
    (
        lb.metric("fleetgate_config_reloads_total{result=\"ok\"}"),
        lb.metric("fleetgate_config_reloads_total{result=\"error\"}"),
    )
}

/// Send SIGHUP and wait until that reload is counted; whether it was ok.
fn reload(lb: &Balancer) -> bool {
    let (ok, err) = reloads(lb);
    lb.signal("HUP");
    let mut now = (ok, err);
    assert!(
        eventually(Duration::from_secs(5), || {
            now = reloads(lb);
            now.0 + now.1 > ok + err
        }),
        "SIGHUP was not acted on"
    );
    assert_eq!(now.0 + now.1, ok + err + 1.0, "one SIGHUP, one reload");
    now.0 > ok
}

fn config_text(lb: &Balancer) -> String {
    std::fs::read_to_string(&lb.config).unwrap()
}

#[test]
fn a_reload_that_moves_the_discovery_socket_is_refused_and_names_the_key() {
    let f = LiveLb::start(&LiveOptions::new(INTERVAL));
    let rt = runtime();
    let _ctx = rt.enter();
    let a = IdBackend::start(&rt, "a", &f.pki);
    let _na = f.join("node-a", &a, NodeState::Normal);
    assert!(
        eventually(Duration::from_secs(3), || f.members(POOL).len() == 1),
        "{}",
        f.status()
    );

    let old = f.disc.to_string();
    let moved = free_addr().to_string();
    let text = config_text(&f.lb);
    let line = format!("bind = \"{old}\"");
    assert!(text.contains(&line), "{text}");
    f.lb.write_config(&text.replace(&line, &format!("bind = \"{moved}\"")));
    let errors = reloads(&f.lb).1;
    let ok = reload(&f.lb);
    let log = f.log();
    assert!(
        !ok,
        "a reload moving [discovery] bind from {old} to {moved} was counted ok; /status \
         still says the receiver listens on {}",
        f.status()["discovery"]["listening"]
    );
    assert_eq!(reloads(&f.lb).1, errors + 1.0);
    let said = log
        .lines()
        .find(|l| l.contains("discovery") && l.contains("bind"))
        .unwrap_or_else(|| panic!("no log line names `discovery` and `bind`:\n{log}"));
    assert!(
        said.to_lowercase().contains("restart"),
        "the refusal should say that this needs a restart: {said}"
    );

    // The running configuration stays: heartbeats on the old port work.
    assert_eq!(f.status()["discovery"]["listening"], old.as_str());
    let b = IdBackend::start(&rt, "b", &f.pki);
    let _nb = f.join("node-b", &b, NodeState::Normal);
    assert!(
        eventually(Duration::from_secs(3), || f.node_state("node-b").as_deref()
            == Some("normal")
            && f.members(POOL).len() == 2),
        "a node announced to the old port after the refused reload never appeared: {}",
        f.status()
    );
}

#[test]
fn twenty_reloads_under_keep_alive_load_keep_200_websockets_and_every_request() {
    let f = LiveLb::start(&LiveOptions::new(INTERVAL));
    let rt = runtime();
    let _ctx = rt.enter();
    let a = IdBackend::start(&rt, "a", &f.pki);
    let b = IdBackend::start(&rt, "b", &f.pki);
    let _na = f.join("node-a", &a, NodeState::Normal);
    let _nb = f.join("node-b", &b, NodeState::Normal);
    assert!(
        eventually(Duration::from_secs(3), || f.members(POOL).len() == 2),
        "{}",
        f.status()
    );
    let tls = f.pki.client();
    let mut sockets: Vec<HeldSocket> = rt.block_on(HeldSocket::open_many(f.web, &tls, 200));
    assert_eq!(a.websockets() + b.websockets(), 200);
    let load = KeepAliveLoad::start(&rt, f.web, tls.clone(), 10, "/", Duration::from_millis(1));

    // Two harmless variants, alternated: one more route and another
    // retry count on the pool.
    let base = config_text(&f.lb);
    let route = "  [[listener.route]]\n  name = \"all\"";
    assert!(base.contains(route) && base.contains("retries = 2"));
    let variant = base
        .replacen(
            route,
            &format!("  [[listener.route]]\n  name = \"extra\"\n  path_prefix = \"/extra\"\n  pool = \"{POOL}\"\n\n{route}"),
            1,
        )
        .replacen("retries = 2", "retries = 1", 1);
    for i in 0..20 {
        f.lb.write_config(if i % 2 == 0 { &variant } else { &base });
        assert!(reload(&f.lb), "reload {} refused:\n{}", i + 1, f.log());
        thread::sleep(Duration::from_millis(100));
    }
    let summary = load.stop(&rt);
    let mut cut = Vec::new();
    rt.block_on(async {
        for (i, s) in sockets.iter_mut().enumerate() {
            if let Err(e) = s.echo(&format!("after the reloads, socket {i}")).await {
                cut.push(format!("socket {i} on {}: {e}", s.backend));
            }
        }
    });
    eprintln!(
        "FIGURE 20 reloads: {} requests on 10 keep-alive clients, {} errors, {} reconnects; \
         {} of 200 WebSockets echo afterwards",
        summary.total(),
        summary.errors.len(),
        summary.reconnects,
        200 - cut.len()
    );
    assert!(
        summary.errors.is_empty(),
        "client errors: {:?}",
        summary.errors
    );
    assert_eq!(summary.reconnects, 0);
    assert!(cut.is_empty(), "WebSockets cut by reloads: {cut:?}");
    assert_eq!(a.websockets() + b.websockets(), 200);
    assert_eq!(
        f.lb.metric("fleetgate_config_reloads_total{result=\"ok\"}"),
        20.0
    );
}

/// An offload listener with static pools `a` and `b`; `routes` are its
/// route tables.
fn static_config(
    pki_dir: &std::path::Path,
    front: SocketAddr,
    a: &IdBackend,
    b: &IdBackend,
    routes: &str,
) -> String {
    format!(
        r#"[admin]
bind = "{{admin}}"

[[listener]]
name = "web"
bind = "{front}"
mode = "offload"
tls = {{ cert = "{cert}", key = "{key}" }}
{routes}

  [[listener.route]]
  name = "rest"
  path_prefix = "/"
  pool = "a"

[[pool]]
name = "a"
backends = [{{ address = "{a}" }}]

[[pool]]
name = "b"
backends = [{{ address = "{b}" }}]
"#,
        cert = pki_dir.join("server.pem").display(),
        key = pki_dir.join("server.key").display(),
        a = a.addr,
        b = b.addr,
    )
}

#[test]
fn a_route_added_by_reload_serves_the_next_request_on_an_established_connection() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let rt = runtime();
    let a = IdBackend::start(&rt, "a", &pki);
    let b = IdBackend::start(&rt, "b", &pki);
    let front = free_addr();
    // Pool b is reached only by a path that is not used below, until the
    // reload routes /new to it.
    let before =
        "  [[listener.route]]\n  name = \"other\"\n  path_prefix = \"/other\"\n  pool = \"b\"";
    let after = format!(
        "{before}\n\n  [[listener.route]]\n  name = \"new\"\n  path_prefix = \"/new\"\n  pool = \"b\""
    );
    let pki_dir = dir.path().to_path_buf();
    let (lb, log) = start_logged(dir, &static_config(&pki_dir, front, &a, &b, before));
    let mut conn = rt.block_on(connect(front, pki.client())).unwrap();
    assert_eq!(rt.block_on(get(&mut conn, "/new/x")).unwrap(), "a");

    lb.write_config(&static_config(&pki_dir, front, &a, &b, &after));
    assert!(
        reload(&lb),
        "reload refused: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // A new connection takes the new route...
    let mut fresh = rt.block_on(connect(front, pki.client())).unwrap();
    assert_eq!(rt.block_on(get(&mut fresh, "/new/x")).unwrap(), "b");
    // ...and so does the next request on the connection made before it.
    let next = rt.block_on(get(&mut conn, "/new/x"));
    assert_eq!(
        next.as_deref(),
        Ok("b"),
        "the request after the reload, on the connection established before it, did not \
         take the route the reload added"
    );
    assert_eq!(rt.block_on(get(&mut conn, "/else")).as_deref(), Ok("a"));
}
