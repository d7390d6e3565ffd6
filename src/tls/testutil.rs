//! Test PKI: a CA that issues server and device certificates, and an
//! in-memory handshake between a server and a client config.

use std::io;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::DuplexStream;

pub(crate) struct Pki {
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

pub(crate) struct Leaf {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Leaf {
    pub fn certified(&self) -> Arc<CertifiedKey> {
        Arc::new(
            CertifiedKey::from_der(
                vec![self.cert.clone()],
                self.key.clone_key(),
                &crate::tls::provider(),
            )
            .unwrap(),
        )
    }
}

impl Pki {
    pub fn new(cn: &str) -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = params.self_signed(&ca_key).unwrap();
        Pki { ca, ca_key }
    }

    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.ca.der().clone()
    }

    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    pub fn ca_key_pem(&self) -> String {
        self.ca_key.serialize_pem()
    }

    pub fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der()).unwrap();
        Arc::new(roots)
    }

    pub fn server(&self, name: &str) -> Leaf {
        self.leaf(name, &[name], false)
    }

    pub fn client(&self, cn: &str) -> Leaf {
        self.leaf(cn, &[], true)
    }

    pub fn leaf(&self, cn: &str, sans: &[&str], client: bool) -> Leaf {
        self.leaf_with_serial(cn, sans, client, None)
    }

    pub fn leaf_with_serial(
        &self,
        cn: &str,
        sans: &[&str],
        client: bool,
        serial: Option<u64>,
    ) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        params.serial_number = serial.map(SerialNumber::from);
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        Leaf {
            cert: cert.der().clone(),
            key: PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// A client config trusting `roots`, optionally presenting `cert`.
pub(crate) fn client_config(
    roots: Arc<RootCertStore>,
    cert: Option<&Leaf>,
    alpn: &[&str],
) -> Arc<ClientConfig> {
    let builder = ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match cert {
        Some(leaf) => builder
            .with_client_auth_cert(vec![leaf.cert.clone()], leaf.key.clone_key())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(config)
}

pub(crate) type ServerSide = tokio_rustls::server::TlsStream<DuplexStream>;
pub(crate) type ClientSide = tokio_rustls::client::TlsStream<DuplexStream>;

/// Both ends of one handshake over an in-memory pipe. In TLS 1.3 the
/// client finishes before the server has judged its certificate, so a
/// rejected client shows on the server's side (and on the client's next
/// read).
pub(crate) async fn handshake(
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    name: &str,
) -> (io::Result<ServerSide>, io::Result<ClientSide>) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let name = ServerName::try_from(name.to_string()).unwrap();
    let accept = tokio_rustls::TlsAcceptor::from(server).accept(a);
    let connect = tokio_rustls::TlsConnector::from(client).connect(name, b);
    let (s, c) = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        tokio::join!(accept, connect)
    })
    .await
    .expect("handshake hung");
    (s, c)
}

/// After a handshake, push one byte each way so that a server-side
/// rejection reaches the client too.
pub(crate) async fn exchange(server: &mut ServerSide, client: &mut ClientSide) -> io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    client.write_all(b"?").await?;
    client.flush().await?;
    let mut one = [0u8; 1];
    server.read_exact(&mut one).await?;
    server.write_all(b"!").await?;
    server.flush().await?;
    client.read_exact(&mut one).await?;
    Ok(())
}
