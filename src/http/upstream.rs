//! Connections from the offload proxy to a pool's backends: HTTP/1.1,
//! plain or re-encrypted TLS, kept alive and reused per backend and per
//! worker thread (the idle lists belong to each backend: see
//! `balance::keepalive`).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::thread::{self, ThreadId};
use std::time::Duration;

use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::balance::connect::{self, Unreachable};
use crate::balance::{Backend, MemberSet, PassivePolicy, Pool};

use super::at_end::{AtEnd, EndHook};
pub use crate::balance::keepalive::Body;
pub use crate::tls::upstream::UpstreamTls;

/// A pool as one offload listener reaches it: the pool (live: it follows
/// discovery and reloads) and this listener's keep-alive settings.
pub struct Upstream {
    pub pool: Arc<Pool>,
    /// Per backend and per thread.
    max_idle: usize,
    idle_timeout: Duration,
}

/// A connection ready for one request.
pub struct Checkout {
    pub backend: Arc<Backend>,
    pub sender: SendRequest<Body>,
    /// How long it had been idle in the keep-alive pool; `None` for a new
    /// connection. A reused one may have been closed by the backend
    /// meanwhile: the caller may send the request again once.
    pub idled: Option<Duration>,
    /// Backends that could take the request again, this one included.
    pub eligible: usize,
    pub policy: PassivePolicy,
    /// Backends tried to get this connection (1 when the first worked).
    pub attempts: u32,
    /// The thread whose runtime drives the connection: it goes back to
    /// that thread's list only.
    home: ThreadId,
}

impl Upstream {
    pub fn new(pool: Arc<Pool>, max_idle: usize, idle_timeout: Duration) -> Upstream {
        Upstream {
            pool,
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
        exclude: &[SocketAddr],
    ) -> Result<Checkout, Unreachable> {
        // The member set as it is now; a change published meanwhile
        // applies to the next request.
        let set = self.pool.members();
        let set = &*set;
        let mut attempts = 0;
        let (backend, (sender, idled)) =
            connect::first_success_excluding(set, client, exclude, |b| {
                attempts += 1;
                async move {
                    if !fresh {
                        // Given back at the end of a response, a connection is
                        // ready as soon as its task has seen that end too; one
                        // the backend closed meanwhile fails here.
                        while let Some((mut s, idled)) = b.keepalive.take(self.idle_timeout) {
                            if s.ready().await.is_ok() {
                                return Ok((s, Some(idled)));
                            }
                        }
                    }
                    self.open(set, &b, upgrades).await.map(|s| (s, None))
                }
            })
            .await?;
        Ok(Checkout {
            backend,
            sender,
            idled,
            eligible: set.eligible(),
            policy: set.passive_policy(),
            attempts,
            home: thread::current().id(),
        })
    }

    async fn open(
        &self,
        set: &MemberSet,
        backend: &Backend,
        upgrades: bool,
    ) -> Result<SendRequest<Body>, String> {
        let tcp = connect::tcp(set, backend).await?;
        let _ = tcp.set_nodelay(true);
        match &set.plan.tls {
            None => handshake(tcp, upgrades).await,
            Some(t) => {
                let name = t.server_name(backend.addr);
                let stream = tokio::time::timeout(
                    set.plan.connect_timeout,
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
    /// full (see [`PooledBody`]), only on the thread that drives it, and
    /// only while its backend is in rotation.
    fn give_back(&self, c: Checkout) {
        if thread::current().id() != c.home || !c.backend.in_rotation() {
            return;
        }
        c.backend
            .keepalive
            .put(c.sender, self.max_idle, self.idle_timeout);
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
            up.give_back(c);
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
