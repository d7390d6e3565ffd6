//! Certificate and CA rotation through the real binary: files replaced on
//! disk, no signal. New handshakes get the new certificate (its SHA-256
//! seen by a client) and the new client CA; WebSockets, keep-alive, L4 and
//! passthrough connections made before carry on. A half-written or
//! mismatched file is refused (logged, counted as an `error` reload) while
//! the old certificate keeps serving; `tls.watch = false` waits for
//! SIGHUP; `fleetgate cert renew` replaces a `cert = "auto"` pair.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::discovery::status;
use common::live::{
    connect, get, get_once, runtime, start_logged, HeldSocket, IdBackend, KeepAliveLoad, Pki, HOST,
};
use common::pki::{client_config, provider, Ca, Leaf};
use common::web::tls_connect;
use common::{eventually, free_addr, Balancer};
use fleetgate::tls::forward::sha256_fingerprint;
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::runtime::Runtime;

/// Long enough for the watch (one stat a second, a change acted on once it
/// held for a poll) and a loaded machine.
const PICKED_UP: Duration = Duration::from_secs(20);

/// `ok` and `error` reloads counted so far.
fn reloads(lb: &Balancer) -> (f64, f64) {
    (
        lb.metric("fleetgate_config_reloads_total{result=\"ok\"}"),
        lb.metric("fleetgate_config_reloads_total{result=\"error\"}"),
    )
}

/// The SHA-256 of the certificate a new handshake to `front` gets, from a
/// client with a fresh session cache (a resumed session shows no
/// certificate).
fn served_fingerprint(rt: &Runtime, front: SocketAddr, tls: Arc<rustls::ClientConfig>) -> String {
    rt.block_on(async {
        let s = tls_connect(front, HOST, tls)
            .await
            .unwrap_or_else(|e| panic!("handshake with {front}: {e}"));
        let certs = s.get_ref().1.peer_certificates().expect("a certificate");
        sha256_fingerprint(&certs[0])
    })
}

