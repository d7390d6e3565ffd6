//! Processes the harness owns and what /proc says about them.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A long-running child (server or proxy) that is killed and reaped when
/// dropped, so nothing the harness started outlives it, even on a panic.
pub struct Guard {
    name: String,
    log: PathBuf,
    child: Child,
}

impl Guard {
    /// Starts `cmd` with stdout and stderr going to `log`, so a process that
    /// dies on a bad config leaves something to show.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Guard> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Guard {
            name: name.to_string(),
            log: log.to_path_buf(),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Errors out (with the tail of its log) if the process has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => bail!(
                "{} exited ({status}); last output:\n{}",
                self.name,
                log_tail(&self.log)
            ),
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // SIGKILL: a graceful drain would only slow the teardown down.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Runs a bounded client (wrk, iperf3) and kills it if it overruns
/// `limit`, so a wedged proxy cannot hang the whole benchmark.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    // Drain the pipes on threads: a chatty child must not block on a full
    // pipe while we poll for its exit.
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {limit:?}; killed");
        }
        thread::sleep(Duration::from_millis(50));
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut buf);
        }
        buf
    })
}

/// Output of a short command such as `nginx -v`, stdout and stderr joined
/// (several tools print their version on stderr).
pub fn command_text(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(out) => {
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            text.trim().to_string()
        }
        Err(e) => format!("({program}: {e})"),
    }
}

/// A free port from below the kernel's ephemeral range (32768 and up), so
/// the load generators' own outgoing connections, which take ephemeral
/// ports by the thousand, cannot grab it before the server under test binds
/// it. The walk starts from a pid-derived offset so concurrent runs differ.
pub fn free_port() -> Result<u16> {
    const FIRST: u32 = 10_000;
    const SPAN: u32 = 22_000;
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7_919) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = (FIRST + (start + n) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port between {FIRST} and {}", FIRST + SPAN - 1)
}

