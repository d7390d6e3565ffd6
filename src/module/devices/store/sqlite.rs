//! The embedded store: one SQLite file in the module's data directory.
//!
//! WAL mode lets readers proceed while a write commits; `synchronous =
//! FULL` makes a commit survive power loss, not just a killed process.
//! rusqlite is blocking, so every call runs on Tokio's blocking pool. One
//! connection writes (SQLite allows one writer at a time anyway: queueing
//! is cheaper than `SQLITE_BUSY` retries), a few others read. Calls queue
//! for a connection *before* taking a blocking thread (an async semaphore
//! per kind): a burst of writes (thousands of channels opening at once)
//! then waits as cheap futures in order, instead of parking hundreds of
//! blocking-pool threads on a mutex, each with its own stack.
//!
//! WAL checkpoints run on a connection and thread of their own
//! ([`Checkpointer`]), never inside a commit: the writer's automatic
//! checkpoint is switched off (`wal_autocheckpoint = 0`), and a passive
//! checkpoint runs every `CHECKPOINT_EVERY` after writes. A passive
//! checkpoint takes no lock that commits need; a commit is durable once its
//! WAL frames are synced, whenever the checkpoint copies them.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;

use rusqlite::{params, params_from_iter, Connection, OptionalExtension, Row, Transaction};
use serde_json::Value;

use super::sql::{self, Arg, Columns, Dialect, Statements};
use super::{check_snapshot, parse_json, NodeLease, Store, StoreError, StoreResult};
use crate::module::devices::model::*;
use crate::module::BoxFuture;

const READERS: usize = 4;

/// How often the checkpointer looks for new WAL frames to copy back.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// The shared statements (sql.rs) in SQLite's dialect.
static SQL: LazyLock<Statements> = LazyLock::new(|| Statements::new(Dialect::Sqlite));

struct Inner {
    writer: Mutex<Connection>,
    readers: Vec<Mutex<Connection>>,
    /// One permit per connection: taken before a blocking thread is.
    write_gate: Arc<Semaphore>,
    read_gate: Arc<Semaphore>,
    /// Committed write transactions, for the checkpointer.
    commits: Arc<AtomicU64>,
    checkpointer: Checkpointer,
}

/// Copies committed WAL frames into the database file, on its own thread
/// and connection, off every commit's path. The thread ends with the store.
struct Checkpointer {
    /// Passive checkpoints run (tests look at it).
    done: Arc<AtomicU64>,
    /// Dropped with the store, which wakes and ends the thread.
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Checkpointer {
    fn start(path: &Path, commits: Arc<AtomicU64>) -> StoreResult<Checkpointer> {
        let conn = open(path)?;
        let done = Arc::new(AtomicU64::new(0));
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let counter = done.clone();
        let thread = std::thread::Builder::new()
            .name("devices-checkpoint".into())
            .spawn(move || {
                let mut seen = 0;
                // Err(Timeout) is the tick; anything else means the store
                // is gone.
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(CHECKPOINT_EVERY)
                {
                    let now = commits.load(Ordering::Relaxed);
                    if now == seen {
                        continue;
                    }
                    seen = now;
                    // PASSIVE: copy what no reader still needs, wait for
                    // nobody. Busy or not, the next tick tries again.
                    match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                        Ok(()) => {
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => tracing::warn!(error = %e, "devices: WAL checkpoint failed"),
                    }
                }
                // A last one, so that a clean stop leaves a short WAL.
                let _ = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
            })
            .map_err(|e| StoreError::Backend(format!("starting the checkpoint thread: {e}")))?;
        Ok(Checkpointer { done, stop, thread })
    }

    /// End the thread (after its last checkpoint) and wait for it, so
    /// that its connection is closed on return.
    fn stop(self) {
        drop(self.stop);
        let _ = self.thread.join();
    }
}

/// The store: open, or released to another process (a binary upgrade,
/// see `Store::handover`).
#[derive(Clone)]
pub struct SqliteStore {
    slot: Arc<Slot>,
}

struct Slot {
    path: std::path::PathBuf,
    inner: std::sync::RwLock<Option<Arc<Inner>>>,
}

/// What a call gets while the store is released.
const HANDED_OVER: &str = "the store was handed over to the new process (upgrade)";

fn backend(e: rusqlite::Error) -> StoreError {
    StoreError::Backend(format!("sqlite: {e}"))
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        backend(e)
    }
}

