//! The command queue: administrators queue commands, devices get them on
//! their channel (or by polling) and acknowledge each with a result.
//! Commands live in the store until acknowledged, so a device that was
//! offline, or a balancer that restarted, loses none.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use super::cache::Scope;
use super::http::{ApiError, ApiResult};
use super::model::*;
use super::service::Devices;
use super::settings::{self, Effective};
use super::store::StoreEvent;

/// A command as an administrator queues it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewCommand {
    pub kind: String,
    #[serde(default = "empty_object")]
    pub payload: Value,
}

/// A device's acknowledgement.
#[derive(Debug, Deserialize)]
pub struct Ack {
    /// `ok` or `failed`.
    pub status: String,
    #[serde(default)]
    pub result: Value,
}

/// The payload rules per kind: enough to catch typos before a device gets
/// something it cannot act on.
pub fn validate(kind: &str, payload: &Value) -> ApiResult<CommandKind> {
    let kind = CommandKind::parse(kind).ok_or_else(|| {
        ApiError::bad_request(format!(
            "unknown command kind {kind:?} (reboot, apply_settings, message, custom)"
        ))
    })?;
    let Value::Object(p) = payload else {
        return Err(ApiError::bad_request("payload must be a JSON object"));
    };
    match kind {
        CommandKind::Message => {
            if !p.get("text").is_some_and(Value::is_string) {
                return Err(ApiError::bad_request(
                    "a message command needs payload.text (a string)",
                ));
            }
        }
        CommandKind::Custom => {
            if p.get("name")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                return Err(ApiError::bad_request(
                    "a custom command needs payload.name (a non-empty string)",
                ));
            }
        }
        CommandKind::Reboot | CommandKind::ApplySettings => {}
    }
    Ok(kind)
}

impl Devices {
    pub async fn queue_command(&self, device_id: &str, new: NewCommand) -> ApiResult<Command> {
        let kind = validate(&new.kind, &new.payload)?;
        let mut payload = new.payload;
        if kind == CommandKind::ApplySettings {
            // Tell the device which version to apply, so that it can skip
            // a fetch it already made.
            let e = self.effective_settings(device_id).await?;
            if let Value::Object(p) = &mut payload {
                p.insert("settings_version".into(), Value::String(e.version.clone()));
            }
        }
        let command = Command {
            id: format!("cmd-{}", random_hex(10)),
            device_id: device_id.to_string(),
            seq: 0,
            kind,
            payload,
            created_at: now_ms(),
            acked_at: None,
            status: None,
            result: None,
        };
        let command = self.store.queue_command(command).await?;
        self.changed(Scope::Device(device_id.to_string()));
        self.hub.poke(device_id);
        self.publish(StoreEvent::CommandQueued {
            device_id: device_id.to_string(),
        })
        .await;
        Ok(command)
    }

    pub async fn ack_command(
        &self,
        device_id: &str,
        command_id: &str,
        ack: Ack,
    ) -> ApiResult<Command> {
        if !matches!(ack.status.as_str(), "ok" | "failed") {
            return Err(ApiError::bad_request("status must be \"ok\" or \"failed\""));
        }
        let c = self
            .store
            .ack_command(
                device_id.to_string(),
                command_id.to_string(),
                ack.status,
                ack.result,
                now_ms(),
            )
            .await?;
        self.changed(Scope::Device(device_id.to_string()));
        Ok(c)
    }

    /// The device's effective settings, from memory when nothing they
    /// depend on changed since they were read (see cache.rs).
    pub async fn effective_settings(&self, device_id: &str) -> ApiResult<Arc<Effective>> {
        if let Some(e) = self.cache.settings(device_id) {
            return Ok(e);
        }
        let ticket = self.cache.ticket();
        let inputs = self.store.settings_inputs(device_id.to_string()).await?;
        let e = Arc::new(settings::effective(&inputs));
        Ok(self.cache.put_settings(ticket, device_id, e))
    }

    /// How many commands wait for the device's acknowledgement, from
    /// memory like the settings (queueing and acknowledging drop it).
    pub async fn pending_count(&self, device_id: &str) -> ApiResult<i64> {
        if let Some(n) = self.cache.pending(device_id) {
            return Ok(n);
        }
        let ticket = self.cache.ticket();
        let n = self.store.pending_count(device_id.to_string()).await?;
        self.cache.put_pending(ticket, device_id, n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn payloads_are_checked_per_kind() {
        assert_eq!(validate("reboot", &json!({})).unwrap(), CommandKind::Reboot);
        assert!(validate("reboot", &json!([])).is_err());
        assert!(validate("message", &json!({})).is_err());
        assert!(validate("message", &json!({"text": 3})).is_err());
        assert_eq!(
            validate("message", &json!({"text": "hi"})).unwrap(),
            CommandKind::Message
        );
        assert!(validate("custom", &json!({"name": ""})).is_err());
        assert_eq!(
            validate("custom", &json!({"name": "wipe-cache", "x": 1})).unwrap(),
            CommandKind::Custom
        );
        assert!(validate("format_disk", &json!({})).is_err());
    }
}
