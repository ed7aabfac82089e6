//! Nothing lost silently (issue 24): each output of the audit trail (the
//! events log, the audit store) writes every event it is handed or counts
//! it as dropped, with a gap record in its own place; a full disk, a locked
//! database, an external log rotation or a `kill -9` leaves no torn line
//! and loses nothing it could have kept.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use tests::{
    Agent, AgentLog, Tmpfs, Value, bulkhead_bin, dropped, privileged,
    world::{storm_done, world},
};

/// `status --json`, which must answer within 10 s (a stalled agent loop
/// fails the test instead of hanging it).
fn status(agent: &Agent) -> Value {
    agent.status_within(Duration::from_secs(10)).0
}

fn output<'a>(st: &'a Value, name: &str) -> &'a Value {
    st["outputs"]
        .as_array()
        .expect("status has outputs")
        .iter()
        .find(|o| o["name"] == name)
        .unwrap_or_else(|| panic!("no output {name} in {}", st["outputs"]))
}

/// Waits (bounded) until delivery has stopped and no output holds
/// anything; the status then.
fn settle(agent: &Agent, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    let mut last = status(agent);
    loop {
        thread::sleep(Duration::from_millis(500));
        let now = status(agent);
        let idle = now["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|o| o["pending"] == 0);
        if (idle && now["events"]["delivered"] == last["events"]["delivered"])
            || Instant::now() > deadline
        {
            return now;
        }
        last = now;
    }
}

/// The status the first time output `name` holds nothing (polled without
/// pause; bounded by `within`).
fn first_idle(agent: &Agent, name: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let st = status(agent);
        if output(&st, name)["pending"] == 0 || Instant::now() > deadline {
            return st;
        }
    }
}

/// Every line of a JSON-lines file, which must end in a whole line:
/// (events, gap records).
fn strict_lines(path: &Path) -> (Vec<Value>, Vec<Value>) {
    let bytes = fs::read(path).unwrap_or_default();
    assert!(
        bytes.is_empty() || bytes.ends_with(b"\n"),
        "{} ends in a torn line: {:?}",
        path.display(),
        String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(200)..])
    );
    let (mut events, mut gaps) = (Vec::new(), Vec::new());
    for (n, line) in String::from_utf8(bytes).unwrap().lines().enumerate() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| {
            panic!(
                "{}:{}: unparsable line ({e}): {:?}",
                path.display(),
                n + 1,
                &line[..line.len().min(300)]
            )
        });
        if v["type"] == "gap" {
            gaps.push(v);
        } else {
            events.push(v);
        }
    }
    (events, gaps)
}

/// An RFC 3339 UTC time (`...:SS[.fraction]Z`) in an order that compares
/// right whatever the number of fraction digits.
fn ts_key(ts: &str) -> (String, u64) {
    let ts = ts.trim_end_matches('Z');
    let (secs, frac) = ts.split_once('.').unwrap_or((ts, ""));
    let nanos = format!("{frac:0<9}")[..9].parse().unwrap();
    (secs.to_string(), nanos)
}

fn warnings(log: &AgentLog) -> Vec<String> {
    log.lines()
        .into_iter()
        .filter(|l| l.contains("WARN"))
        .collect()
}

