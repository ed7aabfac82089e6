//! Choosing pods by namespace and labels, and turning the chosen pods into
//! `(cgroup id, domain)` entries for the kernel's cgroup map.
//!
//! Semantics follow Kubernetes label selectors, inside namespaces: a pod
//! matches when it is in one of `namespaces`, carries every label of
//! `match_labels`, and meets every requirement of `match_expressions`.
//!
//! `namespaces` is required: a selector without namespaces matches nothing.
//! Labels are chosen by whoever creates the pod, so a label-only selector
//! would let anyone allowed to create pods anywhere put them into that
//! domain (a contractor's pod labelled `tier: production`). Namespaces are
//! where Kubernetes draws its authorization lines, so they are the part of
//! a selector a workload cannot choose for itself.

use std::{collections::BTreeSet, path::Path};

use bulkhead_common::DomainId;

use super::{
    cgroups::{self, Layout},
    pod::PodInfo,
};

pub use bulkhead_policy::selector::{Assignment, Operator, PodSelector, Requirement};

/// [`PodSelector::matches_labels`] for a pod as the API server describes it.
pub trait SelectsPod {
    fn matches(&self, pod: &PodInfo) -> bool;
}

impl SelectsPod for PodSelector {
    fn matches(&self, pod: &PodInfo) -> bool {
        self.matches_labels(&pod.namespace, &pod.labels)
    }
}

/// The outcome of [`assign`]: what goes into the kernel, and what the
/// agent should say it left out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Assignments {
    pub assigned: Vec<Assignment>,
    /// Pods that selectors of several domains match: `(pod, domain
    /// indexes)`. They get none of them, so the cgroup-path rules decide
    /// (a pod's labels must never pick the more generous of two domains).
    pub conflicts: Vec<(String, Vec<usize>)>,
    /// Pods a selector matches whose cgroup does not exist (yet): the
    /// kubelet has not started them, or they run on another node. Pods that
    /// have finished (`Succeeded`, `Failed`) are left out: their cgroups
    /// are gone for good.
    pub pending: Vec<String>,
}

impl Assignments {
    /// `(cgroup id, kernel domain id, path)`, the shape of
    /// `Compiled::cgroups`.
    pub fn cgroup_entries(&self) -> Vec<(u64, u32, String)> {
        self.assigned
            .iter()
            .map(|a| {
                (
                    a.cgroup_id,
                    DomainId::from_index(a.domain).raw(),
                    a.cgroup.clone(),
                )
            })
            .collect()
    }
}

/// Matches every pod against every domain's selectors (`(domain index,
/// selector)`, several per domain allowed) and finds the cgroups of the
/// matched pods under `mount`. Deterministic: output follows `pods` order.
pub fn assign(
    selectors: &[(usize, PodSelector)],
    pods: &[PodInfo],
    mount: &Path,
    layouts: &[Layout],
) -> Assignments {
    let mut out = Assignments::default();
    for pod in pods {
        if matches!(pod.phase.as_deref(), Some("Succeeded" | "Failed")) {
            continue;
        }
        let domains: BTreeSet<usize> = selectors
            .iter()
            .filter(|(_, s)| s.matches(pod))
            .map(|(d, _)| *d)
            .collect();
        let who = format!("{}/{}", pod.namespace, pod.name);
        match domains.len() {
            0 => continue,
            1 => {}
            _ => {
                out.conflicts.push((who, domains.into_iter().collect()));
                continue;
            }
        }
        let domain = *domains.first().expect("one domain");
        match cgroups::locate(mount, layouts, pod) {
            Some(found) => out.assigned.push(Assignment {
                domain,
                pod: who,
                uid: pod.uid.clone(),
                cgroup: found.path,
                cgroup_id: found.id,
            }),
            None => out.pending.push(who),
        }
    }
    out
}
