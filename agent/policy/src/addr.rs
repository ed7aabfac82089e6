//! Domain networks and geo verdicts → the address table the kernel walks
//! (layout in `bulkhead_common::addr`): one class per address, as a multibit
//! trie in one slot's words.
//!
//! Only the space around boundaries between classes takes nodes: a root
//! entry, or a node entry, whose block is one class is a leaf. Nodes with
//! the same contents are stored once (the DAG of a country database shares
//! most of its small nodes). A node takes 16 entries (4 bits); a node whose
//! block is busy takes 256 (8 bits), which saves one step on the way down
//! for the memory of the wider node.

use std::{collections::HashMap, hash::BuildHasher, net::IpAddr};

use bulkhead_common::addr::{
    self as layout, AddrClass, CLASS_NONE, MAX_CLASSES, MAX_STRIDE, MIN_STRIDE, ROOT_BITS,
    ROOT_WORDS, SLOT_WORDS,
};
use bulkhead_common::decide::v4_in_16;
use ipnet::{Ipv4Net, Ipv6Net};

use crate::{
    fxhash::FxBuild,
    geo::{CompileStats, CompiledGeo},
    ranges::{self, Span},
};

/// A node gets the wide stride when at least this many of its 16 narrow
/// children would be nodes themselves (measured in `BENCHMARKS.md`: the
/// full country database walks about 30% fewer steps for 3.5× the words).
const WIDE_WHEN_MIXED: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error(
        "the address table needs more than the {cap} words one slot holds (domain networks and country boundaries): use fewer networks or fewer distinct country rules"
    )]
    TooLarge { cap: u32 },
    #[error(
        "{0} distinct address classes (domains with networks plus distinct country verdicts), more than the {MAX_CLASSES} a slot holds"
    )]
    TooManyClasses(usize),
}

/// One slot's contents: the words of `BH_ADDR` and the classes of
/// `BH_CLASSES`.
#[derive(Debug, PartialEq, Eq)]
pub struct AddrTable {
    pub words: Vec<u32>,
    pub classes: Vec<AddrClass>,
    pub stats: TableStats,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    /// Distinct nodes below the roots, per family.
    pub nodes_v4: usize,
    pub nodes_v6: usize,
    /// Nodes that were the same as one already stored.
    pub shared: usize,
    /// Whether wide nodes were used (they are given up when the table
    /// would not fit a slot otherwise).
    pub wide: bool,
    /// The geo compile's range counts.
    pub geo: CompileStats,
}

impl AddrTable {
    /// Builds the table: domain networks first (longest prefix wins), geo
    /// verdicts for every other address, [`CLASS_NONE`] where neither says.
    /// Takes `geo` whole: its ranges are freed as soon as they are turned
    /// into classes, before the trie grows.
    pub fn build(
        net4: &[(Ipv4Net, u32)],
        net6: &[(Ipv6Net, u32)],
        geo: CompiledGeo,
    ) -> Result<AddrTable, TableError> {
        // Every class is known before any range is looked at: one per
        // distinct geo verdict, one per domain with networks.
        let mut classes = Classes::default();
        let geo_class: Vec<u32> = geo
            .values
            .iter()
            .map(|g| {
                classes.id(AddrClass {
                    geo: *g,
                    ..AddrClass::NONE
                })
            })
            .collect();
        let mut domain = |d: u32| {
            classes.id(AddrClass {
                domain: d,
                ..AddrClass::NONE
            })
        };
        let nets4: Vec<_> = net4
            .iter()
            .map(|(n, d)| {
                let (lo, hi) = (u32::from(n.network()), u32::from(n.broadcast()));
                (lo.into(), hi.into(), n.prefix_len(), domain(*d))
            })
            .collect();
        let nets6: Vec<_> = net6
            .iter()
            .map(|(n, d)| {
                let (lo, hi) = (n.network().into(), n.broadcast().into());
                (lo, hi, n.prefix_len(), domain(*d))
            })
            .collect();
        if classes.list.len() > MAX_CLASSES as usize {
            return Err(TableError::TooManyClasses(classes.list.len()));
        }
        let v4 = Input {
            nets: &nets4,
            geo: geo.v4,
            geo_class: &geo_class,
        };
        let v6 = Input {
            nets: &nets6,
            geo: geo.v6,
            geo_class: &geo_class,
        };
        let trie = Trie::build(v4, v6)?;
        Ok(AddrTable {
            words: trie.words,
            classes: classes.list,
            stats: TableStats {
                nodes_v4: trie.nodes[0],
                nodes_v6: trie.nodes[1],
                shared: trie.shared,
                wide: trie.wide,
                geo: geo.stats,
            },
        })
    }

