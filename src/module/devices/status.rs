//! The devices module on the status page: counts only (enrolled, online,
//! channels open on this balancer), each from a `count(*)` of the store,
//! so the page stays the same size with ten thousand devices.

use serde_json::{json, Value};

use super::model::{now_ms, DeviceQuery};
use super::Devices;

pub async fn counts(devices: &Devices) -> Value {
    let window = devices.config.online_window();
    let enrolled = count(
        devices,
        DeviceQuery {
            revoked: Some(false),
            ..Default::default()
        },
    )
    .await;
    let online = count(
        devices,
        DeviceQuery {
            revoked: Some(false),
            contact_since: Some(now_ms() - window.as_millis() as i64),
            ..Default::default()
        },
    )
    .await;
    let revoked = count(
        devices,
        DeviceQuery {
            revoked: Some(true),
            ..Default::default()
        },
    )
    .await;
    json!({
        "enrolled": enrolled,
        "online": online,
        "revoked": revoked,
        "online_window_seconds": window.as_secs(),
        "channels_here": devices.hub.len(),
    })
}

/// The number of devices matching `q`; `null` when the store does not
/// answer (the page says so rather than failing).
async fn count(devices: &Devices, q: DeviceQuery) -> Value {
    // One row is the smallest page; only the total is used.
    let q = DeviceQuery { limit: 1, ..q };
    match devices.store.list_devices(q).await {
        Ok((_, total)) => json!(total),
        Err(e) => {
            tracing::debug!("devices status: store did not answer: {e}");
            Value::Null
        }
    }
}
