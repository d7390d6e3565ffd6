//! Upgraded connections: once both sides have switched protocols, bytes
//! flow both ways until either closes or the stream is idle for
//! `upgrade_idle_timeout`. A WebSocket goes through the frame-aware
//! relay, which lets the drain ask both ends to go away; any other
//! protocol is a byte stream that runs until it ends or the drain
//! deadline. Either way the stream counts as open for the drain.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::{access, ws_relay, ConnInfo, Offload};
use crate::l4::{relay::relay, PumpEnd};

pub fn spawn_relay(
    client: OnUpgrade,
    backend: OnUpgrade,
    websocket: bool,
    offload: &Offload,
    conn: &ConnInfo,
    session: access::Slot,
) {
    let idle = offload.http.upgrade_idle_timeout;
    let gauge = offload.metrics.upgraded.clone();
    let counters = offload.bytes.clone();
    let drain = offload.drain.clone();
    // Counted from here, before the HTTP connection that carried the
    // upgrade ends, so that the drain never sees a moment without it.
    let tracked = drain.track();
    let peer = conn.peer;
    tokio::spawn(async move {
        let _tracked = tracked;
        let (client, backend) = match tokio::try_join!(client, backend) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(%peer, "upgrade failed: {e}");
                if let Some(entry) = session {
                    entry.finish(Some((0, 0, "upgrade_failed")));
                }
                return;
            }
        };
        gauge.inc();
        let (client, backend) = (TokioIo::new(client), TokioIo::new(backend));
        let report = if websocket {
            ws_relay::relay(client, backend, idle, &counters, &drain).await
        } else {
            relay(client, backend, idle, &counters).await
        };
        gauge.dec();
        if let Some(entry) = session {
            let (up, down) = (report.upstream_bytes, report.downstream_bytes);
            entry.finish(Some((up, down, report.end.reason())));
        }
        if let PumpEnd::Error(e) = report.end {
            tracing::debug!(%peer, "upgraded stream ended: {e}");
        }
    });
}