    /// The class the kernel finds for `ip`, by the kernel's own walk.
    /// IPv4-mapped IPv6 is looked up as IPv4, as the kernel does.
    pub fn class(&self, ip: IpAddr) -> &AddrClass {
        let (v6, key) = match ip.to_canonical() {
            IpAddr::V4(a) => (false, v4_in_16(a.octets())),
            IpAddr::V6(a) => (true, a.octets()),
        };
        let id = layout::lookup(v6, &key, |i| self.words.get(i as usize).copied());
        self.classes.get(id as usize).unwrap_or(&AddrClass::NONE)
    }
}

/// Classes by first use; index 0 is [`AddrClass::NONE`].
struct Classes {
    list: Vec<AddrClass>,
    ids: HashMap<AddrClass, u32, FxBuild>,
}

impl Default for Classes {
    fn default() -> Self {
        Classes {
            list: vec![AddrClass::NONE],
            ids: [(AddrClass::NONE, CLASS_NONE)].into_iter().collect(),
        }
    }
}

impl Classes {
    fn id(&mut self, c: AddrClass) -> u32 {
        *self.ids.entry(c).or_insert_with(|| {
            self.list.push(c);
            (self.list.len() - 1) as u32
        })
    }
}

/// One family's networks (with their class) and geo ranges.
struct Input<'a> {
    nets: &'a [(u128, u128, u8, u32)],
    geo: Vec<Span<u16>>,
    geo_class: &'a [u32],
}

impl Input<'_> {
    /// Class spans in address order: networks (longest prefix first) over
    /// geo verdicts; the gaps between them are [`CLASS_NONE`].
    fn spans(self) -> Vec<Span<u32>> {
        let geo = ranges::map(self.geo, |i| self.geo_class[usize::from(*i)]);
        if self.nets.is_empty() {
            return geo;
        }
        ranges::overlay(&ranges::nested(self.nets), &geo)
    }
}

/// Both families' tries in one slot image.
struct Trie {
    words: Vec<u32>,
    nodes: [usize; 2],
    shared: usize,
    wide: bool,
}

/// The table got too large for a slot.
#[derive(Debug)]
struct Full;

impl From<Full> for TableError {
    fn from(_: Full) -> TableError {
        TableError::TooLarge { cap: SLOT_WORDS }
    }
}

impl Trie {
    /// Builds IPv4 and IPv6 at the same time (they share nothing), then
    /// lays them out: both roots, IPv4's nodes, IPv6's nodes. Wide nodes
    /// are given up when they would not fit a slot.
    fn build(v4: Input, v6: Input) -> Result<Trie, Full> {
        let (s4, s6) = std::thread::scope(|s| {
            let t = s.spawn(move || v4.spans());
            let s6 = v6.spans();
            (t.join().expect("IPv4 ranges panicked"), s6)
        });
        Trie::lay_out(&s4, &s6, true).or_else(|_| Trie::lay_out(&s4, &s6, false))
    }

