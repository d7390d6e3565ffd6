//! Discovery end to end on 127.0.0.1: heartbeats from the library
//! `Announcer`, from raw `wire::encode` datagrams and from the real
//! `fleetgate agent`, into the real `fleetgate run`, whose pool is learned
//! from them. The tests print the figures operators ask about (join and
//! removal latencies, client errors on a crash, the receiver's CPU cost);
//! run with `--nocapture` to see them.

mod common;

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::discovery::*;
use common::*;
use fleetgate::discovery::{unix_ms, wire, Announcer, Heartbeat, NodeState, Service, Token};

const POLICY: &str = "max_fails = 1\nfail_timeout = \"1s\"\nconnect_timeout = \"1s\"\nretries = 2";

/// Poll `cond` every `every` until it holds or `within` passes; the time
/// it took, or None. Finer than `eventually` (20 ms) for latency figures.
fn wait_for(within: Duration, every: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    loop {
        if cond() {
            return Some(t0.elapsed());
        }
        if t0.elapsed() > within {
            return None;
        }
        thread::sleep(every);
    }
}

/// Block until the announcer has just sent a heartbeat (within ~0.2 ms):
/// the moment of the last heartbeat is then known precisely.
fn right_after_a_heartbeat(a: &Announcer, interval: Duration) -> Instant {
    let n = a.sent();
    let deadline = Instant::now() + interval * 3;
    while a.sent() == n {
        assert!(Instant::now() < deadline, "the announcer stopped sending");
        thread::sleep(Duration::from_micros(200));
    }
    Instant::now()
}

fn addr_string(a: std::net::SocketAddr) -> String {
    a.to_string()
}

#[test]
fn a_discovered_pool_serves_within_one_interval_of_the_first_heartbeat() {
    let interval = Duration::from_millis(200);
    let f = DiscoveryLb::start(interval, 3, POLICY);
    let rt = tokio_rt();
    let _ctx = rt.enter();
    assert_eq!(
        ask(f.front).unwrap_or_default(),
        "",
        "a discovered pool without heartbeats has no backend"
    );
    let mut joins = Vec::new();
    for i in 0..5 {
        let name = format!("join-{i}");
        let backend = NamedBackend::start(&name);
        let t0 = Instant::now();
        let a =
            Announcer::start(f.announce(&name, backend.addr.port(), NodeState::Normal)).unwrap();
        let mut got = String::new();
        while got != name && t0.elapsed() < Duration::from_secs(3) {
            got = ask(f.front).unwrap_or_default();
            if got != name {
                thread::sleep(Duration::from_micros(300));
            }
        }
        let join = t0.elapsed();
        assert_eq!(got, name, "never served through the discovered pool");
        joins.push(join);
        rt.block_on(a.leave());
        assert!(
            eventually(Duration::from_secs(2), || f.member_addrs().is_empty()),
            "the node left but is still in the pool: {:?}",
            f.members()
        );
    }
    joins.sort();
    eprintln!(
        "FIGURE join latency (first heartbeat sent -> first connection served), 5 joins, \
         interval {} ms: min {:.1} ms, median {:.1} ms, max {:.1} ms",
        interval.as_millis(),
        ms(joins[0]),
        ms(joins[2]),
        ms(joins[4]),
    );
    assert!(
        joins[4] <= interval + Duration::from_millis(100),
        "a join took {:.1} ms, more than one interval ({} ms) + 100 ms",
        ms(joins[4]),
        interval.as_millis()
    );
}

