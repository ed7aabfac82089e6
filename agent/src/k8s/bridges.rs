//! Cluster-wide bridges: a `BulkheadBridge` object (cluster-scoped,
//! deploy/kubernetes/crd-bulkheadbridges.yaml) is a just-in-time bridge on
//! every node. Each agent watches the objects and opens the bridge through
//! its own loop exactly as `bulkhead bridge open` does (the policy's
//! `jit_bridges:` limits, the kernel's expiry that holds with the agent
//! down, the audit trail), named `k8s-<object name>`; it closes it when the
//! object is deleted. Each node writes how it fared into the object's
//! status (`nodes`, one entry per node, and `enforcing`, how many enforce
//! it), so `kubectl get bulkheadbridges` shows how many nodes enforce each.
//!
//! An object's window is fixed by the object, not by when a node saw it:
//! `spec.expires`, or `metadata.creationTimestamp` + `spec.duration`. So a
//! node that starts late, or an agent restarted, opens the same window.

use std::{collections::BTreeMap, time::Duration};

use futures::StreamExt as _;
use kube::{
    api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams},
    runtime::{WatchStreamExt as _, watcher},
};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::report::{GROUP, VERSION, ask, rfc3339_seconds};
use crate::runtime::{
    bridges::OpenRequest,
    control::Call,
    protocol::{Request, Response},
};

pub const KIND: &str = "BulkheadBridge";
pub const PLURAL: &str = "bulkheadbridges";
/// The just-in-time bridges of cluster objects are named this and the
/// object's name; other bridges may not use it.
pub const PREFIX: &str = crate::runtime::bridges::CLUSTER_PREFIX;
/// Who asked for a bridge, as `bulkhead bridge open --cluster` records it.
pub const REQUESTED_BY: &str = "bulkhead.dev/requested-by";

/// What an object asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    /// The bridge's name (`k8s-<object>`).
    pub name: String,
    pub from: String,
    pub to: String,
    pub ports: Vec<String>,
    /// Unix ns.
    pub expires: i64,
    pub reason: String,
    pub requested_by: String,
}