fn fingerprint(leaf: &Leaf) -> String {
    sha256_fingerprint(&leaf.der)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// An offload listener on `front` to the plain port of `backend` (pool
/// `a`), with the certificate `front.pem`/`front.key` next to the
/// configuration; `tls_extra` goes into its `tls` table.
fn offload_config(front: SocketAddr, backend: &IdBackend, tls_extra: &str, extra: &str) -> String {
    format!(
        r#"[admin]
bind = "{{admin}}"

[[listener]]
name = "web"
bind = "{front}"
mode = "offload"
tls = {{ cert = "front.pem", key = "front.key"{tls_extra} }}
pool = "a"

[[pool]]
name = "a"
backends = [{{ address = "{a}" }}]

{extra}
"#,
        a = backend.addr,
    )
}

/// A plain HTTP/1.1 connection (through an L4 listener).
async fn plain_connect(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// A new certificate for `leaf`'s key (a renewal that keeps the key, as
/// `certbot --reuse-key` does), issued by `ca`: PEM and DER.
fn renewed_same_key(ca: &Ca, leaf: &Leaf) -> (String, Vec<u8>) {
    let key = rcgen::KeyPair::from_pem(&leaf.key_pem).unwrap();
    let mut params = rcgen::CertificateParams::new(vec![HOST.to_string()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{HOST} renewed"));
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    (cert.pem(), cert.der().to_vec())
}

#[test]
fn ten_rotations_of_the_server_certificate_and_client_ca_by_file_keep_every_connection() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let next = root.join("next");
    std::fs::create_dir(&next).unwrap();
    let pki = Pki::new(&root);
    let rt = runtime();
    let backend = IdBackend::start(&rt, "a", &pki);
    pki.ca.server(&root, "front", &[HOST]);
    let clients = Ca::new(&root, "clients");
    std::fs::write(root.join("client-ca.pem"), clients.cert.pem()).unwrap();
    let device = clients.client(&root, "device", "device-1");
    let (web, l4, pt) = (free_addr(), free_addr(), free_addr());
    let config = offload_config(
        web,
        &backend,
        ", client_auth = \"required\", client_ca = \"client-ca.pem\"",
        &format!(
            r#"[[listener]]
name = "l4"
bind = "{l4}"
mode = "tcp"
pool = "a"

[[listener]]
name = "pt"
bind = "{pt}"
mode = "passthrough"
pool = "a-tls"

[[pool]]
name = "a-tls"
backends = [{{ address = "{tls}" }}]
"#,
            tls = backend.tls_addr
        ),
    );
    let (lb, log) = start_logged(dir, &config);
    let device_tls = || client_config(&pki.ca, Some(&device), &[b"http/1.1"]);

    // What must outlive the rotations: 200 WebSockets, keep-alive load,
    // and one idle keep-alive connection per listener kind.
    let tls = device_tls();
    let mut sockets = rt.block_on(HeldSocket::open_many(web, &tls, 200));
    assert_eq!(backend.websockets(), 200);
    let load = KeepAliveLoad::start(&rt, web, tls.clone(), 4, "/", Duration::from_millis(2));
    let mut offload_conn = rt.block_on(connect(web, tls.clone())).unwrap();
    let mut l4_conn = rt.block_on(plain_connect(l4));
    let mut pt_conn = rt.block_on(connect(pt, pki.client())).unwrap();
    for (what, conn) in [
        ("offload", &mut offload_conn),
        ("l4", &mut l4_conn),
        ("passthrough", &mut pt_conn),
    ] {
        assert_eq!(rt.block_on(get(conn, "/")).as_deref(), Ok("a"), "{what}");
    }

    let mut last = String::new();
    // From the last write to the first handshake with the new certificate,
    // for the figure (not asserted).
    let mut took = Vec::new();
    for i in 0..10 {
        let server = pki.ca.server(&next, &format!("front-{i}"), &[HOST]);
        let ca = Ca::new(&next, &format!("clients-{i}"));
        let newcomer = ca.client(&next, &format!("device-{i}"), &format!("new-device-{i}"));
        let newcomer_tls = || client_config(&pki.ca, Some(&newcomer), &[b"http/1.1"]);
        let refused = rt.block_on(get_once(web, newcomer_tls()));
        assert!(
            refused.is_err(),
            "rotation {i}: a device of the new CA was served before the CA file named it"
        );

        // Written in place, the way `cp` or a deploy hook does.
        std::fs::write(root.join("front.key"), &server.key_pem).unwrap();
        std::fs::write(root.join("front.pem"), &server.cert_pem).unwrap();
        std::fs::write(
            root.join("client-ca.pem"),
            format!("{}{}", clients.cert.pem(), ca.cert.pem()),
        )
        .unwrap();
        let written = std::time::Instant::now();

        let want = fingerprint(&server);
        let mut seen = String::new();
        assert!(
            eventually(PICKED_UP, || {
                seen = served_fingerprint(&rt, web, device_tls());
                seen == want
            }),
            "rotation {i}: new handshakes still get {seen}, not {want}:\n{}",
            read(&log)
        );
        took.push(written.elapsed());
        assert!(
            eventually(PICKED_UP, || rt
                .block_on(get_once(web, newcomer_tls()))
                .is_ok_and(|id| id == "a")),
            "rotation {i}: a device of the new client CA is still refused:\n{}",
            read(&log)
        );
        last = want;
    }

    let summary = load.stop(&rt);
    let mut cut = Vec::new();
    rt.block_on(async {
        for (i, s) in sockets.iter_mut().enumerate() {
            if let Err(e) = s.echo(&format!("after the rotations, socket {i}")).await {
                cut.push(format!("socket {i}: {e}"));
            }
        }
    });
    let (ok, errors) = reloads(&lb);
    took.sort();
    eprintln!(
        "FIGURE 10 rotations: new certificate served {:.1?} to {:.1?} after the files were \
         written; {ok} reloads ok, {errors} refused; {} requests on 4 keep-alive clients, {} \
         errors, {} reconnects; {} of 200 WebSockets echo afterwards",
        took[0],
        took[took.len() - 1],
        summary.total(),
        summary.errors.len(),
        summary.reconnects,
        200 - cut.len()
    );
    assert!(cut.is_empty(), "WebSockets cut by the rotations: {cut:?}");
    assert!(
        summary.errors.is_empty(),
        "client errors: {:?}",
        summary.errors
    );
    assert_eq!(summary.reconnects, 0);
    for (what, conn) in [
        ("offload", &mut offload_conn),
        ("l4", &mut l4_conn),
        ("passthrough", &mut pt_conn),
    ] {
        assert_eq!(
            rt.block_on(get(conn, "/")).as_deref(),
            Ok("a"),
            "the {what} connection made before the rotations"
        );
    }
    assert_eq!(errors, 0.0, "{}", read(&log));
    assert!(ok >= 10.0, "{ok} reloads for 10 rotations");
    assert_eq!(served_fingerprint(&rt, web, device_tls()), last);
}

/// A listener with `front.pem`/`front.key` from the test CA, and no
/// client certificates; `(balancer, log, directory, pki, backend)`.
struct Simple {
    lb: Balancer,
    log: PathBuf,
    root: PathBuf,
    pki: Pki,
    front: SocketAddr,
    leaf: Leaf,
    _backend: IdBackend,
}

fn simple(rt: &Runtime, tls_extra: &str) -> Simple {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let pki = Pki::new(&root);
    let backend = IdBackend::start(rt, "a", &pki);
    let leaf = pki.ca.server(&root, "front", &[HOST]);
    let front = free_addr();
    let (lb, log) = start_logged(dir, &offload_config(front, &backend, tls_extra, ""));
    Simple {
        lb,
        log,
        root,
        pki,
        front,
        leaf,
        _backend: backend,
    }
}

impl Simple {
    fn served(&self, rt: &Runtime) -> String {
        served_fingerprint(rt, self.front, self.pki.client())
    }

    fn answers(&self, rt: &Runtime) -> bool {
        rt.block_on(get_once(self.front, self.pki.client()))
            .as_deref()
            == Ok("a")
    }
}

#[test]
fn a_half_written_certificate_is_never_served() {
    let rt = runtime();
    let s = simple(&rt, "");
    let old = fingerprint(&s.leaf);
    assert_eq!(s.served(&rt), old);
    let (pem, der) = renewed_same_key(&s.pki.ca, &s.leaf);
    let new = sha256_fingerprint(&der);
    let cert = s.root.join("front.pem");

    // The first half, then a pause of several polls.
    let (first, rest) = pem.split_at(pem.len() / 2);
    std::fs::write(&cert, first).unwrap();
    assert!(
        eventually(PICKED_UP, || reloads(&s.lb).1 == 1.0),
        "the half-written file was not refused:\n{}",
        read(&s.log)
    );
    let doc = status(s.lb.admin);
    assert_eq!(doc["last_reload"]["result"], "error", "{doc}");
    let said = doc["last_reload"]["error"].as_str().unwrap_or_default();
    assert!(said.contains("front.pem"), "{said}");
    let log = read(&s.log);
    assert!(
        log.lines()
            .any(|l| l.contains("certificate reload refused") && l.contains("front.pem")),
        "no log line names the refused file:\n{log}"
    );
    for _ in 0..4 {
        assert_eq!(s.served(&rt), old, "a half-written certificate went live");
        assert!(s.answers(&rt));
        thread::sleep(Duration::from_secs(1));
    }
    assert_eq!(reloads(&s.lb), (0.0, 1.0), "retried only when it changes");

    // The rest: now it parses and matches its key.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&cert)
        .unwrap();
    f.write_all(rest.as_bytes()).unwrap();
    drop(f);
    assert!(
        eventually(PICKED_UP, || s.served(&rt) == new),
        "the completed certificate was not picked up:\n{}",
        read(&s.log)
    );
    assert_eq!(reloads(&s.lb), (1.0, 1.0));
    assert_eq!(status(s.lb.admin)["last_reload"]["result"], "ok");
    assert!(s.answers(&rt));
}

#[test]
fn a_certificate_that_does_not_match_its_key_is_refused_and_the_old_one_serves() {
    let rt = runtime();
    let s = simple(&rt, "");
    let old = fingerprint(&s.leaf);
    let next = s.root.join("next");
    std::fs::create_dir(&next).unwrap();
    let other = s.pki.ca.server(&next, "other", &[HOST]);
    std::fs::write(s.root.join("front.pem"), &other.cert_pem).unwrap();
    assert!(
        eventually(PICKED_UP, || reloads(&s.lb).1 == 1.0),
        "a certificate without its key was not refused:\n{}",
        read(&s.log)
    );
    let log = read(&s.log);
    assert!(
        log.lines().any(|l| l.contains("certificate reload refused")
            && l.contains("does not match")
            && l.contains("front.pem")),
        "no log line names the file and the mismatch:\n{log}"
    );
    assert_eq!(
        s.lb.metric("fleetgate_config_reloads_total{result=\"error\"}"),
        1.0
    );
    assert_eq!(s.served(&rt), old);
    assert!(s.answers(&rt));

    // Its key arrives: the next change is tried again, and applies.
    std::fs::write(s.root.join("front.key"), &other.key_pem).unwrap();
    assert!(
        eventually(PICKED_UP, || s.served(&rt) == fingerprint(&other)),
        "{}",
        read(&s.log)
    );
    assert_eq!(reloads(&s.lb), (1.0, 1.0));
}

#[test]
fn with_watch_off_a_changed_certificate_waits_for_sighup() {
    let rt = runtime();
    let s = simple(&rt, ", watch = false");
    let old = fingerprint(&s.leaf);
    let next = s.root.join("next");
    std::fs::create_dir(&next).unwrap();
    let new = s.pki.ca.server(&next, "new", &[HOST]);
    std::fs::write(s.root.join("front.key"), &new.key_pem).unwrap();
    std::fs::write(s.root.join("front.pem"), &new.cert_pem).unwrap();
    // Several polls of the watch: nothing happens.
    for _ in 0..4 {
        thread::sleep(Duration::from_secs(1));
        assert_eq!(s.served(&rt), old, "watch = false, yet the file was read");
    }
    assert_eq!(reloads(&s.lb), (0.0, 0.0));

    s.lb.signal("HUP");
    assert!(
        eventually(PICKED_UP, || reloads(&s.lb).0 == 1.0),
        "{}",
        read(&s.log)
    );
    assert_eq!(s.served(&rt), fingerprint(&new));
    assert!(s.answers(&rt));
}

#[test]
fn a_pool_ca_is_watched_too() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let pki = Pki::new(&root);
    let rt = runtime();
    let backend = IdBackend::start(&rt, "a", &pki);
    pki.ca.server(&root, "front", &[HOST]);
    // At first the pool trusts another CA: the backend is refused.
    let wrong = Ca::new(&root, "wrong");
    std::fs::write(root.join("pool-ca.pem"), wrong.cert.pem()).unwrap();
    let front = free_addr();
    let config = offload_config(front, &backend, "", "")
        .replace("pool = \"a\"", "pool = \"a-tls\"")
        + &format!(
            "[[pool]]\nname = \"a-tls\"\nbackends = [{{ address = \"{}\" }}]\n\
             tls = {{ ca = \"pool-ca.pem\", server_name = \"{HOST}\" }}\n",
            backend.tls_addr
        );
    let (lb, log) = start_logged(dir, &config);
    let ask = || rt.block_on(get_once(front, pki.client()));
    assert!(
        ask().is_err(),
        "served through a backend of an untrusted CA"
    );

    std::fs::write(root.join("pool-ca.pem"), pki.ca.cert.pem()).unwrap();
    assert!(
        eventually(PICKED_UP, || ask().as_deref() == Ok("a")),
        "the pool CA was not re-read: {:?}\n{}",
        ask(),
        read(&log)
    );
    assert_eq!(reloads(&lb), (1.0, 0.0));
}

#[test]
fn cert_renew_changes_the_auto_certificate_of_a_running_process() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let pki = Pki::new(&root);
    let rt = runtime();
    let backend = IdBackend::start(&rt, "a", &pki);
    let front = free_addr();
    let config = offload_config(front, &backend, "", "")
        .replace(
            "cert = \"front.pem\", key = \"front.key\"",
            "cert = \"auto\", auto_names = [\"device.example\"]",
        )
        .replace("[admin]", "[global]\ndata_dir = \"data\"\n\n[admin]");
    let (lb, log) = start_logged(dir, &config);
    // The certificate is self-signed: look at it, do not judge it.
    let any = || {
        let mut c = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(fleetgate::tls::accept_any::AcceptAnyServerCert::new(
                provider(),
            ))
            .with_no_client_auth();
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(c)
    };
    let old = served_fingerprint(&rt, front, any());
    let written = read(&root.join("data/server.pem"));

    let renew = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_fleetgate"))
            .args(["cert", "renew", "-c"])
            .arg(&lb.config)
            .args(args)
            .output()
            .unwrap()
    };
    let refused = renew(&["--listener", "nope"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("nope"),
        "{refused:?}"
    );
    assert_eq!(read(&root.join("data/server.pem")), written);

    let out = renew(&["--listener", "web"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    let new = stdout
        .lines()
        .find_map(|l| l.strip_prefix("sha256 "))
        .unwrap_or_else(|| panic!("no fingerprint printed: {stdout}"))
        .to_string();
    assert_ne!(new, old);
    assert!(
        eventually(PICKED_UP, || served_fingerprint(&rt, front, any()) == new),
        "{}",
        read(&log)
    );
    assert_eq!(reloads(&lb), (1.0, 0.0), "{}", read(&log));
    assert!(rt
        .block_on(get_once(front, any()))
        .is_ok_and(|id| id == "a"));
}
