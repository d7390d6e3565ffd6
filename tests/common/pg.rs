//! The PostgreSQL the tests of the shared store run against:
//! `FLEETGATE_TEST_PG_URL` when it is set (a database the tests may empty),
//! otherwise a throw-away server of their own, started once per test
//! process from the installed PostgreSQL binaries (`initdb` and `postgres`
//! in a temporary directory, on a free loopback port) and stopped, its
//! directory removed, when the test process exits. Without PostgreSQL
//! installed the tests fail and say how to get it, rather than skip.
//!
//! Tests that stop the database under load start a `PgServer` of their
//! own instead, which they can stop and start again.
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

/// A throw-away server: its directory, port and the binaries that run it.
struct Instance {
    bin: PathBuf,
    root: bool,
    dir: PathBuf,
    data: PathBuf,
    port: u16,
}

impl Instance {
    /// A fresh cluster (`initdb`) in a temporary directory, on a free
    /// loopback port, not running yet.
    fn create() -> Result<Instance, String> {
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
        Ok(Instance {
            bin,
            root,
            dir,
            data,
            port,
        })
    }

    /// A watcher shell that stops the server (fast shutdown, whichever
    /// process runs it by then: it reads `postmaster.pid`) and removes its
    /// directory as soon as this test process is gone, however it ends.
    fn watch(&self) -> Result<std::process::Child, String> {
        let script = format!(
            r#"while kill -0 "$1" 2>/dev/null; do sleep 0.5; done
pid=$(head -n1 {data}/postmaster.pid 2>/dev/null) && kill -INT "$pid" 2>/dev/null
for _ in $(seq 1 100); do [ -e {data}/postmaster.pid ] || break; sleep 0.1; done
rm -rf {dir}"#,
            data = self.data.display(),
            dir = self.dir.display(),
        );
        Command::new("sh")
            .args(["-c", &script, "pg-watcher"])
            .arg(std::process::id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("throw-away PostgreSQL: watcher: {e}"))
    }

    /// Run the server in the background (not a child of this process: a
    /// shell starts it and exits) and wait until it accepts connections.
    fn launch(&self) -> Result<(), String> {
        let postgres = as_server_user(&self.bin.join("postgres"), self.root);
        let server = format!(
            "{} -D {} -p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
            shell_words(&postgres),
            self.data.display(),
            self.port,
            self.dir.display(),
        );
        let log = self.dir.join("server.log");
        let script = format!("{server} >>{} 2>&1 &", log.display());
        run(
            {
                let mut c = Command::new("sh");
                c.args(["-c", &script]);
                c
            },
            "start",
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let probe = Command::new(self.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .output();
            if probe.as_ref().is_ok_and(|o| o.status.success()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(format!(
                    "throw-away PostgreSQL did not start on port {} ({probe:?}):\n{log}",
                    self.port
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Fast shutdown (SIGINT: sessions are ended, the server exits at
    /// once), waiting until it is gone.
    fn halt(&self) -> Result<(), String> {
        let pid_file = self.data.join("postmaster.pid");
        let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|t| t.lines().next().map(str::to_string))
        else {
            return Ok(());
        };
        let mut kill = Command::new("kill");
        kill.args(["-INT", &pid]);
        run(kill, "fast shutdown")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while pid_file.exists() {
            if Instant::now() > deadline {
                return Err(format!(
                    "throw-away PostgreSQL on port {} did not stop",
                    self.port
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn createdb(&self) -> Result<(), String> {
        let mut createdb = Command::new(self.bin.join("createdb"));
        createdb.args([
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "fleetgate",
            "fleetgate_test",
        ]);
        run(createdb, "createdb")?;
        eprintln!(
            "throw-away PostgreSQL on 127.0.0.1:{} ({})",
            self.port,
            self.dir.display()
        );
        Ok(())
    }

    fn url(&self) -> String {
        format!(
            "postgres://fleetgate@127.0.0.1:{}/fleetgate_test",
            self.port
        )
    }
}

/// The shared server of this test process: it runs until the process
/// exits (the watcher then stops it and removes its directory).
fn start() -> Result<String, String> {
    let pg = Instance::create()?;
    pg.watch()?;
    pg.launch()?;
    pg.createdb()?;
    Ok(pg.url())
}

/// A server of one test's own, which the test may stop and start again
/// (same port, same data) to see what its clients do meanwhile. Stopped
/// and removed on drop, or by its watcher when the test process ends
/// without dropping it.
#[allow(dead_code)] // Only the integration tests use it.
pub struct PgServer {
    pg: Instance,
    watcher: std::process::Child,
}

#[allow(dead_code)]
impl PgServer {
    /// A new server, running, with an empty database at `url()`. Panics
    /// with the reason when it cannot start.
    pub fn start() -> PgServer {
        let pg = Instance::create().unwrap_or_else(|e| panic!("{e}"));
        let watcher = pg.watch().unwrap_or_else(|e| panic!("{e}"));
        let server = PgServer { pg, watcher };
        server.pg.launch().unwrap_or_else(|e| panic!("{e}"));
        server.pg.createdb().unwrap_or_else(|e| panic!("{e}"));
        server
    }

    pub fn url(&self) -> String {
        self.pg.url()
    }

    pub fn port(&self) -> u16 {
        self.pg.port
    }

    /// Fast shutdown: open sessions are ended, new connections refused
    /// until `resume`.
    pub fn stop(&self) {
        self.pg.halt().unwrap_or_else(|e| panic!("{e}"));
    }

    /// Start again after `stop`, on the same port and data.
    pub fn resume(&self) {
        self.pg.launch().unwrap_or_else(|e| panic!("{e}"));
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Err(e) = self.pg.halt() {
            eprintln!("{e}");
        }
        let _ = std::fs::remove_dir_all(&self.pg.dir);
        let _ = self.watcher.kill();
        let _ = self.watcher.wait();
    }
}

/// A command line for the watcher shell (the paths here have no quotes).
fn shell_words(c: &Command) -> String {
    std::iter::once(c.get_program())
        .chain(c.get_args())
        .map(|a| format!("'{}'", a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}
