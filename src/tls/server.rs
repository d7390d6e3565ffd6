//! A `rustls::ServerConfig` for terminating TLS, built from plain values
//! that the config layer fills in: certificates chosen by SNI, protocol
//! floor, cipher suites by IANA name, ALPN, session resumption, and
//! client-certificate policy with revocation.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::{
    ClientHello, NoServerSessionStorage, ResolvesServerCert, ServerSessionMemoryCache,
    WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig, SupportedCipherSuite};

use super::revocation::{RevocationList, RevocationVerifier};
use super::v1_client::V1Fallback;
use super::{MinVersion, TlsError};

/// Whether devices present certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientAuth {
    /// No certificate is asked for.
    #[default]
    Off,
    /// Asked for; a device without one is served (the backend sees no
    /// certificate headers), one whose certificate does not verify is
    /// refused at the handshake.
    Optional,
    /// A certificate that verifies is required.
    Required,
}

/// A certificate served to clients that ask for one of `names`.
#[derive(Debug, Clone)]
pub struct SniCert {
    /// Exact names (`api.example.com`) or one-label wildcards
    /// (`*.example.com`, which matches `a.example.com` only).
    pub names: Vec<String>,
    pub key: Arc<CertifiedKey>,
}

impl SniCert {
    /// Selected by the DNS names in the certificate's subjectAltName.
    pub fn from_san(key: Arc<CertifiedKey>) -> Self {
        let names = key
            .end_entity_cert()
            .map(|c| super::certs::dns_names(c))
            .unwrap_or_default();
        SniCert { names, key }
    }
}

/// Everything a terminating listener's TLS needs.
#[derive(Debug, Clone)]
pub struct ServerTlsOptions {
    /// Served when no SNI certificate matches, or the client sends no SNI.
    pub default_cert: Arc<CertifiedKey>,
    pub sni_certs: Vec<SniCert>,
    pub min_version: MinVersion,
    /// IANA names; `None` keeps rustls' defaults (all of ring's suites).
    pub cipher_suites: Option<Vec<String>>,
    /// ALPN protocols in server preference order; empty disables ALPN.
    pub alpn: Vec<String>,
    /// Session tickets and a session-ID cache: devices on metered links
    /// reconnect often, and a resumed handshake saves a round trip and the
    /// certificate bytes.
    pub session_resumption: bool,
    /// Sessions kept in the server-side cache.
    pub session_cache_size: usize,
    pub client_auth: ClientAuth,
    /// Trust anchors for device certificates; needed unless `Off`.
    pub client_ca: Option<Arc<RootCertStore>>,
    /// Consulted on every full handshake when client auth is on; see
    /// [`RevocationList::check_peer`] for resumed sessions.
    pub revocation: Option<RevocationList>,
}

impl ServerTlsOptions {
    pub fn new(default_cert: Arc<CertifiedKey>) -> Self {
        ServerTlsOptions {
            default_cert,
            sni_certs: Vec::new(),
            min_version: MinVersion::Tls12,
            cipher_suites: None,
            alpn: vec!["h2".to_string(), "http/1.1".to_string()],
            session_resumption: true,
            session_cache_size: 4096,
            client_auth: ClientAuth::Off,
            client_ca: None,
            revocation: None,
        }
    }
}

