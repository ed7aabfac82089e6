//! Cgroup ancestry walks: which domain a task, a packet or a socket's
//! owner belongs to (its nearest configured ancestor).

#[cfg(not(feature = "unrolled"))]
use aya_ebpf::helpers::generated::bpf_loop;
use aya_ebpf::{
    bindings::__sk_buff,
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_skb_ancestor_cgroup_id,
        bpf_skb_cgroup_id,
    },
};
use bulkhead_common::{
    decide,
    maps::{CgroupKey, DomainCache, MAX_CGROUP_DEPTH, SockInfo},
};

use crate::{
    maps::{BH_CGROUPS, BH_DOMCACHE},
    policy::Active,
};

/// One walk up a cgroup's ancestry to its nearest configured ancestor
/// (from the root down, so the deepest match wins), run by `bpf_loop`: the
/// verifier checks a level once instead of once per level, which on older
/// kernels is most of what loading the packet hooks costs.
#[repr(C)]
pub(crate) struct Walk {
    /// What a level reads the ancestor id from: the skb, or an owner's
    /// [`SockInfo`]; unused for the current task.
    from: *const core::ffi::c_void,
    slot: u32,
    found: u32,
}

pub(crate) type WalkBody = extern "C" fn(u64, *mut core::ffi::c_void) -> i64;

#[inline(always)]
pub(crate) fn domain_of(slot: u32, from: *const core::ffi::c_void, body: WalkBody) -> u32 {
    let mut w = Walk {
        from,
        slot,
        found: 0,
    };
    let ctx: *mut core::ffi::c_void = (&mut w as *mut Walk).cast();
    #[cfg(not(feature = "unrolled"))]
    unsafe {
        bpf_loop(
            MAX_CGROUP_DEPTH as u32,
            body as *mut core::ffi::c_void,
            ctx,
            0,
        )
    };
    // Kernels before 5.17: a bounded loop, which the verifier unrolls.
    #[cfg(feature = "unrolled")]
    for i in 0..MAX_CGROUP_DEPTH as u64 {
        if body(i, ctx) != 0 {
            break;
        }
    }
    w.found
}

/// One level: `id` is its cgroup (0 past the leaf, which ends the walk).
/// The step itself is `bulkhead_common`'s, which `explain` takes too.
#[inline(always)]
pub(crate) fn walk_level(ctx: *mut core::ffi::c_void, id: u64) -> i64 {
    let w = unsafe { &mut *ctx.cast::<Walk>() };
    let slot = w.slot;
    let configured = |id| {
        let key = CgroupKey {
            cgroup_id: id,
            slot,
            _pad: 0,
        };
        unsafe { BH_CGROUPS.get(key) }.copied()
    };
    if decide::walk_level(&mut w.found, id, configured) {
        0
    } else {
        1
    }
}

#[inline(never)]
pub(crate) extern "C" fn walk_current(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    walk_level(ctx, unsafe {
        bpf_get_current_ancestor_cgroup_id(i as i32 + 1)
    })
}

#[inline(never)]
pub(crate) extern "C" fn walk_skb(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    let skb = unsafe { (*ctx.cast::<Walk>()).from }.cast_mut().cast();
    walk_level(ctx, unsafe {
        bpf_skb_ancestor_cgroup_id(skb, i as i32 + 1)
    })
}

#[inline(never)]
pub(crate) extern "C" fn walk_owner(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    let owner = unsafe { (*ctx.cast::<Walk>()).from }.cast::<SockInfo>();
    let id = if (i as usize) < MAX_CGROUP_DEPTH {
        unsafe { (*owner).ancestors[i as usize] }
    } else {
        0
    };
    walk_level(ctx, id)
}

/// The current task's cgroup. A helper call costs more than most of what
/// a hook does with its answer: take it once per call and pass it on.
#[inline(always)]
pub(crate) fn current_cgroup() -> u64 {
    unsafe { bpf_get_current_cgroup_id() }
}

/// The current task's domain; `id` is [`current_cgroup`] (see
/// [`remembered`]).
#[inline(always)]
pub(crate) fn current_domain(a: &Active, id: u64) -> u32 {
    remembered(a, id, core::ptr::null(), walk_current)
}

/// The domain of a packet's socket's cgroup (see [`remembered`]).
#[inline(always)]
pub(crate) fn skb_domain(a: &Active, skb: *mut __sk_buff) -> u32 {
    let id = unsafe { bpf_skb_cgroup_id(skb) };
    remembered(a, id, skb.cast_const().cast(), walk_skb)
}

/// Cgroup `id`'s domain, remembered per cgroup for the generation in
/// force (`DomainCache`), walked from `from` by `body` otherwise. A
/// cgroup's ancestry never changes, and which cgroups are configured
/// changes only with the generation, so the answer holds until then.
#[inline(always)]
fn remembered(a: &Active, id: u64, from: *const core::ffi::c_void, body: WalkBody) -> u32 {
    if let Some(c) = unsafe { BH_DOMCACHE.get(id) }
        && c.generation == a.generation
    {
        return c.domain;
    }
    let domain = domain_of(a.slot, from, body);
    let c = DomainCache {
        generation: a.generation,
        domain,
        _pad: 0,
    };
    let _ = BH_DOMCACHE.insert(id, c, 0);
    domain
}
