//! The writer side: lines queue in a bounded in-memory buffer shared by
//! every listener that logs to the same destination, and a thread of the
//! destination's own writes them out in batches.
//!
//! A connection only appends its formatted line to the buffer under a
//! mutex held for a copy (never for I/O); when the buffer is full the
//! line is dropped and counted, so a slow or blocked destination (a full
//! disk, a FIFO nobody reads, a stalled terminal) never slows a
//! connection. The writer takes the whole buffer in exchange for its
//! empty one, writes it outside the lock, then pauses briefly so that the
//! next batch gathers many lines: one write(2) per batch, and no wake-up
//! per line.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use prometheus::IntCounter;

use super::settings::Destination;

/// Bytes waiting to be written, at most: about two thousand JSON lines,
/// the lines of a few hundred milliseconds at a rate far above what one
/// process serves.
pub const QUEUE_BYTES: usize = 512 * 1024;

/// The writer's pause after each batch: the most a line waits before
/// being written while lines keep coming.
const BATCH_PAUSE: Duration = Duration::from_millis(10);

/// Lines of one destination, between the connections and the writer.
struct Pending {
    buf: Vec<u8>,
    /// The slot (listener) of each line in `buf`, so that lines the
    /// destination refuses are counted against the listeners they came
    /// from.
    origins: Vec<u16>,
    /// The writer is waiting for lines (it needs a wake-up).
    idle: bool,
    /// SIGUSR1 asked for the file to be opened again.
    reopen: bool,
    /// Every listener using this destination is gone.
    closed: bool,
}

struct Queue {
    pending: Mutex<Pending>,
    wake: Condvar,
    /// Signalled when the writer goes idle with nothing pending.
    drained: Condvar,
}

/// One destination and its writer thread, shared by the listeners that
/// log there. Dropped with the last of them: the writer writes what is
/// queued and ends.
pub struct Sink {
    destination: Destination,
    queue: Arc<Queue>,
    /// Per slot: the listener's name and dropped-lines counter.
    slots: Arc<Mutex<Vec<(String, IntCounter)>>>,
}

impl Sink {
    /// The sink for `destination`: the running one if any listener uses
    /// it already, else a new one with its writer thread.
    pub fn shared(destination: &Destination) -> io::Result<Arc<Sink>> {
        let mut sinks = SINKS.lock().unwrap();
        sinks.retain(|s| s.strong_count() > 0);
        if let Some(s) = sinks
            .iter()
            .filter_map(Weak::upgrade)
            .find(|s| &s.destination == destination)
        {
            return Ok(s);
        }
        let queue = Arc::new(Queue {
            pending: Mutex::new(Pending {
                buf: Vec::with_capacity(64 * 1024),
                origins: Vec::with_capacity(1024),
                idle: false,
                reopen: false,
                closed: false,
            }),
            wake: Condvar::new(),
            drained: Condvar::new(),
        });
        let slots = Arc::new(Mutex::new(Vec::new()));
        let mut out = Output::new(destination.clone());
        let (q, s) = (queue.clone(), slots.clone());
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_loop(&q, &s, &mut out))?;
        let sink = Arc::new(Sink {
            destination: destination.clone(),
            queue,
            slots,
        });
        sinks.push(Arc::downgrade(&sink));
        Ok(sink)
    }

    /// The slot of `listener`, whose lines the destination refused are
    /// added to `dropped`. A listener keeps its slot across reloads.
    pub fn slot(&self, listener: &str, dropped: &IntCounter) -> u16 {
        let mut slots = self.slots.lock().unwrap();
        let i = match slots.iter().position(|(n, _)| n == listener) {
            Some(i) => i,
            None => {
                slots.push((listener.to_string(), dropped.clone()));
                slots.len() - 1
            }
        };
        // Listener names are unique in a plan and slots are kept by name.
        u16::try_from(i).unwrap_or(u16::MAX)
    }

    /// Queue one line (with its newline). False when the queue is full:
    /// the line is dropped. Never waits for I/O.
    pub fn push(&self, slot: u16, line: &[u8]) -> bool {
        let mut p = self.queue.pending.lock().unwrap();
        if p.buf.len() + line.len() > QUEUE_BYTES {
            return false;
        }
        let wake = p.buf.is_empty() && p.idle;
        p.buf.extend_from_slice(line);
        p.origins.push(slot);
        drop(p);
        if wake {
            self.queue.wake.notify_one();
        }
        true
    }

    fn reopen(&self) {
        self.queue.pending.lock().unwrap().reopen = true;
        self.queue.wake.notify_one();
    }

    /// Wait until what is queued now has been written, at most `limit`.
    fn flush(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut p = self.queue.pending.lock().unwrap();
        while !(p.idle && p.buf.is_empty()) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            p = self.queue.drained.wait_timeout(p, left).unwrap().0;
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.queue.pending.lock().unwrap().closed = true;
        self.queue.wake.notify_one();
    }
}

