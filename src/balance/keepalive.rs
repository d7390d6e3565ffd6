//! A backend's idle HTTP/1.1 connections, kept for reuse by the next
//! request on the same worker thread.
//!
//! Why per thread: a backend connection is a hyper task spawned on the
//! runtime of the worker that opened it. Reused by a request on another
//! worker, every request and response would cross threads (a futex wake
//! each way, and the cache lines of both tasks), which costs as much as
//! the proxying itself; nginx keeps its upstream keep-alive cache per
//! worker process for the same reason. Each thread uses a slot of its own
//! (a lock nobody else takes on the request path), and the lists belong
//! to the backend rather than to the thread, so that the control plane
//! can close them all when the backend leaves its pool or starts draining.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use http_body_util::combinators::BoxBody;
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;

/// The body type of requests sent upstream.
pub type Body = BoxBody<Bytes, hyper::Error>;
pub type Sender = SendRequest<Body>;

/// Slots per backend. More threads than this share slots; an entry is
/// still only taken by the thread whose runtime drives it.
const SLOTS: usize = 16;

struct Idle {
    sender: Sender,
    since: Instant,
    home: ThreadId,
}

/// One thread's list, on a cache line of its own.
#[repr(align(64))]
#[derive(Default)]
struct Slot(Mutex<Vec<Idle>>);

#[derive(Default)]
pub struct KeepAlive {
    /// Made on the first connection given back: L4 pools never need one.
    slots: OnceLock<Box<[Slot]>>,
}

fn my_slot() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    SLOT.with(|s| {
        if s.get() == usize::MAX {
            s.set(NEXT.fetch_add(1, Ordering::Relaxed) % SLOTS);
        }
        s.get()
    })
}

impl KeepAlive {
    /// An idle connection of this thread that is still open and has idled
    /// less than `max_idle_time`, with how long it idled.
    // Dropping a sender inside the lock is fine: it only wakes its
    // connection task, it never runs it (or this code) in place.
    pub fn take(&self, max_idle_time: Duration) -> Option<(Sender, Duration)> {
        let slots = self.slots.get()?;
        let me = thread::current().id();
        let mut list = slots[my_slot()].0.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(pos) = list.iter().rposition(|c| c.home == me) {
            let c = list.swap_remove(pos);
            let idled = c.since.elapsed();
            if !c.sender.is_closed() && idled < max_idle_time {
                return Some((c.sender, idled));
            }
        }
        None
    }

    /// Keep `sender` (driven by this thread's runtime) for reuse, up to
    /// `max_idle` per thread; expired and closed ones are dropped.
    pub fn put(&self, sender: Sender, max_idle: usize, max_idle_time: Duration) {
        if sender.is_closed() || max_idle == 0 {
            return;
        }
        let slots = self
            .slots
            .get_or_init(|| (0..SLOTS).map(|_| Slot::default()).collect());
        let me = thread::current().id();
        let now = Instant::now();
        let mut list = slots[my_slot()].0.lock().unwrap_or_else(|p| p.into_inner());
        list.retain(|c| !c.sender.is_closed() && now - c.since < max_idle_time);
        if list.iter().filter(|c| c.home == me).count() < max_idle {
            list.push(Idle {
                sender,
                since: now,
                home: me,
            });
        }
    }

    /// Close every idle connection (from any thread): dropping a sender
    /// lets its connection task end on its own thread.
    pub fn close(&self) {
        if let Some(slots) = self.slots.get() {
            for s in slots.iter() {
                s.0.lock().unwrap_or_else(|p| p.into_inner()).clear();
            }
        }
    }

    /// Idle connections held, over every thread.
    pub fn len(&self) -> usize {
        self.slots.get().map_or(0, |slots| {
            slots
                .iter()
                .map(|s| s.0.lock().unwrap_or_else(|p| p.into_inner()).len())
                .sum()
        })
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
