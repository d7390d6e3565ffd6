//! The bench's own fleet: nodes that exist only as signed heartbeats,
//! sent from one UDP socket with the library's wire format, so any number
//! of them costs no process and a state change is a single datagram whose
//! send time is known to the microsecond.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use fleetgate::discovery::{token, unix_ms, wire, Heartbeat, NodeState, Service, Token};

/// The cluster name in every config and heartbeat of this bench.
pub const CLUSTER: &str = "bench";

/// Joins and refreshes are sent in bursts of this many datagrams with a
/// pause between, so the balancer's socket buffer (about 200 small
/// datagrams at the default rmem) never overflows.
const BURST: usize = 50;
const BURST_PAUSE: Duration = Duration::from_millis(5);

/// One announced node: its next heartbeat, less sequence and sent-at.
pub struct Node {
    heartbeat: Heartbeat,
}

impl Node {
    /// A node `id` at `addr` offering `service` on `port`, in state
    /// `normal`. The boot id is random, so two runs against one balancer
    /// would not be taken for replays of each other.
    pub fn new(id: String, addr: Ipv4Addr, service: &str, port: u16) -> Node {
        Node {
            heartbeat: Heartbeat {
                cluster: CLUSTER.into(),
                node: id,
                boot_id: fastrand::u64(..),
                seq: 0,
                sent_at_ms: 0,
                state: NodeState::Normal,
                weight: 1,
                load: None,
                addr: Some(IpAddr::V4(addr)),
                services: vec![Service {
                    name: service.into(),
                    port,
                    tls: false,
                }],
            },
        }
    }

    pub fn id(&self) -> &str {
        &self.heartbeat.node
    }

    pub fn service(&self) -> &str {
        &self.heartbeat.services[0].name
    }

    /// Where a pool connects to this node.
    pub fn endpoint(&self) -> SocketAddr {
        let ip = self
            .heartbeat
            .addr
            .expect("bench nodes advertise an address");
        SocketAddr::new(ip, self.heartbeat.services[0].port)
    }
}

/// The sending side for a set of nodes.
pub struct Fleet {
    socket: UdpSocket,
    target: SocketAddr,
    token: Token,
    pub nodes: Vec<Node>,
}

impl Fleet {
    /// Writes a fresh network token to `token_file` (mode 0600, as the
    /// balancer demands) and opens the sending socket.
    pub fn new(token_file: &Path, target: SocketAddr, nodes: Vec<Node>) -> Result<Fleet> {
        let token = token::generate(token_file, false)
            .with_context(|| format!("writing {}", token_file.display()))?;
        let socket = UdpSocket::bind(("127.0.0.1", 0)).context("heartbeat socket")?;
        Ok(Fleet {
            socket,
            target,
            token,
            nodes,
        })
    }

    /// Sends node `i`'s heartbeat now, with the next sequence number.
    pub fn send(&mut self, i: usize) -> Result<()> {
        let hb = &mut self.nodes[i].heartbeat;
        hb.seq += 1;
        hb.sent_at_ms = unix_ms();
        let bytes = wire::encode(hb, &self.token)?;
        self.socket
            .send_to(&bytes, self.target)
            .with_context(|| format!("sending a heartbeat to {}", self.target))?;
        Ok(())
    }

    /// Gives node `i` a new state and announces it at once. Returns the
    /// instant right before the datagram was handed to the kernel: the
    /// start of the change's wall time.
    pub fn change(&mut self, i: usize, state: NodeState) -> Result<Instant> {
        self.nodes[i].heartbeat.state = state;
        let sent = Instant::now();
        self.send(i)?;
        Ok(sent)
    }

    /// Sets node `i`'s state without sending (the next `send` carries it).
    pub fn set_state(&mut self, i: usize, state: NodeState) {
        self.nodes[i].heartbeat.state = state;
    }

    /// One heartbeat from every node, in paced bursts: joins the nodes the
    /// first time, keeps them from expiring afterwards.
    pub fn send_all(&mut self) -> Result<()> {
        for i in 0..self.nodes.len() {
            if i > 0 && i % BURST == 0 {
                thread::sleep(BURST_PAUSE);
            }
            self.send(i)?;
        }
        Ok(())
    }
}
