//! Per-listener access control: CIDR allow and deny lists.
//!
//! Deny wins over allow; an empty allow list admits every address that is
//! not denied (HAProxy/nginx operators expect "deny first, then allow").

use std::net::IpAddr;

use ipnet::IpNet;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

impl Acl {
    /// Parse both lists; on error returns (field, index, message).
    pub fn parse(allow: &[String], deny: &[String]) -> Result<Acl, (&'static str, usize, String)> {
        Ok(Acl {
            allow: parse_list(allow, "allow")?,
            deny: parse_list(deny, "deny")?,
        })
    }

    pub fn admits(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&ip))
    }
}

/// An IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn parse_list(
    items: &[String],
    field: &'static str,
) -> Result<Vec<IpNet>, (&'static str, usize, String)> {
    items
        .iter()
        .enumerate()
        .map(|(i, s)| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    (
                        field,
                        i,
                        format!("{s:?} is not an IP address or CIDR network (e.g. \"10.0.0.0/8\")"),
                    )
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(allow: &[&str], deny: &[&str]) -> Acl {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        Acl::parse(&s(allow), &s(deny)).unwrap()
    }

    #[test]
    fn deny_wins_and_empty_allow_admits() {
        let a = acl(&[], &["127.0.0.2/32"]);
        assert!(a.admits("127.0.0.1".parse().unwrap()));
        assert!(!a.admits("127.0.0.2".parse().unwrap()));
        let b = acl(&["10.0.0.0/8"], &["10.1.0.0/16"]);
        assert!(b.admits("10.2.3.4".parse().unwrap()));
        assert!(!b.admits("10.1.3.4".parse().unwrap()));
        assert!(!b.admits("192.0.2.1".parse().unwrap()));
        assert!(b.admits("::ffff:10.2.3.4".parse().unwrap()));
    }

    #[test]
    fn bad_entry_names_index() {
        let err = Acl::parse(&["10.0.0.0/8".into(), "nope".into()], &[]).unwrap_err();
        assert_eq!((err.0, err.1), ("allow", 1));
    }
}
