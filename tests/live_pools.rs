//! Discovered pools are live: a node's state change reaches connections
//! that were established before it (keep-alive HTTP through an offload
//! listener), new connections of `tcp` and `passthrough` listeners,
//! and never cuts a WebSocket; under churn, clients see no error,
//! upstream keep-alive connections are reused and a backend that health
//! checks took out keeps its verdict. Real `fleetgate run`, heartbeats
//! from the library's announcer, backends answering with their own id.
//! Run with `--nocapture` for the figures.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use common::discovery::ms;
use common::http_ask;
use common::live::*;
use fleetgate::discovery::{Announcer, NodeState};

const INTERVAL: Duration = Duration::from_millis(200);
/// What a state change may take beyond one heartbeat interval to reach
/// the pools (a busy two-core machine runs the balancer, the clients and
/// the backends).
const SETTLE: Duration = Duration::from_millis(300);
/// How long a window of requests is watched after a change has settled.
const WINDOW: Duration = Duration::from_secs(1);

/// A node taken out of rotation: by announcing `draining`, or `leaving`.
#[derive(Debug, Clone, Copy)]
enum Out {
    Draining,
    Leaving,
}

/// Requests each backend served over one `WINDOW`.
fn window(backends: &[&IdBackend]) -> BTreeMap<String, usize> {
    let before = served(backends);
    thread::sleep(WINDOW);
    served_since(&before, backends)
}

fn established_clients_follow(out: Out) {
    let f = LiveLb::start(&LiveOptions::new(INTERVAL));
    let rt = runtime();
    let _ctx = rt.enter();
    let a = IdBackend::start(&rt, "a", &f.pki);
    let b = IdBackend::start(&rt, "b", &f.pki);
    let c = IdBackend::start(&rt, "c", &f.pki);
    let _na = f.join("node-a", &a, NodeState::Normal);
    let nb = f.join("node-b", &b, NodeState::Normal);
    assert!(
        within(Duration::from_secs(3), || f.members(POOL).len() == 2),
        "both nodes should join: {}",
        f.status()
    );

    // Clients connected while a and b are the pool, then kept alive.
    const CLIENTS: usize = 8;
    let load = KeepAliveLoad::start(
        &rt,
        f.web,
        f.pki.client(),
        CLIENTS,
        "/",
        Duration::from_millis(2),
    );
    assert!(
        within(Duration::from_secs(5), || a.requests() > 0
            && b.requests() > 0),
        "round robin should use both nodes: {:?}",
        load.by_id()
    );

    match out {
        Out::Draining => nb.set_state(NodeState::Draining),
        Out::Leaving => rt.block_on(nb.leave()),
    }
    thread::sleep(INTERVAL + SETTLE);
    let shown = f.node_state("node-b");
    match out {
        Out::Draining => assert_eq!(shown.as_deref(), Some("draining"), "{}", f.status()),
        Out::Leaving => assert_eq!(shown, None, "{}", f.status()),
    }
    let w = window(&[&a, &b]);
    assert_eq!(
        w["b"],
        0,
        "node-b went {out:?}, yet {} requests on the clients' established connections reached \
         it in {WINDOW:?} starting {} ms after the change (a served {})",
        w["b"],
        (INTERVAL + SETTLE).as_millis(),
        w["a"]
    );
    assert!(w["a"] > 0, "nothing served: {w:?}");

    // A node that joins now gets requests from the same client connections.
    let joined = Instant::now();
    let _nc = f.join("node-c", &c, NodeState::Normal);
    let reached = within(Duration::from_secs(3), || c.requests() > 0);
    assert!(
        reached,
        "node-c joined (in /status: {:?}) but the {CLIENTS} established connections sent it \
         nothing in 3 s; answers so far {:?}",
        f.node_state("node-c"),
        load.by_id()
    );
    let took = joined.elapsed();
    let w = window(&[&a, &b, &c]);
    let summary = load.stop(&rt);
    eprintln!(
        "FIGURE {out:?}: node-b served 0 of {} requests in the window after the change; \
         node-c's first request {:.0} ms after it joined; then a {} / c {} per {WINDOW:?}",
        w["a"] + w["c"],
        ms(took),
        w["a"],
        w["c"]
    );
    assert!(
        summary.errors.is_empty(),
        "client errors: {:?}",
        summary.errors
    );
    assert_eq!(
        summary.reconnects, 0,
        "clients had to reconnect: the requests did not all come from the first connections"
    );
    assert_eq!(w["b"], 0, "node-b got requests again: {w:?}");
    assert!(w["c"] > 0 && w["a"] > 0, "{w:?}");
}

