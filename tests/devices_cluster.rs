//! Three balancers (real `fleetgate run` processes) on one PostgreSQL,
//! the devices spread over them, then one of them killed with SIGKILL.
//!
//! A. Across balancers: a command queued on one reaches the device on
//!    another, a revocation on one is enforced by the others, a settings
//!    change on one shows in the next heartbeat through the others. The
//!    latencies are printed (not asserted).
//! B. A balancer lost while a few hundred devices heartbeat and hold
//!    channels: every command queued before and during the loss is
//!    delivered after the devices moved to the next address of their
//!    server list and acknowledged once; every answered heartbeat is in
//!    the store; `channel_node` shows the survivors; a device that does
//!    not come back loses its channel once the dead node's lease expires.

mod common;
// The simulator's client code is part of the `fleetgate` binary; this test
// compiles it in to drive devices. Not every part of it is used here.
#[allow(dead_code)]
#[path = "../src/cli/simulate/mod.rs"]
mod simulate;

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Balancer;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use simulate::{Admin, DeviceConn, Identity, Servers, Target, Trust};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

const TOKEN: &str = "cluster-admin-token-0123456789";
const TIMEOUT: Duration = Duration::from_secs(30);
/// Devices heartbeating and holding channels during the loss.
const FLEET: usize = 300;
/// Devices of the killed balancer that do not come back (index < MUTE
/// among those starting on it).
const MUTE: usize = 20;
/// Latency samples per measure.
const SAMPLES: usize = 50;
/// The node lease of the test's balancers: short, to keep the test short.
const LEASE_RENEW: Duration = Duration::from_secs(1);
const LEASE: Duration = Duration::from_secs(3);

fn now_ms() -> i64 {
    fleetgate::clock::unix_ms() as i64
}

fn config(data: &Path, node: &str, front: std::net::SocketAddr, pg: &str) -> String {
    let lease = format!(
        "lease_renew = \"{}s\"\nlease = \"{}s\"",
        LEASE_RENEW.as_secs(),
        LEASE.as_secs()
    );
    common::devices::shared_store_config(data, node, front, pg, TOKEN, &lease)
}

struct Lb {
    process: Balancer,
    admin: Admin,
}

/// Start three balancers sharing one fleet: the first creates the device
/// CA and the server certificate, the others start with copies.
fn start_three(root: &Path, pg: &str) -> (Vec<Lb>, Trust, Vec<std::net::SocketAddr>) {
    let mut lbs = Vec::new();
    let mut fronts = Vec::new();
    let first_data: PathBuf = root.join("lb-a/data");
    for node in ["lb-a", "lb-b", "lb-c"] {
        let data = root.join(node).join("data");
        std::fs::create_dir_all(data.join("devices")).unwrap();
        if node != "lb-a" {
            for f in [
                "server.pem",
                "server.key",
                "devices/device-ca.pem",
                "devices/device-ca.key",
            ] {
                std::fs::copy(first_data.join(f), data.join(f)).unwrap();
            }
        }
        let front = common::free_addr();
        let process = Balancer::start(&config(&data, node, front, pg));
        let admin = Admin {
            addr: process.admin,
            token: TOKEN.into(),
            module: "devices".into(),
            timeout: TIMEOUT,
        };
        fronts.push(front);
        lbs.push(Lb { process, admin });
    }
    let trust = Trust::from_pem_file(&first_data.join("server.pem")).unwrap();
    (lbs, trust, fronts)
}

fn summary(name: &str, mut ms: Vec<f64>) -> String {
    ms.sort_by(f64::total_cmp);
    let p50 = ms[ms.len() / 2];
    let max = ms[ms.len() - 1];
    format!("{name}: n={} p50 {p50:.1} ms, max {max:.1} ms", ms.len())
}