#[test]
fn a_draining_node_gets_no_new_connections_while_established_ones_flow() {
    let interval = Duration::from_millis(200);
    let f = DiscoveryLb::start(interval, 3, POLICY);
    let rt = tokio_rt();
    let _ctx = rt.enter();
    let a_srv = EchoBackend::start("a");
    let b_srv = EchoBackend::start("b");
    let a = Announcer::start(f.announce("node-a", a_srv.addr.port(), NodeState::Normal)).unwrap();
    let _b = Announcer::start(f.announce("node-b", b_srv.addr.port(), NodeState::Normal)).unwrap();
    assert!(
        eventually(Duration::from_secs(3), || f.member_addrs().len() == 2),
        "both nodes should join: {:?}",
        f.status()
    );

    // An established connection through node-a (round robin: a few tries).
    let mut held = None;
    for _ in 0..10 {
        let (name, conn) = open_line(f.front).unwrap();
        if name == "a" {
            held = Some(conn);
            break;
        }
    }
    let mut held = held.expect("round robin never picked node-a");
    assert_eq!(echo(&mut held, "before").unwrap(), "before");

    a.set_state(NodeState::Draining);
    let only_b = vec![addr_string(b_srv.addr)];
    let seen = wait_for(Duration::from_secs(2), Duration::from_millis(2), || {
        let st = f.status();
        state_of(&status_node(&st, "node-a")).as_deref() == Some("draining")
            && eligible_addrs(&pool_members(&st, POOL)) == only_b
    })
    .unwrap_or_else(|| {
        panic!(
            "node-a never shown draining and out of the pool: {}",
            f.status()
        )
    });

    // New connections all go to b, while the established one through a
    // keeps flowing across several heartbeats (and pool rebuilds).
    let a_accepted = a_srv.accepted();
    for i in 0..20 {
        let (name, _conn) = open_line(f.front).unwrap();
        assert_eq!(name, "b", "new connection {i} went to the draining node");
        let msg = format!("during-{i}");
        assert_eq!(
            echo(&mut held, &msg).unwrap(),
            msg,
            "the established connection through the draining node broke"
        );
        thread::sleep(interval / 4);
    }
    assert_eq!(
        a_srv.accepted(),
        a_accepted,
        "the draining backend accepted new connections"
    );
    assert!(
        eventually(Duration::from_secs(2), || {
            f.metric("fleetgate_discovery_nodes{state=\"draining\"}") == 1.0
                && f.metric("fleetgate_discovery_nodes{state=\"normal\"}") == 1.0
        }),
        "node gauges: {}",
        f.lb.metrics()
    );

    // Back to normal: new connections reach a again; the old one still flows.
    a.set_state(NodeState::Normal);
    assert!(
        eventually(Duration::from_secs(2), || {
            open_line(f.front).is_ok_and(|(n, _)| n == "a")
        }),
        "node-a back in normal state never got a new connection"
    );
    assert_eq!(echo(&mut held, "after").unwrap(), "after");
    eprintln!(
        "FIGURE draining: shown in /status and out of the pool {:.1} ms after the state change; \
         20 new connections all went elsewhere; the established connection kept flowing",
        ms(seen)
    );
}