    fn lay_out(v4: &[Span<u32>], v6: &[Span<u32>], wide: bool) -> Result<Trie, Full> {
        let (f4, f6) = std::thread::scope(|s| {
            let t4 = s.spawn(|| Family::build(v4, 32, wide));
            let f6 = Family::build(v6, 128, wide);
            (t4.join().expect("IPv4 trie build panicked"), f6)
        });
        let (f4, f6) = (f4?, f6?);
        let base4 = ROOT_WORDS;
        let base6 = base4 + f4.nodes.len() as u32;
        if (base6 as usize) + f6.nodes.len() > SLOT_WORDS as usize {
            return Err(Full);
        }
        let mut words = Vec::with_capacity(base6 as usize + f6.nodes.len());
        let moved = |w: u32, base: u32| {
            if w & layout::NODE == 0 { w } else { w + base }
        };
        words.extend(f4.root.iter().map(|&w| moved(w, base4)));
        words.extend(f6.root.iter().map(|&w| moved(w, base6)));
        words.extend(f4.nodes.iter().map(|&w| moved(w, base4)));
        words.extend(f6.nodes.iter().map(|&w| moved(w, base6)));
        Ok(Trie {
            words,
            nodes: [f4.count, f6.count],
            shared: f4.shared + f6.shared,
            wide,
        })
    }
}

/// One family's trie while it is built: node words hold offsets into
/// `nodes`, moved to their place in the slot by [`Trie::build`].
struct Family {
    root: Vec<u32>,
    nodes: Vec<u32>,
    /// Each distinct node as (offset, entries), found by the hash of its
    /// entries and compared in `nodes`: a copy of the entries as the key
    /// would double the memory a country database's table takes to build.
    seen: hashbrown::HashTable<(u32, u32)>,
    /// One entry buffer per level of the recursion.
    scratch: Vec<Vec<u32>>,
    count: usize,
    shared: usize,
    wide: bool,
}

impl Family {
    fn build(spans: &[Span<u32>], bits: u32, wide: bool) -> Result<Family, Full> {
        let mut f = Family {
            root: Vec::with_capacity(1 << ROOT_BITS),
            nodes: Vec::new(),
            seen: hashbrown::HashTable::new(),
            scratch: Vec::new(),
            count: 0,
            shared: 0,
            wide,
        };
        let mut at = 0;
        for r in 0..1u32 << ROOT_BITS {
            let lo = u128::from(r) << (bits - ROOT_BITS);
            let w = f.entry(spans, &mut at, lo, ROOT_BITS, bits, 0)?;
            f.root.push(w);
        }
        f.count = f.seen.len();
        Ok(f)
    }

    /// The word for the block of `2^(bits - level)` addresses at `lo`.
    /// `at` is the index of the first span not wholly before the previous
    /// block; blocks come in address order.
    fn entry(
        &mut self,
        spans: &[Span<u32>],
        at: &mut usize,
        lo: u128,
        level: u32,
        bits: u32,
        depth: usize,
    ) -> Result<u32, Full> {
        let hi = lo | last_offset(bits - level);
        let (class, end) = run_at(spans, at, lo);
        if end >= hi {
            return Ok(class);
        }
        let stride = self.stride(spans, *at, lo, hi, level, bits);
        let child = bits - level - stride;
        if self.scratch.len() <= depth {
            self.scratch.resize_with(depth + 1, Vec::new);
        }
        let mut entries = std::mem::take(&mut self.scratch[depth]);
        entries.clear();
        let n = 1u128 << stride;
        let mut c = 0u128;
        while c < n {
            let clo = lo | c << child;
            let (class, end) = run_at(spans, at, clo);
            // Children wholly inside this run are leaves: take them all at
            // once. (No overflow: the run is cut at this node's end.)
            let whole = ((end.min(hi) - clo + 1) >> child).min(n - c);
            if whole > 0 {
                entries.extend(std::iter::repeat_n(class, whole as usize));
                c += whole;
            } else {
                entries.push(self.entry(spans, at, clo, level + stride, bits, depth + 1)?);
                c += 1;
            }
        }
        let word = self.intern(stride, &entries);
        self.scratch[depth] = entries;
        word
    }

