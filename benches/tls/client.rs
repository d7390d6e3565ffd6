//! The bench's own TLS load client (rustls on a current-thread tokio
//! runtime, i.e. one core, like `wrk -t1`), for what wrk cannot do: present
//! a client certificate, refuse session resumption so every connection is a
//! full handshake, and hold thousands of idle connections open.
//!
//! It speaks just enough HTTP/1.1 for the origin's `200 ok`: one GET at a
//! time per connection, the response read by Content-Length (or chunked).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fleetgate::tls::accept_any::AcceptAnyServerCert;
use hdrhistogram::Histogram;
use rustls::client::Resumption;
use rustls::crypto::ring;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, HandshakeKind};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::procs::thread_cpu_ticks;

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
const REQUEST_CLOSE: &[u8] = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";

/// How long one connect + handshake + request may take before it counts as
/// an error (and, in the idle test, fails the run).
const IO_LIMIT: Duration = Duration::from_secs(10);

/// What a client presents and accepts.
pub struct TlsOptions {
    /// Only TLS 1.3 (true) or 1.2 and 1.3.
    pub tls13_only: bool,
    /// Offer session resumption (tickets / session IDs).
    pub resume: bool,
    /// Client certificate chain and key (PEM files).
    pub client_cert: Option<(&'static str, &'static str)>,
}

/// Builds a rustls client config. The server certificate is not checked
/// against a CA (wrk doesn't either), but the handshake signature is, so
/// the client does the same public-key work as a verifying one, bar the
/// chain walk.
pub fn client_config(dir: &Path, opts: &TlsOptions) -> Result<Arc<ClientConfig>> {
    let provider = Arc::new(ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = if opts.tls13_only {
        &[&rustls::version::TLS13]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)?
        .dangerous()
        .with_custom_certificate_verifier(AcceptAnyServerCert::new(provider));
    let mut config = match opts.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(dir.join(cert))
                .with_context(|| format!("reading {cert}"))?
                .collect::<Result<Vec<_>, _>>()?;
            let key = PrivateKeyDer::from_pem_file(dir.join(key))
                .with_context(|| format!("reading {key}"))?;
            builder.with_client_auth_cert(chain, key)?
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    if !opts.resume {
        config.resumption = Resumption::disabled();
    }
    Ok(Arc::new(config))
}

/// What one load run reports.
#[derive(Debug, Clone)]
pub struct LoadResult {
    pub requests: u64,
    pub requests_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub errors: u64,
    pub full_handshakes: u64,
    pub resumed_handshakes: u64,
    /// CPU seconds the client itself used (its one thread).
    pub client_cpu_secs: f64,
}

/// Per-connection-task tallies, merged at the end.
struct Tally {
    latency_us: Histogram<u64>,
    errors: u64,
    full: u64,
    resumed: u64,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
            errors: 0,
            full: 0,
            resumed: 0,
        }
    }
}

fn runtime() -> Result<Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

/// `conns` connections send requests back to back for `secs` seconds. With
/// `close`, each connection carries one request (`Connection: close`) and
/// its latency includes connect and handshake.
pub fn load(
    port: u16,
    config: Arc<ClientConfig>,
    conns: usize,
    secs: u64,
    close: bool,
    ticks_per_sec: f64,
) -> Result<LoadResult> {
    let rt = runtime()?;
    let cpu_start = thread_cpu_ticks()?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let connector = TlsConnector::from(config);
    let tallies = rt.block_on(async {
        let tasks: Vec<_> = (0..conns)
            .map(|_| tokio::spawn(connection_loop(port, connector.clone(), close, deadline)))
            .collect();
        let mut tallies = Vec::new();
        for task in tasks {
            tallies.push(task.await?);
        }
        anyhow::Ok(tallies)
    })?;
    let wall = started.elapsed().as_secs_f64();
    let client_cpu_secs = (thread_cpu_ticks()? - cpu_start) as f64 / ticks_per_sec;
    let mut total = Tally::new();
    for t in tallies {
        total.latency_us.add(&t.latency_us)?;
        total.errors += t.errors;
        total.full += t.full;
        total.resumed += t.resumed;
    }
    let requests = total.latency_us.len();
    if requests == 0 {
        bail!("no request completed ({} errors)", total.errors);
    }
    Ok(LoadResult {
        requests,
        requests_per_sec: requests as f64 / wall,
        p50_us: total.latency_us.value_at_quantile(0.50) as f64,
        p99_us: total.latency_us.value_at_quantile(0.99) as f64,
        errors: total.errors,
        full_handshakes: total.full,
        resumed_handshakes: total.resumed,
        client_cpu_secs,
    })
}

