//! Build the TLS parts of a plan (server and upstream rustls configs)
//! from the file's tables: certificates are loaded and checked at
//! validation time, so `fleetgate check` catches a bad key or CA.
//! Validation writes nothing: a certificate or CA that a first start
//! creates is made in memory here and written by `FirstStart::create`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::{Seg, SemanticError};
use super::schema;
use super::validate::Env;
use crate::module::devices::ca::DeviceCa;
use crate::tls::inventory::{Role, UsedCert, UsedCerts};
use crate::tls::revocation::RevocationList;
use crate::tls::server::{build_server_config, ClientAuth, ServerTlsOptions, SniCert};
use crate::tls::upstream::{UpstreamTls, UpstreamTlsOptions};
use crate::tls::{certs, MinVersion};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

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

/// The server config of an offload listener, the revocation list to
/// check after each handshake when its client CA is a module's, and the
/// certificates it uses (for the certificate inventory).
pub fn server(
    t: &schema::ListenerTls,
    env: &mut Env,
    path: Vec<Seg>,
) -> Result<(Arc<rustls::ServerConfig>, Option<RevocationList>, UsedCerts), SemanticError> {
    let err = |key: &str, e: String| SemanticError::new(at(&path, key), e);
    let mut used = Vec::new();
    let leaf = |role, origin: &str, key: &rustls::sign::CertifiedKey| {
        key.cert.first().map(|der| UsedCert {
            role,
            origin: origin.to_string(),
            der: der.clone(),
        })
    };
    let default = if t.cert == "auto" {
        auto_cert(t, env).map_err(|e| err("cert", e))?
    } else {
        let Some(key) = &t.key else {
            return Err(err(
                "key",
                "`key` is required (or use cert = \"auto\")".into(),
            ));
        };
        certs::load_certified_key(&env.base.join(&t.cert), &env.base.join(key))
            .map_err(|e| err("cert", e.to_string()))?
    };
    let origin = if t.cert == "auto" { "auto" } else { "default" };
    used.extend(leaf(Role::Server, origin, &default));
    let mut opts = ServerTlsOptions::new(default);
    for (j, pair) in t.certificates.iter().enumerate() {
        let key = certs::load_certified_key(&env.base.join(&pair.cert), &env.base.join(&pair.key))
            .map_err(|e| {
                let mut p = at(&path, "certificates");
                p.push(Seg::Index(j));
                SemanticError::new(p, e.to_string())
            })?;
        used.extend(leaf(Role::Server, "sni", &key));
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
    let mut revocation = None;
    match &t.client_ca {
        Some(ca) => {
            let (roots, ca_certs) = match ca.strip_prefix("module:") {
                Some(name) => {
                    let (roots, list, ders) =
                        module_ca(name, env).map_err(|e| err("client_ca", e))?;
                    revocation = Some(list);
                    (roots, ders)
                }
                None => {
                    let file = env.base.join(ca);
                    let roots = certs::load_ca_bundle(&file)
                        .map_err(|e| err("client_ca", e.to_string()))?;
                    // Read again for the inventory: the store keeps
                    // trust anchors, not certificates.
                    let ders = certs::load_certs(&file).unwrap_or_default();
                    (roots, ders)
                }
            };
            used.extend(ca_certs.into_iter().map(|der| UsedCert {
                role: Role::ClientCa,
                origin: ca.clone(),
                der,
            }));
            opts.client_ca = Some(Arc::new(roots));
            opts.revocation = revocation.clone();
        }
        None if opts.client_auth != ClientAuth::Off => {
            return Err(err(
                "client_auth",
                "client_auth \"optional\" or \"required\" needs `client_ca` (a CA bundle, or \"module:NAME\" for a devices module's CA)".into(),
            ));
        }
        None => {}
    }
    let config = build_server_config(&opts).map_err(|e| {
        let key = if !t.ciphers.is_empty() {
            "ciphers"
        } else {
            "cert"
        };
        err(key, e.to_string())
    })?;
    Ok((config, revocation, UsedCerts::new(used)))
}

/// `cert = "auto"`: a self-signed certificate in the data directory, so
/// that a fresh install serves TLS at once. Read when it exists; otherwise
/// made in memory and left for the first start to write.
fn auto_cert(
    t: &schema::ListenerTls,
    env: &mut Env,
) -> Result<Arc<rustls::sign::CertifiedKey>, String> {
    let (cert, key) = auto_cert_paths(env.data_dir);
    if cert.exists() && key.exists() {
        return certs::load_certified_key(&cert, &key).map_err(|e| e.to_string());
    }
    let pair = match env.first_start.planned_auto_cert(&cert) {
        // Another listener already planned it: one certificate for both.
        Some(pair) => pair.clone(),
        None => {
            let pair = certs::self_signed(&t.auto_names).map_err(|e| e.to_string())?;
            env.first_start
                .auto_cert(env.data_dir, &cert, &key, pair.clone());
            pair
        }
    };
    certified_key_from_pem(&pair.cert_pem, &pair.key_pem, &cert, &key)
}

/// Where `cert = "auto"` keeps its pair: one per data directory, shared
/// by every listener that uses it.
pub fn auto_cert_paths(data_dir: &Path) -> (PathBuf, PathBuf) {
    (data_dir.join("server.pem"), data_dir.join("server.key"))
}

fn certified_key_from_pem(
    cert_pem: &str,
    key_pem: &str,
    cert: &Path,
    key: &Path,
) -> Result<Arc<rustls::sign::CertifiedKey>, String> {
    let chain = certs::parse_certs_pem(cert_pem.as_bytes()).map_err(|e| e.to_string())?;
    let der = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| e.to_string())?;
    certs::certified_key(chain, der, cert, key).map_err(|e| e.to_string())
}

