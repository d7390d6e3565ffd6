//! Process-wide descriptor shortage: when a connection cannot get a socket
//! (EMFILE, ENFILE, no buffer memory), every accept loop pauses for a
//! moment, as HAProxy pauses its listeners on a resource shortage.
//!
//! Without the pause each worker would accept the descriptor a closing
//! connection just freed, fail to open the backend socket, and close the
//! client: the listen queue drains into errors. Paused, those clients keep
//! waiting in the queue and are served once descriptors are free again.
//!
//! Before the process runs out, the descriptor reserve refuses proxied
//! connections: the last `descriptor_reserve` descriptors below the
//! RLIMIT_NOFILE soft limit stay free for the admin listener (metrics,
//! health checks) and for backend sockets of connections already
//! accepted. The signal is the number of the descriptor accept returned:
//! the kernel hands out the lowest free number, so a number in the top
//! `reserve` means fewer than that are left. It costs one comparison.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::now_ms;

/// How long accepting stops after a shortage is seen.
pub const PAUSE: Duration = Duration::from_millis(100);

/// The monotonic clock reading (clock.rs) until which accepting is paused;
/// 0: not paused.
static UNTIL_MS: AtomicU64 = AtomicU64::new(0);

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

/// Descriptors kept back when `descriptor_reserve` is not configured: at
/// most this many, and at most a quarter of the limit (so that a small
/// limit still leaves most descriptors to connections).
pub const DEFAULT_RESERVE: u64 = 64;

/// Accepted descriptors numbered this or higher are in the reserve
/// (`u64::MAX`: no reserve).
static RESERVE_FROM: AtomicU64 = AtomicU64::new(u64::MAX);

/// Set the reserve from the configured size (`None`: the default) and the
/// current soft limit. Called on start and on every reload, which also
/// picks up a limit changed with prlimit(1) meanwhile. Returns the
/// descriptor number from which proxied connections are refused.
pub fn set_reserve(configured: Option<u64>) -> Option<u64> {
    let from = fd_soft_limit().and_then(|limit| reserve_from(limit, configured));
    RESERVE_FROM.store(from.unwrap_or(u64::MAX), Ordering::Relaxed);
    from
}

/// The first reserved descriptor number under `limit`, if any.
fn reserve_from(limit: u64, configured: Option<u64>) -> Option<u64> {
    let reserve = configured.unwrap_or((limit / 4).min(DEFAULT_RESERVE));
    if reserve == 0 {
        return None;
    }
    if reserve >= limit {
        tracing::warn!(
            reserve,
            limit,
            "descriptor_reserve is not below the open-file limit: every proxied connection will be refused"
        );
    }
    Some(limit.saturating_sub(reserve))
}

/// Whether an accepted socket took a descriptor from the reserve.
#[cfg(unix)]
pub fn in_reserve(socket: &impl std::os::fd::AsRawFd) -> bool {
    socket.as_raw_fd() as u64 >= RESERVE_FROM.load(Ordering::Relaxed)
}

#[cfg(not(unix))]
pub fn in_reserve<T>(_: &T) -> bool {
    false
}

/// The soft limit on open files, from /proc/self/limits (Linux); `None`
/// where that is not available or the limit is unlimited.
fn fd_soft_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
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

    #[test]
    fn the_reserve_is_the_top_of_the_descriptor_range() {
        assert_eq!(reserve_from(1024, Some(100)), Some(924));
        assert_eq!(reserve_from(1024, Some(0)), None);
        assert_eq!(reserve_from(1024, Some(2000)), Some(0), "refuses all");
        // The default: 64, at most a quarter of the limit.
        assert_eq!(reserve_from(65_536, None), Some(65_472));
        assert_eq!(reserve_from(64, None), Some(48));
        assert_eq!(reserve_from(3, None), None);
        assert!(fd_soft_limit().is_some(), "the limit is readable here");
    }
}
