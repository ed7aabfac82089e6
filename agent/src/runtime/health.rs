//! What every output of the audit trail (the events log, stdout, the audit
//! store, live followers) keeps about itself: how many events it wrote,
//! holds, and dropped by cause; the events it dropped since its last gap
//! record (so it can write one); and its warnings, rate-limited: one line
//! when it starts failing, a summary every [`SUMMARY_EVERY`] while it
//! fails, one when it recovers.
//!
//! For each output, `written + pending + dropped` = the events handed to it.

use std::{
    fmt::Display,
    io,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use super::protocol::{Dropped, OutputCounts};

/// Why an output dropped an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// No space left on the device (or over quota), for longer than its
    /// backlog could hold, or while its writer was busy retrying.
    DiskFull,
    /// Any other write error, for longer than its backlog could hold, or
    /// while its writer was busy retrying.
    IoError,
    /// The SQLite database was locked by another process, for longer than
    /// its backlog could hold, or while its writer was busy retrying.
    Locked,
    /// The output's queue was full while its writes succeeded: its writer
    /// fell behind.
    QueueFull,
}

impl Cause {
    pub const ALL: [Cause; 4] = [
        Cause::DiskFull,
        Cause::IoError,
        Cause::Locked,
        Cause::QueueFull,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Cause::DiskFull => "disk_full",
            Cause::IoError => "io_error",
            Cause::Locked => "locked",
            Cause::QueueFull => "queue_full",
        }
    }

    /// ENOSPC and EDQUOT are a full disk; everything else an I/O error.
    pub fn of_io(e: &io::Error) -> Cause {
        match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => Cause::DiskFull,
            _ if e.kind() == io::ErrorKind::StorageFull => Cause::DiskFull,
            _ => Cause::IoError,
        }
    }
}

/// Events an output dropped since its last gap record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Gap {
    pub count: u64,
    pub first_ts: Option<String>,
    pub last_ts: Option<String>,
    by_cause: [u64; 4],
    /// The hand-over number ([`Counts::hand`]) of the first event missed:
    /// the gap record goes before the first later event written.
    first_seq: u64,
}

impl Gap {
    fn add(&mut self, ts: &str, cause: Cause, seq: u64) {
        if self.count == 0 {
            self.first_seq = seq;
        }
        self.count += 1;
        if self.first_ts.is_none() {
            self.first_ts = Some(ts.to_string());
        }
        self.last_ts = Some(ts.to_string());
        self.by_cause[cause as usize] += 1;
    }

    /// The cause of most of the drops.
    pub fn cause(&self) -> Cause {
        Cause::ALL
            .into_iter()
            .max_by_key(|c| self.by_cause[*c as usize])
            .unwrap_or(Cause::IoError)
    }

    /// The gap record, as the output writes it (a JSON line; the audit
    /// store's `changes` row of kind `gap` has it as its detail):
    /// `{"type":"gap","output":..,"ts":..,"count":..,"first_ts":..,"last_ts":..,"cause":..,"causes":{..},"why":..}`.
    pub fn record(&self, output: &str) -> serde_json::Value {
        let causes: serde_json::Map<String, serde_json::Value> = Cause::ALL
            .into_iter()
            .filter(|c| self.by_cause[*c as usize] > 0)
            .map(|c| (c.name().to_string(), self.by_cause[c as usize].into()))
            .collect();
        let now = crate::clock::now_ns();
        serde_json::json!({
            "type": "gap",
            "output": output,
            "ts": crate::clock::format_ts(now.max(0) as u64, 0),
            "count": self.count,
            "first_ts": self.first_ts,
            "last_ts": self.last_ts,
            "cause": self.cause().name(),
            "causes": causes,
            "why": format!("{} events between first_ts and last_ts were not written to this output", self.count),
        })
    }
}

/// One output's counters, shared by whoever hands it events (the events
/// task), its writer, `status` and `/metrics`.
pub struct Counts {
    pub name: &'static str,
    pub written: AtomicU64,
    /// A sealed output's chain head ([`crate::seal::Chain`]).
    pub head: Arc<Mutex<Option<crate::seal::Head>>>,
    pub pending: AtomicU64,
    dropped: [AtomicU64; 4],
    gap: Mutex<Gap>,
    /// Events handed to the output so far (numbers them, in order).
    handed: AtomicU64,
    /// Why its writes fail now (its [`Health`]'s cause, `Cause as u8 + 1`),
    /// 0 while they succeed: for the agent's loop, which cannot see the
    /// writer's `Health` (`--audit-full`).
    failing: AtomicU8,
}

