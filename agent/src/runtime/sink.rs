//! The JSON-lines outputs: the events log and stdout. Each is a writer
//! thread fed by a bounded queue that the events task only `try_send`s to,
//! so a slow or broken output never stalls the others or enforcement.
//!
//! The events log:
//! - is written in whole lines only: a batch is one `write` (O_APPEND), and
//!   when it fails (a full disk, a short write) the file is cut back to its
//!   length before it, so no line is ever torn; a torn last line left by a
//!   crash or a power loss is cut off when the agent starts (logged, and
//!   recorded in the audit store's `changes`);
//! - holds what it could not write (up to [`BACKLOG_BYTES`]) and retries,
//!   backing off to 2 s, so an outage shorter than that loses nothing;
//!   beyond it events are dropped, counted, and a gap record
//!   (`{"type":"gap",...}`) is the first line written once it recovers;
//! - rotates by size: `events.jsonl` → `events.jsonl.1` → … →
//!   `events.jsonl.<keep>`, the oldest dropped, so the log stays bounded at
//!   about `(keep + 1) × max`;
//! - follows external rotation: it is reopened on SIGHUP / `reload`, and
//!   within a second when the path no longer names the open file (moved or
//!   deleted: logrotate's `create` mode). With `copytruncate` it keeps
//!   appending at the new end (O_APPEND).

use std::{
    collections::VecDeque,
    fs::{self, File, OpenOptions},
    io::{self, Read as _, Seek as _, SeekFrom, Write as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Receiver, SyncSender, TrySendError},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::health::{Cause, Counts, Health};
use crate::seal::{self, Chain, Head, Sealer};

#[derive(Clone, Copy, Debug)]
pub struct Rotation {
    /// Rotate when the file reaches this many bytes; 0 = never.
    pub max_bytes: u64,
    /// Rotated files kept beside the live one.
    pub keep: u32,
}

/// Lines queued for a writer before the events task drops them
/// (`queue_full`; while the output's writes fail, for their cause:
/// [`Counts::drop_cause`]).
pub const QUEUE: usize = 16_384;
/// What a failing output holds for its retries before it drops
/// (`disk_full`, `io_error`): 16 MiB, about 35 000 events.
pub const BACKLOG_BYTES: usize = 16 << 20;
/// The most written in one `write`.
const CHUNK: usize = 256 << 10;
/// The most lines a writer takes from its queue at a time, so that a
/// steady stream does not keep it from its other duties.
const TAKE: usize = 4096;

/// One event's line (ending in `\n`), its time (for gap records) and its
/// hand-over number ([`Counts::hand`]).
struct Line {
    ts: String,
    text: String,
    seq: u64,
}

/// The events task's handle on a line output.
#[derive(Clone)]
pub struct Lines {
    tx: SyncSender<Line>,
    pub counts: Arc<Counts>,
    reopen: Arc<AtomicBool>,
    done: Arc<Mutex<Option<thread::JoinHandle<()>>>>,
}

/// A torn last line cut off at start.
#[derive(Debug)]
pub struct Repaired {
    pub path: PathBuf,
    /// Bytes cut (the torn line).
    pub cut: u64,
}

impl Lines {
    /// Opens (creating) the events log, cuts off a torn last line, and
    /// starts its writer; with a sealing key (and where the chain's head is
    /// kept), every line is sealed ([`crate::seal`]).
    pub fn file(
        path: &Path,
        rotation: Rotation,
        sealer: Option<(Arc<Mutex<Sealer>>, PathBuf)>,
    ) -> Result<(Lines, Option<Repaired>)> {
        let file =
            open_append(path).with_context(|| format!("opening events log {}", path.display()))?;
        let repaired = match repair_tail(&file) {
            Ok(0) => None,
            Ok(cut) => {
                tracing::warn!(
                    "events log {}: its last line was torn (a crash or power loss while it was written); \
                     cut off {cut} bytes so every line is whole",
                    path.display()
                );
                Some(Repaired {
                    path: path.to_path_buf(),
                    cut,
                })
            }
            Err(e) => {
                tracing::warn!(
                    "events log {}: could not check its last line: {e}",
                    path.display()
                );
                None
            }
        };
        let target = LogFile::new(path.to_path_buf(), file, rotation)?;
        let counts = Counts::new("events-log");
        let chain = sealer.map(|(sealer, head_file)| {
            // Where the chain stands: the log's last line, else the head
            // kept at the last rotation, reopen or stop.
            let last = seal::last_head(path).or_else(|| seal::load_head(&head_file));
            (
                Chain::new("events-log", sealer, last, counts.head.clone()),
                head_file,
            )
        });
        Ok((Lines::start(counts, Target::File(target), chain), repaired))
    }

    /// Events on stdout (the journal, a container's log).
    pub fn stdout() -> Lines {
        Lines::start(Counts::new("stdout"), Target::Stdout, None)
    }

    fn start(counts: Arc<Counts>, target: Target, chain: Option<(Chain, PathBuf)>) -> Lines {
        let name = counts.name;
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let reopen = Arc::new(AtomicBool::new(false));
        let (chain, head_file) = chain.unzip();
        let w = Writer {
            rx,
            target,
            health: Health::new(counts.clone(), "16 MiB of events"),
            counts: counts.clone(),
            reopen: reopen.clone(),
            backlog: VecDeque::new(),
            backlog_bytes: 0,
            chain,
            head_file,
            written: None,
        };
        let done = thread::Builder::new()
            .name(name.into())
            .spawn(move || w.run())
            .map_err(|e| tracing::warn!("{name}: no writer thread: {e}"))
            .ok();
        Lines {
            tx,
            counts,
            reopen,
            done: Arc::new(Mutex::new(done)),
        }
    }

    /// Queues one event's line (`text` ends in `\n`); never waits.
    pub fn send(&self, ts: &str, text: String) {
        let seq = self.counts.hand();
        match self.tx.try_send(Line {
            ts: ts.to_string(),
            text,
            seq,
        }) {
            Ok(()) => {}
            Err(TrySendError::Full(l)) | Err(TrySendError::Disconnected(l)) => {
                self.counts
                    .drop_event(&l.ts, self.counts.drop_cause(), l.seq);
            }
        }
    }

    /// Reopen the file (SIGHUP, `reload`): after an external rotation.
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Relaxed);
    }

    /// Waits (at most `within`) for the writer to write what it holds once
    /// every handle is dropped; the events it could not write stay counted
    /// as pending.
    pub fn finish(self, within: Duration) {
        let done = self.done.clone();
        drop(self);
        join_within(&done, within);
    }
}

