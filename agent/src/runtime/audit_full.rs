//! `run --audit-full=keep|refuse` (issue 24; auditd's `disk_full_action`):
//! what enforcement does while the audit trail cannot be written.
//!
//! The trail is the persistent outputs configured: the events log and the
//! audit store (not stdout, not live followers). It "cannot be written"
//! while one of them fails (its [`super::health::Health`] has a cause: disk
//! full, I/O error, locked) or drops events (its drop count grew since the
//! last turn, or it has dropped events no gap record stands for yet).
//!
//! With `refuse`, the agent's loop ([`super::agent::Agent::tick`], every
//! 100 ms) sets [`CONFIG_AUDIT_REFUSE`] in both slots of `BH_CONFIG`, and
//! the connect/sendmsg hooks refuse new connections of domain workloads
//! ([`bulkhead_common::decide::refused_unaudited`]); it clears the flag once
//! the trail has been writable for [`CLEAR_AFTER`]. Only the loop writes
//! the flag, as it writes every policy slot, so a reload cannot lose it:
//! the writer threads only publish their state in their [`Counts`].
//!
//! [`CONFIG_AUDIT_REFUSE`]: bulkhead_common::maps::CONFIG_AUDIT_REFUSE

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tracing::warn;

use super::health::{Counts, SUMMARY_EVERY};

/// What enforcement does while the audit trail cannot be written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Stance {
    // Enforce the policy as usual; events that cannot be written are held,
    // then dropped and counted (a gap record says so). (Plain comments: doc
    // comments would turn `run --help` into its long form.)
    #[default]
    Keep,
    // Refuse new connects and sendmsgs of domain workloads (EPERM, reason
    // `audit-unavailable`) until the trail can be written again.
    Refuse,
}

impl Stance {
    pub fn name(self) -> &'static str {
        match self {
            Stance::Keep => "keep",
            Stance::Refuse => "refuse",
        }
    }
}

/// How long the trail must stay writable before refusing stops: an
/// output that writes one batch between failures does not flap it.
pub const CLEAR_AFTER: Duration = Duration::from_millis(500);

/// `status`'s `audit_full`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditFullState {
    /// `keep` or `refuse` (`--audit-full`).
    pub stance: String,
    /// New connections of domain workloads are refused now.
    pub refusing: bool,
    /// The trail outputs that cannot be written now, and why
    /// (`events-log: disk_full`, `audit-store: dropping`).
    pub unwritable: Vec<String>,
}

/// The stance and what the loop last saw of the trail.
pub struct Refusal {
    stance: Stance,
    /// Each trail output's drops at the last turn.
    dropped: Vec<u64>,
    unwritable: Vec<String>,
    /// The last turn the trail could not be written.
    last_trouble: Option<Instant>,
    refusing: Option<Refusing>,
}

struct Refusing {
    since: Instant,
    last_summary: Instant,
    /// Refusals counted by the kernel when refusing started.
    refused_then: u64,
}

impl Refusal {
    pub fn new(stance: Stance) -> Refusal {
        Refusal {
            stance,
            dropped: Vec::new(),
            unwritable: Vec::new(),
            last_trouble: None,
            refusing: None,
        }
    }

    pub fn stance(&self) -> Stance {
        self.stance
    }

    pub fn refusing(&self) -> bool {
        self.refusing.is_some()
    }

