//! Sockets bound before the agent started: the `post_bind` hooks never saw
//! them, so the agent records their owners itself. It finds every bound TCP
//! and UDP socket in `/proc/<pid>/net/*` (one process per network
//! namespace), maps socket inodes to processes through `/proc/<pid>/fd`,
//! takes a copy of each socket fd with `pidfd_getfd`, and writes the owner's
//! cgroup ancestry into the kernel's socket storage.

use std::{
    collections::{HashMap, HashSet},
    fs,
    os::fd::{FromRawFd as _, OwnedFd},
    path::Path,
};

use agent_common::maps::{MAP_SOCKS, MAX_CGROUP_DEPTH, SockInfo};
use anyhow::{Result, anyhow};
use aya::{
    Ebpf,
    maps::{MapData, SkStorage},
};

use crate::cgroup;

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
    for entry in fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
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
}
