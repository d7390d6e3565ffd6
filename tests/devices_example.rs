//! The example module (examples/hello_module.rs) used from outside the
//! crate, as an embedding program would: registered in a `Registry`, run
//! by `Runtime::start_with_modules` behind an offload listener.

mod common;
#[allow(dead_code)]
#[path = "../examples/hello_module.rs"]
mod hello_module;

use std::sync::Arc;
use std::time::Duration;

use common::pki::{client_config, Ca};
use common::web::https_get;
use common::{eventually, free_addr, http_get, metric_value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outside_module_serves_requests_with_the_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server_ca = Ca::new(d, "server");
    let device_ca = Ca::new(d, "device");
    server_ca.server(d, "server", &["localhost"]);
    let device = device_ca.client(d, "device-1", "kiosk-7");
    let (front, admin) = (free_addr(), free_addr());
    let config = format!(
        r#"[admin]
bind = "{admin}"

[[listener]]
name = "front"
bind = "{front}"
mode = "offload"
tls = {{ cert = "server.pem", key = "server.key", client_auth = "optional", client_ca = "device-ca.pem" }}

  [[listener.route]]
  name = "hello-route"
  path_prefix = "/"
  module = "hi"

[module.hi]
kind = "hello"
greeting = "moin"
"#
    );
    let path = d.join("fleetgate.toml");
    std::fs::write(&path, &config).unwrap();
    let registry = hello_module::registry();
    let plan =
        fleetgate::config::load_with(&path, &registry).expect("config with kind hello loads");
    let metrics = Arc::new(fleetgate::metrics::Metrics::new());
    let rt = fleetgate::runtime::Runtime::start_with_modules(plan, metrics, &registry)
        .await
        .unwrap();
    let listener = fleetgate::admin::bind(admin).await.unwrap();
    tokio::spawn(fleetgate::admin::serve(listener, rt.clone()));

    let tls = client_config(&server_ca, Some(&device), &[b"http/1.1"]);
    let (status, body) = https_get(front, "localhost", tls, "/some/path", &[])
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["greeting"], "moin");
    assert_eq!(v["path"], "/some/path");
    assert_eq!(v["route"], "hello-route");
    assert!(v["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(
        v["client_subject"].as_str().unwrap().contains("kiosk-7"),
        "{v}"
    );
    assert_eq!(v["client_sha256"].as_str().unwrap().len(), 64);

    // Without a certificate the module still answers, with no subject.
    let anon = client_config(&server_ca, None, &[b"http/1.1"]);
    let (_, body) = https_get(front, "localhost", anon, "/", &[]).await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["client_subject"].is_null());

    // Its admin API, on the admin listener.
    let resp = tokio::task::spawn_blocking(move || http_get(admin, "/modules/hi/"))
        .await
        .unwrap()
        .unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains("\"served\":2"), "{resp}");

    // SIGHUP, handled by the same signal loop `fleetgate run` uses, with a
    // second route to the module: the reload is counted ok, the new route
    // answers and the module is the same instance (its count goes on).
    // The example's own `main` waits only for Ctrl-C.
    let signals = fleetgate::runtime::Signals::install().unwrap();
    let serving = tokio::spawn(fleetgate::runtime::serve_until_signalled(
        rt.clone(),
        signals,
    ));
    let second = "  [[listener.route]]\n  name = \"second-route\"\n  path_prefix = \"/second\"\n  module = \"hi\"\n\n  [[listener.route]]\n  name = \"hello-route\"";
    let text = config.replacen("  [[listener.route]]\n  name = \"hello-route\"", second, 1);
    assert_ne!(text, config);
    std::fs::write(&path, text).unwrap();
    let reloads = move || {
        let text = http_get(admin, "/metrics").unwrap_or_default();
        (
            metric_value(&text, "fleetgate_config_reloads_total{result=\"ok\"}"),
            metric_value(&text, "fleetgate_config_reloads_total{result=\"error\"}"),
        )
    };
    let counted = tokio::task::spawn_blocking(move || {
        let ok = std::process::Command::new("kill")
            .arg("-HUP")
            .arg(std::process::id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -HUP");
        eventually(Duration::from_secs(5), || {
            let (ok, error) = reloads();
            ok + error >= 1.0
        });
        reloads()
    })
    .await
    .unwrap();
    assert_eq!(
        counted,
        (1.0, 0.0),
        "(ok, error) reloads after one SIGHUP: the reload of a config with module kind \
         \"hello\" must use the embedder's registry"
    );
    assert!(!serving.is_finished());
    let tls = client_config(&server_ca, Some(&device), &[b"http/1.1"]);
    let (status, body) = https_get(front, "localhost", tls.clone(), "/second/x", &[])
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (&v["greeting"], &v["route"]),
        (&"moin".into(), &"second-route".into())
    );
    let (status, body) = https_get(front, "localhost", tls, "/first", &[])
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let resp = tokio::task::spawn_blocking(move || http_get(admin, "/modules/hi/"))
        .await
        .unwrap()
        .unwrap();
    assert!(
        resp.contains("\"served\":4"),
        "the module was replaced: {resp}"
    );
    serving.abort();
}

#[tokio::test]
async fn the_factory_checks_its_table() {
    let env = fleetgate::module::ModuleEnv {
        name: "hi".into(),
        data_dir: std::env::temp_dir(),
        revocations: Default::default(),
        metrics: Default::default(),
    };
    let bad: toml::Value = toml::from_str("greeting = \"\"").unwrap();
    assert!((hello_module::factory())(&bad, &env).await.is_err());
    let good: toml::Value = toml::from_str("greeting = \"hi\"").unwrap();
    assert!((hello_module::factory())(&good, &env).await.is_ok());
}
