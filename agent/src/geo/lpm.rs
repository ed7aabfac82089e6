//! The fewest longest-prefix-match entries that give every address its
//! verdict.
//!
//! Cutting each merged range into disjoint CIDR blocks needs one entry per
//! block. Nested entries need far fewer: a block that is mostly one verdict
//! gets one entry, and only the addresses that differ get more specific
//! ones. This is ORTC (Draves, King, Venkatachary, Zill, "Constructing
//! optimal IP routing tables", INFOCOM 1999), which is optimal for a binary
//! trie: bottom-up, each node keeps the verdicts that would serve its whole
//! subtree with the fewest entries (the intersection of its children's, or
//! their union when that is empty); top-down, a node gets an entry only when
//! the verdict it inherits is not among them.
//!
//! Addresses that no source places are a verdict of their own, `unknown`: a
//! lookup miss means it, so they need no entry unless they lie inside a
//! covering entry, where they get an explicit `unknown` one.

use super::ranges::{Span, prefixes};

/// Verdict sets are bitmasks over the distinct verdicts: policies with more
/// distinct verdicts than this keep disjoint prefixes.
const MAX_CLASSES: usize = 64;

/// A trie node in post-order: its verdict set and its subtree's node count
/// (1 for a leaf), which locates its children.
#[derive(Clone, Copy)]
struct Node {
    set: u64,
    size: u32,
}

/// `(network, prefix length, verdict)` entries, in address order, that give
/// every address of a `bits`-bit space the verdict of the span holding it,
/// or `unknown` outside every span (where possible by having no entry).
/// `spans` must be sorted and disjoint. `None` when the spans carry more
/// than [`MAX_CLASSES`] distinct verdicts.
pub(super) fn minimal<T: Copy + PartialEq>(
    spans: &[Span<T>],
    bits: u32,
    unknown: T,
) -> Option<Vec<(u128, u8, T)>> {
    let mut classes = vec![unknown];
    let mut b = Builder {
        bits,
        nodes: Vec::new(),
        stack: Vec::new(),
    };
    let last = if bits == 128 {
        u128::MAX
    } else {
        (1u128 << bits) - 1
    };
    let mut blocks = Vec::new();
    let mut tile = |b: &mut Builder, start: u128, end: u128, class: usize| {
        blocks.clear();
        prefixes(start, end, bits, &mut blocks);
        for &(net, len) in &blocks {
            b.leaf(net, len, class);
        }
    };
    // Next address not yet covered; None once the whole space is.
    let mut next = Some(0u128);
    for s in spans {
        let class = match classes.iter().position(|c| *c == s.val) {
            Some(i) => i,
            None if classes.len() < MAX_CLASSES => {
                classes.push(s.val);
                classes.len() - 1
            }
            None => return None,
        };
        let from = next.expect("spans are sorted and disjoint");
        if s.start > from {
            tile(&mut b, from, s.start - 1, 0);
        }
        tile(&mut b, s.start, s.end, class);
        next = s.end.checked_add(1).filter(|n| *n <= last);
    }
    if let Some(from) = next {
        tile(&mut b, from, last, 0);
    }
    Some(b.entries(&classes))
}

struct Builder {
    bits: u32,
    nodes: Vec<Node>,
    /// Subtrees not yet joined to their sibling: (network, length, node).
    stack: Vec<(u128, u8, Node)>,
}

impl Builder {
    /// Adds the next block of the tiling (in address order) and joins every
    /// pair of siblings it completes.
    fn leaf(&mut self, net: u128, len: u8, class: usize) {
        let node = Node {
            set: 1 << class,
            size: 1,
        };
        self.nodes.push(node);
        self.stack.push((net, len, node));
        while let [.., (ln, ll, l), (_, rl, r)] = self.stack[..] {
            if ll != rl {
                break;
            }
            debug_assert!(ll > 0, "two roots");
            let both = l.set & r.set;
            let parent = Node {
                set: if both != 0 { both } else { l.set | r.set },
                size: l.size + r.size + 1,
            };
            self.stack.truncate(self.stack.len() - 2);
            self.nodes.push(parent);
            self.stack.push((ln, ll - 1, parent));
        }
    }

