//! The node's report to the API server: one cluster-scoped `BulkheadNode`
//! object per node (deploy/kubernetes/crd-bulkheadnodes.yaml), named after
//! the node, written by that node's agent alone with server-side apply, so
//! `kubectl get bulkheadnodes` shows the fleet at a glance: the policy hash
//! and generation each node enforces, whether its last reload was rejected
//! (with the `file:line:col` errors), its version, map fill and loss
//! counters.
//!
//! The report is a `status` of its own object, not the status subresource
//! of a shared one: every node writes only its own object, and nothing else
//! writes it, so there is no spec to keep apart and no write to contend
//! with. It is written when what it says changes (checked every second) and
//! at least every [`HEARTBEAT`], so a node whose `reportedAt` falls behind
//! has a stopped or cut-off agent.

use std::time::{Duration, Instant};

use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::runtime::{
    control::Call,
    protocol::{Peer, Request, Response, Status},
};

pub const GROUP: &str = "bulkhead.dev";
pub const VERSION: &str = "v1alpha1";
pub const KIND: &str = "BulkheadNode";
pub const PLURAL: &str = "bulkheadnodes";
/// A report is written at least this often.
pub const HEARTBEAT: Duration = Duration::from_secs(60);
/// The field manager the API server records for the agent's writes.
const MANAGER: &str = "bulkhead-agent";

/// Reports the agent's state (asked of its loop, as `bulkhead status` is)
/// until the loop is gone.
pub async fn run(node: String, calls: mpsc::Sender<Call>) {
    let client = super::watch::client("node report").await;
    let gvk = GroupVersionKind::gvk(GROUP, VERSION, KIND);
    let resource = ApiResource::from_gvk_with_plural(&gvk, PLURAL);
    let api: Api<DynamicObject> = Api::all_with(client, &resource);
    let params = PatchParams::apply(MANAGER).force();
    let mut sent: Option<(Value, Instant)> = None;
    let mut failing = false;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(Response::Status(status)) = ask(&calls, Request::Status).await else {
            return;
        };
        let report = report(&status);
        let due = match &sent {
            None => true,
            Some((last, at)) => *last != report || at.elapsed() >= HEARTBEAT,
        };
        if !due {
            continue;
        }
        let object = object(&node, &report, &status);
        match api.patch(&node, &params, &Patch::Apply(&object)).await {
            Ok(_) => {
                if failing || sent.is_none() {
                    info!("node report: {KIND} {node} written");
                }
                failing = false;
                sent = Some((report, Instant::now()));
            }
            Err(e) => {
                if !failing {
                    warn!(
                        "node report: writing {KIND} {node} failed ({e}); retrying every second \
                         (is deploy/kubernetes/crd-bulkheadnodes.yaml applied, and the RBAC?)"
                    );
                }
                failing = true;
            }
        }
    }
}

/// Asks the agent's loop, as a control client does (as root, this
/// process); `None` once the loop is gone.
pub async fn ask(calls: &mpsc::Sender<Call>, request: Request) -> Option<Response> {
    let (reply, answer) = oneshot::channel();
    let call = Call {
        request,
        peer: Peer::agent(),
        reply,
    };
    calls.send(call).await.ok()?;
    answer.await.ok()
}

/// What the report says, without its time: a change of any of it is
/// written at once.
pub fn report(s: &Status) -> Value {
    let dropped: u64 = s
        .outputs
        .iter()
        .filter(|o| o.name != "followers")
        .map(|o| o.dropped.disk_full + o.dropped.io_error + o.dropped.locked + o.dropped.queue_full)
        .sum();
    let pinned = s.programs.iter().filter(|p| p.pinned).count();
    json!({
        "agentVersion": env!("CARGO_PKG_VERSION"),
        "policy": {
            "path": s.policy,
            "sha256": s.sha256,
            "generation": s.generation,
            "mode": s.mode,
        },
        "lastReload": s.last_reload.as_ref().map(|r| json!({
            "at": r.at,
            "outcome": r.outcome,
            "errors": r.errors,
        })),
        "runningSince": s.running_since,
        "programsPinned": format!("{pinned}/{}", s.programs.len()),
        "domains": s.domains.len(),
        "bridgesOpen": s.bridges.iter().filter(|b| b.open).count(),
        "maps": s.maps,
        "events": {
            "lostRingFull": s.events.lost_ring_full,
            "rateLimited": s.events.rate_limited,
            "sequenceGaps": s.events.sequence_gaps,
            "droppedByOutputs": dropped,
        },
        "packetSockets": s.packet_sockets,
    })
}

/// The object written: the report plus when, and the columns `kubectl
/// get` shows.
pub fn object(node: &str, report: &Value, s: &Status) -> Value {
    let mut status = report.clone();
    status["reportedAt"] = rfc3339_seconds(crate::clock::now_ns()).into();
    status["sha256Short"] = s.sha256.chars().take(12).collect::<String>().into();
    status["reload"] = s
        .last_reload
        .as_ref()
        .map_or("none", |r| r.outcome.as_str())
        .into();
    json!({
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "kind": KIND,
        "metadata": {
            "name": node,
            "labels": {"app.kubernetes.io/name": "bulkhead"},
        },
        "status": status,
    })
}

/// Unix ns as `2026-12-05T10:00:00Z`: whole seconds, as the objects'
/// times are written (kubectl's age column reads them).
pub(super) fn rfc3339_seconds(unix_ns: i64) -> String {
    let secs = unix_ns.div_euclid(1_000_000_000) * 1_000_000_000;
    crate::clock::format_ts(secs as u64, 0)
}
