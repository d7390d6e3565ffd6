//! The running balancer: applies a `Plan`, applies a new one on reload
//! (every section it changes, or none: a change that needs a restart
//! refuses the whole reload), and drains on shutdown.
//!
//! The control plane is one-way. A reload is the only writer of listeners
//! and of pool settings; discovery writes only the member sets of the
//! pools that follow it (each pool follows its own sources, see
//! `balance::pool`); the connection path only reads.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::access_log::AccessLog;
use crate::balance::{MemberSource, Pool, PoolPlan, StaticMembers};
use crate::config::{self, ListenerMode, ListenerPlan, Plan, Target};
use crate::discovery::{DiscoveredMembers, Discovery, DiscoveryOptions};
use crate::drain::{ConnectionTracker, Drain};
use crate::frontend::passthrough::Passthrough;
use crate::frontend::{self, ListenerMetrics, ListenerShared, ModeRuntime};
use crate::http::upstream::Upstream;
use crate::http::{Offload, OffloadMetrics, RouteRuntime, TargetRuntime};
use crate::logging::RateLimit;
use crate::metrics::Metrics;
use crate::module::{Module, ModuleEnv, Registry};
use crate::workers::Workers;

mod cert_watch;
mod restart;

/// Listening sockets handed over by the process being upgraded, by
/// address (a group of one or more sockets each).
pub type Inherited = HashMap<SocketAddr, Vec<std::net::TcpListener>>;

use restart::needs_restart;

struct RunningListener {
    shared: Arc<ArcSwap<ListenerShared>>,
    /// Offload listeners: the routes their connections read per request.
    offload: Option<Arc<ArcSwap<Offload>>>,
    stop: watch::Sender<bool>,
    /// One accept loop per connection worker.
    tasks: Vec<JoinHandle<()>>,
    /// Duplicates of the listening sockets (the same sockets, the same
    /// queues): accepting resumes on them after a pause, and an upgrade
    /// passes them to the new process.
    sockets: Vec<std::net::TcpListener>,
    /// Open connections, for `max_connections`; kept across a pause.
    active: Arc<AtomicUsize>,
    name: String,
}

/// Control-plane state: touched by start, reload and shutdown only, never
/// by the connection path (which reads the `ArcSwap`s).
struct Applied {
    plan: Arc<Plan>,
    /// Live pools by name: kept across reloads (with their backends'
    /// state), updated in place.
    pools: HashMap<String, Arc<Pool>>,
    listeners: HashMap<SocketAddr, RunningListener>,
}

pub struct Runtime {
    pub metrics: Arc<Metrics>,
    pub tracker: Arc<ConnectionTracker>,
    /// Flips when the graceful shutdown starts; connections watch it.
    pub drain: Drain,
    /// In-process modules by name: built once at start, kept across
    /// reloads (their state outlives any one configuration).
    pub modules: HashMap<String, Arc<dyn Module>>,
    /// Heartbeat receiver and registry, when `[discovery]` is configured.
    pub discovery: Option<Discovery>,
    /// Load and reload times, listener rates, certificate series: what
    /// the status page shows that nothing else keeps.
    pub status: crate::status::Record,
    /// The module kinds the process knows, so that a reload validates an
    /// embedder's own kinds as the start did.
    registry: Registry,
    applied: Mutex<Applied>,
    /// One reload at a time (SIGHUP, certificate watch): a reload must not
    /// apply a plan made from a configuration that another one replaced.
    reloading: Mutex<()>,
    background: Mutex<Vec<JoinHandle<()>>>,
    /// Listening sockets handed over by the process this one replaces
    /// (`fleetgate upgrade`), by address; taken by the first `apply`.
    inherited: Mutex<Inherited>,
    /// False while accepting is paused (an upgrade hands the sockets
    /// over); the admin listener follows it too.
    accepting: watch::Sender<bool>,
    /// Where listeners accept and connections run; declared last so it is
    /// dropped after everything that may hold its tasks.
    workers: Workers,
}

