//! bulkhead's pure part: everything between a policy file and the contents
//! of the kernel's maps, and the answers `explain` gives from them. No
//! `aya`, no `libc`: it is tested and fuzzed without root (as `aya-obj` is
//! kept apart from `aya`). What needs the host is handed in by the agent
//! (`bulkhead`): the TAI clock offset, the trust check's user, the
//! listeners a connect would reach.

pub mod addr;
pub mod candidate;
pub mod cgroup;
pub mod clock;
pub mod compile;
pub mod duration;
pub mod explain;
pub mod fxhash;
pub mod geo;
pub mod listener;
pub mod policy;
pub mod ranges;
pub mod selector;
pub mod trust;

pub use candidate::{Candidate, LoadError};
