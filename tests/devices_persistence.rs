//! Durability of the devices module across `kill -9`, through the real
//! binary: 1,000 devices enrol (with the simulator's client code), call in,
//! get commands and acknowledge some; the process is killed with SIGKILL
//! and restarted on the same data directory. Every device, every answered
//! heartbeat and every acknowledgement must be there, and every command
//! not acknowledged must be delivered again (polling and WebSocket).

mod common;
// The simulator's client code is part of the `fleetgate` binary (it is a
// tool, not the library); this test compiles it in to drive devices
// directly. Not every part of it is used here.
#[allow(dead_code)]
#[path = "../src/cli/simulate/mod.rs"]
mod simulate;

use std::collections::{BTreeSet, HashMap};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_addr, http_get, Balancer};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use simulate::{Admin, SimDevice, Target, Trust};
use tokio_tungstenite::tungstenite::Message;

const DEVICES: usize = 1000;
/// Devices 0..WITH_B also get a second command, never acknowledged.
const WITH_B: usize = 200;
/// Devices 0..ACK_WS acknowledge their first command over the WebSocket,
/// ACK_WS..ACK_POLL over the polling endpoint; the rest do not.
const ACK_WS: usize = 250;
const ACK_POLL: usize = 500;
const TOKEN: &str = "persistence-admin-token-0123456789";
const TIMEOUT: Duration = Duration::from_secs(30);

fn now_ms() -> i64 {
    fleetgate::clock::unix_ms() as i64
}

fn config(front: std::net::SocketAddr) -> String {
    common::devices::process_config(std::path::Path::new("data"), front, TOKEN, "")
}

