//! Choosing a backend and reaching it, with retry: shared by the L4 proxy
//! (a TCP connect) and the HTTP upstream (a pooled connection or a new
//! one). A failed attempt counts against the backend (passive health) and
//! the next backend is tried, so a client sees no error while any is up.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;

use super::{Backend, MemberSet};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    /// No backend was eligible at all (every one is down).
    NoBackend,
    /// Backends were tried and every attempt failed.
    AllFailed,
}

/// Try `attempt` on backends chosen from `set` until one succeeds, at
/// most `1 + retries` times.
pub async fn first_success<T, F, Fut>(
    set: &MemberSet,
    client: IpAddr,
    attempt: F,
) -> Result<(Arc<Backend>, T), Unreachable>
where
    F: FnMut(Arc<Backend>) -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    first_success_excluding(set, client, &[], attempt).await
}

/// [`first_success`] among the backends not in `exclude` (those a
/// request already failed on).
pub async fn first_success_excluding<T, F, Fut>(
    set: &MemberSet,
    client: IpAddr,
    exclude: &[SocketAddr],
    mut attempt: F,
) -> Result<(Arc<Backend>, T), Unreachable>
where
    F: FnMut(Arc<Backend>) -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let policy = set.passive_policy();
    let attempts = set.plan.retries as usize + 1 + exclude.len();
    let mut tried: Vec<SocketAddr> = Vec::with_capacity(attempts);
    tried.extend_from_slice(exclude);
    while tried.len() < attempts {
        let Some(backend) = set.pick(client, &tried).cloned() else {
            break;
        };
        tried.push(backend.addr);
        match attempt(backend.clone()).await {
            Ok(v) => return Ok((backend, v)),
            Err(why) if why.starts_with(LOCAL) => {
                // Out of descriptors or memory here: not the backend's
                // fault, and every other backend would fail the same way.
                tracing::debug!(pool = %set.name(), "attempt failed locally: {why}");
                return Err(Unreachable::AllFailed);
            }
            Err(why) => {
                tracing::debug!(pool = %set.name(), backend = %backend.addr, "attempt failed: {why}");
                backend.record_failure(policy);
            }
        }
    }
    Err(if tried.len() == exclude.len() {
        Unreachable::NoBackend
    } else {
        Unreachable::AllFailed
    })
}

/// A TCP connect to `backend` with the pool's timeout, timed into the
/// backend's connect histogram.
pub async fn tcp(set: &MemberSet, backend: &Backend) -> Result<TcpStream, String> {
    let addr = backend.addr;
    let timeout = set.plan.connect_timeout;
    let started = Instant::now();
    match tokio::time::timeout(timeout, connect_stream(addr)).await {
        Ok(Ok(stream)) => {
            backend
                .metrics
                .connect_seconds
                .observe(started.elapsed().as_secs_f64());
            Ok(stream)
        }
        Ok(Err(e)) if crate::shortage::is_shortage(&e) => {
            crate::shortage::note();
            Err(format!("{LOCAL}connect: {e}"))
        }
        Ok(Err(e)) => Err(format!("connect: {e}")),
        Err(_) => Err(format!("connect timed out after {timeout:?}")),
    }
}

/// A non-blocking connect. Unlike `TcpStream::connect`, which asks the
/// socket for its error (`getsockopt(SO_ERROR)`) after every connect, it
/// asks only when the readiness that ended the wait says something went
/// wrong (EPOLLERR or EPOLLHUP): a syscall less on every new connection.
async fn connect_stream(addr: SocketAddr) -> io::Result<TcpStream> {
    let kind = socket2::Type::STREAM;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let kind = kind.nonblocking().cloexec();
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), kind, None)?;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    socket.set_nonblocking(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(socket))?;
    let ready = stream.ready(Interest::WRITABLE).await?;
    if ready.is_error() || ready.is_write_closed() {
        return Err(stream
            .take_error()?
            .unwrap_or_else(|| io::ErrorKind::ConnectionRefused.into()));
    }
    Ok(stream)
}

/// [`tcp`], then `header` (a PROXY protocol header) written before any
/// client byte. A connection that takes no header is a failed attempt
/// like one that does not connect.
pub async fn tcp_with_header(
    set: &MemberSet,
    backend: &Backend,
    header: Option<&[u8]>,
) -> Result<TcpStream, String> {
    let mut stream = tcp(set, backend).await?;
    if let Some(header) = header {
        // A fresh connection's send buffer takes a header at once; the
        // timeout is for a peer that is gone.
        tokio::time::timeout(set.plan.connect_timeout, stream.write_all(header))
            .await
            .map_err(|_| "PROXY header write timed out".to_string())?
            .map_err(|e| format!("PROXY header write: {e}"))?;
    }
    Ok(stream)
}

/// Prefix of an attempt error that is the balancer's own (no descriptor
/// or memory for a socket), which must not count against the backend.
pub const LOCAL: &str = "local: ";