/// Build the server config. Fails on unknown cipher-suite names, a suite
/// list with nothing for the allowed versions, ambiguous SNI names, and
/// client auth without a CA.
pub fn build_server_config(opts: &ServerTlsOptions) -> Result<Arc<ServerConfig>, TlsError> {
    let mut provider = rustls::crypto::ring::default_provider();
    if let Some(names) = &opts.cipher_suites {
        provider.cipher_suites = cipher_suites_by_name(names)?;
        check_suites_cover(&provider, opts.min_version)?;
    }
    let provider = Arc::new(provider);
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(opts.min_version.versions())?;

    let resolver = Arc::new(SniResolver::new(
        opts.default_cert.clone(),
        &opts.sni_certs,
    )?);
    let builder = match opts.client_auth {
        ClientAuth::Off => builder.with_no_client_auth(),
        mode => {
            let roots = opts.client_ca.clone().ok_or_else(|| {
                TlsError::Config(format!(
                    "client authentication `{}` needs a CA bundle for device certificates",
                    if mode == ClientAuth::Required {
                        "required"
                    } else {
                        "optional"
                    }
                ))
            })?;
            let algs = provider.signature_verification_algorithms;
            let mut verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider);
            if mode == ClientAuth::Optional {
                verifier = verifier.allow_unauthenticated();
            }
            // v3 certificates are verified by webpki alone; only those it
            // refuses for their version take the v1 check.
            let verifier = V1Fallback::new(verifier.build()?, &roots, algs);
            match &opts.revocation {
                Some(list) => builder
                    .with_client_cert_verifier(RevocationVerifier::new(verifier, list.clone())),
                None => builder.with_client_cert_verifier(verifier),
            }
        }
    };
    let mut config = builder.with_cert_resolver(resolver);
    config.alpn_protocols = opts.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    // An idle TLS 1.3 connection trades rustls' connection state for its
    // bare record protection (server_stream.rs, records.rs): rustls hands
    // the keys over, the key log the secrets that key updates derive from.
    config.enable_secret_extraction = true;
    config.key_log = Arc::new(crate::tls::records::SecretCapture);
    if opts.session_resumption {
        config.session_storage = ServerSessionMemoryCache::new(opts.session_cache_size.max(1));
        config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    } else {
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    Ok(Arc::new(config))
}

/// Every cipher-suite name the ring provider knows, TLS 1.3 first.
pub fn cipher_suite_names() -> Vec<&'static str> {
    rustls::crypto::ring::ALL_CIPHER_SUITES
        .iter()
        .filter_map(|s| s.suite().as_str())
        .collect()
}

/// Look up suites by IANA name (case-insensitive), keeping the order given.
pub fn cipher_suites_by_name(names: &[String]) -> Result<Vec<SupportedCipherSuite>, TlsError> {
    if names.is_empty() {
        return Err(TlsError::Config(format!(
            "the cipher-suite list is empty; valid names: {}",
            cipher_suite_names().join(", ")
        )));
    }
    names
        .iter()
        .map(|name| {
            rustls::crypto::ring::ALL_CIPHER_SUITES
                .iter()
                .find(|s| {
                    s.suite()
                        .as_str()
                        .is_some_and(|n| n.eq_ignore_ascii_case(name.trim()))
                })
                .copied()
                .ok_or_else(|| TlsError::UnknownCipherSuite {
                    name: name.clone(),
                    valid: cipher_suite_names().join(", "),
                })
        })
        .collect()
}

/// With `min_version = 1.3` a list of only TLS 1.2 suites would fail
/// every handshake; say so at load time.
fn check_suites_cover(provider: &CryptoProvider, min: MinVersion) -> Result<(), TlsError> {
    let has_13 = provider
        .cipher_suites
        .iter()
        .any(|s| matches!(s, SupportedCipherSuite::Tls13(_)));
    if min == MinVersion::Tls13 && !has_13 {
        return Err(TlsError::Config(
            "min_version is TLS 1.3 but no TLS 1.3 cipher suite (TLS13_*) is enabled".into(),
        ));
    }
    Ok(())
}

/// Picks the certificate by SNI: exact name first, then a one-label
/// wildcard, then the default.
#[derive(Debug)]
pub struct SniResolver {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the part after `*.`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

impl SniResolver {
    pub fn new(default: Arc<CertifiedKey>, certs: &[SniCert]) -> Result<Self, TlsError> {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for cert in certs {
            for raw in &cert.names {
                let name = raw.trim().trim_end_matches('.').to_ascii_lowercase();
                let (map, key) = match name.strip_prefix("*.") {
                    Some(parent) => (&mut wildcard, parent.to_string()),
                    None => (&mut exact, name.clone()),
                };
                if key.is_empty() || key.contains('*') || !valid_name(&key) {
                    return Err(TlsError::BadName {
                        name: raw.clone(),
                        reason: "expected a DNS name or `*.` followed by one".into(),
                    });
                }
                if map.insert(key, cert.key.clone()).is_some() {
                    return Err(TlsError::BadName {
                        name: raw.clone(),
                        reason: "listed for two certificates".into(),
                    });
                }
            }
        }
        Ok(SniResolver {
            default,
            exact,
            wildcard,
        })
    }