impl Runtime {
    /// Bind every listener and start serving `plan`, with the built-in
    /// module kinds.
    pub async fn start(plan: Plan, metrics: Arc<Metrics>) -> anyhow::Result<Arc<Runtime>> {
        Self::start_with_modules(plan, metrics, &crate::module::builtin::registry()).await
    }

    /// Like `start`, building modules from `registry` (for programs that
    /// embed fleetgate with modules of their own).
    pub async fn start_with_modules(
        plan: Plan,
        metrics: Arc<Metrics>,
        registry: &Registry,
    ) -> anyhow::Result<Arc<Runtime>> {
        Self::start_inherited(plan, metrics, registry, Inherited::new()).await
    }

    /// Like `start_with_modules`, accepting on `inherited` sockets (from
    /// the process being upgraded) where their addresses are configured;
    /// the other addresses are bound fresh, and inherited sockets no
    /// listener wants are closed.
    pub async fn start_inherited(
        plan: Plan,
        metrics: Arc<Metrics>,
        registry: &Registry,
        inherited: Inherited,
    ) -> anyhow::Result<Arc<Runtime>> {
        plan.first_start.create()?;
        let mut modules = HashMap::new();
        for m in &plan.modules {
            let factory = registry
                .get(&m.kind)
                .with_context(|| format!("module {:?}: no module kind {:?}", m.name, m.kind))?;
            let env = ModuleEnv {
                name: m.name.clone(),
                data_dir: plan.data_dir.join(&m.name),
                revocations: m.revocations.clone(),
                metrics: metrics.registry.clone(),
            };
            let module = factory(&m.config, &env)
                .await
                .with_context(|| format!("{}: module {:?}", plan.source.display(), m.name))?;
            tracing::info!(module = %m.name, kind = %m.kind, "module started");
            modules.insert(m.name.clone(), module);
        }
        let discovery = match &plan.discovery {
            None => None,
            Some(d) => {
                let mut opts = DiscoveryOptions::new(d.bind, d.cluster.clone(), d.token.clone());
                opts.interval = d.interval;
                opts.miss_limit = d.miss_limit;
                opts.multicast = d.multicast;
                opts.max_clock_skew = d.max_clock_skew;
                opts.rejected = Some(metrics.heartbeats_rejected.clone());
                opts.accepted = Some(metrics.heartbeats_accepted.clone());
                let started = Discovery::start(opts)
                    .await
                    .with_context(|| format!("discovery: cannot listen on {}", d.bind))?;
                Some(started)
            }
        };
        let tracker = Arc::new(ConnectionTracker::default());
        crate::huge_pages::apply(plan.transparent_huge_pages);
        let workers = Workers::start(Workers::count(plan.worker_threads), &plan.cpu_affinity)
            .context("starting connection workers")?;
        let applied = Mutex::new(Applied {
            plan: Arc::new(plan.clone()),
            pools: HashMap::new(),
            listeners: HashMap::new(),
        });
        let rt = Arc::new(Runtime {
            metrics,
            drain: Drain::new(tracker.clone()),
            tracker,
            modules,
            discovery,
            status: Default::default(),
            registry: registry.clone(),
            applied,
            reloading: Mutex::new(()),
            background: Mutex::new(Vec::new()),
            inherited: Mutex::new(inherited),
            accepting: watch::channel(true).0,
            workers,
        });
        rt.apply(plan)?;
        let unused = std::mem::take(&mut *rt.inherited.lock().unwrap());
        for addr in unused.keys() {
            tracing::info!(bind = %addr, "inherited listening socket closed: no listener binds it any more");
        }
        let tasks = vec![
            tokio::spawn(watch_backends(Arc::downgrade(&rt))),
            tokio::spawn(cert_watch::run(Arc::downgrade(&rt))),
            crate::status::started(&rt),
        ];
        rt.background.lock().unwrap().extend(tasks);
        Ok(rt)
    }

    pub fn plan(&self) -> Arc<Plan> {
        self.applied.lock().unwrap().plan.clone()
    }

    pub fn pools(&self) -> Vec<Arc<Pool>> {
        self.applied
            .lock()
            .unwrap()
            .pools
            .values()
            .cloned()
            .collect()
    }

