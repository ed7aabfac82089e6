//! The control socket: `status`, `reload`, `explain` and live `events` for
//! the CLI, over newline-delimited JSON on a Unix stream socket created
//! `0660`, root-owned, group configurable. Every caller's peer credentials
//! are checked (root, or a member of the control group) and logged with the
//! command.

use std::{
    collections::{BTreeSet, HashMap, HashSet, VecDeque},
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::{
        fd::AsRawFd as _,
        unix::{
            fs::PermissionsExt as _,
            net::{UnixListener, UnixStream},
        },
    },
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc::{self, Receiver, Sender, SyncSender, TrySendError},
    },
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    events::Record,
    store::{Change, Store},
};

pub const SOCKET_NAME: &str = "control.sock";

/// Default run directory for a pin directory: `/run/<its name>`, so agents
/// with different pin directories never share a control socket.
pub fn default_run_dir(bpffs_dir: &Path) -> PathBuf {
    PathBuf::from("/run").join(instance_name(bpffs_dir))
}

/// `/var/lib/<name of the bpffs dir>`: the default state directory.
pub fn default_state_dir(bpffs_dir: &Path) -> PathBuf {
    PathBuf::from("/var/lib").join(instance_name(bpffs_dir))
}

/// An agent instance is named by its pin directory (`bulkhead` by default).
fn instance_name(bpffs_dir: &Path) -> String {
    bpffs_dir
        .file_name()
        .map_or_else(|| "bulkhead".into(), |n| n.to_string_lossy().into_owned())
}

/// Which events a subscriber wants.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Filter {
    pub domain: Option<String>,
    pub verdict: Option<String>,
    pub reason: Option<String>,
    /// Only events at most this old (seconds).
    pub since_secs: Option<u64>,
    /// Events buffered for this subscriber before it starts losing them
    /// (default 16384, at most 65536).
    #[serde(default)]
    pub queue: Option<usize>,
}

impl Filter {
    pub fn matches(&self, r: &Record, now_unix: i64) -> bool {
        if let Some(d) = &self.domain
            && r.src_domain.as_deref() != Some(d.as_str())
            && r.dst_domain.as_deref() != Some(d.as_str())
        {
            return false;
        }
        if self.verdict.as_ref().is_some_and(|v| *v != r.verdict)
            || self.reason.as_ref().is_some_and(|v| *v != r.reason)
        {
            return false;
        }
        if let Some(s) = self.since_secs {
            let ts =
                time::OffsetDateTime::parse(&r.ts, &time::format_description::well_known::Rfc3339)
                    .map(|t| t.unix_timestamp())
                    .unwrap_or(i64::MAX);
            if ts < now_unix - s as i64 {
                return false;
            }
        }
        true
    }

    /// Narrows by domain, verdict or reason (not only by age).
    pub fn narrows(&self) -> bool {
        self.domain.is_some() || self.verdict.is_some() || self.reason.is_some()
    }
}

/// An event's `ts` (RFC 3339) as Unix nanoseconds.
pub fn ts_unix_ns(ts: &str) -> Option<i64> {
    time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
        .ok()
        .and_then(|t| i64::try_from(t.unix_timestamp_nanos()).ok())
}

/// `from_ns` of a follower that resumes: its events at or after that time.
fn at_or_after(r: &Record, from_ns: Option<i64>) -> bool {
    from_ns.is_none_or(|f| ts_unix_ns(&r.ts).is_none_or(|t| t >= f))
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Reload,
    Explain {
        cgroup: String,
        dst: String,
        port: u16,
        proto: String,
    },
    Events {
        follow: bool,
        filter: Filter,
        /// Only events at or after this time (Unix ns): a follower that
        /// reconnects asks for what it may not have seen yet.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from_ns: Option<i64>,
        /// The follower counts what it missed from the events' `seq`
        /// itself: this subscriber's loss notes then count only the events
        /// it lost that carry no sequence number, so nothing is counted twice.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        counts_seq_gaps: bool,
    },
    BridgeOpen {
        name: Option<String>,
        from: String,
        to: String,
        ports: Vec<String>,
        for_secs: u64,
        reason: String,
    },
    BridgeClose {
        name: String,
    },
    BridgeList,
    /// Internal: wakes the main loop after a signal set its flag; never
    /// accepted from the socket.
    #[serde(skip)]
    Wake,
}

