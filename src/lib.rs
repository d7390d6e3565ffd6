//! fleetgate: an L4/L7 load balancer for device-management fleets.
//!
//! Data flows one way: config → plan → runtime; sockets → listener →
//! pool → backend. Health and (later) discovery only write backend state;
//! the connection path only reads it.

pub mod access_log;
pub mod acl;
pub mod admin;
pub mod balance;
pub mod build_info;
pub mod clock;
pub mod config;
pub mod discovery;
pub mod drain;
pub mod frontend;
pub mod host_match;
pub mod http;
pub mod huge_pages;
pub mod l4;
pub mod logging;
pub mod metrics;
pub mod module;
pub mod proxy_protocol;
pub mod runtime;
mod scratch;
pub mod shortage;
pub mod source_limits;
pub mod status;
pub mod syslog;
pub mod systemd;
pub mod tls;
pub mod upgrade;
pub mod workers;
