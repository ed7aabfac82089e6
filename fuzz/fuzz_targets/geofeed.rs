//! RFC 8805 geofeeds: loaded through `GeoDb::load` as the agent does, then
//! looked up and compiled against country rules.

#![no_main]

use bulkhead_policy::policy::GeoSources;
use bulkhead_fuzz::{load_and_use, write};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let sources = GeoSources {
        databases: Vec::new(),
        geofeeds: vec![write("geofeed.csv", data)],
    };
    load_and_use(&sources, data);
});