/// Who is on the other end of the socket (SO_PEERCRED).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

fn peer(s: &UnixStream) -> Result<Peer> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt into a ucred of the right size.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("SO_PEERCRED");
    }
    Ok(Peer {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// Root, or a process whose primary or supplementary groups include `group`.
fn authorized(p: &Peer, group: Option<u32>) -> bool {
    if p.uid == 0 {
        return true;
    }
    let Some(g) = group else { return false };
    if p.gid == g {
        return true;
    }
    fs::read_to_string(format!("/proc/{}/status", p.pid))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Groups:"))
                .map(|l| l.split_whitespace().skip(1).any(|x| x.parse() == Ok(g)))
        })
        .unwrap_or(false)
}

pub fn group_id(name: &str) -> Result<u32> {
    if let Ok(n) = name.parse() {
        return Ok(n);
    }
    let c = std::ffi::CString::new(name)?;
    // SAFETY: getgrnam returns a pointer into static storage or null.
    let g = unsafe { libc::getgrnam(c.as_ptr()) };
    if g.is_null() {
        bail!("no such group: {name}");
    }
    Ok(unsafe { (*g).gr_gid })
}

/// A command the main loop must answer (it owns the maps and the policy).
pub struct Call {
    pub request: Request,
    /// Who asked (recorded with bridge changes).
    pub peer: Peer,
    pub reply: Sender<Value>,
}

/// Fan-out of enriched events to live subscribers, plus the recent ones.
pub struct Hub {
    recent: Mutex<VecDeque<Arc<Record>>>,
    subs: Mutex<Vec<Sub>>,
    /// Events dropped because a subscriber did not keep up.
    pub subscriber_drops: AtomicU64,
}

/// A follower's queue and its count of events it lost.
type Live = (Receiver<Arc<Record>>, Arc<AtomicU64>);

struct Sub {
    tx: SyncSender<Arc<Record>>,
    filter: Filter,
    from_ns: Option<i64>,
    /// Its client counts sequence gaps itself (`counts_seq_gaps`).
    counts_seq_gaps: bool,
    lost: Arc<AtomicU64>,
}

const RECENT: usize = 10_000;
/// Events buffered per subscriber before it starts losing them.
const SUB_QUEUE: usize = 16_384;

impl Hub {
    pub fn new() -> Arc<Hub> {
        Arc::new(Hub {
            recent: Mutex::new(VecDeque::new()),
            subs: Mutex::new(Vec::new()),
            subscriber_drops: AtomicU64::new(0),
        })
    }

    /// Never blocks: a subscriber whose queue is full loses the event (and
    /// is told how many it lost).
    pub fn publish(&self, r: Record) {
        let r = Arc::new(r);
        {
            let mut recent = self.recent.lock().expect("hub lock");
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(r.clone());
        }
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut subs = self.subs.lock().expect("hub lock");
        subs.retain(|s| {
            if !s.filter.matches(&r, now) || !at_or_after(&r, s.from_ns) {
                return true;
            }
            match s.tx.try_send(r.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    // A client that counts sequence gaps sees this one as a gap.
                    if !(s.counts_seq_gaps && r.seq != 0) {
                        s.lost.fetch_add(1, Ordering::Relaxed);
                    }
                    self.subscriber_drops.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Err(TrySendError::Disconnected(_)) => false,
            }
        });
    }

    pub fn subscribers(&self) -> usize {
        self.subs.lock().expect("hub lock").len()
    }

    fn subscribe(
        &self,
        filter: Filter,
        follow: bool,
        from_ns: Option<i64>,
        counts_seq_gaps: bool,
    ) -> (Vec<Arc<Record>>, Option<Live>) {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        // Take the backlog and register under one lock order, so no event
        // falls between them.
        let recent = self.recent.lock().expect("hub lock");
        let backlog = recent
            .iter()
            .filter(|r| filter.matches(r, now) && at_or_after(r, from_ns))
            .cloned()
            .collect();
        if !follow {
            return (backlog, None);
        }
        let (tx, rx) = mpsc::sync_channel(filter.queue.unwrap_or(SUB_QUEUE).clamp(64, 1 << 16));
        let lost = Arc::new(AtomicU64::new(0));
        self.subs.lock().expect("hub lock").push(Sub {
            tx,
            filter,
            from_ns,
            counts_seq_gaps,
            lost: lost.clone(),
        });
        (backlog, Some((rx, lost)))
    }
}

