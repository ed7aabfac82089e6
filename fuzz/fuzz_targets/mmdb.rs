//! MaxMind-format country databases (`.mmdb`): a corrupt database must be
//! refused with an error, never panic, hang or exhaust memory. Loaded
//! through `GeoDb::load` as the agent does, then looked up and compiled.

#![no_main]

use bulkhead_policy::policy::GeoSources;
use bulkhead_fuzz::{load_and_use, write};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let sources = GeoSources {
        databases: vec![write("country.mmdb", data)],
        geofeeds: Vec::new(),
    };
    load_and_use(&sources, data);
});
