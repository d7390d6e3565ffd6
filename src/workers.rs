//! Connection workers: one single-threaded tokio runtime per thread, each
//! accepting on its own SO_REUSEPORT socket of every listener and serving
//! the connections it accepted to their end.
//!
//! Why not the multi-threaded scheduler for connections: a proxied
//! keep-alive request is a few syscalls of real work, and on a small
//! appliance the scheduler's bookkeeping around them (waking an idle
//! worker with a futex, stealing, atomics on shared run queues) cost as
//! much again. With a runtime per thread a connection is woken, polled
//! and finished on the thread whose epoll saw its event, and the kernel
//! spreads new connections over the threads (SO_REUSEPORT), as HAProxy
//! and nginx do with their threads and processes. Admin, health checks,
//! discovery and modules' background tasks stay on the main runtime.

use std::io;
use std::sync::Mutex;
use std::thread;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

pub struct Workers {
    handles: Vec<Handle>,
    /// Dropping a sender ends its worker's `block_on`.
    stops: Mutex<Vec<oneshot::Sender<()>>>,
}

impl Workers {
    /// Start `n` workers (at least one). The threads run until `Workers`
    /// is dropped; their runtimes are dropped on their own threads, never
    /// inside an async context.
    pub fn start(n: usize) -> io::Result<Workers> {
        let n = n.max(1);
        let mut handles = Vec::with_capacity(n);
        let mut stops = Vec::with_capacity(n);
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .thread_name(format!("fleetgate-w{i}"))
                .build()?;
            handles.push(rt.handle().clone());
            let (stop, stopped) = oneshot::channel::<()>();
            stops.push(stop);
            thread::Builder::new()
                .name(format!("fleetgate-w{i}"))
                .spawn(move || {
                    let _ = rt.block_on(stopped);
                })?;
        }
        Ok(Workers {
            handles,
            stops: Mutex::new(stops),
        })
    }

    /// How many workers to start for a configured `worker_threads`
    /// (0 = one per core).
    pub fn count(configured: usize) -> usize {
        if configured > 0 {
            return configured;
        }
        thread::available_parallelism().map_or(1, |n| n.get())
    }

    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stops.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}
