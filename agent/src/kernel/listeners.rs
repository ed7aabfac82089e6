//! The listening sockets of this host, as the connect hooks see them.
//!
//! Sockets bound before the agent started: the `post_bind` hooks never saw
//! them, so the agent records their owners itself. It finds every bound TCP
//! and UDP socket in `/proc/<pid>/net/*` (one process per network
//! namespace), maps socket inodes to processes through `/proc/<pid>/fd`,
//! takes a copy of each socket fd with `pidfd_getfd`, and writes the owner's
//! cgroup ancestry into the kernel's socket storage ([`seed`]).
//!
//! The socket a connect would reach, for `explain` ([`lookup`]): the
//! listener the connect hook's `bpf_sk_lookup_tcp`/`udp` finds in the
//! connecting workload's network namespace, and its owner as the kernel
//! knows it. The sockets come from the kernel's `sock_diag` interface
//! (`NETLINK_SOCK_DIAG`), which also returns a TCP socket's `BH_SOCKS` entry
//! when handed the map (CAP_BPF, which the running agent keeps): the very
//! ancestry the connect hook reads, whoever holds the socket now. For a UDP
//! socket (`sock_diag` returns socket storage for connection sockets only)
//! and without the map (`explain --policy`), the owner is the cgroup the
//! socket was created in, which `sock_diag` reports too; `post_bind`
//! records the binder's, the same cgroup unless a socket is bound by
//! another process than the one that created it. A netlink socket sees its own network
//! namespace only: another one is entered (`setns`, on a thread of its
//! own), which needs CAP_SYS_ADMIN; without it the namespace's
//! `/proc/<pid>/net` tables still say whether anything listens there, but
//! not whose it is.

use std::{
    collections::{HashMap, HashSet},
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::{Result, anyhow};
use aya::{
    Ebpf,
    maps::{MapData, SkStorage},
};
use bulkhead_common::maps::{MAP_SOCKS, MAX_CGROUP_DEPTH, SockInfo};
use bulkhead_common::proto::{PROTO_TCP, PROTO_UDP};

use crate::kernel::cgroup;

/// Inodes of bound sockets listed in one network namespace's tables.
fn bound_inodes(pid: u32) -> HashSet<u64> {
    let mut out = HashSet::new();
    for (table, tcp) in [
        ("tcp", true),
        ("tcp6", true),
        ("udp", false),
        ("udp6", false),
    ] {
        let Ok(text) = fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        out.extend(parse_table(&text, tcp));
    }
    out
}

/// `sl local_address rem_address st ... inode`: TCP sockets in LISTEN
/// (state 0A), UDP sockets bound to a port.
fn parse_table(text: &str, tcp: bool) -> Vec<u64> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            let state = *f.get(3)?;
            let inode: u64 = f.get(9)?.parse().ok()?;
            let bound = if tcp { state == "0A" } else { local_port != 0 };
            (bound && inode != 0).then_some(inode)
        })
        .collect()
}

/// The processes in `/proc`.
fn pids() -> std::io::Result<impl Iterator<Item = u32>> {
    Ok(fs::read_dir("/proc")?
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok())))
}