/// Joins an output's writer thread if it ends within `within` (its queue's
/// last sender is gone); else leaves it to the process's exit.
pub fn join_within(done: &Mutex<Option<thread::JoinHandle<()>>>, within: Duration) {
    let Some(handle) = done.lock().ok().and_then(|mut d| d.take()) else {
        return;
    };
    let deadline = Instant::now() + within;
    while !handle.is_finished() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    if handle.is_finished() {
        let _ = handle.join();
    }
}

/// What the writer holds: an event's line, or a line of its own (a gap
/// record, the chain's records), sealed when taken if the log is sealed.
struct Held {
    text: String,
    /// It carries an event (counted as written once it is).
    event: bool,
    seal: Option<seal::Seal>,
}

struct Writer {
    rx: Receiver<Line>,
    target: Target,
    health: Health,
    counts: Arc<Counts>,
    reopen: Arc<AtomicBool>,
    backlog: VecDeque<Held>,
    /// Bytes of events' lines held.
    backlog_bytes: usize,
    chain: Option<Chain>,
    /// Where the chain's head is kept when a file ends.
    head_file: Option<PathBuf>,
    /// The last sealed line written.
    written: Option<Head>,
}

impl Writer {
    /// Holds a line of the writer's own, sealed if the log is.
    fn push_own(&mut self, text: String) {
        self.mark_epoch();
        let (text, seal) = match &mut self.chain {
            Some(c) => {
                let (t, s) = c.seal_line(text);
                (t, Some(s))
            }
            None => (text, None),
        };
        self.backlog.push_back(Held {
            text,
            event: false,
            seal,
        });
    }

    /// The chain's own record `what` (`start`, `epoch`, `stop`).
    fn push_chain(&mut self, what: &str, detail: serde_json::Value) {
        if let Some(c) = &mut self.chain {
            let (text, seal) = c.own_line(what, detail);
            self.backlog.push_back(Held {
                text,
                event: false,
                seal: Some(seal),
            });
        }
    }

    /// One `epoch` record per epoch, events or not: a tail re-sealed with
    /// a later key lacks them.
    fn mark_epoch(&mut self) {
        if self.chain.as_ref().is_some_and(|c| c.epoch_due()) {
            self.push_chain("epoch", serde_json::json!({}));
        }
    }

    /// Keeps the head of what the finished file holds (so a chain whose
    /// new file is still empty continues after it).
    fn save_head(&self) {
        if let Some(f) = &self.head_file {
            seal::save_head(f, self.written);
        }
    }

