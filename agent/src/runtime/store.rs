//! The queryable audit trail: every delivered event and every policy change
//! in an SQLite database (WAL), indexed for the questions security teams
//! ask ("what did contractor workloads try to reach in production last
//! week?"). The agent writes in batches committed at least twice a second,
//! so a `kill -9` loses at most the last half second and never corrupts
//! the file; retention deletes old rows. While the database is locked by
//! another writer or the disk is full, the writer holds up to [`BACKLOG`]
//! event rows and retries with backoff; beyond that it drops them, counted
//! by cause, and writes a `gap` row in `changes` once it writes again.

use std::{
    collections::VecDeque,
    net::IpAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc::{self, Receiver, SyncSender, TrySendError},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use ipnet::IpNet;
use rusqlite::{Connection, OpenFlags, params, params_from_iter};

use super::{
    events::Record,
    health::{Cause, Counts, Health},
};
use crate::{
    clock,
    seal::{self, Chain, Head, Sealer},
};
use rusqlite::types::Value;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    ts_ns INTEGER NOT NULL,
    ts TEXT NOT NULL,
    verdict TEXT NOT NULL,
    reason TEXT NOT NULL,
    hook TEXT NOT NULL,
    proto TEXT NOT NULL,
    src TEXT, sport INTEGER,
    dst TEXT, dport INTEGER,
    -- 16-byte big-endian form of dst (IPv4 as ::ffff:a.b.c.d) for CIDR ranges.
    dst_bin BLOB,
    pid INTEGER, comm TEXT, uid INTEGER,
    cgroup TEXT NOT NULL,
    src_domain TEXT, dst_domain TEXT,
    country TEXT, geo_source TEXT,
    bridge TEXT,
    generation INTEGER NOT NULL,
    seq INTEGER NOT NULL, cpu INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_ts ON events(ts_ns);
CREATE INDEX IF NOT EXISTS events_src_domain ON events(src_domain, ts_ns);
CREATE INDEX IF NOT EXISTS events_dst_domain ON events(dst_domain, ts_ns);
CREATE INDEX IF NOT EXISTS events_verdict ON events(verdict, ts_ns);
CREATE INDEX IF NOT EXISTS events_dst ON events(dst_bin);
CREATE TABLE IF NOT EXISTS changes (
    id INTEGER PRIMARY KEY,
    ts_ns INTEGER NOT NULL,
    ts TEXT NOT NULL,
    kind TEXT NOT NULL,
    policy TEXT, sha256 TEXT, generation INTEGER,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS changes_ts ON changes(ts_ns);
";

/// The columns of a row as sealed and inserted, in order (the seal's own
/// columns follow: `seal_seq`, `seal_epoch`, `seal_prev`, `seal_mac`). An
/// event's [`NAME_COLUMN`] comes last, and is sealed only when it is set,
/// so rows written before it existed still verify.
pub const EVENT_COLUMNS: &str = "ts_ns, ts, verdict, reason, hook, proto, src, sport, dst, dport, dst_bin, pid, comm, uid, cgroup, src_domain, dst_domain, country, geo_source, bridge, generation, seq, cpu";
/// `egress.names` events: the rule whose name taught the address.
const NAME_COLUMN: &str = "name";
const EVENT_VALUES: usize = 23;
pub const CHANGE_COLUMNS: &str = "ts_ns, ts, kind, policy, sha256, generation, detail";
const SEAL_COLUMNS: [&str; 4] = ["seal_seq", "seal_epoch", "seal_prev", "seal_mac"];

fn has_column(c: &Connection, table: &str, column: &str) -> Result<bool> {
    Ok(c.prepare(&format!(
        "SELECT count(*) FROM pragma_table_info('{table}') WHERE name = '{column}'"
    ))?
    .query_row([], |r| r.get::<_, i64>(0))?
        > 0)
}

/// `name`, or NULL in a store an earlier version wrote (read-only readers
/// such as `audit verify` of a copy do not add the column).
fn name_column(c: &Connection) -> Result<&'static str> {
    Ok(if has_column(c, "events", NAME_COLUMN)? {
        NAME_COLUMN
    } else {
        "NULL AS name"
    })
}

/// Adds `column` to `table` in a store made before it.
fn add_column(c: &Connection, table: &str, column: &str, ty: &str) -> Result<()> {
    if !has_column(c, table, column)? {
        c.execute(&format!("ALTER TABLE {table} ADD COLUMN {column} {ty}"), [])?;
    }
    Ok(())
}

/// Adds the columns later versions brought to a store made before them:
/// the seal's, then `name`.
fn add_columns(c: &Connection) -> Result<()> {
    for table in ["events", "changes"] {
        for (col, ty) in SEAL_COLUMNS
            .iter()
            .zip(["INTEGER", "INTEGER", "TEXT", "TEXT"])
        {
            add_column(c, table, col, ty)?;
        }
    }
    add_column(c, "events", "name", "TEXT")?;
    c.execute_batch("CREATE INDEX IF NOT EXISTS events_name ON events(name, ts_ns);")?;
    Ok(())
}

/// A policy or agent change for the trail (load, reload, rejected reload,
/// start, stop, bridge opened/closed/expired).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Change {
    pub kind: String,
    pub policy: Option<String>,
    pub sha256: Option<String>,
    pub generation: Option<u64>,
    pub detail: String,
}

