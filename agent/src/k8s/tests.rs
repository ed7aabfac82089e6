//! Pods from recorded API objects, against cgroup trees laid out the way
//! the kubelet and the runtimes lay them out for each driver.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use super::*;

fn fixture(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("src/k8s/testdata/pods")
        .join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn pod(name: &str) -> PodInfo {
    let mut pods = pods_from_json(&fixture(name)).unwrap();
    assert_eq!(pods.len(), 1);
    pods.pop().unwrap()
}

fn cid(runtime: &str, id: &str) -> ContainerId {
    ContainerId {
        runtime: runtime.into(),
        id: id.into(),
    }
}

/// A fake cgroup v2 mount: directories only, like the real one.
struct Tree(crate::testdir::TempDir);

impl Tree {
    fn new(paths: &[&str]) -> Tree {
        let dir = crate::testdir::tempdir().unwrap();
        let t = Tree(dir);
        for p in paths {
            t.mkdir(p);
        }
        t
    }

    fn mkdir(&self, rel: &str) {
        fs::create_dir_all(self.abs(rel)).unwrap();
    }

    fn abs(&self, rel: &str) -> PathBuf {
        self.0.path().join(rel.trim_start_matches('/'))
    }

    fn id(&self, rel: &str) -> u64 {
        crate::kernel::cgroup::cgroup_id(&self.abs(rel)).unwrap()
    }

    fn mount(&self) -> &Path {
        self.0.path()
    }
}

// ---- Reading pods ----

#[test]
fn k8s_reads_a_burstable_containerd_pod() {
    let p = pod("burstable-containerd.json");
    assert_eq!(p.namespace, "contractor-acme");
    assert_eq!(p.name, "ci-runner-7d9f8b6c5d-x2x7p");
    assert_eq!(p.uid, "6b1f3c2e-8a4d-4f5e-9b7a-2c1d0e3f4a5b");
    assert_eq!(p.qos, Qos::Burstable);
    assert_eq!(p.node.as_deref(), Some("worker-1"));
    assert_eq!(p.phase.as_deref(), Some("Running"));
    assert_eq!(p.labels["team"], "acme");
    assert_eq!(p.labels["app"], "ci-runner");
    // Init containers first, then the others in status order.
    assert_eq!(
        p.containers,
        [
            cid(
                "containerd",
                "c4e1a7b3d9f5e2c8a6b4d0f2e8c6a4b2d0f8e6c4a2b0d8f6e4c2a0b8d6f4e2c0"
            ),
            cid(
                "containerd",
                "8a7c0e5d3b1f9e2d4c6a8b0f2e4d6c8a0b2d4f6e8a0c2e4d6b8f0a2c4e6d8b0f"
            ),
            cid(
                "containerd",
                "3f5a9c1e7b2d4f6a8c0e2b4d6f8a0c2e4b6d8f0a2c4e6b8d0f2a4c6e8b0d2f4a"
            ),
        ]
    );
}

#[test]
fn k8s_reads_qos_classes_runtimes_and_static_pods() {
    let g = pod("guaranteed-containerd.json");
    assert_eq!((g.qos, g.containers.len()), (Qos::Guaranteed, 1));
    let b = pod("besteffort-crio.json");
    assert_eq!(b.qos, Qos::BestEffort);
    assert_eq!(b.containers[0].runtime, "cri-o");
    // A static pod's cgroup carries the kubelet's UID (the config hash),
    // not the mirror pod's metadata.uid.
    let s = pod("static-mirror.json");
    assert_eq!(s.uid, "0e9a2f4c5d6b7a8e9f0a1b2c3d4e5f6a");
    assert_eq!(
        (s.namespace.as_str(), s.qos),
        ("kube-system", Qos::Burstable)
    );
    // Scheduled, not started: no container ids yet.
    let p = pod("pending.json");
    assert_eq!(p.phase.as_deref(), Some("Pending"));
    assert!(p.containers.is_empty());
}

#[test]
fn k8s_reads_pod_lists() {
    let pods = pods_from_json(&fixture("podlist-worker-1.json")).unwrap();
    let names: Vec<&str> = pods.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        ["ci-runner-7d9f8b6c5d-x2x7p", "ci-runner-7d9f8b6c5d-q8v4z"]
    );
    // `kubectl get pods -o json` says `List`, with kinds on the items.
    let list = format!(
        r#"{{"apiVersion":"v1","kind":"List","metadata":{{"resourceVersion":""}},"items":[{}]}}"#,
        fixture("besteffort-crio.json")
    );
    assert_eq!(pods_from_json(&list).unwrap()[0].name, "debug-shell");
    assert_eq!(
        pods_from_json(r#"{"kind":"Node","metadata":{"name":"worker-1"}}"#),
        Err(PodError::Kind("Node".into()))
    );
}

#[test]
fn k8s_qos_falls_back_to_the_kubelets_rule() {
    let without_class = |name: &str| {
        let mut v: serde_json::Value = serde_json::from_str(&fixture(name)).unwrap();
        v["status"].as_object_mut().unwrap().remove("qosClass");
        pods_from_value(&v).unwrap().pop().unwrap().qos
    };
    assert_eq!(without_class("guaranteed-containerd.json"), Qos::Guaranteed);
    assert_eq!(without_class("burstable-containerd.json"), Qos::Burstable);
    assert_eq!(without_class("besteffort-crio.json"), Qos::BestEffort);
    assert_eq!(without_class("static-mirror.json"), Qos::Burstable);
}

#[test]
fn k8s_refuses_what_cannot_name_a_cgroup() {
    let mut v: serde_json::Value = serde_json::from_str(&fixture("besteffort-crio.json")).unwrap();
    v["metadata"]["uid"] = "../../system.slice".into();
    let e = pods_from_value(&v).unwrap_err();
    assert_eq!(
        e.to_string(),
        "pod core-staging/debug-shell: unusable uid `../../system.slice`"
    );
    let mut v: serde_json::Value = serde_json::from_str(&fixture("static-mirror.json")).unwrap();
    v["metadata"]["annotations"]
        .as_object_mut()
        .unwrap()
        .remove(pod::CONFIG_HASH);
    assert!(pods_from_value(&v).is_err());
    assert_eq!(ContainerId::parse("containerd://../x"), None);
    assert_eq!(ContainerId::parse("containerd://"), None);
    assert_eq!(ContainerId::parse("abc"), None);
    assert!(pods_from_json("{").is_err());
}

// ---- Cgroup paths ----

const UID: &str = "6b1f3c2e-8a4d-4f5e-9b7a-2c1d0e3f4a5b";

#[test]
fn k8s_pod_paths_for_both_drivers() {
    let sd = Layout::new(Driver::Systemd, "/");
    let fs = Layout::new(Driver::Cgroupfs, "/");
    let u = "6b1f3c2e_8a4d_4f5e_9b7a_2c1d0e3f4a5b";
    assert_eq!(
        sd.pod_path(Qos::Burstable, UID),
        format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice")
    );
    assert_eq!(
        sd.pod_path(Qos::BestEffort, UID),
        format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice")
    );
    assert_eq!(
        sd.pod_path(Qos::Guaranteed, UID),
        format!("/kubepods.slice/kubepods-pod{u}.slice")
    );
    assert_eq!(
        fs.pod_path(Qos::Burstable, UID),
        format!("/kubepods/burstable/pod{UID}")
    );
    assert_eq!(
        fs.pod_path(Qos::BestEffort, UID),
        format!("/kubepods/besteffort/pod{UID}")
    );
    assert_eq!(
        fs.pod_path(Qos::Guaranteed, UID),
        format!("/kubepods/pod{UID}")
    );
    // kind's kubelet runs with --cgroup-root=/kubelet.
    assert_eq!(
        Layout::new(Driver::Systemd, "/kubelet").pod_path(Qos::Burstable, UID),
        format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{u}.slice"
        )
    );
    assert_eq!(
        Layout::new(Driver::Cgroupfs, "/kubelet").pod_path(Qos::Guaranteed, UID),
        format!("/kubelet/kubepods/pod{UID}")
    );
}

