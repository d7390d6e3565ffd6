//! Serving one offloaded connection: the TLS handshake (with the
//! client-certificate policy), then HTTP/2 when ALPN chose `h2`, else
//! HTTP/1.1.

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use hyper::body::{Body as _, Bytes, Incoming};
use hyper::header::UPGRADE;
use hyper::server::conn::{http1, http2};
use hyper::{Method, Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Duration, Instant, Sleep};

use arc_swap::ArcSwap;

use super::access::Entry;
use super::activity::{Activity, BodyWatch, ResponseBody};
use super::{service, ClientCert, ConnInfo, Offload};
use crate::tls::refusal::Reason;
use crate::tls::server_stream::ServerStream;

/// A refused handshake, at warn: what an operator looks for when a
/// device cannot connect. Refusals are also an attacker's to send, so the
/// listener lets one line per second through, as for rejected
/// connections. A client that closed before sending a byte (a TCP health
/// check, a port scan) is no device failing to connect: debug only.
fn log_refusal(
    offload: &Offload,
    peer: SocketAddr,
    sni: Option<&str>,
    reason: Reason,
    detail: &dyn std::fmt::Display,
    silent: bool,
) {
    let listener = &*offload.name;
    let sni = sni.unwrap_or("-");
    if silent {
        tracing::debug!(listener, %peer, sni, reason = reason.label(), "TLS handshake refused: {}: {detail}", reason.words());
        return;
    }
    if let Some(held) = offload.metrics.refusal_log.allow() {
        let words = reason.words();
        if held == 0 {
            tracing::warn!(listener, %peer, sni, reason = reason.label(), "TLS handshake refused: {words} ({detail})");
        } else {
            tracing::warn!(listener, %peer, sni, reason = reason.label(), "TLS handshake refused: {words} ({detail}) ({held} refusals suppressed)");
        }
    }
}

/// `slot` holds the listener's current routes: the handshake and the
/// connection's settings come from what it holds at accept, each request
/// is routed with what it holds when the request arrives (a reload's new
/// routes apply to established connections too).
pub async fn serve(tcp: TcpStream, peer: SocketAddr, slot: Arc<ArcSwap<Offload>>) {
    let offload = slot.load_full();
    let listener = &*offload.name;
    let m = &offload.metrics;
    // The handshake state and the stream live on the heap: inline, each
    // would be part of this task's future (sized once, at spawn, for its
    // largest state) for as long as the connection lives.
    let handshake = Box::pin(tokio::time::timeout(
        offload.http.handshake_timeout,
        ServerStream::accept(tcp, offload.tls.clone(), offload.http.hello_max_bytes),
    ));
    let mut tls: Box<Tls> = match handshake.await {
        Ok(Ok(s)) => Box::new(s),
        Ok(Err(refused)) => {
            if refused.reason == Reason::HelloTooLarge {
                m.hello_too_large.inc();
            }
            m.handshake_refused(refused.reason);
            log_refusal(
                &offload,
                peer,
                refused.sni.as_deref(),
                refused.reason,
                &refused.error,
                refused.silent,
            );
            return;
        }
        Err(_) => {
            m.handshake_timeout.inc();
            let elapsed = format!("no handshake within {:?}", offload.http.handshake_timeout);
            log_refusal(&offload, peer, None, Reason::Timeout, &elapsed, false);
            return;
        }
    };
    let session = tls.session();
    // A resumed session restores the client certificate without running
    // the verifier, so a device revoked since then is caught here.
    if let Some(list) = &offload.revocation {
        if let Err(e) = list.check_peer(session.peer_certificates()) {
            let reason = Reason::of_rustls(&e, true);
            m.handshake_refused(reason);
            log_refusal(
                &offload,
                peer,
                tls.server_name(),
                reason,
                &"session resumed after revocation",
                false,
            );
            return;
        }
    }
    m.handshake_ok.inc();
    let client_cert = session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|der| Arc::new(ClientCert::from_der(der.as_ref())));
    if client_cert.is_some() {
        m.certs_verified.inc();
    } else {
        m.certs_none.inc();
    }
    let version = match session.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "1.2",
        _ => "other",
    };
    let alpn = session.alpn_protocol();
    m.handshake_version(version, alpn);
    let h2 = alpn == Some(b"h2");
    let tls_version = match version {
        "1.3" => "TLSv1.3",
        "1.2" => "TLSv1.2",
        _ => "other",
    };
    let tls_cipher = session
        .negotiated_cipher_suite()
        .and_then(|s| s.suite().as_str())
        .unwrap_or("unknown");
    // Everything a connection keeps for its whole life is kept once:
    // the listener's name is shared, the server name moves out of the
    // TLS stream.
    let conn = Arc::new(ConnInfo {
        peer,
        peer_value: super::headers::peer_value(peer.ip()),
        listener: offload.name.clone(),
        sni: tls.take_server_name(),
        h2,
        client_cert,
        tls_version,
        tls_cipher,
    });

    let svc = Svc {
        offload: offload.clone(),
        slot,
        conn,
        activity: (!h2).then(Arc::default),
    };
    let ended = if h2 {
        serve_h2(tls, svc).await
    } else {
        serve_h1(tls, svc).await
    };
    if let Err(e) = ended {
        tracing::debug!(listener, %peer, "HTTP connection ended: {e}");
    }
}

