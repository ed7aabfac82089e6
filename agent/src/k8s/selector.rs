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

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use super::{
    cgroups::{self, Layout},
    pod::PodInfo,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// One `matchExpressions` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    /// For `In` and `NotIn`; empty for the others.
    pub values: Vec<String>,
}

impl Requirement {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            Operator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

/// Which pods a domain holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodSelector {
    /// Namespaces the pods may be in; required (empty matches nothing).
    pub namespaces: Vec<String>,
    pub match_labels: BTreeMap<String, String>,
    pub match_expressions: Vec<Requirement>,
}

impl PodSelector {
    pub fn matches(&self, pod: &PodInfo) -> bool {
        self.namespaces.contains(&pod.namespace)
            && self
                .match_labels
                .iter()
                .all(|(k, v)| pod.labels.get(k) == Some(v))
            && self
                .match_expressions
                .iter()
                .all(|r| r.matches(&pod.labels))
    }
}

impl std::fmt::Display for PodSelector {
    /// `namespaces acme, ci; team=acme; tier In (staging, qa); legacy DoesNotExist`
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "namespaces {}", self.namespaces.join(", "))?;
        for (k, v) in &self.match_labels {
            write!(f, "; {k}={v}")?;
        }
        for r in &self.match_expressions {
            write!(f, "; {} {:?}", r.key, r.operator)?;
            if !r.values.is_empty() {
                write!(f, " ({})", r.values.join(", "))?;
            }
        }
        Ok(())
    }
}

/// A pod placed in a domain through its cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    /// Index into the policy's domains (the kernel's id is `index + 1`).
    pub domain: usize,
    /// `namespace/name`, for logs.
    pub pod: String,
    pub uid: String,
    /// The pod's cgroup, relative to the cgroup v2 mount.
    pub cgroup: String,
    pub cgroup_id: u64,
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
    /// `Compiled::cgroups` (the kernel's domain id is `index + 1`).
    pub fn cgroup_entries(&self) -> Vec<(u64, u32, String)> {
        self.assigned
            .iter()
            .map(|a| (a.cgroup_id, a.domain as u32 + 1, a.cgroup.clone()))
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