enum Item {
    /// An event and its hand-over number ([`Counts::hand`]).
    Event(Box<Record>, u64),
    Change(Change),
    /// The agent stops: write what is held, seal the chain's `stop`, exit.
    Stop,
}

/// A row as the writer holds it: sealed when taken (if the store is).
struct Row {
    /// `events` or `changes`.
    table: &'static str,
    values: Vec<Value>,
    /// It carries an event (counted as written once it is).
    event: bool,
    seal: Option<seal::Seal>,
}

/// The agent's handle: sends to the writer thread without ever blocking.
#[derive(Clone)]
pub struct Store {
    tx: SyncSender<Item>,
    /// Event rows written, pending and dropped (by cause).
    pub counts: Arc<Counts>,
    /// Change rows that found the queue full (warned about, rate-limited).
    changes_dropped: Arc<AtomicU64>,
    done: Arc<std::sync::Mutex<Option<thread::JoinHandle<()>>>>,
}

/// Rows queued for the writer before the events task drops them
/// (`queue_full`; while the output's writes fail, for their cause:
/// [`Counts::drop_cause`]).
const QUEUE: usize = 16_384;
/// Event rows a failing store holds for its retries (tens of seconds of a
/// storm) before it drops them (`locked`, `disk_full`, `io_error`).
pub const BACKLOG: usize = 65_536;
/// Rows per transaction.
const BATCH: usize = 5000;

fn open(path: &Path) -> Result<Connection> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let c = Connection::open(path)
        .with_context(|| format!("opening audit store {}", path.display()))?;
    // WAL: readers (`bulkhead audit query`, an analyst's sqlite3) never
    // block the writer; a writer's lock does, and is retried with backoff.
    c.pragma_update(None, "journal_mode", "WAL")?;
    // WAL + NORMAL: a committed batch survives a process crash.
    c.pragma_update(None, "synchronous", "NORMAL")?;
    // Short: the writer's own retries, with the backlog held, do the waiting.
    c.busy_timeout(Duration::from_millis(250))?;
    c.execute_batch(SCHEMA)
        .context("creating the audit store schema")?;
    add_columns(&c).context("adding new columns to the audit store")?;
    Ok(c)
}

fn ts_ns(r: &Record) -> i64 {
    clock::parse_ts(&r.ts).unwrap_or_else(clock::now_ns)
}

fn addr_bin(a: Option<&str>) -> Option<Vec<u8>> {
    let ip: IpAddr = a?.parse().ok()?;
    Some(match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    })
}

impl Store {
    /// Opens (creating) the database and starts the writer thread; with a
    /// sealing key every row is sealed ([`crate::seal`]).
    pub fn start(
        path: &Path,
        retention: Duration,
        sealer: Option<Arc<std::sync::Mutex<Sealer>>>,
    ) -> Result<Store> {
        let conn = open(path)?;
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let store = Store {
            tx,
            counts: Counts::new("audit-store"),
            changes_dropped: Arc::new(AtomicU64::new(0)),
            done: Arc::default(),
        };
        let chain = match sealer {
            Some(s) => Some(Chain::new(
                "audit-store",
                s,
                last_head(&conn).context("reading the audit store's chain head")?,
                store.counts.head.clone(),
            )),
            None => None,
        };
        let w = Writer {
            health: Health::new(store.counts.clone(), "65536 event rows"),
            counts: store.counts.clone(),
            backlog: VecDeque::new(),
            events: 0,
            retention,
            chain,
            stopping: false,
        };
        let handle = thread::Builder::new()
            .name("audit-store".into())
            .spawn(move || w.run(conn, rx))?;
        *store.done.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        Ok(store)
    }

    /// At stop: the writer writes what it holds (a sealed store: and its
    /// `stop` row) and exits; waits for it at most `within`.
    pub fn finish(&self, within: Duration) {
        let Some(handle) = self.done.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        let deadline = Instant::now() + within;
        let mut item = Item::Stop;
        loop {
            match self.tx.try_send(item) {
                Ok(()) => break,
                Err(TrySendError::Full(i)) if Instant::now() < deadline => {
                    item = i;
                    thread::sleep(Duration::from_millis(10));
                }
                Err(_) => return,
            }
        }
        while !handle.is_finished() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        if handle.is_finished() {
            let _ = handle.join();
        }
    }

