//! Batched last-contact writes. Thousands of devices calling in per second
//! would cost thousands of transactions (each an fsync); instead one writer
//! task commits them in groups: each transaction takes every update that
//! queued while the previous one ran (at most `batch`). Nobody waits on
//! purpose, so a lone heartbeat costs one commit, and under load the
//! groups grow by themselves with the commit time; `flush` (0 by default)
//! can add a gathering window after the first update of a group.
//!
//! A heartbeat is answered only after the transaction holding its update
//! has committed, so "acknowledged" means "durable": a `kill -9` (or power
//! loss, with SQLite's `synchronous = FULL`) loses no answered heartbeat.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::store::{Store, StoreError, StoreResult};

type Waiter = oneshot::Sender<StoreResult<()>>;

#[derive(Clone)]
pub struct ContactWriter {
    tx: mpsc::Sender<(String, i64, Option<Waiter>)>,
}

impl ContactWriter {
    /// Start the writer task; it ends when every `ContactWriter` is gone.
    pub fn spawn(store: Arc<dyn Store>, flush: Duration, batch: usize) -> ContactWriter {
        // Bounded: when the database is slower than the fleet, heartbeats
        // wait here (back-pressure) instead of piling up in memory.
        let (tx, rx) = mpsc::channel(batch.saturating_mul(4).max(64));
        tokio::spawn(run(store, rx, flush, batch));
        ContactWriter { tx }
    }

    /// Record a contact and wait until it is committed.
    pub async fn record(&self, device_id: String, at: i64) -> StoreResult<()> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send((device_id, at, Some(done)))
            .await
            .map_err(|_| StoreError::Backend("contact writer stopped".into()))?;
        wait.await
            .map_err(|_| StoreError::Backend("contact writer stopped".into()))?
    }

    /// Until every contact queued before this call is committed (or
    /// failed): an update of no device goes through the queue in order.
    pub async fn flush(&self) {
        let _ = self.record(String::new(), 0).await;
    }

    /// Record a contact without waiting (WebSocket pongs: nothing is
    /// acknowledged to the device, so nothing needs to wait).
    pub fn record_soon(&self, device_id: String, at: i64) {
        // A full queue drops the update: the next pong brings another.
        let _ = self.tx.try_send((device_id, at, None));
    }
}

async fn run(
    store: Arc<dyn Store>,
    mut rx: mpsc::Receiver<(String, i64, Option<Waiter>)>,
    flush: Duration,
    batch: usize,
) {
    let mut contacts = Vec::with_capacity(batch);
    let mut waiters = Vec::with_capacity(batch);
    loop {
        let Some(first) = rx.recv().await else { return };
        let mut next = Some(first);
        if !flush.is_zero() {
            // Optional gathering window after the first update.
            let deadline = Instant::now() + flush;
            while let Some((id, at, w)) = next.take() {
                contacts.push((id, at));
                waiters.extend(w);
                if contacts.len() < batch {
                    next = tokio::time::timeout_at(deadline, rx.recv())
                        .await
                        .ok()
                        .flatten();
                }
            }
        }
        // Group commit: everything that queued meanwhile (while the
        // previous transaction ran) goes into this one.
        while let Some((id, at, w)) = next.take() {
            contacts.push((id, at));
            waiters.extend(w);
            if contacts.len() < batch {
                next = rx.try_recv().ok();
            }
        }
        let result = store.record_contacts(std::mem::take(&mut contacts)).await;
        if let Err(e) = &result {
            tracing::warn!(error = %e, "devices: writing last-contact times failed");
        }
        for w in waiters.drain(..) {
            let _ = w.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::module::devices::model::*;
    use crate::module::devices::store::sqlite::SqliteStore;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_heartbeats_few_transactions_all_committed_when_answered() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("d.db")).unwrap());
        store
            .insert_token(EnrolToken {
                id: "t".into(),
                secret_sha256: sha256_hex(b"s"),
                label: String::new(),
                created_at: 0,
                expires_at: i64::MAX,
                uses_left: 1000,
                used: 0,
            })
            .await
            .unwrap();
        for i in 0..200 {
            let d = Device {
                id: format!("d{i}"),
                fingerprint: sha256_hex(format!("d{i}").as_bytes()),
                name: String::new(),
                serial: String::new(),
                cert_pem: String::new(),
                groups: vec![],
                settings: empty_object(),
                session_user: None,
                enrolled_at: 0,
                token_id: None,
                last_contact: None,
                revoked_at: None,
                channel_node: None,
            };
            store.enrol(sha256_hex(b"s"), 1, d).await.unwrap();
        }
        // No gathering window: the batches come from group commit alone.
        let writer = ContactWriter::spawn(store.clone(), Duration::ZERO, 1000);
        let started = std::time::Instant::now();
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let (w, s) = (writer.clone(), store.clone());
                tokio::spawn(async move {
                    w.record(format!("d{i}"), 1_000 + i).await.unwrap();
                    // Answered means committed: readable at once.
                    let d = s.device(format!("d{i}")).await.unwrap().unwrap();
                    assert_eq!(d.last_contact, Some(1_000 + i));
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        // 200 separate commits with synchronous=FULL would take far longer.
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn unknown_devices_do_not_fail_the_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("d.db")).unwrap());
        let writer = ContactWriter::spawn(store, Duration::from_millis(5), 10);
        writer.record("ghost".into(), 5).await.unwrap();
        writer.record_soon("ghost".into(), 6);
    }
}
