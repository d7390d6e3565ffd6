//! The SQL both stores run, written once. The tables, the columns and most
//! statements are the same in SQLite and PostgreSQL; what differs is a
//! parameter of [`Dialect`]: the placeholder style (`?N` or `$N`), the
//! integer types of the schema, and the row locks PostgreSQL needs where
//! SQLite's single writer already serializes (`FOR UPDATE`, `FOR SHARE`).
//!
//! What really differs between the two stays in its backend: group
//! membership in bulk (PostgreSQL arrays), batched contact times, the
//! import's table lock and sequence reset, notifications.
//!
//! Rows are read by position through [`Columns`], so one function turns a
//! row into a record for both.

use serde_json::Value;

use super::{like_pattern, parse_json, StoreResult};
use crate::module::devices::model::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// The placeholder for the `n`th parameter (from 1).
    pub fn param(self, n: usize) -> String {
        match self {
            Dialect::Sqlite => format!("?{n}"),
            Dialect::Postgres => format!("${n}"),
        }
    }

    /// A statement written with `?N` placeholders, in this dialect. The
    /// statements here contain no other `?`.
    fn sql(self, text: &str) -> String {
        match self {
            Dialect::Sqlite => text.to_string(),
            Dialect::Postgres => text.replace('?', "$"),
        }
    }

    /// A row lock taken by a read that a later write in the same
    /// transaction depends on. SQLite needs none: its write transactions
    /// start IMMEDIATE, one at a time.
    fn lock(self, mode: &str) -> String {
        match self {
            Dialect::Sqlite => String::new(),
            Dialect::Postgres => format!(" FOR {mode}"),
        }
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS dev_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dev_tokens (
    id TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL UNIQUE,
    label TEXT NOT NULL,
    created_at {INT} NOT NULL,
    expires_at {INT} NOT NULL,
    uses_left {INT} NOT NULL,
    used {INT} NOT NULL
);
CREATE TABLE IF NOT EXISTS dev_devices (
    id TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    serial TEXT NOT NULL,
    cert_pem TEXT NOT NULL,
    settings TEXT NOT NULL,
    login_user TEXT,
    enrolled_at {INT} NOT NULL,
    token_id TEXT,
    last_contact {INT},
    revoked_at {INT},
    channel_node TEXT
);
CREATE TABLE IF NOT EXISTS dev_groups (name TEXT PRIMARY KEY, priority {INT} NOT NULL, settings TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dev_members (
    device_id TEXT NOT NULL REFERENCES dev_devices(id) ON DELETE CASCADE,
    group_name TEXT NOT NULL REFERENCES dev_groups(name) ON DELETE CASCADE,
    PRIMARY KEY (device_id, group_name)
);
CREATE INDEX IF NOT EXISTS dev_members_group ON dev_members(group_name);
CREATE TABLE IF NOT EXISTS dev_users (name TEXT PRIMARY KEY, settings TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dev_commands (
    seq {SERIAL},
    id TEXT NOT NULL UNIQUE,
    device_id TEXT NOT NULL REFERENCES dev_devices(id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at {INT} NOT NULL,
    acked_at {INT},
    status TEXT,
    result TEXT
);
CREATE INDEX IF NOT EXISTS dev_commands_pending ON dev_commands(device_id, seq) WHERE acked_at IS NULL;
CREATE INDEX IF NOT EXISTS dev_commands_device ON dev_commands(device_id, seq);
CREATE TABLE IF NOT EXISTS dev_nodes (node TEXT PRIMARY KEY, renewed_at {INT} NOT NULL);
";

/// The columns [`device`] reads, in its order.
const DEVICE_COLUMNS: &str =
    "id, fingerprint, name, serial, cert_pem, settings, login_user, enrolled_at, \
     token_id, last_contact, revoked_at, channel_node";
/// The columns [`command`] reads, in its order.
const COMMAND_COLUMNS: &str =
    "seq, id, device_id, kind, payload, created_at, acked_at, status, result";
const TOKEN_COLUMNS: &str = "id, secret_sha256, label, created_at, expires_at, uses_left, used";

/// Every statement the two stores share, in one dialect. Built once per
/// store kind; a statement's parameters are numbered as its comment says
/// (or as the `*_args` function that goes with it returns them).
pub struct Statements {
    pub schema: String,

    /// `token_args`.
    pub insert_token: String,
    pub tokens: String,
    /// 1 id.
    pub delete_token: String,
    /// 1 secret hash, 2 now; returns the token id.
    pub spend_token: String,
    pub usable_token: String,

    /// 1 id.
    pub device: String,
    /// 1 fingerprint.
    pub device_by_fingerprint: String,
    pub devices: String,
    /// What a heartbeat's answer needs of every unrevoked device (`hot_device`).
    pub hot_devices: String,
    /// Every membership (device id, group name), by group name.
    pub all_members: String,
    /// Unacknowledged commands per device (device id, count).
    pub pending_counts: String,
    /// `device_args`.
    pub insert_device: String,
    /// 1 id: the device's row, locked against concurrent changes.
    pub lock_device: String,
    /// 1 id, 2 name.
    pub set_name: String,
    /// 1 id, 2 settings.
    pub set_settings: String,
    /// 1 id, 2 revocation time (kept if already set).
    pub revoke: String,
    pub revoked_fingerprints: String,
    /// 1 id, 2 user or NULL.
    pub set_session: String,
    /// 1 id, 2 node.
    pub open_channel: String,
    /// 1 id, 2 node: cleared only if that node still holds it.
    pub close_channel: String,
    /// 1 device id.
    pub clear_members: String,

    pub defaults: String,
    /// 1 settings.
    pub put_defaults: String,
    /// 1 settings, into an empty table.
    pub insert_defaults: String,
    pub groups: String,
    /// 1 name, 2 priority, 3 settings.
    pub put_group: String,
    /// 1 name, 2 priority, 3 settings, into an empty table.
    pub insert_group: String,
    /// 1 name.
    pub delete_group: String,
    pub users: String,
    /// 1 name.
    pub user_settings: String,
    /// 1 name, 2 settings.
    pub put_user: String,
    /// 1 name, 2 settings, into an empty table.
    pub insert_user: String,
    /// 1 name.
    pub delete_user: String,

    /// 1 device id: its revocation time, the row locked against a
    /// revocation committing meanwhile.
    pub revoked_at: String,
    /// 1 id, 2 device id, 3 kind, 4 payload, 5 created at; returns seq.
    pub queue_command: String,
    /// `command_args`, with the exported seq.
    pub import_command: String,
    /// 1 device id.
    pub pending_commands: String,
    /// 1 device id.
    pub pending_count: String,
    /// 1 device id, 2 limit: newest first.
    pub recent_commands: String,
    /// 1 command id, 2 device id, 3 now, 4 status, 5 result.
    pub ack_command: String,
    /// 1 command id, 2 device id.
    pub command: String,
    pub commands: String,

    /// Empties every table (children first), for an import.
    pub clear_all: String,

    /// 1 node: when its lease was last renewed, the row locked so that an
    /// expiry by another node and this renewal do not interleave.
    pub node_renewed_at: String,
    /// 1 node, 2 now.
    pub renew_node: String,
    /// 1 cutoff, 2 the calling node (never expired by itself): the nodes
    /// whose lease ran out, their rows deleted.
    pub expire_nodes: String,
    /// 1 node: every channel it is recorded as holding.
    pub clear_node_channels: String,
    pub nodes: String,
}

impl Statements {
    pub fn new(d: Dialect) -> Statements {
        let (int, serial) = match d {
            Dialect::Sqlite => ("INTEGER", "INTEGER PRIMARY KEY AUTOINCREMENT"),
            Dialect::Postgres => ("BIGINT", "BIGSERIAL PRIMARY KEY"),
        };
        let s = |text: &str| d.sql(text);
        Statements {
            schema: SCHEMA.replace("{INT}", int).replace("{SERIAL}", serial),

            insert_token: s(&format!(
                "INSERT INTO dev_tokens ({TOKEN_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
            )),
            tokens: format!("SELECT {TOKEN_COLUMNS} FROM dev_tokens ORDER BY created_at, id"),
            delete_token: s("DELETE FROM dev_tokens WHERE id = ?1"),
            spend_token: s(
                "UPDATE dev_tokens SET uses_left = uses_left - 1, used = used + 1 \
                 WHERE secret_sha256 = ?1 AND expires_at > ?2 AND uses_left > 0 RETURNING id",
            ),
            usable_token: s("SELECT id FROM dev_tokens \
                 WHERE secret_sha256 = ?1 AND expires_at > ?2 AND uses_left > 0"),

            device: s(&format!(
                "SELECT {DEVICE_COLUMNS} FROM dev_devices WHERE id = ?1"
            )),
            device_by_fingerprint: s(&format!(
                "SELECT {DEVICE_COLUMNS} FROM dev_devices WHERE fingerprint = ?1"
            )),
            devices: format!("SELECT {DEVICE_COLUMNS} FROM dev_devices ORDER BY id"),
            hot_devices: "SELECT id, fingerprint, settings, login_user FROM dev_devices \
                 WHERE revoked_at IS NULL"
                .into(),
            all_members: "SELECT device_id, group_name FROM dev_members ORDER BY group_name".into(),
            pending_counts: "SELECT device_id, count(*) FROM dev_commands \
                 WHERE acked_at IS NULL GROUP BY device_id"
                .into(),
            insert_device: s(&format!(
                "INSERT INTO dev_devices ({DEVICE_COLUMNS}) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
            )),
            lock_device: s(&format!(
                "SELECT 1 FROM dev_devices WHERE id = ?1{}",
                d.lock("UPDATE")
            )),
            set_name: s("UPDATE dev_devices SET name = ?2 WHERE id = ?1"),
            set_settings: s("UPDATE dev_devices SET settings = ?2 WHERE id = ?1"),
            revoke: s("UPDATE dev_devices SET revoked_at = coalesce(revoked_at, ?2) WHERE id = ?1"),
            revoked_fingerprints:
                "SELECT fingerprint FROM dev_devices WHERE revoked_at IS NOT NULL".into(),
            set_session: s("UPDATE dev_devices SET login_user = ?2 WHERE id = ?1"),
            open_channel: s("UPDATE dev_devices SET channel_node = ?2 WHERE id = ?1"),
            close_channel: s(
                "UPDATE dev_devices SET channel_node = NULL WHERE id = ?1 AND channel_node = ?2",
            ),
            clear_members: s("DELETE FROM dev_members WHERE device_id = ?1"),

            defaults: "SELECT value FROM dev_meta WHERE key = 'defaults'".into(),
            put_defaults: s("INSERT INTO dev_meta (key, value) VALUES ('defaults', ?1) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value"),
            insert_defaults: s("INSERT INTO dev_meta (key, value) VALUES ('defaults', ?1)"),
            groups: "SELECT name, priority, settings FROM dev_groups ORDER BY priority, name"
                .into(),
            put_group: s(
                "INSERT INTO dev_groups (name, priority, settings) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (name) DO UPDATE SET priority = excluded.priority, \
                 settings = excluded.settings",
            ),
            insert_group: s(
                "INSERT INTO dev_groups (name, priority, settings) VALUES (?1, ?2, ?3)",
            ),
            delete_group: s("DELETE FROM dev_groups WHERE name = ?1"),
            users: "SELECT name, settings FROM dev_users ORDER BY name".into(),
            user_settings: s("SELECT settings FROM dev_users WHERE name = ?1"),
            put_user: s("INSERT INTO dev_users (name, settings) VALUES (?1, ?2) \
                 ON CONFLICT (name) DO UPDATE SET settings = excluded.settings"),
            insert_user: s("INSERT INTO dev_users (name, settings) VALUES (?1, ?2)"),
            delete_user: s("DELETE FROM dev_users WHERE name = ?1"),

            revoked_at: s(&format!(
                "SELECT revoked_at FROM dev_devices WHERE id = ?1{}",
                d.lock("SHARE")
            )),
            queue_command: s(
                "INSERT INTO dev_commands (id, device_id, kind, payload, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5) RETURNING seq",
            ),
            import_command: s(&format!(
                "INSERT INTO dev_commands ({COMMAND_COLUMNS}) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
            )),
            pending_commands: s(&format!(
                "SELECT {COMMAND_COLUMNS} FROM dev_commands \
                 WHERE device_id = ?1 AND acked_at IS NULL ORDER BY seq"
            )),
            pending_count: s(
                "SELECT count(*) FROM dev_commands WHERE device_id = ?1 AND acked_at IS NULL",
            ),
            recent_commands: s(&format!(
                "SELECT {COMMAND_COLUMNS} FROM dev_commands \
                 WHERE device_id = ?1 ORDER BY seq DESC LIMIT ?2"
            )),
            ack_command: s(
                "UPDATE dev_commands SET acked_at = ?3, status = ?4, result = ?5 \
                 WHERE id = ?1 AND device_id = ?2 AND acked_at IS NULL",
            ),
            command: s(&format!(
                "SELECT {COMMAND_COLUMNS} FROM dev_commands WHERE id = ?1 AND device_id = ?2"
            )),
            commands: format!("SELECT {COMMAND_COLUMNS} FROM dev_commands ORDER BY seq"),

            clear_all: "DELETE FROM dev_commands; DELETE FROM dev_members; \
                 DELETE FROM dev_devices; DELETE FROM dev_groups; DELETE FROM dev_users; \
                 DELETE FROM dev_tokens; DELETE FROM dev_meta;"
                .into(),

            node_renewed_at: s(&format!(
                "SELECT renewed_at FROM dev_nodes WHERE node = ?1{}",
                d.lock("UPDATE")
            )),
            renew_node: s("INSERT INTO dev_nodes (node, renewed_at) VALUES (?1, ?2) \
                 ON CONFLICT (node) DO UPDATE SET renewed_at = excluded.renewed_at"),
            expire_nodes: s(
                "DELETE FROM dev_nodes WHERE renewed_at < ?1 AND node <> ?2 RETURNING node",
            ),
            clear_node_channels: s(
                "UPDATE dev_devices SET channel_node = NULL WHERE channel_node = ?1",
            ),
            nodes: "SELECT node, renewed_at FROM dev_nodes ORDER BY node".into(),
        }
    }
}

/// A parameter value, for the statements whose argument lists are built
/// here; each backend hands them to its driver as they are (both drivers
/// take these four types).
#[derive(Debug, Clone, PartialEq)]
pub enum Arg<'a> {
    Text(&'a str),
    OptText(Option<&'a str>),
    Int(i64),
    OptInt(Option<i64>),
    /// Text built for the statement (JSON, a LIKE pattern).
    Owned(String),
    OptOwned(Option<String>),
}

/// The arguments of `insert_token`.
pub fn token_args(t: &EnrolToken) -> Vec<Arg<'_>> {
    vec![
        Arg::Text(&t.id),
        Arg::Text(&t.secret_sha256),
        Arg::Text(&t.label),
        Arg::Int(t.created_at),
        Arg::Int(t.expires_at),
        Arg::Int(t.uses_left),
        Arg::Int(t.used),
    ]
}

/// The arguments of `insert_device`, in `DEVICE_COLUMNS` order.
pub fn device_args(d: &Device) -> Vec<Arg<'_>> {
    vec![
        Arg::Text(&d.id),
        Arg::Text(&d.fingerprint),
        Arg::Text(&d.name),
        Arg::Text(&d.serial),
        Arg::Text(&d.cert_pem),
        Arg::Owned(d.settings.to_string()),
        Arg::OptText(d.session_user.as_deref()),
        Arg::Int(d.enrolled_at),
        Arg::OptText(d.token_id.as_deref()),
        Arg::OptInt(d.last_contact),
        Arg::OptInt(d.revoked_at),
        Arg::OptText(d.channel_node.as_deref()),
    ]
}

/// The arguments of `import_command`, in `COMMAND_COLUMNS` order.
pub fn command_args(c: &Command) -> Vec<Arg<'_>> {
    vec![
        Arg::Int(c.seq),
        Arg::Text(&c.id),
        Arg::Text(&c.device_id),
        Arg::Text(c.kind.as_str()),
        Arg::Owned(c.payload.to_string()),
        Arg::Int(c.created_at),
        Arg::OptInt(c.acked_at),
        Arg::OptText(c.status.as_deref()),
        Arg::OptOwned(c.result.as_ref().map(Value::to_string)),
    ]
}

/// A device listing: the filter both queries share and its arguments.
pub struct DeviceList<'q> {
    /// Counts every match; takes `args`.
    pub count: String,
    /// One page of matches by id; takes `args`, then limit and offset.
    pub page: String,
    pub args: Vec<Arg<'q>>,
}

pub fn list_devices(d: Dialect, q: &DeviceQuery) -> DeviceList<'_> {
    let mut cond = vec!["1 = 1".to_string()];
    let mut args = Vec::new();
    if let Some(s) = &q.search {
        args.push(Arg::Owned(like_pattern(s)));
        let p = d.param(args.len());
        cond.push(format!(
            "(lower(name) LIKE {p} ESCAPE '\\' OR id LIKE {p} ESCAPE '\\' \
             OR fingerprint LIKE {p} ESCAPE '\\')"
        ));
    }
    if let Some(g) = &q.group {
        args.push(Arg::Text(g));
        let p = d.param(args.len());
        cond.push(format!(
            "id IN (SELECT device_id FROM dev_members WHERE group_name = {p})"
        ));
    }
    match q.revoked {
        Some(true) => cond.push("revoked_at IS NOT NULL".into()),
        Some(false) => cond.push("revoked_at IS NULL".into()),
        None => {}
    }
    if let Some(t) = q.contact_since {
        args.push(Arg::Int(t));
        let p = d.param(args.len());
        cond.push(format!("last_contact >= {p}"));
    }
    if let Some(t) = q.silent_since {
        args.push(Arg::Int(t));
        let p = d.param(args.len());
        cond.push(format!("(last_contact IS NULL OR last_contact < {p})"));
    }
    let filter = cond.join(" AND ");
    let n = args.len();
    DeviceList {
        count: format!("SELECT count(*) FROM dev_devices WHERE {filter}"),
        page: format!(
            "SELECT {DEVICE_COLUMNS} FROM dev_devices WHERE {filter} ORDER BY id LIMIT {} OFFSET {}",
            d.param(n + 1),
            d.param(n + 2)
        ),
        args,
    }
}

