//! Two balancers sharing one virtual address with keepalived (VRRP),
//! across network namespaces (root only).
//!
//! ```text
//!                    [ bridge namespace: br0 ]
//!      /          |            |            |            \
//!    lb1         lb2          srv1         srv2         client
//!    .11         .12          .21          .22          .31
//!    fleetgate   fleetgate    backend      backend      requests to
//!    keepalived  keepalived   "srv1"       "srv2"       .100:7000
//!            \    /
//!      VIP 198.51.100.100 on one of them
//! ```
//!
//! Each balancer runs `fleetgate run` (a `tcp` listener on 0.0.0.0:7000 to
//! its own backend, which answers with its namespace's name, and the admin
//! listener on 127.0.0.1:9900 as packaged) and Debian's keepalived on a
//! configuration made from the shipped `conf/keepalived.conf`. The client
//! opens a new connection per request to the virtual address and records
//! every answer (which balancer served it) and every failure, with times.
//!
//! 1. kill -9 of the master's fleetgate: the address moves to the other
//!    balancer and the client is served by it again.
//! 2. The crashed balancer comes back: the address stays (nopreempt).
//! 3. SIGTERM to the new master (drain): /healthz answers 503, the address
//!    moves back, the client is served again. fleetgate closes its
//!    listeners as the drain starts, so the figures show the connections
//!    refused until keepalived has seen the check fail.
//! 4. Planned maintenance as the shipped file describes it: the drained
//!    balancer is back, the master's maintenance flag moves the address,
//!    then the master gets SIGTERM.
//!
//! Only correctness is asserted; the figures (failed requests, the gap
//! the client saw) are printed as FIGURE lines.
//!
//! Root is needed for namespaces: without root the test is skipped with a
//! message, unless `CI` is set, where it fails; a missing keepalived,
//! curl, python3 or iproute2 fails it.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::discovery::ms;
use common::http_get;
use common::netns::{enter, in_ns, preflight, remove_stale_namespaces, wait_for, Lab, NsProcess};

/// Namespaces are named `fgka-PID-HOST`.
const PREFIX: &str = "fgka";
const SUBNET: &str = "198.51.100";
const VIP: &str = "198.51.100.100";
const PORT: u16 = 7000;
/// The packaged admin address: each namespace has its own loopback, so
/// both balancers use it, as on two machines.
const ADMIN: &str = "127.0.0.1:9900";
/// Long enough for the address to move while a held connection keeps the
/// draining process alive.
const DRAIN_TIMEOUT: &str = "5s";
/// As docs/ha.md advises: longer than the check's fall x interval plus the
/// peer's skew time, so the address has moved before the listeners close.
const DRAIN_NOTICE: &str = "3s";
/// Every process the test starts runs under `timeout`, so even a killed
/// test run leaves nothing running for long.
const PROCESS_LIFETIME: &str = "120";
/// The client's connect and read timeout: a device's request would be
/// retried after about this long.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(1);
/// "Served again within": generous, correctness only.
const RECOVERY_BOUND: Duration = Duration::from_secs(30);

/// The backend: answers every connection with its name and a newline,
/// then holds it until the client closes, one thread per connection.
const BACKEND: &str = r#"
import socket, sys, threading
port, name = int(sys.argv[1]), sys.argv[2]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
s.listen(512)
def serve(c):
    try:
        c.sendall((name + "\n").encode())
        while c.recv(4096):
            pass
    except OSError:
        pass
    finally:
        c.close()
