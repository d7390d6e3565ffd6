//! Checks for the PROXY protocol keys: a listener's `proxy_protocol`
//! table and a pool's `send_proxy`.

use super::error::SemanticError;
use super::plan::{ListenerMode, ListenerPlan, PoolPlan};
use super::schema;
use crate::key_path;
use crate::proxy_protocol::accept::AcceptPlan;

pub fn accept(l: &schema::Listener, i: usize) -> Result<Option<AcceptPlan>, SemanticError> {
    let Some(pp) = &l.proxy_protocol else {
        return Ok(None);
    };
    let at = |k: &str| key_path!["listener", i, "proxy_protocol", k];
    if pp.from.is_empty() {
        return Err(SemanticError::new(
            at("from"),
            "list the addresses or networks of the proxies that send PROXY headers (an empty list would refuse every connection)",
        ));
    }
    let from = pp
        .from
        .iter()
        .enumerate()
        .map(|(j, s)| {
            s.parse::<ipnet::IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    SemanticError::new(
                        key_path!["listener", i, "proxy_protocol", "from", j],
                        format!("{s:?} is not an IP address or CIDR network (e.g. \"10.0.0.0/8\")"),
                    )
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let timeout = match (pp.timeout, l.mode) {
        (Some(t), _) => t.0,
        (None, schema::Mode::Offload) => l.handshake_timeout.0,
        (None, _) => l.hello_timeout.0,
    };
    if timeout.is_zero() {
        return Err(SemanticError::new(
            at("timeout"),
            "timeout must be greater than zero",
        ));
    }
    Ok(Some(AcceptPlan { from, timeout }))
}

/// `send_proxy` is for pools that L4 listeners forward to. An offload
/// listener keeps backend connections alive and hands them from one
/// client to the next, so a header naming the first client would be
/// wrong for every later request on the connection.
pub fn check_send_proxy(
    listeners: &[ListenerPlan],
    pools: &[PoolPlan],
) -> Result<(), SemanticError> {
    for l in listeners {
        if !matches!(l.mode, ListenerMode::Offload(_)) {
            continue;
        }
        for name in l.mode.pools() {
            let Some(j) = pools.iter().position(|p| p.name == name) else {
                continue;
            };
            if pools[j].send_proxy.is_some() {
                return Err(SemanticError::new(
                    key_path!["pool", j, "send_proxy"],
                    format!(
                        "send_proxy applies to pools of tcp and passthrough listeners; pool {name:?} is used by offload listener {:?}, whose backend connections are shared between clients (the client address reaches those backends in X-Forwarded-For)",
                        l.name
                    ),
                ));
            }
        }
    }
    Ok(())
}
