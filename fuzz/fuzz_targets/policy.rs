//! Policy files: parse + validate (`bulkhead_policy::policy::load`, which also
//! reports non-UTF-8 input), then for a valid policy the summary and the
//! compiler, against a small cgroup tree and a reference geo source.
//! Rejections are expected; panics, hangs and leaks are bugs.

#![no_main]

use bulkhead_policy::{
    compile::{self, EventLimits},
    policy,
};
use bulkhead_fuzz::{cgroup_mount, reference_geo, write};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = write("policy.yaml", data);
    match policy::load(&path) {
        Ok(p) => {
            let _ = policy::summary(&p);
            let limits = EventLimits {
                rate: 1000,
                burst: 2000,
            };
            // 37 s: the TAI offset of today's clocks.
            let _ = compile::compile(&p, &reference_geo(), cgroup_mount(), limits, 37_000_000_000);
        }
        Err(diagnostics) => {
            assert!(!diagnostics.0.is_empty(), "a rejection without a message");
            let _ = diagnostics.to_string();
        }
    }
});
