//! Two balancers sharing one PostgreSQL fleet: a command queued on one
//! reaches a device whose channel is held by the other (LISTEN/NOTIFY),
//! and a revocation on one is enforced by the other at once.
//!
//! Runs against `FLEETGATE_TEST_PG_URL` when set, otherwise against a
//! throw-away PostgreSQL of its own (tests/common/pg.rs).

mod common;

use std::time::Duration;

use common::devices::DevicesLb;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_balancers_one_fleet() {
    let url = common::pg::url();
    let store = format!("store = {{ kind = \"postgres\", url = \"{url}\" }}");
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = DevicesLb::start(dir_a.path(), &store).await;
    // Both balancers must trust (and sign with) one device CA.
    let (ca_a, ca_b) = (
        dir_a.path().join("data/devices"),
        dir_b.path().join("data/devices"),
    );
    std::fs::create_dir_all(&ca_b).unwrap();
    for f in ["device-ca.pem", "device-ca.key"] {
        std::fs::copy(ca_a.join(f), ca_b.join(f)).unwrap();
    }
    let b = DevicesLb::start(dir_b.path(), &store).await;

    // Enrolled through A, known to B.
    let device = a.enrol("shared-kiosk").await;
    let (s, me) = b.call(Some(&device), "GET", "/api/v1/device", None).await;
    assert_eq!(s, 200, "{me}");

    // Channel on B, command queued on A.
    let mut ch = b.channel(&device).await;
    // The channel task records itself just after the handshake.
    let node_b = dir_b
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, d) = a
            .admin("GET", &format!("devices/{}", device.id), None)
            .await;
        if d["channel_node"] == node_b.as_str() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "channel_node never became B: {d}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (s, cmd) = a
        .admin(
            "POST",
            &format!("devices/{}/commands", device.id),
            Some(&json!({"kind": "message", "payload": {"text": "via A"}})),
        )
        .await;
    assert_eq!(s, 201, "{cmd}");
    let got = ch
        .next(Duration::from_secs(10))
        .await
        .expect("pushed through B");
    assert_eq!(got["id"], cmd["id"]);
    ch.send(json!({"type": "ack", "id": got["id"], "status": "ok"}))
        .await;
    assert_eq!(
        ch.next(Duration::from_secs(10)).await.unwrap()["type"],
        "acked"
    );
    let (_, history) = a
        .admin("GET", &format!("devices/{}/commands", device.id), None)
        .await;
    assert_eq!(history["commands"][0]["status"], "ok");

    // B answers heartbeats from memory; a change made through A reaches
    // it by NOTIFY (sent in A's transaction), so B's answer follows within
    // the notification's delay.
    let beat = || async {
        let (s, hb) = b
            .call(Some(&device), "POST", "/api/v1/heartbeat", None)
            .await;
        assert_eq!(s, 200, "{hb}");
        hb
    };
    let before = beat().await["settings_version"].clone();
    assert_eq!(beat().await["settings_version"], before);
    assert_eq!(
        // The database outlives test runs: a value of this run's own.
        a.admin("PUT", "defaults", Some(&json!({"marker": device.id})))
            .await
            .0,
        200
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while beat().await["settings_version"] == before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "B kept the old settings version"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (s, _) = a
        .admin(
            "POST",
            &format!("devices/{}/commands", device.id),
            Some(&json!({"kind": "reboot"})),
        )
        .await;
    assert_eq!(s, 201);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while beat().await["pending_commands"] != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "B never counted the command queued on A"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Delivered on B's channel too; left unacknowledged.
    assert_eq!(
        ch.next(Duration::from_secs(10)).await.unwrap()["kind"],
        "reboot"
    );

    // Revoked on A: B closes the channel and refuses the certificate.
    assert_eq!(
        a.admin("POST", &format!("devices/{}/revoke", device.id), None)
            .await
            .0,
        200
    );
    assert!(
        ch.next(Duration::from_secs(10)).await.is_none(),
        "B closed the channel"
    );
    let (s, _) = b
        .call(Some(&device), "POST", "/api/v1/heartbeat", None)
        .await;
    assert_eq!(s, 403);
}
