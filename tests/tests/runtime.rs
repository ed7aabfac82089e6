//! The agent's runtime as its readers see it: a follower that stops
//! reading delays no other output of the audit trail, and the agent's own
//! diagnostics come out as one JSON object per line when asked, with the
//! one transition every policy change goes through (`apply`) logged once,
//! with why, the generation and the outcome.

use std::{
    collections::BTreeMap,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tests::{Agent, AgentLog, Value, bulkhead_bin, field, privileged, world::world};

/// A `bulkhead events --follow --json` that never reads on its own: its
/// stdout is a pipe no one reads (it fills at 64 KiB), and with `stop` it is
/// also SIGSTOPped. Continued and killed on drop.
struct StuckFollower {
    child: Child,
    stopped: bool,
}

impl StuckFollower {
    fn start(agent: &Agent, queue: Option<&str>, stop: bool) -> StuckFollower {
        let (st, _) = agent.status_within(Duration::from_secs(10));
        let before = st["events"]["subscribers"].as_u64().unwrap_or(0);
        let mut cmd = Command::new(bulkhead_bin());
        cmd.args(["events", "--follow", "--json"]);
        if let Some(q) = queue {
            cmd.args(["--queue", q]);
        }
        let child = cmd
            .arg("--bpffs-dir")
            .arg(&agent.bpffs)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn bulkhead events --follow");
        let mut f = StuckFollower {
            child,
            stopped: false,
        };
        // The agent has it as a subscriber before the test goes on.
        agent.wait_subscribers(before + 1);
        if stop {
            // SAFETY: plain kill(2) to our own child.
            unsafe { libc::kill(f.child.id() as i32, libc::SIGSTOP) };
            f.stopped = true;
        }
        f
    }

    fn still_there(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for StuckFollower {
    fn drop(&mut self) {
        if self.stopped {
            // SAFETY: plain kill(2) to our own child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGCONT) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Denied connects the storm makes.
const STORM: u32 = 20_000;
/// How long after the storm the events log may take to hold all of it.
const LOG_BOUND: Duration = Duration::from_secs(15);

/// Two followers that stop reading (one whose pipe is full, one SIGSTOPped
/// with a small queue) while a domain workload makes 20,000 denied
/// connects: the events log still receives every event the kernel
/// delivered (`wanted - rate_limited`, nothing lost in the ring), within
/// [`LOG_BOUND`], and `status` answers within 1 s.
#[test]
fn a_stopped_follower_does_not_delay_the_events_log() {
    if !privileged("stopped_follower_events_log") {
        return;
    }
    let w = world();
    // No rate limit and a ring that holds the whole storm: every denial is
    // delivered, so every one must reach the log.
    let agent = Agent::start_with(
        &w.root,
        &w.policy("", ""),
        &[
            "--event-rate",
            "0",
            "--ring-buffer-bytes",
            "16777216",
            "--no-audit-db",
        ],
    );
    let mut unread = StuckFollower::start(&agent, None, false);
    let mut stopped = StuckFollower::start(&agent, Some("64"), true);
    let (st, _) = agent.status_within(Duration::from_secs(5));
    assert_eq!(
        st["events"]["subscribers"], 2,
        "both followers subscribed: {}",
        st["events"]
    );

    let port = 5353u16;
    let dst = format!("{}:{port}", w.link.v4(2));
    let started = Instant::now();
    let out = tests::probe(
        &w.contractor,
        Some(&w.link.a),
        &["storm", &dst, &STORM.to_string()],
    );
    assert_eq!(
        out,
        format!("eperm {STORM} other 0"),
        "every connect denied"
    );
    let storm_took = started.elapsed();

    // The log catches up with what the kernel delivered, and the followers
    // are still stuck (stdout full, stopped) all along.
    let needle = format!("\"dport\":{port}");
    let count = || {
        std::fs::read_to_string(&agent.events)
            .map(|t| t.lines().filter(|l| l.contains(&needle)).count())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + LOG_BOUND;
    let mut seen = count();
    while seen < STORM as usize && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        seen = count();
    }
    let caught_up = started.elapsed();
    eprintln!("storm of {STORM} in {storm_took:?}; the log had {seen} after {caught_up:?}");
    assert!(
        seen >= STORM as usize,
        "the events log had {seen} of {STORM} events {LOG_BOUND:?} after the storm, with two followers stuck"
    );
    let (st, status_took) = agent.status_within(Duration::from_secs(1));
    let e = &st["events"];
    let (wanted, limited, lost) = (
        e["wanted"].as_u64().unwrap(),
        e["rate_limited"].as_u64().unwrap(),
        e["lost_ring_full"].as_u64().unwrap(),
    );
    eprintln!("status took {status_took:?}; events {e}");
    assert!(unread.still_there() && stopped.still_there());
    assert_eq!(wanted, u64::from(STORM), "every denial asked for an event");
    assert_eq!(lost, 0, "the ring holds the storm: {e}");
    // Exact, once nothing more arrives (a repeated line counts too).
    let logged = agent
        .settled_events()
        .iter()
        .filter(|v| v["dport"] == port && field(v, "verdict") == "deny")
        .count() as u64;
    assert_eq!(
        logged,
        wanted - limited,
        "the events log holds every delivered event within {LOG_BOUND:?} of the storm, \
         with two followers stuck: {e}"
    );
    assert!(
        status_took < Duration::from_secs(1),
        "status took {status_took:?}"
    );
    // The stuck followers' losses are theirs alone, and counted.
    assert!(
        e["subscriber_drops"].as_u64().unwrap_or(0) > 0,
        "the stopped follower (queue 64) lost events, counted: {e}"
    );
    drop(stopped);
    drop(unread);
    agent.status_within(Duration::from_secs(1));
}

/// Every stderr line of the agent, parsed as tracing-subscriber's JSON
/// format: an object with `timestamp`, `level` and `fields.message`.
/// Returns them, or the lines that are not.
fn json_lines(log: &AgentLog) -> Result<Vec<Value>, Vec<String>> {
    let (mut ok, mut bad) = (Vec::new(), Vec::new());
    for line in log.lines() {
        match serde_json::from_str::<Value>(&line) {
            Ok(v)
                if v["timestamp"].is_string()
                    && v["level"].is_string()
                    && v["fields"]["message"].is_string() =>
            {
                ok.push(v)
            }
            _ => bad.push(line),
        }
    }
    if bad.is_empty() { Ok(ok) } else { Err(bad) }
}

/// The fields a line logged inside a span named `apply` carries: the
/// span's own (from `span` or the `spans` stack) and the event's. `None`
/// for a line outside any `apply` span.
fn apply_fields(line: &Value) -> Option<BTreeMap<String, String>> {
    let spans = line["spans"].as_array().cloned().unwrap_or_default();
    let apply: Vec<&Value> = spans
        .iter()
        .chain(std::iter::once(&line["span"]))
        .filter(|s| s["name"] == "apply")
        .collect();
    if apply.is_empty() {
        return None;
    }
    let mut out = BTreeMap::new();
    for obj in apply.into_iter().chain(std::iter::once(&line["fields"])) {
        for (k, v) in obj.as_object().into_iter().flatten() {
            let v = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            out.insert(k.clone(), v);
        }
    }
    Some(out)
}

/// The lines logged in an `apply` span with `outcome` = `outcome`.
fn applies(lines: &[Value], outcome: &str) -> Vec<BTreeMap<String, String>> {
    lines
        .iter()
        .filter_map(apply_fields)
        .filter(|f| f.get("outcome").map(String::as_str) == Some(outcome))
        .collect()
}

/// `--log-format json --log-level debug`: every line the agent writes to
/// stderr is a JSON object (timestamp, level, fields.message); a reload
/// (SIGHUP) is logged exactly once in the `apply` span with `why` =
/// `reload`, the new generation (as `status` reports it) and `outcome` =
/// `applied`; a broken policy's reload with `outcome` = `rejected`.
#[test]
fn json_logs_show_each_apply_once_with_why_generation_and_outcome() {
    if !privileged("json_logs_apply") {
        return;
    }
    let w = world();
    let policy = w.policy("", "");
    let (mut agent, log) = Agent::start_capturing(
        &w.root,
        &policy,
        &[
            "--log-format",
            "json",
            "--log-level",
            "debug",
            "--no-audit-db",
        ],
    );
    let (st, _) = agent.status_within(Duration::from_secs(5));
    let before = st["generation"].as_u64().expect("generation");

    // A real change, through SIGHUP.
    let changed = w.policy("", "bridges:\n  - name: b\n    from: contractor\n    to: prod\n    ports: [tcp/8080]\n    reason: \"T-1\"\n");
    let mark = log.len();
    agent.reload(&changed);
    let (st, _) = agent.status_within(Duration::from_secs(5));
    let generation = st["generation"].as_u64().expect("generation");
    assert_eq!(generation, before + 1, "{st}");
    // The line may follow READY=1 by a moment: wait for it, then settle.
    log.wait_since(mark, 5, |l| l.iter().any(|l| l.contains("\"applied\"")));
    std::thread::sleep(Duration::from_millis(300));
    let lines = json_lines(&log).unwrap_or_else(|bad| {
        panic!(
            "{} stderr lines are not tracing JSON objects with timestamp, level and fields.message; the first:\n{}",
            bad.len(),
            bad[..bad.len().min(10)].join("\n")
        )
    });
    let applied = applies(&lines[mark.min(lines.len())..], "applied");
    assert_eq!(
        applied.len(),
        1,
        "exactly one `apply` line with outcome=applied for the reload: {applied:?}"
    );
    let a = &applied[0];
    assert_eq!(a.get("why").map(String::as_str), Some("reload"), "{a:?}");
    assert_eq!(
        a.get("generation").map(String::as_str),
        Some(generation.to_string().as_str()),
        "the generation status reports: {a:?}"
    );
    assert!(
        lines.iter().any(|l| l["level"] == "DEBUG"),
        "--log-level debug shows debug lines"
    );

    // A broken policy: rejected, and logged so.
    std::fs::write(&agent.policy, "version: 1\ndomains: [\n").unwrap();
    let mark = log.len();
    let out = agent.cli(&["reload"]);
    assert!(!out.status.success(), "a broken policy is rejected");
    log.wait_since(mark, 5, |l| l.iter().any(|l| l.contains("\"rejected\"")));
    std::thread::sleep(Duration::from_millis(300));
    let lines = json_lines(&log).unwrap_or_else(|bad| panic!("not JSON: {bad:?}"));
    let rejected = applies(&lines[mark.min(lines.len())..], "rejected");
    assert_eq!(
        rejected.len(),
        1,
        "exactly one `apply` line with outcome=rejected: {rejected:?}"
    );
    let (st, _) = agent.status_within(Duration::from_secs(5));
    assert_eq!(
        st["generation"], generation,
        "a rejected policy changes nothing"
    );
    assert!(agent.exited().is_none(), "the agent runs on");
}

/// An edit the agent's once-a-second check has already put in force (or
/// rejected) is not applied, logged or recorded again by the SIGHUP or
/// `bulkhead reload` that follows it: the reload answers the outcome in
/// force, the same generation or the same `file:line:col` errors. A file
/// changed after that is read again.
#[test]
fn a_reload_after_the_agent_read_the_edit_itself_repeats_nothing() {
    if !privileged("reload_after_auto") {
        return;
    }
    let w = world();
    let (agent, log) =
        Agent::start_capturing(&w.root, &w.policy("", ""), &["--log-format", "json"]);
    let status = || agent.status_within(Duration::from_secs(5)).0;
    let before = status()["generation"].as_u64().unwrap();
    // Until the agent itself has read the file (it checks every second).
    let read_by_agent = |outcome: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let st = status();
            if st["last_reload"]["outcome"] == outcome {
                return st;
            }
            assert!(Instant::now() < deadline, "not {outcome} by itself: {st}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let counted = |outcome: &str, mark: usize| {
        std::thread::sleep(Duration::from_millis(300));
        let lines = json_lines(&log).unwrap_or_else(|bad| panic!("not JSON: {bad:?}"));
        applies(&lines[mark.min(lines.len())..], outcome).len()
    };

    agent.write_policy(&w.policy("", "bridges:\n  - name: b\n    from: contractor\n    to: prod\n    ports: [tcp/8080]\n    reason: \"T-1\"\n"));
    let st = read_by_agent("applied");
    assert_eq!(st["generation"].as_u64(), Some(before + 1), "{st}");
    let mark = log.len();
    let out = agent.cli(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("generation {}", before + 1)),
        "{said}"
    );
    assert_eq!(status()["generation"].as_u64(), Some(before + 1));
    assert_eq!(counted("applied", mark), 0, "applied twice");

    agent.write_policy("version: 1\ndomains: [\n");
    read_by_agent("rejected");
    let mark = log.len();
    let out = agent.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:", agent.policy.display())),
        "the same file:line:col errors: {err}"
    );
    assert_eq!(counted("rejected", mark), 0, "rejected twice");
    // The store commits in batches: wait for the row, then one batch more
    // for a second one.
    let rejected = || {
        let out = agent.cli(&["audit", "changes"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !rejected().contains("reload-rejected") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let changes = rejected();
    assert_eq!(
        changes.matches("reload-rejected").count(),
        1,
        "recorded once:\n{changes}"
    );

    // Changed again: read again.
    agent.write_policy(&w.policy("", ""));
    let out = agent.cli(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    assert!(status()["generation"].as_u64() > Some(before + 1));
}

/// The level comes from the environment too (`BULKHEAD_LOG`, as
/// `RUST_LOG`): at `warn`, a reload logs no `info` line, and every line is
/// still JSON.
#[test]
fn json_logs_take_their_level_from_bulkhead_log() {
    if !privileged("json_logs_env_level") {
        return;
    }
    let w = world();
    let (mut agent, log) = Agent::start_capturing_with_env(
        &w.root,
        &w.policy("", ""),
        &["--log-format", "json", "--no-audit-db"],
        &[("BULKHEAD_LOG", "warn"), ("RUST_LOG", "warn")],
    );
    agent.reload(&w.policy("", "bridges:\n  - name: b\n    from: contractor\n    to: prod\n    ports: [tcp/8080]\n    reason: \"T-1\"\n"));
    std::thread::sleep(Duration::from_millis(500));
    let lines = json_lines(&log).unwrap_or_else(|bad| panic!("not JSON: {bad:?}"));
    let quiet: Vec<&Value> = lines
        .iter()
        .filter(|l| !["WARN", "ERROR"].contains(&l["level"].as_str().unwrap_or("")))
        .collect();
    assert!(quiet.is_empty(), "lines below warn: {quiet:?}");
    assert!(applies(&lines, "applied").is_empty());
    // Not silent either: a rejected policy is worth a warning.
    std::fs::write(&agent.policy, "version: 1\ndomains: [\n").unwrap();
    let mark = log.len();
    assert!(!agent.cli(&["reload"]).status.success());
    let new = log.wait_since(mark, 5, |l| !l.is_empty());
    assert!(!new.is_empty(), "a rejected reload logs at warn or above");
    let lines = json_lines(&log).unwrap_or_else(|bad| panic!("not JSON: {bad:?}"));
    assert_eq!(
        applies(&lines, "rejected").len(),
        1,
        "the rejection, once: {:?}",
        &lines[mark.min(lines.len())..]
    );
}

/// The reader above on lines as tracing-subscriber's JSON format writes
/// them (current span under `span`, the stack under `spans`), so a failure
/// of the tests above is the agent's, not the reader's.
#[test]
fn apply_lines_are_read_from_tracing_json() {
    let lines: Vec<Value> = [
        r#"{"timestamp":"2026-12-04T23:00:00.000001Z","level":"INFO","fields":{"message":"policy applied","outcome":"applied"},"target":"bulkhead::run","span":{"generation":2,"why":"reload","name":"apply"},"spans":[{"generation":2,"why":"reload","name":"apply"}]}"#,
        r#"{"timestamp":"2026-12-04T23:00:00.000002Z","level":"DEBUG","fields":{"message":"maps written"},"target":"bulkhead::maps","span":{"name":"write"},"spans":[{"generation":2,"why":"reload","name":"apply"},{"name":"write"}]}"#,
        r#"{"timestamp":"2026-12-04T23:00:00.000003Z","level":"INFO","fields":{"message":"outcome outside","outcome":"applied"},"target":"bulkhead::run"}"#,
        r#"{"timestamp":"2026-12-04T23:00:00.000004Z","level":"WARN","fields":{"message":"policy rejected","outcome":"rejected"},"target":"bulkhead::run","span":{"generation":2,"why":"control","name":"apply"},"spans":[{"generation":2,"why":"control","name":"apply"}]}"#,
    ]
    .iter()
    .map(|l| serde_json::from_str(l).unwrap())
    .collect();
    let applied = applies(&lines, "applied");
    assert_eq!(applied.len(), 1, "{applied:?}");
    assert_eq!(applied[0]["why"], "reload");
    assert_eq!(applied[0]["generation"], "2");
    assert!(apply_fields(&lines[1]).is_some(), "nested under apply");
    assert!(apply_fields(&lines[2]).is_none(), "outside any span");
    assert_eq!(applies(&lines, "rejected").len(), 1);
}