    pub fn event(&self, r: Record) {
        let seq = self.counts.hand();
        if let Err(
            TrySendError::Full(Item::Event(r, seq))
            | TrySendError::Disconnected(Item::Event(r, seq)),
        ) = self.tx.try_send(Item::Event(Box::new(r), seq))
        {
            self.counts.drop_event(&r.ts, self.counts.drop_cause(), seq);
        }
    }

    pub fn change(&self, c: Change) {
        if let Err(
            TrySendError::Full(Item::Change(c)) | TrySendError::Disconnected(Item::Change(c)),
        ) = self.tx.try_send(Item::Change(c))
        {
            let n = self.changes_dropped.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() || n == 0 {
                tracing::warn!(
                    "audit store: its queue is full; the change row `{}` ({}) was not recorded \
                     ({} change rows so far)",
                    c.kind,
                    c.detail,
                    n + 1
                );
            }
        }
    }
}

/// The writer thread: batches rows into transactions; while the database
/// is locked or the disk full it holds up to [`BACKLOG`] event rows (and
/// every change row) and retries, backing off to 2 s; events beyond that
/// are dropped, counted, and a `gap` row in `changes` takes their place.
struct Writer {
    health: Health,
    counts: Arc<Counts>,
    backlog: VecDeque<Row>,
    /// Event rows in the backlog.
    events: usize,
    retention: Duration,
    chain: Option<Chain>,
    /// [`Item::Stop`] came.
    stopping: bool,
}

/// The last sealed row (the chain continues after it).
fn last_head(c: &Connection) -> Result<Option<Head>> {
    last_sealed(c, i64::MAX)?
        .map(|(seq, mac)| {
            Ok(Head {
                seq: seq as u64,
                mac: seal::unhex(&mac).context("a damaged seal_mac")?,
            })
        })
        .transpose()
}

