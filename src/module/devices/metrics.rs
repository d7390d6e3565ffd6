//! The devices module's series in `/metrics`: heartbeats answered and
//! command channels open on this balancer, labelled with the module's
//! name so that two devices modules can share one registry.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

pub struct DeviceMetrics {
    pub heartbeats_ok: IntCounter,
    pub heartbeats_failed: IntCounter,
    pub channels_open: IntGauge,
}

impl DeviceMetrics {
    pub fn new(registry: &Registry, module: &str) -> anyhow::Result<DeviceMetrics> {
        let heartbeats = IntCounterVec::new(
            Opts::new(
                "devices_heartbeats_total",
                "Device heartbeats by result: ok (answered once the contact was committed) or failed (refused or the store failed).",
            )
            .const_label("module", module),
            &["result"],
        )?;
        let channels = IntGauge::with_opts(
            Opts::new(
                "devices_channels_open",
                "Device command channels (WebSockets) open on this balancer.",
            )
            .const_label("module", module),
        )?;
        registry.register(Box::new(heartbeats.clone()))?;
        registry.register(Box::new(channels.clone()))?;
        Ok(DeviceMetrics {
            heartbeats_ok: heartbeats.with_label_values(&["ok"]),
            heartbeats_failed: heartbeats.with_label_values(&["failed"]),
            channels_open: channels,
        })
    }
}
