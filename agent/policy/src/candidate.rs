//! A policy file read into what the kernel would enforce: trust checks →
//! parse and check → geo sources → compile. The one path `bulkhead check`,
//! `explain --policy` and `explain --replay` take (and the agent's loads:
//! [`Candidate::load_with`] keeps their geo database across reloads and
//! merges just-in-time bridges before compiling).

use std::{path::Path, sync::Arc};

use crate::{
    compile::{Compiled, EventLimits, compile},
    geo::{GeoDb, GeoError},
    policy::{self, Diagnostics, Policy},
};

/// Where and how to compile.
#[derive(Clone, Copy, Debug)]
pub struct Options<'a> {
    /// The cgroup v2 mount the policy's cgroup patterns are resolved under.
    pub cgroup_mount: &'a Path,
    pub limits: EventLimits,
    /// `CLOCK_TAI` − Unix time, ns (`bulkhead::clock::tai_offset_ns()`).
    pub tai: i64,
}

/// Why a policy file was not loaded; nothing of it is in force.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The trust check refused the policy file or a geo file it names.
    #[error("{0:#}")]
    Untrusted(anyhow::Error),
    /// One `file:line:col: message` per problem.
    #[error("{0}")]
    Policy(Diagnostics),
    #[error(transparent)]
    Geo(#[from] GeoError),
    /// More than the kernel's maps hold (bridge rules per domain pair).
    #[error("{0:#}")]
    Compile(anyhow::Error),
}

/// A loaded, compiled policy file.
pub struct Candidate {
    /// The policy as the file states it.
    pub file: Policy,
    /// What was compiled: `file`, or what [`Candidate::load_with`]'s
    /// `derive` made of it.
    pub policy: Policy,
    pub geo: Arc<GeoDb>,
    pub compiled: Compiled,
}

/// A trust check that trusts every file: for a file the caller chose to
/// read (`check`, `explain --policy`), not one that decides verdicts.
pub fn trust_any(_what: &str, _path: &Path) -> anyhow::Result<()> {
    Ok(())
}

impl Candidate {
    /// Loads and compiles `path`. `trusted` is asked about the policy file,
    /// then about each geo file it names, each before it is read (with
    /// `"policy file"` or `"geo file"` and the path).
    pub fn load(
        path: &Path,
        trusted: &mut dyn FnMut(&str, &Path) -> anyhow::Result<()>,
        opts: &Options,
    ) -> Result<Candidate, LoadError> {
        Self::load_with(path, trusted, opts, |_| None, Policy::clone)
    }

    /// [`Candidate::load`], where `reuse_geo` may hand back the geo
    /// database already loaded for these sources (the file's policy is
    /// given; files unchanged since), and `derive` makes the policy to
    /// compile from the file's (e.g. with just-in-time bridges added).
    pub fn load_with(
        path: &Path,
        trusted: &mut dyn FnMut(&str, &Path) -> anyhow::Result<()>,
        opts: &Options,
        reuse_geo: impl FnOnce(&Policy) -> Option<Arc<GeoDb>>,
        derive: impl FnOnce(&Policy) -> Policy,
    ) -> Result<Candidate, LoadError> {
        trusted("policy file", path).map_err(LoadError::Untrusted)?;
        let file = policy::load(path).map_err(LoadError::Policy)?;
        for p in file.geo.databases.iter().chain(&file.geo.geofeeds) {
            trusted("geo file", p).map_err(LoadError::Untrusted)?;
        }
        let geo = match reuse_geo(&file) {
            Some(geo) => geo,
            None => Arc::new(GeoDb::load(&file.geo)?),
        };
        let policy = derive(&file);
        let compiled = compile(&policy, &geo, opts.cgroup_mount, opts.limits, opts.tai)
            .map_err(LoadError::Compile)?;
        Ok(Candidate {
            file,
            policy,
            geo,
            compiled,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(mount: &Path) -> Options<'_> {
        Options {
            cgroup_mount: mount,
            limits: EventLimits { rate: 0, burst: 0 },
            tai: 0,
        }
    }

    #[test]
    fn loads_checks_and_compiles_and_asks_about_every_file() {
        let dir = tempfile::tempdir().unwrap();
        let feed = dir.path().join("feed.csv");
        std::fs::write(&feed, "192.0.2.0/24,DE,,,\n").unwrap();
        let path = dir.path().join("p.yaml");
        let text = format!(
            "version: 1\ngeo: {{geofeeds: [{}]}}\ndomains:\n  a: {{cgroups: [/a], networks: [10.1.0.0/16], egress: {{countries: {{allow: [DE]}}}}}}\n",
            feed.display()
        );
        std::fs::write(&path, text).unwrap();
        let mut asked = Vec::new();
        let c = Candidate::load(
            &path,
            &mut |what, p| {
                asked.push((what.to_string(), p.to_path_buf()));
                Ok(())
            },
            &opts(dir.path()),
        )
        .unwrap();
        assert_eq!(
            asked,
            vec![
                ("policy file".to_string(), path.clone()),
                ("geo file".to_string(), feed)
            ]
        );
        assert_eq!(c.compiled.domain_names, vec!["a"]);
        assert_eq!(c.file, c.policy);
        assert!(c.geo.lookup("192.0.2.1".parse().unwrap()).is_some());

        // Refused before anything is read.
        let e = Candidate::load(&path, &mut |_, _| anyhow::bail!("no"), &opts(dir.path()));
        assert!(matches!(e, Err(LoadError::Untrusted(_))));
        // The geo database handed back is the one used; `derive` compiles.
        let reused = c.geo.clone();
        let again = Candidate::load_with(
            &path,
            &mut trust_any,
            &opts(dir.path()),
            |_| Some(reused.clone()),
            |p| Policy {
                bridges: Vec::new(),
                ..p.clone()
            },
        )
        .unwrap();
        assert!(Arc::ptr_eq(&again.geo, &reused));
    }

    #[test]
    fn a_policy_with_problems_gives_its_diagnostics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.yaml");
        std::fs::write(&path, "version: 1\nbridges: [{name: x, from: a, to: b}]\n").unwrap();
        match Candidate::load(&path, &mut trust_any, &opts(dir.path())) {
            Err(LoadError::Policy(d)) => assert!(d.to_string().contains("p.yaml:"), "{d}"),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("loaded"),
        }
    }
}
