//! PostgreSQL lost for ten seconds under load, with two balancer processes
//! sharing one fleet on a server of the test's own (tests/common/pg.rs).
//!
//! While it is gone: heartbeats are answered (503 `storage unavailable`,
//! never a hang), the processes stay up with bounded memory, the command
//! WebSockets stay open, and `/healthz` says 503 so that a health checker
//! moves the traffic away. When it is back, without restarting anything:
//! heartbeats succeed, `/healthz` is 200, commands cross from one balancer
//! to the other again (the LISTEN connection is back), a command refused
//! during the outage can be queued again and is delivered, one queued
//! before and not delivered is delivered, and every heartbeat answered 200
//! has its contact recorded.
//!
//! The figures (503s, time to recover, RSS) are printed, not asserted.

mod common;
// The simulator's client code (a part of the `fleetgate` binary), to
// drive devices directly; not every part of it is used here.
#[allow(dead_code)]
#[path = "../src/cli/simulate/mod.rs"]
mod simulate;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::pg::PgServer;
use common::{free_addr, http_get, Balancer};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use simulate::{Admin, DeviceConn, DeviceWs, Identity, SimDevice, Target, Trust};
use tokio::task::block_in_place;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// Devices enrolled through each balancer.
const PER_BALANCER: usize = 150;
/// Devices of balancer A without a channel until the outage.
const LATE: usize = 5;
const OUTAGE: Duration = Duration::from_secs(10);
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// Longest a heartbeat may wait for its answer: beyond it, the balancer
/// hangs on the lost database instead of refusing.
const ANSWER_BOUND: Duration = Duration::from_secs(15);
/// A generous bound on each balancer's RSS (a few hundred devices take
/// tens of MiB): what it guards against is unbounded queueing.
const RSS_BOUND_KIB: u64 = 512 * 1024;
const TOKEN: &str = "outage-admin-token-0123456789";
const UNAVAILABLE: &str = "storage unavailable";

fn now_ms() -> i64 {
    fleetgate::clock::unix_ms() as i64
}

fn config(front: SocketAddr, data: &Path, node: &str, url: &str) -> String {
    common::devices::shared_store_config(
        data,
        node,
        front,
        url,
        TOKEN,
        "heartbeat_interval = \"60s\"\nheartbeat_jitter = \"30s\"",
    )
}

/// One balancer process and the clients that talk to it.
struct Side {
    name: &'static str,
    lb: Balancer,
    target: Arc<Target>,
    admin: Admin,
}

impl Side {
    fn start(name: &'static str, data: &Path, url: &str) -> Side {
        let front = free_addr();
        let lb = Balancer::start(&config(front, data, name, url));
        let admin = Admin {
            addr: lb.admin,
            token: TOKEN.into(),
            module: "devices".into(),
            timeout: Duration::from_secs(20),
        };
        let trust = Trust::from_pem_file(&data.join("server.pem")).unwrap();
        let target =
            Arc::new(Target::new(front, "localhost", trust, Duration::from_secs(20)).unwrap());
        Side {
            name,
            lb,
            target,
            admin,
        }
    }

    /// `/healthz`: status and body.
    fn healthz(&self) -> (u16, String) {
        let r = block_in_place(|| http_get(self.lb.admin, "/healthz")).unwrap_or_default();
        let status = r.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        let body = r.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
        (status, body.unwrap_or_default())
    }

