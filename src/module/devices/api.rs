//! The device API under `/api/v1/` (see docs/devices-api.md). Everything
//! but enrolment needs the device's verified client certificate.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::cache::Scope;
use super::commands::Ack;
use super::http::*;
use super::model::now_ms;
use super::service::Devices;
use crate::module::{Body, RequestContext};

pub const PREFIX: &str = "/api/v1/";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrolRequest {
    token: String,
    csr: String,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionRequest {
    user: String,
}

/// The heartbeat body is optional; fields are accepted for forward
/// compatibility (newer agents may report more) but not stored.
#[derive(Deserialize)]
struct HeartbeatRequest {}

pub async fn handle(
    devices: Arc<Devices>,
    req: Request<Incoming>,
    ctx: RequestContext,
) -> Response<Body> {
    respond(route(devices, req, ctx).await)
}

async fn route(
    devices: Arc<Devices>,
    req: Request<Incoming>,
    ctx: RequestContext,
) -> ApiResult<Response<Body>> {
    let Some(rest) = req.uri().path().strip_prefix(PREFIX) else {
        return Err(ApiError::not_found());
    };
    let path = segments(rest);
    let path: Vec<&str> = path.iter().map(String::as_str).collect();
    let limit = devices.config.max_body;
    let method = req.method().clone();

    if path == ["enrol"] {
        if method != Method::POST {
            return Err(ApiError::method("POST"));
        }
        let r: EnrolRequest = read_json(req, limit).await?;
        let enrolled = devices.enrol(&r.token, &r.csr, r.name).await?;
        let mut body = serde_json::to_value(&enrolled).expect("serializes");
        body["heartbeat"] = heartbeat_advice(&devices);
        return Ok(json(StatusCode::CREATED, &body));
    }

    // Known endpoints are checked before authentication, so that a typo
    // gets 404 rather than a confusing 401.
    let allowed = match path.as_slice() {
        ["heartbeat"] => "POST",
        ["settings"] | ["device"] | ["commands"] | ["commands", "ws"] => "GET",
        ["session"] => "PUT, DELETE",
        ["commands", _, "ack"] => "POST",
        _ => return Err(ApiError::not_found()),
    };
    if !allowed.split(", ").any(|m| m == method.as_str()) {
        return Err(ApiError::method(allowed));
    }
    let id = devices.authenticate(&ctx).await?;

    match (path.as_slice(), method) {
        (["heartbeat"], _) => {
            // Validate before writing anything.
            let _: Option<HeartbeatRequest> = read_optional_json(req, limit).await?;
            // Answered once the contact is committed; settings and the
            // pending count come from memory meanwhile (see cache.rs).
            let answered = tokio::try_join!(
                async { Ok(devices.contacts.record(id.to_string(), now_ms()).await?) },
                devices.effective_settings(&id),
                devices.pending_count(&id),
            );
            let m = &devices.metrics;
            let (_, settings, pending) = answered
                .inspect(|_| m.heartbeats_ok.inc())
                .inspect_err(|_| m.heartbeats_failed.inc())?;
            Ok(json(
                StatusCode::OK,
                &json!({
                    "device_id": &*id,
                    "settings_version": settings.version,
                    "pending_commands": pending,
                    "heartbeat": heartbeat_advice(&devices),
                }),
            ))
        }
        (["settings"], _) => settings_answer(&devices, &id).await,
        (["device"], _) => {
            let device = devices.store.device(id.to_string()).await?.ok_or_else(|| {
                ApiError::new(StatusCode::FORBIDDEN, "unknown device certificate")
            })?;
            Ok(json(
                StatusCode::OK,
                &json!({
                    "device_id": device.id,
                    "name": device.name,
                    "fingerprint": device.fingerprint,
                    "groups": device.groups,
                    "session_user": device.session_user,
                    "enrolled_at": device.enrolled_at,
                }),
            ))
        }
        (["session"], Method::PUT) => {
            let r: SessionRequest = read_json(req, limit).await?;
            let user = r.user.trim().to_string();
            if user.is_empty() || user.len() > 200 || user.chars().any(char::is_control) {
                return Err(ApiError::bad_request(
                    "user must be 1 to 200 bytes without control characters",
                ));
            }
            devices
                .store
                .set_session(id.to_string(), Some(user))
                .await?;
            devices.changed(Scope::Device(id.to_string()));
            settings_answer(&devices, &id).await
        }
        (["session"], _) => {
            devices.store.set_session(id.to_string(), None).await?;
            devices.changed(Scope::Device(id.to_string()));
            settings_answer(&devices, &id).await
        }
        (["commands"], _) => {
            let pending = devices.store.pending_commands(id.to_string()).await?;
            let list: Vec<_> = pending.iter().map(super::ws::command_message).collect();
            Ok(json(StatusCode::OK, &json!({ "commands": list })))
        }
        (["commands", "ws"], _) => super::ws::upgrade(devices.clone(), req, id),
        (["commands", cid, "ack"], _) => {
            let ack: Ack = read_json(req, limit).await?;
            let c = devices.ack_command(&id, cid, ack).await?;
            Ok(json(
                StatusCode::OK,
                &json!({ "id": c.id, "acked_at": c.acked_at, "status": c.status }),
            ))
        }
        _ => Err(ApiError::not_found()),
    }
}

async fn settings_answer(devices: &Devices, device_id: &str) -> ApiResult<Response<Body>> {
    let e = devices.effective_settings(device_id).await?;
    Ok(json(
        StatusCode::OK,
        &json!({ "version": e.version, "settings": e.settings }),
    ))
}

/// When to call in next: the interval plus a random share of the jitter
/// window, drawn here so that devices need no randomness of their own.
pub fn heartbeat_advice(devices: &Devices) -> serde_json::Value {
    let interval = devices.config.heartbeat_interval.as_secs();
    let jitter = devices.config.heartbeat_jitter.as_secs();
    json!({
        "interval_seconds": interval,
        "jitter_seconds": jitter,
        "next_in_seconds": interval + fastrand::u64(0..=jitter),
    })
}
