//! TLS to backends (re-encryption): verify the backend against a CA
//! bundle, under the configured name or the backend's IP address, and
//! optionally present the balancer's own client certificate to backends
//! that require mutual TLS.

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::client::ResolvesClientCert;
use rustls::pki_types::ServerName;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, SignatureScheme};

use super::{MinVersion, TlsError};

#[derive(Debug, Clone)]
pub struct UpstreamTlsOptions {
    /// Trust anchors for backend certificates.
    pub ca: Arc<RootCertStore>,
    /// The name backend certificates are checked against (and sent as
    /// SNI). `None`: the backend's IP address, which its certificate then
    /// has to list as an IP subjectAltName.
    pub server_name: Option<String>,
    pub min_version: MinVersion,
    /// The balancer's certificate for backends that ask for one.
    pub client_cert: Option<Arc<CertifiedKey>>,
    /// ALPN offered to backends; empty offers none.
    pub alpn: Vec<String>,
}

impl UpstreamTlsOptions {
    pub fn new(ca: Arc<RootCertStore>) -> Self {
        UpstreamTlsOptions {
            ca,
            server_name: None,
            min_version: MinVersion::Tls12,
            client_cert: None,
            alpn: Vec::new(),
        }
    }
}

/// A ready client config and the name to verify backends under.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    config: Arc<ClientConfig>,
    server_name: Option<ServerName<'static>>,
    /// The CA and client certificates, for the certificate inventory.
    certificates: super::inventory::UsedCerts,
}

impl UpstreamTls {
    /// Record the certificates this config was built from (the
    /// `ClientConfig` does not give them back).
    pub fn with_certificates(mut self, certs: super::inventory::UsedCerts) -> Self {
        self.certificates = certs;
        self
    }

    pub fn certificates(&self) -> &super::inventory::UsedCerts {
        &self.certificates
    }

    pub fn new(opts: &UpstreamTlsOptions) -> Result<Self, TlsError> {
        if opts.ca.is_empty() {
            return Err(TlsError::Config(
                "upstream TLS needs at least one CA certificate to verify backends".into(),
            ));
        }
        let server_name = match &opts.server_name {
            Some(name) => {
                Some(
                    ServerName::try_from(name.clone()).map_err(|e| TlsError::BadName {
                        name: name.clone(),
                        reason: e.to_string(),
                    })?,
                )
            }
            None => None,
        };
        let builder = ClientConfig::builder_with_provider(super::provider())
            .with_protocol_versions(opts.min_version.versions())?
            .with_root_certificates(opts.ca.clone());
        let mut config = match &opts.client_cert {
            Some(key) => builder.with_client_cert_resolver(Arc::new(FixedClientCert(key.clone()))),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = opts.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Ok(UpstreamTls {
            config: Arc::new(config),
            server_name,
            certificates: Default::default(),
        })
    }

    pub fn config(&self) -> &Arc<ClientConfig> {
        &self.config
    }

    /// The name to connect to `backend` under: the configured one, else
    /// the backend's address.
    pub fn server_name(&self, backend: SocketAddr) -> ServerName<'static> {
        self.server_name
            .clone()
            .unwrap_or_else(|| ServerName::IpAddress(backend.ip().into()))
    }

    pub fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.config.clone())
    }
}

