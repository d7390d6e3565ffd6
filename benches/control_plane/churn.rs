//! Part 2: TLS offload keep-alive while the pool's nodes change state.
//! Four nodes, each an origin port, announce themselves every second from
//! a thread of the bench; wrk keeps 20 connections alive through an
//! offload listener, once with steady nodes and once with one state change
//! per second (one node at a time through draining, update, normal).

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use fleetgate::discovery::NodeState;

use crate::admin::Admin;
use crate::config::{dir_str, nginx_command, write_config};
use crate::heartbeats::{Fleet, Node};
use crate::procs::{
    cpu_ticks, free_port, machine_busy_ticks, reaped_children_ticks, wait_http_ok, Guard,
};
use crate::wrk::{wrk_connections, HttpResult};

const ORIGIN_TEMPLATE: &str = include_str!("../templates/control_plane/origin-nginx.conf");
const FLEETGATE_TEMPLATE: &str = include_str!("../templates/control_plane/churn.toml");

const NODES: usize = 4;
/// wrk's keep-alive connections (`-c20`), as in the measurement.
pub const CONNECTIONS: usize = 20;
/// The heartbeat interval in churn.toml, and the pace of the changes.
const TICK: Duration = Duration::from_secs(1);
/// One node's cycle, a step per tick; it ends where it began.
const CYCLE: [NodeState; 3] = [NodeState::Draining, NodeState::Update, NodeState::Normal];
const LIMIT: Duration = Duration::from_secs(20);

/// What one wrk run measured.
pub struct Run {
    pub wrk: HttpResult,
    /// fleetgate CPU per completed request, µs.
    pub cpu_us_per_request: f64,
    /// State changes announced during the run.
    pub changes: u64,
    /// Machine busy time minus fleetgate, the origin, wrk and the harness,
    /// % of one core: well above 0 means other work shared the cores.
    pub others_pct: f64,
}

pub struct Setup {
    pub fleetgate: Guard,
    origin: Guard,
    admin: Admin,
    url: String,
    sender: Sender,
    /// Node id and endpoint, to check the pool.
    nodes: Vec<(String, SocketAddr)>,
}

pub fn start(dir: &Path, bin: &Path) -> Result<Setup> {
    let ports: Vec<u16> = (0..NODES).map(|_| free_port()).collect::<Result<_>>()?;
    let mut vars = vec![("DIR", dir_str(dir))];
    let names = ["PORT_1", "PORT_2", "PORT_3", "PORT_4"];
    vars.extend(names.iter().zip(&ports).map(|(n, p)| (*n, p.to_string())));
    let conf = write_config(dir, "origin-nginx.conf", ORIGIN_TEMPLATE, &vars)?;
    let mut origin = Guard::spawn(
        "origin nginx",
        &mut nginx_command(dir, &conf),
        &dir.join("origin-nginx.out"),
    )?;
    for &port in &ports {
        wait_http_ok(&mut origin, port, LIMIT)?;
    }

    write_certificate(dir)?;
    let admin_port = free_port()?;
    let offload_port = free_port()?;
    let discovery_port = UdpSocket::bind(("127.0.0.1", 0))?.local_addr()?.port();
    let conf = write_config(
        dir,
        "churn.toml",
        FLEETGATE_TEMPLATE,
        &[
            ("DIR", dir_str(dir)),
            ("ADMIN_PORT", admin_port.to_string()),
            ("OFFLOAD_PORT", offload_port.to_string()),
            ("DISCOVERY_PORT", discovery_port.to_string()),
        ],
    )?;
    let nodes: Vec<Node> = ports
        .iter()
        .enumerate()
        .map(|(i, &port)| Node::new(format!("web-{}", i + 1), Ipv4Addr::LOCALHOST, "web", port))
        .collect();
    let ids = nodes
        .iter()
        .map(|n| (n.id().to_string(), n.endpoint()))
        .collect();
    let target = SocketAddr::from(([127, 0, 0, 1], discovery_port));
    let fleet = Fleet::new(&dir.join("churn.token"), target, nodes)?;
    let mut cmd = Command::new(bin);
    cmd.arg("run").arg("-c").arg(&conf);
    let fleetgate = Guard::spawn("fleetgate", &mut cmd, &dir.join("churn.out"))?;
    let mut setup = Setup {
        fleetgate,
        origin,
        admin: Admin::new(admin_port),
        url: format!("https://127.0.0.1:{offload_port}/"),
        sender: Sender::start(fleet),
        nodes: ids,
    };
    setup.wait_all_normal()?;
    Ok(setup)
}

/// A self-signed ECDSA P-256 certificate for 127.0.0.1 (wrk verifies
/// nothing; the TLS benchmark uses the same kind).
fn write_certificate(dir: &Path) -> Result<()> {
    let names = vec!["127.0.0.1".to_string(), "localhost".to_string()];
    let cert = rcgen::generate_simple_self_signed(names)?;
    std::fs::write(dir.join("server.pem"), cert.cert.pem())?;
    std::fs::write(dir.join("server.key"), cert.key_pair.serialize_pem())?;
    Ok(())
}

