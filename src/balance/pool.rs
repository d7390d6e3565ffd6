//! A pool of backends and the choice of one for a new connection.
//! The pool is immutable once built (a reload builds a new one that reuses
//! the `Backend`s it shares with the old); picks read atomics only.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::algorithm::{rendezvous_score, smooth_schedule};
use super::backend::{now_ms, Backend, PassivePolicy};
use crate::config::{Algorithm, PoolPlan};
use crate::discovery::{Endpoint, NodeState};
use crate::metrics::Metrics;

pub struct Member {
    pub backend: Arc<Backend>,
    pub weight: u32,
    pub backup: bool,
    /// The announcing node, for backends learned by discovery.
    pub node: Option<(String, NodeState)>,
}

/// Primaries, or the backups used while no primary is up.
struct Tier {
    members: Vec<usize>,
    schedule: Vec<usize>,
}

impl Tier {
    fn new(members: &[Member], backup: bool) -> Tier {
        let idx: Vec<usize> = (0..members.len())
            .filter(|&i| members[i].backup == backup)
            .collect();
        let weights: Vec<u32> = idx.iter().map(|&i| members[i].weight).collect();
        let schedule = smooth_schedule(&weights)
            .into_iter()
            .map(|k| idx[k])
            .collect();
        Tier {
            members: idx,
            schedule,
        }
    }
}

pub struct Pool {
    pub plan: PoolPlan,
    pub members: Vec<Member>,
    primary: Tier,
    backup: Tier,
    counter: AtomicUsize,
}

impl Pool {
    /// Build a pool, reusing backends (and so their health state and
    /// connection counts) from `previous` where the address matches.
    ///
    /// `discovered` are the endpoints announcing the pool's service: a
    /// `normal` node is a primary, an `update` node is used only while no
    /// primary is up (during a rolling upgrade all but one server are in
    /// update mode at once), and a `draining` node takes no new
    /// connections — it is left out, while its established connections
    /// keep the backend they hold.
    pub fn build(
        plan: &PoolPlan,
        previous: Option<&Pool>,
        metrics: &Metrics,
        discovered: &[Endpoint],
    ) -> Pool {
        let old: HashMap<_, _> = previous
            .map(|p| {
                p.members
                    .iter()
                    .map(|m| (m.backend.addr, m.backend.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let backend = |addr| {
            old.get(&addr)
                .cloned()
                .unwrap_or_else(|| Arc::new(Backend::new(metrics, &plan.name, addr)))
        };
        let mut members: Vec<Member> = plan
            .backends
            .iter()
            .map(|b| Member {
                backend: backend(b.addr),
                weight: b.weight,
                backup: b.backup,
                node: None,
            })
            .collect();
        for e in discovered {
            let backup = match e.state {
                NodeState::Normal => false,
                NodeState::Update => true,
                NodeState::Draining | NodeState::Leaving => continue,
            };
            if members.iter().any(|m| m.backend.addr == e.addr) {
                continue;
            }
            members.push(Member {
                backend: backend(e.addr),
                weight: u32::from(e.weight).clamp(1, crate::config::validate::MAX_WEIGHT),
                backup,
                node: Some((e.node.clone(), e.state)),
            });
        }
        if plan.health_check.is_none() {
            // Probes are gone: their last verdict must not keep a backend out.
            for m in &members {
                m.backend.set_check_up(true);
            }
        }
        Pool {
            primary: Tier::new(&members, false),
            backup: Tier::new(&members, true),
            members,
            counter: AtomicUsize::new(previous.map_or(0, |p| p.counter.load(Ordering::Relaxed))),
            plan: plan.clone(),
        }
    }

    pub fn name(&self) -> &str {
        &self.plan.name
    }

    pub fn passive_policy(&self) -> PassivePolicy {
        PassivePolicy {
            max_fails: self.plan.max_fails,
            fail_timeout: self.plan.fail_timeout,
        }
    }

    /// Choose a backend for a connection from `client`, skipping members in
    /// `tried` (already failed for this connection). Backups are used only
    /// while no primary is eligible.
    pub fn pick(&self, client: IpAddr, tried: &[usize]) -> Option<usize> {
        let now = now_ms();
        let ok = |i: usize| !tried.contains(&i) && self.members[i].backend.is_up_at(now);
        let chosen = self
            .pick_in(&self.primary, client, &ok)
            .or_else(|| self.pick_in(&self.backup, client, &ok))?;
        self.members[chosen].backend.metrics.selections.inc();
        Some(chosen)
    }

    fn pick_in(&self, tier: &Tier, client: IpAddr, ok: &dyn Fn(usize) -> bool) -> Option<usize> {
        if tier.members.is_empty() {
            return None;
        }
        match self.plan.algorithm {
            Algorithm::RoundRobin | Algorithm::WeightedRoundRobin => {
                let n = tier.schedule.len();
                let start = self.counter.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|k| tier.schedule[(start + k) % n])
                    .find(|&i| ok(i))
            }
            Algorithm::LeastConn => self.least_loaded(tier, ok),
            Algorithm::P2c => {
                let n = tier.members.len();
                if n >= 2 {
                    let a = fastrand::usize(..n);
                    let b = (a + 1 + fastrand::usize(..n - 1)) % n;
                    let (a, b) = (tier.members[a], tier.members[b]);
                    match (ok(a), ok(b)) {
                        (true, true) => return Some(if self.lighter(b, a) { b } else { a }),
                        (true, false) => return Some(a),
                        (false, true) => return Some(b),
                        (false, false) => {}
                    }
                }
                self.least_loaded(tier, ok)
            }
            Algorithm::HashClientIp => tier
                .members
                .iter()
                .copied()
                .filter(|&i| ok(i))
                .map(|i| {
                    let m = &self.members[i];
                    (i, rendezvous_score(client, m.backend.addr, m.weight))
                })
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(i, _)| i),
        }
    }

    /// Fewest connections per unit of weight; ties rotate so that idle
    /// backends share new connections evenly.
    fn least_loaded(&self, tier: &Tier, ok: &dyn Fn(usize) -> bool) -> Option<usize> {
        let n = tier.members.len();
        let start = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut best: Option<usize> = None;
        for k in 0..n {
            let i = tier.members[(start + k) % n];
            if ok(i) && best.is_none_or(|b| self.lighter(i, b)) {
                best = Some(i);
            }
        }
        best
    }

    /// Is member `a` less loaded than `b` relative to their weights?
    fn lighter(&self, a: usize, b: usize) -> bool {
        let (ma, mb) = (&self.members[a], &self.members[b]);
        (ma.backend.active() as u64) * (mb.weight as u64)
            < (mb.backend.active() as u64) * (ma.weight as u64)
    }
}
