//! The tools the `fleetgate` command carries besides the balancer: the
//! discovery agent and the device fleet simulator. They are clients of the
//! library's public API (the heartbeat announcer and wire format, the
//! health probes, the TLS helpers) like any embedder, not part of the
//! proxy: they live in the binary, so the library is the proxy alone.

pub mod agent;
pub mod cert;
pub mod manpages;
pub mod simulate;
pub mod version;