/// `client_ca = "module:NAME"`: the device CA of the devices module NAME
/// as trust anchors, and the module's revocation list. The CA is read
/// when it exists; otherwise made in memory and left for the first start
/// to write, before the module starts and would make its own.
fn module_ca(
    name: &str,
    env: &mut Env,
) -> Result<(RootCertStore, RevocationList, Vec<CertificateDer<'static>>), String> {
    let Some(m) = env.modules.iter().find(|m| m.name == name) else {
        return Err(format!(
            "no module named {name:?} (configure it in a [module.{name}] table)"
        ));
    };
    if m.kind != "devices" {
        return Err(format!(
            "module {name:?} is of kind {:?}, which has no device CA",
            m.kind
        ));
    }
    let revocations = m.revocations.clone();
    let dir = env.data_dir.join(name);
    let cert_pem = match env.first_start.planned_device_ca(&dir) {
        Some(ca) => ca.cert_pem.clone(),
        None => match DeviceCa::load(&dir).map_err(|e| format!("{e:#}"))? {
            Some(ca) => ca.cert_pem,
            None => {
                let ca = DeviceCa::generate(name).map_err(|e| format!("{e:#}"))?;
                let pem = ca.cert_pem.clone();
                env.first_start.device_ca(name, &dir, Arc::new(ca));
                pem
            }
        },
    };
    let mut roots = RootCertStore::empty();
    let (file, _) = crate::module::devices::ca::paths(&dir);
    let ders = certs::parse_certs_pem(cert_pem.as_bytes())
        .map_err(|e| format!("{}: {e}", file.display()))?;
    for (i, cert) in ders.iter().cloned().enumerate() {
        roots.add(cert).map_err(|source| {
            crate::tls::TlsError::BadCa {
                path: file.clone(),
                index: i + 1,
                source,
            }
            .to_string()
        })?;
    }
    Ok((roots, revocations, ders))
}

/// The re-encryption config of a pool.
pub fn upstream(
    t: &schema::PoolTls,
    base: &Path,
    path: Vec<Seg>,
) -> Result<UpstreamTls, SemanticError> {
    let err = |key: &str, e: String| SemanticError::new(at(&path, key), e);
    let roots = certs::load_ca_bundle(&base.join(&t.ca)).map_err(|e| err("ca", e.to_string()))?;
    let mut used: Vec<UsedCert> = certs::load_certs(&base.join(&t.ca))
        .unwrap_or_default()
        .into_iter()
        .map(|der| UsedCert {
            role: Role::PoolCa,
            origin: t.ca.clone(),
            der,
        })
        .collect();
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
    if let (Some(key), Some(origin)) = (&opts.client_cert, &t.cert) {
        used.extend(key.cert.first().map(|der| UsedCert {
            role: Role::PoolClient,
            origin: origin.clone(),
            der: der.clone(),
        }));
    }
    let built = UpstreamTls::new(&opts).map_err(|e| {
        let key = if matches!(e, crate::tls::TlsError::BadName { .. }) {
            "server_name"
        } else {
            "ca"
        };
        err(key, e.to_string())
    })?;
    Ok(built.with_certificates(UsedCerts::new(used)))
}

