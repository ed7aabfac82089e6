//! `dump` and `detach`: what is pinned under the bpffs directory, read or
//! removed directly, with no agent in between.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Result;

use bulkhead::kernel::{self, maps};

/// `dump`: the pinned policy maps as JSON.
pub fn dump(bpffs_dir: PathBuf) -> Result<ExitCode> {
    let pins = kernel::Pins::found(bpffs_dir)?;
    println!(
        "{}",
        serde_json::to_string_pretty(&maps::dump(&pins.maps())?)?
    );
    Ok(ExitCode::SUCCESS)
}

/// `detach`: enforcement stops.
pub fn detach(bpffs_dir: &Path, force: bool) -> Result<ExitCode> {
    if !force && kernel::is_locked(bpffs_dir) {
        anyhow::bail!(
            "an agent is running with {}; stop it first (its exit keeps enforcement pinned) or pass --force",
            bpffs_dir.display()
        );
    }
    let removed = kernel::detach(bpffs_dir)?;
    println!(
        "detached: removed {} pinned objects under {}",
        removed.len(),
        bpffs_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}
