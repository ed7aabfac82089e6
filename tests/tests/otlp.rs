//! Events to the fleet's store (issue 20): with `--otlp-endpoint` every
//! event reaches an OpenTelemetry collector as one OTLP log record, over
//! gRPC or HTTP/protobuf, plain or TLS, decoded here by the OpenTelemetry
//! project's own protobuf definitions (`tests/otlp/receiver.py`); a
//! collector that is down holds events up to `--otlp-hold`, and what is
//! past it is counted and announced by a gap record once it is back.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use tests::{
    Agent, Value, dropped, helper_python, privileged,
    world::{storm_done, world},
};

/// The receiver's Python when the test can run (as root, with the tests'
/// venv); `None` with the reason printed (a failure under CI).
fn receiver_python(test: &str) -> Option<PathBuf> {
    if !privileged(test) {
        return None;
    }
    helper_python(test)
}

/// `tests/otlp/receiver.py`, listening on loopback; killed when dropped.
struct Receiver {
    child: Child,
    python: PathBuf,
    out: PathBuf,
    tls: Option<Tls>,
    /// The first export is answered only once this file exists.
    stall_until: Option<PathBuf>,
    grpc: u16,
    http: u16,
}

#[derive(Clone)]
struct Tls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Receiver {
    fn start(python: &Path, dir: &Path, tls: Option<Tls>) -> Receiver {
        Receiver::start_stalling(python, dir, tls, None)
    }

    fn start_stalling(
        python: &Path,
        dir: &Path,
        tls: Option<Tls>,
        stall_until: Option<PathBuf>,
    ) -> Receiver {
        let mut r = Receiver {
            child: Command::new("true").spawn().unwrap(),
            python: python.to_path_buf(),
            out: dir.join("received.jsonl"),
            tls,
            stall_until,
            grpc: 0,
            http: 0,
        };
        r.restart();
        r
    }

    /// (Re)starts it on its ports (any free ones the first time).
    fn restart(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("otlp/receiver.py");
        let mut cmd = Command::new(&self.python);
        cmd.arg(script)
            .args(["--out", self.out.to_str().unwrap()])
            .args(["--grpc-port", &self.grpc.to_string()])
            .args(["--http-port", &self.http.to_string()])
            .stdout(Stdio::piped());
        if let Some(f) = &self.stall_until {
            cmd.arg("--stall-until").arg(f);
        }
        if let Some(t) = &self.tls {
            cmd.args(["--tls-cert", t.cert.to_str().unwrap()])
                .args(["--tls-key", t.key.to_str().unwrap()]);
        }
        self.child = cmd.spawn().expect("starting the OTLP receiver");
        let mut line = String::new();
        BufReader::new(self.child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let ports: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("the receiver did not start ({e}): {line:?}"));
        self.grpc = ports["grpc"].as_u64().unwrap() as u16;
        self.http = ports["http"].as_u64().unwrap() as u16;
    }

    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }

    fn endpoint(&self, protocol: &str) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let port = if protocol == "grpc" {
            self.grpc
        } else {
            self.http
        };
        format!("{scheme}://127.0.0.1:{port}")
    }

    /// Every record received so far.
    fn records(&self) -> Vec<Value> {
        fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A test CA and a certificate for 127.0.0.1 signed by it.
fn tls_files(dir: &Path) -> Tls {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    openssl(
        &[
            &[
                "req",
                "-x509",
                "-days",
                "1",
                "-subj",
                "/CN=bulkhead test CA",
            ][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.pem"],
            &["-addext", "basicConstraints=critical,CA:TRUE"],
            &["-addext", "keyUsage=critical,keyCertSign"],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req", "-subj", "/CN=127.0.0.1"][..],
            &ec,
            &["-keyout", "server.key", "-out", "server.csr"],
        ]
        .concat(),
    );
    fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-days",
        "1",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-extfile",
        "server.ext",
        "-out",
        "server.pem",
    ]);
    Tls {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
    }
}

