//! The command channel: a WebSocket from the device. The server sends
//! each pending command as `{"type": "command", ...}`; the device answers
//! `{"type": "ack", "id": ..., "status": "ok"|"failed", "result": ...}`
//! and gets `{"type": "acked", "id": ...}` once that is stored. Commands
//! stay pending until acknowledged, so after a reconnect the device gets
//! again whatever it had not acknowledged (devices must treat command ids
//! as idempotency keys).
//!
//! Tens of thousands of channels sit idle for hours, so what one holds
//! while idle is kept small: after `PARK_AFTER` without traffic the
//! channel is parked, dropping tungstenite's state (buffers, wakers) and
//! keeping only the stream behind a [`FrameGate`] (see park.rs); the
//! device's next bytes, a poke or the ping timer rebuild it. The task
//! waits on one timer, and what is needed only briefly (reading the
//! pending commands, storing an ack) is boxed rather than sized into the
//! task for its whole life.

use std::collections::HashSet;
use std::future::poll_fn;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION,
    UPGRADE,
};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::commands::Ack;
use super::http::{full, ApiError, ApiResult};
use super::hub::{Channel, ChannelMsg};
use super::model::{now_ms, Command};
use super::park::FrameGate;
use super::service::Devices;
use crate::module::{Body, BoxFuture};

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
    tokio::spawn(run(devices, on_upgrade, id));
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
/// when it is set up (and keeps it, and its write buffer's largest size,
/// until it is dropped); its defaults (128 KiB each) are for throughput,
/// not for tens of thousands of channels. Device messages are small JSON
/// (acks, pongs): a larger frame makes the buffer reserve its full length
/// anyway, and is read in `READ_BUFFER` pieces from the TLS session's
/// plaintext, without a system call each. Commands sent together are
/// written out together up to `WRITE_BUFFER` (then flushed).
fn channel_config(max_body: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(max_body))
        .max_frame_size(Some(max_body))
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
}

const READ_BUFFER: usize = 512;
const WRITE_BUFFER: usize = 4096;

/// How long a channel stays set up after its last traffic before it is
/// parked: longer than a device's round trip (its pong after our ping,
/// its acks after a burst of commands), short next to the ping interval.
const PARK_AFTER: Duration = Duration::from_secs(1);

type Io = FrameGate<TokioIo<Upgraded>>;
type Ws = WebSocketStream<Io>;

/// The channel's connection: tungstenite over the gate while the channel
/// is busy, the bare gate while it is parked.
enum Conn {
    Open(Box<Ws>),
    Parked(Io),
    /// Only between the two, never seen by an await.
    Switching,
}

impl Conn {
    /// tungstenite, set up again over the gate if the channel was parked.
    fn open(&mut self, max_body: usize) -> &mut Ws {
        if let Conn::Parked(_) = self {
            let Conn::Parked(io) = std::mem::replace(self, Conn::Switching) else {
                unreachable!()
            };
            let config = channel_config(max_body);
            // Async only to hand the task's waker to the stream wrapper,
            // done at once: every later poll registers its own waker
            // before it touches the stream.
            let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config))
                .now_or_never()
                .expect("setting up without a handshake completes at once");
            *self = Conn::Open(Box::new(ws));
        }
        match self {
            Conn::Open(ws) => ws,
            _ => unreachable!("the channel is set up above"),
        }
    }

    /// Park the channel if tungstenite holds nothing: no unread input, no
    /// partial message (the gate knows), nothing unwritten (a pong it owes
    /// the device, say: flushed here, or the channel stays open for now).
    fn park(&mut self) -> bool {
        let Conn::Open(ws) = self else {
            return true;
        };
        if !ws.get_ref().at_rest() || !matches!(ws.flush().now_or_never(), Some(Ok(()))) {
            return false;
        }
        let Conn::Open(ws) = std::mem::replace(self, Conn::Switching) else {
            unreachable!()
        };
        *self = Conn::Parked(ws.into_inner());
        true
    }
}

/// What woke the channel task.
enum Event {
    /// Bytes from the device while parked.
    Input(std::io::Result<()>),
    Message(Option<Result<Message, tokio_tungstenite::tungstenite::Error>>),
    Hub(ChannelMsg),
    Timer,
}

