//! Loading, attaching and pinning the kernel programs.
//!
//! Everything lives under one bpffs directory (default
//! `/sys/fs/bpf/bulkhead`), in a subdirectory per map layout
//! (`<layout>/maps`, `<layout>/links`): a binary whose maps differ from the
//! pinned ones loads next to them instead of into them. Pinned links keep
//! enforcing when the agent exits or crashes (fail closed).
//!
//! Start-up is ordered so that a process death at any instant leaves a
//! whole policy enforced: every program is verified before anything is
//! written or attached ([`verify_all`]); each link is pinned the moment it
//! exists ([`attach`]), and a new policy only goes live once every link
//! is pinned; links and maps of an earlier agent (or layout) are retired
//! only after that ([`retire_others`]).

use std::{
    fs,
    io::ErrorKind,
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr,
        links::{FdLink, PinnedLink},
    },
};

/// The kernel programs, embedded at build time (see build.rs).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bulkhead"));

/// The embedded programs, or why there are none.
fn object() -> Result<&'static [u8]> {
    if EBPF_OBJECT.is_empty() {
        bail!(
            "this bulkhead binary was built without its kernel programs (bpf-linker was missing); run `cargo xtask setup` and rebuild"
        );
    }
    Ok(EBPF_OBJECT)
}

/// What kind of cgroup program, so loading and attaching need no name
/// matching.
#[derive(Clone, Copy)]
pub enum Kind {
    SockAddr,
    Sock,
    Skb(CgroupSkbAttachType),
}

/// When a program attaches during start-up.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Records who binds what; refuses nothing. Attached before the
    /// sockets bound earlier are recorded, so none is missed in between.
    Owners,
    /// Decides. Inert while the generation in force is 0.
    Enforce,
}

/// One kernel program of the object.
pub struct Program {
    /// Name in the object (and of its pinned link).
    pub name: &'static str,
    /// The hook, for `status`.
    pub hook: &'static str,
    pub kind: Kind,
    pub stage: Stage,
}

/// Every cgroup program, in attach order: the packet hooks (the backstop)
/// before the `connect`/`sendmsg` hooks, so when a new agent's own maps
/// start deciding, all its hooks decide together.
pub const PROGRAMS: [Program; 9] = [
    Program {
        name: "bh_post_bind4",
        hook: "cgroup/post_bind4",
        kind: Kind::Sock,
        stage: Stage::Owners,
    },
    Program {
        name: "bh_post_bind6",
        hook: "cgroup/post_bind6",
        kind: Kind::Sock,
        stage: Stage::Owners,
    },
    Program {
        name: "bh_sock_create",
        hook: "cgroup/sock_create",
        kind: Kind::Sock,
        stage: Stage::Enforce,
    },
    Program {
        name: "bh_egress",
        hook: "cgroup_skb/egress",
        kind: Kind::Skb(CgroupSkbAttachType::Egress),
        stage: Stage::Enforce,
    },
    Program {
        name: "bh_ingress",
        hook: "cgroup_skb/ingress",
        kind: Kind::Skb(CgroupSkbAttachType::Ingress),
        stage: Stage::Enforce,
    },
    Program {
        name: "bh_connect4",
        hook: "cgroup/connect4",
        kind: Kind::SockAddr,
        stage: Stage::Enforce,
    },
    Program {
        name: "bh_connect6",
        hook: "cgroup/connect6",
        kind: Kind::SockAddr,
        stage: Stage::Enforce,
    },
    Program {
        name: "bh_sendmsg4",
        hook: "cgroup/sendmsg4",
        kind: Kind::SockAddr,
        stage: Stage::Enforce,
    },
    Program {
        name: "bh_sendmsg6",
        hook: "cgroup/sendmsg6",
        kind: Kind::SockAddr,
        stage: Stage::Enforce,
    },
];

/// Bumped when the meaning of a map or shared type changes while every
/// size stays the same; size changes are caught by the fingerprint.
const LAYOUT_REVISION: u32 = 1;