    /// Re-read the configuration file; on any error the running plan stays.
    pub fn reload(&self) -> anyhow::Result<()> {
        let _one = self.reloading.lock().unwrap();
        let running = self.plan();
        self.apply_reload(config::load_next(&running.source, &self.registry, &running))
    }

    /// Apply the running configuration again as it was last loaded (not
    /// the file as it is now), which re-reads its certificate, key and CA
    /// files: a renewal, counted as a reload. On any error (a file that
    /// does not parse, a key that does not match) the running plan stays.
    pub fn reload_certificates(&self) -> anyhow::Result<()> {
        let _one = self.reloading.lock().unwrap();
        // A drain has stopped the listeners: applying would bind them again.
        if self.drain.is_started() {
            anyhow::bail!("draining: certificates are no longer reloaded");
        }
        let running = self.plan();
        self.apply_reload(config::load_again(&self.registry, &running))
    }

    /// Apply a reload's plan, or record its error; either is counted.
    fn apply_reload(&self, next: Result<Plan, config::ConfigError>) -> anyhow::Result<()> {
        let result = next.map_err(anyhow::Error::from).and_then(|plan| {
            plan.first_start.create()?;
            self.apply(plan)
        });
        self.status.reloaded(&result, &self.metrics, &self.plan());
        let label = if result.is_ok() { "ok" } else { "error" };
        self.metrics.reloads.with_label_values(&[label]).inc();
        result
    }

    /// Make `plan` the running configuration. Everything that can fail
    /// (a change that needs a restart, binding new addresses) is checked
    /// before anything is changed.
    fn apply(&self, plan: Plan) -> anyhow::Result<()> {
        let mut applied = self.applied.lock().unwrap();
        let started = !applied.listeners.is_empty();
        if started {
            needs_restart(&applied.plan, &plan)
                .map_err(|what| anyhow::anyhow!("{}: {what}", plan.source.display()))?;
        }

        // 1. Bind addresses that are not bound yet; fail without changes.
        let mut fresh = HashMap::new();
        for l in &plan.listeners {
            if !applied.listeners.contains_key(&l.bind) {
                let inherited = self.inherited.lock().unwrap().remove(&l.bind);
                let sock = match inherited {
                    Some(group) => {
                        frontend::bind::adopt_group(group, &l.socket, self.workers.len())
                    }
                    None => frontend::bind_group(l.bind, &l.socket, self.workers.len()),
                }
                .with_context(|| format!("listener {:?}: cannot bind {}", l.name, l.bind))?;
                fresh.insert(l.bind, sock);
            }
        }

        // 2. Pools: one that stays is reconfigured in place (its backends
        // keep their state); a new one starts; a removed one closes.
        let mut pools = HashMap::new();
        for p in &plan.pools {
            let sources = self.member_sources(p);
            let pool = match applied.pools.remove(&p.name) {
                Some(pool) => {
                    pool.reconfigure(Some(p.clone()), sources);
                    pool
                }
                None => Pool::new(p.clone(), sources, self.metrics.clone()),
            };
            pools.insert(p.name.clone(), pool);
        }
        for (_, gone) in applied.pools.drain() {
            gone.close();
        }
        applied.pools = pools;

        // 3. Listeners: swap shared state, start new ones, stop old ones.
        // The open-file limit may have changed since the last plan.
        crate::shortage::set_reserve(plan.descriptor_reserve);
        let mut keep = HashSet::new();
        for l in &plan.listeners {
            keep.insert(l.bind);
            let metrics = ListenerMetrics::new(&self.metrics, &l.name);
            let running = applied.listeners.get(&l.bind);
            // A listener that stays keeps its per-source counts and its
            // log rate limit.
            let previous = running.map(|r| r.shared.load_full());
            let source_limits = l.per_source.as_ref().map(|p| {
                let old = previous.as_ref().and_then(|s| s.source_limits.as_ref());
                crate::source_limits::SourceLimits::new(p, old)
            });
            let reject_log = previous
                .as_ref()
                .map_or_else(|| Arc::new(RateLimit::new(1000)), |s| s.reject_log.clone());
            let old_slot = running.and_then(|r| r.offload.clone());
            let access_log = self.access_log(l);
            let mode = self.mode_runtime(l, &applied.pools, &metrics, old_slot, &access_log);
            let offload = match &mode {
                ModeRuntime::Offload(slot) => Some(slot.clone()),
                _ => None,
            };
            let shared = Arc::new(ListenerShared {
                mode,
                metrics,
                plan: l.clone(),
                reject_log,
                source_limits,
                access_log,
            });
            if let Some(running) = applied.listeners.get_mut(&l.bind) {
                running.shared.store(shared);
                running.offload = offload;
                continue;
            }
            let group = fresh.remove(&l.bind).expect("bound in step 1");
            let shared = Arc::new(ArcSwap::new(shared));
            let active = Arc::new(AtomicUsize::new(0));
            let (stop, tasks) = self.spawn_accept_loops(&l.name, &group, &shared, &active);
            tracing::info!(listener = %l.name, bind = %l.bind, "listening");
            applied.listeners.insert(
                l.bind,
                RunningListener {
                    shared,
                    offload,
                    stop,
                    tasks,
                    sockets: group,
                    active,
                    name: l.name.clone(),
                },
            );
        }
        let gone: Vec<SocketAddr> = applied
            .listeners
            .keys()
            .filter(|a| !keep.contains(a))
            .copied()
            .collect();
        for addr in gone {
            if let Some(running) = applied.listeners.remove(&addr) {
                let _ = running.stop.send(true);
                tracing::info!(bind = %addr, "listener closed (removed from configuration)");
            }
        }
        applied.plan = Arc::new(plan);
        Ok(())
    }

