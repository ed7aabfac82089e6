//! The address table: what a decision needs to know about a peer address —
//! the domain whose networks hold it, or else its geo verdicts — as one
//! *class* per address, found by a multibit trie kept in one array map
//! (`BH_ADDR`), with the classes in a second one (`BH_CLASSES`).
//!
//! Why this layout and not LPM tries: a kernel LPM trie is a binary trie of
//! allocated nodes, and a lookup in one holding a country database chases
//! 20 and more pointers. Here an IPv4 lookup reads two to five words and an
//! IPv6 one about seven, each an array access the verifier inlines; domain
//! networks and countries share the one walk; and the agent writes a whole
//! slot with one memory copy through `mmap` instead of one syscall per
//! prefix. `benchmarks` in the repository measure both.
//!
//! One slot is [`SLOT_WORDS`] `u32` words (slot `s` starts at word
//! `s * SLOT_WORDS`), stored as lines of 16 words, one cache line each:
//! - words `[0, 2^16)`: the IPv4 root, indexed by the top 16 address bits;
//! - words `[2^16, 2^17)`: the IPv6 root, the same for IPv6;
//! - then the nodes, `2^stride` words each, indexed by the next `stride`
//!   bits of the address, every node starting on a line.
//!
//! A word with [`NODE`] clear is a leaf: the class index. With [`NODE`] set
//! it names a node: its stride in bits 27..=30, its first word in bits
//! 0..=26. Class [`CLASS_NONE`] is "no domain, and no geo source places it";
//! the agent always writes it at index 0.

use crate::maps::GeoValue;

pub const ROOT_BITS: u32 = 16;
pub const V4_ROOT: u32 = 0;
pub const V6_ROOT: u32 = 1 << ROOT_BITS;
/// Words both roots take at the start of a slot.
pub const ROOT_WORDS: u32 = 2 << ROOT_BITS;
pub const NODE: u32 = 1 << 31;
pub const STRIDE_SHIFT: u32 = 27;
pub const OFFSET_MASK: u32 = (1 << STRIDE_SHIFT) - 1;
/// Node strides the agent writes; every step of a walk takes at least
/// `MIN_STRIDE` bits, which bounds the walk for the verifier.
pub const MIN_STRIDE: u32 = 4;
pub const MAX_STRIDE: u32 = 8;
/// Steps after the root: enough for 32 or 128 bits in strides of
/// `MIN_STRIDE`. Separate bounds keep the verifier's work for IPv4 small.
pub const MAX_STEPS_V4: u32 = (32 - ROOT_BITS) / MIN_STRIDE;
pub const MAX_STEPS_V6: u32 = (128 - ROOT_BITS) / MIN_STRIDE;
/// Words in one line (one map element, one cache line).
pub const LINE_WORDS: u32 = 16;
/// Words per slot: 16 MiB. The full CC0 country database with 10k domain
/// networks takes a little over half (`BENCHMARKS.md`); a table that would
/// not fit is built again without wide nodes (a quarter of the words).
pub const SLOT_WORDS: u32 = 4 << 20;
pub const SLOT_LINES: u32 = SLOT_WORDS / LINE_WORDS;
/// Distinct classes per slot: every domain with networks, and every
/// distinct geo verdict (at most one per country, plus "unknown").
pub const MAX_CLASSES: u32 = 4096;
pub const CLASS_NONE: u32 = 0;
// The kernel masks indices with these instead of checking them.
const _: () = assert!(SLOT_WORDS.is_power_of_two() && MAX_CLASSES.is_power_of_two());

/// One element of `BH_ADDR`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrLine(pub [u32; LINE_WORDS as usize]);

/// `BH_CLASSES[slot * MAX_CLASSES + class]`: what the addresses of a class
/// have in common.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AddrClass {
    /// Verdicts for addresses in no domain ([`GeoValue::UNKNOWN`] where no
    /// geo source places them, and for domain networks, where it is unused).
    pub geo: GeoValue,
    /// The domain whose networks hold the addresses; 0 = none.
    pub domain: u32,
    pub _pad: u32,
}

