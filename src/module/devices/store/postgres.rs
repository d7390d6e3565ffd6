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
use std::sync::LazyLock;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::broadcast;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Config, NoTls, Row};

use super::pg_pool::{self, Conn, Pool, Tx};

use super::sql::{self, Arg, Columns, Dialect, Statements};
use super::{check_snapshot, parse_json, NodeLease, Store, StoreError, StoreEvent, StoreResult};
use crate::module::devices::model::*;
use crate::module::BoxFuture;

const POOL: usize = 4;
const CHANNEL: &str = "fleetgate_devices";
/// Longest wait between two attempts to reopen the LISTEN connection.
const LISTEN_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// The shared statements (sql.rs) in PostgreSQL's dialect.
static SQL: LazyLock<Statements> = LazyLock::new(|| Statements::new(Dialect::Postgres));

type Param<'a> = &'a (dyn ToSql + Sync);

pub struct PgStore {
    pool: Pool,
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
        let mut first = pg_pool::connect(&config).await?;
        {
            // Balancers starting together would race on CREATE ... IF NOT
            // EXISTS (it is not atomic in the catalog); serialize them.
            let tx = first.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock(7301215560497350001)", &[])
                .await?;
            tx.batch_execute(&SQL.schema).await?;
            tx.commit().await?;
        }
        let (events, _) = broadcast::channel(1024);
        let listener = tokio::spawn(listen(config.clone(), events.clone()));
        Ok(PgStore {
            pool: Pool::new(config, POOL, first),
            events,
            listener,
        })
    }

    async fn conn(&self) -> StoreResult<Conn<'_>> {
        self.pool.get().await
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
        // Capped low: until it is back, commands queued on other
        // balancers wait for the resync that follows, and an attempt on a
        // database that is down costs one refused connection.
        backoff = (backoff * 2).min(LISTEN_BACKOFF_MAX);
    }
}

impl Columns for Row {
    fn text(&self, i: usize) -> StoreResult<String> {
        Ok(self.try_get(i)?)
    }
    fn opt_text(&self, i: usize) -> StoreResult<Option<String>> {
        Ok(self.try_get(i)?)
    }
    fn int(&self, i: usize) -> StoreResult<i64> {
        Ok(self.try_get(i)?)
    }
    fn opt_int(&self, i: usize) -> StoreResult<Option<i64>> {
        Ok(self.try_get(i)?)
    }
}

/// The driver's view of argument values built in sql.rs.
fn params<'a>(args: &'a [Arg<'a>]) -> Vec<Param<'a>> {
    args.iter()
        .map(|a| -> Param<'a> {
            match a {
                Arg::Text(s) => s,
                Arg::OptText(s) => s,
                Arg::Int(n) => n,
                Arg::OptInt(n) => n,
                Arg::Owned(s) => s,
                Arg::OptOwned(s) => s,
            }
        })
        .collect()
}

