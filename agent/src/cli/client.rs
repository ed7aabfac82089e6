//! The CLI's side of the control socket: one request, its typed reply;
//! and what a follower (`events --follow`) remembers across reconnects.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::Path,
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use bulkhead::{
    runtime::events::Record,
    runtime::protocol::{Reply, Request, Response, SOCKET_NAME},
};

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
        let ts = bulkhead::clock::parse_ts(&r.ts)
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

/// Sends a request and reads its typed reply; an error reply is an error.
pub fn call(run_dir: &Path, request: &Request) -> Result<Response> {
    let mut r = connect(run_dir, request)?;
    let mut line = String::new();
    r.read_line(&mut line)?;
    let reply: Reply = serde_json::from_str(&line)
        .with_context(|| format!("bad answer from the agent: {line}"))?;
    match reply.response {
        Response::Error { error } => bail!("{error}"),
        r => Ok(r),
    }
}

/// A reply of another kind than the request asks for: an agent of another
/// version, most likely.
pub fn unexpected(r: Response) -> anyhow::Error {
    anyhow::anyhow!("unexpected reply from the agent (another version?): {r:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event at `secs` seconds past 2026-01-01T00:00:00Z.
    fn rec(secs: i64, cpu: u16, seq: u64) -> Record {
        let t = time::OffsetDateTime::from_unix_timestamp(1_767_225_600 + secs).unwrap();
        let ts = t
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        // A follower reads `ts`, `cpu` and `seq`; the rest only has to parse.
        serde_json::from_value(serde_json::json!({
            "ts": ts, "verdict": "deny", "reason": "cross-domain", "hook": "connect4",
            "proto": "tcp", "dst": "10.0.0.2", "dport": 443, "cgroup": "/c", "cgroup_id": 7,
            "src_domain": "a", "dst_domain": "b", "generation": 1, "seq": seq, "cpu": cpu,
        }))
        .unwrap()
    }

    fn admit(seen: &mut Seen, r: &Record) -> Admit {
        seen.admit(r, &serde_json::to_string(r).unwrap())
    }

    fn missed(cpu: u16, first: u64, last: u64) -> Admit {
        Admit::New(Some(Missed { cpu, first, last }))
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
        let newest = bulkhead::clock::parse_ts(&rec(1, 0, 2).ts).unwrap();
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
}
