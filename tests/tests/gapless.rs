//! No gap at any instant: the agent killed, signalled or replaced by a
//! binary of another map layout at random instants of its life, while
//! workloads keep trying what the policy forbids: connects and datagrams
//! across domains, a connect to another domain's listener bound before
//! any agent started (over loopback), and inbound connects from another
//! domain's address that only the packet hooks can stop. From the first
//! refusal on, nothing may get through.

use std::{
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use tests::{
    Agent, bulkhead_bin,
    gaps::{Guards, Rng, unix_ns},
    privileged,
    world::{World, world},
};

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
    let w = world();
    let guards = Guards::start(&w, &w.contractor);
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
    // Every attempt since the first adoption was counted by the kernel
    // (the counters live in the pinned maps, across every agent).
    let attempted = guards.refused_since(counted_from);
    let denied = decisions_denied(&agent);
    eprintln!(
        "start {fresh:?} fresh, {adopt:?} adopting, reload {reload:?}; {kills} kills; \
         since the first adoption the guards saw >= {attempted} refused, the kernel counted {denied} denials"
    );
    guards.assert_no_leaks(&resets);
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
    let w = world();
    let guards = Guards::start(&w, &w.contractor);
    let mut agent = Agent::start_with(&w.root, &policy(&w, false), QUIET);
    guards.wait_refused();
    agent.kill9();
    let start = timed(|| agent.spawn(QUIET));
    let slack = Duration::from_millis(300);
    // `main` holds the signals pending from its first instruction until
    // the handlers are installed; before it (the loader: a few
    // milliseconds, more on a loaded machine) they have their default
    // action, so each delay counts from the instant they are held.
    for _ in 0..10 {
        agent.kill9();
        agent.spawn_nowait(QUIET, None);
        agent.wait_signals_taken();
        thread::sleep(rng.between(Duration::ZERO, start + slack));
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
        agent.wait_signals_taken();
        let at = rng.between(Duration::ZERO, start + slack);
        thread::sleep(at);
        agent.signal(libc::SIGTERM);
        let st = agent
            .wait_exit(tests::ready_timeout())
            .expect("SIGTERM ends the agent");
        assert!(st.success(), "SIGTERM {at:?} into the start: {st:?}");
    }
    agent.spawn(QUIET);
    guards.wait_refused();
    guards.assert_no_leaks(&[]);
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
    let w = world();
    let guards = Guards::start(&w, &w.contractor);
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
    eprintln!("takeover across layouts: {takeover:?}");
    guards.assert_no_leaks(&[]);
}

/// Restarting the agent (kill -9, or a stop and start) changes nothing for
/// the connections the policy allows: one opened over a bridge before the
/// restarts is still open after them, in both directions of its packets
/// (its socket's state, e.g. which side opened it, is kept in pinned maps).
#[test]
fn a_bridged_connection_survives_agent_restarts() {
    if !privileged("bridged_connection_survives_restarts") {
        return;
    }
    let w = world();
    let bridge = "bridges:\n  - name: web\n    from: contractor\n    to: prod\n    ports: [tcp/8080]\n    reason: \"T-9\"\n";
    let mut agent = Agent::start_with(&w.root, &w.policy("", bridge), QUIET);
    let dst = format!("{}:8080", w.link.v4(2));
    let start = |cg, ns, args: &[&str]| {
        tests::command_in(cg, Some(ns), tests::probe_bin().to_str().unwrap(), args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut sink = start(&w.prod, &w.link.b, &["sink", &dst, "90"]);
    let mut sink_out = std::io::BufReader::new(sink.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut sink_out, &mut line).unwrap();
    assert_eq!(line.trim(), "listening");
    let mut hold = start(&w.contractor, &w.link.a, &["hold", &dst, "60"]);
    let mut out = std::io::BufReader::new(hold.stdout.take().unwrap());
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "connected");
    for i in 0..4 {
        if i % 2 == 0 {
            agent.kill9();
        } else {
            agent.signal(libc::SIGTERM);
            agent.wait_exit(Duration::from_secs(10)).expect("stopped");
        }
        agent.spawn(QUIET);
        thread::sleep(Duration::from_millis(300));
    }
    let restarted = unix_ns();
    thread::sleep(Duration::from_millis(1500));
    // The client's writes never failed (a cut ends it with the errno) ...
    let ended = hold.try_wait().unwrap();
    let _ = hold.kill();
    let _ = hold.wait();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(ended.is_none(), "the bridged connection ended: {rest}");
    // ... and its bytes still arrive (a dropped flow would only fill the
    // client's buffer).
    line.clear();
    std::io::BufRead::read_line(&mut sink_out, &mut line).unwrap();
    let _ = sink.wait();
    let last: u128 = line
        .split_whitespace()
        .nth(3)
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("sink: {line}"));
    assert!(
        last > restarted + 1_000_000_000,
        "no bytes arrived after the restarts ({line}; restarts done at {restarted})"
    );
}

