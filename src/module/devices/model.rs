//! The records the devices module keeps, shared by every store backend and
//! by the JSON API (they serialize as the API shows them).
//!
//! Times are Unix milliseconds (`i64`): exact, sortable, and the same in
//! SQLite, PostgreSQL and JSON without time-zone questions.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A one-time enrolment token. Only the SHA-256 of the secret is stored:
/// a copy of the database does not let anyone enrol.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrolToken {
    pub id: String,
    /// Hex SHA-256 of the secret handed to the administrator.
    pub secret_sha256: String,
    #[serde(default)]
    pub label: String,
    pub created_at: i64,
    pub expires_at: i64,
    /// Enrolments still allowed with this token.
    pub uses_left: i64,
    /// Devices enrolled with it so far.
    #[serde(default)]
    pub used: i64,
}

/// An enrolled device. Its identity is the SHA-256 fingerprint of the
/// client certificate it was issued.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Device {
    pub id: String,
    /// Lowercase hex SHA-256 of the certificate's DER.
    pub fingerprint: String,
    pub name: String,
    /// Certificate serial, lowercase hex.
    pub serial: String,
    pub cert_pem: String,
    #[serde(default)]
    pub groups: Vec<String>,
    /// The device's own settings (a JSON object).
    #[serde(default = "empty_object")]
    pub settings: Value,
    /// The user logged in on the device, for per-user settings.
    #[serde(default)]
    pub session_user: Option<String>,
    pub enrolled_at: i64,
    #[serde(default)]
    pub token_id: Option<String>,
    #[serde(default)]
    pub last_contact: Option<i64>,
    #[serde(default)]
    pub revoked_at: Option<i64>,
    /// The balancer node holding the device's command channel, if open.
    #[serde(default)]
    pub channel_node: Option<String>,
}

/// A named set of settings devices are assigned to; higher priority wins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Group {
    pub name: String,
    #[serde(default)]
    pub priority: i64,
    #[serde(default = "empty_object")]
    pub settings: Value,
}

/// A user's settings profile, applied on top of the device's while that
/// user's session is open on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserProfile {
    pub name: String,
    #[serde(default = "empty_object")]
    pub settings: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandKind {
    Reboot,
    ApplySettings,
    Message,
    Custom,
}

impl CommandKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CommandKind::Reboot => "reboot",
            CommandKind::ApplySettings => "apply_settings",
            CommandKind::Message => "message",
            CommandKind::Custom => "custom",
        }
    }

    pub fn parse(s: &str) -> Option<CommandKind> {
        Some(match s {
            "reboot" => CommandKind::Reboot,
            "apply_settings" => CommandKind::ApplySettings,
            "message" => CommandKind::Message,
            "custom" => CommandKind::Custom,
            _ => return None,
        })
    }
}

/// A command for one device, kept until the device acknowledges it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    pub id: String,
    pub device_id: String,
    /// Order of queueing for this store (monotonic); devices get pending
    /// commands in this order.
    pub seq: i64,
    pub kind: CommandKind,
    #[serde(default = "empty_object")]
    pub payload: Value,
    pub created_at: i64,
    #[serde(default)]
    pub acked_at: Option<i64>,
    /// `ok` or `failed`, as reported by the device.
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub result: Option<Value>,
}

/// Everything a store holds, as one document: the export/import format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Always `fleetgate-devices`: refuses to import some other JSON file.
    pub format: String,
    pub version: u32,
    #[serde(default)]
    pub exported_at: i64,
    #[serde(default = "empty_object")]
    pub defaults: Value,
    #[serde(default)]
    pub groups: Vec<Group>,
    #[serde(default)]
    pub users: Vec<UserProfile>,
    #[serde(default)]
    pub tokens: Vec<EnrolToken>,
    #[serde(default)]
    pub devices: Vec<Device>,
    #[serde(default)]
    pub commands: Vec<Command>,
    /// The device CA, only when the export asked for it (it holds the
    /// private key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<CaFiles>,
}

