//! Memory per idle L4 connection: a freshly started proxy, then thousands
//! of plain TCP connections through its HTTP port, each after one
//! keep-alive request and response, left open and silent.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::procs::{open_fds, rss_kib};
use crate::report::{Figure, Samples};
use crate::targets::{self, Backends, ProxyOptions, Target};

/// Connections opened (and their request sent) before their answers are
/// read: enough to keep the proxy busy, few enough not to fill a backlog.
const BATCH: usize = 50;

const IO_LIMIT: Duration = Duration::from_secs(10);

/// The origin's whole answer to `REQUEST` ends with its 3-byte body.
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";
const BODY: &[u8] = b"\r\n\r\nok\n";

/// Starts a fresh `target`, measures its RSS before and with `count` idle
/// connections, records KiB per connection, and stops it again.
pub fn run(
    target: Target,
    round: u32,
    dir: &Path,
    backends: &Backends,
    opts: &ProxyOptions,
    count: usize,
    samples: &mut Samples,
) -> Result<String> {
    let instance = format!("-idle{round}");
    let mut running = targets::start(target, &instance, dir, backends, opts)?;
    let pid = running.proxy.as_ref().context("no proxy process")?.pid();
    // Startup's own allocations settle before the baseline.
    thread::sleep(Duration::from_secs(1));
    let before = rss_kib(pid)?;
    let started = Instant::now();
    let conns = hold(running.http_port, count)?;
    let opened_in = started.elapsed();
    thread::sleep(Duration::from_secs(2));
    let after = rss_kib(pid)?;
    // Client and backend side of every connection: shows they are all
    // still held by the proxy.
    let fds = open_fds(pid)?;
    if let Some(proxy) = running.proxy.as_mut() {
        proxy.ensure_running()?;
    }
    drop(conns);
    drop(running);
    let per_conn = (after as f64 - before as f64) / count as f64;
    samples.add(target, Figure::IdleKibPerConn, per_conn);
    samples.add(target, Figure::IdleRssBefore, before as f64 / 1024.0);
    Ok(format!(
        "{count} idle connections (opened in {:.1} s, proxy holds {fds} fds): RSS {before} → {after} KiB, {per_conn:.2} KiB/connection",
        opened_in.as_secs_f64()
    ))
}

/// Opens `count` connections to 127.0.0.1:`port`, `BATCH` at a time; each
/// sends one keep-alive request and reads its whole answer.
fn hold(port: u16, count: usize) -> Result<Vec<TcpStream>> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut held = Vec::with_capacity(count);
    while held.len() < count {
        let batch = BATCH.min(count - held.len());
        let mut fresh = Vec::with_capacity(batch);
        for _ in 0..batch {
            let n = held.len() + fresh.len() + 1;
            let mut stream = TcpStream::connect_timeout(&addr, IO_LIMIT)
                .with_context(|| format!("idle connection {n} of {count}"))?;
            stream.set_read_timeout(Some(IO_LIMIT))?;
            stream.write_all(REQUEST)?;
            fresh.push(stream);
        }
        for mut stream in fresh {
            let n = held.len() + 1;
            read_answer(&mut stream).with_context(|| format!("idle connection {n} of {count}"))?;
            held.push(stream);
        }
    }
    Ok(held)
}

fn read_answer(stream: &mut TcpStream) -> Result<()> {
    let mut answer = Vec::new();
    let mut buf = [0u8; 512];
    while !answer.ends_with(BODY) {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            bail!("closed after {} bytes", answer.len());
        }
        answer.extend_from_slice(&buf[..n]);
    }
    if !answer.starts_with(b"HTTP/1.1 200 ") {
        bail!(
            "unexpected answer: {}",
            String::from_utf8_lossy(&answer)
                .lines()
                .next()
                .unwrap_or("")
        );
    }
    Ok(())
}