/// Start `fleetgate run` again on `b`'s config and data directory.
fn restart(b: &mut Balancer) {
    b.child = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
        .arg("run")
        .arg("-c")
        .arg(&b.config)
        .env(
            "RUST_LOG",
            std::env::var("FLEETGATE_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn fleetgate");
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if http_get(b.admin, "/healthz").is_ok_and(|r| r.starts_with("HTTP/1.1 200")) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("fleetgate did not come back on {}", b.admin);
}

/// Run `f` over `items` with at most `n` at once, keeping the order.
async fn each<T, R, F, Fut>(items: Vec<T>, n: usize, f: F) -> Vec<R>
where
    F: Fn(usize, T) -> Fut,
    Fut: std::future::Future<Output = R>,
{
    futures_util::stream::iter(items.into_iter().enumerate().map(|(i, t)| f(i, t)))
        .buffered(n)
        .collect()
        .await
}

async fn channel_next(ws: &mut simulate::DeviceWs) -> Value {
    loop {
        let msg = tokio::time::timeout(TIMEOUT, ws.next())
            .await
            .expect("a message on the channel")
            .expect("channel open")
            .expect("channel healthy");
        if let Message::Text(t) = msg {
            return serde_json::from_str(&t).unwrap();
        }
    }
}

/// The ids of the commands the device gets by polling.
async fn polled(target: &Target, d: &SimDevice) -> BTreeSet<String> {
    let mut c = target.connect(&d.identity.config).await.unwrap();
    let r = c.request("GET", "/api/v1/commands", None).await.unwrap();
    r.expect(200).unwrap();
    r.json().unwrap()["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn everything_acknowledged_survives_kill_9_and_pending_commands_come_again() {
    let front = free_addr();
    let mut b = Balancer::start(&config(front));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let admin = Admin {
        addr: b.admin,
        token: TOKEN.into(),
        module: "devices".into(),
        timeout: TIMEOUT,
    };
    let server_pem = b.dir.path().join("data/server.pem");
    let target = Arc::new(
        Target::new(
            front,
            "localhost",
            Trust::from_pem_file(&server_pem).unwrap(),
            TIMEOUT,
        )
        .unwrap(),
    );
    let started = Instant::now();

    // Before the crash: enrol, heartbeat, queue, acknowledge.
    let (devices, heartbeat_at, cmd_a, cmd_b) = rt.block_on(async {
        let tokens = admin
            .enrolment_tokens(DEVICES, "persistence")
            .await
            .unwrap();
        let (devices, storm) = simulate::storm(
            target.clone(),
            tokens,
            DEVICES,
            32,
            true,
            tokio::time::Instant::now() + Duration::from_secs(300),
        )
        .await;
        assert_eq!(storm.devices_ok as usize, DEVICES, "{:?}", storm.errors);
        eprintln!("enrolled {DEVICES} in {:.1} s", storm.seconds);

        // One answered heartbeat each, over the kept connection.
        let answered = each(devices, 32, |_, mut d: SimDevice| async move {
            let at = now_ms();
            let r = d
                .conn
                .as_mut()
                .unwrap()
                .request("POST", "/api/v1/heartbeat", None)
                .await
                .unwrap();
            r.expect(200).unwrap();
            (d, at)
        })
        .await;
        let (mut devices, heartbeat_at): (Vec<SimDevice>, Vec<i64>) = answered.into_iter().unzip();
        for d in &mut devices {
            d.conn = None;
        }

        let ids: Vec<String> = devices
            .iter()
            .map(|d| d.identity.device_id.clone())
            .collect();
        let queue = |kind: &'static str| {
            let admin = admin.clone();
            move |i: usize, id: String| {
                let admin = admin.clone();
                async move {
                    let body = match kind {
                        "message" => {
                            json!({"kind": "message", "payload": {"text": format!("a-{i}")}})
                        }
                        _ => json!({"kind": "reboot"}),
                    };
                    let c = admin
                        .expect(201, "POST", &format!("devices/{id}/commands"), Some(&body))
                        .await
                        .unwrap();
                    c["id"].as_str().unwrap().to_string()
                }
            }
        };
        let cmd_a = each(ids.clone(), 16, queue("message")).await;
        let cmd_b = each(ids[..WITH_B].to_vec(), 16, queue("reboot")).await;
        eprintln!(
            "queued {} commands at {:.1} s",
            cmd_a.len() + cmd_b.len(),
            started.elapsed().as_secs_f64()
        );

        // Acknowledge command A: over the channel, then by polling.
        let ws_devices: Vec<_> = devices[..ACK_WS]
            .iter()
            .map(|d| d.identity.clone())
            .collect();
        each(ws_devices, 32, |i, identity: Arc<simulate::Identity>| {
            let (target, a, b) = (target.clone(), cmd_a[i].clone(), cmd_b.get(i).cloned());
            async move {
                let mut ws = target.websocket(&identity).await.unwrap();
                let want: BTreeSet<String> = [Some(a.clone()), b].into_iter().flatten().collect();
                let mut got = BTreeSet::new();
                while got != want {
                    let m = channel_next(&mut ws).await;
                    assert_eq!(m["type"], "command", "{m}");
                    got.insert(m["id"].as_str().unwrap().to_string());
                    assert!(want.is_superset(&got), "{got:?} vs {want:?}");
                }
                let ack = json!({"type": "ack", "id": a, "status": "ok", "result": {"i": i}});
                ws.send(Message::text(ack.to_string())).await.unwrap();
                let m = channel_next(&mut ws).await;
                assert_eq!(m, json!({"type": "acked", "id": a}));
            }
        })
        .await;
        let poll_devices: Vec<_> = devices[ACK_WS..ACK_POLL]
            .iter()
            .map(|d| d.identity.clone())
            .collect();
        each(poll_devices, 32, |k, identity: Arc<simulate::Identity>| {
            let i = ACK_WS + k;
            let (target, a) = (target.clone(), cmd_a[i].clone());
            async move {
                let mut c = target.connect(&identity.config).await.unwrap();
                let r = c.request("GET", "/api/v1/commands", None).await.unwrap();
                let list = r.json().unwrap();
                assert_eq!(list["commands"][0]["id"], a.as_str(), "{list}");
                let body = json!({"status": "ok", "result": {"i": i}}).to_string();
                c.request(
                    "POST",
                    &format!("/api/v1/commands/{a}/ack"),
                    Some(("application/json", body.as_bytes())),
                )
                .await
                .unwrap()
                .expect(200)
                .unwrap();
            }
        })
        .await;
        eprintln!(
            "acknowledged {ACK_POLL} at {:.1} s",
            started.elapsed().as_secs_f64()
        );
        (devices, heartbeat_at, cmd_a, cmd_b)
    });

    // SIGKILL: no shutdown hook, no flush.
    b.child.kill().unwrap();
    b.child.wait().unwrap();
    restart(&mut b);

    rt.block_on(async {
        // Every device, with its answered heartbeat.
        let list = admin
            .expect(200, "GET", "devices?limit=1000", None)
            .await
            .unwrap();
        assert_eq!(list["total"], DEVICES as u64);
        let stored: HashMap<&str, &Value> = list["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| (d["id"].as_str().unwrap(), d))
            .collect();
        assert_eq!(stored.len(), DEVICES);
        for (i, d) in devices.iter().enumerate() {
            let s = stored
                .get(d.identity.device_id.as_str())
                .unwrap_or_else(|| panic!("device {i} lost"));
            assert_eq!(s["fingerprint"], d.identity.fingerprint.as_str());
            let contact = s["last_contact"].as_i64().unwrap_or(0);
            assert!(
                contact >= heartbeat_at[i],
                "device {i}: answered heartbeat at {} lost (last_contact {contact})",
                heartbeat_at[i]
            );
        }

        // Every acknowledgement, with its result; nothing else acknowledged.
        let export = admin.expect(200, "GET", "export", None).await.unwrap();
        let commands: HashMap<&str, &Value> = export["commands"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["id"].as_str().unwrap(), c))
            .collect();
        assert_eq!(commands.len(), DEVICES + WITH_B);
        for (i, a) in cmd_a.iter().enumerate() {
            let c = commands[a.as_str()];
            if i < ACK_POLL {
                assert_eq!(c["status"], "ok", "command A of device {i}: {c}");
                assert_eq!(c["result"], json!({"i": i}));
                assert!(c["acked_at"].as_i64().is_some());
            } else {
                assert!(c["acked_at"].is_null(), "command A of device {i}: {c}");
            }
        }
        for b in &cmd_b {
            assert!(commands[b.as_str()]["acked_at"].is_null());
        }

        // Unacknowledged commands are delivered again, acknowledged ones not:
        // by polling for every device (old certificates still accepted) ...
        let expected = |i: usize| -> BTreeSet<String> {
            let mut s = BTreeSet::new();
            if i >= ACK_POLL {
                s.insert(cmd_a[i].clone());
            }
            if i < WITH_B {
                s.insert(cmd_b[i].clone());
            }
            s
        };
        let ids: Vec<usize> = (0..DEVICES).collect();
        let got = each(ids, 32, |_, i| {
            let (target, d) = (target.clone(), &devices[i]);
            async move { polled(&target, d).await }
        })
        .await;
        for (i, g) in got.iter().enumerate() {
            assert_eq!(
                g,
                &expected(i),
                "device {i}: pending commands after restart"
            );
        }

        // ... and over the channel, where acknowledging clears them.
        for i in [0, 1, WITH_B - 1, ACK_POLL, ACK_POLL + 1, DEVICES - 1] {
            let d = &devices[i];
            let mut ws = target.websocket(&d.identity).await.unwrap();
            let mut seen = BTreeSet::new();
            while seen.len() < expected(i).len() {
                let m = channel_next(&mut ws).await;
                assert_eq!(m["type"], "command", "{m}");
                seen.insert(m["id"].as_str().unwrap().to_string());
            }
            assert_eq!(seen, expected(i), "device {i}: redelivered on the channel");
            for id in &seen {
                let ack = json!({"type": "ack", "id": id, "status": "failed", "result": null});
                ws.send(Message::text(ack.to_string())).await.unwrap();
                assert_eq!(channel_next(&mut ws).await["type"], "acked");
            }
            assert!(polled(&target, d).await.is_empty());
        }

        // Devices carry on: a heartbeat after the restart is answered.
        let mut c = target.connect(&devices[7].identity.config).await.unwrap();
        c.request("POST", "/api/v1/heartbeat", None)
            .await
            .unwrap()
            .expect(200)
            .unwrap();
    });
    eprintln!("done in {:.1} s", started.elapsed().as_secs_f64());
}
