//! The nodes a balancer has heard from. Writers (the receiver and the
//! expiry loop) take a mutex; readers (pools, /status) load an immutable
//! `Snapshot` and never block the receiver. A `watch` counter moves only
//! when something a pool cares about changed, so pools rebuild on change,
//! not on every heartbeat.
//!
//! Replay protection: per node id, the (boot id, sequence, sent-at) of the
//! last accepted heartbeat. The same boot needs a strictly greater
//! sequence; a new boot needs a strictly newer sent-at time. These marks
//! outlive the node (a `leaving` node must not be brought back by a replay
//! of its earlier heartbeats) until the clock window makes replays stale.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::wire::{Heartbeat, NodeState, Service};
use super::Reason;

/// The field's clocks agree within a minute.
pub const DEFAULT_MAX_SKEW: Duration = Duration::from_secs(60);

/// A node as last heard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub id: String,
    /// Advertised address, or the source address of its heartbeats.
    pub addr: IpAddr,
    /// True when `addr` was advertised rather than taken from the packet.
    pub advertised: bool,
    pub state: NodeState,
    pub weight: u16,
    pub load: Option<u16>,
    pub services: Vec<Service>,
    pub boot_id: u64,
    pub seq: u64,
    pub sent_at_ms: u64,
    pub last_heard: Instant,
    /// When this boot of the node was first heard.
    pub since: Instant,
}

impl Node {
    /// What pools build from: a change here bumps the version.
    fn same_for_pools(&self, other: &Node) -> bool {
        self.addr == other.addr
            && self.state == other.state
            && self.weight == other.weight
            && self.services == other.services
    }
}

/// One (node, service) pair: where a pool connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub node: String,
    /// The node's address and the service's port.
    pub addr: SocketAddr,
    pub tls: bool,
    pub state: NodeState,
    pub weight: u16,
    pub load: Option<u16>,
}

/// An immutable view of the registry.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Equals the `watch` value published with it.
    pub version: u64,
    /// Sorted by id, so pools built from it are deterministic.
    pub nodes: Vec<Arc<Node>>,
}

impl Snapshot {
    /// Every node offering `service`, in node-id order.
    pub fn endpoints(&self, service: &str) -> Vec<Endpoint> {
        self.nodes
            .iter()
            .filter_map(|n| {
                let s = n.services.iter().find(|s| s.name == service)?;
                Some(Endpoint {
                    node: n.id.clone(),
                    addr: SocketAddr::new(n.addr, s.port),
                    tls: s.tls,
                    state: n.state,
                    weight: n.weight,
                    load: n.load,
                })
            })
            .collect()
    }

    pub fn node(&self, id: &str) -> Option<&Arc<Node>> {
        self.nodes
            .binary_search_by(|n| n.id.as_str().cmp(id))
            .ok()
            .and_then(|i| self.nodes.get(i))
    }
}

/// What an accepted heartbeat did (for logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Joined,
    /// Address, state, weight or services changed; `previous` state given
    /// for the log line.
    Changed {
        previous: NodeState,
    },
    /// A new boot id with nothing else changed.
    Restarted,
    /// Nothing changed but the time last heard (and the load).
    Refreshed,
    /// A `leaving` heartbeat removed the node.
    Left,
    /// A `leaving` heartbeat for a node already gone: senders repeat
    /// `leaving` because UDP may lose one, and the departure was already
    /// reported by the first (or by expiry).
    AlreadyGone,
}

/// Why an authentic heartbeat was not applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("heartbeat for another cluster")]
    OtherCluster,
    #[error("replayed or out-of-order heartbeat")]
    Replay,
    #[error("sent-at time is {skew_ms} ms off the local clock (window ±{max_ms} ms): check NTP")]
    Stale { skew_ms: i64, max_ms: u64 },
    #[error(
        "two live senders use this node id (boot ids {current:016x} and {other:016x}): \
         give each machine its own node_id"
    )]
    Conflict { current: u64, other: u64 },
}