    /// One turn of the agent's loop: looks at every trail output and
    /// returns whether the kernel should refuse now; logs one line when
    /// refusing starts, a summary every [`SUMMARY_EVERY`] while it lasts,
    /// one when it stops. `refused` reads how many connections the kernel
    /// refused so far (asked only for those lines).
    pub fn turn(&mut self, trail: &[Arc<Counts>], now: Instant, refused: impl Fn() -> u64) -> bool {
        self.dropped.resize(trail.len(), 0);
        self.unwritable.clear();
        for (c, seen) in trail.iter().zip(&mut self.dropped) {
            let dropped = c.dropped_total();
            let grew = dropped != *seen;
            *seen = dropped;
            if let Some(cause) = c.failing() {
                self.unwritable
                    .push(format!("{}: {}", c.name, cause.name()));
            } else if grew || c.has_gap() {
                self.unwritable.push(format!("{}: dropping", c.name));
            }
        }
        if !self.unwritable.is_empty() {
            self.last_trouble = Some(now);
        }
        if self.stance == Stance::Keep {
            return false;
        }
        let trouble = self
            .last_trouble
            .is_some_and(|t| now.duration_since(t) < CLEAR_AFTER);
        match (&mut self.refusing, trouble) {
            (None, true) => {
                warn!(
                    "audit trail cannot be written ({}): --audit-full=refuse: refusing new \
                     connections of domain workloads (EPERM, reason audit-unavailable) until it can",
                    self.unwritable.join(", ")
                );
                self.refusing = Some(Refusing {
                    since: now,
                    last_summary: now,
                    refused_then: refused(),
                });
            }
            (Some(r), true) => {
                if now.duration_since(r.last_summary) >= SUMMARY_EVERY {
                    r.last_summary = now;
                    warn!(
                        "audit trail still cannot be written ({}) after {} s: {} new connections \
                         of domain workloads refused so far",
                        self.unwritable.join(", "),
                        now.duration_since(r.since).as_secs(),
                        refused().saturating_sub(r.refused_then)
                    );
                }
            }
            (Some(r), false) => {
                warn!(
                    "audit trail writable again: new connections of domain workloads allowed \
                     again after {:.1} s; {} were refused meanwhile",
                    now.duration_since(r.since).as_secs_f64(),
                    refused().saturating_sub(r.refused_then)
                );
                self.refusing = None;
            }
            (None, false) => {}
        }
        self.refusing.is_some()
    }

    /// For `status`.
    pub fn state(&self) -> AuditFullState {
        AuditFullState {
            stance: self.stance.name().into(),
            refusing: self.refusing(),
            unwritable: self.unwritable.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::health::{Cause, Health};

    #[test]
    fn refuses_while_an_output_fails_or_drops_and_stops_once_it_writes_again() {
        let (log, store) = (Counts::new("events-log"), Counts::new("audit-store"));
        let trail = [log.clone(), store.clone()];
        let mut r = Refusal::new(Stance::Refuse);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert!(!r.turn(&trail, at(0), || 0));

        let mut h = Health::new(log.clone(), "16 MiB of events");
        h.failed(Cause::DiskFull, &"No space left on device", 1);
        assert!(r.turn(&trail, at(100), || 0));
        assert_eq!(r.state().unwritable, ["events-log: disk_full"]);
        h.ok();
        // Writable again, but not for long enough yet.
        assert!(r.turn(&trail, at(200), || 3));
        assert!(r.turn(&trail, at(500), || 3));
        assert!(!r.turn(&trail, at(700), || 3));
        assert!(r.state().unwritable.is_empty());

        // A drop (its queue was full) refuses too, until its gap record
        // is taken and no more drops come.
        let seq = store.hand();
        store.drop_event("2026-12-05T00:00:00Z", Cause::QueueFull, seq);
        assert!(r.turn(&trail, at(800), || 3));
        assert_eq!(r.state().unwritable, ["audit-store: dropping"]);
        assert!(r.turn(&trail, at(900), || 3), "no gap record yet");
        store.take_gap();
        assert!(r.turn(&trail, at(1000), || 3));
        assert!(!r.turn(&trail, at(1400), || 3));
    }

    #[test]
    fn keep_never_refuses_but_says_what_fails() {
        let log = Counts::new("events-log");
        let mut r = Refusal::new(Stance::Keep);
        let mut h = Health::new(log.clone(), "16 MiB of events");
        h.failed(Cause::IoError, &"Input/output error", 1);
        assert!(!r.turn(&[log], Instant::now(), || 0));
        let s = r.state();
        assert_eq!((s.stance.as_str(), s.refusing), ("keep", false));
        assert_eq!(s.unwritable, ["events-log: io_error"]);
    }
}
