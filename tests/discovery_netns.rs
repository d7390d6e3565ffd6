//! Discovery by real broadcast, across network namespaces (root only).
//!
//! The test builds a private Ethernet segment: a namespace holding a
//! bridge, and four namespaces plugged into it by veth pairs, addressed
//! from 198.51.100.0/24 (TEST-NET-2). Nothing is attached to the host's
//! own namespace, so no packet can leave the machine.
//!
//! ```text
//!            [ bridge namespace: br0 ]
//!        /          |           |          \
//!   agent-1      agent-2     lb-1         lb-2
//!   .11          .12         .21          .22
//!   server       server      fleetgate    fleetgate
//!   + agent      + agent     run          run
//! ```
//!
//! Two `fleetgate agent` processes, each beside a small TCP server in its
//! namespace, announce by broadcast (one to the subnet's broadcast address,
//! one to 255.255.255.255); two `fleetgate run` balancers, bound to
//! 0.0.0.0:6155, must both learn both servers and forward to them, checked
//! by clients inside each balancer's namespace. Then a server process is
//! stopped under load: no client connection may be lost. Then its agent
//! gets SIGTERM: both balancers drop the node.
//!
//! Root is needed for namespaces. CI (`CI=true`, as root) must run it and
//! fails when `ip` (iproute2) is missing; elsewhere without root it is
//! skipped with a message.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::discovery::{
    eligible_addrs, generate_token, ms, pool_members, status, status_node, CLUSTER, POOL,
};
use common::netns::{
    enter, in_ns, preflight, remove_stale_namespaces, run_ip, wait_for, Lab, NsProcess,
};
use common::{http_ask, http_get};

/// Namespaces are named `fgdisc-PID-HOST`.
const PREFIX: &str = "fgdisc";
const SUBNET: &str = "198.51.100";
const SERVICE: &str = "ums-http";
const SERVER_PORT: u16 = 8443;
const FRONT: &str = "127.0.0.1:8080";
const ADMIN: &str = "127.0.0.1:9901";
const INTERVAL_MS: u64 = 200;
/// Every process the test starts runs under `timeout`, so even a killed
/// test run leaves nothing running for long.
const PROCESS_LIFETIME: &str = "90";

/// A tiny HTTP server for the management servers: one connection at a
/// time, answers its name. On SIGTERM it stops like a server that loses no
/// accepted connection: a socket filter on its listening socket drops new
/// SYNs (the balancer's connect then fails and is retried elsewhere), the
/// handshakes already under way complete, it serves everything the kernel
/// has accepted, and only then closes the port. Closing at once would
/// reset a connection that completed its handshake between the last
/// accept and the close: the balancer has already forwarded the client's
/// request on it, and no proxy can replay that. It exits on its own after
/// `lifetime` seconds.
const SERVER: &str = r#"
import ctypes, signal, socket, struct, sys, time
port, name, lifetime = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
body = (name + "\n").encode()
resp = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
s.listen(128)
s.settimeout(0.02)
def serve(c):
    try:
        c.settimeout(2)
        data = b""
        while b"\r\n\r\n" not in data:
            d = c.recv(4096)
            if not d:
                return
            data += d
        c.sendall(resp)
    except OSError:
        pass
    finally:
        c.close()
deadline = time.time() + lifetime
print("listening", flush=True)
while not stop and time.time() < deadline:
    try:
        c, _ = s.accept()
    except (socket.timeout, InterruptedError):
        continue
    serve(c)
# Classic BPF over the TCP header: drop a segment with SYN and not ACK.
drop_syn = [(0x30, 0, 0, 13), (0x54, 0, 0, 0x12), (0x15, 0, 1, 0x02),
            (0x06, 0, 0, 0), (0x06, 0, 0, 0xFFFFFFFF)]
code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in drop_syn))
s.setsockopt(socket.SOL_SOCKET, 26, struct.pack("HP", len(drop_syn), ctypes.addressof(code)))  # SO_ATTACH_FILTER
time.sleep(0.005)  # handshakes under way on a veth complete in microseconds
s.setblocking(False)
while True:
    try:
        c, _ = s.accept()
    except OSError:
        break
    c.setblocking(True)
    serve(c)