print("listening", flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

fn admin() -> SocketAddr {
    ADMIN.parse().unwrap()
}

fn vip() -> SocketAddr {
    SocketAddr::new(VIP.parse().unwrap(), PORT)
}

/// The balancer's configuration: plain TCP to the backend beside it.
fn fleetgate_config(lb: usize, backend: &str) -> String {
    format!(
        r#"[global]
drain_timeout = "{DRAIN_TIMEOUT}"
drain_notice = "{DRAIN_NOTICE}"
data_dir = "data-lb{lb}"

[admin]
bind = "{ADMIN}"

[[listener]]
name = "front"
bind = "0.0.0.0:{PORT}"
mode = "tcp"
pool = "p"

[[pool]]
name = "p"
backends = [{{ address = "{backend}:{PORT}" }}]
connect_timeout = "1s"
"#
    )
}

/// `text` with `from` replaced by `to`; the shipped file must contain it,
/// so that a change of its structure shows here instead of silently
/// testing something else.
fn edit(text: &str, from: &str, to: &str) -> String {
    assert!(
        text.contains(from),
        "conf/keepalived.conf no longer contains {from:?}"
    );
    text.replacen(from, to, 1)
}

/// Remove the block that starts with the line containing `head` and ends
/// at its closing brace (on a line of its own, same indentation).
fn drop_block(text: &str, head: &str) -> String {
    let start = text
        .find(head)
        .unwrap_or_else(|| panic!("conf/keepalived.conf no longer contains {head:?}"));
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let indent = &text[line_start..start];
    let close = format!("\n{indent}}}\n");
    let end = text[start..]
        .find(&close)
        .unwrap_or_else(|| panic!("no end of the block {head:?}"))
        + start
        + close.len();
    format!("{}{}", &text[..line_start], &text[end..])
}

/// The shipped keepalived.conf, for balancer `n` of the test:
/// - its name, priority and the test's virtual address;
/// - scripts run as `nobody` (the shipped `keepalived_script` user is
///   created by the operator, not by the test);
/// - without the track_process blocks: the process-events connector they
///   need exists only in the initial network namespace (in another,
///   keepalived logs "Failed to set/clear process event listen - errno
///   111" and never hears of an exit), and both balancers share one
///   process namespace here, so each would also count the other's
///   fleetgate.
fn keepalived_config(n: usize, priority: u8, dir: &Path) -> String {
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/keepalived.conf"))
            .unwrap();
    let c = edit(
        &shipped,
        "router_id fleetgate-a",
        &format!("router_id fleetgate-lb{n}"),
    );
    let c = edit(&c, "script_user keepalived_script", "script_user nobody");
    let c = edit(&c, "priority 100", &format!("priority {priority}"));
    let c = edit(&c, "192.0.2.100/24 dev eth0", &format!("{VIP}/24 dev eth0"));
    let c = edit(
        &c,
        "http://127.0.0.1:9900/healthz",
        &format!("http://{ADMIN}/healthz"),
    );
    let c = edit(
        &c,
        "file \"/etc/keepalived/fleetgate.maintenance\"",
        &format!("file \"{}\"", maintenance_file(dir, n).display()),
    );
    let c = drop_block(&c, "vrrp_track_process fleetgate_process {");
    drop_block(&c, "track_process {")
}

/// Balancer `n`'s maintenance flag (the shipped file's track_file).
fn maintenance_file(dir: &Path, n: usize) -> std::path::PathBuf {
    dir.join(format!("lb{n}.maintenance"))
}

/// `keepalived -t`: the configuration made from the shipped one parses
/// without a complaint. keepalived 2.2.7 (Debian 12) ends every config
/// test with SIGTERM once `script_user` is set (fixed in 2.2.8), so a
/// silent run killed by SIGTERM counts as a pass too.
fn keepalived_check(conf: &Path) {
    use std::os::unix::process::ExitStatusExt;
    let check = Command::new("keepalived")
        .args(["-t", "-l", "--no-syslog", "-f"])
        .arg(conf)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        said.trim().is_empty() && (check.status.success() || check.status.signal() == Some(15)),
        "keepalived -t refuses the configuration made from conf/keepalived.conf ({}): {said}",
        check.status
    );
}

/// Whether namespace `ns` holds the virtual address now.
fn holds_vip(ns: &str) -> bool {
    let out = Command::new("ip")
        .args(["-n", ns, "-o", "-4", "addr", "show", "dev", "eth0"])
        .output()
        .expect("ip addr");
    String::from_utf8_lossy(&out.stdout).contains(&format!(" {VIP}/"))
}

/// The balancer (0 or 1) holding the address, if exactly one does.
fn vip_holder(lab: &Lab) -> Option<usize> {
    match (holds_vip(lab.ns(0)), holds_vip(lab.ns(1))) {
        (true, false) => Some(0),
        (false, true) => Some(1),
        _ => None,
    }
}