/// Reads an object's spec; an error says what is wrong with it (the
/// object's status shows it).
pub fn wanted(object: &Value) -> Result<Wanted, String> {
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let spec = &object["spec"];
    let text = |key: &str| -> Result<String, String> {
        spec[key]
            .as_str()
            .filter(|s| !s.trim().is_empty())
            .map(str::to_string)
            .ok_or_else(|| format!("spec.{key} is missing"))
    };
    let ports: Vec<String> = spec["ports"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let expires = match (spec["expires"].as_str(), spec["duration"].as_str()) {
        (Some(at), None) => crate::clock::parse_ts(at).ok_or_else(|| {
            format!("spec.expires `{at}` is not an RFC 3339 time between 1678 and 2262")
        })?,
        (None, Some(d)) => {
            let secs =
                crate::duration::parse_duration(d).map_err(|e| format!("spec.duration: {e}"))?;
            let created = object["metadata"]["creationTimestamp"]
                .as_str()
                .and_then(crate::clock::parse_ts)
                .ok_or("metadata.creationTimestamp is missing")?;
            created.saturating_add((secs as i64).saturating_mul(1_000_000_000))
        }
        _ => return Err("exactly one of spec.duration and spec.expires is required".into()),
    };
    Ok(Wanted {
        name: format!("{PREFIX}{name}"),
        from: text("from")?,
        to: text("to")?,
        ports,
        expires,
        reason: text("reason")?,
        requested_by: object["metadata"]["annotations"][REQUESTED_BY]
            .as_str()
            .filter(|s| !s.trim().is_empty())
            .unwrap_or("unknown")
            .to_string(),
    })
}

/// A refused object is asked for again (the policy may have changed) this
/// often while its spec stays the same.
const RETRY_REFUSED: Duration = Duration::from_secs(60);

/// One node's line in an object's status.
#[derive(Clone, Debug, PartialEq, Eq)]
struct NodeState {
    /// `enforced`, `refused` or `expired`.
    state: &'static str,
    message: String,
}

/// Watches the objects until the agent's loop is gone.
pub async fn run(node: String, calls: mpsc::Sender<Call>) {
    let api = bridges_api(super::watch::client("cluster bridges").await);
    let mut stream = watcher(api.clone(), watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut objects: BTreeMap<String, Value> = BTreeMap::new();
    let mut listing: Option<BTreeMap<String, Value>> = None;
    let mut reported: BTreeMap<String, NodeState> = BTreeMap::new();
    let mut refused: Refused = BTreeMap::new();
    let mut synced = false;
    info!("cluster bridges: watching {PLURAL}.{GROUP}");
    // Expired windows are shown as such once they pass, without a change.
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        let event = tokio::select! {
            e = stream.next() => match e {
                Some(e) => Some(e),
                None => return,
            },
            _ = tick.tick() => None,
        };
        match event {
            Some(Ok(watcher::Event::Init)) => listing = Some(BTreeMap::new()),
            Some(Ok(watcher::Event::InitApply(o))) => {
                if let Some(l) = listing.as_mut() {
                    let v = serde_json::to_value(&o).unwrap_or_default();
                    l.insert(o.metadata.name.clone().unwrap_or_default(), v);
                }
                continue;
            }
            Some(Ok(watcher::Event::InitDone)) => {
                objects = listing.take().unwrap_or_default();
                synced = true;
            }
            Some(Ok(watcher::Event::Apply(o))) => {
                let v = serde_json::to_value(&o).unwrap_or_default();
                objects.insert(o.metadata.name.clone().unwrap_or_default(), v);
            }
            Some(Ok(watcher::Event::Delete(o))) => {
                objects.remove(&o.metadata.name.clone().unwrap_or_default());
            }
            Some(Err(e)) => {
                warn!("cluster bridges: {e}");
                continue;
            }
            None => {}
        }
        // Before the first complete list, nothing is closed for lack of
        // its object.
        if !synced {
            continue;
        }
        let Some(states) = reconcile(&objects, &calls, &mut refused).await else {
            return;
        };
        for (object, state) in states {
            if reported.get(&object) != Some(&state) {
                match state.state {
                    "enforced" => info!("cluster bridges: {object} enforced on this node"),
                    "refused" => warn!("cluster bridges: {object} refused: {}", state.message),
                    _ => info!("cluster bridges: {object}: {}", state.message),
                }
                let expires = objects
                    .get(&object)
                    .and_then(|o| wanted(o).ok())
                    .map(|w| rfc3339_seconds(w.expires));
                if write_status(&api, &object, &node, &state, expires).await {
                    reported.insert(object, state);
                }
            }
        }
        reported.retain(|o, _| objects.contains_key(o));
    }
}

/// Objects this node refused: their spec then, why, and when.
type Refused = BTreeMap<String, (Value, NodeState, std::time::Instant)>;

/// Opens what the objects ask for and this node lacks, closes what no
/// object asks for any more; each object's state on this node. `None`
/// when the agent's loop is gone.
async fn reconcile(
    objects: &BTreeMap<String, Value>,
    calls: &mpsc::Sender<Call>,
    refused: &mut Refused,
) -> Option<BTreeMap<String, NodeState>> {
    let open = match ask(calls, Request::BridgeList).await? {
        Response::Bridges { bridges } => bridges,
        _ => Vec::new(),
    };
    let now = crate::clock::now_ns();
    let mut states = BTreeMap::new();
    let mut wanted_names = Vec::new();
    for (object, v) in objects {
        let state = match wanted(v) {
            Err(message) => NodeState {
                state: "refused",
                message,
            },
            Ok(w) if w.expires <= now => NodeState {
                state: "expired",
                message: format!("the window ended at {}", rfc3339_seconds(w.expires)),
            },
            Ok(w) => {
                wanted_names.push(w.name.clone());
                let current = open.iter().find(|b| b.bridge.name == w.name);
                let same = current.is_some_and(|b| enforces(&b.bridge, &w));
                let recent = refused
                    .get(object)
                    .filter(|(spec, _, at)| *spec == v["spec"] && at.elapsed() < RETRY_REFUSED);
                if same {
                    NodeState {
                        state: "enforced",
                        message: String::new(),
                    }
                } else if let Some((_, state, _)) = recent {
                    state.clone()
                } else {
                    if current.is_some() {
                        close(calls, &w.name).await?;
                    }
                    let state = open_bridge(calls, object, &w, now).await?;
                    if state.state == "refused" {
                        refused.insert(
                            object.clone(),
                            (v["spec"].clone(), state.clone(), std::time::Instant::now()),
                        );
                    }
                    state
                }
            }
        };
        states.insert(object.clone(), state);
    }
    refused.retain(|o, _| objects.contains_key(o));
    for b in &open {
        let name = &b.bridge.name;
        if name.starts_with(PREFIX) && !wanted_names.contains(name) && b.seconds_left > 0 {
            close(calls, name).await?;
        }
    }
    Some(states)
}

/// Whether the open bridge is what the object asks for: its route, and its
/// window. It was opened for the whole seconds left, counted from when the
/// agent's loop took it, so it ends a little after the object's (up to a
/// second, plus the loop's delay: up to 5 s is taken as the same window,
/// so a busy loop cannot make it reopen forever); a changed `duration` or
/// `expires` reopens it.
fn enforces(open: &crate::runtime::bridges::JitBridge, w: &Wanted) -> bool {
    open.from == w.from
        && open.to == w.to
        && open.ports == w.ports
        && (0..=5_000_000_000).contains(&(open.expires - w.expires))
}

async fn open_bridge(
    calls: &mpsc::Sender<Call>,
    object: &str,
    w: &Wanted,
    now: i64,
) -> Option<NodeState> {
    let secs = (w.expires - now + 999_999_999) / 1_000_000_000;
    let request = Request::BridgeOpen(OpenRequest {
        name: Some(w.name.clone()),
        from: w.from.clone(),
        to: w.to.clone(),
        ports: w.ports.clone(),
        for_secs: secs.max(1) as u64,
        reason: format!(
            "{} (BulkheadBridge {object}, requested by {})",
            w.reason, w.requested_by
        ),
        cluster: true,
    });
    Some(match ask(calls, request).await? {
        Response::BridgeOpened { .. } => NodeState {
            state: "enforced",
            message: String::new(),
        },
        Response::Error { error } => NodeState {
            state: "refused",
            message: error,
        },
        other => NodeState {
            state: "refused",
            message: format!("unexpected answer {other:?}"),
        },
    })
}

async fn close(calls: &mpsc::Sender<Call>, name: &str) -> Option<()> {
    match ask(
        calls,
        Request::BridgeClose {
            name: name.to_string(),
        },
    )
    .await?
    {
        Response::Error { error } => warn!("cluster bridges: closing {name}: {error}"),
        _ => info!("cluster bridges: {name} closed (its object is gone or changed)"),
    }
    Some(())
}

/// The merge patch that puts `node`'s line into `current`'s status (the
/// other nodes' lines kept) with the count of nodes that enforce it, on
/// the condition that the object is still at `current`'s version.
fn status_patch(current: &Value, node: &str, state: &NodeState, expires: Option<&str>) -> Value {
    let mut nodes: Vec<Value> = current["status"]["nodes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    nodes.retain(|n| n["node"] != node);
    let mut line = json!({"node": node, "state": state.state});
    if !state.message.is_empty() {
        line["message"] = state.message.clone().into();
    }
    nodes.push(line);
    nodes.sort_by(|a, b| a["node"].as_str().cmp(&b["node"].as_str()));
    let enforcing = nodes.iter().filter(|n| n["state"] == "enforced").count();
    json!({
        "metadata": {"resourceVersion": current["metadata"]["resourceVersion"]},
        "status": {"nodes": nodes, "enforcing": enforcing, "expires": expires},
    })
}

/// Puts this node's line into the object's status, and the count of nodes
/// that enforce it; read, changed and written with the object's
/// resourceVersion, so two nodes writing at once retry instead of losing
/// one another's line. Whether it was written.
async fn write_status(
    api: &Api<DynamicObject>,
    object: &str,
    node: &str,
    state: &NodeState,
    expires: Option<String>,
) -> bool {
    for _ in 0..8 {
        let current = match api.get(object).await {
            Ok(o) => serde_json::to_value(&o).unwrap_or_default(),
            Err(e) => {
                warn!("cluster bridges: reading {object}: {e}");
                return false;
            }
        };
        let patch = status_patch(&current, node, state, expires.as_deref());
        match api
            .patch_status(object, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return true,
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => {
                warn!("cluster bridges: writing the status of {object}: {e}");
                return false;
            }
        }
    }
    warn!("cluster bridges: the status of {object} kept changing under this node's write");
    false
}

/// `bulkhead bridge open --cluster`: creates the object, with who asked
/// as the API server knows the caller (SelfSubjectReview), else as this
/// host does; every node's agent then opens it. Returns the object's name.
pub fn create(b: OpenRequest) -> anyhow::Result<String> {
    use anyhow::Context as _;
    block_on(async move {
        let client = cli_client().await?;
        let who = match whoami(&client).await {
            Some(user) => user,
            None => format!(
                "{} (local user; the API server did not say who)",
                local_user()
            ),
        };
        let name = b.name.unwrap_or_else(|| {
            format!(
                "{}-{}-{}",
                b.from,
                b.to,
                crate::clock::now_ns() / 1_000_000_000
            )
        });
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": format!("{GROUP}/{VERSION}"),
            "kind": KIND,
            "metadata": {"name": name, "annotations": {REQUESTED_BY: who}},
            "spec": {"from": b.from, "to": b.to, "ports": b.ports,
                     "duration": format!("{}s", b.for_secs), "reason": b.reason},
        }))?;
        bridges_api(client)
            .create(&kube::api::PostParams::default(), &object)
            .await
            .with_context(|| format!("creating {KIND} {name}"))?;
        Ok(name)
    })
}

