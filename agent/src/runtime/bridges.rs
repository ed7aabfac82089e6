//! Just-in-time bridges: opened over the control socket for a bounded time,
//! beside the policy file's bridges. They are persisted (so they survive
//! agent restarts), compiled into the same kernel bridge rules (so they
//! expire in the kernel even when the agent is down), and every open, close
//! and expiry goes to the audit trail with who asked and why.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::policy::{self, Bridge, Policy};

/// Who opened a bridge (the control socket peer).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Opener {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct JitBridge {
    pub name: String,
    pub from: String,
    pub to: String,
    /// As written: `tcp/5432`, `udp/8000-8100`.
    pub ports: Vec<String>,
    /// Unix ns.
    pub opened: i64,
    pub expires: i64,
    pub reason: String,
    pub opened_by: Opener,
}

/// A request to open one (as the CLI sends it on the control socket).
#[derive(Debug, Serialize, Deserialize)]
pub struct OpenRequest {
    pub name: Option<String>,
    pub from: String,
    pub to: String,
    pub ports: Vec<String>,
    pub for_secs: u64,
    pub reason: String,
    /// Opened for a cluster object (`BulkheadBridge`): only those may be
    /// named [`CLUSTER_PREFIX`]`<object>`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cluster: bool,
}

/// The names of the bridges of cluster objects begin with this.
pub const CLUSTER_PREFIX: &str = "k8s-";

/// The open just-in-time bridges and the file that keeps them.
#[derive(Clone)]
pub struct Jit {
    path: PathBuf,
    pub open: Vec<JitBridge>,
}

