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
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;

use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};
use serde_json::Value;

use super::{check_snapshot, like_pattern, parse_json, Store, StoreError, StoreResult};
use crate::module::devices::model::*;
use crate::module::BoxFuture;

const READERS: usize = 4;

/// How often the checkpointer looks for new WAL frames to copy back.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS dev_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dev_tokens (
    id TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL UNIQUE,
    label TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    uses_left INTEGER NOT NULL,
    used INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS dev_devices (
    id TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    serial TEXT NOT NULL,
    cert_pem TEXT NOT NULL,
    settings TEXT NOT NULL,
    login_user TEXT,
    enrolled_at INTEGER NOT NULL,
    token_id TEXT,
    last_contact INTEGER,
    revoked_at INTEGER,
    channel_node TEXT
);
CREATE TABLE IF NOT EXISTS dev_groups (name TEXT PRIMARY KEY, priority INTEGER NOT NULL, settings TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dev_members (
    device_id TEXT NOT NULL REFERENCES dev_devices(id) ON DELETE CASCADE,
    group_name TEXT NOT NULL REFERENCES dev_groups(name) ON DELETE CASCADE,
    PRIMARY KEY (device_id, group_name)
);
CREATE INDEX IF NOT EXISTS dev_members_group ON dev_members(group_name);
CREATE TABLE IF NOT EXISTS dev_users (name TEXT PRIMARY KEY, settings TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dev_commands (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    device_id TEXT NOT NULL REFERENCES dev_devices(id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    acked_at INTEGER,
    status TEXT,
    result TEXT
);
CREATE INDEX IF NOT EXISTS dev_commands_pending ON dev_commands(device_id, seq) WHERE acked_at IS NULL;
CREATE INDEX IF NOT EXISTS dev_commands_device ON dev_commands(device_id, seq);
";

const DEVICE_COLUMNS: &str =
    "id, fingerprint, name, serial, cert_pem, settings, login_user, enrolled_at, \
     token_id, last_contact, revoked_at, channel_node";
const COMMAND_COLUMNS: &str =
    "seq, id, device_id, kind, payload, created_at, acked_at, status, result";

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
    _stop: std::sync::mpsc::Sender<()>,
}

impl Checkpointer {
    fn start(path: &Path, commits: Arc<AtomicU64>) -> StoreResult<Checkpointer> {
        let conn = open(path)?;
        let done = Arc::new(AtomicU64::new(0));
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let counter = done.clone();
        std::thread::Builder::new()
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
        Ok(Checkpointer { done, _stop: stop })
    }
}

#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

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
        let writer = open(path)?;
        writer.execute_batch(SCHEMA)?;
        let readers = (0..READERS)
            .map(|_| open(path).map(Mutex::new))
            .collect::<StoreResult<Vec<_>>>()?;
        let commits = Arc::new(AtomicU64::new(0));
        let checkpointer = Checkpointer::start(path, commits.clone())?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                writer: Mutex::new(writer),
                readers,
                write_gate: Arc::new(Semaphore::new(1)),
                read_gate: Arc::new(Semaphore::new(READERS)),
                commits,
                checkpointer,
            }),
        })
    }

    /// Passive checkpoints run so far by the background checkpointer.
    pub fn checkpoints(&self) -> u64 {
        self.inner.checkpointer.done.load(Ordering::Relaxed)
    }

    /// The writer connection's `wal_autocheckpoint` (0: never in a commit).
    pub fn writer_autocheckpoint(&self) -> StoreResult<i64> {
        let conn = self.inner.writer.lock().unwrap_or_else(|p| p.into_inner());
        Ok(conn.query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))?)
    }

    /// Run `f` in one transaction on the writer connection.
    fn write<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Transaction) -> StoreResult<R> + Send + 'static,
    ) -> BoxFuture<'static, StoreResult<R>> {
        let inner = self.inner.clone();
        Box::pin(async move {
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
        let inner = self.inner.clone();
        Box::pin(async move {
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
        .map_err(|_| StoreError::Backend("sqlite store closed".into()))
}

fn device_row(r: &Row) -> rusqlite::Result<(Device, String)> {
    Ok((
        Device {
            id: r.get(0)?,
            fingerprint: r.get(1)?,
            name: r.get(2)?,
            serial: r.get(3)?,
            cert_pem: r.get(4)?,
            groups: Vec::new(),
            settings: Value::Null,
            session_user: r.get(6)?,
            enrolled_at: r.get(7)?,
            token_id: r.get(8)?,
            last_contact: r.get(9)?,
            revoked_at: r.get(10)?,
            channel_node: r.get(11)?,
        },
        r.get(5)?,
    ))
}

/// Fill in what the row alone does not carry: settings and groups.
fn finish_device(tx: &Transaction, (mut d, settings): (Device, String)) -> StoreResult<Device> {
    d.settings = parse_json(&settings)?;
    let mut st = tx.prepare_cached(
        "SELECT group_name FROM dev_members WHERE device_id = ?1 ORDER BY group_name",
    )?;
    d.groups = st
        .query_map([&d.id], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(d)
}

fn load_device(tx: &Transaction, id: &str) -> StoreResult<Option<Device>> {
    let sql = format!("SELECT {DEVICE_COLUMNS} FROM dev_devices WHERE id = ?1");
    let row = tx
        .prepare_cached(&sql)?
        .query_row([id], device_row)
        .optional()?;
    row.map(|r| finish_device(tx, r)).transpose()
}

fn command_row(r: &Row) -> rusqlite::Result<(Command, String, Option<String>)> {
    let kind: String = r.get(3)?;
    Ok((
        Command {
            seq: r.get(0)?,
            id: r.get(1)?,
            device_id: r.get(2)?,
            kind: CommandKind::parse(&kind).unwrap_or(CommandKind::Custom),
            payload: Value::Null,
            created_at: r.get(5)?,
            acked_at: r.get(6)?,
            status: r.get(7)?,
            result: None,
        },
        r.get(4)?,
        r.get(8)?,
    ))
}

fn finish_command(
    (mut c, payload, result): (Command, String, Option<String>),
) -> StoreResult<Command> {
    c.payload = parse_json(&payload)?;
    c.result = result.as_deref().map(parse_json).transpose()?;
    Ok(c)
}

fn query_commands(
    tx: &Transaction,
    sql: &str,
    p: impl rusqlite::Params,
) -> StoreResult<Vec<Command>> {
    let mut st = tx.prepare_cached(sql)?;
    let rows = st
        .query_map(p, command_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter().map(finish_command).collect()
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
    tx.execute("DELETE FROM dev_members WHERE device_id = ?1", [device_id])?;
    let mut st = tx.prepare_cached(
        "INSERT OR IGNORE INTO dev_members (device_id, group_name) VALUES (?1, ?2)",
    )?;
    for g in groups {
        st.execute(params![device_id, g])?;
    }
    Ok(())
}

fn insert_device(tx: &Transaction, d: &Device) -> StoreResult<()> {
    let sql = format!("INSERT INTO dev_devices ({DEVICE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)");
    tx.execute(
        &sql,
        params![
            d.id,
            d.fingerprint,
            d.name,
            d.serial,
            d.cert_pem,
            d.settings.to_string(),
            d.session_user,
            d.enrolled_at,
            d.token_id,
            d.last_contact,
            d.revoked_at,
            d.channel_node
        ],
    )
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
    tx.execute(
        "INSERT INTO dev_tokens (id, secret_sha256, label, created_at, expires_at, uses_left, used) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![t.id, t.secret_sha256, t.label, t.created_at, t.expires_at, t.uses_left, t.used],
    )?;
    Ok(())
}

fn insert_command(tx: &Transaction, c: &Command, with_seq: bool) -> StoreResult<i64> {
    let result = c.result.as_ref().map(|r| r.to_string());
    let p = params![
        c.id,
        c.device_id,
        c.kind.as_str(),
        c.payload.to_string(),
        c.created_at,
        c.acked_at,
        c.status,
        result
    ];
    if with_seq {
        tx.execute(
            "INSERT INTO dev_commands (seq, id, device_id, kind, payload, created_at, acked_at, status, result) \
             VALUES (?9, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            rusqlite::params_from_iter(p.iter().copied().chain(std::iter::once(&c.seq as &dyn rusqlite::ToSql))),
        )?;
        Ok(c.seq)
    } else {
        tx.execute(
            "INSERT INTO dev_commands (id, device_id, kind, payload, created_at, acked_at, status, result) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            p,
        )?;
        Ok(tx.last_insert_rowid())
    }
}

fn read_defaults(tx: &Transaction) -> StoreResult<Value> {
    let text: Option<String> = tx
        .query_row(
            "SELECT value FROM dev_meta WHERE key = 'defaults'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    text.as_deref()
        .map(parse_json)
        .transpose()
        .map(|v| v.unwrap_or_else(empty_object))
}

fn read_groups(tx: &Transaction) -> StoreResult<Vec<Group>> {
    let mut st = tx.prepare_cached(
        "SELECT name, priority, settings FROM dev_groups ORDER BY priority, name",
    )?;
    let rows = st
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter()
        .map(|(name, priority, s)| {
            Ok(Group {
                name,
                priority,
                settings: parse_json(&s)?,
            })
        })
        .collect()
}

fn read_users(tx: &Transaction) -> StoreResult<Vec<UserProfile>> {
    let mut st = tx.prepare_cached("SELECT name, settings FROM dev_users ORDER BY name")?;
    let rows = st
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter()
        .map(|(name, s)| {
            Ok(UserProfile {
                name,
                settings: parse_json(&s)?,
            })
        })
        .collect()
}

fn read_tokens(tx: &Transaction) -> StoreResult<Vec<EnrolToken>> {
    let mut st = tx.prepare_cached(
        "SELECT id, secret_sha256, label, created_at, expires_at, uses_left, used FROM dev_tokens ORDER BY created_at, id",
    )?;
    let rows = st.query_map([], |r| {
        Ok(EnrolToken {
            id: r.get(0)?,
            secret_sha256: r.get(1)?,
            label: r.get(2)?,
            created_at: r.get(3)?,
            expires_at: r.get(4)?,
            uses_left: r.get(5)?,
            used: r.get(6)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

impl Store for SqliteStore {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn insert_token(&self, token: EnrolToken) -> BoxFuture<'_, StoreResult<()>> {
        self.write(move |tx| insert_token(tx, &token))
    }

    fn list_tokens(&self) -> BoxFuture<'_, StoreResult<Vec<EnrolToken>>> {
        self.read(read_tokens)
    }

    fn delete_token(&self, id: String) -> BoxFuture<'_, StoreResult<()>> {
        self.write(
            move |tx| match tx.execute("DELETE FROM dev_tokens WHERE id = ?1", [&id])? {
                0 => Err(StoreError::NotFound(format!("no token {id:?}"))),
                _ => Ok(()),
            },
        )
    }

    fn enrol(
        &self,
        secret_sha256: String,
        now: i64,
        device: Device,
    ) -> BoxFuture<'_, StoreResult<Device>> {
        self.write(move |tx| {
            let id: Option<String> = tx
                .query_row(
                    "UPDATE dev_tokens SET uses_left = uses_left - 1, used = used + 1 \
                     WHERE secret_sha256 = ?1 AND expires_at > ?2 AND uses_left > 0 RETURNING id",
                    params![secret_sha256, now],
                    |r| r.get(0),
                )
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
        self.read(move |tx| {
            let sql = format!("SELECT {DEVICE_COLUMNS} FROM dev_devices WHERE fingerprint = ?1");
            let row = tx
                .prepare_cached(&sql)?
                .query_row([&fingerprint], device_row)
                .optional()?;
            row.map(|r| finish_device(tx, r)).transpose()
        })
    }

    fn list_devices(&self, q: DeviceQuery) -> BoxFuture<'_, StoreResult<(Vec<Device>, i64)>> {
        self.read(move |tx| {
            let mut cond = vec!["1 = 1".to_string()];
            let mut args: Vec<Box<dyn rusqlite::ToSql>> = Vec::new();
            if let Some(s) = &q.search {
                args.push(Box::new(like_pattern(s)));
                let n = args.len();
                cond.push(format!(
                    "(lower(name) LIKE ?{n} ESCAPE '\\' OR id LIKE ?{n} ESCAPE '\\' OR fingerprint LIKE ?{n} ESCAPE '\\')"
                ));
            }
            if let Some(g) = &q.group {
                args.push(Box::new(g.clone()));
                cond.push(format!(
                    "id IN (SELECT device_id FROM dev_members WHERE group_name = ?{})",
                    args.len()
                ));
            }
            match q.revoked {
                Some(true) => cond.push("revoked_at IS NOT NULL".into()),
                Some(false) => cond.push("revoked_at IS NULL".into()),
                None => {}
            }
            if let Some(t) = q.contact_since {
                args.push(Box::new(t));
                cond.push(format!("last_contact >= ?{}", args.len()));
            }
            if let Some(t) = q.silent_since {
                args.push(Box::new(t));
                cond.push(format!("(last_contact IS NULL OR last_contact < ?{})", args.len()));
            }
            let filter = cond.join(" AND ");
            let total: i64 = tx.query_row(
                &format!("SELECT count(*) FROM dev_devices WHERE {filter}"),
                rusqlite::params_from_iter(args.iter()),
                |r| r.get(0),
            )?;
            args.push(Box::new(q.limit));
            args.push(Box::new(q.offset));
            let sql = format!(
                "SELECT {DEVICE_COLUMNS} FROM dev_devices WHERE {filter} ORDER BY id LIMIT ?{} OFFSET ?{}",
                args.len() - 1,
                args.len()
            );
            let mut st = tx.prepare(&sql)?;
            let rows = st
                .query_map(rusqlite::params_from_iter(args.iter()), device_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let devices = rows.into_iter().map(|r| finish_device(tx, r)).collect::<StoreResult<_>>()?;
            Ok((devices, total))
        })
    }

    fn patch_device(&self, id: String, patch: DevicePatch) -> BoxFuture<'_, StoreResult<Device>> {
        self.write(move |tx| {
            if load_device(tx, &id)?.is_none() {
                return Err(StoreError::NotFound(format!("no device {id:?}")));
            }
            if let Some(name) = &patch.name {
                tx.execute(
                    "UPDATE dev_devices SET name = ?2 WHERE id = ?1",
                    params![id, name],
                )?;
            }
            if let Some(s) = &patch.settings {
                tx.execute(
                    "UPDATE dev_devices SET settings = ?2 WHERE id = ?1",
                    params![id, s.to_string()],
                )?;
            }
            if let Some(groups) = &patch.groups {
                set_members(tx, &id, groups)?;
            }
            load_device(tx, &id)?.ok_or_else(|| StoreError::NotFound(format!("no device {id:?}")))
        })
    }

    fn revoke_device(&self, id: String, now: i64) -> BoxFuture<'_, StoreResult<Device>> {
        self.write(move |tx| {
            let n = tx.execute(
                "UPDATE dev_devices SET revoked_at = coalesce(revoked_at, ?2) WHERE id = ?1",
                params![id, now],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("no device {id:?}")));
            }
            load_device(tx, &id)?.ok_or_else(|| StoreError::NotFound(format!("no device {id:?}")))
        })
    }

    fn revoked_fingerprints(&self) -> BoxFuture<'_, StoreResult<Vec<String>>> {
        self.read(|tx| {
            let mut st = tx.prepare_cached(
                "SELECT fingerprint FROM dev_devices WHERE revoked_at IS NOT NULL",
            )?;
            let rows = st.query_map([], |r| r.get(0))?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
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
            match tx.execute(
                "UPDATE dev_devices SET login_user = ?2 WHERE id = ?1",
                params![device_id, user],
            )? {
                0 => Err(StoreError::NotFound(format!("no device {device_id:?}"))),
                _ => Ok(()),
            }
        })
    }

    fn set_channel(
        &self,
        device_id: String,
        node: String,
        open: bool,
    ) -> BoxFuture<'_, StoreResult<()>> {
        self.write(move |tx| {
            if open {
                tx.execute("UPDATE dev_devices SET channel_node = ?2 WHERE id = ?1", params![device_id, node])?;
            } else {
                tx.execute(
                    "UPDATE dev_devices SET channel_node = NULL WHERE id = ?1 AND channel_node = ?2",
                    params![device_id, node],
                )?;
            }
            Ok(())
        })
    }

    fn defaults(&self) -> BoxFuture<'_, StoreResult<Value>> {
        self.read(read_defaults)
    }

    fn set_defaults(&self, settings: Value) -> BoxFuture<'_, StoreResult<()>> {
        self.write(move |tx| {
            tx.execute(
                "INSERT INTO dev_meta (key, value) VALUES ('defaults', ?1) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [settings.to_string()],
            )?;
            Ok(())
        })
    }

    fn groups(&self) -> BoxFuture<'_, StoreResult<Vec<Group>>> {
        self.read(read_groups)
    }

    fn put_group(&self, g: Group) -> BoxFuture<'_, StoreResult<()>> {
        self.write(move |tx| {
            tx.execute(
                "INSERT INTO dev_groups (name, priority, settings) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (name) DO UPDATE SET priority = excluded.priority, settings = excluded.settings",
                params![g.name, g.priority, g.settings.to_string()],
            )?;
            Ok(())
        })
    }

    fn delete_group(&self, name: String) -> BoxFuture<'_, StoreResult<()>> {
        self.write(move |tx| {
            match tx.execute("DELETE FROM dev_groups WHERE name = ?1", [&name])? {
                0 => Err(StoreError::NotFound(format!("no group {name:?}"))),
                _ => Ok(()),
            }
        })
    }

    fn users(&self) -> BoxFuture<'_, StoreResult<Vec<UserProfile>>> {
        self.read(read_users)
    }

    fn put_user(&self, u: UserProfile) -> BoxFuture<'_, StoreResult<()>> {
        self.write(move |tx| {
            tx.execute(
                "INSERT INTO dev_users (name, settings) VALUES (?1, ?2) \
                 ON CONFLICT (name) DO UPDATE SET settings = excluded.settings",
                params![u.name, u.settings.to_string()],
            )?;
            Ok(())
        })
    }

    fn delete_user(&self, name: String) -> BoxFuture<'_, StoreResult<()>> {
        self.write(move |tx| {
            match tx.execute("DELETE FROM dev_users WHERE name = ?1", [&name])? {
                0 => Err(StoreError::NotFound(format!("no user {name:?}"))),
                _ => Ok(()),
            }
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
                        .query_row(
                            "SELECT settings FROM dev_users WHERE name = ?1",
                            [&u],
                            |r| r.get(0),
                        )
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

    fn queue_command(&self, c: Command) -> BoxFuture<'_, StoreResult<Command>> {
        self.write(move |tx| {
            let revoked: Option<Option<i64>> = tx
                .query_row(
                    "SELECT revoked_at FROM dev_devices WHERE id = ?1",
                    [&c.device_id],
                    |r| r.get(0),
                )
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
            let seq = insert_command(tx, &c, false)?;
            Ok(Command { seq, ..c })
        })
    }

    fn pending_commands(&self, device_id: String) -> BoxFuture<'_, StoreResult<Vec<Command>>> {
        self.read(move |tx| {
            let sql = format!(
                "SELECT {COMMAND_COLUMNS} FROM dev_commands WHERE device_id = ?1 AND acked_at IS NULL ORDER BY seq"
            );
            query_commands(tx, &sql, [&device_id])
        })
    }

    fn pending_count(&self, device_id: String) -> BoxFuture<'_, StoreResult<i64>> {
        self.read(move |tx| {
            Ok(tx.query_row(
                "SELECT count(*) FROM dev_commands WHERE device_id = ?1 AND acked_at IS NULL",
                [&device_id],
                |r| r.get(0),
            )?)
        })
    }

    fn commands(&self, device_id: String, limit: i64) -> BoxFuture<'_, StoreResult<Vec<Command>>> {
        self.read(move |tx| {
            let sql = format!("SELECT {COMMAND_COLUMNS} FROM dev_commands WHERE device_id = ?1 ORDER BY seq DESC LIMIT ?2");
            query_commands(tx, &sql, params![device_id, limit])
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
                "UPDATE dev_commands SET acked_at = ?3, status = ?4, result = ?5 \
                 WHERE id = ?1 AND device_id = ?2 AND acked_at IS NULL",
                params![command_id, device_id, now, status, result.to_string()],
            )?;
            let sql = format!(
                "SELECT {COMMAND_COLUMNS} FROM dev_commands WHERE id = ?1 AND device_id = ?2"
            );
            query_commands(tx, &sql, params![command_id, device_id])?
                .pop()
                .ok_or_else(|| {
                    StoreError::NotFound(format!("no command {command_id:?} for this device"))
                })
        })
    }

    fn export(&self) -> BoxFuture<'_, StoreResult<Snapshot>> {
        self.read(|tx| {
            let sql = format!("SELECT {DEVICE_COLUMNS} FROM dev_devices ORDER BY id");
            let mut st = tx.prepare(&sql)?;
            let rows = st
                .query_map([], device_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let devices = rows
                .into_iter()
                .map(|r| finish_device(tx, r))
                .collect::<StoreResult<_>>()?;
            let commands = query_commands(
                tx,
                &format!("SELECT {COMMAND_COLUMNS} FROM dev_commands ORDER BY seq"),
                [],
            )?;
            Ok(Snapshot {
                format: SNAPSHOT_FORMAT.to_string(),
                version: SNAPSHOT_VERSION,
                exported_at: now_ms(),
                defaults: read_defaults(tx)?,
                groups: read_groups(tx)?,
                users: read_users(tx)?,
                tokens: read_tokens(tx)?,
                devices,
                commands,
                ca: None,
            })
        })
    }

    fn import(&self, s: Snapshot) -> BoxFuture<'_, StoreResult<()>> {
        self.write(move |tx| {
            check_snapshot(&s)?;
            tx.execute_batch(
                "DELETE FROM dev_commands; DELETE FROM dev_members; DELETE FROM dev_devices; \
                 DELETE FROM dev_groups; DELETE FROM dev_users; DELETE FROM dev_tokens; DELETE FROM dev_meta;",
            )?;
            tx.execute("INSERT INTO dev_meta (key, value) VALUES ('defaults', ?1)", [s.defaults.to_string()])?;
            for g in &s.groups {
                tx.execute(
                    "INSERT INTO dev_groups (name, priority, settings) VALUES (?1, ?2, ?3)",
                    params![g.name, g.priority, g.settings.to_string()],
                )?;
            }
            for u in &s.users {
                tx.execute("INSERT INTO dev_users (name, settings) VALUES (?1, ?2)", params![u.name, u.settings.to_string()])?;
            }
            for t in &s.tokens {
                insert_token(tx, t)?;
            }
            for d in &s.devices {
                // A channel recorded in the export belongs to a process
                // that is not this one.
                insert_device(tx, &Device { channel_node: None, ..d.clone() })?;
            }
            for c in &s.commands {
                insert_command(tx, c, true)?;
            }
            Ok(())
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
            .inner
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
