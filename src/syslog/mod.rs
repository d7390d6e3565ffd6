//! RFC 5424 syslog export of the event log (and optionally access lines).
//!
//! One server at a time, set by `configure` at start and on every reload;
//! its sender (queue and thread) is replaced when the section changes and
//! stopped when it is removed.

mod layer;
mod message;
mod metrics;
mod sender;
mod settings;
mod transport;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;

pub use layer::SyslogLayer;
pub use metrics::register as register_metrics;
pub use settings::{SyslogPlan, Transport, FACILITIES};

use message::Record;
use metrics::Stream;
use sender::Sender;

static CURRENT: ArcSwapOption<Sender> = ArcSwapOption::const_empty();

/// How long the sender gets at exit to send what it has queued.
const FLUSH: Duration = Duration::from_secs(1);

fn current() -> Option<Arc<Sender>> {
    CURRENT.load_full()
}

fn running() -> bool {
    CURRENT.load().is_some()
}

/// Hand one message to the running sender, if any. Reads the slot
/// without taking a reference count: access lines come from every
/// connection worker at once.
fn send(stream: Stream, record: impl FnOnce() -> Record) -> bool {
    match CURRENT.load().as_ref() {
        Some(sender) => sender.send(stream, record()),
        None => false,
    }
}

/// Send to `plan`'s server from now on (`None`: stop sending). An
/// unchanged section keeps its sender, queue and connection.
pub fn configure(plan: Option<&SyslogPlan>) -> std::io::Result<()> {
    let running = current();
    if running.as_ref().map(|s| &s.plan) == plan {
        return Ok(());
    }
    let next = match plan {
        Some(p) => Some(Arc::new(Sender::start(p.clone())?)),
        None => None,
    };
    // Said before the switch, so that the old server hears it too.
    match plan {
        Some(p) => tracing::info!(
            "syslog: sending events to {} (facility {}, app_name {})",
            p.transport,
            p.facility,
            p.app_name
        ),
        None => tracing::info!("syslog: no longer sending (removed from the configuration)"),
    }
    // The replaced sender's thread sends what it has queued and ends on
    // its own once the last handle is gone; a reload does not wait for it.
    CURRENT.store(next);
    drop(running);
    Ok(())
}

/// Stop sending, giving the queue a moment to empty (at exit).
pub fn stop() {
    if let Some(old) = CURRENT.swap(None) {
        finish(old);
    }
}

fn finish(mut sender: Arc<Sender>) {
    // A thread that is logging holds it for the instant of one send.
    for _ in 0..100 {
        match Arc::try_unwrap(sender) {
            Ok(s) => return s.finish(FLUSH),
            Err(held) => sender = held,
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Queue one access-log line for the `[syslog]` server (severity info,
/// MSGID `access`). Never blocks: returns false when no syslog is running
/// or the line was dropped.
pub fn send_access(line: &str) -> bool {
    send(Stream::Access, || Record {
        time: SystemTime::now(),
        severity: message::severity::INFO,
        msgid: "access",
        fields: Vec::new(),
        msg: line.trim_end_matches(['\r', '\n']).to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// `send_access` queues one message that arrives octet-counted on TCP,
    /// with the access MSGID, severity info and the configured facility.
    #[test]
    fn send_access_is_framed() {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let plan = SyslogPlan {
            transport: Transport::Tcp(server.local_addr().unwrap()),
            facility: 16,
            app_name: "fg-test".into(),
        };
        assert!(!send_access("before"), "no server configured yet");
        configure(Some(&plan)).unwrap();
        assert!(send_access("GET / 200\n"));
        let (mut conn, _) = server.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let message = loop {
            let n = conn.read(&mut buf).unwrap();
            assert!(n > 0, "closed after {got:?}");
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8(got.clone()).unwrap();
            let Some((len, rest)) = text.split_once(' ') else {
                continue;
            };
            let len: usize = len.parse().unwrap();
            if rest.len() >= len {
                assert_eq!(rest.len(), len, "exactly one frame");
                break rest.to_string();
            }
        };
        // facility local0 (16) * 8 + info (6)
        assert!(message.starts_with("<134>1 "), "{message}");
        let fields: Vec<&str> = message.splitn(8, ' ').collect();
        assert_eq!(fields[3], "fg-test");
        assert_eq!(fields[4], std::process::id().to_string());
        assert_eq!(fields[5], "access");
        assert_eq!(fields[6], "-");
        assert_eq!(fields[7], "GET / 200");
        stop();
        assert!(!send_access("after"));
    }
}
