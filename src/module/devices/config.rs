//! The `[module.NAME]` table of a devices module.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevicesConfig {
    /// Selects this implementation (`devices`); read by the runtime.
    #[serde(default)]
    pub kind: Option<String>,
    /// Whether the balancer is unhealthy while the store is out of reach
    /// (default true); read by the runtime (`ModulePlan::required`).
    #[serde(default)]
    pub required: Option<bool>,
    #[serde(default)]
    pub store: StoreConfig,
    /// Bearer token for the admin API. Without it (and without
    /// `admin_token_file`), one is generated into `<data_dir>/admin-token`.
    #[serde(default)]
    pub admin_token: Option<String>,
    /// File holding the admin token (mode 0600); relative to the data dir.
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    /// How often devices should send a heartbeat.
    #[serde(default = "default_interval", with = "humantime_serde_compat")]
    pub heartbeat_interval: Duration,
    /// Random extra delay (0..jitter) devices add before each heartbeat,
    /// so that a fleet switched on at 8:00 does not call in at 8:00.
    #[serde(default = "default_jitter", with = "humantime_serde_compat")]
    pub heartbeat_jitter: Duration,
    /// Extra time a last-contact update may wait to be written with others.
    /// 0 (the default): group commit only, each transaction takes what
    /// queued while the previous one ran (see heartbeat.rs). Older configs
    /// set 50ms, which still works but adds up to that to every heartbeat.
    #[serde(default, with = "humantime_serde_compat")]
    pub heartbeat_flush: Duration,
    /// Most last-contact updates written in one transaction.
    #[serde(default = "default_batch")]
    pub heartbeat_batch: usize,
    /// Longest the device API reuses what it keeps in memory for the
    /// heartbeat (the device behind a certificate, effective settings,
    /// pending-command count). Changes drop these at once, on every
    /// balancer sharing the store (see cache.rs); this only bounds the
    /// staleness a lost notification could cause. 0 disables the cache.
    #[serde(default = "default_cache_ttl", with = "humantime_serde_compat")]
    pub cache_ttl: Duration,
    /// Read every device's heartbeat answers into memory at start, after a
    /// resync and at half `cache_ttl` (see warm.rs), so that no heartbeat
    /// waits on the store for them, even on a balancer that just took over
    /// a lost one's devices.
    #[serde(default = "default_true")]
    pub cache_warm: bool,
    /// A device counts as online if it was heard from within
    /// interval + jitter + this.
    #[serde(default = "default_grace", with = "humantime_serde_compat")]
    pub online_grace: Duration,
    /// Validity of issued device certificates.
    #[serde(default = "default_cert_validity", with = "humantime_serde_compat")]
    pub cert_validity: Duration,
    /// Validity of enrolment tokens created without `expires_in`.
    #[serde(default = "default_token_validity", with = "humantime_serde_compat")]
    pub token_validity: Duration,
    /// Largest request body accepted (bytes).
    #[serde(default = "default_max_body")]
    pub max_body: usize,
    /// Largest import accepted on the admin API (bytes).
    #[serde(default = "default_max_import")]
    pub max_import: usize,
    /// This balancer's name in `channel_node` (which one holds a device's
    /// WebSocket). Default: the host name.
    #[serde(default)]
    pub node: Option<String>,
    /// Interval of WebSocket pings on the command channel (keeps NAT and
    /// idle timeouts from closing it, and finds dead peers).
    #[serde(default = "default_ping", with = "humantime_serde_compat")]
    pub ws_ping: Duration,
    /// How often this balancer renews its node lease (see lease.rs).
    #[serde(default = "default_lease_renew", with = "humantime_serde_compat")]
    pub lease_renew: Duration,
    /// How long a lease lasts without renewal: after that, other balancers
    /// take the node for dead and clear the channels recorded for it.
    #[serde(default = "default_lease", with = "humantime_serde_compat")]
    pub lease: Duration,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum StoreConfig {
    /// `path` relative to the data dir; default `devices.db`.
    Sqlite {
        #[serde(default)]
        path: Option<PathBuf>,
    },
    Postgres {
        url: String,
    },
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig::Sqlite { path: None }
    }
}

