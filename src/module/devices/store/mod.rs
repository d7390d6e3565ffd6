//! Where the devices module keeps its data. The module talks to a `Store`
//! only; SQLite (one balancer, embedded) and PostgreSQL (several balancers
//! sharing one fleet) implement it with the same semantics, which the
//! shared test suite in `suite.rs` checks against both.
//!
//! Every method is one transaction: a caller never sees half of a change,
//! and a change that returned `Ok` has been committed (durably: SQLite runs
//! with `synchronous = FULL`, PostgreSQL commits synchronously).

pub mod pg_pool;
pub mod postgres;
mod sql;
pub mod sqlite;
#[cfg(test)]
pub(crate) mod suite;

use serde_json::Value;
use tokio::sync::broadcast;

use super::model::*;
use crate::module::BoxFuture;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request contradicts the stored data (e.g. a group that does not
    /// exist, a revoked device).
    #[error("{0}")]
    Conflict(String),
    /// An enrolment token that is unknown, expired or used up. One message
    /// for all three: the caller should not learn which tokens exist.
    #[error("enrolment token rejected")]
    TokenRejected,
    /// The database failed; the message is for the log, not the client.
    #[error("store: {0}")]
    Backend(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Changes other balancers sharing the store must learn about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreEvent {
    /// A command was queued for this device: whoever holds its channel
    /// delivers it.
    CommandQueued { device_id: String },
    /// The device was revoked: drop its channel and refuse its certificate.
    DeviceRevoked {
        device_id: String,
        fingerprint: String,
    },
    /// What a device's effective settings or pending commands depend on
    /// changed (`None`: possibly every device's, e.g. the defaults): drop
    /// cached answers (see cache.rs).
    Changed { device_id: Option<String> },
    /// Reload derived state (revocations) and re-check every open channel:
    /// the data set was replaced by an import, or events may have been
    /// missed while the notification connection was down.
    Resync,
}

impl StoreEvent {
    /// The wire form used by NOTIFY payloads (kept short: PostgreSQL
    /// limits payloads to 8000 bytes).
    pub fn encode(&self) -> String {
        match self {
            StoreEvent::CommandQueued { device_id } => format!("cmd {device_id}"),
            StoreEvent::DeviceRevoked {
                device_id,
                fingerprint,
            } => format!("rev {device_id} {fingerprint}"),
            StoreEvent::Changed {
                device_id: Some(id),
            } => format!("chg {id}"),
            StoreEvent::Changed { device_id: None } => "chg".to_string(),
            StoreEvent::Resync => "resync".to_string(),
        }
    }

    pub fn decode(s: &str) -> Option<StoreEvent> {
        let mut parts = s.split(' ');
        match (parts.next()?, parts.next(), parts.next()) {
            ("cmd", Some(id), None) => Some(StoreEvent::CommandQueued {
                device_id: id.to_string(),
            }),
            ("rev", Some(id), Some(fp)) => Some(StoreEvent::DeviceRevoked {
                device_id: id.to_string(),
                fingerprint: fp.to_string(),
            }),
            ("chg", id, None) => Some(StoreEvent::Changed {
                device_id: id.map(str::to_string),
            }),
            ("resync", None, None) => Some(StoreEvent::Resync),
            _ => None,
        }
    }
}

/// The storage interface. Arguments are owned so that implementations can
/// move them into blocking tasks or queries without lifetime plumbing.
pub trait Store: Send + Sync + 'static {
    /// A short name for logs (`sqlite`, `postgres`).
    fn kind(&self) -> &'static str;

    // Enrolment tokens.
    fn insert_token(&self, token: EnrolToken) -> BoxFuture<'_, StoreResult<()>>;
    fn list_tokens(&self) -> BoxFuture<'_, StoreResult<Vec<EnrolToken>>>;
    fn delete_token(&self, id: String) -> BoxFuture<'_, StoreResult<()>>;
    /// Consume one use of the token whose secret hashes to
    /// `secret_sha256` (unexpired at `now`, uses left) and insert `device`
    /// with `token_id` set, atomically: a token is never spent without its
    /// device, nor a device stored without a token use.
    fn enrol(
        &self,
        secret_sha256: String,
        now: i64,
        device: Device,
    ) -> BoxFuture<'_, StoreResult<Device>>;

    // Devices.
    fn device(&self, id: String) -> BoxFuture<'_, StoreResult<Option<Device>>>;
    fn device_by_fingerprint(
        &self,
        fingerprint: String,
    ) -> BoxFuture<'_, StoreResult<Option<Device>>>;
    /// Matching devices ordered by id, and how many match in all.
    fn list_devices(&self, query: DeviceQuery) -> BoxFuture<'_, StoreResult<(Vec<Device>, i64)>>;
    /// Groups named in the patch must exist (`Conflict` otherwise).
    fn patch_device(&self, id: String, patch: DevicePatch) -> BoxFuture<'_, StoreResult<Device>>;
    /// Mark revoked (idempotent: a second call keeps the first time).
    fn revoke_device(&self, id: String, now: i64) -> BoxFuture<'_, StoreResult<Device>>;
    fn revoked_fingerprints(&self) -> BoxFuture<'_, StoreResult<Vec<String>>>;
    /// Record last-contact times, all in one transaction. A time never
    /// moves backwards; unknown devices are ignored (a device deleted by an
    /// import while its heartbeat was in flight).
    fn record_contacts(&self, contacts: Vec<(String, i64)>) -> BoxFuture<'_, StoreResult<()>>;
    /// Open (`Some(user)`) or close (`None`) the user session on a device.
    fn set_session(
        &self,
        device_id: String,
        user: Option<String>,
    ) -> BoxFuture<'_, StoreResult<()>>;
    /// Record which node holds the device's command channel. Closing
    /// (`open = false`) clears it only if `node` still holds it, so a stale
    /// close never hides a newer connection on another node.
    fn set_channel(
        &self,
        device_id: String,
        node: String,
        open: bool,
    ) -> BoxFuture<'_, StoreResult<()>>;

    // Settings.
    fn defaults(&self) -> BoxFuture<'_, StoreResult<Value>>;
    fn set_defaults(&self, settings: Value) -> BoxFuture<'_, StoreResult<()>>;
    fn groups(&self) -> BoxFuture<'_, StoreResult<Vec<Group>>>;
    fn put_group(&self, group: Group) -> BoxFuture<'_, StoreResult<()>>;
    /// Also removes the group from every device.
    fn delete_group(&self, name: String) -> BoxFuture<'_, StoreResult<()>>;
    fn users(&self) -> BoxFuture<'_, StoreResult<Vec<UserProfile>>>;
    fn put_user(&self, user: UserProfile) -> BoxFuture<'_, StoreResult<()>>;
    fn delete_user(&self, name: String) -> BoxFuture<'_, StoreResult<()>>;
    /// Everything the device's effective settings depend on, read in one
    /// transaction so that the version matches the settings.
    fn settings_inputs(&self, device_id: String) -> BoxFuture<'_, StoreResult<SettingsInputs>>;

    /// The same inputs, and the pending counts, for every device not
    /// revoked, in one snapshot: a balancer warms its memory with it at
    /// start and refreshes it before its entries expire, so that no
    /// heartbeat waits on the store for them (see cache.rs).
    fn hot_state(&self) -> BoxFuture<'_, StoreResult<HotState>>;

    // Commands.
    /// Queue a command for a device that exists and is not revoked.
    fn queue_command(&self, command: Command) -> BoxFuture<'_, StoreResult<Command>>;
    /// Unacknowledged commands, in queueing order.
    fn pending_commands(&self, device_id: String) -> BoxFuture<'_, StoreResult<Vec<Command>>>;
    fn pending_count(&self, device_id: String) -> BoxFuture<'_, StoreResult<i64>>;
    /// The device's commands, newest first, at most `limit`.
    fn commands(&self, device_id: String, limit: i64) -> BoxFuture<'_, StoreResult<Vec<Command>>>;
    /// Record the device's result. Acknowledging twice keeps the first
    /// result (devices retry after a lost answer).
    fn ack_command(
        &self,
        device_id: String,
        command_id: String,
        status: String,
        result: Value,
        now: i64,
    ) -> BoxFuture<'_, StoreResult<Command>>;

    // Backup and restore.
    fn export(&self) -> BoxFuture<'_, StoreResult<Snapshot>>;
    /// Replace all data with the snapshot's, in one transaction.
    fn import(&self, snapshot: Snapshot) -> BoxFuture<'_, StoreResult<()>>;

    // Binary upgrade (`Module::handover`).
    /// Finish the calls in flight and close the store, so that a new
    /// process can open it; calls made after that fail. A store shared by
    /// design (PostgreSQL) has nothing to release.
    fn handover(&self) -> BoxFuture<'_, StoreResult<()>> {
        Box::pin(async { Ok(()) })
    }
    /// Open the store again after `handover` (the upgrade failed).
    fn take_back(&self) -> BoxFuture<'_, StoreResult<()>> {
        Box::pin(async { Ok(()) })
    }

    // Between balancers. Besides what callers publish, a shared store
    // sends `StoreEvent::Changed` itself, in the same transaction, from
    // every method that changes effective settings or acknowledges a
    // command (set_defaults, put/delete group and user, patch_device,
    // set_session, queue_command, ack_command).
    /// Tell the other balancers sharing this store (no-op when none can).
    fn publish(&self, _event: StoreEvent) -> BoxFuture<'_, StoreResult<()>> {
        Box::pin(async { Ok(()) })
    }
    /// Events published by any balancer (this one included), when the
    /// store is shared.
    fn subscribe(&self) -> Option<broadcast::Receiver<StoreEvent>> {
        None
    }

    // Node leases (see lease.rs): a balancer's channels count as live only
    // while it keeps renewing its lease.
    /// Renew `node`'s lease at `now`. Returns whether it had lapsed: no
    /// row (first start, or expired by another node) or a renewal older
    /// than `lease_ms`, in which case the node's channel rows may have
    /// been cleared and must be recorded again.
    fn renew_node(&self, node: String, now: i64, lease_ms: i64)
        -> BoxFuture<'_, StoreResult<bool>>;
    /// Expire every other node whose lease is older than `lease_ms` at
    /// `now`: delete its lease and clear the channels it was recorded as
    /// holding, in one transaction. Returns each expired node with the
    /// number of channels cleared.
    fn expire_nodes(
        &self,
        node: String,
        now: i64,
        lease_ms: i64,
    ) -> BoxFuture<'_, StoreResult<Vec<(String, u64)>>>;
    /// Clear every channel recorded for `node` (a restarted node holds
    /// none yet); returns how many.
    fn clear_node_channels(&self, node: String) -> BoxFuture<'_, StoreResult<u64>>;
    /// Every lease, by node name.
    fn nodes(&self) -> BoxFuture<'_, StoreResult<Vec<NodeLease>>>;
}

