//! The devices module through a real offload listener: enrolment with a
//! CSR, client-certificate identity, heartbeats, layered settings, the
//! command channel, revocation, bad input, export/import.

mod common;

use std::time::Duration;

use common::devices::{DevicesLb, ADMIN_TOKEN};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrol_heartbeat_settings_commands_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let lb = DevicesLb::start(dir.path(), "").await;
    let device = lb.enrol("kiosk-lobby").await;
    assert_eq!(device.fingerprint.len(), 64);

    // The issued certificate is this device's identity from now on.
    let (s, me) = lb.call(Some(&device), "GET", "/api/v1/device", None).await;
    assert_eq!(s, 200, "{me}");
    assert_eq!(me["device_id"], device.id.as_str());
    assert_eq!(me["name"], "kiosk-lobby");

    // Heartbeat: committed, with the advice to spread the next one.
    let (s, hb) = lb
        .call(Some(&device), "POST", "/api/v1/heartbeat", None)
        .await;
    assert_eq!(s, 200, "{hb}");
    assert_eq!(hb["pending_commands"], 0);
    let next = hb["heartbeat"]["next_in_seconds"].as_u64().unwrap();
    assert!((60..=90).contains(&next), "{hb}");
    let v0 = hb["settings_version"].as_str().unwrap().to_string();
    let (_, listed) = lb.admin("GET", "devices?online=true", None).await;
    assert_eq!(listed["total"], 1, "{listed}");
    assert_eq!(listed["devices"][0]["online"], true);

    // Settings: defaults ← group ← device ← user profile.
    assert_eq!(
        lb.admin(
            "PUT",
            "defaults",
            Some(&json!({"volume": 5, "display": {"dim": 60, "off": 300}}))
        )
        .await
        .0,
        200
    );
    let group = json!({"priority": 10, "settings": {"display": {"off": 0}, "kiosk": true}});
    assert_eq!(lb.admin("PUT", "groups/kiosks", Some(&group)).await.0, 200);
    let (s, v) = lb
        .admin(
            "PUT",
            &format!("devices/{}/groups", device.id),
            Some(&json!(["kiosks"])),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, _) = lb
        .admin(
            "PUT",
            &format!("devices/{}/settings", device.id),
            Some(&json!({"volume": 2})),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(
        lb.admin(
            "PUT",
            "users/alice",
            Some(&json!({"volume": 9, "display": {"dim": null}}))
        )
        .await
        .0,
        200
    );

    let (_, st) = lb
        .call(Some(&device), "GET", "/api/v1/settings", None)
        .await;
    assert_eq!(
        st["settings"],
        json!({"volume": 2, "display": {"dim": 60, "off": 0}, "kiosk": true})
    );
    let v1 = st["version"].as_str().unwrap().to_string();
    assert_ne!(v0, v1);
    let (s, st) = lb
        .call_json(&device, "PUT", "/api/v1/session", &json!({"user": "alice"}))
        .await;
    assert_eq!(s, 200, "{st}");
    assert_eq!(
        st["settings"],
        json!({"volume": 9, "display": {"off": 0}, "kiosk": true})
    );
    assert_ne!(st["version"], v1.as_str());
    let (_, st) = lb
        .call(Some(&device), "DELETE", "/api/v1/session", None)
        .await;
    assert_eq!(st["version"], v1.as_str());

    // Commands: pushed on the channel, acknowledged with a result.
    let mut ch = lb.channel(&device).await;
    let (s, cmd) = lb
        .admin(
            "POST",
            &format!("devices/{}/commands", device.id),
            Some(&json!({"kind": "message", "payload": {"text": "hello"}})),
        )
        .await;
    assert_eq!(s, 201, "{cmd}");
    let got = ch.next(WAIT).await.expect("command pushed");
    assert_eq!(
        (got["type"].as_str(), got["kind"].as_str()),
        (Some("command"), Some("message"))
    );
    assert_eq!(got["id"], cmd["id"]);
    assert_eq!(got["payload"]["text"], "hello");
    let (_, hb) = lb
        .call(Some(&device), "POST", "/api/v1/heartbeat", None)
        .await;
    assert_eq!(hb["pending_commands"], 1);
    ch.send(json!({"type": "ack", "id": got["id"], "status": "ok", "result": {"shown": true}}))
        .await;
    let acked = ch.next(WAIT).await.unwrap();
    assert_eq!(acked, json!({"type": "acked", "id": got["id"]}));
    let (_, history) = lb
        .admin("GET", &format!("devices/{}/commands", device.id), None)
        .await;
    assert_eq!(history["commands"][0]["status"], "ok");
    assert_eq!(history["commands"][0]["result"], json!({"shown": true}));

    // Revocation: the channel closes, requests get 403, the list has it.
    let (s, _) = lb
        .admin("POST", &format!("devices/{}/revoke", device.id), None)
        .await;
    assert_eq!(s, 200);
    assert!(
        ch.next(WAIT).await.is_none(),
        "channel closed on revocation"
    );
    let (s, e) = lb
        .call(Some(&device), "POST", "/api/v1/heartbeat", None)
        .await;
    assert_eq!(
        (s, e["error"].as_str()),
        (403, Some("device certificate revoked"))
    );
    let (_, rev) = lb.admin("GET", "revocations", None).await;
    assert_eq!(rev["fingerprints"], json!([device.fingerprint]));
    let queued = lb
        .admin(
            "POST",
            &format!("devices/{}/commands", device.id),
            Some(&json!({"kind": "reboot"})),
        )
        .await;
    assert_eq!(queued.0, 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_device_gets_what_it_missed() {
    let dir = tempfile::tempdir().unwrap();
    let lb = DevicesLb::start(dir.path(), "").await;
    let device = lb.enrol("phone").await;
    let path = format!("devices/{}/commands", device.id);
    // Queued while offline.
    let (_, c1) = lb
        .admin("POST", &path, Some(&json!({"kind": "reboot"})))
        .await;
    let (_, c2) = lb
        .admin(
            "POST",
            &path,
            Some(&json!({"kind": "custom", "payload": {"name": "sync"}})),
        )
        .await;

    let mut ch = lb.channel(&device).await;
    assert_eq!(ch.next(WAIT).await.unwrap()["id"], c1["id"]);
    assert_eq!(ch.next(WAIT).await.unwrap()["id"], c2["id"]);
    ch.send(json!({"type": "ack", "id": c1["id"], "status": "failed", "result": "busy"}))
        .await;
    assert_eq!(ch.next(WAIT).await.unwrap()["type"], "acked");
    drop(ch);

    // c2 was never acknowledged: it comes again, and only it.
    let mut ch = lb.channel(&device).await;
    assert_eq!(ch.next(WAIT).await.unwrap()["id"], c2["id"]);
    assert!(ch.next(Duration::from_millis(300)).await.is_none());
    // Polling sees the same, and can acknowledge too.
    let (_, polled) = lb
        .call(Some(&device), "GET", "/api/v1/commands", None)
        .await;
    assert_eq!(polled["commands"].as_array().unwrap().len(), 1);
    let ack = json!({"status": "ok"});
    let (s, _) = lb
        .call_json(
            &device,
            "POST",
            &format!("/api/v1/commands/{}/ack", c2["id"].as_str().unwrap()),
            &ack,
        )
        .await;
    assert_eq!(s, 200);
    // Unknown messages get an error, not a closed channel.
    ch.send(json!({"type": "hello"})).await;
    assert_eq!(ch.next(WAIT).await.unwrap()["type"], "error");

    // A second connection replaces the first.
    let mut ch2 = lb.channel(&device).await;
    assert!(ch.next(WAIT).await.is_none(), "older channel closed");
    lb.admin("POST", &path, Some(&json!({"kind": "apply_settings"})))
        .await;
    let got = ch2.next(WAIT).await.unwrap();
    assert_eq!(got["kind"], "apply_settings");
    assert_eq!(
        got["payload"]["settings_version"].as_str().unwrap().len(),
        16
    );
}

/// An idle channel is parked (a second without traffic; see ws.rs) and
/// set up again by whatever comes: a queued command, the device's own
/// message (a fragmented one too), the ping timer. Nothing is lost on the
/// way, and the pings keep it open past two intervals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_channel_wakes_for_commands_messages_and_pings() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::Message;

    let parked = Duration::from_millis(1500);
    // Waiting while reading: the client answers pings meanwhile.
    async fn idle(ch: &mut common::devices::Channel, d: Duration) {
        assert!(ch.next(d).await.is_none(), "nothing comes");
    }
    let dir = tempfile::tempdir().unwrap();
    let lb = DevicesLb::start(dir.path(), r#"ws_ping = "2s""#).await;
    let device = lb.enrol("kiosk").await;
    let path = format!("devices/{}/commands", device.id);
    let mut ch = lb.channel(&device).await;
    idle(&mut ch, parked).await;

    // A poke wakes it.
    let (_, c1) = lb
        .admin("POST", &path, Some(&json!({"kind": "reboot"})))
        .await;
    let got = ch.next(WAIT).await.expect("command on a parked channel");
    assert_eq!(got["id"], c1["id"]);
    idle(&mut ch, parked).await;

    // The device's message wakes it; this one comes in two fragments with
    // a pause between them (no parking in the middle of a message).
    let ack = json!({"type": "ack", "id": c1["id"], "status": "ok"}).to_string();
    let (a, b) = ack.split_at(10);
    let first = Frame::message(a.as_bytes().to_vec(), OpCode::Data(Data::Text), false);
    let last = Frame::message(b.as_bytes().to_vec(), OpCode::Data(Data::Continue), true);
    ch.ws.send(Message::Frame(first)).await.unwrap();
    idle(&mut ch, parked).await;
    ch.ws.send(Message::Frame(last)).await.unwrap();
    assert_eq!(
        ch.next(WAIT).await.unwrap(),
        json!({"type": "acked", "id": c1["id"]})
    );

    // Idle through three ping intervals (the client answers while it
    // reads): still open, and still delivering.
    idle(&mut ch, Duration::from_secs(5)).await;
    let (_, st) = lb
        .admin("GET", &format!("devices/{}", device.id), None)
        .await;
    assert_eq!(st["channel_here"], true, "{st}");
    let (_, c2) = lb
        .admin("POST", &path, Some(&json!({"kind": "reboot"})))
        .await;
    assert_eq!(ch.next(WAIT).await.unwrap()["id"], c2["id"]);

    // A revocation closes a parked channel too.
    idle(&mut ch, parked).await;
    lb.admin("POST", &format!("devices/{}/revoke", device.id), None)
        .await;
    assert!(ch.next(WAIT).await.is_none(), "closed on revocation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let lb = DevicesLb::start(dir.path(), "max_body = 4096").await;
    let device = lb.enrol("d").await;
    let (_, t) = lb
        .admin(
            "POST",
            "tokens",
            Some(&json!({"uses": 1, "label": "spare"})),
        )
        .await;
    let secret = t["secret"].as_str().unwrap().to_string();

    let post = |ct: &str, body: &[u8]| (ct.to_string(), body.to_vec());
    let cases = [
        (post("text/plain", b"{}"), 415),
        (post("application/json", b"{\"token\": "), 400),
        (post("application/json", b"[1, 2]"), 400),
        (post("application/json", &vec![b' '; 5000]), 413),
        (
            post(
                "application/json",
                json!({"token": secret, "csr": "garbage"})
                    .to_string()
                    .as_bytes(),
            ),
            422,
        ),
        (
            post(
                "application/json",
                json!({"token": "nope", "csr": "x"}).to_string().as_bytes(),
            ),
            403,
        ),
        (
            post(
                "application/json",
                json!({"token": secret, "csr": "x", "extra": 1})
                    .to_string()
                    .as_bytes(),
            ),
            400,
        ),
    ];
    for ((ct, body), want) in cases {
        let (s, e) = lb
            .call(None, "POST", "/api/v1/enrol", Some((&ct, body)))
            .await;
        assert_eq!(s, want, "{ct}: {e}");
        assert!(e["error"].is_string(), "JSON error body: {e}");
    }
    // Nothing was spent or stored by those.
    let (_, tokens) = lb.admin("GET", "tokens", None).await;
    let spare = tokens["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["label"] == "spare")
        .unwrap()
        .clone();
    assert_eq!(spare["uses_left"], 1);
    assert_eq!(lb.admin("GET", "devices", None).await.1["total"], 1);
    let (s, _) = lb.enrol_with("fgt_unknown", "x").await.err().unwrap();
    assert_eq!(s, 403, "an unknown token with a good CSR");
    // The token still works, once.
    lb.enrol_with(&secret, "second").await.unwrap();
    let (s, e) = lb.enrol_with(&secret, "third").await.err().unwrap();
    assert_eq!(
        (s, e["error"].as_str()),
        (403, Some("enrolment token rejected"))
    );

    // Device endpoints: identity first, then the body.
    assert_eq!(
        lb.call(None, "POST", "/api/v1/heartbeat", None).await.0,
        401
    );
    assert_eq!(
        lb.call(Some(&device), "GET", "/api/v1/heartbeat", None)
            .await
            .0,
        405
    );
    assert_eq!(
        lb.call(Some(&device), "GET", "/api/v1/nothing", None)
            .await
            .0,
        404
    );
    let bad = lb
        .call(
            Some(&device),
            "POST",
            "/api/v1/heartbeat",
            Some(("application/json", b"{".to_vec())),
        )
        .await;
    assert_eq!(bad.0, 400);
    let (_, d) = lb
        .admin("GET", &format!("devices/{}", device.id), None)
        .await;
    assert!(
        d["last_contact"].is_null(),
        "a refused heartbeat records no contact: {d}"
    );
    let ack = json!({"status": "maybe"});
    assert_eq!(
        lb.call_json(&device, "POST", "/api/v1/commands/cmd-x/ack", &ack)
            .await
            .0,
        400
    );
    assert_eq!(
        lb.call_json(
            &device,
            "POST",
            "/api/v1/commands/cmd-x/ack",
            &json!({"status": "ok"})
        )
        .await
        .0,
        404
    );
    assert_eq!(
        lb.call_json(&device, "PUT", "/api/v1/session", &json!({"user": ""}))
            .await
            .0,
        400
    );
    // A plain GET on the channel endpoint is told to upgrade.
    assert_eq!(
        lb.call(Some(&device), "GET", "/api/v1/commands/ws", None)
            .await
            .0,
        426
    );

    // Admin API: token required, input checked.
    assert_eq!(lb.admin_as(None, "GET", "devices", None).await.0, 401);
    assert_eq!(
        lb.admin_as(Some("wrong-token-wrong-token"), "GET", "devices", None)
            .await
            .0,
        401
    );
    assert_eq!(
        lb.admin_as(Some(ADMIN_TOKEN), "GET", "devices", None)
            .await
            .0,
        200
    );
    assert_eq!(lb.admin("PUT", "defaults", Some(&json!([1]))).await.0, 400);
    assert_eq!(
        lb.admin("POST", "tokens", Some(&json!({"uses": 0})))
            .await
            .0,
        400
    );
    assert_eq!(
        lb.admin("POST", "tokens", Some(&json!({"expires_in": "soon"})))
            .await
            .0,
        400
    );
    assert_eq!(
        lb.admin(
            "PUT",
            &format!("devices/{}/groups", device.id),
            Some(&json!(["ghost"]))
        )
        .await
        .0,
        409
    );
    assert_eq!(
        lb.admin(
            "POST",
            "devices/nope/commands",
            Some(&json!({"kind": "reboot"}))
        )
        .await
        .0,
        404
    );
    let bad_cmd = json!({"kind": "message", "payload": {}});
    assert_eq!(
        lb.admin(
            "POST",
            &format!("devices/{}/commands", device.id),
            Some(&bad_cmd)
        )
        .await
        .0,
        400
    );
    assert_eq!(lb.admin("GET", "devices?limit=x", None).await.0, 400);
    assert_eq!(lb.admin("GET", "nothing", None).await.0, 404);
    assert_eq!(
        lb.admin("GET", &format!("devices/{}/commands", device.id), None)
            .await
            .1["commands"],
        json!([])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_export_and_import() {
    let dir = tempfile::tempdir().unwrap();
    let lb = DevicesLb::start(dir.path(), "").await;
    let a = lb.enrol("front-desk").await;
    let _b = lb.enrol("warehouse-1").await;
    lb.admin(
        "PUT",
        "groups/g1",
        Some(&json!({"priority": 1, "settings": {"x": 1}})),
    )
    .await;
    lb.admin(
        "PUT",
        &format!("devices/{}/groups", a.id),
        Some(&json!(["g1"])),
    )
    .await;
    lb.admin(
        "POST",
        &format!("devices/{}/commands", a.id),
        Some(&json!({"kind": "reboot"})),
    )
    .await;
    lb.call(Some(&a), "POST", "/api/v1/heartbeat", None).await;

    let (_, found) = lb.admin("GET", "devices?search=DESK", None).await;
    assert_eq!(found["total"], 1);
    assert_eq!(found["devices"][0]["id"], a.id.as_str());
    assert_eq!(
        lb.admin("GET", "devices?group=g1", None).await.1["total"],
        1
    );
    assert_eq!(
        lb.admin("GET", "devices?online=false", None).await.1["total"],
        1
    );
    assert_eq!(
        lb.admin("GET", "devices?limit=1&offset=1", None).await.1["devices"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let (s, export) = lb.admin("GET", "export?include_ca=true", None).await;
    assert_eq!(s, 200);
    assert_eq!(export["format"], "fleetgate-devices");
    assert!(export["ca"]["key_pem"]
        .as_str()
        .unwrap()
        .contains("PRIVATE KEY"));
    let (_, plain) = lb.admin("GET", "export", None).await;
    assert!(plain.get("ca").is_none(), "the CA key only when asked for");

    // Restore into another balancer: same devices, same pending command,
    // same CA files.
    let dir2 = tempfile::tempdir().unwrap();
    let lb2 = DevicesLb::start(dir2.path(), "").await;
    let (s, r) = lb2.admin("POST", "import", Some(&export)).await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["imported"]["devices"], 2);
    let (_, d) = lb2.admin("GET", &format!("devices/{}", a.id), None).await;
    assert_eq!(d["groups"], json!(["g1"]));
    assert_eq!(d["pending_commands"], 1);
    let ca_file = std::fs::read_to_string(dir2.path().join("data/devices/device-ca.pem")).unwrap();
    assert_eq!(ca_file, export["ca"]["cert_pem"].as_str().unwrap());
    let (_, again) = lb2.admin("GET", "export?include_ca=true", None).await;
    for key in [
        "devices", "groups", "commands", "tokens", "defaults", "users", "ca",
    ] {
        assert_eq!(again[key], export[key], "{key}");
    }

    // A broken import changes nothing.
    let (s, _) = lb2
        .admin(
            "POST",
            "import",
            Some(&json!({"format": "other", "version": 1})),
        )
        .await;
    assert_eq!(s, 409);
    assert_eq!(lb2.admin("GET", "devices", None).await.1["total"], 2);
}

/// The heartbeat answers from memory; every change must still show in the
/// very next heartbeat, whichever way it was made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_see_every_change_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let lb = DevicesLb::start(dir.path(), "").await;
    let device = lb.enrol("kiosk").await;
    let other = lb.enrol("other").await;
    let beat = |d| {
        let lb = &lb;
        async move {
            let (s, hb) = lb.call(Some(d), "POST", "/api/v1/heartbeat", None).await;
            assert_eq!(s, 200, "{hb}");
            (
                hb["settings_version"].as_str().unwrap().to_string(),
                hb["pending_commands"].as_i64().unwrap(),
            )
        }
    };
    let mut last = String::new();
    let mut changed = |what: &str, v: String| {
        assert_ne!(v, last, "{what}: the heartbeat kept the old version");
        last = v;
    };
    // Twice: the second answer comes from memory.
    let (v, _) = beat(&device).await;
    assert_eq!(beat(&device).await.0, v);
    changed("start", v);

    let put = |path: String, body: serde_json::Value| {
        let lb = &lb;
        async move {
            let (s, r) = lb.admin("PUT", &path, Some(&body)).await;
            assert_eq!(s, 200, "{path}: {r}");
        }
    };
    put("defaults".into(), json!({"volume": 1})).await;
    changed("defaults", beat(&device).await.0);
    put("groups/g".into(), json!({"settings": {"volume": 2}})).await;
    let v_other = beat(&other).await.0;
    put(format!("devices/{}/groups", device.id), json!(["g"])).await;
    changed("membership", beat(&device).await.0);
    assert_eq!(beat(&other).await.0, v_other, "only that device changed");
    put("groups/g".into(), json!({"settings": {"volume": 3}})).await;
    changed("group settings", beat(&device).await.0);
    put(
        format!("devices/{}/settings", device.id),
        json!({"volume": 4}),
    )
    .await;
    changed("device settings", beat(&device).await.0);
    let (s, _) = lb
        .call_json(&device, "PUT", "/api/v1/session", &json!({"user": "ann"}))
        .await;
    assert_eq!(s, 200);
    changed("session", beat(&device).await.0);
    put("users/ann".into(), json!({"volume": 5})).await;
    changed("user profile", beat(&device).await.0);
    let (s, _) = lb.admin("DELETE", "users/ann", None).await;
    assert_eq!(s, 200);
    changed("user profile deleted", beat(&device).await.0);
    let (s, _) = lb.admin("DELETE", "groups/g", None).await;
    assert_eq!(s, 200);
    changed("group deleted", beat(&device).await.0);

    // Pending commands: counted as soon as queued, gone once acknowledged
    // (over HTTP here: no channel).
    assert_eq!(beat(&device).await.1, 0);
    let (s, cmd) = lb
        .admin(
            "POST",
            &format!("devices/{}/commands", device.id),
            Some(&json!({"kind": "reboot"})),
        )
        .await;
    assert_eq!(s, 201, "{cmd}");
    assert_eq!(beat(&device).await.1, 1);
    assert_eq!(beat(&other).await.1, 0);
    let (s, _) = lb
        .call_json(
            &device,
            "POST",
            &format!("/api/v1/commands/{}/ack", cmd["id"].as_str().unwrap()),
            &json!({"status": "ok"}),
        )
        .await;
    assert_eq!(s, 200);
    assert_eq!(beat(&device).await.1, 0);

    // Revoked after heartbeats were answered from memory: refused at once.
    let (s, _) = lb
        .admin("POST", &format!("devices/{}/revoke", device.id), None)
        .await;
    assert_eq!(s, 200);
    let (s, _) = lb
        .call(Some(&device), "POST", "/api/v1/heartbeat", None)
        .await;
    assert_eq!(s, 403);
}