/// HTTP/2, chosen by ALPN (a client that did not offer `h2` gets HTTP/1.1).
/// When the drain starts, GOAWAY: streams in flight finish, then the
/// connection ends.
async fn serve_h2(tls: Box<Tls>, svc: Svc) -> hyper::Result<()> {
    let http = &svc.offload.http;
    let drain = svc.offload.drain.clone();
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(http.max_header_bytes as u32)
        .keep_alive_interval(Some(std::time::Duration::from_secs(60)));
    http.http2.apply(&mut builder);
    let tripped = svc.offload.metrics.h2_control_flood.clone();
    let io = super::h2_guard::Guarded::new(tls, &http.http2, tripped);
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        ended = conn.as_mut() => return ended,
        () = drain.started() => conn.as_mut().graceful_shutdown(),
    }
    conn.await
}

/// HTTP/1.1 with keep-alive. hyper serves requests for as long as they
/// come back to back; once it is waiting for a next request with nothing
/// in progress, it is put away (its buffers freed) and the connection
/// waits for the client's next bytes holding only the TLS session. Bytes
/// hyper had read but not parsed go to the next hyper connection first.
///
/// When the drain starts, an idle connection closes at once and a busy
/// one after its response, which says `Connection: close`.
async fn serve_h1(tls: Box<Tls>, svc: Svc) -> hyper::Result<()> {
    let http = &svc.offload.http;
    let activity = svc.activity.clone().unwrap_or_default();
    let mut io = Io {
        tls,
        unread: Bytes::new(),
        activity: activity.clone(),
    };
    // Registered once for the connection's life, polled while it idles
    // and while hyper serves it; never polled again once it completed.
    let drain = svc.offload.drain.clone();
    let drain_started = drain.started();
    tokio::pin!(drain_started);
    let mut draining = false;
    loop {
        if io.unread.is_empty() && !io.tls.has_buffered_input() {
            if draining {
                return close_for_drain(io).await;
            }
            // The idle keep-alive wait: the header timeout bounds it, as
            // it bounds hyper's own wait for a request.
            let tcp = io.tls.tcp();
            tokio::select! {
                biased;
                ready = tokio::time::timeout(http.header_timeout, tcp.readable()) => match ready {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) | Err(_) => return Ok(()),
                },
                () = drain_started.as_mut() => return close_for_drain(io).await,
            }
        }
        activity.start_cycle();
        // Bytes arrived (or were left over) as the drain started: hyper
        // serves the request they carry, then closes.
        draining = draining || drain.is_started();
        // A builder per hyper connection rather than one for the
        // connection's life: a parked connection then holds none (nor
        // the timer it allocates).
        let mut conn = Box::new(
            h1_builder(http, !draining)
                .serve_connection(TokioIo::new(io), svc.clone())
                .with_upgrades(),
        );
        let mut parking = false;
        // Set when hyper went idle, for the request count it went idle at.
        let mut grace: Option<(Pin<Box<Sleep>>, usize)> = None;
        // The drain started while hyper has this connection: it is shut
        // down gracefully (idle, it closes now; busy, after the response,
        // to which it adds `Connection: close`) once it has begun a
        // request. Before that, hyper would count as idle and close
        // without reading the request the client sent.
        let mut shutdown_due = false;
        poll_fn(|cx| loop {
            if !draining && drain_started.as_mut().poll(cx).is_ready() {
                draining = true;
                shutdown_due = true;
            }
            if shutdown_due && activity.started() > 0 {
                shutdown_due = false;
                Pin::new(&mut *conn).graceful_shutdown();
            }
            match Pin::new(&mut *conn).poll(cx) {
                // A request began during this poll.
                Poll::Pending if shutdown_due && activity.started() > 0 => continue,
                Poll::Pending if !parking && activity.can_park() => {
                    // A busy client sends its next request within a round
                    // trip: putting hyper away at once would free and
                    // rebuild its buffers on every request. So it is put
                    // away only after PARK_AFTER without a next request.
                    let served = activity.started();
                    let deadline = Instant::now() + PARK_AFTER;
                    match &mut grace {
                        Some((sleep, at)) if *at != served => {
                            sleep.as_mut().reset(deadline);
                            *at = served;
                        }
                        Some(_) => {}
                        None => {
                            grace = Some((Box::pin(tokio::time::sleep_until(deadline)), served))
                        }
                    }
                    if let Some((sleep, _)) = &mut grace {
                        if sleep.as_mut().poll(cx).is_pending() {
                            return Poll::Pending;
                        }
                    }
                    // hyper is idle, so this closes it without touching
                    // a message; `Io` keeps the stream open meanwhile.
                    parking = true;
                    activity.set_parking(true);
                    Pin::new(&mut *conn).graceful_shutdown();
                }
                other => return other,
            }
        })
        .await?;
        drop(grace);
        activity.set_parking(false);
        if !parking {
            return Ok(()); // closed by either side
        }
        let Some(parts) = conn.into_parts() else {
            return Ok(()); // upgraded
        };
        io = parts.io.into_inner();
        if !parts.read_buf.is_empty() {
            io.unread = if io.unread.is_empty() {
                parts.read_buf
            } else {
                [parts.read_buf, io.unread].concat().into()
            };
        }
    }
}

