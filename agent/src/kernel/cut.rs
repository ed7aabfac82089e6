//! Cutting established connections that a policy no longer allows.
//!
//! The packet hooks mark an established socket whose packet they deny
//! ([`SOCK_CUT`], with the decision in [`SockInfo::cut`]). Two socket
//! iterators (`iter/tcp`, `iter/udp`) destroy the marked sockets with the
//! `bpf_sock_destroy` kfunc (Linux 6.5+), so the application gets
//! `ECONNABORTED` at once instead of retransmitting into a dead flow, and
//! write back each destroyed socket's record for the audit trail.
//!
//! An iterator walks the sockets of the network namespace of the process
//! that reads it: the agent's. Marked sockets of workloads in other
//! namespaces are not destroyed; the packet hooks keep dropping their
//! traffic, as on kernels without the kfunc.
//!
//! The two programs are a couple of dozen instructions assembled here:
//! aya 0.14 cannot relocate a kfunc call, so they cannot come from the
//! eBPF crate.

use std::{
    fs::File,
    io::Read as _,
    os::fd::{AsRawFd as _, BorrowedFd, OwnedFd},
};

use anyhow::{Context as _, Result};
use aya::Btf;
use aya_obj::btf::BtfKind;
use bulkhead_common::maps::{CutRecord, SOCK_CUT, SockInfo};

use super::sys::{Attr, BPF_ITER_CREATE, BPF_LINK_CREATE, BPF_PROG_LOAD, bpf_fd};

/// One loaded iterator per protocol, attached (its link) and ready to run.
pub struct Cutter {
    links: Vec<(&'static str, OwnedFd)>,
}

impl Cutter {
    /// Loads and links both iterators against `socks`, the `BH_SOCKS`
    /// socket storage. Needs CAP_BPF and CAP_PERFMON (tracing programs),
    /// so it runs before the agent drops its capabilities.
    pub fn new(socks: BorrowedFd<'_>, btf: &Btf) -> Result<Cutter> {
        let kfunc = btf
            .id_by_type_name_kind("bpf_sock_destroy", BtfKind::Func)
            .context("the kernel has no bpf_sock_destroy kfunc (Linux 6.5+)")?;
        let mut links = Vec::new();
        for proto in ["tcp", "udp"] {
            let target = btf
                .id_by_type_name_kind(&format!("bpf_iter_{proto}"), BtfKind::Func)
                .with_context(|| format!("the kernel has no {proto} socket iterator"))?;
            let prog = load(&program(socks.as_raw_fd(), kfunc), target, proto)
                .with_context(|| format!("loading the {proto} socket iterator"))?;
            let link =
                link_iter(&prog).with_context(|| format!("linking the {proto} socket iterator"))?;
            links.push((proto, link));
        }
        Ok(Cutter { links })
    }

    /// Destroys every marked socket of the agent's network namespace and
    /// returns their records.
    pub fn run(&self) -> Result<Vec<CutRecord>> {
        let mut out = Vec::new();
        for (proto, link) in &self.links {
            let mut file = File::from(
                iter_create(link)
                    .with_context(|| format!("starting the {proto} socket iterator"))?,
            );
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes)
                .with_context(|| format!("running the {proto} socket iterator"))?;
            out.extend(records(&bytes));
        }
        Ok(out)
    }
}

/// The records an iterator wrote, one `CutRecord` after the other.
fn records(bytes: &[u8]) -> Vec<CutRecord> {
    const SIZE: usize = size_of::<CutRecord>();
    bytes
        .chunks_exact(SIZE)
        .map(|c| {
            // SAFETY: CutRecord is repr(C) plain data of exactly SIZE bytes.
            unsafe { std::ptr::read_unaligned(c.as_ptr().cast::<CutRecord>()) }
        })
        .collect()
}

/// One eBPF instruction.
#[derive(Clone, Copy)]
#[repr(C)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | dst,
        off,
        imm,
    }
}

const BPF_FUNC_SK_STORAGE_GET: i32 = 107;
const BPF_FUNC_SEQ_WRITE: i32 = 127;
const BPF_PSEUDO_MAP_FD: u8 = 1;
const BPF_PSEUDO_KFUNC_CALL: u8 = 2;

