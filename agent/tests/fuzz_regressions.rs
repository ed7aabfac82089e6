//! Inputs the fuzz targets in `fuzz/` found crashing, replayed through the
//! same public calls the targets make (`cargo xtask fuzz`). Each test
//! names the target and the artifact it came from; the artifact's bytes are
//! inline, so the test needs nothing but the agent crate.

use std::path::PathBuf;

use bulkhead::{
    kernel::cgroup::PathCache,
    runtime::events::{self, Enricher},
};
use bulkhead_common::{Event, event::EVENT_SIZE};

fn unhex(lines: &[&str]) -> Vec<u8> {
    let s: String = lines.concat();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// Target `events`, artifact `crash-87aee4ea5b5fad8c2c033e1deed2dc71029e5990`:
/// `attempt to add with overflow` at `Enricher::gap` (`p + 1` with a
/// previous sequence number of `u64::MAX`), panicking the events thread in
/// builds with overflow checks. Two whole records from CPU 0 (sequence
/// numbers `u64::MAX`, then `0x1111111110920000`) and a short tail.
const EVENTS_GAP_OVERFLOW: &[&str] = &[
    "003289d3069d97ffffffffffffffffffffffffffff2f00000000000000ffffffffffffffffffffffffffffffffffffff",
    "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
    "ffffffffffffffffffffffffff1701000000000000003930000000000000921000009210111111111111111111111111",
    "11110000e8030000e80300000100000000000000000000000000000000000000000000000a1e0001d100000000000000",
    "00000000006375726c00000000000000000000000001000000000001bb01000300020601000200000000000000003289",
    "d3069d9717050000000000000039300000000000009210000092100000e8030000e8030000020000000000000020010d",
    "b800280000000000000000000000000000000030010003000a1101011000000000000000",
];

/// The enricher the `events` target makes, over an empty cgroup tree (the
/// target reads the host's; these inputs name no cgroup).
fn enricher() -> Enricher {
    Enricher::new(PathCache::new(PathBuf::from("/nonexistent")), 0)
}

#[test]
fn fuzz_events_gap_after_the_last_sequence_number_does_not_overflow() {
    let input = unhex(EVENTS_GAP_OVERFLOW);
    let mut en = enricher();
    for record in input.chunks(EVENT_SIZE) {
        if let Some(e) = events::decode(record) {
            en.gap(&e);
            en.enrich(&e);
        }
    }

    // The same, reduced: after u64::MAX the counter can only have wrapped
    // (or restarted), which says nothing about lost events.
    let mut en = enricher();
    let seq = |seq| Event {
        seq,
        ..Default::default()
    };
    assert_eq!(en.gap(&seq(u64::MAX)), 0);
    assert_eq!(en.gap(&seq(0)), 0);
    assert_eq!(en.gap(&seq(5)), 4);
    assert_eq!(en.gaps, 4);
}