/// A keep-alive connection closed by the drain between requests: the
/// client gets a TLS close_notify, so it knows the close was meant.
async fn close_for_drain(io: Io) -> hyper::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut tls = io.tls;
    let _ = tokio::time::timeout(Duration::from_secs(1), tls.shutdown()).await;
    Ok(())
}

type Tls = ServerStream;

fn h1_builder(http: &super::HttpPlan, keep_alive: bool) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(http.header_timeout)
        .max_buf_size(http.max_header_bytes.max(8192))
        .max_headers(http.max_headers)
        .keep_alive(keep_alive);
    builder
}

/// How long hyper stays set up on an HTTP/1 connection after a response
/// before it is put away: longer than a busy client's round trip, short
/// next to the pauses of a device that polls every few seconds.
const PARK_AFTER: Duration = Duration::from_millis(50);

/// The TLS stream as hyper's HTTP/1 connection sees it: bytes left over
/// from the previous hyper connection come first; writes and flushes are
/// tracked for [`Activity::can_park`]; a shutdown while parking only
/// flushes.
struct Io {
    tls: Box<Tls>,
    unread: Bytes,
    activity: Arc<Activity>,
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.unread.is_empty() {
            let n = this.unread.len().min(buf.remaining());
            buf.put_slice(&this.unread.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.activity.wrote();
        Pin::new(&mut this.tls).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.activity.wrote();
        Pin::new(&mut this.tls).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tls.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let flushed = ready!(Pin::new(&mut this.tls).poll_flush(cx));
        if flushed.is_ok() {
            this.activity.flushed();
        }
        Poll::Ready(flushed)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.activity.parking() {
            return self.poll_flush(cx);
        }
        Pin::new(&mut self.get_mut().tls).poll_shutdown(cx)
    }
}

/// The per-connection request handler given to hyper.
#[derive(Clone)]
struct Svc {
    /// What the connection was accepted with: its connection-level
    /// settings (timeouts, HTTP/2 limits) stay.
    offload: Arc<Offload>,
    /// Routes for each request.
    slot: Arc<ArcSwap<Offload>>,
    conn: Arc<ConnInfo>,
    /// HTTP/1 only.
    activity: Option<Arc<Activity>>,
}

impl hyper::service::Service<Request<Incoming>> for Svc {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let mut busy = None;
        let mut watch = BodyWatch::none();
        if let Some(a) = &self.activity {
            busy = Some(a.begin());
            if req.method() == Method::CONNECT || req.headers().contains_key(UPGRADE) {
                // After a 101 the stream is no longer hyper's to give back.
                a.pin();
            } else if !req.body().is_end_stream() {
                watch = a.watch_body();
            }
        }
        let (offload, conn) = (self.slot.load_full(), self.conn.clone());
        let mut entry = Entry::begin(&offload, &conn, &req);
        Box::pin(async move {
            let resp = service::handle(offload, conn, req, watch, &mut entry).await;
            if let Some(e) = &mut entry {
                e.status = resp.status().as_u16();
            }
            Ok(resp.map(|body| ResponseBody::new(body, busy, entry)))
        })
    }
}
