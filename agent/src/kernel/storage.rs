//! The socket storage map (`BH_SOCKS`), created where no memory cgroup is
//! charged for it.
//!
//! The kernel charges every element of a map to the memory cgroup of the
//! process that created the map (Linux 5.11 and later). A socket's storage
//! is allocated by the programs, for sockets of every cgroup on the host,
//! so an agent that created the map in its own memory cgroup pays for the
//! host's sockets:
//! - the charge is forced past the cgroup's limit (the programs allocate
//!   with `GFP_ATOMIC`, which memcg never refuses), and the agent's next
//!   allocation of its own then finds the cgroup full: the kernel kills it.
//!   Tried: 36 000 sockets bound by another cgroup put an agent 16 MB
//!   over its limit, and its next reload was OOM-killed;
//! - every connect of a domain's workload switches the CPU's charge cache
//!   between the workload's cgroup (the socket) and the agent's (its
//!   storage): `bh_connect4` took 2.8 µs per loopback connect, 1.9 µs with
//!   the map created in the root memory cgroup.
//!
//! So a first agent creates the map from a child process that moves itself
//! into the root memory cgroup, which charges nothing, and pins it where
//! the loader then finds it. A socket's storage still counts against the
//! socket's own option memory (`net.core.optmem_max`), as every socket
//! option does. Where the child cannot move (a read-only cgroup tree, as
//! systemd's `ProtectControlGroups=` makes it, or a container's cgroup
//! namespace), the loader creates the map as before, charged to the agent,
//! and the agent says so at start. `bulkhead prepare` makes the map the
//! same way before the agent starts, from outside its sandbox: the systemd
//! unit runs it as `ExecStartPre=-+`.
//!
//! In a container with a cgroup namespace of its own but the host's PID
//! namespace and cgroup tree (the DaemonSet's pod), the child first enters
//! PID 1's cgroup namespace: cgroup v2 moves a process only within its own
//! namespace. That takes `CAP_SYS_ADMIN`, which the agent's container does
//! not get, but the init container that runs `bulkhead prepare` before it
//! may (deploy/kubernetes/examples/prepare-init-container.yaml).

