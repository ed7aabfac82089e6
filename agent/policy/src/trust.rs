//! Who may change the files that decide verdicts.
//!
//! The policy and the geo files it names are the security boundary: a
//! workload's user who can rewrite them (or rename a directory above them)
//! can open every domain at the next reload. So every component of their
//! path must belong to root (or to the agent's own user) and must not be
//! writable by group or others. A world-writable directory is tolerated only
//! with the sticky bit (as `/tmp`), where others cannot replace what root owns.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

const GROUP_OTHER_WRITE: u32 = 0o022;
const STICKY: u32 = 0o1000;

/// One path component as the check sees it.
#[derive(Debug, Clone, Copy)]
pub struct Owner {
    pub uid: u32,
    pub mode: u32,
    pub dir: bool,
}

/// Files the agent relies on may belong to root or to the agent's own user.
pub fn trusted_owner(uid: u32, agent_uid: u32) -> bool {
    uid == 0 || uid == agent_uid
}

/// Why `path` (with owner `o`) is not trusted, if it is not.
pub fn untrusted(o: Owner, agent_uid: u32) -> Option<String> {
    if !trusted_owner(o.uid, agent_uid) {
        return Some(format!("is owned by uid {}", o.uid));
    }
    if o.mode & GROUP_OTHER_WRITE != 0 && !(o.dir && o.mode & STICKY != 0) {
        return Some(format!(
            "is writable by group or others (mode {:04o})",
            o.mode & 0o7777
        ));
    }
    None
}

/// Fails naming the first component of `path` that someone other than root
/// (or `agent_uid`, the agent's effective user: `bulkhead::trust::check`
/// reads it) could change.
pub fn check_as(what: &str, path: &Path, agent_uid: u32) -> Result<()> {
    let real = match path.canonicalize() {
        Ok(p) => p,
        // The loader reports a missing file in its own words.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("{what} {}", path.display())),
    };
    let me = agent_uid;
    let mut at: PathBuf = real.clone();
    loop {
        let m = std::fs::metadata(&at).with_context(|| format!("{what}: {}", at.display()))?;
        let o = Owner {
            uid: m.uid(),
            mode: m.mode(),
            dir: m.is_dir(),
        };
        if let Some(why) = untrusted(o, me) {
            let whose = if at == real {
                String::new()
            } else {
                format!(" (directory {} above it)", at.display())
            };
            bail!(
                "{what} {}{whose} {why}: a non-root user could change what is enforced; \
                 fix the ownership or mode, or pass --allow-untrusted-policy",
                path.display()
            );
        }
        if !at.pop() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn file(uid: u32, mode: u32) -> Owner {
        Owner {
            uid,
            mode,
            dir: false,
        }
    }

    #[test]
    fn owner_and_mode() {
        assert!(untrusted(file(0, 0o644), 0).is_none());
        assert!(untrusted(file(1000, 0o644), 1000).is_none());
        assert!(
            untrusted(file(1000, 0o644), 0)
                .unwrap()
                .contains("uid 1000")
        );
        assert!(untrusted(file(0, 0o664), 0).unwrap().contains("0664"));
        assert!(untrusted(file(0, 0o646), 0).is_some());
        // Sticky only helps a directory.
        assert!(untrusted(file(0, 0o1777), 0).is_some());
        let tmp = Owner {
            uid: 0,
            mode: 0o1777,
            dir: true,
        };
        assert!(untrusted(tmp, 0).is_none());
        assert!(untrusted(Owner { mode: 0o777, ..tmp }, 0).is_some());
    }

    #[test]
    fn names_the_writable_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("policy.yaml");
        std::fs::write(&p, "x").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        // Every directory above a fresh temp dir is root's or ours and not
        // group-writable, except sticky /tmp.
        let me = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(d.path()).unwrap());
        let check = |what: &str, p: &Path| check_as(what, p, me);
        check("policy", &p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = format!("{:#}", check("policy", &p).unwrap_err());
        assert!(e.contains("writable by group or others (mode 0666)"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = format!("{:#}", check("policy", &p).unwrap_err());
        assert!(e.contains("directory"), "{e}");
    }
}
