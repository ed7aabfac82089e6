//! Packet parsing for the cgroup_skb hooks. cgroup skbs start at the network
//! header. Every read is a bounds-checked `bpf_skb_load_bytes`; anything that
//! cannot be read is reported as unparsable and dropped for domain workloads.
//!
//! The rules, which `tests/tests/packets.rs` checks case by case and with
//! random packets against the loaded programs:
//!
//! IPv4 (skb protocol `ETH_P_IP`):
//! - at least 20 bytes, version 4, IHL ≥ 5 and the whole header (IHL × 4
//!   bytes, options included) inside the packet;
//! - total length ≥ the header and ≤ the packet (0 is accepted only on a
//!   packet longer than 64 KiB: a BIG TCP GSO packet, whose length the
//!   field cannot hold);
//! - TCP, UDP, SCTP and UDP-Lite read their ports right after the header
//!   (options skipped); the ports must lie inside the total length. Non-first
//!   fragments carry no ports: they are decided with port 0.
//!
//! IPv6 (skb protocol `ETH_P_IPV6`):
//! - at least 40 bytes, version 6; the payload length must fit in the
//!   packet (0 is accepted only on a packet longer than 64 KiB + 40: a
//!   jumbogram or BIG TCP);
//! - up to [`MAX_EXT_HEADERS`] extension headers are walked (hop-by-hop,
//!   routing, destination options, authentication, fragment), each wholly
//!   inside the payload; a longer chain is unparsable;
//! - a non-first fragment ends the walk: what follows its fragment header is
//!   the middle of the payload, not headers; it is decided with port 0;
//! - TCP, UDP, SCTP and UDP-Lite read their ports after the last extension
//!   header; any other next header (ICMPv6, ESP, "no next header", unknown
//!   values) is decided by address alone, with port 0.
//!
//! Any other skb protocol is unparsable.
//!
//! The fixed headers (and the ports right after a header without options
//! or extension headers) are read straight from the packet's linear data
//! when it holds them, which it nearly always does: the stack builds or
//! pulls them there before these hooks run (not in the unrolled object,
//! see `load_at`). Everything else, and a packet whose headers are not
//! linear, goes through `bpf_skb_load_bytes`: the same bytes either way,
//! so the rules above do not depend on the path.

use aya_ebpf::programs::SkBuffContext;
use bulkhead_common::{
    decide::v4_in_16,
    event::{FAMILY_INET, FAMILY_INET6},
};

/// Aligned, addresses first, for the reason given at `Flow`.
#[repr(C, align(8))]
pub struct Parsed {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub family: u8,
    pub proto: u8,
    /// Zero when the packet carries no ports (other protocols, or a
    /// non-first fragment).
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    /// Where the transport header starts.
    pub l4: u16,
}