#[test]
fn k8s_container_paths_per_runtime() {
    let sd = Layout::new(Driver::Systemd, "/");
    let fs = Layout::new(Driver::Cgroupfs, "/");
    let u = "6b1f3c2e_8a4d_4f5e_9b7a_2c1d0e3f4a5b";
    let pod_sd =
        format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice");
    let pod_fs = format!("/kubepods/burstable/pod{UID}");
    let q = Qos::Burstable;
    assert_eq!(
        sd.container_path(q, UID, &cid("containerd", "abc")),
        format!("{pod_sd}/cri-containerd-abc.scope")
    );
    assert_eq!(
        sd.container_path(q, UID, &cid("cri-o", "abc")),
        format!("{pod_sd}/crio-abc.scope")
    );
    assert_eq!(
        sd.container_path(q, UID, &cid("docker", "abc")),
        format!("{pod_sd}/docker-abc.scope")
    );
    assert_eq!(
        fs.container_path(q, UID, &cid("containerd", "abc")),
        format!("{pod_fs}/abc")
    );
    assert_eq!(
        fs.container_path(q, UID, &cid("cri-o", "abc")),
        format!("{pod_fs}/crio-abc")
    );
    assert_eq!(
        fs.container_path(q, UID, &cid("docker", "abc")),
        format!("{pod_fs}/abc")
    );
}

