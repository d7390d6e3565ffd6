//! The administration API, on the admin listener under `/modules/NAME/`,
//! behind a bearer token (see docs/devices-api.md).

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::AUTHORIZATION;
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::ca::DeviceCa;
use super::cache::Scope;
use super::commands::NewCommand;
use super::http::*;
use super::model::*;
use super::service::Devices;
use super::store::StoreEvent;
use crate::module::Body;

const DEFAULT_LIMIT: i64 = 100;
const MAX_LIMIT: i64 = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    #[serde(default)]
    label: String,
    #[serde(default = "one")]
    uses: i64,
    /// `"24h"`, `"7d"`...; default: the module's `token_validity`.
    #[serde(default)]
    expires_in: Option<String>,
}

fn one() -> i64 {
    1
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupBody {
    #[serde(default)]
    priority: i64,
    #[serde(default = "empty_object")]
    settings: Value,
}

/// A device as administrators see it: the record plus derived state.
#[derive(Serialize)]
struct DeviceView {
    #[serde(flatten)]
    device: Device,
    online: bool,
    /// Whether this balancer holds the device's command channel.
    channel_here: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pending_commands: Option<i64>,
}

/// Compare in constant time: the token must not leak through timing.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized(devices: &Devices, req: &Request<Incoming>) -> bool {
    let given = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    given.is_some_and(|g| same(g.as_bytes(), devices.admin_token.as_bytes()))
}

fn object(v: &Value, what: &str) -> ApiResult<()> {
    match v.is_object() {
        true => Ok(()),
        false => Err(ApiError::bad_request(format!(
            "{what} must be a JSON object"
        ))),
    }
}

fn valid_name(name: &str, what: &str) -> ApiResult<()> {
    if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "{what} must be 1 to 200 bytes without control characters"
        )));
    }
    Ok(())
}

pub async fn handle(devices: Arc<Devices>, req: Request<Incoming>) -> Response<Body> {
    respond(route(devices, req).await)
}

