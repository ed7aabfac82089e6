//! Forbidden traffic that runs for a whole test while the test kills,
//! signals or replaces the agent at random instants, and the judgement of
//! what got through (issue 16: no gap at any instant).

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use crate::{Cgroup, Server, command_in, probe_bin, world::World};

/// Random instants, reproducible from the printed seed
/// (`BULKHEAD_TEST_SEED`).
pub struct Rng(u64);

/// A seed for a test's random choices: `BULKHEAD_TEST_SEED`, else the
/// clock (print it, so a failure can be replayed).
pub fn seed() -> u64 {
    std::env::var("BULKHEAD_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| unix_ns() as u64)
}

impl Rng {
    pub fn new(test: &str) -> Rng {
        let seed = seed() | 1;
        eprintln!("{test}: BULKHEAD_TEST_SEED={seed}");
        Rng(seed)
    }

    /// Uniform in `lo..hi`.
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let r = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let span = (hi - lo).as_micros().max(1) as u64;
        lo + Duration::from_micros(r % span)
    }
}

pub fn unix_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// One line of a guard: an outcome change, or running totals.
enum Seen {
    Change {
        at: u128,
        target: String,
        outcome: String,
    },
    Totals {
        guard: usize,
        at: u128,
        refused: u64,
    },
}

/// `probe guard` processes trying forbidden things for the whole test.
pub struct Guards {
    children: Vec<Child>,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Listeners the guards aim at; they live as long as the guards.
    _servers: Vec<Server>,
}

