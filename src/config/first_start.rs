//! Files a configuration needs that do not exist yet: the `cert = "auto"`
//! server certificate and the device CA of `client_ca = "module:NAME"`.
//!
//! Validation only reads. When such files are missing it makes their
//! contents in memory, builds the TLS configs from them, and records them
//! here; `fleetgate check` lists them, and the runtime writes them when it
//! starts, before anything serves with them. The files written are the
//! ones the running TLS configs hold, so nothing is made twice and a later
//! reload reads the same key back.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use crate::module::devices::ca::{self, DeviceCa};
use crate::tls::certs::{self, SelfSigned};

/// What a first start writes, in the order validation met it.
#[derive(Debug, Clone, Default)]
pub struct FirstStart {
    steps: Vec<Step>,
}

#[derive(Clone)]
enum Step {
    /// `cert = "auto"`: a self-signed pair in the data directory.
    AutoCert {
        dir: PathBuf,
        cert: PathBuf,
        key: PathBuf,
        pair: SelfSigned,
    },
    /// The CA of a devices module, in its own directory (mode 0700).
    DeviceCa {
        module: String,
        dir: PathBuf,
        ca: Arc<DeviceCa>,
    },
}

impl std::fmt::Debug for Step {
    /// Paths only: the keys stay out of logs and panics.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::AutoCert { cert, .. } => f.debug_tuple("AutoCert").field(cert).finish(),
            Step::DeviceCa { dir, .. } => f.debug_tuple("DeviceCa").field(dir).finish(),
        }
    }
}

impl FirstStart {
    pub(super) fn auto_cert(&mut self, dir: &Path, cert: &Path, key: &Path, pair: SelfSigned) {
        self.steps.push(Step::AutoCert {
            dir: dir.to_path_buf(),
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            pair,
        });
    }

    pub(super) fn device_ca(&mut self, module: &str, dir: &Path, ca: Arc<DeviceCa>) {
        self.steps.push(Step::DeviceCa {
            module: module.to_string(),
            dir: dir.to_path_buf(),
            ca,
        });
    }

    /// The self-signed pair already planned for `cert`, so that listeners
    /// sharing the data directory share one certificate.
    pub(super) fn planned_auto_cert(&self, path: &Path) -> Option<&SelfSigned> {
        self.steps.iter().find_map(|s| match s {
            Step::AutoCert { cert, pair, .. } if cert == path => Some(pair),
            _ => None,
        })
    }

