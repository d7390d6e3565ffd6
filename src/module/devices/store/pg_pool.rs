//! The shared store's PostgreSQL connections: a small pool handed out in
//! arrival order, each connection with its own prepared statements.
//!
//! Why prepared statements: the driver runs a statement given as text in
//! two round trips (parse and describe, then bind and execute) and the
//! server plans it every time. A device's first heartbeat after a restart
//! or a failover reads three answers through a dozen statements; at
//! thousands of devices per second those extra round trips queued up
//! behind each other into second-long waits. Each connection prepares a
//! statement once and runs it in one round trip from then on.
//!
//! Why a queue in arrival order: when every connection is busy the next
//! caller waits on a semaphore, first come first served, and takes
//! whichever connection frees first, instead of waiting on one connection
//! picked at random behind a long transaction while others free up.

use std::collections::HashMap;
use std::sync::Mutex as SyncMutex;

use tokio::sync::{Mutex, MutexGuard, Semaphore, SemaphorePermit};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, IsolationLevel, NoTls, Row, Statement, Transaction};

use super::{StoreError, StoreResult};

type Param<'a> = &'a (dyn ToSql + Sync);

/// Statements a connection keeps prepared at most; the store's statements
/// number a few dozen (the device list's filters make a few more), so the
/// bound is only there against an unforeseen source of distinct texts.
const MAX_STATEMENTS: usize = 512;

/// One connection and the statements prepared on it (they live and die
/// with the connection).
struct Session {
    client: Client,
    statements: SyncMutex<HashMap<String, Statement>>,
}

pub struct Pool {
    config: Config,
    slots: Vec<Mutex<Option<Session>>>,
    free: Semaphore,
}

/// A connection taken from the pool, connected (again, if it had died).
pub struct Conn<'a> {
    slot: MutexGuard<'a, Option<Session>>,
    _permit: SemaphorePermit<'a>,
}

pub async fn connect(config: &Config) -> StoreResult<Client> {
    let (client, conn) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "devices store: postgres connection closed");
        }
    });
    Ok(client)
}

impl Pool {
    /// A pool of `size` connections, `first` among them; the others are
    /// opened when first needed.
    pub fn new(config: Config, size: usize, first: Client) -> Pool {
        let size = size.max(1);
        let mut slots = vec![Mutex::new(Some(Session::new(first)))];
        slots.extend((1..size).map(|_| Mutex::new(None)));
        Pool {
            config,
            slots,
            free: Semaphore::new(size),
        }
    }

    pub async fn get(&self) -> StoreResult<Conn<'_>> {
        let permit = self
            .free
            .acquire()
            .await
            .map_err(|_| StoreError::Backend("postgres pool closed".into()))?;
        // A permit means a slot is free or about to be: its holder dropped
        // the permit, and drops the guard in the same statement.
        let mut slot = loop {
            if let Some(g) = self.slots.iter().find_map(|m| m.try_lock().ok()) {
                break g;
            }
            tokio::task::yield_now().await;
        };
        if slot.as_ref().is_none_or(|s| s.client.is_closed()) {
            *slot = Some(Session::new(connect(&self.config).await?));
        }
        Ok(Conn {
            slot,
            _permit: permit,
        })
    }
}

impl Session {
    fn new(client: Client) -> Session {
        Session {
            client,
            statements: SyncMutex::new(HashMap::new()),
        }
    }
}