    /// A node word for these entries, stored once however often they occur.
    fn intern(&mut self, stride: u32, entries: &[u32]) -> Result<u32, Full> {
        let Family { seen, nodes, .. } = self;
        let of = |&(offset, len): &(u32, u32)| &nodes[offset as usize..(offset + len) as usize];
        let hash = FxBuild::default().hash_one(entries);
        if let Some(&(offset, _)) = seen.find(hash, |n| of(n) == entries) {
            self.shared += 1;
            return Ok(layout::node(stride, offset));
        }
        let offset = nodes.len() as u32;
        if ROOT_WORDS as usize + nodes.len() + entries.len() > SLOT_WORDS as usize {
            return Err(Full);
        }
        nodes.extend_from_slice(entries);
        let nodes = &*nodes;
        seen.insert_unique(hash, (offset, entries.len() as u32), |&(o, len)| {
            FxBuild::default().hash_one(&nodes[o as usize..(o + len) as usize])
        });
        Ok(layout::node(stride, offset))
    }

    /// Wide when enough of the narrow children would need nodes of their
    /// own: count the narrow children with a class boundary (a span's
    /// start or the address after its end) inside.
    fn stride(
        &self,
        spans: &[Span<u32>],
        at: usize,
        lo: u128,
        hi: u128,
        level: u32,
        bits: u32,
    ) -> u32 {
        let rest = bits - level;
        if !self.wide || rest < MAX_STRIDE {
            return MIN_STRIDE;
        }
        let child = rest - MIN_STRIDE;
        let mut mixed = 0u16;
        for s in &spans[at..] {
            if s.start > hi {
                break;
            }
            for edge in [Some(s.start), s.end.checked_add(1)].into_iter().flatten() {
                if edge > lo && edge <= hi && edge & last_offset(child) != 0 {
                    mixed |= 1 << ((edge - lo) >> child);
                }
            }
            if mixed.count_ones() >= WIDE_WHEN_MIXED {
                return MAX_STRIDE;
            }
        }
        MIN_STRIDE
    }
}

/// The class at `addr` and the last address of its run (a span, or the
/// gap before the next one). Moves `at` to the first span not wholly
/// before `addr`.
fn run_at(spans: &[Span<u32>], at: &mut usize, addr: u128) -> (u32, u128) {
    while spans.get(*at).is_some_and(|s| s.end < addr) {
        *at += 1;
    }
    match spans.get(*at) {
        Some(s) if s.start <= addr => (s.val, s.end),
        Some(s) => (CLASS_NONE, s.start - 1),
        None => (CLASS_NONE, u128::MAX),
    }
}