impl Jit {
    /// Reads the state file (a missing file means none are open).
    pub fn load(path: &Path) -> Result<Jit> {
        let open = match fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("reading {}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(Jit {
            path: path.to_path_buf(),
            open,
        })
    }

    /// Writes the state atomically (write, fsync, rename).
    fn save(&self) -> Result<()> {
        if let Some(dir) = self.path.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let tmp = self.path.with_extension("tmp");
        let file = fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
        serde_json::to_writer_pretty(&file, &self.open)?;
        file.sync_all()?;
        fs::rename(&tmp, &self.path).with_context(|| format!("writing {}", self.path.display()))?;
        Ok(())
    }

    /// Checks a request against the policy's `jit_bridges` rules; the caller
    /// compiles and switches, then calls [`Jit::commit`].
    pub fn prepare(&self, p: &Policy, req: OpenRequest, by: Opener, now: i64) -> Result<JitBridge> {
        let from = p
            .domains
            .iter()
            .position(|d| d.name == req.from)
            .ok_or_else(|| anyhow!("unknown domain `{}`", req.from))?;
        let to = p
            .domains
            .iter()
            .position(|d| d.name == req.to)
            .ok_or_else(|| anyhow!("unknown domain `{}`", req.to))?;
        let rule = p
            .jit_bridges
            .iter()
            .find(|r| r.from == from && r.to == to)
            .ok_or_else(|| anyhow!("the policy allows no just-in-time bridges from `{}` to `{}` (see `jit_bridges:`)", req.from, req.to))?;
        if req.for_secs == 0 || req.for_secs > rule.max_secs {
            bail!(
                "{} must be between 1s and {}s (the policy's max_duration for {} → {})",
                if req.cluster {
                    "the window (what is left of it)"
                } else {
                    "--for"
                },
                rule.max_secs,
                req.from,
                req.to
            );
        }
        if req.reason.trim().is_empty() {
            bail!("a reason is required (e.g. a ticket)");
        }
        if req.ports.is_empty() {
            bail!("at least one --port is required");
        }
        for port in &req.ports {
            policy::parse_port_range(port).map_err(|e| anyhow!(e))?;
        }
        let name = match req.name {
            Some(n) if n.starts_with(CLUSTER_PREFIX) && !req.cluster => bail!(
                "bridge names beginning with `{CLUSTER_PREFIX}` belong to cluster objects (BulkheadBridge)"
            ),
            Some(n) => n,
            None => format!("jit-{}-{}-{}", req.from, req.to, now / 1_000_000_000),
        };
        if self.open.iter().any(|b| b.name == name) || p.bridges.iter().any(|b| b.name == name) {
            bail!("a bridge named `{name}` exists already");
        }
        Ok(JitBridge {
            name,
            from: req.from,
            to: req.to,
            ports: req.ports,
            opened: now,
            expires: now.saturating_add((req.for_secs as i64).saturating_mul(1_000_000_000)),
            reason: req.reason,
            opened_by: by,
        })
    }

    pub fn commit(&mut self, b: JitBridge) -> Result<()> {
        self.open.push(b);
        self.save()
    }

    pub fn close(&mut self, name: &str) -> Result<JitBridge> {
        let i = self
            .open
            .iter()
            .position(|b| b.name == name)
            .ok_or_else(|| anyhow!("no just-in-time bridge named `{name}`"))?;
        let b = self.open.remove(i);
        self.save()?;
        Ok(b)
    }

    /// Removes the bridges whose time is up (the kernel stopped honouring
    /// them at that instant already) and returns them for the audit trail.
    pub fn expire(&mut self, now: i64) -> Result<Vec<JitBridge>> {
        let (gone, keep): (Vec<_>, Vec<_>) = self.open.drain(..).partition(|b| b.expires <= now);
        self.open = keep;
        if !gone.is_empty() {
            self.save()?;
        }
        Ok(gone)
    }

    /// The policy with the open bridges added, as the kernel should see it.
    /// Bridges whose domains the policy no longer has are left out.
    pub fn merged(&self, p: &Policy, extra: Option<&JitBridge>) -> Policy {
        let mut out = p.clone();
        for b in self.open.iter().chain(extra) {
            let (Some(from), Some(to)) = (
                p.domains.iter().position(|d| d.name == b.from),
                p.domains.iter().position(|d| d.name == b.to),
            ) else {
                continue;
            };
            out.bridges.push(Bridge {
                name: b.name.clone(),
                from,
                to,
                ports: b
                    .ports
                    .iter()
                    .filter_map(|s| policy::parse_port_range(s).ok())
                    .collect(),
                not_before: Some(b.opened),
                expires: Some(b.expires),
                reason: b.reason.clone(),
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "version: 1\ndomains:\n  a:\n    cgroups: [\"/a\"]\n  b:\n    cgroups: [\"/b\"]\njit_bridges:\n  - from: a\n    to: b\n    max_duration: 2h\n";

    fn req(from: &str, to: &str, secs: u64) -> OpenRequest {
        OpenRequest {
            name: None,
            from: from.into(),
            to: to.into(),
            ports: vec!["tcp/5432".into()],
            for_secs: secs,
            reason: "T-1".into(),
            cluster: false,
        }
    }

    #[test]
    fn opens_within_the_policy_limits_and_persists() {
        let p = policy::parse_str(Path::new("p.yaml"), POLICY).unwrap();
        let dir = crate::testdir::tempdir().unwrap();
        let path = dir.path().join("bridges.json");
        let mut jit = Jit::load(&path).unwrap();
        let by = Opener {
            uid: 0,
            gid: 0,
            pid: 1,
        };
        assert!(
            jit.prepare(&p, req("b", "a", 60), by, 0)
                .unwrap_err()
                .to_string()
                .contains("allows no just-in-time")
        );
        assert!(
            jit.prepare(&p, req("a", "b", 3 * 3600), by, 0)
                .unwrap_err()
                .to_string()
                .contains("between 1s and 7200s")
        );
        let b = jit
            .prepare(&p, req("a", "b", 3600), by, 5_000_000_000)
            .unwrap();
        assert_eq!(b.expires, 5_000_000_000 + 3600 * 1_000_000_000);
        jit.commit(b).unwrap();
        let merged = jit.merged(&p, None);
        assert_eq!(merged.bridges.len(), 1);
        assert_eq!(merged.bridges[0].ports[0].lo, 5432);
        let again = Jit::load(&path).unwrap();
        assert_eq!(again.open.len(), 1, "survives a restart");
        assert!(jit.expire(3600 * 1_000_000_000).unwrap().is_empty());
        assert_eq!(jit.expire(3605 * 1_000_000_000).unwrap().len(), 1);
        assert!(Jit::load(&path).unwrap().open.is_empty());
    }

    /// `k8s-<object>` is the cluster objects' name space: a bridge opened
    /// over the control socket cannot take (and so later lose) one.
    #[test]
    fn the_cluster_prefix_is_for_cluster_objects() {
        let p = policy::parse_str(Path::new("p.yaml"), POLICY).unwrap();
        let dir = crate::testdir::tempdir().unwrap();
        let jit = Jit::load(&dir.path().join("bridges.json")).unwrap();
        let by = Opener {
            uid: 0,
            gid: 0,
            pid: 1,
        };
        let mut r = req("a", "b", 60);
        r.name = Some("k8s-db".into());
        let e = jit.prepare(&p, r, by, 0).unwrap_err().to_string();
        assert!(e.contains("belong to cluster objects"), "{e}");
        let mut r = req("a", "b", 60);
        r.name = Some("k8s-db".into());
        r.cluster = true;
        assert_eq!(jit.prepare(&p, r, by, 0).unwrap().name, "k8s-db");
    }
}