impl ApplyError {
    pub fn reason(self) -> Reason {
        match self {
            ApplyError::OtherCluster => Reason::OtherCluster,
            ApplyError::Replay => Reason::Replay,
            ApplyError::Stale { .. } => Reason::Stale,
            ApplyError::Conflict { .. } => Reason::Conflict,
        }
    }
}

/// The replay high-water mark of one node id.
#[derive(Debug, Clone, Copy)]
struct Mark {
    boot_id: u64,
    seq: u64,
    sent_at_ms: u64,
    /// The boot this one replaced: if it speaks again while the node is
    /// live, two machines share the id.
    prev_boot: Option<u64>,
    accepted_at: Instant,
}

#[derive(Default)]
struct Inner {
    nodes: BTreeMap<String, Arc<Node>>,
    marks: HashMap<String, Mark>,
    version: u64,
    /// When the snapshot was last replaced without a material change.
    last_refresh: Option<Instant>,
}

/// How stale the snapshot's last-heard and load figures may get. Copying
/// the node list on every heartbeat would cost nodes² per interval; a
/// material change (join, state, weight, address, services, removal) is
/// always published at once.
const REFRESH_EVERY: Duration = Duration::from_millis(100);

pub struct Registry {
    cluster: String,
    max_skew: Duration,
    inner: Mutex<Inner>,
    snapshot: ArcSwap<Snapshot>,
    changes: watch::Sender<u64>,
}

impl Registry {
    pub fn new(cluster: impl Into<String>, max_skew: Duration) -> Registry {
        Registry {
            cluster: cluster.into(),
            max_skew,
            inner: Mutex::new(Inner::default()),
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            changes: watch::channel(0).0,
        }
    }

    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// The current view; cheap (an atomic load and a refcount).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Shorthand for `snapshot().endpoints(service)`.
    pub fn endpoints(&self, service: &str) -> Vec<Endpoint> {
        self.snapshot.load().endpoints(service)
    }

