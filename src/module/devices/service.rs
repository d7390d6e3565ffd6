//! The devices module's state and start-up: store, CA, admin token, the
//! contact writer, the channel hub, and the task that follows other
//! balancers' events. Domain operations are `impl Devices` blocks in
//! enrol.rs, commands.rs and admin.rs; HTTP lives in api.rs and admin.rs.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::Context;

use super::ca::DeviceCa;
use super::cache::{Cache, Scope};
use super::config::{DevicesConfig, StoreConfig};
use super::files;
use super::heartbeat::ContactWriter;
use super::hub::{Handover, Hub};
use super::model::random_hex;
use super::store::postgres::PgStore;
use super::store::sqlite::SqliteStore;
use super::store::{Store, StoreEvent, StoreResult};
use crate::tls::revocation::RevocationList;

pub const ADMIN_TOKEN_FILE: &str = "admin-token";

/// How long a handover waits for the acks of commands already sent.
const ACK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

pub struct Devices {
    pub name: String,
    pub config: DevicesConfig,
    pub data_dir: PathBuf,
    pub store: Arc<dyn Store>,
    /// Replaced as a whole when an import brings its own CA.
    pub(crate) ca: RwLock<Arc<DeviceCa>>,
    pub(crate) admin_token: String,
    pub(crate) contacts: ContactWriter,
    pub(crate) hub: Hub,
    pub(crate) metrics: super::metrics::DeviceMetrics,
    /// The heartbeat's answers kept in memory (see cache.rs).
    pub(crate) cache: Cache,
    /// Revoked device certificates, for the TLS layer to consult at the
    /// handshake (see `crate::tls::revocation`).
    pub revocations: RevocationList,
    /// The same fingerprints as hex, for `is_revoked` (the list above is
    /// keyed for the handshake, by raw digest of a DER certificate).
    revoked: RwLock<HashSet<String>>,
    /// This balancer's name in `channel_node`.
    pub node: String,
    events_task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Keeps the heartbeat answers warm (warm.rs).
    warm_task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Renews this node's lease (lease.rs).
    lease_task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Devices {
    pub async fn start(
        name: &str,
        config: DevicesConfig,
        data_dir: &Path,
        revocations: RevocationList,
        metrics: &prometheus::Registry,
    ) -> anyhow::Result<Arc<Devices>> {
        let metrics = super::metrics::DeviceMetrics::new(metrics, name)?;
        create_private_dir(data_dir)?;
        let store: Arc<dyn Store> = match &config.store {
            StoreConfig::Sqlite { path } => {
                let path = data_dir.join(path.as_deref().unwrap_or(Path::new("devices.db")));
                let p = path.clone();
                let s = tokio::task::spawn_blocking(move || SqliteStore::open(&p))
                    .await?
                    .with_context(|| format!("opening {}", path.display()))?;
                Arc::new(s)
            }
            StoreConfig::Postgres { url } => Arc::new(
                PgStore::connect(url)
                    .await
                    .context("connecting to PostgreSQL")?,
            ),
        };
        let ca = DeviceCa::load_or_create(data_dir, name)?;
        let admin_token = admin_token(&config, data_dir)?;
        let contacts = ContactWriter::spawn(
            store.clone(),
            config.heartbeat_flush,
            config.heartbeat_batch,
        );
        let node = config.node.clone().unwrap_or_else(hostname);
        let devices = Arc::new(Devices {
            name: name.to_string(),
            data_dir: data_dir.to_path_buf(),
            store,
            ca: RwLock::new(Arc::new(ca)),
            admin_token,
            contacts,
            hub: Hub::default(),
            metrics,
            cache: Cache::new(config.cache_ttl),
            revocations,
            revoked: RwLock::new(HashSet::new()),
            node,
            events_task: std::sync::Mutex::new(None),
            warm_task: std::sync::Mutex::new(None),
            lease_task: std::sync::Mutex::new(None),
            config,
        });
        devices.reload_revocations().await?;
        if let Some(mut rx) = devices.store.subscribe() {
            let weak = Arc::downgrade(&devices);
            let task = tokio::spawn(async move {
                loop {
                    let ev = match rx.recv().await {
                        Ok(ev) => ev,
                        // Missed some: act as if told to resync.
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            StoreEvent::Resync
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    };
                    let Some(d) = weak.upgrade() else { return };
                    let resync = ev == StoreEvent::Resync;
                    d.on_event(ev).await;
                    if resync && d.config.cache_warm {
                        // Everything was dropped: read it back at once
                        // rather than one device at a time.
                        let weak = weak.clone();
                        tokio::spawn(async move { super::warm::warm_once(&weak).await });
                    }
                }
            });
            *devices
                .events_task
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(task);
        }
        *devices.warm_task.lock().unwrap_or_else(|p| p.into_inner()) = super::warm::spawn(&devices);
        let lease = super::lease::start(&devices).await;
        *devices.lease_task.lock().unwrap_or_else(|p| p.into_inner()) = Some(lease);
        tracing::info!(module = name, store = devices.store.kind(), node = %devices.node, "devices: ready");
        Ok(devices)
    }

    pub fn ca(&self) -> Arc<DeviceCa> {
        self.ca.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn set_ca(&self, ca: DeviceCa) {
        *self.ca.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ca);
    }

    /// Whether a certificate with this SHA-256 fingerprint (lowercase hex)
    /// has been revoked: the check the TLS layer can use.
    pub fn is_revoked(&self, fingerprint: &str) -> bool {
        self.revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&fingerprint.to_ascii_lowercase())
    }

