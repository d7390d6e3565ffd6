//! Both directions of a connection, run together under its idle timeout.
//!
//! The idle watchdog is one timer per connection set to the exact moment
//! the connection would have been idle for the timeout (the last byte
//! moved plus the timeout). It fires once per timeout at most: on a busy
//! connection it moves itself to the new deadline, on an idle one it ends
//! the connection. An idle connection costs no wakeup before then, so a
//! host holding a million idle devices spends no CPU on them.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use super::{Progress, PumpEnd};

/// One direction of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Direction {
    /// Client to backend.
    Up,
    /// Backend to client.
    Down,
}

/// Both directions of a connection under the idle watchdog, polled from
/// the connection's task with `poll_fn`. A struct rather than an `async
/// fn` so that its few fields are all an idle connection keeps: an async
/// fn would store its arguments and its `poll_fn` closure's captures both.
pub(super) struct Drive<'p> {
    up: &'p Progress<'p>,
    down: &'p Progress<'p>,
    idle_timeout: Duration,
    up_done: bool,
    down_done: bool,
}

/// A direction to poll: `Ready(Ok)` at its end of stream.
pub(super) trait Way: FnMut(&mut Context<'_>) -> Poll<io::Result<()>> {}
impl<F: FnMut(&mut Context<'_>) -> Poll<io::Result<()>>> Way for F {}

impl<'p> Drive<'p> {
    pub(super) fn new(
        up: &'p Progress<'p>,
        down: &'p Progress<'p>,
        idle_timeout: Duration,
    ) -> Self {
        Drive {
            up,
            down,
            idle_timeout,
            up_done: false,
            down_done: false,
        }
    }

    /// Run both directions to completion; an error in either ends both.
    /// `watchdog` is the connection's idle timer, created with
    /// `sleep(idle_timeout)` at the start.
    ///
    /// `half_closed` passes a direction's end-of-stream on to its writer,
    /// and is called only while the other direction still runs. Once both
    /// have ended the caller closes both sockets, which tells each peer the
    /// same with a FIN: that saves one `shutdown(2)` on every connection,
    /// and both on a connection-per-request exchange whose two ends arrive
    /// together (HAProxy closes such connections the same way).
    pub(super) fn poll(
        &mut self,
        cx: &mut Context<'_>,
        watchdog: Pin<&mut Sleep>,
        up: &mut impl Way,
        down: &mut impl Way,
        half_closed: &mut impl FnMut(Direction) -> io::Result<()>,
    ) -> Poll<PumpEnd> {
        // Both directions are polled on every wakeup, so that two ends
        // that arrived together are seen together.
        let up_ended = match poll_direction(up, &mut self.up_done, cx) {
            Err(e) => return Poll::Ready(PumpEnd::Error(e)),
            Ok(ended) => ended,
        };
        let down_ended = match poll_direction(down, &mut self.down_done, cx) {
            Err(e) => return Poll::Ready(PumpEnd::Error(e)),
            Ok(ended) => ended,
        };
        if self.up_done && self.down_done {
            return Poll::Ready(PumpEnd::Closed);
        }
        for (ended, direction) in [(up_ended, Direction::Up), (down_ended, Direction::Down)] {
            if ended {
                if let Err(e) = half_closed(direction) {
                    return Poll::Ready(PumpEnd::Error(e));
                }
            }
        }
        if idle_expired(cx, watchdog, self.idle_timeout, self.up, self.down) {
            return Poll::Ready(PumpEnd::IdleTimeout);
        }
        Poll::Pending
    }
}

/// [`Drive`] as a future, for callers whose size does not matter (tests,
/// and the relay, whose TLS state dwarfs it).
pub(super) async fn drive(
    mut up: impl Way,
    mut down: impl Way,
    idle_timeout: Duration,
    up_progress: &Progress<'_>,
    down_progress: &Progress<'_>,
    mut half_closed: impl FnMut(Direction) -> io::Result<()>,
) -> PumpEnd {
    let mut drive = Drive::new(up_progress, down_progress, idle_timeout);
    let mut watchdog = pin!(tokio::time::sleep(idle_timeout));
    poll_fn(|cx| drive.poll(cx, watchdog.as_mut(), &mut up, &mut down, &mut half_closed)).await
}

/// Poll a direction that has not ended yet; Ok(true) if it ended now.
fn poll_direction(
    direction: &mut impl Way,
    done: &mut bool,
    cx: &mut Context<'_>,
) -> io::Result<bool> {
    if *done {
        return Ok(false);
    }
    match direction(cx) {
        Poll::Ready(r) => {
            *done = true;
            r.map(|()| true)
        }
        Poll::Pending => Ok(false),
    }
}

/// True once nothing has moved either way for `timeout`. Otherwise the
/// watchdog is (re)armed for the moment that would be true, and wakes the
/// task then.
fn idle_expired(
    cx: &mut Context<'_>,
    mut watchdog: Pin<&mut Sleep>,
    timeout: Duration,
    up: &Progress<'_>,
    down: &Progress<'_>,
) -> bool {
    while watchdog.as_mut().poll(cx).is_ready() {
        #[cfg(test)]
        tests::WAKES.with(|w| w.set(w.get() + 1));
        let deadline = up.last().max(down.last()) + timeout;
        if deadline <= Instant::now() {
            return true;
        }
        watchdog.as_mut().reset(deadline);
    }
    false
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::time::Duration;

    use prometheus::IntCounter;
    use tokio::time::Instant;

    use super::*;

    thread_local! {
        /// Times the watchdog's timer fired on this thread.
        pub(super) static WAKES: Cell<u64> = const { Cell::new(0) };
    }

    fn counter() -> IntCounter {
        IntCounter::new("bytes", "bytes").unwrap()
    }

    /// A direction that never ends, never moves a byte.
    fn silent(_: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Pending
    }

    /// A direction that has ended.
    fn ended(_: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// A future as a direction.
    fn polled<'a>(
        f: impl std::future::Future<Output = io::Result<()>> + 'a,
    ) -> impl FnMut(&mut Context<'_>) -> Poll<io::Result<()>> + 'a {
        let mut f = Box::pin(f);
        move |cx| f.as_mut().poll(cx)
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_wakes_the_watchdog_once_when_it_expires() {
        let (m1, m2) = (counter(), counter());
        let started = Instant::now();
        let (up, down) = (Progress::new(&m1, started), Progress::new(&m2, started));
        WAKES.with(|w| w.set(0));
        let end = drive(silent, silent, Duration::from_secs(300), &up, &down, |_| {
            Ok(())
        })
        .await;
        assert!(matches!(end, PumpEnd::IdleTimeout), "{end:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(300));
        // Nothing between the start and the expiry: idle connections cost
        // no CPU while they wait (a tick every timeout/4 cost four).
        assert_eq!(WAKES.with(Cell::get), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn traffic_moves_the_deadline_and_wakes_once_per_timeout() {
        let (m1, m2) = (counter(), counter());
        let started = Instant::now();
        let (up, down) = (Progress::new(&m1, started), Progress::new(&m2, started));
        WAKES.with(|w| w.set(0));
        let timeout = Duration::from_secs(10);
        // A byte every 4 s for 60 s, then silence.
        let talker = async {
            for _ in 0..15 {
                tokio::time::sleep(Duration::from_secs(4)).await;
                up.add(1);
            }
            std::future::pending::<io::Result<()>>().await
        };
        let end = drive(polled(talker), silent, timeout, &up, &down, |_| Ok(())).await;
        assert!(matches!(end, PumpEnd::IdleTimeout), "{end:?}");
        // Closed exactly one timeout after the last byte (at 60 s).
        assert_eq!(started.elapsed(), Duration::from_secs(70));
        // Each time the deadline it was set for comes: at 10 s (last byte
        // at 8 s, so the next deadline is 18 s), 18, 26, ... 66 s, and at
        // 70 s it expires: 9 in 70 s, where a tick every 2.5 s (a quarter
        // of the timeout) would have been 28.
        assert_eq!(WAKES.with(Cell::get), 9);
    }

    #[tokio::test(start_paused = true)]
    async fn both_ends_seen_together_need_no_half_close() {
        let (m1, m2) = (counter(), counter());
        let started = Instant::now();
        let (up, down) = (Progress::new(&m1, started), Progress::new(&m2, started));
        let mut half_closes = Vec::new();
        let end = drive(ended, ended, Duration::from_secs(1), &up, &down, |d| {
            half_closes.push(d);
            Ok(())
        })
        .await;
        assert!(matches!(end, PumpEnd::Closed), "{end:?}");
        assert!(half_closes.is_empty(), "{half_closes:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_end_while_the_other_way_runs_is_passed_on_once() {
        let (m1, m2) = (counter(), counter());
        let started = Instant::now();
        let (up, down) = (Progress::new(&m1, started), Progress::new(&m2, started));
        let mut half_closes = Vec::new();
        let later = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(())
        };
        let end = drive(
            ended,
            polled(later),
            Duration::from_secs(1),
            &up,
            &down,
            |d| {
                half_closes.push(d);
                Ok(())
            },
        )
        .await;
        assert!(matches!(end, PumpEnd::Closed), "{end:?}");
        // The client's end went on to the backend; the backend's, the last
        // one, is said by closing both sockets.
        assert_eq!(half_closes, [Direction::Up]);
    }
}