pub const SNAPSHOT_FORMAT: &str = "fleetgate-devices";
pub const SNAPSHOT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaFiles {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Filters for listing devices (all optional).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceQuery {
    /// Substring of the name, id or fingerprint (case-insensitive).
    pub search: Option<String>,
    pub group: Option<String>,
    pub revoked: Option<bool>,
    /// Only devices whose last contact is at or after this time.
    pub contact_since: Option<i64>,
    /// Only devices with no contact since this time (or never).
    pub silent_since: Option<i64>,
    pub limit: i64,
    pub offset: i64,
}

/// What the effective settings of one device are computed from.
#[derive(Debug, Clone, PartialEq)]
pub struct SettingsInputs {
    pub defaults: Value,
    /// The device's groups, lowest priority first (ties by name).
    pub groups: Vec<Group>,
    pub device: Value,
    /// The open session's user and that user's profile (if one exists).
    pub user: Option<(String, Option<Value>)>,
}

/// What a heartbeat's answer is computed from, for one device: read for
/// every device at once to warm a balancer's memory (see cache.rs).
#[derive(Debug, Clone, PartialEq)]
pub struct HotDevice {
    pub id: String,
    pub fingerprint: String,
    pub settings: Value,
    pub groups: Vec<String>,
    pub session_user: Option<String>,
    /// Commands waiting for the device's acknowledgement.
    pub pending: i64,
}

/// The answers' inputs for the whole fleet, read in one snapshot.
#[derive(Debug, Clone, Default)]
pub struct HotState {
    pub defaults: Value,
    /// Lowest priority first (ties by name), as `SettingsInputs::groups`.
    pub groups: Vec<Group>,
    pub users: Vec<UserProfile>,
    /// Every device not revoked.
    pub devices: Vec<HotDevice>,
}

impl HotState {
    /// One device's settings inputs, as `Store::settings_inputs` reads them.
    pub fn inputs(&self, d: &HotDevice) -> SettingsInputs {
        SettingsInputs {
            defaults: self.defaults.clone(),
            groups: self
                .groups
                .iter()
                .filter(|g| d.groups.contains(&g.name))
                .cloned()
                .collect(),
            device: d.settings.clone(),
            user: d.session_user.as_ref().map(|u| {
                let profile = self.users.iter().find(|p| &p.name == u);
                (u.clone(), profile.map(|p| p.settings.clone()))
            }),
        }
    }

    /// Fill in the devices' groups and pending counts from bulk rows.
    pub fn attach(
        &mut self,
        members: impl IntoIterator<Item = (String, String)>,
        pending: impl IntoIterator<Item = (String, i64)>,
    ) {
        let index: std::collections::HashMap<String, usize> = self
            .devices
            .iter()
            .enumerate()
            .map(|(i, d)| (d.id.clone(), i))
            .collect();
        for (device, group) in members {
            if let Some(&i) = index.get(&device) {
                self.devices[i].groups.push(group);
            }
        }
        for (device, n) in pending {
            if let Some(&i) = index.get(&device) {
                self.devices[i].pending = n;
            }
        }
    }
}

/// The changes an administrator can make to a device in one call.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicePatch {
    pub name: Option<String>,
    pub groups: Option<Vec<String>>,
    pub settings: Option<Value>,
}

pub fn empty_object() -> Value {
    Value::Object(Default::default())
}

/// Wall-clock Unix milliseconds as the store keeps them (SQL integers
/// are signed).
pub fn now_ms() -> i64 {
    crate::clock::unix_ms() as i64
}

/// Random lowercase hex of `bytes` random bytes, from the OS generator
/// (identifiers and secrets must not be guessable).
pub fn random_hex(bytes: usize) -> String {
    hex(&random_bytes(bytes))
}

pub fn random_bytes(n: usize) -> Vec<u8> {
    use ring::rand::SecureRandom;
    let mut buf = vec![0u8; n];
    ring::rand::SystemRandom::new()
        .fill(&mut buf)
        .expect("the OS random generator failed");
    buf
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}