fn healthz(lab: &Lab, lb: usize) -> Option<String> {
    in_ns(lab.ns(lb), || http_get(admin(), "/healthz").ok())
}

fn start_balancer(lab: &Lab, lb: usize, dir: &Path, tag: &str) -> NsProcess {
    let config = dir.join(format!("fleetgate-lb{}.toml", lb + 1));
    let p = NsProcess::spawn(
        lab.ns(lb),
        &format!("fleetgate-lb{}{tag}", lb + 1),
        dir,
        PROCESS_LIFETIME,
        env!("CARGO_BIN_EXE_fleetgate"),
        &["run", "-c", config.to_str().unwrap()],
    );
    let ready = wait_for(Duration::from_secs(20), || {
        healthz(lab, lb).is_some_and(|r| r.starts_with("HTTP/1.1 200"))
    });
    assert!(
        ready.is_some(),
        "fleetgate lb{} not ready:\n{}",
        lb + 1,
        p.log()
    );
    p
}

/// One request as a device would make it: a new connection, the answer
/// (the backend's name), close.
fn request() -> Result<String, String> {
    let s = TcpStream::connect_timeout(&vip(), CLIENT_TIMEOUT).map_err(|e| kind(&e))?;
    s.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| kind(&e))?;
    match line.trim() {
        "" => Err("closed".into()),
        name => Ok(name.to_string()),
    }
}

fn kind(e: &std::io::Error) -> String {
    format!("{:?}", e.kind())
}

/// What the client saw: (when the request started, counted from the
/// test's start; how long it took; the answer or the error).
type Log = Arc<Mutex<Vec<(Duration, Duration, Result<String, String>)>>>;

/// The client, from its namespace: a request every 10 ms until `stop`.
fn start_client(ns: &str, t0: Instant, stop: Arc<AtomicBool>) -> (Log, thread::JoinHandle<()>) {
    let log: Log = Arc::default();
    let (path, log2) = (format!("/var/run/netns/{ns}"), log.clone());
    let handle = thread::spawn(move || {
        enter(&path);
        let started = Instant::now();
        while !stop.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(100) {
            let (at, began) = (t0.elapsed(), Instant::now());
            let r = request();
            log2.lock().unwrap().push((at, began.elapsed(), r));
            thread::sleep(Duration::from_millis(10));
        }
    });
    (log, handle)
}

/// The client's view of one move, from `since`: failures until the first
/// answer from `to`, when the first failure and that answer came, and the
/// answers from another backend in between, and the slowest request.
struct Move {
    failures: usize,
    slowest: Duration,
    kinds: Vec<(String, usize)>,
    first_failure: Option<Duration>,
    served_again: Option<Duration>,
    other_answers: usize,
}

fn client_move(log: &Log, since: Duration, to: &str) -> Move {
    let log = log.lock().unwrap();
    let mut m = Move {
        failures: 0,
        slowest: Duration::ZERO,
        kinds: Vec::new(),
        first_failure: None,
        served_again: None,
        other_answers: 0,
    };
    for (t, took, r) in log.iter().filter(|(t, _, _)| *t >= since) {
        m.slowest = m.slowest.max(*took);
        match r {
            Ok(name) if name == to => {
                m.served_again = Some(*t);
                break;
            }
            Ok(_) => m.other_answers += 1,
            Err(k) => {
                m.failures += 1;
                m.first_failure.get_or_insert(*t);
                match m.kinds.iter_mut().find(|(x, _)| x == k) {
                    Some((_, n)) => *n += 1,
                    None => m.kinds.push((k.clone(), 1)),
                }
            }
        }
    }
    m
}

fn answers_from(log: &Log, name: &str, since: Duration) -> usize {
    let log = log.lock().unwrap();
    log.iter()
        .filter(|(t, _, r)| *t >= since && r.as_deref().is_ok_and(|n| n == name))
        .count()
}

fn count(text: &str, what: &str) -> usize {
    text.matches(what).count()
}