/// A result row read by position, whichever driver returned it.
pub trait Columns {
    fn text(&self, i: usize) -> StoreResult<String>;
    fn opt_text(&self, i: usize) -> StoreResult<Option<String>>;
    fn int(&self, i: usize) -> StoreResult<i64>;
    fn opt_int(&self, i: usize) -> StoreResult<Option<i64>>;
}

/// A row of `DEVICE_COLUMNS`, without its groups (they are another table).
/// A row of `hot_devices` (groups and pending count filled in later).
pub fn hot_device(r: &dyn Columns) -> StoreResult<HotDevice> {
    Ok(HotDevice {
        id: r.text(0)?,
        fingerprint: r.text(1)?,
        settings: parse_json(&r.text(2)?)?,
        session_user: r.opt_text(3)?,
        groups: Vec::new(),
        pending: 0,
    })
}

pub fn device(r: &dyn Columns) -> StoreResult<Device> {
    Ok(Device {
        id: r.text(0)?,
        fingerprint: r.text(1)?,
        name: r.text(2)?,
        serial: r.text(3)?,
        cert_pem: r.text(4)?,
        groups: Vec::new(),
        settings: parse_json(&r.text(5)?)?,
        session_user: r.opt_text(6)?,
        enrolled_at: r.int(7)?,
        token_id: r.opt_text(8)?,
        last_contact: r.opt_int(9)?,
        revoked_at: r.opt_int(10)?,
        channel_node: r.opt_text(11)?,
    })
}

