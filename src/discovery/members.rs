//! The nodes announcing a service, as members of the pool that follows
//! it: the adapter between the registry and `balance`.
//!
//! A `normal` node is a primary; an `update` node is used only while no
//! primary is up (during a rolling upgrade all but one server are in
//! update mode at once); a `draining` node stays listed but takes no new
//! connection, so its health state and connection count survive until it
//! is back; a `leaving` node is gone from the pool.

use std::sync::Arc;

use tokio::sync::watch;

use super::registry::Registry;
use super::wire::NodeState;
use crate::balance::{MemberSource, MemberSpec, Origin, Role};

pub struct DiscoveredMembers {
    registry: Arc<Registry>,
    service: String,
}

impl DiscoveredMembers {
    pub fn new(registry: Arc<Registry>, service: impl Into<String>) -> Self {
        DiscoveredMembers {
            registry,
            service: service.into(),
        }
    }
}

impl MemberSource for DiscoveredMembers {
    fn members(&self) -> Vec<MemberSpec> {
        self.registry
            .endpoints(&self.service)
            .into_iter()
            .filter_map(|e| {
                let role = match e.state {
                    NodeState::Normal => Role::Primary,
                    NodeState::Update => Role::Backup,
                    NodeState::Draining => Role::Resting,
                    NodeState::Leaving => return None,
                };
                Some(MemberSpec {
                    addr: e.addr,
                    weight: u32::from(e.weight),
                    role,
                    origin: Some(Origin {
                        node: e.node.into(),
                        state: e.state.as_str(),
                    }),
                })
            })
            .collect()
    }

    fn changes(&self) -> Option<watch::Receiver<u64>> {
        Some(self.registry.subscribe())
    }
}