/// The `seal_seq` and `seal_mac` of the last sealed row of either table
/// older than `before_ns`.
fn last_sealed(c: &Connection, before_ns: i64) -> Result<Option<(i64, String)>> {
    let row = c.query_row(
        "SELECT seal_seq, seal_mac FROM (
             SELECT seal_seq, seal_mac, ts_ns FROM events
             UNION ALL SELECT seal_seq, seal_mac, ts_ns FROM changes)
         WHERE seal_seq IS NOT NULL AND ts_ns < ?1 ORDER BY seal_seq DESC LIMIT 1",
        [before_ns],
        |r| Ok((r.get(0)?, r.get(1)?)),
    );
    match row {
        Ok(r) => Ok(Some(r)),
        Err(rusqlite::Error::QueryReturnedNoRows) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// An event's row, in [`EVENT_COLUMNS`] order, then its name if it has one
/// (sealed only then, so rows from before the column verify as written).
fn event_values(r: &Record) -> Vec<Value> {
    fn opt<T: Into<Value>>(v: Option<T>) -> Value {
        v.map_or(Value::Null, Into::into)
    }
    let mut values = vec![
        ts_ns(r).into(),
        r.ts.clone().into(),
        r.verdict.clone().into(),
        r.reason.clone().into(),
        r.hook.clone().into(),
        r.proto.clone().into(),
        opt(r.src.clone()),
        opt(r.sport),
        opt(r.dst.clone()),
        opt(r.dport),
        opt(addr_bin(r.dst.as_deref())),
        opt(r.pid),
        opt(r.comm.clone()),
        opt(r.uid),
        r.cgroup.clone().into(),
        opt(r.src_domain.clone()),
        opt(r.dst_domain.clone()),
        opt(r.country.clone()),
        opt(r.geo_source.clone()),
        opt(r.bridge.clone()),
        (r.generation as i64).into(),
        (r.seq as i64).into(),
        r.cpu.into(),
    ];
    if let Some(name) = &r.name {
        values.push(name.clone().into());
    }
    values
}

/// A change's row, in [`CHANGE_COLUMNS`] order, timed now.
fn change_values(kind: &str, c: Option<&Change>, detail: String) -> Vec<Value> {
    let now = clock::now_ns();
    let opt = |v: Option<String>| v.map_or(Value::Null, Value::Text);
    vec![
        now.into(),
        clock::format_ts(now.max(0) as u64, 0).into(),
        kind.to_string().into(),
        opt(c.and_then(|c| c.policy.clone())),
        opt(c.and_then(|c| c.sha256.clone())),
        c.and_then(|c| c.generation)
            .map_or(Value::Null, |g| Value::Integer(g as i64)),
        detail.into(),
    ]
}

/// The cause of an SQLite error: a lock, a full disk, or anything else.
fn cause(e: &anyhow::Error) -> Cause {
    use rusqlite::ErrorCode as C;
    match e.downcast_ref::<rusqlite::Error>() {
        Some(rusqlite::Error::SqliteFailure(f, _)) => match f.code {
            C::DatabaseBusy | C::DatabaseLocked => Cause::Locked,
            C::DiskFull => Cause::DiskFull,
            _ => Cause::IoError,
        },
        _ => Cause::IoError,
    }
}

impl Writer {
    fn accept(&mut self, item: Item) {
        match item {
            Item::Event(r, seq) => {
                if self.events >= BACKLOG {
                    self.counts.drop_event(&r.ts, self.counts.drop_cause(), seq);
                    return;
                }
                // The first row after a hole: its gap row goes before it.
                if self.counts.has_gap_before(seq) {
                    self.push_gap();
                }
                self.events += 1;
                self.push("events", event_values(&r), true);
            }
            Item::Change(c) => {
                let detail = c.detail.clone();
                self.push("changes", change_values(&c.kind, Some(&c), detail), false);
            }
            Item::Stop => self.stopping = true,
        }
    }

    /// Holds a row, sealed first if the store is.
    fn push(&mut self, table: &'static str, values: Vec<Value>, event: bool) {
        // A row sealed in a new epoch comes after that epoch's record.
        self.mark_epoch();
        let seal = self.chain.as_mut().map(|c| c.seal_row(table, &values));
        self.backlog.push_back(Row {
            table,
            values,
            event,
            seal,
        });
    }

    /// The chain's own row (`start`, `epoch`, `stop`, `retention`): a
    /// change of kind `seal` whose detail is the record.
    fn push_chain(&mut self, what: &str, detail: serde_json::Value) {
        let Some(c) = &mut self.chain else { return };
        c.note_epoch();
        let values = change_values("seal", None, seal::own_record(what, detail).to_string());
        let seal = Some(c.seal_row("changes", &values));
        self.backlog.push_back(Row {
            table: "changes",
            values,
            event: false,
            seal,
        });
    }

    fn mark_epoch(&mut self) {
        if self.chain.as_ref().is_some_and(|c| c.epoch_due()) {
            self.push_chain("epoch", serde_json::json!({}));
        }
    }

    fn push_gap(&mut self) {
        if let Some(g) = self.counts.take_gap() {
            let detail = g.record(self.counts.name).to_string();
            self.push("changes", change_values("gap", None, detail), false);
        }
    }

    /// Deletes rows older than the retention. A sealed store first writes
    /// a signed `retention` row naming the last `seq` it deletes and that
    /// row's MAC, so the chain may begin after them.
    fn prune(&mut self, conn: &mut Connection) -> Result<()> {
        let cutoff = clock::now_ns() - self.retention.as_nanos() as i64;
        let tx = conn.transaction()?;
        if self.chain.is_some() {
            let through = last_sealed(&tx, cutoff)?;
            if let Some((seq, mac)) = through {
                self.push_chain(
                    "retention",
                    serde_json::json!({
                        "through": seq,
                        "head": mac,
                        "before": clock::format_ts(cutoff.max(0) as u64, 0),
                    }),
                );
                // The retention row is written with the deletion or not at
                // all: on an error it stays held for the next write.
                insert_rows(&tx, self.backlog.iter())?;
                for table in ["events", "changes"] {
                    tx.execute(&format!("DELETE FROM {table} WHERE seal_seq <= ?1"), [seq])?;
                }
            }
        }
        for table in ["events", "changes"] {
            tx.execute(
                &format!("DELETE FROM {table} WHERE ts_ns < ?1 AND seal_seq IS NULL"),
                [cutoff],
            )?;
        }
        tx.commit()?;
        if let (Some(c), Some(s)) = (
            &self.chain,
            self.backlog.iter().filter_map(|r| r.seal).next_back(),
        ) {
            c.written(&s);
        }
        self.backlog.clear();
        Ok(())
    }

    fn run(mut self, mut conn: Connection, rx: Receiver<Item>) {
        let mut last_prune = Instant::now() - Duration::from_secs(3600);
        if let Some(detail) = self.chain.as_ref().map(Chain::start_detail) {
            self.push_chain("start", detail);
        }
        loop {
            let wait = match self.health.retry_at {
                Some(t) => t.saturating_duration_since(Instant::now()),
                // Often enough to mark every epoch (one second or more).
                None if self.backlog.is_empty() => Duration::from_millis(200),
                None => Duration::ZERO,
            };
            let disconnected = match rx.recv_timeout(wait) {
                Ok(i) => {
                    self.accept(i);
                    false
                }
                Err(mpsc::RecvTimeoutError::Timeout) => false,
                Err(mpsc::RecvTimeoutError::Disconnected) => true,
            };
            // Gather a batch: what is queued, for up to 250 ms.
            let deadline = Instant::now() + Duration::from_millis(250);
            let mut got = 0;
            while got < BATCH && !disconnected && !self.stopping {
                let left = deadline.saturating_duration_since(Instant::now());
                let next = if self.health.cause().is_some() || left.is_zero() {
                    rx.try_recv().map_err(|_| ())
                } else {
                    rx.recv_timeout(left).map_err(|_| ())
                };
                match next {
                    Ok(i) => {
                        self.accept(i);
                        got += 1;
                    }
                    Err(()) => break,
                }
            }
            let last = disconnected || self.stopping;
            if last {
                // The last chance for a gap row still owed (the store may be
                // failing): it goes before the chain's end.
                self.push_gap();
                self.push_chain("stop", serde_json::json!({}));
            }
            self.mark_epoch();
            // The last events of a pass are counted as written once it
            // ends, so that `pending: 0` means the store is whole, gap row
            // included.
            let (mut wrote, mut taken) = (0, 0);
            while self.health.due() {
                // Drops after the last row held get their gap row once the
                // store writes again. Rows still queued may be older than
                // those drops: they are held first (as one batch), and
                // `accept` puts the gap row in order. Bounded: a steady
                // stream must not keep the writer from its other duties;
                // without a gap owed, rows wait for the next batch.
                if self.backlog.is_empty() {
                    if self.health.cause().is_some() || !self.counts.has_gap() {
                        break;
                    }
                    let before = taken;
                    while !last
                        && !self.stopping
                        && taken < BATCH
                        && let Ok(i) = rx.try_recv()
                    {
                        self.accept(i);
                        taken += 1;
                    }
                    if taken == BATCH && self.backlog.is_empty() {
                        break;
                    }
                    if taken == before {
                        self.push_gap();
                    }
                    continue;
                }
                let n = self.backlog.len().min(BATCH);
                match insert(&mut conn, self.backlog.range(..n)) {
                    Ok(()) => {
                        if let (Some(c), Some(s)) = (
                            &self.chain,
                            self.backlog.range(..n).filter_map(|r| r.seal).next_back(),
                        ) {
                            c.written(&s);
                        }
                        let events = self.backlog.drain(..n).filter(|r| r.event).count();
                        self.events -= events;
                        wrote += events as u64;
                        // Counted at once while more is held; the last are
                        // counted after the gap row.
                        if !self.backlog.is_empty() {
                            self.counts.wrote(std::mem::take(&mut wrote));
                        }
                        self.health.ok();
                    }
                    Err(e) => {
                        self.health
                            .failed(cause(&e), &format!("{e:#}"), self.events);
                        break;
                    }
                }
                // Keep taking rows while a long backlog is written.
                if self.backlog.len() > BATCH {
                    while let Ok(i) = rx.try_recv() {
                        self.accept(i);
                        if self.events >= BACKLOG {
                            break;
                        }
                    }
                }
            }
            self.counts.wrote(wrote);
            self.health.tick();
            if last {
                return;
            }
            if self.health.cause().is_none()
                && self.backlog.is_empty()
                && last_prune.elapsed() > Duration::from_secs(60).min(self.retention / 2)
            {
                last_prune = Instant::now();
                if let Err(e) = self.prune(&mut conn) {
                    tracing::warn!("audit store retention failed: {e:#}");
                }
            }
        }
    }
}

fn insert<'a>(conn: &mut Connection, batch: impl Iterator<Item = &'a Row>) -> Result<()> {
    let tx = conn.transaction()?;
    insert_rows(&tx, batch)?;
    tx.commit()?;
    Ok(())
}