fn open(path: &Path) -> StoreResult<Connection> {
    let c = Connection::open(path)?;
    // A reader can briefly meet a checkpoint or the schema being created by
    // the writer; wait rather than fail.
    c.busy_timeout(std::time::Duration::from_secs(10))?;
    c.pragma_update(None, "journal_mode", "WAL")?;
    c.pragma_update(None, "synchronous", "FULL")?;
    c.pragma_update(None, "foreign_keys", "ON")?;
    // Checkpoints are the checkpointer's job, never a commit's.
    c.pragma_update(None, "wal_autocheckpoint", 0)?;
    Ok(c)
}

impl SqliteStore {
    /// Open (creating if needed) the database at `path`. Blocking: call
    /// from a blocking context or at start-up.
    pub fn open(path: &Path) -> StoreResult<SqliteStore> {
        let inner = Inner::open(path)?;
        Ok(SqliteStore {
            slot: Arc::new(Slot {
                path: path.to_path_buf(),
                inner: std::sync::RwLock::new(Some(Arc::new(inner))),
            }),
        })
    }

    /// The open store, or the error every call gets while it is released.
    fn inner(&self) -> StoreResult<Arc<Inner>> {
        self.slot
            .inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| StoreError::Backend(HANDED_OVER.into()))
    }

    /// Finish the work in flight, refuse what comes after, and close every
    /// connection (checkpointer included): on return no connection of this
    /// process has the file open.
    pub async fn release(&self) -> StoreResult<()> {
        let Some(inner) = self
            .slot
            .inner
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return Ok(());
        };
        // Every permit: the calls holding one are done.
        let writes = inner.write_gate.acquire_many(1).await;
        let reads = inner.read_gate.acquire_many(READERS as u32).await;
        drop((writes, reads));
        // Calls still queued for a permit fail (and drop their handle).
        inner.write_gate.close();
        inner.read_gate.close();
        let mut inner = inner;
        let inner = loop {
            match Arc::try_unwrap(inner) {
                Ok(i) => break i,
                Err(again) => {
                    inner = again;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        tokio::task::spawn_blocking(move || {
            let Inner {
                writer,
                readers,
                checkpointer,
                ..
            } = inner;
            drop((writer, readers));
            checkpointer.stop();
        })
        .await
        .map_err(|e| StoreError::Backend(format!("sqlite task: {e}")))?;
        tracing::info!(path = %self.slot.path.display(), "devices: SQLite store released");
        Ok(())
    }

    /// Open the file again after `release` (the upgrade failed).
    pub async fn reopen(&self) -> StoreResult<()> {
        if self.inner().is_ok() {
            return Ok(());
        }
        let path = self.slot.path.clone();
        let inner = tokio::task::spawn_blocking(move || Inner::open(&path))
            .await
            .map_err(|e| StoreError::Backend(format!("sqlite task: {e}")))??;
        *self.slot.inner.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(inner));
        tracing::info!(path = %self.slot.path.display(), "devices: SQLite store reopened");
        Ok(())
    }

    /// Passive checkpoints run so far by the background checkpointer.
    pub fn checkpoints(&self) -> u64 {
        self.inner()
            .map_or(0, |i| i.checkpointer.done.load(Ordering::Relaxed))
    }

    /// The writer connection's `wal_autocheckpoint` (0: never in a commit).
    pub fn writer_autocheckpoint(&self) -> StoreResult<i64> {
        let inner = self.inner()?;
        let conn = inner.writer.lock().unwrap_or_else(|p| p.into_inner());
        Ok(conn.query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))?)
    }
}