#[test]
fn established_keep_alive_clients_leave_a_draining_node_and_reach_a_joining_one() {
    established_clients_follow(Out::Draining);
}

#[test]
fn established_keep_alive_clients_leave_a_leaving_node_and_reach_a_joining_one() {
    established_clients_follow(Out::Leaving);
}

#[test]
fn established_keep_alive_clients_use_an_update_node_only_while_no_normal_node_is_up() {
    let f = LiveLb::start(&LiveOptions::new(INTERVAL));
    let rt = runtime();
    let _ctx = rt.enter();
    let n = IdBackend::start(&rt, "normal", &f.pki);
    let u = IdBackend::start(&rt, "update", &f.pki);
    let nn = f.join("node-n", &n, NodeState::Normal);
    let _nu = f.join("node-u", &u, NodeState::Update);
    assert!(
        within(Duration::from_secs(3), || f.members(POOL).len() == 2),
        "{}",
        f.status()
    );
    let load = KeepAliveLoad::start(&rt, f.web, f.pki.client(), 6, "/", Duration::from_millis(2));
    let w = window(&[&n, &u]);
    assert!(
        w["update"] == 0 && w["normal"] > 0,
        "the update node was used while a normal one is up: {w:?}"
    );

    // No normal node left: the update node takes the same connections' requests.
    nn.set_state(NodeState::Draining);
    thread::sleep(INTERVAL + SETTLE);
    let w = window(&[&n, &u]);
    assert!(
        w["update"] > 0 && w["normal"] == 0,
        "node-n is draining and node-u the only one left, yet the established connections \
         went: {w:?}"
    );

    // Normal again: the update node is left alone again.
    nn.set_state(NodeState::Normal);
    thread::sleep(INTERVAL + SETTLE);
    let w = window(&[&n, &u]);
    assert!(
        w["update"] == 0 && w["normal"] > 0,
        "node-n is normal again, yet: {w:?}"
    );
    let summary = load.stop(&rt);
    assert!(summary.errors.is_empty(), "{:?}", summary.errors);
    assert_eq!(summary.reconnects, 0);
}

/// `k` answers from new connections to the `tcp` listener (plain HTTP)
/// and `k` from the `passthrough` listener (TLS with the backend).
fn new_connections(f: &LiveLb, rt: &tokio::runtime::Runtime, k: usize) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for _ in 0..k {
        let l4 = match http_ask(f.l4) {
            Ok((200, body)) => body,
            other => format!("error: {other:?}"),
        };
        out.push(("l4".to_string(), l4));
        let pt = rt
            .block_on(get_once(f.pt, f.pki.client()))
            .unwrap_or_else(|e| format!("error: {e}"));
        out.push(("pt".to_string(), pt));
    }
    out
}

fn only(answers: &[(String, String)], allowed: &[&str], when: &str) {
    let bad: Vec<_> = answers
        .iter()
        .filter(|(_, id)| !allowed.contains(&id.as_str()))
        .collect();
    assert!(
        bad.is_empty(),
        "{when}: new connections answered by {bad:?}; only {allowed:?} may answer"
    );
}

fn each_listener_reached(answers: &[(String, String)], id: &str) -> bool {
    ["l4", "pt"]
        .iter()
        .all(|l| answers.iter().any(|(ll, a)| ll == l && a == id))
}