/// Where the store's record of the channel is (`Channel::recorded`).
const RECORDING: u8 = 0;
const RECORDED: u8 = 1;
/// The channel closed while it was being recorded: the recording task
/// clears the record once written.
const CLOSED_EARLY: u8 = 2;
/// Writing the record failed (the database was out of reach): the
/// channel writes it again at its next poke (a resync pokes every channel
/// once the database is back).
const UNRECORDED: u8 = 3;

/// The channel task (spawned at the upgrade).
async fn run(devices: Arc<Devices>, on_upgrade: OnUpgrade, id: Arc<str>) {
    let upgraded = match on_upgrade.await {
        Ok(upgraded) => upgraded,
        Err(e) => {
            tracing::debug!(device = %id, error = %e, "devices: upgrade failed");
            return;
        }
    };
    let channel = devices.hub.register(&id);
    devices.metrics.channels_open.inc();
    // Recorded beside the channel rather than before it: when thousands of
    // devices reconnect at once these commits queue, and a channel waiting
    // for its turn would hold its connection's handshake buffers (hyper's
    // read buffer is released at the channel's first read) meanwhile.
    // Delivery does not depend on it: pokes reach the local hub directly.
    // The record is cleared only after it was written (or the stale node
    // would stay); rather than keep the recording task's handle (its
    // memory stays allocated until awaited), the channel and the task
    // agree through `Channel::recorded` on which of them clears it.
    tokio::spawn(record(devices.clone(), id.clone(), channel.clone()));
    devices.contacts.record_soon(id.to_string(), now_ms());
    tracing::debug!(device = %id, "devices: command channel open");

    let max_body = devices.config.max_body;
    let mut conn = Conn::Parked(FrameGate::new(TokioIo::new(upgraded)));
    let mut sent = HashSet::new();
    let ping_every = devices.config.ws_ping;
    let mut heard = Instant::now();
    let mut next_ping = heard + ping_every;
    // When an open channel is parked, unless there is traffic before.
    let mut park_at = heard + PARK_AFTER;
    // When the drain closes this channel, once it has been told.
    let mut close_at: Option<Instant> = None;
    let timer = tokio::time::sleep_until(next_ping);
    tokio::pin!(timer);
    let reason = match deliver_boxed(&devices, &id, &mut conn, &mut sent).await {
        Err(r) => r,
        Ok(()) => loop {
            let wake = match conn {
                Conn::Open(_) => next_ping.min(park_at),
                _ => next_ping,
            };
            let wake = close_at.map_or(wake, |at| wake.min(at));
            if timer.deadline() != wake {
                timer.as_mut().reset(wake);
            }
            let event = match &mut conn {
                Conn::Open(ws) => tokio::select! {
                    msg = ws.next() => Event::Message(msg),
                    m = channel.recv() => Event::Hub(m),
                    () = &mut timer => Event::Timer,
                },
                Conn::Parked(io) => tokio::select! {
                    r = poll_fn(|cx| io.poll_input(cx)) => Event::Input(r),
                    m = channel.recv() => Event::Hub(m),
                    () = &mut timer => Event::Timer,
                },
                Conn::Switching => unreachable!(),
            };
            match event {
                Event::Input(Ok(())) => {
                    // tungstenite reads it on the next turn.
                    conn.open(max_body);
                    park_at = Instant::now() + PARK_AFTER;
                }
                Event::Input(Err(e)) => break format!("error: {e}"),
                Event::Message(msg) => {
                    heard = Instant::now();
                    park_at = heard + PARK_AFTER;
                    let Conn::Open(ws) = &mut conn else {
                        unreachable!("a message comes from tungstenite")
                    };
                    match msg {
                        Some(Ok(Message::Pong(_))) => {
                            devices.contacts.record_soon(id.to_string(), now_ms())
                        }
                        Some(Ok(Message::Ping(_))) | Some(Ok(Message::Frame(_))) => {}
                        Some(Ok(Message::Close(_))) | None => {
                            break "closed by the device".to_string()
                        }
                        Some(Err(e)) => break format!("error: {e}"),
                        // An ack is stored; after the handover the new
                        // process stores it (the command is sent again
                        // there, ids are idempotency keys).
                        Some(Ok(Message::Text(_))) if !devices.hub.storing() => {
                            closing(&mut conn, max_body, crate::drain::RESTARTING).await;
                            break "the store was handed over (upgrade)".to_string();
                        }
                        Some(Ok(m)) => {
                            if let Err(r) = answer_boxed(&devices, &id, ws, &mut sent, m).await {
                                break r;
                            }
                        }
                    }
                }
                // Delivering reads the store, which the new process has:
                // the device gets its commands there.
                Event::Hub(ChannelMsg::Poke) if !devices.hub.delivering() => {
                    closing(&mut conn, max_body, crate::drain::RESTARTING).await;
                    break "the store was handed over (upgrade)".to_string();
                }
                Event::Hub(ChannelMsg::Poke) => {
                    if channel
                        .recorded
                        .compare_exchange(
                            UNRECORDED,
                            RECORDING,
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        )
                        .is_ok()
                    {
                        tokio::spawn(record(devices.clone(), id.clone(), channel.clone()));
                    }
                    if let Err(r) = deliver_boxed(&devices, &id, &mut conn, &mut sent).await {
                        break r;
                    }
                    park_at = Instant::now() + PARK_AFTER;
                }
                Event::Hub(ChannelMsg::Close(reason)) => {
                    let ws = conn.open(max_body);
                    let frame = CloseFrame {
                        code: CloseCode::Policy,
                        reason: reason.clone().into(),
                    };
                    let _ = Box::pin(tokio::time::timeout(
                        Duration::from_secs(5),
                        ws.close(Some(frame)),
                    ))
                    .await;
                    break reason;
                }
                Event::Hub(ChannelMsg::Drain) => {
                    let delay = crate::drain::random_part(devices.hub.drain_spread());
                    close_at = Some(Instant::now() + delay);
                }
                Event::Timer => {
                    let now = Instant::now();
                    if close_at.is_some_and(|at| now >= at) {
                        closing(&mut conn, max_body, devices.hub.drain_reason()).await;
                        break "going away: the balancer is draining".to_string();
                    }
                    if now >= next_ping {
                        // Two intervals without a word (a pong counts):
                        // the peer is gone without a FIN (NAT dropped,
                        // power cut).
                        if now.duration_since(heard) > ping_every * 2 {
                            break "no answer to pings".to_string();
                        }
                        let ws = conn.open(max_body);
                        if ws.send(Message::Ping(Default::default())).await.is_err() {
                            break "send failed".to_string();
                        }
                        next_ping = now + ping_every;
                        park_at = now + PARK_AFTER;
                    } else if now >= park_at && !conn.park() {
                        // Mid-frame or a write pending: try again later.
                        park_at = now + PARK_AFTER;
                    }
                }
            }
        },
    };
    devices.hub.unregister(&id, &channel);
    devices.hub.unacked_changed(sent.len(), 0);
    devices.metrics.channels_open.dec();
    drop(conn);
    if channel
        .recorded
        .compare_exchange(RECORDING, CLOSED_EARLY, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        clear(&devices, &id).await;
    }
    tracing::debug!(device = %id, reason = %reason, "devices: command channel closed");
}