impl Inner {
    fn open(path: &Path) -> StoreResult<Inner> {
        let writer = open(path)?;
        writer.execute_batch(&SQL.schema)?;
        let readers = (0..READERS)
            .map(|_| open(path).map(Mutex::new))
            .collect::<StoreResult<Vec<_>>>()?;
        let commits = Arc::new(AtomicU64::new(0));
        let checkpointer = Checkpointer::start(path, commits.clone())?;
        Ok(Inner {
            writer: Mutex::new(writer),
            readers,
            write_gate: Arc::new(Semaphore::new(1)),
            read_gate: Arc::new(Semaphore::new(READERS)),
            commits,
            checkpointer,
        })
    }
}

impl SqliteStore {
    /// Run `f` in one transaction on the writer connection.
    fn write<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Transaction) -> StoreResult<R> + Send + 'static,
    ) -> BoxFuture<'static, StoreResult<R>> {
        let inner = self.inner();
        Box::pin(async move {
            let inner = inner?;
            let permit = acquire(&inner.write_gate).await?;
            tokio::task::spawn_blocking(move || {
                // Held until the transaction is over, even if the caller
                // stopped waiting for it.
                let _permit = permit;
                let mut conn = inner.writer.lock().unwrap_or_else(|p| p.into_inner());
                // IMMEDIATE takes the write lock up front: no upgrade
                // deadlock between a read and a later write in one call.
                let tx =
                    conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let r = f(&tx)?;
                tx.commit()?;
                inner.commits.fetch_add(1, Ordering::Relaxed);
                Ok(r)
            })
            .await
            .map_err(|e| StoreError::Backend(format!("sqlite task: {e}")))?
        })
    }

    /// Run `f` in one read transaction on a reader connection (a
    /// consistent snapshot even across several queries).
    fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Transaction) -> StoreResult<R> + Send + 'static,
    ) -> BoxFuture<'static, StoreResult<R>> {
        let inner = self.inner();
        Box::pin(async move {
            let inner = inner?;
            let permit = acquire(&inner.read_gate).await?;
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                // With a permit one reader is free (a guard is dropped
                // before its permit); waiting on one at random is only a
                // fallback.
                let mut conn = inner
                    .readers
                    .iter()
                    .find_map(|m| m.try_lock().ok())
                    .unwrap_or_else(|| {
                        let m = &inner.readers[fastrand::usize(..inner.readers.len())];
                        m.lock().unwrap_or_else(|p| p.into_inner())
                    });
                let tx = conn.transaction()?;
                let r = f(&tx)?;
                tx.finish()?;
                Ok(r)
            })
            .await
            .map_err(|e| StoreError::Backend(format!("sqlite task: {e}")))?
        })
    }
}

async fn acquire(gate: &Arc<Semaphore>) -> StoreResult<tokio::sync::OwnedSemaphorePermit> {
    gate.clone()
        .acquire_owned()
        .await
        .map_err(|_| StoreError::Backend(HANDED_OVER.into()))
}

impl Columns for Row<'_> {
    fn text(&self, i: usize) -> StoreResult<String> {
        Ok(self.get(i)?)
    }
    fn opt_text(&self, i: usize) -> StoreResult<Option<String>> {
        Ok(self.get(i)?)
    }
    fn int(&self, i: usize) -> StoreResult<i64> {
        Ok(self.get(i)?)
    }
    fn opt_int(&self, i: usize) -> StoreResult<Option<i64>> {
        Ok(self.get(i)?)
    }
}

impl rusqlite::ToSql for Arg<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        match self {
            Arg::Text(s) => s.to_sql(),
            Arg::OptText(s) => s.to_sql(),
            Arg::Int(n) => n.to_sql(),
            Arg::OptInt(n) => n.to_sql(),
            Arg::Owned(s) => s.to_sql(),
            Arg::OptOwned(s) => s.to_sql(),
        }
    }
}