/// A node with the systemd driver and containerd, as on a kubeadm node:
/// the kubelet's slices, the sandbox and container scopes, and the host's
/// own slices around them.
fn systemd_node(pods: &[&PodInfo]) -> Tree {
    let t = Tree::new(&[
        "/init.scope",
        "/system.slice/containerd.service",
        "/system.slice/kubelet.service",
        "/user.slice/user-1000.slice/session-3.scope",
        "/kubepods.slice/kubepods-burstable.slice",
        "/kubepods.slice/kubepods-besteffort.slice",
    ]);
    let sd = Layout::new(Driver::Systemd, "/");
    for p in pods {
        let pod_path = sd.pod_path(p.qos, &p.uid);
        // The sandbox (pause) container: an id no status reports.
        t.mkdir(&format!(
            "{pod_path}/cri-containerd-0d1c2b3a4f5e6d7c8b9a0f1e2d3c4b5a6f7e8d9c0b1a2f3e4d5c6b7a8f9e0d1c.scope"
        ));
        for c in &p.containers {
            t.mkdir(&sd.container_path(p.qos, &p.uid, c));
        }
    }
    t
}

/// A node with the cgroupfs driver (containerd with SystemdCgroup=false).
fn cgroupfs_node(pods: &[&PodInfo]) -> Tree {
    let t = Tree::new(&[
        "/init.scope",
        "/system.slice/containerd.service",
        "/kubepods/burstable",
        "/kubepods/besteffort",
    ]);
    let fs = Layout::new(Driver::Cgroupfs, "/");
    for p in pods {
        let pod_path = fs.pod_path(p.qos, &p.uid);
        t.mkdir(&format!(
            "{pod_path}/0d1c2b3a4f5e6d7c8b9a0f1e2d3c4b5a6f7e8d9c0b1a2f3e4d5c6b7a8f9e0d1c"
        ));
        for c in &p.containers {
            t.mkdir(&fs.container_path(p.qos, &p.uid, c));
        }
    }
    t
}

#[test]
fn k8s_detects_the_node_layout() {
    let t = systemd_node(&[]);
    assert_eq!(detect(t.mount()), [Layout::new(Driver::Systemd, "/")]);
    let t = cgroupfs_node(&[]);
    assert_eq!(detect(t.mount()), [Layout::new(Driver::Cgroupfs, "/")]);
    // kind: kubelet --cgroup-root=/kubelet, systemd driver.
    let t = Tree::new(&[
        "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice",
        "/system.slice/containerd.service",
    ]);
    assert_eq!(
        detect(t.mount()),
        [Layout::new(Driver::Systemd, "/kubelet")]
    );
    // Not the kubelet's: a slice that merely ends in kubepods, a plain host.
    let t = Tree::new(&["/x.slice/foo-kubepods.slice", "/system.slice/sshd.service"]);
    assert_eq!(detect(t.mount()), []);
}

#[test]
fn k8s_locates_pods_under_the_systemd_driver() {
    let (b, g, e, s) = (
        pod("burstable-containerd.json"),
        pod("guaranteed-containerd.json"),
        pod("besteffort-crio.json"),
        pod("static-mirror.json"),
    );
    let t = systemd_node(&[&b, &g, &s]);
    // CRI-O on a systemd node uses crio-<id>.scope.
    let sd = Layout::new(Driver::Systemd, "/");
    t.mkdir(&sd.container_path(e.qos, &e.uid, &e.containers[0]));
    let layouts = detect(t.mount());

    let found = locate(t.mount(), &layouts, &b).unwrap();
    let pod_path = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod6b1f3c2e_8a4d_4f5e_9b7a_2c1d0e3f4a5b.slice";
    assert_eq!(found.path, pod_path);
    assert_eq!(found.id, t.id(pod_path));
    assert_eq!(found.layout, sd);
    assert_eq!(found.containers.len(), 3);
    assert_eq!(
        found.containers[2].0,
        format!(
            "{pod_path}/cri-containerd-3f5a9c1e7b2d4f6a8c0e2b4d6f8a0c2e4b6d8f0a2c4e6b8d0f2a4c6e8b0d2f4a.scope"
        )
    );

    let found = locate(t.mount(), &layouts, &g).unwrap();
    assert_eq!(
        found.path,
        "/kubepods.slice/kubepods-podd2f4a6c8_0e1b_4d3f_a5c7_e9b1d3f5a7c9.slice"
    );
    let found = locate(t.mount(), &layouts, &e).unwrap();
    assert_eq!(
        found.containers[0].0,
        "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod41c9e0a2_5b7d_4f13_8e6a_9d2c4b0f7a31.slice/crio-b81d5e4f2a9c3d7e6f0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e.scope"
    );
    let found = locate(t.mount(), &layouts, &s).unwrap();
    assert_eq!(
        found.path,
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0e9a2f4c5d6b7a8e9f0a1b2c3d4e5f6a.slice"
    );
    // Scheduled but not started: no cgroup yet.
    assert_eq!(locate(t.mount(), &layouts, &pod("pending.json")), None);
}