/// Every row of a statement, read with `read`.
async fn rows<T>(
    tx: &Tx<'_>,
    sql: &str,
    p: &[Param<'_>],
    read: fn(&dyn Columns) -> StoreResult<T>,
) -> StoreResult<Vec<T>> {
    let rows = tx.query(sql, p).await?;
    rows.iter().map(|r| read(r)).collect()
}

/// Devices with their groups (one query for the groups of all of them).
async fn devices(tx: &Tx<'_>, sql: &str, p: &[Param<'_>]) -> StoreResult<Vec<Device>> {
    let mut devices = rows(tx, sql, p, sql::device).await?;
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

async fn load_device(tx: &Tx<'_>, id: &str) -> StoreResult<Option<Device>> {
    Ok(devices(tx, &SQL.device, &[&id]).await?.pop())
}

async fn set_members(tx: &Tx<'_>, device_id: &str, groups: &[String]) -> StoreResult<()> {
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
    tx.execute(&SQL.clear_members, &[&device_id]).await?;
    tx.execute(
        "INSERT INTO dev_members (device_id, group_name) SELECT $1, g FROM unnest($2::text[]) AS g ON CONFLICT DO NOTHING",
        &[&device_id, &groups],
    )
    .await?;
    Ok(())
}

async fn insert_device(tx: &Tx<'_>, d: &Device) -> StoreResult<()> {
    let args = sql::device_args(d);
    tx.execute_raw(&SQL.insert_device, &params(&args))
        .await?
        .map_err(|e| match is_unique_violation(&e) {
            true => StoreError::Conflict(format!(
                "device {} or its certificate is already enrolled",
                d.id
            )),
            false => backend(e),
        })?;
    set_members(tx, &d.id, &d.groups).await
}

async fn insert_token(tx: &Tx<'_>, t: &EnrolToken) -> StoreResult<()> {
    let args = sql::token_args(t);
    tx.execute(&SQL.insert_token, &params(&args)).await?;
    Ok(())
}

async fn read_defaults(tx: &Tx<'_>) -> StoreResult<Value> {
    let row = tx.query_opt(&SQL.defaults, &[]).await?;
    sql::defaults(row.map(|r| r.try_get(0)).transpose()?)
}

async fn read_groups(tx: &Tx<'_>) -> StoreResult<Vec<Group>> {
    rows(tx, &SQL.groups, &[], sql::group).await
}

async fn read_users(tx: &Tx<'_>) -> StoreResult<Vec<UserProfile>> {
    rows(tx, &SQL.users, &[], sql::user).await
}

async fn read_tokens(tx: &Tx<'_>) -> StoreResult<Vec<EnrolToken>> {
    rows(tx, &SQL.tokens, &[], sql::token).await
}

/// Tell the other balancers, as part of the transaction: PostgreSQL
/// delivers the notification if and only if the change commits, so a
/// balancer dying between its commit and a separate NOTIFY cannot leave the
/// others' caches stale (see cache.rs).
async fn notify_changed(tx: &Tx<'_>, device_id: Option<&str>) -> StoreResult<()> {
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

/// Run read-only statements on a pooled connection without a transaction:
/// at READ COMMITTED a transaction gives each statement its own snapshot
/// anyway, so BEGIN and COMMIT around reads only cost two round trips.
macro_rules! read {
    ($self:ident, |$tx:ident| $body:expr) => {
        Box::pin(async move {
            let mut conn = $self.conn().await?;
            let $tx = conn.direct();
            Ok($body)
        })
    };
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
        read!(self, |tx| read_tokens(&tx).await?)
    }

    fn delete_token(&self, id: String) -> BoxFuture<'_, StoreResult<()>> {
        in_tx!(
            self,
            |tx| if tx.execute(&SQL.delete_token, &[&id]).await? == 0 {
                return not_found(format!("no token {id:?}"));
            }
        )
    }

    fn enrol(
        &self,
        secret_sha256: String,
        now: i64,
        device: Device,
    ) -> BoxFuture<'_, StoreResult<Device>> {
        // A morning storm enrols thousands of devices on one token, and
        // spending it locks its row until the commit: every enrolment
        // waits for the one before it. So the token is only read (no lock)
        // before the device is written, and spent last, holding the row
        // for one statement and the commit instead of the whole
        // transaction. A token used up meanwhile still refuses: the spend
        // finds no row and the transaction rolls back.
        in_tx!(self, |tx| {
            let row = tx
                .query_opt(&SQL.usable_token, &[&secret_sha256, &now])
                .await?;
            let Some(row) = row else {
                return Err(StoreError::TokenRejected);
            };
            let device = Device {
                token_id: Some(row.try_get(0)?),
                ..device
            };
            insert_device(&tx, &device).await?;
            let spent = tx
                .query_opt(&SQL.spend_token, &[&secret_sha256, &now])
                .await?;
            if spent.is_none() {
                return Err(StoreError::TokenRejected);
            }
            device
        })
    }

    fn device(&self, id: String) -> BoxFuture<'_, StoreResult<Option<Device>>> {
        read!(self, |tx| load_device(&tx, &id).await?)
    }

    fn device_by_fingerprint(
        &self,
        fingerprint: String,
    ) -> BoxFuture<'_, StoreResult<Option<Device>>> {
        read!(self, |tx| devices(
            &tx,
            &SQL.device_by_fingerprint,
            &[&fingerprint]
        )
        .await?
        .pop())
    }

    fn list_devices(&self, q: DeviceQuery) -> BoxFuture<'_, StoreResult<(Vec<Device>, i64)>> {
        read!(self, |tx| {
            let list = sql::list_devices(Dialect::Postgres, &q);
            let mut args = params(&list.args);
            let total: i64 = tx.query_one(&list.count, &args).await?.try_get(0)?;
            args.push(&q.limit);
            args.push(&q.offset);
            (devices(&tx, &list.page, &args).await?, total)
        })
    }

    fn patch_device(&self, id: String, patch: DevicePatch) -> BoxFuture<'_, StoreResult<Device>> {
        in_tx!(self, |tx| {
            // Lock the row: concurrent patches apply one after the other.
            if tx.query_opt(&SQL.lock_device, &[&id]).await?.is_none() {
                return not_found(format!("no device {id:?}"));
            }
            if let Some(name) = &patch.name {
                tx.execute(&SQL.set_name, &[&id, name]).await?;
            }
            if let Some(s) = &patch.settings {
                tx.execute(&SQL.set_settings, &[&id, &s.to_string()])
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
            tx.execute(&SQL.revoke, &[&id, &now]).await?;
            match load_device(&tx, &id).await? {
                Some(d) => d,
                None => return not_found(format!("no device {id:?}")),
            }
        })
    }

    fn revoked_fingerprints(&self) -> BoxFuture<'_, StoreResult<Vec<String>>> {
        read!(self, |tx| rows(&tx, &SQL.revoked_fingerprints, &[], |r| r
            .text(0))
        .await?)
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
            if tx.execute(&SQL.set_session, &[&device_id, &user]).await? == 0 {
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
            let sql = if open {
                &SQL.open_channel
            } else {
                &SQL.close_channel
            };
            tx.execute(sql, &[&device_id, &node]).await?;
        })
    }

    fn defaults(&self) -> BoxFuture<'_, StoreResult<Value>> {
        read!(self, |tx| read_defaults(&tx).await?)
    }

    fn set_defaults(&self, settings: Value) -> BoxFuture<'_, StoreResult<()>> {
        in_tx!(self, |tx| {
            tx.execute(&SQL.put_defaults, &[&settings.to_string()])
                .await?;
            notify_changed(&tx, None).await?;
        })
    }

    fn groups(&self) -> BoxFuture<'_, StoreResult<Vec<Group>>> {
        read!(self, |tx| read_groups(&tx).await?)
    }

    fn put_group(&self, g: Group) -> BoxFuture<'_, StoreResult<()>> {
        in_tx!(self, |tx| {
            tx.execute(
                &SQL.put_group,
                &[&g.name, &g.priority, &g.settings.to_string()],
            )
            .await?;
            notify_changed(&tx, None).await?;
        })
    }

    fn delete_group(&self, name: String) -> BoxFuture<'_, StoreResult<()>> {
        in_tx!(self, |tx| {
            if tx.execute(&SQL.delete_group, &[&name]).await? == 0 {
                return not_found(format!("no group {name:?}"));
            }
            notify_changed(&tx, None).await?;
        })
    }

    fn users(&self) -> BoxFuture<'_, StoreResult<Vec<UserProfile>>> {
        read!(self, |tx| read_users(&tx).await?)
    }

    fn put_user(&self, u: UserProfile) -> BoxFuture<'_, StoreResult<()>> {
        in_tx!(self, |tx| {
            tx.execute(&SQL.put_user, &[&u.name, &u.settings.to_string()])
                .await?;
            notify_changed(&tx, None).await?;
        })
    }

    fn delete_user(&self, name: String) -> BoxFuture<'_, StoreResult<()>> {
        in_tx!(self, |tx| {
            if tx.execute(&SQL.delete_user, &[&name]).await? == 0 {
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
            let tx = conn.snapshot().await?;
            let Some(d) = load_device(&tx, &device_id).await? else {
                return not_found(format!("no device {device_id:?}"));
            };
            // The three reads do not depend on each other: sent together
            // (the driver pipelines them), they cost one round trip.
            let user = async {
                let Some(u) = d.session_user.clone() else {
                    return Ok(None);
                };
                let row = tx.query_opt(&SQL.user_settings, &[&u]).await?;
                let profile = match row {
                    Some(r) => Some(parse_json(r.try_get(0)?)?),
                    None => None,
                };
                StoreResult::Ok(Some((u, profile)))
            };
            let (groups, defaults, user) =
                tokio::try_join!(read_groups(&tx), read_defaults(&tx), user)?;
            let inputs = SettingsInputs {
                defaults,
                groups: groups
                    .into_iter()
                    .filter(|g| d.groups.contains(&g.name))
                    .collect(),
                device: d.settings,
                user,
            };
            tx.commit().await?;
            Ok(inputs)
        })
    }

    fn hot_state(&self) -> BoxFuture<'_, StoreResult<HotState>> {
        Box::pin(async move {
            let mut conn = self.conn().await?;
            let tx = conn.snapshot().await?;
            let members = async {
                let rows = tx.query(&SQL.all_members, &[]).await?;
                rows.iter()
                    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                    .collect::<StoreResult<Vec<(String, String)>>>()
            };
            let counts = async {
                let rows = tx.query(&SQL.pending_counts, &[]).await?;
                rows.iter()
                    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                    .collect::<StoreResult<Vec<(String, i64)>>>()
            };
            // Independent reads of one snapshot: pipelined, one round trip.
            let (defaults, groups, users, devices, members, pending) = tokio::try_join!(
                read_defaults(&tx),
                read_groups(&tx),
                read_users(&tx),
                rows(&tx, &SQL.hot_devices, &[], sql::hot_device),
                members,
                counts,
            )?;
            tx.commit().await?;
            let mut state = HotState {
                defaults,
                groups,
                users,
                devices,
            };
            state.attach(members, pending);
            Ok(state)
        })
    }

    fn queue_command(&self, c: Command) -> BoxFuture<'_, StoreResult<Command>> {
        in_tx!(self, |tx| {
            // FOR SHARE: a revocation committing meanwhile waits for us or
            // we see it; no command slips in after a revocation.
            let row = tx.query_opt(&SQL.revoked_at, &[&c.device_id]).await?;
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
                    &SQL.queue_command,
                    &[
                        &c.id,
                        &c.device_id,
                        &c.kind.as_str(),
                        &payload,
                        &c.created_at,
                    ],
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
        read!(self, |tx| rows(
            &tx,
            &SQL.pending_commands,
            &[&device_id],
            sql::command
        )
        .await?)
    }

    fn pending_count(&self, device_id: String) -> BoxFuture<'_, StoreResult<i64>> {
        read!(self, |tx| tx
            .query_one(&SQL.pending_count, &[&device_id])
            .await?
            .try_get::<_, i64>(0)?)
    }

    fn commands(&self, device_id: String, limit: i64) -> BoxFuture<'_, StoreResult<Vec<Command>>> {
        read!(self, |tx| rows(
            &tx,
            &SQL.recent_commands,
            &[&device_id, &limit],
            sql::command
        )
        .await?)
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
                &SQL.ack_command,
                &[&command_id, &device_id, &now, &status, &result.to_string()],
            )
            .await?;
            notify_changed(&tx, Some(&device_id)).await?;
            match rows(&tx, &SQL.command, &[&command_id, &device_id], sql::command)
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
            let tx = conn.snapshot().await?;
            let snapshot = Snapshot {
                format: SNAPSHOT_FORMAT.to_string(),
                version: SNAPSHOT_VERSION,
                exported_at: now_ms(),
                defaults: read_defaults(&tx).await?,
                groups: read_groups(&tx).await?,
                users: read_users(&tx).await?,
                tokens: read_tokens(&tx).await?,
                devices: devices(&tx, &SQL.devices, &[]).await?,
                commands: rows(&tx, &SQL.commands, &[], sql::command).await?,
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
                 IN EXCLUSIVE MODE",
            )
            .await?;
            tx.batch_execute(&SQL.clear_all).await?;
            tx.execute(&SQL.insert_defaults, &[&s.defaults.to_string()])
                .await?;
            for g in &s.groups {
                tx.execute(
                    &SQL.insert_group,
                    &[&g.name, &g.priority, &g.settings.to_string()],
                )
                .await?;
            }
            for u in &s.users {
                tx.execute(&SQL.insert_user, &[&u.name, &u.settings.to_string()])
                    .await?;
            }
            for t in &s.tokens {
                insert_token(&tx, t).await?;
            }
            for d in &s.devices {
                // A channel recorded in the export belongs to a process
                // that is not this one.
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
                let args = sql::command_args(c);
                tx.execute(&SQL.import_command, &params(&args)).await?;
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
            let mut conn = self.conn().await?;
            conn.direct()
                .execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &event.encode()])
                .await?;
            Ok(())
        })
    }

    fn subscribe(&self) -> Option<broadcast::Receiver<StoreEvent>> {
        Some(self.events.subscribe())
    }

    fn renew_node(
        &self,
        node: String,
        now: i64,
        lease_ms: i64,
    ) -> BoxFuture<'_, StoreResult<bool>> {
        in_tx!(self, |tx| {
            let last: Option<i64> = tx
                .query_opt(&SQL.node_renewed_at, &[&node])
                .await?
                .map(|r| r.try_get(0))
                .transpose()?;
            tx.execute(&SQL.renew_node, &[&node, &now]).await?;
            last.is_none_or(|t| t < now - lease_ms)
        })
    }

    fn expire_nodes(
        &self,
        node: String,
        now: i64,
        lease_ms: i64,
    ) -> BoxFuture<'_, StoreResult<Vec<(String, u64)>>> {
        in_tx!(self, |tx| {
            let cutoff = now - lease_ms;
            let mut out = Vec::new();
            for r in tx.query(&SQL.expire_nodes, &[&cutoff, &node]).await? {
                let dead: String = r.try_get(0)?;
                let n = tx.execute(&SQL.clear_node_channels, &[&dead]).await?;
                out.push((dead, n));
            }
            out
        })
    }

    fn clear_node_channels(&self, node: String) -> BoxFuture<'_, StoreResult<u64>> {
        in_tx!(self, |tx| tx
            .execute(&SQL.clear_node_channels, &[&node])
            .await?)
    }

    fn nodes(&self) -> BoxFuture<'_, StoreResult<Vec<NodeLease>>> {
        in_tx!(self, |tx| {
            let mut out = Vec::new();
            for r in tx.query(&SQL.nodes, &[]).await? {
                out.push(NodeLease {
                    node: r.try_get(0)?,
                    renewed_at: r.try_get(1)?,
                });
            }
            out
        })
    }
}

/// `FLEETGATE_TEST_PG_URL`, or a throw-away server (shared with the
/// integration tests).
#[cfg(test)]
#[path = "../../../../tests/common/pg.rs"]
mod test_pg;

#[cfg(test)]
mod tests {
    use super::*;

    // One test function: the suite empties the database, so two tests on
    // it must not run at the same time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_store_suite_and_notifications() {
        let url = test_pg::url();
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