#[test]
fn a_silent_node_goes_after_miss_limit_intervals_and_a_leaving_one_at_once() {
    let interval = Duration::from_millis(200);
    let miss_limit = 3;
    let f = DiscoveryLb::start(interval, miss_limit, POLICY);
    let rt = tokio_rt();
    let _ctx = rt.enter();
    let s_srv = NamedBackend::start("silent");
    let l_srv = NamedBackend::start("leaver");
    let s = Announcer::start(f.announce("silent", s_srv.addr.port(), NodeState::Normal)).unwrap();
    let l = Announcer::start(f.announce("leaver", l_srv.addr.port(), NodeState::Normal)).unwrap();
    assert!(
        eventually(Duration::from_secs(3), || f.member_addrs().len() == 2),
        "{}",
        f.status()
    );
    let max_silence = interval * miss_limit;

    // Kept while heard, over several max-silence periods.
    thread::sleep(max_silence * 2);
    assert!(
        f.node("silent").is_some() && f.node("leaver").is_some(),
        "a node that keeps sending was removed: {}",
        f.status()
    );
    let age_series = "fleetgate_discovery_last_heartbeat_age_seconds{node=\"silent\"}";
    assert!(
        f.lb.metrics().contains(age_series),
        "no heartbeat age for a live node"
    );
    let age = f.metric(age_series);
    assert!(
        age < (interval * 2).as_secs_f64(),
        "heartbeat age {age} s for a node sending every {interval:?}"
    );

    // Silence, starting right after a heartbeat.
    let last = right_after_a_heartbeat(&s, interval);
    drop(s);
    wait_for(Duration::from_secs(3), Duration::from_millis(2), || {
        f.node("silent").is_none()
    })
    .unwrap_or_else(|| panic!("silent node never removed: {}", f.status()));
    let silent_removal = last.elapsed();
    // Slack for a busy machine noticing the send late; removing one
    // interval early would still fail.
    assert!(
        silent_removal + interval / 4 >= max_silence,
        "removed {:.1} ms after its last heartbeat, before miss_limit × interval ({:?})",
        ms(silent_removal),
        max_silence
    );
    // The expiry loop looks twice per interval.
    assert!(
        silent_removal <= max_silence + interval + Duration::from_millis(200),
        "removed only {:.1} ms after its last heartbeat (miss_limit × interval = {:?})",
        ms(silent_removal),
        max_silence
    );
    assert_eq!(f.member_addrs(), vec![addr_string(l_srv.addr)]);
    for _ in 0..5 {
        assert_eq!(ask(f.front).unwrap(), "leaver");
    }

    // Leaving: removed at once, long before it could have gone silent.
    let t0 = Instant::now();
    let bye = rt.spawn(l.leave());
    wait_for(Duration::from_secs(3), Duration::from_millis(1), || {
        f.node("leaver").is_none()
    })
    .unwrap_or_else(|| panic!("leaving node never removed: {}", f.status()));
    let leave_removal = t0.elapsed();
    rt.block_on(bye).unwrap();
    assert!(
        leave_removal < interval,
        "a leaving node was removed only after {:.1} ms",
        ms(leave_removal)
    );
    assert!(f.member_addrs().is_empty(), "{:?}", f.members());
    assert_eq!(ask(f.front).unwrap_or_default(), "", "pool should be empty");
    assert!(
        eventually(Duration::from_secs(2), || {
            let m = f.lb.metrics();
            metric_value(&m, "fleetgate_discovery_nodes{state=\"normal\"}") == 0.0
                && !m.contains("node=\"silent\"")
                && !m.contains("node=\"leaver\"")
        }),
        "gauges of removed nodes linger: {}",
        f.lb.metrics()
    );
    eprintln!(
        "FIGURE removal: silent node {:.1} ms after its last heartbeat (miss_limit {} × interval {} ms \
         = {} ms); leaving node {:.1} ms after leave()",
        ms(silent_removal),
        miss_limit,
        interval.as_millis(),
        max_silence.as_millis(),
        ms(leave_removal)
    );
}