/// Set only by the upgrade test: gives this binary another layout (a
/// different `BH_CGROUPS` size, so its maps really do not fit the
/// others'), as an earlier or later version would have.
const TEST_LAYOUT_ENV: &str = "BULKHEAD_TEST_LAYOUT";

/// Set only by tests: the program named is treated as refused by the
/// verifier, to show that such a start changes nothing that enforces.
const TEST_REFUSE_ENV: &str = "BULKHEAD_TEST_REFUSE_PROGRAM";

/// The name of this binary's map layout: the revision and a fingerprint of
/// every map's definition in the object (type, key and value size, entries,
/// flags, pinning). Two binaries with the same name can share pinned maps; any other
/// pair cannot, and a new one takes over under its own directory.
pub fn layout() -> Result<String> {
    use sha2::{Digest as _, Sha256};
    let obj =
        aya_obj::Object::parse(EBPF_OBJECT).context("parsing the embedded kernel programs")?;
    let mut maps: Vec<_> = obj.maps.iter().collect();
    maps.sort_by(|a, b| a.0.cmp(b.0));
    let mut h = Sha256::new();
    for (name, m) in maps {
        // Unpinned maps (the kernel log's ring buffer, globals) are never
        // shared: they do not decide whether two binaries can share pins.
        if m.pinning() != aya_obj::maps::PinningType::ByName {
            continue;
        }
        // The ring buffer's size is a run-time flag, not part of the layout.
        let entries = if name == agent_common::maps::MAP_EVENTS {
            0
        } else {
            m.max_entries()
        };
        h.update(format!(
            "{name} {} {} {} {entries} {} {:?}\n",
            m.map_type(),
            m.key_size(),
            m.value_size(),
            m.map_flags(),
            m.pinning()
        ));
    }
    if let Some(salt) = test_layout() {
        h.update(salt.as_bytes());
    }
    let digest = h.finalize();
    Ok(format!(
        "layout-{LAYOUT_REVISION}-{:02x}{:02x}{:02x}{:02x}",
        digest[0], digest[1], digest[2], digest[3]
    ))
}

fn test_layout() -> Option<String> {
    std::env::var(TEST_LAYOUT_ENV)
        .ok()
        .filter(|s| !s.is_empty())
}

/// The pin directory (`root`) and this binary's layout directory in it.
pub struct Pins {
    pub root: PathBuf,
    pub layout: String,
}

impl Pins {
    pub fn new(root: PathBuf, layout: String) -> Self {
        Pins { root, layout }
    }
    /// The pins of this binary's layout.
    pub fn dir(&self) -> PathBuf {
        self.root.join(&self.layout)
    }
    pub fn maps(&self) -> PathBuf {
        self.dir().join("maps")
    }
    pub fn links(&self) -> PathBuf {
        self.dir().join("links")
    }
    pub fn link(&self, prog: &str) -> PathBuf {
        self.links().join(prog)
    }
    /// Programs pinned for benchmarks (`run --bench-probes`), never attached.
    pub fn probes(&self) -> PathBuf {
        self.dir().join("probes")
    }
    /// The pins of whatever layout is there, for the commands that read
    /// them without loading anything (`dump`): this binary's if present,
    /// else the only other one.
    pub fn found(root: PathBuf) -> Result<Self> {
        let mine = layout()?;
        if root.join(&mine).is_dir() {
            return Ok(Pins::new(root, mine));
        }
        // `Pins::dir` of the unversioned layout is `root/.`: the root.
        let others = layouts(&root);
        match others.as_slice() {
            [one] => Ok(Pins::new(root, one.clone())),
            [] => bail!("nothing is pinned under {}", root.display()),
            _ => bail!(
                "several map layouts are pinned under {} ({}); an agent is taking over",
                root.display(),
                others.join(", ")
            ),
        }
    }
}

