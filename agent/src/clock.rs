//! The agent's clocks: the pure helpers of [`bulkhead_policy::clock`], and
//! the one reading that needs a system call (`CLOCK_TAI`).

pub use bulkhead_policy::clock::*;

fn now(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

/// Offset from the Unix clock to `CLOCK_TAI`, which the kernel programs
/// read (`bpf_ktime_get_tai_ns`) so time windows follow wall-clock time.
pub fn tai_offset_ns() -> i64 {
    tai_offset_from(now(libc::CLOCK_TAI), now(libc::CLOCK_REALTIME))
}

/// `CLOCK_TAI` minus `CLOCK_BOOTTIME`: what the kernel programs add to boot
/// time where the kernel lacks `bpf_ktime_get_tai_ns` (before 6.1).
pub fn tai_from_boot_ns() -> i64 {
    let boot = now(libc::CLOCK_BOOTTIME);
    let tai = now(libc::CLOCK_TAI);
    (tai - boot) as i64
}
