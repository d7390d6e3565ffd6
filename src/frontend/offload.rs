//! TLS offload listeners: the connection is served by `http::server`
//! (handshake, HTTP/1 or HTTP/2, upgrades); this file is where the front
//! door hands it over.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::http::Offload;

/// Serve an offloaded connection in a task of its own, holding `guard`
/// until it ends. The connection reads `slot` again for each request, so
/// that a reload's routes apply to established connections too.
pub fn spawn<G: Send + 'static>(
    client: TcpStream,
    peer: SocketAddr,
    slot: Arc<ArcSwap<Offload>>,
    guard: G,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        crate::http::server::serve(client, peer, slot).await;
        drop(guard);
    })
}
