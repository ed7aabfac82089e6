//! Kernel events as the ring buffer delivers them: the input is a run of
//! records (the last one may be short), each decoded, checked for sequence
//! gaps and enriched into the JSON users see, like the agent's reader
//! thread does.

#![no_main]

use bulkhead_common::event::EVENT_SIZE;
use bulkhead::{
    kernel::cgroup::PathCache,
    compile::BridgeName,
    runtime::events::{self, Enricher, Generation},
};
use bulkhead_fuzz::{cgroup_mount, reference_geo};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut en = Enricher::new(PathCache::new(cgroup_mount().to_path_buf()), 37_000_000_000);
    // Generations 1 and 2 have names; events may name any other.
    for generation in [1, 2] {
        en.add_generation(
            generation,
            Generation {
                domain_names: vec!["contractor".into(), "core".into(), "prod".into()],
                bridge_names: vec![BridgeName {
                    name: "ci".into(),
                    reason: "T-1".into(),
                }],
                geo: reference_geo(),
            },
        );
    }
    for record in data.chunks(EVENT_SIZE) {
        let Some(e) = events::decode(record) else {
            assert!(record.len() < EVENT_SIZE, "a full record did not decode");
            continue;
        };
        en.gap(&e);
        let r = en.enrich(&e);
        let json = serde_json::to_string(&r).expect("records serialize");
        let back: events::Record = serde_json::from_str(&json).expect("records read back");
        assert_eq!(back, r);
    }
});