#[test]
fn tcp_and_passthrough_listeners_send_new_connections_by_the_current_pool() {
    let f = LiveLb::start(&LiveOptions::new(INTERVAL));
    let rt = runtime();
    let _ctx = rt.enter();
    let a = IdBackend::start(&rt, "a", &f.pki);
    let b = IdBackend::start(&rt, "b", &f.pki);
    let c = IdBackend::start(&rt, "c", &f.pki);
    let na = f.join("node-a", &a, NodeState::Normal);
    let nb = f.join("node-b", &b, NodeState::Normal);
    assert!(
        within(Duration::from_secs(3), || f.members(POOL).len() == 2
            && f.members(POOL_TLS).len() == 2),
        "{}",
        f.status()
    );
    let v = new_connections(&f, &rt, 10);
    only(&v, &["a", "b"], "at start");
    assert!(each_listener_reached(&v, "b"), "{v:?}");

    nb.set_state(NodeState::Draining);
    thread::sleep(INTERVAL + SETTLE);
    only(&new_connections(&f, &rt, 20), &["a"], "node-b draining");

    let nc = f.join("node-c", &c, NodeState::Normal);
    let mut seen = Vec::new();
    assert!(
        within(Duration::from_secs(3), || {
            seen.extend(new_connections(&f, &rt, 2));
            each_listener_reached(&seen, "c")
        }),
        "node-c joined but new connections never reached it on both listeners: {seen:?}"
    );
    only(&seen, &["a", "c"], "node-c joining");

    // An update node: only while no normal node is up.
    nb.set_state(NodeState::Update);
    thread::sleep(INTERVAL + SETTLE);
    only(
        &new_connections(&f, &rt, 20),
        &["a", "c"],
        "node-b update, a and c normal",
    );
    na.set_state(NodeState::Draining);
    nc.set_state(NodeState::Draining);
    thread::sleep(INTERVAL + SETTLE);
    only(
        &new_connections(&f, &rt, 10),
        &["b"],
        "node-b update, the others draining",
    );
    na.set_state(NodeState::Normal);
    thread::sleep(INTERVAL + SETTLE);
    only(
        &new_connections(&f, &rt, 20),
        &["a"],
        "node-a normal again, node-b update, node-c draining",
    );

    // Leaving: gone for new connections at once.
    nb.set_state(NodeState::Normal);
    thread::sleep(INTERVAL + SETTLE);
    let v = new_connections(&f, &rt, 10);
    only(&v, &["a", "b"], "node-a and node-b normal");
    rt.block_on(nb.leave());
    thread::sleep(INTERVAL + SETTLE);
    only(&new_connections(&f, &rt, 20), &["a"], "node-b left");
}

#[test]
fn offload_websockets_are_not_cut_when_their_node_drains() {
    let f = LiveLb::start(&LiveOptions::new(INTERVAL));
    let rt = runtime();
    let _ctx = rt.enter();
    let a = IdBackend::start(&rt, "a", &f.pki);
    let b = IdBackend::start(&rt, "b", &f.pki);
    let _na = f.join("node-a", &a, NodeState::Normal);
    let nb = f.join("node-b", &b, NodeState::Normal);
    assert!(
        within(Duration::from_secs(3), || f.members(POOL).len() == 2),
        "{}",
        f.status()
    );
    let tls = f.pki.client();
    let mut sockets: Vec<HeldSocket> = rt.block_on(HeldSocket::open_many(f.web, &tls, 10));
    let on_b = sockets.iter().filter(|s| s.backend == "b").count();
    assert!(on_b > 0, "round robin put no WebSocket on node-b");
    assert_eq!(b.websockets(), on_b);

    nb.set_state(NodeState::Draining);
    thread::sleep(INTERVAL + SETTLE);
    assert_eq!(f.node_state("node-b").as_deref(), Some("draining"));
    // Several heartbeats (and whatever they change) later, every WebSocket
    // still echoes on the server it started on.
    for round in 0..5 {
        rt.block_on(async {
            for (i, s) in sockets.iter_mut().enumerate() {
                let msg = format!("round {round} socket {i} on {}", s.backend);
                s.echo(&msg)
                    .await
                    .unwrap_or_else(|e| panic!("{msg}: cut after node-b went draining: {e}"));
            }
        });
        thread::sleep(INTERVAL);
    }
    assert_eq!(
        b.websockets(),
        on_b,
        "node-b's WebSockets must stay open while it drains"
    );
    // New WebSockets go elsewhere.
    let fresh: Vec<String> = rt.block_on(async {
        let mut v = Vec::new();
        for _ in 0..5 {
            v.push(HeldSocket::open(f.web, tls.clone()).await.unwrap().backend);
        }
        v
    });
    assert!(fresh.iter().all(|id| id == "a"), "{fresh:?}");
    eprintln!(
        "FIGURE websockets: {on_b} of 10 on node-b kept echoing through 5 rounds over {} ms of \
         draining; 5 new ones all on node-a",
        (INTERVAL * 5 + SETTLE).as_millis()
    );
}

/// A state machine for one churning node: each call gives its next state.
struct Churner {
    cycle: &'static [NodeState],
    next: usize,
    state: NodeState,
}

impl Churner {
    fn new(cycle: &'static [NodeState]) -> Churner {
        Churner {
            cycle,
            next: 0,
            state: NodeState::Normal,
        }
    }

