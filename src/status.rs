//! The `/status` document of the admin API: listeners, pools with their
//! backends and states, and the nodes discovery knows.

use serde_json::{json, Value};

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
            let backends: Vec<Value> = p
                .members
                .iter()
                .map(|m| {
                    let b = &m.backend;
                    json!({
                        "address": b.addr.to_string(),
                        "weight": m.weight,
                        "backup": m.backup,
                        "up": b.is_up(),
                        "state": b.state_label(),
                        "active_connections": b.active(),
                        "node": m.node.as_ref().map(|(id, _)| id),
                        "node_state": m.node.as_ref().map(|(_, s)| s.as_str()),
                    })
                })
                .collect();
            json!({
                "name": p.name(),
                "algorithm": format!("{:?}", p.plan.algorithm),
                "discovery_service": p.plan.discovery_service,
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