impl Counts {
    pub fn new(name: &'static str) -> Arc<Counts> {
        Arc::new(Counts {
            name,
            written: AtomicU64::new(0),
            head: Arc::default(),
            pending: AtomicU64::new(0),
            dropped: Default::default(),
            gap: Mutex::new(Gap::default()),
            handed: AtomicU64::new(0),
            failing: AtomicU8::new(0),
        })
    }

    /// An event is handed to the output: it is pending; returns its
    /// number (in the order events are handed over, from one task).
    pub fn hand(&self) -> u64 {
        self.pending.fetch_add(1, Ordering::Relaxed);
        self.handed.fetch_add(1, Ordering::Relaxed)
    }

    /// The pending event number `seq` (of time `ts`) will never be
    /// written; the output's next gap record counts it.
    pub fn drop_event(&self, ts: &str, cause: Cause, seq: u64) {
        self.pending.fetch_sub(1, Ordering::Relaxed);
        self.dropped[cause as usize].fetch_add(1, Ordering::Relaxed);
        self.gap
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(ts, cause, seq);
    }

    /// A drop counted without a gap record (live followers get their own
    /// `lost` notes).
    pub fn count_drop(&self, cause: Cause) {
        self.dropped[cause as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// The drops since the last gap record, if any (and resets them).
    pub fn take_gap(&self) -> Option<Gap> {
        let mut g = self.gap.lock().unwrap_or_else(|e| e.into_inner());
        (g.count > 0).then(|| std::mem::take(&mut *g))
    }

    pub fn has_gap(&self) -> bool {
        self.gap.lock().unwrap_or_else(|e| e.into_inner()).count > 0
    }

    /// Whether events handed before event `seq` were dropped: their gap
    /// record goes before it.
    pub fn has_gap_before(&self, seq: u64) -> bool {
        let g = self.gap.lock().unwrap_or_else(|e| e.into_inner());
        g.count > 0 && g.first_seq < seq
    }

    /// Why the output's writes fail now; `None` while they succeed (or
    /// before the first write).
    pub fn failing(&self) -> Option<Cause> {
        match self.failing.load(Ordering::Relaxed) {
            0 => None,
            n => Cause::ALL.get(usize::from(n - 1)).copied(),
        }
    }

    /// Why an event is dropped when the output cannot hold it, whether its
    /// queue or its writer's backlog is full. While its writes fail, the
    /// writer spends its time on retries (the audit store waits up to
    /// 250 ms on a lock each time), so its queue can fill before its
    /// backlog does: either way the outage's cause, not `queue_full`, is
    /// what an operator has to fix.
    pub fn drop_cause(&self) -> Cause {
        self.failing().unwrap_or(Cause::QueueFull)
    }

    fn set_failing(&self, cause: Option<Cause>) {
        self.failing
            .store(cause.map_or(0, |c| c as u8 + 1), Ordering::Relaxed);
    }

    pub fn dropped(&self, cause: Cause) -> u64 {
        self.dropped[cause as usize].load(Ordering::Relaxed)
    }

    pub fn dropped_total(&self) -> u64 {
        Cause::ALL.into_iter().map(|c| self.dropped(c)).sum()
    }

    /// Events written (`n`) that were pending.
    pub fn wrote(&self, n: u64) {
        self.written.fetch_add(n, Ordering::Relaxed);
        self.pending.fetch_sub(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> OutputCounts {
        OutputCounts {
            name: self.name.to_string(),
            written: self.written.load(Ordering::Relaxed),
            pending: self.pending.load(Ordering::Relaxed),
            dropped: Dropped {
                disk_full: self.dropped(Cause::DiskFull),
                io_error: self.dropped(Cause::IoError),
                locked: self.dropped(Cause::Locked),
                queue_full: self.dropped(Cause::QueueFull),
            },
            chain: *self.head.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }
}

/// A summary line this often while an output fails.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// An output's failing/recovered state, for its warnings and retries.
pub struct Health {
    counts: Arc<Counts>,
    /// What the output holds at most while it fails (`16 MiB of events`).
    holds: &'static str,
    /// Since when, why, and the counters then.
    failing: Option<Failing>,
    backoff: Duration,
    pub retry_at: Option<Instant>,
}

struct Failing {
    since: Instant,
    cause: Cause,
    dropped_then: u64,
    written_then: u64,
    last_summary: Instant,
}

const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(2);

impl Health {
    pub fn new(counts: Arc<Counts>, holds: &'static str) -> Health {
        Health {
            counts,
            holds,
            failing: None,
            backoff: FIRST_RETRY,
            retry_at: None,
        }
    }

    pub fn cause(&self) -> Option<Cause> {
        self.failing.as_ref().map(|f| f.cause)
    }

    /// Whether a write may be tried now (not failing, or its retry is due).
    pub fn due(&self) -> bool {
        self.retry_at.is_none_or(|t| Instant::now() >= t)
    }

    /// A write failed: warns once when the output starts failing (or its
    /// cause changes), and schedules the next try (backing off to 2 s).
    pub fn failed(&mut self, cause: Cause, err: &dyn Display, holding: usize) {
        let now = Instant::now();
        match &mut self.failing {
            Some(f) if f.cause == cause => {}
            Some(f) => {
                tracing::warn!(
                    "{}: now failing with {} ({err}); {} events held for a retry",
                    self.counts.name,
                    cause.name(),
                    holding
                );
                f.cause = cause;
            }
            None => {
                tracing::warn!(
                    "{}: writing failed ({}: {err}); retrying with backoff, holding up to {} \
                     meanwhile ({holding} now); a summary every {} s while it fails",
                    self.counts.name,
                    cause.name(),
                    self.holds,
                    SUMMARY_EVERY.as_secs()
                );
                self.failing = Some(Failing {
                    since: now,
                    cause,
                    dropped_then: self.counts.dropped_total(),
                    written_then: self.counts.written.load(Ordering::Relaxed),
                    last_summary: now,
                });
            }
        }
        self.counts.set_failing(Some(cause));
        self.retry_at = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_RETRY);
    }

    /// A write succeeded: one line if the output was failing.
    pub fn ok(&mut self) {
        self.backoff = FIRST_RETRY;
        self.retry_at = None;
        if let Some(f) = self.failing.take() {
            self.counts.set_failing(None);
            let dropped = self.counts.dropped_total() - f.dropped_then;
            tracing::warn!(
                "{}: writing again after {:.1} s ({}); {}",
                self.counts.name,
                f.since.elapsed().as_secs_f64(),
                f.cause.name(),
                if dropped == 0 {
                    "nothing was lost".to_string()
                } else {
                    format!("{dropped} events were dropped meanwhile (a gap record says so)")
                }
            );
        }
    }

    /// While failing, a summary every [`SUMMARY_EVERY`].
    pub fn tick(&mut self) {
        let Some(f) = &mut self.failing else { return };
        if f.last_summary.elapsed() < SUMMARY_EVERY {
            return;
        }
        f.last_summary = Instant::now();
        let c = &self.counts;
        tracing::warn!(
            "{}: still failing ({}) for {} s: {} events dropped, {} written, {} pending",
            c.name,
            f.cause.name(),
            f.since.elapsed().as_secs(),
            c.dropped_total() - f.dropped_then,
            c.written.load(Ordering::Relaxed) - f.written_then,
            c.pending.load(Ordering::Relaxed),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gap_counts_its_events_their_times_and_why() {
        let c = Counts::new("events-log");
        assert!(c.take_gap().is_none());
        let first = c.hand();
        c.drop_event("2026-12-05T00:00:01Z", Cause::DiskFull, first);
        for (ts, cause) in [
            ("2026-12-05T00:00:02Z", Cause::DiskFull),
            ("2026-12-05T00:00:03Z", Cause::QueueFull),
        ] {
            let seq = c.hand();
            c.drop_event(ts, cause, seq);
        }
        assert!(!c.has_gap_before(first) && c.has_gap_before(first + 1));
        assert_eq!(c.pending.load(Ordering::Relaxed), 0);
        let g = c.take_gap().unwrap();
        assert!(c.take_gap().is_none());
        let r = g.record("events-log");
        assert_eq!(r["type"], "gap");
        assert_eq!(r["count"], 3);
        assert_eq!(r["first_ts"], "2026-12-05T00:00:01Z");
        assert_eq!(r["last_ts"], "2026-12-05T00:00:03Z");
        assert_eq!(r["cause"], "disk_full");
        assert_eq!(r["causes"]["queue_full"], 1);
        let s = c.snapshot();
        assert_eq!((s.dropped.disk_full, s.dropped.queue_full), (2, 1));
    }

    #[test]
    fn the_counts_say_while_writes_fail() {
        let c = Counts::new("events-log");
        let mut h = Health::new(c.clone(), "16 MiB of events");
        assert_eq!(c.failing(), None);
        h.failed(Cause::DiskFull, &"No space left on device", 1);
        assert_eq!(c.failing(), Some(Cause::DiskFull));
        h.failed(Cause::IoError, &"Input/output error", 1);
        assert_eq!(c.failing(), Some(Cause::IoError));
        h.ok();
        assert_eq!(c.failing(), None);
    }
}