/// Waits until something LISTENs on 127.0.0.1:`port`, read from
/// /proc/net/tcp rather than by connecting, because a bare connect counts
/// as a (failed) test for iperf3's server.
pub fn wait_listening(guard: &mut Guard, port: u16, limit: Duration) -> Result<()> {
    let want = format!("0100007F:{port:04X}");
    let deadline = Instant::now() + limit;
    loop {
        guard.ensure_running()?;
        let table = fs::read_to_string("/proc/net/tcp")?;
        let listening = table.lines().skip(1).any(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            cols.len() > 3 && cols[1] == want && cols[3] == "0A"
        });
        if listening {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listening on 127.0.0.1:{port} after {limit:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until one HTTP request through `port` gets a 200: the proxy is
/// up *and* reaches the origin, not merely bound.
pub fn wait_http_ok(guard: &mut Guard, port: u16, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        guard.ensure_running()?;
        let last_error = match http_get_status(port) {
            Ok(line) if line.contains(" 200 ") => return Ok(()),
            Ok(line) => format!("unexpected response: {line}"),
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            bail!("127.0.0.1:{port} not serving after {limit:?}: {last_error}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

fn http_get_status(port: u16) -> Result<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    // HTTP/1.0: the origin closes after the response, which ends the read.
    // No half-close from our side: nginx stream (without proxy_half_close)
    // would tear the whole session down on our FIN before the reply.
    stream.write_all(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response.lines().next().unwrap_or("").to_string())
}

/// Clock ticks per second for /proc/PID/stat times (USER_HZ).
pub fn clock_ticks_per_sec() -> Result<f64> {
    let text = command_text("getconf", &["CLK_TCK"]);
    text.parse()
        .with_context(|| format!("getconf CLK_TCK printed {text:?}"))
}

/// utime + stime of `pid` in clock ticks; all threads of the process are
/// included, which matters for fleetgate's multi-threaded runtime.
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    // utime and stime are fields 14 and 15 of /proc/PID/stat.
    stat_fields_sum(&format!("/proc/{pid}/stat"), 14, 15)
}

/// Run time of every live thread of `pid` in nanoseconds: the first field
/// of each /proc/PID/task/TID/schedstat, the scheduler's exact accounting,
/// where utime + stime advance in whole clock ticks (10 ms at USER_HZ 100)
/// and cannot resolve a cost of a fraction of a millisecond. Threads that
/// exited are no longer listed, so compare readings only across windows in
/// which the process keeps its threads.
pub fn sched_run_ns(pid: u32) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = entry?.path().join("schedstat");
        // A thread may exit between the listing and the read.
        let Ok(text) = fs::read_to_string(&path) else {
            continue;
        };
        let first = text
            .split_whitespace()
            .next()
            .with_context(|| format!("empty {}", path.display()))?;
        total += first.parse::<u64>()?;
    }
    Ok(total)
}

/// cutime + cstime of this process: CPU time of children already reaped.
/// Read around a wrk/iperf3 run, it gives the load generator's CPU time.
pub fn reaped_children_ticks() -> Result<u64> {
    stat_fields_sum("/proc/self/stat", 16, 17)
}

/// Sum of two numeric fields (1-based, as in proc(5)) of a /proc stat file.
fn stat_fields_sum(path: &str, a: usize, b: usize) -> Result<u64> {
    let stat = fs::read_to_string(path)?;
    // The command name (field 2) may contain spaces and parentheses; the
    // fields after its last ')' are plain numbers, starting with field 3.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("malformed {path}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Result<u64> {
        let text = fields
            .get(n - 3)
            .with_context(|| format!("{path}: no field {n}"))?;
        Ok(text.parse()?)
    };
    Ok(field(a)? + field(b)?)
}

/// Busy clock ticks of the whole machine, all CPUs, from the first line of
/// /proc/stat, to see how much else was running. Interrupt and softirq time
/// is left out: much of it is our own loopback traffic, which the kernel
/// charges to no process. Steal (the hypervisor running someone else) is in.
pub fn machine_busy_ticks() -> Result<u64> {
    Ok(machine_ticks()?.busy_without_irq)
}

/// Busy clock ticks of the whole machine (all CPUs), two ways.
#[derive(Clone, Copy, Debug)]
pub struct MachineTicks {
    /// user + nice + system + steal: what can be charged to processes.
    pub busy_without_irq: u64,
    /// The same plus irq + softirq: everything the machine did, including
    /// the loopback TCP work (softirq) a proxy causes but is not charged
    /// for when it lands on another process's time slice or an idle CPU.
    pub busy: u64,
}

/// Reads the first (all CPUs) line of /proc/stat.
pub fn machine_ticks() -> Result<MachineTicks> {
    let stat = fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice];
    // guest time is already counted in user.
    const USER: usize = 0;
    const NICE: usize = 1;
    const SYSTEM: usize = 2;
    const IRQ: usize = 5;
    const SOFTIRQ: usize = 6;
    const STEAL: usize = 7;
    let sum = |fields: &[usize]| -> Result<u64> {
        fields
            .iter()
            .map(|&i| values.get(i).copied().context("short /proc/stat cpu line"))
            .sum()
    };
    let busy_without_irq = sum(&[USER, NICE, SYSTEM, STEAL])?;
    Ok(MachineTicks {
        busy_without_irq,
        busy: busy_without_irq + sum(&[IRQ, SOFTIRQ])?,
    })
}

/// Descriptors `pid` has open (entries of /proc/PID/fd).
pub fn open_fds(pid: u32) -> Result<usize> {
    Ok(fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// Resident set size of `pid` in KiB (VmRSS).
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS line")?;
    let kib = line
        .split_whitespace()
        .nth(1)
        .context("malformed VmRSS line")?;
    Ok(kib.parse()?)
}

/// utime + stime of the calling thread in clock ticks: the CPU time of an
/// in-process load client running on a current-thread runtime.
pub fn thread_cpu_ticks() -> Result<u64> {
    stat_fields_sum("/proc/thread-self/stat", 14, 15)
}

/// Raises this process's soft limit on open files to its hard limit and
/// returns the new soft limit. Children started afterwards inherit it, so
/// the proxies and servers get it too.
pub fn raise_fd_limit() -> Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            bail!("setrlimit: {}", std::io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}
