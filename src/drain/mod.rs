//! The drain signal: flips once, when SIGTERM or SIGINT starts the
//! graceful shutdown, and tells every connection at once so that idle
//! keep-alive connections close, HTTP/2 sends GOAWAY and WebSockets are
//! asked to reconnect elsewhere, instead of all of them waiting out
//! `drain_timeout`.
//!
//! Tens of thousands of idle connections wait on it, so a connection holds
//! only a clone of the handle it already shares with its listener (no
//! allocation of its own) and, while it waits, a `Notified` entry in an
//! intrusive waiter list. The lists are sharded by worker thread: a
//! connection registers and unregisters in its own thread's shard, never
//! contending with another worker's connections for one lock.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::Notify;

mod tracker;

pub use tracker::{ConnectionTracker, TrackedConnection};

/// Waiter lists; more than the connection workers one machine runs.
const SHARDS: usize = 16;

/// A process-wide (per runtime) handle; cloning it is an `Arc` clone.
#[derive(Clone)]
pub struct Drain(Arc<State>);

struct State {
    started: AtomicBool,
    /// The process is about to drain (`drain_notice`): health checks fail
    /// while everything is still served.
    announced: AtomicBool,
    /// What WebSockets are told when they are closed (set before `started`).
    reason: OnceLock<CloseReason>,
    /// Over how long WebSocket closes are spread (set before `started`).
    spread: OnceLock<Duration>,
    shards: [Notify; SHARDS],
    tracker: Arc<ConnectionTracker>,
}

impl Drain {
    pub fn new(tracker: Arc<ConnectionTracker>) -> Drain {
        Drain(Arc::new(State {
            started: AtomicBool::new(false),
            announced: AtomicBool::new(false),
            reason: OnceLock::new(),
            spread: OnceLock::new(),
            shards: std::array::from_fn(|_| Notify::new()),
            tracker,
        }))
    }

    /// Start the drain: every waiter wakes. WebSockets close at random
    /// moments within `spread`. Only the first call counts.
    pub fn begin(&self, spread: Duration) {
        self.begin_with(spread, GOING_AWAY);
    }

    /// Like `begin`, telling WebSockets `reason` (an upgrade says 1012:
    /// the service restarts, come back to the same address).
    pub fn begin_with(&self, spread: Duration, reason: CloseReason) {
        let _ = self.0.reason.set(reason);
        let _ = self.0.spread.set(spread);
        if !self.0.started.swap(true, Ordering::SeqCst) {
            for shard in &self.0.shards {
                shard.notify_waiters();
            }
        }
    }

    pub fn is_started(&self) -> bool {
        self.0.started.load(Ordering::SeqCst)
    }

    /// Say that a drain is coming: `/healthz` fails from now on.
    pub fn announce(&self) {
        self.0.announced.store(true, Ordering::SeqCst);
    }

    /// Whether new traffic should go elsewhere: a drain is coming or under
    /// way.
    pub fn is_announced(&self) -> bool {
        self.0.announced.load(Ordering::SeqCst) || self.is_started()
    }

    /// Completes when the drain starts (at once if it has).
    pub async fn started(&self) {
        let notified = self.0.shards[shard()].notified();
        // A `Notified` sees `notify_waiters` calls from its creation on,
        // so a drain that starts between this check and the first poll
        // is not missed.
        if self.is_started() {
            return;
        }
        notified.await;
    }

    /// How long one WebSocket waits before it is told to go away: a
    /// random part of the spread, so that a fleet does not reconnect to
    /// the remaining balancers in one instant.
    pub fn close_delay(&self) -> Duration {
        random_part(self.spread())
    }

    /// The Close frame's code and reason for this drain.
    pub fn close_reason(&self) -> CloseReason {
        self.0.reason.get().copied().unwrap_or(GOING_AWAY)
    }

    pub fn spread(&self) -> Duration {
        self.0.spread.get().copied().unwrap_or_default()
    }

    /// Count a stream that outlives its HTTP connection (an upgraded
    /// one) in the connections the drain waits for.
    pub fn track(&self) -> TrackedConnection {
        ConnectionTracker::track(self.0.tracker.clone())
    }
}

