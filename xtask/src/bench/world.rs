//! What the benchmarks run in: a private cgroup subtree (the agent attaches
//! there, never at the host's root), private network namespaces, private
//! bpffs pin directories, and the real `bulkhead` binary. Every guard cleans
//! up on drop, errors and panics included.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    os::unix::{net::UnixDatagram, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::cmd::display;

/// The mount point of the first mount in `/proc/self/mountinfo` whose
/// filesystem type and super options `pick` accepts.
fn find_mount(pick: impl Fn(&str, &str) -> bool) -> Result<Option<PathBuf>> {
    let info = fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    for line in info.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mut r = right.split_whitespace();
        let (fstype, opts) = (r.next().unwrap_or_default(), r.nth(1).unwrap_or_default());
        if pick(fstype, opts) {
            let mp = left
                .split_whitespace()
                .nth(4)
                .ok_or_else(|| anyhow!("malformed mountinfo line: {line}"))?;
            return Ok(Some(PathBuf::from(mp)));
        }
    }
    Ok(None)
}

/// The cgroup v2 mount point (hybrid hosts keep it at
/// `/sys/fs/cgroup/unified`).
pub fn cgroup2_mount() -> Result<PathBuf> {
    find_mount(|fstype, _| fstype == "cgroup2")?
        .ok_or_else(|| anyhow!("no cgroup2 mount in /proc/self/mountinfo"))
}

/// A memory cgroup of the agent's own, as a systemd unit or a pod gives it.
/// The kernel charges each socket's storage to the memory cgroup of the
/// map's creator while the workload's task runs, and switching cgroups
/// empties the per-CPU charge cache: an agent that charged its map to the
/// clients' memory cgroup would measure connects cheaper than users get
/// them. (An agent that can makes the map from the root memory cgroup,
/// charged to none: README, Memory; the report says which it was.)
/// Removed on drop (after the agents it held are gone).
pub struct MemCgroup {
    path: PathBuf,
    /// Which hierarchy, for the report.
    pub describe: String,
}

impl MemCgroup {
    /// A memory controller's hierarchy from `/proc/self/mountinfo`: the v1
    /// `memory` mount (hybrid hosts), else the v2 mount with `memory`
    /// enabled for its children. `None` where the kernel has no memory
    /// controller.
    pub fn new(name: &str) -> Result<Option<MemCgroup>> {
        let v1 = find_mount(|fstype, opts| {
            fstype == "cgroup" && opts.split(',').any(|o| o == "memory")
        })?;
        let (parent, describe) = match v1 {
            Some(mp) => (mp, "cgroup v1 `memory` hierarchy".to_string()),
            None => {
                let mp = cgroup2_mount()?;
                let has = |file: &str| {
                    fs::read_to_string(mp.join(file))
                        .is_ok_and(|t| t.split_whitespace().any(|c| c == "memory"))
                };
                if !has("cgroup.controllers") {
                    return Ok(None);
                }
                if !has("cgroup.subtree_control") {
                    fs::write(mp.join("cgroup.subtree_control"), "+memory").with_context(|| {
                        format!("enabling the memory controller below {}", mp.display())
                    })?;
                }
                (mp, "cgroup v2".to_string())
            }
        };
        let path = parent.join(name);
        fs::create_dir_all(&path)
            .with_context(|| format!("creating memory cgroup {}", path.display()))?;
        Ok(Some(MemCgroup { path, describe }))
    }

    pub fn procs(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.path);
    }
}

/// A cgroup removed (after killing what runs in it) on drop.
pub struct Cgroup {
    pub path: PathBuf,
    /// Relative to the cgroup v2 mount, as policies name it.
    pub rel: String,
}

impl Cgroup {
    pub fn new(mount: &Path, rel: &str) -> Result<Cgroup> {
        let path = mount.join(rel.trim_start_matches('/'));
        fs::create_dir_all(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Cgroup {
            path,
            rel: rel.to_string(),
        })
    }

    pub fn child(&self, name: &str) -> Result<Cgroup> {
        let path = self.path.join(name);
        fs::create_dir_all(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Cgroup {
            path,
            rel: format!("{}/{name}", self.rel),
        })
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
        thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.path);
    }
}

