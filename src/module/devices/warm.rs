//! Warming the heartbeat's answers for the whole fleet in one read.
//!
//! A device's first heartbeat on a balancer that has not seen it (after a
//! start, a failover from a lost balancer, a resync, or when its answers
//! expired) needs three answers from the store. When thousands of devices
//! call in together, as they do onto the survivors of a lost balancer,
//! those reads queue behind each other at the store and heartbeats wait
//! for seconds. So each balancer reads what the answers are computed from
//! for every device at once (`Store::hot_state`, a few statements in one
//! snapshot) at start, after a resync, and again at half the cache's
//! lifetime, so that entries are renewed before they expire instead of
//! all expiring together.
//!
//! Correctness is the cache's: the fill uses a ticket taken before the
//! read, so a device changed meanwhile keeps its invalidation (cache.rs).

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::service::Devices;
use super::settings::{self, Effective};
use super::store::StoreResult;

/// Renewals never come closer together than this, whatever the TTL.
const MIN_PERIOD: Duration = Duration::from_secs(1);

impl Devices {
    /// Read the answers' inputs of every device and keep the answers;
    /// returns how many devices were warmed.
    pub async fn warm(&self) -> StoreResult<usize> {
        if self.config.cache_ttl.is_zero() {
            return Ok(0);
        }
        let ticket = self.cache.ticket();
        let state = self.store.hot_state().await?;
        // Most of a fleet shares a handful of input combinations: compute
        // each combination's document once.
        let mut computed: HashMap<String, Arc<Effective>> = HashMap::new();
        for (i, d) in state.devices.iter().enumerate() {
            let key = format!("{:?}\u{0}{}\u{0}{:?}", d.groups, d.settings, d.session_user);
            let e = computed
                .entry(key)
                .or_insert_with(|| Arc::new(settings::effective(&state.inputs(d))))
                .clone();
            self.cache
                .put_device_id(ticket, &d.fingerprint, d.id.as_str().into());
            self.cache.put_settings(ticket, &d.id, e);
            self.cache.put_pending(ticket, &d.id, d.pending);
            if i % 1024 == 1023 {
                // A big fleet must not hold a runtime thread for long.
                tokio::task::yield_now().await;
            }
        }
        Ok(state.devices.len())
    }
}

/// Warm now, then renew every half TTL, until the module is gone.
pub fn spawn(devices: &Arc<Devices>) -> Option<tokio::task::JoinHandle<()>> {
    let ttl = devices.config.cache_ttl;
    if ttl.is_zero() || !devices.config.cache_warm {
        return None;
    }
    let period = (ttl / 2).max(MIN_PERIOD);
    let weak = Arc::downgrade(devices);
    Some(tokio::spawn(async move {
        loop {
            if !warm_once(&weak).await {
                return;
            }
            tokio::time::sleep(period).await;
        }
    }))
}

/// One warm-up, logged; false once the module is gone.
pub async fn warm_once(weak: &Weak<Devices>) -> bool {
    let Some(d) = weak.upgrade() else {
        return false;
    };
    let started = Instant::now();
    match d.warm().await {
        Ok(n) => tracing::debug!(
            module = %d.name,
            devices = n,
            ms = started.elapsed().as_millis() as u64,
            "devices: heartbeat answers warmed"
        ),
        Err(e) => {
            tracing::warn!(module = %d.name, error = %e, "devices: warming the heartbeat answers failed")
        }
    }
    true
}