/// For each socket the iterator visits (`ctx->sk` at offset 8 in both the
/// TCP and the UDP context): if its storage says [`SOCK_CUT`], destroy it,
/// write its [`CutRecord`] to the iterator's output and clear the mark.
fn program(socks_fd: i32, destroy_btf_id: u32) -> Vec<Insn> {
    let flags = std::mem::offset_of!(SockInfo, flags) as i16;
    let cut = std::mem::offset_of!(SockInfo, cut) as i32;
    let size = size_of::<CutRecord>() as i32;
    vec![
        insn(0xbf, 6, 1, 0, 0),  // r6 = ctx
        insn(0x79, 7, 6, 8, 0),  // r7 = ctx->sk
        insn(0x15, 7, 0, 22, 0), // if r7 == 0 goto out
        insn(0x18, 1, BPF_PSEUDO_MAP_FD, 0, socks_fd),
        insn(0, 0, 0, 0, 0),    // r1 = BH_SOCKS
        insn(0xbf, 2, 7, 0, 0), // r2 = sk
        insn(0xb7, 3, 0, 0, 0), // r3 = NULL (no value: do not create)
        insn(0xb7, 4, 0, 0, 0), // r4 = 0
        insn(0x85, 0, 0, 0, BPF_FUNC_SK_STORAGE_GET),
        insn(0x15, 0, 0, 15, 0), // if !storage goto out
        insn(0xbf, 8, 0, 0, 0),  // r8 = storage
        insn(0x79, 1, 8, flags, 0),
        insn(0x57, 1, 0, 0, SOCK_CUT as i32),
        insn(0x15, 1, 0, 11, 0), // if !(flags & SOCK_CUT) goto out
        insn(0xbf, 1, 7, 0, 0),  // r1 = sk
        insn(0x85, 0, BPF_PSEUDO_KFUNC_CALL, 0, destroy_btf_id as i32),
        insn(0x79, 1, 6, 0, 0),   // r1 = ctx->meta
        insn(0x79, 1, 1, 0, 0),   // r1 = meta->seq
        insn(0xbf, 2, 8, 0, 0),   // r2 = storage
        insn(0x07, 2, 0, 0, cut), // r2 += offsetof(cut)
        insn(0xb7, 3, 0, 0, size),
        insn(0x85, 0, 0, 0, BPF_FUNC_SEQ_WRITE),
        insn(0x79, 1, 8, flags, 0),
        insn(0x57, 1, 0, 0, !(SOCK_CUT as i32)),
        insn(0x7b, 8, 1, flags, 0), // storage->flags &= !SOCK_CUT
        // out:
        insn(0xb7, 0, 0, 0, 0),
        insn(0x95, 0, 0, 0, 0),
    ]
}

const BPF_PROG_TYPE_TRACING: u32 = 26;
const BPF_TRACE_ITER: u32 = 28;

/// Loads an iterator program for the kernel's `bpf_iter_<proto>` target;
/// on failure the error carries the verifier's log.
fn load(insns: &[Insn], target_btf_id: u32, proto: &str) -> Result<OwnedFd> {
    let license = c"GPL";
    let mut log = vec![0u8; 64 * 1024];
    let name = format!("bh_cut_{proto}");
    let mut a = Attr::new();
    a.u32(0, BPF_PROG_TYPE_TRACING)
        .u32(4, insns.len() as u32)
        .u64(8, insns.as_ptr() as u64)
        .u64(16, license.as_ptr() as u64)
        .u32(24, 1)
        .u32(28, log.len() as u32)
        .u64(32, log.as_mut_ptr() as u64)
        .u32(68, BPF_TRACE_ITER)
        .u32(108, target_btf_id);
    a.0[48..48 + name.len()].copy_from_slice(name.as_bytes());
    bpf_fd(BPF_PROG_LOAD, &mut a).map_err(|e| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        let verifier = String::from_utf8_lossy(&log[..end]).trim().to_string();
        if verifier.is_empty() {
            anyhow::Error::new(e)
        } else {
            anyhow::anyhow!("{e}; verifier: {verifier}")
        }
    })
}

fn link_iter(prog: &OwnedFd) -> std::io::Result<OwnedFd> {
    let mut a = Attr::new();
    a.u32(0, prog.as_raw_fd() as u32).u32(8, BPF_TRACE_ITER);
    bpf_fd(BPF_LINK_CREATE, &mut a)
}

fn iter_create(link: &OwnedFd) -> std::io::Result<OwnedFd> {
    let mut a = Attr::new();
    a.u32(0, link.as_raw_fd() as u32);
    bpf_fd(BPF_ITER_CREATE, &mut a)
}

/// Checks the assembly's jump targets, which are easy to get wrong.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jumps_land_on_the_exit_sequence() {
        let p = program(3, 4);
        let out = p.len() - 2;
        for (i, ins) in p.iter().enumerate() {
            if ins.code == 0x15 {
                assert_eq!(i as i64 + 1 + i64::from(ins.off), out as i64, "jump at {i}");
            }
        }
        assert_eq!(p[out].code, 0xb7);
        assert_eq!(p[out + 1].code, 0x95);
    }

    #[test]
    fn records_are_read_whole() {
        let r = CutRecord {
            generation: 7,
            reason: 17,
            ..Default::default()
        };
        // SAFETY: reading the bytes of a plain repr(C) value.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&r as *const CutRecord).cast::<u8>(),
                size_of::<CutRecord>(),
            )
        };
        let mut two = bytes.to_vec();
        two.extend_from_slice(bytes);
        two.push(0);
        assert_eq!(records(&two), [r, r]);
    }
}