async fn route(devices: Arc<Devices>, req: Request<Incoming>) -> ApiResult<Response<Body>> {
    if !authorized(&devices, &req) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token",
        ));
    }
    let prefix = format!("/modules/{}/", devices.name);
    let Some(rest) = req.uri().path().strip_prefix(prefix.as_str()) else {
        return Err(ApiError::not_found());
    };
    let path = segments(rest);
    let path: Vec<&str> = path.iter().map(String::as_str).collect();
    let limit = devices.config.max_body;
    let method = req.method().clone();
    let ok = |v: Value| Ok(json(StatusCode::OK, &v));

    match (path.as_slice(), &method) {
        (["tokens"], &Method::GET) => ok(json!({ "tokens": devices.store.list_tokens().await? })),
        (["tokens"], &Method::POST) => {
            let r: TokenRequest = read_json(req, limit).await?;
            let ttl = r
                .expires_in
                .map(|s| {
                    humantime::parse_duration(&s)
                        .map_err(|e| ApiError::bad_request(format!("expires_in {s:?}: {e}")))
                })
                .transpose()?;
            let t = devices.create_token(r.label, r.uses, ttl).await?;
            Ok(json(StatusCode::CREATED, &t))
        }
        (["tokens", id], &Method::DELETE) => {
            devices.store.delete_token(id.to_string()).await?;
            ok(json!({ "deleted": id }))
        }
        (["devices"], &Method::GET) => list_devices(&devices, &req).await,
        (["devices", id], &Method::GET) => {
            let d = devices
                .store
                .device(id.to_string())
                .await?
                .ok_or_else(|| no_device(id))?;
            let pending = devices.pending_count(&d.id).await?;
            ok(
                serde_json::to_value(view(&devices, d, Some(pending), now_ms()))
                    .expect("serializes"),
            )
        }
        (["devices", id], &Method::PATCH) => {
            let patch: DevicePatch = read_json(req, limit).await?;
            if let Some(n) = &patch.name {
                valid_name(n, "name")?;
            }
            if let Some(s) = &patch.settings {
                object(s, "settings")?;
            }
            let d = devices.store.patch_device(id.to_string(), patch).await?;
            devices.changed(Scope::Device(d.id.clone()));
            ok(serde_json::to_value(view(&devices, d, None, now_ms())).expect("serializes"))
        }
        (["devices", id, "groups"], &Method::PUT) => {
            let groups: Vec<String> = read_json(req, limit).await?;
            let patch = DevicePatch {
                groups: Some(groups),
                ..Default::default()
            };
            let d = devices.store.patch_device(id.to_string(), patch).await?;
            devices.changed(Scope::Device(d.id.clone()));
            ok(json!({ "groups": d.groups }))
        }
        (["devices", id, "settings"], &Method::PUT) => {
            let settings: Value = read_json(req, limit).await?;
            object(&settings, "settings")?;
            let patch = DevicePatch {
                settings: Some(settings),
                ..Default::default()
            };
            devices.store.patch_device(id.to_string(), patch).await?;
            devices.changed(Scope::Device(id.to_string()));
            effective(&devices, id).await
        }
        (["devices", id, "settings"], &Method::GET) => effective(&devices, id).await,
        (["devices", id, "revoke"], &Method::POST) => {
            let d = devices.revoke(id).await?;
            ok(json!({ "id": d.id, "fingerprint": d.fingerprint, "revoked_at": d.revoked_at }))
        }
        (["devices", id, "commands"], &Method::POST) => {
            let c: NewCommand = read_json(req, limit).await?;
            let c = devices.queue_command(id, c).await?;
            Ok(json(StatusCode::CREATED, &c))
        }
        (["devices", id, "commands"], &Method::GET) => {
            if devices.store.device(id.to_string()).await?.is_none() {
                return Err(no_device(id));
            }
            let n = int_param(&req, "limit")?
                .unwrap_or(DEFAULT_LIMIT)
                .clamp(1, MAX_LIMIT);
            ok(json!({ "commands": devices.store.commands(id.to_string(), n).await? }))
        }
        (["defaults"], &Method::GET) => ok(devices.store.defaults().await?),
        (["defaults"], &Method::PUT) => {
            let settings: Value = read_json(req, limit).await?;
            object(&settings, "defaults")?;
            devices.store.set_defaults(settings.clone()).await?;
            devices.changed(Scope::AllDevices);
            ok(settings)
        }
        (["groups"], &Method::GET) => ok(json!({ "groups": devices.store.groups().await? })),
        (["groups", name], &Method::PUT) => {
            valid_name(name, "group name")?;
            let g: GroupBody = read_json(req, limit).await?;
            object(&g.settings, "settings")?;
            let group = Group {
                name: name.to_string(),
                priority: g.priority,
                settings: g.settings,
            };
            devices.store.put_group(group.clone()).await?;
            devices.changed(Scope::AllDevices);
            ok(serde_json::to_value(group).expect("serializes"))
        }
        (["groups", name], &Method::DELETE) => {
            devices.store.delete_group(name.to_string()).await?;
            devices.changed(Scope::AllDevices);
            ok(json!({ "deleted": name }))
        }
        (["users"], &Method::GET) => ok(json!({ "users": devices.store.users().await? })),
        (["users", name], &Method::PUT) => {
            valid_name(name, "user name")?;
            let settings: Value = read_json(req, limit).await?;
            object(&settings, "settings")?;
            let u = UserProfile {
                name: name.to_string(),
                settings,
            };
            devices.store.put_user(u.clone()).await?;
            devices.changed(Scope::AllDevices);
            ok(serde_json::to_value(u).expect("serializes"))
        }
        (["users", name], &Method::DELETE) => {
            devices.store.delete_user(name.to_string()).await?;
            devices.changed(Scope::AllDevices);
            ok(json!({ "deleted": name }))
        }
        (["revocations"], &Method::GET) => {
            ok(json!({ "fingerprints": devices.store.revoked_fingerprints().await? }))
        }
        (["export"], &Method::GET) => {
            let include_ca = bool_param(&req, "include_ca")?.unwrap_or(false);
            let mut s = devices.store.export().await?;
            if include_ca {
                s.ca = Some(devices.ca().files());
            }
            let mut r = json(StatusCode::OK, &s);
            let name = format!("attachment; filename=\"{}-export.json\"", devices.name);
            if let Ok(v) = hyper::header::HeaderValue::from_str(&name) {
                r.headers_mut()
                    .insert(hyper::header::CONTENT_DISPOSITION, v);
            }
            Ok(r)
        }
        (["import"], &Method::POST) => import(&devices, req).await,
        (["status"], &Method::GET) => ok(json!({
            "module": devices.name,
            "store": devices.store.kind(),
            "node": devices.node,
            "channels_here": devices.hub.len(),
            "revoked": devices.revocations.len(),
            "ca": devices.ca().cert_pem,
            "nodes": nodes(&devices).await?,
        })),
        _ => Err(ApiError::not_found()),
    }
}

