//! Idle command channels: what one idle mTLS command WebSocket costs the
//! balancer in memory. A fresh `fleetgate run` with the devices module on
//! its default store (SQLite) is driven by `fleetgate simulate --devices N
//! --hold-websockets --heartbeat-interval 0`: the simulator enrols N
//! devices, then opens every device's command channel and holds it, idle.
//! The balancer's RSS is read when the channels start opening (every
//! device enrolled) and every half second while they are held idle
//! (parked a second after their last traffic); the lowest reading is the
//! "after" one: the allocator returns what the channels' handshakes used
//! and freed only at its next collection, which an idle process reaches
//! some seconds later. (after − before) ÷ channels is the figure. Run with
//! `cargo bench --bench devices_idle`; it prints figures and asserts
//! nothing.
//!
//! Knobs (environment): `CHANNELS` (9500; the process limit here is 20,000
//! descriptors), `HOLD` (seconds the channels are held and read, 75: two
//! rounds of the module's 30 s pings, for the steady figure),
//! `CONCURRENCY` (simulator workers, 64), `THP` (`0`: the balancer runs
//! with `transparent_huge_pages = false`), `FLEETGATE_BIN` (another build),
//! `KEEP_TMP=1` (keep the config and logs).

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

const ADMIN_TOKEN: &str = "devices-idle-bench-admin-token";

struct Settings {
    channels: usize,
    hold: Duration,
    concurrency: usize,
    bin: PathBuf,
    keep_tmp: bool,
    /// THP=0 writes `transparent_huge_pages = false`; unset or 1 keeps the
    /// default.
    huge_pages: bool,
}

impl Settings {
    fn from_env() -> Result<Settings> {
        let number = |name: &str, default: u64| -> Result<u64> {
            match std::env::var(name) {
                Ok(t) => t
                    .trim()
                    .parse()
                    .with_context(|| format!("{name}={t:?} is not a whole number")),
                Err(_) => Ok(default),
            }
        };
        let s = Settings {
            channels: number("CHANNELS", 9500)? as usize,
            hold: Duration::from_secs(number("HOLD", 75)?),
            concurrency: number("CONCURRENCY", 64)? as usize,
            bin: std::env::var_os("FLEETGATE_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_fleetgate"))),
            keep_tmp: std::env::var("KEEP_TMP").is_ok_and(|v| v != "0" && !v.is_empty()),
            huge_pages: std::env::var("THP").map_or(true, |v| v != "0"),
        };
        if s.channels == 0 || s.concurrency == 0 || s.hold.is_zero() {
            bail!("CHANNELS, CONCURRENCY and HOLD must be at least 1");
        }
        Ok(s)
    }
}

/// A child process killed (and reaped) when dropped, so nothing this bench
/// started outlives it.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port on 127.0.0.1 free now, from below the ephemeral range (so the
/// simulator's own outgoing connections cannot take it first).
fn free_port(skip: u16) -> Result<u16> {
    let start = 20_000 + (std::process::id() % 5_000) as u16;
    (start..start + 5_000)
        .filter(|&p| p != skip)
        .find(|&p| TcpListener::bind(("127.0.0.1", p)).is_ok())
        .context("no free port")
}

/// VmRSS and RssAnon of `pid`, in KiB.
fn rss(pid: u32) -> Result<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("RssAnon:")))
}

/// The kernel's slab memory, machine-wide (KiB): where the sockets' own
/// memory goes, which no process's RSS shows.
fn slab() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Slab:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn healthy(admin: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&admin, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 200")
}

fn config(dir: &Path, front: u16, admin: u16, huge_pages: bool) -> String {
    format!(
        r#"[global]
data_dir = "{data}"
log_level = "warn"
transparent_huge_pages = {huge_pages}

[admin]
bind = "127.0.0.1:{admin}"

[[listener]]
name = "devices"
bind = "127.0.0.1:{front}"
mode = "offload"
tls = {{ cert = "auto", auto_names = ["localhost"], client_auth = "optional", client_ca = "module:devices" }}

  [[listener.route]]
  name = "api"
  path_prefix = "/api/v1/"
  module = "devices"

[module.devices]
kind = "devices"
admin_token = "{ADMIN_TOKEN}"
"#,
        data = dir.join("data").display()
    )
}