/// Record the channel in the store (`channel_node`); if it closed
/// meanwhile, clear the record again.
async fn record(devices: Arc<Devices>, id: Arc<str>, channel: Arc<Channel>) {
    let node = devices.node.clone();
    let outcome = match devices.store.set_channel(id.to_string(), node, true).await {
        Ok(()) => RECORDED,
        Err(e) => {
            tracing::warn!(device = %id, error = %e, "devices: recording the channel failed");
            UNRECORDED
        }
    };
    if channel
        .recorded
        .compare_exchange(RECORDING, outcome, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        clear(&devices, &id).await;
    }
}

async fn clear(devices: &Devices, id: &str) {
    let node = devices.node.clone();
    if let Err(e) = devices.store.set_channel(id.to_string(), node, false).await {
        tracing::warn!(device = %id, error = %e, "devices: clearing the channel failed");
    }
}

/// How long the close handshake may take before the channel hangs up.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Close with the drain's code (1001 "going away", 1012 "service
/// restart" after an upgrade) and wait for the device's Close in reply;
/// on the heap, as [`deliver_boxed`], for a moment of the channel's life.
fn closing(conn: &mut Conn, max_body: usize, why: crate::drain::CloseReason) -> BoxFuture<'_, ()> {
    Box::pin(async move {
        let ws = conn.open(max_body);
        let frame = CloseFrame {
            code: CloseCode::from(why.code),
            reason: why.reason.into(),
        };
        let handshake = async {
            ws.close(Some(frame)).await?;
            // The device's Close in reply ends the stream.
            while let Some(m) = ws.next().await {
                m?;
            }
            Ok::<(), tokio_tungstenite::tungstenite::Error>(())
        };
        let _ = tokio::time::timeout(CLOSE_WAIT, handshake).await;
    })
}

