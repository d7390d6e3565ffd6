//! Upgraded connections (WebSocket): once both sides have switched
//! protocols, bytes flow both ways until either closes or the stream is
//! idle for `upgrade_idle_timeout`.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::{ConnInfo, Offload};
use crate::l4::{relay::relay, PumpEnd};

pub fn spawn_relay(client: OnUpgrade, backend: OnUpgrade, offload: &Offload, conn: &ConnInfo) {
    let idle = offload.http.upgrade_idle_timeout;
    let gauge = offload.metrics.upgraded.clone();
    let counters = offload.bytes.clone();
    let peer = conn.peer;
    tokio::spawn(async move {
        let (client, backend) = match tokio::try_join!(client, backend) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(%peer, "upgrade failed: {e}");
                return;
            }
        };
        gauge.inc();
        let report = relay(TokioIo::new(client), TokioIo::new(backend), idle, &counters).await;
        gauge.dec();
        if let PumpEnd::Error(e) = report.end {
            tracing::debug!(%peer, "upgraded stream ended: {e}");
        }
    });
}