    /// Where a pool's members come from: its static backends, then the
    /// nodes announcing its service.
    fn member_sources(&self, p: &PoolPlan) -> Vec<Arc<dyn MemberSource>> {
        let mut sources: Vec<Arc<dyn MemberSource>> =
            vec![Arc::new(StaticMembers(p.backends.clone()))];
        if let (Some(service), Some(d)) = (&p.discovery_service, &self.discovery) {
            sources.push(Arc::new(DiscoveredMembers::new(
                d.registry().clone(),
                service.clone(),
            )));
        }
        sources
    }

    /// The listener's access log, if it has one: new connections log
    /// with the plan's settings (listeners logging to one destination
    /// share its writer, which stays across reloads).
    fn access_log(&self, l: &ListenerPlan) -> Option<Arc<AccessLog>> {
        let plan = l.access_log.as_ref()?;
        AccessLog::new(plan, &l.name, &self.metrics)
            .inspect_err(|e| tracing::error!(listener = %l.name, "access log not started: {e}"))
            .ok()
    }

    /// Resolve a listener's pools (and, for offload, its upstreams and
    /// routes, stored into `slot` when the listener already had one).
    fn mode_runtime(
        &self,
        l: &ListenerPlan,
        pools: &HashMap<String, Arc<Pool>>,
        metrics: &ListenerMetrics,
        slot: Option<Arc<ArcSwap<Offload>>>,
        access_log: &Option<Arc<AccessLog>>,
    ) -> ModeRuntime {
        match &l.mode {
            ListenerMode::Tcp { pool } => ModeRuntime::Tcp(pools[pool].clone()),
            ListenerMode::Passthrough(p) => ModeRuntime::Passthrough(Passthrough {
                rules: p
                    .rules
                    .iter()
                    .map(|(m, name)| (m.clone(), pools[name].clone()))
                    .collect(),
                default: p.default_pool.as_ref().map(|n| pools[n].clone()),
                reject_no_sni: p.reject_no_sni,
                hello_timeout: p.hello_timeout,
                hello_max_bytes: p.hello_max_bytes,
                rejected: self.metrics.hello_rejected.clone(),
            }),
            ListenerMode::Offload(o) => {
                let om = OffloadMetrics::new(&self.metrics, &l.name);
                // One upstream (keep-alive settings) per pool per listener.
                let mut upstreams: HashMap<&str, Arc<Upstream>> = HashMap::new();
                let routes = o
                    .routes
                    .iter()
                    .map(|r| {
                        let target = match &r.target {
                            Target::Pool(name) => {
                                let up = upstreams.entry(name.as_str()).or_insert_with(|| {
                                    Arc::new(Upstream::new(
                                        pools[name].clone(),
                                        o.http.upstream_keepalive,
                                        o.http.upstream_idle_timeout,
                                    ))
                                });
                                TargetRuntime::Pool(up.clone())
                            }
                            Target::Module(name) => {
                                TargetRuntime::Module(self.modules[name].clone())
                            }
                        };
                        let (requests, duration) = om.route(&r.name);
                        RouteRuntime {
                            plan: r.clone(),
                            target,
                            requests,
                            duration,
                        }
                    })
                    .collect();
                let offload = Arc::new(Offload {
                    name: l.name.as_str().into(),
                    tls: o.tls.clone(),
                    revocation: o.revocation.clone(),
                    http: o.http.clone(),
                    cert_headers: o.cert_headers.clone(),
                    routes,
                    metrics: om,
                    bytes: metrics.bytes.clone(),
                    drain: self.drain.clone(),
                    access_log: access_log.clone(),
                });
                match slot {
                    Some(slot) => {
                        slot.store(offload);
                        ModeRuntime::Offload(slot)
                    }
                    None => ModeRuntime::Offload(Arc::new(ArcSwap::new(offload))),
                }
            }
        }
    }

