//! `cargo xtask vm-test`: the end-to-end suites inside a throwaway VM that
//! boots another kernel (Debian 12's 6.1 by default), and the static (musl)
//! build it and the container image use.
//!
//! Steps: build the agent and the test executables for
//! `x86_64-unknown-linux-musl` (static, so they run on any kernel's
//! userland); fetch the kernel (`apt-get download`, cached in
//! `~/.cache/bulkhead/vm/`); write an initramfs holding busybox, the agent,
//! the tests, the test country database, `ip`/`nc`/`curl`/GNU `date` with
//! their shared libraries, the veth module, and an `/init` that mounts
//! proc/sys/cgroup2/bpffs/securityfs, runs each suite with
//! `--test-threads=1` and powers off; boot it under QEMU (KVM when
//! `/dev/kvm` works, TCG otherwise) with no network device; read the serial
//! console, report each test, and fail unless every test passed.
//! Everything lands in `target/vm-test/<kernel>/`: `initramfs.cpio`,
//! `console.log`, `results.json`.

#[path = "vm/initramfs.rs"]
mod initramfs;
#[path = "vm/kernel.rs"]
mod kernel;
#[path = "vm/systemd.rs"]
mod systemd;

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    cmd::{cargo, display, is_root, locked, run, workspace_root},
    setup::{self, MUSL_TARGET, geo_db_path},
    suites::{self, TestBins},
};
use initramfs::{Initramfs, host_program, is_static_elf};

/// The suites `--quick` runs: the domain and geofence end-to-end tests, the
/// packet-socket refusal that only a kernel with BPF LSM shows, and a
/// socket that listens after a disconnect, which the host's 6.18 refuses
/// to make (`SUITE:FILTER` runs the tests of SUITE whose names contain
/// FILTER).
const QUICK_SUITES: &[&str] = &[
    "domains",
    "geo",
    "bypass:packet_sockets",
    "bypass:listens_after",
];

/// Suites that test the agent's userspace with Python helpers (an OTLP
/// receiver, a CEL interpreter) whose packages the guest does not carry:
/// in the guest they would only skip, so they run on the host alone.
const HOST_ONLY_SUITES: &[&str] = &["otlp", "k8s"];

/// The LSMs the guest kernel boots with. Distribution kernels build BPF LSM
/// in but leave it out of the default list (Debian 11's), or put it last
/// (Debian 12's); naming it makes the packet-socket refusal testable.
const GUEST_LSM: &str = "lockdown,capability,bpf";

/// `SUITE[:FILTER]` → (SUITE, FILTER).
fn split_spec(spec: &str) -> (&str, Option<&str>) {
    match spec.split_once(':') {
        Some((suite, filter)) => (suite, Some(filter)),
        None => (spec, None),
    }
}

/// Marker the guest's /init prints before its own lines.
const MARK: &str = "BHVM";

