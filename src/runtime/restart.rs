//! The settings a reload cannot apply to a running process. A reload that
//! changes one of them is refused whole, with the key named, and the
//! running configuration stays: nothing is silently left unapplied.

use crate::config::{DiscoveryPlan, Plan};

/// `Err` names the first setting of `new` that needs a restart.
pub fn needs_restart(old: &Plan, new: &Plan) -> Result<(), String> {
    let refuse = |key: &str, what: &dyn std::fmt::Display| {
        Err(format!(
            "{key} changed ({what}): this needs a restart; the reload is refused and the running configuration stays"
        ))
    };
    if old.modules != new.modules {
        let name = old
            .modules
            .iter()
            .chain(&new.modules)
            .find(|m| !old.modules.contains(m) || !new.modules.contains(m))
            .map_or("", |m| m.name.as_str());
        return refuse("[module]", &format_args!("module {name:?}"));
    }
    if old.data_dir != new.data_dir {
        return refuse(
            "[global] data_dir",
            &format_args!("{} → {}", old.data_dir.display(), new.data_dir.display()),
        );
    }
    if old.admin_bind != new.admin_bind {
        return refuse(
            "[admin] bind",
            &format_args!("{} → {}", old.admin_bind, new.admin_bind),
        );
    }
    if old.control_socket != new.control_socket {
        return refuse(
            "[global] control_socket",
            &format_args!(
                "{} → {}",
                old.control_socket.display(),
                new.control_socket.display()
            ),
        );
    }
    if old.worker_threads != new.worker_threads {
        return refuse(
            "[global] worker_threads",
            &format_args!("{} → {}", old.worker_threads, new.worker_threads),
        );
    }
    if old.transparent_huge_pages != new.transparent_huge_pages {
        return refuse(
            "[global] transparent_huge_pages",
            &format_args!(
                "{} → {}",
                old.transparent_huge_pages, new.transparent_huge_pages
            ),
        );
    }
    if old.cpu_affinity != new.cpu_affinity {
        return refuse(
            "[global] cpu_affinity",
            &format_args!("{:?} → {:?}", old.cpu_affinity, new.cpu_affinity),
        );
    }
    match (&old.discovery, &new.discovery) {
        (None, None) => Ok(()),
        (None, Some(_)) => refuse("[discovery]", &"added"),
        (Some(_), None) => refuse("[discovery]", &"removed"),
        (Some(a), Some(b)) => match discovery_change(a, b) {
            None => Ok(()),
            Some((key, what)) => refuse(&format!("[discovery] {key}"), &what),
        },
    }
}

/// The first receiver setting that differs, and how.
fn discovery_change(a: &DiscoveryPlan, b: &DiscoveryPlan) -> Option<(&'static str, String)> {
    if a.bind != b.bind {
        return Some(("bind", format!("{} → {}", a.bind, b.bind)));
    }
    if a.cluster != b.cluster {
        return Some(("cluster", format!("{:?} → {:?}", a.cluster, b.cluster)));
    }
    if a.token.fingerprint() != b.token.fingerprint() {
        return Some(("token_file", "the token is different".into()));
    }
    if a.interval != b.interval {
        return Some(("interval", format!("{:?} → {:?}", a.interval, b.interval)));
    }
    if a.miss_limit != b.miss_limit {
        return Some(("miss_limit", format!("{} → {}", a.miss_limit, b.miss_limit)));
    }
    if a.multicast != b.multicast {
        return Some((
            "multicast",
            format!("{:?} → {:?}", a.multicast, b.multicast),
        ));
    }
    if a.max_clock_skew != b.max_clock_skew {
        return Some((
            "max_clock_skew",
            format!("{:?} → {:?}", a.max_clock_skew, b.max_clock_skew),
        ));
    }
    debug_assert!(a.same_receiver(b));
    None
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    #[test]
    fn the_control_socket_needs_a_restart() {
        let base = "[[pool]]\nname = \"p\"\nbackends = [{ address = \"127.0.0.1:9\" }]\n\n[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:1\"\nmode = \"tcp\"\npool = \"p\"\n";
        let f = Path::new("/etc/fg/f.toml");
        let old = crate::config::parse(base, f).unwrap();
        let moved = format!("[global]\ncontrol_socket = \"/run/fg.sock\"\n{base}");
        let new = crate::config::parse(&moved, f).unwrap();
        assert_eq!(super::needs_restart(&old, &old), Ok(()));
        let e = super::needs_restart(&old, &new).unwrap_err();
        assert!(e.starts_with("[global] control_socket changed"), "{e}");
    }
}
