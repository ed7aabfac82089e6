//! The few `bpf(2)` commands aya does not offer, on a plain `union
//! bpf_attr` buffer.

use std::{
    io,
    os::fd::{FromRawFd as _, OwnedFd},
};

/// `union bpf_attr`, large enough for the commands used here.
pub(super) struct Attr(pub(super) [u8; 128]);

impl Attr {
    pub(super) fn new() -> Attr {
        Attr([0; 128])
    }
    pub(super) fn u32(&mut self, off: usize, v: u32) -> &mut Attr {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    pub(super) fn u64(&mut self, off: usize, v: u64) -> &mut Attr {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
}

pub(super) const BPF_MAP_CREATE: u32 = 0;
pub(super) const BPF_PROG_LOAD: u32 = 5;
pub(super) const BPF_OBJ_PIN: u32 = 6;
pub(super) const BPF_OBJ_GET: u32 = 7;
pub(super) const BPF_BTF_LOAD: u32 = 18;
pub(super) const BPF_LINK_CREATE: u32 = 28;
pub(super) const BPF_ITER_CREATE: u32 = 33;
pub(super) const BPF_LINK_DETACH: u32 = 34;

/// Runs `cmd`; its non-negative result.
pub(super) fn bpf(cmd: u32, attr: &mut Attr) -> io::Result<i64> {
    // SAFETY: the attr buffer is as large as the kernel reads for `cmd`.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.0.as_mut_ptr(), attr.0.len() as u32) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// Runs `cmd`, which returns a new file descriptor.
pub(super) fn bpf_fd(cmd: u32, attr: &mut Attr) -> io::Result<OwnedFd> {
    let fd = bpf(cmd, attr)?;
    // SAFETY: these commands return a new file descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
