//! The shared store: PostgreSQL, for several balancers serving one fleet.
//!
//! Same tables and semantics as the SQLite store. Connections come from a
//! small pool that reconnects lazily, so a database restart costs failed
//! requests while it is down, not a balancer restart. Balancers tell each
//! other about queued commands and revocations with NOTIFY on one channel;
//! each keeps one extra connection that LISTENs and reconnects with
//! backoff, and after a reconnect asks for a resync (events sent while it
//! was away are lost, the database state is not).

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::{broadcast, Mutex, MutexGuard};
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Client, Config, NoTls, Row, Transaction};

use super::{check_snapshot, like_pattern, parse_json, Store, StoreError, StoreEvent, StoreResult};
use crate::module::devices::model::*;
use crate::module::BoxFuture;

const POOL: usize = 4;
const CHANNEL: &str = "fleetgate_devices";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS dev_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dev_tokens (
    id TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL UNIQUE,
    label TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    uses_left BIGINT NOT NULL,
    used BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS dev_devices (
    id TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    serial TEXT NOT NULL,
    cert_pem TEXT NOT NULL,
    settings TEXT NOT NULL,
    login_user TEXT,
    enrolled_at BIGINT NOT NULL,
    token_id TEXT,
    last_contact BIGINT,
    revoked_at BIGINT,
    channel_node TEXT
);
CREATE TABLE IF NOT EXISTS dev_groups (name TEXT PRIMARY KEY, priority BIGINT NOT NULL, settings TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dev_members (
    device_id TEXT NOT NULL REFERENCES dev_devices(id) ON DELETE CASCADE,
    group_name TEXT NOT NULL REFERENCES dev_groups(name) ON DELETE CASCADE,
    PRIMARY KEY (device_id, group_name)
);
CREATE INDEX IF NOT EXISTS dev_members_group ON dev_members(group_name);
CREATE TABLE IF NOT EXISTS dev_users (name TEXT PRIMARY KEY, settings TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dev_commands (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    device_id TEXT NOT NULL REFERENCES dev_devices(id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    acked_at BIGINT,
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

type Param<'a> = &'a (dyn ToSql + Sync);

pub struct PgStore {
    config: Config,
    pool: Vec<Mutex<Option<Client>>>,
    events: broadcast::Sender<StoreEvent>,
    listener: tokio::task::JoinHandle<()>,
}

fn backend(e: tokio_postgres::Error) -> StoreError {
    // The SQLSTATE says more than the Display of a db error.
    match e.as_db_error() {
        Some(db) => {
            StoreError::Backend(format!("postgres: {} ({})", db.message(), db.code().code()))
        }
        None => StoreError::Backend(format!("postgres: {e}")),
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        backend(e)
    }
}

fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
}

async fn connect(config: &Config) -> StoreResult<Client> {
    let (client, conn) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "devices store: postgres connection closed");
        }
    });
    Ok(client)
}

/// A pooled connection, reconnected if it had died.
struct Conn<'a>(MutexGuard<'a, Option<Client>>);

impl std::ops::Deref for Conn<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.0.as_ref().expect("connected")
    }
}

impl std::ops::DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.0.as_mut().expect("connected")
    }
}