/// What the devices saw, shared by their tasks.
#[derive(Default)]
struct Seen {
    /// Command id -> when first received.
    received: Mutex<HashMap<String, Instant>>,
    arrived: Notify,
    redelivered: AtomicU64,
    /// Per device: the send time of its last heartbeat answered 200.
    last_heartbeat: Mutex<HashMap<String, i64>>,
    heartbeats_ok: AtomicU64,
    /// Per device: when its channel was open again after a loss.
    reopened: Mutex<HashMap<String, Instant>>,
    /// How long devices take to acknowledge a command: set around the
    /// kill, so that some commands are sent and not yet acknowledged when
    /// their balancer dies.
    ack_delay_ms: AtomicU64,
}

impl Seen {
    async fn wait_for(&self, id: &str, within: Duration) -> Option<Instant> {
        let deadline = Instant::now() + within;
        loop {
            let notified = self.arrived.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(t) = self.received.lock().unwrap().get(id) {
                return Some(*t);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}

/// A device: holds its channel (acknowledging each command, recognising
/// a command received again by its id) and heartbeats every ~second over
/// a kept connection; on a connection failure it moves to the next
/// address of its list. A `mute` device stops for good when it loses its
/// channel (a device that is switched off with its balancer).
async fn device(
    identity: Arc<Identity>,
    servers: Arc<Servers>,
    mut server: usize,
    mute: bool,
    seen: Arc<Seen>,
    mut stop: watch::Receiver<bool>,
) {
    let id = identity.device_id.clone();
    let mut conn: Option<DeviceConn> = None;
    let mut ids: HashSet<String> = HashSet::new();
    let mut lost = false;
    // Acknowledgements waiting for their time.
    let mut unacked: VecDeque<(Instant, Value)> = VecDeque::new();
    let mut beat = tokio::time::interval(Duration::from_millis(800 + fastrand::u64(..400)));
    loop {
        // (Re)open the channel, from the current address on.
        let mut ws = loop {
            if *stop.borrow() {
                return;
            }
            match servers.at(server).websocket(&identity).await {
                Ok(ws) => break ws,
                Err(_) => server += 1,
            }
            if server.is_multiple_of(servers.targets.len()) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        if lost {
            seen.reopened
                .lock()
                .unwrap()
                .insert(id.clone(), Instant::now());
        }
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                msg = ws.next() => match msg {
                    Some(Ok(Message::Text(t))) => {
                        let v: Value = serde_json::from_str(&t).unwrap();
                        if v["type"] != "command" {
                            continue;
                        }
                        let cid = v["id"].as_str().unwrap().to_string();
                        if ids.insert(cid.clone()) {
                            seen.received.lock().unwrap().insert(cid, Instant::now());
                            seen.arrived.notify_waiters();
                        } else {
                            seen.redelivered.fetch_add(1, Ordering::Relaxed);
                        }
                        let ack = json!({"type": "ack", "id": v["id"], "status": "ok"});
                        let delay = seen.ack_delay_ms.load(Ordering::Relaxed);
                        if delay > 0 {
                            unacked.push_back((Instant::now() + Duration::from_millis(delay), ack));
                        } else if ws.send(Message::text(ack.to_string())).await.is_err() {
                            break;
                        }
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                    Some(Ok(_)) => {}
                },
                _ = tokio::time::sleep_until(unacked.front().map_or_else(Instant::now, |a| a.0)), if !unacked.is_empty() => {
                    let (_, ack) = unacked.pop_front().unwrap();
                    if ws.send(Message::text(ack.to_string())).await.is_err() {
                        break;
                    }
                }
                _ = beat.tick() => {
                    let c = match conn.take() {
                        Some(c) if !c.closed => Some(c),
                        _ => servers.at(server).connect(&identity.config).await.ok(),
                    };
                    let Some(mut c) = c else {
                        server += 1;
                        continue;
                    };
                    let sent = now_ms();
                    if let Ok(r) = c.request("POST", "/api/v1/heartbeat", None).await {
                        if r.status == 200 {
                            seen.last_heartbeat.lock().unwrap().insert(id.clone(), sent);
                            seen.heartbeats_ok.fetch_add(1, Ordering::Relaxed);
                        }
                        conn = Some(c);
                    }
                }
            }
        }
        lost = true;
        conn = None;
        // Not acknowledged: the command comes again on the next channel.
        unacked.clear();
        if mute {
            let _ = stop.changed().await;
            return;
        }
    }
}

/// Queue a command through `lb`; its id.
async fn queue(lb: &Admin, device: &str, text: &str) -> String {
    let c = lb
        .expect(
            201,
            "POST",
            &format!("devices/{device}/commands"),
            Some(&json!({"kind": "message", "payload": {"text": text}})),
        )
        .await
        .unwrap();
    c["id"].as_str().unwrap().to_string()
}

/// How many of the `queued` commands (device -> ids) the store has
/// acknowledged, checking that each is stored once.
async fn acked_in_store(lb: &Admin, queued: &HashMap<String, Vec<String>>) -> usize {
    let mut acked = 0;
    for (id, cids) in queued {
        let v = lb
            .expect(
                200,
                "GET",
                &format!("devices/{id}/commands?limit=1000"),
                None,
            )
            .await
            .unwrap();
        let list = v["commands"].as_array().unwrap();
        for cid in cids {
            let rows: Vec<&Value> = list.iter().filter(|c| c["id"] == cid.as_str()).collect();
            assert_eq!(rows.len(), 1, "command {cid} stored once");
            if rows[0]["status"] == "ok" && rows[0]["acked_at"].is_i64() {
                acked += 1;
            }
        }
    }
    acked
}

/// Every device row, through `lb`.
async fn rows(lb: &Admin) -> HashMap<String, Value> {
    let mut out = HashMap::new();
    let mut offset = 0;
    loop {
        let v = lb
            .expect(
                200,
                "GET",
                &format!("devices?limit=1000&offset={offset}"),
                None,
            )
            .await
            .unwrap();
        let page = v["devices"].as_array().unwrap();
        for d in page {
            out.insert(d["id"].as_str().unwrap().to_string(), d.clone());
        }
        offset += page.len();
        if page.is_empty() || offset as u64 >= v["total"].as_u64().unwrap() {
            return out;
        }
    }
}

async fn until(what: &str, within: Duration, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether `device`'s certificate gets a heartbeat answered through `t`
/// (a refused handshake or a 403 both count as refused).
async fn accepted(t: &Target, identity: &Identity) -> bool {
    match t.connect(&identity.config).await {
        Ok(mut c) => matches!(
            c.request("POST", "/api/v1/heartbeat", None).await,
            Ok(r) if r.status == 200
        ),
        Err(_) => false,
    }
}

#[test]
fn three_balancers_one_fleet_and_one_lost() {
    let pg = common::pg::url();
    let root = tempfile::tempdir().unwrap();
    let (lbs, trust, fronts) = start_three(root.path(), &pg);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let targets: Vec<Arc<Target>> = fronts
        .iter()
        .map(|a| Arc::new(Target::new(*a, "localhost", trust.clone(), TIMEOUT).unwrap()))
        .collect();
    let servers = Arc::new(Servers {
        targets: targets.clone(),
    });
    let admins: Vec<Admin> = lbs.iter().map(|l| l.admin.clone()).collect();
    let (a, b) = (&admins[0], &admins[1]);
    let (stop_tx, stop_rx) = watch::channel(false);
    let seen = Arc::new(Seen::default());

    rt.block_on(async {
        // The fleet, spread: device i enrols on and starts with lb i % 3.
        let tokens = a.enrolment_tokens(FLEET + SAMPLES, "cluster").await.unwrap();
        let (fleet, storm) = simulate::storm_on(
            servers.clone(),
            tokens,
            FLEET + SAMPLES,
            32,
            false,
            Instant::now() + Duration::from_secs(300),
        )
        .await;
        assert_eq!(storm.devices_ok as usize, FLEET + SAMPLES, "{:?}", storm.errors);
        let mut fleet = fleet;
        fleet.sort_by_key(|d| d.identity.device_id.clone());
        let probes: Vec<Arc<Identity>> =
            fleet.split_off(FLEET).into_iter().map(|d| d.identity).collect();
        // Which devices start on the balancer to be killed, and which of
        // them will not come back.
        let mut on_c = 0;
        let mut mute: HashSet<String> = HashSet::new();
        let mut tasks = Vec::new();
        for d in &fleet {
            let is_mute = d.server == 2 && on_c < MUTE;
            if d.server == 2 {
                on_c += 1;
            }
            if is_mute {
                mute.insert(d.identity.device_id.clone());
            }
            tasks.push(tokio::spawn(device(
                d.identity.clone(),
                servers.clone(),
                d.server,
                is_mute,
                seen.clone(),
                stop_rx.clone(),
            )));
        }
        let ids: Vec<String> = fleet.iter().map(|d| d.identity.device_id.clone()).collect();
        let start_of: HashMap<String, usize> = fleet
            .iter()
            .map(|d| (d.identity.device_id.clone(), d.server))
            .collect();
        until("every channel recorded on its balancer", Duration::from_secs(60), async || {
            let r = rows(a).await;
            ids.iter().all(|id| {
                r[id]["channel_node"] == lbs_node(start_of[id])
            })
        })
        .await;

        // A. Latencies across balancers.
        // Queue on A, received on the device's channel on C.
        let mut lat = Vec::new();
        let on_c_ids: Vec<&String> = ids.iter().filter(|id| start_of[*id] == 2).collect();
        for k in 0..SAMPLES {
            let id = on_c_ids[k % on_c_ids.len()];
            let t0 = Instant::now();
            let cid = queue(a, id, &format!("latency {k}")).await;
            let got = seen
                .wait_for(&cid, Duration::from_secs(20))
                .await
                .expect("a command queued on A reached the device on C");
            lat.push(got.saturating_duration_since(t0).as_secs_f64() * 1e3);
        }
        let queue_lat = summary("queue on A -> received on C's channel", lat);

        // Settings put on A -> new version in a heartbeat through B and C.
        let probe = &probes[0];
        let mut settings_lat = (Vec::new(), Vec::new());
        let mut conns = Vec::new();
        for t in &targets[1..] {
            conns.push(t.connect(&probe.config).await.unwrap());
        }
        async fn version(c: &mut DeviceConn) -> Value {
            let r = c.request("POST", "/api/v1/heartbeat", None).await.unwrap();
            r.expect(200).unwrap();
            r.json().unwrap()["settings_version"].clone()
        }
        for k in 0..SAMPLES {
            let before = version(&mut conns[0]).await;
            assert_eq!(version(&mut conns[1]).await, before);
            let t0 = Instant::now();
            a.expect(200, "PUT", "defaults", Some(&json!({"marker": format!("{}-{k}", probe.device_id)})))
                .await
                .unwrap();
            for (n, out) in [&mut settings_lat.0, &mut settings_lat.1].into_iter().enumerate() {
                let deadline = Instant::now() + Duration::from_secs(20);
                while version(&mut conns[n]).await == before {
                    assert!(Instant::now() < deadline, "the settings change on A never showed");
                }
                out.push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        drop(conns);
        let settings_b = summary("settings put on A -> new version through B", settings_lat.0);
        let settings_c = summary("settings put on A -> new version through C", settings_lat.1);

        // Revoke on A -> refused through B and C.
        let mut revoke_lat = (Vec::new(), Vec::new());
        for p in &probes[1..] {
            assert!(accepted(&targets[1], p).await && accepted(&targets[2], p).await);
            let t0 = Instant::now();
            a.expect(200, "POST", &format!("devices/{}/revoke", p.device_id), None)
                .await
                .unwrap();
            let refused = |t: Arc<Target>| {
                let p = p.clone();
                async move {
                    let deadline = Instant::now() + Duration::from_secs(20);
                    while accepted(&t, &p).await {
                        assert!(Instant::now() < deadline, "a revocation on A was never enforced");
                    }
                    t0.elapsed().as_secs_f64() * 1e3
                }
            };
            let (rb, rc) = tokio::join!(refused(targets[1].clone()), refused(targets[2].clone()));
            revoke_lat.0.push(rb);
            revoke_lat.1.push(rc);
        }
        let revoke_b = summary("revoke on A -> refused through B", revoke_lat.0);
        let revoke_c = summary("revoke on A -> refused through C", revoke_lat.1);

        // B. One balancer lost. Commands before: one per device, all
        // received; then one per device that will come back, queued
        // through A and B while C is killed; then one more for each of
        // C's returning devices during the loss.
        let mut queued: HashMap<String, Vec<String>> = HashMap::new();
        for (k, id) in ids.iter().enumerate() {
            let cid = queue(&admins[k % 3], id, "before").await;
            queued.entry(id.clone()).or_default().push(cid);
        }
        for cids in queued.values() {
            for cid in cids {
                seen.wait_for(cid, Duration::from_secs(30))
                    .await
                    .expect("every command queued before the loss delivered");
            }
        }
        until("the commands before the loss acknowledged", Duration::from_secs(60), async || {
            acked_in_store(a, &queued).await == queued.values().map(Vec::len).sum::<usize>()
        })
        .await;
        // From here on, devices acknowledge a command 1.5 s after they
        // got it: the kill finds some sent and not acknowledged.
        seen.ack_delay_ms.store(1500, Ordering::Relaxed);
        let returning: Vec<String> =
            ids.iter().filter(|id| !mute.contains(*id)).cloned().collect();
        let racing = {
            // The killed balancer's devices first: theirs are the commands
            // in flight at the kill.
            let mut returning = returning.clone();
            returning.sort_by_key(|id| start_of[id] != 2);
            let (a, b) = (a.clone(), b.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                for (k, id) in returning.iter().enumerate() {
                    let lb = if k % 2 == 0 { &a } else { &b };
                    out.push((id.clone(), queue(lb, id, "around the kill").await));
                }
                out
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        lbs[2].process.signal("KILL");
        let killed_at = Instant::now();
        let killed_ms = now_ms();
        seen.ack_delay_ms.store(0, Ordering::Relaxed);
        // When the dead node's channels stop being reported for the
        // devices that do not come back.
        let cleared = {
            let (a, mute) = (a.clone(), mute.clone());
            tokio::spawn(async move {
                loop {
                    let r = rows(&a).await;
                    if mute.iter().all(|id| r[id]["channel_node"].is_null()) {
                        return killed_at.elapsed();
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        for (id, cid) in racing.await.unwrap() {
            queued.entry(id).or_default().push(cid);
        }
        for (k, id) in returning.iter().filter(|id| start_of[*id] == 2).enumerate() {
            let lb = if k % 2 == 0 { a } else { b };
            let cid = queue(lb, id, "during the loss").await;
            queued.entry(id.clone()).or_default().push(cid);
        }

        // Every returning device gets everything.
        let total: usize = queued.values().map(Vec::len).sum();
        until("every command delivered", Duration::from_secs(120), async || {
            let r = seen.received.lock().unwrap();
            queued
                .iter()
                .filter(|(id, _)| !mute.contains(*id))
                .all(|(_, cids)| cids.iter().all(|c| r.contains_key(c)))
        })
        .await;
        let c_returning = returning.iter().filter(|id| start_of[*id] == 2).count();
        until("C's devices reopened their channels", Duration::from_secs(60), async || {
            seen.reopened.lock().unwrap().len() >= c_returning
        })
        .await;
        let reconnect: Vec<f64> = seen
            .reopened
            .lock()
            .unwrap()
            .values()
            .map(|t| t.saturating_duration_since(killed_at).as_secs_f64() * 1e3)
            .collect();
        let reconnect = summary("kill -> channel reopened on a survivor", reconnect);

        // Acknowledged in the store, once each.
        let mut acked = 0;
        until("every command acknowledged in the store", Duration::from_secs(60), async || {
            acked = acked_in_store(a, &queued).await;
            acked == total
        })
        .await;
        let delivered = {
            let r = seen.received.lock().unwrap();
            queued.values().flatten().filter(|c| r.contains_key(*c)).count()
        };

        // Where each device is now: a survivor; a device that did not
        // come back has no channel once the dead node's lease expired.
        until("channels on the survivors", Duration::from_secs(60), async || {
            let r = rows(b).await;
            returning.iter().all(|id| r[id]["channel_node"] == "lb-a" || r[id]["channel_node"] == "lb-b")
        })
        .await;
        let bound = LEASE + LEASE_RENEW;
        let cleared_after = tokio::time::timeout_at(killed_at + bound + Duration::from_secs(20), cleared)
            .await
            .expect("the dead node's channels are no longer reported after the lease")
            .unwrap();
        let status = a.expect(200, "GET", "status", None).await.unwrap();
        let nodes: Vec<&str> = status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["live"] == true)
            .map(|n| n["node"].as_str().unwrap())
            .collect();
        assert_eq!(nodes, ["lb-a", "lb-b"], "{status}");

        // Stop the devices; every heartbeat answered is in the store.
        stop_tx.send(true).unwrap();
        for t in tasks {
            t.await.unwrap();
        }
        let r = rows(a).await;
        let last = seen.last_heartbeat.lock().unwrap().clone();
        let mut compared = 0;
        for (id, sent) in &last {
            let contact = r[id]["last_contact"].as_i64().unwrap_or(0);
            assert!(contact >= *sent, "device {id}: heartbeat sent at {sent} answered, store has {contact}");
            compared += 1;
        }
        assert_eq!(compared, FLEET, "every device had a heartbeat answered");
        let after_kill = last.values().filter(|t| **t > killed_ms).count();

        // The simulator with the server list, the dead balancer in it:
        // the devices that start there enrol and run on the next address.
        let mut sim = std::process::Command::new(env!("CARGO_BIN_EXE_fleetgate"));
        sim.arg("simulate")
            .args(["--url", &format!("https://{},https://{}", fronts[0], fronts[1])])
            .args(["--url", &format!("https://{}", fronts[2])])
            .args(["--admin", &format!("http://{}", a.addr)])
            .args(["--admin-token", TOKEN])
            .arg("--server-ca")
            .arg(root.path().join("lb-a/data/server.pem"))
            .args(["--devices", "30", "--concurrency", "8", "--hold-websockets"])
            .args(["--duration", "3s", "--heartbeat-interval", "500ms", "--jitter", "200ms"])
            .args(["--threads", "1", "--json"]);
        let out = tokio::task::spawn_blocking(move || sim.output().unwrap()).await.unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["storm"]["devices_ok"], 30, "{report}");
        assert_eq!(report["websockets"]["opened"], 30, "{report}");
        assert_eq!(report["websockets"]["lost"], 0, "{report}");
        assert_eq!(report["heartbeats"]["errors"], json!({}), "{report}");

        eprintln!("three balancers, one PostgreSQL, {FLEET} devices + {SAMPLES} probes");
        eprintln!("{queue_lat}");
        eprintln!("{settings_b}");
        eprintln!("{settings_c}");
        eprintln!("{revoke_b}");
        eprintln!("{revoke_c}");
        eprintln!("{reconnect} ({c_returning} devices of the killed balancer)");
        eprintln!(
            "commands: {total} queued ({} for {MUTE} devices that did not return, all before the loss), {delivered} delivered, {acked} acknowledged, {} received again (deduplicated)",
            queued.iter().filter(|(id, _)| mute.contains(*id)).map(|(_, c)| c.len()).sum::<usize>(),
            seen.redelivered.load(Ordering::Relaxed)
        );
        eprintln!(
            "heartbeats: {} answered, last answered per device compared for {compared} devices ({after_kill} sent after the kill): none lost",
            seen.heartbeats_ok.load(Ordering::Relaxed)
        );
        eprintln!(
            "lease {LEASE:?}, renewed every {LEASE_RENEW:?}: dead node's channels cleared {:.1} s after the kill (bound {bound:?})",
            cleared_after.as_secs_f64()
        );
        assert_eq!(delivered, total, "distinct commands received == queued");
        eprintln!(
            "simulate --url A,B --url C (C dead): {} devices enrolled, {} channels held, {} heartbeats ok",
            report["storm"]["devices_ok"], report["websockets"]["held_at_end"], report["heartbeats"]["ok"]
        );
    });
    drop(lbs);
}

fn lbs_node(i: usize) -> &'static str {
    ["lb-a", "lb-b", "lb-c"][i]
}
