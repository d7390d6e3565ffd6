//! The command channel: a WebSocket from the device. The server sends
//! each pending command as `{"type": "command", ...}`; the device answers
//! `{"type": "ack", "id": ..., "status": "ok"|"failed", "result": ...}`
//! and gets `{"type": "acked", "id": ...}` once that is stored. Commands
//! stay pending until acknowledged, so after a reconnect the device gets
//! again whatever it had not acknowledged (devices must treat command ids
//! as idempotency keys).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION,
    UPGRADE,
};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::commands::Ack;
use super::http::{full, ApiError, ApiResult};
use super::hub::ChannelMsg;
use super::model::{now_ms, Command};
use super::service::Devices;
use crate::module::Body;

/// How a command looks on the wire (channel and polling alike).
pub fn command_message(c: &Command) -> Value {
    json!({
        "type": "command",
        "id": c.id,
        "kind": c.kind,
        "payload": c.payload,
        "created_at": c.created_at,
    })
}

#[derive(Deserialize)]
struct Incoming_ {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(flatten)]
    ack: Option<Ack>,
}

fn header_has(req: &Request<Incoming>, name: hyper::header::HeaderName, token: &str) -> bool {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Answer the upgrade request with 101 and run the channel in its own task.
pub fn upgrade(
    devices: Arc<Devices>,
    mut req: Request<Incoming>,
    // Only the id: an idle channel holds this for hours, the whole record
    // (certificate PEM included) would cost a couple of KiB each.
    id: Arc<str>,
) -> ApiResult<Response<Body>> {
    if !header_has(&req, UPGRADE, "websocket") || !header_has(&req, CONNECTION, "upgrade") {
        return Err(ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "this endpoint is a WebSocket (Upgrade: websocket)",
        ));
    }
    if req
        .headers()
        .get(SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        return Err(ApiError::bad_request("Sec-WebSocket-Version must be 13"));
    }
    let Some(key) = req.headers().get(SEC_WEBSOCKET_KEY) else {
        return Err(ApiError::bad_request("Sec-WebSocket-Key is missing"));
    };
    let accept = derive_accept_key(key.as_bytes());
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let config = channel_config(devices.config.max_body);
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(config),
                )
                .await;
                run(devices, id, ws).await;
            }
            Err(e) => tracing::debug!(device = %id, error = %e, "devices: upgrade failed"),
        }
    });
    let mut r = Response::new(full(""));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(
        SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header"),
    );
    Ok(r)
}

/// The channel's WebSocket settings. tungstenite allocates its read buffer
/// up front and keeps it (and its write buffer's largest size) for the
/// connection's life; its defaults (128 KiB each) are for throughput, not
/// for tens of thousands of idle channels. Device messages are small
/// JSON (acks, pongs): a larger frame grows the buffer to its length
/// anyway, and is read in `READ_BUFFER` pieces from the TLS session's
/// plaintext, without a system call each. Writes go out as they are made
/// (every send is flushed at once regardless).
fn channel_config(max_body: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(max_body))
        .max_frame_size(Some(max_body))
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
}

const READ_BUFFER: usize = 512;

type Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

