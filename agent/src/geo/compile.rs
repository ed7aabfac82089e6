//! Sources + the domains' country rules → merged per-range verdicts, which
//! the address table (`crate::addr`) turns into what the kernel walks.

use agent_common::maps::{GeoValue, MAX_DOMAINS};

use super::{
    CompileStats, CompiledGeo, DomainGeo, FamilyStats, GeoDb, countries, mmdb, rule_denies,
};
use crate::{policy::Country, ranges};

impl GeoDb {
    /// Merged per-domain verdict ranges. Empty when no domain has a country
    /// rule.
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
        for family in [0, 1] {
            let mut merged = ranges::map(&self.feed[family], |p| verdict(&p.country));
            let mut read = self.feed_lines[family];
            for db in &self.dbs {
                merged = ranges::overlay(&merged, &ranges::map(&db.spans[family], verdict));
                read += db.records[family];
            }
            if family == 1 {
                merged = ranges::cut(&merged, &mmdb::V6_HOLES);
            }
            let fs = FamilyStats {
                source_ranges: read,
                merged_ranges: merged.len(),
            };
            if family == 0 {
                stats.v4 = fs;
                out.v4 = merged;
            } else {
                stats.v6 = fs;
                out.v6 = merged;
            }
        }
        out.stats = stats;
        out
    }
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