/// A row of `COMMAND_COLUMNS`.
pub fn command(r: &dyn Columns) -> StoreResult<Command> {
    Ok(Command {
        seq: r.int(0)?,
        id: r.text(1)?,
        device_id: r.text(2)?,
        kind: CommandKind::parse(&r.text(3)?).unwrap_or(CommandKind::Custom),
        payload: parse_json(&r.text(4)?)?,
        created_at: r.int(5)?,
        acked_at: r.opt_int(6)?,
        status: r.opt_text(7)?,
        result: r.opt_text(8)?.as_deref().map(parse_json).transpose()?,
    })
}

/// A row of `TOKEN_COLUMNS`.
pub fn token(r: &dyn Columns) -> StoreResult<EnrolToken> {
    Ok(EnrolToken {
        id: r.text(0)?,
        secret_sha256: r.text(1)?,
        label: r.text(2)?,
        created_at: r.int(3)?,
        expires_at: r.int(4)?,
        uses_left: r.int(5)?,
        used: r.int(6)?,
    })
}

/// A row of `groups`.
pub fn group(r: &dyn Columns) -> StoreResult<Group> {
    Ok(Group {
        name: r.text(0)?,
        priority: r.int(1)?,
        settings: parse_json(&r.text(2)?)?,
    })
}