    /// The CA already planned for the module whose files live in `path`.
    pub(super) fn planned_device_ca(&self, path: &Path) -> Option<&Arc<DeviceCa>> {
        self.steps.iter().find_map(|s| match s {
            Step::DeviceCa { dir, ca, .. } if dir == path => Some(ca),
            _ => None,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// One line per thing to create: its paths and what it is, with the
    /// directories that do not exist yet.
    pub fn describe(&self) -> Vec<String> {
        self.steps
            .iter()
            .map(|s| match s {
                Step::AutoCert { dir, cert, key, .. } => format!(
                    "{}{}, {}: a self-signed server certificate (cert = \"auto\")",
                    missing_dir(dir),
                    cert.display(),
                    key.display(),
                ),
                Step::DeviceCa { module, dir, .. } => {
                    let (cert, key) = ca::paths(dir);
                    format!(
                        "{}{}, {}: the device CA of module {module:?}",
                        missing_dir(dir),
                        cert.display(),
                        key.display()
                    )
                }
            })
            .collect()
    }

    /// Write what is missing. Files that already hold exactly what was
    /// planned are left alone, so this can run again (a start after a
    /// reload's) without making anything twice; files that another
    /// process wrote in the meantime are not overwritten, they are an
    /// error: the TLS configs hold the planned keys, not theirs.
    pub fn create(&self) -> anyhow::Result<()> {
        for step in &self.steps {
            match step {
                Step::AutoCert {
                    dir,
                    cert,
                    key,
                    pair,
                } => {
                    if holds(cert, &pair.cert_pem)? && holds(key, &pair.key_pem)? {
                        continue;
                    }
                    // As before: unless both files exist, both are
                    // (re)made; a pair made since validation is kept.
                    if cert.exists() && key.exists() {
                        anyhow::bail!("{} and {} were created after the configuration was read; start again to use them", cert.display(), key.display());
                    }
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                    certs::write_self_signed(pair, cert, key)?;
                    tracing::warn!(cert = %cert.display(), sha256 = %pair.fingerprint, "created a self-signed server certificate (cert = \"auto\"); replace it with one devices trust");
                }
                Step::DeviceCa { dir, ca, .. } => {
                    let (cert, key) = ca::paths(dir);
                    if holds(&cert, &ca.cert_pem)? && holds(&key, &ca.key_pem)? {
                        continue;
                    }
                    if cert.exists() || key.exists() {
                        anyhow::bail!("{} or {} was created after the configuration was read; start again to use it", cert.display(), key.display());
                    }
                    {
                        use std::os::unix::fs::DirBuilderExt;
                        std::fs::DirBuilder::new()
                            .recursive(true)
                            .mode(0o700)
                            .create(dir)
                            .with_context(|| format!("creating {}", dir.display()))?;
                    }
                    ca.save(dir)?;
                    tracing::info!(path = %cert.display(), "devices: created the device CA");
                }
            }
        }
        Ok(())
    }
}

/// Whether `path` exists and holds exactly `contents`.
fn holds(path: &Path, contents: &str) -> anyhow::Result<bool> {
    match std::fs::read(path) {
        Ok(found) => Ok(found == contents.as_bytes()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// `DIR/ (directory), ` when `dir` does not exist yet.
fn missing_dir(dir: &Path) -> String {
    if dir.exists() {
        String::new()
    } else {
        format!("{}/ (directory), ", dir.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[global]
data_dir = "data"

[[listener]]
name = "a"
bind = "127.0.0.1:1"
mode = "offload"
tls = { cert = "auto", client_auth = "optional", client_ca = "module:devices" }
  [[listener.route]]
  name = "api"
  module = "devices"

[[listener]]
name = "b"
bind = "127.0.0.1:2"
mode = "offload"
tls = { cert = "auto", client_auth = "required", client_ca = "module:devices" }
  [[listener.route]]
  name = "api"
  module = "devices"

[module.devices]
"#;

    fn tree(dir: &Path) -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = walk(dir)
            .into_iter()
            .map(|p| p.strip_prefix(dir).unwrap().to_path_buf())
            .collect();
        found.sort();
        found
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(walk(&p));
            }
            out.push(p);
        }
        out
    }

    #[test]
    fn validation_writes_nothing_and_a_first_start_writes_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.toml");
        std::fs::write(&path, CONFIG).unwrap();
        let plan = crate::config::load(&path).unwrap();
        assert_eq!(tree(dir.path()), [PathBuf::from("f.toml")]);
        // Two listeners on one data directory: one certificate, one CA.
        let lines = plan.first_start.describe();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].contains("server.pem") && lines[1].contains("device-ca.pem"));

        plan.first_start.create().unwrap();
        let data = dir.path().join("data");
        let files = ["server.pem", "server.key", "devices/device-ca.pem"];
        let written: Vec<Vec<u8>> = files
            .iter()
            .map(|f| std::fs::read(data.join(f)).unwrap())
            .collect();
        // Again (a start after a reload's): nothing changes.
        plan.first_start.create().unwrap();
        for (f, w) in files.iter().zip(&written) {
            assert_eq!(&std::fs::read(data.join(f)).unwrap(), w, "{f}");
        }
        // The next validation reads them and plans nothing.
        let next = crate::config::load(&path).unwrap();
        assert!(next.first_start.is_empty(), "{:?}", next.first_start);
    }

    #[test]
    fn files_made_after_validation_are_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.toml");
        std::fs::write(&path, CONFIG).unwrap();
        let plan = crate::config::load(&path).unwrap();
        // Another process got there first.
        let other = crate::config::load(&path).unwrap();
        other.first_start.create().unwrap();
        let server = std::fs::read(dir.path().join("data/server.pem")).unwrap();
        let err = plan.first_start.create().unwrap_err().to_string();
        assert!(err.contains("start again"), "{err}");
        assert_eq!(
            std::fs::read(dir.path().join("data/server.pem")).unwrap(),
            server
        );
    }

    #[test]
    fn a_reload_keeps_the_running_revocation_list() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.toml");
        std::fs::write(&path, CONFIG).unwrap();
        let registry = crate::module::builtin::registry();
        let running = crate::config::load_with(&path, &registry).unwrap();
        let next = crate::config::load_next(&path, &registry, &running).unwrap();
        let fresh = crate::config::load_with(&path, &registry).unwrap();
        running.modules[0].revocations.revoke_serial(&[7]);
        let listener_list = |plan: &crate::config::Plan| match &plan.listeners[1].mode {
            crate::config::ListenerMode::Offload(o) => o.revocation.clone().unwrap(),
            _ => unreachable!(),
        };
        assert_eq!(next.modules[0].revocations.len(), 1);
        assert_eq!(listener_list(&next).len(), 1);
        assert_eq!(listener_list(&running).len(), 1);
        assert_eq!(listener_list(&fresh).len(), 0);
    }
}