s.close()
print("stopped", flush=True)
"#;

fn front() -> SocketAddr {
    FRONT.parse().unwrap()
}

fn admin() -> SocketAddr {
    ADMIN.parse().unwrap()
}

/// The state a balancer gives a node, asked from inside its namespace.
fn node_state(lb_ns: &str, node: &'static str) -> Option<String> {
    in_ns(lb_ns, move || {
        status_node(&status(admin()), node).and_then(|n| n["state"].as_str().map(str::to_string))
    })
}

/// The pool's backend addresses in a `/status` document, sorted.
/// The members that take new connections (a draining node stays listed,
/// resting).
fn member_addrs(st: &serde_json::Value) -> Vec<String> {
    let mut v: Vec<String> = eligible_addrs(&pool_members(st, POOL));
    v.sort();
    v
}

/// Poll both balancers' `/status` (hosts 2 and 3 of the lab) until `cond`
/// holds on each; when it first held on each, counted from `since`.
fn on_each_balancer(
    lab: &Lab,
    since: Instant,
    within: Duration,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> Result<Vec<Duration>, String> {
    let mut when: Vec<Option<Duration>> = vec![None; 2];
    let mut last = vec![serde_json::Value::Null; 2];
    while since.elapsed() < within {
        for (k, w) in when.iter_mut().enumerate() {
            if w.is_some() {
                continue;
            }
            let st = in_ns(lab.ns(k + 2), || status(admin()));
            if cond(&st) {
                *w = Some(since.elapsed());
            }
            last[k] = st;
        }
        if when.iter().all(Option::is_some) {
            return Ok(when.into_iter().flatten().collect());
        }
        thread::sleep(Duration::from_millis(5));
    }
    Err(format!(
        "condition not met on every balancer within {within:?}: {when:?}, last /status: {last:?}"
    ))
}

#[test]
fn two_agents_and_two_balancers_find_each_other_by_broadcast() {
    if !preflight("discovery_netns", &[("python3", "--version", "python3")]) {
        return;
    }
    remove_stale_namespaces(PREFIX);
    let dir = tempfile::tempdir().unwrap();
    let (token_path, _) = generate_token(dir.path());
    let bin = env!("CARGO_BIN_EXE_fleetgate");
    // Hosts 0, 1: management servers with agents; 2, 3: balancers.
    let lab = Lab::build(
        PREFIX,
        SUBNET,
        &[("a1", 11), ("a2", 12), ("lb1", 21), ("lb2", 22)],
    );
    // Agent 2 uses the limited broadcast, which leaves by the default
    // route's interface.
    run_ip(&["-n", lab.ns(1), "route", "add", "default", "dev", "eth0"]);
    let broadcast = format!("{SUBNET}.255:6155");
    let targets = [broadcast.as_str(), "255.255.255.255:6155"];
    let names = ["ums-1", "ums-2"];

    // The management servers.
    let mut servers: Vec<NsProcess> = (0..2)
        .map(|i| {
            let port = SERVER_PORT.to_string();
            NsProcess::spawn(
                lab.ns(i),
                &format!("server-{}", i + 1),
                dir.path(),
                PROCESS_LIFETIME,
                "python3",
                &["-c", SERVER, &port, names[i], PROCESS_LIFETIME],
            )
        })
        .collect();
    for (i, s) in servers.iter().enumerate() {
        let up = in_ns(lab.ns(i), || {
            wait_for(Duration::from_secs(10), || {
                http_ask(SocketAddr::from(([127, 0, 0, 1], SERVER_PORT))).is_ok()
            })
        });
        assert!(
            up.is_some(),
            "server {} never listened:\n{}",
            i + 1,
            s.log()
        );
    }

    // The balancers.
    // Each balancer its own data directory: namespaces separate their
    // ports, not their files (the control socket lives there).
    let lb_config = |i: usize| {
        format!(
            r#"[global]
data_dir = "data-{i}"

[admin]
bind = "{ADMIN}"

[discovery]
bind = "0.0.0.0:6155"
cluster = "{CLUSTER}"
token_file = "{token}"
interval = "{INTERVAL_MS}ms"
miss_limit = 3

[[listener]]
name = "front"
bind = "{FRONT}"
pool = "{POOL}"

[[pool]]
name = "{POOL}"
algorithm = "round_robin"
discovery = {{ service = "{SERVICE}" }}
max_fails = 1
fail_timeout = "1s"
connect_timeout = "1s"
retries = 2
"#,
            token = token_path.display()
        )
    };
    let balancers: Vec<NsProcess> = (2..4)
        .map(|i| {
            let lb_path = common::write(dir.path(), &format!("fleetgate-{i}.toml"), &lb_config(i));
            let lb_path = lb_path.to_str().unwrap();
            NsProcess::spawn(
                lab.ns(i),
                &format!("balancer-{}", i - 1),
                dir.path(),
                PROCESS_LIFETIME,
                bin,
                &["run", "-c", lb_path],
            )
        })
        .collect();
    for (i, b) in balancers.iter().enumerate() {
        let ready = in_ns(lab.ns(i + 2), || {
            wait_for(Duration::from_secs(20), || {
                http_get(admin(), "/healthz").is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
            })
        });
        assert!(
            ready.is_some(),
            "balancer {} not ready:\n{}",
            i + 1,
            b.log()
        );
    }

    // The agents.
    let agent_start = Instant::now();
    let mut agents: Vec<NsProcess> = (0..2)
        .map(|i| {
            let config = format!(
                r#"cluster = "{CLUSTER}"
token_file = "{token}"
targets = ["{target}"]
interval = "{INTERVAL_MS}ms"
node_id = "{name}"
check_interval = "100ms"
check_timeout = "500ms"
drain_time = "400ms"

[[service]]
name = "{SERVICE}"
port = {SERVER_PORT}
check = {{ kind = "tcp" }}
"#,
                token = token_path.display(),
                target = targets[i],
                name = names[i],
            );
            let path = common::write(dir.path(), &format!("agent-{}.toml", i + 1), &config);
            NsProcess::spawn(
                lab.ns(i),
                &format!("agent-{}", i + 1),
                dir.path(),
                PROCESS_LIFETIME,
                bin,
                &["agent", "-c", path.to_str().unwrap()],
            )
        })
        .collect();

    // Both balancers learn both servers, at the addresses the broadcasts
    // came from.
    let server_addrs: Vec<String> = (0..2)
        .map(|i| format!("{}:{SERVER_PORT}", lab.addr(i)))
        .collect();
    let (a1, a2) = (lab.addr(0).to_string(), lab.addr(1).to_string());
    let learned = on_each_balancer(&lab, agent_start, Duration::from_secs(10), |st| {
        let node_ok = |id: &str, addr: &str| {
            status_node(st, id).is_some_and(|n| n["state"] == "normal" && n["address"] == addr)
        };
        member_addrs(st) == server_addrs && node_ok("ums-1", &a1) && node_ok("ums-2", &a2)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", agents[0].log(), agents[1].log()));

    // Each balancer forwards to both (round robin), seen from a client in
    // its namespace.
    for lb in 2..4 {
        let seen = in_ns(lab.ns(lb), || {
            let mut seen: HashMap<String, usize> = HashMap::new();
            for _ in 0..10 {
                let (code, body) = http_ask(front()).expect("request through the balancer");
                assert_eq!(code, 200, "{body}");
                *seen.entry(body.trim().to_string()).or_default() += 1;
            }
            seen
        });
        assert_eq!(
            seen.get("ums-1").zip(seen.get("ums-2")),
            Some((&5, &5)),
            "balancer {}: {seen:?}",
            lb - 1
        );
    }

    // Load through both balancers; server 1's process stops.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let served_by: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let mut clients = Vec::new();
    for lb in 2..4 {
        for _ in 0..2 {
            let path = format!("/var/run/netns/{}", lab.ns(lb));
            let (stop, done, errors, served_by) = (
                stop.clone(),
                done.clone(),
                errors.clone(),
                served_by.clone(),
            );
            clients.push(thread::spawn(move || {
                enter(&path);
                let started = Instant::now();
                while !stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(30) {
                    match http_ask(front()) {
                        Ok((200, body)) if !body.trim().is_empty() => {
                            *served_by
                                .lock()
                                .unwrap()
                                .entry(body.trim().to_string())
                                .or_default() += 1;
                        }
                        other => errors.lock().unwrap().push(format!("{other:?}")),
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
            }));
        }
    }
    assert!(
        wait_for(Duration::from_secs(10), || done.load(Ordering::SeqCst)
            >= 200)
        .is_some(),
        "no load: {:?}",
        errors.lock().unwrap()
    );
    let before_kill = done.load(Ordering::SeqCst);
    let killed_at = Instant::now();
    servers[0].terminate();
    let exit = servers[0].wait_exit(Duration::from_secs(5));
    assert!(
        exit.is_some(),
        "server 1 did not stop:\n{}",
        servers[0].log()
    );
    // Its agent's check fails: both balancers hear `draining` and take
    // it out of the pool.
    let only_2 = vec![server_addrs[1].clone()];
    let drained = on_each_balancer(&lab, killed_at, Duration::from_secs(5), |st| {
        status_node(st, "ums-1").is_some_and(|n| n["state"] == "draining")
            && member_addrs(st) == only_2
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agents[0].log()));
    thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }
    let total = done.load(Ordering::SeqCst);
    let errors = errors.lock().unwrap().clone();
    let served_by = served_by.lock().unwrap().clone();
    eprintln!(
        "FIGURE netns: both balancers learned both servers {:.0} / {:.0} ms after the agents \
         started (broadcast, interval {INTERVAL_MS} ms); server 1 stopped under load: {} requests \
         ({} after the stop), client errors {}, ums-1 draining on the balancers {:.0} / {:.0} ms \
         after the stop; served by {served_by:?}",
        ms(learned[0]),
        ms(learned[1]),
        total,
        total - before_kill,
        errors.len(),
        ms(drained[0]),
        ms(drained[1]),
    );
    assert!(errors.is_empty(), "client connections lost: {errors:?}");
    assert!(total - before_kill >= 50, "too little load after the stop");

    // SIGTERM to agent 1: draining, then leaving; both balancers drop it,
    // well before miss_limit × interval of silence would.
    let t0 = Instant::now();
    agents[0].terminate();
    let removed = on_each_balancer(&lab, t0, Duration::from_secs(5), |st| {
        status_node(st, "ums-1").is_none() && member_addrs(st) == only_2
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agents[0].log()));
    let exit = agents[0].wait_exit(Duration::from_secs(5));
    assert!(
        exit.is_some_and(|s| s.success()),
        "agent 1: {exit:?}\n{}",
        agents[0].log()
    );
    for lb in 2..4 {
        let left = in_ns(lab.ns(lb), || {
            (0..4)
                .map(|_| {
                    http_ask(front())
                        .map(|(_, b)| b.trim().to_string())
                        .unwrap_or_default()
                })
                .collect::<Vec<_>>()
        });
        assert!(
            left.iter().all(|n| n == "ums-2"),
            "balancer {}: {left:?}",
            lb - 1
        );
        assert_eq!(node_state(lab.ns(lb), "ums-2").as_deref(), Some("normal"));
    }
    eprintln!(
        "FIGURE netns: agent 1 SIGTERM -> ums-1 removed on the balancers after {:.0} / {:.0} ms \
         (drain_time 400 ms, then `leaving`)",
        ms(removed[0]),
        ms(removed[1])
    );
    assert!(
        removed.iter().all(|r| *r >= Duration::from_millis(350)),
        "removed before drain_time (400 ms) was over: {removed:?}"
    );
    assert!(
        removed
            .iter()
            .all(|r| *r < Duration::from_millis(400 + 3 * INTERVAL_MS)),
        "removed by silence, not by `leaving`: {removed:?}"
    );
}