#[derive(clap::Args)]
pub struct Args {
    /// The kernel to boot: `debian-11`, `debian-12` or `debian-13` (that
    /// release's newest kernel: 5.10, 6.1, 6.12, fetched from Debian's
    /// archive through a private apt configuration), `ubuntu-22.04` or
    /// `ubuntu-24.04` (5.15, 6.8, from Ubuntu's archive), `debian-6.1` (the
    /// host's apt sources' newest linux-image-6.1.0-*-amd64), another
    /// series those carry (`debian-6.12`), `host`
    /// (/boot/vmlinuz-$(uname -r) with its modules), or a path to a kernel
    /// `.deb` or a bare kernel image (bzImage; veth must then be built in).
    #[arg(long, default_value = "debian-6.1", value_name = "KERNEL")]
    kernel: String,
    /// Only the domain and geofence suites (what `.ci/run` uses).
    #[arg(long)]
    quick: bool,
    /// Instead of the suites: boot systemd (the host's) as PID 1, install
    /// deploy/systemd/bulkhead.service and check it with `systemctl`: ready
    /// only once enforcing, capabilities, reload, a rejected reload,
    /// restart after kill -9, stop, and a refused start with one
    /// capability fewer (what `.ci/run` uses too).
    #[arg(long, conflicts_with_all = ["quick", "suites"])]
    systemd: bool,
    /// Suites (test targets of the `tests` package) to run, comma-separated,
    /// e.g. `--suites domains,lifecycle`; `SUITE:FILTER` runs only the tests
    /// whose names contain FILTER. Default: all, or those of --quick.
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    suites: Vec<String>,
    /// Accelerator: `auto` (KVM when /dev/kvm can be opened, else TCG;
    /// falls back to TCG when KVM fails to start), `kvm` or `tcg`.
    #[arg(long, default_value = "auto", value_parser = ["auto", "kvm", "tcg"])]
    accel: String,
    /// Guest memory (QEMU `-m`).
    #[arg(long, default_value = "2G")]
    memory: String,
    /// Guest CPUs (QEMU `-smp`).
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// Kill the VM and fail after this many seconds (TCG runs the quick
    /// suites in ~7 minutes, all suites in well over half an hour).
    #[arg(long, default_value_t = 3600, value_name = "SECS")]
    timeout: u64,
    /// Build the initramfs and print the QEMU command line, but do not boot.
    #[arg(long)]
    no_boot: bool,
    /// Arguments for every test binary, e.g. a name filter:
    /// `cargo xtask vm-test -- bridge`.
    #[arg(last = true, value_name = "TEST_ARGS")]
    test_args: Vec<String>,
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || workspace_root().join("target"),
        |d| workspace_root().join(d),
    )
}

/// `cargo build --release -p bulkhead --target x86_64-unknown-linux-musl
/// [--features F]`, checked to be statically linked; returns the binary's
/// path (`target/x86_64-unknown-linux-musl/release/bulkhead`).
pub fn build_static(features: &[String]) -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--release",
        "--package",
        "bulkhead",
        "--target",
        MUSL_TARGET,
    ])
    .args(locked());
    if !features.is_empty() {
        cmd.args(["--features", &features.join(",")]);
    }
    run(&mut cmd)?;
    let bin = target_dir()
        .join(MUSL_TARGET)
        .join("release")
        .join("bulkhead");
    if !bin.is_file() {
        bail!("the build succeeded but {} does not exist", bin.display());
    }
    if !is_static_elf(&bin)? {
        bail!(
            "{} has a program interpreter: it is not statically linked",
            bin.display()
        );
    }
    // Show what `file` and `ldd` say, for the record (both optional).
    for tool in ["file", "ldd"] {
        if let Ok(out) = Command::new(tool).arg(&bin).output() {
            let text = String::from_utf8_lossy(&out.stdout).trim().to_string()
                + String::from_utf8_lossy(&out.stderr).trim();
            eprintln!("  {tool}: {text}");
        }
    }
    Ok(bin)
}

/// `cargo xtask build --static`.
pub fn build_static_task(features: &[String]) -> Result<PathBuf> {
    setup::setup_static()?;
    build_static(features)
}

/// The dynamic host programs the tests call, with where they go in the
/// guest (before busybox's applets on PATH). `/bin/sh` is dash: Debian's
/// static busybox prefers its own applets in `sh -c`, so its `ip` (no
/// `netns`) would shadow iproute2's.
const HOST_TOOLS: &[(&str, &str)] = &[
    ("dash", "/bin/sh"),
    ("ip", "/usr/sbin/ip"),
    ("nc.openbsd", "/usr/bin/nc"),
    ("curl", "/usr/bin/curl"),
    ("date", "/usr/bin/date"),
    // util-linux's: busybox's lacks --reuid/--regid (the tests' strangers).
    ("setpriv", "/usr/bin/setpriv"),
    ("logrotate", "/usr/sbin/logrotate"),
    ("nft", "/usr/sbin/nft"),
    // The name tests' resolver and clients (getent: glibc's resolver).
    ("dnsmasq", "/usr/sbin/dnsmasq"),
    ("dig", "/usr/bin/dig"),
    ("getent", "/usr/bin/getent"),
];