impl PgStore {
    /// Connect, create the tables if needed, and start listening for other
    /// balancers' events.
    pub async fn connect(url: &str) -> StoreResult<PgStore> {
        let mut config: Config = url
            .parse()
            .map_err(|e| StoreError::Backend(format!("postgres url: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        config.application_name("fleetgate-devices");
        let mut first = connect(&config).await?;
        {
            // Balancers starting together would race on CREATE ... IF NOT
            // EXISTS (it is not atomic in the catalog); serialize them.
            let tx = first.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock(7301215560497350001)", &[])
                .await?;
            tx.batch_execute(SCHEMA).await?;
            tx.commit().await?;
        }
        let mut pool = vec![Mutex::new(Some(first))];
        pool.extend((1..POOL).map(|_| Mutex::new(None)));
        let (events, _) = broadcast::channel(1024);
        let listener = tokio::spawn(listen(config.clone(), events.clone()));
        Ok(PgStore {
            config,
            pool,
            events,
            listener,
        })
    }

    async fn conn(&self) -> StoreResult<Conn<'_>> {
        let mut guard = match self.pool.iter().find_map(|m| m.try_lock().ok()) {
            Some(g) => g,
            None => self.pool[fastrand::usize(..self.pool.len())].lock().await,
        };
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = Some(connect(&self.config).await?);
        }
        Ok(Conn(guard))
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// Keep a LISTEN connection open, forwarding notifications; reconnect with
/// backoff and ask for a resync after each reconnect.
async fn listen(config: Config, events: broadcast::Sender<StoreEvent>) {
    let mut backoff = Duration::from_millis(200);
    let mut first = true;
    loop {
        match config.connect(NoTls).await {
            Ok((client, mut conn)) => {
                let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
                let sql = format!("LISTEN {CHANNEL}");
                let ok = {
                    let listening = client.batch_execute(&sql);
                    // The LISTEN only completes while the connection is polled.
                    let mut listening = std::pin::pin!(listening);
                    loop {
                        tokio::select! {
                            r = &mut listening => break r.is_ok(),
                            m = messages.next() => if !matches!(m, Some(Ok(_))) { break false },
                        }
                    }
                };
                if ok {
                    backoff = Duration::from_millis(200);
                    if !first {
                        let _ = events.send(StoreEvent::Resync);
                    }
                    first = false;
                    while let Some(Ok(m)) = messages.next().await {
                        if let AsyncMessage::Notification(n) = m {
                            match StoreEvent::decode(n.payload()) {
                                Some(ev) => {
                                    let _ = events.send(ev);
                                }
                                None => tracing::warn!(
                                    payload = n.payload(),
                                    "devices store: unknown notification"
                                ),
                            }
                        }
                    }
                }
                drop(client);
                tracing::warn!("devices store: postgres LISTEN connection lost; reconnecting");
            }
            Err(e) => {
                tracing::warn!(error = %e, "devices store: postgres LISTEN connection failed")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

fn device_row(r: &Row) -> StoreResult<Device> {
    Ok(Device {
        id: r.try_get(0)?,
        fingerprint: r.try_get(1)?,
        name: r.try_get(2)?,
        serial: r.try_get(3)?,
        cert_pem: r.try_get(4)?,
        groups: Vec::new(),
        settings: parse_json(r.try_get(5)?)?,
        session_user: r.try_get(6)?,
        enrolled_at: r.try_get(7)?,
        token_id: r.try_get(8)?,
        last_contact: r.try_get(9)?,
        revoked_at: r.try_get(10)?,
        channel_node: r.try_get(11)?,
    })
}

/// Rows to devices, with each one's groups (one query for all of them).
async fn finish_devices(tx: &Transaction<'_>, rows: Vec<Row>) -> StoreResult<Vec<Device>> {
    let mut devices = rows
        .iter()
        .map(device_row)
        .collect::<StoreResult<Vec<_>>>()?;
    if devices.is_empty() {
        return Ok(devices);
    }
    let ids: Vec<&str> = devices.iter().map(|d| d.id.as_str()).collect();
    let members = tx
        .query(
            "SELECT device_id, group_name FROM dev_members WHERE device_id = ANY($1) ORDER BY group_name",
            &[&ids],
        )
        .await?;
    let mut by_device: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in members {
        by_device
            .entry(m.try_get(0)?)
            .or_default()
            .push(m.try_get(1)?);
    }
    for d in &mut devices {
        d.groups = by_device.remove(&d.id).unwrap_or_default();
    }
    Ok(devices)
}

async fn load_device(tx: &Transaction<'_>, id: &str) -> StoreResult<Option<Device>> {
    let rows = tx
        .query(
            &format!("SELECT {DEVICE_COLUMNS} FROM dev_devices WHERE id = $1"),
            &[&id],
        )
        .await?;
    Ok(finish_devices(tx, rows).await?.pop())
}

fn command_row(r: &Row) -> StoreResult<Command> {
    let kind: &str = r.try_get(3)?;
    let result: Option<&str> = r.try_get(8)?;
    Ok(Command {
        seq: r.try_get(0)?,
        id: r.try_get(1)?,
        device_id: r.try_get(2)?,
        kind: CommandKind::parse(kind).unwrap_or(CommandKind::Custom),
        payload: parse_json(r.try_get(4)?)?,
        created_at: r.try_get(5)?,
        acked_at: r.try_get(6)?,
        status: r.try_get(7)?,
        result: result.map(parse_json).transpose()?,
    })
}

async fn query_commands(
    tx: &Transaction<'_>,
    sql: &str,
    p: &[Param<'_>],
) -> StoreResult<Vec<Command>> {
    tx.query(sql, p).await?.iter().map(command_row).collect()
}

async fn set_members(tx: &Transaction<'_>, device_id: &str, groups: &[String]) -> StoreResult<()> {
    let known = tx
        .query(
            "SELECT name FROM dev_groups WHERE name = ANY($1)",
            &[&groups],
        )
        .await?;
    let known: Vec<String> = known
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    if let Some(g) = groups.iter().find(|g| !known.contains(g)) {
        return Err(StoreError::Conflict(format!("no group named {g:?}")));
    }
    tx.execute(
        "DELETE FROM dev_members WHERE device_id = $1",
        &[&device_id],
    )
    .await?;
    tx.execute(
        "INSERT INTO dev_members (device_id, group_name) SELECT $1, g FROM unnest($2::text[]) AS g ON CONFLICT DO NOTHING",
        &[&device_id, &groups],
    )
    .await?;
    Ok(())
}

async fn insert_device(tx: &Transaction<'_>, d: &Device) -> StoreResult<()> {
    let sql = format!("INSERT INTO dev_devices ({DEVICE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)");
    let settings = d.settings.to_string();
    tx.execute(
        &sql,
        &[
            &d.id,
            &d.fingerprint,
            &d.name,
            &d.serial,
            &d.cert_pem,
            &settings,
            &d.session_user,
            &d.enrolled_at,
            &d.token_id,
            &d.last_contact,
            &d.revoked_at,
            &d.channel_node,
        ],
    )
    .await
    .map_err(|e| match is_unique_violation(&e) {
        true => StoreError::Conflict(format!(
            "device {} or its certificate is already enrolled",
            d.id
        )),
        false => backend(e),
    })?;
    set_members(tx, &d.id, &d.groups).await
}

async fn insert_token(tx: &Transaction<'_>, t: &EnrolToken) -> StoreResult<()> {
    tx.execute(
        "INSERT INTO dev_tokens (id, secret_sha256, label, created_at, expires_at, uses_left, used) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[&t.id, &t.secret_sha256, &t.label, &t.created_at, &t.expires_at, &t.uses_left, &t.used],
    )
    .await?;
    Ok(())
}

async fn read_defaults(tx: &Transaction<'_>) -> StoreResult<Value> {
    let row = tx
        .query_opt("SELECT value FROM dev_meta WHERE key = 'defaults'", &[])
        .await?;
    match row {
        Some(r) => parse_json(r.try_get(0)?),
        None => Ok(empty_object()),
    }
}

async fn read_groups(tx: &Transaction<'_>) -> StoreResult<Vec<Group>> {
    let rows = tx
        .query(
            "SELECT name, priority, settings FROM dev_groups ORDER BY priority, name",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Group {
                name: r.try_get(0)?,
                priority: r.try_get(1)?,
                settings: parse_json(r.try_get(2)?)?,
            })
        })
        .collect()
}

async fn read_users(tx: &Transaction<'_>) -> StoreResult<Vec<UserProfile>> {
    let rows = tx
        .query("SELECT name, settings FROM dev_users ORDER BY name", &[])
        .await?;
    rows.iter()
        .map(|r| {
            Ok(UserProfile {
                name: r.try_get(0)?,
                settings: parse_json(r.try_get(1)?)?,
            })
        })
        .collect()
}

async fn read_tokens(tx: &Transaction<'_>) -> StoreResult<Vec<EnrolToken>> {
    let rows = tx
        .query(
            "SELECT id, secret_sha256, label, created_at, expires_at, uses_left, used FROM dev_tokens ORDER BY created_at, id",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(EnrolToken {
                id: r.try_get(0)?,
                secret_sha256: r.try_get(1)?,
                label: r.try_get(2)?,
                created_at: r.try_get(3)?,
                expires_at: r.try_get(4)?,
                uses_left: r.try_get(5)?,
                used: r.try_get(6)?,
            })
        })
        .collect()
}

/// Tell the other balancers, as part of the transaction: PostgreSQL
/// delivers the notification if and only if the change commits, so a
/// balancer dying between its commit and a separate NOTIFY cannot leave the
/// others' caches stale (see cache.rs).
async fn notify_changed(tx: &Transaction<'_>, device_id: Option<&str>) -> StoreResult<()> {
    let ev = StoreEvent::Changed {
        device_id: device_id.map(str::to_string),
    };
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &ev.encode()])
        .await?;
    Ok(())
}

fn not_found<T>(what: String) -> StoreResult<T> {
    Err(StoreError::NotFound(what))
}

/// Run the block in one transaction on a pooled connection; commit if it
/// returns `Ok` (dropping the transaction rolls back otherwise).
macro_rules! in_tx {
    ($self:ident, |$tx:ident| $body:expr) => {
        Box::pin(async move {
            let mut conn = $self.conn().await?;
            let $tx = conn.transaction().await?;
            let r = $body;
            $tx.commit().await?;
            Ok(r)
        })
    };
}

impl Store for PgStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn insert_token(&self, token: EnrolToken) -> BoxFuture<'_, StoreResult<()>> {
        in_tx!(self, |tx| insert_token(&tx, &token).await?)
    }

    fn list_tokens(&self) -> BoxFuture<'_, StoreResult<Vec<EnrolToken>>> {
        in_tx!(self, |tx| read_tokens(&tx).await?)
    }

