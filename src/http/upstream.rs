//! Connections from the offload proxy to a pool's backends: HTTP/1.1,
//! plain or re-encrypted TLS, kept alive and reused per backend.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body_util::combinators::BoxBody;
use hyper::body::{Body as HttpBody, Bytes, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::balance::connect::{self, Unreachable};
use crate::balance::Pool;
pub use crate::tls::upstream::UpstreamTls;

pub type Body = BoxBody<Bytes, hyper::Error>;

struct IdleConn {
    sender: SendRequest<Body>,
    since: Instant,
}

pub struct Upstream {
    pub pool: Arc<Pool>,
    tls: Option<UpstreamTls>,
    /// Idle keep-alive connections, by pool member index.
    idle: Vec<Mutex<Vec<IdleConn>>>,
    max_idle: usize,
    idle_timeout: Duration,
}

/// A connection ready for one request.
pub struct Checkout {
    pub index: usize,
    pub sender: SendRequest<Body>,
    /// Came from the keep-alive pool (it may have been closed by the
    /// backend meanwhile: the caller may retry a safe request once).
    pub reused: bool,
}

impl Upstream {
    pub fn new(
        pool: Arc<Pool>,
        tls: Option<UpstreamTls>,
        max_idle: usize,
        idle_timeout: Duration,
    ) -> Upstream {
        let idle = (0..pool.members.len())
            .map(|_| Mutex::new(Vec::new()))
            .collect();
        Upstream {
            pool,
            tls,
            idle,
            max_idle,
            idle_timeout,
        }
    }

    /// A connection to a backend chosen by the pool, reusing an idle one
    /// when there is one; `fresh` forces a new connection (upgrades, and
    /// the retry after a reused connection turned out dead).
    pub async fn checkout(
        &self,
        client: IpAddr,
        fresh: bool,
        upgrades: bool,
    ) -> Result<Checkout, Unreachable> {
        let (index, (sender, reused)) =
            connect::first_success(&self.pool, client, |i| async move {
                if !fresh {
                    // Given back at the end of a response, a connection is
                    // ready as soon as its task has seen that end too; one
                    // the backend closed meanwhile fails here.
                    while let Some(mut s) = self.take_idle(i) {
                        if s.ready().await.is_ok() {
                            return Ok((s, true));
                        }
                    }
                }
                self.open(i, upgrades).await.map(|s| (s, false))
            })
            .await?;
        Ok(Checkout {
            index,
            sender,
            reused,
        })
    }

    fn take_idle(&self, i: usize) -> Option<SendRequest<Body>> {
        let mut idle = self.idle[i].lock().unwrap_or_else(|e| e.into_inner());
        while let Some(c) = idle.pop() {
            if !c.sender.is_closed() && c.since.elapsed() < self.idle_timeout {
                return Some(c.sender);
            }
        }
        None
    }

    async fn open(&self, i: usize, upgrades: bool) -> Result<SendRequest<Body>, String> {
        let tcp = connect::tcp(&self.pool, i).await?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => handshake(tcp, upgrades).await,
            Some(t) => {
                let name = t.server_name(self.pool.members[i].backend.addr);
                let stream = tokio::time::timeout(
                    self.pool.plan.connect_timeout,
                    t.connector().connect(name, tcp),
                )
                .await
                .map_err(|_| "TLS handshake timed out".to_string())?
                .map_err(|e| format!("TLS handshake: {e}"))?;
                handshake(stream, upgrades).await
            }
        }
    }

    /// Put a connection back; only once its response has been read in
    /// full (see [`PooledBody`]).
    fn give_back(&self, index: usize, sender: SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle[index].lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|c| !c.sender.is_closed() && c.since.elapsed() < self.idle_timeout);
        if idle.len() < self.max_idle {
            idle.push(IdleConn {
                sender,
                since: Instant::now(),
            });
        }
    }
}

/// A backend's response body that puts its connection back into the
/// keep-alive pool when the body has been read to its end, in the task
/// reading it. A body dropped before its end leaves unread bytes on the
/// connection, which is then not reused.
pub struct PooledBody {
    inner: Incoming,
    back: Option<(Arc<Upstream>, usize, SendRequest<Body>)>,
}

impl PooledBody {
    pub fn new(
        inner: Incoming,
        up: Arc<Upstream>,
        index: usize,
        sender: SendRequest<Body>,
    ) -> Self {
        let mut body = PooledBody {
            inner,
            back: Some((up, index, sender)),
        };
        if body.inner.is_end_stream() {
            body.ended();
        }
        body
    }

    fn ended(&mut self) {
        if let Some((up, index, sender)) = self.back.take() {
            up.give_back(index, sender);
        }
    }
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.ended(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.ended(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

async fn handshake<IO>(io: IO, upgrades: bool) -> Result<SendRequest<Body>, String>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("http handshake: {e}"))?;
    tokio::spawn(async move {
        let r = if upgrades {
            conn.with_upgrades().await
        } else {
            conn.await
        };
        if let Err(e) = r {
            tracing::debug!("upstream connection ended: {e}");
        }
    });
    Ok(sender)
}
