//! Temporary directories for the unit tests, removed on drop.
//!
//! Not the `tempfile` crate: as a dev-dependency it turned on features of
//! crates the agent shares with it (rustix's `fs`, under clap; fastrand's
//! `default`, under kube), so the release build of an example
//! (`trail_rate`, which `cargo xtask bench` runs) rebuilt clap, kube and
//! the agent: a minute and a half of every CI run.

use std::{
    fs::DirBuilder,
    io,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

pub struct TempDir(PathBuf);

impl TempDir {
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A new directory only its owner may use (0700, like `tempfile`'s: the
/// agent refuses policy files others could change). Created, never reused:
/// a name that exists is an error, not someone else's directory taken over.
pub fn tempdir() -> io::Result<TempDir> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!(
        "bulkhead-test-{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(TempDir(dir))
}
