//! Harness for bulkhead's privileged end-to-end tests.
//!
//! Every test gets its own cgroup subtree (the agent attaches there, not at
//! the host's root), its own network namespaces and its own bpffs pin
//! directory; guards remove all of it on drop, panics included. Traffic goes
//! only to loopback or to addresses inside the test's own namespaces.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

pub mod gaps;
pub mod world;

pub use serde_json::Value;

/// True when privileged tests can run. Without root they are skipped with a
/// printed reason, except under CI, where a skip is a failure.
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: privileged test needs root, and CI is set: refusing to skip");
    }
    eprintln!(
        "SKIP {test}: needs root (loads BPF programs, creates cgroups and network namespaces)"
    );
    false
}

/// The Python of the tests' helpers (`tests/otlp/`, `tests/k8s/`), from
/// `cargo xtask setup`; `None` (with a printed reason) when it is missing,
/// a failure under CI.
pub fn helper_python(test: &str) -> Option<std::path::PathBuf> {
    let python =
        std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".cache/bulkhead/test-venv/bin/python3");
    if python.is_file() {
        return Some(python);
    }
    let why = format!(
        "{test}: the tests' Python ({}) is missing (run `cargo xtask setup`)",
        python.display()
    );
    if std::env::var_os("CI").is_some() {
        panic!("{why}, and CI is set: refusing to skip");
    }
    eprintln!("SKIP {why}");
    None
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A short name unique to this test process and call: the full process id
/// (no two live processes share it) and a per-process counter. With a
/// two-letter prefix it fits an interface name (15 bytes).
/// Whether the running kernel is older than `major.minor` (`uname -r`).
pub fn kernel_older_than(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (a, b) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (a, b) < (major, minor)
}

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Where [`net_id`] keeps its locks: one file per number, shared by every
/// test process on the host.
const NET_LOCKS: &str = "/run/bulkhead-tests";
/// The numbers [`net_id`] hands out: `10.N.0.0/16` and `fd00:N::/32` for N
/// in this range (private ranges; N is written in decimal, which reads as
/// hex digits in the IPv6 prefix).
pub const NET_IDS: std::ops::RangeInclusive<u8> = 100..=249;

/// A number for a test's addresses, held (an `flock` on
/// `/run/bulkhead-tests/net-N.lock`) until dropped, so no two tests
/// running at once, in this process or in any other test binary, get the
/// same one. The kernel releases the lock when the process dies, even by
/// SIGKILL, so a crashed run leaves nothing to clean up.
///
/// A test owns every address under `10.N.0.0/16` and `fd00:N::/32`: its
/// veth pair (`10.N.0.0/24`, see [`Link`]) and any other network its
/// policy names (`10.N.S.0/24` for some S ≠ 0).
pub struct NetId {
    pub n: u8,
    _lock: fs::File,
}

impl NetId {
    /// `10.N.sub.host`
    pub fn v4(&self, sub: u8, host: u8) -> String {
        format!("10.{}.{sub}.{host}", self.n)
    }

    /// `fd00:N:sub::host` (hex groups; `N` in decimal digits).
    pub fn v6(&self, sub: u16, host: u16) -> String {
        format!("fd00:{}:{sub:x}::{host:x}", self.n)
    }
}

/// Hands out a [`NetId`] no other live test holds; panics (with the
/// holders to look at) when all are taken.
pub fn net_id() -> NetId {
    fs::create_dir_all(NET_LOCKS).unwrap_or_else(|e| panic!("mkdir {NET_LOCKS}: {e}"));
    let (first, count) = (*NET_IDS.start() as u32, NET_IDS.len() as u32);
    // Start somewhere else in each process and call, so concurrent
    // binaries rarely race for the same file.
    let start = std::process::id().wrapping_mul(7) + SEQ.fetch_add(1, Ordering::Relaxed);
    for i in 0..count {
        let n = (first + (start + i) % count) as u8;
        let path = Path::new(NET_LOCKS).join(format!("net-{n}.lock"));
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        // SAFETY: flock on a descriptor this function owns.
        let got = unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&lock),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        } == 0;
        if got {
            return NetId { n, _lock: lock };
        }
    }
    panic!("all {count} test network numbers are held (see `lslocks` for {NET_LOCKS})");
}

pub fn cgroup2_mount() -> PathBuf {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    for line in info.lines() {
        if let Some((left, right)) = line.split_once(" - ")
            && right.split_whitespace().next() == Some("cgroup2")
        {
            return PathBuf::from(left.split_whitespace().nth(4).expect("mountpoint"));
        }
    }
    panic!("no cgroup2 mount");
}