    fn step(&mut self) -> NodeState {
        loop {
            let s = self.cycle[self.next % self.cycle.len()];
            self.next += 1;
            if s != self.state {
                self.state = s;
                return s;
            }
        }
    }
}

#[test]
fn discovery_churn_under_keep_alive_load_costs_no_error_and_keeps_upstream_connections() {
    use NodeState::*;
    const CLIENTS: usize = 20;
    const NODES: usize = 4;
    const CHANGES: usize = 200;
    const EVERY: Duration = Duration::from_millis(75);
    let f = LiveLb::start(&LiveOptions::new(INTERVAL));
    let rt = runtime();
    let _ctx = rt.enter();
    let backends: Vec<IdBackend> = (0..NODES)
        .map(|i| IdBackend::start(&rt, &format!("n{i}"), &f.pki))
        .collect();
    let mut announcers: Vec<Option<Announcer>> = backends
        .iter()
        .map(|b| Some(f.join(&format!("node-{}", b.id), b, Normal)))
        .collect();
    assert!(
        within(Duration::from_secs(3), || f.members(POOL).len() == NODES),
        "{}",
        f.status()
    );
    let all: Vec<&IdBackend> = backends.iter().collect();
    let load = KeepAliveLoad::start(&rt, f.web, f.pki.client(), CLIENTS, "/", Duration::ZERO);

    // n0 stays normal and n1 only moves between normal and update, so both
    // stay members throughout; n2 and n3 also drain; n3 once leaves and
    // joins again (a new boot of the same node).
    let mut churners = [
        None,
        Some(Churner::new(&[Update, Normal])),
        Some(Churner::new(&[Draining, Normal, Update, Normal])),
        Some(Churner::new(&[Update, Normal, Draining, Normal])),
    ];
    let order = [1, 2, 3, 2, 3];
    let started = Instant::now();
    for i in 0..CHANGES {
        let node = order[i % order.len()];
        if i == CHANGES / 2 {
            let a = announcers[3].take().unwrap();
            rt.block_on(a.leave());
        } else if i == CHANGES / 2 + 1 {
            announcers[3] = Some(f.join("node-n3", &backends[3], Normal));
            churners[3].as_mut().unwrap().state = Normal;
        } else {
            let state = churners[node].as_mut().unwrap().step();
            if let Some(a) = &announcers[node] {
                a.set_state(state);
            }
        }
        thread::sleep(EVERY);
    }
    let churn = started.elapsed();
    let during = load.total();
    let errors_during = load.errors();

    // The end state: n2 draining, the others normal. The clients'
    // connections (made before all the churn) must follow it.
    for (i, s) in [Normal, Normal, Draining, Normal].into_iter().enumerate() {
        announcers[i].as_ref().unwrap().set_state(s);
    }
    thread::sleep(INTERVAL + SETTLE);
    let w = window(&all);
    let summary = load.stop(&rt);
    let metrics = f.lb.metrics();
    let by_backend = connect_counts(&metrics, POOL);
    let connect_sum: f64 = by_backend.values().sum();
    let stay: Vec<(String, usize, f64)> = backends[..2]
        .iter()
        .map(|b| {
            let m = by_backend.get(&b.addr.to_string()).copied().unwrap_or(0.0);
            (b.id.clone(), b.connections(), m)
        })
        .collect();
    eprintln!(
        "FIGURE churn: {CHANGES} state changes in {:.1} s under {CLIENTS} keep-alive clients: \
         {during} requests ({:.0}/s), {} client errors, {} reconnects; upstream connects \
         (fleetgate_backend_connect_duration_seconds_count) {connect_sum} in all, by backend {by_backend:?}; \
         TCP connections accepted by node: {:?}; after the churn, per {WINDOW:?}: {w:?}",
        churn.as_secs_f64(),
        during as f64 / churn.as_secs_f64(),
        summary.errors.len(),
        summary.reconnects,
        all.iter()
            .map(|b| (b.id.clone(), b.connections()))
            .collect::<Vec<_>>(),
    );
    assert!(
        errors_during.is_empty() && summary.errors.is_empty(),
        "client errors: {:?}",
        summary.errors
    );
    assert_eq!(summary.reconnects, 0, "clients lost their connections");
    assert!(during >= 1000, "too little load: {during} requests");
    assert_eq!(
        w["n2"], 0,
        "after the churn node-n2 is draining, yet the clients' connections sent it {} \
         requests in {WINDOW:?}: {w:?}",
        w["n2"]
    );
    assert!(
        w["n0"] > 0 && w["n1"] > 0 && w["n3"] > 0,
        "every normal node (n3 after leaving and joining again) serves the established \
         connections: {w:?}"
    );
    // The balancer forgets the series of a backend that leaves the pool,
    // so this sum leaves out what nodes that drained or left had opened;
    // the nodes' own counts above are the full picture.
    let bound = 4 * CLIENTS * NODES;
    assert!(
        connect_sum <= bound as f64,
        "{connect_sum} upstream connects for {during} requests and {CHANGES} changes \
         (bound {bound}): keep-alive connections are not reused across changes"
    );
    for (id, accepted, counted) in stay {
        assert!(
            accepted <= 2 * CLIENTS && counted <= (2 * CLIENTS) as f64,
            "node-{id} stayed in the pool throughout, yet accepted {accepted} connections \
             ({counted} counted by the balancer) for {CLIENTS} clients: its keep-alive \
             connections were not reused across the changes"
        );
    }
}