/// A small policy the guest's agent starts with once before the suites, so
/// the console shows the agent's kernel probe and warnings on this kernel.
const SMOKE_POLICY: &str =
    "version: 1\ndomains:\n  smoke: { cgroups: [\"/bhsmoke/a\"], networks: [10.99.0.0/24] }\n";

fn init_script(kernel: &kernel::Kernel, suites: &[String], test_args: &[String]) -> String {
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let args = test_args
        .iter()
        .map(|a| quote(a))
        .collect::<Vec<_>>()
        .join(" ");
    let modules = kernel
        .modules
        .iter()
        .filter_map(|m| m.file_name())
        .map(|n| {
            format!(
                "insmod /lib/modules/{} || echo '{MARK} insmod {} failed'\n",
                n.to_string_lossy(),
                n.to_string_lossy()
            )
        })
        .collect::<String>();
    let mut s = format!(
        r#"#!/bin/busybox sh
# bulkhead VM test runner (generated by `cargo xtask vm-test`).
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /usr/bin /usr/sbin
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu
export HOME=/root TERM=dumb RUST_BACKTRACE=1
export BULKHEAD_BIN=/bh/bulkhead BULKHEAD_TEST_GEO_DB=/bh/geo.mmdb
# Under TCG the verifier alone takes a minute per agent start.
export BULKHEAD_TEST_READY_SECS=900 BULKHEAD_TEST_SLACK_SECS=30
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /sys/fs/cgroup /sys/fs/bpf /var/lib /var/log /root /run/netns
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t bpf bpf /sys/fs/bpf
mount -t securityfs securityfs /sys/kernel/security
# The kernel runs BPF LSM (it was asked to, with lsm=) and has its cgroup
# hooks (6.0): the tests must then see packet sockets refused, not fall back
# to the CAP_NET_RAW mitigation.
case ",$(cat /sys/kernel/security/lsm)," in
  *,bpf,*) grep -q __cgroup_bpf_run_lsm_socket /sys/kernel/btf/vmlinux && export BULKHEAD_TEST_BPF_LSM=1;;
esac
{modules}ip link set lo up
hostname bhvm
echo "{MARK} start kernel=$(uname -r) lsm=$(cat /sys/kernel/security/lsm) cpus=$(nproc) mem=$(free -m | awk '/Mem:/{{print $2}}')M"
# The agent once: its startup lines (kernel probe warnings, or why it
# refuses) on this kernel, and how long it takes to enforce here.
mkdir -p /sys/fs/cgroup/bhsmoke/a
t0=$(date +%s)
/bh/bulkhead run --policy /bh/smoke.yaml --cgroup-root /sys/fs/cgroup/bhsmoke \
  --bpffs-dir /sys/fs/bpf/bhsmoke --no-stdout-events --run-dir /run/bhsmoke \
  --state-dir /var/lib/bhsmoke >/tmp/smoke.log 2>&1 &
pid=$!
i=0
while [ $i -lt 900 ] && kill -0 $pid 2>/dev/null && ! grep -q enforcing /tmp/smoke.log; do
  sleep 1; i=$((i+1))
done
ok=0; grep -q enforcing /tmp/smoke.log && ok=1
echo "{MARK} agent-start secs=$(( $(date +%s) - t0 )) ok=$ok"
kill -INT $pid 2>/dev/null; wait $pid
sed 's/^/{MARK} smoke: /' /tmp/smoke.log
/bh/bulkhead detach --force --bpffs-dir /sys/fs/bpf/bhsmoke >/dev/null 2>&1
rmdir /sys/fs/cgroup/bhsmoke/a /sys/fs/cgroup/bhsmoke 2>/dev/null
"#
    );
    // When the agent cannot start on this kernel every test would fail the
    // same way, each after a full (slow) load attempt: say so once instead.
    s.push_str(&format!(
        "if [ $ok != 1 ]; then\n  echo '{MARK} suites-skipped: the agent did not start on this kernel'\nelse\n"
    ));
    for spec in suites {
        let (suite, filter) = split_spec(spec);
        let run = std::iter::once("--test-threads=1".to_string())
            .chain(filter.map(quote))
            .chain((!args.is_empty()).then(|| args.clone()))
            .collect::<Vec<_>>()
            .join(" ");
        s.push_str(&format!(
            "echo '{MARK} suite-start {suite}'\n(cd /tmp && /bh/deps/{suite} {run})\necho \"{MARK} suite-end {suite} rc=$?\"\n"
        ));
    }
    s.push_str(&format!("fi\necho '{MARK} done'\nsync\npoweroff -f\n"));
    s
}

