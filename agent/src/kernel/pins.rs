//! The pin directory: a subdirectory per map layout, the lock that makes
//! one agent per directory, and retiring what earlier agents left.

use std::{
    ffi::CString,
    fs,
    io::ErrorKind,
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::programs::links::{FdLink, PinnedLink};

use super::{
    load::{self, EBPF_OBJECT, PENDING},
    sys::{Attr, BPF_LINK_DETACH, BPF_OBJ_GET, bpf, bpf_fd},
};

/// Bumped when the meaning of a map or shared type changes while every
/// size stays the same; size changes are caught by the fingerprint.
const LAYOUT_REVISION: u32 = 1;

/// Set only by the upgrade test: gives this binary another layout (a
/// different `BH_CGROUPS` size, so its maps really do not fit the
/// others'), as an earlier or later version would have.
const TEST_LAYOUT_ENV: &str = "BULKHEAD_TEST_LAYOUT";

/// The name of this binary's map layout: the revision and a fingerprint of
/// every map's definition in the object (type, key and value size, entries,
/// flags, pinning). Two binaries with the same name can share pinned maps; any other
/// pair cannot, and a new one takes over under its own directory.
pub fn layout() -> Result<String> {
    layout_of(EBPF_OBJECT)
}

fn layout_of(object: &[u8]) -> Result<String> {
    use sha2::{Digest as _, Sha256};
    // The first thing `run` reads of the object: a binary built without
    // kernel programs must say so here, not fail to parse ELF.
    let obj = aya_obj::Object::parse(load::embedded(object)?)
        .context("parsing the embedded kernel programs")?;
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
        let entries = if name == bulkhead_common::maps::MAP_EVENTS {
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

pub(super) fn test_layout() -> Option<String> {
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

/// Unpins a link and lets it detach (its last reference is the fd we drop).
pub(super) fn retire(path: &Path) -> Result<()> {
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

/// Removes one layout's pins: links (detached first), probes, maps, then
/// its directory.
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
            if sub.ends_with("links") {
                detach_link(&p)?;
            }
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

/// Detaches a pinned link from its cgroup now. Removing the pin alone
/// would leave that to the kernel, which drops a pin's reference after an
/// RCU grace period and a work item: `detach` could return while the
/// programs still decide (seen under a loaded VM). Links of a kind that
/// cannot be detached so (`EOPNOTSUPP`, `EINVAL`) go with their pin.
fn detach_link(path: &Path) -> Result<()> {
    let name = CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("pin path {}", path.display()))?;
    let mut get = Attr::new();
    get.u64(0, name.as_ptr() as u64);
    let link = match bpf_fd(BPF_OBJ_GET, &mut get) {
        Ok(fd) => fd,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("opening pinned link {}", path.display())),
    };
    let mut detach = Attr::new();
    detach.u32(0, link.as_raw_fd() as u32);
    match bpf(BPF_LINK_DETACH, &mut detach) {
        Ok(_) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) => Ok(()),
        Err(e) => {
            Err(e).with_context(|| format!("detaching the link pinned at {}", path.display()))
        }
    }
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
    #[test]
    fn a_binary_without_kernel_programs_says_how_to_get_them() {
        let e = super::layout_of(&[]).unwrap_err();
        assert!(format!("{e:#}").contains("cargo xtask setup"), "{e:#}");
    }
}
