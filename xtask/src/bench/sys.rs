//! The few `bpf(2)` commands the benchmarks need, issued directly: opening
//! pinned objects, following a link to its program, `BPF_PROG_TEST_RUN`,
//! reading per-CPU counters, program/map info, and loading tiny programs
//! assembled here from raw instructions (the "return allow" baseline and
//! the bare LPM-lookup probes).

use std::{
    ffi::CString,
    fs,
    io::{Error, Result},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::Path,
};

const BPF_MAP_CREATE: u32 = 0;
const BPF_MAP_LOOKUP_ELEM: u32 = 1;
const BPF_MAP_UPDATE_ELEM: u32 = 2;
const BPF_PROG_LOAD: u32 = 5;
const BPF_OBJ_GET: u32 = 7;
const BPF_PROG_TEST_RUN: u32 = 10;
const BPF_PROG_GET_FD_BY_ID: u32 = 13;
const BPF_OBJ_GET_INFO_BY_FD: u32 = 15;
const BPF_LINK_CREATE: u32 = 28;
pub const BPF_CGROUP_INET_INGRESS: u32 = 0;
pub const BPF_CGROUP_INET_EGRESS: u32 = 1;
pub const BPF_CGROUP_INET_SOCK_CREATE: u32 = 2;
pub const BPF_CGROUP_INET4_CONNECT: u32 = 10;
pub const BPF_CGROUP_INET6_CONNECT: u32 = 11;
pub const BPF_CGROUP_UDP4_SENDMSG: u32 = 14;
pub const BPF_CGROUP_UDP6_SENDMSG: u32 = 15;

pub const BPF_PROG_TYPE_CGROUP_SKB: u32 = 8;
pub const BPF_PROG_TYPE_CGROUP_SOCK: u32 = 9;
pub const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;

/// `union bpf_attr`, as plain bytes: every command fills its own fields.
#[repr(C, align(8))]
struct Attr([u8; 160]);

impl Attr {
    fn new() -> Self {
        Attr([0; 160])
    }
    fn u32(&mut self, off: usize, v: u32) -> &mut Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(&mut self, off: usize, v: u64) -> &mut Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn get_u32(&self, off: usize) -> u32 {
        u32::from_ne_bytes(self.0[off..off + 4].try_into().expect("4 bytes"))
    }
}