/// Creates the control socket, `0660` and owned by root and `group`. Done
/// before the agent drops its capabilities (changing the group needs
/// CAP_CHOWN); `serve` answers on it afterwards.
pub fn bind(run_dir: &Path, group: Option<u32>) -> Result<(UnixListener, PathBuf)> {
    fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let path = run_dir.join(SOCKET_NAME);
    // The pin lock is held, so a socket left here belongs to a dead agent.
    let _ = fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o660))?;
    if let Some(g) = group {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
        // SAFETY: chown of a path we just created.
        if unsafe { libc::chown(c.as_ptr(), 0, g) } != 0 {
            return Err(std::io::Error::last_os_error()).context("chown of the control socket");
        }
    }
    Ok((listener, path))
}

/// Answers on the control socket. Every command, accepted or refused, goes
/// to the log and, with `store`, to the audit trail with the caller's
/// credentials.
pub fn serve(
    listener: UnixListener,
    group: Option<u32>,
    calls: Sender<Call>,
    hub: Arc<Hub>,
    store: Option<Store>,
) -> Result<()> {
    thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else {
                    // Out of file descriptors, say: the client stays queued,
                    // so back off instead of spinning on it.
                    thread::sleep(Duration::from_millis(50));
                    continue;
                };
                let (calls, hub, store) = (calls.clone(), hub.clone(), store.clone());
                let _ = thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || {
                        if let Err(e) = handle(conn, group, calls, hub, store.as_ref()) {
                            eprintln!("bulkhead: control: {e:#}");
                        }
                    });
            }
        })?;
    Ok(())
}

fn handle(
    conn: UnixStream,
    group: Option<u32>,
    calls: Sender<Call>,
    hub: Arc<Hub>,
    store: Option<&Store>,
) -> Result<()> {
    let p = peer(&conn)?;
    let mut out = conn.try_clone()?;
    conn.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    let request = match read_request(&conn) {
        Ok(r) => r,
        Err(why) => {
            eprintln!(
                "bulkhead: control: request from pid {} uid {} gid {} refused: {why}",
                p.pid, p.uid, p.gid
            );
            // Unread input left behind (an oversized request) resets the
            // connection when it closes, but only after the client has
            // read what was sent before.
            writeln!(out, "{}", serde_json::json!({"ok": false, "error": why}))?;
            return Ok(());
        }
    };
    conn.set_read_timeout(None)?;
    let allowed = authorized(&p, group);
    let what = format!(
        "{} from pid {} uid {} gid {}: {}",
        serde_json::to_string(&request).unwrap_or_default(),
        p.pid,
        p.uid,
        p.gid,
        if allowed { "accepted" } else { "refused" }
    );
    eprintln!("bulkhead: control: {what}");
    if let Some(st) = store {
        st.change(Change {
            kind: if allowed {
                "control"
            } else {
                "control-refused"
            }
            .into(),
            policy: None,
            sha256: None,
            generation: None,
            detail: what,
        });
    }
    if !allowed {
        writeln!(
            out,
            "{}",
            serde_json::json!({"ok": false, "error": "permission denied: root or the control group only"})
        )?;
        return Ok(());
    }
    if let Request::Events {
        follow,
        filter,
        from_ns,
        counts_seq_gaps,
    } = request
    {
        let (backlog, live) = hub.subscribe(filter, follow, from_ns, counts_seq_gaps);
        return stream_events(out, backlog, live);
    }
    let (tx, rx) = mpsc::channel();
    calls
        .send(Call {
            request,
            peer: p,
            reply: tx,
        })
        .map_err(|_| anyhow!("agent is stopping"))?;
    let answer = rx
        .recv_timeout(Duration::from_secs(60))
        .map_err(|_| anyhow!("agent did not answer"))?;
    writeln!(out, "{answer}")?;
    Ok(())
}

