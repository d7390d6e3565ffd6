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
//!   read from the store is only kept if nothing that covers it (its
//!   device, every device, or the certificate map) was invalidated since
//!   the read began, so a slow read can never put back what a change
//!   removed, and a read of the whole fleet (`Devices::warm`) is not
//!   thrown away because one device acknowledged a command meanwhile;
//! - `ttl` bounds what a lost notification can cost (a balancer that died
//!   between its commit and its NOTIFY): no entry is used once it is older.
//!   A lost LISTEN connection already ends in a `Resync`, which clears all.
//!
//! Memory: a device costs one small entry (its id, a pointer to its
//! effective settings, its pending count, two timestamps) plus its
//! certificate's. Effective settings documents are shared: the version is a
//! hash of every input, so devices with the same version have the same
//! document, and the cache keeps one copy per version however many devices
//! use it (most of a fleet shares a handful).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
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

impl<T> Entry<T> {
    fn new(value: T) -> Entry<T> {
        Entry {
            value,
            at: Instant::now(),
        }
    }
}

impl<T: Clone> Entry<T> {
    fn fresh(&self, ttl: Duration) -> Option<T> {
        (self.at.elapsed() < ttl).then(|| self.value.clone())
    }
}

/// What is kept for one device: both halves of a heartbeat's answer.
#[derive(Default)]
struct PerDevice {
    settings: Option<Entry<Arc<Effective>>>,
    pending: Option<Entry<i64>>,
    /// The generation of the device's last invalidation: fills whose
    /// read began before it are stale.
    invalidated_at: u64,
}

#[derive(Default)]
struct Maps {
    /// Counts invalidations; a ticket is its value when a read began.
    generation: u64,
    /// The generation of the last invalidation of every device.
    all_at: u64,
    /// The generation of the last removal from the certificate map.
    fingerprints_at: u64,
    /// Certificate fingerprint → device id.
    devices: HashMap<Box<str>, Entry<Arc<str>>>,
    per_device: HashMap<Arc<str>, PerDevice>,
    /// Settings version → the one shared document with that version.
    documents: HashMap<Box<str>, Weak<Effective>>,
    /// `documents` is swept of unused versions when it outgrows this.
    sweep_at: usize,
}

impl Maps {
    fn device(&mut self, id: &str) -> &mut PerDevice {
        if !self.per_device.contains_key(id) {
            self.per_device.insert(id.into(), PerDevice::default());
        }
        self.per_device.get_mut(id).expect("inserted above")
    }