/// A new agent whose programs the kernel refuses (the last one verified,
/// here by the test's say-so) fails naming it and changes nothing that is
/// enforced: the policy of the agent before it stays in force, in the
/// programs it left, even when the new policy would allow more.
#[test]
fn an_agent_whose_programs_are_refused_changes_nothing_in_force() {
    if !privileged("refused_programs_change_nothing") {
        return;
    }
    let w = world();
    let mut agent = Agent::start_with(&w.root, &w.policy("", ""), QUIET);
    let dst = format!("{}:8080", w.link.v4(2));
    // Three agent starts fit in its life even under emulation (`vm-test`);
    // it is stopped when the test ends.
    let server = tests::Server::start(&w.prod, Some(&w.link.b), "tcp", &dst, 600);
    let connect = || tests::probe(&w.contractor, Some(&w.link.a), &["connect", "tcp", &dst]);
    assert_eq!(connect(), "EPERM");
    let generation = |agent: &Agent| {
        let out = Command::new(bulkhead_bin())
            .args(["dump", "--bpffs-dir"])
            .arg(&agent.bpffs)
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["generation"].clone()
    };
    let before = generation(&agent);
    agent.kill9();
    let bridge = "bridges:\n  - name: web\n    from: contractor\n    to: prod\n    ports: [tcp/8080]\n    reason: \"T-10\"\n";
    std::fs::write(&agent.policy, w.policy("", bridge)).unwrap();
    agent.set_env("BULKHEAD_TEST_REFUSE_PROGRAM", Some("bh_sendmsg6"));
    let out = agent
        .command(QUIET)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("rejected bh_sendmsg6"), "{err}");
    assert_eq!(connect(), "EPERM", "the new policy went live: {err}");
    assert_eq!(generation(&agent), before);
    // Once it loads, the new policy is what is enforced.
    agent.set_env("BULKHEAD_TEST_REFUSE_PROGRAM", None);
    agent.spawn(QUIET);
    assert_eq!(connect(), "ok");
    drop(server);
}

/// Denials made while no agent runs wait in the pinned ring buffer; the
/// next agent writes them named by the generation that decided them (kept
/// in the state directory), not by its own.
#[test]
fn events_queued_while_no_agent_ran_carry_their_generations_names() {
    if !privileged("queued_events_named") {
        return;
    }
    let w = world();
    let mut agent = Agent::start(&w.root, &w.policy("", ""));
    agent.kill9();
    let dst = format!("{}:7123", w.link.v4(2));
    assert_eq!(
        tests::probe(&w.contractor, Some(&w.link.a), &["connect", "tcp", &dst]),
        "EPERM"
    );
    // The next agent's policy numbers the domains apart.
    std::fs::write(&agent.policy, policy(&w, true)).unwrap();
    agent.spawn(&[]);
    let got = agent.wait_events(1, |e| e["dport"] == 7123);
    assert_eq!(got.len(), 1, "{got:?}");
    let e = &got[0];
    assert_eq!(tests::field(e, "src_domain"), "contractor", "{e}");
    assert_eq!(tests::field(e, "dst_domain"), "prod", "{e}");
    assert_eq!(e["generation"], 1, "{e}");
}

/// The upgrade from an earlier version's binary (`BULKHEAD_TEST_PREVIOUS_BIN`,
/// e.g. one built from the last release), whose pins may have another
/// layout or none (agents before layouts pinned under `maps/` and `links/`):
/// run with `-- --ignored` when such a binary is at hand.
#[test]
#[ignore = "needs BULKHEAD_TEST_PREVIOUS_BIN, a bulkhead binary of an earlier version"]
fn an_upgrade_from_the_previous_version_has_no_gap() {
    let previous = std::env::var_os("BULKHEAD_TEST_PREVIOUS_BIN")
        .expect("BULKHEAD_TEST_PREVIOUS_BIN: a bulkhead binary of an earlier version");
    if !privileged("upgrade_from_previous_version") {
        return;
    }
    let w = world();
    let guards = Guards::start(&w, &w.contractor);
    let mut agent = Agent::start_with(&w.root, &policy(&w, false), QUIET);
    // Only the previous version's pins from here on.
    agent.kill9();
    detach(&agent);
    agent.set_run_bin(Some(previous.into()));
    agent.spawn(QUIET);
    guards.wait_refused();
    let up = unix_ns();
    let before = agent.layouts();
    agent.signal(libc::SIGTERM);
    agent.wait_exit(Duration::from_secs(10)).expect("stopped");
    agent.set_run_bin(None);
    let took = timed(|| agent.spawn(QUIET));
    let after = agent.layouts();
    eprintln!("{before:?} -> {after:?} in {took:?}");
    assert_eq!(after.len(), 1, "{after:?}");
    assert!(after[0].starts_with("layout-"), "{after:?}");
    guards.wait_refused();
    guards.assert_no_leaks_from(up, &[]);
}
