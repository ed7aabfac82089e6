//! The few fields of a Kubernetes pod that decide its domain and its
//! cgroup, read from the JSON the API server returns (`GET .../pods/NAME`,
//! a `PodList`, or `kubectl get pods -o json`). Unknown fields are ignored,
//! so any API version's pods read the same way.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

/// Annotation the kubelet puts on the API server's copy ("mirror") of a
/// static pod; the cgroup is named after the pod's own UID, which is the
/// hash in [`CONFIG_HASH`], not the mirror's `metadata.uid`.
pub const CONFIG_MIRROR: &str = "kubernetes.io/config.mirror";
/// The static pod's UID as the kubelet knows it.
pub const CONFIG_HASH: &str = "kubernetes.io/config.hash";

/// A pod's quality-of-service class: the kubelet puts each class in its own
/// cgroup subtree (Guaranteed pods directly under `kubepods`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl Qos {
    /// The name in `status.qosClass`.
    pub fn name(self) -> &'static str {
        match self {
            Qos::Guaranteed => "Guaranteed",
            Qos::Burstable => "Burstable",
            Qos::BestEffort => "BestEffort",
        }
    }

    /// The kubelet's cgroup for the class below `kubepods`, if it has one.
    pub(super) fn cgroup_component(self) -> Option<&'static str> {
        match self {
            Qos::Guaranteed => None,
            Qos::Burstable => Some("burstable"),
            Qos::BestEffort => Some("besteffort"),
        }
    }
}

/// A container as `status.containerStatuses[].containerID` names it:
/// `containerd://<id>`, `cri-o://<id>`, `docker://<id>`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContainerId {
    /// The part before `://` (`containerd`, `cri-o`, `docker`, ...).
    pub runtime: String,
    pub id: String,
}

impl ContainerId {
    pub fn parse(s: &str) -> Option<ContainerId> {
        let (runtime, id) = s.split_once("://")?;
        // Ids become path segments: accept nothing that could leave one.
        let id_ok = !id.is_empty()
            && id.len() <= 128
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        (id_ok && !runtime.is_empty()).then(|| ContainerId {
            runtime: runtime.to_owned(),
            id: id.to_owned(),
        })
    }
}

/// What the agent needs to know about one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    /// The UID the kubelet names the pod's cgroup after: `metadata.uid`, or
    /// for the mirror of a static pod its config hash.
    pub uid: String,
    pub labels: BTreeMap<String, String>,
    pub qos: Qos,
    /// `spec.nodeName`; `None` while the pod is not scheduled.
    pub node: Option<String>,
    /// `status.phase` (`Pending`, `Running`, `Succeeded`, `Failed`, ...).
    pub phase: Option<String>,
    /// Every container the kubelet reports started (init, regular and
    /// ephemeral), in that order.
    pub containers: Vec<ContainerId>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PodError {
    #[error("not JSON: {0}")]
    Json(String),
    #[error("expected a Pod, a PodList or a List, found kind `{0}`")]
    Kind(String),
    #[error("pod {0}: {1}")]
    Field(String, String),
}

/// A pod, a `PodList` or a `List` of pods, as JSON text.
pub fn pods_from_json(text: &str) -> Result<Vec<PodInfo>, PodError> {
    let value: Value = serde_json::from_str(text).map_err(|e| PodError::Json(e.to_string()))?;
    pods_from_value(&value)
}

/// Same, from a parsed value (the watcher hands over `k8s_openapi` pods
/// serialized to JSON, so both paths share this code).
pub fn pods_from_value(value: &Value) -> Result<Vec<PodInfo>, PodError> {
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or("Pod");
    match kind {
        "Pod" => Ok(vec![pod_from_value(value)?]),
        "PodList" | "List" => value
            .get("items")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter(|item| {
                item.get("kind")
                    .and_then(Value::as_str)
                    .is_none_or(|k| k == "Pod")
            })
            .map(pod_from_value)
            .collect(),
        other => Err(PodError::Kind(other.to_owned())),
    }
}

#[derive(Deserialize)]
struct RawPod {
    metadata: RawMeta,
    #[serde(default)]
    spec: RawSpec,
    #[serde(default)]
    status: RawStatus,
}