/// The longest request line accepted (the CLI's are a few hundred bytes).
pub const MAX_REQUEST: usize = 1 << 20;
/// How long a client has to send its request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads one request: a line of JSON, at most [`MAX_REQUEST`] bytes, within
/// the socket's read timeout. A line cut short by the end of input is still
/// read (it may be whole JSON). Whatever the bytes, the error is a sentence
/// for the client's JSON error reply.
fn read_request(conn: impl std::io::Read) -> Result<Request, String> {
    use std::io::{ErrorKind, Read as _};
    let mut line = Vec::new();
    let read = BufReader::new(conn)
        .take(MAX_REQUEST as u64 + 1)
        .read_until(b'\n', &mut line);
    let newline = line.last() == Some(&b'\n');
    match read {
        Ok(_) => {}
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            return Err(if line.is_empty() {
                format!("no request within {} s", REQUEST_TIMEOUT.as_secs())
            } else {
                format!(
                    "incomplete request: {} bytes and no newline within {} s",
                    line.len(),
                    REQUEST_TIMEOUT.as_secs()
                )
            });
        }
        Err(e) => return Err(format!("reading the request: {e}")),
    }
    if line.len() > MAX_REQUEST {
        return Err(format!(
            "request longer than {MAX_REQUEST} bytes (one line of JSON is expected)"
        ));
    }
    if line.is_empty() {
        return Err("empty request: the connection ended before a request line".into());
    }
    let text = std::str::from_utf8(&line).map_err(|e| {
        format!(
            "bad request: not UTF-8 (invalid byte at offset {}); one line of JSON is expected",
            e.valid_up_to()
        )
    })?;
    serde_json::from_str(text).map_err(|e| {
        if newline {
            format!("bad request: {e}")
        } else {
            format!(
                "bad request: {e} (the input ended after {} bytes with no newline)",
                line.len()
            )
        }
    })
}

fn stream_events(out: UnixStream, backlog: Vec<Arc<Record>>, live: Option<Live>) -> Result<()> {
    // Buffered: a burst goes out in few writes; flushed whenever the queue
    // runs dry, so a quiet stream is still live.
    let mut out = std::io::BufWriter::with_capacity(1 << 16, out);
    for r in backlog {
        writeln!(out, "{}", serde_json::to_string(&*r)?)?;
    }
    out.flush()?;
    let Some((rx, lost)) = live else {
        return Ok(());
    };
    let mut reported = 0;
    loop {
        let next = match rx.try_recv() {
            Ok(r) => Some(r),
            Err(mpsc::TryRecvError::Disconnected) => return Ok(()),
            Err(mpsc::TryRecvError::Empty) => {
                out.flush()?;
                match rx.recv_timeout(Duration::from_millis(500)) {
                    Ok(r) => Some(r),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
                }
            }
        };
        if let Some(r) = next {
            writeln!(out, "{}", serde_json::to_string(&*r)?)?;
        }
        let l = lost.load(Ordering::Relaxed);
        if l > reported {
            let note = serde_json::json!({"type": "lost", "count": l - reported, "why": "this subscriber fell behind"});
            writeln!(out, "{note}")?;
            reported = l;
        }
    }
}

/// Client side: sends one request and returns the connected stream.
pub fn connect(run_dir: &Path, request: &Request) -> Result<BufReader<UnixStream>> {
    let path = run_dir.join(SOCKET_NAME);
    let mut s = UnixStream::connect(&path).with_context(|| {
        format!(
            "connecting to the agent at {} (is `bulkhead run` running?)",
            path.display()
        )
    })?;
    writeln!(s, "{}", serde_json::to_string(request)?)?;
    Ok(BufReader::new(s))
}

/// The error of [`connect`] means no agent is there now (no socket, or a
/// socket left by one that died, or one that closed as it died), so a
/// follower can wait for the next one; any other error (e.g. permission
/// denied) would not go away by waiting.
pub fn agent_absent(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(gone)
}

/// An I/O error that says the agent is not (or no longer) on the socket.
pub fn gone(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        e.kind(),
        K::NotFound
            | K::ConnectionRefused
            | K::ConnectionReset
            | K::ConnectionAborted
            | K::BrokenPipe
    )
}

/// How far back from the newest event it handled a follower asks again
/// when it reconnects. Events reach the agent in the order they reserved
/// their place in the ring buffer, which across CPUs differs from their
/// timestamps' order by the time between a program reading the clock and
/// reserving (microseconds, unless it was preempted in between); two
/// seconds leave a wide margin.
pub const RESUME_OVERLAP_NS: i64 = 2_000_000_000;