/// One object as `bulkhead bridge list --cluster` shows it.
#[derive(Debug, serde::Serialize)]
pub struct Listed {
    pub name: String,
    pub from: String,
    pub to: String,
    pub ports: Vec<String>,
    pub reason: String,
    pub requested_by: String,
    /// RFC 3339, whole seconds.
    pub expires: String,
    /// 0 once the window has passed.
    pub seconds_left: u64,
    /// How many nodes enforce it, and each node's line, as the nodes wrote
    /// them into the status.
    pub enforcing: u64,
    pub nodes: Vec<Value>,
    /// Set when the spec cannot be read (the other fields are then empty).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Listed {
    fn of(object: &Value, now_ns: i64) -> Listed {
        let status = &object["status"];
        let mut listed = Listed {
            name: object["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .into(),
            from: String::new(),
            to: String::new(),
            ports: Vec::new(),
            reason: String::new(),
            requested_by: String::new(),
            expires: String::new(),
            seconds_left: 0,
            enforcing: status["enforcing"].as_u64().unwrap_or(0),
            nodes: status["nodes"].as_array().cloned().unwrap_or_default(),
            error: None,
        };
        match wanted(object) {
            Ok(w) => {
                listed.expires = rfc3339_seconds(w.expires);
                listed.seconds_left =
                    (w.expires.saturating_sub(now_ns) / 1_000_000_000).max(0) as u64;
                (listed.from, listed.to, listed.ports) = (w.from, w.to, w.ports);
                (listed.reason, listed.requested_by) = (w.reason, w.requested_by);
            }
            Err(e) => listed.error = Some(e),
        }
        listed
    }
}

/// `bulkhead bridge list --cluster`: every object with its time left and
/// the nodes that enforce it (`kubectl get` can show an expiry only as an
/// instant: it prints a future time as `<invalid>`).
pub fn list() -> anyhow::Result<Vec<Listed>> {
    use anyhow::Context as _;
    block_on(async move {
        let client = cli_client().await?;
        let objects = bridges_api(client)
            .list(&kube::api::ListParams::default())
            .await
            .with_context(|| format!("listing {PLURAL}"))?;
        let now = crate::clock::now_ns();
        let mut listed: Vec<Listed> = objects
            .items
            .iter()
            .map(|o| Listed::of(&serde_json::to_value(o).unwrap_or_default(), now))
            .collect();
        listed.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(listed)
    })
}

/// `bulkhead bridge close --cluster NAME`: deletes the object; every
/// node's agent closes the bridge.
pub fn delete(name: &str) -> anyhow::Result<()> {
    use anyhow::Context as _;
    block_on(async move {
        let client = cli_client().await?;
        bridges_api(client)
            .delete(name, &kube::api::DeleteParams::default())
            .await
            .with_context(|| format!("deleting {KIND} {name}"))?;
        Ok(())
    })
}

/// The CLI's client: in-cluster service account or KUBECONFIG.
async fn cli_client() -> anyhow::Result<kube::Client> {
    use anyhow::Context as _;
    kube::Client::try_default()
        .await
        .context("no Kubernetes client (in-cluster service account or KUBECONFIG)")
}

fn bridges_api(client: kube::Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk(GROUP, VERSION, KIND);
    Api::all_with(client, &ApiResource::from_gvk_with_plural(&gvk, PLURAL))
}

fn block_on<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

/// The caller's user name as the API server authenticates it.
async fn whoami(client: &kube::Client) -> Option<String> {
    let body = serde_json::to_vec(&json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview",
    }))
    .ok()?;
    let request = http::Request::post("/apis/authentication.k8s.io/v1/selfsubjectreviews")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body)
        .ok()?;
    let review: Value = client.request(request).await.ok()?;
    review["status"]["userInfo"]["username"]
        .as_str()
        .map(str::to_string)
}

