//! The command channels open on this balancer, by device. Queueing a
//! command only "pokes" the device's channel: the channel task then reads
//! the pending commands from the store and sends those it has not sent
//! yet. The store stays the only source of truth, so a poke that arrives
//! twice (locally and through NOTIFY) or a command acknowledged over HTTP
//! meanwhile cannot cause a wrong delivery, and a poke that is lost costs
//! only latency until the next one or the next connection.
//!
//! A channel is told things through a flag, a close reason and a
//! [`Notify`] (about 100 bytes, held for as long as the channel is open)
//! rather than a queue: a tokio mpsc channel allocates its first block of
//! 32 slots up front, over a KiB per idle channel, for messages that
//! coalesce anyway (one pending poke is as good as ten; the first close
//! reason wins).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::Notify;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelMsg {
    /// New commands may be pending: re-read them.
    Poke,
    /// Close the channel with this reason (revoked, replaced, shutdown).
    Close(String),
    /// The balancer is draining: close with 1001 "going away" at a
    /// random moment of the drain's spread.
    Drain,
}

/// One open channel, shared by the hub and the channel's task.
#[derive(Default)]
pub struct Channel {
    notify: Notify,
    poked: AtomicBool,
    close: OnceLock<String>,
    draining: AtomicBool,
    /// Where the store's record of this channel is: for ws.rs, which
    /// writes and clears it from two tasks.
    pub recorded: AtomicU8,
}

impl Channel {
    /// The next thing the channel is told; a close wins over a drain,
    /// a drain over a poke (each drain is told once). Cancel-safe:
    /// nothing is taken until it is returned.
    pub async fn recv(&self) -> ChannelMsg {
        loop {
            if let Some(reason) = self.close.get() {
                return ChannelMsg::Close(reason.clone());
            }
            if self.draining.swap(false, Ordering::AcqRel) {
                return ChannelMsg::Drain;
            }
            if self.poked.swap(false, Ordering::AcqRel) {
                return ChannelMsg::Poke;
            }
            // A notify_one before this wait is kept as a permit.
            self.notify.notified().await;
        }
    }

    fn poke(&self) {
        self.poked.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    fn drain(&self) {
        self.draining.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    fn close(&self, reason: &str) {
        let _ = self.close.set(reason.to_string());
        self.notify.notify_one();
    }
}

/// A binary upgrade's steps, as the channels see them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handover {
    Serving = 0,
    /// Nothing more is delivered; acks of what was sent are stored.
    Releasing = 1,
    /// The new process has the store.
    Released = 2,
}

#[derive(Default)]
pub struct Hub {
    channels: Mutex<HashMap<Arc<str>, Arc<Channel>>>,
    /// Set when the drain starts: over how long the closes are spread.
    drain_spread: OnceLock<Duration>,
    /// What the drain's closes say (1001, or 1012 after an upgrade).
    drain_reason: OnceLock<crate::drain::CloseReason>,
    /// Where a binary upgrade is (`Handover`): from `Releasing` on,
    /// channels here deliver nothing more; once `Released`, one that
    /// needs the store closes with 1012 so that its device reconnects to
    /// the new process.
    handover: AtomicU8,
    /// Commands sent on this balancer's channels and not acknowledged
    /// yet: the handover waits for their acks (briefly) so that a device
    /// does not get one again from the new process.
    unacked: AtomicUsize,
    acked: Notify,
    /// Told when the last channel is gone.
    emptied: Notify,
}

impl Hub {
    /// Register the device's channel; an older channel of the same device
    /// on this balancer is told to close (the device reconnected; the old
    /// TCP connection may not be dead yet, and two channels would get
    /// every command twice).
    pub fn register(&self, device_id: &Arc<str>) -> Arc<Channel> {
        let channel = Arc::new(Channel::default());
        let mut channels = self.lock();
        // A channel opened while draining (its upgrade was under way)
        // is told at once.
        if self.drain_spread.get().is_some() {
            channel.drain();
        }
        let old = channels.insert(device_id.clone(), channel.clone());
        drop(channels);
        if let Some(old) = old {
            old.close("replaced by a newer connection");
        }
        channel
    }

    /// Remove the channel, unless a newer one replaced it.
    pub fn unregister(&self, device_id: &str, channel: &Arc<Channel>) {
        let mut channels = self.lock();
        if channels
            .get(device_id)
            .is_some_and(|cur| Arc::ptr_eq(cur, channel))
        {
            channels.remove(device_id);
            if channels.is_empty() {
                self.emptied.notify_waiters();
            }
        }
    }

    /// Tell every channel the balancer is draining; each closes at its
    /// own random moment within `spread`.
    pub fn drain(&self, spread: Duration) {
        self.drain_with(spread, crate::drain::GOING_AWAY);
    }

    /// `drain`, closing with `reason`.
    pub fn drain_with(&self, spread: Duration, reason: crate::drain::CloseReason) {
        let _ = self.drain_reason.set(reason);
        let channels = self.lock();
        let _ = self.drain_spread.set(spread);
        for ch in channels.values() {
            ch.drain();
        }
    }

    /// The close code and reason set by [`Hub::drain_with`].
    pub fn drain_reason(&self) -> crate::drain::CloseReason {
        self.drain_reason
            .get()
            .copied()
            .unwrap_or(crate::drain::GOING_AWAY)
    }

    pub fn set_handover(&self, state: Handover) {
        self.handover.store(state as u8, Ordering::SeqCst);
    }

    /// Whether channels may send commands (not during a handover).
    pub fn delivering(&self) -> bool {
        self.handover.load(Ordering::SeqCst) == Handover::Serving as u8
    }

