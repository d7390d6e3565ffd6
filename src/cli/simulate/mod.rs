//! `fleetgate simulate`: a fleet of simulated devices against a balancer
//! running the devices module, to size an appliance and to measure it.
//!
//! Phases, reported separately:
//! 1. **Enrolment storm** ("the morning storm"): every device makes a key
//!    and a CSR, enrols with an enrolment token, then connects with its
//!    new client certificate and fetches its settings.
//! 2. **Command WebSockets** (`--hold-websockets`): every device opens
//!    its command channel and keeps it open, acknowledging any command.
//! 3. **Steady heartbeats** for `--duration`: every device calls in on
//!    `--heartbeat-interval` plus a random share of `--jitter`, over one
//!    kept-alive TLS connection of its own; a device without a channel
//!    that is told of pending commands polls and acknowledges them.
//!
//! With several `--url`s (a server list) device `i` starts on address
//! `i % n` and, when a connection to it fails, tries the next address of
//! the list, for its enrolment, heartbeat connection and command channel
//! alike;
//! a lost channel is then opened again and commands received twice are
//! recognised by their id.
//!
//! Tasks are bounded by `--concurrency`: each worker task owns a share of
//! the devices and multiplexes their connections itself (no task per
//! connection). Only loopback targets are accepted. See docs/simulator.md.

pub mod client;
pub mod report;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

pub use client::{Admin, DeviceConn, DeviceWs, Identity, SimError, Target, Trust};
use report::*;

#[derive(clap::Args, Debug, Clone)]
pub struct Options {
    /// The offload listener serving the devices API (loopback only).
    /// Several (repeated, or comma-separated) make a server list.
    #[arg(
        long,
        default_value = "https://127.0.0.1:8443",
        value_delimiter = ',',
        num_args = 1
    )]
    pub url: Vec<String>,
    /// The admin listener (loopback only).
    #[arg(long, default_value = "http://127.0.0.1:9900")]
    pub admin: String,
    /// File holding the devices module's admin token.
    #[arg(long, default_value = "data/devices/admin-token")]
    pub admin_token_file: PathBuf,
    /// The admin token itself (instead of --admin-token-file).
    #[arg(long)]
    pub admin_token: Option<String>,
    /// PEM file with the CA (or self-signed certificate) of the server.
    #[arg(long, conflicts_with = "insecure")]
    pub server_ca: Option<PathBuf>,
    /// Accept any server certificate.
    #[arg(long)]
    pub insecure: bool,
    /// Name to send as SNI and to verify the server certificate against
    /// (the default `cert = "auto"` certificate is for `localhost`).
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// Number of simulated devices.
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    /// Worker tasks, and so the most enrolments or channel openings in
    /// flight at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// How long the steady heartbeat phase runs.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Longest time the enrolment storm (and the opening of the channels)
    /// may take; devices not started by then are left out.
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    pub storm_timeout: Duration,
    /// Time between a device's heartbeats; 0 sends none (and keeps no
    /// HTTP connection per device: use with --hold-websockets to hold the
    /// most channels within the fd limit).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,
    /// Up to this much random extra delay per heartbeat.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub jitter: Duration,
    /// Open each device's command WebSocket and hold it for the run.
    #[arg(long)]
    pub hold_websockets: bool,
    /// Name of the devices module (`/modules/NAME/` on the admin listener).
    #[arg(long, default_value = "devices")]
    pub module: String,
    /// Timeout of each request, handshake and WebSocket opening.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Runtime worker threads (default: one per CPU).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print the report as JSON instead of markdown.
    #[arg(long)]
    pub json: bool,
}