fn socket_inode(link: &Path) -> Option<u64> {
    let target = fs::read_link(link).ok()?;
    let s = target.to_str()?;
    s.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// Ancestry of a cgroup path (relative to the mount) as kernel ids.
pub fn ancestry(mount: &Path, rel: &str) -> SockInfo {
    let mut info = SockInfo::default();
    let mut path = String::new();
    for (i, seg) in rel
        .split('/')
        .filter(|s| !s.is_empty())
        .take(MAX_CGROUP_DEPTH)
        .enumerate()
    {
        path.push('/');
        path.push_str(seg);
        info.ancestors[i] = cgroup::cgroup_id(&cgroup::absolute(mount, &path)).unwrap_or(0);
    }
    info
}

fn pidfd_getfd(pid: u32, fd: i32) -> Option<OwnedFd> {
    // SAFETY: raw syscalls; every returned fd is owned exactly once.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0);
        if pidfd < 0 {
            return None;
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let got = libc::syscall(
            libc::SYS_pidfd_getfd,
            std::os::fd::AsRawFd::as_raw_fd(&pidfd),
            fd,
            0,
        );
        if got < 0 {
            None
        } else {
            Some(OwnedFd::from_raw_fd(got as i32))
        }
    }
}

/// Records the owner of every socket bound before the agent attached.
/// Returns how many sockets were recorded and how many could not be.
pub fn seed(ebpf: &mut Ebpf, mount: &Path) -> Result<(usize, usize)> {
    let map = ebpf
        .map_mut(MAP_SOCKS)
        .ok_or_else(|| anyhow!("map {MAP_SOCKS} missing"))?;
    let mut socks: SkStorage<&mut MapData, SockInfo> = SkStorage::try_from(map)?;
    let mut netns_seen: HashMap<u64, HashSet<u64>> = HashMap::new();
    let mut seeded = 0;
    let mut failed = 0;
    let self_pid = std::process::id();
    for pid in pids()? {
        if pid == self_pid {
            continue;
        }
        let Ok(ns) = fs::metadata(format!("/proc/{pid}/ns/net"))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        else {
            continue;
        };
        let inodes = netns_seen.entry(ns).or_insert_with(|| bound_inodes(pid));
        if inodes.is_empty() {
            continue;
        }
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        let mut cgroup_info: Option<SockInfo> = None;
        for fd in fds.flatten() {
            let Some(inode) = socket_inode(&fd.path()) else {
                continue;
            };
            if !inodes.contains(&inode) {
                continue;
            }
            let Some(num) = fd.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let info = match cgroup_info {
                Some(i) => i,
                None => {
                    let Ok(rel) = cgroup::cgroup_of_pid(pid) else {
                        break;
                    };
                    let i = ancestry(mount, &rel);
                    cgroup_info = Some(i);
                    i
                }
            };
            let Some(sock) = pidfd_getfd(pid, num) else {
                failed += 1;
                continue;
            };
            if socks.insert(&sock, info, 0).is_ok() {
                seeded += 1;
            } else {
                failed += 1;
            }
        }
    }
    Ok((seeded, failed))
}

// ---------------------------------------------------------------------------
// The socket a connect reaches (`explain`).

/// `TCP_LISTEN` in the kernel's numbering of TCP states (`0A` in
/// `/proc/net/tcp`).
const TCP_LISTEN: u8 = 10;
const FAMILY_INET: u8 = libc::AF_INET as u8;
const FAMILY_INET6: u8 = libc::AF_INET6 as u8;

/// One socket of a network namespace's TCP or UDP table.
#[derive(Clone, Debug, PartialEq)]
pub struct Sock {
    /// Address and port as bound (`0.0.0.0`, `::` for any).
    pub local: SocketAddr,
    /// What a lookup without a source can find: a TCP socket in LISTEN, a
    /// UDP socket bound to a port and connected to nothing.
    pub listening: bool,
    /// The device it is bound to (`SO_BINDTODEVICE`), 0 for none; `None`
    /// where the source does not say.
    pub bound_if: Option<u32>,
    /// `IPV6_V6ONLY` of an IPv6 socket; `None` where the source does not say.
    pub v6only: Option<bool>,
    pub inode: u64,
    /// The cgroup the socket was created in, where the source says.
    pub cgroup_id: Option<u64>,
    /// Its `BH_SOCKS` entry, where it was asked for: `Some(None)` when it
    /// has none.
    pub storage: Option<Option<SockInfo>>,
}

/// The socket `bpf_sk_lookup_tcp`/`bpf_sk_lookup_udp` returns to the connect
/// hook for `dst:port` (an IPv4-mapped `dst` already IPv4), which asks with
/// no source address or port and no device: one bound to exactly `dst`
/// first, else one bound to the wildcard address; an IPv6 socket without
/// `IPV6_V6ONLY` takes IPv4 too (`::ffff:a.b.c.d`, `::`), after an IPv4 one;
/// a socket bound to a device never. Fields a source leaves unknown count
/// as matching. Among equals (an `SO_REUSEPORT` group) the kernel hashes
/// the missing source to choose; this takes the first listed.
pub fn pick(socks: &[Sock], dst: IpAddr, port: u16) -> Option<&Sock> {
    let rank = |s: &Sock| -> Option<u8> {
        if !s.listening || s.local.port() != port || s.bound_if.is_some_and(|i| i != 0) {
            return None;
        }
        match (dst, s.local.ip()) {
            (IpAddr::V4(d), IpAddr::V4(l)) if l == d => Some(3),
            (IpAddr::V4(_), IpAddr::V4(l)) if l.is_unspecified() => Some(1),
            (IpAddr::V4(d), IpAddr::V6(l)) if s.v6only != Some(true) => match l.to_ipv4_mapped() {
                Some(m) if m == d => Some(2),
                Some(m) if m.is_unspecified() => Some(0),
                None if l.is_unspecified() => Some(0),
                _ => None,
            },
            (IpAddr::V6(d), IpAddr::V6(l)) if l == d => Some(2),
            (IpAddr::V6(_), IpAddr::V6(l)) if l.is_unspecified() => Some(0),
            _ => None,
        }
    };
    let mut best: Option<(u8, &Sock)> = None;
    for s in socks {
        if let Some(r) = rank(s)
            && best.is_none_or(|(b, _)| r > b)
        {
            best = Some((r, s));
        }
    }
    best.map(|(_, s)| s)
}

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLMSG_HDR: usize = 16;
/// `struct inet_diag_req_v2`.
const DIAG_REQ: usize = 56;
/// `struct inet_diag_msg`.
const DIAG_MSG: usize = 72;
const INET_DIAG_REQ_SK_BPF_STORAGES: u16 = 2;
const SK_DIAG_BPF_STORAGE_REQ_MAP_FD: u16 = 1;
const INET_DIAG_SKV6ONLY: u16 = 11;
const INET_DIAG_SK_BPF_STORAGES: u16 = 20;
const INET_DIAG_CGROUP_ID: u16 = 21;
const SK_DIAG_BPF_STORAGE: u16 = 1;
const SK_DIAG_BPF_STORAGE_MAP_VALUE: u16 = 3;

/// The `sock_diag` dump request for `family` sockets of TCP (listening
/// ones) or UDP bound to `port`, asking for their entries in the socket
/// storage map `storage`.
fn diag_request(tcp: bool, family: u8, port: u16, storage: Option<i32>) -> Vec<u8> {
    let attrs = if storage.is_some() { 12 } else { 0 };
    let mut m = Vec::with_capacity(NLMSG_HDR + DIAG_REQ + attrs);
    m.extend(((NLMSG_HDR + DIAG_REQ + attrs) as u32).to_ne_bytes());
    m.extend(SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend((NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend(1u32.to_ne_bytes()); // seq
    m.extend(0u32.to_ne_bytes()); // pid
    let proto = if tcp { PROTO_TCP } else { PROTO_UDP };
    m.extend([family, proto, 0, 0]);
    let states: u32 = if tcp { 1 << TCP_LISTEN } else { u32::MAX };
    m.extend(states.to_ne_bytes());
    // inet_diag_sockid: the dump keeps sockets of this source port only.
    m.extend(port.to_be_bytes());
    m.extend([0u8; 2 + 16 + 16 + 4 + 8]);
    if let Some(fd) = storage {
        m.extend(12u16.to_ne_bytes());
        m.extend((INET_DIAG_REQ_SK_BPF_STORAGES | NLA_F_NESTED).to_ne_bytes());
        m.extend(8u16.to_ne_bytes());
        m.extend(SK_DIAG_BPF_STORAGE_REQ_MAP_FD.to_ne_bytes());
        m.extend((fd as u32).to_ne_bytes());
    }
    m
}

/// Netlink attributes: `(type, payload)`.
fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([b[0], b[1]]));
        let ty = u16::from_ne_bytes([b[2], b[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((ty, &b[4..len]));
        b = &b[((len + 3) & !3).min(b.len())..];
    }
    out
}

/// One `inet_diag_msg` with its attributes; `storage` says whether the
/// socket storage was asked for.
fn diag_sock(tcp: bool, msg: &[u8], storage: bool) -> Option<Sock> {
    if msg.len() < DIAG_MSG {
        return None;
    }
    let family = msg[0];
    let state = msg[1];
    let sport = u16::from_be_bytes([msg[4], msg[5]]);
    let dport = u16::from_be_bytes([msg[6], msg[7]]);
    let src: [u8; 16] = msg[8..24].try_into().ok()?;
    let dst: [u8; 16] = msg[24..40].try_into().ok()?;
    let ifindex = u32::from_ne_bytes(msg[40..44].try_into().ok()?);
    let inode = u32::from_ne_bytes(msg[68..72].try_into().ok()?);
    let local = match family {
        FAMILY_INET => IpAddr::V4(Ipv4Addr::new(src[0], src[1], src[2], src[3])),
        FAMILY_INET6 => IpAddr::V6(Ipv6Addr::from(src)),
        _ => return None,
    };
    let mut s = Sock {
        local: SocketAddr::new(local, sport),
        listening: if tcp {
            state == TCP_LISTEN
        } else {
            dport == 0 && dst.iter().all(|b| *b == 0)
        },
        bound_if: Some(ifindex),
        v6only: Some(false),
        inode: u64::from(inode),
        cgroup_id: None,
        storage: storage.then_some(None),
    };
    for (ty, payload) in attrs(&msg[DIAG_MSG..]) {
        match ty {
            INET_DIAG_SKV6ONLY => s.v6only = payload.first().map(|v| *v != 0),
            INET_DIAG_CGROUP_ID => {
                s.cgroup_id = payload
                    .get(..8)
                    .map(|b| u64::from_ne_bytes(b.try_into().unwrap()));
            }
            INET_DIAG_SK_BPF_STORAGES => {
                for (ty, one) in attrs(payload) {
                    if ty != SK_DIAG_BPF_STORAGE {
                        continue;
                    }
                    for (ty, value) in attrs(one) {
                        if ty == SK_DIAG_BPF_STORAGE_MAP_VALUE
                            && value.len() >= size_of::<SockInfo>()
                        {
                            // SAFETY: SockInfo is repr(C) plain data, and
                            // `value` holds at least one.
                            let info = unsafe {
                                std::ptr::read_unaligned(value.as_ptr().cast::<SockInfo>())
                            };
                            s.storage = Some(Some(info));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Some(s)
}

/// The sockets `sock_diag` lists for `family`, TCP (listening) or UDP,
/// bound to `port`, in this thread's network namespace.
fn diag(
    tcp: bool,
    family: u8,
    port: u16,
    storage: Option<BorrowedFd<'_>>,
) -> std::io::Result<Vec<Sock>> {
    // SAFETY: socket(2); the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd, owned once.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let req = diag_request(tcp, family, port, storage.map(|f| f.as_raw_fd()));
    // SAFETY: all-zero is a valid sockaddr_nl: the kernel.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: the buffer and address are valid for the lengths given.
    let sent = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            req.as_ptr().cast(),
            req.len(),
            0,
            (&raw const kernel).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: `buf` is valid for its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut rest = &buf[..n as usize];
        while rest.len() >= NLMSG_HDR {
            let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
            let ty = u16::from_ne_bytes([rest[4], rest[5]]);
            if len < NLMSG_HDR || len > rest.len() {
                return Err(std::io::Error::other("truncated sock_diag answer"));
            }
            let body = &rest[NLMSG_HDR..len];
            match ty {
                NLMSG_DONE => return Ok(out),
                NLMSG_ERROR => {
                    let err = body
                        .get(..4)
                        .map_or(0, |b| i32::from_ne_bytes(b.try_into().unwrap()));
                    if err != 0 {
                        return Err(std::io::Error::from_raw_os_error(-err));
                    }
                }
                SOCK_DIAG_BY_FAMILY => {
                    if let Some(s) = diag_sock(tcp, body, storage.is_some())
                        && s.local.port() == port
                    {
                        out.push(s);
                    }
                }
                _ => {}
            }
            rest = &rest[((len + 3) & !3).min(rest.len())..];
        }
    }
}

/// `ADDR:PORT` as `/proc/net/{tcp,udp}{,6}` prints it: the address as
/// 32-bit words in host byte order.
fn proc_addr(s: &str) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(
            u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16)
                .ok()?
                .to_ne_bytes(),
        )
    };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// A `/proc/<pid>/net/{tcp,udp}{,6}` table's sockets bound to `port`. The
/// tables do not say a socket's device, `IPV6_V6ONLY` or owner.
fn proc_socks(text: &str, tcp: bool, port: u16) -> Vec<Sock> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local = proc_addr(f.get(1)?)?;
            let remote = proc_addr(f.get(2)?)?;
            let state = u8::from_str_radix(f.get(3)?, 16).ok()?;
            let inode = f.get(9)?.parse().ok()?;
            (local.port() == port).then_some(Sock {
                local,
                listening: if tcp {
                    state == TCP_LISTEN
                } else {
                    remote.port() == 0 && remote.ip().is_unspecified()
                },
                bound_if: None,
                v6only: None,
                inode,
                cgroup_id: None,
                storage: None,
            })
        })
        .collect()
}

/// The network namespace a cgroup's workload connects from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Netns {
    /// A process in it, where it is not this process's own.
    pub pid: Option<u32>,
    /// The namespace in words, for an answer.
    pub name: String,
}

/// Identifies a process's network namespace without ptrace rights (which
/// `/proc/<pid>/ns/net` needs): every namespace has its own
/// `/proc/<pid>/net` tables.
fn netns_key(proc_dir: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    fs::metadata(format!("{proc_dir}/net/tcp"))
        .ok()
        .map(|m| m.ino())
}

/// The processes of cgroup `rel` (its own first, then its descendants').
fn cgroup_pids(mount: &Path, rel: &str, out: &mut Vec<u32>) {
    let dir = cgroup::absolute(mount, rel);
    if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    let Ok(entries) = fs::read_dir(&dir) else {
        return;
    };
    for e in entries.flatten() {
        if out.len() >= 256 {
            return;
        }
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            let name = e.file_name();
            cgroup_pids(
                mount,
                &format!("{}/{}", rel.trim_end_matches('/'), name.to_string_lossy()),
                out,
            );
        }
    }
}

/// The network namespace of cgroup `rel`'s processes, where the kernel
/// looks its connects' listeners up. A cgroup with no process says
/// nothing: then this process's own (the host's, for an agent on the host).
pub fn netns_of_cgroup(mount: &Path, rel: &str) -> Netns {
    let mut pids = Vec::new();
    cgroup_pids(mount, rel, &mut pids);
    let own = netns_key("/proc/thread-self");
    let keyed: Vec<(u32, u64)> = pids
        .iter()
        .filter_map(|&p| Some((p, netns_key(&format!("/proc/{p}"))?)))
        .collect();
    let Some(&(pid, key)) = keyed.first() else {
        return Netns {
            pid: None,
            name: format!(
                "the network namespace bulkhead runs in ({rel} has no process to tell its own)"
            ),
        };
    };
    let spread = keyed.iter().map(|(_, k)| *k).collect::<HashSet<_>>().len();
    let also = if spread > 1 {
        format!("; {rel}'s processes are in {spread} network namespaces")
    } else {
        String::new()
    };
    if Some(key) == own {
        return Netns {
            pid: None,
            name: format!("the network namespace of {rel}, which bulkhead runs in too{also}"),
        };
    }
    Netns {
        pid: Some(pid),
        name: format!("the network namespace of {rel} (that of pid {pid}){also}"),
    }
}

/// Runs `f` on a thread of its own in the network namespace of `pid`.
fn in_netns<T: Send>(
    pid: u32,
    f: impl FnOnce() -> std::io::Result<T> + Send,
) -> std::io::Result<T> {
    let ns = fs::File::open(format!("/proc/{pid}/ns/net"))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            // SAFETY: setns(2) on this thread only; the thread ends after `f`.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("sock_diag thread panicked")))
    })
}