#[test]
fn k8s_locates_pods_under_the_cgroupfs_driver() {
    let (b, g, e) = (
        pod("burstable-containerd.json"),
        pod("guaranteed-containerd.json"),
        pod("besteffort-crio.json"),
    );
    let t = cgroupfs_node(&[&b, &g, &e]);
    let layouts = detect(t.mount());
    let found = locate(t.mount(), &layouts, &b).unwrap();
    assert_eq!(found.path, format!("/kubepods/burstable/pod{UID}"));
    assert_eq!(found.id, t.id(&found.path));
    assert_eq!(
        found.containers[1].0,
        format!(
            "/kubepods/burstable/pod{UID}/8a7c0e5d3b1f9e2d4c6a8b0f2e4d6c8a0b2d4f6e8a0c2e4d6b8f0a2c4e6d8b0f"
        )
    );
    let found = locate(t.mount(), &layouts, &g).unwrap();
    assert_eq!(
        found.path,
        "/kubepods/podd2f4a6c8-0e1b-4d3f-a5c7-e9b1d3f5a7c9"
    );
    let found = locate(t.mount(), &layouts, &e).unwrap();
    assert_eq!(
        found.containers[0].0,
        "/kubepods/besteffort/pod41c9e0a2-5b7d-4f13-8e6a-9d2c4b0f7a31/crio-b81d5e4f2a9c3d7e6f0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e"
    );
    // The other driver's path does not exist here.
    assert_eq!(
        locate(t.mount(), &[Layout::new(Driver::Systemd, "/")], &b),
        None
    );
}

// ---- Selectors ----

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn k8s_selectors_match_like_kubernetes_label_selectors() {
    let b = pod("burstable-containerd.json");
    let by_ns = PodSelector {
        namespaces: vec!["contractor-acme".into()],
        ..Default::default()
    };
    assert!(by_ns.matches(&b));
    let by_label = PodSelector {
        namespaces: vec!["contractor-acme".into(), "ci".into()],
        match_labels: labels(&[("team", "acme")]),
        ..Default::default()
    };
    assert!(by_label.matches(&b));
    // Labels alone select nothing: whoever creates a pod picks its labels.
    let label_only = PodSelector {
        match_labels: labels(&[("team", "acme")]),
        ..Default::default()
    };
    assert!(!label_only.matches(&b));
    let both_wrong_ns = PodSelector {
        namespaces: vec!["production".into()],
        match_labels: labels(&[("team", "acme")]),
        ..Default::default()
    };
    assert!(!both_wrong_ns.matches(&b));
    let req = |key: &str, operator, values: &[&str]| PodSelector {
        namespaces: vec!["contractor-acme".into()],
        match_expressions: vec![Requirement {
            key: key.into(),
            operator,
            values: values.iter().map(|v| (*v).to_owned()).collect(),
        }],
        ..Default::default()
    };
    assert!(req("team", Operator::In, &["acme", "globex"]).matches(&b));
    assert!(!req("team", Operator::NotIn, &["acme"]).matches(&b));
    assert!(req("tier", Operator::NotIn, &["production"]).matches(&b));
    assert!(req("app", Operator::Exists, &[]).matches(&b));
    assert!(!req("app", Operator::DoesNotExist, &[]).matches(&b));
    assert!(!req("tier", Operator::In, &["production"]).matches(&b));
    // An empty selector selects nothing.
    assert!(!PodSelector::default().matches(&b));
}

