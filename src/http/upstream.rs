//! Connections from the offload proxy to a pool's backends: HTTP/1.1,
//! plain or re-encrypted TLS, kept alive and reused per backend.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::combinators::BoxBody;
use hyper::body::Bytes;
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
                    if let Some(s) = self.take_idle(i) {
                        return Ok((s, true));
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
            if !c.sender.is_closed() && c.sender.is_ready() && c.since.elapsed() < self.idle_timeout
            {
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

    /// Put a connection back once its response has been read in full.
    pub fn give_back(self: &Arc<Self>, index: usize, mut sender: SendRequest<Body>) {
        let this = self.clone();
        tokio::spawn(async move {
            if sender.ready().await.is_err() {
                return;
            }
            let mut idle = this.idle[index].lock().unwrap_or_else(|e| e.into_inner());
            idle.retain(|c| !c.sender.is_closed() && c.since.elapsed() < this.idle_timeout);
            if idle.len() < this.max_idle {
                idle.push(IdleConn {
                    sender,
                    since: Instant::now(),
                });
            }
        });
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
