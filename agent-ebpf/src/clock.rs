//! Wall-clock (TAI) time, which bridge and domain windows and the event
//! rate limit are kept in.

use aya_ebpf::helpers::generated::{bpf_ktime_get_boot_ns, bpf_ktime_get_tai_ns};

use crate::maps::BH_CLOCK;

/// 1 when the kernel lacks `bpf_ktime_get_tai_ns` (before 6.1): set by the
/// agent at load in frozen `.rodata`, so the verifier follows one branch
/// only and never meets the helper the kernel does not have.
#[unsafe(no_mangle)]
static BH_NO_TAI: u8 = 0;

#[inline(always)]
pub(crate) fn now_tai() -> u64 {
    if unsafe { core::ptr::read_volatile(&BH_NO_TAI) } == 0 {
        return unsafe { bpf_ktime_get_tai_ns() };
    }
    // Boot time (which counts suspend) plus the offset the agent last
    // wrote: an NTP step while no agent runs is not followed.
    let offset = BH_CLOCK.get(0).copied().unwrap_or(0);
    unsafe { bpf_ktime_get_boot_ns() }.wrapping_add(offset as u64)
}