/// Every row of a (cached) statement, read with `read`.
fn rows<T>(
    tx: &Transaction,
    sql: &str,
    p: impl rusqlite::Params,
    read: fn(&dyn Columns) -> StoreResult<T>,
) -> StoreResult<Vec<T>> {
    let mut st = tx.prepare_cached(sql)?;
    let mut rows = st.query(p)?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(read(r)?);
    }
    Ok(out)
}

/// Devices with their groups.
fn devices(tx: &Transaction, sql: &str, p: impl rusqlite::Params) -> StoreResult<Vec<Device>> {
    let mut devices = rows(tx, sql, p, sql::device)?;
    let mut st = tx.prepare_cached(
        "SELECT group_name FROM dev_members WHERE device_id = ?1 ORDER BY group_name",
    )?;
    for d in &mut devices {
        d.groups = st
            .query_map([&d.id], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
    }
    Ok(devices)
}

fn load_device(tx: &Transaction, id: &str) -> StoreResult<Option<Device>> {
    Ok(devices(tx, &SQL.device, [id])?.pop())
}

fn set_members(tx: &Transaction, device_id: &str, groups: &[String]) -> StoreResult<()> {
    for g in groups {
        let exists: bool = tx.query_row(
            "SELECT EXISTS(SELECT 1 FROM dev_groups WHERE name = ?1)",
            [g],
            |r| r.get(0),
        )?;
        if !exists {
            return Err(StoreError::Conflict(format!("no group named {g:?}")));
        }
    }
    tx.execute(&SQL.clear_members, [device_id])?;
    let mut st = tx.prepare_cached(
        "INSERT OR IGNORE INTO dev_members (device_id, group_name) VALUES (?1, ?2)",
    )?;
    for g in groups {
        st.execute(params![device_id, g])?;
    }
    Ok(())
}

fn insert_device(tx: &Transaction, d: &Device) -> StoreResult<()> {
    tx.execute(&SQL.insert_device, params_from_iter(sql::device_args(d)))
        .map_err(|e| match e {
            rusqlite::Error::SqliteFailure(f, _)
                if f.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                StoreError::Conflict(format!(
                    "device {} or its certificate is already enrolled",
                    d.id
                ))
            }
            e => backend(e),
        })?;
    set_members(tx, &d.id, &d.groups)
}

fn insert_token(tx: &Transaction, t: &EnrolToken) -> StoreResult<()> {
    tx.execute(&SQL.insert_token, params_from_iter(sql::token_args(t)))?;
    Ok(())
}

fn read_defaults(tx: &Transaction) -> StoreResult<Value> {
    sql::defaults(tx.query_row(&SQL.defaults, [], |r| r.get(0)).optional()?)
}

fn read_groups(tx: &Transaction) -> StoreResult<Vec<Group>> {
    rows(tx, &SQL.groups, [], sql::group)
}

fn read_users(tx: &Transaction) -> StoreResult<Vec<UserProfile>> {
    rows(tx, &SQL.users, [], sql::user)
}

fn read_tokens(tx: &Transaction) -> StoreResult<Vec<EnrolToken>> {
    rows(tx, &SQL.tokens, [], sql::token)
}

/// `Ok` if the statement changed a row, `NotFound(what)` if none.
fn changed(n: usize, what: impl FnOnce() -> String) -> StoreResult<()> {
    match n {
        0 => Err(StoreError::NotFound(what())),
        _ => Ok(()),
    }
}