#[derive(Deserialize)]
struct RawMeta {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    uid: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawSpec {
    node_name: Option<String>,
    #[serde(default)]
    containers: Vec<RawContainer>,
    #[serde(default)]
    init_containers: Vec<RawContainer>,
}

#[derive(Deserialize, Default)]
struct RawContainer {
    #[serde(default)]
    resources: RawResources,
}

#[derive(Deserialize, Default)]
struct RawResources {
    #[serde(default)]
    requests: BTreeMap<String, Value>,
    #[serde(default)]
    limits: BTreeMap<String, Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawStatus {
    phase: Option<String>,
    qos_class: Option<String>,
    #[serde(default)]
    init_container_statuses: Vec<RawContainerStatus>,
    #[serde(default)]
    container_statuses: Vec<RawContainerStatus>,
    #[serde(default)]
    ephemeral_container_statuses: Vec<RawContainerStatus>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawContainerStatus {
    #[serde(rename = "containerID")]
    container_id: Option<String>,
}

fn pod_from_value(value: &Value) -> Result<PodInfo, PodError> {
    let raw = RawPod::deserialize(value).map_err(|e| {
        let name = value
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("<unnamed>");
        PodError::Field(name.to_owned(), e.to_string())
    })?;
    let who = format!("{}/{}", raw.metadata.namespace, raw.metadata.name);
    let uid = match raw.metadata.annotations.get(CONFIG_MIRROR) {
        Some(_) => raw
            .metadata
            .annotations
            .get(CONFIG_HASH)
            .cloned()
            .ok_or_else(|| {
                PodError::Field(who.clone(), format!("mirror pod without `{CONFIG_HASH}`"))
            })?,
        None => raw.metadata.uid.clone(),
    };
    // The UID becomes a path segment: only what UIDs and config hashes use.
    if uid.is_empty() || !uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(PodError::Field(who, format!("unusable uid `{uid}`")));
    }
    let qos = match raw.status.qos_class.as_deref() {
        Some("Guaranteed") => Qos::Guaranteed,
        Some("Burstable") => Qos::Burstable,
        Some("BestEffort") => Qos::BestEffort,
        Some(other) => {
            return Err(PodError::Field(who, format!("unknown qosClass `{other}`")));
        }
        None => qos_from_spec(&raw.spec),
    };
    let containers = raw
        .status
        .init_container_statuses
        .iter()
        .chain(&raw.status.container_statuses)
        .chain(&raw.status.ephemeral_container_statuses)
        .filter_map(|s| s.container_id.as_deref().and_then(ContainerId::parse))
        .collect();
    Ok(PodInfo {
        namespace: raw.metadata.namespace,
        name: raw.metadata.name,
        uid,
        labels: raw.metadata.labels,
        qos,
        node: raw.spec.node_name,
        phase: raw.status.phase,
        containers,
    })
}

/// The API server fills `status.qosClass` when it admits a pod; this is the
/// kubelet's rule for pods that lack it (hand-written fixtures, old
/// servers): Guaranteed when every container limits CPU and memory and
/// requests exactly that, BestEffort when none requests or limits either,
/// Burstable otherwise.
fn qos_from_spec(spec: &RawSpec) -> Qos {
    const COMPUTE: [&str; 2] = ["cpu", "memory"];
    let all: Vec<&RawContainer> = spec
        .containers
        .iter()
        .chain(&spec.init_containers)
        .collect();
    let any_set = all.iter().any(|c| {
        COMPUTE
            .iter()
            .any(|r| c.resources.requests.contains_key(*r) || c.resources.limits.contains_key(*r))
    });
    if !any_set {
        return Qos::BestEffort;
    }
    let guaranteed = !all.is_empty()
        && all.iter().all(|c| {
            COMPUTE.iter().all(|r| match c.resources.limits.get(*r) {
                // Requests default to limits.
                Some(limit) => c.resources.requests.get(*r).is_none_or(|q| q == limit),
                None => false,
            })
        });
    if guaranteed {
        Qos::Guaranteed
    } else {
        Qos::Burstable
    }
}