// What a lookup finds is plain data, which `explain` decides on.
pub use bulkhead_policy::listener::{Listener, Lookup, Owner};

/// The path (relative to `mount`) of the cgroup whose ancestry this is,
/// found level by level; `None` once it no longer exists.
pub fn path_of(mount: &Path, ancestors: &[u64; MAX_CGROUP_DEPTH]) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let mut rel = String::new();
    for &id in ancestors.iter().take_while(|&&id| id != 0) {
        let dir = cgroup::absolute(mount, &rel);
        let child = fs::read_dir(&dir).ok()?.flatten().find(|e| {
            e.file_type().is_ok_and(|t| t.is_dir()) && e.metadata().is_ok_and(|m| m.ino() == id)
        })?;
        rel.push('/');
        rel.push_str(&child.file_name().to_string_lossy());
    }
    Some(if rel.is_empty() { "/".into() } else { rel })
}

/// The path of cgroup `id` below `rel`, searched depth first.
fn find_cgroup(mount: &Path, rel: &str, id: u64) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    for e in fs::read_dir(cgroup::absolute(mount, rel)).ok()?.flatten() {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let child = format!(
            "{}/{}",
            rel.trim_end_matches('/'),
            e.file_name().to_string_lossy()
        );
        if e.metadata().is_ok_and(|m| m.ino() == id) {
            return Some(child);
        }
        if let Some(p) = find_cgroup(mount, &child, id) {
            return Some(p);
        }
    }
    None
}