impl Store for SqliteStore {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn handover(&self) -> BoxFuture<'_, StoreResult<()>> {
        Box::pin(self.release())
    }

    fn take_back(&self) -> BoxFuture<'_, StoreResult<()>> {
        Box::pin(self.reopen())
    }

    fn insert_token(&self, token: EnrolToken) -> BoxFuture<'_, StoreResult<()>> {
        self.write(move |tx| insert_token(tx, &token))
    }

    fn list_tokens(&self) -> BoxFuture<'_, StoreResult<Vec<EnrolToken>>> {
        self.read(read_tokens)
    }

    fn delete_token(&self, id: String) -> BoxFuture<'_, StoreResult<()>> {
        self.write(move |tx| {
            changed(tx.execute(&SQL.delete_token, [&id])?, || {
                format!("no token {id:?}")
            })
        })
    }

    fn enrol(
        &self,
        secret_sha256: String,
        now: i64,
        device: Device,
    ) -> BoxFuture<'_, StoreResult<Device>> {
        self.write(move |tx| {
            let id: Option<String> = tx
                .query_row(&SQL.spend_token, params![secret_sha256, now], |r| r.get(0))
                .optional()?;
            let Some(id) = id else {
                return Err(StoreError::TokenRejected);
            };
            let device = Device {
                token_id: Some(id),
                ..device
            };
            insert_device(tx, &device)?;
            Ok(device)
        })
    }

    fn device(&self, id: String) -> BoxFuture<'_, StoreResult<Option<Device>>> {
        self.read(move |tx| load_device(tx, &id))
    }

    fn device_by_fingerprint(
        &self,
        fingerprint: String,
    ) -> BoxFuture<'_, StoreResult<Option<Device>>> {
        self.read(move |tx| Ok(devices(tx, &SQL.device_by_fingerprint, [&fingerprint])?.pop()))
    }

    fn list_devices(&self, q: DeviceQuery) -> BoxFuture<'_, StoreResult<(Vec<Device>, i64)>> {
        self.read(move |tx| {
            let list = sql::list_devices(Dialect::Sqlite, &q);
            let total: i64 =
                tx.query_row(&list.count, params_from_iter(&list.args), |r| r.get(0))?;
            let page = list
                .args
                .iter()
                .cloned()
                .chain([Arg::Int(q.limit), Arg::Int(q.offset)]);
            let devices = devices(tx, &list.page, params_from_iter(page))?;
            Ok((devices, total))
        })
    }

    fn patch_device(&self, id: String, patch: DevicePatch) -> BoxFuture<'_, StoreResult<Device>> {
        self.write(move |tx| {
            let exists = tx
                .query_row(&SQL.lock_device, [&id], |_| Ok(()))
                .optional()?;
            if exists.is_none() {
                return Err(StoreError::NotFound(format!("no device {id:?}")));
            }
            if let Some(name) = &patch.name {
                tx.execute(&SQL.set_name, params![id, name])?;
            }
            if let Some(s) = &patch.settings {
                tx.execute(&SQL.set_settings, params![id, s.to_string()])?;
            }
            if let Some(groups) = &patch.groups {
                set_members(tx, &id, groups)?;
            }
            load_device(tx, &id)?.ok_or_else(|| StoreError::NotFound(format!("no device {id:?}")))
        })
    }

    fn revoke_device(&self, id: String, now: i64) -> BoxFuture<'_, StoreResult<Device>> {
        self.write(move |tx| {
            tx.execute(&SQL.revoke, params![id, now])?;
            load_device(tx, &id)?.ok_or_else(|| StoreError::NotFound(format!("no device {id:?}")))
        })
    }

    fn revoked_fingerprints(&self) -> BoxFuture<'_, StoreResult<Vec<String>>> {
        self.read(|tx| rows(tx, &SQL.revoked_fingerprints, [], |r| r.text(0)))
    }

    fn record_contacts(&self, contacts: Vec<(String, i64)>) -> BoxFuture<'_, StoreResult<()>> {
        self.write(move |tx| {
            let mut st = tx.prepare_cached(
                "UPDATE dev_devices SET last_contact = max(coalesce(last_contact, ?2), ?2) WHERE id = ?1",
            )?;
            for (id, at) in &contacts {
                st.execute(params![id, at])?;
            }
            Ok(())
        })
    }

    fn set_session(
        &self,
        device_id: String,
        user: Option<String>,
    ) -> BoxFuture<'_, StoreResult<()>> {
        self.write(move |tx| {
            changed(
                tx.execute(&SQL.set_session, params![device_id, user])?,
                || format!("no device {device_id:?}"),
            )
        })
    }

    fn set_channel(
        &self,
        device_id: String,
        node: String,
        open: bool,
    ) -> BoxFuture<'_, StoreResult<()>> {
        self.write(move |tx| {
            let sql = if open {
                &SQL.open_channel
            } else {
                &SQL.close_channel
            };
            tx.execute(sql, params![device_id, node])?;
            Ok(())
        })
    }

    fn defaults(&self) -> BoxFuture<'_, StoreResult<Value>> {
        self.read(read_defaults)
    }

    fn set_defaults(&self, settings: Value) -> BoxFuture<'_, StoreResult<()>> {
        self.write(move |tx| {
            tx.execute(&SQL.put_defaults, [settings.to_string()])?;
            Ok(())
        })
    }

    fn groups(&self) -> BoxFuture<'_, StoreResult<Vec<Group>>> {
        self.read(read_groups)
    }

    fn put_group(&self, g: Group) -> BoxFuture<'_, StoreResult<()>> {
        self.write(move |tx| {
            tx.execute(
                &SQL.put_group,
                params![g.name, g.priority, g.settings.to_string()],
            )?;
            Ok(())
        })
    }

    fn delete_group(&self, name: String) -> BoxFuture<'_, StoreResult<()>> {
        self.write(move |tx| {
            changed(tx.execute(&SQL.delete_group, [&name])?, || {
                format!("no group {name:?}")
            })
        })
    }

    fn users(&self) -> BoxFuture<'_, StoreResult<Vec<UserProfile>>> {
        self.read(read_users)
    }

    fn put_user(&self, u: UserProfile) -> BoxFuture<'_, StoreResult<()>> {
        self.write(move |tx| {
            tx.execute(&SQL.put_user, params![u.name, u.settings.to_string()])?;
            Ok(())
        })
    }

    fn delete_user(&self, name: String) -> BoxFuture<'_, StoreResult<()>> {
        self.write(move |tx| {
            changed(tx.execute(&SQL.delete_user, [&name])?, || {
                format!("no user {name:?}")
            })
        })
    }

    fn settings_inputs(&self, device_id: String) -> BoxFuture<'_, StoreResult<SettingsInputs>> {
        self.read(move |tx| {
            let d = load_device(tx, &device_id)?
                .ok_or_else(|| StoreError::NotFound(format!("no device {device_id:?}")))?;
            let groups = read_groups(tx)?
                .into_iter()
                .filter(|g| d.groups.contains(&g.name))
                .collect();
            let user = match d.session_user {
                None => None,
                Some(u) => {
                    let s: Option<String> = tx
                        .query_row(&SQL.user_settings, [&u], |r| r.get(0))
                        .optional()?;
                    Some((u, s.as_deref().map(parse_json).transpose()?))
                }
            };
            Ok(SettingsInputs {
                defaults: read_defaults(tx)?,
                groups,
                device: d.settings,
                user,
            })
        })
    }

    fn hot_state(&self) -> BoxFuture<'_, StoreResult<HotState>> {
        self.read(|tx| {
            let mut state = HotState {
                defaults: read_defaults(tx)?,
                groups: read_groups(tx)?,
                users: read_users(tx)?,
                devices: rows(tx, &SQL.hot_devices, [], sql::hot_device)?,
            };
            let members = rows(tx, &SQL.all_members, [], |r| Ok((r.text(0)?, r.text(1)?)))?;
            let pending = rows(tx, &SQL.pending_counts, [], |r| Ok((r.text(0)?, r.int(1)?)))?;
            state.attach(members, pending);
            Ok(state)
        })
    }

    fn queue_command(&self, c: Command) -> BoxFuture<'_, StoreResult<Command>> {
        self.write(move |tx| {
            let revoked: Option<Option<i64>> = tx
                .query_row(&SQL.revoked_at, [&c.device_id], |r| r.get(0))
                .optional()?;
            match revoked {
                None => return Err(StoreError::NotFound(format!("no device {:?}", c.device_id))),
                Some(Some(_)) => {
                    return Err(StoreError::Conflict(format!(
                        "device {:?} is revoked",
                        c.device_id
                    )))
                }
                Some(None) => {}
            }
            let seq = tx.query_row(
                &SQL.queue_command,
                params![
                    c.id,
                    c.device_id,
                    c.kind.as_str(),
                    c.payload.to_string(),
                    c.created_at
                ],
                |r| r.get(0),
            )?;
            Ok(Command { seq, ..c })
        })
    }

    fn pending_commands(&self, device_id: String) -> BoxFuture<'_, StoreResult<Vec<Command>>> {
        self.read(move |tx| rows(tx, &SQL.pending_commands, [&device_id], sql::command))
    }

    fn pending_count(&self, device_id: String) -> BoxFuture<'_, StoreResult<i64>> {
        self.read(move |tx| Ok(tx.query_row(&SQL.pending_count, [&device_id], |r| r.get(0))?))
    }

    fn commands(&self, device_id: String, limit: i64) -> BoxFuture<'_, StoreResult<Vec<Command>>> {
        self.read(move |tx| {
            rows(
                tx,
                &SQL.recent_commands,
                params![device_id, limit],
                sql::command,
            )
        })
    }

    fn ack_command(
        &self,
        device_id: String,
        command_id: String,
        status: String,
        result: Value,
        now: i64,
    ) -> BoxFuture<'_, StoreResult<Command>> {
        self.write(move |tx| {
            tx.execute(
                &SQL.ack_command,
                params![command_id, device_id, now, status, result.to_string()],
            )?;
            rows(
                tx,
                &SQL.command,
                params![command_id, device_id],
                sql::command,
            )?
            .pop()
            .ok_or_else(|| {
                StoreError::NotFound(format!("no command {command_id:?} for this device"))
            })
        })
    }

    fn export(&self) -> BoxFuture<'_, StoreResult<Snapshot>> {
        self.read(|tx| {
            Ok(Snapshot {
                format: SNAPSHOT_FORMAT.to_string(),
                version: SNAPSHOT_VERSION,
                exported_at: now_ms(),
                defaults: read_defaults(tx)?,
                groups: read_groups(tx)?,
                users: read_users(tx)?,
                tokens: read_tokens(tx)?,
                devices: devices(tx, &SQL.devices, [])?,
                commands: rows(tx, &SQL.commands, [], sql::command)?,
                ca: None,
            })
        })
    }

    fn import(&self, s: Snapshot) -> BoxFuture<'_, StoreResult<()>> {
        self.write(move |tx| {
            check_snapshot(&s)?;
            tx.execute_batch(&SQL.clear_all)?;
            tx.execute(&SQL.insert_defaults, [s.defaults.to_string()])?;
            for g in &s.groups {
                tx.execute(
                    &SQL.insert_group,
                    params![g.name, g.priority, g.settings.to_string()],
                )?;
            }
            for u in &s.users {
                tx.execute(&SQL.insert_user, params![u.name, u.settings.to_string()])?;
            }
            for t in &s.tokens {
                insert_token(tx, t)?;
            }
            for d in &s.devices {
                // A channel recorded in the export belongs to a process
                // that is not this one.
                insert_device(
                    tx,
                    &Device {
                        channel_node: None,
                        ..d.clone()
                    },
                )?;
            }
            for c in &s.commands {
                tx.execute(&SQL.import_command, params_from_iter(sql::command_args(c)))?;
            }
            Ok(())
        })
    }

    fn renew_node(
        &self,
        node: String,
        now: i64,
        lease_ms: i64,
    ) -> BoxFuture<'_, StoreResult<bool>> {
        self.write(move |tx| {
            let last: Option<i64> = tx
                .query_row(&SQL.node_renewed_at, [&node], |r| r.get(0))
                .optional()?;
            tx.execute(&SQL.renew_node, params![node, now])?;
            Ok(last.is_none_or(|t| t < now - lease_ms))
        })
    }

    fn expire_nodes(
        &self,
        node: String,
        now: i64,
        lease_ms: i64,
    ) -> BoxFuture<'_, StoreResult<Vec<(String, u64)>>> {
        self.write(move |tx| {
            let dead = {
                let mut st = tx.prepare_cached(&SQL.expire_nodes)?;
                let names = st.query_map(params![now - lease_ms, node], |r| r.get(0))?;
                names.collect::<Result<Vec<String>, _>>()?
            };
            let mut out = Vec::new();
            for d in dead {
                let n = tx.execute(&SQL.clear_node_channels, [&d])?;
                out.push((d, n as u64));
            }
            Ok(out)
        })
    }

    fn clear_node_channels(&self, node: String) -> BoxFuture<'_, StoreResult<u64>> {
        self.write(move |tx| Ok(tx.execute(&SQL.clear_node_channels, [&node])? as u64))
    }

    fn nodes(&self) -> BoxFuture<'_, StoreResult<Vec<NodeLease>>> {
        self.read(|tx| {
            let mut st = tx.prepare_cached(&SQL.nodes)?;
            let rows = st.query_map([], |r| {
                Ok(NodeLease {
                    node: r.get(0)?,
                    renewed_at: r.get(1)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_store_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("devices.db")).unwrap();
        super::super::suite::run_all(&store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn data_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("devices.db");
        {
            let store = SqliteStore::open(&path).unwrap();
            store
                .set_defaults(serde_json::json!({"kept": true}))
                .await
                .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(
            store.defaults().await.unwrap(),
            serde_json::json!({"kept": true})
        );
        let mode: String = store
            .inner()
            .unwrap()
            .writer
            .lock()
            .unwrap()
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn a_burst_of_writes_waits_without_blocking_threads() {
        // Tokio names its blocking threads like its workers.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("sqlite-gate-tst")
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("devices.db")).unwrap();
        rt.block_on(async {
            let tasks: Vec<_> = (0..300)
                .map(|i| {
                    let s = store.clone();
                    tokio::spawn(async move {
                        s.set_defaults(serde_json::json!({ "n": i })).await.unwrap();
                        s.defaults().await.unwrap();
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        });
        // Idle blocking threads linger (10 s): what is alive now is what
        // the burst took. Ungated, every queued write held a thread.
        let threads = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).ok())
            .filter(|name| name.trim() == "sqlite-gate-tst")
            .count();
        assert!(threads <= 1 + 1 + READERS + 2, "{threads} threads");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn checkpoints_run_beside_commits_not_in_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("devices.db");
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.writer_autocheckpoint().unwrap(), 0);
        for i in 0..50 {
            store
                .set_defaults(serde_json::json!({ "n": i }))
                .await
                .unwrap();
        }
        let started = std::time::Instant::now();
        while store.checkpoints() == 0 {
            assert!(started.elapsed() < Duration::from_secs(5), "no checkpoint");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Everything committed so far is in the database file: a checkpoint
        // from elsewhere finds no frame left to copy.
        tokio::time::sleep(CHECKPOINT_EVERY * 2).await;
        let other = Connection::open(&path).unwrap();
        let (busy, log, copied): (i64, i64, i64) = other
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert_eq!((busy, log), (0, copied));
        assert!(log > 0, "the WAL was written");
    }
}