/// The layout of agents from before layouts had directories: `maps/` and
/// `links/` directly under the pin directory.
const UNVERSIONED: &str = ".";

/// Layout directories present under `root`, [`UNVERSIONED`] included.
fn layouts(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if root.join("maps").is_dir() || root.join("links").is_dir() {
        out.push(UNVERSIONED.to_string());
    }
    if let Ok(entries) = fs::read_dir(root) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("layout-") && e.path().is_dir() {
                out.push(name);
            }
        }
    }
    out.sort();
    out
}

/// Makes sure a bpffs is mounted at (a parent of) `dir`'s base, mounting
/// `/sys/fs/bpf` when nothing is there.
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    let base = dir
        .ancestors()
        .find(|p| p.parent() == Some(Path::new("/sys/fs")))
        .unwrap_or(Path::new("/sys/fs/bpf"));
    if is_bpffs(base) {
        return Ok(());
    }
    fs::create_dir_all(base).with_context(|| format!("creating {}", base.display()))?;
    let target = std::ffi::CString::new(base.as_os_str().as_encoded_bytes())?;
    // SAFETY: NUL-terminated strings, null data.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        bail!(
            "no BPF filesystem at {} and mounting one failed: {e}; mount it with `mount -t bpf bpf {}` \
             (needs CAP_SYS_ADMIN)",
            base.display(),
            base.display()
        );
    }
    Ok(())
}

fn is_bpffs(p: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs into a zeroed struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}

/// Closes the pin directory to everyone but its owner: a pinned map opened
/// by an unprivileged user would let them read who talks to whom, or write
/// the policy. Refuses a directory someone else owns (on a bpffs mounted
/// world-writable, anyone could have created it first to swap pins later).
pub fn secure(pins: &Pins) -> Result<()> {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    let mut todo = vec![pins.root.clone()];
    while let Some(p) = todo.pop() {
        let m = fs::symlink_metadata(&p).with_context(|| format!("inspecting {}", p.display()))?;
        if !crate::trust::trusted_owner(m.uid(), me) {
            bail!(
                "{} is owned by uid {}, not root: an unprivileged user could replace what is pinned there; \
                 remove it (as root) or pass a different --bpffs-dir",
                p.display(),
                m.uid()
            );
        }
        let mode = if m.is_dir() { 0o700 } else { 0o600 };
        if m.mode() & 0o7777 != mode {
            fs::set_permissions(&p, fs::Permissions::from_mode(mode))
                .with_context(|| format!("restricting {} to mode {mode:04o}", p.display()))?;
        }
        if m.is_dir() {
            for e in fs::read_dir(&p).with_context(|| format!("reading {}", p.display()))? {
                todo.push(e?.path());
            }
        }
    }
    Ok(())
}

/// An exclusive lock on the pin directory: one agent per pin directory.
pub struct PinLock {
    _fd: OwnedFd,
}

pub fn lock(pins: &Pins) -> Result<PinLock> {
    fs::create_dir_all(&pins.root).with_context(|| format!("creating {}", pins.root.display()))?;
    let dir =
        fs::File::open(&pins.root).with_context(|| format!("opening {}", pins.root.display()))?;
    // SAFETY: valid fd.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            bail!(
                "another bulkhead agent is already running with {} (stop it first, or pass a different --bpffs-dir)",
                pins.root.display()
            );
        }
        return Err(e).context("locking the pin directory");
    }
    Ok(PinLock { _fd: dir.into() })
}

/// Whether an agent holds the lock on the pin directory `root` right now.
pub fn is_locked(root: &Path) -> bool {
    let Ok(dir) = fs::File::open(root) else {
        return false;
    };
    // SAFETY: valid fd; the lock is released when `dir` closes.
    unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) != 0 }
}