/// Who holds socket `inode` now: a process and its fd for it.
fn holder(inode: u64) -> Option<(u32, i32)> {
    for pid in pids().ok()? {
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if socket_inode(&fd.path()) == Some(inode)
                && let Some(num) = fd.file_name().to_str().and_then(|s| s.parse().ok())
            {
                return Some((pid, num));
            }
        }
    }
    None
}

/// An `int` socket option of `sock`.
fn sockopt(sock: &OwnedFd, level: libc::c_int, name: libc::c_int) -> Option<i32> {
    let mut v: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for getsockopt(2) to write.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&raw mut v).cast(),
            &raw mut len,
        )
    };
    (rc == 0).then_some(v)
}

/// [`pick`] among sockets from `/proc` tables, which do not say a socket's
/// device, `IPV6_V6ONLY` or owner: those are asked of the socket itself,
/// through a copy of its holder's fd (`pidfd_getfd`, which needs ptrace
/// rights over the holder), and its owner is the holder's cgroup. `why`:
/// why the tables were read instead of `sock_diag`.
fn held(socks: &mut [Sock], dst: IpAddr, port: u16, mount: &Path, why: &str) -> Listener {
    let mut owners = HashMap::new();
    loop {
        let Some(i) = pick(socks, dst, port).and_then(|p| socks.iter().position(|s| s == p)) else {
            return Listener::Nothing;
        };
        let s = &mut socks[i];
        if let Some(&(ancestors, ref path)) = owners.get(&s.inode)
            && s.bound_if.is_some()
            && s.v6only.is_some()
        {
            return Listener::Found {
                bound: s.local,
                owner: Owner::Holder(ancestors),
                path: Some(String::clone(path)),
            };
        }
        let unknown = || {
            Listener::Unknown(format!(
                "a socket is bound to {} there (inode {}), and its owner cannot be read ({why})",
                s.local, s.inode
            ))
        };
        let Some((pid, fd)) = holder(s.inode) else {
            return unknown();
        };
        let (Some(sock), Ok(rel)) = (pidfd_getfd(pid, fd), cgroup::cgroup_of_pid(pid)) else {
            return unknown();
        };
        s.bound_if = sockopt(&sock, libc::SOL_SOCKET, libc::SO_BINDTOIFINDEX).map(|v| v as u32);
        s.v6only = if s.local.is_ipv6() {
            sockopt(&sock, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY).map(|v| v != 0)
        } else {
            Some(false)
        };
        if s.bound_if.is_none() || s.v6only.is_none() {
            return unknown();
        }
        owners.insert(s.inode, (ancestry(mount, &rel).ancestors, rel));
    }
}

