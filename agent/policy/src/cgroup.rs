//! Policy cgroup patterns resolved against a cgroup v2 tree: std file
//! system calls only (a cgroup's id is its directory's inode number), so a
//! compile can run against any directory tree, a temporary one in tests.

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// A cgroup's id as the kernel's BPF helpers report it: the inode number of
/// its directory on cgroup2.
pub fn cgroup_id(path: &Path) -> std::io::Result<u64> {
    Ok(fs::metadata(path)?.ino())
}

/// `/a/b` under `mount` → `mount/a/b`.
pub fn absolute(mount: &Path, rel: &str) -> PathBuf {
    mount.join(rel.trim_start_matches('/'))
}

/// Every existing cgroup that `pattern` names. Literal segments are joined;
/// `*` in a segment matches any run of characters within that segment.
pub fn resolve(mount: &Path, pattern: &str) -> Vec<(String, u64)> {
    let mut current = vec![String::new()];
    for seg in pattern.split('/').filter(|s| !s.is_empty()) {
        let mut next = Vec::new();
        for base in &current {
            if seg.contains('*') {
                let Ok(entries) = fs::read_dir(absolute(mount, base)) else {
                    continue;
                };
                for e in entries.flatten() {
                    if !e.file_type().is_ok_and(|t| t.is_dir()) {
                        continue;
                    }
                    let name = e.file_name().to_string_lossy().into_owned();
                    if glob_match(seg, &name) {
                        next.push(format!("{base}/{name}"));
                    }
                }
            } else {
                next.push(format!("{base}/{seg}"));
            }
        }
        current = next;
    }
    current
        .into_iter()
        .filter_map(|rel| {
            let rel = if rel.is_empty() { "/".to_string() } else { rel };
            cgroup_id(&absolute(mount, &rel)).ok().map(|id| (rel, id))
        })
        .collect()
}

/// `*`-only glob within one segment.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first) || text.len() < first.len() + last.len() || !text.ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_within_a_segment() {
        assert!(glob_match("*contractor*", "pod-contractor-1"));
        assert!(glob_match("a*", "a"));
        assert!(glob_match("*.slice", "prod.slice"));
        assert!(!glob_match("*.slice", "prod.scope"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXcYYb"));
        assert!(!glob_match("ab*ba", "aba"));
        assert!(glob_match("exact", "exact"));
    }
}