fn insert_rows<'a>(tx: &rusqlite::Transaction, batch: impl Iterator<Item = &'a Row>) -> Result<()> {
    let sql = |table: &str, cols: &str, n: usize| {
        format!(
            "INSERT INTO {table} ({cols}, {}) VALUES ({})",
            SEAL_COLUMNS.join(", "),
            vec!["?"; n + SEAL_COLUMNS.len()].join(", ")
        )
    };
    let mut ev = tx.prepare(&sql(
        "events",
        &format!("{EVENT_COLUMNS}, {NAME_COLUMN}"),
        EVENT_VALUES + 1,
    ))?;
    let mut ch = tx.prepare(&sql("changes", CHANGE_COLUMNS, 7))?;
    for row in batch {
        let seal = match &row.seal {
            Some(s) => [
                Value::Integer(s.seq as i64),
                Value::Integer(s.epoch as i64),
                Value::Text(seal::hex(&s.prev)),
                Value::Text(seal::hex(&s.mac)),
            ],
            None => [Value::Null, Value::Null, Value::Null, Value::Null],
        };
        if row.table == "events" {
            // Its seal covers no name: the column is NULL.
            let name = (row.values.len() == EVENT_VALUES).then_some(Value::Null);
            ev.execute(params_from_iter(
                row.values.iter().chain(name.iter()).chain(seal.iter()),
            ))?;
        } else {
            ch.execute(params_from_iter(row.values.iter().chain(seal.iter())))?;
        }
    }
    Ok(())
}

/// One sealed row as `audit verify` reads it: its place, its values in
/// sealing order and its seal's columns.
pub struct SealedRow {
    pub table: &'static str,
    pub id: i64,
    pub values: Vec<Value>,
    pub seal: [Value; 4],
}