/// A balancer's lease on its channels.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeLease {
    pub node: String,
    /// Unix milliseconds, by the renewing balancer's clock.
    pub renewed_at: i64,
}

/// Parse a JSON text column; the store wrote it, so failure means damage.
pub(crate) fn parse_json(text: &str) -> StoreResult<Value> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::Backend(format!("stored JSON is damaged: {e}")))
}

/// Turn a `LIKE` search into a pattern matching the text literally.
pub(crate) fn like_pattern(search: &str) -> String {
    let mut p = String::from("%");
    for c in search.to_lowercase().chars() {
        if matches!(c, '%' | '_' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    p
}

/// Checks shared by both backends before an import touches anything.
pub(crate) fn check_snapshot(s: &Snapshot) -> StoreResult<()> {
    if s.format != SNAPSHOT_FORMAT {
        return Err(StoreError::Conflict(format!(
            "not a {SNAPSHOT_FORMAT} export (format {:?})",
            s.format
        )));
    }
    if s.version != SNAPSHOT_VERSION {
        return Err(StoreError::Conflict(format!(
            "export version {} is not supported (expected {SNAPSHOT_VERSION})",
            s.version
        )));
    }
    let groups: std::collections::HashSet<&str> =
        s.groups.iter().map(|g| g.name.as_str()).collect();
    let devices: std::collections::HashSet<&str> =
        s.devices.iter().map(|d| d.id.as_str()).collect();
    for d in &s.devices {
        if let Some(g) = d.groups.iter().find(|g| !groups.contains(g.as_str())) {
            return Err(StoreError::Conflict(format!(
                "device {} is in group {g:?}, which the export lacks",
                d.id
            )));
        }
    }
    if let Some(c) = s
        .commands
        .iter()
        .find(|c| !devices.contains(c.device_id.as_str()))
    {
        return Err(StoreError::Conflict(format!(
            "command {} is for device {}, which the export lacks",
            c.id, c.device_id
        )));
    }
    Ok(())
}
