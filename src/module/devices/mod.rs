//! The `devices` module: enrolment with a device CA, heartbeats, layered
//! settings, a command channel over WebSocket, and an admin API, for the
//! devices behind an offload listener. The device API is documented in
//! docs/devices-api.md.
//!
//! ```toml
//! [module.devices]
//! kind = "devices"
//! store = { kind = "sqlite" }        # or { kind = "postgres", url = "postgres://..." }
//! heartbeat_interval = "5m"
//! heartbeat_jitter = "10m"
//! ```
//!
//! Route `/api/v1/` of an offload listener to it (`module = "devices"`)
//! with `client_auth = "optional"` and `client_ca = "module:devices"`: the
//! listener then trusts the module's CA and refuses the devices it revokes
//! at the handshake (a path to `<data_dir>/devices/device-ca.pem` trusts
//! the CA without the revocations).

pub mod admin;
pub mod api;
pub mod ca;
pub mod cache;
pub mod commands;
pub mod config;
pub mod enrol;
mod files;
pub mod heartbeat;
pub mod http;
pub mod hub;
mod lease;
mod metrics;
pub mod model;
mod park;
pub mod readiness;
pub mod service;
pub mod settings;
mod status;
pub mod store;
mod warm;
pub mod ws;

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, Response};

use crate::module::{Body, BoxFuture, Factory, Module, RequestContext};
pub use service::Devices;

/// The module object the runtime holds.
pub struct DevicesModule {
    devices: Arc<Devices>,
    /// Whether the store is reachable (`Module::ready`).
    readiness: readiness::Readiness,
}

impl DevicesModule {
    pub fn devices(&self) -> &Arc<Devices> {
        &self.devices
    }

    /// A 503 is the API's answer to a storage failure: have the store's
    /// reachability checked now, so that `/healthz` follows within a
    /// round trip rather than at the probe's next tick.
    fn watch(&self, resp: Response<Body>) -> Response<Body> {
        if resp.status() == hyper::StatusCode::SERVICE_UNAVAILABLE {
            self.readiness.suspect();
        }
        resp
    }
}

impl Module for DevicesModule {
    fn handle(&self, req: Request<Incoming>, ctx: RequestContext) -> BoxFuture<'_, Response<Body>> {
        Box::pin(async move { self.watch(api::handle(self.devices.clone(), req, ctx).await) })
    }

    fn admin(&self, req: Request<Incoming>) -> Option<BoxFuture<'_, Response<Body>>> {
        Some(Box::pin(async move {
            self.watch(admin::handle(self.devices.clone(), req).await)
        }))
    }

    fn status(&self) -> BoxFuture<'_, Option<serde_json::Value>> {
        Box::pin(async move { Some(status::counts(&self.devices).await) })
    }

    fn ready(&self) -> Result<(), String> {
        self.readiness.ready()
    }

    fn drain(&self, spread: std::time::Duration) -> BoxFuture<'_, ()> {
        self.drain_with(spread, crate::drain::GOING_AWAY)
    }

    fn drain_with(
        &self,
        spread: std::time::Duration,
        reason: crate::drain::CloseReason,
    ) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.devices.hub.drain_with(spread, reason);
            self.devices.hub.wait_empty().await;
        })
    }

    fn handover(&self) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(self.devices.handover())
    }

    fn resume(&self) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(self.devices.take_back())
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        self.readiness.stop();
        Box::pin(self.devices.shutdown())
    }
}

/// The factory for `kind = "devices"`. The module keeps `env.revocations`
/// up to date with the devices that are revoked, so that an offload
/// listener trusting its CA refuses them at the handshake.
pub fn factory() -> Factory {
    Arc::new(move |value, env| {
        let value = value.clone();
        let env = env.clone();
        Box::pin(async move {
            let config = config::DevicesConfig::parse(&value)?;
            let readiness = match &config.store {
                config::StoreConfig::Sqlite { .. } => readiness::Readiness::always(),
                config::StoreConfig::Postgres { url } => readiness::Readiness::probe_postgres(url)?,
            };
            let devices = Devices::start(
                &env.name,
                config,
                &env.data_dir,
                env.revocations.clone(),
                &env.metrics,
            )
            .await?;
            Ok(Arc::new(DevicesModule { devices, readiness }) as Arc<dyn Module>)
        })
    })
}
