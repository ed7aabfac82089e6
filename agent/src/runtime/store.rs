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
use crate::clock;

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
    /// A gap record, in the place of the events it stands for.
    Gap(String),
}

/// The agent's handle: sends to the writer thread without ever blocking.
#[derive(Clone)]
pub struct Store {
    tx: SyncSender<Item>,
    /// Event rows written, pending and dropped (by cause).
    pub counts: Arc<Counts>,
    /// Change rows that found the queue full (warned about, rate-limited).
    changes_dropped: Arc<AtomicU64>,
}

/// Rows queued for the writer before the events task drops them
/// (`queue_full`).
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
    Ok(c)
}

fn ts_ns(r: &Record) -> i64 {
    time::OffsetDateTime::parse(&r.ts, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp_nanos() as i64)
        .unwrap_or_else(|_| clock::now_ns())
}

fn addr_bin(a: Option<&str>) -> Option<Vec<u8>> {
    let ip: IpAddr = a?.parse().ok()?;
    Some(match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    })
}

impl Store {
    /// Opens (creating) the database and starts the writer thread.
    pub fn start(path: &Path, retention: Duration) -> Result<Store> {
        let conn = open(path)?;
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let store = Store {
            tx,
            counts: Counts::new("audit-store"),
            changes_dropped: Arc::new(AtomicU64::new(0)),
        };
        let w = Writer {
            health: Health::new(store.counts.clone(), "65536 event rows"),
            counts: store.counts.clone(),
            backlog: VecDeque::new(),
            events: 0,
            retention,
        };
        thread::Builder::new()
            .name("audit-store".into())
            .spawn(move || w.run(conn, rx))?;
        Ok(store)
    }

    pub fn event(&self, r: Record) {
        let seq = self.counts.hand();
        if let Err(
            TrySendError::Full(Item::Event(r, seq))
            | TrySendError::Disconnected(Item::Event(r, seq)),
        ) = self.tx.try_send(Item::Event(Box::new(r), seq))
        {
            self.counts.drop_event(&r.ts, Cause::QueueFull, seq);
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
    backlog: VecDeque<Item>,
    /// Event rows in the backlog.
    events: usize,
    retention: Duration,
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
        if let Item::Event(r, seq) = &item {
            if self.events >= BACKLOG {
                let cause = self.health.cause().unwrap_or(Cause::QueueFull);
                self.counts.drop_event(&r.ts, cause, *seq);
                return;
            }
            // The first row after a hole: its gap row goes before it.
            if self.counts.has_gap_before(*seq) {
                self.push_gap();
            }
            self.events += 1;
        }
        self.backlog.push_back(item);
    }

    fn push_gap(&mut self) {
        if let Some(g) = self.counts.take_gap() {
            self.backlog
                .push_back(Item::Gap(g.record(self.counts.name).to_string()));
        }
    }

    fn run(mut self, mut conn: Connection, rx: Receiver<Item>) {
        let mut last_prune = Instant::now() - Duration::from_secs(3600);
        loop {
            let wait = match self.health.retry_at {
                Some(t) => t.saturating_duration_since(Instant::now()),
                None if self.backlog.is_empty() => Duration::from_secs(1),
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
            let (mut got, mut drained) = (0, disconnected);
            while got < BATCH && !disconnected {
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
                    Err(()) => {
                        drained = true;
                        break;
                    }
                }
            }
            // Drops after the last row queued get their gap row once the
            // store writes again.
            if drained && self.health.cause().is_none() && self.counts.has_gap() {
                self.push_gap();
            }
            while !self.backlog.is_empty() && self.health.due() {
                let n = self.backlog.len().min(BATCH);
                match insert(&mut conn, self.backlog.range(..n)) {
                    Ok(()) => {
                        let events = self
                            .backlog
                            .drain(..n)
                            .filter(|i| matches!(i, Item::Event(..)))
                            .count();
                        self.events -= events;
                        self.counts.wrote(events as u64);
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
            self.health.tick();
            if disconnected {
                return;
            }
            if self.health.cause().is_none() && last_prune.elapsed() > Duration::from_secs(60) {
                last_prune = Instant::now();
                let cutoff = clock::now_ns() - self.retention.as_nanos() as i64;
                for table in ["events", "changes"] {
                    if let Err(e) =
                        conn.execute(&format!("DELETE FROM {table} WHERE ts_ns < ?1"), [cutoff])
                    {
                        tracing::warn!("audit store retention failed: {e}");
                    }
                }
            }
        }
    }
}

fn insert<'a>(conn: &mut Connection, batch: impl Iterator<Item = &'a Item>) -> Result<()> {
    let tx = conn.transaction()?;
    {
        let mut ev = tx.prepare(
            "INSERT INTO events (ts_ns, ts, verdict, reason, hook, proto, src, sport, dst, dport, dst_bin, pid, comm, uid, cgroup, src_domain, dst_domain, country, geo_source, bridge, generation, seq, cpu)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23)",
        )?;
        let mut ch = tx.prepare("INSERT INTO changes (ts_ns, ts, kind, policy, sha256, generation, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)")?;
        for item in batch {
            match item {
                Item::Event(r, _) => {
                    ev.execute(params![
                        ts_ns(r),
                        r.ts,
                        r.verdict,
                        r.reason,
                        r.hook,
                        r.proto,
                        r.src,
                        r.sport,
                        r.dst,
                        r.dport,
                        addr_bin(r.dst.as_deref()),
                        r.pid,
                        r.comm,
                        r.uid,
                        r.cgroup,
                        r.src_domain,
                        r.dst_domain,
                        r.country,
                        r.geo_source,
                        r.bridge,
                        r.generation as i64,
                        r.seq as i64,
                        r.cpu,
                    ])?;
                }
                Item::Gap(detail) => {
                    let now = clock::now_ns();
                    let ts = crate::runtime::events::format_ts(now as u64, 0);
                    ch.execute(params![
                        now,
                        ts,
                        "gap",
                        None::<String>,
                        None::<String>,
                        None::<i64>,
                        detail
                    ])?;
                }
                Item::Change(c) => {
                    let now = clock::now_ns();
                    let ts = crate::runtime::events::format_ts(now as u64, 0);
                    ch.execute(params![
                        now,
                        ts,
                        c.kind,
                        c.policy,
                        c.sha256,
                        c.generation.map(|g| g as i64),
                        c.detail
                    ])?;
                }
            }
        }
    }
    tx.commit()?;
    Ok(())
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
    pub limit: usize,
}

/// Runs a query against the database read-only (works with no agent).
pub fn query(path: &Path, q: &Query) -> Result<Vec<Record>> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("opening audit store {}", path.display()))?;
    let mut sql = String::from(
        "SELECT ts, verdict, reason, hook, proto, src, sport, dst, dport, pid, comm, uid, cgroup, src_domain, dst_domain, country, geo_source, bridge, generation, seq, cpu FROM events WHERE 1=1",
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
            bridge: None,
            generation: 1,
            seq: 1,
            cpu: 0,
        }
    }

    #[test]
    fn stores_and_queries_by_time_domain_cidr_and_verdict() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let store = Store::start(&path, Duration::from_secs(86400 * 3650)).unwrap();
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
        let t = |s: &str| {
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .unwrap()
                .unix_timestamp_nanos() as i64
        };
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
}
