//! In-memory answers for the device API's hot path. A heartbeat needs the
//! device behind a certificate, its effective settings version and its
//! pending-command count; reading those from the store for every
//! heartbeat cost several blocking round trips each, for answers that
//! change only when an administrator (or the device's session) changes
//! something.
//!
//! Correctness rests on invalidation, not on expiry:
//! - every write on this balancer that can change an answer drops it here
//!   after its commit and before its own answer (so the very next request
//!   sees the change), and is published to the other balancers sharing
//!   the store (`StoreEvent::Changed`, `CommandQueued`, `DeviceRevoked`,
//!   `Resync`), which drop their copies when the notification arrives;
//! - a fill races with invalidation through a generation number: an answer
//!   read from the store is only kept if nothing was invalidated since the
//!   read began, so a slow read can never put back what a change removed;
//! - `ttl` bounds what a lost notification can cost (a balancer that died
//!   between its commit and its NOTIFY): no entry is used once it is older.
//!   A lost LISTEN connection already ends in a `Resync`, which clears all.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::settings::Effective;

/// What an invalidation covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// One device's settings and pending count.
    Device(String),
    /// Every device's settings and pending count (defaults, a group or a
    /// user profile changed).
    AllDevices,
}

struct Entry<T> {
    value: T,
    at: Instant,
}

#[derive(Default)]
struct Maps {
    generation: u64,
    /// Certificate fingerprint → device id.
    devices: HashMap<String, Entry<Arc<str>>>,
    settings: HashMap<Arc<str>, Entry<Arc<Effective>>>,
    pending: HashMap<Arc<str>, Entry<i64>>,
}

pub struct Cache {
    ttl: Duration,
    maps: Mutex<Maps>,
}

/// Taken before reading from the store; a fill with a stale ticket is
/// dropped.
#[derive(Debug, Clone, Copy)]
pub struct Ticket(u64);

impl Cache {
    /// `ttl` zero disables caching (every answer comes from the store).
    pub fn new(ttl: Duration) -> Cache {
        Cache {
            ttl,
            maps: Mutex::new(Maps::default()),
        }
    }

    pub fn ticket(&self) -> Ticket {
        Ticket(self.lock().generation)
    }

    pub fn device_id(&self, fingerprint: &str) -> Option<Arc<str>> {
        self.get(|m| &m.devices, fingerprint)
    }

    pub fn put_device_id(&self, t: Ticket, fingerprint: &str, id: Arc<str>) {
        self.put(t, |m| &mut m.devices, fingerprint.into(), id);
    }

    pub fn settings(&self, id: &str) -> Option<Arc<Effective>> {
        self.get(|m| &m.settings, id)
    }

    pub fn put_settings(&self, t: Ticket, id: &str, e: Arc<Effective>) {
        self.put(t, |m| &mut m.settings, id.into(), e);
    }

    pub fn pending(&self, id: &str) -> Option<i64> {
        self.get(|m| &m.pending, id)
    }

    pub fn put_pending(&self, t: Ticket, id: &str, n: i64) {
        self.put(t, |m| &mut m.pending, id.into(), n);
    }

    /// Drop what `scope` covers, and make fills that started before now
    /// come to nothing.
    pub fn invalidate(&self, scope: &Scope) {
        let mut m = self.lock();
        m.generation += 1;
        match scope {
            Scope::Device(id) => {
                m.settings.remove(id.as_str());
                m.pending.remove(id.as_str());
            }
            Scope::AllDevices => {
                m.settings.clear();
                m.pending.clear();
            }
        }
    }

    /// Drop everything: the data set was replaced (an import can remove
    /// devices or change their certificates), or events may have been
    /// missed.
    pub fn clear(&self) {
        let mut m = self.lock();
        m.generation += 1;
        m.settings.clear();
        m.pending.clear();
        m.devices.clear();
    }

    /// The certificate is no longer valid (revoked).
    pub fn forget_fingerprint(&self, fingerprint: &str) {
        let mut m = self.lock();
        m.generation += 1;
        m.devices.remove(fingerprint);
    }

    fn get<K, T>(&self, map: impl FnOnce(&Maps) -> &HashMap<K, Entry<T>>, key: &str) -> Option<T>
    where
        K: std::borrow::Borrow<str> + std::hash::Hash + Eq,
        T: Clone,
    {
        let m = self.lock();
        map(&m)
            .get(key)
            .filter(|e| e.at.elapsed() < self.ttl)
            .map(|e| e.value.clone())
    }

    fn put<K, T>(
        &self,
        t: Ticket,
        map: impl FnOnce(&mut Maps) -> &mut HashMap<K, Entry<T>>,
        key: K,
        value: T,
    ) where
        K: std::hash::Hash + Eq,
    {
        if self.ttl.is_zero() {
            return;
        }
        let mut m = self.lock();
        if m.generation != t.0 {
            return;
        }
        map(&mut m).insert(
            key,
            Entry {
                value,
                at: Instant::now(),
            },
        );
    }

    fn lock(&self) -> MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::module::devices::store::StoreEvent;

    fn effective(version: &str) -> Arc<Effective> {
        Arc::new(Effective {
            settings: serde_json::json!({}),
            version: version.into(),
        })
    }

    #[test]
    fn a_fill_that_started_before_an_invalidation_is_dropped() {
        let c = Cache::new(Duration::from_secs(60));
        let before = c.ticket();
        // A change commits and is invalidated while the read is under way...
        c.invalidate(&Scope::Device("d1".into()));
        // ...so the old answer that read brings back must not be kept.
        c.put_settings(before, "d1", effective("old"));
        assert!(c.settings("d1").is_none());
        let t = c.ticket();
        c.put_settings(t, "d1", effective("new"));
        c.put_pending(t, "d1", 2);
        c.put_device_id(t, "fp1", "d1".into());
        assert_eq!(c.settings("d1").unwrap().version, "new");
        assert_eq!(c.pending("d1"), Some(2));

        // One device's change leaves the others; AllDevices keeps the
        // certificate map; clear drops everything.
        let t = c.ticket();
        c.put_settings(t, "d2", effective("two"));
        c.invalidate(&Scope::Device("d1".into()));
        assert!(c.settings("d1").is_none() && c.pending("d1").is_none());
        assert!(c.settings("d2").is_some());
        c.invalidate(&Scope::AllDevices);
        assert!(c.settings("d2").is_none());
        assert_eq!(c.device_id("fp1").as_deref(), Some("d1"));
        c.forget_fingerprint("fp1");
        assert!(c.device_id("fp1").is_none());
        let t = c.ticket();
        c.put_device_id(t, "fp2", "d2".into());
        c.clear();
        assert!(c.device_id("fp2").is_none());
    }

    #[test]
    fn entries_expire_and_zero_disables() {
        let c = Cache::new(Duration::from_millis(30));
        c.put_pending(c.ticket(), "d1", 1);
        assert_eq!(c.pending("d1"), Some(1));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(c.pending("d1"), None);

        let off = Cache::new(Duration::ZERO);
        off.put_pending(off.ticket(), "d1", 1);
        assert_eq!(off.pending("d1"), None);
    }

    #[test]
    fn change_events_travel_as_short_payloads() {
        for ev in [
            StoreEvent::Changed {
                device_id: Some("dev-1".into()),
            },
            StoreEvent::Changed { device_id: None },
        ] {
            assert_eq!(StoreEvent::decode(&ev.encode()), Some(ev));
        }
    }
}
