//! Enrolment: administrators create one-time tokens; a device trades a
//! token and a CSR for a client certificate, and from then on is known by
//! that certificate's fingerprint.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use hyper::StatusCode;
use serde::Serialize;

use super::ca::CsrError;
use super::http::{ApiError, ApiResult};
use super::model::*;
use super::service::Devices;
use crate::module::RequestContext;

/// Enrolment token secrets start with this, so that a leaked one is
/// recognisable (secret scanners, logs).
pub const TOKEN_PREFIX: &str = "fgt_";
const MAX_NAME: usize = 200;

/// A newly created token: the secret is shown this once and never stored.
#[derive(Debug, Serialize)]
pub struct NewToken {
    #[serde(flatten)]
    pub token: EnrolToken,
    pub secret: String,
}

/// What a device gets back from enrolment.
#[derive(Debug, Serialize)]
pub struct Enrolled {
    pub device_id: String,
    pub fingerprint: String,
    pub certificate: String,
    pub ca: String,
}

pub fn hash_secret(secret: &str) -> String {
    sha256_hex(secret.trim().as_bytes())
}

impl Devices {
    pub async fn create_token(
        &self,
        label: String,
        uses: i64,
        expires_in: Option<Duration>,
    ) -> ApiResult<NewToken> {
        if !(1..=1_000_000).contains(&uses) {
            return Err(ApiError::bad_request("uses must be between 1 and 1000000"));
        }
        if label.len() > MAX_NAME {
            return Err(ApiError::bad_request(format!(
                "label over {MAX_NAME} bytes"
            )));
        }
        let ttl = expires_in.unwrap_or(self.config.token_validity);
        if ttl.is_zero() || ttl > Duration::from_secs(3650 * 86_400) {
            return Err(ApiError::bad_request(
                "expires_in must be between 1s and 10 years",
            ));
        }
        let secret = format!(
            "{TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes(24))
        );
        let now = now_ms();
        let token = EnrolToken {
            id: random_hex(6),
            secret_sha256: hash_secret(&secret),
            label,
            created_at: now,
            expires_at: now.saturating_add(ttl.as_millis() as i64),
            uses_left: uses,
            used: 0,
        };
        self.store.insert_token(token.clone()).await?;
        Ok(NewToken { token, secret })
    }

    /// Check the CSR, sign it, and store the device while spending one use
    /// of the token, all or nothing.
    pub async fn enrol(
        &self,
        token: &str,
        csr_pem: &str,
        name: Option<String>,
    ) -> ApiResult<Enrolled> {
        if !token.starts_with(TOKEN_PREFIX) {
            // Same answer as an unknown token: no oracle for the format.
            return Err(super::store::StoreError::TokenRejected.into());
        }
        let name = name.map(|n| n.trim().to_string()).filter(|n| !n.is_empty());
        if name
            .as_ref()
            .is_some_and(|n| n.len() > MAX_NAME || n.chars().any(char::is_control))
        {
            return Err(ApiError::bad_request(format!(
                "name must be at most {MAX_NAME} bytes without control characters"
            )));
        }
        let device_id = format!("dev-{}", random_hex(10));
        let ca = self.ca();
        let issued = ca
            .sign_csr(csr_pem, &device_id, self.config.cert_validity)
            .map_err(|e| match e {
                CsrError::Invalid => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
                CsrError::Sign(m) => {
                    tracing::error!(error = %m, "devices: signing a CSR failed");
                    ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "could not sign the certificate",
                    )
                }
            })?;
        let device = Device {
            id: device_id.clone(),
            fingerprint: issued.fingerprint.clone(),
            name: name.unwrap_or_else(|| device_id.clone()),
            serial: issued.serial,
            cert_pem: issued.pem.clone(),
            groups: Vec::new(),
            settings: empty_object(),
            session_user: None,
            enrolled_at: now_ms(),
            token_id: None,
            last_contact: None,
            revoked_at: None,
            channel_node: None,
        };
        let ticket = self.cache.ticket();
        let device = self
            .store
            .enrol(hash_secret(token), now_ms(), device)
            .await?;
        // Its first heartbeat follows within moments: what is known now
        // (a new device has no commands yet; one queued since was
        // invalidated after this ticket) saves reading it back.
        self.cache
            .put_device_id(ticket, &device.fingerprint, device.id.as_str().into());
        self.cache.put_pending(ticket, &device.id, 0);
        tracing::info!(device = %device.id, token = ?device.token_id, "devices: enrolled");
        Ok(Enrolled {
            device_id: device.id,
            fingerprint: issued.fingerprint,
            certificate: issued.pem,
            ca: ca.cert_pem.clone(),
        })
    }

    /// The id of the device behind the request's verified client
    /// certificate: 401 without one, 403 when it is unknown or revoked.
    /// Served from memory after the first request: revocation is checked
    /// against the in-memory list (kept current by `mark_revoked`, here and
    /// through the store's events), and certificates of devices that an
    /// import removed are dropped with the whole cache.
    pub async fn authenticate(&self, ctx: &RequestContext) -> ApiResult<Arc<str>> {
        let Some(cert) = &ctx.client_cert else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "a device client certificate is required",
            ));
        };
        if self.is_revoked(&cert.sha256) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "device certificate revoked",
            ));
        }
        if let Some(id) = self.cache.device_id(&cert.sha256) {
            return Ok(id);
        }
        let ticket = self.cache.ticket();
        match self
            .store
            .device_by_fingerprint(cert.sha256.clone())
            .await?
        {
            None => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "unknown device certificate",
            )),
            // The stored flag is authoritative (another balancer may have
            // revoked it a moment ago, and its event not arrived yet).
            Some(d) if d.revoked_at.is_some() => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "device certificate revoked",
            )),
            Some(d) => {
                let id: Arc<str> = d.id.into();
                self.cache.put_device_id(ticket, &cert.sha256, id.clone());
                Ok(id)
            }
        }
    }

    /// Revoke a device: stored first, then refused here and on every
    /// balancer told through the store.
    pub async fn revoke(&self, device_id: &str) -> ApiResult<Device> {
        let device = self
            .store
            .revoke_device(device_id.to_string(), now_ms())
            .await?;
        self.mark_revoked(&device.id, &device.fingerprint);
        self.publish(super::store::StoreEvent::DeviceRevoked {
            device_id: device.id.clone(),
            fingerprint: device.fingerprint.clone(),
        })
        .await;
        tracing::info!(device = %device.id, "devices: revoked");
        Ok(device)
    }
}
