//! What the processes say over the control socket. Every message from a
//! client gets exactly one answer (see fdpass.rs).
//!
//! `fleetgate upgrade` (or SIGUSR2) asks the running process for an
//! upgrade; it starts the new binary, which connects back and:
//!
//! 1. `Takeover`, then `Socket { index }` for 0, 1, … until the answer
//!    is `Sockets done`: each answer carries one listening address's
//!    sockets (the admin listener's and the control socket too);
//! 2. `Release`: the old process stops accepting and its modules release
//!    what one process must own alone (the SQLite store); `Released`;
//! 3. the new process opens its stores, starts its modules and accept
//!    loops: `Ready { pid }`; the old one tells systemd the new main pid,
//!    answers `Farewell` and drains.
//!
//! `Failed` at any point ends the upgrade: the old process resumes
//! accepting and takes back what it released.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The environment variable that tells a process it was started by an
/// upgrade, naming the control socket to take over from.
pub const ENV: &str = "FLEETGATE_UPGRADE_FROM";

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum Request {
    /// From `fleetgate upgrade`: start `binary` (default: the running
    /// executable's path) and hand over to it.
    Upgrade {
        binary: Option<PathBuf>,
    },
    /// From the new process.
    Takeover,
    Socket {
        index: usize,
    },
    Release,
    Ready {
        pid: u32,
    },
    /// From the new process: it cannot start (the reason).
    Failed {
        error: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case")]
pub enum Answer {
    /// To `fleetgate upgrade`: the new process serves.
    Upgraded {
        pid: u32,
    },
    /// To either: why not.
    Failed {
        error: String,
    },
    /// To the new process.
    Welcome,
    /// The sockets of one address, attached; `Done` after the last.
    Sockets(Sockets),
    Released,
    Farewell,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Sockets {
    Listener { bind: SocketAddr },
    Admin { bind: SocketAddr },
    Control { path: PathBuf },
    Done,
}