    /// One accept loop per socket of a listener's group, each on a
    /// connection worker (round robin when an inherited group is larger
    /// than the workers), on duplicates of the sockets: the group stays
    /// open here when the loops end.
    fn spawn_accept_loops(
        &self,
        name: &str,
        group: &[std::net::TcpListener],
        shared: &Arc<ArcSwap<ListenerShared>>,
        active: &Arc<AtomicUsize>,
    ) -> (watch::Sender<bool>, Vec<JoinHandle<()>>) {
        let (stop, stop_rx) = watch::channel(false);
        let tasks = group
            .iter()
            .zip(self.workers.handles().iter().cycle())
            .filter_map(|(sock, worker)| {
                let sock = sock
                    .try_clone()
                    .inspect_err(|e| tracing::error!(listener = %name, "cannot duplicate the listening socket: {e}"))
                    .ok()?;
                let (shared, active, tracker, stop_rx) = (
                    shared.clone(),
                    active.clone(),
                    self.tracker.clone(),
                    stop_rx.clone(),
                );
                let name = name.to_string();
                // Registered from inside the worker, so that its
                // connections belong to that worker's event loop.
                Some(worker.spawn(async move {
                    match TcpListener::from_std(sock) {
                        Ok(sock) => {
                            frontend::accept_loop(sock, shared, active, tracker, stop_rx).await
                        }
                        Err(e) => {
                            tracing::error!(listener = %name, "cannot register listening socket: {e}")
                        }
                    }
                }))
            })
            .collect();
        (stop, tasks)
    }

    /// Every listener's sockets (duplicates), by address: what an
    /// upgrade passes to the new process.
    pub fn listening_sockets(&self) -> Vec<(SocketAddr, Vec<std::net::TcpListener>)> {
        let applied = self.applied.lock().unwrap();
        applied
            .listeners
            .iter()
            .map(|(addr, l)| {
                let dups = l.sockets.iter().filter_map(|s| s.try_clone().ok());
                (*addr, dups.collect())
            })
            .collect()
    }