/// The `fleetgate simulate` command.
pub fn main(opts: Options) -> ExitCode {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = opts.threads {
        builder.worker_threads(n.max(1));
    }
    let result = builder
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run(&opts)));
    match result {
        Ok(report) => {
            if opts.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("report serializes")
                );
            } else {
                print!("{}", report.markdown());
            }
            if report.storm.devices_ok == 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("fleetgate simulate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `scheme://host:port[/...]` → (host, port), with a default port.
fn host_port(url: &str, default_port: u16) -> anyhow::Result<(String, u16)> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or_default();
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .with_context(|| format!("bad address in {url:?}"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().with_context(|| format!("bad port in {url:?}"))?,
            None => default_port,
        };
        return Ok((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Ok((
            h.to_string(),
            p.parse().with_context(|| format!("bad port in {url:?}"))?,
        )),
        None if !authority.is_empty() => Ok((authority.to_string(), default_port)),
        None => anyhow::bail!("no host in {url:?}"),
    }
}

/// Resolve `url`, refusing anything but loopback addresses.
pub async fn loopback_addr(url: &str, default_port: u16) -> anyhow::Result<SocketAddr> {
    let (host, port) = host_port(url, default_port)?;
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .with_context(|| format!("resolving {host}"))?
        .collect();
    anyhow::ensure!(!addrs.is_empty(), "{host} resolves to nothing");
    if let Some(a) = addrs.iter().find(|a| !a.ip().is_loopback()) {
        anyhow::bail!(
            "{url}: {a} is not a loopback address (the simulator only targets this machine)"
        );
    }
    Ok(addrs[0])
}

/// A timestamped line on stderr between phases (for correlating with
/// measurements of the balancer taken meanwhile).
fn progress(what: &str) {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    eprintln!("[simulate {:.3}] {what}", t.as_secs_f64());
}

/// The soft limit on open files, from /proc/self/limits.
fn fd_soft_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Run a whole simulation as the options say.
pub async fn run(opts: &Options) -> anyhow::Result<Report> {
    anyhow::ensure!(opts.devices > 0, "--devices must be at least 1");
    anyhow::ensure!(opts.concurrency > 0, "--concurrency must be at least 1");
    let heartbeats = !opts.heartbeat_interval.is_zero();
    // Per device: its HTTP connection (when it heartbeats) and its channel.
    let needed = opts.devices as u64 * (heartbeats as u64 + opts.hold_websockets as u64)
        + opts.concurrency as u64
        + 64;
    if let Some(limit) = fd_soft_limit() {
        anyhow::ensure!(
            needed <= limit,
            "this run needs about {needed} file descriptors but the soft limit is {limit}: \
             raise it (prlimit --nofile=H:H fleetgate simulate ...), use fewer devices, or \
             --heartbeat-interval 0 with --hold-websockets"
        );
    }
    anyhow::ensure!(!opts.url.is_empty(), "give at least one --url");
    let mut addrs = Vec::new();
    for url in &opts.url {
        addrs.push(loopback_addr(url, 443).await?);
    }
    let admin_addr = loopback_addr(&opts.admin, 80).await?;
    let token = match &opts.admin_token {
        Some(t) => t.clone(),
        None => std::fs::read_to_string(&opts.admin_token_file)
            .with_context(|| format!("reading {}", opts.admin_token_file.display()))?
            .trim()
            .to_string(),
    };
    let trust = match (&opts.server_ca, opts.insecure) {
        (Some(p), _) => Trust::from_pem_file(p)?,
        (None, true) => Trust::Insecure,
        (None, false) => anyhow::bail!("give --server-ca FILE or --insecure"),
    };
    let mut targets = Vec::new();
    for addr in addrs {
        targets.push(Arc::new(Target::new(
            addr,
            &opts.server_name,
            trust.clone(),
            opts.timeout,
        )?));
    }
    let servers = Arc::new(Servers { targets });
    let admin = Admin {
        addr: admin_addr,
        token,
        module: opts.module.clone(),
        timeout: opts.timeout,
    };
    let tokens = admin
        .enrolment_tokens(opts.devices, "fleetgate simulate")
        .await
        .context("creating the enrolment token")?;

    let mut report = Report {
        url: opts.url.join(","),
        devices: opts.devices as u64,
        concurrency: opts.concurrency as u64,
        ..Default::default()
    };
    let storm_deadline = Instant::now() + opts.storm_timeout;
    let (devices, storm) = storm_on(
        servers.clone(),
        tokens,
        opts.devices,
        opts.concurrency,
        heartbeats,
        storm_deadline,
    )
    .await;
    progress(&format!(
        "enrolment storm done: {} devices in {:.2} s",
        storm.devices_ok, storm.seconds
    ));
    report.storm = storm;
    let workers = opts.concurrency.min(devices.len()).max(1);
    let mut buckets: Vec<Vec<SimDevice>> = (0..workers).map(|_| Vec::new()).collect();
    for (i, d) in devices.into_iter().enumerate() {
        buckets[i % workers].push(d);
    }
    if opts.hold_websockets {
        progress("opening the command WebSockets");
        let (b, ws) = open_websockets(
            servers.clone(),
            buckets,
            Instant::now() + opts.storm_timeout,
        )
        .await;
        buckets = b;
        progress(&format!(
            "{} WebSockets open in {:.2} s",
            ws.opened, ws.open_seconds
        ));
        report.websockets = Some(ws);
    }
    progress(&format!("steady phase for {:?}", opts.duration));
    let plan = Steady {
        interval: opts.heartbeat_interval,
        jitter: opts.jitter,
        duration: opts.duration,
        heartbeats,
    };
    let (hb, ws) = steady(servers, buckets, plan).await;
    if let (Some(w), Some(s)) = (report.websockets.as_mut(), ws) {
        w.held_at_end = s.held_at_end;
        w.lost = s.lost;
        w.commands_received = s.commands_received;
        w.acks_sent = s.acks_sent;
        w.acks_confirmed = s.acks_confirmed;
        w.reopened = s.reopened;
        w.redelivered = s.redelivered;
        merge(&mut w.errors, s.errors);
    }
    report.heartbeats = heartbeats.then_some(hb);
    Ok(report)
}

/// A simulated device between phases.
pub struct SimDevice {
    pub identity: Arc<Identity>,
    /// Its kept-alive HTTP connection.
    pub conn: Option<DeviceConn>,
    /// Its command channel, when held.
    pub ws: Option<DeviceWs>,
    /// Its current address in the server list (device `i` starts on
    /// `i % n`).
    pub server: usize,
}

/// The server list: each device starts on one address and moves to the
/// next when a connection fails, as devices with a list of servers do.
pub struct Servers {
    pub targets: Vec<Arc<Target>>,
}

impl Servers {
    pub fn at(&self, i: usize) -> &Arc<Target> {
        &self.targets[i % self.targets.len()]
    }

    fn len(&self) -> usize {
        self.targets.len()
    }

    /// A connection for the device, from its current address on; the
    /// index moves to the address that answered. Returns how many
    /// addresses failed before it (failovers).
    async fn connect(
        &self,
        identity: &Identity,
        server: &mut usize,
    ) -> Result<(DeviceConn, u64), SimError> {
        let mut last = None;
        for tried in 0..self.len() {
            match self.at(*server).connect(&identity.config).await {
                Ok(c) => return Ok((c, tried as u64)),
                Err(e) => last = Some(e),
            }
            *server = (*server + 1) % self.len();
        }
        Err(last.unwrap_or(SimError::Closed))
    }

    /// The device's command channel, likewise.
    async fn websocket(
        &self,
        identity: &Identity,
        server: &mut usize,
    ) -> Result<DeviceWs, SimError> {
        let mut last = None;
        for _ in 0..self.len() {
            match self.at(*server).websocket(identity).await {
                Ok(ws) => return Ok(ws),
                Err(e) => last = Some(e),
            }
            *server = (*server + 1) % self.len();
        }
        Err(last.unwrap_or(SimError::Closed))
    }
}

/// Phase 1: enrol `n` devices and fetch each one's settings, at most
/// `concurrency` at a time. With `keep_conn` each device keeps the
/// connection its settings came over.
// One address: what tests driving the simulator's devices use; the
// command itself goes through `storm_on`.
#[allow(dead_code)]
pub async fn storm(
    target: Arc<Target>,
    tokens: Vec<String>,
    n: usize,
    concurrency: usize,
    keep_conn: bool,
    deadline: Instant,
) -> (Vec<SimDevice>, StormReport) {
    let servers = Arc::new(Servers {
        targets: vec![target],
    });
    storm_on(servers, tokens, n, concurrency, keep_conn, deadline).await
}

/// [`storm`] over a server list: device `i` enrols on address `i % n`.
pub async fn storm_on(
    servers: Arc<Servers>,
    tokens: Vec<String>,
    n: usize,
    concurrency: usize,
    keep_conn: bool,
    deadline: Instant,
) -> (Vec<SimDevice>, StormReport) {
    let tokens = Arc::new(tokens);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.min(n).max(1) {
        let (servers, tokens, next) = (servers.clone(), tokens.clone(), next.clone());
        tasks.spawn(async move {
            let (mut enrol_h, mut settings_h) = (histogram(), histogram());
            let mut errors = Errors::new();
            let mut out = Vec::new();
            let mut failed = 0u64;
            let mut timed_out = false;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                if Instant::now() >= deadline {
                    timed_out = true;
                    failed += 1;
                    continue;
                }
                let token = &tokens[(i / 1_000_000).min(tokens.len() - 1)];
                let mut server = i % servers.len();
                let t0 = Instant::now();
                // An address that refuses the connection never saw the
                // enrolment: the next one may take it.
                let mut enrolled = Err(SimError::Closed);
                for _ in 0..servers.len() {
                    enrolled = servers.at(server).enrol(token, &format!("sim-{i}")).await;
                    if !matches!(enrolled, Err(SimError::Connect(_))) {
                        break;
                    }
                    server = (server + 1) % servers.len();
                }
                let identity = match enrolled {
                    Ok(id) => Arc::new(id),
                    Err(e) => {
                        count(&mut errors, format!("enrol: {}", e.kind()));
                        failed += 1;
                        continue;
                    }
                };
                record(&mut enrol_h, t0.elapsed());
                let t1 = Instant::now();
                let fetched = async {
                    let (mut conn, _) = servers.connect(&identity, &mut server).await?;
                    conn.request("GET", "/api/v1/settings", None)
                        .await?
                        .expect(200)?;
                    Ok::<_, SimError>(conn)
                }
                .await;
                match fetched {
                    Ok(conn) => {
                        record(&mut settings_h, t1.elapsed());
                        out.push(SimDevice {
                            identity,
                            conn: keep_conn.then_some(conn),
                            ws: None,
                            server,
                        });
                    }
                    Err(e) => {
                        count(&mut errors, format!("settings: {}", e.kind()));
                        failed += 1;
                    }
                }
            }
            (enrol_h, settings_h, errors, out, failed, timed_out)
        });
    }
    let mut report = StormReport::default();
    let (mut enrol_h, mut settings_h) = (histogram(), histogram());
    let mut devices = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        let Ok((e, s, errors, out, failed, timed_out)) = r else {
            continue;
        };
        let _ = enrol_h.add(&e);
        let _ = settings_h.add(&s);
        merge(&mut report.errors, errors);
        devices.extend(out);
        report.devices_failed += failed;
        report.timed_out |= timed_out;
    }
    report.seconds = started.elapsed().as_secs_f64();
    report.devices_ok = devices.len() as u64;
    report.devices_per_second = report.devices_ok as f64 / report.seconds.max(1e-9);
    report.enrol = Latency::of(&enrol_h);
    report.settings = Latency::of(&settings_h);
    (devices, report)
}

