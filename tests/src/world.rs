//! The two-domain world most end-to-end tests use: namespaces A and B
//! joined by veth; A (`10.N.0.1`, `fd00:N::1`) belongs to domain
//! `contractor`, B (`10.N.0.2`, `fd00:N::2`) to `prod`; workload cgroups
//! `contractor`, `prod` and `outside` (no domain) below the test's own root,
//! where the agent attaches.

use std::process::{Child, Stdio};

use crate::{Cgroup, Link, unique};

pub struct World {
    pub root: Cgroup,
    pub contractor: Cgroup,
    pub prod: Cgroup,
    pub outside: Cgroup,
    pub link: Link,
}

/// A fresh world; its addresses come from a [`crate::NetId`] the harness
/// hands out (`w.link.net`), unique among the tests running at once.
pub fn world() -> World {
    let root = Cgroup::new(&unique("/bh-test-"));
    World {
        contractor: root.child("contractor"),
        prod: root.child("prod"),
        outside: root.child("outside"),
        root,
        link: Link::new(),
    }
}

impl World {
    /// The standard policy, with `extra_domain` lines inserted before
    /// `prod` and `bridges` (a whole `bridges:` block) appended.
    pub fn policy(&self, extra_domain: &str, bridges: &str) -> String {
        let n = self.link.net;
        format!(
            r#"version: 1
mode: enforce
domains:
  contractor:
    cgroups: ["{c}"]
    networks: [10.{n}.0.1/32, "fd00:{n}::1/128"]
{extra_domain}  prod:
    cgroups: ["{p}"]
    networks: [10.{n}.0.2/32, "fd00:{n}::2/128"]
{bridges}"#,
            c = self.contractor.rel,
            p = self.prod.rel,
        )
    }

    /// `probe storm` in the background: `n` connects from the contractor
    /// to prod (denied, cross-domain), `pause_us` apart.
    pub fn storm_bg(&self, n: u32, pause_us: u32) -> Child {
        crate::command_in(
            &self.contractor,
            Some(&self.link.a),
            crate::probe_bin().to_str().unwrap(),
            &[
                "storm",
                &format!("{}:5353", self.link.v4(2)),
                &n.to_string(),
                &pause_us.to_string(),
            ],
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
    }
}

/// Waits for a [`World::storm_bg`]: every connect was denied at once.
pub fn storm_done(c: Child, n: u32) {
    let out = c.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("eperm {n} other 0"),
        "enforcement is unaffected: every connect of the storm is denied at once"
    );
}
