//! Who may change the files that decide verdicts: the rules are pure
//! ([`bulkhead_policy::trust`]); this side knows the agent's own user.

use std::path::Path;

use anyhow::Result;

pub use bulkhead_policy::trust::*;

/// Fails naming the first component of `path` that someone other than root
/// (or the agent's effective user) could change.
pub fn check(what: &str, path: &Path) -> Result<()> {
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    check_as(what, path, me)
}