/// Start balancer `lb`'s fleetgate again and wait until its keepalived
/// (`ka`) is the backup once more (its health check has risen).
fn rejoin(lab: &Lab, lb: usize, dir: &Path, ka: &NsProcess) -> NsProcess {
    let before = count(&ka.log(), "Entering BACKUP STATE");
    let p = start_balancer(lab, lb, dir, "-restarted");
    let rejoined = wait_for(Duration::from_secs(20), || {
        count(&ka.log(), "Entering BACKUP STATE") > before
    });
    assert!(
        rejoined.is_some(),
        "lb{}'s keepalived did not become the backup again:\n{}",
        lb + 1,
        ka.log()
    );
    p
}

#[test]
fn a_virtual_address_follows_the_healthy_balancer() {
    if !preflight(
        "keepalived_netns",
        &[
            ("keepalived", "--version", "keepalived"),
            ("curl", "--version", "curl"),
            ("python3", "--version", "python3"),
        ],
    ) {
        return;
    }
    remove_stale_namespaces(PREFIX);
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::build(
        PREFIX,
        SUBNET,
        &[
            ("lb1", 11),
            ("lb2", 12),
            ("srv1", 21),
            ("srv2", 22),
            ("client", 31),
        ],
    );
    let names = ["srv1", "srv2"];
    let t0 = Instant::now();

    // The backends, then the balancers, each to its own backend.
    let backends: Vec<NsProcess> = (0..2)
        .map(|i| {
            let port = PORT.to_string();
            NsProcess::spawn(
                lab.ns(i + 2),
                names[i],
                dir.path(),
                PROCESS_LIFETIME,
                "python3",
                &["-c", BACKEND, &port, names[i]],
            )
        })
        .collect();
    for (i, b) in backends.iter().enumerate() {
        let addr = SocketAddr::new(lab.addr(i + 2).parse().unwrap(), PORT);
        let up = in_ns(lab.ns(i + 2), move || {
            wait_for(Duration::from_secs(10), || TcpStream::connect(addr).is_ok())
        });
        assert!(
            up.is_some(),
            "backend {} never listened:\n{}",
            names[i],
            b.log()
        );
    }
    let mut balancers: Vec<NsProcess> = (0..2)
        .map(|lb| {
            common::write(
                dir.path(),
                &format!("fleetgate-lb{}.toml", lb + 1),
                &fleetgate_config(lb + 1, lab.addr(lb + 2)),
            );
            start_balancer(&lab, lb, dir.path(), "")
        })
        .collect();

    // keepalived, as the package runs it but in the foreground (-n),
    // logging to the console (-l, -D) and not to the host's syslog, with
    // pid files of its own.
    let keepalived: Vec<NsProcess> = [100u8, 90]
        .iter()
        .enumerate()
        .map(|(lb, &priority)| {
            let n = lb + 1;
            let conf = common::write(
                dir.path(),
                &format!("keepalived-lb{n}.conf"),
                &keepalived_config(n, priority, dir.path()),
            );
            keepalived_check(&conf);
            let pid = |what: &str| dir.path().join(format!("keepalived-lb{n}-{what}.pid"));
            let (main, vrrp, checkers) = (pid("main"), pid("vrrp"), pid("checkers"));
            NsProcess::spawn(
                lab.ns(lb),
                &format!("keepalived-lb{n}"),
                dir.path(),
                PROCESS_LIFETIME,
                "keepalived",
                &[
                    "-n",
                    "-l",
                    "-D",
                    "--no-syslog",
                    "-f",
                    conf.to_str().unwrap(),
                    "-p",
                    main.to_str().unwrap(),
                    "-r",
                    vrrp.to_str().unwrap(),
                    "-c",
                    checkers.to_str().unwrap(),
                ],
            )
        })
        .collect();
    let ka_logs = || format!("{}\n{}", keepalived[0].log(), keepalived[1].log());

    // One of them takes the address.
    let elected = wait_for(Duration::from_secs(20), || vip_holder(&lab).is_some());
    assert!(elected.is_some(), "no balancer took {VIP}:\n{}", ka_logs());
    let master = vip_holder(&lab).unwrap();
    let backup = 1 - master;

    // The client, served by the master.
    let stop = Arc::new(AtomicBool::new(false));
    let (log, client) = start_client(lab.ns(4), t0, stop.clone());
    let since = t0.elapsed();
    assert!(
        wait_for(Duration::from_secs(10), || answers_from(
            &log,
            names[master],
            since
        ) >= 20)
        .is_some(),
        "the client is not served by the master through {VIP}: {:?}",
        log.lock().unwrap().iter().rev().take(5).collect::<Vec<_>>()
    );

    // 1. kill -9 of the master's fleetgate.
    let killed = t0.elapsed();
    balancers[master].kill_group();
    let moved = wait_for(RECOVERY_BOUND, || vip_holder(&lab) == Some(backup));
    assert!(
        moved.is_some(),
        "{VIP} did not move to lb{} after the master's fleetgate was killed:\n{}",
        backup + 1,
        ka_logs()
    );
    let served = wait_for(RECOVERY_BOUND, || {
        client_move(&log, killed, names[backup])
            .served_again
            .is_some()
    });
    assert!(
        served.is_some(),
        "the client was not served by lb{} again: {:?}",
        backup + 1,
        log.lock().unwrap().iter().rev().take(5).collect::<Vec<_>>()
    );
    let crash = client_move(&log, killed, names[backup]);
    let gap = |m: &Move| match (m.first_failure, m.served_again) {
        (Some(f), Some(s)) => ms(s - f),
        _ => 0.0,
    };
    eprintln!(
        "FIGURE keepalived: kill -9 of the master's fleetgate (lb{}): the address on lb{} after \
         {:.0} ms; the client (a new connection every 10 ms, {} ms timeout) had {} failed \
         requests {:?}, first failure -> first answer from lb{}: {:.0} ms, slowest request {:.0} ms",
        master + 1,
        backup + 1,
        ms(moved.unwrap()),
        CLIENT_TIMEOUT.as_millis(),
        crash.failures,
        crash.kinds,
        backup + 1,
        gap(&crash),
        ms(crash.slowest),
    );

    // 2. The crashed balancer comes back: it becomes the backup and the
    // address stays where it is (nopreempt: moving it back would cut the
    // connections through it once more).
    balancers[master] = rejoin(&lab, master, dir.path(), &keepalived[master]);
    // Three advert intervals: a preempting backup would have taken it.
    thread::sleep(Duration::from_secs(3));
    assert_eq!(
        vip_holder(&lab),
        Some(backup),
        "the address went back to the restarted balancer despite nopreempt"
    );
    let (master, backup) = (backup, master);

    // 3. SIGTERM (drain) on the new master. A held connection keeps it
    // draining, so that its /healthz can be seen answering 503.
    let mut held = in_ns(lab.ns(4), || {
        let s = TcpStream::connect_timeout(&vip(), CLIENT_TIMEOUT).expect("held connection");
        s.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
        let mut line = String::new();
        BufReader::new(s.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        (s, line.trim().to_string())
    });
    assert_eq!(
        held.1, names[master],
        "held connection served by the master"
    );
    let terminated = t0.elapsed();
    let sigterm = Instant::now();
    balancers[master].terminate();
    let ns_master = lab.ns(master).to_string();
    let local = SocketAddr::from(([127, 0, 0, 1], PORT));
    let (mut draining_seen, mut listener_closed, mut address_moved) = (None, None, None);
    while sigterm.elapsed() < RECOVERY_BOUND
        && (draining_seen.is_none() || listener_closed.is_none() || address_moved.is_none())
    {
        if draining_seen.is_none()
            && healthz(&lab, master)
                .is_some_and(|r| r.starts_with("HTTP/1.1 503") && r.ends_with("draining\n"))
        {
            draining_seen = Some(sigterm.elapsed());
        }
        if listener_closed.is_none()
            && in_ns(&ns_master, move || {
                TcpStream::connect_timeout(&local, CLIENT_TIMEOUT).is_err()
            })
        {
            listener_closed = Some(sigterm.elapsed());
        }
        if address_moved.is_none() && vip_holder(&lab) == Some(backup) {
            address_moved = Some(sigterm.elapsed());
        }
        thread::sleep(Duration::from_millis(5));
    }
    assert!(
        draining_seen.is_some(),
        "lb{}'s /healthz never answered 503 draining after SIGTERM:\n{}",
        master + 1,
        balancers[master].log()
    );
    assert!(
        address_moved.is_some(),
        "{VIP} did not move to lb{} after lb{} started to drain:\n{}",
        backup + 1,
        master + 1,
        ka_logs()
    );
    let served = wait_for(RECOVERY_BOUND, || {
        client_move(&log, terminated, names[backup])
            .served_again
            .is_some()
    });
    assert!(
        served.is_some(),
        "the client was not served by lb{} again after the drain",
        backup + 1
    );
    let drain = client_move(&log, terminated, names[backup]);
    // The held connection came through the address, which another
    // balancer now holds: its next packet reaches that one.
    let _ = held.0.write_all(b"ping\n");
    let mut buf = [0u8; 16];
    let held_after = match held.0.read(&mut buf) {
        Ok(0) => "closed".to_string(),
        Ok(_) => "open".to_string(),
        Err(e) => kind(&e),
    };
    let at = |d: Option<Duration>| d.map_or("never".to_string(), |d| format!("{:.0} ms", ms(d)));
    eprintln!(
        "FIGURE keepalived: SIGTERM (drain) on lb{}: /healthz 503 after {}, its listener closed \
         after {}, the address on lb{} after {}; the client had {} failed requests {:?}, \
         first failure -> first answer from lb{}: {:.0} ms, slowest request {:.0} ms; the connection held through the \
         address during the move: {held_after}",
        master + 1,
        at(draining_seen),
        at(listener_closed),
        backup + 1,
        at(address_moved),
        drain.failures,
        drain.kinds,
        backup + 1,
        gap(&drain),
        ms(drain.slowest),
    );

    // 4. Planned maintenance as the shipped file describes it: with the
    // drained balancer back, the master gives the address up through its
    // maintenance file first, and fleetgate is stopped after the move.
    assert!(
        balancers[master]
            .wait_exit(Duration::from_secs(15))
            .is_some(),
        "lb{} did not finish its drain",
        master + 1
    );
    balancers[master] = rejoin(&lab, master, dir.path(), &keepalived[master]);
    let (master, backup) = (backup, master);
    let flagged = t0.elapsed();
    std::fs::write(maintenance_file(dir.path(), master + 1), "1\n").unwrap();
    let moved = wait_for(RECOVERY_BOUND, || vip_holder(&lab) == Some(backup));
    assert!(
        moved.is_some(),
        "{VIP} did not move to lb{} when lb{} was put in maintenance:\n{}",
        backup + 1,
        master + 1,
        ka_logs()
    );
    let served = wait_for(RECOVERY_BOUND, || {
        client_move(&log, flagged, names[backup])
            .served_again
            .is_some()
    });
    assert!(
        served.is_some(),
        "the client was not served by lb{} again after the maintenance flag",
        backup + 1
    );
    let planned = client_move(&log, flagged, names[backup]);
    let stopped = t0.elapsed();
    balancers[master].terminate();
    let exit = balancers[master].wait_exit(Duration::from_secs(15));
    assert!(
        exit.is_some_and(|s| s.success()),
        "lb{} after SIGTERM: {exit:?}",
        master + 1
    );
    // Requests keep going to lb{backup} while the other one stops.
    let after = t0.elapsed();
    assert!(
        wait_for(Duration::from_secs(5), || answers_from(
            &log,
            names[backup],
            after
        ) >= 20)
        .is_some(),
        "the client is not served by lb{} after lb{} stopped",
        backup + 1,
        master + 1
    );
    let failed_during_stop = log
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, _, r)| *t >= stopped && r.is_err())
        .count();
    eprintln!(
        "FIGURE keepalived: maintenance flag on lb{}: the address on lb{} after {:.0} ms; the \
         client had {} failed requests {:?}, first failure -> first answer from lb{}: {:.0} ms, slowest request {:.0} ms; \
         then SIGTERM to lb{} (holding no address): {failed_during_stop} failed requests",
        master + 1,
        backup + 1,
        ms(moved.unwrap()),
        planned.failures,
        planned.kinds,
        backup + 1,
        gap(&planned),
        ms(planned.slowest),
        master + 1,
    );

    stop.store(true, Ordering::SeqCst);
    client.join().unwrap();
    let total = log.lock().unwrap().len();
    eprintln!("FIGURE keepalived: {total} client requests in all");
}
