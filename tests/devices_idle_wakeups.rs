//! An idle command channel costs no CPU: with its protocol ping out of the
//! way (`ws_ping`, 30 s by default), a parked channel has no timer tick,
//! sweep or poll of its own, so the balancer wakes up as often with 500
//! idle channels as with 10.
//!
//! The count is taken from outside, on the real binary: the context
//! switches of all of the balancer's threads (`/proc/PID/task/*/status`)
//! over an idle window. A runtime worker that sleeps in `epoll_wait` and is
//! woken by a timer or a socket counts one each time, whatever woke it. A
//! second balancer pinging every second shows that the count does see
//! per-channel wakeups. Windows are counted, never timed.

mod common;
// The simulator's device side drives the channels (see
// tests/devices_persistence.rs); not every part of it is used here.
#[allow(dead_code)]
#[path = "../src/cli/simulate/mod.rs"]
mod simulate;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::{free_addr, Balancer};
use futures_util::StreamExt;
use simulate::{Admin, SimDevice, Target, Trust};

const TOKEN: &str = "idle-wakeups-admin-token-0123456789";
const TIMEOUT: Duration = Duration::from_secs(30);
const FEW: usize = 10;
const MANY: usize = 500;
/// The idle window over which wakeups are counted.
const WINDOW: Duration = Duration::from_secs(5);
/// Longer than a channel takes to park after its last traffic (1 s).
const SETTLE: Duration = Duration::from_secs(3);

/// Context switches so far of each thread of `pid`.
fn switches(pid: u32) -> HashMap<String, u64> {
    let mut out = HashMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue; // the thread exited meanwhile
        };
        let n: u64 = status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum();
        out.insert(task.file_name().to_string_lossy().into_owned(), n);
    }
    out
}

/// Wakeups of the balancer's threads over `WINDOW`, the test's own
/// devices holding their channels meanwhile.
fn wakeups_over_window(pid: u32) -> u64 {
    let before = switches(pid);
    std::thread::sleep(WINDOW);
    switches(pid)
        .iter()
        .map(|(tid, n)| n - before.get(tid).copied().unwrap_or(0).min(*n))
        .sum()
}

struct Fleet {
    b: Balancer,
    target: Arc<Target>,
    devices: Vec<SimDevice>,
}

/// A balancer with `ws_ping`, and `MANY` enrolled devices (no channel yet).
async fn fleet(ws_ping: &str) -> Fleet {
    let front = free_addr();
    let extra = format!("ws_ping = \"{ws_ping}\"");
    let config =
        common::devices::process_config(std::path::Path::new("data"), front, TOKEN, &extra);
    let b = Balancer::start(&config);
    let admin = Admin {
        addr: b.admin,
        token: TOKEN.into(),
        module: "devices".into(),
        timeout: TIMEOUT,
    };
    let server_pem = b.dir.path().join("data/server.pem");
    let trust = Trust::from_pem_file(&server_pem).unwrap();
    let target = Arc::new(Target::new(front, "localhost", trust, TIMEOUT).unwrap());
    let tokens = admin.enrolment_tokens(MANY, "idle wakeups").await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    let (devices, storm) = simulate::storm(target.clone(), tokens, MANY, 16, false, deadline).await;
    assert_eq!(storm.devices_ok as usize, MANY, "{:?}", storm.errors);
    Fleet { b, target, devices }
}

/// Open the channels of `devices` and keep them read (pings are answered
/// while reading) until the test ends.
async fn hold_channels(target: &Arc<Target>, devices: Vec<SimDevice>) -> usize {
    let servers = Arc::new(simulate::Servers {
        targets: vec![target.clone()],
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    let buckets = devices.into_iter().map(|d| vec![d]).collect();
    let (buckets, report) = simulate::open_websockets(servers, buckets, deadline).await;
    assert_eq!(report.failed, 0, "{:?}", report.errors);
    let mut held = 0;
    for d in buckets.into_iter().flatten() {
        if let Some(mut ws) = d.ws {
            held += 1;
            tokio::spawn(async move { while let Some(Ok(_)) = ws.next().await {} });
        }
    }
    held
}

#[test]
fn idle_channels_cause_no_wakeups_of_their_own() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // The protocol ping out of the window: what is left is the channels'
    // own cost.
    let quiet = rt.block_on(async {
        let mut f = fleet("1h").await;
        let rest = f.devices.split_off(FEW);
        assert_eq!(
            hold_channels(&f.target, std::mem::take(&mut f.devices)).await,
            FEW
        );
        tokio::time::sleep(SETTLE).await;
        let few = wakeups_over_window(f.b.pid());
        assert_eq!(hold_channels(&f.target, rest).await, MANY - FEW);
        tokio::time::sleep(SETTLE).await;
        let many = wakeups_over_window(f.b.pid());
        eprintln!("wakeups over {WINDOW:?}: {few} with {FEW} idle channels, {many} with {MANY}");
        (few, many, f)
    });
    let (few, many, quiet_fleet) = quiet;
    // A per-channel tick of one a second would add about
    // (MANY - FEW) × 5 here; allow one wakeup per ten added channels for
    // whatever else the process does meanwhile.
    let slack = (MANY - FEW) as u64 / 10;
    assert!(
        many <= few + slack,
        "{MANY} idle channels woke the balancer {many} times in {WINDOW:?}, {FEW} did {few} times"
    );
    drop(quiet_fleet);

    // The same with a ping every second: each channel wakes the balancer
    // (the ping is due, the pong arrives), and the count shows it.
    let pinged = rt.block_on(async {
        let f = fleet("1s").await;
        assert_eq!(hold_channels(&f.target, f.devices).await, MANY);
        tokio::time::sleep(SETTLE).await;
        wakeups_over_window(f.b.pid())
    });
    eprintln!("wakeups over {WINDOW:?} with {MANY} channels pinged every second: {pinged}");
    assert!(
        pinged > many + (MANY - FEW) as u64,
        "pinging {MANY} channels every second woke the balancer only {pinged} times in {WINDOW:?}"
    );
}
