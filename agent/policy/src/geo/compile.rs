//! Sources + the domains' country rules → merged per-range verdicts, which
//! the address table (`crate::addr`) turns into what the kernel walks.

use bulkhead_common::maps::{GeoValue, MAX_DOMAINS};

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
        // Each distinct verdict once; ranges carry its index, so merging
        // compares small integers and the address table maps an index to
        // its class without hashing verdicts.
        let mut values: Vec<GeoValue> = Vec::new();
        let index: Vec<u16> = verdict_table(domains)
            .into_iter()
            .map(|v| match values.iter().position(|x| *x == v) {
                Some(i) => i as u16,
                None => {
                    values.push(v);
                    (values.len() - 1) as u16
                }
            })
            .collect();
        let of = |c: &Country| index[countries::index(*c)];
        let family = |family: usize| {
            let mut merged = ranges::map(self.feed[family].iter().copied(), |p| of(&p.country));
            let mut read = self.feed_lines[family];
            for db in &self.dbs {
                let spans = ranges::map(db.spans[family].iter(), of);
                merged = if merged.is_empty() {
                    spans
                } else {
                    ranges::overlay(&merged, &spans)
                };
                read += db.records[family];
            }
            if family == 1 && ranges::touches(&merged, &mmdb::V6_HOLES) {
                merged = ranges::cut(&merged, &mmdb::V6_HOLES);
            }
            let stats = FamilyStats {
                source_ranges: read,
                merged_ranges: merged.len(),
            };
            (merged, stats)
        };
        // The families share nothing: one thread each.
        let ((v4, s4), (v6, s6)) = std::thread::scope(|s| {
            let v4 = s.spawn(|| family(0));
            let v6 = family(1);
            (v4.join().expect("IPv4 geo compile panicked"), v6)
        });
        CompiledGeo {
            v4,
            v6,
            values,
            stats: CompileStats { v4: s4, v6: s6 },
        }
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
