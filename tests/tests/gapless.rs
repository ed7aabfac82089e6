//! No gap at any instant: the agent killed, signalled or replaced by a
//! binary of another map layout at random instants of its life, while
//! workloads keep trying what the policy forbids: connects and datagrams
//! across domains, a connect to another domain's listener bound before
//! any agent started (over loopback), and inbound connects from another
//! domain's address that only the packet hooks can stop. From the first
//! refusal on, nothing may get through.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use tests::{
    Agent, Server, bulkhead_bin, command_in, privileged, probe_bin,
    world::{World, world},
};

/// Random instants, reproducible from the printed seed
/// (`BULKHEAD_TEST_SEED`).
struct Rng(u64);

impl Rng {
    fn new(test: &str) -> Rng {
        let seed = std::env::var("BULKHEAD_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("{test}: BULKHEAD_TEST_SEED={seed}");
        Rng(seed)
    }

    /// Uniform in `lo..hi`.
    fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let r = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let span = (hi - lo).as_micros().max(1) as u64;
        lo + Duration::from_micros(r % span)
    }
}

fn unix_ns() -> u128 {
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
struct Guards {
    children: Vec<Child>,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Listeners the guards aim at; they live as long as the guards.
    _servers: Vec<Server>,
}

impl Guards {
    /// Binds another domain's listener on loopback first (so it predates
    /// every agent), then starts the guards:
    /// - in `contractor`: UDP connect and sendto to `prod`'s address, TCP
    ///   to `prod`'s server (all refused by the connect/sendmsg hooks),
    ///   and TCP to `prod`'s loopback listener (refused through its
    ///   recorded owner);
    /// - in no domain, from `contractor`'s address: TCP to `prod`'s server,
    ///   which only `prod`'s ingress packet hook stops (dropped).
    fn start(w: &World) -> Guards {
        let secs = "900";
        let local = Server::start(&w.prod, Some(&w.link.a), "tcp", "127.0.0.1:7411", 900);
        let remote_at = format!("{}:8080", w.link.v4(2));
        let remote = Server::start(&w.prod, Some(&w.link.b), "tcp", &remote_at, 900);
        let udp = format!("{}:5353", w.link.v4(2));
        let probe = probe_bin();
        let mut children = vec![
            command_in(
                &w.contractor,
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
    fn wait_refused(&self) {
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
    fn refused_since(&self, after: u128) -> u64 {
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

    /// The forbidden attempts that got through after the first refusal
    /// (EPERM, of any target) since the last of `resets` before them: each
    /// reset is a moment the test itself removed enforcement.
    fn leaks(&self, resets: &[u128]) -> Vec<String> {
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
        let timeline = || {
            let t0 = changes.first().map_or(0, |c| c.0);
            let mut all: Vec<(u128, String)> = changes
                .iter()
                .map(|(at, t, o)| (*at, format!("{t} {o}")))
                .chain(resets.iter().map(|r| (*r, "RESET".to_string())))
                .collect();
            all.sort();
            all.iter()
                .map(|(at, what)| format!("{:>8.1} ms {what}", (at - t0) as f64 / 1e6))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let mut armed: Option<u128> = None;
        for &(at, target, outcome) in &changes {
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
                        out.push(format!(
                            "{target} {outcome} at {at}, {} ms after the first refusal",
                            (at - since) / 1_000_000
                        ));
                    }
                }
            }
        }
        if !out.is_empty() {
            eprintln!("timeline:\n{}", timeline());
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

/// The world's policy, with a spare domain in front of `prod` when
/// `variant` (so a reload changes every domain id), and just-in-time
/// bridges from `contractor` to `prod` allowed (never on a port the guards
/// use).
fn policy(w: &World, variant: bool) -> String {
    let spare = if variant {
        format!(
            "  spare:\n    cgroups: [\"/bh-gapless-none\"]\n    networks: [10.{}.9.0/24]\n",
            w.link.net
        )
    } else {
        String::new()
    };
    w.policy(
        &spare,
        "jit_bridges:\n  - from: contractor\n    to: prod\n    max_duration: 1h\n",
    )
}

const QUIET: &[&str] = &["--no-audit-db"];

/// Removes enforcement; returns the instant just before, from which on
/// anything may get through until the next refusal.
fn detach(agent: &Agent) -> u128 {
    let before = unix_ns();
    let out = Command::new(bulkhead_bin())
        .args(["detach", "--force", "--bpffs-dir"])
        .arg(&agent.bpffs)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    before
}

fn bridge_open(agent: &Agent, secs: u32, n: u32) -> Command {
    let mut c = Command::new(bulkhead_bin());
    c.args(["bridge", "open", "--from", "contractor", "--to", "prod"])
        .args(["--port", "tcp/7777", "--for", &format!("{secs}s")])
        .args(["--reason", &format!("gapless {n}")])
        .arg("--bpffs-dir")
        .arg(&agent.bpffs)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

fn decisions_denied(agent: &Agent) -> u64 {
    let out = agent.cli(&["status", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let st: Value = serde_json::from_slice(&out.stdout).unwrap();
    st["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["verdict"] == "deny")
        .map(|d| d["count"].as_u64().unwrap())
        .sum()
}

/// 50 kill -9 at random instants over the agent's whole life: first start
/// on an empty pin directory, adoption of a pinned state, reload, just-in-
/// time bridge open and expiry, shutdown.
#[test]
fn sigkill_at_50_random_instants_lets_nothing_through() {
    if !privileged("sigkill_at_random_instants") {
        return;
    }
    let mut rng = Rng::new("sigkill_at_50_random_instants_lets_nothing_through");
    let w = world(177);
    let guards = Guards::start(&w);
    let mut agent = Agent::start_with(&w.root, &policy(&w, false), QUIET);
    guards.wait_refused();
    let mut resets = Vec::new();
    let mut kills = 0;
    let slack = Duration::from_millis(300);

    // First start, nothing pinned.
    agent.kill9();
    resets.push(detach(&agent));
    let fresh = timed(|| agent.spawn(QUIET));
    for _ in 0..12 {
        agent.kill9();
        resets.push(detach(&agent));
        agent.spawn_nowait(QUIET, None);
        thread::sleep(rng.between(Duration::ZERO, fresh + slack));
        agent.kill9();
        kills += 1;
    }
    // Adoption of whatever the last one left pinned.
    agent.spawn(QUIET);
    agent.kill9();
    let counted_from = unix_ns();
    let adopt = timed(|| agent.spawn(QUIET));
    for _ in 0..11 {
        agent.kill9();
        agent.spawn_nowait(QUIET, None);
        thread::sleep(rng.between(Duration::ZERO, adopt + slack));
        agent.kill9();
        kills += 1;
    }
    agent.spawn(QUIET);
    // Reloads, alternating two policies that number the domains apart.
    let reload = timed(|| agent.reload(&policy(&w, true)));
    for i in 0..8 {
        std::fs::write(&agent.policy, policy(&w, i % 2 == 0)).unwrap();
        agent.signal(libc::SIGHUP);
        thread::sleep(rng.between(Duration::ZERO, reload + slack));
        agent.kill9();
        kills += 1;
        agent.spawn(QUIET);
    }
    // Just-in-time bridges: while one opens, and around one's expiry.
    for n in 0..6 {
        let mut cli = bridge_open(&agent, 3600, n).spawn().unwrap();
        thread::sleep(rng.between(Duration::ZERO, Duration::from_millis(400)));
        agent.kill9();
        kills += 1;
        let _ = cli.wait();
        agent.spawn(QUIET);
    }
    for n in 0..6 {
        let opened = bridge_open(&agent, 1, 10 + n).status().unwrap();
        assert!(opened.success());
        thread::sleep(rng.between(Duration::from_millis(700), Duration::from_millis(1500)));
        agent.kill9();
        kills += 1;
        agent.spawn(QUIET);
    }
    // Shutdown.
    for _ in 0..7 {
        agent.signal(libc::SIGTERM);
        thread::sleep(rng.between(Duration::ZERO, Duration::from_millis(300)));
        agent.kill9();
        kills += 1;
        agent.spawn(QUIET);
    }
    assert_eq!(kills, 50);
    guards.wait_refused();
    thread::sleep(Duration::from_millis(1100));
    let leaks = guards.leaks(&resets);
    // Every attempt since the first adoption was counted by the kernel
    // (the counters live in the pinned maps, across every agent).
    let attempted = guards.refused_since(counted_from);
    let denied = decisions_denied(&agent);
    eprintln!(
        "start {fresh:?} fresh, {adopt:?} adopting, reload {reload:?}; {kills} kills; \
         since the first adoption the guards saw >= {attempted} refused, the kernel counted {denied} denials"
    );
    assert!(
        leaks.is_empty(),
        "{} leaks:\n{}",
        leaks.len(),
        leaks.join("\n")
    );
    assert!(denied >= attempted, "{denied} < {attempted}");
}

/// SIGHUP at random instants (while starting, while reloading) never ends
/// the agent; SIGTERM at random instants while starting ends it cleanly;
/// neither opens a gap.
#[test]
fn sighup_and_sigterm_at_random_instants_never_open_a_gap() {
    if !privileged("signals_at_random_instants") {
        return;
    }
    let mut rng = Rng::new("sighup_and_sigterm_at_random_instants_never_open_a_gap");
    let w = world(178);
    let guards = Guards::start(&w);
    let mut agent = Agent::start_with(&w.root, &policy(&w, false), QUIET);
    guards.wait_refused();
    agent.kill9();
    let start = timed(|| agent.spawn(QUIET));
    let slack = Duration::from_millis(300);
    // The handlers are installed first thing in `run`; the few
    // milliseconds before (exec, argument parsing) have the default action.
    let earliest = Duration::from_millis(20);
    for _ in 0..10 {
        agent.kill9();
        agent.spawn_nowait(QUIET, None);
        thread::sleep(rng.between(earliest, start + slack));
        agent.signal(libc::SIGHUP);
        agent.wait_ready();
        thread::sleep(Duration::from_millis(200));
        assert_eq!(
            agent.exited(),
            None,
            "SIGHUP while starting ended the agent"
        );
    }
    // Reloads overlapping reloads.
    for i in 0..6 {
        std::fs::write(&agent.policy, policy(&w, i % 2 == 0)).unwrap();
        agent.signal(libc::SIGHUP);
        thread::sleep(rng.between(Duration::ZERO, Duration::from_millis(300)));
        agent.signal(libc::SIGHUP);
        thread::sleep(Duration::from_millis(400));
        assert_eq!(
            agent.exited(),
            None,
            "SIGHUP while reloading ended the agent"
        );
    }
    for _ in 0..8 {
        agent.kill9();
        agent.spawn_nowait(QUIET, None);
        thread::sleep(rng.between(earliest, start + slack));
        agent.signal(libc::SIGTERM);
        let st = agent
            .wait_exit(tests::ready_timeout())
            .expect("SIGTERM ends the agent");
        assert!(st.success(), "SIGTERM while starting: {st:?}");
    }
    agent.spawn(QUIET);
    guards.wait_refused();
    let leaks = guards.leaks(&[]);
    assert!(
        leaks.is_empty(),
        "{} leaks:\n{}",
        leaks.len(),
        leaks.join("\n")
    );
}

/// A binary whose maps differ from the pinned ones (here: the same source
/// with a test-only layout, `BULKHEAD_TEST_LAYOUT`) is replaced by this one
/// and back, by a stop and start as `systemctl restart` does, and killed
/// at random instants of the takeover: the old programs enforce until the
/// new ones do, no detach, and afterwards only the new layout is pinned.
#[test]
fn an_upgrade_across_map_layouts_has_no_gap_and_leaves_one_layout() {
    if !privileged("upgrade_across_layouts") {
        return;
    }
    let mut rng = Rng::new("an_upgrade_across_map_layouts_has_no_gap_and_leaves_one_layout");
    let w = world(179);
    let guards = Guards::start(&w);
    let mut agent = Agent::start_with_env(
        &w.root,
        &policy(&w, false),
        QUIET,
        &[("BULKHEAD_TEST_LAYOUT", "older")],
    );
    guards.wait_refused();
    let older = agent.layouts();
    assert_eq!(older.len(), 1, "{older:?}");
    // The upgrade: stop, start the new binary.
    agent.signal(libc::SIGTERM);
    agent.wait_exit(Duration::from_secs(10)).expect("stopped");
    agent.set_env("BULKHEAD_TEST_LAYOUT", None);
    let log = tests::AgentLog::default();
    let takeover = timed(|| agent.spawn_capturing(QUIET, &log));
    let newer = agent.layouts();
    assert_eq!(newer.len(), 1, "old pins left behind: {newer:?}");
    assert_ne!(newer, older);
    assert!(
        log.lines().iter().any(|l| l.contains(&format!(
            "retired the programs and maps of layout {}",
            older[0]
        ))),
        "{:?}",
        log.lines()
    );
    let st: Value = serde_json::from_slice(&agent.cli(&["status", "--json"]).stdout).unwrap();
    assert_eq!(st["layout"], newer[0].as_str());
    assert!(
        st["programs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["pinned"] == true)
    );
    // Down and up again, killed at random instants of each takeover.
    for i in 0..6 {
        let layout = (i % 2 == 0).then_some("older");
        agent.kill9();
        agent.set_env("BULKHEAD_TEST_LAYOUT", layout);
        agent.spawn_nowait(QUIET, None);
        thread::sleep(rng.between(Duration::ZERO, takeover + Duration::from_millis(300)));
        agent.kill9();
        agent.spawn(QUIET);
        let now = agent.layouts();
        assert_eq!(now.len(), 1, "after takeover {i}: {now:?}");
        assert_eq!(&now, if layout.is_some() { &older } else { &newer });
    }
    guards.wait_refused();
    let leaks = guards.leaks(&[]);
    eprintln!("takeover across layouts: {takeover:?}");
    assert!(
        leaks.is_empty(),
        "{} leaks:\n{}",
        leaks.len(),
        leaks.join("\n")
    );
}