    /// The certificate for a (lowercase or not) server name.
    pub fn pick(&self, sni: Option<&str>) -> &Arc<CertifiedKey> {
        let Some(sni) = sni else {
            return &self.default;
        };
        let name = sni.trim_end_matches('.').to_ascii_lowercase();
        if let Some(key) = self.exact.get(&name) {
            return key;
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(key) = self.wildcard.get(parent) {
                return key;
            }
        }
        &self.default
    }
}

fn valid_name(name: &str) -> bool {
    name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(client_hello.server_name()).clone())
    }
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::CertificateDer;
    use rustls::HandshakeKind;

    use super::*;
    use crate::tls::testutil::{client_config, exchange, handshake, Pki};

    fn served_cert(conn: &rustls::ClientConnection) -> CertificateDer<'static> {
        conn.peer_certificates().unwrap()[0].clone()
    }

    #[tokio::test]
    async fn serves_the_certificate_matching_sni() {
        let pki = Pki::new("SNI CA");
        let default = pki.server("default.test");
        let api = pki.server("api.example.com");
        let wild = pki.leaf("wild", &["*.devices.example.com"], false);
        let mut opts = ServerTlsOptions::new(default.certified());
        opts.sni_certs = vec![
            SniCert {
                names: vec!["API.example.com".into()],
                key: api.certified(),
            },
            SniCert::from_san(wild.certified()),
        ];
        let server = build_server_config(&opts).unwrap();
        let roots = pki.roots();

        for (name, expect) in [
            ("api.example.com", &api.cert),
            ("d1.devices.example.com", &wild.cert),
            ("default.test", &default.cert),
        ] {
            let client = client_config(roots.clone(), None, &[]);
            let (s, c) = handshake(server.clone(), client, name).await;
            s.unwrap();
            let c = c.unwrap();
            assert_eq!(&served_cert(c.get_ref().1), expect, "{name}");
        }

        let resolver = SniResolver::new(default.certified(), &opts.sni_certs).unwrap();
        let pick = |n| resolver.pick(n).end_entity_cert().unwrap().clone();
        assert_eq!(pick(Some("API.EXAMPLE.COM.")), api.cert);
        assert_eq!(pick(Some("a.b.devices.example.com")), default.cert);
        assert_eq!(pick(Some("devices.example.com")), default.cert);
        assert_eq!(pick(None), default.cert);
    }

    #[test]
    fn ambiguous_or_bad_names_are_rejected() {
        let pki = Pki::new("Names CA");
        let a = pki.server("a.test").certified();
        let twice = [
            SniCert {
                names: vec!["x.test".into()],
                key: a.clone(),
            },
            SniCert {
                names: vec!["X.test".into()],
                key: a.clone(),
            },
        ];
        let err = SniResolver::new(a.clone(), &twice).unwrap_err();
        assert!(err.to_string().contains("two certificates"), "{err}");
        for bad in ["*", "*.", "a.*.test", "bad name", ""] {
            let certs = [SniCert {
                names: vec![bad.into()],
                key: a.clone(),
            }];
            assert!(SniResolver::new(a.clone(), &certs).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn alpn_defaults_to_h2_then_http11() {
        let pki = Pki::new("ALPN CA");
        let leaf = pki.server("alpn.test");
        let server = build_server_config(&ServerTlsOptions::new(leaf.certified())).unwrap();
        let client = client_config(pki.roots(), None, &["http/1.1", "h2"]);
        let (s, c) = handshake(server.clone(), client, "alpn.test").await;
        let s = s.unwrap();
        c.unwrap();
        assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));

        let client = client_config(pki.roots(), None, &["mqtt"]);
        let (s, _) = handshake(server, client, "alpn.test").await;
        assert!(s.is_err(), "no common protocol is refused");
    }

    #[tokio::test]
    async fn tls13_floor_refuses_tls12_clients() {
        let pki = Pki::new("Version CA");
        let leaf = pki.server("v.test");
        let mut opts = ServerTlsOptions::new(leaf.certified());
        opts.min_version = MinVersion::Tls13;
        let server = build_server_config(&opts).unwrap();

        let tls12_client = Arc::new(
            rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                .with_protocol_versions(&[&rustls::version::TLS12])
                .unwrap()
                .with_root_certificates(pki.roots())
                .with_no_client_auth(),
        );
        let (s, c) = handshake(server.clone(), tls12_client.clone(), "v.test").await;
        assert!(s.is_err() && c.is_err());

        let (s, _) = handshake(server, client_config(pki.roots(), None, &[]), "v.test").await;
        let version = s.unwrap().get_ref().1.protocol_version();
        assert_eq!(version, Some(rustls::ProtocolVersion::TLSv1_3));

        // The default floor (1.2) takes the same client.
        let server = build_server_config(&ServerTlsOptions::new(leaf.certified())).unwrap();
        let (s, _) = handshake(server, tls12_client, "v.test").await;
        let version = s.unwrap().get_ref().1.protocol_version();
        assert_eq!(version, Some(rustls::ProtocolVersion::TLSv1_2));
    }

    #[tokio::test]
    async fn cipher_suites_by_iana_name() {
        let pki = Pki::new("Suite CA");
        let leaf = pki.server("s.test");
        let mut opts = ServerTlsOptions::new(leaf.certified());
        opts.cipher_suites = Some(vec![
            "tls13_chacha20_poly1305_sha256".into(),
            "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256".into(),
        ]);
        let server = build_server_config(&opts).unwrap();
        let (s, _) = handshake(server, client_config(pki.roots(), None, &[]), "s.test").await;
        let suite = s.unwrap().get_ref().1.negotiated_cipher_suite().unwrap();
        assert_eq!(
            suite.suite().as_str(),
            Some("TLS13_CHACHA20_POLY1305_SHA256")
        );

        opts.cipher_suites = Some(vec!["TLS_RSA_WITH_RC4_128_MD5".into()]);
        let err = build_server_config(&opts).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, TlsError::UnknownCipherSuite { .. }));
        assert!(
            text.contains("TLS13_AES_128_GCM_SHA256")
                && text.contains("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"),
            "{text}"
        );

        opts.cipher_suites = Some(vec!["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256".into()]);
        opts.min_version = MinVersion::Tls13;
        let err = build_server_config(&opts).unwrap_err();
        assert!(err.to_string().contains("TLS 1.3"), "{err}");
        assert_eq!(cipher_suite_names().len(), 9);
    }

    fn mtls_options(
        pki: &Pki,
        server_leaf: &crate::tls::testutil::Leaf,
        mode: ClientAuth,
    ) -> ServerTlsOptions {
        let mut opts = ServerTlsOptions::new(server_leaf.certified());
        opts.client_auth = mode;
        opts.client_ca = Some(pki.roots());
        opts
    }

    #[tokio::test]
    async fn optional_client_auth() {
        let pki = Pki::new("Device CA");
        let other = Pki::new("Other CA");
        let server_leaf = pki.server("gw.test");
        let server =
            build_server_config(&mtls_options(&pki, &server_leaf, ClientAuth::Optional)).unwrap();

        // Valid certificate: verified and visible to the proxy.
        let device = pki.client("device-1");
        let client = client_config(pki.roots(), Some(&device), &[]);
        let (s, c) = handshake(server.clone(), client, "gw.test").await;
        let (mut s, mut c) = (s.unwrap(), c.unwrap());
        exchange(&mut s, &mut c).await.unwrap();
        let peer = s.get_ref().1.peer_certificates().unwrap();
        assert_eq!(peer[0], device.cert);

        // No certificate: served all the same.
        let client = client_config(pki.roots(), None, &[]);
        let (s, c) = handshake(server.clone(), client, "gw.test").await;
        let (mut s, mut c) = (s.unwrap(), c.unwrap());
        exchange(&mut s, &mut c).await.unwrap();
        assert!(s.get_ref().1.peer_certificates().is_none());

        // A certificate from another CA: refused at the handshake.
        let stranger = other.client("intruder");
        let client = client_config(pki.roots(), Some(&stranger), &[]);
        let (s, c) = handshake(server, client, "gw.test").await;
        let err = s.unwrap_err();
        assert!(err.to_string().contains("UnknownIssuer"), "{err}");
        // The client learns it on its first read.
        if let Ok(mut c) = c {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 1];
            let read = c.read(&mut buf).await;
            assert!(!matches!(read, Ok(n) if n > 0), "{read:?}");
        }
    }

    #[tokio::test]
    async fn required_client_auth() {
        let pki = Pki::new("Device CA");
        let other = Pki::new("Other CA");
        let server_leaf = pki.server("gw.test");
        let server =
            build_server_config(&mtls_options(&pki, &server_leaf, ClientAuth::Required)).unwrap();

        let device = pki.client("device-2");
        let client = client_config(pki.roots(), Some(&device), &[]);
        let (s, c) = handshake(server.clone(), client, "gw.test").await;
        let (mut s, mut c) = (s.unwrap(), c.unwrap());
        exchange(&mut s, &mut c).await.unwrap();

        let client = client_config(pki.roots(), None, &[]);
        let (s, _) = handshake(server.clone(), client, "gw.test").await;
        let err = s.unwrap_err();
        assert!(err.to_string().contains("no certificates"), "{err}");

        let client = client_config(pki.roots(), Some(&other.client("x")), &[]);
        let (s, _) = handshake(server, client, "gw.test").await;
        assert!(s.is_err());
    }

    #[test]
    fn client_auth_without_a_ca_is_a_config_error() {
        let pki = Pki::new("CA");
        let mut opts = ServerTlsOptions::new(pki.server("x.test").certified());
        opts.client_auth = ClientAuth::Required;
        let err = build_server_config(&opts).unwrap_err();
        assert!(err.to_string().contains("CA bundle"), "{err}");
        opts.client_ca = Some(Arc::new(RootCertStore::empty()));
        assert!(matches!(
            build_server_config(&opts).unwrap_err(),
            TlsError::Verifier(_)
        ));
    }

    #[tokio::test]
    async fn revoked_devices_are_refused_and_caught_on_resumption() {
        let pki = Pki::new("Device CA");
        let server_leaf = pki.server("gw.test");
        let list = RevocationList::new();
        let mut opts = mtls_options(&pki, &server_leaf, ClientAuth::Required);
        opts.revocation = Some(list.clone());
        let server = build_server_config(&opts).unwrap();
        let device = pki.client("device-3");
        // One client config, so its session cache carries the ticket.
        let client = client_config(pki.roots(), Some(&device), &[]);

        let (s, c) = handshake(server.clone(), client.clone(), "gw.test").await;
        let (mut s, mut c) = (s.unwrap(), c.unwrap());
        // Reading lets the client take in its session tickets.
        exchange(&mut s, &mut c).await.unwrap();
        assert_eq!(s.get_ref().1.handshake_kind(), Some(HandshakeKind::Full));
        assert!(list.check_peer(s.get_ref().1.peer_certificates()).is_ok());

        list.revoke_fingerprint(crate::tls::forward::sha256(&device.cert));

        // Resumption skips the verifier, and brings the certificate back:
        // the post-handshake check is what catches it.
        let (s, c) = handshake(server.clone(), client.clone(), "gw.test").await;
        let (s, _c) = (s.unwrap(), c.unwrap());
        assert_eq!(s.get_ref().1.handshake_kind(), Some(HandshakeKind::Resumed));
        assert_eq!(
            list.check_peer(s.get_ref().1.peer_certificates()),
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked
            ))
        );

        // A full handshake is refused by the verifier itself.
        let fresh = client_config(pki.roots(), Some(&device), &[]);
        let (s, _) = handshake(server.clone(), fresh, "gw.test").await;
        let err = s.unwrap_err();
        assert!(err.to_string().contains("Revoked"), "{err}");

        // Other devices are unaffected.
        let other = pki.client("device-4");
        let (s, _) = handshake(
            server,
            client_config(pki.roots(), Some(&other), &[]),
            "gw.test",
        )
        .await;
        s.unwrap();
    }

    #[tokio::test]
    async fn resumption_can_be_turned_off() {
        let pki = Pki::new("Resume CA");
        let leaf = pki.server("r.test");
        let mut opts = ServerTlsOptions::new(leaf.certified());
        for (enabled, expect) in [(true, HandshakeKind::Resumed), (false, HandshakeKind::Full)] {
            opts.session_resumption = enabled;
            let server = build_server_config(&opts).unwrap();
            let client = client_config(pki.roots(), None, &[]);
            let (s, c) = handshake(server.clone(), client.clone(), "r.test").await;
            let (mut s, mut c) = (s.unwrap(), c.unwrap());
            exchange(&mut s, &mut c).await.unwrap();
            let (s, _) = handshake(server, client, "r.test").await;
            assert_eq!(s.unwrap().get_ref().1.handshake_kind(), Some(expect));
        }
    }
}