    /// The shared copy of `e` (by version), registering `e` if new.
    fn intern(&mut self, e: Arc<Effective>) -> Arc<Effective> {
        if let Some(shared) = self
            .documents
            .get(e.version.as_str())
            .and_then(Weak::upgrade)
        {
            return shared;
        }
        if self.documents.len() >= self.sweep_at {
            self.documents.retain(|_, w| w.strong_count() > 0);
            self.sweep_at = (self.documents.len() * 2).max(64);
        }
        self.documents
            .insert(e.version.as_str().into(), Arc::downgrade(&e));
        e
    }
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
        self.lock().devices.get(fingerprint)?.fresh(self.ttl)
    }

    pub fn put_device_id(&self, t: Ticket, fingerprint: &str, id: Arc<str>) {
        if let Some(mut m) = self.filling() {
            if t.0 >= m.fingerprints_at {
                m.devices.insert(fingerprint.into(), Entry::new(id));
            }
        }
    }

    pub fn settings(&self, id: &str) -> Option<Arc<Effective>> {
        self.lock()
            .per_device
            .get(id)?
            .settings
            .as_ref()?
            .fresh(self.ttl)
    }

    /// Keep `e` for device `id`; returns the copy kept (shared with every
    /// device whose settings have the same version), or `e` itself.
    pub fn put_settings(&self, t: Ticket, id: &str, e: Arc<Effective>) -> Arc<Effective> {
        let Some(mut m) = self.filling_device(t, id) else {
            return e;
        };
        let e = m.intern(e);
        m.device(id).settings = Some(Entry::new(e.clone()));
        e
    }

    pub fn pending(&self, id: &str) -> Option<i64> {
        self.lock()
            .per_device
            .get(id)?
            .pending
            .as_ref()?
            .fresh(self.ttl)
    }

    pub fn put_pending(&self, t: Ticket, id: &str, n: i64) {
        if let Some(mut m) = self.filling_device(t, id) {
            m.device(id).pending = Some(Entry::new(n));
        }
    }

    /// Distinct settings documents held (tests and sizing).
    pub fn documents(&self) -> usize {
        let mut m = self.lock();
        m.documents.retain(|_, w| w.strong_count() > 0);
        m.documents.len()
    }

    /// Drop what `scope` covers, and make fills that started before now
    /// come to nothing.
    pub fn invalidate(&self, scope: &Scope) {
        let mut m = self.lock();
        m.generation += 1;
        let now = m.generation;
        match scope {
            Scope::Device(id) => {
                // The entry stays (emptied) to hold the generation.
                *m.device(id) = PerDevice {
                    invalidated_at: now,
                    ..PerDevice::default()
                };
            }
            Scope::AllDevices => {
                m.per_device = HashMap::new();
                m.documents = HashMap::new();
                m.all_at = now;
            }
        }
    }

    /// Drop everything: the data set was replaced (an import can remove
    /// devices or change their certificates), or events may have been
    /// missed.
    pub fn clear(&self) {
        let mut m = self.lock();
        m.generation += 1;
        m.per_device = HashMap::new();
        m.documents = HashMap::new();
        m.devices = HashMap::new();
        (m.all_at, m.fingerprints_at) = (m.generation, m.generation);
    }

    /// The certificate is no longer valid (revoked).
    pub fn forget_fingerprint(&self, fingerprint: &str) {
        let mut m = self.lock();
        m.generation += 1;
        m.devices.remove(fingerprint);
        m.fingerprints_at = m.generation;
    }

    /// The maps, if caching is on.
    fn filling(&self) -> Option<MutexGuard<'_, Maps>> {
        (!self.ttl.is_zero()).then(|| self.lock())
    }

    /// The maps, if a fill of device `id` with ticket `t` may be kept.
    fn filling_device(&self, t: Ticket, id: &str) -> Option<MutexGuard<'_, Maps>> {
        let m = self.filling()?;
        let at = m.per_device.get(id).map_or(0, |d| d.invalidated_at);
        (t.0 >= m.all_at && t.0 >= at).then_some(m)
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
    fn a_fill_is_dropped_only_by_what_covers_it() {
        let c = Cache::new(Duration::from_secs(60));
        // A read of the whole fleet begins; meanwhile one device changes.
        let t = c.ticket();
        c.invalidate(&Scope::Device("d1".into()));
        for (i, id) in ["d1", "d2", "d3"].iter().enumerate() {
            c.put_device_id(t, &format!("fp{i}"), (*id).into());
            c.put_settings(t, id, effective("v"));
            c.put_pending(t, id, 0);
        }
        // Only the changed device's answers are refused.
        assert!(c.settings("d1").is_none() && c.pending("d1").is_none());
        assert!(c.settings("d2").is_some() && c.pending("d3") == Some(0));
        assert_eq!(c.device_id("fp0").as_deref(), Some("d1"));
        // A revocation during the read refuses every certificate of it.
        let t = c.ticket();
        c.forget_fingerprint("fp9");
        c.put_device_id(t, "fp5", "d5".into());
        assert!(c.device_id("fp5").is_none());
        c.put_settings(t, "d5", effective("v"));
        assert!(c.settings("d5").is_some());
    }

    #[test]
    fn devices_with_one_version_share_one_document() {
        let c = Cache::new(Duration::from_secs(60));
        let doc = |v: &str| {
            Arc::new(Effective {
                settings: serde_json::json!({"big": "x".repeat(4096)}),
                version: v.into(),
            })
        };
        for i in 0..1000 {
            let kept = c.put_settings(
                c.ticket(),
                &format!("d{i}"),
                doc(if i % 10 == 0 { "b" } else { "a" }),
            );
            assert_eq!(kept.version, if i % 10 == 0 { "b" } else { "a" });
        }
        // Two documents for a thousand devices, each device pointing at one.
        assert_eq!(c.documents(), 2);
        let (a1, a2) = (c.settings("d1").unwrap(), c.settings("d2").unwrap());
        assert!(Arc::ptr_eq(&a1, &a2));
        assert_eq!(c.settings("d10").unwrap().version, "b");
        // A version nobody uses any more is not kept alive by the index.
        drop((a1, a2));
        for i in (0..1000).filter(|i| i % 10 != 0) {
            c.invalidate(&Scope::Device(format!("d{i}")));
        }
        assert_eq!(c.documents(), 1);
        // A stale fill neither keeps its document nor fails the caller.
        let stale = c.ticket();
        c.invalidate(&Scope::AllDevices);
        assert_eq!(c.put_settings(stale, "d1", doc("c")).version, "c");
        assert!(c.settings("d1").is_none());
        assert_eq!(c.documents(), 0);
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
