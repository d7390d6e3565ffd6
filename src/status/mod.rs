//! The `/status` document of the admin API: listeners, pools with their
//! backends and states, and the nodes discovery knows.

use serde_json::{json, Value};

use crate::balance::Role;
use crate::config::ListenerMode;
use crate::runtime::Runtime;

pub fn document(rt: &Runtime) -> Value {
    let plan = rt.plan();
    let listeners: Vec<Value> = plan
        .listeners
        .iter()
        .map(|l| {
            let mode = match &l.mode {
                ListenerMode::Tcp { .. } => "tcp",
                ListenerMode::Passthrough(_) => "passthrough",
                ListenerMode::Offload(_) => "offload",
            };
            json!({ "name": l.name, "bind": l.bind.to_string(), "mode": mode, "pools": l.mode.pools() })
        })
        .collect();
    let mut pools: Vec<Value> = rt
        .pools()
        .iter()
        .map(|p| {
            let set = p.members();
            let backends: Vec<Value> = set
                .members
                .iter()
                .map(|m| {
                    let b = &m.backend;
                    json!({
                        "address": b.addr.to_string(),
                        "weight": m.weight,
                        "backup": m.role == Role::Backup,
                        "role": match m.role {
                            Role::Primary => "primary",
                            Role::Backup => "backup",
                            Role::Resting => "resting",
                        },
                        "up": b.is_up(),
                        "state": b.state_label(),
                        "active_connections": b.active(),
                        "node": m.origin.as_ref().map(|o| &*o.node),
                        "node_state": m.origin.as_ref().map(|o| o.state),
                    })
                })
                .collect();
            json!({
                "name": p.name(),
                "algorithm": format!("{:?}", set.plan.algorithm),
                "discovery_service": set.plan.discovery_service,
                "backends": backends,
            })
        })
        .collect();
    pools.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    let nodes: Vec<Value> = rt
        .discovery
        .as_ref()
        .map(|d| {
            d.registry()
                .snapshot()
                .nodes
                .iter()
                .map(|n| {
                    json!({
                        "id": n.id,
                        "address": n.addr.to_string(),
                        "state": n.state.as_str(),
                        "weight": n.weight,
                        "load": n.load,
                        "services": n.services.iter().map(|s| json!({"name": s.name, "port": s.port, "tls": s.tls})).collect::<Vec<_>>(),
                        "seconds_since_heartbeat": n.last_heard.elapsed().as_secs_f64(),
                        "boot_id": format!("{:016x}", n.boot_id),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "config": plan.source.display().to_string(),
        "open_connections": rt.tracker.open(),
        "listeners": listeners,
        "pools": pools,
        "discovery": rt.discovery.as_ref().map(|d| json!({
            "listening": d.local_addr().to_string(),
            "nodes": nodes,
        })),
    })
}
