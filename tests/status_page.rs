//! The status page at `/` on the admin listener, loaded in a real
//! browser (Debian's `chromium`, headless), its JSON twin `/status`, the
//! certificate expiry metric, and a page with a thousand backends.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::devices::pem_der;
use common::discovery::{announce_to, generate_token, tokio_rt, CLUSTER, SERVICE};
use common::pki::{Ca, Leaf};
use common::{eventually, free_addr, http_get, metric_value, Balancer, NamedBackend};
use fleetgate::discovery::Announcer;
use serde_json::Value;

fn sha256_hex(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A self-signed certificate for `name` that expires in `days` days;
/// returns its files and its notAfter (unix seconds).
fn short_lived(dir: &Path, name: &str, days: i64) -> (PathBuf, PathBuf, Vec<u8>, i64) {
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let not_after = time::OffsetDateTime::now_utc() + time::Duration::days(days);
    params.not_after = not_after;
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let cert_path = dir.join(format!("{name}.pem"));
    let key_path = dir.join(format!("{name}.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (
        cert_path,
        key_path,
        cert.der().to_vec(),
        not_after.unix_timestamp(),
    )
}

/// A running balancer with every kind of thing the page shows.
struct Setup {
    lb: Balancer,
    certs: tempfile::TempDir,
    raw: SocketAddr,
    backends: Vec<NamedBackend>,
    /// Fingerprint by what the certificate is.
    server_fp: String,
    client_ca_fp: String,
    soon_fp: String,
    soon_not_after: i64,
    pool_ca_fp: String,
    pool_client_fp: String,
    config_text: String,
    _node_backend: NamedBackend,
    _announcer: Announcer,
    _tokio: tokio::runtime::Runtime,
}

impl Setup {
    fn start() -> Setup {
        let certs = tempfile::tempdir().unwrap();
        let dir = certs.path();
        let client_ca = Ca::new(dir, "client");
        let server_ca = Ca::new(dir, "server");
        let server: Leaf = server_ca.server(dir, "server", &["status.example"]);
        let (soon_cert, soon_key, soon_der, soon_not_after) = short_lived(dir, "soon.example", 10);
        let pool_ca = Ca::new(dir, "pool");
        let pool_client = pool_ca.client(dir, "balancer", "balancer");
        let (token_path, token) = generate_token(dir);
        let backends = vec![NamedBackend::start("b1"), NamedBackend::start("b2")];
        let node_backend = NamedBackend::start("n1");
        let (offload, raw, fresh, nodes_front, disc) = (
            free_addr(),
            free_addr(),
            free_addr(),
            free_addr(),
            free_addr(),
        );
        let config_text = format!(
            r#"[global]
data_dir = "{data}"

[admin]
bind = "{{admin}}"

[discovery]
bind = "{disc}"
cluster = "{CLUSTER}"
token_file = "{token}"
interval = "200ms"
miss_limit = 5

[[listener]]
name = "device-tls"
bind = "{offload}"
mode = "offload"
tls = {{ cert = "{cert}", key = "{key}", client_auth = "optional", client_ca = "{client_ca}", certificates = [ {{ cert = "{soon_cert}", key = "{soon_key}" }} ] }}

  [[listener.route]]
  name = "api"
  path_prefix = "/api/v1/"
  module = "devices"

  [[listener.route]]
  path_prefix = "/"
  pool = "ums"

[[listener]]
name = "fresh"
bind = "{fresh}"
mode = "offload"
tls = {{ cert = "auto", auto_names = ["fresh.example"] }}

  [[listener.route]]
  path_prefix = "/"
  pool = "secure"

[[listener]]
name = "raw"
bind = "{raw}"
pool = "ums"

[[listener]]
name = "nodes-front"
bind = "{nodes_front}"
pool = "nodes"

[[pool]]
name = "ums"
backends = [{{ address = "{b1}" }}, {{ address = "{b2}" }}]
health_check = {{ kind = "tcp", interval = "100ms", timeout = "500ms", rise = 1, fall = 2 }}

[[pool]]
name = "nodes"
discovery = {{ service = "{SERVICE}" }}

[[pool]]
name = "secure"
backends = [{{ address = "{b2}" }}]
tls = {{ ca = "{pool_ca}", cert = "{pool_cert}", key = "{pool_key}", server_name = "backend.example" }}

[module.devices]
kind = "devices"
"#,
            data = dir.join("data").display(),
            token = token_path.display(),
            cert = server.cert_path.display(),
            key = server.key_path.display(),
            client_ca = client_ca.pem_path.display(),
            soon_cert = soon_cert.display(),
            soon_key = soon_key.display(),
            b1 = backends[0].addr,
            b2 = backends[1].addr,
            pool_ca = pool_ca.pem_path.display(),
            pool_cert = pool_client.cert_path.display(),
            pool_key = pool_client.key_path.display(),
        );
        let lb = Balancer::start(&config_text);
        let tokio = tokio_rt();
        let announcer = {
            let _enter = tokio.enter();
            Announcer::start(announce_to(disc, token, "node-a", node_backend.addr.port()))
                .expect("announcer starts")
        };
        let s = Setup {
            lb,
            raw,
            backends,
            server_fp: sha256_hex(&server.der),
            client_ca_fp: sha256_hex(client_ca.cert.der().as_ref()),
            soon_fp: sha256_hex(&soon_der),
            soon_not_after,
            pool_ca_fp: sha256_hex(pool_ca.cert.der().as_ref()),
            pool_client_fp: sha256_hex(&pool_client.der),
            config_text,
            certs,
            _node_backend: node_backend,
            _announcer: announcer,
            _tokio: tokio,
        };
        assert!(
            eventually(Duration::from_secs(10), || {
                let st = s.status();
                let node_known = st["discovery"]["nodes"]
                    .as_array()
                    .is_some_and(|n| n.iter().any(|n| n["id"] == "node-a"));
                let checked = s
                    .backend(&st, "ums", s.backends[0].addr)
                    .is_some_and(|b| b["last_check"]["ok"] == true);
                node_known && checked
            }),
            "the node is heard and the first health checks ran: {:#}",
            s.status()
        );
        s
    }

    fn status(&self) -> Value {
        let text = http_get(self.lb.admin, "/status").expect("GET /status");
        let (_, body) = text.split_once("\r\n\r\n").expect("a response");
        serde_json::from_str(body).expect("/status is JSON")
    }

    fn backend(&self, status: &Value, pool: &str, addr: SocketAddr) -> Option<Value> {
        status["pools"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == pool)?["backends"]
            .as_array()?
            .iter()
            .find(|b| b["address"] == addr.to_string().as_str())
            .cloned()
    }

    /// The `auto` certificate, written to the data directory at start.
    fn auto_fp(&self) -> String {
        let pem = std::fs::read_to_string(self.certs.path().join("data/server.pem")).unwrap();
        sha256_hex(&pem_der(&pem))
    }
}

/// `/` as the browser leaves it after its scripts ran: Debian's chromium,
/// headless, with a profile of its own.
fn browser_dom(url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new("timeout")
        .args([
            "120",
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--dump-dom", url])
        .output()
        .expect("run chromium (Debian package `chromium`)");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dom = String::from_utf8(out.stdout).unwrap();
    assert!(
        dom.contains("data-script=\"ran\""),
        "the page's inline script ran under its policy: {dom}"
    );
    dom
}

/// Every `src` and `href` value in `dom`.
fn links(dom: &str) -> Vec<String> {
    let re = regex::Regex::new(r#"(?i)\b(?:src|href|action|srcset)\s*=\s*"([^"]*)""#).unwrap();
    re.captures_iter(dom).map(|c| c[1].to_string()).collect()
}

fn headers(text: &str) -> String {
    text.split_once("\r\n\r\n")
        .map(|(h, _)| h.to_ascii_lowercase())
        .unwrap_or_default()
}

#[test]
fn status_page_in_a_real_browser() {
    let mut s = Setup::start();
    // Traffic for the counters.
    common::ask(s.raw).unwrap();
    let url = format!("http://{}/", s.lb.admin);

    // The page forbids any load from elsewhere.
    let raw = http_get(s.lb.admin, "/").unwrap();
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    let h = headers(&raw);
    assert!(h.contains("content-type: text/html"), "{h}");
    let csp = h
        .lines()
        .find_map(|l| l.strip_prefix("content-security-policy: "))
        .unwrap_or_else(|| panic!("a Content-Security-Policy header: {h}"));
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(csp.contains("connect-src 'self'"), "{csp}");

    let dom = browser_dom(&url);
    for listener in ["device-tls", "fresh", "raw", "nodes-front"] {
        assert!(
            dom.contains(&format!("data-listener=\"{listener}\"")),
            "listener {listener} on the page: {dom}"
        );
    }
    for b in &s.backends {
        assert!(
            dom.contains(&format!("data-backend=\"{}\" data-state=\"up\"", b.addr)),
            "backend {} up on the page: {dom}",
            b.addr
        );
    }
    assert!(
        dom.contains("data-node=\"node-a\""),
        "node on the page: {dom}"
    );
    assert!(dom.contains("data-module=\"devices\""), "module: {dom}");
    assert!(dom.contains("enrolled: <b>0</b>"), "device counts: {dom}");
    for fp in [
        &s.server_fp,
        &s.client_ca_fp,
        &s.pool_ca_fp,
        &s.pool_client_fp,
        &s.auto_fp(),
    ] {
        assert!(
            dom.contains(&format!("class=\"valid\" data-fingerprint=\"{fp}\"")),
            "certificate {fp} listed, not highlighted: {dom}"
        );
    }
    assert!(
        dom.contains(&format!(
            "class=\"expiring\" data-fingerprint=\"{}\"",
            s.soon_fp
        )),
        "the certificate with 10 days left is highlighted: {dom}"
    );
    assert!(dom.contains(&s.lb.config.display().to_string()));

    // Nothing on the page points to another origin.
    let links = links(&dom);
    assert!(!links.is_empty(), "the page links its JSON twin");
    for l in &links {
        let lower = l.to_ascii_lowercase();
        assert!(
            !(lower.starts_with("http:") || lower.starts_with("https:") || lower.starts_with("//")),
            "external reference {l:?} in {dom}"
        );
    }

    // A backend that is killed shows down, with the health check as reason.
    let gone = s.backends[0].addr;
    s.backends[0].stop();
    assert!(
        eventually(Duration::from_secs(10), || s
            .backend(&s.status(), "ums", gone)
            .is_some_and(|b| b["up"] == false)),
        "the health check takes {gone} out"
    );
    let dom = browser_dom(&url);
    assert!(
        dom.contains(&format!(
            "<tr class=\"down\" data-backend=\"{gone}\" data-state=\"down\">"
        )),
        "backend {gone} shown down: {dom}"
    );
    assert!(dom.contains("health check failing"), "{dom}");
    assert!(
        dom.contains(&format!(
            "data-backend=\"{}\" data-state=\"up\"",
            s.backends[1].addr
        )),
        "the other backend stays up: {dom}"
    );
}

#[test]
fn json_twin_reload_result_and_expiry_metric() {
    let mut s = Setup::start();
    let st = s.status();
    // Existing fields stay.
    for key in [
        "version",
        "config",
        "open_connections",
        "listeners",
        "pools",
    ] {
        assert!(!st[key].is_null(), "{key} in {st:#}");
    }
    assert_eq!(st["config"], s.lb.config.display().to_string().as_str());
    assert!(st["config_loaded_at"].as_f64().unwrap() > 1.6e9);
    assert!(st["last_reload"].is_null(), "no reload yet: {st:#}");

    // Listener counters and rates (sampled every 5 s).
    common::ask(s.raw).unwrap();
    common::ask(s.raw).unwrap();
    assert!(
        eventually(Duration::from_secs(15), || {
            let st = s.status();
            let l = st["listeners"]
                .as_array()
                .unwrap()
                .iter()
                .find(|l| l["name"] == "raw")
                .cloned()
                .unwrap();
            l["connections_total"].as_f64() >= Some(2.0)
                && l["connections_per_second"].is_number()
                && l["open_connections"].is_number()
        }),
        "listener counters and rates: {:#}",
        s.status()
    );

    // Backends: the last health check, and a reason once down.
    let b = s.backend(&st, "ums", s.backends[0].addr).unwrap();
    assert_eq!(b["last_check"]["ok"], true, "{b:#}");
    assert!(b["last_check"]["at"].as_f64().unwrap() > 1.6e9);
    assert!(b["reason"].is_null(), "{b:#}");
    let node_member = st["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "nodes")
        .unwrap()["backends"][0]
        .clone();
    assert_eq!(node_member["node"], "node-a", "{st:#}");
    let gone = s.backends[0].addr;
    s.backends[0].stop();
    assert!(
        eventually(Duration::from_secs(10), || s
            .backend(&s.status(), "ums", gone)
            .is_some_and(|b| b["up"] == false
                && b["last_check"]["ok"] == false
                && b["reason"].as_str().is_some_and(
                    |r| r.starts_with("health check failing: connect")
                ))),
        "{:#}",
        s.status()
    );

    // Certificates, each with its use.
    let certs = st["certificates"].as_array().unwrap();
    let find = |fp: &str, role: &str| {
        certs
            .iter()
            .find(|c| c["fingerprint"] == fp && c["role"] == role)
            .cloned()
            .unwrap_or_else(|| panic!("{role} {fp} in {certs:#?}"))
    };
    let server = find(&s.server_fp, "server");
    assert_eq!(server["listener"], "device-tls");
    assert_eq!(server["subject"], "CN=status.example");
    assert_eq!(server["sans"], serde_json::json!(["DNS:status.example"]));
    assert_eq!(server["expiring"], false);
    let soon = find(&s.soon_fp, "server");
    assert_eq!(soon["origin"], "sni");
    assert_eq!(soon["not_after"], s.soon_not_after);
    assert_eq!(soon["expiring"], true);
    assert_eq!(find(&s.client_ca_fp, "client_ca")["listener"], "device-tls");
    assert_eq!(find(&s.pool_ca_fp, "pool_ca")["pool"], "secure");
    assert_eq!(find(&s.pool_client_fp, "pool_client")["pool"], "secure");
    assert_eq!(find(&s.auto_fp(), "server")["origin"], "auto");

    // Modules: counts only.
    let devices = st["modules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "devices")
        .cloned()
        .unwrap();
    assert_eq!(devices["kind"], "devices");
    assert_eq!(devices["status"]["enrolled"], 0);
    assert_eq!(devices["status"]["online"], 0);
    assert_eq!(devices["status"]["channels_here"], 0);

    // The expiry metric, one series per certificate and use.
    let metrics = s.lb.metrics();
    let series = |listener: &str, pool: &str, role: &str, fp: &str| {
        metric_value(
            &metrics,
            &format!("fleetgate_tls_certificate_expiry_timestamp_seconds{{listener=\"{listener}\",pool=\"{pool}\",role=\"{role}\",fingerprint=\"{fp}\"}}"),
        )
    };
    assert_eq!(
        series("device-tls", "", "server", &s.soon_fp),
        s.soon_not_after as f64
    );
    let far = (fleetgate_now() + 365 * 86_400) as f64;
    assert!(series("device-tls", "", "server", &s.server_fp) > far);
    assert!(series("device-tls", "", "client_ca", &s.client_ca_fp) > far);
    assert!(series("fresh", "", "server", &s.auto_fp()) > far);
    assert!(series("", "secure", "pool_ca", &s.pool_ca_fp) > far);
    assert!(series("", "secure", "pool_client", &s.pool_client_fp) > far);

    // A refused reload is reported with its error; the next good one
    // drops the series of the certificate it no longer uses.
    s.lb.write_config("this is not toml [");
    s.lb.signal("HUP");
    assert!(
        eventually(Duration::from_secs(10), || s.status()["last_reload"]
            ["result"]
            == "error"),
        "{:#}",
        s.status()
    );
    assert!(s.status()["last_reload"]["error"].as_str().unwrap().len() > 5);
    let page = http_get(s.lb.admin, "/").unwrap();
    assert!(page.contains("<span class=\"bad\">error</span>"), "{page}");
    let loaded = st["config_loaded_at"].as_f64().unwrap();
    let without_sni = s.config_text.replace(
        &format!(
            ", certificates = [ {{ cert = \"{0}/soon.example.pem\", key = \"{0}/soon.example.key\" }} ]",
            s.certs.path().display()
        ),
        "",
    );
    assert_ne!(without_sni, s.config_text);
    s.lb.write_config(&without_sni);
    s.lb.signal("HUP");
    assert!(
        eventually(Duration::from_secs(10), || s.status()["last_reload"]
            ["result"]
            == "ok"),
        "{:#}",
        s.status()
    );
    assert!(s.status()["config_loaded_at"].as_f64().unwrap() > loaded);
    let metrics = s.lb.metrics();
    assert!(
        !metrics.contains(&s.soon_fp),
        "the series of the certificate no longer used is gone"
    );
    assert!(metrics.contains(&s.server_fp));
}

fn fleetgate_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn a_thousand_backends() {
    let front = free_addr();
    let addrs: Vec<String> = (0..1000)
        .map(|i| format!("127.0.{}.{}:9", 1 + i / 250, 1 + i % 250))
        .collect();
    let list: Vec<String> = addrs
        .iter()
        .map(|a| format!("{{ address = \"{a}\" }}"))
        .collect();
    let lb = Balancer::start(&format!(
        r#"[admin]
bind = "{{admin}}"

[[listener]]
name = "big"
bind = "{front}"
pool = "big"

[[pool]]
name = "big"
backends = [{}]
"#,
        list.join(", ")
    ));
    // Measured, not asserted: how long the admin listener takes to answer.
    let timed = |path: &str| {
        let began = Instant::now();
        let text = http_get(lb.admin, path).unwrap();
        (began.elapsed(), text)
    };
    let (page_time, page) = timed("/");
    let (json_time, json) = timed("/status");
    eprintln!(
        "1000 backends: GET / {page_time:?} ({} bytes), GET /status {json_time:?} ({} bytes)",
        page.len(),
        json.len()
    );
    assert!(page.starts_with("HTTP/1.1 200"));
    for a in &addrs {
        assert!(
            page.contains(&format!("data-backend=\"{a}\" data-state=\"up\"")),
            "{a} on the page"
        );
    }
    assert!(
        page.contains("1000 backends, 1000 up"),
        "the pool's summary"
    );
    let (_, body) = json.split_once("\r\n\r\n").unwrap();
    let st: Value = serde_json::from_str(body).unwrap();
    let listed: Vec<&str> = st["pools"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["address"].as_str().unwrap())
        .collect();
    assert_eq!(listed.len(), 1000);
    for a in &addrs {
        assert!(listed.contains(&a.as_str()), "{a} in /status");
    }
    // The browser renders it too, the big pool collapsed.
    let dom = browser_dom(&format!("http://{}/", lb.admin));
    assert_eq!(dom.matches("data-backend=").count(), 1000);
    assert!(
        dom.contains("<details id=\"pool-big\"><summary>"),
        "collapsed"
    );
}
