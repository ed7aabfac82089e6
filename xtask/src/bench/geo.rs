//! The country database as the benchmarks need it: every placed range,
//! random addresses that the allow-list policy allows or denies, what the
//! policy's verdict for an address is (to check the kernel's counters), and
//! the nftables interval sets holding the same denied addresses.

use std::{collections::HashMap, net::IpAddr, path::Path};

use anyhow::{Context as _, Result, anyhow};
use maxminddb::{Reader, WithinOptions};
use serde::Deserialize;

/// Inclusive address range; IPv4 uses the low 32 bits.
pub type Range = (u128, u128);

pub const V4: usize = 0;
pub const V6: usize = 1;

/// The IPv4 universe the nftables sets cover: unicast space without
/// `0/8` and `127/8` (multicast and reserved above 224/3 are left alone).
pub const UNIVERSE_V4: &[Range] = &[(0x0100_0000, 0x7eff_ffff), (0x8000_0000, 0xdfff_ffff)];
/// The IPv6 universe: global unicast `2000::/3`.
pub const UNIVERSE_V6: &[Range] = &[(0x2000 << 112, (0x4000 << 112) - 1)];

#[derive(Deserialize)]
struct Iso<'a> {
    #[serde(borrow)]
    iso_code: Option<&'a str>,
}

#[derive(Deserialize)]
struct Record<'a> {
    #[serde(borrow)]
    country_code: Option<&'a str>,
    #[serde(borrow)]
    country: Option<Iso<'a>>,
    #[serde(borrow)]
    registered_country: Option<Iso<'a>>,
}

/// Every placed range of one database: `spans[family]` sorted, disjoint.
pub struct Db {
    pub spans: [Vec<(u128, u128, [u8; 2])>; 2],
    pub records: [usize; 2],
}

impl Db {
    pub fn load(path: &Path) -> Result<Db> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let reader = Reader::from_source(bytes)
            .map_err(|e| anyhow!("{}: not a MaxMind DB: {e}", path.display()))?;
        let mut spans = [Vec::new(), Vec::new()];
        let mut records = [0, 0];
        let mut cache: HashMap<usize, Option<[u8; 2]>> = HashMap::new();
        let v6 = reader.metadata().ip_version == 6;
        let roots: &[&str] = if v6 {
            &["0.0.0.0/0", "::/0"]
        } else {
            &["0.0.0.0/0"]
        };
        for (family, root) in roots.iter().enumerate() {
            let root = root.parse().expect("CIDR literal");
            for r in reader.within(root, WithinOptions::default())? {
                let r = r?;
                let net = r.network()?;
                let (start, end) = match (family, net.ip()) {
                    (V4, IpAddr::V4(a)) => bounds(u32::from(a).into(), net.prefix(), 32),
                    (V4, IpAddr::V6(_)) => (0, u32::MAX.into()),
                    (_, IpAddr::V4(_)) => continue,
                    (_, IpAddr::V6(a)) => bounds(a.into(), net.prefix(), 128),
                };
                records[family] += 1;
                let Some(off) = r.offset() else { continue };
                let country = match cache.get(&off) {
                    Some(c) => *c,
                    None => {
                        let c = r.decode::<Record>()?.and_then(|rec| {
                            rec.country_code
                                .or(rec.country.and_then(|c| c.iso_code))
                                .or(rec.registered_country.and_then(|c| c.iso_code))
                                .filter(|c| c.len() == 2)
                                .map(|c| {
                                    let b = c.as_bytes();
                                    [b[0].to_ascii_uppercase(), b[1].to_ascii_uppercase()]
                                })
                        });
                        cache.insert(off, c);
                        c
                    }
                };
                let Some(country) = country else { continue };
                let list: &mut Vec<(u128, u128, [u8; 2])> = &mut spans[family];
                match list.last_mut() {
                    Some(last) if last.2 == country && last.1.checked_add(1) == Some(start) => {
                        last.1 = end;
                    }
                    _ => list.push((start, end, country)),
                }
            }
        }
        Ok(Db { spans, records })
    }

    /// The country the database gives an address.
    pub fn country(&self, family: usize, addr: u128) -> Option<[u8; 2]> {
        let s = &self.spans[family];
        let i = s.partition_point(|r| r.1 < addr);
        s.get(i).filter(|r| r.0 <= addr).map(|r| r.2)
    }

    /// Merged ranges whose country is in `allow`.
    pub fn ranges_of(&self, family: usize, allow: &[[u8; 2]]) -> Vec<Range> {
        let mut out: Vec<Range> = Vec::new();
        for &(a, b, c) in &self.spans[family] {
            if !allow.contains(&c) {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.1.checked_add(1) == Some(a) => last.1 = b,
                _ => out.push((a, b)),
            }
        }
        out
    }
}