    /// The version counter: `changed()` fires when address, state, weight
    /// or services of a node changed, or a node came or went. Load and
    /// last-heard times change without a notification.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub fn version(&self) -> u64 {
        *self.changes.borrow()
    }

    /// Apply a verified heartbeat that came from `source`. `now` and
    /// `wall_ms` (local Unix ms) are parameters so tests control time.
    pub fn apply(
        &self,
        hb: &Heartbeat,
        source: IpAddr,
        now: Instant,
        wall_ms: u64,
    ) -> Result<Applied, ApplyError> {
        if hb.cluster != self.cluster {
            return Err(ApplyError::OtherCluster);
        }
        let skew_ms = hb.sent_at_ms as i128 - wall_ms as i128;
        let max_ms = self.max_skew.as_millis() as u64;
        if skew_ms.unsigned_abs() > u128::from(max_ms) {
            return Err(ApplyError::Stale {
                skew_ms: skew_ms.clamp(i64::MIN as i128, i64::MAX as i128) as i64,
                max_ms,
            });
        }
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *inner;
        let prev_boot = match inner.marks.get(&hb.node) {
            None => None,
            Some(m) if m.boot_id == hb.boot_id => {
                if hb.seq <= m.seq {
                    return Err(ApplyError::Replay);
                }
                m.prev_boot
            }
            Some(m) => {
                // Older than what we accepted: an earlier boot replayed.
                if hb.sent_at_ms <= m.sent_at_ms {
                    return Err(ApplyError::Replay);
                }
                // Newer, but from the boot this one replaced: two machines
                // are alive under one id. Keep the current one stable.
                if m.prev_boot == Some(hb.boot_id) && inner.nodes.contains_key(&hb.node) {
                    return Err(ApplyError::Conflict {
                        current: m.boot_id,
                        other: hb.boot_id,
                    });
                }
                Some(m.boot_id)
            }
        };
        inner.marks.insert(
            hb.node.clone(),
            Mark {
                boot_id: hb.boot_id,
                seq: hb.seq,
                sent_at_ms: hb.sent_at_ms,
                prev_boot,
                accepted_at: now,
            },
        );

        let old = inner.nodes.get(&hb.node).cloned();
        let (applied, material) = if hb.state == NodeState::Leaving {
            match inner.nodes.remove(&hb.node) {
                Some(_) => (Applied::Left, true),
                None => (Applied::AlreadyGone, false),
            }
        } else {
            let node = Node {
                id: hb.node.clone(),
                addr: hb.addr.unwrap_or(source),
                advertised: hb.addr.is_some(),
                state: hb.state,
                weight: hb.weight,
                load: hb.load,
                services: hb.services.clone(),
                boot_id: hb.boot_id,
                seq: hb.seq,
                sent_at_ms: hb.sent_at_ms,
                last_heard: now,
                since: match &old {
                    Some(o) if o.boot_id == hb.boot_id => o.since,
                    _ => now,
                },
            };
            let result = match &old {
                None => (Applied::Joined, true),
                Some(o) if !o.same_for_pools(&node) => {
                    (Applied::Changed { previous: o.state }, true)
                }
                Some(o) if o.boot_id != node.boot_id => (Applied::Restarted, false),
                Some(_) => (Applied::Refreshed, false),
            };
            inner.nodes.insert(hb.node.clone(), Arc::new(node));
            result
        };
        // A restart is not material for pools, but readers (/status) must
        // see the new boot at once.
        let restarted = matches!(applied, Applied::Restarted);
        self.publish_now(inner, material, restarted);
        Ok(applied)
    }

    /// Remove nodes not heard for longer than `max_silence` (miss_limit ×
    /// interval) and forget replay marks that the clock window already
    /// covers. Returns the ids removed.
    pub fn expire(&self, now: Instant, max_silence: Duration) -> Vec<String> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *inner;
        let silent: Vec<String> = inner
            .nodes
            .values()
            .filter(|n| now.saturating_duration_since(n.last_heard) > max_silence)
            .map(|n| n.id.clone())
            .collect();
        for id in &silent {
            inner.nodes.remove(id);
        }
        // A heartbeat sent up to max_skew ahead of our clock stays fresh
        // until max_skew after that: twice the window, plus a margin.
        let keep = self.max_skew.saturating_mul(2) + Duration::from_secs(1);
        let nodes = &inner.nodes;
        inner.marks.retain(|id, m| {
            nodes.contains_key(id) || now.saturating_duration_since(m.accepted_at) <= keep
        });
        if !silent.is_empty() {
            self.publish_now(inner, true, false);
        }
        silent
    }

    /// Replace the snapshot; bump and announce the version if `material`.
    /// Called with the lock held so snapshots are published in order.
    fn publish_now(&self, inner: &mut Inner, material: bool, refresh: bool) {
        if material {
            inner.version += 1;
        } else if !refresh {
            let now = Instant::now();
            if inner
                .last_refresh
                .is_some_and(|t| now.saturating_duration_since(t) < REFRESH_EVERY)
            {
                return;
            }
            inner.last_refresh = Some(now);
        }
        self.snapshot.store(Arc::new(Snapshot {
            version: inner.version,
            nodes: inner.nodes.values().cloned().collect(),
        }));
        if material {
            self.changes.send_replace(inner.version);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::wire::tests::sample;

    const T0: u64 = 1_700_000_000_000;

    fn reg() -> Registry {
        Registry::new("fleet", DEFAULT_MAX_SKEW)
    }

    fn src() -> IpAddr {
        "198.51.100.7".parse().unwrap()
    }

    fn hb(node: &str, boot: u64, seq: u64, sent: u64) -> Heartbeat {
        Heartbeat {
            node: node.into(),
            boot_id: boot,
            seq,
            sent_at_ms: sent,
            ..sample()
        }
    }

    #[test]
    fn learns_a_node_and_lists_endpoints() {
        let r = reg();
        let now = Instant::now();
        let mut rx = r.subscribe();
        assert_eq!(
            r.apply(&hb("a", 1, 1, T0), src(), now, T0),
            Ok(Applied::Joined)
        );
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), 1);
        let eps = r.endpoints("device-tls");
        assert_eq!(
            eps,
            vec![Endpoint {
                node: "a".into(),
                addr: "192.0.2.10:8443".parse().unwrap(),
                tls: true,
                state: NodeState::Normal,
                weight: 100,
                load: Some(250),
            }]
        );
        assert!(r.endpoints("nope").is_empty());
        // No advertised address: the source address is used.
        let mut h = hb("b", 1, 1, T0);
        h.addr = None;
        r.apply(&h, src(), now, T0).unwrap();
        let snap = r.snapshot();
        assert_eq!(snap.version, 2);
        let b = snap.node("b").unwrap();
        assert_eq!(b.addr, src());
        assert!(!b.advertised);
        assert_eq!(
            snap.nodes.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
    }

    #[test]
    fn version_moves_only_on_material_change() {
        let r = reg();
        let now = Instant::now();
        r.apply(&hb("a", 1, 1, T0), src(), now, T0).unwrap();
        let mut h = hb("a", 1, 2, T0 + 1000);
        h.load = Some(900);
        assert_eq!(r.apply(&h, src(), now, T0), Ok(Applied::Refreshed));
        assert_eq!(r.version(), 1);
        assert_eq!(
            r.snapshot().node("a").unwrap().load,
            Some(900),
            "load still visible"
        );
        h.seq = 3;
        h.state = NodeState::Draining;
        assert_eq!(
            r.apply(&h, src(), now, T0),
            Ok(Applied::Changed {
                previous: NodeState::Normal
            })
        );
        assert_eq!(r.version(), 2);
        h.seq = 4;
        h.weight = 5;
        r.apply(&h, src(), now, T0).unwrap();
        assert_eq!(r.version(), 3);
        assert_eq!(r.snapshot().version, 3);
    }

    #[test]
    fn replay_is_rejected() {
        let r = reg();
        let now = Instant::now();
        r.apply(&hb("a", 1, 5, T0), src(), now, T0).unwrap();
        assert_eq!(
            r.apply(&hb("a", 1, 5, T0), src(), now, T0),
            Err(ApplyError::Replay)
        );
        assert_eq!(
            r.apply(&hb("a", 1, 4, T0 + 5), src(), now, T0),
            Err(ApplyError::Replay)
        );
        assert_eq!(ApplyError::Replay.reason(), Reason::Replay);
        r.apply(&hb("a", 1, 6, T0), src(), now, T0).unwrap();
    }

    #[test]
    fn restart_with_new_boot_is_accepted_old_boot_is_not() {
        let r = reg();
        let now = Instant::now();
        r.apply(&hb("a", 1, 100, T0), src(), now, T0).unwrap();
        // Restarted: sequence starts over under a new boot id.
        assert_eq!(
            r.apply(&hb("a", 2, 1, T0 + 500), src(), now, T0),
            Ok(Applied::Restarted)
        );
        assert_eq!(r.snapshot().node("a").unwrap().boot_id, 2);
        // The old boot's heartbeats, replayed, are older: refused.
        assert_eq!(
            r.apply(&hb("a", 1, 101, T0), src(), now, T0),
            Err(ApplyError::Replay)
        );
        // A new boot not newer than the last accepted: refused.
        assert_eq!(
            r.apply(&hb("a", 3, 1, T0 + 500), src(), now, T0),
            Err(ApplyError::Replay)
        );
        r.apply(&hb("a", 2, 2, T0 + 1000), src(), now, T0).unwrap();
    }

    #[test]
    fn two_machines_with_one_id_are_a_conflict() {
        let r = reg();
        let now = Instant::now();
        r.apply(&hb("a", 1, 1, T0), src(), now, T0).unwrap();
        r.apply(&hb("a", 2, 1, T0 + 10), src(), now, T0).unwrap();
        let err = r
            .apply(&hb("a", 1, 2, T0 + 20), src(), now, T0)
            .unwrap_err();
        assert_eq!(err.reason(), Reason::Conflict);
        assert!(err.to_string().contains("node_id"), "{err}");
        assert_eq!(
            r.snapshot().node("a").unwrap().boot_id,
            2,
            "current sender kept"
        );
        // Once the current one has left, the other is accepted.
        let mut bye = hb("a", 2, 2, T0 + 30);
        bye.state = NodeState::Leaving;
        r.apply(&bye, src(), now, T0).unwrap();
        r.apply(&hb("a", 1, 3, T0 + 40), src(), now, T0).unwrap();
        assert_eq!(r.snapshot().node("a").unwrap().boot_id, 1);
    }

    #[test]
    fn stale_and_future_heartbeats_are_rejected() {
        let r = reg();
        let now = Instant::now();
        let e = r
            .apply(&hb("a", 1, 1, T0 - 60_001), src(), now, T0)
            .unwrap_err();
        assert_eq!(
            e,
            ApplyError::Stale {
                skew_ms: -60_001,
                max_ms: 60_000
            }
        );
        assert!(e.to_string().contains("NTP"));
        let e = r
            .apply(&hb("a", 1, 1, T0 + 60_001), src(), now, T0)
            .unwrap_err();
        assert_eq!(e.reason(), Reason::Stale);
        assert!(r.apply(&hb("a", 1, 1, 0), src(), now, T0).is_err());
        assert!(r.apply(&hb("a", 1, 1, u64::MAX), src(), now, T0).is_err());
        // The window edges are inside.
        r.apply(&hb("a", 1, 1, T0 - 60_000), src(), now, T0)
            .unwrap();
        r.apply(&hb("b", 1, 1, T0 + 60_000), src(), now, T0)
            .unwrap();
    }

    #[test]
    fn other_cluster_is_rejected() {
        let r = reg();
        let mut h = hb("a", 1, 1, T0);
        h.cluster = "lab".into();
        let e = r.apply(&h, src(), Instant::now(), T0).unwrap_err();
        assert_eq!(e.reason(), Reason::OtherCluster);
        assert!(r.snapshot().nodes.is_empty());
    }

    #[test]
    fn leaving_removes_at_once_and_cannot_be_undone_by_replay() {
        let r = reg();
        let now = Instant::now();
        let before = hb("a", 1, 1, T0);
        r.apply(&before, src(), now, T0).unwrap();
        let mut bye = hb("a", 1, 2, T0 + 100);
        bye.state = NodeState::Leaving;
        assert_eq!(r.apply(&bye, src(), now, T0), Ok(Applied::Left));
        assert!(r.snapshot().nodes.is_empty());
        assert_eq!(r.version(), 2);
        assert_eq!(r.apply(&before, src(), now, T0), Err(ApplyError::Replay));
        // Repeated leaving datagrams are harmless, do not bump and do not
        // count as a second departure.
        bye.seq = 3;
        assert_eq!(r.apply(&bye, src(), now, T0), Ok(Applied::AlreadyGone));
        assert_eq!(r.version(), 2);
        // It may come back with a new boot.
        r.apply(&hb("a", 9, 1, T0 + 200), src(), now, T0).unwrap();
        assert_eq!(r.snapshot().nodes.len(), 1);
    }

    #[test]
    fn silent_nodes_expire() {
        let r = reg();
        let t = Instant::now();
        let limit = Duration::from_secs(3);
        r.apply(&hb("a", 1, 1, T0), src(), t, T0).unwrap();
        r.apply(&hb("b", 1, 1, T0), src(), t + Duration::from_secs(2), T0)
            .unwrap();
        let v = r.version();
        assert!(r.expire(t + limit, limit).is_empty());
        assert_eq!(r.version(), v);
        assert_eq!(r.expire(t + Duration::from_millis(3001), limit), ["a"]);
        assert_eq!(r.version(), v + 1);
        assert_eq!(r.snapshot().nodes.len(), 1);
        assert_eq!(r.expire(t + Duration::from_secs(6), limit), ["b"]);
        assert!(r.snapshot().nodes.is_empty());
        // The expired node's mark still blocks replays for a while...
        assert_eq!(
            r.apply(&hb("a", 1, 1, T0), src(), t + Duration::from_secs(6), T0),
            Err(ApplyError::Replay)
        );
        // ...and is forgotten once the clock window covers it.
        r.expire(t + Duration::from_secs(125), limit);
        assert!(r.inner.lock().unwrap().marks.is_empty());
    }
}
