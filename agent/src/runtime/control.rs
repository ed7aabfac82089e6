//! The control socket's server: `status`, `reload`, `explain`, bridges and
//! live `events` for the CLI, over newline-delimited JSON on a Unix stream
//! socket created `0660`, root-owned, group configurable. Every caller's
//! peer credentials are checked (root, or a member of the control group)
//! and logged with the command.
//!
//! Each client is a task on the agent's loop: a client that sends nothing,
//! sends half a line or stops reading holds only its own task. Commands that
//! change or read the agent's state go to [`super::agent::Agent::handle`]
//! as a [`Call`]; events stream from the [`Hub`].

use std::{
    collections::VecDeque,
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tracing::{info, warn};

use super::protocol::{
    Filter, MAX_REQUEST, Peer, REQUEST_TIMEOUT, Reply, Request, Response, SOCKET_NAME,
};
use crate::{
    runtime::events::Record,
    runtime::health::{Cause, Counts},
    runtime::store::{Change, Store},
};

/// A command the agent's state machine answers.
pub struct Call {
    pub request: Request,
    /// Who asked (recorded with bridge changes).
    pub peer: Peer,
    pub reply: oneshot::Sender<Response>,
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
    // SAFETY: checked non-null above.
    Ok(unsafe { (*g).gr_gid })
}

/// Fan-out of enriched events to live subscribers, plus the recent ones.
/// Events travel as their JSON (each serialized once, for every output):
/// the recent ones take about half the memory that way, which a reload's
/// peak stands on.
pub struct Hub {
    recent: Mutex<VecDeque<Arc<str>>>,
    subs: Mutex<Vec<Sub>>,
    /// Events dropped because a subscriber did not keep up.
    pub subscriber_drops: AtomicU64,
    /// The `followers` output: copies written to subscribers' sockets
    /// (`written`), still in their queues (`pending`, see
    /// [`Hub::note_pending`]), and dropped (`queue_full`, the same as
    /// `subscriber_drops`).
    pub counts: Arc<Counts>,
}

/// A follower's queue and its count of events it lost.
type Live = (mpsc::Receiver<Arc<str>>, Arc<AtomicU64>);

struct Sub {
    tx: mpsc::Sender<Arc<str>>,
    filter: Filter,
    from_ns: Option<i64>,
    /// Its client counts sequence gaps itself (`counts_seq_gaps`).
    counts_seq_gaps: bool,
    lost: Arc<AtomicU64>,
}

const RECENT: usize = 10_000;
/// Events buffered per subscriber before it starts losing them.
const SUB_QUEUE: usize = 16_384;

/// `from_ns` of a follower that resumes: its events at or after that time.
fn at_or_after(r: &Record, from_ns: Option<i64>) -> bool {
    from_ns.is_none_or(|f| crate::clock::parse_ts(&r.ts).is_none_or(|t| t >= f))
}

impl Hub {
    pub fn new() -> Arc<Hub> {
        Arc::new(Hub {
            recent: Mutex::new(VecDeque::new()),
            subs: Mutex::new(Vec::new()),
            subscriber_drops: AtomicU64::new(0),
            counts: Counts::new("followers"),
        })
    }

    /// Never waits: a subscriber whose queue is full loses the event (and
    /// is told how many it lost). `json`: the event as `r` serializes.
    pub fn publish(&self, r: &Record, json: Arc<str>) {
        {
            let mut recent = self.recent.lock().expect("hub lock");
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(json.clone());
        }
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut subs = self.subs.lock().expect("hub lock");
        subs.retain(|s| {
            if !s.filter.matches(r, now) || !at_or_after(r, s.from_ns) {
                return !s.tx.is_closed();
            }
            match s.tx.try_send(json.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    // A client that counts sequence gaps sees this one as a gap.
                    if !(s.counts_seq_gaps && r.seq != 0) {
                        s.lost.fetch_add(1, Ordering::Relaxed);
                    }
                    self.subscriber_drops.fetch_add(1, Ordering::Relaxed);
                    self.counts.count_drop(Cause::QueueFull);
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }

    /// Updates the followers' `pending`: events in their queues.
    pub fn note_pending(&self) {
        let queued: usize = self
            .subs
            .lock()
            .expect("hub lock")
            .iter()
            .map(|s| s.tx.max_capacity() - s.tx.capacity())
            .sum();
        self.counts.pending.store(queued as u64, Ordering::Relaxed);
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
    ) -> (Vec<Arc<str>>, Option<Live>) {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        // Take the backlog and register under one lock order, so no event
        // falls between them; filter it after, so `publish` never waits
        // for the parsing.
        let recent = self.recent.lock().expect("hub lock");
        let taken: Vec<Arc<str>> = recent.iter().cloned().collect();
        let matching = |taken: Vec<Arc<str>>, filter: &Filter| -> Vec<Arc<str>> {
            taken
                .into_iter()
                .filter(|json| {
                    serde_json::from_str::<Record>(json)
                        .is_ok_and(|r| filter.matches(&r, now) && at_or_after(&r, from_ns))
                })
                .collect()
        };
        if !follow {
            drop(recent);
            return (matching(taken, &filter), None);
        }
        let (tx, rx) = mpsc::channel(filter.queue.unwrap_or(SUB_QUEUE).clamp(64, 1 << 16));
        let lost = Arc::new(AtomicU64::new(0));
        self.subs.lock().expect("hub lock").push(Sub {
            tx,
            filter: filter.clone(),
            from_ns,
            counts_seq_gaps,
            lost: lost.clone(),
        });
        drop(recent);
        (matching(taken, &filter), Some((rx, lost)))
    }
}

/// Creates the control socket, `0660` and owned by root and `group`. Done
/// before the agent drops its capabilities (changing the group needs
/// CAP_CHOWN); [`serve`] answers on it afterwards.
pub fn bind(
    run_dir: &Path,
    group: Option<u32>,
) -> Result<(std::os::unix::net::UnixListener, PathBuf)> {
    fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let path = run_dir.join(SOCKET_NAME);
    // The pin lock is held, so a socket left here belongs to a dead agent.
    let _ = fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path)
        .with_context(|| format!("binding {}", path.display()))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o660))?;
    if let Some(g) = group {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
        // SAFETY: chown of a path we just created.
        if unsafe { libc::chown(c.as_ptr(), 0, g) } != 0 {
            return Err(std::io::Error::last_os_error()).context("chown of the control socket");
        }
    }
    listener.set_nonblocking(true)?;
    Ok((listener, path))
}

/// What every client's task needs.
#[derive(Clone)]
pub struct Server {
    pub group: Option<u32>,
    pub calls: mpsc::Sender<Call>,
    pub hub: Arc<Hub>,
    pub store: Option<Store>,
}

/// Accepts clients until the agent stops, one task each. Every command,
/// accepted or refused, goes to the log and, with a store, to the audit
/// trail with the caller's credentials.
pub async fn serve(listener: std::os::unix::net::UnixListener, server: Server) {
    let listener = match UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            warn!("control socket not served: {e}");
            return;
        }
    };
    loop {
        match listener.accept().await {
            Ok((conn, _)) => {
                let server = server.clone();
                tokio::spawn(async move {
                    if let Err(e) = client(conn, server).await {
                        info!("control: {e:#}");
                    }
                });
            }
            // Out of file descriptors, say: the client stays queued, so
            // back off instead of spinning on it.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn reply(out: &mut (impl tokio::io::AsyncWrite + Unpin), r: Response) -> Result<()> {
    let mut line = serde_json::to_vec(&Reply::from(r))?;
    line.push(b'\n');
    out.write_all(&line).await?;
    Ok(())
}

async fn client(conn: UnixStream, server: Server) -> Result<()> {
    let cred = conn.peer_cred().context("SO_PEERCRED")?;
    let p = Peer {
        pid: cred.pid().unwrap_or(0),
        uid: cred.uid(),
        gid: cred.gid(),
    };
    let (input, mut out) = conn.into_split();
    let request = match read_request(input, REQUEST_TIMEOUT).await {
        Ok(r) => r,
        Err(why) => {
            info!(
                "control: request from pid {} uid {} gid {} refused: {why}",
                p.pid, p.uid, p.gid
            );
            // Unread input left behind (an oversized request) resets the
            // connection when it closes, but only after the client has
            // read what was sent before.
            return reply(&mut out, Response::error(why)).await;
        }
    };
    let allowed = authorized(&p, server.group);
    let what = format!(
        "{} from pid {} uid {} gid {}: {}",
        serde_json::to_string(&request).unwrap_or_default(),
        p.pid,
        p.uid,
        p.gid,
        if allowed { "accepted" } else { "refused" }
    );
    info!("control: {what}");
    if let Some(st) = &server.store {
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
        return reply(
            &mut out,
            Response::error("permission denied: root or the control group only"),
        )
        .await;
    }
    if let Request::Events {
        follow,
        filter,
        from_ns,
        counts_seq_gaps,
    } = request
    {
        let (backlog, live) = server
            .hub
            .subscribe(filter, follow, from_ns, counts_seq_gaps);
        return stream_events(out, backlog, live, server.hub.counts.clone()).await;
    }
    let (tx, rx) = oneshot::channel();
    let call = Call {
        request,
        peer: p,
        reply: tx,
    };
    let answer = if server.calls.send(call).await.is_err() {
        Response::error("agent is stopping")
    } else {
        match tokio::time::timeout(Duration::from_secs(60), rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Response::error("agent is stopping"),
            Err(_) => Response::error("agent did not answer within 60 s"),
        }
    };
    reply(&mut out, answer).await
}

/// Reads one request: a line of JSON, at most [`MAX_REQUEST`] bytes, within
/// `limit`. A line cut short by the end of input is still read (it may be
/// whole JSON). Whatever the bytes, the error is a sentence for the
/// client's JSON error reply.
async fn read_request(conn: impl AsyncRead + Unpin, limit: Duration) -> Result<Request, String> {
    let mut line = Vec::new();
    let mut input = BufReader::new(conn).take(MAX_REQUEST as u64 + 1);
    // Bytes read before the timeout stay in `line` (read_until appends as
    // it goes), so a half-sent request is reported with its length.
    let read = tokio::time::timeout(limit, input.read_until(b'\n', &mut line)).await;
    let newline = line.last() == Some(&b'\n');
    match read {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(format!("reading the request: {e}")),
        Err(_) => {
            return Err(if line.is_empty() {
                format!("no request within {} s", limit.as_secs())
            } else {
                format!(
                    "incomplete request: {} bytes and no newline within {} s",
                    line.len(),
                    limit.as_secs()
                )
            });
        }
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

async fn stream_events(
    out: impl tokio::io::AsyncWrite + Unpin,
    backlog: Vec<Arc<str>>,
    live: Option<Live>,
    counts: Arc<Counts>,
) -> Result<()> {
    // Buffered: a burst goes out in few writes; flushed whenever the queue
    // runs dry, so a quiet stream is still live. A client that stops
    // reading blocks only this task; its queue fills and it loses events
    // (counted), never the agent.
    let mut out = tokio::io::BufWriter::with_capacity(1 << 16, out);
    for json in backlog {
        out.write_all(json.as_bytes()).await?;
        out.write_all(b"\n").await?;
    }
    out.flush().await?;
    let Some((mut rx, lost)) = live else {
        return Ok(());
    };
    let mut reported = 0;
    loop {
        let next = match rx.try_recv() {
            Ok(r) => Some(r),
            Err(mpsc::error::TryRecvError::Disconnected) => return Ok(()),
            Err(mpsc::error::TryRecvError::Empty) => {
                out.flush().await?;
                match tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
                    Ok(Some(r)) => Some(r),
                    Ok(None) => return Ok(()),
                    Err(_) => None,
                }
            }
        };
        if let Some(json) = next {
            out.write_all(json.as_bytes()).await?;
            out.write_all(b"\n").await?;
            counts.written.fetch_add(1, Ordering::Relaxed);
        }
        let l = lost.load(Ordering::Relaxed);
        if l > reported {
            let note = serde_json::json!({"type": "lost", "count": l - reported, "why": "this subscriber fell behind"});
            out.write_all(format!("{note}\n").as_bytes()).await?;
            reported = l;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(b: &[u8]) -> Result<Request, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(read_request(b, Duration::from_secs(5)))
    }

    /// Every request that cannot be read gets an error sentence, whatever
    /// its bytes; a whole request is read with or without its newline.
    #[test]
    fn unreadable_requests_get_an_error_whatever_their_bytes() {
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
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let endless = tokio::io::repeat(b'[');
        let e = rt
            .block_on(read_request(endless, Duration::from_secs(30)))
            .unwrap_err();
        assert_eq!(
            e,
            format!("request longer than {MAX_REQUEST} bytes (one line of JSON is expected)")
        );
        let mut exact = vec![b' '; MAX_REQUEST - 17];
        exact.extend_from_slice(b"{\"cmd\":\"status\"}\n");
        assert_eq!(exact.len(), MAX_REQUEST);
        assert!(matches!(read(&exact), Ok(Request::Status)));
    }

    /// A client that sends half a line and waits is told so when its time
    /// is up, with what it sent.
    #[test]
    fn a_half_sent_request_times_out_with_its_length() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (mut a, b) = tokio::io::duplex(64);
            a.write_all(b"{\"cmd\":\"sta").await.unwrap();
            let e = read_request(b, Duration::from_millis(200))
                .await
                .unwrap_err();
            assert_eq!(e, "incomplete request: 11 bytes and no newline within 0 s");
            drop(a);
        });
    }

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
            name: None,
            bridge: None,
            generation: 1,
            seq,
            cpu,
        }
    }

    fn publish(hub: &Hub, r: Record) {
        hub.publish(&r, serde_json::to_string(&r).unwrap().into());
    }

    fn parsed(json: &str) -> Record {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a_resuming_subscriber_gets_only_what_it_asked_for_and_its_losses_once() {
        let hub = Hub::new();
        for s in 0..10 {
            publish(&hub, rec(s, 0, s as u64 + 1));
        }
        let from = crate::clock::parse_ts(&rec(7, 0, 0).ts);
        let filter = Filter {
            queue: Some(64),
            ..Filter::default()
        };
        let (backlog, live) = hub.subscribe(filter, true, from, true);
        let seqs: Vec<u64> = backlog.iter().map(|j| parsed(j).seq).collect();
        assert_eq!(seqs, [8, 9, 10]);
        let (mut rx, lost) = live.unwrap();
        // Older than asked: not sent live either.
        publish(&hub, rec(1, 1, 1));
        // 64 queued (the smallest queue), then 6 with seq dropped, which
        // the client sees as a gap, and one cut event it cannot see.
        for s in 0..70 {
            publish(&hub, rec(20, 2, s + 1));
        }
        publish(&hub, rec(21, 2, 0));
        let mut got = Vec::new();
        while let Ok(j) = rx.try_recv() {
            got.push(parsed(&j));
        }
        assert_eq!(got.len(), 64);
        assert!(got.iter().all(|r| r.cpu == 2), "{got:?}");
        assert_eq!(lost.load(Ordering::Relaxed), 1);
        assert_eq!(hub.subscriber_drops.load(Ordering::Relaxed), 7);
    }
}
