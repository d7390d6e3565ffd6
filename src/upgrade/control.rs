//! The running process's side: the control socket, starting the new
//! binary, passing the listening sockets, releasing the modules' stores,
//! and resuming if the new process fails before it is ready.

use std::ffi::OsString;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::runtime::Handle;
use tokio::sync::{watch, Notify};

use super::fdpass::{Conn, MAX_FDS};
use super::protocol::{Answer, Request, Sockets, ENV};
use crate::runtime::Runtime;

/// How long the new process may take to connect back (it loads and
/// validates the configuration first), and then to answer each step
/// (starting modules, opening stores, binding new addresses).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

static CONTROL: OnceLock<Arc<Control>> = OnceLock::new();
/// Told once, when the new process is ready: this one drains and exits.
static HANDED_OVER: Notify = Notify::const_new();

pub struct Control {
    rt: Arc<Runtime>,
    /// Duplicates of the admin and control listeners, to pass on.
    admin: (SocketAddr, std::net::TcpListener),
    control: (PathBuf, UnixListener),
    /// The executable as resolved at start: after a package upgrade the
    /// same path names the new file.
    exe: PathBuf,
    args: Vec<OsString>,
    /// The new process under way, and where its connection goes.
    pending: Mutex<Option<Pending>>,
    done: AtomicBool,
    /// False while the control socket's connections are left to the new
    /// process (as the listeners' are).
    accepting: watch::Sender<bool>,
    handle: Handle,
}

struct Pending {
    pid: u32,
    conn: mpsc::Sender<(Conn, Request)>,
}

/// Listen on the control socket (`inherited` from the process this one
/// replaced, or bound at `path`). Call once, from the control plane's
/// runtime.
pub fn start(
    rt: &Arc<Runtime>,
    admin: &tokio::net::TcpListener,
    path: &Path,
    inherited: Option<UnixListener>,
) -> anyhow::Result<()> {
    let listener = match inherited {
        Some(l) => l,
        None if in_use(path) => {
            // Two balancers started from one configuration (say, in two
            // network namespaces on one file system): the second runs,
            // without `fleetgate upgrade`, rather than refuse to start.
            tracing::warn!(
                path = %path.display(),
                "control socket in use by another fleetgate: this process cannot be upgraded (set global.control_socket to a path of its own)"
            );
            return Ok(());
        }
        None => bind(path)?,
    };
    let admin_dup = socket2::SockRef::from(admin)
        .try_clone()
        .context("duplicating the admin socket")?;
    let control = Arc::new(Control {
        rt: rt.clone(),
        admin: (admin.local_addr()?, admin_dup.into()),
        control: (path.to_path_buf(), listener.try_clone()?),
        exe: std::env::current_exe().context("resolving the running executable")?,
        args: std::env::args_os().skip(1).collect(),
        pending: Mutex::new(None),
        done: AtomicBool::new(false),
        accepting: watch::channel(true).0,
        handle: Handle::current(),
    });
    if CONTROL.set(control.clone()).is_err() {
        anyhow::bail!("the control socket is already started");
    }
    listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    tokio::spawn(serve(control, listener));
    Ok(())
}

/// Whether a running process answers on `path`.
fn in_use(path: &Path) -> bool {
    UnixStream::connect(path).is_ok()
}