/// Loads the object, reusing the maps pinned by an earlier agent of the
/// same layout (so the policy in force stays in force) and pinning new
/// ones. Nothing is verified or attached yet.
pub fn load(pins: &Pins, ring_bytes: u32) -> Result<Ebpf> {
    fs::create_dir_all(pins.maps())
        .with_context(|| format!("creating {}", pins.maps().display()))?;
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(pins.maps());
    loader.map_max_entries(agent_common::maps::MAP_EVENTS, ring_bytes);
    if test_layout().is_some() {
        loader.map_max_entries(
            agent_common::maps::MAP_CGROUPS,
            agent_common::maps::MAX_CGROUPS + 1,
        );
    }
    loader
        .load(object()?)
        .map_err(|e| explain_load_error(e.into()))
}

/// Turns the common failures into what is missing and how to fix it,
/// instead of a verifier dump.
fn explain_load_error(e: anyhow::Error) -> anyhow::Error {
    let chain = format!("{e:#}");
    if chain.contains("Operation not permitted") || chain.contains("EPERM") {
        return e.context("loading BPF programs was refused: run as root, or with CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN (and CAP_SYS_ADMIN to mount bpffs)");
    }
    if chain.contains("map pin") || chain.contains("pinned") {
        return e.context(
            "the maps pinned under this layout's directory do not fit this binary (a build that \
             changed a map without changing the layout name?); `bulkhead detach` removes them",
        );
    }
    e.context("loading the kernel programs failed")
}

/// Verifies and loads every program into the kernel, attaching none: a
/// program the kernel refuses stops the start before anything that is
/// enforced changes. Returns why packet sockets cannot be refused (the
/// optional BPF LSM program), or `None` when they can.
pub fn verify_all(ebpf: &mut Ebpf) -> Result<Option<String>> {
    for p in &PROGRAMS {
        let name = p.name;
        let prog = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing from the object"))?;
        if std::env::var(TEST_REFUSE_ENV).is_ok_and(|v| v == name) {
            bail!("the kernel verifier rejected {name} ({TEST_REFUSE_ENV} says so, for a test)");
        }
        let loaded = match p.kind {
            Kind::SockAddr => TryInto::<&mut CgroupSockAddr>::try_into(prog)?.load(),
            Kind::Sock => TryInto::<&mut CgroupSock>::try_into(prog)?.load(),
            Kind::Skb(_) => TryInto::<&mut CgroupSkb>::try_into(prog)?.load(),
        };
        loaded.map_err(|e| verifier(name, e.into()))?;
    }
    // Packet sockets are only visible to the BPF LSM hook; it is optional
    // because many kernels run without BPF LSM.
    Ok(load_lsm(ebpf).err().map(|e| format!("{e:#}")))
}

/// Attaches the verified programs of `stage` to `cgroup` and pins each
/// link the moment it exists: a new link is pinned under a temporary name
/// and renamed over the pin of the link it replaces, so the old link
/// detaches only once the new one enforces, and a death between the two
/// steps leaves both (a stray temporary pin, retired by the next agent).
pub fn attach(ebpf: &mut Ebpf, pins: &Pins, cgroup: &fs::File, stage: Stage) -> Result<()> {
    fs::create_dir_all(pins.links())
        .with_context(|| format!("creating {}", pins.links().display()))?;
    // These attach as BPF links, which the kernel always attaches with
    // BPF_F_ALLOW_MULTI (coexisting with systemd's and others' programs);
    // link_create itself takes no flags, so the mode passed is "no flags".
    let mode = CgroupAttachMode::Single;
    for p in PROGRAMS.iter().filter(|p| p.stage == stage) {
        let name = p.name;
        let prog = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing from the object"))?;
        let link: FdLink = match p.kind {
            Kind::SockAddr => {
                let p: &mut CgroupSockAddr = prog.try_into()?;
                let id = p.attach(cgroup, mode);
                p.take_link(id.with_context(|| format!("attaching {name}"))?)?
                    .try_into()?
            }
            Kind::Sock => {
                let p: &mut CgroupSock = prog.try_into()?;
                let id = p.attach(cgroup, mode);
                p.take_link(id.with_context(|| format!("attaching {name}"))?)?
                    .try_into()?
            }
            Kind::Skb(ty) => {
                let p: &mut CgroupSkb = prog.try_into()?;
                let id = p.attach(cgroup, ty, mode);
                p.take_link(id.with_context(|| format!("attaching {name}"))?)?
                    .try_into()?
            }
        };
        pin_link(link, pins, name)?;
    }
    if stage == Stage::Enforce && ebpf.program(LSM_PROGRAM).is_some_and(|p| p.fd().is_ok()) {
        let p: &mut aya::programs::LsmCgroup = ebpf
            .program_mut(LSM_PROGRAM)
            .ok_or_else(|| anyhow!("program {LSM_PROGRAM} missing from the object"))?
            .try_into()?;
        let id = p.attach(cgroup).context("attaching the BPF LSM program")?;
        pin_link(p.take_link(id)?.into(), pins, LSM_PROGRAM)?;
    }
    Ok(())
}