use std::{
    ffi::CString,
    fs, io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use bulkhead_common::maps::{MAP_SOCKS, SockInfo};

use super::{
    cgroup::mounts,
    sys::{Attr, BPF_BTF_LOAD, BPF_MAP_CREATE, BPF_OBJ_PIN, bpf},
};

const BPF_MAP_TYPE_SK_STORAGE: u32 = 24;
/// Required of socket storage: elements exist only for sockets that have one.
const BPF_F_NO_PREALLOC: u32 = 1;

/// How the socket storage map came to be, for the start-up log.
#[derive(Debug)]
pub enum Storage {
    /// Pinned by an earlier agent or `bulkhead prepare`: charged wherever
    /// that one made it.
    Adopted,
    /// Made now from the root memory cgroup: charged to none. `entered`:
    /// through PID 1's cgroup namespace, from a namespace of our own.
    Uncharged { entered: bool },
    /// The host has no memory controller: nothing is charged anyway.
    NoMemoryController,
    /// The child could not make it; the loader makes it, charged to the
    /// agent's memory cgroup.
    Charged(String),
}

impl Storage {
    pub fn describe(&self) -> String {
        match self {
            Storage::Adopted => "socket storage: the map pinned before this start (by an \
                                 earlier agent, or by `bulkhead prepare`), charged where it \
                                 was made"
                .into(),
            Storage::Uncharged { entered } => format!(
                "socket storage: created from the root memory cgroup{}, so no memory cgroup is \
                 charged for the host's sockets",
                if *entered {
                    " (through the cgroup namespace of PID 1, /proc/1/ns/cgroup)"
                } else {
                    ""
                }
            ),
            Storage::NoMemoryController => {
                "socket storage: no memory controller is mounted, nothing is charged".into()
            }
            Storage::Charged(why) => format!(
                "socket storage is charged to this agent's memory cgroup ({why}): each socket \
                 bound on the host and each connecting socket of a domain adds 720 bytes to it, \
                 past any limit set on it, and a full cgroup gets the agent killed at its next \
                 allocation. Give the agent no memory limit, or run `bulkhead prepare` before its \
                 first start from where the root memory cgroup's cgroup.procs can be written \
                 (README, Memory)"
            ),
        }
    }
}

/// The maps directory of `pins`, made if missing, with `BH_SOCKS` in it
/// ([`precreate`]): what `run` and `bulkhead prepare` both do first.
pub fn prepare(pins: &super::Pins) -> anyhow::Result<Storage> {
    let maps = pins.maps();
    fs::create_dir_all(&maps).with_context(|| format!("creating {}", maps.display()))?;
    Ok(precreate(&maps))
}

/// Creates and pins `BH_SOCKS` under `maps_dir` from the root memory
/// cgroup, unless a map is pinned there already.
fn precreate(maps_dir: &Path) -> Storage {
    let pin = maps_dir.join(MAP_SOCKS);
    if pin.exists() {
        return Storage::Adopted;
    }
    let root = match memory_root() {
        MemoryRoot::Visible(root) => root,
        MemoryRoot::Absent => return Storage::NoMemoryController,
        MemoryRoot::Hidden(point) => {
            return Storage::Charged(format!(
                "only part of the memory hierarchy is mounted here, at {}, not its root: the \
                 view of a cgroup namespace",
                point.display()
            ));
        }
    };
    let procs = root.join("cgroup.procs");
    match create_in(&procs, &pin, host_cgroup_ns()) {
        Ok(entered) => Storage::Uncharged { entered },
        // The helper of an agent killed just before us pinned one.
        Err((Step::Pin, e)) if e.kind() == io::ErrorKind::AlreadyExists => Storage::Adopted,
        Err((step, e)) => Storage::Charged(match step {
            Step::Enter => format!(
                "from this cgroup namespace the root memory cgroup is joined only by entering \
                 PID 1's (/proc/1/ns/cgroup), which takes CAP_SYS_ADMIN: {e}"
            ),
            Step::Move => format!("moving a helper into {}: {e}", procs.display()),
            Step::Btf => format!("loading its type information: {e}"),
            Step::Create => format!("creating it: {e}"),
            Step::Pin => format!("pinning it at {}: {e}", pin.display()),
            Step::Fork => format!("starting the helper: {e}"),
        }),
    }
}

#[derive(Clone, Copy, Debug)]
#[repr(u8)]
enum Step {
    Fork = 0,
    Move = 1,
    Btf = 2,
    Create = 3,
    Pin = 4,
    Enter = 5,
}

/// What the child writes to its pipe when the map is pinned (below the
/// steps' numbers), with `ENTERED` when it entered PID 1's namespace.
const DONE: u8 = 0x80;
const ENTERED: u8 = 1;

/// PID 1's cgroup namespace, when this process is in another one and
/// sees PID 1 (the host's PID namespace): the host's, rooted at the root
/// memory cgroup.
fn host_cgroup_ns() -> Option<fs::File> {
    use std::os::unix::fs::MetadataExt as _;
    let init = fs::File::open("/proc/1/ns/cgroup").ok()?;
    let (theirs, ours) = (
        init.metadata().ok()?,
        fs::metadata("/proc/self/ns/cgroup").ok()?,
    );
    ((theirs.dev(), theirs.ino()) != (ours.dev(), ours.ino())).then_some(init)
}

/// Forks a child that moves into the memory cgroup of `procs` (from inside
/// the cgroup namespace `ns`, if given), creates the map and pins it at
/// `pin`. Only the memory cgroup of the process that creates a map decides
/// its charge, so the agent itself never moves. Whether the child entered
/// `ns`.
fn create_in(procs: &Path, pin: &Path, ns: Option<fs::File>) -> Result<bool, (Step, io::Error)> {
    use std::os::fd::AsRawFd as _;
    let fork_err = |e| (Step::Fork, e);
    // Everything the child uses is made here: between fork and exit it
    // makes system calls only (were there other threads, an allocation
    // could wait forever on a lock one of them held at the fork).
    let procs_c = CString::new(procs.as_os_str().as_bytes()).map_err(|e| fork_err(e.into()))?;
    let pin_c = CString::new(pin.as_os_str().as_bytes()).map_err(|e| fork_err(e.into()))?;
    let value_size = size_of::<SockInfo>() as u32;
    let btf = btf(value_size);
    let mut btf_attr = Attr::new();
    btf_attr
        .u64(0, btf.as_ptr() as u64)
        .u32(16, btf.len() as u32);
    let mut map_attr = Attr::new();
    map_attr
        .u32(0, BPF_MAP_TYPE_SK_STORAGE)
        .u32(4, 4)
        .u32(8, value_size)
        .u32(12, 0)
        .u32(16, BPF_F_NO_PREALLOC)
        .u32(52, 1) // btf_key_type_id: `int`
        .u32(56, 4); // btf_value_type_id: `struct bh_sock_info`
    map_attr.0[28..28 + MAP_SOCKS.len()].copy_from_slice(MAP_SOCKS.as_bytes());
    let mut pin_attr = Attr::new();
    pin_attr.u64(0, pin_c.as_ptr() as u64);

    let mut fds = [0i32; 2];
    // SAFETY: a two-element array for pipe2.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(fork_err(io::Error::last_os_error()));
    }
    let [rd, wr] = fds;
    // SAFETY: no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the child below makes system calls only and leaves by _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        let e = io::Error::last_os_error();
        // SAFETY: our own descriptors.
        unsafe {
            libc::close(rd);
            libc::close(wr);
        }
        return Err(fork_err(e));
    }
    if pid == 0 {
        // SAFETY: system calls on buffers made before the fork.
        unsafe {
            let done = child(
                parent,
                ns.as_ref().map(|f| f.as_raw_fd()),
                &procs_c,
                &mut btf_attr,
                &mut map_attr,
                &mut pin_attr,
            );
            let mut msg = [0u8; 5];
            match done {
                Ok(entered) => msg[0] = DONE | if entered { ENTERED } else { 0 },
                Err((step, errno)) => {
                    msg[0] = step as u8;
                    msg[1..].copy_from_slice(&errno.to_ne_bytes());
                }
            }
            libc::write(wr, msg.as_ptr().cast(), msg.len());
            libc::_exit(0);
        }
    }
    // SAFETY: our own descriptor; the child holds its copy.
    unsafe { libc::close(wr) };
    let mut msg = [0u8; 5];
    let interrupted = || io::Error::last_os_error().kind() == io::ErrorKind::Interrupted;
    let n = loop {
        // SAFETY: reads into a local buffer; returns at the child's exit.
        let n = unsafe { libc::read(rd, msg.as_mut_ptr().cast(), msg.len()) };
        if n >= 0 || !interrupted() {
            break n;
        }
    };
    let mut status = 0;
    // SAFETY: our own child and descriptor.
    unsafe {
        while libc::waitpid(pid, &mut status, 0) < 0 && interrupted() {}
        libc::close(rd);
    }
    if n == msg.len() as isize && msg[0] < DONE {
        let step = match msg[0] {
            0 => Step::Fork,
            1 => Step::Move,
            2 => Step::Btf,
            3 => Step::Create,
            4 => Step::Pin,
            _ => Step::Enter,
        };
        let errno = i32::from_ne_bytes([msg[1], msg[2], msg[3], msg[4]]);
        return Err((step, io::Error::from_raw_os_error(errno)));
    }
    if n != msg.len() as isize || !pin.exists() {
        return Err((
            Step::Fork,
            io::Error::other(format!(
                "the helper ended ({status:#x}) without pinning the map"
            )),
        ));
    }
    Ok(msg[0] & ENTERED != 0)
}