/// Every row of both tables, sealed or not, for `audit verify`.
pub fn sealed_rows(path: &Path) -> Result<Vec<SealedRow>> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("opening audit store {}", path.display()))?;
    let mut out = Vec::new();
    let events = format!("{EVENT_COLUMNS}, {}", name_column(&conn)?);
    for (table, cols, n) in [
        ("events", events.as_str(), EVENT_VALUES + 1),
        ("changes", CHANGE_COLUMNS, 7),
    ] {
        let mut stmt = conn.prepare(&format!(
            "SELECT id, {cols}, {} FROM {table}",
            SEAL_COLUMNS.join(", ")
        ))?;
        let rows = stmt.query_map([], |r| {
            let mut values = (1..=n)
                .map(|i| r.get::<_, Value>(i))
                .collect::<Result<Vec<_>, _>>()?;
            // Sealed as written: an event's name only when it has one.
            if table == "events" && values.last() == Some(&Value::Null) {
                values.pop();
            }
            Ok(SealedRow {
                table,
                id: r.get(0)?,
                values,
                seal: [r.get(n + 1)?, r.get(n + 2)?, r.get(n + 3)?, r.get(n + 4)?],
            })
        })?;
        for r in rows {
            out.push(r.context("reading the audit store")?);
        }
    }
    Ok(out)
}

/// `bulkhead audit query` filters.
#[derive(Debug, Default)]
pub struct Query {
    pub from_ns: Option<i64>,
    pub to_ns: Option<i64>,
    /// Source or destination domain.
    pub domain: Option<String>,
    pub src_domain: Option<String>,
    pub dst_domain: Option<String>,
    /// Cgroup path prefix.
    pub cgroup: Option<String>,
    pub dst: Option<IpNet>,
    pub port: Option<u16>,
    pub country: Option<String>,
    pub verdict: Option<String>,
    pub reason: Option<String>,
    /// A name: events whose `egress.names` rule is this name or a wildcard
    /// rule covering it (`*.pkg.dev` for `a.pkg.dev`); a wildcard: events
    /// of that rule.
    pub name: Option<String>,
    pub limit: usize,
}

/// Runs a query against the database read-only (works with no agent).
pub fn query(path: &Path, q: &Query) -> Result<Vec<Record>> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("opening audit store {}", path.display()))?;
    let mut sql = format!(
        "SELECT ts, verdict, reason, hook, proto, src, sport, dst, dport, pid, comm, uid, cgroup, src_domain, dst_domain, country, geo_source, bridge, generation, seq, cpu, {} FROM events WHERE 1=1",
        name_column(&conn)?
    );
    let mut args: Vec<rusqlite::types::Value> = Vec::new();
    let mut add = |clause: &str, v: rusqlite::types::Value| {
        sql += clause;
        args.push(v);
    };
    use rusqlite::types::Value as V;
    if let Some(t) = q.from_ns {
        add(" AND ts_ns >= ?", V::Integer(t));
    }
    if let Some(t) = q.to_ns {
        add(" AND ts_ns < ?", V::Integer(t));
    }
    if let Some(d) = &q.domain {
        add(" AND (src_domain = ?", V::Text(d.clone()));
        add(" OR dst_domain = ?)", V::Text(d.clone()));
    }
    if let Some(d) = &q.src_domain {
        add(" AND src_domain = ?", V::Text(d.clone()));
    }
    if let Some(d) = &q.dst_domain {
        add(" AND dst_domain = ?", V::Text(d.clone()));
    }
    if let Some(c) = &q.cgroup {
        add(" AND (cgroup = ?", V::Text(c.clone()));
        add(
            " OR substr(cgroup, 1, ?) = ",
            V::Integer(c.trim_end_matches('/').len() as i64 + 1),
        );
        add("?)", V::Text(format!("{}/", c.trim_end_matches('/'))));
    }
    if let Some(net) = &q.dst {
        let (lo, hi) = match net {
            IpNet::V4(n) => (
                n.network().to_ipv6_mapped().octets(),
                n.broadcast().to_ipv6_mapped().octets(),
            ),
            IpNet::V6(n) => (n.network().octets(), n.broadcast().octets()),
        };
        add(" AND dst_bin >= ?", V::Blob(lo.to_vec()));
        add(" AND dst_bin <= ?", V::Blob(hi.to_vec()));
    }
    if let Some(p) = q.port {
        add(" AND dport = ?", V::Integer(p.into()));
    }
    if let Some(c) = &q.country {
        add(" AND country = ?", V::Text(c.clone()));
    }
    if let Some(v) = &q.verdict {
        add(" AND verdict = ?", V::Text(v.clone()));
    }
    if let Some(r) = &q.reason {
        add(" AND reason = ?", V::Text(r.clone()));
    }
    if let Some(n) = &q.name {
        // Rules are stored as the policy wrote them, lowercased and without
        // the trailing dot (`policy::check`); so is the name asked for.
        let n = n.trim_end_matches('.').to_ascii_lowercase();
        if n.starts_with("*.") {
            // A wildcard names one rule; what it covers is not a name.
            add(" AND name = ?", V::Text(n));
        } else {
            add(" AND (name = ?", V::Text(n.clone()));
            add(
                " OR (substr(name, 1, 2) = '*.' AND length(name) <= ?",
                V::Integer(n.len() as i64),
            );
            add(
                " AND substr(?, 1 - length(name)) = substr(name, 2)))",
                V::Text(n),
            );
        }
    }
    sql += " ORDER BY ts_ns, id LIMIT ?";
    args.push(V::Integer(q.limit as i64));
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(params_from_iter(args), |row| {
        Ok(Record {
            ts: row.get(0)?,
            verdict: row.get(1)?,
            reason: row.get(2)?,
            hook: row.get(3)?,
            proto: row.get(4)?,
            src: row.get(5)?,
            sport: row.get(6)?,
            dst: row.get(7)?,
            dport: row.get(8)?,
            pid: row.get(9)?,
            comm: row.get(10)?,
            uid: row.get(11)?,
            cgroup: row.get(12)?,
            cgroup_id: 0,
            src_domain: row.get(13)?,
            dst_domain: row.get(14)?,
            country: row.get(15)?,
            geo_source: row.get(16)?,
            geo_source_built: None,
            name: row.get(21)?,
            bridge: row.get(17)?,
            generation: row.get::<_, i64>(18)? as u64,
            seq: row.get::<_, i64>(19)? as u64,
            cpu: row.get(20)?,
        })
    })?;
    rows.collect::<Result<Vec<_>, _>>()
        .context("reading the audit store")
}