fn bounds(net: u128, prefix: u8, bits: u32) -> Range {
    let host = bits - u32::from(prefix);
    let mask = if host >= 128 {
        u128::MAX
    } else {
        (1u128 << host) - 1
    };
    (net, net | mask)
}

/// Sorted, merged union of range lists.
pub fn union(lists: &[&[Range]]) -> Vec<Range> {
    let mut all: Vec<Range> = lists.iter().flat_map(|l| l.iter().copied()).collect();
    all.sort_unstable();
    let mut out: Vec<Range> = Vec::with_capacity(all.len());
    for (a, b) in all {
        match out.last_mut() {
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// `a` without the addresses in `b` (both sorted and merged).
pub fn subtract(a: &[Range], b: &[Range]) -> Vec<Range> {
    let mut out = Vec::new();
    let mut j = 0;
    for &(mut lo, hi) in a {
        while j < b.len() && b[j].1 < lo {
            j += 1;
        }
        let mut k = j;
        let mut done = false;
        while k < b.len() && b[k].0 <= hi {
            if b[k].0 > lo {
                out.push((lo, b[k].0 - 1));
            }
            if b[k].1 >= hi {
                done = true;
                break;
            }
            lo = b[k].1 + 1;
            k += 1;
        }
        if !done {
            out.push((lo, hi));
        }
    }
    out
}

/// splitmix64: small, seedable, good enough to spread addresses.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u128) -> u128 {
        let r = (u128::from(self.next()) << 64) | u128::from(self.next());
        if n == 0 { 0 } else { r % n }
    }
    /// A random address in a random one of `ranges` (uniform over ranges,
    /// not over addresses, so small ranges are sampled too).
    pub fn in_ranges(&mut self, ranges: &[Range]) -> u128 {
        let (a, b) = ranges[self.below(ranges.len() as u128) as usize];
        a + self.below(b - a + 1)
    }
    /// A random address uniform over the union of `ranges` by size.
    pub fn uniform(&mut self, ranges: &[Range]) -> u128 {
        let total: u128 = ranges.iter().map(|(a, b)| b - a + 1).sum();
        let mut x = self.below(total);
        for (a, b) in ranges {
            let n = b - a + 1;
            if x < n {
                return a + x;
            }
            x -= n;
        }
        ranges[0].0
    }
}

/// Formats an address of `family` held in a u128.
pub fn fmt_addr(family: usize, a: u128) -> String {
    if family == V4 {
        std::net::Ipv4Addr::from(a as u32).to_string()
    } else {
        std::net::Ipv6Addr::from(a).to_string()
    }
}

/// The nftables text of one interval set element list: `a-b` ranges
/// (single addresses as themselves).
pub fn nft_elements(family: usize, ranges: &[Range]) -> String {
    let mut s = String::with_capacity(ranges.len() * 32);
    for (i, &(a, b)) in ranges.iter().enumerate() {
        if i > 0 {
            s.push_str(",\n");
        }
        s.push_str(&fmt_addr(family, a));
        if b != a {
            s.push('-');
            s.push_str(&fmt_addr(family, b));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contains(list: &[Range], addr: u128) -> bool {
        let i = list.partition_point(|r| r.1 < addr);
        list.get(i).is_some_and(|r| r.0 <= addr)
    }

    #[test]
    fn range_algebra() {
        let a = [(0, 9), (20, 29)];
        let b = [(5, 6), (9, 21), (25, 25)];
        assert_eq!(subtract(&a, &b), vec![(0, 4), (7, 8), (22, 24), (26, 29)]);
        assert_eq!(union(&[&a, &b]), vec![(0, 29)]);
        assert_eq!(union(&[&[(0, 1)], &[(3, 4)]]), vec![(0, 1), (3, 4)]);
        assert_eq!(union(&[&[(0, 1)], &[(2, 4)]]), vec![(0, 4)]);
        assert!(contains(&a, 20) && !contains(&a, 15));
        assert_eq!(subtract(&[(0, 10)], &[]), vec![(0, 10)]);
        assert_eq!(subtract(&[(0, 10)], &[(0, 10)]), Vec::<Range>::new());
    }

    #[test]
    fn rng_stays_in_ranges() {
        let mut r = Rng::new(1);
        let ranges = [(10, 12), (100, 100)];
        for _ in 0..100 {
            let x = r.uniform(&ranges);
            assert!(contains(&ranges, x));
            let y = r.in_ranges(&ranges);
            assert!(contains(&ranges, y));
        }
    }
}

/// Calls `f(network, prefix_len)` for each CIDR prefix of the smallest
/// set covering exactly `lo..=hi` in a `bits`-bit space.
pub fn for_prefixes(lo: u128, hi: u128, bits: u32, mut f: impl FnMut(u128, u32)) {
    let mut cur = lo;
    loop {
        // Largest aligned block starting at `cur` that ends within `hi`.
        let mut size_log = if cur == 0 {
            bits
        } else {
            cur.trailing_zeros().min(bits)
        };
        let last_of = |size_log: u32| {
            if size_log >= 128 {
                u128::MAX
            } else {
                cur + ((1u128 << size_log) - 1)
            }
        };
        while size_log > 0 && last_of(size_log) > hi {
            size_log -= 1;
        }
        f(cur, bits - size_log);
        let last = last_of(size_log);
        if last >= hi {
            return;
        }
        cur = last + 1;
    }
}

/// Number of CIDR prefixes needed to cover `lo..=hi`.
pub fn prefix_count(lo: u128, hi: u128, bits: u32) -> usize {
    let mut n = 0;
    for_prefixes(lo, hi, bits, |_, _| n += 1);
    n
}

/// The nftables element list of `ranges` written as CIDR prefixes, the
/// way prefix-based tools (ipset, iptables) hold them.
pub fn nft_prefix_elements(family: usize, ranges: &[Range]) -> (String, usize) {
    let bits = if family == V4 { 32 } else { 128 };
    let mut s = String::new();
    let mut n = 0;
    for &(a, b) in ranges {
        for_prefixes(a, b, bits, |net, len| {
            if n > 0 {
                s.push_str(",\n");
            }
            s.push_str(&fmt_addr(family, net));
            s.push('/');
            s.push_str(&len.to_string());
            n += 1;
        });
    }
    (s, n)
}

#[cfg(test)]
mod prefix_tests {
    use super::prefix_count;

    #[test]
    fn counts_prefixes() {
        assert_eq!(prefix_count(0, u32::MAX as u128, 32), 1);
        assert_eq!(prefix_count(0, 255, 32), 1);
        assert_eq!(prefix_count(1, 254, 32), 14);
        assert_eq!(prefix_count(5, 5, 32), 1);
        assert_eq!(prefix_count(0, u128::MAX, 128), 1);
        assert_eq!(prefix_count(10, 13, 32), 2);
        let mut v = Vec::new();
        super::for_prefixes(10, 13, 32, |n, l| v.push((n, l)));
        assert_eq!(v, [(10, 31), (12, 31)]);
        let (text, n) = super::nft_prefix_elements(super::V4, &[(0x0a00_0000, 0x0a00_01ff)]);
        assert_eq!((text.as_str(), n), ("10.0.0.0/23", 1));
    }
}