/// The socket a connect from `netns` to `dst:port` (TCP or UDP) reaches,
/// found as the connect hook finds it (see [`pick`]), and its owner: for a
/// TCP socket from the socket storage `storage` (`BH_SOCKS`) where given,
/// else the cgroup the socket was created in. `dst` is IPv4 for an
/// IPv4-mapped address.
pub fn lookup(
    netns: &Netns,
    tcp: bool,
    dst: IpAddr,
    port: u16,
    storage: Option<BorrowedFd<'_>>,
    mount: &Path,
) -> Lookup {
    // The kernel adds socket storage to `sock_diag` answers for connection
    // (TCP) sockets only: a UDP socket's owner is the cgroup it was
    // created in.
    let storage = storage.filter(|_| tcp);
    let families: &[u8] = if dst.is_ipv4() {
        &[FAMILY_INET, FAMILY_INET6]
    } else {
        &[FAMILY_INET6]
    };
    let listed = || -> std::io::Result<Vec<Sock>> {
        let mut all = Vec::new();
        for &f in families {
            // Socket storage wants CAP_BPF: without it, the creator's cgroup.
            let got = match diag(tcp, f, port, storage) {
                Err(e) if storage.is_some() && e.raw_os_error() == Some(libc::EPERM) => {
                    diag(tcp, f, port, None)
                }
                got => got,
            };
            all.extend(got?);
        }
        Ok(all)
    };
    let socks = match netns.pid {
        _ if port == 0 => Ok(Vec::new()),
        None => listed(),
        Some(pid) => in_netns(pid, listed),
    };
    let result = |listener| Lookup {
        netns: netns.name.clone(),
        listener,
    };
    let socks = match socks {
        Ok(s) => s,
        // Not allowed into the namespace, or no `sock_diag` (its modules
        // absent): the namespace's tables still say whether anything
        // listens there, and whose it is where its holder can be seen.
        Err(e) => {
            let proc_dir = netns
                .pid
                .map_or_else(|| "/proc/thread-self".to_string(), |p| format!("/proc/{p}"));
            let tables: &[&str] = match (tcp, dst.is_ipv4()) {
                (true, true) => &["tcp", "tcp6"],
                (true, false) => &["tcp6"],
                (false, true) => &["udp", "udp6"],
                (false, false) => &["udp6"],
            };
            let mut all = Vec::new();
            for table in tables {
                if let Ok(text) = fs::read_to_string(format!("{proc_dir}/net/{table}")) {
                    all.extend(proc_socks(&text, tcp, port));
                }
            }
            let why = match netns.pid {
                Some(_) => format!("entering that namespace needs CAP_SYS_ADMIN ({e})"),
                None => format!("sock_diag: {e}"),
            };
            return result(held(&mut all, dst, port, mount, &why));
        }
    };
    let Some(s) = pick(&socks, dst, port) else {
        return result(Listener::Nothing);
    };
    let (owner, path) = match (s.storage, s.cgroup_id) {
        (Some(Some(info)), _) => (
            Owner::Recorded(info.ancestors),
            path_of(mount, &info.ancestors),
        ),
        (Some(None), _) => (Owner::Unrecorded, None),
        (None, Some(id)) => match cgroup::cgroup_id(mount)
            .ok()
            .filter(|root| *root == id)
            .map(|_| "/".to_string())
            .or_else(|| find_cgroup(mount, "/", id))
        {
            Some(rel) => (Owner::Creator(ancestry(mount, &rel).ancestors), Some(rel)),
            None => {
                return result(Listener::Unknown(format!(
                    "{} was created in cgroup id {id}, which no longer exists, and the socket \
                     storage that records its owner was not read",
                    s.local
                )));
            }
        },
        (None, None) => {
            return result(Listener::Unknown(format!(
                "the owner of {} is not known",
                s.local
            )));
        }
    };
    result(Listener::Found {
        bound: s.local,
        owner,
        path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_tables() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:D2A4 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 23456 1 0000000000000000 20 4 30 10 -1\n";
        assert_eq!(parse_table(tcp, true), vec![12345]);
        let udp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
  10: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000   101        0 777 2 0000000000000000 0\n";
        assert_eq!(parse_table(udp, false), vec![777]);
    }

    fn sock(local: &str) -> Sock {
        Sock {
            local: local.parse().unwrap(),
            listening: true,
            bound_if: Some(0),
            v6only: Some(false),
            inode: 1,
            cgroup_id: None,
            storage: None,
        }
    }

    fn picked(socks: &[Sock], dst: &str, port: u16) -> Option<String> {
        pick(socks, dst.parse().unwrap(), port).map(|s| s.local.to_string())
    }

    /// The kernel's listener lookup: exact address before wildcard, IPv4
    /// before IPv6 within each, dual-stack IPv6 sockets for IPv4 too, never
    /// a v6-only socket for IPv4, a device-bound socket, a connected or
    /// unbound one.
    #[test]
    fn picks_the_socket_the_kernel_lookup_returns() {
        let mut v6only = sock("[::]:80");
        v6only.v6only = Some(true);
        let mut on_dev = sock("127.0.0.1:80");
        on_dev.bound_if = Some(3);
        let mut connected = sock("127.0.0.2:80");
        connected.listening = false;
        let all = [
            sock("[::]:80"),
            sock("0.0.0.0:80"),
            sock("[::ffff:127.0.0.3]:80"),
            sock("127.0.0.4:80"),
            sock("[fd00::1]:80"),
            on_dev,
            connected,
        ];
        assert_eq!(
            picked(&all, "127.0.0.4", 80).as_deref(),
            Some("127.0.0.4:80")
        );
        assert_eq!(
            picked(&all, "127.0.0.3", 80).as_deref(),
            Some("[::ffff:127.0.0.3]:80")
        );
        assert_eq!(picked(&all, "127.0.0.1", 80).as_deref(), Some("0.0.0.0:80"));
        assert_eq!(picked(&all, "127.0.0.2", 80).as_deref(), Some("0.0.0.0:80"));
        assert_eq!(picked(&all, "127.0.0.1", 81), None);
        assert_eq!(picked(&all, "fd00::1", 80).as_deref(), Some("[fd00::1]:80"));
        assert_eq!(picked(&all, "::1", 80).as_deref(), Some("[::]:80"));
        // Only an IPv6 wildcard: dual-stack takes IPv4, v6-only does not.
        assert_eq!(
            picked(&[sock("[::]:53")], "10.0.0.1", 53).as_deref(),
            Some("[::]:53")
        );
        assert_eq!(picked(&[v6only.clone()], "10.0.0.1", 80), None);
        assert_eq!(picked(&[v6only], "::1", 80).as_deref(), Some("[::]:80"));
        assert_eq!(picked(&[sock("0.0.0.0:80")], "::1", 80), None);
        // Any address: the lookup does not ask whether it is this host's.
        assert_eq!(
            picked(&[sock("0.0.0.0:80")], "192.0.2.1", 80).as_deref(),
            Some("0.0.0.0:80")
        );
    }

    #[test]
    fn reads_sockets_from_proc_tables() {
        let tcp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000000000000000000001000000:1CF3 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4321 1 0000000000000000 100 0 0 10 0\n\
   1: 0000000000000000FFFF00000100007F:1CF3 0000000000000000FFFF00000100007F:D2A4 01 00000000:00000000 00:00000000 00000000     0        0 4322 1 0000000000000000 20 4 30 10 -1\n";
        let s = proc_socks(tcp6, true, 7411);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].local, "[::1]:7411".parse().unwrap());
        assert!(s[0].listening && s[0].v6only.is_none() && s[0].bound_if.is_none());
        assert_eq!(s[0].inode, 4321);
        assert_eq!(s[1].local, "[::ffff:127.0.0.1]:7411".parse().unwrap());
        assert!(!s[1].listening);
        let udp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
  10: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000   101        0 777 2 0000000000000000 0\n\
  11: 0100007F:0035 0100007F:1F90 01 00000000:00000000 00:00000000 00000000   101        0 778 2 0000000000000000 0\n";
        let u = proc_socks(udp, false, 53);
        assert_eq!(u.iter().filter(|s| s.listening).count(), 1);
        assert_eq!(u[0].local, "0.0.0.0:53".parse().unwrap());
    }

    #[test]
    fn reads_sock_diag_messages() {
        let mut m = vec![FAMILY_INET6, TCP_LISTEN, 0, 0];
        m.extend(53u16.to_be_bytes());
        m.extend([0u8; 2]);
        let mut src = [0u8; 16];
        src[15] = 1;
        m.extend(src);
        m.extend([0u8; 16]);
        m.extend(0u32.to_ne_bytes()); // ifindex
        m.extend([0u8; 8]); // cookie
        m.extend([0u8; 16]); // expires, queues, uid
        m.extend(99u32.to_ne_bytes()); // inode
        assert_eq!(m.len(), DIAG_MSG);
        let attr = |ty: u16, payload: &[u8]| {
            let mut a = ((4 + payload.len()) as u16).to_ne_bytes().to_vec();
            a.extend(ty.to_ne_bytes());
            a.extend(payload);
            while !a.len().is_multiple_of(4) {
                a.push(0);
            }
            a
        };
        m.extend(attr(INET_DIAG_SKV6ONLY, &[1]));
        m.extend(attr(INET_DIAG_CGROUP_ID, &77u64.to_ne_bytes()));
        let mut info = SockInfo::default();
        info.ancestors[0] = 5;
        info.ancestors[1] = 6;
        // SAFETY: SockInfo is repr(C) plain data.
        let bytes = unsafe {
            std::slice::from_raw_parts((&raw const info).cast::<u8>(), size_of::<SockInfo>())
        };
        let mut one = attr(2, &7u32.to_ne_bytes());
        one.extend(attr(SK_DIAG_BPF_STORAGE_MAP_VALUE, bytes));
        let stg = attr(SK_DIAG_BPF_STORAGE | NLA_F_NESTED, &one);
        m.extend(attr(INET_DIAG_SK_BPF_STORAGES | NLA_F_NESTED, &stg));
        let s = diag_sock(true, &m, true).unwrap();
        assert_eq!(s.local, "[::1]:53".parse().unwrap());
        assert!(s.listening);
        assert_eq!(
            (s.v6only, s.bound_if, s.inode, s.cgroup_id),
            (Some(true), Some(0), 99, Some(77))
        );
        assert_eq!(s.storage, Some(Some(info)));
        // Asked for, and none: the kernel finds no owner.
        let bare = diag_sock(true, &m[..DIAG_MSG], true).unwrap();
        assert_eq!(bare.storage, Some(None));
    }

    /// `sock_diag` needs no privilege for this process's own namespace:
    /// a listener of this test is found, with the cgroup it was created in.
    #[test]
    fn finds_a_listener_of_this_process() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let mount = match cgroup::cgroup2_mount() {
            Ok(m) => m,
            Err(e) => {
                eprintln!("SKIP finds_a_listener_of_this_process: {e}");
                return;
            }
        };
        let here = Netns {
            pid: None,
            name: "here".into(),
        };
        let found = lookup(
            &here,
            true,
            "127.0.0.1".parse().unwrap(),
            port,
            None,
            &mount,
        );
        match found.listener {
            Listener::Found { bound, owner, .. } => {
                assert_eq!(bound, l.local_addr().unwrap());
                assert!(matches!(owner, Owner::Creator(_)), "{owner:?}");
            }
            other => panic!("{other:?}"),
        }
        let none = lookup(
            &here,
            false,
            "127.0.0.1".parse().unwrap(),
            port,
            None,
            &mount,
        );
        assert_eq!(none.listener, Listener::Nothing, "TCP is not UDP");
        // Without sock_diag: the tables, and the socket asked through its
        // holder (this process).
        let text = fs::read_to_string("/proc/thread-self/net/tcp").unwrap();
        let mut socks = proc_socks(&text, true, port);
        match held(
            &mut socks,
            "127.0.0.1".parse().unwrap(),
            port,
            &mount,
            "test",
        ) {
            Listener::Found {
                bound,
                owner: Owner::Holder(_),
                path: Some(_),
            } => assert_eq!(bound, l.local_addr().unwrap()),
            other => panic!("{other:?}"),
        }
    }
}
