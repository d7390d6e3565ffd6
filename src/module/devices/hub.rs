//! The command channels open on this balancer, by device. Queueing a
//! command only "pokes" the device's channel: the channel task then reads
//! the pending commands from the store and sends those it has not sent
//! yet. The store stays the only source of truth, so a poke that arrives
//! twice (locally and through NOTIFY) or a command acknowledged over HTTP
//! meanwhile cannot cause a wrong delivery, and a poke that is lost costs
//! only latency until the next one or the next connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::mpsc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelMsg {
    /// New commands may be pending: re-read them.
    Poke,
    /// Close the channel with this reason (revoked, replaced, shutdown).
    Close(String),
}

#[derive(Default)]
pub struct Hub {
    next: AtomicU64,
    channels: Mutex<HashMap<String, (u64, mpsc::Sender<ChannelMsg>)>>,
}

impl Hub {
    /// Register the device's channel; an older channel of the same device
    /// on this balancer is told to close (the device reconnected; the old
    /// TCP connection may not be dead yet, and two channels would get
    /// every command twice).
    pub fn register(&self, device_id: &str) -> (u64, mpsc::Receiver<ChannelMsg>) {
        // Small buffer: pokes coalesce (one pending poke is as good as ten).
        let (tx, rx) = mpsc::channel(4);
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let old = self.lock().insert(device_id.to_string(), (id, tx));
        if let Some((_, old)) = old {
            let _ = old.try_send(ChannelMsg::Close("replaced by a newer connection".into()));
        }
        (id, rx)
    }

    /// Remove the channel, unless a newer one replaced it.
    pub fn unregister(&self, device_id: &str, id: u64) {
        let mut channels = self.lock();
        if channels.get(device_id).is_some_and(|(cur, _)| *cur == id) {
            channels.remove(device_id);
        }
    }

    pub fn poke(&self, device_id: &str) {
        if let Some((_, tx)) = self.lock().get(device_id) {
            // Full means a poke is already queued: nothing is lost.
            let _ = tx.try_send(ChannelMsg::Poke);
        }
    }

    pub fn poke_all(&self) {
        for (_, tx) in self.lock().values() {
            let _ = tx.try_send(ChannelMsg::Poke);
        }
    }

    pub fn close(&self, device_id: &str, reason: &str) {
        if let Some((_, tx)) = self.lock().remove(device_id) {
            Self::send_close(tx, reason);
        }
    }

    pub fn close_all(&self, reason: &str) {
        for (_, (_, tx)) in self.lock().drain() {
            Self::send_close(tx, reason);
        }
    }

    /// Close messages must not be dropped on a full queue: send from a
    /// task (the channel task drains its queue promptly).
    fn send_close(tx: mpsc::Sender<ChannelMsg>, reason: &str) {
        let msg = ChannelMsg::Close(reason.to_string());
        if let Err(mpsc::error::TrySendError::Full(msg)) = tx.try_send(msg) {
            tokio::spawn(async move {
                let _ = tx.send(msg).await;
            });
        }
    }

    pub fn is_connected(&self, device_id: &str) -> bool {
        self.lock().contains_key(device_id)
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, mpsc::Sender<ChannelMsg>)>> {
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn newer_channel_replaces_older_and_pokes_coalesce() {
        let hub = Hub::default();
        let (a, mut rx_a) = hub.register("d1");
        let (b, mut rx_b) = hub.register("d1");
        assert_eq!(
            rx_a.recv().await,
            Some(ChannelMsg::Close("replaced by a newer connection".into()))
        );
        // The old channel's late unregister leaves the new one in place.
        hub.unregister("d1", a);
        assert!(hub.is_connected("d1"));
        for _ in 0..100 {
            hub.poke("d1");
        }
        assert_eq!(rx_b.recv().await, Some(ChannelMsg::Poke));
        hub.close("d1", "revoked");
        let mut last = None;
        while let Ok(m) = rx_b.try_recv() {
            last = Some(m);
        }
        assert_eq!(last, Some(ChannelMsg::Close("revoked".into())));
        hub.unregister("d1", b);
        assert!(hub.is_empty());
    }
}