fn audit_rows(db: &Path, args: &[&str]) -> String {
    let out = Command::new(bulkhead_bin())
        .args(["audit"])
        .args(args)
        .args(["--db", db.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "audit {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The events log and the audit store on one small disk that fills up
/// during a deny storm larger than either's backlog: enforcement goes on;
/// once space returns, each output has written or counted every event it
/// was handed, wrote exactly one gap record for its outage, and the log
/// holds whole lines only; the agent warned a handful of times, not once
/// per event.
#[test]
fn a_full_disk_loses_nothing_silently() {
    if !privileged("full_disk") {
        return;
    }
    // More than both backlogs (16 MiB of log lines, 65 536 rows): some
    // events must be dropped; the disk holds what the backlogs kept once
    // the filler is gone.
    const STORM: u32 = 100_000;
    let disk = Tmpfs::new("160m");
    let w = world();
    let log_path = disk.path().join("events.jsonl");
    let db = disk.path().join("audit.db");
    let (agent, log) = Agent::start_capturing_at(
        &w.root,
        &w.policy("", ""),
        &log_path,
        &[
            "--event-rate",
            "0",
            "--ring-buffer-bytes",
            "33554432",
            "--audit-db",
            db.to_str().unwrap(),
        ],
    );
    // Full, but for 64 KiB: the first failing write is a short one.
    fs::write(disk.path().join("room"), vec![0u8; 64 << 10]).unwrap();
    disk.fill("filler");
    fs::remove_file(disk.path().join("room")).unwrap();
    let warned_before = warnings(&log).len();
    // Both outputs find the disk full before the storm (1000 events, more
    // than the 64 KiB left hold, and their first failing writes): the
    // storm's drops are all the outage's.
    storm_done(w.storm_bg(1000, 0), 1000);
    let deadline = Instant::now() + Duration::from_secs(20);
    let failing = |name: &str| {
        warnings(&log)[warned_before..]
            .iter()
            .any(|l| l.contains(&format!("{name}: writing failed")))
    };
    while !(failing("events-log") && failing("audit-store")) {
        assert!(Instant::now() < deadline, "{:#?}", warnings(&log));
        thread::sleep(Duration::from_millis(50));
    }

    let started = Instant::now();
    storm_done(w.storm_bg(STORM, 0), STORM);
    eprintln!("storm of {STORM} in {:?}", started.elapsed());
    // Delivery settles while the disk is still full.
    let mut during = status(&agent);
    loop {
        thread::sleep(Duration::from_millis(500));
        let now = status(&agent);
        if now["events"]["delivered"] == during["events"]["delivered"] {
            break;
        }
        during = now;
    }
    eprintln!("disk full: {}", during["outputs"]);
    let delivered = during["events"]["delivered"].as_u64().unwrap();
    for name in ["events-log", "audit-store"] {
        let o = output(&during, name);
        assert!(
            o["dropped"]["disk_full"].as_u64().unwrap() > 0,
            "{name} dropped past its backlog: {o}"
        );
        assert_eq!(
            o["dropped"]["queue_full"], 0,
            "{name}: dropped for the full disk while it lasts: {o}"
        );
        assert!(
            o["pending"].as_u64().unwrap() > 0,
            "{name} holds a backlog: {o}"
        );
        assert_eq!(
            o["written"].as_u64().unwrap() + o["pending"].as_u64().unwrap() + dropped(o),
            delivered,
            "{name}: written + pending + dropped = delivered, also while failing: {o}"
        );
    }

    // Space returns. Each output's file is read the moment it holds
    // nothing: `pending: 0` means it is whole, gap record included.
    fs::remove_file(disk.path().join("filler")).unwrap();
    first_idle(&agent, "events-log", Duration::from_secs(60));
    let (events, gaps) = strict_lines(&log_path);
    let st = first_idle(&agent, "audit-store", Duration::from_secs(60));
    let changes = audit_rows(&db, &["changes"]);
    println!("{}", serde_json::to_string_pretty(&st["events"]).unwrap());
    println!("{}", serde_json::to_string_pretty(&st["outputs"]).unwrap());
    let delivered = st["events"]["delivered"].as_u64().unwrap();
    assert!(delivered > 0);
    for name in ["events-log", "audit-store"] {
        let o = output(&st, name);
        assert_eq!(o["pending"], 0, "{name}: {o}");
        assert_eq!(
            o["written"].as_u64().unwrap() + dropped(o),
            delivered,
            "{name}: every delivered event is written or counted as dropped: {o}"
        );
    }

    // Every drop came while the disk was full (both outputs failed before
    // the storm), so every gap record says `disk_full`: one for each hole
    // in what the output kept (a queue that overflowed while its writer
    // retried, then drained, leaves one before the backlog's), a few for
    // the outage, not one per event. Together they count every drop.
    let lo = output(&st, "events-log");
    assert_eq!(events.len() as u64, lo["written"].as_u64().unwrap());
    assert!((1..=8).contains(&gaps.len()), "{gaps:?}");
    assert!(gaps.iter().all(|g| g["cause"] == "disk_full"), "{gaps:?}");
    let counted: u64 = gaps.iter().map(|g| g["count"].as_u64().unwrap()).sum();
    assert_eq!(counted, dropped(lo), "{gaps:?}");
    // Each hole is where its gap record stands: events before it are older
    // than its first event, events after it newer than its last.
    let lines: Vec<String> = fs::read_to_string(&log_path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let mut before = 0;
    for line in &lines {
        if !line.contains("\"type\":\"gap\"") {
            before += 1;
            continue;
        }
        let g: Value = serde_json::from_str(line).unwrap();
        let first = ts_key(g["first_ts"].as_str().unwrap());
        let last = ts_key(g["last_ts"].as_str().unwrap());
        assert!(first <= last, "{g}");
        assert!(
            events[..before]
                .iter()
                .all(|e| ts_key(tests::field(e, "ts")) < first),
            "{g}"
        );
        assert!(
            events[before..]
                .iter()
                .all(|e| ts_key(tests::field(e, "ts")) > last),
            "{g}"
        );
    }

    let so = output(&st, "audit-store");
    let rows = audit_rows(&db, &["query", "--format", "json", "--limit", "1000000"]);
    assert_eq!(
        rows.lines().count() as u64,
        so["written"].as_u64().unwrap(),
        "the store holds what it says it wrote"
    );
    let gap_rows: Vec<Value> = changes
        .lines()
        .filter(|l| l.contains("\"type\":\"gap\""))
        .map(|l| serde_json::from_str(&l[l.find('{').unwrap()..]).unwrap())
        .collect();
    assert!((1..=8).contains(&gap_rows.len()), "{changes}");
    assert!(
        gap_rows.iter().all(|g| g["cause"] == "disk_full"),
        "{changes}"
    );
    let counted: u64 = gap_rows.iter().map(|g| g["count"].as_u64().unwrap()).sum();
    assert_eq!(counted, dropped(so), "{changes}");

    let warned = warnings(&log)[warned_before..].to_vec();
    eprintln!("{} warnings:\n{}", warned.len(), warned.join("\n"));
    assert!(
        (2..=8).contains(&warned.len()),
        "a handful of warnings, not one per event: {warned:#?}"
    );
}

/// logrotate's `create` mode (the log renamed away; the agent reopens it
/// within a second by itself, and on SIGHUP) and `copytruncate` (the
/// agent appends at the new end): every event is in one of the files,
/// every line whole.
#[test]
fn external_rotation_loses_nothing() {
    if !privileged("external_rotation") {
        return;
    }
    let w = world();
    let (agent, _log) = Agent::start_capturing(
        &w.root,
        &w.policy("", ""),
        &["--event-rate", "0", "--no-audit-db"],
    );
    let log_path = agent.events.clone();
    let rotated = |n: u32| log_path.with_extension(format!("jsonl.{n}"));
    let storm = w.storm_bg(6000, 800);
    thread::sleep(Duration::from_millis(1000));
    // create mode, no signal: noticed within a second.
    fs::rename(&log_path, rotated(1)).unwrap();
    // It looks once a second; a loaded machine may delay a look.
    let deadline = Instant::now() + Duration::from_secs(3);
    while !log_path.exists() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        log_path.exists(),
        "the agent reopened its moved log at its path within 3 s"
    );
    // create mode with its postrotate `kill -HUP`.
    fs::rename(&log_path, rotated(2)).unwrap();
    // As logrotate's `create`, but never truncating: the agent's own
    // check may have made the file anew in between.
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .unwrap();
    agent.signal(libc::SIGHUP);
    storm_done(storm, 6000);
    settle(&agent, Duration::from_secs(20));
    // copytruncate: copy, then truncate in place (between bursts: what
    // comes between logrotate's copy and its truncate is lost by design).
    fs::copy(&log_path, rotated(3)).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&log_path)
        .unwrap()
        .set_len(0)
        .unwrap();
    storm_done(w.storm_bg(500, 1000), 500);
    let st = settle(&agent, Duration::from_secs(20));

    let delivered = st["events"]["delivered"].as_u64().unwrap();
    let lo = output(&st, "events-log");
    assert_eq!(lo["written"].as_u64(), Some(delivered), "{lo}");
    let mut total = 0;
    for p in [rotated(1), rotated(2), rotated(3), log_path.clone()] {
        let (events, gaps) = strict_lines(&p);
        eprintln!("{}: {} events", p.display(), events.len());
        assert!(gaps.is_empty(), "{gaps:?}");
        assert!(!events.is_empty(), "{} got events", p.display());
        total += events.len() as u64;
    }
    let last = fs::read(&log_path).unwrap();
    assert_eq!(
        last.first(),
        Some(&b'{'),
        "after copytruncate the agent appends at the new end (no hole of NULs)"
    );
    assert_eq!(total, delivered, "every delivered event is in one file");
}

/// An analyst holds the store locked (`BEGIN EXCLUSIVE`, as in sqlite3) for
/// 30 s while events stream in: the store holds them and writes every one
/// once the lock is released.
#[test]
fn a_locked_store_loses_nothing() {
    if !privileged("locked_store") {
        return;
    }
    let w = world();
    let dbdir = tempfile::tempdir().unwrap();
    let db = dbdir.path().join("audit.db");
    let (agent, log) = Agent::start_capturing(
        &w.root,
        &w.policy("", ""),
        &["--event-rate", "0", "--audit-db", db.to_str().unwrap()],
    );
    // What `sqlite3 audit.db` with `BEGIN EXCLUSIVE;` does.
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let analyst = thread::spawn(move || {
        let c = rusqlite::Connection::open(&db).unwrap();
        c.execute_batch("BEGIN EXCLUSIVE;").unwrap();
        locked_tx.send(()).unwrap();
        let _ = release_rx.recv();
        c.execute_batch("COMMIT;").unwrap();
    });
    locked_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the analyst's lock");
    let locked = Instant::now();
    // ~100 events a second for the whole lock.
    let storm = w.storm_bg(2500, 10_000);
    thread::sleep(Duration::from_secs(15));
    let mid = status(&agent);
    let so = output(&mid, "audit-store");
    eprintln!("locked for 15 s: {so}");
    assert!(so["pending"].as_u64().unwrap() > 0, "{so}");
    assert_eq!(dropped(so), 0, "{so}");
    thread::sleep(Duration::from_secs(30).saturating_sub(locked.elapsed()));
    release_tx.send(()).unwrap();
    analyst.join().unwrap();
    storm_done(storm, 2500);
    let st = settle(&agent, Duration::from_secs(30));
    let delivered = st["events"]["delivered"].as_u64().unwrap();
    let so = output(&st, "audit-store");
    eprintln!("after the lock: {so}");
    assert_eq!(delivered, 2500);
    assert_eq!(so["written"].as_u64(), Some(delivered), "{so}");
    assert_eq!(dropped(so), 0, "{so}");
    let db = dbdir.path().join("audit.db");
    let rows = audit_rows(&db, &["query", "--format", "json", "--limit", "100000"]);
    assert_eq!(rows.lines().count(), 2500);
    let warned = warnings(&log);
    assert!(
        warned
            .iter()
            .any(|l| l.contains("audit-store") && l.contains("locked"))
            && warned
                .iter()
                .any(|l| l.contains("audit-store: writing again")),
        "the lock and its end are each one warning: {warned:#?}"
    );
    // The lock, a summary every 10 s, its end (a slow VM holds the lock
    // for half a minute); the kernel's own degradations are not counted.
    let store = warned.iter().filter(|l| l.contains("audit-store")).count();
    assert!(store <= 6, "{warned:#?}");
}

/// `kill -9` in the middle of a storm, and a torn last line such as a
/// power loss leaves: after the restart every line is whole, and the
/// repair is in the agent's log and in the audit trail.
#[test]
fn a_torn_line_is_repaired_at_start() {
    if !privileged("torn_line") {
        return;
    }
    let w = world();
    let (mut agent, log) = Agent::start_capturing(
        &w.root,
        &w.policy("", ""),
        &["--event-rate", "0", "--ring-buffer-bytes", "16777216"],
    );
    let storm = w.storm_bg(20_000, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while fs::metadata(&agent.events).map_or(0, |m| m.len()) < 100_000 && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(5));
    }
    agent.kill9();
    let _ = storm.wait_with_output();
    // SIGKILL can stop a large write between two pages: the log may end in
    // a torn line already, which the repair cuts off together with ours.
    let bytes = fs::read(&agent.events).unwrap();
    let torn = bytes.len() - bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    // What a power loss in the middle of a write leaves.
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(&agent.events)
        .unwrap();
    f.write_all(b"{\"ts\":\"2026-12-05T00:").unwrap();
    drop(f);
    let from = log.len();
    agent.spawn_capturing(
        &["--event-rate", "0", "--ring-buffer-bytes", "16777216"],
        &log,
    );
    storm_done(w.storm_bg(100, 0), 100);
    settle(&agent, Duration::from_secs(20));
    let (events, _) = strict_lines(&agent.events);
    assert!(events.len() >= 100);
    let repaired = log.lines()[from..]
        .iter()
        .any(|l| l.contains("torn") && l.contains(&format!("cut off {} bytes", torn + 21)));
    assert!(
        repaired,
        "the repair is logged: {:#?}",
        &log.lines()[from..]
    );
    let db = agent.state_dir().join("audit.db");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let changes = audit_rows(&db, &["changes"]);
        if changes.contains("events-log-repaired") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the repair is in the audit trail:\n{changes}"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// A stdout nobody reads (a stuck journal, a paused container runtime)
/// fills its pipe and its queue: it drops what does not fit, counted, while
/// the events log gets every event at once and enforcement goes on; once
/// read again, its stream has a gap record and every line whole.
#[test]
fn a_stuck_stdout_stalls_nothing_else() {
    if !privileged("stuck_stdout") {
        return;
    }
    const STORM: u32 = 30_000;
    let w = world();
    let (mut agent, _log) = Agent::start_capturing_with_stdout(
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
    let stdout = agent.take_stdout().unwrap();
    storm_done(w.storm_bg(STORM, 0), STORM);
    // The log has every event, stdout still unread.
    let deadline = Instant::now() + Duration::from_secs(30);
    let stuck = loop {
        let st = status(&agent);
        let lo = output(&st, "events-log");
        if lo["written"].as_u64() == Some(u64::from(STORM)) || Instant::now() > deadline {
            break st;
        }
        thread::sleep(Duration::from_millis(200));
    };
    let delivered = stuck["events"]["delivered"].as_u64().unwrap();
    assert_eq!(delivered, u64::from(STORM), "{}", stuck["events"]);
    let lo = output(&stuck, "events-log");
    assert_eq!(lo["written"].as_u64(), Some(delivered), "{lo}");
    let so = output(&stuck, "stdout");
    eprintln!("stdout unread: {so}");
    assert!(so["dropped"]["queue_full"].as_u64().unwrap() > 0, "{so}");
    assert_eq!(
        so["written"].as_u64().unwrap() + so["pending"].as_u64().unwrap() + dropped(so),
        delivered,
        "{so}"
    );
    // Read again: what it held comes out, then its gap record.
    let reader = thread::spawn(move || {
        let mut lines = Vec::new();
        for l in BufReader::new(stdout).lines() {
            lines.push(l.unwrap());
        }
        lines
    });
    let st = settle(&agent, Duration::from_secs(30));
    let so = output(&st, "stdout");
    assert_eq!(so["pending"], 0, "{so}");
    assert_eq!(
        so["written"].as_u64().unwrap() + dropped(so),
        delivered,
        "{so}"
    );
    agent.kill9();
    let lines = reader.join().unwrap();
    let parsed: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let gaps: Vec<&Value> = parsed.iter().filter(|v| v["type"] == "gap").collect();
    assert_eq!(gaps.len(), 1, "{gaps:?}");
    assert_eq!(gaps[0]["output"], "stdout");
    // Everything it dropped came after what it held: the gap record is
    // where the hole is, last.
    assert_eq!(parsed.last().unwrap()["type"], "gap");
    assert_eq!(gaps[0]["cause"], "queue_full");
    assert_eq!(gaps[0]["count"].as_u64(), Some(dropped(so)));
    assert_eq!(
        (parsed.len() - 1) as u64,
        so["written"].as_u64().unwrap(),
        "stdout carried what it says it wrote"
    );
}

/// `bulkhead audit verify`, as an auditor runs it.
fn verify(key: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(bulkhead_bin())
        .args(["audit", "verify", "--key", key])
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => (true, text),
        Some(4) => (false, text),
        other => panic!("audit verify exited {other:?}: {text}"),
    }
}

fn head_arg(st: &Value, name: &str) -> String {
    let c = &output(st, name)["chain"];
    assert!(
        c.is_object(),
        "{name} reports its chain head: {}",
        output(st, name)
    );
    format!("{name}={}:{}", c["seq"], c["mac"].as_str().unwrap())
}

/// Nothing changed unseen: after `audit setup-keys` the agent seals the
/// events log and the audit store; `audit verify` checks them across a
/// restart and an external rotation against the heads `status` gave, and
/// names the first changed line, the cut tail and the changed row.
#[test]
fn a_sealed_trail_verifies_and_names_what_was_changed() {
    if !privileged("sealed_trail") {
        return;
    }
    let w = world();
    let (mut agent, log) =
        Agent::start_capturing(&w.root, &w.policy("", ""), &["--event-rate", "0"]);
    // Written before the trail was sealed.
    storm_done(w.storm_bg(20, 0), 20);
    settle(&agent, Duration::from_secs(20));
    let key = seal(&mut agent, &log, &["--event-rate", "0"]);
    let state = agent.state_dir();
    storm_done(w.storm_bg(40, 50_000), 40);
    // logrotate's create mode and its SIGHUP.
    let rotated = agent.events.with_extension("jsonl.1");
    fs::rename(&agent.events, &rotated).unwrap();
    agent.signal(libc::SIGHUP);
    storm_done(w.storm_bg(20, 50_000), 20);
    // A clean stop and start: both in the chain.
    agent.signal(libc::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(30)).is_some());
    agent.spawn_capturing(&["--event-rate", "0"], &log);
    storm_done(w.storm_bg(10, 0), 10);
    let st = settle(&agent, Duration::from_secs(30));
    let heads = [head_arg(&st, "events-log"), head_arg(&st, "audit-store")];
    let text_status = agent.cli(&["status"]);
    assert!(
        String::from_utf8_lossy(&text_status.stdout).contains(&format!("chain head {}", heads[0])),
        "status prints the head as --head takes it"
    );

    let db = state.join("audit.db");
    let (live, old) = (agent.events.to_str().unwrap(), rotated.to_str().unwrap());
    let all = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = ["--log", live, old, "--db", db.to_str().unwrap()]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for h in &heads {
            a.extend(["--head".to_string(), h.clone()]);
        }
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let args = all(&[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, text) = verify(&key, &args);
    println!("{text}");
    assert!(ok, "the trail verifies: {text}");
    assert!(text.contains("events-log: verified"), "{text}");
    assert!(text.contains("audit-store: verified"), "{text}");
    assert!(
        text.contains("unsealed records before the chain began"),
        "{text}"
    );

    // A changed line in the rotated file: named, with its seq.
    let lines: Vec<String> = fs::read_to_string(&rotated)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let at = lines
        .iter()
        .rposition(|l| l.contains("\"verdict\":\"deny\"") && l.contains("\"seal\""))
        .unwrap();
    let mut changed = lines.clone();
    changed[at] = changed[at].replacen("\"verdict\":\"deny\"", "\"verdict\":\"allow\"", 1);
    fs::write(&rotated, changed.join("\n") + "\n").unwrap();
    let (ok, text) = verify(&key, &args);
    assert!(!ok, "a changed line fails: {text}");
    assert!(
        text.contains(&format!("{old}:{}", at + 1)) && text.contains("changed"),
        "the changed line is named: {text}"
    );
    fs::write(&rotated, lines.join("\n") + "\n").unwrap();
    assert!(verify(&key, &args).0);

    // The audit store's tail cut off (the agent stopped): noticed
    // against the head that status gave.
    agent.signal(libc::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(30)).is_some());
    let head_seq: i64 = heads[1].split(['=', ':']).nth(1).unwrap().parse().unwrap();
    let c = rusqlite::Connection::open(&db).unwrap();
    for table in ["events", "changes"] {
        c.execute(
            &format!("DELETE FROM {table} WHERE seal_seq >= ?1"),
            [head_seq],
        )
        .unwrap();
    }
    let (ok, text) = verify(&key, &args);
    assert!(!ok, "a cut store fails: {text}");
    assert!(
        text.contains("audit-store: FAILED") && text.contains("tail was removed"),
        "{text}"
    );
}

/// `audit setup-keys` (two-second epochs: the writers mark each within a
/// fraction of that, even on a loaded CI machine) for `agent`, which is restarted
/// with `extra` to seal from then on; the verification key.
fn seal(agent: &mut Agent, log: &AgentLog, extra: &[&str]) -> String {
    let state = agent.state_dir();
    let out = Command::new(bulkhead_bin())
        .args(["audit", "setup-keys", "--epoch", "2s", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "setup-keys: {text}");
    let key = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("bh1-"))
        .unwrap_or_else(|| panic!("no verification key printed: {text}"))
        .to_string();
    let key_file = fs::read_to_string(state.join("audit-seal.key")).unwrap();
    assert!(
        !key_file.contains(&key[4..68]),
        "the node keeps no copy of the verification key"
    );
    // The agent seals from its next start.
    agent.signal(libc::SIGTERM);
    assert!(agent.wait_exit(Duration::from_secs(30)).is_some());
    agent.spawn_capturing(extra, log);
    key
}

/// The shipped `deploy/logrotate/bulkhead`, run by logrotate itself
/// (`create` mode, `delaycompress`, its postrotate SIGHUP pointed at this
/// agent) twice during a paced stream into a sealed log: every event is in
/// exactly one of the files, and `audit verify` checks the chain across
/// all of them (the compressed one unpacked).
#[test]
fn logrotate_with_the_shipped_config_loses_nothing_and_keeps_the_chain() {
    if !privileged("logrotate_shipped_config") {
        return;
    }
    if Command::new("logrotate").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "logrotate missing: `cargo xtask setup` installs it"
        );
        eprintln!("SKIP: no logrotate (cargo xtask setup installs it)");
        return;
    }
    let w = world();
    let extra = ["--event-rate", "0", "--events-log-max-bytes", "0"];
    let (mut agent, log) = Agent::start_capturing(&w.root, &w.policy("", ""), &extra);
    let key = seal(&mut agent, &log, &extra);
    // Built in: the suite also runs in a VM without the source tree.
    let shipped = include_str!("../../deploy/logrotate/bulkhead");
    let conf = agent.dir.path().join("logrotate.conf");
    let text = shipped
        .replace(
            "/var/log/bulkhead/events.jsonl",
            agent.events.to_str().unwrap(),
        )
        .replace(
            "systemctl reload bulkhead",
            &format!("kill -HUP {}", agent.pid()),
        );
    fs::write(&conf, text).unwrap();
    let state = agent.dir.path().join("logrotate.state");
    let logrotate = |args: &[&str]| {
        let out = Command::new("logrotate")
            .args(args)
            .arg("-s")
            .arg(&state)
            .arg(&conf)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success() && !err.contains("error"),
            "logrotate {args:?}: {err}"
        );
    };
    logrotate(&["-d"]);
    const N: u32 = 3000;
    let storm = w.storm_bg(N, 2000);
    thread::sleep(Duration::from_millis(1500));
    logrotate(&["-f"]);
    thread::sleep(Duration::from_millis(1500));
    logrotate(&["-f"]);
    storm_done(storm, N);
    settle(&agent, Duration::from_secs(30));
    let live = agent.events.clone();
    let one = live.with_extension("jsonl.1");
    let two_gz = live.with_extension("jsonl.2.gz");
    assert!(
        one.exists() && two_gz.exists(),
        "two rotations, the older compressed"
    );
    let unpacked = Command::new("gzip")
        .arg("-dk")
        .arg(&two_gz)
        .status()
        .unwrap();
    assert!(unpacked.success());
    let two = live.with_extension("jsonl.2");
    let mut events = 0;
    for f in [&two, &one, &live] {
        let (ev, gaps) = strict_lines(f);
        assert!(gaps.is_empty(), "{}: {gaps:?}", f.display());
        events += ev.iter().filter(|e| e["verdict"] == "deny").count();
    }
    assert_eq!(events, N as usize, "every event in exactly one file");
    let (ok, text) = verify(
        &key,
        &[
            "--log",
            live.to_str().unwrap(),
            one.to_str().unwrap(),
            two.to_str().unwrap(),
        ],
    );
    assert!(ok, "the chain holds across logrotate's files: {text}");
    assert!(text.contains("events-log: verified"), "{text}");
}

