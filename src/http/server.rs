//! Serving one offloaded connection: the TLS handshake (with the
//! client-certificate policy), then HTTP/1.1 or HTTP/2 by ALPN.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;

use super::{service, ClientCert, ConnInfo, Offload};

pub async fn serve(tcp: TcpStream, peer: SocketAddr, listener: &str, offload: Arc<Offload>) {
    let m = &offload.metrics;
    let acceptor = tokio_rustls::TlsAcceptor::from(offload.tls.clone());
    let tls = match tokio::time::timeout(offload.http.handshake_timeout, acceptor.accept(tcp)).await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let cert_problem = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .is_some_and(|r| {
                    matches!(
                        r,
                        rustls::Error::InvalidCertificate(_)
                            | rustls::Error::NoCertificatesPresented
                    )
                });
            if cert_problem {
                m.certs_rejected.inc();
            }
            m.handshake_failed.inc();
            tracing::debug!(listener, %peer, "TLS handshake failed: {e}");
            return;
        }
        Err(_) => {
            m.handshake_timeout.inc();
            return;
        }
    };
    let (_, session) = tls.get_ref();
    // A resumed session restores the client certificate without running
    // the verifier, so a device revoked since then is caught here.
    if let Some(list) = &offload.revocation {
        if let Err(e) = list.check_peer(session.peer_certificates()) {
            m.certs_rejected.inc();
            m.handshake_failed.inc();
            tracing::info!(listener, %peer, "client certificate refused after handshake: {e}");
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
    let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
    m.handshake_version(
        version,
        alpn.as_deref()
            .map_or("none", |a| std::str::from_utf8(a).unwrap_or("other")),
    );
    let conn = Arc::new(ConnInfo {
        peer,
        listener: listener.to_string(),
        sni: session.server_name().map(str::to_string),
        alpn,
        client_cert,
    });

    let svc_offload = offload.clone();
    let svc = hyper::service::service_fn(move |req| {
        let (o, c) = (svc_offload.clone(), conn.clone());
        async move { Ok::<_, Infallible>(service::handle(o, c, req).await) }
    });
    let http = &offload.http;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(http.header_timeout)
        .max_buf_size(http.max_header_bytes.max(8192))
        .max_headers(http.max_headers)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(http.max_header_bytes as u32)
        .keep_alive_interval(Some(std::time::Duration::from_secs(60)));
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(tls), svc)
        .await
    {
        tracing::debug!(listener, %peer, "HTTP connection ended: {e}");
    }
}