/// Always offers the balancer's one certificate.
#[derive(Debug)]
struct FixedClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for FixedClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::tls::server::{build_server_config, ClientAuth, ServerTlsOptions};
    use crate::tls::testutil::Pki;

    /// A loopback backend that terminates with `server` and echoes one
    /// byte; returns its address and the handshake outcome.
    async fn backend(
        server: Arc<rustls::ServerConfig>,
    ) -> (SocketAddr, tokio::task::JoinHandle<Result<(), String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
            let mut tls = tokio_rustls::TlsAcceptor::from(server)
                .accept(tcp)
                .await
                .map_err(|e| e.to_string())?;
            let mut one = [0u8; 1];
            tls.read_exact(&mut one).await.map_err(|e| e.to_string())?;
            tls.write_all(&one).await.map_err(|e| e.to_string())?;
            tls.flush().await.map_err(|e| e.to_string())?;
            Ok(())
        });
        (addr, task)
    }

    async fn connect(upstream: &UpstreamTls, addr: SocketAddr) -> std::io::Result<()> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let tcp = TcpStream::connect(addr).await?;
        let mut tls = upstream
            .connector()
            .connect(upstream.server_name(addr), tcp)
            .await?;
        tls.write_all(b"x").await?;
        tls.flush().await?;
        let mut one = [0u8; 1];
        tls.read_exact(&mut one).await?;
        Ok(())
    }

    #[tokio::test]
    async fn verifies_backend_by_name_override() {
        let pki = Pki::new("Backend CA");
        let leaf = pki.server("backend.internal");
        let server = build_server_config(&ServerTlsOptions::new(leaf.certified())).unwrap();

        let mut opts = UpstreamTlsOptions::new(pki.roots());
        opts.server_name = Some("backend.internal".into());
        let upstream = UpstreamTls::new(&opts).unwrap();
        let (addr, task) = backend(server.clone()).await;
        connect(&upstream, addr).await.unwrap();
        task.await.unwrap().unwrap();

        // Without the override the IP is checked, which the cert lacks.
        let upstream = UpstreamTls::new(&UpstreamTlsOptions::new(pki.roots())).unwrap();
        let (addr, task) = backend(server.clone()).await;
        let err = connect(&upstream, addr).await.unwrap_err();
        assert!(err.to_string().contains("not valid for name"), "{err}");
        let _ = task.await;

        // A backend whose certificate is from another CA.
        let other = Pki::new("Other CA");
        let mut opts = UpstreamTlsOptions::new(other.roots());
        opts.server_name = Some("backend.internal".into());
        let upstream = UpstreamTls::new(&opts).unwrap();
        let (addr, task) = backend(server).await;
        let err = connect(&upstream, addr).await.unwrap_err();
        assert!(err.to_string().contains("UnknownIssuer"), "{err}");
        let _ = task.await;
    }

    #[tokio::test]
    async fn ip_address_backends_verify_by_ip_san() {
        let pki = Pki::new("IP CA");
        let leaf = pki.leaf("ip", &["127.0.0.1"], false);
        let server = build_server_config(&ServerTlsOptions::new(leaf.certified())).unwrap();
        let upstream = UpstreamTls::new(&UpstreamTlsOptions::new(pki.roots())).unwrap();
        let (addr, task) = backend(server).await;
        connect(&upstream, addr).await.unwrap();
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn presents_the_balancer_certificate_to_mtls_backends() {
        let backend_pki = Pki::new("Backend CA");
        let balancer_pki = Pki::new("Balancer CA");
        let leaf = backend_pki.server("api.internal");
        let mut server_opts = ServerTlsOptions::new(leaf.certified());
        server_opts.client_auth = ClientAuth::Required;
        server_opts.client_ca = Some(balancer_pki.roots());
        let server = build_server_config(&server_opts).unwrap();

        let mut opts = UpstreamTlsOptions::new(backend_pki.roots());
        opts.server_name = Some("api.internal".into());
        opts.client_cert = Some(balancer_pki.client("fleetgate").certified());
        let (addr, task) = backend(server.clone()).await;
        connect(&UpstreamTls::new(&opts).unwrap(), addr)
            .await
            .unwrap();
        task.await.unwrap().unwrap();

        // Without it the backend refuses.
        opts.client_cert = None;
        let (addr, task) = backend(server).await;
        let _ = connect(&UpstreamTls::new(&opts).unwrap(), addr).await;
        let err = task.await.unwrap().unwrap_err();
        assert!(err.contains("no certificates"), "{err}");
    }

    #[tokio::test]
    async fn tls13_floor_against_a_tls12_backend() {
        let pki = Pki::new("Floor CA");
        let leaf = pki.server("old.internal");
        let tls12_only = Arc::new(
            rustls::ServerConfig::builder_with_provider(crate::tls::provider())
                .with_protocol_versions(&[&rustls::version::TLS12])
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![leaf.cert.clone()], leaf.key.clone_key())
                .unwrap(),
        );
        let mut opts = UpstreamTlsOptions::new(pki.roots());
        opts.server_name = Some("old.internal".into());
        let (addr, task) = backend(tls12_only.clone()).await;
        connect(&UpstreamTls::new(&opts).unwrap(), addr)
            .await
            .unwrap();
        task.await.unwrap().unwrap();

        opts.min_version = MinVersion::Tls13;
        let (addr, task) = backend(tls12_only).await;
        assert!(connect(&UpstreamTls::new(&opts).unwrap(), addr)
            .await
            .is_err());
        let _ = task.await;
    }

    #[test]
    fn bad_settings_are_reported() {
        let pki = Pki::new("Settings CA");
        let mut opts = UpstreamTlsOptions::new(pki.roots());
        opts.server_name = Some("not a name!".into());
        assert!(matches!(
            UpstreamTls::new(&opts).unwrap_err(),
            TlsError::BadName { .. }
        ));
        let empty = UpstreamTlsOptions::new(Arc::new(RootCertStore::empty()));
        assert!(UpstreamTls::new(&empty).is_err());

        opts.server_name = Some("10.1.2.3".into());
        let upstream = UpstreamTls::new(&opts).unwrap();
        let addr: SocketAddr = "127.0.0.1:443".parse().unwrap();
        assert_eq!(
            upstream.server_name(addr),
            ServerName::try_from("10.1.2.3").unwrap()
        );
    }
}
