//! Reading fleetgate's admin API: `/status` for what the pools hold and
//! `/metrics` for how many heartbeats were applied. A blocking HTTP/1.1
//! exchange per request, one connection each: the bench never holds the
//! control thread's attention between polls.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fleetgate::discovery::NodeState;
use serde::Deserialize;

/// The part of `/status` the bench reads; other keys are skipped.
#[derive(Deserialize)]
pub struct Status {
    pub pools: Vec<PoolDoc>,
    pub discovery: Option<DiscoveryDoc>,
}

#[derive(Deserialize)]
pub struct PoolDoc {
    pub name: String,
    pub backends: Vec<BackendDoc>,
}

#[derive(Deserialize)]
pub struct BackendDoc {
    pub address: String,
    pub node: Option<String>,
    pub node_state: Option<String>,
}

#[derive(Deserialize)]
pub struct DiscoveryDoc {
    pub nodes: Vec<NodeDoc>,
}

#[derive(Deserialize)]
pub struct NodeDoc {
    pub id: String,
    pub state: String,
}

impl Status {
    pub fn pool(&self, name: &str) -> Option<&PoolDoc> {
        self.pools.iter().find(|p| p.name == name)
    }

    /// Node id → announced state, as the registry knows them.
    pub fn node_states(&self) -> HashMap<&str, &str> {
        self.discovery
            .iter()
            .flat_map(|d| &d.nodes)
            .map(|n| (n.id.as_str(), n.state.as_str()))
            .collect()
    }
}

impl PoolDoc {
    /// Whether `pool` shows node `node` in `state`. A node that takes no
    /// new connections (`draining`, `leaving`) may either be gone from the
    /// member list or be listed with that `node_state` (and not eligible):
    /// both mean the change is in effect. `normal` and `update` need the
    /// backend listed with that state.
    pub fn shows(&self, node: &str, endpoint: SocketAddr, state: NodeState) -> bool {
        let endpoint = endpoint.to_string();
        let listed = self
            .backends
            .iter()
            .find(|b| b.node.as_deref() == Some(node) || b.address == endpoint);
        match (listed, state) {
            (None, NodeState::Draining | NodeState::Leaving) => true,
            (None, _) => false,
            (Some(b), _) => b.node_state.as_deref() == Some(state.as_str()),
        }
    }
}

pub struct Admin {
    addr: SocketAddr,
}

impl Admin {
    pub fn new(port: u16) -> Admin {
        Admin {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    pub fn status(&self) -> Result<Status> {
        let body = self.get("/status")?;
        serde_json::from_slice(&body).context("parsing /status")
    }

    /// `fleetgate_discovery_heartbeats_total`: heartbeats verified and
    /// applied, refreshes included.
    pub fn heartbeats_applied(&self) -> Result<u64> {
        let body = self.get("/metrics")?;
        let text = String::from_utf8_lossy(&body);
        let line = text
            .lines()
            .find(|l| l.starts_with("fleetgate_discovery_heartbeats_total "))
            .context("no fleetgate_discovery_heartbeats_total in /metrics")?;
        let value = line.split_whitespace().nth(1).unwrap_or("");
        Ok(value.parse::<f64>().context("heartbeat counter")? as u64)
    }

    /// Polls `/status` every `period` until `done` holds; returns the
    /// instant the satisfying response had been read, and the number of
    /// polls.
    pub fn poll_until(
        &self,
        period: Duration,
        limit: Duration,
        done: impl Fn(&Status) -> bool,
    ) -> Result<(Instant, u32)> {
        let deadline = Instant::now() + limit;
        let mut polls = 0;
        loop {
            let status = self.status()?;
            let seen = Instant::now();
            polls += 1;
            if done(&status) {
                return Ok((seen, polls));
            }
            if seen > deadline {
                bail!("/status did not show the expected state within {limit:?}");
            }
            thread::sleep(period);
        }
    }

    /// The body of `GET path`; fails on anything but a 200.
    pub fn get(&self, path: &str) -> Result<Vec<u8>> {
        let mut stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2))
            .with_context(|| format!("admin API at {}", self.addr))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_nodelay(true)?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
        )?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .context("no end of response head")?;
        let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
        let body = raw.split_off(split + 4);
        if !head.starts_with("http/1.1 200") {
            bail!(
                "GET {path}: {}",
                head.lines().next().unwrap_or("empty response")
            );
        }
        if head.contains("transfer-encoding: chunked") {
            return dechunk(&body);
        }
        Ok(body)
    }
}

/// A chunked body, joined. Full bodies come with a length today; this
/// keeps the bench working if the admin API ever streams one.
fn dechunk(mut raw: &[u8]) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let end = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("truncated chunk size")?;
        let size_text = String::from_utf8_lossy(&raw[..end]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).context("chunk size")?;
        raw = &raw[end + 2..];
        if size == 0 {
            return Ok(body);
        }
        let chunk = raw.get(..size).context("truncated chunk")?;
        body.extend_from_slice(chunk);
        raw = raw.get(size + 2..).context("truncated chunk end")?;
    }
}