    fn delete_token(&self, id: String) -> BoxFuture<'_, StoreResult<()>> {
        in_tx!(self, |tx| if tx
            .execute("DELETE FROM dev_tokens WHERE id = $1", &[&id])
            .await?
            == 0
        {
            return not_found(format!("no token {id:?}"));
        })
    }

    fn enrol(
        &self,
        secret_sha256: String,
        now: i64,
        device: Device,
    ) -> BoxFuture<'_, StoreResult<Device>> {
        in_tx!(self, |tx| {
            let row = tx
                .query_opt(
                    "UPDATE dev_tokens SET uses_left = uses_left - 1, used = used + 1 \
                     WHERE secret_sha256 = $1 AND expires_at > $2 AND uses_left > 0 RETURNING id",
                    &[&secret_sha256, &now],
                )
                .await?;
            let Some(row) = row else {
                return Err(StoreError::TokenRejected);
            };
            let device = Device {
                token_id: Some(row.try_get(0)?),
                ..device
            };
            insert_device(&tx, &device).await?;
            device
        })
    }

    fn device(&self, id: String) -> BoxFuture<'_, StoreResult<Option<Device>>> {
        in_tx!(self, |tx| load_device(&tx, &id).await?)
    }

    fn device_by_fingerprint(
        &self,
        fingerprint: String,
    ) -> BoxFuture<'_, StoreResult<Option<Device>>> {
        in_tx!(self, |tx| {
            let sql = format!("SELECT {DEVICE_COLUMNS} FROM dev_devices WHERE fingerprint = $1");
            let rows = tx.query(&sql, &[&fingerprint]).await?;
            finish_devices(&tx, rows).await?.pop()
        })
    }

    fn list_devices(&self, q: DeviceQuery) -> BoxFuture<'_, StoreResult<(Vec<Device>, i64)>> {
        in_tx!(self, |tx| {
            let mut cond = vec!["TRUE".to_string()];
            let mut args: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
            if let Some(s) = &q.search {
                args.push(Box::new(like_pattern(s)));
                let n = args.len();
                cond.push(format!(
                    "(lower(name) LIKE ${n} ESCAPE '\\' OR id LIKE ${n} ESCAPE '\\' OR fingerprint LIKE ${n} ESCAPE '\\')"
                ));
            }
            if let Some(g) = &q.group {
                args.push(Box::new(g.clone()));
                cond.push(format!(
                    "id IN (SELECT device_id FROM dev_members WHERE group_name = ${})",
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
                cond.push(format!("last_contact >= ${}", args.len()));
            }
            if let Some(t) = q.silent_since {
                args.push(Box::new(t));
                cond.push(format!(
                    "(last_contact IS NULL OR last_contact < ${})",
                    args.len()
                ));
            }
            let filter = cond.join(" AND ");
            let params: Vec<Param> = args.iter().map(|a| a.as_ref() as Param).collect();
            let total: i64 = tx
                .query_one(
                    &format!("SELECT count(*) FROM dev_devices WHERE {filter}"),
                    &params,
                )
                .await?
                .try_get(0)?;
            let n = params.len();
            let sql = format!(
                "SELECT {DEVICE_COLUMNS} FROM dev_devices WHERE {filter} ORDER BY id LIMIT ${} OFFSET ${}",
                n + 1,
                n + 2
            );
            let mut params = params;
            params.push(&q.limit);
            params.push(&q.offset);
            let rows = tx.query(&sql, &params).await?;
            (finish_devices(&tx, rows).await?, total)
        })
    }

    fn patch_device(&self, id: String, patch: DevicePatch) -> BoxFuture<'_, StoreResult<Device>> {
        in_tx!(self, |tx| {
            // Lock the row: concurrent patches apply one after the other.
            if tx
                .query_opt("SELECT 1 FROM dev_devices WHERE id = $1 FOR UPDATE", &[&id])
                .await?
                .is_none()
            {
                return not_found(format!("no device {id:?}"));
            }
            if let Some(name) = &patch.name {
                tx.execute(
                    "UPDATE dev_devices SET name = $2 WHERE id = $1",
                    &[&id, name],
                )
                .await?;
            }
            if let Some(s) = &patch.settings {
                tx.execute(
                    "UPDATE dev_devices SET settings = $2 WHERE id = $1",
                    &[&id, &s.to_string()],
                )
                .await?;
            }
            if let Some(groups) = &patch.groups {
                set_members(&tx, &id, groups).await?;
            }
            notify_changed(&tx, Some(&id)).await?;
            match load_device(&tx, &id).await? {
                Some(d) => d,
                None => return not_found(format!("no device {id:?}")),
            }
        })
    }

    fn revoke_device(&self, id: String, now: i64) -> BoxFuture<'_, StoreResult<Device>> {
        in_tx!(self, |tx| {
            tx.execute(
                "UPDATE dev_devices SET revoked_at = coalesce(revoked_at, $2) WHERE id = $1",
                &[&id, &now],
            )
            .await?;
            match load_device(&tx, &id).await? {
                Some(d) => d,
                None => return not_found(format!("no device {id:?}")),
            }
        })
    }

    fn revoked_fingerprints(&self) -> BoxFuture<'_, StoreResult<Vec<String>>> {
        in_tx!(self, |tx| {
            let rows = tx
                .query(
                    "SELECT fingerprint FROM dev_devices WHERE revoked_at IS NOT NULL",
                    &[],
                )
                .await?;
            rows.iter()
                .map(|r| r.try_get(0))
                .collect::<Result<Vec<String>, _>>()?
        })
    }

    fn record_contacts(&self, contacts: Vec<(String, i64)>) -> BoxFuture<'_, StoreResult<()>> {
        // One statement for the batch. Duplicates are folded first (an
        // UPDATE ... FROM applies one arbitrary match per row), and ids are
        // sorted so that balancers updating overlapping batches lock rows
        // in the same order and cannot deadlock.
        let mut latest: BTreeMap<String, i64> = BTreeMap::new();
        for (id, at) in contacts {
            let e = latest.entry(id).or_insert(at);
            *e = (*e).max(at);
        }
        let (ids, times): (Vec<String>, Vec<i64>) = latest.into_iter().unzip();
        in_tx!(self, |tx| {
            tx.execute(
                "UPDATE dev_devices d SET last_contact = GREATEST(coalesce(d.last_contact, v.t), v.t) \
                 FROM (SELECT * FROM unnest($1::text[], $2::bigint[]) AS u(id, t) ORDER BY id) v \
                 WHERE d.id = v.id",
                &[&ids, &times],
            )
            .await?;
        })
    }

    fn set_session(
        &self,
        device_id: String,
        user: Option<String>,
    ) -> BoxFuture<'_, StoreResult<()>> {
        in_tx!(self, |tx| {
            let n = tx
                .execute(
                    "UPDATE dev_devices SET login_user = $2 WHERE id = $1",
                    &[&device_id, &user],
                )
                .await?;
            if n == 0 {
                return not_found(format!("no device {device_id:?}"));
            }
            notify_changed(&tx, Some(&device_id)).await?;
        })
    }

    fn set_channel(
        &self,
        device_id: String,
        node: String,
        open: bool,
    ) -> BoxFuture<'_, StoreResult<()>> {
        in_tx!(self, |tx| {
            let sql = match open {
                true => "UPDATE dev_devices SET channel_node = $2 WHERE id = $1",
                false => {
                    "UPDATE dev_devices SET channel_node = NULL WHERE id = $1 AND channel_node = $2"
                }
            };
            tx.execute(sql, &[&device_id, &node]).await?;
        })
    }

    fn defaults(&self) -> BoxFuture<'_, StoreResult<Value>> {
        in_tx!(self, |tx| read_defaults(&tx).await?)
    }

    fn set_defaults(&self, settings: Value) -> BoxFuture<'_, StoreResult<()>> {
        in_tx!(self, |tx| {
            tx.execute(
                "INSERT INTO dev_meta (key, value) VALUES ('defaults', $1) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                &[&settings.to_string()],
            )
            .await?;
            notify_changed(&tx, None).await?;
        })
    }

    fn groups(&self) -> BoxFuture<'_, StoreResult<Vec<Group>>> {
        in_tx!(self, |tx| read_groups(&tx).await?)
    }

    fn put_group(&self, g: Group) -> BoxFuture<'_, StoreResult<()>> {
        in_tx!(self, |tx| {
            tx.execute(
                "INSERT INTO dev_groups (name, priority, settings) VALUES ($1, $2, $3) \
                 ON CONFLICT (name) DO UPDATE SET priority = excluded.priority, settings = excluded.settings",
                &[&g.name, &g.priority, &g.settings.to_string()],
            )
            .await?;
            notify_changed(&tx, None).await?;
        })
    }

    fn delete_group(&self, name: String) -> BoxFuture<'_, StoreResult<()>> {
        in_tx!(self, |tx| {
            if tx
                .execute("DELETE FROM dev_groups WHERE name = $1", &[&name])
                .await?
                == 0
            {
                return not_found(format!("no group {name:?}"));
            }
            notify_changed(&tx, None).await?;
        })
    }

    fn users(&self) -> BoxFuture<'_, StoreResult<Vec<UserProfile>>> {
        in_tx!(self, |tx| read_users(&tx).await?)
    }

    fn put_user(&self, u: UserProfile) -> BoxFuture<'_, StoreResult<()>> {
        in_tx!(self, |tx| {
            tx.execute(
                "INSERT INTO dev_users (name, settings) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET settings = excluded.settings",
                &[&u.name, &u.settings.to_string()],
            )
            .await?;
            notify_changed(&tx, None).await?;
        })
    }

    fn delete_user(&self, name: String) -> BoxFuture<'_, StoreResult<()>> {
        in_tx!(self, |tx| {
            if tx
                .execute("DELETE FROM dev_users WHERE name = $1", &[&name])
                .await?
                == 0
            {
                return not_found(format!("no user {name:?}"));
            }
            notify_changed(&tx, None).await?;
        })
    }

    fn settings_inputs(&self, device_id: String) -> BoxFuture<'_, StoreResult<SettingsInputs>> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            // One snapshot for all the reads: the version must describe
            // exactly the settings returned with it.
            let tx = conn
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let Some(d) = load_device(&tx, &device_id).await? else {
                return not_found(format!("no device {device_id:?}"));
            };
            let groups = read_groups(&tx)
                .await?
                .into_iter()
                .filter(|g| d.groups.contains(&g.name))
                .collect();
            let user = match d.session_user {
                None => None,
                Some(u) => {
                    let row = tx
                        .query_opt("SELECT settings FROM dev_users WHERE name = $1", &[&u])
                        .await?;
                    let profile = match row {
                        Some(r) => Some(parse_json(r.try_get(0)?)?),
                        None => None,
                    };
                    Some((u, profile))
                }
            };
            let inputs = SettingsInputs {
                defaults: read_defaults(&tx).await?,
                groups,
                device: d.settings,
                user,
            };
            tx.commit().await?;
            Ok(inputs)
        })
    }

    fn queue_command(&self, c: Command) -> BoxFuture<'_, StoreResult<Command>> {
        in_tx!(self, |tx| {
            // FOR SHARE: a revocation committing meanwhile waits for us or
            // we see it; no command slips in after a revocation.
            let row = tx
                .query_opt(
                    "SELECT revoked_at FROM dev_devices WHERE id = $1 FOR SHARE",
                    &[&c.device_id],
                )
                .await?;
            match row.map(|r| r.try_get::<_, Option<i64>>(0)).transpose()? {
                None => return not_found(format!("no device {:?}", c.device_id)),
                Some(Some(_)) => {
                    return Err(StoreError::Conflict(format!(
                        "device {:?} is revoked",
                        c.device_id
                    )))
                }
                Some(None) => {}
            }
            let payload = c.payload.to_string();
            let row = tx
                .query_one(
                    "INSERT INTO dev_commands (id, device_id, kind, payload, created_at) VALUES ($1, $2, $3, $4, $5) RETURNING seq",
                    &[&c.id, &c.device_id, &c.kind.as_str(), &payload, &c.created_at],
                )
                .await?;
            notify_changed(&tx, Some(&c.device_id)).await?;
            Command {
                seq: row.try_get(0)?,
                ..c
            }
        })
    }

    fn pending_commands(&self, device_id: String) -> BoxFuture<'_, StoreResult<Vec<Command>>> {
        in_tx!(self, |tx| {
            let sql = format!("SELECT {COMMAND_COLUMNS} FROM dev_commands WHERE device_id = $1 AND acked_at IS NULL ORDER BY seq");
            query_commands(&tx, &sql, &[&device_id]).await?
        })
    }

    fn pending_count(&self, device_id: String) -> BoxFuture<'_, StoreResult<i64>> {
        in_tx!(self, |tx| tx
            .query_one(
                "SELECT count(*) FROM dev_commands WHERE device_id = $1 AND acked_at IS NULL",
                &[&device_id]
            )
            .await?
            .try_get::<_, i64>(0)?)
    }

    fn commands(&self, device_id: String, limit: i64) -> BoxFuture<'_, StoreResult<Vec<Command>>> {
        in_tx!(self, |tx| {
            let sql = format!("SELECT {COMMAND_COLUMNS} FROM dev_commands WHERE device_id = $1 ORDER BY seq DESC LIMIT $2");
            query_commands(&tx, &sql, &[&device_id, &limit]).await?
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
        in_tx!(self, |tx| {
            tx.execute(
                "UPDATE dev_commands SET acked_at = $3, status = $4, result = $5 \
                 WHERE id = $1 AND device_id = $2 AND acked_at IS NULL",
                &[&command_id, &device_id, &now, &status, &result.to_string()],
            )
            .await?;
            notify_changed(&tx, Some(&device_id)).await?;
            let sql = format!(
                "SELECT {COMMAND_COLUMNS} FROM dev_commands WHERE id = $1 AND device_id = $2"
            );
            match query_commands(&tx, &sql, &[&command_id, &device_id])
                .await?
                .pop()
            {
                Some(c) => c,
                None => return not_found(format!("no command {command_id:?} for this device")),
            }
        })
    }

    fn export(&self) -> BoxFuture<'_, StoreResult<Snapshot>> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            let tx = conn
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let rows = tx
                .query(
                    &format!("SELECT {DEVICE_COLUMNS} FROM dev_devices ORDER BY id"),
                    &[],
                )
                .await?;
            let devices = finish_devices(&tx, rows).await?;
            let commands = query_commands(
                &tx,
                &format!("SELECT {COMMAND_COLUMNS} FROM dev_commands ORDER BY seq"),
                &[],
            )
            .await?;
            let snapshot = Snapshot {
                format: SNAPSHOT_FORMAT.to_string(),
                version: SNAPSHOT_VERSION,
                exported_at: now_ms(),
                defaults: read_defaults(&tx).await?,
                groups: read_groups(&tx).await?,
                users: read_users(&tx).await?,
                tokens: read_tokens(&tx).await?,
                devices,
                commands,
                ca: None,
            };
            tx.commit().await?;
            Ok(snapshot)
        })
    }

    fn import(&self, s: Snapshot) -> BoxFuture<'_, StoreResult<()>> {
        in_tx!(self, |tx| {
            check_snapshot(&s)?;
            tx.batch_execute(
                "LOCK TABLE dev_meta, dev_tokens, dev_devices, dev_groups, dev_members, dev_users, dev_commands \
                 IN EXCLUSIVE MODE; \
                 DELETE FROM dev_commands; DELETE FROM dev_members; DELETE FROM dev_devices; \
                 DELETE FROM dev_groups; DELETE FROM dev_users; DELETE FROM dev_tokens; DELETE FROM dev_meta;",
            )
            .await?;
            tx.execute(
                "INSERT INTO dev_meta (key, value) VALUES ('defaults', $1)",
                &[&s.defaults.to_string()],
            )
            .await?;
            for g in &s.groups {
                tx.execute(
                    "INSERT INTO dev_groups (name, priority, settings) VALUES ($1, $2, $3)",
                    &[&g.name, &g.priority, &g.settings.to_string()],
                )
                .await?;
            }
            for u in &s.users {
                tx.execute(
                    "INSERT INTO dev_users (name, settings) VALUES ($1, $2)",
                    &[&u.name, &u.settings.to_string()],
                )
                .await?;
            }
            for t in &s.tokens {
                insert_token(&tx, t).await?;
            }
            for d in &s.devices {
                insert_device(
                    &tx,
                    &Device {
                        channel_node: None,
                        ..d.clone()
                    },
                )
                .await?;
            }
            for c in &s.commands {
                let result = c.result.as_ref().map(|r| r.to_string());
                tx.execute(
                    "INSERT INTO dev_commands (seq, id, device_id, kind, payload, created_at, acked_at, status, result) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    &[
                        &c.seq,
                        &c.id,
                        &c.device_id,
                        &c.kind.as_str(),
                        &c.payload.to_string(),
                        &c.created_at,
                        &c.acked_at,
                        &c.status,
                        &result,
                    ],
                )
                .await?;
            }
            // Explicit seqs bypass the sequence: move it past them.
            tx.execute(
                "SELECT setval(pg_get_serial_sequence('dev_commands', 'seq'), \
                 coalesce((SELECT max(seq) FROM dev_commands), 0) + 1, false)",
                &[],
            )
            .await?;
        })
    }

    fn publish(&self, event: StoreEvent) -> BoxFuture<'_, StoreResult<()>> {
        Box::pin(async move {
            let conn = self.conn().await?;
            conn.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &event.encode()])
                .await?;
            Ok(())
        })
    }

    fn subscribe(&self) -> Option<broadcast::Receiver<StoreEvent>> {
        Some(self.events.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The database for these tests, from `FLEETGATE_TEST_PG_URL`. In CI
    /// (`CI=true`) a missing URL fails the test: the PostgreSQL store must
    /// not go untested there by accident.
    pub(crate) fn test_url() -> Option<String> {
        match std::env::var("FLEETGATE_TEST_PG_URL") {
            Ok(u) if !u.is_empty() => Some(u),
            _ if std::env::var("CI").as_deref() == Ok("true") => {
                panic!("CI=true but FLEETGATE_TEST_PG_URL is not set: run .ci/pg-setup.sh first")
            }
            _ => {
                eprintln!("FLEETGATE_TEST_PG_URL not set: skipping the PostgreSQL store tests");
                None
            }
        }
    }

    // One test function: the suite empties the database, so two tests on
    // it must not run at the same time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_store_suite_and_notifications() {
        let Some(url) = test_url() else { return };
        let a = PgStore::connect(&url).await.unwrap();
        super::super::suite::run_all(&a).await;

        // Events from one balancer reach another (and itself).
        let b = PgStore::connect(&url).await.unwrap();
        let mut rx = b.subscribe().unwrap();
        // The LISTEN connection starts in the background: publish until
        // it is heard.
        let ev = StoreEvent::CommandQueued {
            device_id: "dev-x".into(),
        };
        let heard = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                a.publish(ev.clone()).await.unwrap();
                if let Ok(Ok(got)) =
                    tokio::time::timeout(Duration::from_millis(200), rx.recv()).await
                {
                    return got;
                }
            }
        })
        .await
        .expect("notification never arrived");
        assert_eq!(heard, ev);
    }
}