/// The child's work: enter `ns` (a cgroup namespace's descriptor), move,
/// load the types, create, pin. Whether it entered `ns`.
///
/// # Safety
/// The attributes point at memory that lives until the child exits.
unsafe fn child(
    parent: libc::pid_t,
    ns: Option<i32>,
    procs: &CString,
    btf: &mut Attr,
    map: &mut Attr,
    pin: &mut Attr,
) -> Result<bool, (Step, i32)> {
    // Nothing here allocates: an OS error is the bare errno.
    let code = |e: io::Error| e.raw_os_error().unwrap_or(0);
    // SAFETY: the caller's contract.
    unsafe {
        // Not outliving the agent: a helper that pinned after a killed
        // agent's successor looked would race it.
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::getppid() != parent {
            return Err((Step::Fork, libc::ESRCH));
        }
        // Without `CAP_SYS_ADMIN` the namespace stays ours, and the move
        // may still work (cgroup v1 has no such bound): the entry's error
        // is told only if the move fails.
        let mut entry = 0;
        if let Some(ns) = ns
            && libc::setns(ns, libc::CLONE_NEWCGROUP) != 0
        {
            entry = code(io::Error::last_os_error());
        }
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        // "0" moves the writer itself.
        if fd < 0 || libc::write(fd, c"0".as_ptr().cast(), 1) != 1 {
            return Err(match entry {
                0 => (Step::Move, code(io::Error::last_os_error())),
                e => (Step::Enter, e),
            });
        }
        let btf_fd = bpf(BPF_BTF_LOAD, btf).map_err(|e| (Step::Btf, code(e)))?;
        map.u32(48, btf_fd as u32);
        let map_fd = bpf(BPF_MAP_CREATE, map).map_err(|e| (Step::Create, code(e)))?;
        pin.u32(8, map_fd as u32);
        bpf(BPF_OBJ_PIN, pin).map_err(|e| (Step::Pin, code(e)))?;
        Ok(ns.is_some() && entry == 0)
    }
}