/// Every running sink, so that one destination has one writer and
/// SIGUSR1 reaches them all.
static SINKS: Mutex<Vec<Weak<Sink>>> = Mutex::new(Vec::new());

fn live_sinks() -> Vec<Arc<Sink>> {
    SINKS
        .lock()
        .unwrap()
        .iter()
        .filter_map(Weak::upgrade)
        .collect()
}

/// SIGUSR1: every file destination is closed and opened again by its
/// path (after logrotate renamed it). Lines queued before the signal go
/// to the old file or the new one, never to both and never nowhere.
pub fn reopen_all() {
    for s in live_sinks() {
        s.reopen();
    }
}

/// Write out what is queued (at shutdown), waiting at most `limit` per
/// destination.
pub fn flush_all(limit: Duration) {
    for s in live_sinks() {
        s.flush(limit);
    }
}

fn write_loop(queue: &Queue, slots: &Mutex<Vec<(String, IntCounter)>>, out: &mut Output) {
    let mut batch: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut origins: Vec<u16> = Vec::with_capacity(1024);
    loop {
        let (reopen, closed) = {
            let mut p = queue.pending.lock().unwrap();
            while p.buf.is_empty() && !p.reopen && !p.closed {
                p.idle = true;
                queue.drained.notify_all();
                p = queue.wake.wait(p).unwrap();
            }
            p.idle = false;
            std::mem::swap(&mut p.buf, &mut batch);
            std::mem::swap(&mut p.origins, &mut origins);
            (std::mem::take(&mut p.reopen), p.closed)
        };
        if reopen {
            out.reopen();
        }
        if !batch.is_empty() {
            let refused = out.write(&batch);
            if refused.iter().any(|r| *r) {
                let slots = slots.lock().unwrap();
                let refused = origins.iter().zip(refused.iter().copied());
                for (origin, _) in refused.filter(|(_, r)| *r) {
                    if let Some((_, dropped)) = slots.get(usize::from(*origin)) {
                        dropped.inc();
                    }
                }
            }
            batch.clear();
            origins.clear();
        }
        if closed {
            let p = queue.pending.lock().unwrap();
            if p.buf.is_empty() {
                return;
            }
            continue;
        }
        std::thread::sleep(BATCH_PAUSE);
    }
}

/// An open destination.
struct Output {
    destination: Destination,
    file: Option<File>,
    /// The last open or write error was logged: the next is not, until a
    /// write succeeds again.
    failing: bool,
}

impl Output {
    fn new(destination: Destination) -> Output {
        Output {
            destination,
            file: None,
            failing: false,
        }
    }

    fn reopen(&mut self) {
        if matches!(self.destination, Destination::File(_)) {
            // Closed here, opened again by path at the next write.
            self.file = None;
        }
    }

    /// Write a batch of whole lines. Returns, per line, whether it was
    /// lost (empty: none was).
    fn write(&mut self, batch: &[u8]) -> Vec<bool> {
        let written = match &self.destination {
            Destination::Stdout => io::stdout().lock().write_all(batch),
            Destination::Syslog => {
                let lines = batch.split(|b| *b == b'\n').filter(|l| !l.is_empty());
                // Lines are formatted from UTF-8 (JSON) or escaped to
                // ASCII (combined): the lossy conversion copies nothing.
                return lines
                    .map(|l| !crate::syslog::send_access(&String::from_utf8_lossy(l)))
                    .collect();
            }
            Destination::File(path) => {
                if self.file.is_none() {
                    match open_append(path) {
                        Ok(f) => self.file = Some(f),
                        Err(e) => return self.failed(batch, &e),
                    }
                }
                let file = self.file.as_mut().expect("opened above");
                file.write_all(batch)
            }
        };
        match written {
            Ok(()) => {
                self.failing = false;
                Vec::new()
            }
            Err(e) => {
                // Opened again for the next batch: the file may have been
                // deleted or its disk replaced.
                self.file = None;
                self.failed(batch, &e)
            }
        }
    }

    /// The whole batch is lost.
    fn failed(&mut self, batch: &[u8], e: &io::Error) -> Vec<bool> {
        if !self.failing {
            self.failing = true;
            tracing::warn!(destination = ?self.destination, "access log lines dropped: {e}");
        }
        vec![true; batch.iter().filter(|b| **b == b'\n').count()]
    }
}

/// The file in append mode (whole lines from several processes or a
/// rotation never interleave mid-line), its directory created if needed.
fn open_append(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)?;
        }
    }
    OpenOptions::new().append(true).create(true).open(path)
}
