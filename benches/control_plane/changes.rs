//! Part 1: what one discovery change costs the control plane. Many pools,
//! each discovered from its own service; one node at a time goes
//! `draining` and back to `normal`. CPU time is read from /proc around
//! windows of changes and equally long idle windows, with the admin API
//! left alone; wall time from the heartbeat to `/status` showing the
//! change is measured in separate rounds that poll.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fleetgate::discovery::NodeState;

use crate::admin::{Admin, Status};
use crate::config::{dir_str, render, write_config};
use crate::heartbeats::{Fleet, Node};
use crate::procs::{cpu_ticks, free_port, machine_busy_ticks, sched_run_ns, Guard};

const CONFIG_TEMPLATE: &str = include_str!("../templates/control_plane/pools.toml");
const POOL_TEMPLATE: &str = include_str!("../templates/control_plane/pool.toml");

/// Longest wait for fleetgate to come up, or for it to show a state.
const LIMIT: Duration = Duration::from_secs(20);
/// Pause after refreshing the nodes or reading /status, before a window:
/// that work must be finished before the counters are read.
const SETTLE: Duration = Duration::from_millis(500);
/// `/status` polling period of the wall-time rounds.
const POLL: Duration = Duration::from_millis(1);
/// Gap between two changes of a wall-time round.
const WALL_GAP: Duration = Duration::from_millis(20);
/// Every nodes' port: nothing listens there, nothing connects.
const SERVICE_PORT: u16 = 20_000;

pub struct Shape {
    pub pools: usize,
    pub nodes: usize,
}

/// fleetgate with its pools filled, and the fleet that fills them.
pub struct Setup {
    pub fleetgate: Guard,
    pub admin: Admin,
    fleet: Fleet,
    shape: Shape,
    /// Changes made so far: picks the next node and state.
    made: usize,
}

/// One change of a wall-time round.
pub struct WallSample {
    /// From the heartbeat's send to the response that showed it, ms.
    pub ms: f64,
    /// `/status` requests it took.
    pub polls: u32,
    /// The `/status` request timed right before the change, ms.
    pub idle_status_ms: f64,
}

/// What one round measured.
pub struct CpuRound {
    pub changes: usize,
    /// fleetgate utime+stime in the change window minus the idle window,
    /// ms: a multiple of the clock tick (10 ms at USER_HZ 100).
    pub ticks_ms: f64,
    /// The same from the scheduler's per-thread run time, ms.
    pub sched_ms: f64,
    /// fleetgate in the idle window, % of one core.
    pub idle_core_pct: f64,
    /// Everything but fleetgate and the bench over both windows, % of
    /// one core (machine busy time minus the two).
    pub others_pct: f64,
    /// Heartbeats applied during the windows ÷ changes sent (1.0 = all).
    pub applied_ratio: f64,
}

pub fn start(dir: &Path, bin: &Path, shape: Shape) -> Result<Setup> {
    if shape.pools == 0 || shape.pools > 250 || shape.nodes == 0 || shape.nodes > 250 {
        bail!("POOLS and NODES must be 1 to 250 (node addresses are 127.1.POOL.NODE)");
    }
    let admin_port = free_port()?;
    let discovery_port = free_udp_port()?;
    let mut text = render(
        CONFIG_TEMPLATE,
        &[
            ("DIR", dir_str(dir)),
            ("ADMIN_PORT", admin_port.to_string()),
            ("DISCOVERY_PORT", discovery_port.to_string()),
            ("POOLS", shape.pools.to_string()),
        ],
    )?;
    let mut nodes = Vec::new();
    for p in 0..shape.pools {
        text += &render(
            POOL_TEMPLATE,
            &[("INDEX", p.to_string()), ("PORT", free_port()?.to_string())],
        )?;
        for n in 0..shape.nodes {
            let addr = Ipv4Addr::new(127, 1, p as u8, n as u8 + 1);
            nodes.push(Node::new(
                format!("n{p}-{n}"),
                addr,
                &format!("s{p}"),
                SERVICE_PORT,
            ));
        }
    }
    let conf = write_config(dir, "pools.toml", &text, &[])?;
    let target = SocketAddr::from(([127, 0, 0, 1], discovery_port));
    let fleet = Fleet::new(&dir.join("pools.token"), target, nodes)?;
    let mut cmd = Command::new(bin);
    cmd.arg("run").arg("-c").arg(&conf);
    let mut fleetgate = Guard::spawn("fleetgate", &mut cmd, &dir.join("pools.out"))?;
    let admin = Admin::new(admin_port);
    wait_admin(&mut fleetgate, &admin)?;
    let mut setup = Setup {
        fleetgate,
        admin,
        fleet,
        shape,
        made: 0,
    };
    setup.refresh()?;
    Ok(setup)
}

