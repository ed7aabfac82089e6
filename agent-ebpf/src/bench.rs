//! Programs only benchmarks use (`cargo xtask bench`), in their own object
//! so the production one carries none of them: `bulkhead run
//! --bench-probes` loads this object on the running agent's pinned maps
//! (opened by name) and pins its programs; nothing attaches them, they only
//! serve `BPF_PROG_TEST_RUN`.
//!
//! The modules are the production programs' own files, so a probe measures
//! exactly the code the hooks run.
#![no_std]
#![no_main]

#[path = "addr.rs"]
#[expect(
    dead_code,
    reason = "shared with the production programs; the probes need only part"
)]
mod addr;
#[path = "maps.rs"]
mod maps;
#[path = "policy.rs"]
#[expect(
    dead_code,
    reason = "shared with the production programs; the probes need only part"
)]
mod policy;

use aya_ebpf::{macros::cgroup_skb, programs::SkBuffContext};
use bulkhead_common::{
    decide::v4_in_16,
    event::{FAMILY_INET, FAMILY_INET6},
};

use crate::{addr::classify, policy::active};

const ALLOW: i32 = 1;
const DENY: i32 = 0;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

/// The address-table walk for the packet's destination and
/// nothing else, to weigh it against the whole decision. Returns 0 where
/// the destination is in a domain, 1 elsewhere.
#[cgroup_skb(egress)]
pub fn bh_probe_addr(ctx: SkBuffContext) -> i32 {
    let Some(a) = active() else {
        return ALLOW;
    };
    let proto = u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16);
    let (family, dst) = if proto == ETH_P_IP {
        match ctx.load::<[u8; 4]>(16) {
            Ok(d) => (FAMILY_INET, v4_in_16(d)),
            Err(_) => return ALLOW,
        }
    } else if proto == ETH_P_IPV6 {
        match ctx.load::<[u8; 16]>(24) {
            Ok(d) => (FAMILY_INET6, d),
            Err(_) => return ALLOW,
        }
    } else {
        return ALLOW;
    };
    match classify(a.slot, family, &dst) {
        Some(c) if c.domain != 0 => DENY,
        _ => ALLOW,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