/// Runs a shell command quietly; fails with its stderr.
pub fn sh(cmd: &str) -> Result<String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running `{cmd}`"))?;
    if !out.status.success() {
        bail!(
            "`{cmd}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace (with `lo` up), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Result<Netns> {
        let _ = sh(&format!("ip netns del {name} 2>/dev/null"));
        sh(&format!("ip netns add {name}"))?;
        let ns = Netns { name };
        ns.ip("link set lo up")?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    pub fn ip(&self, args: &str) -> Result<String> {
        sh(&format!("ip -n {} {args}", self.name))
    }

    pub fn exec(&self, cmd: &str) -> Result<String> {
        sh(&format!("ip netns exec {} {cmd}", self.name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Joins two namespaces with a veth pair: `a` gets `.1`, `b` gets `.2` of
/// the /24 `prefix` (e.g. "10.251.0"), plus `fd00:251:<n>::1/2`.
pub fn veth(a: &Netns, b: &Netns, names: (&str, &str), prefix: &str, n: u8) -> Result<()> {
    sh(&format!(
        "ip link add {} netns {} type veth peer name {} netns {}",
        names.0, a.name, names.1, b.name
    ))?;
    for (ns, dev, host) in [(a, names.0, 1), (b, names.1, 2)] {
        ns.ip(&format!("addr add {prefix}.{host}/24 dev {dev}"))?;
        ns.ip(&format!(
            "-6 addr add fd00:251:{n}::{host}/64 dev {dev} nodad"
        ))?;
        ns.ip(&format!("link set {dev} up"))?;
    }
    Ok(())
}

/// A command that runs inside `cgroup` and, if given, `netns`.
pub fn command_in(
    cgroup: &Path,
    netns: Option<&Netns>,
    program: &Path,
    args: &[String],
) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args);
    let procs = cgroup.join("cgroup.procs");
    let ns = netns.map(Netns::path);
    // SAFETY: only async-signal-safe work between fork and exec: writing a
    // file and setns(2).
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

/// A child process killed (and reaped) on drop.
pub struct Bg(pub Child);

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cmd` to completion: (wall ms, CPU ms of it and its reaped
/// children from `wait4`'s rusage, success, stdout, stderr). CPU time is
/// what a busy machine inflates least.
pub fn run_timed(cmd: &mut Command) -> Result<(f64, f64, bool, String, String)> {
    use std::io::Read as _;
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting `{}`", display(cmd)))?;
    let mut out = String::new();
    let mut err = String::new();
    let mut so = child.stdout.take().expect("piped");
    let mut se = child.stderr.take().expect("piped");
    let t = thread::spawn(move || {
        let mut e = String::new();
        let _ = se.read_to_string(&mut e);
        e
    });
    let _ = so.read_to_string(&mut out);
    err.push_str(&t.join().unwrap_or_default());
    let mut status = 0;
    // SAFETY: zeroed rusage filled by wait4 for our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    let wall = start.elapsed().as_secs_f64() * 1e3;
    if rc < 0 {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    let cpu = tv(ru.ru_utime) + tv(ru.ru_stime);
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    Ok((wall, cpu, ok, out, err))
}

/// CPU time (user + system, all threads) a live process has used, in ms.
pub fn cpu_ms(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at ")".
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let (utime, stime): (f64, f64) = (f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) * 1e3 / hz)
}

/// `VmRSS` and `VmHWM` of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// A `bulkhead run` on the benchmark's cgroup subtree and its own pin
/// directory. Dropping it kills the agent and detaches what it pinned.
pub struct Agent {
    bin: PathBuf,
    child: Option<Child>,
    pub bpffs: PathBuf,
    pub policy: PathBuf,
    pub events: PathBuf,
    /// Spawn → `READY=1`.
    pub ready: Duration,
    /// CPU time the agent used until `READY=1`, in ms (10 ms ticks).
    pub ready_cpu_ms: f64,
    /// The agent's log so far (stderr lines).
    pub log: Arc<Mutex<Vec<String>>>,
    notify: UnixDatagram,
    pub pid: u32,
}

impl Agent {
    pub fn start(
        bin: &Path,
        work: &Path,
        name: &str,
        policy: &Path,
        cgroup_root: &Path,
        memcg: Option<&MemCgroup>,
        extra: &[&str],
    ) -> Result<Agent> {
        let notify_path = work.join(format!("notify-{name}.sock"));
        let _ = fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path)
            .with_context(|| format!("binding {}", notify_path.display()))?;
        notify.set_read_timeout(Some(Duration::from_secs(90)))?;
        let bpffs = PathBuf::from("/sys/fs/bpf")
            .join(format!("bulkhead-bench-{}-{name}", std::process::id()));
        detach(bin, &bpffs);
        let events = work.join(format!("events-{name}.jsonl"));
        let _ = fs::remove_file(&events);
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .arg("--policy")
            .arg(policy)
            .arg("--cgroup-root")
            .arg(cgroup_root)
            .arg("--bpffs-dir")
            .arg(&bpffs)
            .arg("--events-log")
            .arg(&events)
            .arg("--no-stdout-events")
            // Everything the agent keeps goes below the benchmark's own
            // directory; the events log is never rotated mid-count.
            .arg("--run-dir")
            .arg(work.join(format!("run-{name}")))
            .arg("--state-dir")
            .arg(work.join(format!("state-{name}")))
            .args(["--events-log-max-bytes", "0"])
            .args(extra)
            .env("NOTIFY_SOCKET", &notify_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(procs) = memcg.map(MemCgroup::procs) {
            // SAFETY: only a file write between fork and exec.
            unsafe { cmd.pre_exec(move || fs::write(&procs, b"0")) };
        }
        eprintln!("+ {}", display(&cmd));
        let start = Instant::now();
        let mut child = cmd.spawn().context("spawning bulkhead run")?;
        let pid = child.id();
        let log = Arc::new(Mutex::new(Vec::new()));
        {
            let stderr = child.stderr.take().expect("piped stderr");
            let log = log.clone();
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    log.lock().expect("log lock").push(line);
                }
            });
        }
        let mut agent = Agent {
            bin: bin.to_path_buf(),
            child: Some(child),
            bpffs,
            policy: policy.to_path_buf(),
            events,
            ready: Duration::ZERO,
            ready_cpu_ms: f64::NAN,
            log,
            notify,
            pid,
        };
        agent.wait_for(b"READY=1").map_err(|e| {
            let log = agent.log.lock().expect("log lock").join("\n");
            e.context(format!(
                "agent `{name}` did not become ready; its log:\n{log}"
            ))
        })?;
        agent.ready = start.elapsed();
        agent.ready_cpu_ms = cpu_ms(pid).unwrap_or(f64::NAN);
        Ok(agent)
    }

    fn wait_for(&mut self, what: &[u8]) -> Result<()> {
        let mut buf = [0u8; 256];
        loop {
            match self.notify.recv(&mut buf) {
                Ok(n) if &buf[..n] == what => return Ok(()),
                Ok(_) => continue,
                Err(e) => {
                    let status = self.child.as_mut().map(|c| c.try_wait());
                    bail!(
                        "no {} on the notify socket: {e} (agent exit: {status:?})",
                        String::from_utf8_lossy(what)
                    );
                }
            }
        }
    }

    /// SIGHUP after the policy file changed; the time until `READY=1`
    /// follows `RELOADING=1`.
    pub fn reload(&mut self) -> Result<Duration> {
        let start = Instant::now();
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(self.pid as i32, libc::SIGHUP) };
        self.wait_for(b"RELOADING=1")?;
        self.wait_for(b"READY=1")?;
        Ok(start.elapsed())
    }

    /// The log line that announces enforcement.
    pub fn enforcing_line(&self) -> String {
        self.log
            .lock()
            .expect("log lock")
            .iter()
            .find(|l| l.contains("enforcing"))
            .cloned()
            .unwrap_or_default()
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().expect("log lock").clone()
    }

    /// SIGTERM and wait (bounded); the pinned programs keep enforcing.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: plain kill(2) of our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The agent's layout directory (`<bpffs>/layout-*`): the pins.
    pub fn pins(&self) -> PathBuf {
        fs::read_dir(&self.bpffs)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("layout-"))
            })
            .unwrap_or_else(|| self.bpffs.clone())
    }

    pub fn link(&self, prog: &str) -> PathBuf {
        self.pins().join("links").join(prog)
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.pins().join("maps").join(name)
    }

    /// A program pinned by `run --bench-probes`.
    pub fn probe(&self, prog: &str) -> PathBuf {
        self.pins().join("probes").join(prog)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        detach(&self.bin, &self.bpffs);
    }
}

/// `bulkhead detach --force`: unpins (and so detaches) everything under `bpffs`.
pub fn detach(bin: &Path, bpffs: &Path) {
    if !bpffs.exists() {
        return;
    }
    let _ = Command::new(bin)
        .args(["detach", "--force", "--bpffs-dir"])
        .arg(bpffs)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A server helper's arguments, `PORT [SECS]`: returns the port, and ends
/// the process after SECS (default 600) whatever it is doing, so a
/// benchmark that dies cannot leave a server behind.
pub fn server_args(args: &[String]) -> Result<u16> {
    let port: u16 = args.first().ok_or_else(|| anyhow!("port"))?.parse()?;
    let limit: u64 = args.get(1).map_or(Ok(600), |s| s.parse())?;
    thread::spawn(move || {
        thread::sleep(Duration::from_secs(limit));
        std::process::exit(0);
    });
    Ok(port)
}
