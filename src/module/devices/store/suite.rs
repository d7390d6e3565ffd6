//! The behaviour every `Store` must have, as one test suite run against
//! each backend (SQLite always, PostgreSQL when a database is given).

use serde_json::json;

use super::{NodeLease, Store, StoreError};
use crate::module::devices::model::*;

fn token(id: &str, secret: &str, expires_at: i64, uses: i64) -> EnrolToken {
    EnrolToken {
        id: id.into(),
        secret_sha256: sha256_hex(secret.as_bytes()),
        label: format!("label {id}"),
        created_at: 1_000,
        expires_at,
        uses_left: uses,
        used: 0,
    }
}

fn device(id: &str) -> Device {
    Device {
        id: id.into(),
        fingerprint: sha256_hex(id.as_bytes()),
        name: format!("Device {id}"),
        serial: "01".into(),
        cert_pem: "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n".into(),
        groups: Vec::new(),
        settings: empty_object(),
        session_user: None,
        enrolled_at: 2_000,
        token_id: None,
        last_contact: None,
        revoked_at: None,
        channel_node: None,
    }
}

fn command(id: &str, device_id: &str, kind: CommandKind) -> Command {
    Command {
        id: id.into(),
        device_id: device_id.into(),
        seq: 0,
        kind,
        payload: json!({"text": id}),
        created_at: 3_000,
        acked_at: None,
        status: None,
        result: None,
    }
}

fn empty_snapshot() -> Snapshot {
    Snapshot {
        format: SNAPSHOT_FORMAT.into(),
        version: SNAPSHOT_VERSION,
        exported_at: 0,
        defaults: empty_object(),
        groups: vec![],
        users: vec![],
        tokens: vec![],
        devices: vec![],
        commands: vec![],
        ca: None,
    }
}

fn query() -> DeviceQuery {
    DeviceQuery {
        limit: 100,
        ..Default::default()
    }
}

/// Run every check on `store`, which is emptied first.
pub(crate) async fn run_all(store: &dyn Store) {
    store.import(empty_snapshot()).await.unwrap();
    tokens_and_enrolment(store).await;
    devices_groups_and_search(store).await;
    contacts_sessions_and_channels(store).await;
    node_leases(store).await;
    settings_inputs(store).await;
    commands(store).await;
    revocation(store).await;
    hot_state_matches_single_reads(store).await;
    export_import(store).await;
    a_token_is_never_overspent(store).await;
}

/// Enrolments racing for the last uses of one token (a morning storm on
/// a shared store): exactly as many succeed as the token had uses, the
/// others are refused, and the refused leave no device behind.
async fn a_token_is_never_overspent(s: &dyn Store) {
    s.insert_token(token("storm", "storm-secret", 10_000, 5))
        .await
        .unwrap();
    let tries = (0..24).map(|i| {
        s.enrol(
            sha256_hex(b"storm-secret"),
            5_000,
            device(&format!("storm-{i}")),
        )
    });
    let results = futures_util::future::join_all(tries).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let refused = results
        .iter()
        .filter(|r| matches!(r, Err(StoreError::TokenRejected)))
        .count();
    assert_eq!((ok, refused), (5, 19), "{results:?}");
    let t = s
        .list_tokens()
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.id == "storm")
        .unwrap();
    assert_eq!((t.uses_left, t.used), (0, 5));
    let mut enrolled = 0;
    for i in 0..24 {
        if s.device(format!("storm-{i}")).await.unwrap().is_some() {
            enrolled += 1;
        }
    }
    assert_eq!(enrolled, 5);
}

