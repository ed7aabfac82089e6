//! The audit trail end to end: accounting under a deny storm, live
//! subscribers that fall behind, log rotation, the SQLite store and its
//! queries, and the store surviving `kill -9`.

use std::{
    fs,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use tests::{Agent, Value, bulkhead_bin, privileged, probe, world::world};

fn status(agent: &Agent) -> Value {
    let out = agent.cli(&["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Waits until the agent has delivered every event the kernel emitted
/// (the count stops moving) and its outputs have written them, bounded.
fn settle(agent: &Agent) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = status(agent);
    loop {
        thread::sleep(Duration::from_millis(500));
        let now = status(agent);
        // The log and the store whole (`pending: 0`: written, committed);
        // a stalled follower's queue may stay full.
        let idle = now["outputs"].as_array().is_some_and(|o| {
            o.iter()
                .all(|o| o["pending"] == 0 || o["name"] == "followers")
        });
        if (idle && now["events"] == last["events"]) || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

fn storm(cg: &tests::Cgroup, ns: &tests::Netns, to: &str, n: u32) -> u32 {
    let out = probe(cg, Some(ns), &["storm", to, &n.to_string()]);
    let eperm: u32 = out
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("storm said {out}"));
    assert_eq!(
        out,
        format!("eperm {n} other 0"),
        "every connect of the storm is denied"
    );
    eperm
}

fn now_rfc3339() -> String {
    let out = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%S.%NZ"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn deny_storm_accounting_identity_holds_exactly() {
    if !privileged("deny_storm") {
        return;
    }
    let w = world();
    // A tiny ring and a per-cgroup rate limit, so every path is taken:
    // delivered, rate limited and lost.
    let p = w.policy("", "");
    let agent = Agent::start_with(
        &w.root,
        &p,
        &[
            "--ring-buffer-bytes",
            "4096",
            "--event-rate",
            "2000",
            "--event-burst",
            "1000",
        ],
    );
    let dst = format!("{}:5353", w.link.v4(2));
    let jobs: Vec<_> = (0..3)
        .map(|i| w.contractor.child(&format!("job{i}")))
        .collect();
    let workers: Vec<_> = jobs
        .iter()
        .map(|cg| {
            let cmd = tests::command_in(
                cg,
                Some(&w.link.a),
                tests::probe_bin().to_str().unwrap(),
                &["storm", &dst, "40000"],
            );
            let mut cmd = cmd;
            cmd.stdout(Stdio::piped()).spawn().unwrap()
        })
        .collect();
    let mut denied = 0u64;
    for c in workers {
        let out = c.wait_with_output().unwrap();
        let line = String::from_utf8(out.stdout).unwrap();
        assert_eq!(line.trim(), "eperm 40000 other 0");
        denied += 40000;
    }
    let st = settle(&agent);
    let e = &st["events"];
    let (wanted, delivered, limited, lost) = (
        e["wanted"].as_u64().unwrap(),
        e["delivered"].as_u64().unwrap(),
        e["rate_limited"].as_u64().unwrap(),
        e["lost_ring_full"].as_u64().unwrap(),
    );
    eprintln!(
        "storm: {denied} denied, {wanted} wanted, {delivered} delivered, {limited} rate limited, {lost} lost"
    );
    assert_eq!(wanted, denied, "every denial asked for an event");
    assert_eq!(
        delivered + limited + lost,
        wanted,
        "nothing is lost silently"
    );
    assert!(limited > 0, "the rate limit took effect");
    assert!(delivered > 0);
    // Counted once the log stops growing: the counters can be ahead of
    // the file's writer, and an extra line must show too.
    let lines = agent.settled_events().len() as u64;
    assert_eq!(lines, delivered, "every delivered event is in the log");
}

#[test]
fn a_stalled_subscriber_loses_only_its_own_events() {
    if !privileged("stalled_subscriber") {
        return;
    }
    let w = world();
    let agent = Agent::start_with(
        &w.root,
        &w.policy("", ""),
        &["--event-rate", "0", "--ring-buffer-bytes", "16777216"],
    );
    // One follower never reads; the other writes everything to a file.
    // The stalled follower gets a small queue, the reader the default one,
    // which holds the whole storm: whatever the machine's load, only the
    // stalled one may lose events.
    let mut stalled = Command::new(bulkhead_bin())
        .args([
            "events",
            "--follow",
            "--json",
            "--queue",
            "1000",
            "--bpffs-dir",
        ])
        .arg(&agent.bpffs)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let copy = agent.dir.path().join("follower.jsonl");
    let mut reader = Command::new(bulkhead_bin())
        .args(["events", "--follow", "--json", "--bpffs-dir"])
        .arg(&agent.bpffs)
        .stdout(fs::File::create(&copy).unwrap())
        .spawn()
        .unwrap();
    agent.wait_subscribers(2);
    let started = Instant::now();
    storm(
        &w.contractor,
        &w.link.a,
        &format!("{}:5353", w.link.v4(2)),
        12_000,
    );
    let took = started.elapsed();
    let st = settle(&agent);
    let delivered = st["events"]["delivered"].as_u64().unwrap();
    // Counted once the copy stops growing, so a repeated line shows too.
    let got = Agent::settled_lines(&copy, delivered as usize, Duration::from_secs(10)) as u64;
    eprintln!(
        "12000 denials in {took:?}; delivered {delivered}; the reading follower got {got}; drops {}",
        st["events"]["subscriber_drops"]
    );
    assert_eq!(got, delivered, "the reading follower lost nothing");
    assert!(
        st["events"]["subscriber_drops"].as_u64().unwrap() > 0,
        "the stalled follower's losses are counted"
    );
    assert_eq!(st["events"]["subscribers"], 2);
    let _ = stalled.kill();
    let _ = reader.kill();
    let _ = stalled.wait();
    let _ = reader.wait();
}

#[test]
fn the_events_log_rotates_and_stays_bounded() {
    if !privileged("rotation") {
        return;
    }
    let w = world();
    let agent = Agent::start_with(
        &w.root,
        &w.policy("", ""),
        &[
            "--event-rate",
            "0",
            "--events-log-max-bytes",
            "20000",
            "--events-log-keep",
            "2",
        ],
    );
    storm(
        &w.contractor,
        &w.link.a,
        &format!("{}:5353", w.link.v4(2)),
        3000,
    );
    let st = settle(&agent);
    assert!(st["events"]["delivered"].as_u64().unwrap() > 500);
    let dir = agent.events.parent().unwrap();
    let logs: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("events.jsonl"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().len(),
            )
        })
        .collect();
    let total: u64 = logs.iter().map(|(_, n)| n).sum();
    eprintln!("logs: {logs:?}");
    assert!(logs.iter().any(|(n, _)| n == "events.jsonl.2"));
    assert!(!logs.iter().any(|(n, _)| n == "events.jsonl.3"));
    assert!(total <= 3 * 21_000, "bounded: {total} bytes");
}

#[test]
fn audit_query_finds_exactly_one_domains_denials_in_a_time_range() {
    if !privileged("audit_query") {
        return;
    }
    let w = world();
    let db = tempfile::tempdir().unwrap();
    let db_path = db.path().join("audit.db");
    let agent = Agent::start_with(
        &w.root,
        &w.policy("", ""),
        &["--event-rate", "0", "--audit-db", db_path.to_str().unwrap()],
    );
    let before = now_rfc3339();
    storm(
        &w.contractor,
        &w.link.a,
        &format!("{}:5353", w.link.v4(2)),
        300,
    );
    storm(&w.prod, &w.link.b, &format!("{}:5353", w.link.v4(1)), 200);
    let st = settle(&agent);
    assert_eq!(st["events"]["delivered"], 500);
    thread::sleep(Duration::from_millis(800));
    let after = now_rfc3339();
    let query = |extra: &[&str]| -> Vec<Value> {
        let out = Command::new(bulkhead_bin())
            .args([
                "audit",
                "query",
                "--db",
                db_path.to_str().unwrap(),
                "--format",
                "json",
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let rows = query(&[
        "--src-domain",
        "contractor",
        "--verdict",
        "deny",
        "--from",
        &before,
        "--to",
        &after,
    ]);
    assert_eq!(rows.len(), 300);
    assert!(
        rows.iter()
            .all(|r| r["dst_domain"] == "prod" && r["dport"] == 5353)
    );
    assert_eq!(
        query(&["--domain", "prod", "--dst", &format!("{}/32", w.link.v4(1))]).len(),
        200
    );
    assert_eq!(query(&["--from", &after]).len(), 0);
    assert_eq!(
        query(&["--cgroup", &w.contractor.rel, "--port", "5353"]).len(),
        300
    );
    let csv = Command::new(bulkhead_bin())
        .args([
            "audit",
            "query",
            "--db",
            db_path.to_str().unwrap(),
            "--format",
            "csv",
            "--domain",
            "contractor",
        ])
        .output()
        .unwrap();
    let csv = String::from_utf8(csv.stdout).unwrap();
    assert!(csv.starts_with("ts,verdict,reason,"));
    assert_eq!(
        csv.lines().count(),
        501,
        "header + every event that touches contractor"
    );
    // `--json` is the same as `--format json`, as on every command that
    // prints JSON.
    let json_flag = Command::new(bulkhead_bin())
        .args(["audit", "query", "--db", db_path.to_str().unwrap()])
        .args(["--json", "--domain", "contractor"])
        .output()
        .unwrap();
    let rows: Vec<Value> = String::from_utf8(json_flag.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows, query(&["--domain", "contractor"]));
    let changes = |json: bool| {
        let out = Command::new(bulkhead_bin())
            .args(["audit", "changes", "--db", db_path.to_str().unwrap()])
            .args(json.then_some("--json"))
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(
        changes(false).contains("start"),
        "policy changes are in the same trail"
    );
    let kinds: Vec<String> = changes(true)
        .lines()
        .map(|l| {
            let c: Value = serde_json::from_str(l).unwrap();
            tests::field(&c, "kind").to_string()
        })
        .collect();
    assert!(kinds.iter().any(|k| k == "start"), "{kinds:?}");
}

#[test]
fn the_store_survives_kill_9() {
    if !privileged("store_kill9") {
        return;
    }
    let w = world();
    let db = tempfile::tempdir().unwrap();
    let db_path = db.path().join("audit.db");
    let mut agent = Agent::start_with(
        &w.root,
        &w.policy("", ""),
        &["--event-rate", "0", "--audit-db", db_path.to_str().unwrap()],
    );
    storm(
        &w.contractor,
        &w.link.a,
        &format!("{}:5353", w.link.v4(2)),
        1000,
    );
    settle(&agent);
    // Committed at least twice a second: one second is enough.
    thread::sleep(Duration::from_secs(1));
    agent.kill9();
    let out = Command::new(bulkhead_bin())
        .args([
            "audit",
            "query",
            "--db",
            db_path.to_str().unwrap(),
            "--format",
            "json",
            "--verdict",
            "deny",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the database opens after kill -9: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap().lines().count(), 1000);
}

#[test]
fn metrics_count_decisions_by_domain_and_the_socket_refuses_strangers() {
    if !privileged("metrics") {
        return;
    }
    let w = world();
    // A free loopback port for the metrics endpoint.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let agent = Agent::start_with(
        &w.root,
        &w.policy("", ""),
        &["--metrics-addr", &addr, "--no-audit-db"],
    );
    storm(
        &w.contractor,
        &w.link.a,
        &format!("{}:5353", w.link.v4(2)),
        7,
    );
    let get = |path: &str| {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "5", &format!("http://{addr}{path}")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "curl {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(get("/healthz"), "ok\n");
    let m = get("/metrics");
    assert!(m.contains("bulkhead_decisions_total{domain=\"contractor\",verdict=\"deny\",reason=\"cross-domain\"} 7"), "{m}");
    assert!(m.contains("bulkhead_events_wanted_total 7"), "{m}");
    assert!(m.contains("bulkhead_policy_generation 1"), "{m}");

    // Only root (or the control group) may use the control socket.
    let out = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(bulkhead_bin())
        .args(["status", "--bpffs-dir"])
        .arg(&agent.bpffs)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Permission denied") || err.contains("permission denied"),
        "{err}"
    );
}

/// `audit: all` records every allowed connect, but an unconnected socket's
/// datagrams only when their flow changes: a new destination, port or
/// reason. The kernel still counts every decision.
#[test]
fn audit_all_records_one_event_per_flow_not_per_datagram() {
    if !privileged("audit_all_flows") {
        return;
    }
    let w = world();
    let bridge = "bridges:\n  - name: dns\n    from: contractor\n    to: prod\n    ports: [udp/5300-5310]\n    reason: T-5\n";
    let agent = Agent::start(&w.root, &w.policy("    audit: all\n", bridge));
    let a = format!("{}:5300", w.link.v4(2));
    let b = format!("{}:5301", w.link.v4(2));
    let mut dsts = vec![a.as_str(); 5];
    dsts.extend([b.as_str(); 3]);
    dsts.extend([a.as_str(); 2]);
    let mut args = vec!["sendmmsg"];
    args.extend(&dsts);
    let out = probe(&w.contractor, Some(&w.link.a), &args);
    assert_eq!(out, ["ok"; 10].join(","), "every datagram was allowed");
    // A new socket is a new flow; every connect is recorded.
    assert_eq!(
        probe(&w.contractor, Some(&w.link.a), &["sendto", "udp", &a]),
        "ok"
    );
    for _ in 0..2 {
        assert_eq!(
            probe(&w.contractor, Some(&w.link.a), &["connect", "udp", &a]),
            "ok"
        );
    }
    let st = settle(&agent);
    let bridged: u64 = st["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["reason"] == "bridge" && d["hook"] != "skb-egress")
        .map(|d| d["count"].as_u64().unwrap())
        .sum();
    assert_eq!(bridged, 13, "the kernel counts every decision: {st}");
    assert_eq!(st["events"]["wanted"], 6, "{st}");
    let events: Vec<(String, u64)> = agent
        .settled_events()
        .iter()
        .filter(|e| tests::field(e, "reason") == "bridge")
        .map(|e| {
            (
                tests::field(e, "hook").to_string(),
                e["dport"].as_u64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, u64)> = [
        ("sendmsg4", 5300),
        ("sendmsg4", 5301),
        ("sendmsg4", 5300),
        ("sendmsg4", 5300),
        ("connect4", 5300),
        ("connect4", 5300),
    ]
    .iter()
    .map(|(h, p)| (h.to_string(), *p))
    .collect();
    assert_eq!(events, want);

    // Every control command is in the same trail with the caller's
    // credentials (`status` above was one).
    let db = agent.state_dir().join("audit.db");
    let deadline = Instant::now() + Duration::from_secs(10);
    let changes = loop {
        let out = Command::new(bulkhead_bin())
            .args(["audit", "changes", "--db", db.to_str().unwrap()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if text.contains("{\"cmd\":\"status\"}") || Instant::now() > deadline {
            break text;
        }
        thread::sleep(Duration::from_millis(200));
    };
    let line = |kind: &str, has: &str| changes.lines().any(|l| l.contains(kind) && l.contains(has));
    assert!(
        line("control", "{\"cmd\":\"status\"} from pid")
            && line("control", "uid 0 gid 0: accepted"),
        "{changes}"
    );
}
