//! Network namespaces for tests that need a real network (root only): a
//! private Ethernet segment, a bridge in its own namespace with one veth
//! pair per host namespace, and processes and threads placed in them.
//! Nothing is attached to the host's own namespace, so no packet can leave
//! the machine.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

pub fn run_ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `ip` (install iproute2): {e}"));
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace made by the test; deleted on drop (also on panic).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn add(name: String) -> Netns {
        run_ip(&["netns", "add", &name]);
        let ns = Netns { name };
        run_ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Namespaces named `{prefix}-{pid}-...` left by an earlier run that was
/// killed before its guards ran (the pid is gone).
pub fn remove_stale_namespaces(prefix: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(&format!("{prefix}-")) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if !pid.is_empty() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// The segment: a bridge in its own namespace and one namespace per host,
/// each with an `eth0` on `{subnet}.0/24`. Field order is drop order:
/// hosts go before the bridge.
pub struct Lab {
    hosts: Vec<(Netns, String)>,
    _bridge: Netns,
}

impl Lab {
    /// Namespaces `{prefix}-{pid}-{short}`; `hosts`: (short name, last
    /// octet of its address in `subnet`, e.g. "198.51.100").
    pub fn build(prefix: &str, subnet: &str, hosts: &[(&str, u8)]) -> Lab {
        let run = std::process::id();
        let bridge = Netns::add(format!("{prefix}-{run}-br"));
        let br = bridge.name.clone();
        run_ip(&["-n", &br, "link", "add", "br0", "type", "bridge"]);
        run_ip(&["-n", &br, "link", "set", "br0", "up"]);
        let mut made = Vec::new();
        for &(short, octet) in hosts {
            let ns = Netns::add(format!("{prefix}-{run}-{short}"));
            let port = format!("p-{short}");
            // Both ends are born in the bridge's namespace; one moves to
            // the host and becomes its eth0.
            run_ip(&[
                "-n", &br, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
            ]);
            run_ip(&["-n", &br, "link", "set", "eth0", "netns", &ns.name]);
            run_ip(&["-n", &br, "link", "set", &port, "master", "br0"]);
            run_ip(&["-n", &br, "link", "set", &port, "up"]);
            let cidr = format!("{subnet}.{octet}/24");
            run_ip(&[
                "-n", &ns.name, "addr", "add", &cidr, "brd", "+", "dev", "eth0",
            ]);
            run_ip(&["-n", &ns.name, "link", "set", "eth0", "up"]);
            made.push((ns, format!("{subnet}.{octet}")));
        }
        Lab {
            hosts: made,
            _bridge: bridge,
        }
    }

    pub fn ns(&self, i: usize) -> &str {
        &self.hosts[i].0.name
    }

    pub fn addr(&self, i: usize) -> &str {
        &self.hosts[i].1
    }
}

/// A process started in a namespace (`ip netns exec NS timeout ...
/// LIFETIME ...`), in its own process group; the group is killed on drop
/// and the log is shown if the test failed. `timeout` ends it after
/// `lifetime` seconds even if the test run itself is killed.
pub struct NsProcess {
    pub what: String,
    pub child: Child,
    log: PathBuf,
}

impl NsProcess {
    pub fn spawn(
        ns: &str,
        what: &str,
        dir: &Path,
        lifetime: &str,
        program: &str,
        args: &[&str],
    ) -> NsProcess {
        let log = dir.join(format!("{what}.log"));
        let out = File::create(&log).unwrap();
        let child = Command::new("ip")
            // --foreground: timeout passes a signal to the program once
            // (otherwise it also signals its process group, and a second
            // SIGTERM cuts a drain short).
            .args(["netns", "exec", ns, "timeout", "--foreground", "-k", "5"])
            .arg(lifetime)
            .arg(program)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what} in {ns}: {e}"));
        NsProcess {
            what: what.into(),
            child,
            log,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM to `timeout`, which passes it on to the program.
    pub fn terminate(&self) {
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill -TERM {}", self.what);
    }

    /// SIGKILL to the whole process group (`timeout` and the program), as
    /// a crash or the out-of-memory killer would end it.
    pub fn kill_group(&mut self) {
        // SAFETY: kill(2) on the process group we created for this child.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }

    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for NsProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.kill_group();
        }
        if thread::panicking() {
            eprintln!("--- {} log ---\n{}--- end ---", self.what, self.log());
        }
    }
}

/// Run `f` on a thread that has entered namespace `ns` (a thread's network
/// namespace is its own: the rest of the test is not affected). Sockets
/// made there stay in that namespace.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    let handle = thread::spawn(move || {
        enter(&path);
        f()
    });
    match handle.join() {
        Ok(v) => v,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Move the calling thread into the namespace at `ns_path`
/// (`/var/run/netns/NAME`).
pub fn enter(ns_path: &str) {
    let file = File::open(ns_path).unwrap_or_else(|e| panic!("{ns_path}: {e}"));
    // SAFETY: setns(2) on an open namespace file; affects this thread only.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "setns {ns_path}: {}",
        std::io::Error::last_os_error()
    );
}

/// Poll `cond` every 5 ms for up to `within`; the time it took.
pub fn wait_for(within: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    loop {
        if cond() {
            return Some(t0.elapsed());
        }
        if t0.elapsed() > within {
            return None;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Preconditions of a namespace test; false means skip (not root, outside
/// CI). In CI (`CI` set, as CI services do) a test that cannot run fails.
/// `tools`: (program, an argument it answers quickly, its Debian package),
/// besides `ip` and `timeout`; a missing one fails the test.
pub fn preflight(test: &str, tools: &[(&str, &str, &str)]) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    if !root {
        assert!(
            !ci,
            "CI is set but not root: {test} needs root for network namespaces"
        );
        eprintln!("SKIPPED {test}: needs root to create network namespaces");
        return false;
    }
    let base = [
        ("ip", "-V", "iproute2"),
        ("timeout", "--version", "coreutils"),
    ];
    for &(tool, arg, package) in base.iter().chain(tools) {
        let ok = Command::new(tool)
            .arg(arg)
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            ok,
            "`{tool}` is missing: install {package} (apt-get install {package})"
        );
    }
    true
}