/// A UDP port nothing is bound to right now (the kernel's pick).
fn free_udp_port() -> Result<u16> {
    Ok(UdpSocket::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

fn wait_admin(guard: &mut Guard, admin: &Admin) -> Result<()> {
    let deadline = Instant::now() + LIMIT;
    loop {
        guard.ensure_running()?;
        match admin.get("/healthz") {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                bail!("fleetgate's admin API not answering after {LIMIT:?}: {e:#}")
            }
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
}

impl Setup {
    pub fn nodes(&self) -> usize {
        self.fleet.nodes.len()
    }

    /// Announces every node again (joining them the first time) and waits
    /// until every pool lists all its nodes as `normal`. Datagrams may be
    /// dropped under a burst, so unseen nodes are announced again.
    pub fn refresh(&mut self) -> Result<()> {
        let deadline = Instant::now() + LIMIT;
        self.fleet.send_all()?;
        loop {
            self.fleetgate.ensure_running()?;
            thread::sleep(Duration::from_millis(200));
            let status = self.admin.status()?;
            let missing = self.missing(&status);
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} of {} nodes still not shown as normal in their pools after {LIMIT:?}",
                    missing.len(),
                    self.nodes()
                );
            }
            for i in missing {
                self.fleet.send(i)?;
            }
        }
    }

    /// Nodes that `status` does not show as `normal` in their pool.
    fn missing(&self, status: &Status) -> Vec<usize> {
        let known = status.node_states();
        (0..self.nodes())
            .filter(|&i| {
                let node = &self.fleet.nodes[i];
                let in_pool = status
                    .pool(&pool_of(node.service()))
                    .is_some_and(|p| p.shows(node.id(), node.endpoint(), NodeState::Normal));
                // A build whose /status has no node list is judged by the
                // pools alone.
                let registry = known.is_empty() || known.get(node.id()) == Some(&"normal");
                !(in_pool && registry)
            })
            .collect()
    }

    /// The next change: change 2m sends node m `draining`, change 2m + 1
    /// brings it back to `normal`. Node m walks over the pools first, so
    /// consecutive pairs touch different pools.
    fn next_change(&mut self) -> (usize, NodeState) {
        let j = self.made;
        self.made += 1;
        let m = j / 2;
        let pool = m % self.shape.pools;
        let node = (m / self.shape.pools) % self.shape.nodes;
        let state = if j.is_multiple_of(2) {
            NodeState::Draining
        } else {
            NodeState::Normal
        };
        (pool * self.shape.nodes + node, state)
    }

    /// One CPU round: an idle window and a window with `changes` changes
    /// `gap` apart (in `idle_first` order), both `changes × gap` long. No
    /// admin request and no other heartbeat falls inside either window.
    pub fn cpu_round(
        &mut self,
        changes: usize,
        gap: Duration,
        idle_first: bool,
        ticks_per_sec: f64,
    ) -> Result<CpuRound> {
        self.refresh()?;
        // A build without the counter still gets measured (ratio n/a).
        let applied_before = self.admin.heartbeats_applied().ok();
        thread::sleep(SETTLE);
        let pid = self.fleetgate.pid();
        let window = gap * changes as u32;
        let mut idle = Window::default();
        let mut busy = Window::default();
        for pass in 0..2 {
            if (pass == 0) == idle_first {
                idle = Window::measure(pid, || {
                    thread::sleep(window);
                    Ok(())
                })?;
            } else {
                busy = Window::measure(pid, || {
                    let start = Instant::now();
                    for c in 0..changes {
                        let (i, state) = self.next_change();
                        self.fleet.change(i, state)?;
                        // Paced from the window's start: the last change
                        // has a whole gap to be applied inside the window.
                        let next = start + gap * (c as u32 + 1);
                        thread::sleep(next.saturating_duration_since(Instant::now()));
                    }
                    Ok(())
                })?;
            }
        }
        self.fleetgate.ensure_running()?;
        // Read after both windows: every change must have been applied
        // (none lost, none refused) for the figure to mean anything.
        let applied = match (applied_before, self.admin.heartbeats_applied().ok()) {
            (Some(a), Some(b)) => b.saturating_sub(a) as f64,
            _ => f64::NAN,
        };
        let changes_f = changes as f64;
        let both_secs = idle.wall + busy.wall;
        let others = (busy.machine + idle.machine) as f64
            - (busy.ticks + idle.ticks) as f64
            - (busy.own_ticks + idle.own_ticks) as f64;
        Ok(CpuRound {
            changes,
            ticks_ms: (busy.ticks as f64 - idle.ticks as f64) / ticks_per_sec * 1e3,
            sched_ms: (busy.sched_ns as f64 - idle.sched_ns as f64) / 1e6,
            idle_core_pct: idle.ticks as f64 / ticks_per_sec / idle.wall * 100.0,
            others_pct: others.max(0.0) / ticks_per_sec / both_secs * 100.0,
            applied_ratio: applied / changes_f,
        })
    }

    /// One wall-time round: `changes` changes, each followed by `/status`
    /// polls every millisecond until the change shows. Right before each
    /// change, one `/status` request (read and parsed like a poll) is
    /// timed while nothing changes: the same work without the change,
    /// which the report subtracts to estimate the change's own share.
    pub fn wall_round(&mut self, changes: usize) -> Result<Vec<WallSample>> {
        self.refresh()?;
        thread::sleep(SETTLE);
        let mut samples = Vec::with_capacity(changes);
        for _ in 0..changes {
            let (i, state) = self.next_change();
            let node = &self.fleet.nodes[i];
            let (id, endpoint) = (node.id().to_string(), node.endpoint());
            let pool = pool_of(node.service());
            let before = Instant::now();
            let status = self.admin.status()?;
            let idle_ms = before.elapsed().as_secs_f64() * 1e3;
            if status
                .pool(&pool)
                .is_none_or(|p| p.shows(&id, endpoint, state))
            {
                bail!("node {id} shown as {state} before the change (or pool {pool} missing)");
            }
            thread::sleep(POLL);
            let sent = self.fleet.change(i, state)?;
            let (seen, polls) = self
                .admin
                .poll_until(POLL, LIMIT, |s| {
                    s.pool(&pool).is_some_and(|p| p.shows(&id, endpoint, state))
                })
                .with_context(|| format!("node {id} → {state}"))?;
            samples.push(WallSample {
                ms: (seen - sent).as_secs_f64() * 1e3,
                polls,
                idle_status_ms: idle_ms,
            });
            thread::sleep(WALL_GAP);
        }
        Ok(samples)
    }

    /// Bytes of the `/status` document.
    pub fn status_size(&self) -> Result<usize> {
        Ok(self.admin.get("/status")?.len())
    }
}

/// The pool that discovers `service` (s7 → p7).
fn pool_of(service: &str) -> String {
    format!("p{}", &service[1..])
}

/// Counters read around a window.
#[derive(Default)]
struct Window {
    ticks: u64,
    sched_ns: u64,
    machine: u64,
    /// This bench's own CPU ticks (all its threads).
    own_ticks: u64,
    wall: f64,
}

impl Window {
    fn measure(pid: u32, body: impl FnOnce() -> Result<()>) -> Result<Window> {
        let own = std::process::id();
        let (t0, s0, m0, o0) = (
            cpu_ticks(pid)?,
            sched_run_ns(pid)?,
            machine_busy_ticks()?,
            cpu_ticks(own)?,
        );
        let start = Instant::now();
        body()?;
        let wall = start.elapsed().as_secs_f64();
        Ok(Window {
            ticks: cpu_ticks(pid)? - t0,
            sched_ns: sched_run_ns(pid)? - s0,
            machine: machine_busy_ticks()? - m0,
            own_ticks: cpu_ticks(own)? - o0,
            wall,
        })
    }
}