    fn run(mut self) {
        let mut last_check = Instant::now();
        if let Some(detail) = self.chain.as_ref().map(Chain::start_detail) {
            self.push_chain("start", detail);
        }
        loop {
            let wait = if self.backlog.is_empty() || !self.health.due() {
                self.health
                    .retry_at
                    .map_or(Duration::from_millis(200), |t| {
                        t.saturating_duration_since(Instant::now())
                            .min(Duration::from_millis(200))
                    })
            } else {
                Duration::ZERO
            };
            let disconnected = match self.rx.recv_timeout(wait) {
                Ok(l) => {
                    self.accept(l);
                    false
                }
                Err(mpsc::RecvTimeoutError::Timeout) => false,
                Err(mpsc::RecvTimeoutError::Disconnected) => true,
            };
            for _ in 0..TAKE {
                match self.rx.try_recv() {
                    Ok(l) => self.accept(l),
                    Err(_) => break,
                }
            }
            self.mark_epoch();
            if self.reopen.swap(false, Ordering::Relaxed) {
                self.save_head();
                self.target.reopen("reopened on request (SIGHUP or reload)");
            }
            if last_check.elapsed() >= Duration::from_secs(1) {
                last_check = Instant::now();
                if self.target.moved() {
                    self.save_head();
                    self.target.reopen("moved or deleted; reopened at its path");
                }
            }
            if self.health.due() {
                self.write();
            }
            self.health.tick();
            if disconnected {
                // The last chance for a gap record still owed (the log may
                // be failing): it goes before the chain's end.
                self.push_gap();
                self.push_chain("stop", serde_json::json!({}));
                self.write();
                self.save_head();
                return;
            }
        }
    }

    fn push_gap(&mut self) {
        if let Some(g) = self.counts.take_gap() {
            let mut text = g.record(self.counts.name).to_string();
            text.push('\n');
            self.push_own(text);
        }
    }

    /// Holds a line, or drops it (counted) when the backlog is full.
    fn accept(&mut self, l: Line) {
        if self.backlog_bytes + l.text.len() > BACKLOG_BYTES {
            self.counts
                .drop_event(&l.ts, self.counts.drop_cause(), l.seq);
            return;
        }
        // The first line after a hole: its gap record goes before it.
        if self.counts.has_gap_before(l.seq) {
            self.push_gap();
        }
        // A line sealed in a new epoch comes after that epoch's record.
        self.mark_epoch();
        let (text, seal) = match &mut self.chain {
            Some(c) => {
                let (t, s) = c.seal_line(l.text);
                (t, Some(s))
            }
            None => (l.text, None),
        };
        self.backlog_bytes += text.len();
        self.backlog.push_back(Held {
            text,
            event: true,
            seal,
        });
    }

    /// Writes the backlog, a chunk at a time, until it is empty or a write
    /// fails. Drops after the last line held get their gap record in the
    /// same pass once writes succeed again, and the last events are
    /// counted as written only after it: `pending: 0` means the log is
    /// whole, gap record included.
    fn write(&mut self) {
        let (mut wrote, mut taken) = (0, 0);
        loop {
            if self.backlog.is_empty() {
                if self.health.cause().is_some() || !self.counts.has_gap() {
                    break;
                }
                // A gap record is owed. Lines still queued may be older
                // than those drops: they are held first (as one batch), and
                // `accept` puts the record in order (at most TAKE).
                let before = taken;
                while taken < TAKE
                    && let Ok(l) = self.rx.try_recv()
                {
                    self.accept(l);
                    taken += 1;
                }
                if taken == TAKE && self.backlog.is_empty() {
                    break;
                }
                if taken == before {
                    self.push_gap();
                }
                continue;
            }
            let room = self.target.room().clamp(1, CHUNK);
            let mut chunk = String::new();
            // A new file begins with a marker naming the record after it.
            if self.target.fresh()
                && let Some(c) = &mut self.chain
                && let Some(s) = self.backlog.front().and_then(|h| h.seal)
            {
                chunk = c.file_marker(self.target.path(), s.seq, s.prev);
            }
            let (mut n, mut events) = (0, 0u64);
            for h in &self.backlog {
                if n > 0 && chunk.len() + h.text.len() > room {
                    break;
                }
                chunk.push_str(&h.text);
                n += 1;
                events += u64::from(h.event);
            }
            match self.target.write(chunk.as_bytes()) {
                Ok(()) => {
                    for h in self.backlog.drain(..n) {
                        if h.event {
                            self.backlog_bytes -= h.text.len();
                        }
                        if let Some(s) = h.seal {
                            self.written = Some(Head {
                                seq: s.seq,
                                mac: s.mac,
                            });
                            if let Some(c) = &self.chain {
                                c.written(&s);
                            }
                        }
                    }
                    if self.target.rotated() {
                        self.save_head();
                    }
                    wrote += events;
                    // Counted at once while more is held (`pending` stays
                    // above 0 anyway); the last are counted after the gap
                    // record.
                    if !self.backlog.is_empty() {
                        self.counts.wrote(std::mem::take(&mut wrote));
                    }
                    self.health.ok();
                }
                Err(e) => {
                    let cause = Cause::of_io(&e);
                    self.health.failed(cause, &e, self.backlog.len());
                    break;
                }
            }
        }
        self.counts.wrote(wrote);
    }
}