fn otlp_output(agent: &Agent) -> Value {
    let st = agent.status_within(Duration::from_secs(10)).0;
    st["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "otlp")
        .unwrap_or_else(|| panic!("no otlp output in {}", st["outputs"]))
        .clone()
}

/// Waits (bounded) until the output holds nothing and has written or
/// dropped `n` events; its counters then.
fn settle(agent: &Agent, n: u64, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let o = otlp_output(agent);
        let done = o["pending"] == 0 && o["written"].as_u64().unwrap() + dropped(&o) >= n;
        if done || Instant::now() > deadline {
            return o;
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// The storm's events as the receiver has them (cut connections and
/// other records left out), keyed by (cpu, seq).
fn storm_records(records: &[Value]) -> BTreeMap<(u64, u64), Vec<Value>> {
    let mut by_key: BTreeMap<(u64, u64), Vec<Value>> = BTreeMap::new();
    for r in records {
        let a = &r["attributes"];
        if a["dport"] == 5353 && a["reason"] == "cross-domain" {
            by_key
                .entry((a["cpu"].as_u64().unwrap(), a["seq"].as_u64().unwrap()))
                .or_default()
                .push(r.clone());
        }
    }
    by_key
}

fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string()
}

/// Each protocol, plain and over TLS (with the test CA as `--otlp-ca`):
/// every event of a paced burst arrives exactly once, the same events as
/// in the events log, with the event's fields as typed attributes, the
/// resource attributes and the header for authentication.
#[test]
fn every_event_reaches_the_collector_exactly_once_over_grpc_and_http() {
    let Some(python) = receiver_python("otlp_exactly_once") else {
        return;
    };
    const N: u32 = 300;
    let w = world();
    let certs = tempfile::tempdir().unwrap();
    let tls = tls_files(certs.path());
    for protocol in ["grpc", "http/protobuf"] {
        for secure in [false, true] {
            let what = format!("{protocol}{}", if secure { " over TLS" } else { "" });
            let dir = tempfile::tempdir().unwrap();
            let receiver = Receiver::start(&python, dir.path(), secure.then(|| tls.clone()));
            let endpoint = receiver.endpoint(protocol);
            let mut args = vec![
                "--otlp-endpoint",
                &endpoint,
                "--otlp-protocol",
                protocol,
                "--otlp-header",
                "authorization=Bearer test-token",
                "--event-rate",
                "0",
            ];
            if secure {
                args.extend(["--otlp-ca", tls.ca.to_str().unwrap()]);
            }
            let agent = Agent::start_with(&w.root, &w.policy("", ""), &args);
            storm_done(w.storm_bg(N, 1000), N);
            let o = settle(&agent, u64::from(N), Duration::from_secs(30));
            assert_eq!(dropped(&o), 0, "{what}: {o}");

            let logged: Vec<Value> = agent
                .settled_events()
                .into_iter()
                .filter(|e| e["dport"] == 5353)
                .collect();
            assert_eq!(
                logged.len(),
                N as usize,
                "{what}: the events log has the storm"
            );
            let received = storm_records(&receiver.records());
            let twice: Vec<_> = received
                .iter()
                .filter(|(_, v)| v.len() > 1)
                .map(|(k, _)| k)
                .collect();
            assert!(
                twice.is_empty(),
                "{what}: records received twice (cpu, seq): {twice:?}"
            );
            let logged_keys: Vec<(u64, u64)> = logged
                .iter()
                .map(|e| (e["cpu"].as_u64().unwrap(), e["seq"].as_u64().unwrap()))
                .collect();
            let mut sorted = logged_keys.clone();
            sorted.sort();
            assert_eq!(
                received.keys().copied().collect::<Vec<_>>(),
                sorted,
                "{what}: the collector has exactly the events of the log"
            );

            let e = &logged[0];
            let r = &received[&(e["cpu"].as_u64().unwrap(), e["seq"].as_u64().unwrap())][0];
            assert_eq!(r["via"], if protocol == "grpc" { "grpc" } else { "http" });
            let a = &r["attributes"];
            for k in ["ts", "verdict", "reason", "hook", "src", "dst", "cgroup"] {
                assert_eq!(a[k], e[k], "{what}: attribute {k}: {r}");
            }
            assert_eq!(a["src_domain"], "contractor", "{r}");
            assert_eq!(a["dst_domain"], "prod", "{r}");
            assert_eq!(a["dport"], 5353, "ports stay integers: {r}");
            assert!(
                a.get("bridge").is_none(),
                "no attribute for a null field: {r}"
            );
            assert_eq!(r["severity"], "WARN", "a deny is a warning: {r}");
            assert_eq!(r["event_name"], "bulkhead.decision", "{r}");
            assert_eq!(r["scope"], "bulkhead.audit", "{r}");
            assert_eq!(r["resource"]["service.name"], "bulkhead", "{r}");
            assert_eq!(r["resource"]["host.name"], hostname(), "{r}");
            assert_eq!(
                r["headers"]["authorization"], "Bearer test-token",
                "{what}: the header reached the collector: {r}"
            );
            let body: Value = serde_json::from_str(r["body"].as_str().unwrap()).unwrap();
            assert_eq!(body["seq"], e["seq"], "the body is the event's JSON: {r}");
            eprintln!("{what}: {N} of {N} events received once; status {o}");
        }
    }
}

/// The collector stops for 10 s while 500 events are decided, with
/// `--otlp-hold 200`: once it is back the 200 held arrive, the other 300
/// are counted as dropped (status) and announced by one gap record before
/// the first later event; enforcement never waited.
#[test]
fn a_collector_outage_loses_nothing_silently() {
    let Some(python) = receiver_python("otlp_outage") else {
        return;
    };
    let w = world();
    let dir = tempfile::tempdir().unwrap();
    let mut receiver = Receiver::start(&python, dir.path(), None);
    let endpoint = receiver.endpoint("grpc");
    let agent = Agent::start_with(
        &w.root,
        &w.policy("", ""),
        &[
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            "grpc",
            "--otlp-hold",
            "200",
            "--event-rate",
            "0",
        ],
    );
    storm_done(w.storm_bg(100, 1000), 100);
    let o = settle(&agent, 100, Duration::from_secs(30));
    assert_eq!(storm_records(&receiver.records()).len(), 100, "before: {o}");

    receiver.stop();
    let down = Instant::now();
    // Paced so the first failed export (after 200 ms) comes before the
    // hold is full: the drops are the outage's (`io_error`).
    storm_done(w.storm_bg(500, 5000), 500);
    let during = otlp_output(&agent);
    eprintln!("collector down: {during}");
    thread::sleep(Duration::from_secs(10).saturating_sub(down.elapsed()));
    let during = otlp_output(&agent);
    assert_eq!(
        during["pending"], 200,
        "it holds --otlp-hold events: {during}"
    );
    assert_eq!(during["dropped"]["io_error"], 300, "{during}");
    receiver.restart();

    let o = settle(&agent, 600, Duration::from_secs(30));
    eprintln!("collector back: {o}");
    // The gap record follows the held events (it is not an event: the
    // counters do not wait for it).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut records = receiver.records();
    while !records.iter().any(|r| r["attributes"]["type"] == "gap") && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(200));
        records = receiver.records();
    }
    let received = storm_records(&records);
    assert!(received.values().all(|v| v.len() == 1), "none twice");
    assert_eq!(received.len(), 300, "100 before, 200 held: {o}");
    assert_eq!(o["written"].as_u64().unwrap() + dropped(&o), 600, "{o}");
    let gaps: Vec<&Value> = records
        .iter()
        .filter(|r| r["attributes"]["type"] == "gap")
        .collect();
    assert_eq!(gaps.len(), 1, "one gap record for one outage: {gaps:?}");
    let gap = &gaps[0]["attributes"];
    assert_eq!(gap["count"], 300, "{gap}");
    assert_eq!(gap["cause"], "io_error", "{gap}");
    assert_eq!(gap["output"], "otlp", "{gap}");
    // The gap record stands where the hole is: after the held events.
    let at = records
        .iter()
        .position(|r| r["attributes"]["type"] == "gap")
        .unwrap();
    assert_eq!(
        storm_records(&records[..at]).len(),
        300,
        "the held events come before the gap record"
    );
}

