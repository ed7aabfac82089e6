//! The connect and sendmsg decision (v4 and v6): the main decision point.

use aya_ebpf::programs::SockAddrContext;
use bulkhead_common::{
    Decision, Direction, Hook, Ports,
    decide::{PeerAddr, peer_domain, refused_unaudited, v4_in_16},
    event::{FAMILY_INET, FAMILY_INET6},
    maps::{CONFIG_AUDIT_REFUSE, MODE_AUDIT},
};

use crate::{
    dns::names_of,
    events::{ALLOW, Flow, finish},
    log::{program, rare},
    peer::{IPPROTO_TCP, decide_flow, listener_domain, peer_of},
    policy::{Active, active, domain_rec},
    socks::{cache_connect, listen_epoch, mark_initiator, new_flow, remember_send, repeat_send},
    walk::{current_cgroup, current_domain},
};

/// The sock_addr decision shared by connect and sendmsg, v4 and v6.
#[inline(always)]
pub(crate) fn sock_addr<const V6: bool>(ctx: &SockAddrContext, hook4: Hook, hook6: Hook) -> i32 {
    let Some(a) = active() else { return ALLOW };
    let cgroup_id = current_cgroup();
    // An unconnected datagram to the socket's previous destination: its
    // remembered verdict, if it still holds (`SendCache`). The bind count
    // is read before the decision, so a bind that races with it
    // invalidates what it remembers. (`hook4` is a constant: connects have
    // no such branch, and nothing of it stays live for the verifier.)
    let mut listeners = 0;
    if is_sendmsg(hook4) {
        listeners = listen_epoch();
        if a.config.flags & CONFIG_AUDIT_REFUSE == 0
            && repeat::<V6>(ctx, &a, cgroup_id, listeners, hook4, hook6)
        {
            return ALLOW;
        }
    }
    let dom_id = current_domain(&a, cgroup_id);
    let Some(dom) = domain_rec(a.slot, dom_id) else {
        return ALLOW;
    };
    let sa = unsafe { &*ctx.sock_addr };
    let proto = sa.protocol;
    let dport = (sa.user_port as u16).to_ne_bytes();
    let (addr, hook) = dst_of::<V6>(sa, hook4, hook6);
    let (family, dst) = (addr.family, addr.addr);
    let mut peer = peer_of(a.slot, &addr);
    peer.domain = peer_domain(peer.domain, || {
        listener_domain(ctx.sock_addr.cast(), a.slot, family, proto, &dst, dport)
    });
    let port = u16::from_be_bytes(dport);
    peer.names = names_of(&a, dom_id, dom, &addr, port, true);
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    let mut f = Flow {
        family,
        proto: proto as u8,
        hook,
        task: true,
        first: true,
        src: [0; 16],
        dst,
        sport: [0; 2],
        dport,
    };
    // The socket's own port (0 before its bind): a datagram server's answer
    // goes out by the reverse rule of the bridge that let the request in.
    let ports = Ports {
        service: port,
        other: unsafe { (*sk).src_port } as u16,
    };
    // `--audit-full=refuse` while the audit trail cannot be written: one
    // test of the config already loaded; a refused connection is not
    // decided by the policy (one more path for the verifier, not one per
    // outcome).
    let d = if a.config.flags & CONFIG_AUDIT_REFUSE != 0 && refused_unaudited(dom_id, &peer) {
        Decision::unaudited()
    } else {
        decide_flow(
            &a,
            dom_id,
            dom,
            &peer,
            Direction::Egress,
            proto as u8,
            ports,
        )
    };
    let mut stored = true;
    if d.allow || a.config.mode == MODE_AUDIT {
        // Connects always count as a new flow; a datagram is one when its
        // destination or reason differs from the socket's previous one.
        let info = mark_initiator(sk, !is_sendmsg(hook));
        stored = !info.is_null();
        f.first =
            !d.allow || !is_sendmsg(hook) || new_flow(info, &dst, dport, proto as u8, d.reason);
        if is_sendmsg(hook4) {
            remember_send(
                info,
                &a,
                &d,
                dom_id,
                cgroup_id,
                listeners,
                &dst,
                dport,
                proto as u8,
            );
        } else if proto == IPPROTO_TCP {
            cache_connect(info, &a, dom_id, &d, family, &dst, dport);
        }
    }
    let rc = finish(&a, dom_id, dom, peer.domain, cgroup_id, d, &f);
    // Logged last, when little else is live, so the verifier walks the
    // log once instead of once per decision path (logged where the storage
    // is taken, it cost each connect/sendmsg program 5x its instructions).
    if !stored {
        rare!(
            program(hook),
            "no storage for a connecting socket of cgroup {}: its packets are judged as the peer's conversation",
            cgroup_id
        );
    }
    rc
}

/// The destination and the hook that decides it. The verifier refuses
/// `user_ip6` reads in v4 programs (and vice versa), so the family is fixed
/// per program, not read from the context. An IPv4-mapped address is
/// decided as IPv4; IPv4-compatible `::a.b.c.d` stays IPv6: the kernel
/// routes it as IPv6, to the IPv6 address it is (docs/THREAT_MODEL.md).
#[inline(always)]
fn dst_of<const V6: bool>(
    sa: &aya_ebpf::bindings::bpf_sock_addr,
    hook4: Hook,
    hook6: Hook,
) -> (PeerAddr, Hook) {
    if !V6 {
        (
            PeerAddr::new(FAMILY_INET, v4_in_16(sa.user_ip4.to_ne_bytes())),
            hook4,
        )
    } else {
        (PeerAddr::new(FAMILY_INET6, user_ip6(sa)), hook6)
    }
}

/// `sendmsg`: whether the socket's remembered verdict allows this
/// datagram (counted as a decision if so).
#[inline(always)]
fn repeat<const V6: bool>(
    ctx: &SockAddrContext,
    a: &Active,
    cgroup_id: u64,
    listeners: u64,
    hook4: Hook,
    hook6: Hook,
) -> bool {
    let sa = unsafe { &*ctx.sock_addr };
    let (addr, hook) = dst_of::<V6>(sa, hook4, hook6);
    repeat_send(
        unsafe { sa.__bindgen_anon_1.sk },
        a,
        cgroup_id,
        listeners,
        &addr.addr,
        (sa.user_port as u16).to_ne_bytes(),
        sa.protocol as u8,
        hook,
    )
}

/// The context only allows 4-byte loads of `user_ip6`: read word by word.
#[inline(always)]
pub(crate) fn user_ip6(sa: &aya_ebpf::bindings::bpf_sock_addr) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let w = unsafe { core::ptr::read_volatile(&sa.user_ip6[i]) }.to_ne_bytes();
        out[i * 4] = w[0];
        out[i * 4 + 1] = w[1];
        out[i * 4 + 2] = w[2];
        out[i * 4 + 3] = w[3];
        i += 1;
    }
    out
}

#[inline(always)]
pub(crate) fn is_sendmsg(hook: Hook) -> bool {
    matches!(hook, Hook::Sendmsg4 | Hook::Sendmsg6)
}