#[test]
fn a_crashed_server_costs_no_client_connection() {
    let interval = Duration::from_millis(200);
    let f = DiscoveryLb::start(interval, 3, POLICY);
    let rt = tokio_rt();
    let _ctx = rt.enter();
    let mut a_srv = NamedBackend::start("a");
    let b_srv = NamedBackend::start("b");
    let a_addr = addr_string(a_srv.addr);
    let _a = Announcer::start(f.announce("node-a", a_srv.addr.port(), NodeState::Normal)).unwrap();
    let _b = Announcer::start(f.announce("node-b", b_srv.addr.port(), NodeState::Normal)).unwrap();
    assert!(
        eventually(Duration::from_secs(3), || f.member_addrs().len() == 2),
        "{}",
        f.status()
    );

    let front = f.front;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
            thread::spawn(move || {
                let started = Instant::now();
                while !stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(30) {
                    match ask(front) {
                        Ok(name) if name == "a" || name == "b" => {}
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
    assert!(eventually(Duration::from_secs(10), || done
        .load(Ordering::SeqCst)
        >= 300));
    let a_served = a_srv.served();
    assert!(a_served > 0, "node-a served nothing before the crash");

    // The server's port closes; its heartbeats go on (the announcer does
    // not know): passive failure and retry must hide it from clients.
    let at_crash = done.load(Ordering::SeqCst);
    let t0 = Instant::now();
    a_srv.stop();
    wait_for(Duration::from_secs(5), Duration::from_millis(2), || {
        f.members()
            .iter()
            .any(|m| m["address"] == a_addr.as_str() && m["up"] == false)
    })
    .unwrap_or_else(|| panic!("the crashed backend was never marked down: {}", f.status()));
    let crash_out = t0.elapsed();
    // Past fail_timeout (1 s): the backend is tried again, refused again.
    thread::sleep(Duration::from_millis(2500));
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }
    let total = done.load(Ordering::SeqCst);
    let errors = failed.load(Ordering::SeqCst);
    let passive = f.metric(&format!(
        "fleetgate_backend_connect_failures_total{{backend=\"{a_addr}\",pool=\"{POOL}\"}}"
    ));
    eprintln!(
        "FIGURE crash: {} requests ({} after the port closed): client errors {errors}, \
         passive connect failures on the crashed backend {passive}, marked down in /status \
         {:.1} ms after the crash",
        total,
        total - at_crash,
        ms(crash_out)
    );
    assert_eq!(errors, 0, "clients saw errors");
    assert!(passive >= 1.0, "the refused connects were not counted");
    assert!(
        state_of(&f.node("node-a")).as_deref() == Some("normal"),
        "the node still announces normal: it stays registered"
    );
    assert!(total - at_crash >= 100, "too little load after the crash");
}

#[test]
fn an_update_node_is_used_only_while_no_normal_node_is_up() {
    let interval = Duration::from_millis(200);
    let f = DiscoveryLb::start(interval, 3, POLICY);
    let rt = tokio_rt();
    let _ctx = rt.enter();
    let mut n_srv = NamedBackend::start("normal");
    let u_srv = NamedBackend::start("update");
    let n = Announcer::start(f.announce("node-n", n_srv.addr.port(), NodeState::Normal)).unwrap();
    let _u = Announcer::start(f.announce("node-u", u_srv.addr.port(), NodeState::Update)).unwrap();
    assert!(
        eventually(Duration::from_secs(3), || f.member_addrs().len() == 2),
        "{}",
        f.status()
    );
    let members = f.members();
    let u_member = members
        .iter()
        .find(|m| m["node"] == "node-u")
        .expect("update node in the pool");
    assert_eq!(u_member["node_state"], "update");
    assert_eq!(u_member["backup"], true, "an update node is a backup");
    let names = |k: usize| -> Vec<String> {
        (0..k)
            .map(|_| ask(f.front).unwrap_or_else(|e| format!("error: {e}")))
            .collect()
    };
    let all = |v: &[String], want: &str| v.iter().all(|n| n == want);

    let v = names(20);
    assert!(
        all(&v, "normal"),
        "update node used while normal is up: {v:?}"
    );

    // No normal node: the update node takes the traffic.
    n.set_state(NodeState::Draining);
    assert!(eventually(Duration::from_secs(2), || f.member_addrs()
        == vec![addr_string(u_srv.addr)]));
    let v = names(10);
    assert!(all(&v, "update"), "{v:?}");

    // Normal again: the update node is left alone again.
    n.set_state(NodeState::Normal);
    assert!(eventually(Duration::from_secs(2), || f
        .member_addrs()
        .len()
        == 2));
    let v = names(10);
    assert!(all(&v, "normal"), "{v:?}");

    // The normal node announces normal but its port is closed: once it is
    // out passively, the update node serves, without a client error.
    n_srv.stop();
    let v = names(20);
    assert!(all(&v, "update"), "{v:?}");
    assert_eq!(u_srv.served(), 30);
}

#[test]
fn wrong_token_replayed_and_other_bad_datagrams_are_counted_by_reason() {
    let f = DiscoveryLb::start(Duration::from_secs(1), 3, POLICY);
    let srv = NamedBackend::start("raw");
    let metrics = f.lb.metrics();
    for reason in [
        "malformed",
        "unsupported_version",
        "bad_mac",
        "replay",
        "stale",
        "other_cluster",
        "conflict",
    ] {
        let series =
            format!("fleetgate_discovery_heartbeats_rejected_total{{reason=\"{reason}\"}} 0");
        assert!(metrics.contains(&series), "{series} missing at start");
    }
    assert!(metrics.contains("fleetgate_discovery_heartbeats_total 0"));

    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let send = |bytes: &[u8]| {
        sock.send_to(bytes, f.disc).unwrap();
    };
    let base = unix_ms();
    let hb = |boot_id: u64, seq: u64, sent_at_ms: u64| Heartbeat {
        cluster: CLUSTER.into(),
        node: "raw-01".into(),
        boot_id,
        seq,
        sent_at_ms,
        state: NodeState::Normal,
        weight: 70,
        load: Some(250),
        addr: None,
        services: vec![Service {
            name: SERVICE.into(),
            port: srv.addr.port(),
            tls: false,
        }],
    };
    let (x, y) = (0x0bad_cafe_0000_0001u64, 0x0bad_cafe_0000_0002u64);
    let expect = |accepted: f64, reason: &str, n: f64| {
        assert!(
            eventually(Duration::from_secs(3), || f.accepted() == accepted
                && (reason.is_empty() || f.rejected(reason) == n)),
            "expected {accepted} accepted and {n} {reason}: {}",
            f.lb.metrics()
        );
    };

    let good = wire::encode(&hb(x, 1, base), &f.token).unwrap();
    send(&good);
    expect(1.0, "", 0.0);
    // The same datagram again: a replay.
    send(&good);
    expect(1.0, "replay", 1.0);
    // Signed with another token.
    let other = Token::from_bytes([7; 32]);
    send(&wire::encode(&hb(x, 2, base + 1), &other).unwrap());
    expect(1.0, "bad_mac", 1.0);
    // The refused datagram did not use up sequence 2.
    send(&wire::encode(&hb(x, 2, base + 1), &f.token).unwrap());
    expect(2.0, "", 0.0);
    // An old sequence number with a fresh time is still a replay.
    send(&wire::encode(&hb(x, 1, base + 2), &f.token).unwrap());
    expect(2.0, "replay", 2.0);
    // A restart (new boot id, newer time) is accepted at once...
    send(&wire::encode(&hb(y, 1, base + 3), &f.token).unwrap());
    expect(3.0, "", 0.0);
    // ...and the boot it replaced speaking again is a conflict.
    send(&wire::encode(&hb(x, 3, base + 4), &f.token).unwrap());
    expect(3.0, "conflict", 1.0);
    // Two minutes old: stale.
    send(&wire::encode(&hb(y, 2, base - 120_000), &f.token).unwrap());
    expect(3.0, "stale", 1.0);
    // Another cluster sharing the token.
    let mut oc = hb(y, 3, base + 5);
    oc.cluster = "elsewhere".into();
    send(&wire::encode(&oc, &f.token).unwrap());
    expect(3.0, "other_cluster", 1.0);
    // Not a heartbeat at all; a heartbeat of a future version.
    send(b"hello");
    expect(3.0, "malformed", 1.0);
    let mut v2 = wire::encode(&hb(y, 4, base + 6), &f.token).unwrap();
    v2[4] = 2;
    send(&v2);
    expect(3.0, "unsupported_version", 1.0);
    // Every rejection counted once, nothing else.
    for (reason, n) in [
        ("replay", 2.0),
        ("bad_mac", 1.0),
        ("conflict", 1.0),
        ("stale", 1.0),
        ("other_cluster", 1.0),
        ("malformed", 1.0),
        ("unsupported_version", 1.0),
    ] {
        assert_eq!(f.rejected(reason), n, "{reason}");
    }

    // /status lists the node as the accepted heartbeats describe it.
    let node = f.node("raw-01").unwrap_or_else(|| panic!("{}", f.status()));
    assert_eq!(
        node["address"], "127.0.0.1",
        "the datagram's source address"
    );
    assert_eq!(node["state"], "normal");
    assert_eq!(node["weight"], 70);
    assert_eq!(node["load"], 250);
    assert_eq!(node["boot_id"], format!("{y:016x}"), "the restarted boot");
    assert_eq!(
        node["services"],
        serde_json::json!([{ "name": SERVICE, "port": srv.addr.port(), "tls": false }])
    );
    let members = f.members();
    assert_eq!(members.len(), 1, "{members:?}");
    assert_eq!(members[0]["node"], "raw-01");
    assert_eq!(members[0]["address"], addr_string(srv.addr));
    assert_eq!(members[0]["weight"], 70);
    assert_eq!(ask(f.front).unwrap(), "raw");
}

/// A `fleetgate agent` process; killed on drop, its log shown on failure.
struct AgentProcess {
    child: Child,
    log: PathBuf,
}

impl AgentProcess {
    fn start(dir: &Path, config: &str) -> AgentProcess {
        let path = write(dir, "agent.toml", config);
        let log = dir.join("agent.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
            .arg("agent")
            .arg("-c")
            .arg(&path)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("spawn fleetgate agent");
        AgentProcess { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn terminate(&self) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill -TERM");
    }

    fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("--- agent log ---\n{}--- end ---", self.log());
        }
    }
}

#[test]
fn the_agent_announces_drains_on_a_failed_check_and_leaves_on_sigterm() {
    let interval = Duration::from_millis(500);
    let f = DiscoveryLb::start(interval, 3, POLICY);
    let mut srv = NamedBackend::start("managed");
    let port = srv.addr.port();
    let t_start = Instant::now();
    let mut agent = AgentProcess::start(
        f.dir.path(),
        &format!(
            r#"cluster = "{CLUSTER}"
token_file = "network.token"
targets = ["{disc}"]
interval = "{ms}ms"
node_id = "agent-01"
check_interval = "100ms"
check_timeout = "500ms"
drain_time = "300ms"
log_level = "info"

[[service]]
name = "{SERVICE}"
port = {port}
check = {{ kind = "tcp" }}
"#,
            disc = f.disc,
            ms = interval.as_millis(),
        ),
    );

    // Checks pass: normal, and the balancer forwards to the server.
    wait_for(Duration::from_secs(5), Duration::from_millis(2), || {
        ask(f.front).is_ok_and(|n| n == "managed")
    })
    .unwrap_or_else(|| panic!("agent never announced: {}\n{}", f.status(), agent.log()));
    let joined = t_start.elapsed();
    let node = f.node("agent-01").expect("agent's node");
    assert_eq!(node["state"], "normal");
    assert_eq!(node["address"], "127.0.0.1");

    // The local server stops: the check fails, the agent drains, the
    // balancer stops sending new connections.
    srv.stop();
    let drained = wait_for(Duration::from_secs(3), Duration::from_millis(2), || {
        state_of(&f.node("agent-01")).as_deref() == Some("draining")
    })
    .unwrap_or_else(|| panic!("never drained: {}\n{}", f.status(), agent.log()));
    assert!(f.member_addrs().is_empty(), "{:?}", f.members());
    let served = srv.served();
    for _ in 0..5 {
        assert_eq!(ask(f.front).unwrap_or_default(), "", "no backend left");
    }
    assert_eq!(srv.served(), served);

    // The server is back: normal again.
    let srv2 = NamedBackend::start_on("managed-again", srv.addr);
    assert!(
        eventually(Duration::from_secs(3), || ask(f.front)
            .is_ok_and(|n| n == "managed-again")),
        "agent never announced normal again: {}\n{}",
        f.status(),
        agent.log()
    );

    // SIGTERM: draining for drain_time, then leaving: removed at once
    // (long before miss_limit × interval of silence would remove it).
    let t1 = Instant::now();
    agent.terminate();
    let drain_on_term = wait_for(Duration::from_secs(2), Duration::from_millis(2), || {
        state_of(&f.node("agent-01")).as_deref() != Some("normal")
    })
    .unwrap_or_else(|| panic!("no draining after SIGTERM\n{}", agent.log()));
    wait_for(Duration::from_secs(3), Duration::from_millis(2), || {
        f.node("agent-01").is_none()
    })
    .unwrap_or_else(|| {
        panic!(
            "node not removed after SIGTERM: {}\n{}",
            f.status(),
            agent.log()
        )
    });
    let removal = t1.elapsed();
    let status = agent
        .wait_exit(Duration::from_secs(3))
        .unwrap_or_else(|| panic!("agent did not exit\n{}", agent.log()));
    assert!(status.success(), "agent exit {status:?}\n{}", agent.log());
    let silence = interval * 3;
    assert!(
        removal < Duration::from_millis(300) + silence / 2,
        "removed {:.1} ms after SIGTERM: not by `leaving`\n{}",
        ms(removal),
        agent.log()
    );
    assert!(
        removal >= Duration::from_millis(250),
        "removed {:.1} ms after SIGTERM, before drain_time (300 ms)",
        ms(removal)
    );
    assert_eq!(ask(f.front).unwrap_or_default(), "");
    drop(srv2);
    let log = agent.log();
    assert!(log.contains("left the cluster"), "{log}");
    eprintln!(
        "FIGURE agent: serving {:.1} ms after the agent process started; draining {:.1} ms after \
         the local server stopped (check_interval 100 ms); after SIGTERM draining in {:.1} ms, \
         removed {:.1} ms (drain_time 300 ms; {:.1} ms after the removal was due), agent exited 0",
        ms(joined),
        ms(drained),
        ms(drain_on_term),
        ms(removal),
        ms(removal) - 300.0,
    );
}

const REASONS: [&str; 7] = [
    "malformed",
    "unsupported_version",
    "bad_mac",
    "replay",
    "stale",
    "other_cluster",
    "conflict",
];

/// Heartbeats of nodes `cpu-0000`... with their own boot ids and
/// sequence counters, signed for the balancer.
struct Fleet {
    token: Token,
    boot: u64,
    next_seq: Vec<u64>,
}

impl Fleet {
    fn datagram(&mut self, node: usize, sent_at_ms: u64) -> Vec<u8> {
        if self.next_seq.len() <= node {
            self.next_seq.resize(node + 1, 1);
        }
        let seq = self.next_seq[node];
        self.next_seq[node] += 1;
        let hb = Heartbeat {
            cluster: CLUSTER.into(),
            node: format!("cpu-{node:04}"),
            boot_id: self.boot + node as u64,
            seq,
            sent_at_ms,
            state: NodeState::Normal,
            weight: 100,
            load: Some(100),
            addr: None,
            // A service no pool selects: pools are not the subject.
            services: vec![Service {
                name: "bulk".into(),
                port: 9,
                tls: false,
            }],
        };
        wire::encode(&hb, &self.token).unwrap()
    }
}

struct CpuFigure {
    nodes: usize,
    sent: usize,
    seconds: f64,
    cpu: Duration,
    accepted: f64,
    rejected: f64,
    drops: u64,
}

/// `nodes` node ids join, then `rate` heartbeats/s (round robin over the
/// nodes, every datagram prepared beforehand so the sender is cheap and
/// even) for `seconds`; the balancer's CPU time over the steady state.
fn blast(
    f: &DiscoveryLb,
    fleet: &mut Fleet,
    nodes: usize,
    rate: usize,
    seconds: usize,
) -> CpuFigure {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    // Joins (they rebuild pools) are not what is measured.
    let before = f.accepted();
    let now = unix_ms();
    for n in 0..nodes {
        sock.send_to(&fleet.datagram(n, now), f.disc).unwrap();
        if n % 100 == 99 {
            thread::sleep(Duration::from_millis(5));
        }
    }
    assert!(
        eventually(Duration::from_secs(10), || f.accepted() - before
            == nodes as f64),
        "warm-up: {} of {nodes} accepted (kernel receive-buffer drops so far {})",
        f.accepted() - before,
        udp_stat("RcvbufErrors")
    );
    let total = rate * seconds;
    let now = unix_ms();
    let datagrams: Vec<Vec<u8>> = (0..total)
        .map(|i| fleet.datagram(i % nodes, now + (i / nodes) as u64))
        .collect();

    let counted = || {
        let rejected: f64 = REASONS.iter().map(|r| f.rejected(r)).sum();
        (f.accepted(), rejected)
    };
    let (accepted0, rejected0) = counted();
    let drops0 = udp_stat("RcvbufErrors");
    let pid = f.lb.pid();
    let cpu0 = cpu_time(pid);
    let t0 = Instant::now();
    let mut sent = 0;
    while sent < total {
        let due = ((t0.elapsed().as_secs_f64() * rate as f64) as usize).min(total);
        while sent < due {
            sock.send_to(&datagrams[sent], f.disc).unwrap();
            sent += 1;
        }
        thread::sleep(Duration::from_micros(500));
    }
    let seconds = t0.elapsed().as_secs_f64();
    let drops = || udp_stat("RcvbufErrors").saturating_sub(drops0);
    eventually(Duration::from_secs(5), || {
        let (a, r) = counted();
        a - accepted0 + r - rejected0 + drops() as f64 >= total as f64
    });
    let cpu = cpu_time(pid) - cpu0;
    let (a, r) = counted();
    CpuFigure {
        nodes,
        sent: total,
        seconds,
        cpu,
        accepted: a - accepted0,
        rejected: r - rejected0,
        drops: drops(),
    }
}

#[test]
fn receiver_cpu_cost_of_ten_thousand_heartbeats_per_second() {
    const RATE: usize = 10_000;
    const SECONDS: usize = 3;
    let f = DiscoveryLb::start(Duration::from_secs(1), 3, POLICY);
    let mut fleet = Fleet {
        token: f.token.clone(),
        boot: u64::from(std::process::id()) << 32,
        next_seq: Vec::new(),
    };
    let idle0 = cpu_time(f.lb.pid());
    thread::sleep(Duration::from_secs(1));
    let idle = cpu_time(f.lb.pid()) - idle0;
    // The same rate from a small and from a large fleet (the second run
    // keeps the first run's nodes alive and adds more).
    for nodes in [100, 1000] {
        let c = blast(&f, &mut fleet, nodes, RATE, SECONDS);
        let per_10k = ms(c.cpu) * 10_000.0 / c.sent as f64;
        eprintln!(
            "FIGURE receiver CPU, {} nodes: {} heartbeats in {:.2} s ({:.0}/s): balancer \
             user+system CPU {:.0} ms = {per_10k:.1} ms per 10,000 heartbeats (~{:.1} % of a core \
             at 10,000/s; idle baseline {:.0} ms/s); accepted {}, rejected {}, kernel \
             receive-buffer drops {}",
            c.nodes,
            c.sent,
            c.seconds,
            c.sent as f64 / c.seconds,
            ms(c.cpu),
            per_10k / 10.0,
            ms(idle),
            c.accepted,
            c.rejected,
            c.drops,
        );
        assert_eq!(c.rejected, 0.0, "valid heartbeats were rejected");
        // Every heartbeat is accepted, or dropped by the kernel for a full
        // socket buffer, which /proc/net/snmp counts (machine-wide, so it
        // may count others' drops too).
        assert!(
            c.accepted <= c.sent as f64 && c.accepted + c.drops as f64 >= c.sent as f64,
            "{} sent, {} accepted, {} dropped by the kernel",
            c.sent,
            c.accepted,
            c.drops
        );
        assert!(
            c.accepted >= c.sent as f64 * 0.95,
            "only {} of {} accepted",
            c.accepted,
            c.sent
        );
    }
    assert!(
        eventually(Duration::from_secs(2), || f
            .metric("fleetgate_discovery_nodes{state=\"normal\"}")
            == 1000.0),
        "node gauge: {}",
        f.metric("fleetgate_discovery_nodes{state=\"normal\"}")
    );
}

#[test]
fn a_reload_keeps_the_discovered_backends() {
    let interval = Duration::from_millis(200);
    let f = DiscoveryLb::start(interval, 3, POLICY);
    let rt = tokio_rt();
    let _ctx = rt.enter();
    let srv = NamedBackend::start("kept");
    let _a = Announcer::start(f.announce("node-k", srv.addr.port(), NodeState::Normal)).unwrap();
    assert!(eventually(Duration::from_secs(3), || ask(f.front)
        .is_ok_and(|n| n == "kept")));
    let config = std::fs::read_to_string(&f.lb.config).unwrap();
    // The same file with another pool setting: pools are rebuilt.
    f.lb.write_config(&config.replace("retries = 2", "retries = 1"));
    f.lb.signal("HUP");
    assert!(
        eventually(Duration::from_secs(3), || f
            .metric("fleetgate_config_reloads_total{result=\"ok\"}")
            == 1.0),
        "reload not applied: {}",
        f.lb.metrics()
    );
    assert_eq!(f.member_addrs(), vec![addr_string(srv.addr)]);
    for _ in 0..5 {
        assert_eq!(ask(f.front).unwrap(), "kept");
    }
}
