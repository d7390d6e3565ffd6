//! Refused TLS handshakes say why, through the real binary: each refusal
//! shows as its reason in the warn log line (with the client and the SNI)
//! and in `fleetgate_tls_handshakes_total{result="failed",reason}`. X.509
//! version 1 client certificates made by `openssl x509 -req` are served
//! when the client CA issued them, and forwarded to the backend.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pki::{client_config, Ca, Leaf};
use common::web::{echo_backend, https_get, tls_connect, Seen};
use common::*;
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl is installed");
    assert!(out.status.success(), "openssl {args:?}: {out:?}");
}

/// A version 1 client certificate, as `openssl x509 -req` makes it without
/// an extensions file, issued by `ca`. Returns (certificate, key) paths.
fn v1_device(dir: &Path, ca: &Ca, cn: &str) -> (PathBuf, PathBuf) {
    let ca_key = dir.join(format!("{cn}-issuer.key"));
    std::fs::write(&ca_key, ca.key.serialize_pem()).unwrap();
    let ca_key = ca_key.to_str().unwrap();
    let ca_pem = ca.pem_path.to_str().unwrap();
    let (key, csr, crt) = (
        format!("{cn}.key"),
        format!("{cn}.csr"),
        format!("{cn}.pem"),
    );
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &key,
        ],
    );
    let subj = format!("/CN={cn}");
    openssl(
        dir,
        &["req", "-new", "-key", &key, "-subj", &subj, "-out", &csr],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            ca_pem,
            "-CAkey",
            ca_key,
            "-CAcreateserial",
            "-days",
            "30",
            "-out",
            &crt,
        ],
    );
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(dir.join(&crt))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("Version: 1 (0x0)"),
        "openssl made a version 1 certificate"
    );
    (dir.join(crt), dir.join(key))
}

/// A v3 client certificate from `ca` whose validity ended in 2021.
fn expired_device(dir: &Path, ca: &Ca) -> Leaf {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "old-device");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    let (cert_path, key_path) = (dir.join("old.pem"), dir.join("old.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    Leaf {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        der: cert.der().to_vec(),
        key_der: key.serialize_der(),
        cert_path,
        key_path,
    }
}

/// `fleetgate run` with its log (at warn, without colours) in a file.
fn start_logged(dir: &Path, config: &str) -> (Balancer, PathBuf) {
    let admin = free_addr();
    let path = dir.join("fleetgate.toml");
    std::fs::write(&path, config.replace("{admin}", &admin.to_string())).unwrap();
    let log = dir.join("fleetgate.log");
    let child = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
        .args(["run", "-c"])
        .arg(&path)
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn fleetgate");
    let lb = Balancer {
        child,
        dir: tempfile::tempdir().unwrap(),
        config: path,
        admin,
    };
    assert!(
        eventually(Duration::from_secs(20), || http_get(admin, "/healthz")
            .is_ok_and(|r| r.starts_with("HTTP/1.1 200"))),
        "fleetgate did not start"
    );
    (lb, log)
}

/// The log's lines, escape sequences removed.
fn log_lines(log: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let ansi = regex::Regex::new("\x1b\\[[0-9;]*m").unwrap();
    text.lines()
        .map(|l| ansi.replace_all(l, "").into_owned())
        .collect()
}

/// The warn line of a refusal with `words` and `reason`.
fn refusal_line(log: &Path, listener: &str, words: &str, reason: &str) -> String {
    let mut found = None;
    let seen = eventually(Duration::from_secs(5), || {
        found = log_lines(log).into_iter().find(|l| {
            l.contains(" WARN ")
                && l.contains(&format!("TLS handshake refused: {words} ("))
                && l.contains(&format!("reason=\"{reason}\""))
                && l.contains(&format!("listener=\"{listener}\""))
        });
        found.is_some()
    });
    assert!(
        seen,
        "no line for {reason} ({words}) in the log:\n{}",
        log_lines(log).join("\n")
    );
    found.unwrap()
}

