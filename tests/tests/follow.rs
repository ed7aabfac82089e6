//! `bulkhead events --follow` that survives (issue 16): a follower started
//! before the agent waits for it, stays through `kill -9` restarts and
//! through a connection that breaks under a running agent, prints every
//! event once, and says how many events it could not see.

use std::{
    io::{BufRead as _, BufReader, Read},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use tests::{Agent, Cgroup, Netns, Value, bulkhead_bin, command_in, privileged, world::world};

/// How long nothing new must arrive before a wait returns (as
/// [`Agent::wait_events`]).
const SETTLE: Duration = Duration::from_millis(300);

/// Lines a child wrote, collected by a thread as they come.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    fn collect(from: impl Read + Send + 'static, echo: &'static str) -> Lines {
        let lines = Lines::default();
        let sink = lines.clone();
        thread::spawn(move || {
            for line in BufReader::new(from).lines().map_while(Result::ok) {
                eprintln!("[{echo}] {line}");
                sink.0.lock().unwrap().push(line);
            }
        });
        lines
    }

    fn get(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// Waits (at most `secs`) until `pred` holds for the lines so far,
    /// then until no line arrives for [`SETTLE`] (so a count asserted on
    /// what it returns also sees a late extra line); returns the lines.
    fn wait(&self, secs: u64, what: &str, pred: impl Fn(&[String]) -> bool) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut stable: Option<(usize, Instant)> = None;
        loop {
            let lines = self.get();
            if pred(&lines) {
                match stable {
                    Some((n, since)) if n == lines.len() => {
                        if since.elapsed() >= SETTLE {
                            return lines;
                        }
                    }
                    _ => stable = Some((lines.len(), Instant::now())),
                }
            } else {
                stable = None;
            }
            assert!(
                Instant::now() < deadline + SETTLE * 2,
                "waited {secs} s for {what}; got:\n{}",
                lines.join("\n")
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn count(&self, needle: &str) -> usize {
        self.get().iter().filter(|l| l.contains(needle)).count()
    }
}

/// `bulkhead events --follow ARGS`, killed on drop.
struct Follower {
    child: Child,
    out: Lines,
    err: Lines,
}

impl Follower {
    fn start(args: &[&str]) -> Follower {
        let mut child = Command::new(bulkhead_bin())
            .args(["events", "--follow"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn bulkhead events --follow");
        let out = Lines::collect(child.stdout.take().unwrap(), "follower");
        let err = Lines::collect(child.stderr.take().unwrap(), "follower stderr");
        Follower { child, out, err }
    }

    /// Everything printed so far, parsed: events and loss notes.
    fn printed(&self) -> Vec<Value> {
        self.out
            .get()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    /// Waits until `n` events to `port` were printed (as JSON or as rows
    /// of the table).
    fn wait_port(&self, port: u16, n: usize, secs: u64) {
        let row = format!(":{port} ");
        self.out
            .wait(secs, &format!("{n} events to port {port}"), |lines| {
                lines
                    .iter()
                    .filter(|l| {
                        serde_json::from_str::<Value>(l).is_ok_and(|v| v["dport"] == port)
                            || l.contains(" -> ") && l.contains(&row)
                    })
                    .count()
                    >= n
            });
    }

    /// Asserts the follower is still streaming (it must never give up).
    fn running(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "the follower exited; stderr:\n{}",
            self.err.get().join("\n")
        );
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `n` UDP connects from `cgroup` (in namespace `ns`) to `to`, on CPU 0
/// when `cpu0`; each is denied and asks for an event.
fn denials(cgroup: &Cgroup, ns: &Netns, to: &str, n: u32, cpu0: bool) {
    let probe = tests::probe_bin();
    let count = n.to_string();
    let mut args = vec![probe.to_str().unwrap(), "storm", to, &count];
    let program = if cpu0 {
        args.insert(0, "0");
        args.insert(0, "-c");
        "taskset"
    } else {
        args.remove(0)
    };
    let out = command_in(cgroup, Some(ns), program, &args)
        .output()
        .expect("run probe storm");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("eperm {n} other 0"),
        "every connect to {to} is denied; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Events printed (loss notes left out), with their destination port.
fn events(printed: &[Value]) -> Vec<&Value> {
    printed.iter().filter(|v| v.get("type").is_none()).collect()
}

fn port_count(printed: &[Value], port: u16) -> usize {
    events(printed)
        .iter()
        .filter(|v| v["dport"] == port)
        .count()
}

/// Asserts no event was printed twice: `(cpu, seq)` is unique to a
/// decision for the life of the pinned maps, which this test never ends.
fn assert_no_repeats(printed: &[Value]) {
    let mut keys: Vec<(u64, u64)> = events(printed)
        .iter()
        .map(|v| (v["cpu"].as_u64().unwrap(), v["seq"].as_u64().unwrap()))
        .collect();
    let n = keys.len();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys.len(), n, "an event was printed twice: {printed:#?}");
}

fn status(agent: &Agent, run_dir: &Path) -> Value {
    let out = agent.cli(&["status", "--json", "--run-dir", run_dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_follower_started_first_streams_across_two_kill9_restarts_once_and_counts_the_gap() {
    if !privileged("follow_across_restarts") {
        return;
    }
    let w = world();
    let to = |port: u16| format!("{}:{port}", w.link.v4(2));
    // A control socket path known before any agent runs, so the follower
    // can start first. A small event budget per cgroup (5 at once, 1 a
    // second) lets one phase be rate limited; every other phase stays
    // within its own cgroup's budget.
    let run = tempfile::tempdir().unwrap();
    let run_dir = run.path().to_str().unwrap().to_string();
    let args = [
        "--run-dir",
        &run_dir,
        "--event-rate",
        "1",
        "--event-burst",
        "5",
    ];
    // One cgroup per phase, each with its own event budget.
    let [a, b, c, burst, d, e] = ["a", "b", "c", "burst", "d", "e"].map(|n| w.contractor.child(n));

    let mut f = Follower::start(&["--json", "--run-dir", &run_dir]);
    // A security engineer's view: denials only, as a table.
    let mut denies = Follower::start(&["--verdict", "deny", "--run-dir", &run_dir]);
    for f in [&f, &denies] {
        f.err.wait(5, "the waiting notice", |l| {
            l.iter().any(|l| l.contains("waiting for the agent"))
        });
    }
    thread::sleep(Duration::from_millis(300));
    f.running();
    denies.running();

    // `audit: all`: the contractor's allowed connections are events too.
    let policy = w.policy("    audit: all\n", "");
    let mut agent = Agent::start_with(&w.root, &policy, &args);
    // Both followers are on before anything happens: an agent that lives
    // less than a follower's retry interval (1 s) could pass unseen.
    for f in [&f, &denies] {
        f.err.wait(10, "the connection", |l| {
            l.iter().any(|l| l.contains("connected to the agent"))
        });
    }
    // Before the restarts.
    denials(&a, &w.link.a, &to(7001), 3, false);
    for f in [&f, &denies] {
        f.wait_port(7001, 3, 10);
    }

    // Killed: the follower waits; denials go on, queued in the pinned ring.
    agent.kill9();
    f.err.wait(5, "the first outage notice", |l| {
        l.iter().filter(|l| l.contains("went away")).count() == 1
    });
    denials(&b, &w.link.a, &to(7002), 3, false);
    let t = Instant::now();
    agent.spawn(&args);
    let ready = t.elapsed();
    for f in [&f, &denies] {
        f.wait_port(7002, 3, 10);
    }
    let caught_up = t.elapsed();
    f.running();

    // Between the restarts.
    denials(&c, &w.link.a, &to(7003), 3, false);
    let own = format!("{}:7007", w.link.v4(1));
    assert_eq!(
        tests::probe(&c, Some(&w.link.a), &["connect", "udp", &own]),
        "ok"
    );
    f.wait_port(7007, 1, 10);
    for f in [&f, &denies] {
        f.wait_port(7003, 3, 10);
    }

    // Killed again. While no agent runs, a burst from one cgroup goes over
    // its budget: the kernel rate-limits most of it. Then three more
    // denials on the same CPU, so the gap in its sequence shows.
    agent.kill9();
    let killed = Instant::now();
    f.err.wait(5, "the second outage notice", |l| {
        l.iter().filter(|l| l.contains("went away")).count() == 2
    });
    let noticed = killed.elapsed();
    denials(&burst, &w.link.a, &to(7005), 30, true);
    denials(&d, &w.link.a, &to(7004), 3, true);
    let t = Instant::now();
    agent.spawn(&args);
    let ready2 = t.elapsed();
    for f in [&f, &denies] {
        f.wait_port(7004, 3, 10);
    }
    let caught_up2 = t.elapsed();

    // After the restarts.
    denials(&e, &w.link.a, &to(7006), 3, false);
    for f in [&f, &denies] {
        f.wait_port(7006, 3, 10);
    }
    f.running();
    eprintln!(
        "restart 1: agent ready in {ready:?}, the follower printed what the kernel queued meanwhile after {caught_up:?}; \
         restart 2: the follower noticed the kill after {noticed:?}, agent ready in {ready2:?}, caught up after {caught_up2:?}"
    );

    let printed = f.printed();
    for port in [7001, 7002, 7003, 7004, 7006] {
        assert_eq!(port_count(&printed, port), 3, "port {port}: {printed:#?}");
    }
    let allowed = events(&printed);
    let allowed: Vec<_> = allowed.iter().filter(|v| v["dport"] == 7007).collect();
    assert!(
        allowed.len() == 1 && allowed[0]["verdict"] == "allow",
        "{allowed:#?}"
    );
    assert_no_repeats(&printed);
    // The burst: what the kernel let through, and a loss note for the rest.
    let through = port_count(&printed, 7005);
    assert!(
        (1..30).contains(&through),
        "burst events printed: {through}"
    );
    let notes: Vec<&Value> = printed.iter().filter(|v| v["type"] == "lost").collect();
    let missed: u64 = notes.iter().map(|n| n["count"].as_u64().unwrap()).sum();
    assert_eq!(
        missed,
        30 - through as u64,
        "the follower reports every burst event it could not see: {notes:#?}"
    );
    assert!(
        notes
            .iter()
            .all(|n| n["cpu"] == 0 && n["why"].as_str().unwrap().contains("rate limited")),
        "{notes:#?}"
    );
    // Where the note sits: right before the first event after the gap.
    let at = printed.iter().position(|v| v["type"] == "lost").unwrap();
    assert_eq!(
        printed[at + 1]["seq"].as_u64().unwrap(),
        notes[0]["last_seq"].as_u64().unwrap() + 1
    );
    // The agent's own count says the same.
    let st = status(&agent, run.path());
    assert_eq!(
        st["events"]["rate_limited"].as_u64().unwrap()
            + st["events"]["lost_ring_full"].as_u64().unwrap(),
        missed,
        "{}",
        st["events"]
    );

    // Said once per outage, on stderr only.
    assert_eq!(f.err.count("waiting for the agent"), 1);
    assert_eq!(f.err.count("connected to the agent"), 3);
    assert_eq!(f.err.count("reconnected to the agent"), 2);
    assert_eq!(f.err.count("went away"), 2);
    assert!(f.out.get().iter().all(|l| !l.contains("bulkhead:")));

    // The table of denials: the same events, the same loss, said once.
    denies.running();
    let last = format!(" -> {}:7006 ", w.link.v4(2));
    let table = denies.out.wait(10, "the table's last phase", |l| {
        l.iter().filter(|l| l.contains(&last)).count() == 3
    });
    for (port, n) in [
        (7001, 3),
        (7002, 3),
        (7003, 3),
        (7005, through),
        (7004, 3),
        (7006, 3),
    ] {
        let needle = format!(" -> {}:{port} ", w.link.v4(2));
        assert_eq!(
            table.iter().filter(|l| l.contains(&needle)).count(),
            n,
            "port {port}:\n{}",
            table.join("\n")
        );
    }
    assert!(
        !table.iter().any(|l| l.contains(":7007 ")),
        "the table shows denials only:\n{}",
        table.join("\n")
    );
    let lost: Vec<&String> = table.iter().filter(|l| l.starts_with("-- ")).collect();
    assert_eq!(lost.len(), 1, "{}", table.join("\n"));
    assert!(
        lost[0].starts_with(&format!("-- {missed} events lost: cpu 0, seq "))
            && lost[0].contains("some may not match the filter"),
        "{}",
        lost[0]
    );
    assert_eq!(denies.err.count("waiting for the agent"), 1);
    assert_eq!(denies.err.count("went away"), 2);
}

/// A Unix socket proxy in front of an agent's control socket, which the
/// test can cut while the agent keeps running.
struct Proxy {
    dir: tempfile::TempDir,
    conns: Arc<Mutex<Vec<UnixStream>>>,
}

impl Proxy {
    fn start(upstream: PathBuf) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join("control.sock")).unwrap();
        let conns: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
        let kept = conns.clone();
        thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let Ok(agent) = UnixStream::connect(&upstream) else {
                    continue;
                };
                let mut kept = kept.lock().unwrap();
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), agent.try_clone().unwrap()),
                    (agent.try_clone().unwrap(), client.try_clone().unwrap()),
                ] {
                    thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
                kept.extend([client, agent]);
            }
        });
        Proxy { dir, conns }
    }

    /// Breaks every connection through the proxy.
    fn cut(&self) {
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[test]
fn a_follower_cut_off_from_a_running_agent_resumes_since_without_repeats() {
    if !privileged("follow_resumes_since") {
        return;
    }
    let w = world();
    let to = |port: u16| format!("{}:{port}", w.link.v4(2));
    let agent = Agent::start(&w.root, &w.policy("", ""));
    let proxy = Proxy::start(agent.run_dir().join("control.sock"));
    let mut f = Follower::start(&[
        "--json",
        "--since",
        "1h",
        "--run-dir",
        proxy.dir.path().to_str().unwrap(),
    ]);
    // Denials the agent still holds when the follower reconnects: some
    // older than the follower's overlap, some within it.
    denials(&w.contractor, &w.link.a, &to(7101), 3, false);
    f.wait_port(7101, 3, 10);
    thread::sleep(Duration::from_millis(2500));
    denials(&w.contractor, &w.link.a, &to(7102), 3, false);
    f.wait_port(7102, 3, 10);

    let cut = Instant::now();
    proxy.cut();
    f.err.wait(5, "the reconnection", |l| {
        l.iter().any(|l| l.contains("reconnected to the agent"))
    });
    let back = cut.elapsed();
    denials(&w.contractor, &w.link.a, &to(7103), 3, false);
    f.wait_port(7103, 3, 10);
    // Room for anything sent again to arrive.
    thread::sleep(Duration::from_millis(500));
    f.running();
    eprintln!("reconnected {back:?} after the connection broke");

    let printed = f.printed();
    for port in [7101, 7102, 7103] {
        assert_eq!(port_count(&printed, port), 3, "port {port}: {printed:#?}");
    }
    assert_no_repeats(&printed);
    assert!(
        printed.iter().all(|v| v.get("type").is_none()),
        "nothing was lost, so no loss note: {printed:#?}"
    );
    assert_eq!(f.err.count("went away"), 1);
    assert_eq!(f.err.count("reconnected to the agent"), 1);
}