#[test]
fn k8s_assigns_matched_pods_to_domains_by_cgroup() {
    let (b, g, e, p) = (
        pod("burstable-containerd.json"),
        pod("guaranteed-containerd.json"),
        pod("besteffort-crio.json"),
        pod("pending.json"),
    );
    let t = systemd_node(&[&b, &g]);
    let layouts = detect(t.mount());
    let contractor = PodSelector {
        namespaces: vec!["contractor-acme".into()],
        ..Default::default()
    };
    // (Also listing contractor-acme, so that a relabelled contractor pod
    // below shows the conflict rule.)
    let production = PodSelector {
        namespaces: vec!["production".into(), "contractor-acme".into()],
        match_labels: labels(&[("tier", "production")]),
        ..Default::default()
    };
    let selectors = [(0, contractor), (2, production)];
    let pods = [b.clone(), g.clone(), e.clone(), p.clone()];
    let got = assign(&selectors, &pods, t.mount(), &layouts);
    let b_path = layouts[0].pod_path(b.qos, &b.uid);
    let g_path = layouts[0].pod_path(g.qos, &g.uid);
    assert_eq!(
        got.assigned,
        [
            Assignment {
                domain: 0,
                pod: "contractor-acme/ci-runner-7d9f8b6c5d-x2x7p".into(),
                uid: b.uid.clone(),
                cgroup_id: t.id(&b_path),
                cgroup: b_path,
            },
            Assignment {
                domain: 2,
                pod: "production/payments-api-0".into(),
                uid: g.uid.clone(),
                cgroup_id: t.id(&g_path),
                cgroup: g_path,
            },
        ]
    );
    assert_eq!(
        got.cgroup_entries(),
        [
            (
                t.id(&layouts[0].pod_path(b.qos, &b.uid)),
                1,
                layouts[0].pod_path(b.qos, &b.uid)
            ),
            (
                t.id(&layouts[0].pod_path(g.qos, &g.uid)),
                3,
                layouts[0].pod_path(g.qos, &g.uid)
            ),
        ]
    );
    // The pending contractor pod has no cgroup yet; core-staging's pod
    // matches no selector.
    assert_eq!(got.pending, ["contractor-acme/ci-runner-7d9f8b6c5d-q8v4z"]);
    assert!(got.conflicts.is_empty());

    // Finished pods have no cgroup and never will.
    let mut done = p.clone();
    done.phase = Some("Succeeded".into());
    let got = assign(&selectors, &[done], t.mount(), &layouts);
    assert_eq!(got, Assignments::default());

    // A pod two domains claim gets neither.
    let mut labelled = b.clone();
    labelled.labels.insert("tier".into(), "production".into());
    let got = assign(&selectors, &[labelled], t.mount(), &layouts);
    assert!(got.assigned.is_empty());
    assert_eq!(
        got.conflicts,
        [(
            "contractor-acme/ci-runner-7d9f8b6c5d-x2x7p".to_owned(),
            vec![0, 2]
        )]
    );
}

// ---- The store the watcher fills ----

#[test]
fn k8s_pod_store_follows_watch_events() {
    let store = PodStore::new();
    assert!(!store.synced());
    let (b, g, e) = (
        pod("burstable-containerd.json"),
        pod("guaranteed-containerd.json"),
        pod("besteffort-crio.json"),
    );
    store.apply(PodEvent::Applied(e.clone()));
    store.apply(PodEvent::Relisted(vec![g.clone(), b.clone()]));
    assert!(store.synced());
    let (v1, pods) = store.snapshot();
    // The relist replaced everything; order is namespace/name.
    assert_eq!(pods, [b.clone(), g.clone()]);
    let mut relabelled = b.clone();
    relabelled.labels.insert("team".into(), "globex".into());
    store.apply(PodEvent::Applied(relabelled.clone()));
    store.apply(PodEvent::Deleted(g));
    let (v2, pods) = store.snapshot();
    assert!(v2 > v1);
    assert_eq!(pods, [relabelled]);
    assert_eq!(store.version(), v2);
}

#[test]
fn selectors_print_as_bulkhead_check_shows_them() {
    let s = PodSelector {
        namespaces: vec!["acme".into(), "ci".into()],
        match_labels: [("team".to_string(), "acme".to_string())].into(),
        match_expressions: vec![
            Requirement {
                key: "tier".into(),
                operator: Operator::In,
                values: vec!["staging".into(), "qa".into()],
            },
            Requirement {
                key: "legacy".into(),
                operator: Operator::DoesNotExist,
                values: Vec::new(),
            },
        ],
    };
    assert_eq!(
        s.to_string(),
        "namespaces acme, ci; team=acme; tier In (staging, qa); legacy DoesNotExist"
    );
}
