//! Node leases: how balancers sharing a store learn that one of them is
//! gone. A device row records which balancer holds its command channel
//! (`channel_node`); a balancer killed outright never clears those rows.
//! So each balancer renews a lease (`dev_nodes`) every `lease_renew`, and
//! on the same round expires the others': a node not heard from for
//! `lease` loses its lease and its channel rows, in one transaction. A
//! channel is thus reported for at most `lease + lease_renew` after its
//! balancer died (plus clock skew between balancers, whose clocks stamp
//! the leases).
//!
//! A balancer that was only stalled (paused, cut off from the database)
//! past its lease finds its lease gone at its next renewal and records
//! its channels again. With SQLite (one balancer) the same rounds run: a
//! node renamed in the configuration expires like a dead one.

use std::sync::{Arc, Weak};
use std::time::Duration;

use super::model::now_ms;
use super::service::Devices;

/// Start this node's lease: clear the channel rows left by a previous run
/// under the same name (this process holds none yet), take the lease,
/// then renew it in the background for as long as `devices` lives.
pub(crate) async fn start(devices: &Arc<Devices>) -> tokio::task::JoinHandle<()> {
    let d = devices;
    match d.store.clear_node_channels(d.node.clone()).await {
        Ok(0) => {}
        Ok(n) => {
            tracing::info!(node = %d.node, channels = n, "devices: cleared the channels of this node's previous run")
        }
        Err(e) => tracing::warn!(error = %e, "devices: clearing this node's old channels failed"),
    }
    round(d, true).await;
    let weak = Arc::downgrade(devices);
    let every = devices.config.lease_renew;
    tokio::spawn(renew(weak, every))
}

async fn renew(devices: Weak<Devices>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(d) = devices.upgrade() else { return };
        round(&d, false).await;
    }
}

/// Renew this node's lease, then expire the others'.
async fn round(d: &Devices, first: bool) {
    let lease = d.config.lease.as_millis() as i64;
    let now = now_ms();
    match d.store.renew_node(d.node.clone(), now, lease).await {
        Ok(true) if !first => {
            tracing::warn!(node = %d.node, "devices: this node's lease had lapsed; recording its channels again");
            reassert_channels(d).await;
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "devices: renewing the node lease failed");
            return;
        }
    }
    match d.store.expire_nodes(d.node.clone(), now, lease).await {
        Ok(expired) => {
            for (node, channels) in expired {
                tracing::warn!(node = %node, channels, "devices: node lease expired; its channels are no longer reported");
            }
        }
        Err(e) => tracing::warn!(error = %e, "devices: expiring node leases failed"),
    }
}

/// Another node took this one for dead and cleared its channel rows:
/// record again each channel still held here.
async fn reassert_channels(d: &Devices) {
    for id in d.hub.device_ids() {
        if let Err(e) = d
            .store
            .set_channel(id.to_string(), d.node.clone(), true)
            .await
        {
            tracing::warn!(device = %id, error = %e, "devices: recording the channel failed");
            continue;
        }
        // Closed meanwhile: its own clear may have run before the record.
        if !d.hub.is_connected(&id) {
            let _ = d
                .store
                .set_channel(id.to_string(), d.node.clone(), false)
                .await;
        }
    }
}