const HEALTH: &str = "health_check = { kind = \"http\", path = \"/health\", expect = 200, interval = \"100ms\", timeout = \"500ms\", rise = 3, fall = 2 }";

fn member_up(f: &LiveLb, addr: SocketAddr) -> Option<bool> {
    f.member(addr).and_then(|m| m["up"].as_bool())
}

#[test]
fn a_backend_taken_out_by_health_checks_stays_out_through_churn_until_rise_probes_pass() {
    use NodeState::*;
    let mut o = LiveOptions::new(INTERVAL);
    o.pool_extra = HEALTH.into();
    let f = LiveLb::start(&o);
    let rt = runtime();
    let _ctx = rt.enter();
    let sick = IdBackend::start(&rt, "sick", &f.pki);
    sick.set_health(503);
    let others: Vec<IdBackend> = (1..4)
        .map(|i| IdBackend::start(&rt, &format!("n{i}"), &f.pki))
        .collect();
    let _ns = f.join("node-sick", &sick, Normal);
    let announcers: Vec<Announcer> = others
        .iter()
        .map(|b| f.join(&format!("node-{}", b.id), b, Normal))
        .collect();
    assert!(
        within(Duration::from_secs(5), || f.members(POOL).len() == 4
            && member_up(&f, sick.addr) == Some(false)),
        "the backend answering 503 on {HEALTH_PATH} was never taken out: {}",
        f.status()
    );
    let load = KeepAliveLoad::start(&rt, f.web, f.pki.client(), 6, "/", Duration::from_millis(2));
    // Requests already on their way when it went down may still land.
    thread::sleep(Duration::from_millis(200));
    let sick_served = sick.requests();

    // Other nodes change state every 100 ms (a probe interval): it stays
    // out. n1 stays normal so that the clients always have a backend.
    let mut churners: Vec<Churner> = (0..others.len())
        .map(|_| Churner::new(&[Draining, Normal, Update, Normal]))
        .collect();
    let mut change = 0usize;
    let mut churn_once = || {
        let i = 1 + change % (announcers.len() - 1);
        announcers[i].set_state(churners[i].step());
        change += 1;
        thread::sleep(Duration::from_millis(100));
    };
    for _ in 0..30 {
        churn_once();
        let up = member_up(&f, sick.addr);
        assert_eq!(
            up,
            Some(false),
            "after {change} state changes of other nodes the sick backend is {up:?} in /status"
        );
    }
    assert_eq!(
        sick.requests(),
        sick_served,
        "the sick backend got requests while health checks had it out"
    );

    // Healthy again: back once `rise` (3) probes pass, churn or not.
    let probes_before = sick.probes();
    sick.set_health(200);
    let mut back = false;
    for _ in 0..60 {
        churn_once();
        if member_up(&f, sick.addr) == Some(true) {
            back = true;
            break;
        }
    }
    let probes = sick.probes() - probes_before;
    assert!(
        back,
        "the backend answers 200 again, but after {change} state changes of other nodes (one \
         per probe interval) and {probes} probes it is still out: {}",
        f.status()
    );
    assert!(
        probes >= 3,
        "back after only {probes} good probes (rise = 3)"
    );
    let summary = load.stop(&rt);
    assert!(summary.errors.is_empty(), "{:?}", summary.errors);
    eprintln!(
        "FIGURE health through churn: out through 30 changes of other nodes, back after {probes} \
         good probes; {} requests, 0 errors",
        summary.total()
    );
}
