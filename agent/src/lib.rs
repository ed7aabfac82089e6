//! bulkhead's agent as a library: the binary (`src/main.rs`) is its CLI;
//! fuzz targets and tools link the same modules.

pub mod addr;
pub mod bridges;
pub mod caps;
pub mod cgroup;
pub mod client;
pub mod compile;
pub mod cut;
pub mod events;
pub mod explain;
pub mod fxhash;
pub mod geo;
pub mod k8s;
pub mod kernel;
pub mod listeners;
pub mod maps;
pub mod metrics;
pub mod policy;
pub mod probe;
pub mod ranges;
pub mod runtime;
pub mod sink;
pub mod store;
pub mod trust;