/// The type information a socket storage map must have: an `int` key and
/// a value type of the value's size (`struct bh_sock_info { unsigned char
/// bytes[N]; }`; the programs read the value by offset, not by type).
fn btf(value_size: u32) -> Vec<u8> {
    const KIND_INT: u32 = 1;
    const KIND_ARRAY: u32 = 3;
    const KIND_STRUCT: u32 = 4;
    const INT_SIGNED: u32 = 1 << 24;
    let mut strings = vec![0u8];
    let mut name = |s: &str| {
        let off = strings.len() as u32;
        strings.extend_from_slice(s.as_bytes());
        strings.push(0);
        off
    };
    let (int, uchar, info, bytes) = (
        name("int"),
        name("unsigned char"),
        name("bh_sock_info"),
        name("bytes"),
    );
    let types: [u32; 20] = [
        // [1] int
        int,
        KIND_INT << 24,
        4,
        INT_SIGNED | 32,
        // [2] unsigned char
        uchar,
        KIND_INT << 24,
        1,
        8,
        // [3] unsigned char[value_size], indexed by int
        0,
        KIND_ARRAY << 24,
        0,
        2,
        1,
        value_size,
        // [4] struct bh_sock_info, one member at bit 0
        info,
        (KIND_STRUCT << 24) | 1,
        value_size,
        bytes,
        3,
        0,
    ];
    let types: Vec<u8> = types.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let mut out = Vec::new();
    out.extend_from_slice(&0xeb9f_u16.to_ne_bytes());
    out.extend_from_slice(&[1, 0]); // version, flags
    for w in [
        24,
        0,
        types.len() as u32,
        types.len() as u32,
        strings.len() as u32,
    ] {
        out.extend_from_slice(&w.to_ne_bytes());
    }
    out.extend_from_slice(&types);
    out.extend_from_slice(&strings);
    out
}

/// Where the memory controller's hierarchy is mounted, as this process
/// sees it.
#[derive(Debug, PartialEq)]
enum MemoryRoot {
    /// Its root cgroup, at this path.
    Visible(PathBuf),
    /// Only a cgroup below the root (a cgroup namespace's own view, or a
    /// subtree mounted alone), at this mount point.
    Hidden(PathBuf),
    /// No memory controller.
    Absent,
}

/// What a cgroup directory says of itself.
struct Dir {
    /// cgroup v2: the memory controller is in its `cgroup.controllers`.
    memory: bool,
    /// The root of its hierarchy: the only cgroup with a `release_agent`
    /// file (v1), or without a `cgroup.type` file (v2). Seen from a cgroup
    /// namespace, the namespace's root looks like the whole hierarchy in
    /// mountinfo, so mountinfo alone cannot tell.
    root: bool,
}

fn memory_root() -> MemoryRoot {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return MemoryRoot::Absent;
    };
    memory_root_in(&info, |p, v2| {
        let has = |f: &str| p.join(f).exists();
        Dir {
            memory: v2
                && fs::read_to_string(p.join("cgroup.controllers"))
                    .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory")),
            root: if v2 {
                has("cgroup.controllers") && !has("cgroup.type")
            } else {
                has("release_agent")
            },
        }
    })
}

