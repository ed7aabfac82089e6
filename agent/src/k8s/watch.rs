//! Watches the pods of one node through the API server (`kube` crate) and
//! keeps a [`PodStore`] up to date. Built only with the `k8s` cargo feature.
//!
//! The watch is a task on the agent's loop. It authenticates with the
//! pod's service account (in-cluster config) or `KUBECONFIG`, lists and
//! watches
//! `pods?fieldSelector=spec.nodeName=<node>` (RBAC: get/list/watch pods),
//! and reconnects with backoff when the API server goes away. Pods keep
//! their last known domain while it is unreachable.

use std::{sync::Arc, time::Duration};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};

use tracing::{info, warn};

use super::{PodEvent, PodInfo, PodStore, pods_from_value};

/// Watches until the agent stops (the task is dropped with the loop).
pub async fn run(node: String, store: Arc<PodStore>) {
    let client = client("pod watch").await;
    let pods: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut stream = watcher(pods, config).default_backoff().boxed();
    let mut listing: Option<Vec<PodInfo>> = None;
    info!("pod watch: watching the pods of node {node}");
    while let Some(next) = stream.next().await {
        match next {
            Ok(watcher::Event::Init) => listing = Some(Vec::new()),
            Ok(watcher::Event::InitApply(pod)) => {
                if let (Some(list), Some(info)) = (listing.as_mut(), convert(&pod)) {
                    list.push(info);
                }
            }
            Ok(watcher::Event::InitDone) => {
                let list = listing.take().unwrap_or_default();
                info!("pod watch: {} pods on node {node}", list.len());
                store.apply(PodEvent::Relisted(list));
            }
            Ok(watcher::Event::Apply(pod)) => {
                if let Some(info) = convert(&pod) {
                    store.apply(PodEvent::Applied(info));
                }
            }
            Ok(watcher::Event::Delete(pod)) => {
                if let Some(info) = convert(&pod) {
                    store.apply(PodEvent::Deleted(info));
                }
            }
            // The backoff retries; pods keep their last known state.
            Err(e) => warn!("pod watch: {e}"),
        }
    }
}

/// The in-cluster (or KUBECONFIG) client, retried with backoff until
/// there is one; `what` names the task in the warnings.
pub async fn client(what: &str) -> Client {
    let mut delay = Duration::from_secs(1);
    loop {
        match Client::try_default().await {
            Ok(c) => return c,
            Err(e) => {
                warn!(
                    "{what}: no Kubernetes client ({e}); retrying in {}s",
                    delay.as_secs()
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// Through JSON, so the watcher and the recorded fixtures share one reader.
fn convert(pod: &Pod) -> Option<PodInfo> {
    let value = match serde_json::to_value(pod) {
        Ok(v) => v,
        Err(e) => {
            warn!("pod watch: cannot serialize a pod: {e}");
            return None;
        }
    };
    match pods_from_value(&value) {
        Ok(mut pods) => pods.pop(),
        Err(e) => {
            warn!("pod watch: skipping a pod: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The k8s-openapi type reads a recorded pod and hands the same fields
    /// to the shared reader as the JSON itself.
    #[test]
    fn k8s_openapi_pods_convert_like_their_json() {
        let text = include_str!("testdata/pods/burstable-containerd.json");
        let typed: Pod = serde_json::from_str(text).unwrap();
        let via_type = convert(&typed).unwrap();
        let direct = super::super::pods_from_json(text).unwrap().pop().unwrap();
        assert_eq!(via_type, direct);
    }
}