/// [`deliver`] and [`answer`] on the heap: built in a plain function, so
/// that no copy of them is sized into the channel task, which lives for
/// hours, for what takes a moment.
fn deliver_boxed<'a>(
    devices: &'a Devices,
    id: &'a str,
    conn: &'a mut Conn,
    sent: &'a mut HashSet<String>,
) -> BoxFuture<'a, Result<(), String>> {
    Box::pin(async move {
        let before = sent.len();
        let r = deliver(devices, id, conn, sent).await;
        devices.hub.unacked_changed(before, sent.len());
        r
    })
}

fn answer_boxed<'a>(
    devices: &'a Devices,
    id: &'a str,
    ws: &'a mut Ws,
    sent: &'a mut HashSet<String>,
    msg: Message,
) -> BoxFuture<'a, Result<(), String>> {
    Box::pin(async move {
        let before = sent.len();
        let r = answer(devices, id, ws, sent, msg).await;
        devices.hub.unacked_changed(before, sent.len());
        r
    })
}

/// Answer a text message (an ack: stored, then confirmed) or a binary one
/// (refused).
async fn answer(
    devices: &Devices,
    id: &str,
    ws: &mut Ws,
    sent: &mut HashSet<String>,
    msg: Message,
) -> Result<(), String> {
    let answer = match msg {
        Message::Text(t) => {
            let answer = on_text(devices, id, t.as_bytes()).await;
            if answer["type"] == "acked" {
                // No longer pending: nothing to remember.
                if let Some(cid) = answer["id"].as_str() {
                    sent.remove(cid);
                    sent.shrink_to_fit();
                }
            }
            answer
        }
        _ => json!({"type": "error", "error": "binary messages are not supported"}),
    };
    ws.send(Message::text(answer.to_string()))
        .await
        .map_err(|_| "send failed".to_string())
}

/// Send the pending commands not yet sent on this connection (setting the
/// channel up only if there is one), all in one flush.
async fn deliver(
    devices: &Devices,
    id: &str,
    conn: &mut Conn,
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
    sent.shrink_to_fit();
    let mut fed = false;
    for c in pending {
        if sent.contains(&c.id) {
            continue;
        }
        let ws = conn.open(devices.config.max_body);
        ws.feed(Message::text(command_message(&c).to_string()))
            .await
            .map_err(|e| format!("send failed: {e}"))?;
        sent.insert(c.id);
        fed = true;
    }
    if fed {
        let ws = conn.open(devices.config.max_body);
        ws.flush().await.map_err(|e| format!("send failed: {e}"))?;
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

#[cfg(test)]
mod tests {
    /// The size of an async fn's future, from the fn alone.
    fn future_size<A, B, C, F>(_: fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A channel task's future is allocated once, at its largest state,
    /// for the channel's whole life: what is used only briefly is boxed
    /// (tungstenite while the channel is parked, reading the pending
    /// commands, answering a message), so it stays well under a KiB
    /// (648 bytes with Rust 1.95; 1.7 KiB before).
    #[test]
    fn the_channel_task_stays_small() {
        let size = future_size(super::run);
        assert!(size <= 800, "the channel task's future is {size} bytes");
    }
}