impl Parsed {
    pub const EMPTY: Parsed = Parsed {
        src: [0; 16],
        dst: [0; 16],
        family: 0,
        proto: 0,
        sport: [0; 2],
        dport: [0; 2],
        l4: 0,
    };
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
pub const MAX_EXT_HEADERS: usize = 8;
/// Largest length the 16-bit IPv4 total length / IPv6 payload length holds.
const MAX_LEN_FIELD: usize = 0xffff;

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
fn is_ext_header(next: u8) -> bool {
    matches!(
        next,
        NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST | NEXTHDR_AUTH | NEXTHDR_FRAGMENT
    )
}

/// `N` bytes at the constant offset `OFF`: a direct read when the linear
/// data holds them, else a copy. Per packet this saves a helper call,
/// which costs more than the whole copy on hosts whose return thunks
/// mitigate speculation. The offset is a constant so the verifier checks
/// one packet range, and the compiler cannot turn the test into pointer
/// arithmetic on `data_end`, which the verifier refuses. The unrolled
/// object (kernels without `bpf_loop`) copies always: the second way in
/// doubles the paths its verifier keeps apart, and 5.15's then passes a
/// million instructions on `bh_egress`.
#[inline(always)]
fn load_at<const OFF: usize, const N: usize>(ctx: &SkBuffContext) -> Option<[u8; N]> {
    if !cfg!(feature = "unrolled") {
        let skb = ctx.skb.skb;
        let data = unsafe { (*skb).data } as usize;
        let end = unsafe { (*skb).data_end } as usize;
        if data + OFF + N <= end {
            // SAFETY: the range was checked against the linear data just above.
            return Some(unsafe { core::ptr::read_unaligned((data + OFF) as *const [u8; N]) });
        }
    }
    ctx.load(OFF).ok()
}

/// The two ports at `off`, which must end by `end`. `FIXED` is where they
/// are when the network header has no options or extension headers. The
/// unrolled object tests no offset: one copy, one call site (`load_at`).
#[inline(always)]
fn ports<const FIXED: usize>(
    ctx: &SkBuffContext,
    off: usize,
    end: usize,
) -> Option<([u8; 2], [u8; 2])> {
    if off + 4 > end {
        return None;
    }
    let p: [u8; 4] = if !cfg!(feature = "unrolled") && off == FIXED {
        load_at::<FIXED, 4>(ctx)?
    } else {
        ctx.load(off).ok()?
    };
    Some(([p[0], p[1]], [p[2], p[3]]))
}

#[inline(always)]
fn parse_v4(ctx: &SkBuffContext) -> Option<Parsed> {
    let len = ctx.len() as usize;
    let h: [u8; 20] = load_at::<0, 20>(ctx)?;
    if h[0] >> 4 != 4 {
        return None;
    }
    // The real header length: options make it longer than 20 bytes.
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    if ihl < 20 || ihl > len {
        return None;
    }
    let mut total = u16::from_be_bytes([h[2], h[3]]) as usize;
    if total == 0 && len > MAX_LEN_FIELD {
        total = len;
    }
    if total < ihl || total > len {
        return None;
    }
    let frag_off = u16::from_be_bytes([h[6], h[7]]) & 0x1fff;
    let proto = h[9];
    let src = v4_in_16([h[12], h[13], h[14], h[15]]);
    let dst = v4_in_16([h[16], h[17], h[18], h[19]]);
    let (sport, dport) = if has_ports(proto) && frag_off == 0 {
        ports::<20>(ctx, ihl, total)?
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
        l4: ihl as u16,
    })
}

#[inline(always)]
fn parse_v6(ctx: &SkBuffContext) -> Option<Parsed> {
    let len = ctx.len() as usize;
    let h: [u8; 40] = load_at::<0, 40>(ctx)?;
    if h[0] >> 4 != 6 {
        return None;
    }
    let payload = u16::from_be_bytes([h[4], h[5]]) as usize;
    let end = if payload == 0 && len > 40 + MAX_LEN_FIELD {
        len
    } else {
        40 + payload
    };
    if end > len {
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
    while i < MAX_EXT_HEADERS && first_fragment && is_ext_header(next) {
        let e: [u8; 4] = if off + 4 <= end {
            ctx.load(off).ok()?
        } else {
            return None;
        };
        let hdr_len = match next {
            NEXTHDR_AUTH => (e[1] as usize + 2) * 4,
            NEXTHDR_FRAGMENT => {
                // A non-first fragment: what follows is payload, not headers.
                if u16::from_be_bytes([e[2], e[3]]) >> 3 != 0 {
                    first_fragment = false;
                }
                8
            }
            _ => (e[1] as usize + 1) * 8,
        };
        if off + hdr_len > end {
            return None;
        }
        next = e[0];
        off += hdr_len;
        i += 1;
    }
    if first_fragment && is_ext_header(next) {
        // Still extension headers after MAX_EXT_HEADERS of them.
        return None;
    }
    let (sport, dport) = if has_ports(next) && first_fragment {
        ports::<40>(ctx, off, end)?
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
        l4: off as u16,
    })
}
