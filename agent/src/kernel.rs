//! Loading, attaching and pinning the kernel programs.
//!
//! Everything lives under one bpffs directory (default
//! `/sys/fs/bpf/bulkhead`): `maps/` holds the policy, counter and event maps,
//! `links/` one pinned link per program. Pinned links keep enforcing when
//! the agent exits or crashes (fail closed). A new agent attaches its own
//! links first and only then retires the pinned ones, so there is never a
//! moment without enforcement.

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

/// Every program: (name in the object, what it does for `status`).
pub const PROGRAMS: [(&str, &str); 9] = [
    ("bh_connect4", "cgroup/connect4"),
    ("bh_connect6", "cgroup/connect6"),
    ("bh_sendmsg4", "cgroup/sendmsg4"),
    ("bh_sendmsg6", "cgroup/sendmsg6"),
    ("bh_sock_create", "cgroup/sock_create"),
    ("bh_post_bind4", "cgroup/post_bind4"),
    ("bh_post_bind6", "cgroup/post_bind6"),
    ("bh_egress", "cgroup_skb/egress"),
    ("bh_ingress", "cgroup_skb/ingress"),
];

pub struct Pins {
    pub root: PathBuf,
}

impl Pins {
    pub fn new(root: PathBuf) -> Self {
        Pins { root }
    }
    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }
    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }
    pub fn link(&self, prog: &str) -> PathBuf {
        self.links().join(prog)
    }
    /// Programs pinned for benchmarks (`run --bench-probes`), never attached.
    pub fn probes(&self) -> PathBuf {
        self.root.join("probes")
    }
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

/// Whether an agent holds the lock right now.
pub fn is_locked(pins: &Pins) -> bool {
    let Ok(dir) = fs::File::open(&pins.root) else {
        return false;
    };
    // SAFETY: valid fd; the lock is released when `dir` closes.
    unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) != 0 }
}

/// Loads the object, reusing the maps pinned by an earlier agent (so the
/// policy in force stays in force) and pinning new ones.
pub fn load(pins: &Pins, ring_bytes: u32) -> Result<Ebpf> {
    if EBPF_OBJECT.is_empty() {
        bail!(
            "this bulkhead binary was built without its kernel programs (bpf-linker was missing); run `cargo xtask setup` and rebuild"
        );
    }
    fs::create_dir_all(pins.maps())
        .with_context(|| format!("creating {}", pins.maps().display()))?;
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(pins.maps());
    loader.map_max_entries(agent_common::maps::MAP_EVENTS, ring_bytes);
    loader
        .load(EBPF_OBJECT)
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
        return e.context("the maps pinned by an earlier, different bulkhead version do not fit this one: run `bulkhead detach` first");
    }
    e.context("loading the kernel programs failed")
}

/// Attaches every program to `cgroup_root` with `BPF_F_ALLOW_MULTI`, pins
/// the new links, and retires links pinned by an earlier agent only after
/// all new ones are attached. Returns why packet sockets are not refused,
/// or `None` when they are.
pub fn attach_all(ebpf: &mut Ebpf, pins: &Pins, cgroup_root: &Path) -> Result<Option<String>> {
    let cgroup = fs::File::open(cgroup_root)
        .with_context(|| format!("opening cgroup {}", cgroup_root.display()))?;
    // These attach as BPF links, which the kernel always attaches with
    // BPF_F_ALLOW_MULTI (coexisting with systemd's and others' programs);
    // link_create itself takes no flags, so the mode passed is "no flags".
    let mode = CgroupAttachMode::Single;
    let mut fresh: Vec<(&str, FdLink)> = Vec::new();
    for (name, _) in PROGRAMS {
        let prog = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing from the object"))?;
        let link: FdLink = match name {
            "bh_egress" | "bh_ingress" => {
                let p: &mut CgroupSkb = prog.try_into()?;
                p.load().map_err(|e| verifier(name, e.into()))?;
                let ty = if name == "bh_egress" {
                    CgroupSkbAttachType::Egress
                } else {
                    CgroupSkbAttachType::Ingress
                };
                let id = p
                    .attach(&cgroup, ty, mode)
                    .with_context(|| format!("attaching {name}"))?;
                p.take_link(id)?.try_into()?
            }
            "bh_sock_create" | "bh_post_bind4" | "bh_post_bind6" => {
                let p: &mut CgroupSock = prog.try_into()?;
                p.load().map_err(|e| verifier(name, e.into()))?;
                let id = p
                    .attach(&cgroup, mode)
                    .with_context(|| format!("attaching {name}"))?;
                p.take_link(id)?.try_into()?
            }
            _ => {
                let p: &mut CgroupSockAddr = prog.try_into()?;
                p.load().map_err(|e| verifier(name, e.into()))?;
                let id = p
                    .attach(&cgroup, mode)
                    .with_context(|| format!("attaching {name}"))?;
                p.take_link(id)?.try_into()?
            }
        };
        fresh.push((name, link));
    }
    // Packet sockets are only visible to the BPF LSM hook; it is optional
    // because many kernels run without BPF LSM.
    let packet_sockets = match attach_lsm(ebpf, &cgroup) {
        Ok(link) => {
            fresh.push((LSM_PROGRAM, link));
            None
        }
        Err(e) => Some(format!("{e:#}")),
    };
    fs::create_dir_all(pins.links())
        .with_context(|| format!("creating {}", pins.links().display()))?;
    for (name, link) in fresh {
        let path = pins.link(name);
        retire(&path)?;
        link.pin(&path)
            .with_context(|| format!("pinning {}", path.display()))?;
    }
    Ok(packet_sockets)
}

/// How much the verifier had to check, per program: what start-up time on
/// a slow machine or an old kernel goes into.
pub fn verified(ebpf: &Ebpf, took: std::time::Duration) -> String {
    let mut total = 0u64;
    let mut parts = Vec::new();
    for (name, _) in PROGRAMS.iter().chain(&[(LSM_PROGRAM, "")]) {
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
        "programs loaded and attached in {:.1} s; the verifier checked {total} instructions ({})",
        took.as_secs_f64(),
        parts.join(", ")
    )
}

/// Programs only benchmarks use, loaded and pinned by `run --bench-probes`.
pub const PROBES: [&str; 1] = ["bh_probe_addr"];

/// Loads and pins [`PROBES`] under [`Pins::probes`] (not attached: they
/// only serve `BPF_PROG_TEST_RUN`).
pub fn pin_probes(ebpf: &mut Ebpf, pins: &Pins) -> Result<()> {
    fs::create_dir_all(pins.probes())
        .with_context(|| format!("creating {}", pins.probes().display()))?;
    for name in PROBES {
        let p: &mut CgroupSkb = ebpf
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

fn attach_lsm(ebpf: &mut Ebpf, cgroup: &fs::File) -> Result<FdLink> {
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
        .context("the kernel refused the BPF LSM program")?;
    let id = p.attach(cgroup).context("attaching the BPF LSM program")?;
    Ok(p.take_link(id)?.into())
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

/// Removes every link and map bulkhead pinned: enforcement stops.
pub fn detach(pins: &Pins) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for sub in [pins.links(), pins.probes(), pins.maps()] {
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
    match fs::remove_dir(&pins.root) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", pins.root.display())),
    }
    Ok(removed)
}