impl DevicesConfig {
    pub fn parse(value: &toml::Value) -> anyhow::Result<DevicesConfig> {
        let c: DevicesConfig = serde_path_to_error::deserialize(value.clone())
            .map_err(|e| anyhow::anyhow!("{}: {}", e.path(), e.inner()))?;
        if c.heartbeat_interval.is_zero() {
            anyhow::bail!("heartbeat_interval must be more than 0s");
        }
        if c.heartbeat_batch == 0 {
            anyhow::bail!("heartbeat_batch must be at least 1");
        }
        if c.max_body < 1024 {
            anyhow::bail!("max_body must be at least 1024 bytes (a CSR is about 1 KiB)");
        }
        if c.ws_ping.is_zero() {
            anyhow::bail!("ws_ping must be more than 0s");
        }
        if c.lease_renew.is_zero() || c.lease < c.lease_renew * 2 {
            anyhow::bail!(
                "lease must be at least twice lease_renew (and lease_renew more than 0s)"
            );
        }
        if c.admin_token.is_some() && c.admin_token_file.is_some() {
            anyhow::bail!("set admin_token or admin_token_file, not both");
        }
        if let Some(t) = &c.admin_token {
            if t.len() < 16 {
                anyhow::bail!("admin_token must be at least 16 characters");
            }
        }
        Ok(c)
    }

    /// The window in which a heard-from device counts as online.
    pub fn online_window(&self) -> Duration {
        self.heartbeat_interval + self.heartbeat_jitter + self.online_grace
    }
}

fn default_interval() -> Duration {
    Duration::from_secs(300)
}
fn default_jitter() -> Duration {
    Duration::from_secs(600)
}
fn default_true() -> bool {
    true
}
fn default_cache_ttl() -> Duration {
    Duration::from_secs(600)
}
fn default_batch() -> usize {
    1000
}
fn default_grace() -> Duration {
    Duration::from_secs(120)
}
fn default_cert_validity() -> Duration {
    Duration::from_secs(5 * 365 * 86_400)
}
fn default_token_validity() -> Duration {
    Duration::from_secs(7 * 86_400)
}
fn default_max_body() -> usize {
    64 * 1024
}
fn default_max_import() -> usize {
    256 * 1024 * 1024
}
fn default_ping() -> Duration {
    Duration::from_secs(30)
}
fn default_lease_renew() -> Duration {
    Duration::from_secs(5)
}
fn default_lease() -> Duration {
    Duration::from_secs(15)
}

/// Durations written as humantime strings (`"5m"`, `"10m"`, `"50ms"`).
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<DevicesConfig> {
        DevicesConfig::parse(&toml::from_str::<toml::Value>(text).unwrap())
    }

    #[test]
    fn defaults_and_overrides() {
        let c = parse("kind = \"devices\"").unwrap();
        assert_eq!(c.store, StoreConfig::Sqlite { path: None });
        assert_eq!(c.heartbeat_jitter, Duration::from_secs(600));
        assert_eq!(c.max_body, 65536);
        let c = parse(
            "store = { kind = \"postgres\", url = \"postgres://u@h/db\" }\nheartbeat_interval = \"1m\"\nheartbeat_jitter = \"0s\"",
        )
        .unwrap();
        assert_eq!(
            c.store,
            StoreConfig::Postgres {
                url: "postgres://u@h/db".into()
            }
        );
        assert_eq!(c.online_window(), Duration::from_secs(180));
    }

    #[test]
    fn mistakes_are_named() {
        let e = parse("heartbeat_interval = \"soon\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("heartbeat_interval"), "{e}");
        let e = parse("admin_tokn = \"x\"").unwrap_err().to_string();
        assert!(e.contains("admin_tokn"), "{e}");
        assert!(parse("admin_token = \"short\"").is_err());
        assert!(parse("store = { kind = \"mysql\" }").is_err());
    }
}
