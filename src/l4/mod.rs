//! The L4 pump: forward bytes both ways between a client and a backend,
//! with half-close, an idle timeout and byte counters. On Linux the bytes
//! move with splice(2) and never enter user space; otherwise (or when
//! disabled) a buffered copy is used.

mod copy;
#[cfg(target_os = "linux")]
mod pipes;
pub mod relay;
#[cfg(target_os = "linux")]
mod splice;
#[cfg(target_os = "linux")]
mod zero_copy;

use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use tokio::net::TcpStream;

#[derive(Debug, Clone, Copy)]
pub struct PumpConfig {
    pub idle_timeout: Duration,
    pub splice: SpliceMode,
}

/// How the pump moves bytes (`splice = true | false | "auto"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SpliceMode {
    /// splice(2) for every byte, where the platform has it.
    #[default]
    Always,
    /// The buffered copy.
    Off,
    /// Like HAProxy's `splice-auto`: each burst is first read into a
    /// buffer; a read that fills it marks a bulk transfer, whose rest then
    /// moves with splice(2). A small request or response costs one read
    /// and one write instead of two splices and a pipe.
    Auto,
}

impl<'de> serde::Deserialize<'de> for SpliceMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = SpliceMode;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("true, false or \"auto\"")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<SpliceMode, E> {
                Ok(if v {
                    SpliceMode::Always
                } else {
                    SpliceMode::Off
                })
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SpliceMode, E> {
                match v {
                    "auto" => Ok(SpliceMode::Auto),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Metric counters the pump adds to as bytes move.
#[derive(Clone)]
pub struct ByteCounters {
    pub upstream: IntCounter,
    pub downstream: IntCounter,
}

#[derive(Debug)]
pub enum PumpEnd {
    /// Both sides closed their write side.
    Closed,
    /// No byte moved in either direction for the idle timeout.
    IdleTimeout,
    /// A socket error (reset, broken pipe) ended the connection.
    Error(io::Error),
}

impl PumpEnd {
    /// A short, bounded word for the access log.
    pub fn reason(&self) -> &'static str {
        match self {
            PumpEnd::Closed => "closed",
            PumpEnd::IdleTimeout => "idle_timeout",
            PumpEnd::Error(e) => match e.kind() {
                io::ErrorKind::ConnectionReset => "reset",
                io::ErrorKind::BrokenPipe => "broken_pipe",
                io::ErrorKind::TimedOut => "timed_out",
                _ => "error",
            },
        }
    }
}

#[derive(Debug)]
pub struct PumpReport {
    pub end: PumpEnd,
    pub upstream_bytes: u64,
    pub downstream_bytes: u64,
}

/// Bytes moved in one direction: read by the idle watchdog, added to the
/// metric as they move.
struct Progress<'a> {
    moved: AtomicU64,
    metric: &'a IntCounter,
}

impl Progress<'_> {
    fn add(&self, n: usize) {
        self.moved.fetch_add(n as u64, Ordering::Relaxed);
        self.metric.inc_by(n as u64);
    }
    fn get(&self) -> u64 {
        self.moved.load(Ordering::Relaxed)
    }
}

/// Forward until both directions are closed, an error occurs, or the
/// connection is idle for `idle_timeout`.
pub async fn pump(
    client: &TcpStream,
    backend: &TcpStream,
    cfg: PumpConfig,
    counters: &ByteCounters,
) -> PumpReport {
    let up = Progress {
        moved: AtomicU64::new(0),
        metric: &counters.upstream,
    };
    let down = Progress {
        moved: AtomicU64::new(0),
        metric: &counters.downstream,
    };
    let end = run(client, backend, cfg, &up, &down).await;
    PumpReport {
        end,
        upstream_bytes: up.get(),
        downstream_bytes: down.get(),
    }
}

async fn run(
    client: &TcpStream,
    backend: &TcpStream,
    cfg: PumpConfig,
    up: &Progress<'_>,
    down: &Progress<'_>,
) -> PumpEnd {
    let a = one_way(client, backend, cfg.splice, up);
    let b = one_way(backend, client, cfg.splice, down);
    drive(a, b, cfg.idle_timeout, up, down).await
}

/// Run both directions to completion under the idle watchdog. An error in
/// either direction ends both.
async fn drive(
    a: impl std::future::Future<Output = io::Result<()>>,
    b: impl std::future::Future<Output = io::Result<()>>,
    idle_timeout: Duration,
    up: &Progress<'_>,
    down: &Progress<'_>,
) -> PumpEnd {
    tokio::pin!(a, b);
    let (mut a_done, mut b_done) = (false, false);
    // The watchdog samples progress a few times per timeout rather than
    // re-arming a timer on every chunk, which would cost per byte moved.
    let step = (idle_timeout / 4).max(Duration::from_millis(20));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + step, step);
    let mut seen = 0u64;
    let mut last_move = Instant::now();
    loop {
        tokio::select! {
            r = &mut a, if !a_done => match r {
                Ok(()) => a_done = true,
                Err(e) => return PumpEnd::Error(e),
            },
            r = &mut b, if !b_done => match r {
                Ok(()) => b_done = true,
                Err(e) => return PumpEnd::Error(e),
            },
            _ = tick.tick() => {
                let total = up.get() + down.get();
                if total != seen {
                    seen = total;
                    last_move = Instant::now();
                } else if last_move.elapsed() >= idle_timeout {
                    return PumpEnd::IdleTimeout;
                }
            }
        }
        if a_done && b_done {
            return PumpEnd::Closed;
        }
    }
}

async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    splice: SpliceMode,
    progress: &Progress<'_>,
) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    if splice != SpliceMode::Off {
        return zero_copy::one_way(from, to, splice == SpliceMode::Auto, progress).await;
    }
    let _ = splice;
    copy::one_way(from, to, progress).await
}

/// Pass a FIN on: the peer sees end-of-stream while the other direction
/// keeps flowing.
fn shutdown_write(to: &TcpStream) -> io::Result<()> {
    match socket2::SockRef::from(to).shutdown(Shutdown::Write) {
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        r => r,
    }
}