/// A row of `users`.
pub fn user(r: &dyn Columns) -> StoreResult<UserProfile> {
    Ok(UserProfile {
        name: r.text(0)?,
        settings: parse_json(&r.text(1)?)?,
    })
}

/// The stored defaults (`defaults`' row, if any).
pub fn defaults(text: Option<String>) -> StoreResult<Value> {
    Ok(match text {
        Some(t) => parse_json(&t)?,
        None => empty_object(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_follow_the_dialect_and_nothing_else_changes() {
        let lite = Statements::new(Dialect::Sqlite);
        let pg = Statements::new(Dialect::Postgres);
        assert_eq!(
            lite.set_name,
            "UPDATE dev_devices SET name = ?2 WHERE id = ?1"
        );
        assert_eq!(
            pg.set_name,
            "UPDATE dev_devices SET name = $2 WHERE id = $1"
        );
        assert_eq!(lite.ack_command.replace('?', "$"), pg.ack_command);
        assert!(pg.revoked_at.ends_with("WHERE id = $1 FOR SHARE"));
        assert!(lite.revoked_at.ends_with("WHERE id = ?1"));
        assert!(lite
            .schema
            .contains("seq INTEGER PRIMARY KEY AUTOINCREMENT"));
        assert!(pg.schema.contains("seq BIGSERIAL PRIMARY KEY"));
        assert!(!pg.schema.contains('{'));
    }

    #[test]
    fn argument_lists_match_their_statements() {
        let lite = Statements::new(Dialect::Sqlite);
        let d = Device {
            id: "d".into(),
            fingerprint: "f".into(),
            name: "n".into(),
            serial: "s".into(),
            cert_pem: "c".into(),
            groups: vec![],
            settings: empty_object(),
            session_user: None,
            enrolled_at: 1,
            token_id: None,
            last_contact: None,
            revoked_at: None,
            channel_node: None,
        };
        let params = |sql: &str| sql.matches('?').count();
        assert_eq!(device_args(&d).len(), params(&lite.insert_device));
        let c = Command {
            id: "c".into(),
            device_id: "d".into(),
            seq: 1,
            kind: CommandKind::Reboot,
            payload: empty_object(),
            created_at: 1,
            acked_at: None,
            status: None,
            result: None,
        };
        assert_eq!(command_args(&c).len(), params(&lite.import_command));
        let t = EnrolToken {
            id: "t".into(),
            secret_sha256: "h".into(),
            label: String::new(),
            created_at: 1,
            expires_at: 2,
            uses_left: 1,
            used: 0,
        };
        assert_eq!(token_args(&t).len(), params(&lite.insert_token));
    }

    #[test]
    fn a_listing_numbers_its_filters_then_the_page() {
        let q = DeviceQuery {
            search: Some("a_b".into()),
            group: Some("g".into()),
            revoked: Some(false),
            contact_since: None,
            silent_since: Some(5),
            limit: 10,
            offset: 0,
        };
        let l = list_devices(Dialect::Postgres, &q);
        assert_eq!(l.args.len(), 3);
        assert_eq!(l.args[0], Arg::Owned("%a\\_b%".into()));
        assert!(l.count.contains("group_name = $2"));
        assert!(l.count.contains("last_contact < $3"));
        assert!(l.page.ends_with("LIMIT $4 OFFSET $5"));
    }
}
