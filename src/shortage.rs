//! Process-wide descriptor shortage: when a connection cannot get a socket
//! (EMFILE, ENFILE, no buffer memory), every accept loop pauses for a
//! moment, as HAProxy pauses its listeners on a resource shortage.
//!
//! Without the pause each worker would accept the descriptor a closing
//! connection just freed, fail to open the backend socket, and close the
//! client: the listen queue drains into errors. Paused, those clients keep
//! waiting in the queue and are served once descriptors are free again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long accepting stops after a shortage is seen.
pub const PAUSE: Duration = Duration::from_millis(100);

static EPOCH: OnceLock<Instant> = OnceLock::new();
/// Milliseconds since `EPOCH` until which accepting is paused.
static UNTIL_MS: AtomicU64 = AtomicU64::new(0);

fn now_ms() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Note a shortage: accept loops pause for `PAUSE` from now.
pub fn note() {
    UNTIL_MS.fetch_max(now_ms() + PAUSE.as_millis() as u64, Ordering::Relaxed);
}

/// How much longer accepting stays paused, if it is.
pub fn remaining() -> Option<Duration> {
    let until = UNTIL_MS.load(Ordering::Relaxed);
    if until == 0 {
        return None; // the common case: no clock read at all
    }
    let now = now_ms();
    (until > now).then(|| Duration::from_millis(until - now))
}

/// Whether an I/O error means this process ran out of descriptors or
/// socket memory (not the peer's fault).
pub fn is_shortage(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shortage_pauses_then_expires() {
        note();
        let left = remaining().expect("paused right after a shortage");
        assert!(left <= PAUSE);
        std::thread::sleep(PAUSE + Duration::from_millis(20));
        assert_eq!(remaining(), None);
        let emfile = std::io::Error::from_raw_os_error(libc::EMFILE);
        assert!(is_shortage(&emfile));
        let refused = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert!(!is_shortage(&refused));
    }
}
