//! Socket creation: raw and packet sockets would bypass every other hook.

use aya_ebpf::programs::{LsmContext, SockContext};
use bulkhead_common::{Decision, Hook, Reason, maps::DOMAIN_ALLOW_RAW};

use crate::{
    events::{ALLOW, DENY, Flow, finish},
    log::{program, rare},
    policy::{active, domain_rec},
    socks::mark_initiator,
    walk::{current_cgroup, current_domain},
};

pub(crate) const IPPROTO_ICMP: u32 = 1;
pub(crate) const IPPROTO_ICMPV6: u32 = 58;
pub(crate) const SOCK_DGRAM: u32 = 2;
pub(crate) const SOCK_RAW: u32 = 3;
pub(crate) const AF_PACKET: i32 = 17;
pub(crate) const AF_XDP: i32 = 44;
/// What an `lsm_cgroup` program returns to let the call go on, or to fail
/// it with `EPERM`.
pub(crate) const LSM_ALLOW: i32 = 1;
pub(crate) const LSM_DENY: i32 = 0;

/// Raw IP sockets would bypass the sock_addr hooks: domain workloads may
/// not open them unless their domain allows it.
///
/// Ping sockets (`SOCK_DGRAM` with `IPPROTO_ICMP`/`IPPROTO_ICMPV6`) can only
/// send echo requests, and an unconnected `sendto()` on them runs no
/// sock_addr hook: they are marked as initiators from birth, so the packet
/// hooks judge their traffic by the egress rules (geofence included), not
/// as replies to a conversation the peer started.
#[inline(always)]
pub(crate) fn sock_create(ctx: &SockContext) -> i32 {
    let sk = unsafe { &*ctx.sock };
    if sk.type_ == SOCK_DGRAM && (sk.protocol == IPPROTO_ICMP || sk.protocol == IPPROTO_ICMPV6) {
        if mark_initiator(ctx.sock, true).is_null() {
            rare!(
                program(Hook::SockCreate),
                "no storage for a ping socket of cgroup {}: its packets are judged as the peer's conversation",
                current_cgroup()
            );
        }
        return ALLOW;
    }
    if sk.type_ != SOCK_RAW {
        return ALLOW;
    }
    let Some(a) = active() else { return ALLOW };
    let cgroup_id = current_cgroup();
    let dom_id = current_domain(&a, cgroup_id);
    let Some(dom) = domain_rec(a.slot, dom_id) else {
        return ALLOW;
    };
    if dom.flags & DOMAIN_ALLOW_RAW != 0 {
        return ALLOW;
    }
    let d = Decision {
        allow: false,
        reason: Reason::RawSocketDenied,
        bridge_id: 0,
        until_tai_ns: 0,
    };
    let f = Flow {
        family: sk.family as u8,
        proto: sk.protocol as u8,
        hook: Hook::SockCreate,
        task: true,
        first: true,
        src: [0; 16],
        dst: [0; 16],
        sport: [0; 2],
        dport: [0; 2],
    };
    finish(&a, dom_id, dom, 0, cgroup_id, d, &f)
}

/// Packet sockets (`AF_PACKET`, and `AF_INET`+`SOCK_PACKET`, which the
/// kernel turns into `AF_PACKET` before this hook) and XDP sockets hand
/// frames to the driver below the IP stack, past every hook above: domain
/// workloads may not open them unless their domain allows raw sockets.
/// `cgroup/sock_create` only ever sees `AF_INET`/`AF_INET6`, so this is the
/// BPF LSM hook (`lsm_cgroup/socket_create`, which runs for the creating
/// task's cgroup). Sockets the kernel opens for itself are left alone.
#[inline(always)]
pub(crate) fn socket_create(ctx: &LsmContext) -> i32 {
    // LSM_HOOK(int, 0, socket_create, int family, int type, int protocol, int kern)
    let family: i32 = ctx.arg(0);
    let kern: i32 = ctx.arg(3);
    if kern != 0 || family != AF_PACKET && family != AF_XDP {
        return LSM_ALLOW;
    }
    let Some(a) = active() else {
        return LSM_ALLOW;
    };
    let cgroup_id = current_cgroup();
    let dom_id = current_domain(&a, cgroup_id);
    let Some(dom) = domain_rec(a.slot, dom_id) else {
        return LSM_ALLOW;
    };
    if dom.flags & DOMAIN_ALLOW_RAW != 0 {
        return LSM_ALLOW;
    }
    let d = Decision {
        allow: false,
        reason: Reason::PacketSocketDenied,
        bridge_id: 0,
        until_tai_ns: 0,
    };
    let f = Flow {
        family: family as u8,
        proto: 0,
        hook: Hook::SockCreate,
        task: true,
        first: true,
        src: [0; 16],
        dst: [0; 16],
        sport: [0; 2],
        dport: [0; 2],
    };
    let rc = finish(&a, dom_id, dom, 0, cgroup_id, d, &f);
    if rc == DENY { LSM_DENY } else { LSM_ALLOW }
}
