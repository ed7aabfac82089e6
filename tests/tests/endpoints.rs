//! Endpoints no client can stall (issue 25): the metrics port and the
//! control socket keep answering while others hold connections to them, and
//! every control request that cannot be read gets a JSON error.
//!
//! The tests in this file run one at a time ([`serial`]): each holds
//! thousands of sockets and times answers, which tests running beside it
//! would disturb.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::unix::net::UnixStream,
    path::PathBuf,
    process::{Command, Output, Stdio},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use tests::{Agent, Value, bulkhead_bin, privileged, world::world};

/// What the kubelet allows a probe in the shipped DaemonSet.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// The bound on every `/healthz` answer while the port is loaded.
const HEALTHZ_BOUND: Duration = Duration::from_millis(100);
const PROBES: usize = 20;
/// Connections held: half idle, half with a half-sent request.
const HELD: usize = 2_000;
/// The agent closes a connection that sent no request headers within 5 s
/// (`metrics::HEADER_TIMEOUT`) and a control client that sent no request
/// line within 10 s (`control::REQUEST_TIMEOUT`).
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The bound on every `status` while clients hold the control socket.
const CONTROL_BOUND: Duration = Duration::from_secs(1);

fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sets this process's soft limit on open files (`None`: the hard limit).
/// Children (the agent) inherit the soft limit in force when they start.
fn set_nofile(soft: Option<u64>) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a struct of the right type.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = soft.unwrap_or(lim.rlim_max).min(lim.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    let want = (HELD + 200) as u64;
    assert!(
        soft.is_some() || lim.rlim_cur >= want,
        "these tests hold {want} sockets; RLIMIT_NOFILE's hard limit is {}",
        lim.rlim_max
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `GET` on a fresh connection: status code and body, or why not, and
/// how long it took from `connect()` to the end of the response.
fn get(addr: SocketAddr, path: &str) -> (Result<(u16, String), String>, Duration) {
    let started = Instant::now();
    let result = (|| {
        let mut s = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)
            .map_err(|e| format!("connect: {e}"))?;
        let left = PROBE_TIMEOUT.saturating_sub(started.elapsed());
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: probe\r\nUser-Agent: kube-probe/1.33\r\nConnection: close\r\n\r\n"
        )
        .map_err(|e| format!("write: {e}"))?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)
            .map_err(|e| format!("read ({} bytes so far): {e}", raw.len()))?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("no HTTP response: {text:?}"))?;
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("no status in {head:?}"))?;
        Ok((code, body.to_string()))
    })();
    (result, started.elapsed())
}

/// Connections held against the metrics port, alternately one that sends
/// nothing and one that sends the start of a request and never its end.
/// Stops trying once five connections in a row are not accepted within 1 s,
/// or after 10 s.
struct Held {
    conns: Vec<TcpStream>,
    refused: usize,
    took: Duration,
}

fn hold(addr: SocketAddr, n: usize) -> Held {
    let started = Instant::now();
    let mut conns = Vec::with_capacity(n);
    let (mut refused, mut in_a_row) = (0, 0);
    for i in 0..n {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(mut s) => {
                in_a_row = 0;
                if i % 2 == 1 {
                    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost:");
                }
                conns.push(s);
            }
            Err(_) => {
                refused += 1;
                in_a_row += 1;
            }
        }
        if in_a_row == 5 || started.elapsed() > Duration::from_secs(10) {
            refused += n - i - 1;
            break;
        }
    }
    Held {
        conns,
        refused,
        took: started.elapsed(),
    }
}