impl Guards {
    /// Binds another domain's listener on loopback first (so it predates
    /// every agent), then starts the guards:
    /// - in `from` (a `contractor` workload): UDP connect and sendto to `prod`'s address, TCP
    ///   to `prod`'s server (all refused by the connect/sendmsg hooks),
    ///   and TCP to `prod`'s loopback listener (refused through its
    ///   recorded owner);
    /// - in no domain, from `contractor`'s address: TCP to `prod`'s server,
    ///   which only `prod`'s ingress packet hook stops (dropped).
    pub fn start(w: &World, from: &Cgroup) -> Guards {
        // A bound, so nothing outlives a crashed test for long; not a
        // deadline: the guards and servers are stopped when the test ends,
        // and a test under emulation (`vm-test`, TCG) runs past 15 minutes.
        const LIFE: u64 = 3600;
        let secs = LIFE.to_string();
        let secs = secs.as_str();
        let local = Server::start(&w.prod, Some(&w.link.a), "tcp", "127.0.0.1:7411", LIFE);
        let remote_at = format!("{}:8080", w.link.v4(2));
        let remote = Server::start(&w.prod, Some(&w.link.b), "tcp", &remote_at, LIFE);
        let udp = format!("{}:5353", w.link.v4(2));
        let probe = probe_bin();
        let mut children = vec![
            command_in(
                from,
                Some(&w.link.a),
                probe.to_str().unwrap(),
                &[
                    "guard",
                    secs,
                    &format!("udp-connect:{udp}"),
                    &format!("udp-sendto:{udp}"),
                    &format!("tcp:{remote_at}"),
                    "tcp:127.0.0.1:7411",
                ],
            ),
            command_in(
                &w.outside,
                Some(&w.link.a),
                probe.to_str().unwrap(),
                &["guard", secs, &format!("tcp:{remote_at}")],
            ),
        ]
        .into_iter()
        .map(|mut c| c.stdout(Stdio::piped()).spawn().expect("spawn guard"))
        .collect::<Vec<_>>();
        let seen = Arc::new(Mutex::new(Vec::new()));
        for (i, child) in children.iter_mut().enumerate() {
            let out = child.stdout.take().unwrap();
            let seen = seen.clone();
            thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    let f: Vec<&str> = line.split_whitespace().collect();
                    let parsed = match f.as_slice() {
                        [at, "totals", refused, _] => Seen::Totals {
                            guard: i,
                            at: at.parse().unwrap(),
                            refused: refused.parse().unwrap(),
                        },
                        [at, target, outcome] => Seen::Change {
                            at: at.parse().unwrap(),
                            target: format!("guard{i} {target}"),
                            outcome: outcome.to_string(),
                        },
                        _ => continue,
                    };
                    seen.lock().unwrap().push(parsed);
                }
            });
        }
        Guards {
            children,
            seen,
            _servers: vec![local, remote],
        }
    }

    /// Waits (bounded) until every target of every guard is refused or
    /// dropped: enforcement in place.
    pub fn wait_refused(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut last = std::collections::HashMap::new();
            for s in self.seen.lock().unwrap().iter() {
                if let Seen::Change {
                    target, outcome, ..
                } = s
                {
                    last.insert(target.clone(), outcome.clone());
                }
            }
            if last.len() == 5 && last.values().all(|o| o == "refused" || o == "dropped") {
                return;
            }
            assert!(Instant::now() < deadline, "not all refused: {last:?}");
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// A lower bound of the attempts refused or dropped from `after` on:
    /// per guard, its last running total less its first one after `after`.
    pub fn refused_since(&self, after: u128) -> u64 {
        let seen = self.seen.lock().unwrap();
        let mut first = [None; 2];
        let mut last = [0u64; 2];
        for s in seen.iter() {
            if let Seen::Totals { guard, at, refused } = s {
                if *at > after && first[*guard].is_none() {
                    first[*guard] = Some(*refused);
                }
                last[*guard] = *refused;
            }
        }
        (0..2).map(|g| last[g] - first[g].unwrap_or(last[g])).sum()
    }

    /// Fails the test, with the timeline, if anything got through (see
    /// [`Guards::leaks`]).
    pub fn assert_no_leaks(&self, resets: &[u128]) {
        self.assert_no_leaks_from(0, resets);
    }

    /// [`Guards::assert_no_leaks`] for what happened from `from` on (e.g.
    /// once an earlier version, with gaps of its own, was up).
    pub fn assert_no_leaks_from(&self, from: u128, resets: &[u128]) {
        let leaks = self.leaks_from(from, resets);
        let longest = leaks
            .iter()
            .filter_map(|l| l.split(", ").nth(1)?.split(' ').next()?.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        assert!(
            leaks.is_empty(),
            "{} leaks, up to {longest} ms after a first refusal; the first ones:\n{}",
            leaks.len(),
            leaks[..leaks.len().min(20)].join("\n")
        );
    }

    /// The forbidden attempts that got through after the first refusal
    /// (EPERM, of any target) since the last of `resets` before them: each
    /// reset is a moment the test itself removed enforcement.
    pub fn leaks(&self, resets: &[u128]) -> Vec<String> {
        self.leaks_from(0, resets)
    }

    fn leaks_from(&self, from: u128, resets: &[u128]) -> Vec<String> {
        let seen = self.seen.lock().unwrap();
        let mut changes: Vec<(u128, &str, &str)> = seen
            .iter()
            .filter_map(|s| match s {
                Seen::Change {
                    at,
                    target,
                    outcome,
                } => Some((*at, target.as_str(), outcome.as_str())),
                Seen::Totals { .. } => None,
            })
            .collect();
        changes.sort();
        let mut out = Vec::new();
        // What happened in the 2 s before the first leak (bounded: an
        // unenforced second holds thousands of attempts).
        let timeline = |leak_at: u128| {
            let t0 = changes.first().map_or(0, |c| c.0);
            let mut all: Vec<(u128, String)> = changes
                .iter()
                .map(|(at, t, o)| (*at, format!("{t} {o}")))
                .chain(resets.iter().map(|r| (*r, "RESET".to_string())))
                .filter(|(at, _)| *at + 2_000_000_000 >= leak_at && *at <= leak_at)
                .collect();
            all.sort();
            all.dedup_by(|a, b| a.1 == b.1 && a.1.ends_with("open"));
            let skip = all.len().saturating_sub(300);
            all[skip..]
                .iter()
                .map(|(at, what)| format!("{:>8.1} ms {what}", (at - t0) as f64 / 1e6))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let mut first_leak = None;
        let mut armed: Option<u128> = None;
        for &(at, target, outcome) in changes.iter().filter(|c| c.0 >= from) {
            if resets
                .iter()
                .any(|r| armed.is_some_and(|a| a < *r) && *r <= at)
            {
                armed = None;
            }
            match outcome {
                // Only EPERM arms: a timeout can also be a full listen
                // backlog while nothing is enforced.
                "refused" => {
                    armed.get_or_insert(at);
                }
                "dropped" => {}
                _ => {
                    if let Some(since) = armed {
                        first_leak.get_or_insert(at);
                        out.push(format!(
                            "{target} {outcome} at {at}, {} ms after the first refusal",
                            (at - since) / 1_000_000
                        ));
                    }
                }
            }
        }
        if !out.is_empty() {
            eprintln!(
                "before the first leak:\n{}",
                timeline(first_leak.unwrap_or(0))
            );
        }
        out
    }
}

impl Drop for Guards {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
