//! The Grafana dashboard (`docs/grafana/fleetgate.json`) is importable and
//! queries only series a running balancer exposes: every metric its queries
//! name, with the labels they filter and group on, is looked up in
//! `/metrics` of the real binary after traffic that makes each series
//! appear (a failed and a completed TLS handshake, a request, a health
//! check, a discovered node's heartbeats, an L4 connection, access logs
//! and a syslog receiver).

mod common;
#[path = "dashboard/queries.rs"]
mod queries;

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::thread;
use std::time::Duration;

use fleetgate::discovery::Announcer;
use serde_json::Value;

use common::discovery::{announce_to, generate_token, tokio_rt, CLUSTER, SERVICE};
use common::pki::{client_config, Ca};
use common::web::{https_get, tls_connect};
use common::{ask, eventually, free_addr, Balancer, HttpBackend, NamedBackend};
use queries::{parse_exposition, present, query_texts, wanted, Wanted};

fn dashboard() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/grafana/fleetgate.json");
    let text = std::fs::read_to_string(&path).expect("read the dashboard");
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// Every series the dashboard's queries need, each once.
fn all_wanted(dash: &Value) -> Vec<Wanted> {
    let mut all: Vec<Wanted> = query_texts(dash).iter().flat_map(|q| wanted(q)).collect();
    all.sort();
    all.dedup();
    all
}

#[test]
fn the_dashboard_imports_into_any_grafana_with_a_prometheus_source() {
    let dash = dashboard();
    assert!(dash["schemaVersion"].as_u64().unwrap() >= 36);
    let vars = dash["templating"]["list"].as_array().unwrap();
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no template variable {name}"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    assert_eq!(var("instance")["type"], "query");
    // No data source is named by uid: every panel, target and variable
    // uses the `datasource` variable, so the import works on any Grafana.
    fn uids(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                if let Some(ds) = map.get("datasource") {
                    out.push(ds["uid"].as_str().unwrap_or("(none)").to_string());
                }
                map.values().for_each(|c| uids(c, out));
            }
            Value::Array(items) => items.iter().for_each(|i| uids(i, out)),
            _ => {}
        }
    }
    let mut seen = Vec::new();
    uids(&dash["panels"], &mut seen);
    uids(&dash["templating"], &mut seen);
    assert!(!seen.is_empty());
    let fixed: Vec<&String> = seen.iter().filter(|u| *u != "${datasource}").collect();
    assert!(fixed.is_empty(), "hard-coded data sources: {fixed:?}");
    // Panel ids are unique (Grafana merges panels that share one).
    let mut ids: Vec<u64> = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        ids.push(p["id"].as_u64().unwrap());
        assert!(p["gridPos"]["w"].as_u64().unwrap() <= 24, "{}", p["title"]);
    }
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "duplicate panel ids");
    assert!(all_wanted(&dash).len() > 20);
}