/// The world's policy with a bridge contractor → prod on `port` (tcp): a
/// connection the policy allows between two domain workloads.
fn bridged_policy(w: &tests::world::World, port: u16) -> String {
    w.policy(
        "",
        &format!(
            "bridges:\n  - name: ci\n    from: contractor\n    to: prod\n    ports: [tcp/{port}]\n    reason: \"T-24\"\n"
        ),
    )
}

/// `status --json`'s `audit_full`: (refusing, unwritable outputs).
fn audit_full(agent: &Agent) -> (bool, Vec<String>) {
    let st = status(agent);
    let a = &st["audit_full"];
    let unwritable = a["unwritable"]
        .as_array()
        .unwrap_or_else(|| panic!("status has audit_full: {st}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    (a["refusing"].as_bool().unwrap(), unwritable)
}

/// Waits (bounded) until `status` says `what`.
fn wait_audit_full(agent: &Agent, what: &str, done: impl Fn(&(bool, Vec<String>)) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10 + tests::slack_secs());
    loop {
        let now = audit_full(agent);
        if done(&now) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: still {now:?}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Decisions `status` counted for `reason`, every hook.
fn decided(agent: &Agent, reason: &str) -> u64 {
    status(agent)["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["reason"] == reason)
        .map(|d| d["count"].as_u64().unwrap())
        .sum()
}

/// The events log on a small disk that fills up (with `--audit-full` =
/// `stance`): what a contractor workload's new connections get while the
/// log cannot be written, over a bridge the policy allows, and to a
/// listener of its own domain on loopback; and what a workload in no
/// domain gets.
///
/// Dropped in field order: the servers leave their cgroups before the
/// world removes them.
struct FullDisk {
    _servers: [tests::Server; 2],
    agent: Agent,
    log: AgentLog,
    disk: Tmpfs,
    w: tests::world::World,
    bridged: String,
    own_loopback: String,
}

const BRIDGED_PORT: u16 = 7024;
const LOOPBACK_PORT: u16 = 7025;

impl FullDisk {
    fn start(stance: &str) -> FullDisk {
        let disk = Tmpfs::new("1m");
        let w = world();
        let secs = 60 + tests::slack_secs();
        let bridged = format!("{}:{BRIDGED_PORT}", w.link.v4(2));
        let own_loopback = format!("127.0.0.1:{LOOPBACK_PORT}");
        let servers = [
            tests::Server::start(&w.prod, Some(&w.link.b), "tcp", &bridged, secs),
            tests::Server::start(&w.contractor, Some(&w.link.a), "tcp", &own_loopback, secs),
        ];
        let (agent, log) = Agent::start_capturing_at(
            &w.root,
            &bridged_policy(&w, BRIDGED_PORT),
            &disk.path().join("events.jsonl"),
            &["--audit-full", stance],
        );
        FullDisk {
            _servers: servers,
            agent,
            log,
            disk,
            w,
            bridged,
            own_loopback,
        }
    }

    /// `probe connect tcp` from a workload in namespace A.
    fn connect(&self, cgroup: &tests::Cgroup, dst: &str) -> String {
        tests::probe(cgroup, Some(&self.w.link.a), &["connect", "tcp", dst])
    }

    fn bridged(&self) -> String {
        self.connect(&self.w.contractor, &self.bridged)
    }

    /// Fills the disk, then makes the events log write (a few hundred
    /// denied connects), and waits until `status` says it cannot.
    fn fill(&self) {
        self.disk.fill("filler");
        storm_done(self.w.storm_bg(300, 0), 300);
        wait_audit_full(&self.agent, "the events log fails", |(_, u)| {
            u.iter().any(|o| o == "events-log: disk_full")
        });
    }

    fn free(&self) {
        fs::remove_file(self.disk.path().join("filler")).unwrap();
    }

    /// [`FullDisk::fill`] on a disk still full.
    fn fill_again(&self) {
        storm_done(self.w.storm_bg(300, 0), 300);
        wait_audit_full(&self.agent, "the events log fails", |(_, u)| {
            u.iter().any(|o| o == "events-log: disk_full")
        });
    }
}

/// `--audit-full=refuse` (issue 24): while the events log cannot be
/// written, a domain workload's new connect fails at once with EPERM,
/// even one the policy allows; loopback to its own domain and workloads in
/// no domain are not refused. Once space returns, connects go through
/// again within a couple of seconds, and every refusal is in the log with
/// reason `audit-unavailable`.
#[test]
fn a_full_disk_refuses_new_connections_with_audit_full_refuse() {
    if !privileged("audit_full_refuse") {
        return;
    }
    let f = FullDisk::start("refuse");
    assert_eq!(f.bridged(), "ok", "the bridge allows it");
    assert_eq!(audit_full(&f.agent), (false, vec![]));
    let warned_before = warnings(&f.log).len();

    f.fill();
    wait_audit_full(&f.agent, "refusing", |(r, _)| *r);
    assert_eq!(
        f.bridged(),
        "EPERM",
        "refused at once while the trail cannot be written"
    );
    assert_eq!(f.bridged(), "EPERM");
    assert_eq!(
        f.connect(&f.w.contractor, &f.own_loopback),
        "ok",
        "loopback to its own domain is not refused"
    );
    assert_eq!(
        f.connect(&f.w.outside, &f.bridged),
        "ok",
        "a workload in no domain is never refused"
    );
    let refused = decided(&f.agent, "audit-unavailable");
    assert!(refused >= 2, "the kernel counts its refusals: {refused}");
    let text = f.agent.cli(&["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("audit full:  refuse: REFUSING") && text.contains("events-log: disk_full"),
        "{text}"
    );

    // Space returns: within the writer's retry (at most 2 s) and the
    // agent's hold (0.5 s), connects go through again.
    f.free();
    let freed = Instant::now();
    let mut last = String::new();
    while freed.elapsed() < Duration::from_secs(10 + tests::slack_secs()) {
        last = f.bridged();
        if last == "ok" {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let took = freed.elapsed();
    assert_eq!(last, "ok", "allowed again once the log can be written");
    eprintln!("connects allowed again {took:?} after space returned");
    assert!(
        took < Duration::from_secs(4 + tests::slack_secs()),
        "within a couple of seconds: {took:?}"
    );
    assert_eq!(audit_full(&f.agent), (false, vec![]));

    // Every refusal is in the trail (the log held them while it failed).
    let refused = decided(&f.agent, "audit-unavailable");
    let events = f.agent.wait_events(refused as usize, |e| {
        tests::field(e, "reason") == "audit-unavailable"
    });
    assert_eq!(events.len() as u64, refused, "{events:#?}");
    let e = &events[0];
    assert_eq!(
        (
            tests::field(e, "verdict"),
            tests::field(e, "hook"),
            tests::field(e, "src_domain"),
            tests::field(e, "dst"),
        ),
        ("deny", "connect4", "contractor", f.w.link.v4(2).as_str()),
        "{e}"
    );
    assert_eq!(e["dport"], BRIDGED_PORT, "{e}");
    let (_, gaps) = strict_lines(&f.agent.events);
    assert!(gaps.is_empty(), "nothing was dropped: {gaps:?}");

    // One line when refusing started, one when it stopped.
    let warned = warnings(&f.log)[warned_before..].to_vec();
    let said = |what: &str| warned.iter().filter(|l| l.contains(what)).count();
    assert_eq!(
        said("refusing new connections of domain workloads"),
        1,
        "{warned:#?}"
    );
    assert_eq!(said("allowed again"), 1, "{warned:#?}");
}

/// The default `--audit-full=keep`: the same connect goes through while
/// the events log cannot be written; nothing is refused for it.
#[test]
fn a_full_disk_refuses_nothing_by_default() {
    if !privileged("audit_full_keep") {
        return;
    }
    let f = FullDisk::start("keep");
    f.fill();
    assert_eq!(
        f.bridged(),
        "ok",
        "enforcement as usual while the trail cannot be written"
    );
    let (refusing, unwritable) = audit_full(&f.agent);
    assert!(!refusing && !unwritable.is_empty(), "{unwritable:?}");
    assert_eq!(decided(&f.agent, "audit-unavailable"), 0);
    f.free();
}

/// A refusal does not outlive its agent: a clean stop clears it at once
/// (the programs stay attached); a `kill -9` leaves it (fail closed: no
/// agent writes the trail either), and the next start clears it.
#[test]
fn a_refusal_ends_with_its_agent() {
    if !privileged("audit_full_stop") {
        return;
    }
    let mut f = FullDisk::start("refuse");
    f.fill();
    wait_audit_full(&f.agent, "refusing", |(r, _)| *r);
    assert_eq!(f.bridged(), "EPERM");
    f.agent.signal(libc::SIGTERM);
    f.agent
        .wait_exit(Duration::from_secs(10))
        .expect("SIGTERM ends the agent");
    assert_eq!(f.bridged(), "ok", "a clean stop clears the refusal");
    assert_eq!(
        f.connect(
            &f.w.contractor,
            &format!("{}:{}", f.w.link.v4(2), BRIDGED_PORT + 1)
        ),
        "EPERM",
        "the policy stays enforced"
    );

    let extra = ["--audit-full", "refuse"];
    f.agent.spawn_capturing(&extra, &f.log);
    f.fill_again();
    wait_audit_full(&f.agent, "refusing", |(r, _)| *r);
    f.agent.kill9();
    assert_eq!(f.bridged(), "EPERM", "a dead agent's refusal stays");
    f.free();
    f.agent.spawn_capturing(&extra, &f.log);
    assert_eq!(f.bridged(), "ok", "the next start clears it");
}
