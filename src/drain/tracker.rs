//! Open connections, counted process-wide so that a shutdown can wait for
//! the last one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

/// Counts open connections process-wide so that shutdown can wait for them.
#[derive(Default)]
pub struct ConnectionTracker {
    open: AtomicUsize,
    all_closed: Notify,
}

pub struct TrackedConnection(Arc<ConnectionTracker>);

impl ConnectionTracker {
    pub fn track(this: Arc<Self>) -> TrackedConnection {
        this.open.fetch_add(1, Ordering::Relaxed);
        TrackedConnection(this)
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Wait until no connection is open, or `deadline` passes.
    pub async fn wait_idle(&self, deadline: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.all_closed.notified();
                if self.open() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(deadline, wait).await.is_ok()
    }
}

impl Drop for TrackedConnection {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.all_closed.notify_waiters();
        }
    }
}
