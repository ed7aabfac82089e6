//! The policies the benchmarks load, at growing sizes, and the ground
//! truth of what each one decides for an address (to check that the
//! kernel's counters moved for the right reason).

use std::fmt::Write as _;

use super::geo::{self, Db, Range, Rng, V4, V6};

/// The workload's domain (id 1) and a domain without country rules (id 2);
/// larger policies add `d3`..`d10`.
pub const BENCH: u32 = 1;
pub const PLAIN: u32 = 2;
pub const ALLOW: [[u8; 2]; 3] = [*b"DE", *b"FR", *b"NL"];

/// Reason codes (agent-common's table) the ground truth uses.
pub mod reason {
    use bulkhead_common::Reason;
    pub const SAME_DOMAIN: u8 = Reason::SameDomain as u8;
    pub const NO_DOMAIN: u8 = Reason::NoDomain as u8;
    pub const COUNTRY_ALLOWED: u8 = Reason::CountryAllowed as u8;
    pub const CROSS_DOMAIN: u8 = Reason::CrossDomain as u8;
    pub const COUNTRY_DENIED: u8 = Reason::CountryDenied as u8;
    pub const COUNTRY_UNKNOWN: u8 = Reason::CountryUnknown as u8;
}

/// One domain network of a generated policy.
#[derive(Clone, Copy, Debug)]
pub struct Net {
    pub family: usize,
    pub start: u128,
    pub prefix: u8,
    pub domain: u32,
}

impl Net {
    pub fn end(&self) -> u128 {
        let bits = if self.family == V4 { 32 } else { 128 };
        self.start | ((1u128 << (bits - u32::from(self.prefix))) - 1)
    }
    pub fn cidr(&self) -> String {
        format!("{}/{}", geo::fmt_addr(self.family, self.start), self.prefix)
    }
}

/// Random, distinct public networks: `/24`s in IPv4 unicast space (not
/// 10/8, which the network benchmark uses) and `/48`s in 2000::/3, spread
/// over the whole space so the LPM tries are as deep as such a set makes
/// them. Domains are assigned round robin over `domains` (1-based).
pub fn gen_nets(rng: &mut Rng, n4: usize, n6: usize, domains: u32) -> Vec<Net> {
    let v4_space = geo::subtract(geo::UNIVERSE_V4, &[(0x0a00_0000, 0x0aff_ffff)]);
    let mut seen4 = std::collections::HashSet::new();
    let mut seen6 = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(n4 + n6);
    let mut i = 0u32;
    while seen4.len() < n4 {
        let a = rng.uniform(&v4_space) & !0xff;
        if seen4.insert(a) {
            out.push(Net {
                family: V4,
                start: a,
                prefix: 24,
                domain: i % domains + 1,
            });
            i += 1;
        }
    }
    while seen6.len() < n6 {
        let a = rng.uniform(geo::UNIVERSE_V6) & !((1u128 << 80) - 1);
        if seen6.insert(a) {
            out.push(Net {
                family: V6,
                start: a,
                prefix: 48,
                domain: i % domains + 1,
            });
            i += 1;
        }
    }
    out
}

/// One benchmark policy.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Short key used in file names and results.
    pub key: &'static str,
    pub label: &'static str,
    pub domains: u32,
    pub nets: Vec<Net>,
    /// Country allow-list (egress and ingress) for the workload's domain.
    pub geo: bool,
}

/// Addresses the geofeed places in Germany: the network benchmark's
/// namespaces (`10.251.0.0/16`, `fd00:251::/32`), so the full policy
/// allows them by country.
pub const FEED: &str = "10.251.0.0/16,DE,,,\nfd00:251::/32,DE,,,\n";
pub const FEED_V4: Range = (0x0afb_0000, 0x0afb_ffff);
pub const FEED_V6: Range = (0xfd00_0251 << 96, ((0xfd00_0251u128 + 1) << 96) - 1);

impl Spec {
    /// The policy YAML; cgroup paths `<root>/work`, `<root>/plain`, `<root>/dN`.
    pub fn yaml(&self, root_rel: &str, db: &str, feed: &str) -> String {
        let mut s = String::from("version: 1\nmode: enforce\n");
        if self.geo {
            let _ = write!(
                s,
                "geo:\n  databases: [\"{db}\"]\n  geofeeds: [\"{feed}\"]\n"
            );
        }
        s.push_str("domains:\n");
        for id in 1..=self.domains {
            let (name, cg) = match id {
                BENCH => ("bench".to_string(), "work".to_string()),
                PLAIN => ("plain".to_string(), "plain".to_string()),
                n => (format!("d{n}"), format!("d{n}")),
            };
            let _ = writeln!(s, "  {name}:\n    cgroups: [\"{root_rel}/{cg}\"]");
            let nets: Vec<String> = self
                .nets
                .iter()
                .filter(|n| n.domain == id)
                .map(|n| format!("\"{}\"", n.cidr()))
                .collect();
            if !nets.is_empty() {
                let _ = writeln!(s, "    networks: [{}]", nets.join(", "));
            }
            if id == BENCH && self.geo {
                s.push_str("    egress: { countries: { allow: [DE, FR, NL] } }\n");
                s.push_str("    ingress: { countries: { allow: [DE, FR, NL] } }\n");
            }
        }
        s
    }