/// Suffix of a link pinned but not yet renamed into place (bpffs refuses
/// names with dots).
const PENDING: &str = "_pending";

fn pin_link(link: FdLink, pins: &Pins, name: &str) -> Result<()> {
    let path = pins.link(name);
    let pending = pins.link(&format!("{name}{PENDING}"));
    // A stray pending pin of a dead agent: its link enforces the same maps;
    // replacing the pin retires it.
    retire(&pending)?;
    link.pin(&pending)
        .with_context(|| format!("pinning {}", pending.display()))?;
    fs::rename(&pending, &path)
        .with_context(|| format!("renaming {} to {}", pending.display(), path.display()))?;
    Ok(())
}

/// How much the verifier had to check, per program: what start-up time on
/// a slow machine or an old kernel goes into.
pub fn verified(ebpf: &Ebpf, took: std::time::Duration) -> String {
    let mut total = 0u64;
    let mut parts = Vec::new();
    for name in PROGRAMS.iter().map(|p| p.name).chain([LSM_PROGRAM]) {
        let n = ebpf
            .program(name)
            .and_then(|p| p.info().ok())
            .and_then(|i| i.verified_instruction_count());
        if let Some(n) = n {
            total += u64::from(n);
            parts.push(format!("{name} {n}"));
        }
    }
    format!(
        "programs verified and loaded in {:.1} s; the verifier checked {total} instructions ({})",
        took.as_secs_f64(),
        parts.join(", ")
    )
}

/// The benchmark-only programs, embedded apart from the production object
/// (agent-ebpf's `bulkhead-bench` binary), so production never carries them.
static BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bulkhead-bench"));

/// The kernel programs' log records (aya-log: rare paths only, see
/// agent-ebpf's `log.rs`), each with its program as the `log` target
/// (`bulkhead::kernel::bh_ingress`, ...).
pub type KernelLog = aya_log::EbpfLogger<&'static dyn log::Log>;

/// Takes the kernel log's ring buffer out of `ebpf`, to be read by
/// [`drive_kernel_log`]. Call it after [`verify_all`]: the loaded programs
/// hold the ring buffer open, so a logger dropped later closes nothing
/// they need (taken before they load, it would). `None` when the object
/// has no log sites, which is not an error.
pub fn start_kernel_log(ebpf: &mut Ebpf) -> Result<Option<KernelLog>> {
    match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => Ok(Some(logger)),
        Err(aya_log::Error::MapNotFound) => Ok(None),
        Err(e) => Err(e).context("opening the kernel programs' log"),
    }
}