/// What a follower has seen, kept across reconnects: the events it handled
/// (so no event is printed twice) and the last sequence number of each CPU
/// (so what it could not see is counted).
///
/// An event is the same event when `(ts, cpu, seq)` are: the kernel gives
/// each decision that asks for an event the next number of its CPU's
/// counter, and the counters live in pinned maps, so a `(cpu, seq)` pair is
/// given once as long as those maps live; `ts` (nanoseconds, from the
/// kernel's clock) tells apart the events of two lives of the maps (after a
/// `detach`, or an upgrade to another map layout). Events the agent makes
/// itself (`seq` 0: connections cut) are the same event when their whole
/// line is. Only events at most [`RESUME_OVERLAP_NS`] older than the newest
/// one are remembered: a reconnecting follower asks for nothing older.
#[derive(Debug, Default)]
pub struct Seen {
    last_seq: HashMap<u16, u64>,
    /// CPUs with no event since the last reconnect: a lower `seq` there
    /// means the kernel's counters started again (new maps).
    fresh: HashSet<u16>,
    /// `(ts ns, cpu, seq, line if seq is 0)` of the recent events handled.
    recent: BTreeSet<(i64, u16, u64, String)>,
    newest_ns: Option<i64>,
}

/// Events of one CPU that a follower did not see: `seq` `first..=last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Missed {
    pub cpu: u16,
    pub first: u64,
    pub last: u64,
}

impl Missed {
    pub fn count(&self) -> u64 {
        self.last - self.first + 1
    }

    /// The note a follower prints, in the shape of the agent's loss notes.
    pub fn note(&self, filtered: bool) -> Value {
        let mut why = format!(
            "cpu {}, seq {} to {}: rate limited or lost in the kernel, or lost on the way to this follower (agent restarting, follower behind)",
            self.cpu, self.first, self.last
        );
        if filtered {
            why += "; some may not match the filter";
        }
        serde_json::json!({
            "type": "lost",
            "count": self.count(),
            "cpu": self.cpu,
            "first_seq": self.first,
            "last_seq": self.last,
            "why": why,
        })
    }
}

/// What to do with an event a follower received.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Handled already (the agent sent it again after a reconnect).
    Repeat,
    /// New; `Some` when events of its CPU before it were not seen.
    New(Option<Missed>),
}

impl Seen {
    /// Notes a received event (`line` is its JSON text).
    pub fn admit(&mut self, r: &Record, line: &str) -> Admit {
        // Older than the overlap (the clock stepped back): no agent sends
        // it again, so it need not be remembered.
        let ts = ts_unix_ns(&r.ts)
            .filter(|t| self.newest_ns.is_none_or(|n| *t >= n - RESUME_OVERLAP_NS));
        if let Some(t) = ts {
            let key = (
                t,
                r.cpu,
                r.seq,
                if r.seq == 0 {
                    line.to_string()
                } else {
                    String::new()
                },
            );
            if !self.recent.insert(key) {
                return Admit::Repeat;
            }
            if self.newest_ns.is_none_or(|n| t > n) {
                self.newest_ns = Some(t);
                let floor = t - RESUME_OVERLAP_NS;
                while self.recent.first().is_some_and(|k| k.0 < floor) {
                    self.recent.pop_first();
                }
            }
        }
        if r.seq == 0 {
            return Admit::New(None);
        }
        let fresh = self.fresh.remove(&r.cpu);
        let missed = match self.last_seq.get(&r.cpu).copied() {
            Some(p) if r.seq > p.saturating_add(1) => Some(Missed {
                cpu: r.cpu,
                first: p + 1,
                last: r.seq - 1,
            }),
            // Late by a few microseconds (another program on this CPU took
            // the next number and reserved first): already counted as missed.
            Some(p) if r.seq <= p && !fresh => return Admit::New(None),
            _ => None,
        };
        self.last_seq.insert(r.cpu, r.seq);
        Admit::New(missed)
    }

    /// Call when the follower connects again after losing its agent.
    pub fn reconnected(&mut self) {
        self.fresh = self.last_seq.keys().copied().collect();
    }

    /// What a reconnecting follower asks for: events at or after this.
    pub fn resume_from_ns(&self) -> Option<i64> {
        self.newest_ns.map(|n| n - RESUME_OVERLAP_NS)
    }
}

