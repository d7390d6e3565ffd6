//! One sender per configured server: a bounded queue in front of one
//! dedicated thread that owns the socket.
//!
//! Callers (tracing events on any thread, access lines from connections)
//! only ever `try_send` into the queue: a full queue drops the message and
//! counts it, it never waits. The thread formats, frames and writes; when
//! the server is unreachable it drops what arrives (counted) and tries
//! again after a pause that doubles up to `BACKOFF_MAX`, so a dead server
//! costs neither memory nor a connection attempt per message.

use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::message::{self, Origin, Record};
use super::metrics::{self, Stream};
use super::settings::SyslogPlan;
use super::transport::{Conn, SendError};

/// Messages waiting for the thread. At a few hundred bytes each, a full
/// queue holds a few MiB: enough for a burst of access lines while a TCP
/// write waits, small enough to never matter.
pub const QUEUE: usize = 4096;
/// Messages formatted and written together (one TCP write).
const BATCH: usize = 64;
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

struct Item {
    stream: Stream,
    record: Record,
}

pub struct Sender {
    pub plan: SyslogPlan,
    tx: SyncSender<Item>,
    /// Disconnects when the thread has ended (its queue sent or dropped).
    done: Mutex<Receiver<()>>,
}

impl Sender {
    pub fn start(plan: SyslogPlan) -> std::io::Result<Sender> {
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let (done_tx, done) = mpsc::channel();
        let origin = Origin::new(plan.facility, &plan.app_name);
        let worker = Worker {
            plan: plan.clone(),
            origin,
            conn: None,
            backoff: BACKOFF_FIRST,
            retry_at: Instant::now(),
            up_since: None,
            down_since: None,
        };
        std::thread::Builder::new()
            .name("syslog".into())
            .spawn(move || {
                worker.run(rx);
                drop(done_tx);
            })?;
        Ok(Sender {
            plan,
            tx,
            done: Mutex::new(done),
        })
    }

    /// Queue one message; false when the queue was full (counted).
    pub fn send(&self, stream: Stream, record: Record) -> bool {
        match self.tx.try_send(Item { stream, record }) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                metrics::dropped(metrics::QUEUE_FULL, 1);
                false
            }
        }
    }

    /// Close the queue and give the thread up to `wait` to send what is in
    /// it (the last lines before an exit or a change of server).
    pub fn finish(self, wait: Duration) {
        let Sender { tx, done, .. } = self;
        drop(tx);
        let done = done.into_inner().unwrap_or_else(|e| e.into_inner());
        let _ = done.recv_timeout(wait);
    }
}

/// The thread's state.
struct Worker {
    plan: SyslogPlan,
    origin: Origin,
    conn: Option<Conn>,
    backoff: Duration,
    retry_at: Instant,
    /// When the current connection was opened.
    up_since: Option<Instant>,
    /// Set while the server is unreachable, for one log line per outage.
    down_since: Option<Instant>,
}

impl Worker {
    fn run(mut self, rx: Receiver<Item>) {
        let mut batch = Vec::with_capacity(BATCH);
        let mut bytes = Vec::with_capacity(BATCH);
        loop {
            // Ends once every handle is gone and the queue is empty.
            match rx.recv() {
                Ok(item) => batch.push(item),
                Err(_) => return,
            }
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(item) => batch.push(item),
                    Err(_) => break,
                }
            }
            self.deliver(&mut batch, &mut bytes);
        }
    }

    fn deliver(&mut self, batch: &mut Vec<Item>, bytes: &mut Vec<Vec<u8>>) {
        if self.conn.as_ref().is_some_and(Conn::closed_by_peer) {
            self.conn = None;
            self.broken("the server closed the connection".into());
        }
        if self.conn.is_none() && Instant::now() >= self.retry_at {
            match Conn::open(&self.plan.transport) {
                Ok(c) => {
                    self.conn = Some(c);
                    self.up_since = Some(Instant::now());
                    if let Some(since) = self.down_since.take() {
                        tracing::info!(
                            "syslog: sending to {} again after {:.1?}",
                            self.plan.transport,
                            since.elapsed()
                        );
                    }
                }
                Err(e) => self.broken(e.to_string()),
            }
        }
        let Some(conn) = self.conn.as_mut() else {
            metrics::dropped(metrics::UNREACHABLE, batch.len() as u64);
            batch.clear();
            return;
        };
        bytes.clear();
        for item in batch.iter() {
            let mut m = Vec::with_capacity(256);
            message::format(&self.origin, &item.record, &mut m);
            bytes.push(m);
        }
        let (sent, result) = conn.send(bytes);
        for item in &batch[..sent] {
            metrics::sent(item.stream);
        }
        let lost = (batch.len() - sent) as u64;
        batch.clear();
        match result {
            Ok(()) => {}
            Err(SendError::Full) => metrics::dropped(metrics::QUEUE_FULL, lost),
            Err(SendError::Broken(e)) => {
                metrics::dropped(metrics::UNREACHABLE, lost);
                self.conn = None;
                self.broken(e.to_string());
            }
        }
    }

    /// The server cannot be reached: wait before the next attempt, twice
    /// as long each time, from the start again after a connection that
    /// lasted (a server that restarts now and then is retried quickly; one
    /// that accepts and drops every connection is not hammered).
    fn broken(&mut self, why: String) {
        if self
            .up_since
            .take()
            .is_some_and(|t| t.elapsed() >= BACKOFF_MAX)
        {
            self.backoff = BACKOFF_FIRST;
        }
        self.retry_at = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        if self.down_since.is_none() {
            self.down_since = Some(Instant::now());
            tracing::warn!(
                "syslog: {} unreachable ({why}); messages are dropped and counted until it is back, retrying with a pause of up to {BACKOFF_MAX:?}",
                self.plan.transport
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syslog::message::severity;
    use crate::syslog::Transport;
    use std::os::unix::net::UnixDatagram;
    use std::time::SystemTime;

    /// A local receiver that never reads: once its socket queue is full,
    /// messages are dropped and counted, the sender never waits, and every
    /// message is either received or counted as dropped.
    #[test]
    fn a_full_local_socket_drops_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let receiver = UnixDatagram::bind(&path).unwrap();
        let (sent0, dropped0) = (
            metrics::sent_total(Stream::Events),
            metrics::dropped_total(metrics::QUEUE_FULL),
        );
        let sender = Sender::start(SyslogPlan {
            transport: Transport::Unix(path),
            facility: 1,
            app_name: "t".into(),
        })
        .unwrap();
        let n = 3 * QUEUE as u64;
        for i in 0..n {
            sender.send(
                Stream::Events,
                Record {
                    time: SystemTime::now(),
                    severity: severity::INFO,
                    msgid: "event",
                    fields: Vec::new(),
                    msg: format!("message {i}"),
                },
            );
        }
        sender.finish(Duration::from_secs(30));
        let sent = metrics::sent_total(Stream::Events) - sent0;
        let dropped = metrics::dropped_total(metrics::QUEUE_FULL) - dropped0;
        receiver.set_nonblocking(true).unwrap();
        let mut received = 0;
        let mut buf = [0u8; 1024];
        while receiver.recv(&mut buf).is_ok() {
            received += 1;
        }
        assert!(dropped > 0, "sent {sent}");
        assert_eq!(received, sent);
        assert_eq!(sent + dropped, n);
    }
}
