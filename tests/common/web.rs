//! Async HTTP pieces for tests: a header-echo backend (plain or TLS), a
//! WebSocket echo backend, and an HTTPS client with optional client cert.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

/// What the echo backend saw: its name, method, path and headers.
#[derive(Debug, serde::Deserialize)]
pub struct Seen {
    pub backend: String,
    pub path: String,
    pub headers: BTreeMap<String, Vec<String>>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|v| v.first())
            .map(String::as_str)
    }
}

async fn echo(
    name: Arc<String>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (k, v) in req.headers() {
        headers
            .entry(k.as_str().to_string())
            .or_default()
            .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
    }
    let path = req.uri().path().to_string();
    let _ = req.into_body().collect().await;
    let body = serde_json::json!({ "backend": *name, "path": path, "headers": headers });
    Ok(Response::new(Full::new(Bytes::from(body.to_string()))))
}

/// Start an HTTP/1.1 backend answering every request with what it saw.
/// With `tls`, it speaks HTTPS with that server config.
pub async fn echo_backend(name: &str, tls: Option<Arc<rustls::ServerConfig>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let name = Arc::new(name.to_string());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let name = name.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| echo(name.clone(), req));
                let builder = hyper::server::conn::http1::Builder::new();
                match tls {
                    None => {
                        let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
                    }
                    Some(cfg) => {
                        if let Ok(s) = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await {
                            let _ = builder.serve_connection(TokioIo::new(s), svc).await;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// A WebSocket server echoing every message; the upgrade request's headers
/// are sent first as a text message (JSON).
pub async fn websocket_backend() -> SocketAddr {
    use tokio_tungstenite::tungstenite::handshake::server::{Request as WsReq, Response as WsResp};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut seen = BTreeMap::new();
                #[allow(clippy::result_large_err)] // the signature tungstenite asks for
                let cb = |req: &WsReq, resp: WsResp| {
                    for (k, v) in req.headers() {
                        seen.insert(
                            k.as_str().to_string(),
                            String::from_utf8_lossy(v.as_bytes()).into_owned(),
                        );
                    }
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, cb).await else {
                    return;
                };
                let hello = serde_json::to_string(&seen).unwrap();
                if ws
                    .send(tokio_tungstenite::tungstenite::Message::text(hello))
                    .await
                    .is_err()
                {
                    return;
                }
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_close() {
                        break;
                    }
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// TLS to `addr` with SNI `name`.
pub async fn tls_connect(
    addr: SocketAddr,
    name: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let sn = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(sn, tcp)
        .await
}

/// One HTTPS/1.1 GET with extra headers; returns (status, body).
pub async fn https_get(
    addr: SocketAddr,
    name: &str,
    config: Arc<rustls::ClientConfig>,
    path: &str,
    extra: &[(&str, &str)],
) -> std::io::Result<(u16, String)> {
    let tls = tls_connect(addr, name, config).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    let mut req = Request::get(path).header("host", name);
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(http_body_util::Empty::<Bytes>::new()).unwrap())
        .await
        .map_err(std::io::Error::other)?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