    /// Until `/healthz` answers `want`; how long that took.
    async fn healthz_until(&self, want: u16, within: Duration) -> (Duration, String) {
        let t0 = Instant::now();
        loop {
            let (s, body) = self.healthz();
            if s == want {
                return (t0.elapsed(), body);
            }
            assert!(
                t0.elapsed() < within,
                "{}: /healthz stayed {s} ({body:?}), expected {want}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Running (not exited, not a zombie waiting to be reaped).
    fn alive(&self) -> bool {
        proc_status(self.lb.pid(), "State:").is_some_and(|s| !s.starts_with('Z'))
    }

    fn rss_kib(&self) -> u64 {
        rss_kib(self.lb.pid())
    }

    async fn queue(&self, device_id: &str, text: &str) -> (u16, Value) {
        self.admin
            .call(
                "POST",
                &format!("devices/{device_id}/commands"),
                Some(&json!({"kind": "message", "payload": {"text": text}})),
            )
            .await
            .unwrap()
    }
}

/// A field of /proc/PID/status.
fn proc_status(pid: u32, field: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_string()))
}

fn rss_kib(pid: u32) -> u64 {
    proc_status(pid, "VmRSS:")
        .and_then(|v| v.trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// When (unix ms) and each balancer's RSS (KiB).
type RssSample = (i64, [u64; 2]);

/// One heartbeat as the device saw it.
struct Beat {
    side: usize,
    sent: i64,
    answered: i64,
    /// 0: no HTTP answer (`error` says why).
    status: u16,
    unavailable: bool,
    error: Option<String>,
}

/// Heartbeats every second (plus up to half a second) over the device's
/// kept connection, reconnecting when it closes; returns when every
/// one was sent. The send time of the last one answered 200.
async fn heartbeats(
    side: usize,
    target: Arc<Target>,
    identity: Arc<Identity>,
    mut conn: Option<DeviceConn>,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Beat>>>,
) -> i64 {
    let mut last_ok = 0;
    tokio::time::sleep(HEARTBEAT_EVERY.mul_f64(fastrand::f64())).await;
    while !stop.load(Ordering::Relaxed) {
        if conn.as_ref().is_none_or(|c| c.closed) {
            conn = target.connect(&identity.config).await.ok();
        }
        let sent = now_ms();
        let r = match conn.as_mut() {
            Some(c) => c.request("POST", "/api/v1/heartbeat", None).await,
            None => Err(simulate::SimError::Closed),
        };
        let beat = match r {
            Ok(r) => Beat {
                side,
                sent,
                answered: now_ms(),
                status: r.status,
                unavailable: String::from_utf8_lossy(&r.body).contains(UNAVAILABLE),
                error: None,
            },
            Err(e) => Beat {
                side,
                sent,
                answered: now_ms(),
                status: 0,
                unavailable: false,
                error: Some(e.kind()),
            },
        };
        if beat.status == 200 {
            last_ok = sent;
        }
        log.lock().unwrap().push(beat);
        let pause = HEARTBEAT_EVERY + Duration::from_millis(fastrand::u64(0..500));
        tokio::time::sleep(pause).await;
    }
    last_ok
}

/// What a device's command channel saw.
#[derive(Default)]
struct ChannelLog {
    closed: Mutex<Option<String>>,
    last_pong: AtomicI64,
    commands: Mutex<Vec<String>>,
}

/// Hold the channel: ping every second (the answer proves the balancer
/// still serves it), acknowledge every command.
async fn hold(mut ws: DeviceWs, log: Arc<ChannelLog>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let why = loop {
        let msg = tokio::select! {
            m = ws.next() => m,
            _ = tick.tick() => {
                if let Err(e) = ws.send(Message::Ping(Default::default())).await {
                    break format!("ping: {e}");
                }
                continue;
            }
        };
        match msg {
            Some(Ok(Message::Pong(_))) => log.last_pong.store(now_ms(), Ordering::Relaxed),
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "command" {
                    let id = v["id"].as_str().unwrap().to_string();
                    log.commands.lock().unwrap().push(id.clone());
                    let ack = json!({"type": "ack", "id": id, "status": "ok"});
                    if let Err(e) = ws.send(Message::text(ack.to_string())).await {
                        break format!("ack: {e}");
                    }
                }
            }
            Some(Ok(Message::Close(f))) => break format!("closed by the balancer: {f:?}"),
            Some(Ok(_)) => {}
            Some(Err(e)) => break format!("error: {e}"),
            None => break "ended".to_string(),
        }
    };
    *log.closed.lock().unwrap() = Some(why);
}

/// Until the channel got command `id`; how long that took.
async fn delivered(log: &ChannelLog, id: &str, within: Duration) -> Duration {
    let t0 = Instant::now();
    while !log.commands.lock().unwrap().iter().any(|c| c == id) {
        assert!(t0.elapsed() < within, "command {id} never delivered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t0.elapsed()
}

async fn enrol(side: &Side, n: usize) -> Vec<SimDevice> {
    let tokens = side.admin.enrolment_tokens(n, side.name).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    let (devices, storm) =
        simulate::storm(side.target.clone(), tokens, n, 16, true, deadline).await;
    assert_eq!(devices.len(), n, "{}: {:?}", side.name, storm.errors);
    eprintln!(
        "{}: enrolled {n} devices in {:.1} s",
        side.name, storm.seconds
    );
    devices
}

fn secs(from: i64, to: i64) -> f64 {
    (to - from) as f64 / 1000.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balancers_ride_out_a_postgres_outage() {
    // Dropped last: the balancers go first.
    let pg = block_in_place(PgServer::start);
    let url = pg.url();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = block_in_place(|| Side::start("a", dir_a.path(), &url));
    // Both balancers sign with and trust one device CA, and show devices
    // one server certificate (as behind one floating address).
    let ca_b = dir_b.path().join("devices");
    std::fs::create_dir_all(&ca_b).unwrap();
    for f in ["device-ca.pem", "device-ca.key"] {
        std::fs::copy(dir_a.path().join("devices").join(f), ca_b.join(f)).unwrap();
    }
    for f in ["server.pem", "server.key"] {
        std::fs::copy(dir_a.path().join(f), dir_b.path().join(f)).unwrap();
    }
    let b = block_in_place(|| Side::start("b", dir_b.path(), &url));
    let sides = [&a, &b];

    // Devices 0..PER_BALANCER call in on A and hold their channel on B,
    // the others the other way round; the first LATE have no channel yet.
    let mut devices = enrol(&a, PER_BALANCER).await;
    devices.extend(enrol(&b, PER_BALANCER).await);
    let home = |i: usize| usize::from(i >= PER_BALANCER);
    let ids: Vec<String> = devices
        .iter()
        .map(|d| d.identity.device_id.clone())
        .collect();
    let channels: Vec<Arc<ChannelLog>> = (0..devices.len())
        .map(|_| Arc::new(ChannelLog::default()))
        .collect();
    let mut holders = Vec::new();
    for (i, d) in devices.iter().enumerate().skip(LATE) {
        let ws = sides[1 - home(i)]
            .target
            .websocket(&d.identity)
            .await
            .unwrap();
        holders.push(tokio::spawn(hold(ws, channels[i].clone())));
    }
    eprintln!("{} channels open", holders.len());

    let rss: Arc<Mutex<Vec<RssSample>>> = Arc::default();
    let sampler = {
        let (rss, pids) = (rss.clone(), [a.lb.pid(), b.lb.pid()]);
        tokio::spawn(async move {
            loop {
                let r = [rss_kib(pids[0]), rss_kib(pids[1])];
                rss.lock().unwrap().push((now_ms(), r));
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };

    let stop = Arc::new(AtomicBool::new(false));
    let beats: Arc<Mutex<Vec<Beat>>> = Arc::default();
    let load: Vec<_> = devices
        .iter_mut()
        .enumerate()
        .map(|(i, d)| {
            tokio::spawn(heartbeats(
                home(i),
                sides[home(i)].target.clone(),
                d.identity.clone(),
                d.conn.take(),
                stop.clone(),
                beats.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Queued before the outage for devices without a channel: pending.
    let mut before = Vec::new();
    for id in &ids[..LATE] {
        let (s, c) = b.queue(id, "queued before the outage").await;
        assert_eq!(s, 201, "{c}");
        before.push(c["id"].as_str().unwrap().to_string());
    }

    // The outage.
    let rss_before = [a.rss_kib(), b.rss_kib()];
    block_in_place(|| pg.stop());
    let stopped = now_ms();
    eprintln!("PostgreSQL stopped");
    for s in &sides {
        let (took, body) = s.healthz_until(503, OUTAGE).await;
        assert_eq!(body, format!("devices: {UNAVAILABLE}\n"));
        eprintln!(
            "{}: /healthz 503 {:.2} s after the stop",
            s.name,
            took.as_secs_f64()
        );
    }
    // A command queued now is refused, and says why.
    let (crossing, other) = (LATE, LATE + 1);
    let (s, refused) = a.queue(&ids[crossing], "queued during the outage").await;
    assert_eq!(s, 503, "{refused}");
    assert!(
        refused["error"].as_str().unwrap().contains(UNAVAILABLE),
        "{refused}"
    );
    // Devices known to the balancer open their channel meanwhile; what is
    // pending for them comes once the database is back.
    for (i, d) in devices.iter().enumerate().take(LATE) {
        let ws = a.target.websocket(&d.identity).await.unwrap();
        holders.push(tokio::spawn(hold(ws, channels[i].clone())));
    }
    let until =
        Instant::now() + OUTAGE.saturating_sub(Duration::from_millis((now_ms() - stopped) as u64));
    tokio::time::sleep_until(until).await;
    assert!(a.alive() && b.alive(), "a balancer died during the outage");
    for (i, ch) in channels.iter().enumerate() {
        assert_eq!(*ch.closed.lock().unwrap(), None, "channel {i} closed");
        assert!(
            ch.last_pong.load(Ordering::Relaxed) > stopped,
            "channel {i}: no pong during the outage"
        );
    }
    let rss_during = [a.rss_kib(), b.rss_kib()];

    // Back.
    let resuming = now_ms();
    block_in_place(|| pg.resume());
    let resumed = now_ms();
    eprintln!(
        "PostgreSQL back after {:.1} s (accepting {:.2} s after its start)",
        secs(stopped, resumed),
        secs(resuming, resumed)
    );
    let mut healthy_after = [0.0; 2];
    for (k, s) in sides.iter().enumerate() {
        let (took, _) = s.healthz_until(200, Duration::from_secs(30)).await;
        healthy_after[k] = took.as_secs_f64();
    }
    // The refused command, queued again through A, reaches the device's
    // channel on B: B listens again (the notification, or the resync
    // after its LISTEN connection came back, pokes the channel).
    let t0 = Instant::now();
    let requeued = loop {
        let (s, c) = a.queue(&ids[crossing], "queued again").await;
        if s == 201 {
            break c["id"].as_str().unwrap().to_string();
        }
        assert_eq!(s, 503, "{c}");
        assert!(t0.elapsed() < Duration::from_secs(30), "still refused: {c}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let crossed_after = secs(resumed, now_ms())
        + delivered(&channels[crossing], &requeued, Duration::from_secs(30))
            .await
            .as_secs_f64();
    // What was pending before the outage is delivered on the channels
    // opened during it.
    for (i, id) in before.iter().enumerate() {
        delivered(&channels[i], id, Duration::from_secs(30)).await;
    }
    let pending_after = secs(resumed, now_ms());
    // Their channels could not be recorded then; they are now.
    for (i, id) in ids.iter().enumerate().take(LATE) {
        let t0 = Instant::now();
        loop {
            let d = a
                .admin
                .expect(200, "GET", &format!("devices/{id}"), None)
                .await
                .unwrap();
            if d["channel_node"] == "a" {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "device {i}: {d}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // And commands cross both ways as before.
    let (s, c) = a.queue(&ids[other], "after").await;
    assert_eq!(s, 201, "{c}");
    delivered(
        &channels[other],
        c["id"].as_str().unwrap(),
        Duration::from_secs(30),
    )
    .await;
    let last = devices.len() - 1;
    let (s, c) = b.queue(&ids[last], "after, the other way").await;
    assert_eq!(s, 201, "{c}");
    delivered(
        &channels[last],
        c["id"].as_str().unwrap(),
        Duration::from_secs(30),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    stop.store(true, Ordering::Relaxed);
    let mut last_ok = Vec::new();
    for t in load {
        last_ok.push(t.await.unwrap());
    }
    sampler.abort();
    assert!(a.alive() && b.alive(), "a balancer died");
    for (i, ch) in channels.iter().enumerate() {
        assert_eq!(*ch.closed.lock().unwrap(), None, "channel {i} closed");
    }

    // Every heartbeat was answered, within the bound; during the outage
    // with 503 `storage unavailable`.
    let beats = std::mem::take(&mut *beats.lock().unwrap());
    let mut errors: HashMap<String, usize> = HashMap::new();
    let (mut ok, mut refused_n, mut first_ok_after) = ([0usize; 2], [0usize; 2], [i64::MAX; 2]);
    let mut slowest = 0;
    for hb in &beats {
        slowest = slowest.max(hb.answered - hb.sent);
        if let Some(e) = &hb.error {
            *errors.entry(e.clone()).or_default() += 1;
        }
        match hb.status {
            200 => ok[hb.side] += 1,
            503 => {
                assert!(hb.unavailable, "a 503 that does not say why");
                refused_n[hb.side] += 1;
            }
            0 => {}
            s => panic!("heartbeat answered {s}"),
        }
        if hb.sent > stopped && hb.answered < resuming {
            assert_eq!(hb.status, 503, "a heartbeat during the outage");
        }
        if hb.status == 200 && hb.sent >= resuming {
            first_ok_after[hb.side] = first_ok_after[hb.side].min(hb.answered);
        }
    }
    assert!(
        slowest <= ANSWER_BOUND.as_millis() as i64,
        "a heartbeat waited {slowest} ms for its answer"
    );
    assert!(
        errors.is_empty(),
        "heartbeats without an answer: {errors:?}"
    );
    for k in 0..2 {
        assert!(
            refused_n[k] > 0 && ok[k] > 0,
            "{}: {ok:?} {refused_n:?}",
            sides[k].name
        );
        assert!(
            first_ok_after[k] < i64::MAX,
            "{}: no 200 after the outage",
            sides[k].name
        );
    }

    // Nothing acknowledged is lost: each device's last heartbeat answered
    // 200 is recorded.
    let list = a
        .admin
        .expect(200, "GET", "devices?limit=1000", None)
        .await
        .unwrap();
    let stored: HashMap<&str, i64> = list["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["id"].as_str().unwrap(),
                d["last_contact"].as_i64().unwrap_or(0),
            )
        })
        .collect();
    for (i, id) in ids.iter().enumerate() {
        assert!(last_ok[i] > resuming, "device {i}: no 200 after the outage");
        assert!(
            stored[id.as_str()] >= last_ok[i],
            "device {i}: heartbeat answered 200 at {} not recorded (last_contact {})",
            last_ok[i],
            stored[id.as_str()]
        );
    }

    let samples = rss.lock().unwrap();
    let peak = |from: i64, to: i64, k: usize| {
        samples
            .iter()
            .filter(|(t, _)| (from..to).contains(t))
            .map(|(_, r)| r[k])
            .max()
            .unwrap_or(0)
    };
    eprintln!("--- outage figures ---");
    eprintln!(
        "devices {} ({} channels), heartbeats {} in all, slowest answer {slowest} ms",
        ids.len(),
        channels.len(),
        beats.len()
    );
    for k in 0..2 {
        let name = sides[k].name;
        eprintln!(
            "{name}: 200 {} / 503 {}; first 200 {:.2} s after PostgreSQL was back; /healthz 200 after {:.2} s",
            ok[k],
            refused_n[k],
            secs(resumed, first_ok_after[k]),
            healthy_after[k]
        );
        let peak_during = peak(stopped, resuming, k);
        eprintln!(
            "{name}: RSS {} KiB before, {} KiB at the end of the outage (peak {} KiB during, {} KiB after)",
            rss_before[k],
            rss_during[k],
            peak_during,
            peak(resuming, i64::MAX, k)
        );
        assert!(
            peak_during < RSS_BOUND_KIB,
            "{name}: RSS {peak_during} KiB during the outage"
        );
    }
    eprintln!(
        "command refused during the outage, queued again through A: on B's channel {crossed_after:.2} s after PostgreSQL was back; pending ones delivered by {pending_after:.2} s"
    );
    for h in holders {
        h.abort();
    }
}

/// The module as the status document shows it.
fn module_status(lb: &Balancer) -> Value {
    let r = block_in_place(|| http_get(lb.admin, "/status")).unwrap();
    let (_, body) = r.split_once("\r\n\r\n").unwrap();
    let doc: Value = serde_json::from_str(body).unwrap();
    doc["modules"][0].clone()
}

/// With `required = false` the balancer stays healthy for its other
/// routes while the module's database is gone; the status document still
/// says the module is not ready, and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_that_is_not_required_leaves_the_balancer_healthy() {
    let pg = block_in_place(PgServer::start);
    let dir = tempfile::tempdir().unwrap();
    let text = config(free_addr(), dir.path(), "solo", &pg.url()).replace(
        "kind = \"devices\"\n",
        "kind = \"devices\"\nrequired = false\n",
    );
    let lb = block_in_place(|| Balancer::start(&text));
    let m = module_status(&lb);
    assert_eq!((&m["ready"], &m["required"]), (&json!(true), &json!(false)));

    block_in_place(|| pg.stop());
    let t0 = Instant::now();
    while module_status(&lb)["ready"] != false {
        assert!(t0.elapsed() < Duration::from_secs(10), "still ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(module_status(&lb)["not_ready_reason"], UNAVAILABLE);
    let r = block_in_place(|| http_get(lb.admin, "/healthz")).unwrap();
    assert!(
        r.starts_with("HTTP/1.1 200") && r.ends_with("\r\n\r\nok\n"),
        "{r}"
    );

    block_in_place(|| pg.resume());
    let t0 = Instant::now();
    while module_status(&lb)["ready"] != true {
        assert!(t0.elapsed() < Duration::from_secs(30), "never ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