    /// Rebuild the revocation list from the store (start, import, resync).
    pub async fn reload_revocations(&self) -> StoreResult<()> {
        let fps = self.store.revoked_fingerprints().await?;
        self.revocations.replace(
            fps.iter().filter_map(|f| decode_fingerprint(f)),
            Vec::<Vec<u8>>::new(),
        );
        *self.revoked.write().unwrap_or_else(|p| p.into_inner()) = fps.into_iter().collect();
        Ok(())
    }

    /// Refuse this certificate from now on and drop its channel.
    pub(crate) fn mark_revoked(&self, device_id: &str, fingerprint: &str) {
        if let Err(e) = self.revocations.revoke_fingerprint_hex(fingerprint) {
            tracing::warn!(device = %device_id, error = %e, "devices: bad fingerprint");
        }
        self.revoked
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(fingerprint.to_string());
        self.cache.forget_fingerprint(fingerprint);
        self.hub.close(device_id, "device revoked");
    }

    /// A change on this balancer was committed: drop the cached answers it
    /// affects before the change is acknowledged, so that the next request
    /// sees it. Other balancers learn it from the store (PostgreSQL sends
    /// `StoreEvent::Changed` in the changing transaction).
    pub(crate) fn changed(&self, scope: Scope) {
        self.cache.invalidate(&scope);
    }

    async fn on_event(&self, ev: StoreEvent) {
        match ev {
            StoreEvent::CommandQueued { device_id } => {
                self.cache.invalidate(&Scope::Device(device_id.clone()));
                self.hub.poke(&device_id);
            }
            StoreEvent::Changed { device_id } => self.cache.invalidate(&match device_id {
                Some(id) => Scope::Device(id),
                None => Scope::AllDevices,
            }),
            StoreEvent::DeviceRevoked {
                device_id,
                fingerprint,
            } => self.mark_revoked(&device_id, &fingerprint),
            StoreEvent::Resync => {
                self.cache.clear();
                if let Err(e) = self.reload_revocations().await {
                    tracing::warn!(error = %e, "devices: reloading revocations failed");
                }
                self.hub.poke_all();
            }
        }
    }

    /// Tell the other balancers; failure only delays them until their
    /// next resync, so it is logged, not returned.
    pub(crate) async fn publish(&self, ev: StoreEvent) {
        if let Err(e) = self.store.publish(ev).await {
            tracing::warn!(error = %e, "devices: notifying other balancers failed");
        }
    }

    /// A binary upgrade hands the store to the new process: channels stop
    /// delivering (one poked or acknowledging from now on closes with
    /// 1012 and its device reconnects to the new process), the queued
    /// last-contact times are written, then the store finishes its work
    /// in flight and closes. Open channels stay until the drain closes
    /// them with 1012.
    pub async fn handover(&self) -> anyhow::Result<()> {
        self.hub.set_handover(Handover::Releasing);
        // A command sent and not yet acknowledged would be sent again by
        // the new process: acks usually follow within a round trip.
        if !self.hub.wait_acked(ACK_WAIT).await {
            tracing::info!(module = %self.name, "devices: some commands unacknowledged at the handover; the new process sends them again");
        }
        self.hub.set_handover(Handover::Released);
        self.contacts.flush().await;
        self.store.handover().await?;
        tracing::info!(module = %self.name, store = self.store.kind(), "devices: store released for the new process");
        Ok(())
    }

    /// The upgrade failed: open the store again and deliver as before.
    pub async fn take_back(&self) -> anyhow::Result<()> {
        self.store.take_back().await?;
        self.hub.set_handover(Handover::Serving);
        Ok(())
    }

    pub async fn shutdown(&self) {
        self.hub.close_all("server shutting down");
        for task in [&self.events_task, &self.warm_task, &self.lease_task] {
            if let Some(t) = task.lock().unwrap_or_else(|p| p.into_inner()).take() {
                t.abort();
            }
        }
    }
}

fn decode_fingerprint(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// The admin token: from the config, from the configured file, or from
/// `<data_dir>/admin-token` (generated on first start, mode 0600).
fn admin_token(config: &DevicesConfig, data_dir: &Path) -> anyhow::Result<String> {
    if let Some(t) = &config.admin_token {
        return Ok(t.clone());
    }
    let path = data_dir.join(
        config
            .admin_token_file
            .as_deref()
            .unwrap_or(Path::new(ADMIN_TOKEN_FILE)),
    );
    if config.admin_token_file.is_none() && !path.exists() {
        let token = random_hex(32);
        files::write_private(&path, format!("{token}\n").as_bytes())?;
        tracing::info!(path = %path.display(), "devices: generated the admin API token");
        return Ok(token);
    }
    let token = files::read_private(&path)?.trim().to_string();
    if token.len() < 16 {
        anyhow::bail!(
            "{}: the admin token must be at least 16 characters",
            path.display()
        );
    }
    Ok(token)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| format!("node-{}", &random_hex(4)))
}