/// `2^host - 1`: the last offset inside a block of `host` host bits.
fn last_offset(host: u32) -> u128 {
    if host >= 128 {
        u128::MAX
    } else {
        (1 << host) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_common::maps::GeoValue;
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// Compiled geo from ranges of plain verdicts.
    fn geo(v4: &[Span<GeoValue>], v6: &[Span<GeoValue>]) -> CompiledGeo {
        let mut values = Vec::new();
        let mut index = |g: &GeoValue| match values.iter().position(|v| v == g) {
            Some(i) => i as u16,
            None => {
                values.push(*g);
                (values.len() - 1) as u16
            }
        };
        let v4 = ranges::map(v4.iter().copied(), &mut index);
        let v6 = ranges::map(v6.iter().copied(), &mut index);
        CompiledGeo {
            v4,
            v6,
            values,
            stats: CompileStats::default(),
        }
    }

    fn g(e: u64) -> GeoValue {
        GeoValue {
            egress_deny: e,
            ingress_deny: 0,
        }
    }

    /// What the table must say for an address: the longest network, else
    /// the geo span holding it, else nothing.
    fn want(nets: &[(u128, u128, u8, u32)], geo: &[Span<GeoValue>], a: u128) -> AddrClass {
        if let Some(n) = nets
            .iter()
            .filter(|n| n.0 <= a && a <= n.1)
            .max_by_key(|n| n.2)
        {
            return AddrClass {
                domain: n.3,
                ..AddrClass::NONE
            };
        }
        match geo.iter().find(|s| s.start <= a && a <= s.end) {
            Some(s) => AddrClass {
                geo: s.val,
                ..AddrClass::NONE
            },
            None => AddrClass::NONE,
        }
    }

    #[test]
    fn addr_table_empty_policy_is_roots_only() {
        let t = AddrTable::build(&[], &[], CompiledGeo::default()).unwrap();
        assert_eq!(t.words.len(), ROOT_WORDS as usize);
        assert_eq!(t.classes, [AddrClass::NONE]);
        assert_eq!(*t.class("10.1.2.3".parse().unwrap()), AddrClass::NONE);
    }

    #[test]
    fn addr_table_networks_win_over_geo_and_nest() {
        let net4: Vec<(Ipv4Net, u32)> = vec![
            ("10.0.0.0/8".parse().unwrap(), 1),
            ("10.1.2.0/24".parse().unwrap(), 1),
            ("192.0.2.128/25".parse().unwrap(), 2),
        ];
        let net6: Vec<(Ipv6Net, u32)> = vec![("fd00:40::/48".parse().unwrap(), 3)];
        let de = u128::from(u32::from(Ipv4Addr::new(192, 0, 2, 0)));
        let geo = geo(
            &[Span {
                start: de,
                end: de + 255,
                val: g(2),
            }],
            &[Span {
                start: u128::from("2a00::".parse::<Ipv6Addr>().unwrap()),
                end: u128::from("2a00::ffff".parse::<Ipv6Addr>().unwrap()),
                val: g(4),
            }],
        );
        let t = AddrTable::build(&net4, &net6, geo).unwrap();
        let c = |s: &str| *t.class(s.parse().unwrap());
        let dom = |d| AddrClass {
            domain: d,
            ..AddrClass::NONE
        };
        let geo_of = |e| AddrClass {
            geo: g(e),
            ..AddrClass::NONE
        };
        assert_eq!(c("10.200.0.1"), dom(1));
        assert_eq!(c("10.1.2.3"), dom(1));
        assert_eq!(c("192.0.2.127"), geo_of(2));
        assert_eq!(c("192.0.2.128"), dom(2));
        assert_eq!(c("192.0.3.0"), AddrClass::NONE);
        assert_eq!(c("::ffff:192.0.2.200"), dom(2));
        assert_eq!(c("fd00:40::1"), dom(3));
        assert_eq!(c("fd00:41::1"), AddrClass::NONE);
        assert_eq!(c("2a00::ffff"), geo_of(4));
        assert_eq!(c("2a00::1:0"), AddrClass::NONE);
    }

    /// Random networks and geo spans (with gaps, clustered so nodes get
    /// deep and wide), every boundary and random addresses checked against
    /// the direct answer, with and without wide nodes.
    #[test]
    fn addr_table_agrees_with_a_direct_lookup() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..40 {
            let (bits, v6) = if round % 2 == 0 {
                (32, false)
            } else {
                (128, true)
            };
            let top = |r: u64| -> u128 {
                let r = u128::from(r);
                if v6 { r << 64 | r } else { r & 0xffff_ffff }
            };
            let mut geo_spans = Vec::new();
            let mut at = top(rnd()) & !last_offset(bits - 12);
            for _ in 0..(rnd() % 400) {
                let gap = u128::from(rnd() % 4) * u128::from(1 + rnd() % 300);
                let len = u128::from(rnd() % 5000);
                let Some(start) = at.checked_add(gap) else {
                    break;
                };
                let Some(end) = start.checked_add(len) else {
                    break;
                };
                if end > last_offset(bits) {
                    break;
                }
                ranges::push(
                    &mut geo_spans,
                    Span {
                        start,
                        end,
                        val: g(1 << (1 + rnd() % 3)),
                    },
                );
                at = end + 1;
            }
            let mut nets = Vec::new();
            for i in 0..(rnd() % 30) {
                let len = (8 + rnd() % u64::from(bits - 7)) as u8;
                let host = bits - u32::from(len);
                let base = if i % 2 == 0 && !geo_spans.is_empty() {
                    geo_spans[(rnd() as usize) % geo_spans.len()].start
                } else {
                    top(rnd())
                };
                let lo = base & !last_offset(host);
                nets.push((lo, lo | last_offset(host), len, 1 + (rnd() % 3) as u32));
            }
            // Different domains never overlap (the policy check refuses it).
            let mut kept: Vec<(u128, u128, u8, u32)> = Vec::new();
            for n in nets {
                if !kept.iter().any(|k| k.3 != n.3 && k.0 <= n.1 && n.0 <= k.1) {
                    kept.push(n);
                }
            }
            let net4: Vec<(Ipv4Net, u32)> = kept
                .iter()
                .filter(|_| !v6)
                .map(|&(lo, _, len, d)| (Ipv4Net::new_assert(Ipv4Addr::from(lo as u32), len), d))
                .collect();
            let net6: Vec<(Ipv6Net, u32)> = kept
                .iter()
                .filter(|_| v6)
                .map(|&(lo, _, len, d)| (Ipv6Net::new_assert(Ipv6Addr::from(lo), len), d))
                .collect();
            let compiled = if v6 {
                geo(&[], &geo_spans)
            } else {
                geo(&geo_spans, &[])
            };
            let mut probes: Vec<u128> = Vec::new();
            for s in &geo_spans {
                probes.extend([
                    s.start,
                    s.end,
                    s.start.wrapping_sub(1),
                    s.end.wrapping_add(1),
                ]);
            }
            for n in &kept {
                probes.extend([n.0, n.1, n.0.wrapping_sub(1), n.1.wrapping_add(1)]);
            }
            for _ in 0..2000 {
                probes.push(top(rnd()));
            }
            let full = AddrTable::build(&net4, &net6, compiled.clone()).unwrap();
            for wide in [true, false] {
                // The same classes as the full build; only the layout differs.
                let class_of =
                    |c: &AddrClass| full.classes.iter().position(|x| x == c).unwrap() as u32;
                let geo_class: Vec<u32> = compiled
                    .values
                    .iter()
                    .map(|g| {
                        class_of(&AddrClass {
                            geo: *g,
                            ..AddrClass::NONE
                        })
                    })
                    .collect();
                let nets: Vec<_> = kept
                    .iter()
                    .map(|&(lo, hi, len, d)| {
                        let c = class_of(&AddrClass {
                            domain: d,
                            ..AddrClass::NONE
                        });
                        (lo, hi, len, c)
                    })
                    .collect();
                let spans = Input {
                    nets: &nets,
                    geo: if v6 {
                        compiled.v6.clone()
                    } else {
                        compiled.v4.clone()
                    },
                    geo_class: &geo_class,
                }
                .spans();
                let (s4, s6) = if v6 {
                    (Vec::new(), spans)
                } else {
                    (spans, Vec::new())
                };
                let table = AddrTable {
                    words: Trie::lay_out(&s4, &s6, wide).unwrap().words,
                    classes: full.classes.clone(),
                    stats: TableStats::default(),
                };
                for &a in &probes {
                    let a = a & last_offset(bits);
                    let ip = if v6 {
                        IpAddr::V6(Ipv6Addr::from(a))
                    } else {
                        IpAddr::V4(Ipv4Addr::from(a as u32))
                    };
                    // IPv4-mapped IPv6 is looked up as IPv4: not this family.
                    if v6 && a >> 32 == 0xffff {
                        continue;
                    }
                    let w = want(&kept, &geo_spans, a);
                    assert_eq!(*table.class(ip), w, "round {round} wide {wide}: {ip}");
                    if wide {
                        assert_eq!(*full.class(ip), w, "round {round} full build: {ip}");
                    }
                }
            }
        }
    }
}