/// Phase 2: open every device's command channel, one worker per bucket.
pub async fn open_websockets(
    servers: Arc<Servers>,
    buckets: Vec<Vec<SimDevice>>,
    deadline: Instant,
) -> (Vec<Vec<SimDevice>>, WebSocketReport) {
    let started = Instant::now();
    let tasks: Vec<_> = buckets
        .into_iter()
        .map(|mut bucket| {
            let servers = servers.clone();
            tokio::spawn(async move {
                let mut h = histogram();
                let mut errors = Errors::new();
                let (mut opened, mut failed) = (0u64, 0u64);
                for d in &mut bucket {
                    if Instant::now() >= deadline {
                        count(&mut errors, "not attempted (storm timeout)".into());
                        failed += 1;
                        continue;
                    }
                    let t0 = Instant::now();
                    match servers.websocket(&d.identity, &mut d.server).await {
                        Ok(ws) => {
                            record(&mut h, t0.elapsed());
                            d.ws = Some(ws);
                            opened += 1;
                        }
                        Err(e) => {
                            count(&mut errors, e.kind());
                            failed += 1;
                        }
                    }
                }
                (bucket, h, errors, opened, failed)
            })
        })
        .collect();
    let mut report = WebSocketReport::default();
    let mut h = histogram();
    let mut buckets = Vec::new();
    for t in tasks {
        let Ok((bucket, bh, errors, opened, failed)) = t.await else {
            continue;
        };
        buckets.push(bucket);
        let _ = h.add(&bh);
        merge(&mut report.errors, errors);
        report.opened += opened;
        report.failed += failed;
    }
    report.open_seconds = started.elapsed().as_secs_f64();
    report.open = Latency::of(&h);
    (buckets, report)
}

