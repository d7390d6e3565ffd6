//! Where a pool's members come from. A pool reads its member list from
//! one or more sources (the static list of the configuration, and the
//! nodes that discovery hears announcing a service) and is told when a
//! source changed; it then replaces its member set and nothing else.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;

use super::settings::BackendPlan;

/// How a member takes part in balancing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Takes new connections.
    Primary,
    /// Takes new connections only while no primary is up.
    Backup,
    /// Listed (it keeps its health state, probe and connection count) but
    /// takes no new connection: a server that is draining.
    Resting,
}

/// Who announced a member, for operators reading `/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub node: Arc<str>,
    /// The node's announced state, as it names it.
    pub state: &'static str,
}

/// One member as a source lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberSpec {
    pub addr: SocketAddr,
    pub weight: u32,
    pub role: Role,
    pub origin: Option<Origin>,
}

/// A list of members that may change over time.
pub trait MemberSource: Send + Sync + 'static {
    /// The members now.
    fn members(&self) -> Vec<MemberSpec>;

    /// Changes whenever `members` may return something new; `None` for a
    /// source that never changes.
    fn changes(&self) -> Option<watch::Receiver<u64>>;
}

/// The backends listed in the configuration.
pub struct StaticMembers(pub Vec<BackendPlan>);

impl MemberSource for StaticMembers {
    fn members(&self) -> Vec<MemberSpec> {
        self.0
            .iter()
            .map(|b| MemberSpec {
                addr: b.addr,
                weight: b.weight,
                role: if b.backup {
                    Role::Backup
                } else {
                    Role::Primary
                },
                origin: None,
            })
            .collect()
    }

    fn changes(&self) -> Option<watch::Receiver<u64>> {
        None
    }
}