enum Target {
    File(LogFile),
    Stdout,
}

impl Target {
    fn room(&self) -> usize {
        match self {
            Target::File(f) => f.room(),
            Target::Stdout => usize::MAX,
        }
    }

    fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        match self {
            Target::File(f) => f.write(chunk),
            Target::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(chunk)?;
                out.flush()
            }
        }
    }

    fn reopen(&mut self, why: &str) {
        if let Target::File(f) = self {
            f.reopen(why);
        }
    }

    /// The file is new (or was truncated) since the last write.
    fn fresh(&self) -> bool {
        match self {
            Target::File(f) => f.fresh || f.len() < f.end,
            Target::Stdout => false,
        }
    }

    fn path(&self) -> &Path {
        match self {
            Target::File(f) => &f.path,
            Target::Stdout => Path::new("-"),
        }
    }

    /// The last write filled the file and it was rotated.
    fn rotated(&mut self) -> bool {
        match self {
            Target::File(f) => std::mem::take(&mut f.rotated),
            Target::Stdout => false,
        }
    }

    /// The path no longer names the open file (moved or deleted).
    fn moved(&self) -> bool {
        match self {
            Target::File(f) => f.moved(),
            Target::Stdout => false,
        }
    }
}

fn open_append(p: &Path) -> io::Result<File> {
    if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir)?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(p)
}

/// Cuts the file back to its last `\n` (to nothing when it has none);
/// returns the bytes cut.
pub fn repair_tail(f: &File) -> io::Result<u64> {
    let len = f.metadata()?.len();
    let mut end = len;
    let mut buf = vec![0u8; 64 << 10];
    let mut r = f;
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let part = &mut buf[..(end - start) as usize];
        r.seek(SeekFrom::Start(start))?;
        r.read_exact(part)?;
        if let Some(i) = part.iter().rposition(|b| *b == b'\n') {
            let keep = start + i as u64 + 1;
            if keep < len {
                f.set_len(keep)?;
            }
            return Ok(len - keep);
        }
        end = start;
    }
    if len > 0 {
        f.set_len(0)?;
    }
    Ok(len)
}

fn numbered(p: &Path, n: u32) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// The events log file: whole lines, size rotation, external rotation.
struct LogFile {
    path: PathBuf,
    file: File,
    /// (dev, inode) of the open file.
    id: (u64, u64),
    rotation: Rotation,
    /// When rotating or reopening last failed (warned at most every 10 s).
    warned: Option<Instant>,
    /// Opened since the last write: a sealed log begins it with a marker.
    fresh: bool,
    /// Its length after the last write (shorter now: truncated, as
    /// logrotate's `copytruncate` does).
    end: u64,
    /// The last write rotated it.
    rotated: bool,
}

impl LogFile {
    fn new(path: PathBuf, file: File, rotation: Rotation) -> io::Result<LogFile> {
        let m = file.metadata()?;
        Ok(LogFile {
            path,
            id: (m.dev(), m.ino()),
            file,
            rotation,
            warned: None,
            fresh: m.len() == 0,
            end: m.len(),
            rotated: false,
        })
    }

    fn len(&self) -> u64 {
        self.file.metadata().map_or(0, |m| m.len())
    }

    /// Bytes before the next rotation.
    fn room(&self) -> usize {
        match self.rotation.max_bytes {
            0 => usize::MAX,
            max => max.saturating_sub(self.len()) as usize,
        }
    }

