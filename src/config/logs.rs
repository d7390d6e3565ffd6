//! Validation of where logs go: `[syslog]` and each listener's
//! `access_log`.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;

use super::error::SemanticError;
use super::schema;
use crate::access_log::{AccessLogPlan, Destination};
use crate::key_path;
use crate::syslog::{SyslogPlan, Transport, FACILITIES};

pub fn syslog(s: Option<&schema::Syslog>) -> Result<Option<SyslogPlan>, SemanticError> {
    let Some(s) = s else { return Ok(None) };
    let transport = transport(&s.address)
        .map_err(|msg| SemanticError::new(key_path!["syslog", "address"], msg))?;
    let facility = FACILITIES
        .iter()
        .find(|(name, _)| *name == s.facility)
        .map(|(_, code)| *code)
        .ok_or_else(|| {
            let names: Vec<&str> = FACILITIES.iter().map(|(n, _)| *n).collect();
            SemanticError::new(
                key_path!["syslog", "facility"],
                format!(
                    "unknown facility {:?} (one of: {})",
                    s.facility,
                    names.join(", ")
                ),
            )
        })?;
    // RFC 5424 APP-NAME: 1–48 printable US-ASCII characters, no space.
    if s.app_name.is_empty()
        || s.app_name.len() > 48
        || !s.app_name.bytes().all(|b| (33..=126).contains(&b))
    {
        return Err(SemanticError::new(
            key_path!["syslog", "app_name"],
            "app_name must be 1 to 48 printable ASCII characters without spaces (RFC 5424)",
        ));
    }
    Ok(Some(SyslogPlan {
        transport,
        facility,
        app_name: s.app_name.clone(),
    }))
}

fn transport(address: &str) -> Result<Transport, String> {
    let resolve = |hp: &str| -> Result<SocketAddr, String> {
        if let Ok(a) = hp.parse() {
            return Ok(a);
        }
        hp.to_socket_addrs()
            .map_err(|e| format!("{hp:?}: {e}"))?
            .next()
            .ok_or_else(|| format!("{hp:?} resolves to no address"))
    };
    if let Some(hp) = address.strip_prefix("udp://") {
        Ok(Transport::Udp(resolve(hp)?))
    } else if let Some(hp) = address.strip_prefix("tcp://") {
        Ok(Transport::Tcp(resolve(hp)?))
    } else if let Some(path) = address.strip_prefix("unix://") {
        if !path.starts_with('/') {
            return Err(format!(
                "{address:?}: a unix socket path must be absolute (e.g. \"unix:///dev/log\")"
            ));
        }
        Ok(Transport::Unix(path.into()))
    } else {
        Err(format!(
            "{address:?}: expected \"udp://HOST:PORT\", \"tcp://HOST:PORT\" or \"unix:///dev/log\""
        ))
    }
}

pub fn access_log(
    a: Option<&schema::AccessLog>,
    listener: usize,
    base: &Path,
    has_syslog: bool,
) -> Result<Option<AccessLogPlan>, SemanticError> {
    let Some(a) = a else { return Ok(None) };
    let destination = match a.path.as_str() {
        "" => {
            return Err(SemanticError::new(
                key_path!["listener", listener, "access_log", "path"],
                "path must be a file, \"stdout\" or \"syslog\"",
            ))
        }
        "stdout" => Destination::Stdout,
        "syslog" if !has_syslog => {
            return Err(SemanticError::new(
                key_path!["listener", listener, "access_log", "path"],
                "\"syslog\" needs a [syslog] section saying where the server is",
            ))
        }
        "syslog" => Destination::Syslog,
        file => Destination::File(base.join(file)),
    };
    Ok(Some(AccessLogPlan {
        destination,
        format: a.format,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transports() {
        assert_eq!(
            transport("udp://127.0.0.1:514").unwrap(),
            Transport::Udp("127.0.0.1:514".parse().unwrap())
        );
        assert_eq!(
            transport("tcp://[::1]:601").unwrap(),
            Transport::Tcp("[::1]:601".parse().unwrap())
        );
        assert_eq!(
            transport("unix:///dev/log").unwrap(),
            Transport::Unix("/dev/log".into())
        );
        assert!(transport("unix://dev/log").is_err());
        assert!(transport("127.0.0.1:514").is_err());
        assert!(transport("udp://nowhere").is_err());
    }
}
