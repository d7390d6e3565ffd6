//! The L4 pump: forward bytes both ways between a client and a backend,
//! with half-close, an idle timeout and byte counters. On Linux the bytes
//! move with splice(2) and never enter user space; otherwise (or when
//! disabled) a buffered copy is used.

mod drive;
#[cfg(target_os = "linux")]
mod pipes;
pub mod relay;
#[cfg(target_os = "linux")]
mod splice;
mod way;

use std::future::poll_fn;
use std::io;
use std::net::Shutdown;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Context;
use std::time::Duration;

use prometheus::IntCounter;
use tokio::net::TcpStream;
use tokio::time::Instant;

use drive::{Direction, Drive};

#[derive(Debug, Clone, Copy)]
pub struct PumpConfig {
    pub idle_timeout: Duration,
    pub splice: SpliceMode,
}

/// How the pump moves bytes (`splice = true | false | "auto"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SpliceMode {
    /// splice(2) for every byte, where the platform has it.
    Always,
    /// The buffered copy.
    Off,
    /// Like HAProxy's `splice-auto`: each burst is first read into a
    /// buffer; a read that fills it marks a bulk transfer, whose rest then
    /// moves with splice(2). A small request or response costs one read
    /// and one write instead of two splices and a pipe. The default: on
    /// every L4 and passthrough scenario of `cargo bench --bench l4` it
    /// was the best overall (device traffic is mostly small messages,
    /// with an occasional bulk transfer).
    #[default]
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

/// Bytes moved in one direction, and when the last ones moved: read by
/// the idle watchdog, added to the metric as they move.
struct Progress<'a> {
    moved: AtomicU64,
    /// Nanoseconds after `base` at which bytes last moved.
    last_ns: AtomicU64,
    base: Instant,
    metric: &'a IntCounter,
}

impl<'a> Progress<'a> {
    fn new(metric: &'a IntCounter, base: Instant) -> Self {
        Progress {
            moved: AtomicU64::new(0),
            last_ns: AtomicU64::new(0),
            base,
            metric,
        }
    }
    fn add(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.moved.fetch_add(n as u64, Ordering::Relaxed);
        // One clock read per chunk (a vDSO call, tens of nanoseconds next
        // to the microseconds of the syscalls that moved the chunk) lets
        // the watchdog sleep until the exact deadline instead of waking
        // on a tick to see whether anything moved.
        let ns = self.base.elapsed().as_nanos() as u64;
        self.last_ns.store(ns, Ordering::Relaxed);
        self.metric.inc_by(n as u64);
    }
    fn get(&self) -> u64 {
        self.moved.load(Ordering::Relaxed)
    }
    /// When bytes last moved (the start, if none has).
    fn last(&self) -> Instant {
        self.base + Duration::from_nanos(self.last_ns.load(Ordering::Relaxed))
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
    let started = Instant::now();
    let up = Progress::new(&counters.upstream, started);
    let down = Progress::new(&counters.downstream, started);
    let mut a = way::Way::new(client, backend, cfg.splice, &up);
    let mut b = way::Way::new(backend, client, cfg.splice, &down);
    let mut drive = Drive::new(&up, &down, cfg.idle_timeout);
    let mut watchdog = pin!(tokio::time::sleep(cfg.idle_timeout));
    let mut half_closed = |ended| {
        shutdown_write(match ended {
            Direction::Up => backend,
            Direction::Down => client,
        })
    };
    let end = poll_fn(|cx| {
        drive.poll(
            cx,
            watchdog.as_mut(),
            &mut |cx: &mut Context<'_>| a.poll(cx),
            &mut |cx: &mut Context<'_>| b.poll(cx),
            &mut half_closed,
        )
    })
    .await;
    PumpReport {
        end,
        upstream_bytes: up.get(),
        downstream_bytes: down.get(),
    }
}

/// Pass a FIN on: the peer sees end-of-stream while the other direction
/// keeps flowing. The direction's reader ends without it; `drive` calls
/// this only while the other direction is still running.
fn shutdown_write(to: &TcpStream) -> io::Result<()> {
    match socket2::SockRef::from(to).shutdown(Shutdown::Write) {
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        r => r,
    }
}