/// Sends a request and reads its single JSON answer.
pub fn call(run_dir: &Path, request: &Request) -> Result<Value> {
    let mut r = connect(run_dir, request)?;
    let mut line = String::new();
    r.read_line(&mut line)?;
    let v: Value = serde_json::from_str(&line)
        .with_context(|| format!("bad answer from the agent: {line}"))?;
    if v.get("ok") == Some(&Value::Bool(false)) {
        bail!(
            "{}",
            v.get("error")
                .and_then(Value::as_str)
                .unwrap_or("request failed")
        );
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event at `secs` seconds past 2026-01-01T00:00:00Z.
    fn rec(secs: i64, cpu: u16, seq: u64) -> Record {
        let t = time::OffsetDateTime::from_unix_timestamp(1_767_225_600 + secs).unwrap();
        Record {
            ts: t
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap(),
            verdict: "deny".into(),
            reason: "cross-domain".into(),
            hook: "connect4".into(),
            proto: "tcp".into(),
            src: None,
            sport: None,
            dst: Some("10.0.0.2".into()),
            dport: Some(443),
            pid: None,
            comm: None,
            uid: None,
            cgroup: "/c".into(),
            cgroup_id: 7,
            src_domain: Some("a".into()),
            dst_domain: Some("b".into()),
            country: None,
            geo_source: None,
            geo_source_built: None,
            bridge: None,
            generation: 1,
            seq,
            cpu,
        }
    }

    fn admit(seen: &mut Seen, r: &Record) -> Admit {
        seen.admit(r, &serde_json::to_string(r).unwrap())
    }

    fn missed(cpu: u16, first: u64, last: u64) -> Admit {
        Admit::New(Some(Missed { cpu, first, last }))
    }

    /// Every request that cannot be read gets an error sentence, whatever
    /// its bytes; a whole request is read with or without its newline.
    #[test]
    fn unreadable_requests_get_an_error_whatever_their_bytes() {
        let read = |b: &[u8]| read_request(std::io::Cursor::new(b.to_vec()));
        assert!(matches!(
            read(b"{\"cmd\":\"status\"}\n"),
            Ok(Request::Status)
        ));
        assert!(matches!(read(b"{\"cmd\":\"status\"}"), Ok(Request::Status)));
        let says = |b: &[u8], what: &str| {
            let e = read(b).unwrap_err();
            assert!(e.contains(what), "{:?}: {e}", String::from_utf8_lossy(b));
        };
        says(
            b"\x00\xff\xfe\x01garbage\n",
            "not UTF-8 (invalid byte at offset 1)",
        );
        says(
            b"\x7fELF\x02\x01\x01",
            "bad request: expected value at line 1 column 1",
        );
        says(
            b"{\"cmd\":\"stat",
            "EOF while parsing a string at line 1 column 12 (the input ended after 12 bytes with no newline)",
        );
        says(b"{\"cmd\":\"launch\"}\n", "unknown variant `launch`");
        says(b"", "empty request");
        says(b"\n", "bad request: EOF while parsing");
        // Never more than the limit is read, however long the line is.
        let endless = std::io::Read::take(std::io::repeat(b'['), 1 << 40);
        let e = read_request(endless).unwrap_err();
        assert_eq!(
            e,
            format!("request longer than {MAX_REQUEST} bytes (one line of JSON is expected)")
        );
        let mut exact = vec![b' '; MAX_REQUEST - 17];
        exact.extend_from_slice(b"{\"cmd\":\"status\"}\n");
        assert_eq!(exact.len(), MAX_REQUEST);
        assert!(matches!(read(&exact), Ok(Request::Status)));
    }

    #[test]
    fn a_follower_prints_nothing_twice_and_counts_what_it_missed() {
        let mut seen = Seen::default();
        assert_eq!(seen.resume_from_ns(), None);
        assert_eq!(admit(&mut seen, &rec(0, 0, 1)), Admit::New(None));
        assert_eq!(admit(&mut seen, &rec(1, 0, 2)), Admit::New(None));
        assert_eq!(admit(&mut seen, &rec(1, 1, 40)), Admit::New(None));
        // The agent restarts; the follower asks from shortly before the
        // newest event it handled, and gets those again.
        seen.reconnected();
        let newest = ts_unix_ns(&rec(1, 0, 2).ts).unwrap();
        assert_eq!(seen.resume_from_ns(), Some(newest - RESUME_OVERLAP_NS));
        assert_eq!(admit(&mut seen, &rec(0, 0, 1)), Admit::Repeat);
        assert_eq!(admit(&mut seen, &rec(1, 0, 2)), Admit::Repeat);
        assert_eq!(admit(&mut seen, &rec(1, 1, 40)), Admit::Repeat);
        // What the kernel queued while no agent ran, minus 3 rate limited.
        assert_eq!(admit(&mut seen, &rec(2, 0, 3)), Admit::New(None));
        assert_eq!(admit(&mut seen, &rec(3, 0, 7)), missed(0, 4, 6));
        assert_eq!(admit(&mut seen, &rec(3, 1, 45)), missed(1, 41, 44));
        assert_eq!(
            Missed {
                cpu: 0,
                first: 4,
                last: 6
            }
            .count(),
            3
        );
        // Another CPU's first event: nothing to count from.
        assert_eq!(admit(&mut seen, &rec(3, 2, 900)), Admit::New(None));
    }

    #[test]
    fn the_same_sequence_number_in_another_life_of_the_maps_is_another_event() {
        let mut seen = Seen::default();
        assert_eq!(admit(&mut seen, &rec(0, 0, 10)), Admit::New(None));
        // `detach` and a new agent: the counters start again.
        seen.reconnected();
        assert_eq!(admit(&mut seen, &rec(1, 0, 1)), Admit::New(None));
        assert_eq!(admit(&mut seen, &rec(1, 0, 3)), missed(0, 2, 2));
        // Same (cpu, seq) as an event handled before, another time.
        assert_eq!(admit(&mut seen, &rec(2, 0, 10)), missed(0, 4, 9));
    }

    #[test]
    fn an_event_late_by_microseconds_is_printed_and_not_counted_again() {
        let mut seen = Seen::default();
        assert_eq!(admit(&mut seen, &rec(0, 0, 5)), Admit::New(None));
        assert_eq!(admit(&mut seen, &rec(0, 0, 7)), missed(0, 6, 6));
        assert_eq!(admit(&mut seen, &rec(0, 0, 6)), Admit::New(None));
        assert_eq!(admit(&mut seen, &rec(0, 0, 8)), Admit::New(None));
    }

    #[test]
    fn events_the_agent_made_are_the_same_when_their_line_is() {
        let mut seen = Seen::default();
        let mut cut = rec(0, 0, 0);
        cut.verdict = "cut".into();
        assert_eq!(admit(&mut seen, &cut), Admit::New(None));
        assert_eq!(admit(&mut seen, &cut), Admit::Repeat);
        // Another connection cut at the same instant.
        cut.dport = Some(80);
        assert_eq!(admit(&mut seen, &cut), Admit::New(None));
    }

    #[test]
    fn only_the_overlap_is_remembered() {
        let mut seen = Seen::default();
        assert_eq!(admit(&mut seen, &rec(0, 0, 1)), Admit::New(None));
        assert_eq!(admit(&mut seen, &rec(1, 0, 2)), Admit::New(None));
        assert_eq!(admit(&mut seen, &rec(10, 0, 3)), Admit::New(None));
        assert_eq!(seen.recent.len(), 1, "{:?}", seen.recent);
        assert_eq!(admit(&mut seen, &rec(10, 0, 3)), Admit::Repeat);
    }

    #[test]
    fn a_resuming_subscriber_gets_only_what_it_asked_for_and_its_losses_once() {
        let hub = Hub::new();
        for s in 0..10 {
            hub.publish(rec(s, 0, s as u64 + 1));
        }
        let from = ts_unix_ns(&rec(7, 0, 0).ts);
        let filter = Filter {
            queue: Some(64),
            ..Filter::default()
        };
        let (backlog, live) = hub.subscribe(filter, true, from, true);
        let seqs: Vec<u64> = backlog.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [8, 9, 10]);
        let (rx, lost) = live.unwrap();
        // Older than asked: not sent live either.
        hub.publish(rec(1, 1, 1));
        // 64 queued (the smallest queue), then 6 with seq dropped, which
        // the client sees as a gap, and one cut event it cannot see.
        for s in 0..70 {
            hub.publish(rec(20, 2, s + 1));
        }
        hub.publish(rec(21, 2, 0));
        let got: Vec<Arc<Record>> = rx.try_iter().collect();
        assert_eq!(got.len(), 64);
        assert!(got.iter().all(|r| r.cpu == 2), "{got:?}");
        assert_eq!(lost.load(Ordering::Relaxed), 1);
        assert_eq!(hub.subscriber_drops.load(Ordering::Relaxed), 7);
    }
}
