//! bulkhead's kernel programs.
//!
//! The sock_addr hooks (`connect4/6`, `sendmsg4/6`) are the decision point:
//! a denied `connect()`/`sendto()` fails at once with `EPERM` and no packet
//! is sent. The skb hooks are the backstop for flows older than the policy
//! and the ingress side. `sock_create` refuses raw sockets, the BPF LSM
//! hook `socket_create` refuses packet sockets (which `sock_create` never
//! sees), and `post_bind` records who owns a bound socket, so a connect to a
//! local listener is decided by the listener's domain.
//!
//! This file holds only the entry points; each concern has its own module,
//! as Cilium's `bpf/lib/` does:
//! - [`maps`]: every pinned map; [`policy`]: the generation in force;
//! - [`walk`]: cgroup ancestry walks (which domain a task, packet or
//!   socket owner is in); [`addr`]: the address table lookup;
//! - [`peer`]: the peer of a decision and the glue to `bulkhead_common::decide`;
//! - [`events`]: counters, events and their rate limit;
//! - [`log`]: the kernel's own warnings (aya-log), on rare paths only;
//! - [`socks`]: socket storage (owner, initiator, verdict cache, cut marks);
//! - [`sock_addr`], [`skb`] (with [`packet`]), [`create`]: the hook bodies;
//! - [`dns`]: learning the addresses of names from answers, and what the
//!   decisions ask of them.
#![no_std]
#![no_main]
// `atomic_xadd`: the BPF target has atomic adds (`lock xadd`) but no
// compare-and-swap, so core's atomics offer no `fetch_add` there.
#![expect(internal_features, reason = "atomic_xadd, for the bind counter")]
#![feature(core_intrinsics)]

mod addr;
mod clock;
mod create;
mod dns;
mod events;
mod log;
mod maps;
mod packet;
mod peer;
mod policy;
mod skb;
mod sock_addr;
mod socks;
mod walk;

use core::mem::size_of;

use aya_ebpf::{
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, lsm_cgroup},
    programs::{LsmContext, SkBuffContext, SockAddrContext, SockContext},
};
use bulkhead_common::{Direction, Event, Hook};

#[cgroup_sock_addr(connect4)]
pub fn bh_connect4(ctx: SockAddrContext) -> i32 {
    sock_addr::sock_addr::<false>(&ctx, Hook::Connect4, Hook::Connect6)
}

#[cgroup_sock_addr(connect6)]
pub fn bh_connect6(ctx: SockAddrContext) -> i32 {
    sock_addr::sock_addr::<true>(&ctx, Hook::Connect4, Hook::Connect6)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn bh_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock_addr::sock_addr::<false>(&ctx, Hook::Sendmsg4, Hook::Sendmsg6)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn bh_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock_addr::sock_addr::<true>(&ctx, Hook::Sendmsg4, Hook::Sendmsg6)
}

#[cgroup_sock(sock_create)]
pub fn bh_sock_create(ctx: SockContext) -> i32 {
    create::sock_create(&ctx)
}

#[lsm_cgroup(hook = "socket_create")]
pub fn bh_socket_create(ctx: LsmContext) -> i32 {
    create::socket_create(&ctx)
}

#[cgroup_sock(post_bind4)]
pub fn bh_post_bind4(ctx: SockContext) -> i32 {
    socks::record_owner(&ctx, "bulkhead::kernel::bh_post_bind4")
}

#[cgroup_sock(post_bind6)]
pub fn bh_post_bind6(ctx: SockContext) -> i32 {
    socks::record_owner(&ctx, "bulkhead::kernel::bh_post_bind6")
}

#[cgroup_skb(egress)]
pub fn bh_egress(ctx: SkBuffContext) -> i32 {
    skb::packet_hook(&ctx, Direction::Egress, &maps::BH_DNSOUT)
}

#[cgroup_skb(ingress)]
pub fn bh_ingress(ctx: SkBuffContext) -> i32 {
    skb::packet_hook(&ctx, Direction::Ingress, &maps::BH_DNSIN)
}

/// Entered from `bh_egress` only (see [`dns`]).
#[cgroup_skb(egress)]
pub fn bh_dns_egress(ctx: SkBuffContext) -> i32 {
    dns::egress(&ctx)
}

/// Entered from `bh_ingress` only (see [`dns`]).
#[cgroup_skb(ingress)]
pub fn bh_dns_ingress(ctx: SkBuffContext) -> i32 {
    dns::ingress(&ctx)
}

const _: () = assert!(size_of::<Event>() == bulkhead_common::event::EVENT_SIZE);

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
