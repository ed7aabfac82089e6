//! The agent's view of its node's pods: the store the watch fills, where
//! the kubelet keeps their cgroups, and which of them the policy's `pods:`
//! selectors place.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use super::{Assignments, Layout, PodStore, assign, detect};
use crate::policy::Policy;

pub struct NodePods {
    pub node: String,
    pub store: Arc<PodStore>,
    mount: PathBuf,
    /// Found once and again whenever a selected pod's cgroup is missing
    /// (the kubelet may start after the agent, or change driver).
    layouts: Vec<Layout>,
    /// What the last [`NodePods::place`] looked at, to skip work when
    /// nothing moved.
    seen: Option<(u64, String)>,
    pub last: Assignments,
    failed: bool,
    /// When the layouts were last looked for.
    detected: Option<Instant>,
}

impl NodePods {
    pub fn new(node: String, mount: &Path) -> NodePods {
        NodePods {
            node,
            store: Arc::new(PodStore::new()),
            mount: mount.to_path_buf(),
            layouts: Vec::new(),
            seen: None,
            last: Assignments::default(),
            failed: false,
            detected: None,
        }
    }

    /// Which pods `policy` places, and where their cgroups are.
    pub fn place(&mut self, policy: &Policy) -> Assignments {
        let selectors: Vec<_> = policy
            .domains
            .iter()
            .enumerate()
            .flat_map(|(i, d)| d.pods.iter().map(move |s| (i, s.clone())))
            .collect();
        let (version, pods) = self.store.snapshot();
        // Walking the cgroup tree for `kubepods` is the expensive part:
        // at most every 5 s while the kubelet's cgroups are missing.
        let stale = self
            .detected
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(5));
        if stale && (self.layouts.is_empty() || !self.last.pending.is_empty()) {
            self.layouts = detect(&self.mount);
            self.detected = Some(Instant::now());
        }
        let a = assign(&selectors, &pods, &self.mount, &self.layouts);
        self.seen = Some((version, policy.sha256.clone()));
        self.last = a.clone();
        self.failed = false;
        a
    }

    /// Whether [`NodePods::place`] is worth calling: the pods or the policy
    /// changed since the last call, or a selected pod waits for its cgroup
    /// (checked on every turn of the main loop, so a new pod joins its
    /// domain within about 100 ms of the kubelet creating its cgroup); on
    /// `tick` (once a second) also after a placement failed to reach the
    /// kernel.
    pub fn due(&self, policy: &Policy, tick: bool) -> bool {
        let moved = self
            .seen
            .as_ref()
            .is_none_or(|(v, sha)| *v != self.store.version() || *sha != policy.sha256);
        moved || !self.last.pending.is_empty() || (tick && self.failed)
    }

    /// The last placement did not reach the kernel: `before` is still in
    /// force; try again on the next tick.
    pub fn failed(&mut self, before: Assignments) {
        self.last = before;
        self.failed = true;
    }
}

/// Whether any domain of `policy` selects pods.
pub fn selects_pods(policy: &Policy) -> bool {
    policy.domains.iter().any(|d| !d.pods.is_empty())
}
