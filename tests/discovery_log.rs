//! What the balancer logs when a discovered node goes: one line per
//! departure, whether the node says goodbye (`leaving`, sent several
//! times because UDP may lose one) or goes silent and expires.

mod common;

use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Duration;

use common::discovery::*;
use common::*;
use fleetgate::discovery::{Announcer, NodeState};

/// `fleetgate run` at log level info with its output in a file, so the
/// test can count lines; killed on drop.
struct LoggingBalancer {
    child: Child,
    log: std::path::PathBuf,
    admin: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl LoggingBalancer {
    fn start(config: &str) -> LoggingBalancer {
        let dir = tempfile::tempdir().unwrap();
        let admin = free_addr();
        let path = write(
            dir.path(),
            "fleetgate.toml",
            &config.replace("{admin}", &admin.to_string()),
        );
        // The log goes to stdout; stderr joins it in the same file.
        let log = dir.path().join("fleetgate.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
            .arg("run")
            .arg("-c")
            .arg(&path)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("spawn fleetgate");
        let b = LoggingBalancer {
            child,
            log,
            admin,
            _dir: dir,
        };
        assert!(
            eventually(Duration::from_secs(20), || http_get(b.admin, "/healthz")
                .is_ok_and(|r| r.starts_with("HTTP/1.1 200"))),
            "fleetgate did not become ready"
        );
        b
    }

    /// Lines of the log that mention `node` and contain `what`.
    fn count(&self, node: &str, what: &str) -> usize {
        let text = std::fs::read_to_string(&self.log).unwrap();
        text.lines()
            .filter(|l| l.contains(what) && l.contains(&format!("node={node}")))
            .count()
    }
}

impl Drop for LoggingBalancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_departure_is_logged_once() {
    let dir = tempfile::tempdir().unwrap();
    let (token_path, token) = generate_token(dir.path());
    let disc = free_udp_addr();
    let interval = Duration::from_millis(200);
    let lb = LoggingBalancer::start(&format!(
        r#"[admin]
bind = "{{admin}}"

[discovery]
bind = "{disc}"
cluster = "{CLUSTER}"
token_file = "{token}"
interval = "200ms"
miss_limit = 2

[[listener]]
name = "front"
bind = "{front}"
pool = "{POOL}"

[[pool]]
name = "{POOL}"
discovery = {{ service = "{SERVICE}" }}
"#,
        token = token_path.display(),
        front = free_addr(),
    ));
    let rt = tokio_rt();
    let _ctx = rt.enter();
    let announce = |node: &str| fleetgate::discovery::AnnouncerOptions {
        cluster: CLUSTER.into(),
        node: node.into(),
        addr: None,
        weight: 100,
        services: vec![fleetgate::discovery::Service {
            name: SERVICE.into(),
            port: 9,
            tls: false,
        }],
        targets: vec![disc],
        interval,
        state: NodeState::Normal,
        token: token.clone(),
    };
    let polite = Announcer::start(announce("polite")).unwrap();
    let silent = Announcer::start(announce("silent")).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || lb.count("polite", "node joined")
            == 1
            && lb.count("silent", "node joined") == 1),
        "the nodes never joined:\n{}",
        std::fs::read_to_string(&lb.log).unwrap()
    );

    // Goodbye: `leave` sends several `leaving` datagrams.
    rt.block_on(polite.leave());
    // Silence: the node expires after miss_limit × interval.
    drop(silent);
    assert!(
        eventually(Duration::from_secs(5), || lb.count("silent", "removed")
            >= 1),
        "the silent node never expired"
    );
    // Time for any late duplicate line to be written.
    thread::sleep(interval * 3);
    let text = std::fs::read_to_string(&lb.log).unwrap();
    assert_eq!(lb.count("polite", "left"), 1, "leaving logged:\n{text}");
    assert_eq!(lb.count("polite", "removed"), 0, "leaving logged:\n{text}");
    assert_eq!(lb.count("silent", "removed"), 1, "expiry logged:\n{text}");
    assert_eq!(lb.count("silent", "left"), 0, "expiry logged:\n{text}");
}