/// The balancers sharing the store and whether each one's lease is
/// current (a node whose lease ran out is removed at the next renewal
/// round of any live node, with its channels).
async fn nodes(devices: &Devices) -> ApiResult<Value> {
    let cutoff = now_ms() - devices.config.lease.as_millis() as i64;
    let nodes = devices.store.nodes().await?;
    Ok(nodes
        .into_iter()
        .map(
            |n| json!({"node": n.node, "renewed_at": n.renewed_at, "live": n.renewed_at >= cutoff}),
        )
        .collect())
}

fn no_device(id: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no device {id:?}"))
}

fn view(devices: &Devices, device: Device, pending: Option<i64>, now: i64) -> DeviceView {
    let window = devices.config.online_window().as_millis() as i64;
    DeviceView {
        online: device.revoked_at.is_none()
            && device.last_contact.is_some_and(|t| t >= now - window),
        channel_here: devices.hub.is_connected(&device.id),
        pending_commands: pending,
        device,
    }
}

async fn effective(devices: &Devices, id: &str) -> ApiResult<Response<Body>> {
    let e = devices.effective_settings(id).await?;
    Ok(json(
        StatusCode::OK,
        &json!({ "version": e.version, "settings": e.settings }),
    ))
}

fn param(req: &Request<Incoming>, name: &str) -> Option<String> {
    query_pairs(req)
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

fn int_param(req: &Request<Incoming>, name: &str) -> ApiResult<Option<i64>> {
    param(req, name)
        .map(|v| {
            v.parse()
                .map_err(|_| ApiError::bad_request(format!("{name} must be an integer")))
        })
        .transpose()
}

fn bool_param(req: &Request<Incoming>, name: &str) -> ApiResult<Option<bool>> {
    param(req, name)
        .map(|v| match v.as_str() {
            "true" | "1" => Ok(true),
            "false" | "0" => Ok(false),
            _ => Err(ApiError::bad_request(format!(
                "{name} must be true or false"
            ))),
        })
        .transpose()
}

async fn list_devices(devices: &Devices, req: &Request<Incoming>) -> ApiResult<Response<Body>> {
    let now = now_ms();
    let window = devices.config.online_window().as_millis() as i64;
    let mut q = DeviceQuery {
        search: param(req, "search").filter(|s| !s.is_empty()),
        group: param(req, "group").filter(|s| !s.is_empty()),
        revoked: bool_param(req, "revoked")?,
        limit: int_param(req, "limit")?
            .unwrap_or(DEFAULT_LIMIT)
            .clamp(1, MAX_LIMIT),
        offset: int_param(req, "offset")?.unwrap_or(0).max(0),
        ..Default::default()
    };
    match bool_param(req, "online")? {
        Some(true) => {
            q.contact_since = Some(now - window);
            q.revoked = Some(false);
        }
        Some(false) => q.silent_since = Some(now - window),
        None => {}
    }
    let (list, total) = devices.store.list_devices(q.clone()).await?;
    let list: Vec<DeviceView> = list
        .into_iter()
        .map(|d| view(devices, d, None, now))
        .collect();
    Ok(json(
        StatusCode::OK,
        &json!({ "total": total, "limit": q.limit, "offset": q.offset, "devices": list }),
    ))
}

/// Replace everything with an export. The CA, when the file has one, is
/// checked before any data is touched and written after the data commits.
async fn import(devices: &Devices, req: Request<Incoming>) -> ApiResult<Response<Body>> {
    let s: Snapshot = read_json(req, devices.config.max_import).await?;
    let ca =
        match &s.ca {
            Some(files) => Some(DeviceCa::from_pem(&files.cert_pem, &files.key_pem).map_err(
                |e| ApiError::bad_request(format!("the export's CA is unusable: {e:#}")),
            )?),
            None => None,
        };
    let counts = json!({
        "devices": s.devices.len(),
        "groups": s.groups.len(),
        "users": s.users.len(),
        "tokens": s.tokens.len(),
        "commands": s.commands.len(),
        "ca_replaced": ca.is_some(),
    });
    devices.store.import(s).await?;
    devices.cache.clear();
    if let Some(ca) = ca {
        ca.save(&devices.data_dir).map_err(|e| {
            tracing::error!(error = %format!("{e:#}"), "devices: writing the imported CA failed");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "data imported, but writing the CA files failed",
            )
        })?;
        devices.set_ca(ca);
    }
    devices.reload_revocations().await?;
    // Channels of devices that no longer exist or changed get re-checked.
    devices.hub.poke_all();
    devices.publish(StoreEvent::Resync).await;
    tracing::info!(module = %devices.name, "devices: data imported");
    Ok(json(StatusCode::OK, &json!({ "imported": counts })))
}