fn local_user() -> String {
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    match std::env::var("SUDO_USER").or_else(|_| std::env::var("USER")) {
        Ok(name) => format!("{name} (uid {uid})"),
        Err(_) => format!("uid {uid}"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Another node's line stays; this node's is replaced, and the count
    /// follows. (The shipped CRD's schema takes it: manifests.rs.)
    #[test]
    fn a_node_writes_its_own_line_and_the_count() {
        let current = json!({
            "metadata": {"resourceVersion": "41"},
            "status": {"nodes": [
                {"node": "b", "state": "enforced"},
                {"node": "a", "state": "refused", "message": "old"},
            ]},
        });
        let enforced = NodeState {
            state: "enforced",
            message: String::new(),
        };
        let p = status_patch(&current, "a", &enforced, Some("2026-12-05T12:00:00Z"));
        assert_eq!(p["metadata"]["resourceVersion"], "41");
        assert_eq!(
            p["status"],
            json!({"nodes": [{"node": "a", "state": "enforced"}, {"node": "b", "state": "enforced"}],
                   "enforcing": 2, "expires": "2026-12-05T12:00:00Z"})
        );
        let refused = NodeState {
            state: "refused",
            message: "too long".into(),
        };
        let p = status_patch(&current, "c", &refused, None);
        assert_eq!(p["status"]["enforcing"], 1);
        assert_eq!(
            p["status"]["nodes"][2],
            json!({"node": "c", "state": "refused", "message": "too long"})
        );
    }

    /// A window changed in the object (same route) reopens the bridge;
    /// the up-to-a-second rounding of an open one does not.
    #[test]
    fn a_bridge_enforces_its_objects_route_and_window() {
        let w = wanted(&object(json!({
            "from": "contractor", "to": "prod", "ports": ["tcp/5432"],
            "duration": "2h", "reason": "INC-1",
        })))
        .unwrap();
        let open = crate::runtime::bridges::JitBridge {
            name: w.name.clone(),
            from: w.from.clone(),
            to: w.to.clone(),
            ports: w.ports.clone(),
            opened: 0,
            expires: w.expires + 400_000_000,
            reason: String::new(),
            opened_by: crate::runtime::bridges::Opener {
                uid: 0,
                gid: 0,
                pid: 1,
            },
        };
        assert!(enforces(&open, &w));
        let longer = Wanted {
            expires: w.expires + 3_600_000_000_000,
            ..w.clone()
        };
        assert!(!enforces(&open, &longer), "a longer window reopens it");
        let other_port = Wanted {
            ports: vec!["tcp/5433".into()],
            ..w.clone()
        };
        assert!(!enforces(&open, &other_port));
    }

    pub(crate) fn sample_status() -> Value {
        let refused = NodeState {
            state: "refused",
            message: "too long".into(),
        };
        status_patch(&json!({}), "node-1", &refused, Some("2026-12-05T12:00:00Z"))["status"].clone()
    }

    fn object(spec: Value) -> Value {
        json!({
            "metadata": {"name": "db-debug", "creationTimestamp": "2026-12-05T10:00:00Z",
                         "annotations": {REQUESTED_BY: "alice@example.com"}},
            "spec": spec,
        })
    }

    #[test]
    fn a_window_is_fixed_by_the_object_not_by_when_a_node_sees_it() {
        let w = wanted(&object(json!({
            "from": "contractor", "to": "prod", "ports": ["tcp/5432"],
            "duration": "2h", "reason": "INC-1",
        })))
        .unwrap();
        assert_eq!(w.name, "k8s-db-debug");
        assert_eq!(
            w.expires,
            crate::clock::parse_ts("2026-12-05T12:00:00Z").unwrap()
        );
        assert_eq!(w.requested_by, "alice@example.com");
        let w = wanted(&object(json!({
            "from": "contractor", "to": "prod", "ports": ["tcp/5432"],
            "expires": "2026-12-05T10:30:00Z", "reason": "INC-1",
        })))
        .unwrap();
        assert_eq!(
            w.expires,
            crate::clock::parse_ts("2026-12-05T10:30:00Z").unwrap()
        );
        // Written back in whole seconds.
        assert_eq!(
            rfc3339_seconds(w.expires + 500_000_000),
            "2026-12-05T10:30:00Z"
        );
    }

    #[test]
    fn a_spec_without_a_window_or_a_reason_says_what_is_wrong() {
        let both = wanted(&object(json!({
            "from": "a", "to": "b", "ports": ["tcp/1"], "reason": "r",
            "duration": "1h", "expires": "2026-12-05T10:30:00Z",
        })));
        assert!(both.unwrap_err().contains("exactly one"));
        let no_reason = wanted(&object(json!({
            "from": "a", "to": "b", "ports": ["tcp/1"], "duration": "1h",
        })));
        assert_eq!(no_reason.unwrap_err(), "spec.reason is missing");
        let bad = wanted(&object(json!({
            "from": "a", "to": "b", "ports": ["tcp/1"], "duration": "soon", "reason": "r",
        })));
        assert!(bad.unwrap_err().starts_with("spec.duration"));
        let mut anonymous = object(json!({
            "from": "a", "to": "b", "ports": ["tcp/1"], "duration": "1h", "reason": "r",
        }));
        anonymous["metadata"]["annotations"] = json!({});
        assert_eq!(wanted(&anonymous).unwrap().requested_by, "unknown");
        // An empty name says no more (the admission policy lets it by).
        anonymous["metadata"]["annotations"] = json!({REQUESTED_BY: " "});
        assert_eq!(wanted(&anonymous).unwrap().requested_by, "unknown");
    }
}
