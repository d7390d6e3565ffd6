//! systemd's notify protocol (`Type=notify`, sd_notify(3)): readiness,
//! reloads, stopping, a status line and watchdog pings. Every call is a
//! no-op when `NOTIFY_SOCKET` is unset, so running outside systemd costs
//! nothing.
//!
//! The `sd-notify` crate sends the datagrams: it is a few hundred lines
//! over libc, handles abstract socket names (`@…`) and `WATCHDOG_PID`, and
//! reads `CLOCK_MONOTONIC` for `MONOTONIC_USEC`, which std does not expose
//! without `unsafe`.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;

use crate::runtime::Runtime;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("systemd notify: {e}");
    }
}

/// Every listener is bound and the modules are started.
pub fn ready(rt: &Runtime) {
    let status = status_line(rt);
    send(&[NotifyState::Ready, NotifyState::Status(&status)]);
}

/// A reload starts (systemd ≥ 253 wants the monotonic time with it).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// The reload ended, applied or refused: serving again either way.
pub fn reloaded(rt: &Runtime) {
    ready(rt);
}

/// The drain starts.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}

/// `STATUS=` as `systemctl status` shows it: open connections and the
/// result of the last reload.
fn status_line(rt: &Runtime) -> String {
    let reload = match rt.status.last_reload() {
        None => "no reload yet".to_string(),
        Some(r) => match r.result {
            Ok(()) => "last reload ok".to_string(),
            Err(e) => format!("last reload refused: {e}"),
        },
    };
    format!("{} connections open; {reload}", rt.tracker.open())
}

/// Watchdog pings at half of `WatchdogSec` (as sd_watchdog_enabled(3)
/// advises), with the status line refreshed at the same pace. The pings
/// come from the control plane's event loop, so a stuck loop stops them
/// and systemd restarts the process. Nothing runs without a watchdog.
pub fn spawn_watchdog(rt: Arc<Runtime>) {
    let Some(timeout) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = (timeout / 2).max(Duration::from_millis(10));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let status = status_line(&rt);
            send(&[NotifyState::Watchdog, NotifyState::Status(&status)]);
        }
    });
}
