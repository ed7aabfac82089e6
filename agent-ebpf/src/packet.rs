//! Packet parsing for the cgroup_skb hooks. cgroup skbs start at the network
//! header. Every read is a bounds-checked `bpf_skb_load_bytes`; anything that
//! cannot be read is reported as unparsable and dropped for domain workloads.

use agent_common::event::{FAMILY_INET, FAMILY_INET6};
use aya_ebpf::programs::SkBuffContext;

pub struct Parsed {
    pub family: u8,
    pub proto: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Zero when the packet carries no ports (other protocols, or a
    /// non-first fragment).
    pub sport: [u8; 2],
    pub dport: [u8; 2],
}

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_UDPLITE: u8 = 136;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
/// Extension headers followed before giving up; a longer chain is refused.
const MAX_EXT_HEADERS: usize = 8;

#[inline(always)]
pub fn parse(ctx: &SkBuffContext) -> Option<Parsed> {
    let proto = u16::from_be(ctx.skb.protocol() as u16);
    match proto {
        ETH_P_IP => parse_v4(ctx),
        ETH_P_IPV6 => parse_v6(ctx),
        _ => None,
    }
}

#[inline(always)]
fn has_ports(proto: u8) -> bool {
    matches!(
        proto,
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP | IPPROTO_UDPLITE
    )
}

#[inline(always)]
fn ports(ctx: &SkBuffContext, off: usize) -> Option<([u8; 2], [u8; 2])> {
    let p: [u8; 4] = ctx.load(off).ok()?;
    Some(([p[0], p[1]], [p[2], p[3]]))
}

#[inline(always)]
fn parse_v4(ctx: &SkBuffContext) -> Option<Parsed> {
    let h: [u8; 20] = ctx.load(0).ok()?;
    if h[0] >> 4 != 4 {
        return None;
    }
    // The real header length: options make it longer than 20 bytes.
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    if ihl < 20 {
        return None;
    }
    let total = u16::from_be_bytes([h[2], h[3]]) as usize;
    if total < ihl {
        return None;
    }
    let frag_off = u16::from_be_bytes([h[6], h[7]]) & 0x1fff;
    let proto = h[9];
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src[..4].copy_from_slice(&h[12..16]);
    dst[..4].copy_from_slice(&h[16..20]);
    let (sport, dport) = if has_ports(proto) && frag_off == 0 {
        ports(ctx, ihl)?
    } else {
        ([0; 2], [0; 2])
    };
    Some(Parsed {
        family: FAMILY_INET,
        proto,
        src,
        dst,
        sport,
        dport,
    })
}

#[inline(always)]
fn parse_v6(ctx: &SkBuffContext) -> Option<Parsed> {
    let h: [u8; 40] = ctx.load(0).ok()?;
    if h[0] >> 4 != 6 {
        return None;
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&h[8..24]);
    dst.copy_from_slice(&h[24..40]);
    let mut next = h[6];
    let mut off = 40usize;
    let mut first_fragment = true;
    let mut i = 0;
    while i < MAX_EXT_HEADERS {
        match next {
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let e: [u8; 2] = ctx.load(off).ok()?;
                next = e[0];
                off += (e[1] as usize + 1) * 8;
            }
            NEXTHDR_AUTH => {
                let e: [u8; 2] = ctx.load(off).ok()?;
                next = e[0];
                off += (e[1] as usize + 2) * 4;
            }
            NEXTHDR_FRAGMENT => {
                let e: [u8; 4] = ctx.load(off).ok()?;
                next = e[0];
                if u16::from_be_bytes([e[2], e[3]]) >> 3 != 0 {
                    first_fragment = false;
                }
                off += 8;
            }
            _ => break,
        }
        i += 1;
    }
    if i == MAX_EXT_HEADERS {
        return None;
    }
    let (sport, dport) = if has_ports(next) && first_fragment {
        ports(ctx, off)?
    } else {
        ([0; 2], [0; 2])
    };
    Some(Parsed {
        family: FAMILY_INET6,
        proto: next,
        src,
        dst,
        sport,
        dport,
    })
}
