//! Pod selectors as a policy states them, and the pods they placed: the
//! pure half of `bulkhead::k8s::selector` (which reads pods and finds
//! their cgroups).
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

use std::collections::BTreeMap;

#[cfg(doc)]
use bulkhead_common::DomainId;

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
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
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
    /// Whether a pod in `namespace` with `labels` is selected.
    pub fn matches_labels(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        self.namespaces.iter().any(|n| n == namespace)
            && self
                .match_labels
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| r.matches(labels))
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
    /// Index into the policy's domains ([`DomainId::from_index`] is the
    /// kernel's id).
    pub domain: usize,
    /// `namespace/name`, for logs.
    pub pod: String,
    pub uid: String,
    /// The pod's cgroup, relative to the cgroup v2 mount.
    pub cgroup: String,
    pub cgroup_id: u64,
}
