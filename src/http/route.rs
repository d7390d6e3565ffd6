//! Host and path routing for offloaded HTTP: first match wins.

use regex::Regex;

pub use crate::host_match::HostMatch;

#[derive(Debug, Clone)]
pub enum PathMatch {
    Prefix(String),
    Regex(Regex),
}

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            PathMatch::Regex(r) => r.is_match(path),
        }
    }
}

/// Where a matching request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Pool(String),
    /// An in-process backend module, registered by name.
    Module(String),
}

#[derive(Debug, Clone)]
pub struct RoutePlan {
    /// Label for metrics and logs.
    pub name: String,
    pub host: Option<HostMatch>,
    pub path: PathMatch,
    pub target: Target,
    /// Add the verified client certificate header(s) on this route.
    pub forward_cert: bool,
}

impl RoutePlan {
    pub fn matches(&self, host: &str, path: &str) -> bool {
        self.host.as_ref().is_none_or(|h| h.matches(host)) && self.path.matches(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_rules() {
        let w = HostMatch::parse("*.Example.com").unwrap();
        assert!(w.matches("a.example.com"));
        assert!(w.matches("a.b.example.com"));
        assert!(!w.matches("example.com"));
        assert!(!w.matches("badexample.com"));
        assert!(HostMatch::parse("a.*.com").is_err());
    }

    #[test]
    fn field_notes_paths() {
        let r = PathMatch::Regex(
            Regex::new("^/device-connector/device/(ws-connect|portforwarding)").unwrap(),
        );
        assert!(r.matches("/device-connector/device/ws-connect"));
        assert!(r.matches("/device-connector/device/portforwarding/7"));
        assert!(!r.matches("/device-connector/device/other"));
        assert!(PathMatch::Prefix("/".into()).matches("/anything"));
    }
}
