//! Counting decisions and emitting their events, rate limited per cgroup.

use aya_ebpf::{
    helpers::generated::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_get_smp_processor_id,
    },
    maps::PerCpuArray,
};
use bulkhead_common::{
    Decision, Event, Hook, Reason, Verdict,
    maps::{
        COUNTER_EVENTS_LOST, COUNTER_EVENTS_RATE_LIMITED, COUNTER_EVENTS_WANTED, Config,
        DOMAIN_AUDIT_ALL, DomainRec, TokenBucket, counter_index, domain_counter_index,
    },
};

use crate::{
    maps::{BH_COUNTERS, BH_DOMSTATS, BH_EVENTS, BH_RATE},
    policy::Active,
};

pub(crate) const ALLOW: i32 = 1;
pub(crate) const DENY: i32 = 0;

/// One decision's facts, gathered by the hook and passed to [`finish`].
/// 8-byte aligned, addresses first: LLVM then copies them with word
/// stores instead of calling `memcpy`/`memset`, each call a stack frame
/// that older verifiers charge 32 bytes for (6.1 refused `bh_egress` at
/// 544 bytes of 512).
#[repr(C, align(8))]
pub(crate) struct Flow {
    pub(crate) src: [u8; 16],
    pub(crate) dst: [u8; 16],
    pub(crate) family: u8,
    pub(crate) proto: u8,
    pub(crate) hook: Hook,
    /// Process context: pid/comm/uid mean something.
    pub(crate) task: bool,
    /// Not a repeat of the socket's previous allowed `sendmsg` destination:
    /// allowed events are recorded once per flow, not per datagram.
    pub(crate) first: bool,
    pub(crate) sport: [u8; 2],
    pub(crate) dport: [u8; 2],
}

#[inline(always)]
pub(crate) fn count(index: u32) -> u64 {
    bump(&BH_COUNTERS, index)
}

#[inline(always)]
pub(crate) fn bump(map: &PerCpuArray<u64>, index: u32) -> u64 {
    match map.get_ptr_mut(index) {
        Some(p) => unsafe {
            *p += 1;
            *p
        },
        None => 0,
    }
}

/// Token bucket per cgroup, so one noisy workload cannot drown the others'
/// events. Races between CPUs only blur the rate a little.
#[inline(always)]
pub(crate) fn rate_ok(cfg: &Config, cgroup_id: u64, now: u64) -> bool {
    if cfg.event_rate == 0 {
        return true;
    }
    let rate = cfg.event_rate as u64;
    let burst = (cfg.event_burst.max(1) as u64) << 10;
    match BH_RATE.get_ptr_mut(cgroup_id) {
        Some(b) => unsafe {
            let elapsed = now.saturating_sub((*b).last_ns);
            // tokens are scaled by 1024; cap elapsed so the product cannot overflow.
            let refill = (elapsed.min(60_000_000_000) / 1000) * rate / 976;
            let mut tokens = ((*b).tokens_milli + refill).min(burst);
            (*b).last_ns = now;
            if tokens < 1024 {
                (*b).tokens_milli = tokens;
                return false;
            }
            tokens -= 1024;
            (*b).tokens_milli = tokens;
            true
        },
        None => {
            let b = TokenBucket {
                last_ns: now,
                tokens_milli: burst.saturating_sub(1024),
            };
            let _ = BH_RATE.insert(cgroup_id, b, 0);
            true
        }
    }
}

/// Counts the decision, emits its event if it asks for one, and returns the
/// program's return code.
#[inline(always)]
pub(crate) fn finish(
    a: &Active,
    dom_id: u32,
    dom: &DomainRec,
    peer: u32,
    cgroup_id: u64,
    d: Decision,
    f: &Flow,
) -> i32 {
    count(counter_index(f.hook as u8, d.reason as u8));
    bump(&BH_DOMSTATS, domain_counter_index(dom_id, d.reason as u8));
    let verdict = d.verdict(a.config.mode);
    // Denials and bridge crossings are always recorded; with `audit: all`,
    // allowed connections too, but only from the connection-level hooks so
    // it is one event per connect, not per packet.
    let wants_event = !d.allow
        || f.first && f.task && (d.reason == Reason::Bridge || dom.flags & DOMAIN_AUDIT_ALL != 0);
    if wants_event {
        emit(a, dom_id, peer, cgroup_id, d, verdict, f);
    }
    if verdict == Verdict::Deny {
        DENY
    } else {
        ALLOW
    }
}

#[inline(always)]
pub(crate) fn emit(
    a: &Active,
    dom_id: u32,
    peer: u32,
    cgroup_id: u64,
    d: Decision,
    verdict: Verdict,
    f: &Flow,
) {
    let seq = count(COUNTER_EVENTS_WANTED);
    let now = crate::clock::now_tai();
    if !rate_ok(&a.config, cgroup_id, now) {
        count(COUNTER_EVENTS_RATE_LIMITED);
        return;
    }
    let Some(mut entry) = BH_EVENTS.reserve::<Event>(0) else {
        count(COUNTER_EVENTS_LOST);
        return;
    };
    let e = entry.as_mut_ptr();
    unsafe {
        (*e).ts_tai_ns = now;
        (*e).seq = seq;
        (*e).cgroup_id = cgroup_id;
        (*e).generation = a.generation;
        copy16(&raw mut (*e).src_addr, &f.src);
        copy16(&raw mut (*e).dst_addr, &f.dst);
        (*e).bridge_id = d.bridge_id;
        (*e).src_port = f.sport;
        (*e).dst_port = f.dport;
        (*e).src_domain = dom_id as u16;
        (*e).dst_domain = peer as u16;
        (*e).family = f.family;
        (*e).proto = f.proto;
        (*e).hook = f.hook as u8;
        (*e).verdict = verdict as u8;
        (*e).reason = d.reason as u8;
        (*e)._pad0 = 0;
        (*e).cpu = bpf_get_smp_processor_id() as u16;
        core::ptr::write_volatile((&raw mut (*e)._pad).cast::<u32>(), 0);
        copy16(&raw mut (*e).comm, &[0; 16]);
        if f.task {
            (*e).pid_tgid = bpf_get_current_pid_tgid();
            (*e).uid_gid = bpf_get_current_uid_gid();
            let _ = bpf_get_current_comm((*e).comm.as_mut_ptr().cast(), 16);
        } else {
            // Volatile: two adjacent zero stores would become a `memset`.
            core::ptr::write_volatile(&raw mut (*e).pid_tgid, 0);
            core::ptr::write_volatile(&raw mut (*e).uid_gid, 0);
        }
    }
    entry.submit(0);
}

/// Sixteen bytes as two volatile 8-byte stores, never a `memcpy`/`memset`
/// call (see `Flow`). Both sides are 8-byte aligned: `Flow` and `Event`
/// fields, or a constant.
#[inline(always)]
pub(crate) unsafe fn copy16(dst: *mut [u8; 16], src: &[u8; 16]) {
    let (d, s) = (dst.cast::<u64>(), src.as_ptr().cast::<u64>());
    unsafe {
        core::ptr::write_volatile(d, s.read_unaligned());
        core::ptr::write_volatile(d.add(1), s.add(1).read_unaligned());
    }
}