    /// Appends `chunk` (whole lines) in one `write`, or not at all: on an
    /// error the file is cut back to where it was.
    fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        let before = self.file.metadata()?.len();
        if let Err(e) = self.file.write_all(chunk) {
            self.undo(before);
            return Err(e);
        }
        self.fresh = false;
        self.end = self.len();
        if self.rotation.max_bytes > 0 && self.end >= self.rotation.max_bytes {
            self.rotate();
            self.rotated = true;
        }
        Ok(())
    }

    /// Removes what a failed write left behind.
    fn undo(&mut self, before: u64) {
        let now = self.len();
        let res = if now > before {
            self.file.set_len(before)
        } else if now < before {
            // Truncated meanwhile (copytruncate): keep whole lines.
            repair_tail(&self.file).map(|_| ())
        } else {
            Ok(())
        };
        if let Err(e) = res {
            tracing::warn!(
                "events log {}: cutting back a failed write: {e}",
                self.path.display()
            );
        }
    }

    fn rotate(&mut self) {
        let keep = self.rotation.keep;
        let path = self.path.clone();
        let renamed = if keep == 0 {
            fs::remove_file(&path)
        } else {
            let _ = fs::remove_file(numbered(&path, keep));
            for n in (1..keep).rev() {
                let _ = fs::rename(numbered(&path, n), numbered(&path, n + 1));
            }
            fs::rename(&path, numbered(&path, 1))
        };
        let reopened = renamed.and_then(|()| self.open_new());
        if let Err(e) = reopened
            && self.warn_now()
        {
            tracing::warn!(
                "rotating the events log {} failed: {e}; writing on",
                path.display()
            );
        }
    }

    fn warn_now(&mut self) -> bool {
        let now = self
            .warned
            .is_none_or(|t| t.elapsed() >= super::health::SUMMARY_EVERY);
        if now {
            self.warned = Some(Instant::now());
        }
        now
    }

    fn open_new(&mut self) -> io::Result<()> {
        let file = open_append(&self.path)?;
        let m = file.metadata()?;
        self.id = (m.dev(), m.ino());
        self.file = file;
        self.fresh = true;
        self.end = m.len();
        Ok(())
    }

    fn reopen(&mut self, why: &str) {
        match self.open_new() {
            Ok(()) => tracing::info!("events log {}: {why}", self.path.display()),
            Err(e) if self.warn_now() => tracing::warn!(
                "events log {}: reopening failed ({e}); writing on to the file open before",
                self.path.display()
            ),
            Err(_) => {}
        }
    }

    /// The path no longer names the open file (moved or deleted).
    fn moved(&self) -> bool {
        !fs::metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_written(l: &Lines, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while l.counts.written.load(Ordering::Relaxed) < n && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn rotation_keeps_the_log_bounded() {
        let dir = crate::testdir::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        let (s, _) = Lines::file(
            &p,
            Rotation {
                max_bytes: 1000,
                keep: 2,
            },
            None,
        )
        .unwrap();
        let line = format!("{}\n", "x".repeat(99));
        for _ in 0..100 {
            s.send("t", line.clone());
        }
        wait_written(&s, 100);
        s.finish(Duration::from_secs(5));
        let total: u64 = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(total <= 3000, "{total}");
        assert!(numbered(&p, 2).exists());
        assert!(!numbered(&p, 3).exists());
    }

    #[test]
    fn a_torn_last_line_is_cut_off_at_start() {
        let dir = crate::testdir::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        fs::write(&p, "{\"a\":1}\n{\"a\":2}\n{\"a\":").unwrap();
        let (s, repaired) = Lines::file(
            &p,
            Rotation {
                max_bytes: 0,
                keep: 0,
            },
            None,
        )
        .unwrap();
        assert_eq!(repaired.unwrap().cut, 5);
        s.send("t", "{\"a\":3}\n".into());
        wait_written(&s, 1);
        s.finish(Duration::from_secs(5));
        assert_eq!(
            fs::read_to_string(&p).unwrap(),
            "{\"a\":1}\n{\"a\":2}\n{\"a\":3}\n"
        );
        fs::write(&p, "no newline at all").unwrap();
        assert_eq!(
            repair_tail(&File::options().write(true).read(true).open(&p).unwrap()).unwrap(),
            17
        );
        assert_eq!(fs::read(&p).unwrap().len(), 0);
    }

    #[test]
    fn a_moved_log_is_reopened_at_its_path() {
        let dir = crate::testdir::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        let (s, _) = Lines::file(
            &p,
            Rotation {
                max_bytes: 0,
                keep: 0,
            },
            None,
        )
        .unwrap();
        s.send("t", "1\n".into());
        wait_written(&s, 1);
        fs::rename(&p, dir.path().join("old")).unwrap();
        thread::sleep(Duration::from_millis(1300));
        s.send("t", "2\n".into());
        wait_written(&s, 2);
        s.finish(Duration::from_secs(5));
        assert_eq!(fs::read_to_string(&p).unwrap(), "2\n");
        assert_eq!(fs::read_to_string(dir.path().join("old")).unwrap(), "1\n");
    }
}