#[test]
fn queries_are_read_down_to_series_and_labels() {
    let q = r#"histogram_quantile(0.99, sum by (le, route) (rate(fleetgate_http_request_duration_seconds_bucket{instance=~"$instance", listener=~"$listener"}[$__rate_interval])))"#;
    let w = wanted(q);
    assert_eq!(w.len(), 1);
    assert_eq!(
        w[0].to_string(),
        "fleetgate_http_request_duration_seconds_bucket{le,listener,route}"
    );
    let q = r#"sum by (reason) (rate(fleetgate_tls_handshakes_total{result="failed", listener!="x"}[5m])) / sum(fleetgate_connections_active)"#;
    let w: Vec<String> = wanted(q).iter().map(|w| w.to_string()).collect();
    assert_eq!(
        w,
        [
            r#"fleetgate_tls_handshakes_total{reason,result="failed"}"#,
            "fleetgate_connections_active{reason}",
        ]
    );
    let w = wanted(r#"label_values(fleetgate_backend_up{instance=~"$instance"}, pool)"#);
    assert_eq!(w[0].to_string(), "fleetgate_backend_up{pool}");

    let text = "# HELP x y\nfleetgate_a_bucket{le=\"0.5\",route=\"r,\\\"q\"} 1\nfleetgate_b 2\n";
    let series = parse_exposition(text);
    let want = |q: &str| wanted(q).remove(0);
    assert!(present(
        &want("sum by (le, route) (fleetgate_a_bucket)"),
        &series
    ));
    assert!(present(
        &want(r#"fleetgate_a_bucket{route="r,\"q"}"#),
        &series
    ));
    assert!(!present(&want(r#"fleetgate_a_bucket{route="s"}"#), &series));
    assert!(!present(
        &want("sum by (reason) (fleetgate_a_bucket)"),
        &series
    ));
    // The exact sample name: a histogram's family name is not a series.
    assert!(!present(&want("fleetgate_a"), &series));
    assert!(present(&want("fleetgate_b"), &series));
}

/// A UDP socket standing for a syslog server, drained by a thread.
fn syslog_receiver() -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while sock.recv(&mut buf).is_ok() {}
    });
    addr
}

#[test]
fn every_series_the_dashboard_queries_is_in_metrics() {
    let wanted = all_wanted(&dashboard());
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "web");
    let leaf = ca.server(dir.path(), "web", &["web.example"]);
    let stranger = Ca::new(dir.path(), "stranger");
    let (token_path, token) = generate_token(dir.path());
    let origin = HttpBackend::start("origin");
    let node_backend = NamedBackend::start("node-1");
    let (web, devices, disc) = (free_addr(), free_addr(), free_addr());
    let config = format!(
        r#"[admin]
bind = "{{admin}}"

[syslog]
address = "udp://{syslog}"

[discovery]
bind = "{disc}"
cluster = "{CLUSTER}"
token_file = "{token}"
interval = "200ms"
miss_limit = 10

[[listener]]
name = "web"
bind = "{web}"
mode = "offload"
tls = {{ cert = "{cert}", key = "{key}" }}
access_log = {{ path = "{access}", format = "json" }}

  [[listener.route]]
  name = "api"
  path_prefix = "/"
  pool = "web"

[[listener]]
name = "devices"
bind = "{devices}"
mode = "tcp"
pool = "ums"
access_log = {{ path = "syslog", format = "json" }}

[[pool]]
name = "web"
backends = [{{ address = "{origin}" }}]
health_check = {{ kind = "http", path = "/health", expect = 200, interval = "100ms", timeout = "500ms", rise = 1, fall = 2 }}

[[pool]]
name = "ums"
discovery = {{ service = "{SERVICE}" }}

[module.devices]
kind = "devices"
"#,
        syslog = syslog_receiver(),
        token = token_path.display(),
        cert = leaf.cert_path.display(),
        key = leaf.key_path.display(),
        access = dir.path().join("access.log").display(),
        origin = origin.addr,
    );
    let lb = Balancer::start(&config);

    let rt = tokio_rt();
    let _announcer = {
        let _ctx = rt.enter();
        Announcer::start(announce_to(disc, token, "node-1", node_backend.addr.port())).unwrap()
    };
    rt.block_on(async {
        // A client that does not trust the server's CA aborts the
        // handshake: the balancer counts a failed one.
        let refused = tls_connect(web, "web.example", client_config(&stranger, None, &[])).await;
        assert!(
            refused.is_err(),
            "a stranger CA's client finished the handshake"
        );
        let (status, _) = https_get(
            web,
            "web.example",
            client_config(&ca, None, &[b"http/1.1"]),
            "/",
            &[],
        )
        .await
        .unwrap();
        assert_eq!(status, 200);
    });
    // Through the discovered pool once the node's heartbeat has landed.
    assert!(
        eventually(Duration::from_secs(10), || ask(devices).unwrap_or_default()
            == "node-1"),
        "the discovered node never served a connection"
    );

    // Gauges are refreshed periodically: give every series a moment.
    let mut missing: Vec<&Wanted> = Vec::new();
    eventually(Duration::from_secs(10), || {
        let series = parse_exposition(&lb.metrics());
        missing = wanted.iter().filter(|w| !present(w, &series)).collect();
        missing.is_empty()
    });
    let list: Vec<String> = missing.iter().map(|w| format!("  {w}")).collect();
    assert!(
        missing.is_empty(),
        "{} of {} series the dashboard queries are not in /metrics:\n{}",
        missing.len(),
        wanted.len(),
        list.join("\n")
    );
}
