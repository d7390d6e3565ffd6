//! Whether the devices module can reach its store, for `/healthz` (see
//! `Module::ready`): a balancer whose database is out of reach answers
//! every device with 503, so a health checker in front (keepalived)
//! should move the traffic to one that can.
//!
//! With PostgreSQL a probe runs `SELECT 1` every second, with a short
//! timeout, on a connection of its own: not one of the store's pool, whose
//! connections may all be busy under load (a probe waiting its turn would
//! report a loaded database as lost). A request that failed with a
//! storage error makes the probe look at once instead of at its next
//! tick, so the balancer turns "not ready" within a round trip of the
//! first failure, and ready again within a second of the database's
//! return. SQLite is a file of this process: always reachable.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_postgres::{Client, Config, NoTls};

/// How often the probe looks while nothing fails.
const INTERVAL: Duration = Duration::from_secs(1);
/// Longest a probe (connecting included) may take before the store counts
/// as unreachable: a `SELECT 1` on a healthy server takes a millisecond,
/// even under load.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Fewest time between two probes, however many requests fail: a storm of
/// failures costs a probe every quarter second, not one each.
const MIN_GAP: Duration = Duration::from_millis(250);

/// What `/healthz` says of the module while its store is out of reach.
pub const UNAVAILABLE: &str = "storage unavailable";

struct State {
    reachable: AtomicBool,
    wake: Notify,
}

pub struct Readiness {
    state: Arc<State>,
    probe: Option<tokio::task::JoinHandle<()>>,
}

impl Readiness {
    /// A store that cannot be out of reach (SQLite).
    pub fn always() -> Readiness {
        Readiness {
            state: Arc::new(State {
                reachable: AtomicBool::new(true),
                wake: Notify::new(),
            }),
            probe: None,
        }
    }

    /// Probe the PostgreSQL server at `url`. Starts as reachable: the
    /// module has just connected to it.
    pub fn probe_postgres(url: &str) -> anyhow::Result<Readiness> {
        let mut config: Config = url
            .parse()
            .map_err(|e| anyhow::anyhow!("postgres url: {e}"))?;
        config.connect_timeout(TIMEOUT);
        config.application_name("fleetgate-devices-probe");
        let mut r = Readiness::always();
        r.probe = Some(tokio::spawn(probe(config, r.state.clone())));
        Ok(r)
    }

    /// `Err(reason)` while the store is out of reach.
    pub fn ready(&self) -> Result<(), String> {
        if self.state.reachable.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(UNAVAILABLE.to_string())
        }
    }

    /// A request failed with a storage error: probe now rather than at
    /// the next tick (only while the store counts as reachable; once it is
    /// not, the probe looks every second anyway).
    pub fn suspect(&self) {
        if self.probe.is_some() && self.state.reachable.load(Ordering::Acquire) {
            self.state.wake.notify_one();
        }
    }

    /// Stop probing (the module is shutting down).
    pub fn stop(&self) {
        if let Some(p) = &self.probe {
            p.abort();
        }
    }
}

impl Drop for Readiness {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn probe(config: Config, state: Arc<State>) {
    let mut client: Option<Client> = None;
    loop {
        let started = Instant::now();
        let result = tokio::time::timeout(TIMEOUT, check(&config, &mut client)).await;
        let error = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(format!("no answer within {TIMEOUT:?}")),
        };
        let was = state.reachable.load(Ordering::Acquire);
        match error {
            None => {
                if !was {
                    tracing::info!("devices: the store is reachable again; ready");
                }
                state.reachable.store(true, Ordering::Release);
            }
            Some(e) => {
                // The connection may be the broken part: a new one next time.
                client = None;
                if was {
                    tracing::warn!(error = %e, "devices: the store is out of reach; not ready until it answers");
                }
                state.reachable.store(false, Ordering::Release);
            }
        }
        tokio::time::sleep_until(started + MIN_GAP).await;
        let _ = tokio::time::timeout_at(started + INTERVAL, state.wake.notified()).await;
    }
}

/// One `SELECT 1`, connecting first when there is no live connection.
async fn check(config: &Config, client: &mut Option<Client>) -> Result<(), String> {
    if client.as_ref().is_none_or(Client::is_closed) {
        let (c, conn) = config
            .connect(NoTls)
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        tokio::spawn(async move {
            // Its errors show as the probe's next failure.
            let _ = conn.await;
        });
        *client = Some(c);
    }
    let c = client.as_ref().expect("connected above");
    c.simple_query("SELECT 1")
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Throw-away PostgreSQL servers (shared with the integration tests): the
/// test below starts one of its own, to stop and start again. The store
/// tests include the same file for the shared server; only `PgServer` is
/// used here, so the two copies share nothing at run time.
#[cfg(test)]
#[allow(dead_code, clippy::duplicate_mod)]
#[path = "../../../tests/common/pg.rs"]
mod test_pg;

#[cfg(test)]
mod tests {
    use super::*;

    use super::test_pg;

    async fn until(r: &Readiness, want: bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while r.ready().is_ok() != want {
            assert!(Instant::now() < deadline, "ready() never became {want}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn follows_a_server_that_stops_and_comes_back() {
        let pg = tokio::task::spawn_blocking(test_pg::PgServer::start)
            .await
            .unwrap();
        let r = Readiness::probe_postgres(&pg.url()).unwrap();
        assert_eq!(r.ready(), Ok(()));
        // Let the probe hold its connection, so that the stop ends it.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(r.ready(), Ok(()));
        let pg = tokio::task::spawn_blocking(move || {
            pg.stop();
            pg
        })
        .await
        .unwrap();
        until(&r, false).await;
        assert_eq!(r.ready(), Err(UNAVAILABLE.to_string()));
        let _pg = tokio::task::spawn_blocking(move || {
            pg.resume();
            pg
        })
        .await
        .unwrap();
        until(&r, true).await;
    }

    #[test]
    fn sqlite_is_always_ready() {
        let r = Readiness::always();
        r.suspect();
        assert_eq!(r.ready(), Ok(()));
    }

    /// Nothing listens on the port: the first probe finds the store out
    /// of reach, with the reason `/healthz` gives.
    #[tokio::test]
    async fn an_unreachable_server_is_not_ready() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let r = Readiness::probe_postgres(&format!("postgres://u@127.0.0.1:{port}/db")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while r.ready().is_ok() {
            assert!(Instant::now() < deadline, "still ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(r.ready(), Err(UNAVAILABLE.to_string()));
    }
}
