//! The packet-level check, for both directions: the backstop for flows
//! older than the policy, and the ingress side.

use aya_ebpf::{
    helpers::generated::bpf_skb_cgroup_id, maps::ProgramArray, programs::SkBuffContext,
};
use bulkhead_common::{
    Decision, Direction, Hook, Ports, Reason,
    decide::{PeerAddr, peer_domain},
    maps::MODE_AUDIT,
};

use crate::{
    dns::{hand_over, names_of},
    events::{ALLOW, Flow, finish},
    packet::{Parsed, parse},
    peer::{IPPROTO_TCP, decide_flow, listener_domain, peer_of},
    policy::{Active, active, domain_rec},
    socks::{
        cache_verdict, cached_allow, cached_verdict, conversation, initiator, mark_cut,
        same_conversation, settle, skb_sock, sock_info, unkeyed,
    },
    walk::skb_domain,
};

/// The loopback device's index, the same in every network namespace.
pub(crate) const LOOPBACK_IFINDEX: u32 = 1;

/// A packet hook: the check, then, for a packet it lets pass while the
/// policy in force uses names, the DNS program of its direction (`dns`),
/// all under the generation read once.
#[inline(always)]
pub(crate) fn packet_hook(ctx: &SkBuffContext, dir: Direction, dns: &ProgramArray) -> i32 {
    let Some(a) = active() else { return ALLOW };
    let verdict = skb(ctx, &a, dir);
    if verdict == ALLOW {
        hand_over(ctx, &a, dns);
    }
    verdict
}

/// The packet-level check, for both directions.
#[inline(always)]
fn skb(ctx: &SkBuffContext, a: &Active, dir: Direction) -> i32 {
    let hook = match dir {
        Direction::Egress => Hook::SkbEgress,
        Direction::Ingress => Hook::SkbIngress,
    };
    let sk = skb_sock(ctx);
    let info = sock_info(sk);
    let cached = cached_verdict(info, a);
    // An established TCP socket's verdict holds for all its packets, and so
    // does a connected datagram socket's once its peer answered.
    if let Some(c) = cached
        && unkeyed(sk, c)
    {
        return cached_allow(hook, c);
    }
    let initiator = initiator(sk, info);
    let skb_ptr = ctx.skb.skb;
    // A datagram socket's holds for the conversation it was decided for:
    // parse first to see, and find the domain only when it does not. The
    // parse has one call site, which keeps the verifier's work down.
    let mut dom_id = 0;
    let mut dom = None;
    if cached.is_none() {
        dom_id = skb_domain(a, skb_ptr);
        dom = domain_rec(a.slot, dom_id);
        if dom.is_none() {
            return ALLOW;
        }
    }
    let parsed = parse(ctx);
    if let Some(c) = cached {
        if let Some(p) = &parsed
            && same_conversation(c, p, dir, initiator)
        {
            settle(sk, info, p, dir);
            return cached_allow(hook, c);
        }
        dom_id = skb_domain(a, skb_ptr);
        dom = domain_rec(a.slot, dom_id);
    }
    let Some(dom) = dom else { return ALLOW };
    let cgroup_id = unsafe { bpf_skb_cgroup_id(skb_ptr) };
    let p: Parsed = match parsed {
        Some(p) => p,
        None => {
            let d = Decision {
                allow: false,
                reason: Reason::Unparsable,
                bridge_id: 0,
                until_tai_ns: 0,
            };
            let f = Flow {
                family: 0,
                proto: 0,
                hook,
                task: false,
                first: true,
                src: [0; 16],
                dst: [0; 16],
                sport: [0; 2],
                dport: [0; 2],
            };
            return finish(a, dom_id, dom, 0, cgroup_id, d, &f);
        }
    };
    let (peer_addr, peer_port, local_port) = conversation(&p, dir);
    // Judge the packet by who started the conversation: the workload's own
    // connections by its egress rules (bridge local → peer on the peer's
    // port), everything else by its ingress rules (bridge peer → local on
    // the workload's port). Replies then pass exactly when the opening did.
    let (conn_dir, service_port, other_port) = if initiator {
        (Direction::Egress, peer_port, local_port)
    } else {
        (Direction::Ingress, local_port, peer_port)
    };
    // An IPv4-mapped IPv6 peer is decided as its IPv4 address, as in the
    // connect hooks; the event keeps the real header.
    let key = PeerAddr::new(p.family, *peer_addr);
    let (peer_family, peer_key) = (key.family, key.addr);
    // Loopback packets were decided at connect time, where the listener's
    // domain is known; here the peer address has no domain.
    let mut peer = peer_of(a.slot, &key);
    peer.names = names_of(
        a,
        dom_id,
        dom,
        &key,
        u16::from_be_bytes(service_port),
        false,
    );
    // A TCP segment through the loopback device is a connection to or from
    // this host: as at connect time, a peer in no domain network has the
    // domain of the socket listening on its address, so a bridge that
    // expires or a policy that tightens ends same-host connections too.
    // (Datagrams keep their connect-time decision: which side is serving
    // is not known here.)
    if p.proto == IPPROTO_TCP as u8 && unsafe { (*ctx.skb.skb).ifindex } == LOOPBACK_IFINDEX {
        peer.domain = peer_domain(peer.domain, || {
            listener_domain(
                ctx.skb.skb.cast(),
                a.slot,
                peer_family,
                IPPROTO_TCP,
                &peer_key,
                peer_port,
            )
        });
    }
    let ports = Ports {
        service: u16::from_be_bytes(service_port),
        other: u16::from_be_bytes(other_port),
    };
    let d = decide_flow(a, dom_id, dom, &peer, conn_dir, p.proto, ports);
    if d.allow {
        cache_verdict(sk, info, a, dom_id, &d, &p, dir, initiator);
    }
    if !d.allow && a.config.mode != MODE_AUDIT {
        mark_cut(sk, info, a, dom_id, &peer, &d, &p, dir, cgroup_id);
    }
    let f = Flow {
        family: p.family,
        proto: p.proto,
        hook,
        task: false,
        first: true,
        src: p.src,
        dst: p.dst,
        sport: p.sport,
        dport: p.dport,
    };
    finish(a, dom_id, dom, peer.domain, cgroup_id, d, &f)
}
