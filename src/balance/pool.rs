//! A pool: a live handle that listeners and upstreams hold for as long as
//! the pool exists. Its member set is replaced in place when a source
//! changes (a discovered server changes state) or a reload changes the
//! pool's settings; readers load the current set lock-free, and every
//! backend that stays keeps its state (passive health, active probe with
//! its rise/fall counts, connection count, idle keep-alive connections).
//!
//! One writer: every change goes through `Control` under its lock, from
//! the pool's own task (source changes) or from a reload.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::backend::Backend;
use super::health;
use super::member_set::{Member, MemberSet};
use super::settings::{PoolPlan, MAX_WEIGHT};
use super::source::{MemberSource, MemberSpec};
use crate::metrics::Metrics;

pub struct Pool {
    name: String,
    set: ArcSwap<MemberSet>,
    counter: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
    control: Mutex<Control>,
}

/// The writer's side: never touched by the connection path.
struct Control {
    plan: Arc<PoolPlan>,
    sources: Vec<Arc<dyn MemberSource>>,
    /// What the published set was built from, to skip no-op changes.
    specs: Vec<MemberSpec>,
    /// One active probe per backend, by address.
    probes: HashMap<SocketAddr, Task>,
    probe_tls: Option<Arc<rustls::ClientConfig>>,
    /// Follows the sources' changes.
    follower: Option<Task>,
    closed: bool,
}