/// Runs `cmd`, killed after `within`.
fn run_within(cmd: &mut Command, within: Duration) -> Result<(Output, Duration), String> {
    let started = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    loop {
        if child.try_wait().unwrap().is_some() {
            return Ok((child.wait_with_output().unwrap(), started.elapsed()));
        }
        if started.elapsed() > within {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("no answer within {within:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `bulkhead status --json` answers (within 10 s); how long it took.
fn status_works(agent: &Agent) -> Result<Duration, String> {
    let (out, took) = run_within(
        Command::new(bulkhead_bin())
            .args(["status", "--json", "--bpffs-dir"])
            .arg(&agent.bpffs),
        Duration::from_secs(10),
    )?;
    let st: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "status: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if st["generation"] != 1 {
        return Err(format!("status: {st}"));
    }
    Ok(took)
}

/// Probes `/healthz` [`PROBES`] times, 50 ms apart: every latency, and the
/// failures.
fn probe_healthz(addr: SocketAddr) -> (Vec<Duration>, Vec<String>) {
    let (mut times, mut failures) = (Vec::new(), Vec::new());
    for i in 0..PROBES {
        let (r, took) = get(addr, "/healthz");
        times.push(took);
        match r {
            Ok((200, body)) if body == "ok\n" => {}
            Ok((code, body)) => failures.push(format!("probe {i}: {code} {body:?}")),
            Err(e) => failures.push(format!("probe {i} after {took:?}: {e}")),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (times, failures)
}

fn distribution(times: &[Duration]) -> String {
    let mut t = times.to_vec();
    t.sort();
    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
    let each: Vec<String> = times
        .iter()
        .map(|d| format!("{:.1}", d.as_secs_f64() * 1e3))
        .collect();
    format!(
        "min {}, median {}, p90 {}, max {} ({} probes, in order: {} ms)",
        ms(t[0]),
        ms(t[t.len() / 2]),
        ms(t[t.len() * 9 / 10]),
        ms(t[t.len() - 1]),
        t.len(),
        each.join(" ")
    )
}

/// The metrics port under 1,000 idle connections and 1,000 half-sent
/// requests ([`hold`]): `/healthz` answers every probe within
/// [`HEALTHZ_BOUND`], `/metrics` and `/readyz` answer, and `status` works.
/// Returns the connections still held.
fn metrics_port_under_load(agent: &Agent, addr: SocketAddr) -> Held {
    let (baseline, failures) = probe_healthz(addr);
    assert!(failures.is_empty(), "unloaded: {failures:?}");
    eprintln!("/healthz, nothing held: {}", distribution(&baseline));

    let held = hold(addr, HELD);
    eprintln!(
        "held {} connections to the metrics port ({} not accepted) in {:?}",
        held.conns.len(),
        held.refused,
        held.took
    );
    // The first answer waits for the agent to take in the burst of
    // connections queued before it (FIFO), tens of ms: it must come within
    // the kubelet's timeout. The held connections then cost nothing.
    let (first, first_took) = get(addr, "/healthz");
    eprintln!("/healthz right after the burst: {first_took:?} {first:?}");
    let (times, failures) = probe_healthz(addr);
    let dist = distribution(&times);
    eprintln!("/healthz, 1,000 idle + 1,000 half-sent held: {dist}");
    let (metrics, metrics_took) = get(addr, "/metrics");
    let (readyz, _) = get(addr, "/readyz");
    let status = status_works(agent);
    eprintln!("/metrics took {metrics_took:?}; status: {status:?}");

    assert_eq!(
        held.refused,
        0,
        "the metrics port stopped accepting connections after {}",
        held.conns.len()
    );
    assert_eq!(
        first.map(|(code, _)| code),
        Ok(200),
        "/healthz right after the burst, after {first_took:?}"
    );
    assert!(
        failures.is_empty(),
        "/healthz failed: {failures:?} ({dist})"
    );
    let slow: Vec<_> = times.iter().filter(|t| **t > HEALTHZ_BOUND).collect();
    assert!(
        slow.is_empty(),
        "/healthz slower than {HEALTHZ_BOUND:?}: {slow:?} ({dist})"
    );
    let (code, body) = metrics.expect("/metrics under load");
    assert_eq!(code, 200);
    assert!(
        body.lines().any(|l| l == "bulkhead_policy_generation 1"),
        "{body}"
    );
    assert_eq!(readyz.expect("/readyz under load").0, 200);
    status.expect("status under load");
    held
}

/// The agent inherits this process's limit on open files, raised to the
/// hard limit: every connection held is served at once.
#[test]
fn metrics_port_answers_probes_under_1000_idle_and_1000_half_sent_connections() {
    if !privileged("metrics_port_under_idle_and_half_sent") {
        return;
    }
    let _serial = serial();
    set_nofile(None);
    let w = world();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let agent = Agent::start_with(
        &w.root,
        &w.policy("", ""),
        &["--metrics-addr", &addr.to_string(), "--no-audit-db"],
    );
    let held = metrics_port_under_load(&agent, addr);

    // Then the agent closes them: none sent its request headers in time.
    let deadline = Instant::now() + HEADER_TIMEOUT + Duration::from_secs(5);
    let mut open = Vec::new();
    for (i, mut s) in held.conns.into_iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let mut answer = Vec::new();
        // EOF (perhaps after a 408 response), or a reset: closed either way.
        if let Err(e) = s.read_to_end(&mut answer)
            && matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            )
        {
            open.push(i);
        }
    }
    assert!(
        open.is_empty(),
        "{} connections still open {:?} after the header timeout (odd: half-sent): {:?}",
        open.len(),
        HEADER_TIMEOUT + Duration::from_secs(5),
        &open[..open.len().min(10)]
    );
    let (times, failures) = probe_healthz(addr);
    assert!(failures.is_empty(), "{failures:?}");
    eprintln!("/healthz after they closed: {}", distribution(&times));
}

/// The agent runs with systemd's default limit on open files (1024), so
/// its metrics port serves at most 256 connections at once: a new one
/// takes the place of the one quiet longest, and the probes are answered.
#[test]
fn metrics_port_answers_probes_at_its_connection_bound() {
    if !privileged("metrics_port_at_its_connection_bound") {
        return;
    }
    let _serial = serial();
    let w = world();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    set_nofile(Some(1024));
    let agent = Agent::start_with(
        &w.root,
        &w.policy("", ""),
        &["--metrics-addr", &addr.to_string(), "--no-audit-db"],
    );
    set_nofile(None);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", agent.pid())).unwrap();
    let soft = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap();
    assert_eq!(soft, "1024", "{limits}");

    let held = metrics_port_under_load(&agent, addr);
    // The agent's descriptors stay far from its limit.
    let fds = std::fs::read_dir(format!("/proc/{}/fd", agent.pid()))
        .unwrap()
        .count();
    eprintln!(
        "agent holds {fds} file descriptors with {} connections held against it",
        held.conns.len()
    );
    assert!(fds < 700, "{fds} open files of 1024");
}

fn control_socket(agent: &Agent) -> PathBuf {
    agent.run_dir().join("control.sock")
}

/// Sends `bytes` (then, with `end`, closes the sending side) and reads the
/// one-line answer, within `within`.
fn control_answer(
    agent: &Agent,
    bytes: &[u8],
    end: bool,
    within: Duration,
) -> Result<Value, String> {
    let mut s = UnixStream::connect(control_socket(agent)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(within)).unwrap();
    s.write_all(bytes).map_err(|e| format!("write: {e}"))?;
    if end {
        s.shutdown(Shutdown::Write).unwrap();
    }
    only_answer(s)
}

fn read_answer(s: UnixStream) -> Result<Value, String> {
    let mut line = String::new();
    match BufReader::new(s).read_line(&mut line) {
        Ok(0) => Err("closed without an answer".into()),
        Ok(_) => serde_json::from_str(&line).map_err(|e| format!("not JSON ({e}): {line:?}")),
        Err(e) => Err(format!("no answer: {e}")),
    }
}

/// Like [`read_answer`], and the answer is the only line: after it the
/// agent closes the connection or sends nothing more (within 300 ms).
fn only_answer(s: UnixStream) -> Result<Value, String> {
    let mut r = BufReader::new(s);
    let mut line = String::new();
    let answer = match r.read_line(&mut line) {
        Ok(0) => return Err("closed without an answer".into()),
        Ok(_) => serde_json::from_str(&line).map_err(|e| format!("not JSON ({e}): {line:?}"))?,
        Err(e) => return Err(format!("no answer: {e}")),
    };
    r.get_ref()
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut rest = Vec::new();
    let _ = r.read_to_end(&mut rest);
    if rest.is_empty() {
        Ok(answer)
    } else {
        Err(format!(
            "more than one line: {line:?} then {:?}",
            String::from_utf8_lossy(&rest)
        ))
    }
}

/// `{"ok":false,"error":...}` whose error contains `what`: the error, or
/// what is wrong with the answer.
fn refused(case: &str, answer: Result<Value, String>, what: &str) -> Result<String, String> {
    let v = answer.map_err(|e| format!("{case}: {e}"))?;
    let error = v["error"].as_str().unwrap_or_default();
    if v["ok"] != false || !error.contains(what) {
        return Err(format!(
            "{case}: expected an error saying {what:?}, got {v}"
        ));
    }
    Ok(error.to_string())
}

/// Checks that are all made before the test fails, so one run shows how
/// every case fares.
#[derive(Default)]
struct Checks(Vec<String>);

impl Checks {
    fn refused(&mut self, case: &str, answer: Result<Value, String>, what: &str) {
        match refused(case, answer, what) {
            Ok(error) => eprintln!("{case}: {error}"),
            Err(problem) => {
                eprintln!("FAILED {problem}");
                self.0.push(problem);
            }
        }
    }

    fn check(&mut self, ok: bool, problem: String) {
        if !ok {
            eprintln!("FAILED {problem}");
            self.0.push(problem);
        }
    }
}

impl Drop for Checks {
    fn drop(&mut self) {
        if !self.0.is_empty() && !std::thread::panicking() {
            panic!("{} checks failed:\n{}", self.0.len(), self.0.join("\n"));
        }
    }
}

/// Bytes that are no request: every byte value, invalid UTF-8 included.
fn garbage(n: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            match (x >> 32) as u8 {
                b'\n' => 0xff,
                b => b,
            }
        })
        .collect()
}

/// 1,000 idle clients and 1,000 that sent half a request (`{"cmd":"sta`,
/// no newline) on the control socket: `status` answers within
/// [`CONTROL_BOUND`] each time and a new client's `status` works; then each
/// idle client is told it sent no request, and each half-sent one that its
/// request is incomplete.
#[test]
fn control_socket_answers_under_1000_idle_and_1000_half_sent_clients() {
    if !privileged("control_socket_under_idle_and_half_sent_clients") {
        return;
    }
    let _serial = serial();
    set_nofile(None);
    let w = world();
    let agent = Agent::start_with(&w.root, &w.policy("", ""), &["--no-audit-db"]);
    let before = status_works(&agent).expect("status");
    let started = Instant::now();
    let held: Vec<UnixStream> = (0..HELD)
        .map(|i| {
            let mut s = UnixStream::connect(control_socket(&agent))
                .unwrap_or_else(|e| panic!("client {i}: {e}"));
            if i % 2 == 1 {
                s.write_all(b"{\"cmd\":\"sta")
                    .unwrap_or_else(|e| panic!("half-sent client {i}: {e}"));
            }
            s
        })
        .collect();
    eprintln!(
        "1,000 idle and 1,000 half-sent clients connected in {:?}",
        started.elapsed()
    );
    let mut under = Vec::new();
    for _ in 0..5 {
        under.push(status_works(&agent).expect("status with 2,000 clients held"));
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("status: {before:?} alone; with 2,000 clients held {under:?}");
    assert!(
        under.iter().all(|t| *t < CONTROL_BOUND),
        "status slower than {CONTROL_BOUND:?}: {under:?}"
    );
    // A new client with a whole request, raw: answered at once.
    let answer = control_answer(&agent, b"{\"cmd\":\"status\"}\n", false, CONTROL_BOUND)
        .expect("a new client's status");
    assert_eq!(answer["generation"], 1, "a status answer: {answer}");

    // Each held client gets its error once its time is up, and is closed.
    let deadline = started + REQUEST_TIMEOUT + Duration::from_secs(10);
    for (i, s) in held.into_iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let (kind, what) = if i % 2 == 0 {
            ("idle", "no request within 10 s")
        } else {
            (
                "half-sent",
                "incomplete request: 11 bytes and no newline within 10 s",
            )
        };
        let error = refused(&format!("{kind} client {i}"), read_answer(s), what)
            .unwrap_or_else(|e| panic!("{e}"));
        if i < 2 {
            eprintln!("each {kind} client, after {:?}: {error}", started.elapsed());
        }
    }
    status_works(&agent).expect("status afterwards");
}

/// Whatever a control request holds, one JSON error line (and nothing
/// more) says what is wrong with it: binary garbage (with a newline, or ended), invalid UTF-8 inside
/// JSON, a line longer than the limit that is still being sent, a request
/// cut short by the end of input, and a partial line the client never
/// finishes.
#[test]
fn control_socket_answers_every_unreadable_request_with_a_json_error() {
    if !privileged("control_socket_unreadable_requests") {
        return;
    }
    let _serial = serial();
    let w = world();
    let agent = Agent::start_with(&w.root, &w.policy("", ""), &["--no-audit-db"]);
    let quick = Duration::from_secs(5);

    // Never finished: started first, answered after the request timeout.
    let mut partial = UnixStream::connect(control_socket(&agent)).unwrap();
    partial.write_all(b"{\"cmd\":\"sta").unwrap();
    let partial_started = Instant::now();

    let mut checks = Checks::default();
    let mut line = garbage(4096);
    line.push(b'\n');
    checks.refused(
        "binary garbage and a newline",
        control_answer(&agent, &line, false, quick),
        "bad request: not UTF-8",
    );
    checks.refused(
        "binary garbage, then the end",
        control_answer(&agent, &garbage(100_000), true, quick),
        "bad request",
    );
    checks.refused(
        "an ELF header",
        control_answer(&agent, b"\x7fELF\x02\x01\x01\x00\n", false, quick),
        "bad request",
    );
    checks.refused(
        "invalid UTF-8 inside a JSON string",
        control_answer(&agent, b"{\"cmd\":\"\xff\xfe\"}\n", false, quick),
        "not UTF-8",
    );
    checks.refused(
        "truncated, then the end",
        control_answer(&agent, b"{\"cmd\":\"stat", true, quick),
        "with no newline",
    );
    checks.refused(
        "nothing, then the end",
        control_answer(&agent, b"", true, quick),
        "empty request",
    );

    // A line that never ends: refused once it passes the limit, while the
    // client is still sending it.
    let s = UnixStream::connect(control_socket(&agent)).unwrap();
    s.set_read_timeout(Some(quick)).unwrap();
    let mut w2 = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'['; 1 << 16];
        let mut sent = 0usize;
        // 64 MiB, no newline; stops when the agent closes.
        while sent < 64 << 20 {
            match w2.write(&chunk) {
                Ok(n) => sent += n,
                Err(_) => break,
            }
        }
        sent
    });
    let started = Instant::now();
    checks.refused(
        "an endless line",
        only_answer(s),
        "request longer than 1048576 bytes",
    );
    let sent = writer.join().unwrap();
    eprintln!(
        "endless line: answered after {:?}, {sent} bytes sent",
        started.elapsed()
    );
    checks.check(
        sent < 64 << 20,
        format!("the agent read all {sent} bytes of the endless line"),
    );

    partial
        .set_read_timeout(Some(REQUEST_TIMEOUT + quick))
        .unwrap();
    checks.refused(
        "an unfinished line",
        only_answer(partial),
        "incomplete request: 11 bytes and no newline within 10 s",
    );
    let waited = partial_started.elapsed();
    checks.check(
        waited >= REQUEST_TIMEOUT - Duration::from_millis(500),
        format!("the unfinished line was answered after {waited:?}"),
    );

    // And the socket still serves.
    status_works(&agent).expect("status afterwards");
}