/// Forwards the kernel's log records into the `log` crate as they arrive,
/// for as long as the agent runs: a task on the agent's tokio runtime
/// (`tokio::spawn(drive_kernel_log(logger))`), woken by the ring buffer's
/// fd, so no thread polls. Records that arrive while nothing reads are
/// kept until the ring buffer is full, then dropped by the kernel.
pub async fn drive_kernel_log(logger: KernelLog) -> Result<()> {
    use tokio::io::{Interest, unix::AsyncFd};
    // SAFETY: the logger owns the ring buffer's fd for its whole life and
    // always returns that one.
    let mut fd = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(std::io::Error::from)
        .context("watching the kernel programs' log")?;
    loop {
        let mut ready = fd
            .readable_mut()
            .await
            .context("waiting for the kernel programs' log")?;
        ready.get_inner_mut().flush();
        ready.clear_ready();
    }
}

/// Programs only benchmarks use, loaded and pinned by `run --bench-probes`.
pub const PROBES: [&str; 1] = ["bh_probe_addr"];

/// Loads the benchmark object on the maps the agent's object (`_agent`,
/// loaded, so its maps are pinned) pinned, and pins [`PROBES`] under
/// [`Pins::probes`] (not attached: they only serve `BPF_PROG_TEST_RUN`).
/// Every map the probes use must already be pinned, or a probe would
/// measure a fresh empty map of its own.
pub fn pin_probes(_agent: &mut Ebpf, pins: &Pins) -> Result<()> {
    if BENCH_OBJECT.is_empty() {
        object()?;
        bail!("this bulkhead binary was built without its benchmark programs");
    }
    let bench =
        aya_obj::Object::parse(BENCH_OBJECT).context("parsing the embedded benchmark programs")?;
    for (name, m) in &bench.maps {
        if m.pinning() == aya_obj::maps::PinningType::ByName && !pins.maps().join(name).exists() {
            bail!(
                "the benchmark programs use map {name}, which the agent has not pinned under {}",
                pins.maps().display()
            );
        }
    }
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(pins.maps());
    let mut probes = loader
        .load(BENCH_OBJECT)
        .map_err(|e| explain_load_error(e.into()))?;
    fs::create_dir_all(pins.probes())
        .with_context(|| format!("creating {}", pins.probes().display()))?;
    for name in PROBES {
        let p: &mut CgroupSkb = probes
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing from the object"))?
            .try_into()?;
        p.load().map_err(|e| verifier(name, e.into()))?;
        let path = pins.probes().join(name);
        let _ = fs::remove_file(&path);
        p.pin(&path)
            .with_context(|| format!("pinning {}", path.display()))?;
    }
    Ok(())
}

/// The `lsm_cgroup/socket_create` program refusing packet sockets.
pub const LSM_PROGRAM: &str = "bh_socket_create";

fn load_lsm(ebpf: &mut Ebpf) -> Result<()> {
    let lsms = fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
    if !lsms.split(',').any(|l| l.trim() == "bpf") {
        bail!(
            "BPF LSM is not active (/sys/kernel/security/lsm: {:?}; boot with lsm=...,bpf)",
            lsms.trim()
        );
    }
    let btf = aya::Btf::from_sys_fs().context("reading the kernel's BTF")?;
    let p: &mut aya::programs::LsmCgroup = ebpf
        .program_mut(LSM_PROGRAM)
        .ok_or_else(|| anyhow!("program {LSM_PROGRAM} missing from the object"))?
        .try_into()?;
    // EPERM here means the kernel (or a lockdown) refuses LSM programs,
    // not missing privileges: the cgroup programs loaded fine.
    p.load("socket_create", &btf)
        .context("the kernel refused the BPF LSM program")
}

fn verifier(name: &str, e: anyhow::Error) -> anyhow::Error {
    let chain = format!("{e:#}");
    if chain.contains("Operation not permitted") {
        return e.context(format!("the kernel refused to load {name}: run as root, or with CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN (and CAP_SYS_ADMIN to mount bpffs)"));
    }
    // The verifier log is long; keep it for debugging but lead with what failed.
    e.context(format!(
        "the kernel verifier rejected {name} (kernel too old or missing a feature?)"
    ))
}