/// Bind the control socket, mode 0600. A socket file nobody listens on
/// is left from a process that is gone and is replaced.
fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("control socket: cannot bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

async fn serve(control: Arc<Control>, listener: tokio::net::UnixListener) {
    let mut accepting = control.accepting.subscribe();
    loop {
        if !*accepting.borrow_and_update() {
            if accepting.changed().await.is_err() {
                return;
            }
            continue;
        }
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = accepting.changed() => continue,
        };
        let stream = match accepted.and_then(|(s, _)| s.into_std()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("control socket: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let control = control.clone();
        // The conversation is a few blocking steps; the control plane's
        // event loop goes on meanwhile.
        tokio::task::spawn_blocking(move || {
            if let Err(e) = control.conversation(stream) {
                tracing::warn!("control socket: {e}");
            }
        });
    }
}

/// SIGUSR2: upgrade to the executable at the path this process was
/// started from, as `fleetgate upgrade` does; the result is logged.
pub fn requested_by_signal() {
    let Some(control) = CONTROL.get().cloned() else {
        tracing::warn!("SIGUSR2: no control socket, no upgrade");
        return;
    };
    tracing::info!("SIGUSR2: upgrading");
    tokio::task::spawn_blocking(move || {
        let _ = control.upgrade(None);
    });
}

/// Completes when a new process has taken over.
pub async fn handed_over() {
    HANDED_OVER.notified().await
}

impl Control {
    fn conversation(&self, stream: UnixStream) -> io::Result<()> {
        stream.set_nonblocking(false)?;
        let mut conn = Conn::new(stream);
        conn.set_timeout(Some(Duration::from_secs(10)))?;
        let (request, _) = conn.recv::<Request>()?;
        match request {
            Request::Upgrade { binary } => {
                conn.set_timeout(None)?;
                let answer = match self.upgrade(binary) {
                    Ok(pid) => Answer::Upgraded { pid },
                    Err(error) => Answer::Failed { error },
                };
                conn.send(&answer)
            }
            first @ (Request::Takeover | Request::Failed { .. }) => {
                let pid = conn.peer_pid()?;
                let pending = self.pending.lock().unwrap();
                match pending.as_ref() {
                    Some(p) if p.pid == pid => {
                        let _ = p.conn.send((conn, first));
                        Ok(())
                    }
                    _ => {
                        drop(pending);
                        conn.send(&Answer::Failed {
                            error: format!("no upgrade waits for process {pid}"),
                        })
                    }
                }
            }
            other => conn.send(&Answer::Failed {
                error: format!("unexpected request {other:?}"),
            }),
        }
    }

    /// Start `binary` (default: this executable's path) with this
    /// process's arguments and hand over to it. `Ok`: its pid, serving.
    pub fn upgrade(&self, binary: Option<PathBuf>) -> Result<u32, String> {
        let (tx, rx) = mpsc::channel();
        let exe = binary.unwrap_or_else(|| self.exe.clone());
        let mut child = {
            let mut pending = self.pending.lock().unwrap();
            if self.done.load(Ordering::SeqCst) {
                return Err("this process has already handed over".into());
            }
            if pending.is_some() {
                return Err("an upgrade is already under way".into());
            }
            // The new process is this one's child: it stays in the
            // service's cgroup, and systemd is told its pid once ready.
            let child = Command::new(&exe)
                .args(&self.args)
                .env(ENV, &self.control.0)
                .stdin(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
            *pending = Some(Pending {
                pid: child.id(),
                conn: tx,
            });
            child
        };
        let pid = child.id();
        tracing::info!(pid, binary = %exe.display(), "upgrade: new process started");
        let mut released = false;
        let result = self.hand_over(&mut child, &rx, &mut released);
        *self.pending.lock().unwrap() = None;
        match result {
            Ok(mut conn) => {
                self.done.store(true, Ordering::SeqCst);
                // systemd follows the new process from here on (with
                // NotifyAccess=main, only the main pid may say so).
                if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::MainPid(pid)]) {
                    tracing::warn!("systemd notify: {e}");
                }
                if let Err(e) = conn.send(&Answer::Farewell) {
                    tracing::warn!(
                        pid,
                        "upgrade: the new process did not hear the farewell: {e}"
                    );
                }
                tracing::info!(pid, "upgrade: the new process serves; draining this one");
                HANDED_OVER.notify_one();
                Ok(pid)
            }
            Err((error, conn)) => {
                if let Some(mut conn) = conn {
                    let _ = conn.send(&Answer::Failed {
                        error: error.clone(),
                    });
                }
                stop_child(&mut child);
                if released {
                    self.handle.block_on(self.take_back());
                } else {
                    self.rt.resume_accepting();
                    self.accepting.send_replace(true);
                }
                tracing::error!(pid, "upgrade failed, this process goes on serving: {error}");
                Err(error)
            }
        }
    }

    /// The conversation with the new process, up to its `Ready`.
    #[allow(clippy::type_complexity)]
    fn hand_over(
        &self,
        child: &mut Child,
        rx: &mpsc::Receiver<(Conn, Request)>,
        released: &mut bool,
    ) -> Result<Conn, (String, Option<Conn>)> {
        let started = Instant::now();
        let (mut conn, first) = loop {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(x) => break x,
                Err(_) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err((
                            format!("the new process exited ({status}) before it took over; its log says why"),
                            None,
                        ));
                    }
                    if started.elapsed() > STARTUP_TIMEOUT {
                        return Err((
                            format!("the new process did not connect within {STARTUP_TIMEOUT:?}"),
                            None,
                        ));
                    }
                }
            }
        };
        match first {
            Request::Takeover => {}
            Request::Failed { error } => return Err((error, None)),
            other => return Err((format!("unexpected request {other:?}"), None)),
        }
        let fail = |e: String, conn| Err((e, Some(conn)));
        let sockets = match self.sockets() {
            Ok(s) => s,
            Err(e) => return fail(format!("duplicating the sockets: {e}"), conn),
        };
        if let Err(e) = conn
            .send(&Answer::Welcome)
            .and_then(|()| conn.set_timeout(Some(STEP_TIMEOUT)))
        {
            return fail(e.to_string(), conn);
        }
        loop {
            let request = match conn.recv::<Request>() {
                Ok((r, _)) => r,
                Err(e) => return fail(self.why(e, child), conn),
            };
            let sent = match request {
                Request::Socket { index } => match sockets.get(index) {
                    Some((what, fds)) => {
                        let fds: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
                        conn.send_with_fds(&Answer::Sockets(what.clone()), &fds)
                    }
                    None => conn.send(&Answer::Sockets(Sockets::Done)),
                },
                Request::Release => {
                    *released = true;
                    if let Err(e) = self.handle.block_on(self.release()) {
                        return fail(format!("releasing the stores: {e:#}"), conn);
                    }
                    conn.send(&Answer::Released)
                }
                Request::Ready { pid } if *released => {
                    tracing::info!(pid, "upgrade: the new process is ready");
                    return Ok(conn);
                }
                Request::Failed { error } => return fail(error, conn),
                other => return fail(format!("unexpected request {other:?}"), conn),
            };
            if let Err(e) = sent {
                return fail(self.why(e, child), conn);
            }
        }
    }

    /// What went wrong with the new process: its exit if it is gone.
    fn why(&self, e: io::Error, child: &mut Child) -> String {
        std::thread::sleep(Duration::from_millis(100));
        match child.try_wait() {
            Ok(Some(status)) => format!("the new process exited ({status}); its log says why"),
            _ => format!("the new process: {e}"),
        }
    }

    /// Everything passed, by address: duplicates of the sockets.
    fn sockets(&self) -> io::Result<Vec<(Sockets, Vec<OwnedFd>)>> {
        let mut out = Vec::new();
        for (bind, group) in self.rt.listening_sockets() {
            let fds: Vec<OwnedFd> = group.into_iter().map(OwnedFd::from).collect();
            let mut fds = fds.into_iter().peekable();
            while fds.peek().is_some() {
                let chunk: Vec<OwnedFd> = fds.by_ref().take(MAX_FDS).collect();
                out.push((Sockets::Listener { bind }, chunk));
            }
        }
        let (bind, admin) = &self.admin;
        out.push((
            Sockets::Admin { bind: *bind },
            vec![admin.try_clone()?.into()],
        ));
        let (path, control) = &self.control;
        out.push((
            Sockets::Control { path: path.clone() },
            vec![control.try_clone()?.into()],
        ));
        Ok(out)
    }

    /// Stop accepting everywhere, then let the modules release their
    /// stores.
    async fn release(&self) -> anyhow::Result<()> {
        self.rt.pause_accepting().await;
        self.accepting.send_replace(false);
        tracing::info!("upgrade: no longer accepting; connections wait for the new process");
        for (name, module) in &self.rt.modules {
            module
                .handover()
                .await
                .with_context(|| format!("module {name:?}"))?;
        }
        Ok(())
    }

    /// The upgrade failed after `release`: take everything back.
    async fn take_back(&self) {
        for (name, module) in &self.rt.modules {
            if let Err(e) = module.resume().await {
                tracing::error!(module = %name, "upgrade: taking the module's store back failed: {e:#}");
            }
        }
        self.rt.resume_accepting();
        self.accepting.send_replace(true);
        tracing::info!("upgrade: accepting again");
    }
}

/// The new process failed: give it a moment to exit by itself (it
/// reports and exits), then kill it, and reap it either way.
fn stop_child(child: &mut Child) {
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}
