//! The `[syslog]` section, once validated.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Where RFC 5424 messages go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    Udp(SocketAddr),
    /// Octet-counted framing (RFC 6587 §3.4.1).
    Tcp(SocketAddr),
    /// A local datagram socket such as `/dev/log`.
    Unix(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyslogPlan {
    pub transport: Transport,
    /// The RFC 5424 facility code (0–23): `daemon` is 3, `local0` 16.
    pub facility: u8,
    pub app_name: String,
}

/// Facility names as syslog.conf writes them, with their codes.
pub const FACILITIES: &[(&str, u8)] = &[
    ("kern", 0),
    ("user", 1),
    ("mail", 2),
    ("daemon", 3),
    ("auth", 4),
    ("syslog", 5),
    ("lpr", 6),
    ("news", 7),
    ("uucp", 8),
    ("cron", 9),
    ("authpriv", 10),
    ("ftp", 11),
    ("local0", 16),
    ("local1", 17),
    ("local2", 18),
    ("local3", 19),
    ("local4", 20),
    ("local5", 21),
    ("local6", 22),
    ("local7", 23),
];

impl std::fmt::Display for Transport {
    /// As the configuration writes it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::Udp(a) => write!(f, "udp://{a}"),
            Transport::Tcp(a) => write!(f, "tcp://{a}"),
            Transport::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}
