//! The shipped default configuration in an empty directory, through the
//! real binary: `check` writes nothing and names what a first start will
//! create; `run` creates exactly that, with the usual names and modes, and
//! serves with those very files; a reload reads them back and keeps the
//! devices module's revocation list, so a device revoked after the reload
//! is refused at the handshake.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_addr, http_get, metric_value};
#[path = "../src/cli/simulate/mod.rs"]
#[allow(dead_code)]
mod simulate;
use simulate::{Admin, Target, Trust};

const TIMEOUT: Duration = Duration::from_secs(20);

/// The files under `dir` (relative paths, sorted) with their modes.
fn tree(dir: &Path) -> BTreeMap<PathBuf, u32> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, u32>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::metadata(&path).unwrap();
            out.insert(
                path.strip_prefix(root).unwrap().to_path_buf(),
                meta.permissions().mode() & 0o777,
            );
            if meta.is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn check(config: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
        .args(["check", "-c"])
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Kills `fleetgate run` when the test ends, passed or not.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn metrics(admin: std::net::SocketAddr) -> String {
    let resp = http_get(admin, "/metrics").unwrap();
    resp.split_once("\r\n\r\n").unwrap().1.to_string()
}

#[test]
fn the_first_start_creates_what_check_named_once_and_reloads_read_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir(root.join("conf")).unwrap();
    let config = root.join("conf/fleetgate.toml");
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/fleetgate.toml"))
            .unwrap();
    // Only the addresses change, so that tests can run side by side; the
    // data directory stays `../data`, here `root/data`.
    let (front, admin) = (free_addr(), free_addr());
    assert!(shipped.contains("\"0.0.0.0:8443\"") && shipped.contains("\"127.0.0.1:9900\""));
    let text = shipped
        .replace("\"0.0.0.0:8443\"", &format!("\"{front}\""))
        .replace("\"127.0.0.1:9900\"", &format!("\"{admin}\""));
    std::fs::write(&config, text).unwrap();

    // check: nothing written, everything named.
    let (code, stdout, stderr) = check(&config);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.starts_with("ok\nwill create on first start:\n"),
        "{stdout}"
    );
    let data = root.join("conf/../data");
    for file in [
        "server.pem",
        "server.key",
        "devices/device-ca.pem",
        "devices/device-ca.key",
    ] {
        let path = data.join(file).display().to_string();
        assert!(stdout.contains(&path), "{path} not named in {stdout}");
    }
    assert_eq!(
        tree(root).into_keys().collect::<Vec<_>>(),
        [PathBuf::from("conf"), PathBuf::from("conf/fleetgate.toml")]
    );

    // run: creates them, with the modes they always had.
    let mut child = Running(
        Command::new(env!("CARGO_BIN_EXE_fleetgate"))
            .args(["run", "-c"])
            .arg(&config)
            .env(
                "RUST_LOG",
                std::env::var("FLEETGATE_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + TIMEOUT;
    while !http_get(admin, "/healthz").is_ok_and(|r| r.starts_with("HTTP/1.1 200")) {
        assert!(Instant::now() < deadline, "fleetgate did not start");
        assert!(child.0.try_wait().unwrap().is_none(), "fleetgate exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    let modes = tree(&root.join("data"));
    let mode = |p: &str| modes.get(Path::new(p)).copied();
    assert_eq!(mode("server.key"), Some(0o600), "{modes:?}");
    assert_eq!(mode("server.pem").map(|m| m & 0o600), Some(0o600));
    assert_eq!(mode("server.pem").map(|m| m & 0o022), Some(0));
    assert_eq!(mode("devices"), Some(0o700), "{modes:?}");
    assert_eq!(mode("devices/device-ca.key"), Some(0o600));
    assert_eq!(mode("devices/device-ca.pem"), Some(0o644));
    let read = |p: &str| std::fs::read(root.join("data").join(p)).unwrap();
    let created: Vec<Vec<u8>> = ["server.pem", "server.key", "devices/device-ca.pem"]
        .iter()
        .map(|p| read(p))
        .collect();
    let (code, stdout, stderr) = check(&config);
    assert_eq!((code, stdout.as_str()), (0, "ok\n"), "{stderr}");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let token = String::from_utf8(read("devices/admin-token")).unwrap();
    let admin_api = Admin {
        addr: admin,
        token: token.trim().to_string(),
        module: "devices".into(),
        timeout: TIMEOUT,
    };
    // Trusting only the file proves the listener serves the key written.
    let target = Target::new(
        front,
        "localhost",
        Trust::from_pem_file(&root.join("data/server.pem")).unwrap(),
        TIMEOUT,
    )
    .unwrap();
    let target = Arc::new(target);
    let device = rt.block_on(async {
        let tokens = admin_api.enrolment_tokens(1, "first-start").await.unwrap();
        let device = target.enrol(&tokens[0], "first").await.unwrap();
        // The module signed with the CA on disk; the listener verifies with
        // the one validation made: they are the same CA.
        let mut conn = target.connect(&device.config).await.unwrap();
        let r = conn
            .request("POST", "/api/v1/heartbeat", None)
            .await
            .unwrap();
        r.expect(200).unwrap();
        device
    });

    // A reload reads the same files and keeps the module's revocations.
    let ok = "fleetgate_config_reloads_total{result=\"ok\"}";
    let before = metric_value(&metrics(admin), ok);
    let status = Command::new("kill")
        .args(["-HUP", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + TIMEOUT;
    while metric_value(&metrics(admin), ok) < before + 1.0 {
        assert!(Instant::now() < deadline, "the reload did not happen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let again: Vec<Vec<u8>> = ["server.pem", "server.key", "devices/device-ca.pem"]
        .iter()
        .map(|p| read(p))
        .collect();
    assert!(again == created, "a reload rewrote the created files");
    rt.block_on(async {
        admin_api
            .expect(
                200,
                "POST",
                &format!("devices/{}/revoke", device.device_id),
                None,
            )
            .await
            .unwrap();
        // Refused by the listener (no HTTP answer at all), not by the module
        // (which would answer 403): the reloaded listener checks the list
        // the module updates.
        let answer = async {
            let mut conn = target.connect(&device.config).await?;
            conn.request("POST", "/api/v1/heartbeat", None).await
        }
        .await;
        assert!(answer.is_err(), "a revoked device was served: {answer:?}");
        // A device enrolled after the reload calls in as usual.
        let tokens = admin_api.enrolment_tokens(1, "after-reload").await.unwrap();
        let second = target.enrol(&tokens[0], "second").await.unwrap();
        let mut conn = target.connect(&second.config).await.unwrap();
        let r = conn
            .request("POST", "/api/v1/heartbeat", None)
            .await
            .unwrap();
        r.expect(200).unwrap();
    });
}
