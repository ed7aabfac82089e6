//! The control socket: `status`, `reload`, `explain` and live `events` for
//! the CLI, over newline-delimited JSON on a Unix stream socket created
//! `0660`, root-owned, group configurable. Every caller's peer credentials
//! are checked (root, or a member of the control group) and logged with the
//! command.

use std::{
    collections::VecDeque,
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
            if !s.filter.matches(&r, now) {
                return true;
            }
            match s.tx.try_send(r.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    s.lost.fetch_add(1, Ordering::Relaxed);
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

    fn subscribe(&self, filter: Filter, follow: bool) -> (Vec<Arc<Record>>, Option<Live>) {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        // Take the backlog and register under one lock order, so no event
        // falls between them.
        let recent = self.recent.lock().expect("hub lock");
        let backlog = recent
            .iter()
            .filter(|r| filter.matches(r, now))
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
            for conn in listener.incoming().flatten() {
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
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    let request: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            writeln!(
                out,
                "{}",
                serde_json::json!({"ok": false, "error": format!("bad request: {e}")})
            )?;
            return Ok(());
        }
    };
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
    if let Request::Events { follow, filter } = request {
        return stream_events(out, &hub, filter, follow);
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

fn stream_events(out: UnixStream, hub: &Hub, filter: Filter, follow: bool) -> Result<()> {
    let (backlog, live) = hub.subscribe(filter, follow);
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
