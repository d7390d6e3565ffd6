//! Listening sockets: one per connection worker in an SO_REUSEPORT group,
//! with the per-connection options set where accepted sockets inherit
//! them.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};

use crate::config::SocketOptions;

/// Bind a listener's sockets, one per connection worker. With more than
/// one they form an SO_REUSEPORT group: the kernel spreads new connections
/// over the workers, and no worker is woken for a connection another one
/// takes. A port that is taken by a socket without SO_REUSEPORT (another
/// program) still fails the first bind.
pub fn bind_group(
    addr: SocketAddr,
    opts: &SocketOptions,
    workers: usize,
) -> io::Result<Vec<std::net::TcpListener>> {
    let reuse_port = opts.reuse_port || workers > 1;
    let first = bind(addr, opts, reuse_port)?;
    // Port 0 binds an ephemeral port: the rest of the group joins that one.
    let bound = first.local_addr()?;
    let mut group = vec![first];
    for _ in 1..workers {
        group.push(bind(bound, opts, true)?);
    }
    Ok(group)
}

/// Take over a listener's sockets from the process being upgraded: the
/// same sockets with the same queues, so nothing queued is lost and no
/// bind can fail. The options that accepted sockets inherit are set
/// again (the configuration may have changed them); the backlog is the
/// one the sockets were created with. With more workers than sockets, the
/// group grows by SO_REUSEPORT sockets if it has that option; with fewer,
/// every socket is kept (closing one would drop the connections queued
/// on it) and workers take several.
pub fn adopt_group(
    mut group: Vec<std::net::TcpListener>,
    opts: &SocketOptions,
    workers: usize,
) -> io::Result<Vec<std::net::TcpListener>> {
    let first = group
        .first()
        .ok_or_else(|| io::Error::other("no socket was handed over"))?;
    let bound = first.local_addr()?;
    let reuse_port = SockRef::from(first).reuse_port().unwrap_or(false);
    for sock in &group {
        sock.set_nonblocking(true)?;
        #[cfg(target_os = "linux")]
        tune(SockRef::from(sock), opts)?;
    }
    while reuse_port && group.len() < workers {
        group.push(bind(bound, opts, true)?);
    }
    Ok(group)
}

/// Bind one listening socket with the configured options.
fn bind(
    addr: SocketAddr,
    opts: &SocketOptions,
    reuse_port: bool,
) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    #[cfg(not(unix))]
    let _ = reuse_port;
    if addr.is_ipv6() {
        // `[::]` means IPv6 only; bind `0.0.0.0` separately for IPv4.
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    // Linux hands these to every accepted socket, which saves three or
    // four setsockopt calls per connection; elsewhere `tune` sets them.
    #[cfg(target_os = "linux")]
    tune(SockRef::from(&socket), opts)?;
    socket.bind(&addr.into())?;
    socket.listen(opts.backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket.into())
}

/// Per-connection socket options: on the listening socket where accepted
/// sockets inherit them (Linux), on each accepted socket elsewhere.
pub(super) fn tune(sock: SockRef<'_>, opts: &SocketOptions) -> io::Result<()> {
    sock.set_nodelay(opts.nodelay)?;
    if opts.keepalive {
        let ka = TcpKeepalive::new()
            .with_time(Duration::from_secs(60))
            .with_interval(Duration::from_secs(10));
        sock.set_tcp_keepalive(&ka)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    /// An inherited group grows to the worker count (joining the same
    /// port by SO_REUSEPORT) and never shrinks: closing a socket of the
    /// group would drop what is queued on it.
    #[test]
    fn an_adopted_group_grows_but_keeps_every_socket() {
        let opts = SocketOptions {
            reuse_port: false,
            backlog: 16,
            nodelay: true,
            keepalive: false,
        };
        let group = bind_group("127.0.0.1:0".parse().unwrap(), &opts, 2).unwrap();
        let addr = group[0].local_addr().unwrap();
        let queued = std::net::TcpStream::connect(addr).unwrap();
        let grown = adopt_group(group, &opts, 3).unwrap();
        assert_eq!(grown.len(), 3);
        assert!(grown.iter().all(|s| s.local_addr().unwrap() == addr));
        let kept = adopt_group(grown, &opts, 1).unwrap();
        assert_eq!(kept.len(), 3);
        // The connection queued before the adoption is still there, on
        // one of the original sockets.
        let peer = queued.local_addr().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        'found: loop {
            for s in &kept {
                if let Ok((_, p)) = s.accept() {
                    assert_eq!(p, peer);
                    break 'found;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the queued connection is lost"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let single = bind_group("127.0.0.1:0".parse().unwrap(), &opts, 1).unwrap();
        assert_eq!(
            adopt_group(single, &opts, 2).unwrap().len(),
            1,
            "no SO_REUSEPORT: kept as it is"
        );
    }

    /// The accept path relies on accepted sockets inheriting TCP_NODELAY
    /// and the keep-alive settings from the listening socket.
    #[tokio::test]
    async fn accepted_sockets_inherit_the_listener_options() {
        for (nodelay, keepalive) in [(true, true), (false, false)] {
            let opts = SocketOptions {
                reuse_port: false,
                backlog: 16,
                nodelay,
                keepalive,
            };
            let group = bind_group("127.0.0.1:0".parse().unwrap(), &opts, 2).unwrap();
            assert_eq!(group.len(), 2);
            let addr = group[0].local_addr().unwrap();
            assert_eq!(
                group[1].local_addr().unwrap(),
                addr,
                "one port for the group"
            );
            let listeners: Vec<TcpListener> = group
                .into_iter()
                .map(|l| TcpListener::from_std(l).unwrap())
                .collect();
            let _client = TcpStream::connect(addr).await.unwrap();
            // The kernel puts the connection in one of the group's queues.
            let (accepted, _) = tokio::select! {
                r = listeners[0].accept() => r.unwrap(),
                r = listeners[1].accept() => r.unwrap(),
            };
            let sock = SockRef::from(&accepted);
            assert_eq!(sock.nodelay().unwrap(), nodelay);
            assert_eq!(sock.keepalive().unwrap(), keepalive);
            if keepalive {
                assert_eq!(sock.keepalive_time().unwrap(), Duration::from_secs(60));
                assert_eq!(sock.keepalive_interval().unwrap(), Duration::from_secs(10));
            }
        }
    }
}