fn failed(listener: &str, reason: &str) -> String {
    format!("fleetgate_tls_handshakes_total{{listener=\"{listener}\",result=\"failed\",reason=\"{reason}\"}}")
}

#[derive(Clone)]
struct Curl {
    front: SocketAddr,
    server_ca: PathBuf,
}

impl Curl {
    /// GET / with a client certificate; Ok(body) or Err(curl's stderr).
    fn get(&self, cert: &Path, key: &Path, tls12: bool) -> Result<String, String> {
        let port = self.front.port();
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--fail", "--max-time", "10", "--cacert"])
            .arg(&self.server_ca)
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .args(["--resolve", &format!("device.example:{port}:127.0.0.1")]);
        if tls12 {
            cmd.args(["--tlsv1.2", "--tls-max", "1.2"]);
        }
        let out = cmd
            .arg(format!("https://device.example:{port}/legacy"))
            .output()
            .expect("curl is installed");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

/// nginx's `$ssl_client_escaped_cert` back to PEM.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            out.push(
                u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap(), 16).unwrap(),
            );
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

/// One refusal per second per listener reaches the log: the next refusal
/// on the same listener waits until a second has passed since the
/// previous line was seen (it was written before).
async fn next_second(seen: Instant) {
    let wait = Duration::from_millis(1100).saturating_sub(seen.elapsed());
    tokio::time::sleep(wait).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_handshakes_say_why_and_v1_certificates_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server_ca = Ca::new(d, "server");
    let device_ca = Ca::new(d, "device");
    let other_ca = Ca::new(d, "other");
    let server = server_ca.server(d, "server", &["device.example"]);
    let (v1_cert, v1_key) = v1_device(d, &device_ca, "legacy-device");
    let (stray_cert, stray_key) = v1_device(d, &other_ca, "stray-device");
    let expired = expired_device(d, &device_ca);
    let backend = echo_backend("web", None).await;
    let (front, modern) = (free_addr(), free_addr());
    let config = format!(
        r#"[admin]
bind = "{{admin}}"

[[listener]]
name = "devices"
bind = "{front}"
mode = "offload"
tls = {{ cert = "{cert}", key = "{key}", client_auth = "required", client_ca = "{ca}", forward_cert_header = "X-SSL-CERT" }}

  [[listener.route]]
  path_prefix = "/"
  pool = "web"

[[listener]]
name = "modern"
bind = "{modern}"
mode = "offload"
tls = {{ cert = "{cert}", key = "{key}", min_version = "1.3", ciphers = ["TLS13_AES_256_GCM_SHA384"] }}

  [[listener.route]]
  path_prefix = "/"
  pool = "web"

[[pool]]
name = "web"
backends = [{{ address = "{backend}" }}]
"#,
        cert = server.cert_path.display(),
        key = server.key_path.display(),
        ca = device_ca.pem_path.display(),
    );
    let (lb, log) = {
        let d = d.to_path_buf();
        tokio::task::spawn_blocking(move || start_logged(&d, &config))
            .await
            .unwrap()
    };
    let curl = Curl {
        front,
        server_ca: server_ca.pem_path.clone(),
    };
    let curl_get = |cert: &PathBuf, key: &PathBuf, tls12| {
        let (cert, key, curl) = (cert.clone(), key.clone(), curl.clone());
        tokio::task::spawn_blocking(move || curl.get(&cert, &key, tls12))
    };

    // A version 1 certificate from the client CA: served over TLS 1.3 and
    // 1.2, and the backend sees it in X-SSL-CERT.
    let v1_pem = std::fs::read_to_string(&v1_cert).unwrap();
    for tls12 in [false, true] {
        let body = curl_get(&v1_cert, &v1_key, tls12)
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("v1 certificate refused (tls12={tls12}): {e}"));
        let seen: Seen = serde_json::from_str(&body).unwrap();
        let forwarded = unescape(seen.header("x-ssl-cert").expect("X-SSL-CERT is set"));
        assert_eq!(forwarded.trim(), v1_pem.trim(), "tls12={tls12}");
    }
    let ok = "fleetgate_tls_handshakes_total{listener=\"devices\",result=\"ok\",reason=\"none\"}";
    assert_eq!(lb.metric(ok), 2.0);

    // A version 1 certificate from another CA.
    let refused = curl_get(&stray_cert, &stray_key, false).await.unwrap();
    assert!(refused.is_err(), "{refused:?}");
    let line = refusal_line(
        &log,
        "devices",
        "client certificate: unknown issuer",
        "client_cert_unknown_issuer",
    );
    let last = Instant::now();
    assert!(line.contains("sni=\"device.example\""), "{line}");
    assert!(line.contains("peer=127.0.0.1:"), "{line}");
    let series = failed("devices", "client_cert_unknown_issuer");
    assert!(eventually(Duration::from_secs(3), || lb.metric(&series) == 1.0));

    // An expired certificate from the client CA.
    next_second(last).await;
    let client = client_config(&server_ca, Some(&expired), &[b"http/1.1"]);
    let got = https_get(front, "device.example", client, "/", &[]).await;
    assert!(got.is_err(), "{got:?}");
    refusal_line(
        &log,
        "devices",
        "client certificate: expired",
        "client_cert_expired",
    );
    let last = Instant::now();
    let series = failed("devices", "client_cert_expired");
    assert!(eventually(Duration::from_secs(3), || lb.metric(&series) == 1.0));

    // No certificate where one is required.
    next_second(last).await;
    let client = client_config(&server_ca, None, &[b"http/1.1"]);
    let got = https_get(front, "device.example", client, "/", &[]).await;
    assert!(got.is_err(), "{got:?}");
    refusal_line(
        &log,
        "devices",
        "client certificate: none presented",
        "client_cert_missing",
    );
    let last = Instant::now();
    let series = failed("devices", "client_cert_missing");
    assert!(eventually(Duration::from_secs(3), || lb.metric(&series) == 1.0));

    // Plain HTTP to the TLS port.
    next_second(last).await;
    let plain = tokio::task::spawn_blocking(move || http_get(front, "/"))
        .await
        .unwrap();
    assert!(
        !plain.as_deref().unwrap_or("").contains("HTTP/1.1 200"),
        "{plain:?}"
    );
    let line = refusal_line(&log, "devices", "not TLS", "not_tls");
    assert!(line.contains("sni=\"-\""), "{line}");
    let series = failed("devices", "not_tls");
    assert!(eventually(Duration::from_secs(3), || lb.metric(&series) == 1.0));

    // A TLS 1.2-only client on a TLS 1.3 listener.
    let tls12_only = Arc::new(
        rustls::ClientConfig::builder_with_provider(common::pki::provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(server_ca.roots())
            .with_no_client_auth(),
    );
    assert!(tls_connect(modern, "device.example", tls12_only)
        .await
        .is_err());
    refusal_line(&log, "modern", "no shared version", "no_shared_version");
    let series = failed("modern", "no_shared_version");
    assert!(eventually(Duration::from_secs(3), || lb.metric(&series) == 1.0));

    // A client whose only suite the listener does not enable.
    next_second(Instant::now()).await;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256];
    let other_suite = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(server_ca.roots())
            .with_no_client_auth(),
    );
    assert!(tls_connect(modern, "device.example", other_suite)
        .await
        .is_err());
    refusal_line(&log, "modern", "no shared cipher", "no_shared_cipher");
    let series = failed("modern", "no_shared_cipher");
    assert!(eventually(Duration::from_secs(3), || lb.metric(&series) == 1.0));

    // Every refusal above is counted once, under its own reason only.
    let total: f64 = lb
        .metrics()
        .lines()
        .filter(|l| {
            l.starts_with("fleetgate_tls_handshakes_total{") && l.contains("result=\"failed\"")
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    assert_eq!(total, 6.0);
    let rejected =
        "fleetgate_tls_client_certificates_total{listener=\"devices\",state=\"rejected\"}";
    assert_eq!(lb.metric(rejected), 3.0);
}
