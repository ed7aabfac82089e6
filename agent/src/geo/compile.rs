//! Sources + the domains' country rules → merged per-range verdicts → the
//! fewest (nested) entries for the kernel's LPM maps.

use std::net::{Ipv4Addr, Ipv6Addr};

use agent_common::maps::{GeoValue, MAX_DOMAINS};
use ipnet::{Ipv4Net, Ipv6Net};

use super::{
    CompileStats, CompiledGeo, DomainGeo, FamilyStats, GeoDb, countries, lpm, mmdb, ranges,
    rule_denies,
};
use crate::policy::Country;

impl GeoDb {
    /// Merged per-domain verdict ranges for the kernel's LPM maps. Empty when
    /// no domain has a country rule.
    ///
    /// # Panics
    /// If a domain id is outside 1..=63 (the policy never produces one).
    pub fn compile(&self, domains: &[DomainGeo]) -> CompiledGeo {
        if domains
            .iter()
            .all(|d| d.egress.is_none() && d.ingress.is_none())
        {
            return CompiledGeo::default();
        }
        let table = verdict_table(domains);
        let verdict = |c: &Country| table[countries::index(*c)];
        let mut stats = CompileStats::default();
        let mut out = CompiledGeo::default();
        for (family, bits) in [(0, 32), (1, 128)] {
            let mut merged = ranges::map(&self.feed[family], |p| verdict(&p.country));
            let mut read = self.feed_lines[family];
            for db in &self.dbs {
                merged = ranges::overlay(&merged, &ranges::map(&db.spans[family], verdict));
                read += db.records[family];
            }
            if family == 1 {
                merged = ranges::cut(&merged, &mmdb::V6_HOLES);
            }
            let entries = lpm::minimal(&merged, bits, GeoValue::UNKNOWN)
                .unwrap_or_else(|| disjoint(&merged, bits));
            let prefixes = entries.len();
            for (net, len, val) in entries {
                if family == 0 {
                    out.v4
                        .push((Ipv4Net::new_assert(Ipv4Addr::from(net as u32), len), val));
                } else {
                    out.v6
                        .push((Ipv6Net::new_assert(Ipv6Addr::from(net), len), val));
                }
            }
            let fs = FamilyStats {
                source_ranges: read,
                merged_ranges: merged.len(),
                prefixes,
            };
            if family == 0 {
                stats.v4 = fs;
            } else {
                stats.v6 = fs;
            }
        }
        out.stats = stats;
        out
    }
}

/// One entry per CIDR block of every span: what policies with too many
/// distinct verdicts for [`lpm::minimal`] get.
fn disjoint(spans: &[ranges::Span<GeoValue>], bits: u32) -> Vec<(u128, u8, GeoValue)> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    for s in spans {
        buf.clear();
        ranges::prefixes(s.start, s.end, bits, &mut buf);
        out.extend(buf.iter().map(|&(net, len)| (net, len, s.val)));
    }
    out
}

/// The verdict of every country for every domain, indexed by
/// [`countries::index`].
fn verdict_table(domains: &[DomainGeo]) -> Vec<GeoValue> {
    let mut table = vec![GeoValue::default(); countries::TABLE_SIZE];
    for d in domains {
        assert!(
            (1..MAX_DOMAINS).contains(&d.id),
            "geo: domain id {} outside 1..{MAX_DOMAINS}",
            d.id
        );
        let bit = 1u64 << d.id;
        for (i, v) in table.iter_mut().enumerate() {
            let c = [b'A' + (i / 26) as u8, b'A' + (i % 26) as u8];
            if d.egress.as_ref().is_some_and(|r| rule_denies(r, Some(c))) {
                v.egress_deny |= bit;
            }
            if d.ingress.as_ref().is_some_and(|r| rule_denies(r, Some(c))) {
                v.ingress_deny |= bit;
            }
        }
    }
    table
}