    /// Whether this process still has the store (acks are stored).
    pub fn storing(&self) -> bool {
        self.handover.load(Ordering::SeqCst) != Handover::Released as u8
    }

    /// A channel's set of unacknowledged commands went from `before` to
    /// `after` entries.
    pub fn unacked_changed(&self, before: usize, after: usize) {
        if after >= before {
            self.unacked.fetch_add(after - before, Ordering::SeqCst);
        } else {
            self.unacked.fetch_sub(before - after, Ordering::SeqCst);
            self.acked.notify_waiters();
        }
    }

    /// Until every command sent here is acknowledged, or `limit`.
    pub async fn wait_acked(&self, limit: Duration) -> bool {
        let until = tokio::time::Instant::now() + limit;
        loop {
            let acked = self.acked.notified();
            if self.unacked.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(until, acked).await.is_err() {
                return false;
            }
        }
    }

    /// The spread set by [`Hub::drain`].
    pub fn drain_spread(&self) -> Duration {
        self.drain_spread.get().copied().unwrap_or_default()
    }

    /// Until no channel is registered.
    pub async fn wait_empty(&self) {
        loop {
            let emptied = self.emptied.notified();
            if self.is_empty() {
                return;
            }
            emptied.await;
        }
    }

    pub fn poke(&self, device_id: &str) {
        if let Some(ch) = self.lock().get(device_id) {
            ch.poke();
        }
    }

    pub fn poke_all(&self) {
        for ch in self.lock().values() {
            ch.poke();
        }
    }

    pub fn close(&self, device_id: &str, reason: &str) {
        let mut channels = self.lock();
        if let Some(ch) = channels.remove(device_id) {
            ch.close(reason);
            if channels.is_empty() {
                self.emptied.notify_waiters();
            }
        }
    }

    pub fn close_all(&self, reason: &str) {
        for (_, ch) in self.lock().drain() {
            ch.close(reason);
        }
        self.emptied.notify_waiters();
    }

    pub fn is_connected(&self, device_id: &str) -> bool {
        self.lock().contains_key(device_id)
    }

    /// The devices whose channel this balancer holds now.
    pub fn device_ids(&self) -> Vec<Arc<str>> {
        self.lock().keys().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<Channel>>> {
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn next(ch: &Channel) -> Option<ChannelMsg> {
        tokio::time::timeout(Duration::from_millis(100), ch.recv())
            .await
            .ok()
    }

    #[tokio::test]
    async fn newer_channel_replaces_older_and_pokes_coalesce() {
        let hub = Hub::default();
        let d1: Arc<str> = "d1".into();
        let a = hub.register(&d1);
        let b = hub.register(&d1);
        assert_eq!(
            next(&a).await,
            Some(ChannelMsg::Close("replaced by a newer connection".into()))
        );
        // The old channel's late unregister leaves the new one in place.
        hub.unregister("d1", &a);
        assert!(hub.is_connected("d1"));
        for _ in 0..100 {
            hub.poke("d1");
        }
        assert_eq!(next(&b).await, Some(ChannelMsg::Poke));
        assert_eq!(next(&b).await, None, "pokes coalesce");
        hub.poke("d1");
        hub.close("d1", "revoked");
        // A close wins over a pending poke, and stays.
        assert_eq!(next(&b).await, Some(ChannelMsg::Close("revoked".into())));
        assert_eq!(next(&b).await, Some(ChannelMsg::Close("revoked".into())));
        hub.unregister("d1", &b);
        assert!(hub.is_empty());
    }

    #[tokio::test]
    async fn draining_tells_every_channel_once_and_newcomers_too() {
        let hub = Hub::default();
        let (d1, d2): (Arc<str>, Arc<str>) = ("d1".into(), "d2".into());
        let a = hub.register(&d1);
        hub.poke("d1");
        hub.drain(Duration::from_secs(4));
        assert_eq!(next(&a).await, Some(ChannelMsg::Drain), "before the poke");
        assert_eq!(next(&a).await, Some(ChannelMsg::Poke));
        assert_eq!(next(&a).await, None, "told once");
        let b = hub.register(&d2);
        assert_eq!(next(&b).await, Some(ChannelMsg::Drain));
        assert_eq!(hub.drain_spread(), Duration::from_secs(4));
        let waiter = {
            let hub = Arc::new(hub);
            let h = hub.clone();
            let w = tokio::spawn(async move { h.wait_empty().await });
            hub.unregister("d1", &a);
            tokio::task::yield_now().await;
            assert!(!w.is_finished());
            hub.unregister("d2", &b);
            w
        };
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("woken when empty")
            .unwrap();
    }

    #[tokio::test]
    async fn a_poke_while_nobody_waits_is_kept() {
        let hub = Hub::default();
        let d: Arc<str> = "d".into();
        let ch = hub.register(&d);
        // Start waiting, give up (as a select! branch that lost), poke.
        assert_eq!(next(&ch).await, None);
        hub.poke("d");
        assert_eq!(next(&ch).await, Some(ChannelMsg::Poke));
        // Poked from another task while this one waits.
        let waiter = {
            let ch = ch.clone();
            tokio::spawn(async move { ch.recv().await })
        };
        tokio::task::yield_now().await;
        hub.poke_all();
        assert_eq!(waiter.await.unwrap(), ChannelMsg::Poke);
        hub.close_all("server shutting down");
        assert_eq!(
            next(&ch).await,
            Some(ChannelMsg::Close("server shutting down".into()))
        );
        assert!(hub.is_empty());
    }
}