/// How long, after `drain_timeout`, a stopping process may take to stop
/// its modules and flush its logs before it exits regardless.
pub const EXIT_GRACE: Duration = Duration::from_millis(750);

/// Make sure the stop ends: a thread that exits the process `after` from
/// now, whatever is still running then. The drain itself gives up on its
/// connections at `drain_timeout`, but what follows it can still wait
/// without bound: a module's shutdown on an unreachable store, a log
/// write to a hung disk, or a blocking task, which the async runtime
/// waits for when it is dropped. Balancers that hang in "stopping" hold
/// up restarts, upgrades and failovers.
pub fn exit_no_later_than(after: Duration) {
    let spawned = std::thread::Builder::new()
        .name("exit-deadline".into())
        .spawn(move || {
            std::thread::sleep(after);
            tracing::error!(
                "still stopping {after:?} after the drain began; exiting now without waiting further"
            );
            std::process::exit(0);
        });
    if let Err(e) = spawned {
        tracing::warn!("no exit deadline thread: {e}");
    }
}

/// The WebSocket Close a drain sends: code and reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseReason {
    pub code: u16,
    pub reason: &'static str,
}

/// A shutdown: 1001 "going away", reconnect elsewhere.
pub const GOING_AWAY: CloseReason = CloseReason {
    code: 1001,
    reason: "balancer draining, reconnect",
};

/// A binary upgrade: 1012 "service restart", the new process already
/// listens on the same address.
pub const RESTARTING: CloseReason = CloseReason {
    code: 1012,
    reason: "balancer upgraded, reconnect",
};

/// The part of `drain_timeout` over which WebSocket closes are spread:
/// the rest leaves time for the close handshakes and reconnects.
pub fn spread_for(drain_timeout: Duration) -> Duration {
    drain_timeout.mul_f64(0.8)
}

/// A uniformly random duration in `[0, whole)`.
pub fn random_part(whole: Duration) -> Duration {
    let nanos = whole.as_nanos().min(u128::from(u64::MAX)) as u64;
    if nanos == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(fastrand::u64(..nanos))
}

/// This thread's waiter list: threads are numbered as they first wait.
fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: Cell<Option<usize>> = const { Cell::new(None) };
    }
    SHARD.with(|s| match s.get() {
        Some(i) => i,
        None => {
            let i = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
            s.set(Some(i));
            i
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waiters on several threads (several shards) all wake, whether they
    /// started waiting before the drain or after it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn every_waiter_wakes_and_late_ones_do_not_wait() {
        let drain = Drain::new(Arc::default());
        let waiters: Vec<_> = (0..64)
            .map(|_| {
                let d = drain.clone();
                tokio::spawn(async move { d.started().await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!drain.is_started());
        drain.begin(Duration::from_secs(8));
        for w in waiters {
            tokio::time::timeout(Duration::from_secs(5), w)
                .await
                .expect("woken")
                .unwrap();
        }
        tokio::time::timeout(Duration::from_secs(1), drain.started())
            .await
            .expect("a late waiter returns at once");
        assert_eq!(drain.spread(), Duration::from_secs(8));
        for _ in 0..100 {
            assert!(drain.close_delay() < Duration::from_secs(8));
        }
    }

    /// Every offload connection holds this wait for its whole life.
    #[test]
    fn the_wait_is_small() {
        let drain = Drain::new(Arc::default());
        let wait = drain.started();
        let size = std::mem::size_of_val(&wait);
        eprintln!("the drain wait is {size} bytes");
        assert!(size <= 128, "the drain wait is {size} bytes");
    }

    #[test]
    fn tracked_streams_count_as_open() {
        let tracker = Arc::new(ConnectionTracker::default());
        let drain = Drain::new(tracker.clone());
        let t = drain.track();
        assert_eq!(tracker.open(), 1);
        drop(t);
        assert_eq!(tracker.open(), 0);
        assert_eq!(random_part(Duration::ZERO), Duration::ZERO);
    }
}