/// The files of `file` to watch for changes: for every listener and pool
/// whose `tls.watch` is on, its certificates, keys and CA bundles (the
/// data directory's pair for `cert = "auto"`; not a module's device CA,
/// which its module owns). Paths as validation reads them.
pub fn watched(file: &schema::File, source: &Path) -> Vec<PathBuf> {
    let base = source.parent().unwrap_or(Path::new("."));
    let data_dir = base.join(&file.global.data_dir);
    let mut files = BTreeSet::new();
    for t in file.listeners.iter().filter_map(|l| l.tls.as_ref()) {
        if !t.watch {
            continue;
        }
        if t.cert == "auto" {
            let (cert, key) = auto_cert_paths(&data_dir);
            files.insert(cert);
            files.insert(key);
        } else {
            files.insert(base.join(&t.cert));
            files.extend(t.key.iter().map(|k| base.join(k)));
        }
        for pair in &t.certificates {
            files.insert(base.join(&pair.cert));
            files.insert(base.join(&pair.key));
        }
        if let Some(ca) = t.client_ca.as_ref().filter(|ca| !ca.starts_with("module:")) {
            files.insert(base.join(ca));
        }
    }
    for t in file.pools.iter().filter_map(|p| p.tls.as_ref()) {
        if t.watch {
            files.insert(base.join(&t.ca));
            files.extend(t.cert.iter().chain(&t.key).map(|f| base.join(f)));
        }
    }
    files.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use crate::tls::certs;

    const CONFIG: &str = r#"
[[listener]]
name = "watched"
bind = "127.0.0.1:1"
mode = "offload"
tls = { cert = "a.pem", key = "a.key", client_auth = "required", client_ca = "a.pem" }
pool = "p"

[[listener]]
name = "not-watched"
bind = "127.0.0.1:2"
mode = "offload"
tls = { cert = "b.pem", key = "b.key", watch = false }
pool = "p"

[[pool]]
name = "p"
backends = [{ address = "127.0.0.1:3" }]
tls = { ca = "a.pem", cert = "c.pem", key = "c.key" }
"#;

    /// The configuration and three self-signed pairs a, b and c.
    fn files(dir: &Path) -> PathBuf {
        for name in ["a", "b", "c"] {
            let pair = certs::self_signed(&[]).unwrap();
            let (cert, key) = (
                dir.join(format!("{name}.pem")),
                dir.join(format!("{name}.key")),
            );
            certs::write_self_signed(&pair, &cert, &key).unwrap();
        }
        let path = dir.join("fleetgate.toml");
        std::fs::write(&path, CONFIG).unwrap();
        path
    }

    #[test]
    fn the_files_of_listeners_and_pools_with_watch_on_are_watched() {
        let dir = tempfile::tempdir().unwrap();
        let plan = crate::config::load(&files(dir.path())).unwrap();
        let want: Vec<PathBuf> = ["a.key", "a.pem", "c.key", "c.pem"]
            .iter()
            .map(|f| dir.path().join(f))
            .collect();
        assert_eq!(plan.origin.watched, want);
    }

    #[test]
    fn a_certificate_reload_reads_the_certificates_again_but_not_the_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let path = files(dir.path());
        let registry = crate::module::builtin::registry();
        let running = crate::config::load_with(&path, &registry).unwrap();
        // An edit in progress: not what a renewal applies.
        std::fs::write(&path, "[[listener]]\nname = ").unwrap();
        let again = crate::config::load_again(&registry, &running).unwrap();
        assert_eq!(again.listeners.len(), 2);
        assert_eq!(&*again.origin.text, CONFIG);

        // The certificate files are read again: a renewed certificate
        // without its key is refused, naming both files.
        std::fs::copy(dir.path().join("b.pem"), dir.path().join("a.pem")).unwrap();
        let e = crate::config::load_again(&registry, &running).unwrap_err();
        assert!(
            e.message.contains("does not match") && e.message.contains("a.pem"),
            "{e}"
        );
    }
}