impl Setup {
    pub fn warm_up(&mut self, secs: u64) -> Result<()> {
        wrk_connections(&self.url, secs, CONNECTIONS, false)?;
        Ok(())
    }

    /// One wrk run of `secs` seconds, with or without churn; afterwards
    /// every node is `normal` again and shown so.
    pub fn run(&mut self, secs: u64, churn: bool, ticks_per_sec: f64) -> Result<Run> {
        self.wait_all_normal()?;
        thread::sleep(Duration::from_secs(1));
        let changes_before = self.sender.changes.load(Ordering::Relaxed);
        let before = Ticks::read(self.fleetgate.pid(), self.origin.pid())?;
        let started = Instant::now();
        self.sender.churn.store(churn, Ordering::Relaxed);
        let result = wrk_connections(&self.url, secs, CONNECTIONS, false);
        self.sender.churn.store(false, Ordering::Relaxed);
        let used = Ticks::read(self.fleetgate.pid(), self.origin.pid())?.minus(&before);
        let wall = started.elapsed().as_secs_f64();
        let changes = self.sender.changes.load(Ordering::Relaxed) - changes_before;
        self.fleetgate.ensure_running()?;
        let wrk = result?;
        let others =
            used.machine as f64 - (used.fleetgate + used.origin + used.children + used.own) as f64;
        Ok(Run {
            cpu_us_per_request: used.fleetgate as f64 / ticks_per_sec * 1e6
                / wrk.requests.max(1) as f64,
            wrk,
            changes,
            others_pct: others.max(0.0) / ticks_per_sec / wall * 100.0,
        })
    }

    /// Waits until the pool lists the four nodes as `normal`.
    fn wait_all_normal(&mut self) -> Result<()> {
        let deadline = Instant::now() + LIMIT;
        loop {
            self.fleetgate.ensure_running()?;
            if let Ok(status) = self.admin.status() {
                let all = status.pool("web").is_some_and(|p| {
                    self.nodes
                        .iter()
                        .all(|(id, ep)| p.shows(id, *ep, NodeState::Normal))
                });
                if all {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("the pool did not list its {NODES} nodes as normal within {LIMIT:?}");
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// CPU clock ticks of everyone involved, read around a run.
struct Ticks {
    fleetgate: u64,
    origin: u64,
    /// Reaped children: wrk, once it has exited.
    children: u64,
    /// The harness itself, the heartbeat thread included.
    own: u64,
    machine: u64,
}

impl Ticks {
    fn read(fleetgate: u32, origin: u32) -> Result<Ticks> {
        Ok(Ticks {
            fleetgate: cpu_ticks(fleetgate)?,
            origin: cpu_ticks(origin)?,
            children: reaped_children_ticks()?,
            own: cpu_ticks(std::process::id())?,
            machine: machine_busy_ticks()?,
        })
    }

    fn minus(&self, before: &Ticks) -> Ticks {
        Ticks {
            fleetgate: self.fleetgate - before.fleetgate,
            origin: self.origin - before.origin,
            children: self.children - before.children,
            own: self.own - before.own,
            machine: self.machine - before.machine,
        }
    }
}

/// The thread that announces the nodes: every tick one heartbeat per
/// node; while `churn` is set, one node's state moves one step first.
struct Sender {
    churn: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    changes: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Sender {
    fn start(fleet: Fleet) -> Sender {
        let churn = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let changes = Arc::new(AtomicU64::new(0));
        let (c, s, n) = (churn.clone(), stop.clone(), changes.clone());
        let thread = thread::spawn(move || {
            if let Err(e) = announce(fleet, &c, &s, &n) {
                eprintln!("heartbeat sender stopped: {e:#}");
            }
        });
        Sender {
            churn,
            stop,
            changes,
            thread: Some(thread),
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn announce(
    mut fleet: Fleet,
    churn: &AtomicBool,
    stop: &AtomicBool,
    changes: &AtomicU64,
) -> Result<()> {
    let mut step = 0usize;
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if churn.load(Ordering::Relaxed) {
            let node = (step / CYCLE.len()) % NODES;
            fleet.set_state(node, CYCLE[step % CYCLE.len()]);
            step += 1;
            changes.fetch_add(1, Ordering::Relaxed);
        } else if !step.is_multiple_of(CYCLE.len()) {
            // Churn stopped mid-cycle: every node back to normal, and the
            // next churn starts a fresh cycle.
            for i in 0..NODES {
                fleet.set_state(i, NodeState::Normal);
            }
            step += CYCLE.len() - step % CYCLE.len();
        }
        fleet.send_all()?;
        next += TICK;
        while Instant::now() < next && !stop.load(Ordering::Relaxed) {
            thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}
