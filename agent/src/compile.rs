//! The compiler lives in the pure crate ([`bulkhead_policy::compile`]); the
//! clock helpers it used to hold are in [`crate::clock`], re-exported here
//! so `compile::now_ns()` / `compile::tai_offset_ns()` keep working.

pub use crate::clock::{now_ns, tai_offset_ns, to_tai};
pub use bulkhead_policy::compile::*;
