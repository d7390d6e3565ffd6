//! Connections from the offload proxy to a pool's backends: HTTP/1.1,
//! plain or re-encrypted TLS, kept alive and reused per backend and per
//! worker thread.
//!
//! Why per thread: a backend connection is a hyper task spawned on the
//! runtime of the worker that opened it. Reused by a request on another
//! worker, every request and response would cross threads (a futex wake
//! each way, and the cache lines of both tasks), which costs as much as
//! the proxying itself. So idle connections wait in a thread-local list
//! and are taken only by requests on their own thread, as nginx keeps its
//! upstream keep-alive cache per worker process.

use std::cell::RefCell;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use http_body_util::combinators::BoxBody;
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::balance::connect::{self, Unreachable};
use crate::balance::Pool;

use super::at_end::{AtEnd, EndHook};
pub use crate::tls::upstream::UpstreamTls;

pub type Body = BoxBody<Bytes, hyper::Error>;

struct IdleConn {
    sender: SendRequest<Body>,
    since: Instant,
}

/// One upstream's idle connections on one thread.
struct ThreadIdle {
    upstream: u64,
    /// Dead once the upstream is dropped (a reload): the entry and its
    /// connections are then dropped by the next look at this thread's list.
    alive: Weak<()>,
    /// By pool member index.
    by_member: Vec<Vec<IdleConn>>,
}

thread_local! {
    /// This thread's idle backend connections, for every upstream.
    static IDLE: RefCell<Vec<ThreadIdle>> = const { RefCell::new(Vec::new()) };
}

static NEXT_UPSTREAM: AtomicU64 = AtomicU64::new(0);

pub struct Upstream {
    pub pool: Arc<Pool>,
    tls: Option<UpstreamTls>,
    /// Tells this thread-local lists in [`IDLE`] apart.
    id: u64,
    alive: Arc<()>,
    /// Per backend and per thread.
    max_idle: usize,
    idle_timeout: Duration,
}

/// A connection ready for one request.
pub struct Checkout {
    pub index: usize,
    pub sender: SendRequest<Body>,
    /// How long it had been idle in the keep-alive pool; `None` for a new
    /// connection. A reused one may have been closed by the backend
    /// meanwhile: the caller may send the request again once.
    pub idled: Option<Duration>,
    /// The thread whose runtime drives the connection: it goes back to
    /// that thread's list only.
    home: ThreadId,
}

impl Upstream {
    pub fn new(
        pool: Arc<Pool>,
        tls: Option<UpstreamTls>,
        max_idle: usize,
        idle_timeout: Duration,
    ) -> Upstream {
        Upstream {
            pool,
            tls,
            id: NEXT_UPSTREAM.fetch_add(1, Ordering::Relaxed),
            alive: Arc::new(()),
            max_idle,
            idle_timeout,
        }
    }

    /// A connection to a backend chosen by the pool, reusing an idle one
    /// when there is one; `fresh` forces a new connection (upgrades, and
    /// the retry after a reused connection turned out dead).
    /// Backends in `exclude` are not chosen (a request's earlier tries).
    pub async fn checkout(
        &self,
        client: IpAddr,
        fresh: bool,
        upgrades: bool,
        exclude: &[usize],
    ) -> Result<Checkout, Unreachable> {
        let pool = &self.pool;
        let (index, (sender, idled)) =
            connect::first_success_excluding(pool, client, exclude, |i| async move {
                if !fresh {
                    // Given back at the end of a response, a connection is
                    // ready as soon as its task has seen that end too; one
                    // the backend closed meanwhile fails here.
                    while let Some((mut s, idled)) = self.take_idle(i) {
                        if s.ready().await.is_ok() {
                            return Ok((s, Some(idled)));
                        }
                    }
                }
                self.open(i, upgrades).await.map(|s| (s, None))
            })
            .await?;
        Ok(Checkout {
            index,
            sender,
            idled,
            home: thread::current().id(),
        })
    }

    /// Runs `f` on this thread's idle lists of this upstream, dropping
    /// the lists of upstreams that no longer exist on the way.
    fn with_idle<R>(&self, f: impl FnOnce(&mut Vec<IdleConn>) -> R, i: usize) -> R {
        IDLE.with_borrow_mut(|lists| {
            lists.retain(|l| l.alive.strong_count() > 0);
            let pos = match lists.iter().position(|l| l.upstream == self.id) {
                Some(p) => p,
                None => {
                    lists.push(ThreadIdle {
                        upstream: self.id,
                        alive: Arc::downgrade(&self.alive),
                        by_member: (0..self.pool.members.len()).map(|_| Vec::new()).collect(),
                    });
                    lists.len() - 1
                }
            };
            f(&mut lists[pos].by_member[i])
        })
    }

    // Dropping a sender inside the borrow is fine: it only wakes its
    // connection task, it never runs it (or this code) in place.
    fn take_idle(&self, i: usize) -> Option<(SendRequest<Body>, Duration)> {
        self.with_idle(
            |idle| {
                while let Some(c) = idle.pop() {
                    let idled = c.since.elapsed();
                    if !c.sender.is_closed() && idled < self.idle_timeout {
                        return Some((c.sender, idled));
                    }
                }
                None
            },
            i,
        )
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
    /// full (see [`PooledBody`]), and only on the thread that drives it.
    fn give_back(&self, index: usize, sender: SendRequest<Body>, home: ThreadId) {
        if sender.is_closed() || thread::current().id() != home {
            return;
        }
        self.with_idle(
            |idle| {
                let now = Instant::now();
                idle.retain(|c| !c.sender.is_closed() && now - c.since < self.idle_timeout);
                if idle.len() < self.max_idle {
                    idle.push(IdleConn { sender, since: now });
                }
            },
            index,
        );
    }
}

/// A backend's response body puts its connection back into the keep-alive
/// pool when it has been read to its end, in the task reading it. A body
/// dropped before its end leaves unread bytes on the connection, which is
/// then not reused.
pub type PooledBody = AtEnd<GiveBack>;

pub struct GiveBack(Option<(Arc<Upstream>, Checkout)>);

impl GiveBack {
    pub fn new(up: Arc<Upstream>, checkout: Checkout) -> Self {
        GiveBack(Some((up, checkout)))
    }
}

impl EndHook for GiveBack {
    fn ended(&mut self) {
        if let Some((up, c)) = self.0.take() {
            up.give_back(c.index, c.sender, c.home);
        }
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
