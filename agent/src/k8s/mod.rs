//! Kubernetes: pods → cgroups, so that a domain can hold pods chosen by
//! namespace and labels.
//!
//! - [`pod`] reads the fields that matter from pod objects as the API
//!   server returns them (UID, namespace, labels, QoS class, container ids).
//! - [`cgroups`] computes a pod's cgroup path for the kubelet's `systemd`
//!   and `cgroupfs` drivers and finds the one that exists under the cgroup
//!   v2 mount.
//! - [`selector`] matches pods against per-domain selectors and produces
//!   `(cgroup id, domain)` entries for the kernel's cgroup map.
//! - [`PodStore`] holds the node's pods as the watcher last saw them; the
//!   watcher itself (`watch`, with the `k8s` cargo feature) keeps it up to
//!   date from the API server with the `kube` crate.
//!
//! Nothing here touches the kernel: the agent's main loop asks the store
//! for the pods, [`selector::assign`]s them and writes the result with the
//! other cgroup entries.

#[cfg(feature = "k8s")]
pub mod bridges;
pub mod cgroups;
pub mod node;
pub mod pod;
#[cfg(feature = "k8s")]
pub mod report;
pub mod selector;
#[cfg(feature = "k8s")]
pub mod watch;

#[cfg(test)]
mod manifests;
#[cfg(test)]
mod schema;
#[cfg(test)]
mod tests;

use std::{collections::BTreeMap, sync::Mutex};

pub use cgroups::{Driver, Layout, Located, detect, locate};
pub use pod::{ContainerId, PodError, PodInfo, Qos, pods_from_json, pods_from_value};
pub use selector::{
    Assignment, Assignments, Operator, PodSelector, Requirement, SelectsPod, assign,
};

/// A change to the node's pods, as a watch reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodEvent {
    /// A complete list (the watch started or restarted): pods not in it are gone.
    Relisted(Vec<PodInfo>),
    /// A pod was added or changed (labels can change on a running pod).
    Applied(PodInfo),
    Deleted(PodInfo),
}

/// The node's pods, shared between the watcher (writes) and the agent's
/// main loop (reads once a second, and only when [`PodStore::version`]
/// moved).
#[derive(Debug, Default)]
pub struct PodStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// By the UID the cgroup is named after.
    pods: BTreeMap<String, PodInfo>,
    version: u64,
    synced: bool,
}

impl PodStore {
    pub fn new() -> PodStore {
        PodStore::default()
    }

    pub fn apply(&self, event: PodEvent) {
        let mut s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            PodEvent::Relisted(pods) => {
                s.pods = pods.into_iter().map(|p| (p.uid.clone(), p)).collect();
                s.synced = true;
            }
            PodEvent::Applied(pod) => {
                s.pods.insert(pod.uid.clone(), pod);
            }
            PodEvent::Deleted(pod) => {
                s.pods.remove(&pod.uid);
            }
        }
        s.version += 1;
    }

    /// Goes up with every change.
    pub fn version(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).version
    }

    /// Whether a complete list has arrived since start. Before that, an
    /// absent pod may simply not have been listed yet.
    pub fn synced(&self) -> bool {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).synced
    }

    /// The version and the pods, ordered by namespace and name.
    pub fn snapshot(&self) -> (u64, Vec<PodInfo>) {
        let s = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut pods: Vec<PodInfo> = s.pods.values().cloned().collect();
        pods.sort_by(|a, b| (&a.namespace, &a.name, &a.uid).cmp(&(&b.namespace, &b.name, &b.uid)));
        (s.version, pods)
    }
}