impl AddrClass {
    pub const NONE: AddrClass = AddrClass {
        geo: GeoValue::UNKNOWN,
        domain: 0,
        _pad: 0,
    };
}

/// A node word.
pub const fn node(stride: u32, offset: u32) -> u32 {
    NODE | (stride << STRIDE_SHIFT) | offset
}

/// The class of an address. `word(i)` reads word `i` of the slot (`None`
/// outside it); the kernel programs and `bulkhead explain` both call this.
///
/// Strides are whole nibbles, so the index into a node is the next one or
/// two nibbles of the address, read without a branch: the verifier then
/// checks one path per step instead of one per case.
#[inline(always)]
pub fn lookup(v6: bool, addr: &[u8; 16], word: impl Fn(u32) -> Option<u32>) -> u32 {
    // The address as two words, and zero past its end (a step may read
    // one nibble past it). Not a zero-padded byte array: the kernel
    // programs built that with byte-by-byte `memset` calls on every lookup.
    let half = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&addr[i * 8..i * 8 + 8]);
        u64::from_be_bytes(b)
    };
    let words = [half(0), half(1)];
    let nibble = |k: u32| {
        let n = (words[((k >> 4) & 1) as usize] >> ((15 - (k & 15)) * 4)) as u32 & 0xf;
        // All ones below nibble 32, zero from there (k < 64).
        let live = 1 - ((k >> 5) & 1);
        n & 0u32.wrapping_sub(live)
    };
    let root = if v6 { V6_ROOT } else { V4_ROOT };
    let Some(mut w) = word(root + (u32::from(addr[0]) << 8 | u32::from(addr[1]))) else {
        return CLASS_NONE;
    };
    let steps = if v6 { MAX_STEPS_V6 } else { MAX_STEPS_V4 };
    // Position in nibbles.
    let mut pos = ROOT_BITS / 4;
    let mut step = 0;
    while step < steps {
        if w & NODE == 0 {
            return w;
        }
        let stride = (w >> STRIDE_SHIFT) & 0xf;
        let two = nibble(pos) << 4 | nibble(pos + 1);
        let at = (w & OFFSET_MASK) + (two >> (MAX_STRIDE.wrapping_sub(stride) & 7));
        w = match word(at) {
            Some(next) => next,
            None => return CLASS_NONE,
        };
        pos += stride / 4;
        step += 1;
    }
    if w & NODE == 0 { w } else { CLASS_NONE }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_roots_nodes_and_leaves() {
        // v4 root: 10.1/16 → node at 131072 (stride 8), whose entry 2 →
        // node at 131328 (stride 4) holding class 7 at nibble 0 of byte 3.
        let mut words = vec![0u32; 131072 + 256 + 16];
        words[0x0a01] = node(8, 131072);
        words[131072 + 2] = node(4, 131328);
        words[131328] = 7;
        words[131072 + 3] = 5;
        words[V6_ROOT as usize + 0x2001] = 9;
        let get = |i: u32| words.get(i as usize).copied();
        let a4 = |a: [u8; 4]| {
            let mut k = [0u8; 16];
            k[..4].copy_from_slice(&a);
            k
        };
        assert_eq!(lookup(false, &a4([10, 1, 2, 15]), get), 7);
        assert_eq!(lookup(false, &a4([10, 1, 2, 16]), get), 0);
        assert_eq!(lookup(false, &a4([10, 1, 3, 200]), get), 5);
        assert_eq!(lookup(false, &a4([10, 2, 0, 0]), get), 0);
        let mut v6 = [0u8; 16];
        v6[0] = 0x20;
        v6[1] = 0x01;
        assert_eq!(lookup(true, &v6, get), 9);
        // A node word pointing outside the slot reads as "none".
        words[0x0a02] = node(4, OFFSET_MASK);
        let get = |i: u32| words.get(i as usize).copied();
        assert_eq!(lookup(false, &a4([10, 2, 0, 0]), get), CLASS_NONE);
    }
}