/// What the steady phase does.
#[derive(Debug, Clone, Copy)]
pub struct Steady {
    pub interval: Duration,
    pub jitter: Duration,
    pub duration: Duration,
    pub heartbeats: bool,
}

impl Steady {
    fn next_in(&self) -> Duration {
        self.interval + self.jitter.mul_f64(fastrand::f64())
    }
}

struct HbOutcome {
    result: Result<(), SimError>,
    latency: Duration,
    reconnected: bool,
    failovers: u64,
    polled: u64,
    acked: u64,
}

#[derive(Default)]
struct WsOutcome {
    /// Ids of the commands received.
    ids: Vec<String>,
    received: u64,
    acks: u64,
    confirmed: u64,
    error: Option<String>,
}

enum Event {
    /// The device, its connection, its address after the heartbeat.
    Heartbeat(usize, Option<DeviceConn>, usize, HbOutcome),
    Channel(usize, Option<DeviceWs>, WsOutcome),
    /// A lost channel opened again (`None`: every address failed).
    Reopened(usize, Option<DeviceWs>, usize),
}

type EventFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Event> + Send>>;

/// One heartbeat over the device's connection (reconnecting once if the
/// server closed it while idle); then, for a device without a channel,
/// poll and acknowledge pending commands.
async fn heartbeat(
    servers: &Servers,
    identity: &Identity,
    conn: &mut Option<DeviceConn>,
    server: &mut usize,
    poll: bool,
    out: &mut HbOutcome,
) -> Result<(), SimError> {
    let t0 = std::time::Instant::now();
    let mut c = match conn.take() {
        Some(c) if !c.closed => c,
        _ => {
            out.reconnected = true;
            let (c, failed) = servers.connect(identity, server).await?;
            out.failovers += failed;
            c
        }
    };
    let r = match c.request("POST", "/api/v1/heartbeat", None).await {
        Err(SimError::Closed | SimError::Io(_)) if !out.reconnected => {
            out.reconnected = true;
            let (c2, failed) = servers.connect(identity, server).await?;
            out.failovers += failed;
            c = c2;
            c.request("POST", "/api/v1/heartbeat", None).await?
        }
        r => r?,
    };
    out.latency = t0.elapsed();
    let keep = !c.closed;
    *conn = keep.then_some(c);
    r.expect(200)?;
    let pending = r.json()?["pending_commands"].as_u64().unwrap_or(0);
    if poll && pending > 0 {
        let c = conn.as_mut().ok_or(SimError::Closed)?;
        let list = c.request("GET", "/api/v1/commands", None).await?;
        list.expect(200)?;
        let list = list.json()?;
        for cmd in list["commands"].as_array().into_iter().flatten() {
            out.polled += 1;
            let Some(id) = cmd["id"].as_str() else {
                continue;
            };
            let body = json!({"status": "ok", "result": {"simulated": true}}).to_string();
            c.request(
                "POST",
                &format!("/api/v1/commands/{id}/ack"),
                Some(("application/json", body.as_bytes())),
            )
            .await?
            .expect(200)?;
            out.acked += 1;
        }
    }
    Ok(())
}