async fn run(devices: Arc<Devices>, id: Arc<str>, mut ws: Ws) {
    let channel = devices.hub.register(&id);
    let id = id.to_string();
    // Recorded beside the channel rather than before it: when thousands of
    // devices reconnect at once these commits queue, and a channel waiting
    // for its turn would hold its connection's handshake buffers (hyper's
    // read buffer is released at the WebSocket's first read) meanwhile.
    // Delivery does not depend on it: pokes reach the local hub directly.
    let recording = {
        let (devices, id) = (devices.clone(), id.clone());
        tokio::spawn(async move {
            let node = devices.node.clone();
            if let Err(e) = devices.store.set_channel(id.clone(), node, true).await {
                tracing::warn!(device = %id, error = %e, "devices: recording the channel failed");
            }
        })
    };
    devices.contacts.record_soon(id.clone(), now_ms());
    tracing::debug!(device = %id, "devices: command channel open");

    let mut sent = HashSet::new();
    let ping_every = devices.config.ws_ping;
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    let mut heard = tokio::time::Instant::now();
    let reason = match deliver(&devices, &id, &mut ws, &mut sent).await {
        Err(r) => r,
        Ok(()) => loop {
            tokio::select! {
                msg = ws.next() => {
                    heard = tokio::time::Instant::now();
                    match msg {
                        Some(Ok(Message::Text(t))) => {
                            let answer = on_text(&devices, &id, t.as_bytes()).await;
                            if ws.send(Message::text(answer.to_string())).await.is_err() {
                                break "send failed".to_string();
                            }
                        }
                        Some(Ok(Message::Pong(_))) => devices.contacts.record_soon(id.clone(), now_ms()),
                        Some(Ok(Message::Ping(_))) | Some(Ok(Message::Frame(_))) => {}
                        Some(Ok(Message::Binary(_))) => {
                            let e = json!({"type": "error", "error": "binary messages are not supported"});
                            if ws.send(Message::text(e.to_string())).await.is_err() {
                                break "send failed".to_string();
                            }
                        }
                        Some(Ok(Message::Close(_))) | None => break "closed by the device".to_string(),
                        Some(Err(e)) => break format!("error: {e}"),
                    }
                }
                m = channel.recv() => match m {
                    ChannelMsg::Poke => {
                        if let Err(r) = deliver(&devices, &id, &mut ws, &mut sent).await {
                            break r;
                        }
                    }
                    ChannelMsg::Close(reason) => {
                        let frame = CloseFrame { code: CloseCode::Policy, reason: reason.clone().into() };
                        let _ = tokio::time::timeout(Duration::from_secs(5), ws.close(Some(frame))).await;
                        break reason;
                    }
                },
                _ = ping.tick() => {
                    // Two intervals without a word (a pong counts): the
                    // peer is gone without a FIN (NAT dropped, power cut).
                    if heard.elapsed() > ping_every * 2 {
                        break "no answer to pings".to_string();
                    }
                    if ws.send(Message::Ping(Default::default())).await.is_err() {
                        break "send failed".to_string();
                    }
                }
            }
        },
    };
    devices.hub.unregister(&id, &channel);
    // Cleared only after it was set, or the stale node would stay.
    let _ = recording.await;
    if let Err(e) = devices
        .store
        .set_channel(id.clone(), devices.node.clone(), false)
        .await
    {
        tracing::warn!(device = %id, error = %e, "devices: clearing the channel failed");
    }
    tracing::debug!(device = %id, reason = %reason, "devices: command channel closed");
}

/// Send the pending commands not yet sent on this connection.
async fn deliver(
    devices: &Devices,
    id: &str,
    ws: &mut Ws,
    sent: &mut HashSet<String>,
) -> Result<(), String> {
    let pending = match devices.store.pending_commands(id.to_string()).await {
        Ok(p) => p,
        Err(e) => {
            // Keep the channel: the next poke or reconnect retries.
            tracing::warn!(device = %id, error = %e, "devices: reading pending commands failed");
            return Ok(());
        }
    };
    // Forget what was acknowledged meanwhile: the set stays small.
    sent.retain(|s| pending.iter().any(|c| &c.id == s));
    for c in pending {
        if sent.contains(&c.id) {
            continue;
        }
        ws.send(Message::text(command_message(&c).to_string()))
            .await
            .map_err(|e| format!("send failed: {e}"))?;
        sent.insert(c.id);
    }
    Ok(())
}

async fn on_text(devices: &Devices, id: &str, text: &[u8]) -> Value {
    let msg: Incoming_ = match serde_json::from_slice(text) {
        Ok(m) => m,
        Err(e) => return json!({"type": "error", "error": format!("invalid JSON: {e}")}),
    };
    match (msg.kind.as_str(), msg.id, msg.ack) {
        ("ack", Some(cid), Some(ack)) => match devices.ack_command(id, &cid, ack).await {
            Ok(c) => json!({"type": "acked", "id": c.id}),
            Err(e) => json!({"type": "error", "id": cid, "error": e.message}),
        },
        ("ack", _, _) => json!({"type": "error", "error": "an ack needs id and status"}),
        (other, _, _) => {
            json!({"type": "error", "error": format!("unknown message type {other:?}")})
        }
    }
}