fn build_initramfs(
    kernel: &kernel::Kernel,
    agent: &Path,
    bins: &TestBins,
    suites: &[String],
    test_args: &[String],
    out: &Path,
) -> Result<usize> {
    let mut fs = Initramfs::default();
    for d in [
        "/proc", "/sys", "/dev", "/tmp", "/run", "/root", "/etc", "/var",
    ] {
        fs.dir(d);
    }
    fs.symlink("/var/run", "../run");
    fs.char_dev("/dev/console", 5, 1);
    fs.char_dev("/dev/null", 1, 3);
    fs.bytes(
        "/etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\n".to_vec(),
        0o644,
    );
    fs.bytes("/etc/group", b"root:x:0:\n".to_vec(), 0o644);
    fs.bytes(
        "/etc/hosts",
        b"127.0.0.1 localhost\n::1 localhost\n".to_vec(),
        0o644,
    );
    // What the libc resolver reads; the name tests mount their own
    // resolv.conf over this one.
    fs.bytes("/etc/nsswitch.conf", b"hosts: files dns\n".to_vec(), 0o644);
    fs.bytes("/etc/resolv.conf", Vec::new(), 0o644);
    let busybox = host_program("busybox")?;
    if !is_static_elf(&busybox)? {
        bail!(
            "{} is not statically linked: install busybox-static (cargo xtask setup does)",
            busybox.display()
        );
    }
    fs.file("/bin/busybox", &busybox)?;
    for (name, at) in HOST_TOOLS {
        fs.program_with_libs(at, &host_program(name)?)?;
    }
    fs.file("/bh/bulkhead", agent)?;
    fs.file("/bh/probe", &bins.probe)?;
    for spec in suites {
        let (s, _) = split_spec(spec);
        fs.file(&format!("/bh/deps/{s}"), &bins.suites[s])?;
    }
    fs.file("/bh/geo.mmdb", &geo_db_path()?)?;
    fs.bytes("/bh/smoke.yaml", SMOKE_POLICY.as_bytes().to_vec(), 0o644);
    for m in &kernel.modules {
        let name = m.file_name().context("module file name")?;
        fs.file(&format!("/lib/modules/{}", name.to_string_lossy()), m)?;
    }
    fs.bytes(
        "/init",
        init_script(kernel, suites, test_args).into_bytes(),
        0o755,
    );
    fs.write(out)?;
    Ok(fs.data_len())
}

/// Whether KVM can be used: /dev/kvm opens read-write, and it is not PVM
/// (`kvm_pvm`, the nested KVM of some cloud VMs without VT-x/AMD-V, which
/// runs only kernels built as PVM guests; a distribution kernel hangs).
fn kvm_usable() -> bool {
    if Path::new("/sys/module/kvm_pvm").exists() {
        eprintln!(
            "vm-test: /dev/kvm is PVM (kvm_pvm), which cannot boot distribution kernels: using TCG"
        );
        return false;
    }
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// With KVM, a guest that has not reached /init by then is taken as KVM
/// not working here (the run is retried under TCG when --accel auto).
const KVM_BOOT_LIMIT: Duration = Duration::from_secs(60);

fn qemu_command(kernel: &kernel::Kernel, initrd: &Path, args: &Args, kvm: bool) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-serial", "stdio", "-monitor", "none", "-no-reboot"])
        // No network device at all: nothing can leave the VM.
        .args(["-nic", "none"])
        .args(["-m", &args.memory, "-smp", &args.cpus.to_string()]);
    if kvm {
        cmd.args(["-accel", "kvm", "-cpu", "host"]);
    } else {
        // One host thread runs every vCPU in turn: with a thread each
        // (MTTCG), Debian 13's kernel now and then dies at boot on an int3
        // while it patches its own code on one vCPU and runs it on the
        // other. The suites barely use a second vCPU (the verifier is one
        // thread), and `.ci/run` boots two VMs at once.
        cmd.args(["-accel", "tcg,thread=single", "-cpu", "max"]);
    }
    cmd.arg("-kernel")
        .arg(&kernel.image)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            &format!("console=ttyS0 rdinit=/init panic=-1 loglevel=4 quiet lsm={GUEST_LSM}"),
        ]);
    cmd
}

