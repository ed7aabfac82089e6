//! Watches the pods of one node through the API server (`kube` crate) and
//! keeps a [`PodStore`] up to date. Built only with the `k8s` cargo feature.
//!
//! The agent is synchronous; the watch runs on its own thread with a
//! single-threaded tokio runtime. It authenticates with the pod's service
//! account (in-cluster config) or `KUBECONFIG`, lists and watches
//! `pods?fieldSelector=spec.nodeName=<node>` (RBAC: get/list/watch pods),
//! and reconnects with backoff when the API server goes away. Pods keep
//! their last known domain while it is unreachable.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};

use super::{PodEvent, PodInfo, PodStore, pods_from_value};

/// Where the watcher's messages go (the agent's log).
pub type Log = Box<dyn Fn(String) + Send>;

/// A running watch; dropping it does not stop it, [`Watch::stop`] does.
pub struct Watch {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<()>,
}

impl Watch {
    /// Asks the watch to end and waits for it (at most about a second).
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

/// Starts watching the pods scheduled to `node` (the DaemonSet passes
/// `spec.nodeName` as `NODE_NAME`) into `store`.
pub fn spawn(node: String, store: Arc<PodStore>, log: Log) -> std::io::Result<Watch> {
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let stop = stop.clone();
        thread::Builder::new()
            .name("k8s-pods".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        log(format!("pod watch: cannot start its runtime: {e}"));
                        return;
                    }
                };
                rt.block_on(run(&node, &store, &stop, &log));
            })?
    };
    Ok(Watch { stop, thread })
}

async fn run(node: &str, store: &PodStore, stop: &AtomicBool, log: &Log) {
    let mut delay = Duration::from_secs(1);
    let client = loop {
        match Client::try_default().await {
            Ok(c) => break c,
            Err(e) => {
                log(format!(
                    "pod watch: no Kubernetes client ({e}); retrying in {}s",
                    delay.as_secs()
                ));
                if sleep_unless_stopped(delay, stop).await {
                    return;
                }
                delay = (delay * 2).min(Duration::from_secs(60));
            }
        }
    };
    let pods: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut stream = watcher(pods, config).default_backoff().boxed();
    let mut listing: Option<Vec<PodInfo>> = None;
    log(format!("pod watch: watching the pods of node {node}"));
    while !stop.load(Ordering::Relaxed) {
        // Wake up every second to notice `stop`.
        let next = match tokio::time::timeout(Duration::from_secs(1), stream.next()).await {
            Err(_elapsed) => continue,
            Ok(None) => break,
            Ok(Some(next)) => next,
        };
        match next {
            Ok(watcher::Event::Init) => listing = Some(Vec::new()),
            Ok(watcher::Event::InitApply(pod)) => {
                if let (Some(list), Some(info)) = (listing.as_mut(), convert(&pod, log)) {
                    list.push(info);
                }
            }
            Ok(watcher::Event::InitDone) => {
                let list = listing.take().unwrap_or_default();
                log(format!("pod watch: {} pods on node {node}", list.len()));
                store.apply(PodEvent::Relisted(list));
            }
            Ok(watcher::Event::Apply(pod)) => {
                if let Some(info) = convert(&pod, log) {
                    store.apply(PodEvent::Applied(info));
                }
            }
            Ok(watcher::Event::Delete(pod)) => {
                if let Some(info) = convert(&pod, log) {
                    store.apply(PodEvent::Deleted(info));
                }
            }
            // The backoff retries; pods keep their last known state.
            Err(e) => log(format!("pod watch: {e}")),
        }
    }
}

/// Sleeps `d` in one-second steps; true when asked to stop meanwhile.
async fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) -> bool {
    let mut left = d;
    while !left.is_zero() {
        if stop.load(Ordering::Relaxed) {
            return true;
        }
        let step = left.min(Duration::from_secs(1));
        tokio::time::sleep(step).await;
        left -= step;
    }
    stop.load(Ordering::Relaxed)
}

/// Through JSON, so the watcher and the recorded fixtures share one reader.
fn convert(pod: &Pod, log: &Log) -> Option<PodInfo> {
    let value = match serde_json::to_value(pod) {
        Ok(v) => v,
        Err(e) => {
            log(format!("pod watch: cannot serialize a pod: {e}"));
            return None;
        }
    };
    match pods_from_value(&value) {
        Ok(mut pods) => pods.pop(),
        Err(e) => {
            log(format!("pod watch: skipping a pod: {e}"));
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
        let log: Log = Box::new(|m| panic!("unexpected log: {m}"));
        let via_type = convert(&typed, &log).unwrap();
        let direct = super::super::pods_from_json(text).unwrap().pop().unwrap();
        assert_eq!(via_type, direct);
    }
}