/// A cgroup (and everything below it), removed on drop after its processes
/// are killed.
pub struct Cgroup {
    pub path: PathBuf,
    /// Path relative to the cgroup2 mount, as policies name it.
    pub rel: String,
}

impl Cgroup {
    pub fn new(rel: &str) -> Cgroup {
        let path = cgroup2_mount().join(rel.trim_start_matches('/'));
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Cgroup {
            path,
            rel: rel.to_string(),
        }
    }

    pub fn child(&self, name: &str) -> Cgroup {
        Cgroup::new(&format!("{}/{name}", self.rel))
    }
}

fn remove_cgroup_tree(p: &Path) {
    if let Ok(entries) = fs::read_dir(p) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = fs::write(p.join("cgroup.kill"), "1");
    for _ in 0..100 {
        if fs::remove_dir(p).is_ok() || !p.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.path);
    }
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

pub fn sh(cmd: &str) -> Output {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Netns {
    pub fn new() -> Netns {
        let name = unique("bh");
        sh(&format!(
            "ip netns add {name} && ip -n {name} link set lo up"
        ));
        Netns { name }
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n NS ...`
    pub fn ip(&self, args: &str) {
        sh(&format!("ip -n {} {args}", self.name));
    }
}

impl Default for Netns {
    fn default() -> Self {
        Netns::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Two namespaces joined by a veth pair, with v4 and v6 test addresses
/// from a harness-allocated [`NetId`] `N`: `a` holds `10.N.0.1` /
/// `fd00:N::1`, `b` holds `.2` / `::2`.
pub struct Link {
    pub a: Netns,
    pub b: Netns,
    /// `N`, the second octet of every address of this link.
    pub net: u8,
    /// Released after the namespaces are gone (fields drop in order).
    pub id: NetId,
}

impl Link {
    pub fn new() -> Link {
        let id = net_id();
        let net = id.n;
        let (a, b) = (Netns::new(), Netns::new());
        let va = unique("va");
        let vb = unique("vb");
        sh(&format!(
            "ip link add {va} netns {} type veth peer name {vb} netns {}",
            a.name, b.name
        ));
        for (ns, dev, host) in [(&a, &va, 1), (&b, &vb, 2)] {
            ns.ip(&format!("addr add 10.{net}.0.{host}/24 dev {dev}"));
            ns.ip(&format!(
                "-6 addr add fd00:{net}::{host}/64 dev {dev} nodad"
            ));
            ns.ip(&format!("link set {dev} up"));
        }
        Link { a, b, net, id }
    }

    pub fn v4(&self, host: u8) -> String {
        format!("10.{}.0.{host}", self.net)
    }

    pub fn v6(&self, host: u8) -> String {
        format!("fd00:{}::{host}", self.net)
    }
}

impl Default for Link {
    fn default() -> Self {
        Link::new()
    }
}

/// A command that will run inside `cgroup` (and `netns`, if given).
pub fn command_in(cgroup: &Cgroup, netns: Option<&Netns>, program: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args);
    let procs = cgroup.path.join("cgroup.procs");
    let ns = netns.map(Netns::path);
    // SAFETY: only async-signal-safe work happens between fork and exec:
    // writing a file and setns.
    unsafe {
        cmd.pre_exec(move || {
            fs::write(&procs, b"0")?;
            if let Some(ns) = &ns {
                let f = fs::File::open(ns)?;
                if libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

/// Makes `cmd` (from [`command_in`]) see `conf` as `/etc/resolv.conf`, in
/// a mount namespace of its own, so the libc resolver of a real client
/// (`getent`, `curl`) asks the test's resolver.
pub fn with_resolv_conf<'a>(cmd: &'a mut Command, conf: &Path) -> &'a mut Command {
    use std::ffi::CString;
    let path = |p: &Path| CString::new(p.as_os_str().as_encoded_bytes()).expect("a path");
    let (from, to, root) = (
        path(conf),
        path(Path::new("/etc/resolv.conf")),
        path(Path::new("/")),
    );
    // SAFETY: only async-signal-safe system calls between fork and exec,
    // on strings made before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let ok = |rc: libc::c_int| {
                if rc == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            };
            ok(libc::unshare(libc::CLONE_NEWNS))?;
            // Not propagated back to the host's namespace.
            ok(libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            ok(libc::mount(
                from.as_ptr(),
                to.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ))
        });
    }
    cmd
}

/// The `probe` binary cargo built beside the test executable
/// (`target/<profile>/deps/<test>` → `target/<profile>/probe`).
pub fn probe_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let p = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("probe");
    assert!(
        p.exists(),
        "{} missing: build the tests package (cargo test -p tests)",
        p.display()
    );
    p
}

/// Runs `probe ARGS` in a cgroup/namespace and returns its last line.
pub fn probe(cgroup: &Cgroup, netns: Option<&Netns>, args: &[&str]) -> String {
    let out = command_in(cgroup, netns, probe_bin().to_str().unwrap(), args)
        .output()
        .expect("run probe");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "probe {args:?} failed: {}{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.lines().last().unwrap_or_default().to_string()
}

/// A `probe serve` running in the background; `finish` returns what it counted.
pub struct Server {
    child: Child,
}

/// Waits for a helper's `listening` line (it has bound its socket),
/// reading no further: the rest of its output is its result.
pub fn listening(child: &mut Child, what: &str) {
    use std::io::Read as _;
    let out = child.stdout.as_mut().expect("piped stdout");
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while out.read(&mut byte).expect("reading a helper's stdout") == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    assert_eq!(
        String::from_utf8_lossy(&line).trim(),
        "listening",
        "{what} did not start"
    );
}

impl Server {
    pub fn start(
        cgroup: &Cgroup,
        netns: Option<&Netns>,
        proto: &str,
        at: &str,
        secs: u64,
    ) -> Server {
        let mut child = command_in(
            cgroup,
            netns,
            probe_bin().to_str().unwrap(),
            &["serve", proto, at, &secs.to_string()],
        )
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn server");
        listening(&mut child, "server");
        Server { child }
    }

    /// Waits for the server's time to run out; returns how many
    /// connections/datagrams reached it.
    pub fn finish(mut self) -> u32 {
        let mut out = String::new();
        use std::io::Read as _;
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let _ = self.child.wait();
        out.lines()
            .last()
            .and_then(|l| l.strip_prefix("got "))
            .and_then(|n| n.parse().ok())
            .expect("server count")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn bulkhead_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("BULKHEAD_BIN") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    for profile in ["release", "debug"] {
        let p = root.join("target").join(profile).join("bulkhead");
        if p.exists() {
            return p;
        }
    }
    panic!(
        "bulkhead binary not found: set BULKHEAD_BIN or run `cargo build --release -p bulkhead`"
    );
}

/// A running `bulkhead run`, on its own cgroup root and pin directory.
/// Dropping it kills the agent and detaches everything it pinned.
pub struct Agent {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub policy: PathBuf,
    pub events: PathBuf,
    pub bpffs: PathBuf,
    pub cgroup_root: PathBuf,
    env: Vec<(String, String)>,
    wrapper: Vec<String>,
    /// Another `bulkhead` binary for `run` (an earlier version).
    run_bin: Option<PathBuf>,
    notify: std::os::unix::net::UnixDatagram,
    /// Events on the agent's stdout, to a pipe ([`Agent::take_stdout`]).
    stdout_events: bool,
}

impl Agent {
    pub fn start(cgroup_root: &Cgroup, policy: &str) -> Agent {
        Self::start_with(cgroup_root, policy, &[])
    }

    pub fn start_with(cgroup_root: &Cgroup, policy: &str, extra: &[&str]) -> Agent {
        let mut agent = Agent::prepare(cgroup_root, policy);
        agent.spawn(extra);
        agent
    }

    /// Starts the agent through `wrapper` (e.g. `setpriv --bounding-set
    /// ...`), which must exec it in place.
    pub fn start_under(cgroup_root: &Cgroup, policy: &str, wrapper: &[&str]) -> Agent {
        let mut agent = Agent::prepare(cgroup_root, policy);
        agent.wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        agent.spawn(&[]);
        agent
    }

    /// Like [`Agent::start_with`], with extra environment variables for
    /// this and every later start.
    pub fn start_with_env(
        cgroup_root: &Cgroup,
        policy: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        let mut agent = Agent::prepare(cgroup_root, policy);
        agent.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        agent.spawn(extra);
        agent
    }

    /// Writes the policy and opens the notify socket; does not start it.
    fn prepare(cgroup_root: &Cgroup, policy: &str) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let policy_path = dir.path().join("policy.yaml");
        fs::write(&policy_path, policy).unwrap();
        let notify_path = dir.path().join("notify.sock");
        let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
        notify
            // Under emulation (cargo xtask vm-test) loading can take minutes.
            .set_read_timeout(Some(ready_timeout()))
            .unwrap();
        Agent {
            child: None,
            events: dir.path().join("events.jsonl"),
            bpffs: PathBuf::from("/sys/fs/bpf").join(unique("bulkhead-test-")),
            policy: policy_path,
            cgroup_root: cgroup_root.path.clone(),
            env: Vec::new(),
            wrapper: Vec::new(),
            run_bin: None,
            dir,
            notify,
            stdout_events: false,
        }
    }

    pub fn command(&self, extra: &[&str]) -> Command {
        let mut cmd = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(self.run_bin());
                c
            }
            None => Command::new(self.run_bin()),
        };
        cmd.arg("run")
            .arg("--policy")
            .arg(&self.policy)
            .arg("--cgroup-root")
            .arg(&self.cgroup_root)
            .arg("--bpffs-dir")
            .arg(&self.bpffs)
            .arg("--events-log")
            .arg(&self.events)
            .args((!self.stdout_events).then_some("--no-stdout-events"))
            .args(extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("NOTIFY_SOCKET", self.dir.path().join("notify.sock"))
            .stdout(if self.stdout_events {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::piped());
        cmd
    }

    /// Starts (or restarts) the agent and waits for `READY=1`.
    pub fn spawn(&mut self, extra: &[&str]) {
        self.spawn_logging(extra, None);
    }

    /// Forwards the agent's stderr to the test output (cargo shows it on
    /// failure) and, with `log`, also collects it; then waits for `READY=1`.
    fn spawn_logging(&mut self, extra: &[&str], log: Option<&AgentLog>) {
        self.spawn_nowait(extra, log);
        self.wait_ready();
    }

    /// Starts (or restarts) the agent without waiting for it: for tests
    /// that act while it starts. [`Agent::wait_ready`] waits.
    pub fn spawn_nowait(&mut self, extra: &[&str], log: Option<&AgentLog>) {
        // A READY=1 of an earlier agent (killed right after sending it)
        // must not pass for this one's.
        self.notify.set_nonblocking(true).unwrap();
        let mut stale = [0u8; 256];
        while self.notify.recv(&mut stale).is_ok() {}
        self.notify.set_nonblocking(false).unwrap();
        let mut child = self.command(extra).spawn().expect("spawn bulkhead");
        let stderr = child.stderr.take().unwrap();
        let sink = log.map(|l| l.0.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[agent] {line}");
                if let Some(sink) = &sink {
                    sink.lock().unwrap().push(line);
                }
            }
        });
        self.child = Some(child);
    }

    /// Waits for the running agent's `READY=1`; fails at once if the agent
    /// exits first (a refused flag, say), else after [`ready_timeout`].
    pub fn wait_ready(&mut self) {
        let mut buf = [0u8; 256];
        let deadline = Instant::now() + ready_timeout();
        self.notify
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let outcome = loop {
            match self.notify.recv(&mut buf) {
                Ok(n) if &buf[..n] == b"READY=1" => break Ok(()),
                Ok(_) => continue,
                Err(e) => {
                    let exited = self.exited();
                    if exited.is_some() || Instant::now() > deadline {
                        break Err(format!("{e} (exit: {exited:?})"));
                    }
                }
            }
        };
        self.notify.set_read_timeout(Some(ready_timeout())).unwrap();
        if let Err(why) = outcome {
            panic!("agent did not report READY=1: {why}");
        }
    }

    /// Waits (10 s at most) until the agent's `main` holds or handles
    /// SIGHUP, SIGTERM and SIGINT: before that (the loader, the first
    /// instructions) they have their default action, as for any process.
    pub fn wait_signals_taken(&self) {
        let want: u64 = [libc::SIGHUP, libc::SIGTERM, libc::SIGINT]
            .iter()
            .map(|s| 1u64 << (s - 1))
            .sum();
        let mask = |status: &str, field: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                .unwrap_or(0)
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status =
                std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
            if (mask(&status, "SigBlk:") | mask(&status, "SigCgt:")) & want == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the agent neither held nor handled the stop signals within 10 s"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Sends `signal` to the running agent.
    pub fn signal(&self, signal: i32) {
        // SAFETY: plain kill(2).
        unsafe { libc::kill(self.pid() as i32, signal) };
    }

    /// The agent's exit status if it has exited (`None` while it runs).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().unwrap())
    }

    /// Waits (bounded) for the agent to exit; its status, or `None` if it
    /// still runs after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(st) = self.exited() {
                self.child = None;
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// Runs `bin` (e.g. an earlier version) instead of this build's
    /// agent from the next start on; `None` goes back.
    pub fn set_run_bin(&mut self, bin: Option<PathBuf>) {
        self.run_bin = bin;
    }

    fn run_bin(&self) -> PathBuf {
        self.run_bin.clone().unwrap_or_else(bulkhead_bin)
    }

    /// Sets (or with `None` removes) an environment variable for the next
    /// starts.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.env.push((key.to_string(), v.to_string()));
        }
    }

    /// The layout directories pinned under the agent's bpffs directory.
    pub fn layouts(&self) -> Vec<String> {
        let mut out: Vec<String> = fs::read_dir(&self.bpffs)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("layout-") || n == "maps" || n == "links")
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    /// The pin directory of the (one) layout in force.
    pub fn pins(&self) -> PathBuf {
        let layouts = self.layouts();
        match layouts.as_slice() {
            [one] if one.starts_with("layout-") => self.bpffs.join(one),
            _ => panic!(
                "expected one layout under {}: {layouts:?}",
                self.bpffs.display()
            ),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    /// SIGKILL: the agent dies without any cleanup.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Replaces the policy file whole (a new file renamed over it): the
    /// agent's own check for a changed file (every second) must not read
    /// it half-written.
    pub fn write_policy(&self, policy: &str) {
        let tmp = self.policy.with_extension("yaml.new");
        fs::write(&tmp, policy).unwrap();
        fs::rename(&tmp, &self.policy).unwrap();
    }

    /// SIGHUP and wait for the reload to be announced on the notify socket.
    pub fn reload(&mut self, policy: &str) {
        // Forget notifications of earlier reloads (e.g. over the control socket).
        self.notify.set_nonblocking(true).unwrap();
        let mut stale = [0u8; 256];
        while self.notify.recv(&mut stale).is_ok() {}
        self.notify.set_nonblocking(false).unwrap();
        self.write_policy(policy);
        // SAFETY: plain kill(2).
        unsafe { libc::kill(self.pid() as i32, libc::SIGHUP) };
        let mut buf = [0u8; 256];
        let mut reloading = false;
        loop {
            let n = self.notify.recv(&mut buf).expect("reload notification");
            match &buf[..n] {
                b"RELOADING=1" => reloading = true,
                b"READY=1" if reloading => return,
                _ => {}
            }
        }
    }

    /// All events so far, parsed: the complete lines (a line the agent is
    /// still writing is left for the next read).
    pub fn events(&self) -> Vec<Value> {
        let Ok(text) = fs::read_to_string(&self.events) else {
            return Vec::new();
        };
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad event line {l}: {e}")))
            .collect()
    }

    /// Waits (bounded) until `n` events match `pred`, then until no more
    /// arrive for a moment (so an "exactly n" assertion sees a late extra
    /// one); returns them.
    pub fn wait_events(&self, n: usize, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        const SETTLE: Duration = Duration::from_millis(300);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut stable: Option<(usize, Instant)> = None;
        loop {
            let got: Vec<Value> = self.events().into_iter().filter(|e| pred(e)).collect();
            if got.len() >= n {
                match stable {
                    Some((len, since)) if len == got.len() => {
                        if since.elapsed() >= SETTLE {
                            return got;
                        }
                    }
                    _ => stable = Some((got.len(), Instant::now())),
                }
            }
            if Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// All events, once the log has stopped growing for the same settle
    /// time as [`Agent::wait_events`] (bounded): for an exact count or an
    /// exact list of everything logged.
    pub fn settled_events(&self) -> Vec<Value> {
        self.wait_events(0, |_| true)
    }

    /// The number of lines in `path` once it has at least `at_least` and
    /// has stopped growing for the settle time of [`Agent::wait_events`];
    /// bounded by `within` (then the count so far).
    pub fn settled_lines(path: &Path, at_least: usize, within: Duration) -> usize {
        const SETTLE: Duration = Duration::from_millis(300);
        let deadline = Instant::now() + within;
        let mut stable: Option<(usize, Instant)> = None;
        loop {
            let n = fs::read_to_string(path).map_or(0, |t| t.lines().count());
            if n >= at_least {
                match stable {
                    Some((m, since)) if m == n => {
                        if since.elapsed() >= SETTLE {
                            return n;
                        }
                    }
                    _ => stable = Some((n, Instant::now())),
                }
            }
            if Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn run_cli(&self, args: &[&str]) -> Output {
        Command::new(bulkhead_bin())
            .args(args)
            .output()
            .expect("run bulkhead")
    }
}

impl Agent {
    /// The agent's run directory (control socket): `/run/<bpffs dir name>`.
    pub fn run_dir(&self) -> PathBuf {
        PathBuf::from("/run").join(self.bpffs.file_name().expect("bpffs dir name"))
    }

    /// The agent's state directory (audit store): `/var/lib/<bpffs dir name>`.
    pub fn state_dir(&self) -> PathBuf {
        PathBuf::from("/var/lib").join(self.bpffs.file_name().expect("bpffs dir name"))
    }

    /// Waits until `status` counts at least `n` followers (`events
    /// --follow`), so a test acts on a follower only once the agent has
    /// it; fails after 10 s.
    pub fn wait_subscribers(&self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (st, _) = self.status_within(Duration::from_secs(10));
            if st["events"]["subscribers"].as_u64().unwrap_or(0) >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "fewer than {n} followers after 10 s: {}",
                st["events"]
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs a client subcommand (`status`, `events`, ...) against this agent.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(bulkhead_bin());
        cmd.args(args).arg("--bpffs-dir").arg(&self.bpffs);
        cmd.output().expect("run bulkhead")
    }

    /// `bulkhead status --json`, which must answer within `within` (a
    /// stalled agent loop fails the test instead of hanging it): the answer
    /// and how long it took.
    pub fn status_within(&self, within: Duration) -> (Value, Duration) {
        let started = Instant::now();
        let mut child = Command::new(bulkhead_bin())
            .args(["status", "--json", "--bpffs-dir"])
            .arg(&self.bpffs)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn status");
        while child.try_wait().unwrap().is_none() {
            if started.elapsed() > within {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the agent did not answer `status` within {within:?}: its loop is stalled");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let took = started.elapsed();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("status not JSON ({e}): {:?}", out.stdout));
        (v, took)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        let _ = Command::new(bulkhead_bin())
            .args(["detach", "--force", "--bpffs-dir"])
            .arg(&self.bpffs)
            .stdout(Stdio::null())
            .status();
        let _ = fs::remove_dir_all(self.run_dir());
        let _ = fs::remove_dir_all(self.state_dir());
    }
}

/// Field of an event as a string ("" when absent or null).
pub fn field<'a>(e: &'a Value, k: &str) -> &'a str {
    e.get(k).and_then(Value::as_str).unwrap_or("")
}

// ---------------------------------------------------------------------------
// Geo test helpers (issue 4).

/// Events one output of `status --json`'s `outputs` dropped, all causes.
pub fn dropped(output: &Value) -> u64 {
    output["dropped"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum()
}

/// The full country database the geo tests use: `BULKHEAD_TEST_GEO_DB`, else
/// `~/.cache/bulkhead/geo-whois-asn-country.mmdb` (placed by `cargo xtask
/// setup`). `None` (with a printed reason) when it is missing; under CI a
/// missing database is a failure, not a skip.
pub fn geo_db(test: &str) -> Option<PathBuf> {
    let path = match std::env::var_os("BULKHEAD_TEST_GEO_DB") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".cache/bulkhead/geo-whois-asn-country.mmdb"),
    };
    if path.is_file() {
        return Some(path);
    }
    let why = format!(
        "{test}: geo database {} missing (set BULKHEAD_TEST_GEO_DB or run `cargo xtask setup`)",
        path.display()
    );
    if std::env::var_os("CI").is_some() {
        panic!("{why}, and CI is set: refusing to skip");
    }
    eprintln!("SKIP {why}");
    None
}

/// Runs `probe verdicts` once in `cgroup`/`netns` for all `addrs` and returns
/// one result per address (`EPERM`, `ENETUNREACH`, ...), in order.
pub fn verdicts(cgroup: &Cgroup, netns: &Netns, addrs: &[std::net::IpAddr]) -> Vec<String> {
    let mut input = tempfile::tempfile().expect("temp file");
    {
        use std::io::{Seek as _, Write as _};
        let mut w = std::io::BufWriter::new(&mut input);
        for a in addrs {
            writeln!(w, "{a}").unwrap();
        }
        w.flush().unwrap();
        drop(w);
        input.rewind().unwrap();
    }
    let out = command_in(
        cgroup,
        Some(netns),
        probe_bin().to_str().unwrap(),
        &["verdicts"],
    )
    .stdin(Stdio::from(input))
    .output()
    .expect("run probe verdicts");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "probe verdicts failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines: Vec<String> = stdout.lines().map(str::to_string).collect();
    assert_eq!(
        lines.pop().as_deref(),
        Some(format!("done {}", addrs.len()).as_str()),
        "probe verdicts did not answer every address"
    );
    lines
}

/// The agent's log (stderr) lines, collected while they are also forwarded
/// to the test output.
#[derive(Clone, Default)]
pub struct AgentLog(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl AgentLog {
    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits (bounded by `secs`) until the lines from index `from` on satisfy
    /// `pred`; returns those lines either way.
    pub fn wait_since(
        &self,
        from: usize,
        secs: u64,
        pred: impl Fn(&[String]) -> bool,
    ) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let lines = self.lines();
            let new = lines.get(from..).unwrap_or_default().to_vec();
            if pred(&new) || Instant::now() > deadline {
                return new;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Agent {
    /// Like [`Agent::start_with`], and also collects the agent's stderr.
    pub fn start_capturing(
        cgroup_root: &Cgroup,
        policy: &str,
        extra: &[&str],
    ) -> (Agent, AgentLog) {
        let mut agent = Agent::prepare(cgroup_root, policy);
        let log = AgentLog::default();
        agent.spawn_capturing(extra, &log);
        (agent, log)
    }

    /// Like [`Agent::start_capturing`], with extra environment variables
    /// for this and every later start.
    pub fn start_capturing_with_env(
        cgroup_root: &Cgroup,
        policy: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> (Agent, AgentLog) {
        let mut agent = Agent::prepare(cgroup_root, policy);
        agent.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let log = AgentLog::default();
        agent.spawn_capturing(extra, &log);
        (agent, log)
    }

    /// Like [`Agent::start_capturing`], with events on the agent's stdout
    /// too, to a pipe the test reads ([`Agent::take_stdout`]) or not.
    pub fn start_capturing_with_stdout(
        cgroup_root: &Cgroup,
        policy: &str,
        extra: &[&str],
    ) -> (Agent, AgentLog) {
        let mut agent = Agent::prepare(cgroup_root, policy);
        agent.stdout_events = true;
        let log = AgentLog::default();
        agent.spawn_capturing(extra, &log);
        (agent, log)
    }

    /// The running agent's stdout (with [`Agent::start_capturing_with_stdout`]).
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.as_mut().and_then(|c| c.stdout.take())
    }

    /// Like [`Agent::start_capturing`], with the events log at `events`
    /// (e.g. on a [`Tmpfs`]) instead of the agent's temporary directory.
    pub fn start_capturing_at(
        cgroup_root: &Cgroup,
        policy: &str,
        events: &Path,
        extra: &[&str],
    ) -> (Agent, AgentLog) {
        let mut agent = Agent::prepare(cgroup_root, policy);
        agent.events = events.to_path_buf();
        let log = AgentLog::default();
        agent.spawn_capturing(extra, &log);
        (agent, log)
    }

    /// Like [`Agent::start_under`], and also collects the agent's stderr.
    pub fn start_under_capturing(
        cgroup_root: &Cgroup,
        policy: &str,
        wrapper: &[&str],
    ) -> (Agent, AgentLog) {
        let mut agent = Agent::unstarted_under(cgroup_root, policy, wrapper);
        let log = AgentLog::default();
        agent.spawn_capturing(&[], &log);
        (agent, log)
    }

    /// An agent with its own pins, run under `wrapper` like
    /// [`Agent::start_under`], not started yet: for what must be done
    /// before its start (`spawn_capturing` starts it).
    pub fn unstarted_under(cgroup_root: &Cgroup, policy: &str, wrapper: &[&str]) -> Agent {
        let mut agent = Agent::prepare(cgroup_root, policy);
        agent.wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        agent
    }

    /// Like [`Agent::spawn`], and also appends the agent's stderr lines to `log`.
    pub fn spawn_capturing(&mut self, extra: &[&str], log: &AgentLog) {
        self.spawn_logging(extra, Some(log));
    }
}

/// A tmpfs of `size` mounted on a fresh temporary directory (a small disk
/// to fill); unmounted (lazily, so an agent still holding files cannot
/// keep it) and removed on drop.
pub struct Tmpfs {
    pub dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `size` as mount(8) takes it: `640k`, `128m`.
    pub fn new(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        sh(&format!(
            "mount -t tmpfs -o size={size},mode=0755 tmpfs {}",
            dir.path().display()
        ));
        Tmpfs { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the file system: writes `name` until the disk is full.
    pub fn fill(&self, name: &str) {
        use std::io::Write as _;
        let mut f = fs::File::create(self.path().join(name)).unwrap();
        let block = vec![0xa5u8; 64 << 10];
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", self.path().display()),
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

// ---------------------------------------------------------------------------
// Hostile-packet helpers (issue 9).

/// Runs `probe testrun LINK` in `cgroup`: `BPF_PROG_TEST_RUN` of the program
/// behind the pinned link on each packet (Ethernet header included), and
/// returns the program's return codes in order, or the errno name when the
/// kernel refused the run (it refuses, with `EINVAL`, an IPv4 or IPv6 frame
/// shorter than the fixed IP header: the stack never hands such a packet to
/// a program). The kernel gives a test run's skb a socket in the calling
/// process's cgroup, so the programs decide as for a workload of `cgroup`.
pub fn test_run(cgroup: &Cgroup, link: &Path, packets: &[Vec<u8>]) -> Vec<Result<u32, String>> {
    use std::io::{Seek as _, Write as _};
    let mut input = tempfile::tempfile().expect("temp file");
    {
        let mut w = std::io::BufWriter::new(&mut input);
        for p in packets {
            for b in p {
                write!(w, "{b:02x}").unwrap();
            }
            writeln!(w).unwrap();
        }
        w.flush().unwrap();
    }
    input.rewind().unwrap();
    let out = command_in(
        cgroup,
        None,
        probe_bin().to_str().unwrap(),
        &["testrun", link.to_str().expect("link path")],
    )
    .stdin(Stdio::from(input))
    .output()
    .expect("run probe testrun");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "probe testrun failed: {}{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.pop(),
        Some(format!("done {}", packets.len()).as_str()),
        "probe testrun did not run every packet: {stdout}"
    );
    lines
        .iter()
        .map(|l| l.parse().map_err(|_| l.replace("errno22", "EINVAL")))
        .collect()
}

/// Extra seconds for a server that must outlive an agent start:
/// `BULKHEAD_TEST_SLACK_SECS`, 0 by default; under emulation (`cargo xtask
/// vm-test` with TCG) the agent takes ~10 s to start.
pub fn slack_secs() -> u64 {
    std::env::var("BULKHEAD_TEST_SLACK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// How long to wait for the agent's READY=1: `BULKHEAD_TEST_READY_SECS`,
/// 30 s by default.
pub fn ready_timeout() -> Duration {
    let secs = std::env::var("BULKHEAD_TEST_READY_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    Duration::from_secs(secs)
}

/// How many programs are attached to `cgroup` itself (not inherited) at
/// its `inet egress`, `inet ingress` and `connect4` hooks, read in this
/// process (`BPF_PROG_QUERY`), so that no process start stands between an
/// action and this look.
pub fn attached_programs(cgroup: &Path) -> u32 {
    use std::os::fd::AsRawFd as _;
    const BPF_PROG_QUERY: libc::c_long = 16;
    // BPF_CGROUP_INET_INGRESS, BPF_CGROUP_INET_EGRESS, BPF_CGROUP_INET4_CONNECT.
    const TYPES: [u32; 3] = [0, 1, 10];
    let dir = std::fs::File::open(cgroup).expect("open the cgroup");
    let mut total = 0;
    for t in TYPES {
        // union bpf_attr's query: target_fd, attach_type, query_flags,
        // attach_flags, prog_ids, prog_cnt.
        let mut attr = [0u8; 64];
        attr[0..4].copy_from_slice(&(dir.as_raw_fd() as u32).to_ne_bytes());
        attr[4..8].copy_from_slice(&t.to_ne_bytes());
        // SAFETY: attr is a zeroed bpf_attr prefix the command reads and writes.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_QUERY,
                attr.as_mut_ptr(),
                attr.len() as u32,
            )
        };
        assert!(
            rc == 0,
            "BPF_PROG_QUERY: {}",
            std::io::Error::last_os_error()
        );
        total += u32::from_ne_bytes(attr[24..28].try_into().unwrap());
    }
    total
}

#[cfg(test)]
mod harness_tests {
    use super::*;

    /// Numbers held at once are distinct, in this process and against any
    /// other: a second process cannot take one this process holds, and
    /// can once it is dropped.
    #[test]
    fn net_ids_are_unique_across_processes() {
        if !privileged("net_ids_unique") {
            return;
        }
        let held: Vec<NetId> = (0..20).map(|_| net_id()).collect();
        let mut ns: Vec<u8> = held.iter().map(|h| h.n).collect();
        ns.sort_unstable();
        ns.dedup();
        assert_eq!(ns.len(), held.len(), "{ns:?}");
        assert!(ns.iter().all(|n| NET_IDS.contains(n)), "{ns:?}");
        let other_takes = |n: u8| {
            Command::new("flock")
                .args(["--nonblock", "--conflict-exit-code", "99"])
                .arg(Path::new(NET_LOCKS).join(format!("net-{n}.lock")))
                .arg("true")
                .status()
                .expect("run flock(1)")
                .code()
        };
        let n = held[0].n;
        assert_eq!(other_takes(n), Some(99), "another process took net {n}");
        drop(held);
        assert_eq!(other_takes(n), Some(0), "net {n} is free once dropped");
    }

    /// A count taken once `at_least` lines are there still sees a line
    /// that comes 150 ms later (a count returned as soon as it was reached
    /// would miss it, and an "exactly n" assertion would pass wrongly).
    #[test]
    fn settled_lines_sees_a_late_extra_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        fs::write(&path, "a\nb\n").unwrap();
        let late = path.clone();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            let mut text = fs::read_to_string(&late).unwrap();
            text.push_str("c\n");
            fs::write(&late, text).unwrap();
        });
        assert_eq!(Agent::settled_lines(&path, 2, Duration::from_secs(5)), 3);
        writer.join().unwrap();
    }
}