/// Unpins a link and lets it detach (its last reference is the fd we drop).
fn retire(path: &Path) -> Result<()> {
    match PinnedLink::from_pin(path) {
        Ok(old) => {
            let fd: FdLink = old
                .unpin()
                .with_context(|| format!("unpinning {}", path.display()))?;
            drop(fd);
            Ok(())
        }
        Err(_) if !path.exists() => Ok(()),
        Err(e) => Err(e).with_context(|| format!("opening pinned link {}", path.display())),
    }
}

/// Once this agent's links are pinned and its policy is live: retires what
/// other agents left that no longer belongs, links first (they stop
/// enforcing; this agent's already do), then their maps. That is every
/// other layout's directory (an upgrade or a downgrade across map
/// layouts), and stray pending link pins in this layout's own. Returns
/// the layouts removed.
pub fn retire_others(pins: &Pins) -> Result<Vec<String>> {
    if let Ok(entries) = fs::read_dir(pins.links()) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().ends_with(PENDING) {
                retire(&e.path())?;
            }
        }
    }
    let mut removed = Vec::new();
    for other in layouts(&pins.root) {
        if other == pins.layout {
            continue;
        }
        remove_layout(&pins.root, &other)?;
        removed.push(other);
    }
    Ok(removed)
}

/// Removes one layout's pins: links (retired, so they detach), probes,
/// maps, then its directory.
fn remove_layout(root: &Path, layout: &str) -> Result<Vec<PathBuf>> {
    let dir = if layout == UNVERSIONED {
        root.to_path_buf()
    } else {
        root.join(layout)
    };
    let mut removed = Vec::new();
    for sub in ["links", "probes", "maps"] {
        let sub = dir.join(sub);
        let entries = match fs::read_dir(&sub) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("listing {}", sub.display())),
        };
        for e in entries {
            let p = e?.path();
            fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            removed.push(p);
        }
        let _ = fs::remove_dir(&sub);
    }
    if layout != UNVERSIONED {
        match fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", dir.display())),
        }
    }
    Ok(removed)
}

/// Removes every link and map bulkhead pinned under `root`, of every
/// layout: enforcement stops.
pub fn detach(root: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for layout in layouts(root) {
        removed.extend(remove_layout(root, &layout)?);
    }
    match fs::remove_dir(root) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", root.display())),
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The kernel log opens on the real object once its programs are
    /// verified, and a task drives it. Needs root (loading programs): the
    /// unprivileged unit test run skips it with the reason; as root a
    /// missing object or bpffs fails it under CI.
    #[test]
    fn kernel_log_starts_after_verification() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: needs root to load BPF programs");
            return;
        }
        let skip = |why: &str| {
            assert!(std::env::var_os("CI").is_none(), "{why}");
            eprintln!("SKIPPED: {why}");
        };
        if EBPF_OBJECT.is_empty() {
            return skip("built without the kernel programs (bpf-linker missing)");
        }
        let root = PathBuf::from(format!(
            "/sys/fs/bpf/bulkhead-test-log-{}",
            std::process::id()
        ));
        if ensure_bpffs(&root).is_err() {
            return skip("no bpffs");
        }
        let pins = Pins::new(root.clone(), layout().expect("layout"));
        let result = (|| -> Result<()> {
            let mut ebpf = load(&pins, 4096)?;
            verify_all(&mut ebpf)?;
            let logger = start_kernel_log(&mut ebpf)?.context("no kernel log in the object")?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let driven =
                    tokio::time::timeout(Duration::from_millis(200), drive_kernel_log(logger));
                // Nothing logs here: the task is still waiting when the time is up.
                assert!(driven.await.is_err(), "the kernel log task ended");
            });
            // A second start on the same object finds its log taken: no
            // logger, not an error.
            assert!(start_kernel_log(&mut ebpf)?.is_none());
            Ok(())
        })();
        let _ = detach(&root);
        result.expect("kernel log");
    }
}
