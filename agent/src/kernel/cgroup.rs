//! The cgroup v2 hierarchy: where it is mounted, cgroup ids, and policy
//! patterns resolved to the cgroups that exist now.

use std::{collections::HashMap, fs, path::PathBuf};

use anyhow::{Context as _, Result, bail};

/// Finds the cgroup v2 mount in `/proc/self/mountinfo`. Hosts mount it at
/// `/sys/fs/cgroup`; hybrid hosts at `/sys/fs/cgroup/unified`.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let info =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    find_cgroup2(&info).ok_or_else(|| {
        anyhow::anyhow!(
            "no cgroup v2 filesystem is mounted (nothing of type cgroup2 in /proc/self/mountinfo); \
             bulkhead needs the unified hierarchy: boot with systemd.unified_cgroup_hierarchy=1 or \
             `mount -t cgroup2 none /sys/fs/cgroup`"
        )
    })
}

fn find_cgroup2(mountinfo: &str) -> Option<PathBuf> {
    mounts(mountinfo)
        .find(|m| m.fstype == "cgroup2")
        .map(|m| m.point)
}

/// One line of `/proc/self/mountinfo`, the fields read here.
pub(super) struct Mount<'a> {
    /// The mounted directory inside its filesystem (`/` for the whole).
    pub root: &'a str,
    pub point: PathBuf,
    pub fstype: &'a str,
    pub superopts: &'a str,
}

/// The mounts of a mountinfo text; malformed lines are skipped.
pub(super) fn mounts(mountinfo: &str) -> impl Iterator<Item = Mount<'_>> {
    mountinfo.lines().filter_map(|line| {
        // `id parent maj:min root mountpoint opts [optional...] - fstype source superopts`
        let (left, right) = line.split_once(" - ")?;
        let mut left = left.split_whitespace();
        let (root, point) = (left.nth(3)?, left.next()?);
        let mut right = right.split_whitespace();
        let fstype = right.next()?;
        Some(Mount {
            root,
            point: PathBuf::from(unescape_mountinfo(point)),
            fstype,
            superopts: right.nth(1).unwrap_or(""),
        })
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v as char);
            i += 4;
            continue;
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

// Pattern resolution is pure (std only): it lives with the compiler.
pub use bulkhead_policy::cgroup::{absolute, cgroup_id, glob_match, resolve};

/// cgroup id → path (relative to the mount), for events. Workloads come and
/// go, so a miss triggers one rescan of the tree.
pub struct PathCache {
    mount: PathBuf,
    paths: HashMap<u64, String>,
}

impl PathCache {
    pub fn new(mount: PathBuf) -> Self {
        let mut c = PathCache {
            mount,
            paths: HashMap::new(),
        };
        c.rescan();
        c
    }

    pub fn rescan(&mut self) {
        self.paths.clear();
        let mut stack = vec![String::new()];
        while let Some(rel) = stack.pop() {
            let abs = absolute(&self.mount, &rel);
            if let Ok(id) = cgroup_id(&abs) {
                self.paths.insert(
                    id,
                    if rel.is_empty() {
                        "/".into()
                    } else {
                        rel.clone()
                    },
                );
            }
            let Ok(entries) = fs::read_dir(&abs) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(format!("{rel}/{}", e.file_name().to_string_lossy()));
                }
            }
        }
    }

    pub fn path(&mut self, id: u64) -> Option<String> {
        if !self.paths.contains_key(&id) {
            self.rescan();
        }
        self.paths.get(&id).cloned()
    }

    /// Remembers a path learnt elsewhere (e.g. from pattern resolution).
    pub fn insert(&mut self, id: u64, path: String) {
        self.paths.insert(id, path);
    }
}

/// The cgroup a process is in, relative to the v2 mount (`0::/path`).
pub fn cgroup_of_pid(pid: u32) -> Result<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .with_context(|| format!("reading /proc/{pid}/cgroup"))?;
    for line in text.lines() {
        if let Some(p) = line.strip_prefix("0::") {
            return Ok(p.to_string());
        }
    }
    bail!("/proc/{pid}/cgroup has no cgroup v2 entry")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_and_unified_mounts() {
        let hybrid = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                      40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_cgroup2(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified =
            "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(find_cgroup2(unified), Some(PathBuf::from("/sys/fs/cgroup")));
        assert_eq!(find_cgroup2("1 0 0:1 / / rw - ext4 /dev/vda rw\n"), None);
        let spaced = "41 31 0:38 / /mnt/cg\\040two rw - cgroup2 cgroup2 rw\n";
        assert_eq!(find_cgroup2(spaced), Some(PathBuf::from("/mnt/cg two")));
    }

    #[test]
    fn resolves_patterns_against_a_tree() {
        let dir = crate::testdir::tempdir().unwrap();
        for p in ["k/pod-contractor-1/c1", "k/pod-core-2", "prod.slice"] {
            fs::create_dir_all(dir.path().join(p)).unwrap();
        }
        let mut got: Vec<String> = resolve(dir.path(), "/k/*contractor*")
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        got.sort();
        assert_eq!(got, vec!["/k/pod-contractor-1"]);
        assert_eq!(resolve(dir.path(), "/prod.slice").len(), 1);
        assert!(resolve(dir.path(), "/missing.slice").is_empty());
        let mut cache = PathCache::new(dir.path().to_path_buf());
        let id = cgroup_id(&dir.path().join("k/pod-contractor-1/c1")).unwrap();
        assert_eq!(cache.path(id).as_deref(), Some("/k/pod-contractor-1/c1"));
    }
}