/// A task that is aborted when dropped.
struct Task(JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Pool {
    /// A pool reading its members from `sources` (in order; an address
    /// listed twice is taken from the first). Must be called within a
    /// tokio runtime: probes and the source follower are spawned on it.
    pub fn new(
        plan: PoolPlan,
        sources: Vec<Arc<dyn MemberSource>>,
        metrics: Arc<Metrics>,
    ) -> Arc<Pool> {
        let plan = Arc::new(plan);
        let counter = Arc::new(AtomicUsize::new(0));
        let pool = Arc::new(Pool {
            name: plan.name.clone(),
            set: ArcSwap::from_pointee(MemberSet::new(plan.clone(), Vec::new(), counter.clone())),
            counter,
            metrics,
            control: Mutex::new(Control {
                plan,
                sources: Vec::new(),
                specs: Vec::new(),
                probes: HashMap::new(),
                probe_tls: None,
                follower: None,
                closed: false,
            }),
        });
        pool.reconfigure(None, sources);
        pool
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current member set, to use for one connection attempt (with
    /// its retries): the set it picks from stays the same meanwhile.
    pub fn members(&self) -> Arc<MemberSet> {
        self.set.load_full()
    }

    /// The settings this pool runs with now.
    pub fn plan(&self) -> Arc<PoolPlan> {
        self.set.load().plan.clone()
    }

    /// Apply a reload: new settings (`None`: keep them) and sources. The
    /// members that stay keep their state; probes restart only when the
    /// health check itself changed.
    pub fn reconfigure(
        self: &Arc<Self>,
        plan: Option<PoolPlan>,
        sources: Vec<Arc<dyn MemberSource>>,
    ) {
        let mut c = self.lock();
        if let Some(plan) = plan {
            if plan.health_check != c.plan.health_check {
                c.probes.clear();
            }
            c.plan = Arc::new(plan);
        }
        let changes: Vec<watch::Receiver<u64>> =
            sources.iter().filter_map(|s| s.changes()).collect();
        c.sources = sources;
        c.follower = (!changes.is_empty())
            .then(|| Task(tokio::spawn(follow(Arc::downgrade(self), changes))));
        self.publish(&mut c, true);
    }

    /// Re-read the sources; publish a new member set if they changed.
    pub fn refresh(&self) {
        let mut c = self.lock();
        self.publish(&mut c, false);
    }

    /// The pool is gone from the configuration: stop its probes and its
    /// follower, and close its idle connections. Connections that hold a
    /// backend of it finish normally.
    pub fn close(&self) {
        let mut c = self.lock();
        c.closed = true;
        c.follower = None;
        c.probes.clear();
        for m in &self.set.load().members {
            self.retire(&m.backend);
        }
        self.set.store(Arc::new(MemberSet::new(
            c.plan.clone(),
            Vec::new(),
            self.counter.clone(),
        )));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, c: &mut Control, plan_changed: bool) {
        if c.closed {
            return;
        }
        let mut specs: Vec<MemberSpec> = Vec::new();
        for s in &c.sources {
            for m in s.members() {
                if !specs.iter().any(|k| k.addr == m.addr) {
                    specs.push(MemberSpec {
                        weight: m.weight.clamp(1, MAX_WEIGHT),
                        ..m
                    });
                }
            }
        }
        if !plan_changed && specs == c.specs {
            return;
        }
        let current = self.set.load_full();
        let mut old: HashMap<SocketAddr, &Arc<Backend>> = current
            .members
            .iter()
            .map(|m| (m.backend.addr, &m.backend))
            .collect();
        let members: Vec<Member> = specs
            .iter()
            .map(|s| {
                let backend = old
                    .remove(&s.addr)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Backend::new(&self.metrics, &self.name, s.addr)));
                Member {
                    backend,
                    weight: s.weight,
                    role: s.role,
                    origin: s.origin.clone(),
                }
            })
            .collect();
        for gone in old.values() {
            c.probes.remove(&gone.addr);
            self.retire(gone);
        }
        match c.plan.health_check.clone() {
            None => {
                // No probes: their last verdict must not keep a backend out.
                c.probes.clear();
                for m in &members {
                    m.backend.set_check_up(true);
                }
            }
            Some(check) => {
                let tls = c
                    .probe_tls
                    .get_or_insert_with(|| Arc::new(health::tls_probe_config()))
                    .clone();
                for m in &members {
                    c.probes.entry(m.backend.addr).or_insert_with(|| {
                        Task(health::spawn(m.backend.clone(), check.clone(), tls.clone()))
                    });
                }
            }
        }
        c.specs = specs;
        self.set.store(Arc::new(MemberSet::new(
            c.plan.clone(),
            members,
            self.counter.clone(),
        )));
    }

    /// A backend left the pool: no new connection, idle ones closed, its
    /// series removed (connections that hold it finish normally).
    fn retire(&self, backend: &Backend) {
        backend.set_in_rotation(false);
        self.metrics
            .forget_backend(&self.name, &backend.addr.to_string());
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let c = self.control.get_mut().unwrap_or_else(|p| p.into_inner());
        c.probes.clear();
        c.follower = None;
    }
}

/// Refresh the pool whenever one of its sources says it changed. Source
/// versions move only on a change, and a `watch` keeps only the latest,
/// so a burst of changes costs one refresh per wake-up.
async fn follow(pool: Weak<Pool>, mut changes: Vec<watch::Receiver<u64>>) {
    use futures_util::future::select_all;
    while !changes.is_empty() {
        let waits = changes
            .iter_mut()
            .map(|rx| Box::pin(rx.changed()))
            .collect::<Vec<_>>();
        let (result, i, rest) = select_all(waits).await;
        drop(rest);
        if result.is_err() {
            // That source will not change any more.
            changes.remove(i);
        }
        let Some(pool) = pool.upgrade() else { return };
        pool.refresh();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::{Origin, Role, StaticMembers};
    use std::time::Duration;

    /// A source whose list the test sets, as discovery would.
    struct Announced {
        list: Mutex<Vec<MemberSpec>>,
        version: watch::Sender<u64>,
    }

    impl Announced {
        fn set(&self, list: Vec<MemberSpec>) {
            *self.list.lock().unwrap() = list;
            self.version.send_modify(|v| *v += 1);
        }
    }

    impl MemberSource for Announced {
        fn members(&self) -> Vec<MemberSpec> {
            self.list.lock().unwrap().clone()
        }
        fn changes(&self) -> Option<watch::Receiver<u64>> {
            Some(self.version.subscribe())
        }
    }

    fn spec(port: u16, role: Role) -> MemberSpec {
        MemberSpec {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            weight: 1,
            role,
            origin: Some(Origin {
                node: format!("n{port}").into(),
                state: "normal",
            }),
        }
    }

    fn plan() -> PoolPlan {
        PoolPlan {
            name: "p".into(),
            algorithm: Default::default(),
            backends: vec![crate::balance::BackendPlan {
                addr: SocketAddr::from(([127, 0, 0, 1], 1)),
                weight: 1,
                backup: false,
            }],
            max_fails: 1,
            fail_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(1),
            retries: 0,
            health_check: None,
            tls: None,
            discovery_service: None,
            send_proxy: None,
        }
    }

    async fn until(pool: &Pool, f: impl Fn(&MemberSet) -> bool) {
        for _ in 0..200 {
            if f(&pool.members()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("member set never reached the expected state");
    }

    #[tokio::test]
    async fn a_source_change_replaces_the_members_and_keeps_the_backends_that_stay() {
        let announced = Arc::new(Announced {
            list: Mutex::new(vec![spec(2, Role::Primary), spec(3, Role::Primary)]),
            version: watch::channel(0).0,
        });
        let metrics = Arc::new(Metrics::new());
        let pool = Pool::new(
            plan(),
            vec![Arc::new(StaticMembers(plan().backends)), announced.clone()],
            metrics,
        );
        let first = pool.members();
        assert_eq!(first.members.len(), 3);
        let b2 = first.members[1].backend.clone();
        let b3 = first.members[2].backend.clone();
        // State that must survive: a passive outage (max_fails = 1).
        b2.record_failure(first.passive_policy());
        assert!(!b2.is_up());

        announced.set(vec![spec(2, Role::Resting), spec(4, Role::Primary)]);
        until(&pool, |s| {
            s.members.len() == 3 && s.members[2].backend.addr.port() == 4
        })
        .await;
        let now = pool.members();
        assert!(
            Arc::ptr_eq(&now.members[1].backend, &b2),
            "node 2 keeps its backend"
        );
        assert!(!b2.is_up(), "and its passive outage");
        assert!(
            b2.in_rotation(),
            "a resting member stays: its idle connections too"
        );
        assert_eq!(now.eligible(), 2);
        assert!(!b3.in_rotation(), "node 3 left: retired");
        // A resting member is never picked.
        for _ in 0..10 {
            let picked = now.pick("10.0.0.1".parse().unwrap(), &[]).unwrap();
            assert_ne!(picked.addr.port(), 2);
        }

        // No change, no new set.
        announced.set(vec![spec(2, Role::Resting), spec(4, Role::Primary)]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(Arc::ptr_eq(&pool.members(), &now));
    }

    #[tokio::test]
    async fn a_reload_keeps_backend_state_and_close_retires_everything() {
        let metrics = Arc::new(Metrics::new());
        let pool = Pool::new(
            plan(),
            vec![Arc::new(StaticMembers(plan().backends))],
            metrics,
        );
        let b = pool.members().members[0].backend.clone();
        b.record_failure(pool.members().passive_policy());
        assert!(!b.is_up(), "max_fails = 1: out");
        let mut changed = plan();
        changed.retries = 3;
        pool.reconfigure(
            Some(changed),
            vec![Arc::new(StaticMembers(plan().backends))],
        );
        let set = pool.members();
        assert_eq!(set.plan.retries, 3);
        assert!(Arc::ptr_eq(&set.members[0].backend, &b));
        assert!(!b.is_up(), "the passive outage survives the reload");
        pool.close();
        assert!(pool.members().members.is_empty());
        assert!(!b.in_rotation());
    }
}