/// Wait for the channel's next text message (pings are answered by the
/// library while reading); acknowledge a command at once.
async fn channel_next(mut ws: DeviceWs) -> (Option<DeviceWs>, WsOutcome) {
    let mut out = WsOutcome::default();
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                match v["type"].as_str() {
                    Some("command") => {
                        out.received += 1;
                        out.ids
                            .push(v["id"].as_str().unwrap_or_default().to_string());
                        let ack = json!({"type": "ack", "id": v["id"], "status": "ok",
                            "result": {"simulated": true}});
                        if let Err(e) = ws.send(Message::text(ack.to_string())).await {
                            out.error = Some(format!("send: {e}"));
                            return (None, out);
                        }
                        out.acks += 1;
                    }
                    Some("acked") => out.confirmed += 1,
                    _ => {}
                }
                return (Some(ws), out);
            }
            Some(Ok(Message::Close(_))) | None => {
                out.error = Some("closed by server".into());
                return (None, out);
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                out.error = Some(format!("{e}"));
                return (None, out);
            }
        }
    }
}

#[derive(Default)]
struct ChannelStats {
    held_at_end: u64,
    lost: u64,
    commands_received: u64,
    acks_sent: u64,
    acks_confirmed: u64,
    reopened: u64,
    redelivered: u64,
    errors: Errors,
}