fn bpf(cmd: u32, attr: &mut Attr) -> Result<i64> {
    // SAFETY: `attr` is a valid, writable bpf_attr-sized buffer for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr.0.as_mut_ptr(),
            attr.0.len() as libc::c_long,
        )
    };
    if rc < 0 {
        Err(Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn fd(rc: i64) -> OwnedFd {
    // SAFETY: the kernel just returned this new descriptor to us.
    unsafe { OwnedFd::from_raw_fd(rc as RawFd) }
}

/// `BPF_OBJ_GET`: opens a pinned map, program or link.
pub fn obj_get(path: &Path) -> Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut a = Attr::new();
    a.u64(0, c.as_ptr() as u64);
    bpf(BPF_OBJ_GET, &mut a).map(fd)
}

fn info(obj: &OwnedFd, buf: &mut [u8]) -> Result<()> {
    let mut a = Attr::new();
    a.u32(0, obj.as_raw_fd() as u32)
        .u32(4, buf.len() as u32)
        .u64(8, buf.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a).map(|_| ())
}

fn rd_u32(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn rd_u64(b: &[u8], off: usize) -> u64 {
    u64::from_ne_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// The program a (pinned) link holds: `bpf_link_info.prog_id`, then
/// `BPF_PROG_GET_FD_BY_ID`.
pub fn link_prog(link: &OwnedFd) -> Result<OwnedFd> {
    let mut buf = [0u8; 64];
    info(link, &mut buf)?;
    prog_by_id(rd_u32(&buf, 8))
}

fn prog_by_id(prog_id: u32) -> Result<OwnedFd> {
    let mut a = Attr::new();
    a.u32(0, prog_id);
    bpf(BPF_PROG_GET_FD_BY_ID, &mut a).map(fd)
}

/// The program at `index` of a program array (a lookup from user space
/// answers its id).
pub fn prog_array_prog(array: &OwnedFd, index: u32) -> Result<OwnedFd> {
    prog_by_id(array_get::<u32>(array, index)?)
}

/// The value at `index` of an array map whose values are a `T`.
fn array_get<T: Default>(map: &OwnedFd, index: u32) -> Result<T> {
    let mut v = T::default();
    let mut a = Attr::new();
    a.u32(0, map.as_raw_fd() as u32)
        .u64(8, &index as *const u32 as u64)
        .u64(16, &mut v as *mut T as u64);
    bpf(BPF_MAP_LOOKUP_ELEM, &mut a)?;
    Ok(v)
}

/// `BPF_LINK_CREATE`: attaches `prog` to a cgroup (beside what is there)
/// until the returned link is closed.
pub fn link_cgroup(prog: &OwnedFd, cgroup: &Path, attach_type: u32) -> Result<OwnedFd> {
    let dir = std::fs::File::open(cgroup)?;
    let mut a = Attr::new();
    a.u32(0, prog.as_raw_fd() as u32)
        .u32(4, dir.as_raw_fd() as u32)
        .u32(8, attach_type);
    bpf(BPF_LINK_CREATE, &mut a).map(fd)
}

/// What `bpf_prog_info` says about a program.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProgInfo {
    pub jited_len: u32,
    pub xlated_len: u32,
    pub run_time_ns: u64,
    pub run_cnt: u64,
    pub verified_insns: u32,
}

pub fn prog_info(prog: &OwnedFd) -> Result<ProgInfo> {
    let mut buf = [0u8; 232];
    info(prog, &mut buf)?;
    Ok(ProgInfo {
        jited_len: rd_u32(&buf, 16),
        xlated_len: rd_u32(&buf, 20),
        run_time_ns: rd_u64(&buf, 192),
        run_cnt: rd_u64(&buf, 200),
        verified_insns: rd_u32(&buf, 216),
    })
}

#[derive(Clone, Debug, Default)]
pub struct MapInfo {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

pub fn map_info(map: &OwnedFd) -> Result<MapInfo> {
    let mut buf = [0u8; 96];
    info(map, &mut buf)?;
    Ok(MapInfo {
        map_type: rd_u32(&buf, 0),
        key_size: rd_u32(&buf, 8),
        value_size: rd_u32(&buf, 12),
        max_entries: rd_u32(&buf, 16),
    })
}

/// Kernel memory charged to a map, as `/proc/self/fdinfo` reports it
/// (`memlock:`, which recent kernels compute from the map's real usage).
pub fn map_memlock(map: &OwnedFd) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/self/fdinfo/{}", map.as_raw_fd())).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Number of possible CPUs: the width of per-CPU map values.
pub fn possible_cpus() -> usize {
    let text = fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_default();
    let mut n = 0;
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        n += match part.split_once('-') {
            Some((a, b)) => b.parse::<usize>().unwrap_or(0) - a.parse::<usize>().unwrap_or(0) + 1,
            None => 1,
        };
    }
    n.max(1)
}

/// Sums one `u64` slot of a per-CPU array over every CPU.
pub fn percpu_u64_sum(map: &OwnedFd, index: u32, cpus: usize) -> Result<u64> {
    let mut vals = vec![0u64; cpus];
    let key = index;
    let mut a = Attr::new();
    a.u32(0, map.as_raw_fd() as u32)
        .u64(8, &key as *const u32 as u64)
        .u64(16, vals.as_mut_ptr() as u64);
    bpf(BPF_MAP_LOOKUP_ELEM, &mut a)?;
    Ok(vals.iter().sum())
}

/// The `u64` at `index` of an array map.
pub fn array_u64(map: &OwnedFd, index: u32) -> Result<u64> {
    array_get(map, index)
}

/// Writes the `u64` at `index` of an array map.
pub fn set_array_u64(map: &OwnedFd, index: u32, v: u64) -> Result<()> {
    let mut a = Attr::new();
    a.u32(0, map.as_raw_fd() as u32)
        .u64(8, &index as *const u32 as u64)
        .u64(16, &v as *const u64 as u64);
    bpf(BPF_MAP_UPDATE_ELEM, &mut a).map(drop)
}

/// One `BPF_PROG_TEST_RUN`: the program's return value and the kernel's
/// average run time per repetition in nanoseconds.
pub fn test_run(prog: &OwnedFd, data: &[u8], repeat: u32) -> Result<(u32, u32)> {
    let mut a = Attr::new();
    a.u32(0, prog.as_raw_fd() as u32)
        .u32(8, data.len() as u32)
        .u64(16, data.as_ptr() as u64)
        .u32(32, repeat);
    bpf(BPF_PROG_TEST_RUN, &mut a)?;
    Ok((a.get_u32(4), a.get_u32(36)))
}

/// One eBPF instruction.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

/// A tiny assembler for the handful of instructions the probes use.
pub mod asm {
    use super::Insn;

    const fn i(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
        Insn {
            code,
            regs: (src << 4) | (dst & 0xf),
            off,
            imm,
        }
    }
    /// `dst = imm` (64-bit).
    pub const fn mov_imm(dst: u8, imm: i32) -> Insn {
        i(0xb7, dst, 0, 0, imm)
    }
    /// `dst = src` (64-bit).
    pub const fn mov_reg(dst: u8, src: u8) -> Insn {
        i(0xbf, dst, src, 0, 0)
    }
    /// `dst += imm` (64-bit).
    pub const fn add_imm(dst: u8, imm: i32) -> Insn {
        i(0x07, dst, 0, 0, imm)
    }
    /// `*(u32 *)(dst + off) = imm`.
    pub const fn st_w(dst: u8, off: i16, imm: i32) -> Insn {
        i(0x62, dst, 0, off, imm)
    }
    /// `*(u8 *)(dst + off) = imm`.
    pub const fn st_b(dst: u8, off: i16, imm: i32) -> Insn {
        i(0x72, dst, 0, off, imm)
    }
    /// `call helper`.
    pub const fn call(helper: i32) -> Insn {
        i(0x85, 0, 0, 0, helper)
    }
    pub const fn exit() -> Insn {
        i(0x95, 0, 0, 0, 0)
    }
    /// `dst = map` (`BPF_LD_IMM64` with `BPF_PSEUDO_MAP_FD`): two slots.
    pub const fn ld_map_fd(dst: u8, fd: i32) -> [Insn; 2] {
        [i(0x18, dst, 1, 0, fd), i(0, 0, 0, 0, 0)]
    }
    /// `if dst == imm goto +off`.
    pub const fn jeq_imm(dst: u8, imm: i32, off: i16) -> Insn {
        i(0x15, dst, 0, off, imm)
    }
}

/// Loads a `cgroup_skb` program from raw instructions; on failure the
/// error carries the verifier log.
pub fn load_cgroup_skb(name: &str, insns: &[Insn]) -> std::result::Result<OwnedFd, String> {
    load_prog(BPF_PROG_TYPE_CGROUP_SKB, 0, name, insns)
}

/// Loads `insns` as a program of `prog_type` for `attach_type` (its
/// `expected_attach_type`; 0 where the type has none).
fn load_prog(
    prog_type: u32,
    attach_type: u32,
    name: &str,
    insns: &[Insn],
) -> std::result::Result<OwnedFd, String> {
    let license = c"GPL";
    let mut log = vec![0u8; 64 * 1024];
    let mut a = Attr::new();
    a.u32(0, prog_type)
        .u32(68, attach_type)
        .u32(4, insns.len() as u32)
        .u64(8, insns.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64)
        .u32(24, 1)
        .u32(28, log.len() as u32)
        .u64(32, log.as_mut_ptr() as u64);
    let n = name.len().min(15);
    a.0[48..48 + n].copy_from_slice(&name.as_bytes()[..n]);
    bpf(BPF_PROG_LOAD, &mut a).map(fd).map_err(|e| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        format!("{e}: {}", String::from_utf8_lossy(&log[..end]))
    })
}

/// `r0 = 1; exit`: allows, at every hook it is loaded for.
const ALLOW: [Insn; 2] = [asm::mov_imm(0, 1), asm::exit()];

/// A cgroup_skb program that allows everything.
pub fn load_allow_all() -> std::result::Result<OwnedFd, String> {
    load_cgroup_skb("bench_allow", &ALLOW)
}

/// `r0 = 1; exit` for every hook that a TCP or UDP client of a domain
/// runs through (both packet directions, socket creation, IPv4 connect and
/// sendmsg), attached to `cgroup`: what enforcing anything at those hooks
/// costs before a program does any work. The links detach on drop.
pub fn attach_allow_all(cgroup: &Path) -> std::result::Result<Vec<OwnedFd>, String> {
    [
        (BPF_PROG_TYPE_CGROUP_SKB, BPF_CGROUP_INET_EGRESS),
        (BPF_PROG_TYPE_CGROUP_SKB, BPF_CGROUP_INET_INGRESS),
        (BPF_PROG_TYPE_CGROUP_SOCK, BPF_CGROUP_INET_SOCK_CREATE),
        (BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_CONNECT),
        (BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_UDP4_SENDMSG),
    ]
    .into_iter()
    .map(|(prog_type, attach_type)| attach_allow(cgroup, prog_type, attach_type))
    .collect()
}

/// `r0 = 1; exit` as a `prog_type` program on `attach_type` of `cgroup`,
/// until the returned link is closed.
fn attach_allow(
    cgroup: &Path,
    prog_type: u32,
    attach_type: u32,
) -> std::result::Result<OwnedFd, String> {
    let expected = if prog_type == BPF_PROG_TYPE_CGROUP_SKB {
        0
    } else {
        attach_type
    };
    let prog = load_prog(prog_type, expected, "bench_allow", &ALLOW)?;
    link_cgroup(&prog, cgroup, attach_type)
        .map_err(|e| format!("attaching r0 = 1 ({attach_type}): {e}"))
}

/// `r0 = 1; exit` on the connect and sendmsg hooks of both families,
/// attached to `cgroup`, each named by the bulkhead program of its hook:
/// the floor of a per-call measurement. The links detach on drop.
pub fn attach_allow_all_sock_addr(
    cgroup: &Path,
) -> std::result::Result<Vec<(&'static str, OwnedFd)>, String> {
    [
        ("bh_connect4", BPF_CGROUP_INET4_CONNECT),
        ("bh_connect6", BPF_CGROUP_INET6_CONNECT),
        ("bh_sendmsg4", BPF_CGROUP_UDP4_SENDMSG),
        ("bh_sendmsg6", BPF_CGROUP_UDP6_SENDMSG),
    ]
    .into_iter()
    .map(|(hook, attach_type)| {
        attach_allow(cgroup, BPF_PROG_TYPE_CGROUP_SOCK_ADDR, attach_type).map(|l| (hook, l))
    })
    .collect()
}

/// A program that does exactly one LPM lookup of the packet's destination
/// address in `map` (a bulkhead LPM map: slot byte + address) and returns
/// allow: the bare cost of that lookup, for comparison with the full
/// decision.
pub fn load_lpm_probe(map: &OwnedFd, slot: u8, v6: bool) -> std::result::Result<OwnedFd, String> {
    use asm::*;
    const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;
    const BPF_FUNC_SKB_LOAD_BYTES: i32 = 26;
    // Stack: key at fp-24: u32 prefixlen, u8 slot, then the address
    // (4 or 16 bytes), loaded straight from the packet into place.
    let (addr_off, addr_len, bits) = if v6 { (24, 16, 128) } else { (16, 4, 32) };
    let key_off: i16 = -32;
    let mut p = vec![
        mov_reg(6, 1),
        st_w(10, key_off, 8 + bits),
        st_b(10, key_off + 4, slot as i32),
        mov_reg(1, 6),
        mov_imm(2, addr_off),
        mov_reg(3, 10),
        add_imm(3, key_off as i32 + 5),
        mov_imm(4, addr_len),
        call(BPF_FUNC_SKB_LOAD_BYTES),
        jeq_imm(0, 0, 2),
        mov_imm(0, 1),
        exit(),
    ];
    p.extend(ld_map_fd(1, map.as_raw_fd()));
    p.extend([
        mov_reg(2, 10),
        add_imm(2, key_off as i32),
        call(BPF_FUNC_MAP_LOOKUP_ELEM),
        mov_imm(0, 1),
        exit(),
    ]);
    load_cgroup_skb(if v6 { "bench_lpm6" } else { "bench_lpm4" }, &p)
}

/// A plain LPM trie of `(network, prefix length)` entries with the key
/// layout the probe uses (`u32` prefix length, slot byte 0, the address),
/// each mapping to a `u32` 1.
pub fn lpm_trie(v6: bool, prefixes: &[(u128, u8)]) -> Result<OwnedFd> {
    const BPF_MAP_TYPE_LPM_TRIE: u32 = 11;
    const BPF_F_NO_PREALLOC: u32 = 1;
    const BPF_MAP_UPDATE_ELEM: u32 = 2;
    let addr_len = if v6 { 16 } else { 4 };
    let mut a = Attr::new();
    a.u32(0, BPF_MAP_TYPE_LPM_TRIE)
        .u32(4, 4 + 1 + addr_len as u32)
        .u32(8, 4)
        .u32(12, prefixes.len().max(1) as u32)
        .u32(16, BPF_F_NO_PREALLOC);
    let map = bpf(BPF_MAP_CREATE, &mut a).map(fd)?;
    let one = 1u32;
    for &(net, len) in prefixes {
        let mut key = Vec::with_capacity(4 + 1 + addr_len);
        key.extend_from_slice(&(8 + u32::from(len)).to_ne_bytes());
        key.push(0);
        if v6 {
            key.extend_from_slice(&net.to_be_bytes());
        } else {
            key.extend_from_slice(&(net as u32).to_be_bytes());
        }
        let mut a = Attr::new();
        a.u32(0, map.as_raw_fd() as u32)
            .u64(8, key.as_ptr() as u64)
            .u64(16, &one as *const u32 as u64);
        bpf(BPF_MAP_UPDATE_ELEM, &mut a)?;
    }
    Ok(map)
}
