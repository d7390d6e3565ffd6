//! Build the TLS parts of a plan (server and upstream rustls configs)
//! from the file's tables: certificates are loaded and checked at
//! validation time, so `fleetgate check` catches a bad key or CA.

use std::path::Path;
use std::sync::Arc;

use super::error::{Seg, SemanticError};
use super::schema;
use crate::tls::server::{build_server_config, ClientAuth, ServerTlsOptions, SniCert};
use crate::tls::upstream::{UpstreamTls, UpstreamTlsOptions};
use crate::tls::{certs, MinVersion};

fn at(path: &[Seg], key: &str) -> Vec<Seg> {
    let mut p = path.to_vec();
    p.push(Seg::Key(key.to_string()));
    p
}

fn min_version(v: &Option<String>, path: &[Seg]) -> Result<MinVersion, SemanticError> {
    match v.as_deref() {
        None | Some("1.2") => Ok(MinVersion::Tls12),
        Some("1.3") => Ok(MinVersion::Tls13),
        Some(other) => Err(SemanticError::new(
            at(path, "min_version"),
            format!("min_version must be \"1.2\" or \"1.3\", got {other:?}"),
        )),
    }
}

/// The server config of an offload listener.
pub fn server(
    t: &schema::ListenerTls,
    base: &Path,
    path: Vec<Seg>,
) -> Result<Arc<rustls::ServerConfig>, SemanticError> {
    let err =
        |key: &str, e: crate::tls::TlsError| SemanticError::new(at(&path, key), e.to_string());
    let default = certs::load_certified_key(&base.join(&t.cert), &base.join(&t.key))
        .map_err(|e| err("cert", e))?;
    let mut opts = ServerTlsOptions::new(default);
    for (j, pair) in t.certificates.iter().enumerate() {
        let key = certs::load_certified_key(&base.join(&pair.cert), &base.join(&pair.key))
            .map_err(|e| {
                let mut p = at(&path, "certificates");
                p.push(Seg::Index(j));
                SemanticError::new(p, e.to_string())
            })?;
        opts.sni_certs.push(SniCert::from_san(key));
    }
    opts.min_version = min_version(&t.min_version, &path)?;
    if !t.ciphers.is_empty() {
        opts.cipher_suites = Some(t.ciphers.clone());
    }
    opts.alpn = t.alpn.clone();
    opts.client_auth = match t.client_auth {
        schema::ClientAuth::Off => ClientAuth::Off,
        schema::ClientAuth::Optional => ClientAuth::Optional,
        schema::ClientAuth::Required => ClientAuth::Required,
    };
    if let Some(ca) = &t.client_ca {
        let roots = certs::load_ca_bundle(&base.join(ca)).map_err(|e| err("client_ca", e))?;
        opts.client_ca = Some(Arc::new(roots));
    } else if opts.client_auth != ClientAuth::Off {
        return Err(SemanticError::new(
            at(&path, "client_auth"),
            "client_auth \"optional\" or \"required\" needs `client_ca` (the CA bundle device certificates chain to)",
        ));
    }
    build_server_config(&opts).map_err(|e| {
        let key = if !t.ciphers.is_empty() {
            "ciphers"
        } else {
            "cert"
        };
        err(key, e)
    })
}

/// The re-encryption config of a pool.
pub fn upstream(
    t: &schema::PoolTls,
    base: &Path,
    path: Vec<Seg>,
) -> Result<UpstreamTls, SemanticError> {
    let err = |key: &str, e: String| SemanticError::new(at(&path, key), e);
    let roots = certs::load_ca_bundle(&base.join(&t.ca)).map_err(|e| err("ca", e.to_string()))?;
    let mut opts = UpstreamTlsOptions::new(Arc::new(roots));
    opts.server_name = t.server_name.clone();
    opts.min_version = min_version(&t.min_version, &path)?;
    opts.client_cert = match (&t.cert, &t.key) {
        (Some(c), Some(k)) => Some(
            certs::load_certified_key(&base.join(c), &base.join(k))
                .map_err(|e| err("cert", e.to_string()))?,
        ),
        (None, None) => None,
        _ => return Err(err("cert", "give both `cert` and `key`, or neither".into())),
    };
    UpstreamTls::new(&opts).map_err(|e| {
        let key = if matches!(e, crate::tls::TlsError::BadName { .. }) {
            "server_name"
        } else {
            "ca"
        };
        err(key, e.to_string())
    })
}