async fn tokens_and_enrolment(s: &dyn Store) {
    s.insert_token(token("t1", "secret-1", 10_000, 2))
        .await
        .unwrap();
    s.insert_token(token("t2", "secret-2", 1_500, 5))
        .await
        .unwrap();
    let listed = s.list_tokens().await.unwrap();
    assert_eq!(
        listed.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
        ["t1", "t2"]
    );

    let d = s
        .enrol(sha256_hex(b"secret-1"), 5_000, device("d1"))
        .await
        .unwrap();
    assert_eq!(d.token_id.as_deref(), Some("t1"));
    let stored = s.device("d1".into()).await.unwrap().unwrap();
    assert_eq!(stored, d);
    assert_eq!(
        s.device_by_fingerprint(d.fingerprint.clone())
            .await
            .unwrap()
            .unwrap()
            .id,
        "d1"
    );

    // The same certificate twice: refused, and the token use not spent.
    let again = s.enrol(sha256_hex(b"secret-1"), 5_000, device("d1")).await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
    let t1 = s
        .list_tokens()
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.id == "t1")
        .unwrap();
    assert_eq!((t1.uses_left, t1.used), (1, 1));

    s.enrol(sha256_hex(b"secret-1"), 5_000, device("d2"))
        .await
        .unwrap();
    // Used up, expired, unknown: one answer.
    for (secret, now) in [("secret-1", 5_000), ("secret-2", 1_500), ("nope", 0)] {
        let r = s
            .enrol(sha256_hex(secret.as_bytes()), now, device("d9"))
            .await;
        assert_eq!(r, Err(StoreError::TokenRejected), "{secret}");
    }
    assert!(s.device("d9".into()).await.unwrap().is_none());

    s.delete_token("t2".into()).await.unwrap();
    assert!(matches!(
        s.delete_token("t2".into()).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(s.device("nope".into()).await.unwrap().is_none());
    assert!(s
        .device_by_fingerprint("00".into())
        .await
        .unwrap()
        .is_none());
}

async fn devices_groups_and_search(s: &dyn Store) {
    s.put_group(Group {
        name: "kiosk".into(),
        priority: 10,
        settings: json!({"a": 1}),
    })
    .await
    .unwrap();
    s.put_group(Group {
        name: "floor-2".into(),
        priority: 5,
        settings: json!({"b": 1}),
    })
    .await
    .unwrap();
    // Replacing keeps one group.
    s.put_group(Group {
        name: "kiosk".into(),
        priority: 20,
        settings: json!({"a": 2}),
    })
    .await
    .unwrap();
    let groups = s.groups().await.unwrap();
    assert_eq!(groups.len(), 2);
    assert_eq!((groups[1].name.as_str(), groups[1].priority), ("kiosk", 20));

    // An unknown group: refused, nothing changed.
    let patch = DevicePatch {
        name: Some("renamed".into()),
        groups: Some(vec!["kiosk".into(), "ghost".into()]),
        settings: None,
    };
    assert!(matches!(
        s.patch_device("d1".into(), patch).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        s.device("d1".into()).await.unwrap().unwrap().name,
        "Device d1"
    );
    let missing = s.patch_device("nope".into(), DevicePatch::default()).await;
    assert!(matches!(missing, Err(StoreError::NotFound(_))));

    let patch = DevicePatch {
        name: Some("Lobby Kiosk".into()),
        groups: Some(vec!["kiosk".into(), "floor-2".into()]),
        settings: Some(json!({"volume": 3})),
    };
    let d = s.patch_device("d1".into(), patch).await.unwrap();
    assert_eq!(d.name, "Lobby Kiosk");
    assert_eq!(d.groups, ["floor-2", "kiosk"]);
    assert_eq!(d.settings, json!({"volume": 3}));

    for id in ["d3", "d4", "d5"] {
        s.insert_token(token(&format!("tok-{id}"), id, 10_000, 1))
            .await
            .unwrap();
        s.enrol(sha256_hex(id.as_bytes()), 5_000, device(id))
            .await
            .unwrap();
    }
    let (all, total) = s.list_devices(query()).await.unwrap();
    assert_eq!(total, 5);
    assert_eq!(
        all.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
        ["d1", "d2", "d3", "d4", "d5"]
    );

    let page = DeviceQuery {
        limit: 2,
        offset: 1,
        ..query()
    };
    let (devices, total) = s.list_devices(page).await.unwrap();
    assert_eq!(
        (
            devices.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
            total
        ),
        (vec!["d2", "d3"], 5)
    );

    let search = |q: &str| DeviceQuery {
        search: Some(q.into()),
        ..query()
    };
    assert_eq!(s.list_devices(search("LOBBY")).await.unwrap().1, 1);
    assert_eq!(s.list_devices(search("device d")).await.unwrap().1, 4);
    // LIKE wildcards in the search are literal.
    assert_eq!(s.list_devices(search("%")).await.unwrap().1, 0);
    let fp = sha256_hex(b"d4");
    assert_eq!(
        s.list_devices(search(&fp[..12])).await.unwrap().0[0].id,
        "d4"
    );
    let in_group = DeviceQuery {
        group: Some("kiosk".into()),
        ..query()
    };
    assert_eq!(s.list_devices(in_group).await.unwrap().1, 1);

    // Deleting a group takes it off its devices.
    s.delete_group("floor-2".into()).await.unwrap();
    assert_eq!(
        s.device("d1".into()).await.unwrap().unwrap().groups,
        ["kiosk"]
    );
    assert!(matches!(
        s.delete_group("floor-2".into()).await,
        Err(StoreError::NotFound(_))
    ));
}

async fn contacts_sessions_and_channels(s: &dyn Store) {
    s.record_contacts(vec![
        ("d1".into(), 7_000),
        ("d2".into(), 8_000),
        ("ghost".into(), 9_000),
    ])
    .await
    .unwrap();
    // Time never goes backwards, even within one batch.
    s.record_contacts(vec![
        ("d1".into(), 6_000),
        ("d2".into(), 9_500),
        ("d2".into(), 9_000),
    ])
    .await
    .unwrap();
    assert_eq!(
        s.device("d1".into()).await.unwrap().unwrap().last_contact,
        Some(7_000)
    );
    assert_eq!(
        s.device("d2".into()).await.unwrap().unwrap().last_contact,
        Some(9_500)
    );

    let since = DeviceQuery {
        contact_since: Some(7_500),
        ..query()
    };
    assert_eq!(
        s.list_devices(since)
            .await
            .unwrap()
            .0
            .iter()
            .map(|d| d.id.clone())
            .collect::<Vec<_>>(),
        ["d2"]
    );
    let silent = DeviceQuery {
        silent_since: Some(7_500),
        ..query()
    };
    assert_eq!(s.list_devices(silent).await.unwrap().1, 4);

    s.set_session("d1".into(), Some("alice".into()))
        .await
        .unwrap();
    assert_eq!(
        s.device("d1".into())
            .await
            .unwrap()
            .unwrap()
            .session_user
            .as_deref(),
        Some("alice")
    );
    assert!(matches!(
        s.set_session("ghost".into(), None).await,
        Err(StoreError::NotFound(_))
    ));

    s.set_channel("d2".into(), "lb-a".into(), true)
        .await
        .unwrap();
    s.set_channel("d2".into(), "lb-b".into(), true)
        .await
        .unwrap();
    // lb-a's late close must not hide lb-b's channel.
    s.set_channel("d2".into(), "lb-a".into(), false)
        .await
        .unwrap();
    assert_eq!(
        s.device("d2".into())
            .await
            .unwrap()
            .unwrap()
            .channel_node
            .as_deref(),
        Some("lb-b")
    );
    s.set_channel("d2".into(), "lb-b".into(), false)
        .await
        .unwrap();
    assert_eq!(
        s.device("d2".into()).await.unwrap().unwrap().channel_node,
        None
    );
}

/// A node that stops renewing its lease loses its channels to the first
/// other node that sees the lease expired; one that comes back learns
/// that its lease lapsed, so that it records its channels again.
async fn node_leases(s: &dyn Store) {
    async fn node(s: &dyn Store, d: &str) -> Option<String> {
        s.device(d.to_string()).await.unwrap().unwrap().channel_node
    }
    const LEASE: i64 = 15_000;
    // First renewals: no lease before, so "lapsed".
    assert!(s.renew_node("lb-a".into(), 100_000, LEASE).await.unwrap());
    assert!(s.renew_node("lb-b".into(), 100_000, LEASE).await.unwrap());
    // A renewal within the lease has not lapsed.
    assert!(!s.renew_node("lb-a".into(), 105_000, LEASE).await.unwrap());
    s.set_channel("d1".into(), "lb-a".into(), true)
        .await
        .unwrap();
    s.set_channel("d2".into(), "lb-b".into(), true)
        .await
        .unwrap();

    // lb-b is silent; at 114 s its lease (renewed at 100 s) still holds.
    s.renew_node("lb-a".into(), 114_000, LEASE).await.unwrap();
    assert_eq!(
        s.expire_nodes("lb-a".into(), 114_000, LEASE).await.unwrap(),
        []
    );
    assert_eq!(node(s, "d2").await.as_deref(), Some("lb-b"));
    // At 116 s it has run out: lb-b's channel is cleared, lb-a's kept,
    // and a node never expires itself, however late its own renewal.
    assert_eq!(
        s.expire_nodes("lb-a".into(), 116_000, LEASE).await.unwrap(),
        [("lb-b".to_string(), 1)]
    );
    assert_eq!(node(s, "d2").await, None);
    assert_eq!(node(s, "d1").await.as_deref(), Some("lb-a"));
    assert_eq!(
        s.expire_nodes("lb-a".into(), 500_000, LEASE).await.unwrap(),
        []
    );
    assert_eq!(
        s.nodes().await.unwrap(),
        [NodeLease {
            node: "lb-a".into(),
            renewed_at: 114_000
        }]
    );
    // lb-b was only stalled: its next renewal says the lease lapsed.
    assert!(s.renew_node("lb-b".into(), 117_000, LEASE).await.unwrap());
    // A restarted lb-a holds no channel yet.
    assert_eq!(s.clear_node_channels("lb-a".into()).await.unwrap(), 1);
    assert_eq!(node(s, "d1").await, None);
    assert_eq!(s.nodes().await.unwrap().len(), 2);
}

async fn settings_inputs(s: &dyn Store) {
    s.set_defaults(json!({"volume": 5, "tz": "UTC"}))
        .await
        .unwrap();
    assert_eq!(
        s.defaults().await.unwrap(),
        json!({"volume": 5, "tz": "UTC"})
    );
    s.put_group(Group {
        name: "a-low".into(),
        priority: 1,
        settings: json!({"x": 1}),
    })
    .await
    .unwrap();
    s.put_group(Group {
        name: "z-low".into(),
        priority: 1,
        settings: json!({"x": 2}),
    })
    .await
    .unwrap();
    let patch = DevicePatch {
        groups: Some(vec!["kiosk".into(), "z-low".into(), "a-low".into()]),
        ..Default::default()
    };
    s.patch_device("d1".into(), patch).await.unwrap();

    let inputs = s.settings_inputs("d1".into()).await.unwrap();
    assert_eq!(inputs.defaults, json!({"volume": 5, "tz": "UTC"}));
    // Lowest priority first, ties by name: the last one wins a merge.
    let order: Vec<_> = inputs.groups.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(order, ["a-low", "z-low", "kiosk"]);
    assert_eq!(inputs.device, json!({"volume": 3}));
    assert_eq!(inputs.user, Some(("alice".into(), None)));

    s.put_user(UserProfile {
        name: "alice".into(),
        settings: json!({"lang": "de"}),
    })
    .await
    .unwrap();
    let inputs = s.settings_inputs("d1".into()).await.unwrap();
    assert_eq!(
        inputs.user,
        Some(("alice".into(), Some(json!({"lang": "de"}))))
    );
    assert_eq!(s.users().await.unwrap().len(), 1);
    s.put_user(UserProfile {
        name: "bob".into(),
        settings: json!({}),
    })
    .await
    .unwrap();
    s.delete_user("bob".into()).await.unwrap();
    assert!(matches!(
        s.delete_user("bob".into()).await,
        Err(StoreError::NotFound(_))
    ));

    s.set_session("d1".into(), None).await.unwrap();
    assert_eq!(s.settings_inputs("d1".into()).await.unwrap().user, None);
    assert!(matches!(
        s.settings_inputs("ghost".into()).await,
        Err(StoreError::NotFound(_))
    ));
}

/// The fleet-wide read that warms a balancer gives, device by device,
/// exactly what the single reads give, and leaves revoked devices out.
async fn hot_state_matches_single_reads(s: &dyn Store) {
    s.set_session("d1".into(), Some("alice".into()))
        .await
        .unwrap();
    let hot = s.hot_state().await.unwrap();
    let (all, _) = s.list_devices(query()).await.unwrap();
    let live: Vec<_> = all.iter().filter(|d| d.revoked_at.is_none()).collect();
    assert!(
        live.len() >= 2 && live.len() < all.len(),
        "the suite leaves live and revoked devices"
    );
    assert_eq!(hot.devices.len(), live.len());
    let mut some_pending = false;
    for d in live {
        let h = hot
            .devices
            .iter()
            .find(|h| h.id == d.id)
            .expect("every live device");
        assert_eq!(h.fingerprint, d.fingerprint);
        assert_eq!(
            hot.inputs(h),
            s.settings_inputs(d.id.clone()).await.unwrap()
        );
        assert_eq!(h.pending, s.pending_count(d.id.clone()).await.unwrap());
        some_pending |= h.pending > 0;
    }
    assert!(some_pending, "the suite leaves commands pending");
}

async fn commands(s: &dyn Store) {
    let missing = s
        .queue_command(command("c0", "ghost", CommandKind::Reboot))
        .await;
    assert!(matches!(missing, Err(StoreError::NotFound(_))));
    let c1 = s
        .queue_command(command("c1", "d1", CommandKind::Message))
        .await
        .unwrap();
    let c2 = s
        .queue_command(command("c2", "d1", CommandKind::Reboot))
        .await
        .unwrap();
    s.queue_command(command("c3", "d2", CommandKind::Custom))
        .await
        .unwrap();
    assert!(c2.seq > c1.seq);

    let pending = s.pending_commands("d1".into()).await.unwrap();
    assert_eq!(pending, vec![c1.clone(), c2.clone()]);
    assert_eq!(s.pending_count("d1".into()).await.unwrap(), 2);

    // Another device cannot acknowledge d1's command.
    let wrong = s
        .ack_command("d2".into(), "c1".into(), "ok".into(), json!(null), 4_000)
        .await;
    assert!(matches!(wrong, Err(StoreError::NotFound(_))));
    let acked = s
        .ack_command(
            "d1".into(),
            "c1".into(),
            "ok".into(),
            json!({"shown": true}),
            4_000,
        )
        .await
        .unwrap();
    assert_eq!(
        (acked.acked_at, acked.status.as_deref()),
        (Some(4_000), Some("ok"))
    );
    assert_eq!(acked.result, Some(json!({"shown": true})));
    // A retried acknowledgement keeps the first result.
    let again = s
        .ack_command("d1".into(), "c1".into(), "failed".into(), json!(1), 5_000)
        .await
        .unwrap();
    assert_eq!(again, acked);

    assert_eq!(
        s.pending_commands("d1".into()).await.unwrap(),
        vec![c2.clone()]
    );
    assert_eq!(s.pending_count("d1".into()).await.unwrap(), 1);
    let history = s.commands("d1".into(), 10).await.unwrap();
    assert_eq!(
        history.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        ["c2", "c1"]
    );
    assert_eq!(s.commands("d1".into(), 1).await.unwrap().len(), 1);
}

async fn revocation(s: &dyn Store) {
    assert!(s.revoked_fingerprints().await.unwrap().is_empty());
    let d = s.revoke_device("d3".into(), 10_000).await.unwrap();
    assert_eq!(d.revoked_at, Some(10_000));
    // Idempotent: the first time stays.
    assert_eq!(
        s.revoke_device("d3".into(), 11_000)
            .await
            .unwrap()
            .revoked_at,
        Some(10_000)
    );
    assert_eq!(
        s.revoked_fingerprints().await.unwrap(),
        vec![sha256_hex(b"d3")]
    );
    assert!(matches!(
        s.revoke_device("ghost".into(), 1).await,
        Err(StoreError::NotFound(_))
    ));
    let queued = s
        .queue_command(command("c9", "d3", CommandKind::Reboot))
        .await;
    assert!(matches!(queued, Err(StoreError::Conflict(_))));
    let revoked = DeviceQuery {
        revoked: Some(true),
        ..query()
    };
    assert_eq!(s.list_devices(revoked).await.unwrap().1, 1);
    let active = DeviceQuery {
        revoked: Some(false),
        ..query()
    };
    assert_eq!(s.list_devices(active).await.unwrap().1, 4);
}

async fn export_import(s: &dyn Store) {
    let before = s.export().await.unwrap();
    assert_eq!(before.devices.len(), 5);
    assert_eq!(before.commands.len(), 3);
    assert_eq!(before.groups.len(), 3);

    // A snapshot referring to a missing group is refused whole.
    let mut bad = before.clone();
    bad.groups.clear();
    assert!(matches!(s.import(bad).await, Err(StoreError::Conflict(_))));
    let mut wrong = before.clone();
    wrong.format = "something-else".into();
    assert!(matches!(
        s.import(wrong).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(s.export().await.unwrap().devices.len(), 5);

    s.import(empty_snapshot()).await.unwrap();
    assert_eq!(s.list_devices(query()).await.unwrap().1, 0);
    assert_eq!(s.defaults().await.unwrap(), json!({}));

    // Round trip: what comes back is what went out.
    s.import(before.clone()).await.unwrap();
    let after = s.export().await.unwrap();
    assert_eq!(
        Snapshot {
            exported_at: 0,
            ..after
        },
        Snapshot {
            exported_at: 0,
            ..before.clone()
        }
    );

    // Sequence numbers continue after the imported ones.
    let next = s
        .queue_command(command("c10", "d2", CommandKind::Reboot))
        .await
        .unwrap();
    assert!(before.commands.iter().all(|c| c.seq < next.seq));
    // The imported token state holds: d5's token is used up.
    let r = s.enrol(sha256_hex(b"d5"), 5_000, device("d6")).await;
    assert_eq!(r, Err(StoreError::TokenRejected));
    s.import(empty_snapshot()).await.unwrap();
}