async fn connection_loop(
    port: u16,
    connector: TlsConnector,
    close: bool,
    deadline: Instant,
) -> Tally {
    let mut tally = Tally::new();
    let mut buf = Vec::with_capacity(4096);
    while Instant::now() < deadline {
        let started = Instant::now();
        let mut tls = match tokio::time::timeout(IO_LIMIT, connect(port, &connector)).await {
            Ok(Ok(tls)) => tls,
            _ => {
                tally.errors += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        match tls.get_ref().1.handshake_kind() {
            Some(HandshakeKind::Resumed) => tally.resumed += 1,
            _ => tally.full += 1,
        }
        buf.clear();
        if close {
            let outcome = tokio::time::timeout(IO_LIMIT, async {
                request(&mut tls, &mut buf, REQUEST_CLOSE).await?;
                // Let the server close first, so TIME_WAIT lands on its side
                // and the client doesn't run out of ports.
                let mut rest = [0u8; 256];
                while tls.read(&mut rest).await? > 0 {}
                anyhow::Ok(())
            })
            .await;
            match outcome {
                Ok(Ok(())) => record(&mut tally, started),
                _ => tally.errors += 1,
            }
            continue;
        }
        while Instant::now() < deadline {
            let sent = Instant::now();
            match tokio::time::timeout(IO_LIMIT, request(&mut tls, &mut buf, REQUEST)).await {
                Ok(Ok(())) => record(&mut tally, sent),
                _ => {
                    tally.errors += 1;
                    break;
                }
            }
        }
    }
    tally
}

fn record(tally: &mut Tally, since: Instant) {
    let us = since.elapsed().as_micros().max(1) as u64;
    tally.latency_us.saturating_record(us);
}

async fn connect(port: u16, connector: &TlsConnector) -> Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr(port)).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::IpAddress(Ipv4Addr::LOCALHOST.into());
    Ok(connector.connect(name, tcp).await?)
}

/// Sends one request and reads its response; fails unless it is a 200.
async fn request(tls: &mut TlsStream<TcpStream>, buf: &mut Vec<u8>, req: &[u8]) -> Result<()> {
    tls.write_all(req).await?;
    read_response(tls, buf).await
}

async fn read_response<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>) -> Result<()> {
    let head_end = loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            break end + 4;
        }
        read_more(stream, buf).await?;
    };
    let head = std::str::from_utf8(&buf[..head_end])?.to_ascii_lowercase();
    let status_ok = head.starts_with("http/1.1 200") || head.starts_with("http/1.0 200");
    let length = head.lines().find_map(|line| {
        line.strip_prefix("content-length:")
            .and_then(|v| v.trim().parse::<usize>().ok())
    });
    let chunked = head
        .lines()
        .any(|line| line.starts_with("transfer-encoding:") && line.contains("chunked"));
    let end = if let Some(length) = length {
        while buf.len() < head_end + length {
            read_more(stream, buf).await?;
        }
        head_end + length
    } else if chunked {
        loop {
            let body = &buf[head_end..];
            if body.starts_with(b"0\r\n\r\n") {
                break head_end + 5;
            }
            if let Some(pos) = find(body, b"\r\n0\r\n\r\n") {
                break head_end + pos + 7;
            }
            read_more(stream, buf).await?;
        }
    } else {
        bail!("response without length");
    };
    buf.drain(..end);
    if !status_ok {
        bail!("status is not 200: {}", head.lines().next().unwrap_or(""));
    }
    Ok(())
}

async fn read_more<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>) -> Result<()> {
    let mut chunk = [0u8; 4096];
    let n = stream.read(&mut chunk).await?;
    if n == 0 {
        bail!("connection closed mid-response");
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// One request through `port`; Ok once it got a 200.
pub fn probe(port: u16, config: Arc<ClientConfig>) -> Result<()> {
    runtime()?.block_on(async {
        let connector = TlsConnector::from(config);
        tokio::time::timeout(IO_LIMIT, async {
            let mut tls = connect(port, &connector).await?;
            request(&mut tls, &mut Vec::new(), REQUEST).await
        })
        .await
        .context("timed out")?
    })
}

/// Connections held open (idle, after one request each) until dropped.
pub struct IdleConnections {
    streams: Vec<TlsStream<TcpStream>>,
    // Dropped after the streams (fields drop in declaration order), so the
    // sockets are closed while their reactor still exists.
    _rt: Runtime,
}

impl IdleConnections {
    pub fn len(&self) -> usize {
        self.streams.len()
    }
}

/// Opens `count` TLS connections to `port`, `parallel` at a time; each sends
/// one keep-alive request and then stays open, idle.
pub fn hold_idle(
    port: u16,
    config: Arc<ClientConfig>,
    count: usize,
    parallel: usize,
) -> Result<IdleConnections> {
    let rt = runtime()?;
    let connector = TlsConnector::from(config);
    let streams = rt.block_on(async {
        let mut streams = Vec::with_capacity(count);
        while streams.len() < count {
            let batch = parallel.min(count - streams.len());
            let tasks: Vec<_> = (0..batch)
                .map(|_| {
                    let connector = connector.clone();
                    tokio::spawn(async move {
                        tokio::time::timeout(IO_LIMIT, async {
                            let mut tls = connect(port, &connector).await?;
                            request(&mut tls, &mut Vec::new(), REQUEST).await?;
                            anyhow::Ok(tls)
                        })
                        .await
                        .context("timed out")?
                    })
                })
                .collect();
            for task in tasks {
                let tls = task
                    .await?
                    .with_context(|| format!("idle connection {} of {count}", streams.len() + 1))?;
                streams.push(tls);
            }
        }
        anyhow::Ok(streams)
    })?;
    Ok(IdleConnections { streams, _rt: rt })
}