    /// Stop accepting and return once no accept loop runs any more; the
    /// sockets stay open, so connections that arrive meanwhile wait in
    /// their queues. Established connections continue.
    pub async fn pause_accepting(&self) {
        self.accepting.send_replace(false);
        let tasks: Vec<JoinHandle<()>> = {
            let mut applied = self.applied.lock().unwrap();
            applied
                .listeners
                .values_mut()
                .flat_map(|l| {
                    let _ = l.stop.send(true);
                    std::mem::take(&mut l.tasks)
                })
                .collect()
        };
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Accept again after `pause_accepting` (the upgrade failed).
    pub fn resume_accepting(&self) {
        let mut applied = self.applied.lock().unwrap();
        for l in applied.listeners.values_mut() {
            if !l.tasks.is_empty() {
                continue;
            }
            let (stop, tasks) = self.spawn_accept_loops(&l.name, &l.sockets, &l.shared, &l.active);
            l.stop = stop;
            l.tasks = tasks;
        }
        drop(applied);
        self.accepting.send_replace(true);
    }

    /// Follows `pause_accepting` and `resume_accepting` (true: accepting).
    pub fn accepting(&self) -> watch::Receiver<bool> {
        self.accepting.subscribe()
    }

    /// Stop accepting; established connections continue.
    pub fn stop_listening(&self) {
        let mut applied = self.applied.lock().unwrap();
        for (_, running) in applied.listeners.drain() {
            let _ = running.stop.send(true);
            for t in running.tasks {
                t.abort();
            }
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        for t in self.background.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

/// Passive outages end by the clock, not by an event: refresh the
/// `backend_up` gauges and log transitions a few times per second.
async fn watch_backends(rt: std::sync::Weak<Runtime>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut known_nodes: HashSet<String> = HashSet::new();
    loop {
        tick.tick().await;
        let Some(rt) = rt.upgrade() else { return };
        for pool in rt.pools() {
            for m in &pool.members().members {
                m.backend.refresh();
            }
        }
        if let Some(d) = &rt.discovery {
            known_nodes = discovery_gauges(&rt.metrics, d, known_nodes);
        }
    }
}

/// Nodes by state and the age of each node's last heartbeat; series of
/// nodes that are gone are removed.
fn discovery_gauges(m: &Metrics, d: &Discovery, before: HashSet<String>) -> HashSet<String> {
    use crate::discovery::NodeState;
    let snap = d.registry().snapshot();
    let mut counts = [0i64; 4];
    let mut now_known = HashSet::new();
    for node in snap.nodes.iter() {
        let i = match node.state {
            NodeState::Normal => 0,
            NodeState::Draining => 1,
            NodeState::Update => 2,
            NodeState::Leaving => 3,
        };
        counts[i] += 1;
        m.discovery_heartbeat_age
            .with_label_values(&[node.id.as_str()])
            .set(node.last_heard.elapsed().as_secs_f64());
        now_known.insert(node.id.clone());
    }
    for (state, n) in ["normal", "draining", "update", "leaving"]
        .iter()
        .zip(counts)
    {
        m.discovery_nodes.with_label_values(&[state]).set(n);
    }
    for gone in before.difference(&now_known) {
        let _ = m
            .discovery_heartbeat_age
            .remove_label_values(&[gone.as_str()]);
    }
    now_known
}

/// The signals fleetgate acts on, installed before anything can answer a
/// readiness probe: a SIGHUP that arrived earlier would otherwise end the
/// process (its default action) instead of reloading.
#[cfg(unix)]
pub struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    /// Reopen access-log files (after logrotate moved them).
    usr1: tokio::signal::unix::Signal,
    /// Upgrade the binary (as `fleetgate upgrade`; see `crate::upgrade`).
    usr2: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    pub fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            usr1: signal(SignalKind::user_defined1())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }
}

/// Serve until SIGTERM or SIGINT, reloading on SIGHUP; then drain.
#[cfg(unix)]
/// A reload, told to systemd before (RELOADING=1) and after (READY=1,
/// with the result in STATUS=).
fn reload_announced(rt: &Runtime) -> anyhow::Result<()> {
    crate::systemd::reloading();
    let result = rt.reload();
    crate::systemd::reloaded(rt);
    result
}

pub async fn serve_until_signalled(rt: Arc<Runtime>, signals: Signals) -> anyhow::Result<()> {
    let Signals {
        mut hup,
        mut term,
        mut int,
        mut usr1,
        mut usr2,
    } = signals;
    let mut upgraded = false;
    loop {
        tokio::select! {
            _ = hup.recv() => match reload_announced(&rt) {
                Ok(()) => {
                    if let Err(e) = crate::logging::set_level(&rt.plan().log_level) {
                        tracing::warn!("log level not changed: {e}");
                    }
                    if let Err(e) = crate::syslog::configure(rt.plan().syslog.as_ref()) {
                        tracing::warn!("syslog not changed: {e}");
                    }
                    tracing::info!("configuration reloaded")
                }
                Err(e) => tracing::error!("reload refused, the running configuration stays: {e:#}"),
            },
            _ = usr1.recv() => {
                crate::access_log::reopen_all();
                tracing::info!("access log files reopened");
            }
            _ = usr2.recv() => crate::upgrade::requested_by_signal(),
            () = crate::upgrade::handed_over() => {
                upgraded = true;
                break;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    let deadline = rt.plan().drain_timeout;
    if !upgraded {
        announce_drain(&rt, &mut term, &mut int).await;
    }
    crate::drain::exit_no_later_than(deadline + crate::drain::EXIT_GRACE);
    if upgraded {
        // The new process is systemd's main process now: this one says
        // nothing more to systemd, and tells WebSockets 1012. Connections
        // accepted just before the handover may not have sent their first
        // request yet (TLS handshake under way), and the drain closes a
        // connection without a request in flight: they get a moment first
        // (out of drain_timeout: the exit deadline stays the same).
        let settle = UPGRADE_SETTLE.min(deadline / 4);
        tokio::time::sleep(settle).await;
        drain_with(&rt, deadline - settle, crate::drain::RESTARTING).await;
    } else {
        drain(&rt, deadline).await;
    }
    for (name, module) in &rt.modules {
        module.shutdown().await;
        tracing::info!(module = %name, "module stopped");
    }
    crate::access_log::flush_all(crate::drain::EXIT_GRACE / 2);
    Ok(())
}

/// `drain_notice`: fail health checks while still serving, so that a
/// health checker in front moves traffic away before the listeners close
/// (a connection arriving after they closed would be refused). A second
/// SIGTERM or SIGINT cuts the notice short.
async fn announce_drain(
    rt: &Runtime,
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
) {
    rt.drain.announce();
    crate::systemd::stopping();
    let notice = rt.plan().drain_notice;
    if notice.is_zero() {
        return;
    }
    tracing::info!(
        "stopping: /healthz answers 503 for {notice:?} while everything is still served, then the drain"
    );
    tokio::select! {
        _ = tokio::time::sleep(notice) => {}
        _ = term.recv() => tracing::info!("second signal: draining now"),
        _ = int.recv() => tracing::info!("second signal: draining now"),
    }
}

/// After an upgrade, how long the old process serves its open connections
/// as usual before its drain starts (out of `drain_timeout`).
const UPGRADE_SETTLE: Duration = Duration::from_secs(1);

/// The graceful shutdown: stop accepting, tell every connection (idle
/// keep-alive connections close, HTTP/2 gets GOAWAY, WebSockets are asked
/// to reconnect elsewhere, spread over most of the window), then wait
/// until the last one is done or `deadline` (`drain_timeout`) has passed.
pub async fn drain(rt: &Runtime, deadline: Duration) {
    drain_with(rt, deadline, crate::drain::GOING_AWAY).await
}

/// `drain`, telling WebSockets (proxied ones and modules') `reason`.
pub async fn drain_with(rt: &Runtime, deadline: Duration, reason: crate::drain::CloseReason) {
    let began = std::time::Instant::now();
    rt.stop_listening();
    let spread = crate::drain::spread_for(deadline);
    tracing::info!(
        open = rt.tracker.open(),
        "draining: no longer accepting; connections close as they finish, WebSockets are asked to reconnect over {spread:?}; exiting at the latest after {deadline:?}"
    );
    rt.drain.begin_with(spread, reason);
    let modules =
        futures_util::future::join_all(rt.modules.values().map(|m| m.drain_with(spread, reason)));
    let (idle, modules_done) = tokio::join!(
        rt.tracker.wait_idle(deadline),
        tokio::time::timeout(deadline, modules)
    );
    let took = began.elapsed();
    if idle && modules_done.is_ok() {
        tracing::info!("drained in {took:.2?}: all connections closed; exiting");
    } else {
        tracing::warn!(
            open = rt.tracker.open(),
            "drain deadline reached after {took:.2?}; exiting"
        );
    }
}