impl Conn<'_> {
    fn session(&mut self) -> &mut Session {
        self.slot.as_mut().expect("connected")
    }

    /// Statements outside a transaction, each its own (one round trip for
    /// a read instead of three with BEGIN and COMMIT around it). Only for
    /// work that needs no snapshot across statements: at READ COMMITTED
    /// a transaction gives each statement its own snapshot anyway.
    pub fn direct(&mut self) -> Tx<'_> {
        let s = self.session();
        Tx {
            inner: Inner::Direct(&s.client),
            statements: &s.statements,
        }
    }

    /// A transaction at the server's default isolation (READ COMMITTED).
    pub async fn transaction(&mut self) -> StoreResult<Tx<'_>> {
        let Session { client, statements } = self.session();
        Ok(Tx {
            inner: Inner::Tx(client.transaction().await?),
            statements,
        })
    }

    /// A read-only REPEATABLE READ transaction: every read sees one
    /// snapshot.
    pub async fn snapshot(&mut self) -> StoreResult<Tx<'_>> {
        let Session { client, statements } = self.session();
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        Ok(Tx {
            inner: Inner::Tx(tx),
            statements,
        })
    }
}

enum Inner<'a> {
    Tx(Transaction<'a>),
    Direct(&'a Client),
}

/// Statements on a pooled connection, in a transaction or not; the same
/// calls as the driver's, with the text prepared once per connection.
/// Calls made concurrently (e.g. with `try_join!`) are pipelined by the
/// driver: sent together, answered in order.
pub struct Tx<'a> {
    inner: Inner<'a>,
    statements: &'a SyncMutex<HashMap<String, Statement>>,
}

impl Tx<'_> {
    async fn prepared(&self, sql: &str) -> StoreResult<Statement> {
        if let Some(s) = self.cache().get(sql) {
            return Ok(s.clone());
        }
        let statement = match &self.inner {
            Inner::Tx(t) => t.prepare(sql).await?,
            Inner::Direct(c) => c.prepare(sql).await?,
        };
        let mut cache = self.cache();
        if cache.len() >= MAX_STATEMENTS {
            cache.clear();
        }
        cache.insert(sql.to_string(), statement.clone());
        Ok(statement)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, Statement>> {
        self.statements.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub async fn query(&self, sql: &str, p: &[Param<'_>]) -> StoreResult<Vec<Row>> {
        let s = self.prepared(sql).await?;
        Ok(match &self.inner {
            Inner::Tx(t) => t.query(&s, p).await?,
            Inner::Direct(c) => c.query(&s, p).await?,
        })
    }

    pub async fn query_opt(&self, sql: &str, p: &[Param<'_>]) -> StoreResult<Option<Row>> {
        let s = self.prepared(sql).await?;
        Ok(match &self.inner {
            Inner::Tx(t) => t.query_opt(&s, p).await?,
            Inner::Direct(c) => c.query_opt(&s, p).await?,
        })
    }

    pub async fn query_one(&self, sql: &str, p: &[Param<'_>]) -> StoreResult<Row> {
        let s = self.prepared(sql).await?;
        Ok(match &self.inner {
            Inner::Tx(t) => t.query_one(&s, p).await?,
            Inner::Direct(c) => c.query_one(&s, p).await?,
        })
    }

    /// Like `execute`, but the driver's error is kept (to tell a unique
    /// violation from other failures).
    pub async fn execute_raw(
        &self,
        sql: &str,
        p: &[Param<'_>],
    ) -> StoreResult<Result<u64, tokio_postgres::Error>> {
        let s = self.prepared(sql).await?;
        Ok(match &self.inner {
            Inner::Tx(t) => t.execute(&s, p).await,
            Inner::Direct(c) => c.execute(&s, p).await,
        })
    }

    pub async fn execute(&self, sql: &str, p: &[Param<'_>]) -> StoreResult<u64> {
        Ok(self.execute_raw(sql, p).await??)
    }

    /// Several statements without parameters, in one round trip (not
    /// prepared: schema and bulk statements run rarely).
    pub async fn batch_execute(&self, sql: &str) -> StoreResult<()> {
        match &self.inner {
            Inner::Tx(t) => t.batch_execute(sql).await?,
            Inner::Direct(c) => c.batch_execute(sql).await?,
        }
        Ok(())
    }

    /// Commit (a no-op outside a transaction: each statement committed).
    pub async fn commit(self) -> StoreResult<()> {
        if let Inner::Tx(t) = self.inner {
            t.commit().await?;
        }
        Ok(())
    }
}