    /// Sorted network lookup table of one family: (start, end, domain).
    pub fn table(&self, family: usize) -> Vec<(u128, u128, u32)> {
        let mut t: Vec<_> = self
            .nets
            .iter()
            .filter(|n| n.family == family)
            .map(|n| (n.start, n.end(), n.domain))
            .collect();
        t.sort_unstable();
        t
    }

    /// What the policy decides for a packet of the workload (domain
    /// `bench`) to or from `addr` (reason code), judged by the ingress
    /// rules as `BPF_PROG_TEST_RUN`'s socket is not the initiator; the
    /// benchmark policy gives both directions the same rules.
    pub fn expected(&self, table: &[(u128, u128, u32)], db: &Db, family: usize, addr: u128) -> u8 {
        let i = table.partition_point(|r| r.1 < addr);
        if let Some(&(s, _, d)) = table.get(i)
            && s <= addr
        {
            return if d == BENCH {
                reason::SAME_DOMAIN
            } else {
                reason::CROSS_DOMAIN
            };
        }
        if !self.geo {
            return reason::NO_DOMAIN;
        }
        let feed = if family == V4 { FEED_V4 } else { FEED_V6 };
        if (feed.0..=feed.1).contains(&addr) {
            return reason::COUNTRY_ALLOWED;
        }
        match db.country(family, addr) {
            Some(c) if ALLOW.contains(&c) => reason::COUNTRY_ALLOWED,
            Some(_) => reason::COUNTRY_DENIED,
            None => reason::COUNTRY_UNKNOWN,
        }
    }

    /// The addresses this policy denies to the workload, as merged ranges
    /// within the nftables universe: everything outside the allowed
    /// countries and the geofeed, plus the other domains' networks, minus
    /// the workload's own networks.
    pub fn deny_ranges(&self, db: &Db, family: usize) -> Vec<Range> {
        let (universe, feed) = if family == V4 {
            (geo::UNIVERSE_V4, FEED_V4)
        } else {
            (geo::UNIVERSE_V6, FEED_V6)
        };
        let own: Vec<Range> = geo::union(&[&self
            .nets
            .iter()
            .filter(|n| n.family == family && n.domain == BENCH)
            .map(|n| (n.start, n.end()))
            .collect::<Vec<_>>()]);
        let others: Vec<Range> = geo::union(&[&self
            .nets
            .iter()
            .filter(|n| n.family == family && n.domain != BENCH)
            .map(|n| (n.start, n.end()))
            .collect::<Vec<_>>()]);
        let denied_geo = if self.geo {
            let allowed = geo::union(&[&db.ranges_of(family, &ALLOW), &[feed]]);
            geo::subtract(universe, &allowed)
        } else {
            Vec::new()
        };
        let all = geo::union(&[&denied_geo, &others]);
        geo::subtract(&all, &own)
    }
}

/// The policy ladder, smallest first. `nets` holds 10k networks; the
/// 10-domain policy uses the first two of each domain's.
pub fn ladder(nets: &[Net]) -> Vec<Spec> {
    let mut few = Vec::new();
    for d in 1..=10 {
        for fam in [V4, V6] {
            if let Some(n) = nets.iter().find(|n| n.domain == d && n.family == fam) {
                few.push(*n);
            }
        }
    }
    vec![
        Spec {
            key: "empty",
            label: "empty (domain, no rules)",
            domains: 2,
            nets: Vec::new(),
            geo: false,
        },
        Spec {
            key: "d10",
            label: "10 domains, 20 networks",
            domains: 10,
            nets: few,
            geo: false,
        },
        Spec {
            key: "n10k",
            label: "10 domains, 10k networks",
            domains: 10,
            nets: nets.to_vec(),
            geo: false,
        },
        Spec {
            key: "geo",
            label: "full country DB (allow DE/FR/NL)",
            domains: 2,
            nets: Vec::new(),
            geo: true,
        },
        Spec {
            key: "geo_n10k",
            label: "full DB + 10k networks",
            domains: 10,
            nets: nets.to_vec(),
            geo: true,
        },
    ]
}