/// One test's outcome, from libtest's `test NAME ... ok|FAILED|ignored`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
struct TestResult {
    suite: String,
    test: String,
    result: String,
}

/// What the console showed.
#[derive(Debug, Default, serde::Serialize)]
struct Outcome {
    tests: Vec<TestResult>,
    /// Suite name → exit status of its test binary.
    suite_rc: BTreeMap<String, i32>,
    /// Suite name → seconds it ran (host clock, from the console markers).
    suite_secs: BTreeMap<String, f64>,
    started: bool,
    done: bool,
    boot_secs: Option<f64>,
    smoke: Vec<String>,
    /// Seconds the guest's agent took from start to enforcing (or to
    /// giving up).
    agent_start_secs: Option<u64>,
    /// Whether the guest's agent reached "enforcing" in the smoke run.
    agent_started: bool,
    /// The suites were not run because the agent did not start.
    suites_skipped: bool,
}

/// Parses one console line into `o` (`suite` is the suite running now).
fn parse_line(o: &mut Outcome, suite: &mut Option<String>, line: &str, at: f64, t0: &mut f64) {
    let line = line.trim_end_matches(['\r', '\n']);
    if let Some(rest) = line.strip_prefix(MARK).map(str::trim_start) {
        if rest.starts_with("start ") {
            o.started = true;
            o.boot_secs = Some(at);
        } else if let Some(name) = rest.strip_prefix("suite-start ") {
            *suite = Some(name.trim().to_string());
            *t0 = at;
        } else if let Some(end) = rest.strip_prefix("suite-end ") {
            if let Some((name, rc)) = end.split_once(" rc=") {
                o.suite_rc
                    .insert(name.to_string(), rc.trim().parse().unwrap_or(-1));
                o.suite_secs.insert(name.to_string(), at - *t0);
            }
            *suite = None;
        } else if let Some(rest) = rest.strip_prefix("agent-start secs=") {
            let (secs, ok) = rest.split_once(" ok=").unwrap_or((rest, "0"));
            o.agent_start_secs = secs.trim().parse().ok();
            o.agent_started = ok.trim() == "1";
        } else if let Some(s) = rest.strip_prefix("smoke: ") {
            o.smoke.push(s.to_string());
        } else if rest.starts_with("suites-skipped") {
            o.suites_skipped = true;
        } else if rest == "done" {
            o.done = true;
        }
        return;
    }
    let Some(suite) = suite else { return };
    let Some(rest) = line.trim_start().strip_prefix("test ") else {
        return;
    };
    let Some((name, result)) = rest.rsplit_once(" ... ") else {
        return;
    };
    let result = result.trim();
    let result = if result.starts_with("ok") {
        "ok"
    } else if result.starts_with("FAILED") {
        "FAILED"
    } else if result.starts_with("ignored") {
        "ignored"
    } else {
        return;
    };
    o.tests.push(TestResult {
        suite: suite.clone(),
        test: name.trim().to_string(),
        result: result.to_string(),
    });
}

