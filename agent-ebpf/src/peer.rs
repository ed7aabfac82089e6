//! The peer of a decision (address table, local listener) and the
//! decision glue around `bulkhead_common::decide`.

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::bpf_sock_tuple,
    helpers::generated::{
        bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release, bpf_sk_storage_get,
    },
};
use bulkhead_common::{
    Decision, Direction, Ports,
    decide::{Bridges, Names, Peer, PeerAddr, ReadClock, bridge_rule, decide_peer},
    event::FAMILY_INET,
    maps::{BridgeKey, BridgeRule, DomainRec, MAX_BRIDGE_RULES, SockInfo},
};

use crate::{
    addr::{classify, first4},
    maps::BH_BRIDGES,
    policy::Active,
    socks::socks_map,
    walk::{domain_of, walk_owner},
};

pub(crate) const IPPROTO_TCP: u32 = 6;
pub(crate) const IPPROTO_UDP: u32 = 17;
/// `BPF_F_CURRENT_NETNS` as the helpers' u64 netns argument.
pub(crate) const CURRENT_NETNS: u64 = 0xffff_ffff;

/// A lookup tuple on an 8-byte boundary, so it can be zeroed in words.
#[repr(C, align(8))]
struct Tuple(bpf_sock_tuple);
const _: () = assert!(size_of::<bpf_sock_tuple>() == 36);

/// Finds the local socket a connect would reach and returns its owner's
/// domain under the current policy; 0 when there is none or it has no owner.
///
/// Every connect to an address in no domain network pays this lookup, even
/// to a remote peer. Skipping it for ports that no owned socket was bound
/// to would be unsound: `post_bind` records a socket's owner once, but a
/// socket bound to port 0 that connects and then disconnects
/// (`AF_UNSPEC`) gives its port back, and its next `sendto()` (or
/// `listen()`, on kernels that allow it) takes another one without a
/// `post_bind`, owner still recorded.
#[inline(always)]
pub(crate) fn listener_domain(
    ctx: *mut core::ffi::c_void,
    slot: u32,
    family: u8,
    proto: u32,
    dst: &[u8; 16],
    dport: [u8; 2],
) -> u32 {
    let mut t = MaybeUninit::<Tuple>::uninit();
    // Zeroed word by word: `zeroed()` here was a byte-by-byte `memset`
    // loop of 36 rounds on every connect.
    unsafe {
        let w = t.as_mut_ptr().cast::<u64>();
        let mut i = 0;
        while i < 4 {
            core::ptr::write_volatile(w.add(i), 0);
            i += 1;
        }
        core::ptr::write_volatile(w.add(4).cast::<u32>(), 0);
    }
    // SAFETY: all 36 bytes were written above.
    let tuple = unsafe { &mut (*t.as_mut_ptr()).0 };
    let size = if family == FAMILY_INET {
        tuple.__bindgen_anon_1.ipv4.daddr = u32::from_ne_bytes(first4(dst));
        tuple.__bindgen_anon_1.ipv4.dport = u16::from_ne_bytes(dport);
        12u32
    } else {
        // SAFETY: both are 16 plain bytes.
        tuple.__bindgen_anon_1.ipv6.daddr =
            unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(*dst) };
        tuple.__bindgen_anon_1.ipv6.dport = u16::from_ne_bytes(dport);
        36u32
    };
    let sk = unsafe {
        if proto == IPPROTO_TCP {
            bpf_sk_lookup_tcp(ctx, tuple, size, CURRENT_NETNS, 0)
        } else if proto == IPPROTO_UDP {
            bpf_sk_lookup_udp(ctx, tuple, size, CURRENT_NETNS, 0)
        } else {
            return 0;
        }
    };
    if sk.is_null() {
        return 0;
    }
    let owner = unsafe {
        bpf_sk_storage_get(socks_map(), sk.cast(), core::ptr::null_mut(), 0) as *const SockInfo
    };
    // Released before the walk, not after: a verifier before 6.x tells
    // apart states that hold references of different ids, so a walk under
    // one is verified again for every path that reached the lookup (5.15's
    // gave up on `bh_egress` at a million instructions). The owner record
    // is socket storage, freed only after an RCU grace period, which this
    // program's run holds off.
    unsafe { bpf_sk_release(sk.cast()) };
    if owner.is_null() {
        return 0;
    }
    domain_of(slot, owner.cast(), walk_owner)
}

