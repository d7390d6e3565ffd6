//! The PostgreSQL the tests of the shared store run against:
//! `FLEETGATE_TEST_PG_URL` when it is set (a database the tests may empty),
//! otherwise a throw-away server of their own, started once per test
//! process from the installed PostgreSQL binaries (`initdb` and `postgres`
//! in a temporary directory, on a free loopback port) and stopped, its
//! directory removed, when the test process exits. Without PostgreSQL
//! installed the tests fail and say how to get it, rather than skip.
//!
//! Shared by the integration tests and the library's own store tests
//! (included there with `#[path]`), so it uses std and tempfile only.

use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The database URL; panics with the reason when there is none.
pub fn url() -> String {
    static URL: OnceLock<Result<String, String>> = OnceLock::new();
    let got = URL.get_or_init(|| match std::env::var("FLEETGATE_TEST_PG_URL") {
        Ok(u) if !u.is_empty() => Ok(u),
        _ => start(),
    });
    match got {
        Ok(u) => u.clone(),
        Err(e) => panic!("{e}"),
    }
}

/// The directory holding `initdb`, `postgres`, `pg_isready` and
/// `createdb`: `PATH` first, then Debian's versioned directories (newest
/// first).
fn bin_dir() -> Result<PathBuf, String> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    // Links to one version's binaries (as in /usr/local/bin) lead to the
    // directory that holds all of them.
    let found = on_path
        .iter()
        .filter_map(|d| std::fs::canonicalize(d.join("initdb")).ok())
        .find_map(|f| f.parent().map(Path::to_path_buf));
    if let Some(d) = found.filter(|d| d.join("pg_isready").is_file()) {
        return Ok(d);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, d)| d).ok_or_else(|| {
        "PostgreSQL is not installed: the shared-store tests need `initdb` and `postgres` \
         (Debian: apt-get install postgresql), or FLEETGATE_TEST_PG_URL set to a database \
         they may empty"
            .to_string()
    })
}

/// PostgreSQL refuses to run as root: a root test process runs it as the
/// `postgres` user that the Debian package creates.
fn as_server_user(program: &Path, root: bool) -> Command {
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(mut c: Command, what: &str) -> Result<(), String> {
    let out = c
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("throw-away PostgreSQL: {what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "throw-away PostgreSQL: {what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn start() -> Result<String, String> {
    let bin = bin_dir()?;
    let root = std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false);
    let dir = tempfile::Builder::new()
        .prefix("fleetgate-test-pg-")
        .tempdir()
        .map_err(|e| format!("throw-away PostgreSQL: temporary directory: {e}"))?
        .keep();
    if root {
        let mut c = Command::new("chown");
        c.args(["postgres:postgres"]).arg(&dir);
        run(c, "chown to the postgres user")?;
    }
    let data = dir.join("data");
    let mut initdb = as_server_user(&bin.join("initdb"), root);
    initdb.arg("-D").arg(&data).args([
        "-U",
        "fleetgate",
        "--auth=trust",
        "-E",
        "UTF8",
        "--no-sync",
    ]);
    run(initdb, "initdb")?;

    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("throw-away PostgreSQL: free port: {e}"))?
        .port();
    // A watcher shell owns the server: it stops it (fast shutdown) and
    // removes its directory as soon as this test process is gone, however
    // the process ends.
    let postgres = as_server_user(&bin.join("postgres"), root);
    let server = format!(
        "{} -D {} -p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
        shell_words(&postgres),
        data.display(),
        dir.display(),
    );
    let script = format!(
        r#"{server} >{log} 2>&1 &
while kill -0 "$1" 2>/dev/null; do sleep 0.5; done
pid=$(head -n1 {data}/postmaster.pid 2>/dev/null) && kill -INT "$pid" 2>/dev/null
for _ in $(seq 1 100); do [ -e {data}/postmaster.pid ] || break; sleep 0.1; done
rm -rf {dir}"#,
        log = dir.join("server.log").display(),
        data = data.display(),
        dir = dir.display(),
    );
    Command::new("sh")
        .args(["-c", &script, "pg-watcher"])
        .arg(std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("throw-away PostgreSQL: start: {e}"))?;

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let probe = Command::new(bin.join("pg_isready"))
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .output();
        if probe.as_ref().is_ok_and(|o| o.status.success()) {
            break;
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
            return Err(format!(
                "throw-away PostgreSQL did not start on port {port} ({probe:?}):\n{log}"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut createdb = Command::new(bin.join("createdb"));
    createdb.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-U",
        "fleetgate",
        "fleetgate_test",
    ]);
    run(createdb, "createdb")?;
    eprintln!(
        "throw-away PostgreSQL on 127.0.0.1:{port} ({})",
        dir.display()
    );
    Ok(format!(
        "postgres://fleetgate@127.0.0.1:{port}/fleetgate_test"
    ))
}

/// A command line for the watcher shell (the paths here have no quotes).
fn shell_words(c: &Command) -> String {
    std::iter::once(c.get_program())
        .chain(c.get_args())
        .map(|a| format!("'{}'", a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}