/// Policy/agent changes in a time range, oldest first.
pub fn changes(path: &Path, from_ns: Option<i64>, limit: usize) -> Result<Vec<serde_json::Value>> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("opening audit store {}", path.display()))?;
    let mut stmt = conn.prepare("SELECT ts, kind, policy, sha256, generation, detail FROM changes WHERE ts_ns >= ?1 ORDER BY ts_ns, id LIMIT ?2")?;
    let rows = stmt.query_map(params![from_ns.unwrap_or(0), limit as i64], |row| {
        Ok(serde_json::json!({
            "ts": row.get::<_, String>(0)?,
            "kind": row.get::<_, String>(1)?,
            "policy": row.get::<_, Option<String>>(2)?,
            "sha256": row.get::<_, Option<String>>(3)?,
            "generation": row.get::<_, Option<i64>>(4)?,
            "detail": row.get::<_, Option<String>>(5)?,
        }))
    })?;
    rows.collect::<Result<Vec<_>, _>>()
        .context("reading the audit store")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(ts: &str, dom: &str, dst: &str, verdict: &str) -> Record {
        Record {
            ts: ts.into(),
            verdict: verdict.into(),
            reason: "cross-domain".into(),
            hook: "connect4".into(),
            proto: "tcp".into(),
            src: None,
            sport: None,
            dst: Some(dst.into()),
            dport: Some(5432),
            pid: Some(1),
            comm: Some("psql".into()),
            uid: Some(1000),
            cgroup: format!("/{dom}.slice/job"),
            cgroup_id: 7,
            src_domain: Some(dom.into()),
            dst_domain: Some("production".into()),
            country: None,
            geo_source: None,
            geo_source_built: None,
            name: None,
            bridge: None,
            generation: 1,
            seq: 1,
            cpu: 0,
        }
    }

    #[test]
    fn stores_and_queries_by_time_domain_cidr_and_verdict() {
        let dir = crate::testdir::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let store = Store::start(&path, Duration::from_secs(86400 * 3650), None).unwrap();
        store.event(rec(
            "2026-11-20T10:00:00Z",
            "contractor",
            "10.40.0.7",
            "deny",
        ));
        store.event(rec(
            "2026-11-21T10:00:00Z",
            "contractor",
            "10.40.9.9",
            "deny",
        ));
        store.event(rec("2026-11-21T11:00:00Z", "core", "10.40.0.8", "deny"));
        store.event(rec(
            "2026-11-22T10:00:00Z",
            "contractor",
            "10.50.0.1",
            "allow",
        ));
        store.change(Change {
            kind: "load".into(),
            policy: Some("/p.yaml".into()),
            sha256: Some("ab".into()),
            generation: Some(1),
            detail: String::new(),
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.counts.written.load(Ordering::Relaxed) < 4 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let t = |s: &str| clock::parse_ts(s).unwrap();
        let q = Query {
            from_ns: Some(t("2026-11-21T00:00:00Z")),
            to_ns: Some(t("2026-11-23T00:00:00Z")),
            src_domain: Some("contractor".into()),
            verdict: Some("deny".into()),
            limit: 100,
            ..Default::default()
        };
        let got = query(&path, &q).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].dst.as_deref(), Some("10.40.9.9"));
        let by_net = Query {
            dst: Some("10.40.0.0/24".parse().unwrap()),
            limit: 100,
            ..Default::default()
        };
        assert_eq!(query(&path, &by_net).unwrap().len(), 2);
        let by_cgroup = Query {
            cgroup: Some("/core.slice".into()),
            limit: 100,
            ..Default::default()
        };
        assert_eq!(query(&path, &by_cgroup).unwrap().len(), 1);
        assert_eq!(changes(&path, None, 10).unwrap()[0]["kind"], "load");
    }

    /// While its writes fail, the writer's retries (each waiting out the
    /// lock) keep it from its queue: what overflows the queue then is
    /// dropped for the failure, as what overflows the backlog is.
    #[test]
    fn a_failing_store_drops_for_its_failure_not_queue_full() {
        let dir = crate::testdir::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let store = Store::start(&path, Duration::from_secs(86400 * 3650), None).unwrap();
        let holder = Connection::open(&path).unwrap();
        holder.execute_batch("BEGIN EXCLUSIVE").unwrap();
        let r = rec("2026-11-20T10:00:00Z", "contractor", "10.40.0.7", "deny");
        store.event(r.clone());
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.counts.failing().is_none() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(store.counts.failing(), Some(Cause::Locked));
        // More than the queue and the backlog hold, sent faster than the
        // writer takes them while it waits on the lock.
        let n = 4 * (QUEUE + BACKLOG) as u64;
        for _ in 0..n {
            store.event(r.clone());
        }
        let c = &store.counts;
        assert!(c.dropped(Cause::Locked) > 0, "{:?}", c.snapshot());
        assert_eq!(c.dropped(Cause::QueueFull), 0, "{:?}", c.snapshot());
        let s = c.snapshot();
        assert_eq!(s.written + s.pending + c.dropped_total(), n + 1, "{s:?}");
        holder.execute_batch("COMMIT").unwrap();
        store.finish(Duration::from_secs(30));
    }

    #[test]
    fn the_event_columns_and_their_count_agree() {
        assert_eq!(EVENT_COLUMNS.split(", ").count(), EVENT_VALUES);
        assert_eq!(
            event_values(&rec("2026-11-20T10:00:00Z", "a", "10.0.0.1", "deny")).len(),
            EVENT_VALUES
        );
    }

    /// A store an earlier version wrote (no `name` column), opened only to
    /// read: queried and its rows read as they were sealed.
    #[test]
    fn a_store_from_before_names_is_read_as_it_was_written() {
        let dir = crate::testdir::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let store = Store::start(&path, Duration::from_secs(86400 * 3650), None).unwrap();
        store.event(rec("2026-11-20T10:00:00Z", "a", "10.0.0.1", "deny"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.counts.written.load(Ordering::Relaxed) < 1 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        store.finish(Duration::from_secs(5));
        let c = Connection::open(&path).unwrap();
        c.execute_batch("DROP INDEX events_name; ALTER TABLE events DROP COLUMN name;")
            .unwrap();
        drop(c);
        let q = Query {
            limit: 10,
            ..Default::default()
        };
        assert_eq!(query(&path, &q).unwrap().len(), 1);
        let rows = sealed_rows(&path).unwrap();
        let event = rows.iter().find(|r| r.table == "events").unwrap();
        assert_eq!(event.values.len(), EVENT_VALUES);
    }

    #[test]
    fn queries_by_name_match_the_rule_or_a_wildcard_rule_covering_it() {
        let dir = crate::testdir::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let store = Store::start(&path, Duration::from_secs(86400 * 3650), None).unwrap();
        for (i, name) in [
            Some("api.github.com"),
            Some("*.pkg.dev"),
            Some("*.dev"),
            None,
        ]
        .into_iter()
        .enumerate()
        {
            let mut r = rec("2026-11-20T10:00:00Z", "contractor", "10.40.0.7", "allow");
            r.reason = "name-allowed".into();
            r.dport = Some(i as u16);
            r.name = name.map(Into::into);
            store.event(r);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.counts.written.load(Ordering::Relaxed) < 4 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let ports = |name: &str| -> Vec<u16> {
            let q = Query {
                name: Some(name.into()),
                limit: 100,
                ..Default::default()
            };
            query(&path, &q)
                .unwrap()
                .iter()
                .map(|r| r.dport.unwrap())
                .collect()
        };
        assert_eq!(ports("API.GitHub.com."), [0]);
        assert_eq!(ports("eu.pkg.dev"), [1, 2]);
        assert_eq!(ports("*.pkg.dev"), [1]);
        // A wildcard covers names below it, not its own suffix.
        assert_eq!(ports("pkg.dev"), [2]);
        assert_eq!(ports("dev"), Vec::<u16>::new());
        assert_eq!(ports("github.com"), Vec::<u16>::new());
        let all = query(
            &path,
            &Query {
                limit: 100,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(all[0].name.as_deref(), Some("api.github.com"));
        assert_eq!(all[3].name, None);
    }
}