/// The memory hierarchy in `mountinfo`: a cgroup v1 `memory` hierarchy, or
/// cgroup v2 where it has the controller. `dir` reads a mounted cgroup
/// (`true`: v2).
fn memory_root_in(mountinfo: &str, dir: impl Fn(&Path, bool) -> Dir) -> MemoryRoot {
    let mut hidden = None;
    for m in mounts(mountinfo) {
        let v2 = match m.fstype {
            "cgroup" if m.superopts.split(',').any(|o| o == "memory") => false,
            "cgroup2" => true,
            _ => continue,
        };
        let d = dir(&m.point, v2);
        if v2 && !d.memory {
            continue;
        }
        // The whole hierarchy, or an ancestor of this process's cgroup
        // namespace (`/..`): a mounted subtree (`/kubepods/pod1`) never is.
        let whole = m.root == "/" || m.root.split('/').skip(1).all(|c| c == "..");
        if whole && d.root {
            return MemoryRoot::Visible(m.point);
        }
        hidden.get_or_insert(m.point);
    }
    hidden.map_or(MemoryRoot::Absent, MemoryRoot::Hidden)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
30 23 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
35 30 0:31 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,memory
36 30 0:32 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,cpu,cpuacct";

    /// A `Dir` reader: every mount is a root cgroup with the memory
    /// controller, except those in `not_root`.
    fn dirs(not_root: &'static [&'static str]) -> impl Fn(&Path, bool) -> Dir {
        move |p, _| Dir {
            memory: true,
            root: !not_root.iter().any(|n| p == Path::new(n)),
        }
    }

    #[test]
    fn finds_the_memory_hierarchy_of_a_hybrid_host() {
        assert_eq!(
            // cgroup v2 holds no controller that v1 holds.
            memory_root_in(HYBRID, |_, v2| Dir {
                memory: !v2,
                root: true,
            }),
            MemoryRoot::Visible(PathBuf::from("/sys/fs/cgroup/memory"))
        );
    }

    #[test]
    fn takes_cgroup_v2_only_where_it_has_the_memory_controller() {
        let unified = "31 23 0:27 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate";
        assert_eq!(
            memory_root_in(unified, dirs(&[])),
            MemoryRoot::Visible(PathBuf::from("/sys/fs/cgroup"))
        );
        let without = |_: &Path, _| Dir {
            memory: false,
            root: true,
        };
        assert_eq!(memory_root_in(unified, without), MemoryRoot::Absent);
    }

    #[test]
    fn a_mounted_subtree_is_not_the_root() {
        let container = "31 23 0:27 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw";
        assert_eq!(
            memory_root_in(container, dirs(&[])),
            MemoryRoot::Hidden(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    /// A pod: the host's tree mounted in a cgroup namespace of its own
    /// shows as `/../..` (the namespace's root is two levels down), over
    /// the runtime's mount of the namespace (`/`); files read at the
    /// mount point are the host root's, on top.
    #[test]
    fn a_cgroup_namespace_finds_the_root_where_the_hosts_tree_is_mounted() {
        let host_tree = "41 30 0:27 /../.. /sys/fs/cgroup ro - cgroup2 cgroup2 rw,nsdelegate";
        assert_eq!(
            memory_root_in(host_tree, dirs(&[])),
            MemoryRoot::Visible(PathBuf::from("/sys/fs/cgroup"))
        );
        let both = format!("40 30 0:27 / /sys/fs/cgroup ro - cgroup2 cgroup2 rw\n{host_tree}");
        assert_eq!(
            memory_root_in(&both, dirs(&[])),
            MemoryRoot::Visible(PathBuf::from("/sys/fs/cgroup"))
        );
        // Its own view only: the namespace's root, not the hierarchy's.
        let own = "40 30 0:27 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate";
        assert_eq!(
            memory_root_in(own, dirs(&["/sys/fs/cgroup"])),
            MemoryRoot::Hidden(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn the_type_information_describes_the_value_size() {
        let b = btf(328);
        assert_eq!(&b[..2], &0xeb9f_u16.to_ne_bytes());
        let type_len = u32::from_ne_bytes(b[12..16].try_into().unwrap()) as usize;
        assert_eq!(type_len, 20 * 4);
        let word = |i: usize| u32::from_ne_bytes(b[24 + 4 * i..28 + 4 * i].try_into().unwrap());
        // The array's length and the struct's size.
        assert_eq!((word(13), word(16)), (328, 328));
        let strings = &b[24 + type_len..];
        assert!(strings.windows(12).any(|w| w == b"bh_sock_info"));
    }
}