    /// Top-down: an entry wherever the inherited verdict would be wrong.
    fn entries<T: Copy>(self, classes: &[T]) -> Vec<(u128, u8, T)> {
        debug_assert_eq!(self.stack.len(), 1, "the blocks tile the space");
        let mut out = Vec::new();
        let Some(root) = self.nodes.len().checked_sub(1) else {
            return out;
        };
        // (node, network, length, inherited class); class 0 is a miss.
        let mut todo = vec![(root, 0u128, 0u8, 0u32)];
        while let Some((i, net, len, inherited)) = todo.pop() {
            let n = self.nodes[i];
            let class = if n.set >> inherited & 1 == 1 {
                inherited
            } else {
                let c = n.set.trailing_zeros();
                out.push((net, len, classes[c as usize]));
                c
            };
            if n.size > 1 {
                let right = i - 1;
                let left = right - self.nodes[right].size as usize;
                let half = 1u128 << (self.bits - u32::from(len) - 1);
                // Left pushed last, so entries come out in address order.
                todo.push((right, net | half, len + 1, class));
                todo.push((left, net, len + 1, class));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(start: u128, end: u128, val: u8) -> Span<u8> {
        Span { start, end, val }
    }

    /// Longest-prefix match over `entries`; `unknown` on a miss.
    fn lookup(entries: &[(u128, u8, u8)], bits: u32, addr: u128, unknown: u8) -> u8 {
        entries
            .iter()
            .filter(|(net, len, _)| {
                let host = bits - u32::from(*len);
                host >= 128 || addr >> host == net >> host
            })
            .max_by_key(|(_, len, _)| *len)
            .map_or(unknown, |e| e.2)
    }

    #[test]
    fn geo_lpm_nests_islands_inside_a_covering_entry() {
        // 0..=255 all "1" except 16..=31 "2": two entries, not five blocks.
        let e = minimal(&[sp(0, 15, 1), sp(16, 31, 2), sp(32, 255, 1)], 8, 0).unwrap();
        assert_eq!(e, [(0, 0, 1), (16, 4, 2)]);
        // A gap inside a covering entry gets an explicit unknown entry.
        let e = minimal(&[sp(0, 15, 1), sp(32, 255, 1)], 8, 0).unwrap();
        assert_eq!(e, [(0, 0, 1), (16, 4, 0)]);
        // Mostly unknown: no entry for it at all.
        let e = minimal(&[sp(16, 31, 2)], 8, 0).unwrap();
        assert_eq!(e, [(16, 4, 2)]);
        assert_eq!(minimal::<u8>(&[], 128, 0).unwrap(), []);
        let e = minimal(&[sp(0, u128::MAX, 3)], 128, 0).unwrap();
        assert_eq!(e, [(0, 0, 3)]);
    }

    #[test]
    fn geo_lpm_gives_every_address_its_verdict() {
        // Pseudo-random spans over a 10-bit space, checked address by address
        // and against the disjoint prefix count.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..300 {
            let mut spans = Vec::new();
            let mut at = rnd(8) as u128;
            while at < 1024 {
                let end = (at + rnd(90) as u128).min(1023);
                let val = 1 + rnd(4) as u8;
                if rnd(5) > 0 {
                    super::super::ranges::push(&mut spans, sp(at, end, val));
                }
                at = end + 1 + rnd(3) as u128;
            }
            let e = minimal(&spans, 10, 0).unwrap();
            let mut disjoint = 0;
            let mut blocks = Vec::new();
            for s in &spans {
                blocks.clear();
                prefixes(s.start, s.end, 10, &mut blocks);
                disjoint += blocks.len();
            }
            assert!(e.len() <= disjoint, "{} > {disjoint}", e.len());
            for addr in 0..1024u128 {
                let want = spans
                    .iter()
                    .find(|s| s.start <= addr && addr <= s.end)
                    .map_or(0, |s| s.val);
                assert_eq!(lookup(&e, 10, addr, 0), want, "{addr} in {spans:?}");
            }
        }
    }

    #[test]
    fn geo_lpm_gives_up_beyond_64_verdicts() {
        let spans: Vec<_> = (0..70u128).map(|i| sp(i, i, i as u8 + 1)).collect();
        assert!(minimal(&spans, 8, 0).is_none());
    }
}
