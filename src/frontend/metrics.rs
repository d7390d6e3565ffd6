//! A listener's metric handles, resolved once when the plan is applied so
//! that the connection path does no label lookups.

use prometheus::{IntCounter, IntGauge};

use crate::l4::ByteCounters;
use crate::metrics::{reject, Metrics};

/// Label handles for one listener, resolved when the plan is applied.
pub struct ListenerMetrics {
    pub accepted: IntCounter,
    pub active: IntGauge,
    pub rejected_acl: IntCounter,
    pub rejected_limit: IntCounter,
    pub rejected_no_backend: IntCounter,
    pub rejected_source_rate: IntCounter,
    pub rejected_source_connections: IntCounter,
    pub rejected_descriptor_reserve: IntCounter,
    pub accept_emfile: IntCounter,
    pub accept_other: IntCounter,
    pub bytes: ByteCounters,
    pub proxy_protocol: crate::proxy_protocol::accept::Rejections,
}

impl ListenerMetrics {
    pub fn new(m: &Metrics, name: &str) -> Self {
        let rej = |r| m.connections_rejected.with_label_values(&[name, r]);
        ListenerMetrics {
            accepted: m.connections_accepted.with_label_values(&[name]),
            active: m.connections_active.with_label_values(&[name]),
            rejected_acl: rej(reject::ACL),
            rejected_limit: rej(reject::LIMIT),
            rejected_no_backend: rej(reject::NO_BACKEND),
            rejected_source_rate: rej(reject::SOURCE_RATE),
            rejected_source_connections: rej(reject::SOURCE_CONNECTIONS),
            rejected_descriptor_reserve: rej(reject::DESCRIPTOR_RESERVE),
            accept_emfile: m.accept_errors.with_label_values(&[name, "emfile"]),
            accept_other: m.accept_errors.with_label_values(&[name, "other"]),
            bytes: ByteCounters {
                upstream: m.bytes.with_label_values(&[name, "upstream"]),
                downstream: m.bytes.with_label_values(&[name, "downstream"]),
            },
            proxy_protocol: crate::proxy_protocol::accept::Rejections::new(m, name),
        }
    }
}
