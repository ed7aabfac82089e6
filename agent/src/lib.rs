//! bulkhead's agent as a library: the binary (`src/main.rs`) is its CLI;
//! fuzz targets and tools link the same modules.
//!
//! The pure part (policy, geo, compile, explain's decisions) is the crate
//! `bulkhead-policy`; its modules are re-exported here under their old
//! paths. `compile`, `explain` and `trust` add what needs the host.

pub use bulkhead_policy::{
    Candidate, LoadError, addr, candidate, duration, fxhash, geo, policy, ranges, selector,
};

pub mod clock;
pub mod compile;
pub mod explain;
pub mod k8s;
pub mod kernel;
pub mod memory;
pub mod runtime;
pub mod seal;
#[cfg(test)]
mod testdir;
pub mod trust;