/// What was read while the simulator ran.
#[derive(Default)]
struct Readings {
    fresh: (u64, u64),
    before: Option<(u64, u64)>,
    /// The lowest VmRSS while held, with its RssAnon, and when it was
    /// read (seconds into the hold).
    after: Option<(u64, u64, f64)>,
    /// VmRSS samples while held (KiB), for seeing that it settled.
    held: Vec<u64>,
    /// (VmRSS, RssAnon) samples of the hold's last STEADY_WINDOW.
    tail: Vec<(u64, u64)>,
    /// The machine's slab before the channels and at the end of the hold.
    slab: (u64, u64),
}

/// The end of the hold whose median reading is the steady figure: by then
/// every channel has been woken by the module's pings (every 30 s) and
/// parked again, and what those wakeups left behind in the allocator
/// counts, as it does on a running balancer.
const STEADY_WINDOW: Duration = Duration::from_secs(10);

fn main() {
    if let Err(e) = run() {
        eprintln!("devices_idle bench: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let s = Settings::from_env()?;
    let dir = tempfile::Builder::new()
        .prefix("fleetgate-devices-idle-")
        .disable_cleanup(s.keep_tmp)
        .tempdir()?;
    if s.keep_tmp {
        eprintln!("config and logs kept in {}", dir.path().display());
    }
    let front = free_port(0)?;
    let admin = free_port(front)?;
    let cfg = dir.path().join("fleetgate.toml");
    std::fs::write(&cfg, config(dir.path(), front, admin, s.huge_pages))?;
    let log = File::create(dir.path().join("fleetgate.log"))?;
    let fg = Guard(
        Command::new(&s.bin)
            .args(["run", "-c"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", s.bin.display()))?,
    );
    let pid = fg.0.id();
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !healthy(admin_addr) {
        if Instant::now() > deadline {
            bail!(
                "fleetgate did not become ready (see {})",
                dir.path().display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("# fleetgate idle command channels\n");
    println!("- fleetgate: {}", s.bin.display());
    println!(
        "- CHANNELS={} HOLD={}s CONCURRENCY={} transparent_huge_pages={}",
        s.channels,
        s.hold.as_secs(),
        s.concurrency,
        s.huge_pages
    );
    let mut r = Readings {
        fresh: rss(pid)?,
        ..Default::default()
    };

    let duration = format!("{}s", s.hold.as_secs() + 3);
    let mut sim = Guard(
        Command::new(&s.bin)
            .arg("simulate")
            .args(["--url", &format!("https://127.0.0.1:{front}")])
            .args(["--admin", &format!("http://127.0.0.1:{admin}")])
            .args(["--admin-token", ADMIN_TOKEN, "--insecure"])
            .args(["--devices", &s.channels.to_string()])
            .args(["--concurrency", &s.concurrency.to_string()])
            .args(["--heartbeat-interval", "0", "--hold-websockets"])
            .args(["--duration", &duration, "--json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting the simulator")?,
    );
    let stderr = sim.0.stderr.take().expect("piped");
    let mut stdout = sim.0.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let json = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    // Progress lines mark the phases (src/cli/simulate/mod.rs).
    for line in rx {
        if line.contains("opening the command WebSockets") {
            r.before = Some(rss(pid)?);
            r.slab.0 = slab();
        } else if line.contains("steady phase") {
            let start = Instant::now();
            while start.elapsed() < s.hold {
                std::thread::sleep(Duration::from_millis(500));
                let (vm, anon) = rss(pid)?;
                r.held.push(vm);
                if start.elapsed() + STEADY_WINDOW >= s.hold {
                    r.tail.push((vm, anon));
                }
                if r.after.is_none_or(|(low, _, _)| vm < low) {
                    r.after = Some((vm, anon, start.elapsed().as_secs_f64()));
                }
            }
            r.slab.1 = slab();
        }
    }
    let status = sim.0.wait()?;
    let report: Value = serde_json::from_str(&json.join().unwrap_or_default())
        .with_context(|| format!("simulator output ({status})"))?;
    drop(fg);
    print_report(&r, &report)
}

fn print_report(r: &Readings, report: &Value) -> Result<()> {
    let (Some(before), Some(after)) = (r.before, r.after) else {
        bail!("the simulator did not reach the steady phase: {report}");
    };
    let ws = &report["websockets"];
    let held = ws["held_at_end"].as_u64().unwrap_or(0);
    let opened = ws["opened"].as_u64().unwrap_or(0);
    let enrolled = report["storm"]["devices_ok"].as_u64().unwrap_or(0);
    let per = |a: u64, b: u64, n: u64| (a as f64 - b as f64) / n.max(1) as f64;
    println!("\n## Results\n");
    println!("| reading | VmRSS (KiB) | RssAnon (KiB) |");
    println!("| --- | ---: | ---: |");
    println!("| fresh process | {} | {} |", r.fresh.0, r.fresh.1);
    println!(
        "| {enrolled} devices enrolled, no channel | {} | {} |",
        before.0, before.1
    );
    println!(
        "| {held} channels held idle (lowest, {:.1} s into the hold) | {} | {} |",
        after.2, after.0, after.1
    );
    println!();
    println!(
        "- **idle mTLS command channel, before any ping: {:.2} KiB** of RSS each ((lowest − before) ÷ {held} channels; {:.2} KiB anonymous)",
        per(after.0, before.0, held),
        per(after.1, before.1, held),
    );
    if !r.tail.is_empty() {
        let mut vm: Vec<u64> = r.tail.iter().map(|t| t.0).collect();
        let mut anon: Vec<u64> = r.tail.iter().map(|t| t.1).collect();
        vm.sort_unstable();
        anon.sort_unstable();
        let (vm, anon) = (vm[vm.len() / 2], anon[anon.len() / 2]);
        println!(
            "- **steady, with the pings: {:.2} KiB** each (median VmRSS of the hold's last {} s, {vm} KiB, − before) ÷ {held}; {:.2} KiB anonymous): every channel woken by a ping and parked again, what that left in the allocator included",
            per(vm, before.0, held),
            STEADY_WINDOW.as_secs(),
            per(anon, before.1, held),
        );
    }
    println!(
        "- enrolled device without a channel: {:.2} KiB each ((before − fresh) ÷ {enrolled}; module caches and the store's, after the enrolment storm)",
        per(before.0, r.fresh.0, enrolled),
    );
    // Runs of equal readings: `159196 ×28, 113300 ×32`.
    let mut runs: Vec<(u64, usize)> = Vec::new();
    for &v in &r.held {
        match runs.last_mut() {
            Some((last, n)) if *last == v => *n += 1,
            _ => runs.push((v, 1)),
        }
    }
    println!(
        "- VmRSS while held (KiB, every 0.5 s): {}",
        runs.iter()
            .map(|(v, n)| format!("{v} ×{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // Each channel is two sockets here, the balancer's and the device's.
    println!(
        "- kernel slab: {:.2} KiB per socket ((after − before) ÷ {} sockets; machine-wide, so other processes add noise)",
        per(r.slab.1, r.slab.0, 2 * held),
        2 * held
    );
    println!(
        "- simulator: {enrolled} devices enrolled in {:.1} s ({:.0}/s); {opened} channels opened in {:.1} s (open p50 {:.1} ms, p99 {:.1} ms), {} failed, {} lost while held",
        report["storm"]["seconds"].as_f64().unwrap_or(0.0),
        report["storm"]["devices_per_second"].as_f64().unwrap_or(0.0),
        ws["open_seconds"].as_f64().unwrap_or(0.0),
        ws["open"]["p50_ms"].as_f64().unwrap_or(0.0),
        ws["open"]["p99_ms"].as_f64().unwrap_or(0.0),
        ws["failed"].as_u64().unwrap_or(0),
        ws["lost"].as_u64().unwrap_or(0),
    );
    Ok(())
}