/// What the address table says about a peer: one walk gives both the
/// domain of the networks holding it and its country. (A local listener's
/// domain comes on top: [`peer_domain`].)
#[inline(always)]
pub(crate) fn peer_of(slot: u32, addr: &PeerAddr) -> Peer<'static> {
    let class = classify(slot, addr.family, &addr.addr);
    Peer {
        domain: class.map_or(0, |c| c.domain),
        geo: class.map(|c| &c.geo),
        loopback: addr.is_loopback(),
        names: Names::default(),
    }
}

/// The decision for a peer, as `bulkhead_common` (and `explain`) takes it:
/// bridges looked up only when it needs them.
#[inline(always)]
pub(crate) fn decide_flow(
    a: &Active,
    dom_id: u32,
    dom: &DomainRec,
    peer: &Peer,
    dir: Direction,
    proto: u8,
    ports: Ports,
) -> Decision {
    let now = ReadClock(crate::clock::now_tai);
    let bridges = KernelBridges { slot: a.slot };
    decide_peer(dir, dom_id, dom, peer, bridges, proto, ports, now)
}

/// The bridges of the policy in `slot`, matched by [`bh_bridge_rule`].
#[derive(Clone, Copy)]
struct KernelBridges {
    slot: u32,
}

impl Bridges<'static> for KernelBridges {
    #[inline(always)]
    fn answer(
        self,
        from: u32,
        to: u32,
        proto: u8,
        ports: Ports,
        now_tai_ns: u64,
    ) -> Option<(&'static BridgeRule, bool)> {
        let flow = u64::from(proto) | u64::from(ports.service) << 8 | u64::from(ports.other) << 24;
        let found = bh_bridge_rule(self.slot, from, to, flow, now_tai_ns);
        if found == NO_RULE {
            return None;
        }
        let set = unsafe { BH_BRIDGES.get(bridge_key(self.slot, from, to)) }?;
        // The verifier knows nothing of a BPF function's result: bound it.
        let rule = &set.rules[found as usize & (MAX_BRIDGE_RULES - 1)];
        Some((rule, found & RULE_OPEN != 0))
    }
}

const _: () = assert!(MAX_BRIDGE_RULES.is_power_of_two());
/// [`bh_bridge_rule`]: no rule of the bridges matches.
const NO_RULE: u32 = u32::MAX;
/// [`bh_bridge_rule`]: the rule's window is open (beside its index).
const RULE_OPEN: u32 = 1 << 8;

#[inline(always)]
fn bridge_key(slot: u32, from: u32, to: u32) -> BridgeKey {
    BridgeKey {
        slot,
        from: from as u16,
        to: to as u16,
    }
}

/// [`bridge_rule`] over the bridges from `from` to `to` in `slot`, for a
/// `flow` of protocol (bits 0-7), service port (8-23) and other port
/// (24-39): the rule's index, with [`RULE_OPEN`] when its window is open,
/// or [`NO_RULE`].
///
/// A global BPF function (exported to bpf-linker by `agent/build.rs`, so
/// it is not inlined), which a kernel verifies once, on its own: inlined,
/// the rule loop was verified again for every path of a hook reaching a
/// decision, and Ubuntu 22.04's 5.15 gave up on `bh_egress` at a million
/// instructions. Its arguments are scalars, all that 5.10's verifier
/// takes for a global function.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn bh_bridge_rule(slot: u32, from: u32, to: u32, flow: u64, now_tai_ns: u64) -> u32 {
    let Some(set) = (unsafe { BH_BRIDGES.get(bridge_key(slot, from, to)) }) else {
        return NO_RULE;
    };
    let proto = flow as u8;
    let ports = Ports {
        service: (flow >> 8) as u16,
        other: (flow >> 24) as u16,
    };
    match bridge_rule(set, proto, ports, now_tai_ns) {
        Some((i, true)) => i as u32 | RULE_OPEN,
        Some((i, false)) => i as u32,
        None => NO_RULE,
    }
}