/// A collector that holds one export's answer while a burst larger than
/// the hand-over queue (16 384 events) is decided and handed over: the
/// burst waits in the hold (32 768 by default) and every event arrives
/// once, none dropped.
#[test]
fn a_burst_during_a_slow_export_waits_in_the_hold() {
    let Some(python) = receiver_python("otlp_slow_export") else {
        return;
    };
    const N: u32 = 20_000;
    let w = world();
    let dir = tempfile::tempdir().unwrap();
    let answer = dir.path().join("answer");
    let receiver = Receiver::start_stalling(&python, dir.path(), None, Some(answer.clone()));
    let endpoint = receiver.endpoint("grpc");
    let agent = Agent::start_with(
        &w.root,
        &w.policy("", ""),
        &[
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            "grpc",
            "--event-rate",
            "0",
            // Room for the whole burst in the kernel's ring (1 MiB holds
            // about 8 700 events).
            "--ring-buffer-bytes",
            "8388608",
        ],
    );
    // One event first: its export (after the 200 ms linger) is the one
    // held, in flight while the burst comes.
    storm_done(w.storm_bg(1, 0), 1);
    thread::sleep(Duration::from_millis(400));
    storm_done(w.storm_bg(N, 0), N);
    // The collector answers once the agent has read the whole burst from
    // the kernel and handed it to the outputs.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = agent.status_within(Duration::from_secs(10)).0;
        if st["events"]["delivered"].as_u64().unwrap() > u64::from(N) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the burst was not read: {}",
            st["events"]
        );
        thread::sleep(Duration::from_millis(100));
    }
    fs::write(&answer, "").unwrap();
    let o = settle(&agent, u64::from(N) + 1, Duration::from_secs(60));
    eprintln!("{N} denies during a held export; status {o}");
    assert_eq!(dropped(&o), 0, "nothing dropped: {o}");
    let logged = agent
        .settled_events()
        .into_iter()
        .filter(|e| e["dport"] == 5353)
        .count();
    assert_eq!(logged, N as usize + 1, "the events log has every event");
    let received = storm_records(&receiver.records());
    assert!(
        received.values().all(|v| v.len() == 1),
        "none received twice"
    );
    assert_eq!(received.len(), logged, "the collector has every event: {o}");
}
