//! The new process's side: take the sockets over, ask for the stores,
//! say when it is ready, or why it cannot start.

use std::net::SocketAddr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};

use super::fdpass::Conn;
use super::protocol::{Answer, Request, Sockets, ENV};
use crate::runtime::Inherited;

/// How long the old process may take for a step (releasing the stores
/// waits for the work in flight).
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// A process started by `fleetgate upgrade`, taking over from the one
/// that started it.
pub struct Takeover {
    path: PathBuf,
    conn: Option<Conn>,
    done: bool,
}

/// What the old process handed over.
#[derive(Default)]
pub struct Received {
    pub listeners: Inherited,
    pub admin: Option<(SocketAddr, std::net::TcpListener)>,
    pub control: Option<(PathBuf, UnixListener)>,
}

impl Received {
    /// The admin socket, if it is for `addr` (else it is closed).
    pub fn admin_for(&mut self, addr: SocketAddr) -> Option<std::net::TcpListener> {
        self.admin
            .take()
            .filter(|(a, _)| *a == addr)
            .map(|(_, l)| l)
    }

    /// The control socket, if it is bound at `path`.
    pub fn control_for(&mut self, path: &std::path::Path) -> Option<UnixListener> {
        self.control
            .take()
            .filter(|(p, _)| p == path)
            .map(|(_, l)| l)
    }
}

impl Takeover {
    /// `Some` when this process was started by an upgrade.
    pub fn from_env() -> Option<Takeover> {
        std::env::var_os(ENV).map(|path| Takeover {
            path: path.into(),
            conn: None,
            done: false,
        })
    }

    fn connect(&self) -> anyhow::Result<Conn> {
        let stream = UnixStream::connect(&self.path)
            .with_context(|| format!("upgrade: cannot reach {}", self.path.display()))?;
        let conn = Conn::new(stream);
        conn.set_timeout(Some(STEP_TIMEOUT))?;
        Ok(conn)
    }

    fn ask(&mut self, request: &Request) -> anyhow::Result<(Answer, Vec<std::os::fd::OwnedFd>)> {
        let conn = self.conn.as_mut().context("upgrade: not connected")?;
        conn.send(request)?;
        let (answer, fds) = conn.recv::<Answer>()?;
        if let Answer::Failed { error } = answer {
            bail!("the running process refused: {error}");
        }
        Ok((answer, fds))
    }

    /// Step 1: the listening sockets, by address.
    pub fn receive_sockets(&mut self) -> anyhow::Result<Received> {
        self.conn = Some(self.connect()?);
        let (welcome, _) = self.ask(&Request::Takeover)?;
        if !matches!(welcome, Answer::Welcome) {
            bail!("upgrade: unexpected answer {welcome:?}");
        }
        let mut got = Received::default();
        for index in 0.. {
            let (answer, fds) = self.ask(&Request::Socket { index })?;
            let Answer::Sockets(what) = answer else {
                bail!("upgrade: unexpected answer {answer:?}");
            };
            match what {
                Sockets::Done => break,
                Sockets::Listener { bind } => got
                    .listeners
                    .entry(bind)
                    .or_default()
                    .extend(fds.into_iter().map(std::net::TcpListener::from)),
                Sockets::Admin { bind } => {
                    got.admin = fds
                        .into_iter()
                        .next()
                        .map(|fd| (bind, std::net::TcpListener::from(fd)))
                }
                Sockets::Control { path } => {
                    got.control = fds
                        .into_iter()
                        .next()
                        .map(|fd| (path, UnixListener::from(fd)))
                }
            }
        }
        let sockets: usize = got.listeners.values().map(Vec::len).sum();
        tracing::info!(
            addresses = got.listeners.len(),
            sockets,
            "upgrade: listening sockets taken over"
        );
        Ok(got)
    }

    /// Step 2: the old process stops accepting and releases its stores.
    pub fn release(&mut self) -> anyhow::Result<()> {
        match self.ask(&Request::Release)? {
            (Answer::Released, _) => {
                tracing::info!("upgrade: the old process released its stores");
                Ok(())
            }
            (other, _) => bail!("upgrade: unexpected answer {other:?}"),
        }
    }

    /// Step 3: serving; the old process drains and exits.
    pub fn ready(&mut self) -> anyhow::Result<()> {
        let pid = std::process::id();
        let answer = self.ask(&Request::Ready { pid })?;
        self.done = true;
        self.conn = None;
        match answer {
            (Answer::Farewell, _) => Ok(()),
            (other, _) => bail!("upgrade: unexpected answer {other:?}"),
        }
    }

    /// This process cannot start: tell the old one why (it goes on
    /// serving, and `fleetgate upgrade` prints the reason).
    pub fn failed(&mut self, error: &anyhow::Error) {
        if self.done {
            return;
        }
        let conn = match self.conn.take() {
            Some(c) => Some(c),
            None => self.connect().ok(),
        };
        if let Some(mut conn) = conn {
            let _ = conn.send(&Request::Failed {
                error: format!("{error:#}"),
            });
            // Wait for the answer, so that the old process has read the
            // reason before this one exits.
            let _ = conn.recv::<Answer>();
        }
    }
}