struct WorkerResult {
    latency: hdrhistogram::Histogram<u64>,
    first_latency: hdrhistogram::Histogram<u64>,
    later_latency: hdrhistogram::Histogram<u64>,
    lag: hdrhistogram::Histogram<u64>,
    sent: u64,
    ok: u64,
    reconnects: u64,
    failovers: u64,
    polled: u64,
    acked: u64,
    errors: Errors,
    channels: ChannelStats,
}

/// Open a lost channel again from the device's current address on,
/// retrying the whole list every second until `end`.
async fn reopen(
    servers: Arc<Servers>,
    identity: Arc<Identity>,
    i: usize,
    mut server: usize,
    end: Instant,
) -> Event {
    loop {
        if let Ok(ws) = servers.websocket(&identity, &mut server).await {
            return Event::Reopened(i, Some(ws), server);
        }
        if Instant::now() + Duration::from_secs(1) >= end {
            return Event::Reopened(i, None, server);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn worker(
    servers: Arc<Servers>,
    bucket: Vec<SimDevice>,
    plan: Steady,
    start: Instant,
) -> WorkerResult {
    let end = start + plan.duration;
    let mut r = WorkerResult {
        latency: histogram(),
        first_latency: histogram(),
        later_latency: histogram(),
        lag: histogram(),
        sent: 0,
        ok: 0,
        reconnects: 0,
        failovers: 0,
        polled: 0,
        acked: 0,
        errors: Errors::new(),
        channels: ChannelStats::default(),
    };
    let mut slots: Vec<(Arc<Identity>, Option<DeviceConn>, bool)> = Vec::new();
    // Per device: its address in the server list, and the command ids it
    // has received (devices treat the id as an idempotency key).
    let mut server = Vec::new();
    let mut seen: Vec<HashSet<String>> = Vec::new();
    let failover = servers.len() > 1;
    // Whether each device has had a heartbeat answered in this phase.
    let mut answered = Vec::new();
    let mut inflight: FuturesUnordered<EventFuture> = FuturesUnordered::new();
    let mut due: BinaryHeap<Reverse<(Instant, usize)>> = BinaryHeap::new();
    let period = plan.interval + plan.jitter / 2;
    for (i, d) in bucket.into_iter().enumerate() {
        let has_ws = d.ws.is_some();
        if let Some(ws) = d.ws {
            inflight.push(Box::pin(async move {
                let (ws, out) = channel_next(ws).await;
                Event::Channel(i, ws, out)
            }));
        }
        if plan.heartbeats {
            due.push(Reverse((start + period.mul_f64(fastrand::f64()), i)));
        }
        slots.push((d.identity, d.conn, has_ws));
        server.push(d.server);
        seen.push(HashSet::new());
        answered.push(false);
    }
    let mut hb_inflight = 0usize;
    let mut reopening = 0usize;
    let mut channels_open = inflight.len() as u64;
    loop {
        let stopping = Instant::now() >= end;
        if stopping && hb_inflight == 0 && reopening == 0 {
            break;
        }
        let next_due = due.peek().map(|Reverse((t, _))| *t);
        tokio::select! {
            biased;
            ev = inflight.next(), if !inflight.is_empty() => match ev {
                Some(Event::Heartbeat(i, conn, at, out)) => {
                    hb_inflight -= 1;
                    slots[i].1 = conn;
                    server[i] = at;
                    r.reconnects += out.reconnected as u64;
                    r.failovers += out.failovers;
                    r.polled += out.polled;
                    r.acked += out.acked;
                    match out.result {
                        Ok(()) => {
                            r.ok += 1;
                            record(&mut r.latency, out.latency);
                            let warm = std::mem::replace(&mut answered[i], true);
                            record(if warm { &mut r.later_latency } else { &mut r.first_latency }, out.latency);
                        }
                        Err(e) => count(&mut r.errors, e.kind()),
                    }
                    let now = Instant::now();
                    if now < end {
                        due.push(Reverse((now + plan.next_in(), i)));
                    }
                }
                Some(Event::Channel(i, ws, out)) => {
                    let c = &mut r.channels;
                    let fresh = out.ids.into_iter().filter(|id| seen[i].insert(id.clone())).count() as u64;
                    c.commands_received += fresh;
                    c.redelivered += out.received - fresh;
                    c.acks_sent += out.acks;
                    c.acks_confirmed += out.confirmed;
                    match ws {
                        Some(ws) => inflight.push(Box::pin(async move {
                            let (ws, out) = channel_next(ws).await;
                            Event::Channel(i, ws, out)
                        })),
                        None => {
                            channels_open -= 1;
                            c.lost += 1;
                            count(&mut c.errors, format!("channel: {}", out.error.unwrap_or_default()));
                            if failover && !stopping {
                                reopening += 1;
                                inflight.push(Box::pin(reopen(servers.clone(), slots[i].0.clone(), i, server[i], end)));
                            }
                        }
                    }
                }
                Some(Event::Reopened(i, ws, at)) => {
                    reopening -= 1;
                    server[i] = at;
                    if let Some(ws) = ws {
                        channels_open += 1;
                        r.channels.reopened += 1;
                        inflight.push(Box::pin(async move {
                            let (ws, out) = channel_next(ws).await;
                            Event::Channel(i, ws, out)
                        }));
                    }
                }
                None => {}
            },
            _ = tokio::time::sleep_until(next_due.unwrap_or(end)), if !stopping && next_due.is_some_and(|t| t < end) => {
                let now = Instant::now();
                while let Some(Reverse((t, i))) = due.peek().copied() {
                    if t > now {
                        break;
                    }
                    due.pop();
                    record(&mut r.lag, now.saturating_duration_since(t));
                    r.sent += 1;
                    hb_inflight += 1;
                    let (identity, mut conn, has_ws) = (slots[i].0.clone(), slots[i].1.take(), slots[i].2);
                    let servers = servers.clone();
                    let mut at = server[i];
                    inflight.push(Box::pin(async move {
                        let mut out = HbOutcome {
                            result: Ok(()),
                            latency: Duration::ZERO,
                            reconnected: false,
                            failovers: 0,
                            polled: 0,
                            acked: 0,
                        };
                        out.result = heartbeat(&servers, &identity, &mut conn, &mut at, !has_ws, &mut out).await;
                        Event::Heartbeat(i, conn, at, out)
                    }));
                }
            },
            _ = tokio::time::sleep_until(end), if !stopping => {}
        }
    }
    r.channels.held_at_end = channels_open;
    r
}

/// Phase 3: heartbeats on schedule and held channels, for `plan.duration`.
async fn steady(
    servers: Arc<Servers>,
    buckets: Vec<Vec<SimDevice>>,
    plan: Steady,
) -> (HeartbeatReport, Option<ChannelStats>) {
    let devices: usize = buckets.iter().map(Vec::len).sum();
    let any_ws = buckets.iter().flatten().any(|d| d.ws.is_some());
    let start = Instant::now();
    let tasks: Vec<_> = buckets
        .into_iter()
        .map(|b| tokio::spawn(worker(servers.clone(), b, plan, start)))
        .collect();
    let (mut latency, mut lag) = (histogram(), histogram());
    let (mut first, mut later) = (histogram(), histogram());
    let mut hb = HeartbeatReport {
        interval_ms: plan.interval.as_millis() as u64,
        jitter_ms: plan.jitter.as_millis() as u64,
        ..Default::default()
    };
    let period = (plan.interval + plan.jitter / 2).as_secs_f64();
    if period > 0.0 {
        hb.offered_per_second = devices as f64 / period;
    }
    let mut ch = ChannelStats::default();
    for t in tasks {
        let Ok(w) = t.await else { continue };
        let _ = latency.add(&w.latency);
        let _ = first.add(&w.first_latency);
        let _ = later.add(&w.later_latency);
        let _ = lag.add(&w.lag);
        hb.sent += w.sent;
        hb.ok += w.ok;
        hb.reconnects += w.reconnects;
        hb.failovers += w.failovers;
        hb.commands_polled += w.polled;
        hb.acks_sent += w.acked;
        merge(&mut hb.errors, w.errors);
        ch.held_at_end += w.channels.held_at_end;
        ch.lost += w.channels.lost;
        ch.commands_received += w.channels.commands_received;
        ch.acks_sent += w.channels.acks_sent;
        ch.acks_confirmed += w.channels.acks_confirmed;
        ch.reopened += w.channels.reopened;
        ch.redelivered += w.channels.redelivered;
        merge(&mut ch.errors, w.channels.errors);
    }
    hb.seconds = plan.duration.as_secs_f64();
    hb.per_second = hb.ok as f64 / hb.seconds.max(1e-9);
    hb.latency = Latency::of(&latency);
    hb.first_latency = Latency::of(&first);
    hb.later_latency = Latency::of(&later);
    hb.schedule_lag = Latency::of(&lag);
    (hb, any_ws.then_some(ch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            host_port("https://127.0.0.1:8443", 443).unwrap(),
            ("127.0.0.1".into(), 8443)
        );
        assert_eq!(
            host_port("http://localhost/x", 80).unwrap(),
            ("localhost".into(), 80)
        );
        assert_eq!(
            host_port("https://[::1]:9/", 443).unwrap(),
            ("::1".into(), 9)
        );
    }

    #[tokio::test]
    async fn only_loopback() {
        assert!(loopback_addr("https://127.0.0.1:8443", 443).await.is_ok());
        assert!(loopback_addr("https://10.1.2.3:8443", 443).await.is_err());
    }
}
