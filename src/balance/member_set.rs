//! One version of a pool's members and the choice of one for a new
//! connection. A member set is immutable: a change of membership or of
//! the pool's settings publishes a new one that shares the `Backend`s
//! that stay. Picks read atomics only.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::algorithm::{rendezvous_score, smooth_schedule};
use super::backend::{now_ms, Backend, PassivePolicy};
use super::settings::{Algorithm, PoolPlan};
use super::source::{Origin, Role};

pub struct Member {
    pub backend: Arc<Backend>,
    pub weight: u32,
    pub role: Role,
    /// The announcing node, for backends learned by discovery.
    pub origin: Option<Origin>,
}

/// Primaries, or the backups used while no primary is up.
struct Tier {
    members: Vec<usize>,
    schedule: Vec<usize>,
}

impl Tier {
    fn new(members: &[Member], role: Role) -> Tier {
        let idx: Vec<usize> = (0..members.len())
            .filter(|&i| members[i].role == role)
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

pub struct MemberSet {
    pub plan: Arc<PoolPlan>,
    pub members: Vec<Member>,
    primary: Tier,
    backup: Tier,
    /// Shared by every version of the pool, so that round robin goes on
    /// where it was across membership changes.
    counter: Arc<AtomicUsize>,
}

impl MemberSet {
    pub fn new(plan: Arc<PoolPlan>, members: Vec<Member>, counter: Arc<AtomicUsize>) -> MemberSet {
        MemberSet {
            primary: Tier::new(&members, Role::Primary),
            backup: Tier::new(&members, Role::Backup),
            members,
            plan,
            counter,
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

    /// Members that can take new connections (primaries and backups).
    pub fn eligible(&self) -> usize {
        self.primary.members.len() + self.backup.members.len()
    }

    /// Choose a backend for a connection from `client`, skipping the
    /// backends in `tried` (already failed for this connection). Backups
    /// are used only while no primary is eligible.
    pub fn pick(&self, client: IpAddr, tried: &[SocketAddr]) -> Option<&Arc<Backend>> {
        let now = now_ms();
        let ok = |i: usize| {
            let b = &self.members[i].backend;
            !tried.contains(&b.addr) && b.is_up_at(now)
        };
        let chosen = self
            .pick_in(&self.primary, client, &ok)
            .or_else(|| self.pick_in(&self.backup, client, &ok))?;
        let backend = &self.members[chosen].backend;
        backend.metrics.selections.inc();
        Some(backend)
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
