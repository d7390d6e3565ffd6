//! Host name rules (`device.example`, `*.example`): shared by the SNI
//! routing of passthrough listeners and the Host routing of offload.

/// A host name rule: `device.example` or `*.example` (any subdomain).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    Exact(String),
    /// Stored with its leading dot: `*.example` → `.example`.
    Suffix(String),
}

impl HostMatch {
    pub fn parse(s: &str) -> Result<HostMatch, String> {
        let lower = s.trim().to_ascii_lowercase();
        let bad = |why: &str| Err(format!("{s:?} is not a host name{why}"));
        if let Some(rest) = lower.strip_prefix("*.") {
            if rest.is_empty() || rest.contains('*') {
                return bad(" (a wildcard is written \"*.example.com\")");
            }
            return Ok(HostMatch::Suffix(format!(".{rest}")));
        }
        if lower.is_empty() || lower.contains('*') || lower.contains('/') || lower.contains(' ') {
            return bad(" (write \"device.example.com\" or \"*.example.com\")");
        }
        Ok(HostMatch::Exact(lower))
    }

    /// `host` must already be lowercase and without a port.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Exact(h) => h == host,
            HostMatch::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
        }
    }
}
