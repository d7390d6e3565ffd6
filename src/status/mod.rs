//! What the admin listener shows of the running balancer: the `/status`
//! JSON document (listeners, pools with their backends and states, the
//! nodes discovery knows, the certificates in use, the modules (with
//! whether each can do its work, `Module::ready`), the
//! configuration and the last reload) and the HTML page at `/` made from
//! the same document.

pub mod page;
mod record;

use std::sync::{Arc, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::balance::Role;
use crate::config::ListenerMode;
use crate::runtime::Runtime;
use crate::tls::inventory;

pub use record::{Rates, Record, Reload};

/// Unix seconds, with milliseconds.
fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| (d.as_millis() as f64) / 1000.0)
}

pub async fn document(rt: &Runtime) -> Value {
    let plan = rt.plan();
    let now = SystemTime::now();
    let counts = record::listener_counts(&rt.metrics);
    let listeners: Vec<Value> = plan
        .listeners
        .iter()
        .map(|l| {
            let mode = match &l.mode {
                ListenerMode::Tcp { .. } => "tcp",
                ListenerMode::Passthrough(_) => "passthrough",
                ListenerMode::Offload(_) => "offload",
            };
            let (accepted, requests) = counts.get(&l.name).copied().unwrap_or_default();
            let rates = rt.status.rates(&l.name);
            json!({
                "name": l.name,
                "bind": l.bind.to_string(),
                "mode": mode,
                "pools": l.mode.pools(),
                "open_connections": rt.metrics.connections_active.with_label_values(&[&l.name]).get(),
                "connections_total": accepted,
                "requests_total": requests,
                "connections_per_second": rates.map(|r| r.connections),
                "requests_per_second": rates.map(|r| r.requests),
            })
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
                    let node_state = m.origin.as_ref().map(|o| o.state);
                    let reason = b.down_reason().or_else(|| match node_state {
                        Some(s) if s != "normal" => Some(format!("node {s}")),
                        _ => None,
                    });
                    let last_check = b.last_check().map(|c| {
                        json!({
                            "at": unix(c.at),
                            "seconds_ago": now.duration_since(c.at).map_or(0.0, |d| d.as_secs_f64()),
                            "ok": c.result.is_ok(),
                            "error": c.result.err(),
                        })
                    });
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
                        "reason": reason,
                        "active_connections": b.active(),
                        "last_check": last_check,
                        "node": m.origin.as_ref().map(|o| &*o.node),
                        "node_state": node_state,
                    })
                })
                .collect();
            json!({
                "name": p.name(),
                "algorithm": format!("{:?}", set.plan.algorithm),
                "discovery_service": set.plan.discovery_service,
                "health_check": set.plan.health_check.as_ref().map(|h| format!("{:?} every {:?}", h.kind, h.interval).to_lowercase()),
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
    let unix_now = inventory::unix_now();
    let certificates: Vec<Value> = inventory::inventory(&plan)
        .into_iter()
        .map(|c| {
            let mut v = serde_json::to_value(&c).expect("plain values");
            v["days_left"] = json!(c.days_left(unix_now));
            v["expiring"] = json!(c.expiring(unix_now));
            v["expired"] = json!(c.expired(unix_now));
            v
        })
        .collect();
    let mut modules = Vec::new();
    for m in &plan.modules {
        let (status, ready) = match rt.modules.get(&m.name) {
            Some(module) => (module.status().await, module.ready()),
            None => (None, Ok(())),
        };
        modules.push(json!({
            "name": m.name,
            "kind": m.kind,
            "status": status,
            "required": m.required,
            "ready": ready.is_ok(),
            "not_ready_reason": ready.err(),
        }));
    }
    let reload = rt.status.last_reload().map(|r| {
        json!({
            "at": unix(r.at),
            "result": if r.result.is_ok() { "ok" } else { "error" },
            "error": r.result.err(),
        })
    });
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "generated_at": unix(now),
        "config": plan.source.display().to_string(),
        "config_loaded_at": rt.status.loaded_at().map(unix),
        "last_reload": reload,
        "open_connections": rt.tracker.open(),
        "listeners": listeners,
        "pools": pools,
        "discovery": rt.discovery.as_ref().map(|d| json!({
            "listening": d.local_addr().to_string(),
            "nodes": nodes,
        })),
        "certificates": certificates,
        "certificate_warn_days": inventory::WARN_DAYS,
        "modules": modules,
    })
}

/// Sample listener rates and repeat certificate warnings daily, for as
/// long as the runtime lives.
pub async fn sample(rt: Weak<Runtime>) {
    let mut tick = tokio::time::interval(record::SAMPLE_EVERY);
    loop {
        tick.tick().await;
        let Some(rt) = rt.upgrade() else { return };
        rt.status.tick(&rt.metrics, &rt.plan());
    }
}

/// Called by the runtime once the first plan runs: the daily warnings
/// and rate sampling start from here.
pub fn started(rt: &Arc<Runtime>) -> tokio::task::JoinHandle<()> {
    rt.status.applied(&rt.metrics, &rt.plan());
    tokio::spawn(sample(Arc::downgrade(rt)))
}