/// Boots the VM, streams its console to stderr and `log`, and parses it.
/// `Ok(None)` when QEMU exited before the guest printed anything, or the
/// guest did not reach /init within `start_limit` (KVM that cannot run
/// this kernel, for the TCG fallback).
fn boot(
    mut cmd: Command,
    log: &Path,
    timeout: Duration,
    start_limit: Option<Duration>,
) -> Result<Option<Outcome>> {
    eprintln!("+ {}", display(&cmd));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64 (cargo xtask setup installs qemu-system-x86)")?;
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().context("qemu stdout")?;
    let stderr = child.stderr.take().context("qemu stderr")?;
    let tx2 = tx.clone();
    let readers = [
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
                if tx
                    .send(String::from_utf8_lossy(&line).into_owned())
                    .is_err()
                {
                    break;
                }
            }
        }),
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).split(b'\n').map_while(Result::ok) {
                let l = format!("qemu: {}", String::from_utf8_lossy(&line));
                if tx2.send(l).is_err() {
                    break;
                }
            }
        }),
    ];
    let mut logf = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let started = Instant::now();
    let deadline = started + timeout;
    let mut o = Outcome::default();
    let mut suite = None;
    let mut t0 = 0.0;
    let mut guest_spoke = false;
    let mut timed_out = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(Duration::from_secs(1))) {
            Ok(line) => {
                use std::io::Write as _;
                let clean = line.trim_end_matches('\r');
                let _ = writeln!(logf, "{clean}");
                eprintln!("vm| {clean}");
                if !clean.starts_with("qemu: ") {
                    guest_spoke = true;
                    parse_line(
                        &mut o,
                        &mut suite,
                        clean,
                        started.elapsed().as_secs_f64(),
                        &mut t0,
                    );
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some(limit) = start_limit
                    && !o.started
                    && started.elapsed() >= limit
                {
                    eprintln!(
                        "vm-test: the guest did not reach /init within {}s",
                        limit.as_secs()
                    );
                    let _ = child.kill();
                    let _ = child.wait();
                    return Ok(None);
                }
                if Instant::now() >= deadline {
                    timed_out = true;
                    let _ = child.kill();
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = child.wait()?;
    for r in readers {
        let _ = r.join();
    }
    if timed_out {
        eprintln!(
            "vm-test: the VM ran past --timeout {}s and was killed",
            timeout.as_secs()
        );
    } else if !guest_spoke && !status.success() {
        return Ok(None);
    }
    Ok(Some(o))
}

pub fn run_task(args: Args) -> Result<()> {
    if !is_root() && !kvm_usable() {
        eprintln!("vm-test: note: not root and no usable /dev/kvm: the VM runs under TCG (slow)");
    }
    setup::setup_vm()?;
    let total = Instant::now();
    let cache = setup::cache_dir()?.join("vm");
    let kernel = kernel::resolve(&args.kernel, &cache)?;
    eprintln!(
        "vm-test: kernel {} ({})",
        kernel.label,
        kernel.image.display()
    );
    match &kernel.config {
        Some(c) => {
            for note in kernel::check_config(c)? {
                eprintln!("  config {note}");
            }
        }
        None => eprintln!("  config unknown (no config file beside the image)"),
    }

    let build = Instant::now();
    let agent = build_static(&[])?;
    let bins = suites::build(Some(MUSL_TARGET))?;
    let build_secs = build.elapsed().as_secs_f64();
    let suites: Vec<String> = if args.systemd {
        vec![systemd::SUITE.to_string()]
    } else if !args.suites.is_empty() {
        args.suites.clone()
    } else if args.quick {
        QUICK_SUITES.iter().map(|s| s.to_string()).collect()
    } else {
        bins.suites
            .keys()
            .filter(|s| !HOST_ONLY_SUITES.contains(&s.as_str()))
            .cloned()
            .collect()
    };
    for s in suites
        .iter()
        .filter(|_| !args.systemd)
        .map(|s| split_spec(s).0)
    {
        if HOST_ONLY_SUITES.contains(&s) {
            bail!(
                "suite `{s}` runs on the host only: its Python helpers are not in the guest \
                 (`cargo xtask test` runs it)"
            );
        }
        if !bins.suites.contains_key(s) {
            bail!(
                "no test suite `{s}`; the tests package has: {}",
                bins.suites.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        }
    }

    let mut work = target_dir().join("vm-test").join(&kernel.slug);
    if args.systemd {
        work.push("systemd");
    }
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let initrd = work.join("initramfs.cpio");
    let bytes = if args.systemd {
        systemd::build_initramfs(&agent, &bins.probe, &initrd)?
    } else {
        build_initramfs(&kernel, &agent, &bins, &suites, &args.test_args, &initrd)?
    };
    eprintln!(
        "vm-test: initramfs {} ({:.0} MiB; suites: {})",
        initrd.display(),
        bytes as f64 / (1 << 20) as f64,
        suites.join(", ")
    );

    let want_kvm = match args.accel.as_str() {
        "kvm" => true,
        "tcg" => false,
        _ => kvm_usable(),
    };
    if args.no_boot {
        eprintln!(
            "{}",
            display(&qemu_command(&kernel, &initrd, &args, want_kvm))
        );
        return Ok(());
    }
    let log = work.join("console.log");
    let timeout = Duration::from_secs(args.timeout);
    let vm = Instant::now();
    let mut accel = if want_kvm { "kvm" } else { "tcg" };
    let limit = (want_kvm && args.accel == "auto").then_some(KVM_BOOT_LIMIT);
    let mut outcome = boot(
        qemu_command(&kernel, &initrd, &args, want_kvm),
        &log,
        timeout,
        limit,
    )?;
    if outcome.is_none() && want_kvm && args.accel == "auto" {
        eprintln!("vm-test: QEMU could not start with KVM; retrying with TCG");
        accel = "tcg";
        outcome = boot(
            qemu_command(&kernel, &initrd, &args, false),
            &log,
            timeout,
            None,
        )?;
    }
    let Some(o) = outcome else {
        bail!(
            "QEMU exited before the guest printed anything (see {})",
            log.display()
        );
    };
    let vm_secs = vm.elapsed().as_secs_f64();
    report(
        &o,
        &suites,
        &kernel,
        accel,
        build_secs,
        vm_secs,
        total.elapsed().as_secs_f64(),
    );

    let results = work.join("results.json");
    let json = serde_json::json!({
        "kernel": kernel.label,
        "accel": accel,
        "build_secs": build_secs,
        "vm_secs": vm_secs,
        "outcome": o,
    });
    fs::write(&results, serde_json::to_string_pretty(&json)?)?;
    eprintln!(
        "vm-test: console {} results {}",
        log.display(),
        results.display()
    );

    let failed: Vec<&TestResult> = o.tests.iter().filter(|t| t.result == "FAILED").collect();
    let bad_suites: Vec<String> = suites
        .iter()
        .map(|s| split_spec(s).0)
        .filter(|s| o.suite_rc.get(*s) != Some(&0))
        .map(str::to_string)
        .collect();
    if !o.done || !o.agent_started || !failed.is_empty() || !bad_suites.is_empty() {
        bail!(
            "vm-test on {} failed: {}{} test(s) failed{}{}",
            kernel.label,
            if o.agent_started {
                ""
            } else {
                "the agent did not start (see the `agent:` lines above); "
            },
            failed.len(),
            if bad_suites.is_empty() {
                String::new()
            } else {
                format!(", suites not passing: {}", bad_suites.join(", "))
            },
            if o.done {
                ""
            } else {
                ", and the guest never finished (crash, panic or timeout: see the console log)"
            }
        );
    }
    eprintln!(
        "vm-test: all {} tests passed on {}",
        o.tests.len(),
        kernel.label
    );
    Ok(())
}

fn report(
    o: &Outcome,
    suites: &[String],
    kernel: &kernel::Kernel,
    accel: &str,
    build_secs: f64,
    vm_secs: f64,
    total_secs: f64,
) {
    eprintln!();
    eprintln!("vm-test results: {} under QEMU/{accel}", kernel.label);
    for line in &o.smoke {
        // All of it when the agent failed (verifier statistics included),
        // else its warnings.
        if !o.agent_started || line.contains("warning") {
            eprintln!("  agent: {line}");
        }
    }
    for s in suites.iter().map(|s| split_spec(s).0) {
        let rc = o.suite_rc.get(s).map_or(
            if o.suites_skipped {
                "not run: the agent did not start".to_string()
            } else {
                "did not finish".to_string()
            },
            |rc| format!("exit {rc}"),
        );
        let secs = o
            .suite_secs
            .get(s)
            .map_or(String::new(), |t| format!(", {t:.1}s"));
        eprintln!("  suite {s} ({rc}{secs})");
        for t in o.tests.iter().filter(|t| t.suite == s) {
            let mark = match t.result.as_str() {
                "ok" => "PASS",
                "FAILED" => "FAIL",
                _ => "SKIP",
            };
            eprintln!("    {mark} {}", t.test);
        }
    }
    let pass = o.tests.iter().filter(|t| t.result == "ok").count();
    let fail = o.tests.iter().filter(|t| t.result == "FAILED").count();
    eprintln!(
        "  {pass} passed, {fail} failed; boot {} s, agent start {} s, VM {vm_secs:.1} s, static builds {build_secs:.1} s, total {total_secs:.1} s",
        o.boot_secs.map_or("?".into(), |b| format!("{b:.1}")),
        o.agent_start_secs.map_or("?".into(), |b| b.to_string()),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_lines_become_results() {
        let mut o = Outcome::default();
        let mut suite = None;
        let mut t0 = 0.0;
        let lines = [
            "[    0.000000] Linux version 6.1.0-56-amd64",
            "BHVM start kernel=6.1.0-56-amd64 lsm=lockdown,capability,bpf cpus=2 mem=1987M",
            "BHVM agent-start secs=68 ok=1",
            "BHVM smoke: bulkhead: warning: optional kernel feature missing: bpf_sock_destroy kfunc",
            "test outside_a_suite ... ok",
            "BHVM suite-start domains",
            "running 2 tests",
            "test bridge_allows_only_its_proto_and_port ... ok",
            "test raw_sockets_refused_in_domain_workloads_only ... FAILED\r",
            "test slow ... ignored, needs a disk",
            "test result: FAILED. 1 passed; 1 failed; 1 ignored",
            "BHVM suite-end domains rc=101",
            "BHVM done",
        ];
        for (i, l) in lines.iter().enumerate() {
            parse_line(&mut o, &mut suite, l, i as f64, &mut t0);
        }
        assert!(o.started && o.done);
        assert_eq!(o.boot_secs, Some(1.0));
        assert_eq!(o.agent_start_secs, Some(68));
        assert!(o.agent_started);
        assert_eq!(o.smoke.len(), 1);
        assert_eq!(o.suite_rc["domains"], 101);
        assert_eq!(o.suite_secs["domains"], 6.0);
        let got: Vec<(&str, &str)> = o
            .tests
            .iter()
            .map(|t| (t.test.as_str(), t.result.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("bridge_allows_only_its_proto_and_port", "ok"),
                ("raw_sockets_refused_in_domain_workloads_only", "FAILED"),
                ("slow", "ignored"),
            ]
        );
    }

    #[test]
    fn init_script_runs_each_suite_and_powers_off() {
        let k = kernel::Kernel {
            label: "t".into(),
            slug: "t".into(),
            image: "/x".into(),
            modules: vec!["/c/veth.ko".into()],
            config: None,
        };
        let s = init_script(
            &k,
            &["domains".into(), "geo".into(), "bypass:packet".into()],
            &["it's".into()],
        );
        assert!(s.starts_with("#!/bin/busybox sh\n"));
        assert!(s.contains("insmod /lib/modules/veth.ko"));
        assert!(s.contains("mount -t cgroup2 cgroup2 /sys/fs/cgroup"));
        assert!(s.contains("/bh/deps/domains --test-threads=1 'it'\\''s'"));
        assert!(s.contains("/bh/deps/bypass --test-threads=1 'packet' 'it'\\''s'"));
        assert!(s.contains("BHVM suite-end bypass rc=$?"));
        let bare = init_script(&k, &["geo".into()], &[]);
        assert!(bare.contains("/bh/deps/geo --test-threads=1)"));
        assert!(s.contains("BHVM suite-end geo rc=$?"));
        assert!(s.trim_end().ends_with("poweroff -f"));
    }
}
