//! The Kubernetes manifests in `deploy/kubernetes/`, checked offline: every
//! object against the Kubernetes schema (strict: unknown fields fail), the
//! policy in the ConfigMap against the agent's own checker, and the
//! DaemonSet against what the agent needs.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use serde_json::Value;

use super::schema::Schemas;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

fn schemas() -> Schemas {
    Schemas::parse(include_str!("testdata/schema/k8s-v1.30-strict.json"))
}

/// Every `*.yaml` in deploy/kubernetes/ except the kustomization, as
/// `(file name, documents)`.
fn manifests() -> Vec<(String, Vec<Value>)> {
    let mut out = Vec::new();
    for e in fs::read_dir(deploy_dir()).unwrap() {
        let path = e.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".yaml") || name == "kustomization.yaml" {
            continue;
        }
        out.push((name, yaml_docs(&path)));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = fs::read_to_string(path).unwrap();
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text)
        .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

fn find<'a>(all: &'a [(String, Vec<Value>)], kind: &str) -> &'a Value {
    let mut found = all
        .iter()
        .flat_map(|(_, d)| d)
        .filter(|d| d["kind"] == kind);
    let one = found.next().unwrap_or_else(|| panic!("no {kind}"));
    assert!(found.next().is_none(), "more than one {kind}");
    one
}

#[test]
fn k8s_manifests_validate_against_the_kubernetes_schema() {
    let schemas = schemas();
    let all = manifests();
    let mut kinds = Vec::new();
    for (file, docs) in &all {
        for doc in docs {
            let problems = schemas.validate(doc);
            assert!(
                problems.is_empty(),
                "{file}: {} {} does not validate:\n{}",
                doc["kind"],
                doc["metadata"]["name"],
                problems.join("\n")
            );
            kinds.push(doc["kind"].as_str().unwrap().to_owned());
        }
    }
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "DaemonSet",
            "Namespace",
            "Service",
            "ServiceAccount",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding"
        ]
    );
}

#[test]
fn k8s_kustomization_lists_every_manifest() {
    let k = yaml_docs(&deploy_dir().join("kustomization.yaml"));
    let mut listed: Vec<String> = k[0]["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    listed.sort();
    let files: Vec<String> = manifests().into_iter().map(|(f, _)| f).collect();
    assert_eq!(listed, files);
}

/// The validator is only worth something if it rejects what the API server
/// would: unknown fields, wrong types, missing required fields, bad enums.
#[test]
fn k8s_schema_check_rejects_broken_manifests() {
    let schemas = schemas();
    let all = manifests();
    let ds = find(&all, "DaemonSet");
    let broken = |edit: &dyn Fn(&mut Value)| {
        let mut d = ds.clone();
        edit(&mut d);
        schemas.validate(&d)
    };
    let c = "/spec/template/spec/containers/0";
    let p = broken(&|d| {
        d.pointer_mut(c).unwrap()["securityContext"]["privilegd"] = Value::Bool(false);
    });
    assert_eq!(
        p,
        [".spec.template.spec.containers[0].securityContext.privilegd: unknown field"]
    );
    let p = broken(&|d| {
        d.pointer_mut(c).unwrap()["ports"][0]["containerPort"] = "9477".into();
    });
    assert_eq!(
        p,
        [
            ".spec.template.spec.containers[0].ports[0].containerPort: expected integer, found a string"
        ]
    );
    let p = broken(&|d| {
        d.pointer_mut("/spec")
            .unwrap()
            .as_object_mut()
            .unwrap()
            .remove("selector");
    });
    assert_eq!(p, [".spec: missing required field `selector`"]);
    let p = broken(&|d| d["apiVersion"] = "apps/v1beta2".into());
    assert_eq!(
        p,
        ["no schema for apiVersion `apps/v1beta2` kind `DaemonSet` (add it to generate.py)"]
    );
    let p = broken(&|d| {
        d.pointer_mut(c).unwrap()["ports"][0]["containerPort"] = 4_294_967_296u64.into();
    });
    assert_eq!(
        p,
        [
            ".spec.template.spec.containers[0].ports[0].containerPort: 4294967296 does not fit in int32"
        ]
    );
    let p = broken(&|d| {
        let env = &mut d.pointer_mut(c).unwrap()["env"];
        let first = env[0].clone();
        env.as_array_mut().unwrap().push(first);
    });
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].contains("two entries with the same"), "{p:?}");
}

#[test]
fn k8s_pod_fixtures_are_real_pod_objects() {
    let schemas = schemas();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/k8s/testdata/pods");
    let mut n = 0;
    for e in fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        let doc: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        let problems = schemas.validate(&doc);
        assert!(
            problems.is_empty(),
            "{}:\n{}",
            path.display(),
            problems.join("\n")
        );
        n += 1;
    }
    assert!(n >= 5);
}

#[test]
fn k8s_configmap_policy_passes_the_checker() {
    let all = manifests();
    let cm = find(&all, "ConfigMap");
    let text = cm["data"]["policy.yaml"].as_str().unwrap();
    let policy = crate::policy::parse_str(Path::new("configmap.yaml:policy.yaml"), text)
        .unwrap_or_else(|d| panic!("the ConfigMap's policy is rejected:\n{d}"));
    let mount = crate::testdir::tempdir().unwrap();
    crate::compile::compile(
        &policy,
        &crate::geo::GeoDb::empty(),
        mount.path(),
        crate::compile::EventLimits { rate: 0, burst: 0 },
        0,
    )
    .unwrap();
}

/// The DaemonSet gives the agent what it needs and no more.
#[test]
fn k8s_daemonset_is_least_privilege_and_wired_to_the_agent() {
    let all = manifests();
    let ds = find(&all, "DaemonSet");
    let cm = find(&all, "ConfigMap");
    let svc = find(&all, "Service");
    let role = find(&all, "ClusterRole");
    let pod = &ds["spec"]["template"]["spec"];
    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let sc = &c["securityContext"];

    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let mut added: Vec<String> = sc["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| format!("CAP_{}", v.as_str().unwrap()))
        .collect();
    added.sort();
    // The same set as the systemd unit, found by test there.
    let unit = fs::read_to_string(deploy_dir().join("../systemd/bulkhead.service")).unwrap();
    let mut unit_caps: Vec<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .unwrap()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    unit_caps.sort();
    assert_eq!(added, unit_caps);
    assert!(!added.iter().any(|c| c == "CAP_SYS_ADMIN"));
    assert!(pod["initContainers"].is_null());

    // Host paths: cgroupfs and bpffs where the agent looks for them.
    let volumes = pod["volumes"].as_array().unwrap();
    let mounts = c["volumeMounts"].as_array().unwrap();
    let host_path = |mount_path: &str| {
        let m = mounts
            .iter()
            .find(|m| m["mountPath"] == mount_path)
            .unwrap_or_else(|| panic!("nothing mounted at {mount_path}"));
        let v = volumes.iter().find(|v| v["name"] == m["name"]).unwrap();
        (m.clone(), v["hostPath"]["path"].as_str().map(str::to_owned))
    };
    for (path, read_only) in [
        ("/sys/fs/cgroup", true),
        ("/sys/fs/bpf", false),
        ("/sys/kernel/security", true),
        ("/var/lib/bulkhead", false),
    ] {
        let (m, host) = host_path(path);
        assert_eq!(host.as_deref(), Some(path));
        assert_eq!(
            m["readOnly"].as_bool().unwrap_or(false),
            read_only,
            "{path}"
        );
        assert_ne!(m["mountPropagation"], "Bidirectional", "needs privileged");
    }

    // The policy: a directory mount of the ConfigMap (subPath mounts never
    // see updates), at the path given to --policy.
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args[0], "run");
    let policy_arg = args
        .iter()
        .find_map(|a| a.strip_prefix("--policy="))
        .unwrap();
    let (dir, file) = policy_arg.rsplit_once('/').unwrap();
    let m = mounts.iter().find(|m| m["mountPath"] == dir).unwrap();
    assert!(m["subPath"].is_null());
    let v = volumes.iter().find(|v| v["name"] == m["name"]).unwrap();
    assert_eq!(v["configMap"]["name"], cm["metadata"]["name"]);
    assert!(cm["data"][file].is_string());

    // Probes and the Service use the port --metrics-addr listens on.
    let addr: std::net::SocketAddr = args
        .iter()
        .find_map(|a| a.strip_prefix("--metrics-addr="))
        .unwrap()
        .parse()
        .unwrap();
    let port = &c["ports"][0];
    assert_eq!(port["containerPort"], addr.port());
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        assert_eq!(c[probe]["httpGet"]["path"], path);
        assert_eq!(c[probe]["httpGet"]["port"], port["name"]);
    }
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], port["name"]);
    assert_eq!(
        svc["spec"]["selector"],
        ds["spec"]["template"]["metadata"]["labels"]
    );

    // The pod watcher: read-only access to pods, the node's name.
    assert!(args.contains(&"--k8s-node=$(NODE_NAME)"), "{args:?}");
    assert_eq!(
        role["rules"],
        serde_json::json!([
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["bulkhead.dev"], "resources": ["bulkheadnodes"], "verbs": ["get", "create", "patch"]},
            {"apiGroups": ["bulkhead.dev"], "resources": ["bulkheadbridges"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["bulkhead.dev"], "resources": ["bulkheadbridges/status"], "verbs": ["get", "patch"]},
        ])
    );
    assert!(
        c["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "NODE_NAME"
                && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName")
    );
}

/// The optional init container (examples/prepare-init-container.yaml),
/// patched into the DaemonSet: a valid pod, where `bulkhead prepare` gets
/// what it needs to make the socket storage map from the node's root
/// memory cgroup (tests/tests/lifecycle.rs and the systemd VM lane run it
/// in a cgroup namespace), pinned where the agent looks for it.
#[test]
fn k8s_prepare_init_container_fits_the_daemonset() {
    let all = manifests();
    let mut ds = find(&all, "DaemonSet").clone();
    let patch = yaml_docs(&deploy_dir().join("examples/prepare-init-container.yaml"));
    let [patch] = &patch[..] else {
        panic!("one object, not {}", patch.len())
    };
    for field in ["apiVersion", "kind"] {
        assert_eq!(patch[field], ds[field]);
    }
    for field in ["name", "namespace"] {
        assert_eq!(patch["metadata"][field], ds["metadata"][field]);
    }
    let init = patch["spec"]["template"]["spec"]["initContainers"].clone();
    ds["spec"]["template"]["spec"]["initContainers"] = init.clone();
    let problems = schemas().validate(&ds);
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    let pod = &ds["spec"]["template"]["spec"];
    let agent = &pod["containers"][0];
    let [c] = init.as_array().unwrap().as_slice() else {
        panic!("one init container")
    };
    assert_eq!(c["image"], agent["image"]);
    assert_eq!(c["command"], agent["command"]);
    assert_eq!(c["args"], serde_json::json!(["prepare", "--warn-only"]));
    // PID 1's cgroup namespace is the node's only with the node's PIDs.
    assert_eq!(pod["hostPID"], true);
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let mut added: Vec<&str> = sc["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    added.sort();
    assert_eq!(added, ["BPF", "SYS_ADMIN", "SYS_PTRACE"]);
    // The API server refuses it beside CAP_SYS_ADMIN.
    assert_ne!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(
        sc["appArmorProfile"],
        agent["securityContext"]["appArmorProfile"]
    );
    // The agent's volumes at the agent's paths; the cgroup tree writable.
    let mount = |c: &Value, path: &str| {
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == path)
            .unwrap_or_else(|| panic!("nothing mounted at {path}"))
            .clone()
    };
    for path in ["/sys/fs/cgroup", "/sys/fs/bpf"] {
        assert_eq!(mount(c, path)["name"], mount(agent, path)["name"], "{path}");
    }
    assert_ne!(mount(c, "/sys/fs/cgroup")["readOnly"], true);
}

/// The kubelet updates a ConfigMap volume by writing the new files into a
/// fresh `..<timestamp>` directory and renaming a `..data` symlink over the
/// old one; `policy.yaml` is a symlink to `..data/policy.yaml`. The agent
/// polls `fs::metadata(path).modified()` (which follows symlinks) and the
/// file's hash once a second (`run.rs`); this replays the kubelet's steps
/// and shows that both change, with no moment where the file is missing.
#[test]
fn k8s_configmap_symlink_swap_is_seen_by_the_reload_stamp() {
    // What run.rs's `stamp` does.
    fn stamp(p: &Path) -> Option<SystemTime> {
        fs::metadata(p).and_then(|m| m.modified()).ok()
    }
    use std::os::unix::fs::symlink;

    let vol = crate::testdir::tempdir().unwrap();
    let v = vol.path();
    let write_version = |dir: &str, text: &str, mtime: SystemTime| {
        fs::create_dir(v.join(dir)).unwrap();
        let f = v.join(dir).join("policy.yaml");
        fs::write(&f, text).unwrap();
        fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
    };
    let old_time = SystemTime::now() - Duration::from_secs(120);
    write_version("..2026_11_24_10_00_00.1234567890", "version: 1\n", old_time);
    symlink("..2026_11_24_10_00_00.1234567890", v.join("..data")).unwrap();
    symlink("..data/policy.yaml", v.join("policy.yaml")).unwrap();
    let policy = v.join("policy.yaml");
    let before = stamp(&policy).unwrap();
    let hash_before = crate::policy::file_sha256(&policy).unwrap();

    // The update: new directory, new symlink, atomic rename, old one removed.
    write_version(
        "..2026_11_24_10_01_00.2345678901",
        "version: 1\nmode: audit\n",
        SystemTime::now(),
    );
    symlink("..2026_11_24_10_01_00.2345678901", v.join("..data_tmp")).unwrap();
    assert_eq!(
        stamp(&policy),
        Some(before),
        "nothing visible before the rename"
    );
    fs::rename(v.join("..data_tmp"), v.join("..data")).unwrap();
    let after = stamp(&policy).unwrap();
    fs::remove_dir_all(v.join("..2026_11_24_10_00_00.1234567890")).unwrap();

    assert_ne!(after, before);
    assert_eq!(stamp(&policy), Some(after));
    assert_ne!(crate::policy::file_sha256(&policy).unwrap(), hash_before);
    assert_eq!(
        fs::read_to_string(&policy).unwrap(),
        "version: 1\nmode: audit\n"
    );
}

/// A CRD's schema as the API server applies it to what is written: fields
/// it does not declare are pruned, silently; here they fail.
#[cfg(feature = "k8s")]
fn closed(schema: &Value) -> Value {
    match schema {
        Value::Object(m) => {
            let mut out: serde_json::Map<String, Value> =
                m.iter().map(|(k, v)| (k.clone(), closed(v))).collect();
            if m.contains_key("properties")
                && m.get("x-kubernetes-preserve-unknown-fields") != Some(&Value::Bool(true))
            {
                out.insert("additionalProperties".into(), Value::Bool(false));
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(closed).collect()),
        other => other.clone(),
    }
}

/// What an agent writes as its node's report is what the shipped CRD
/// declares (a field the CRD lacks would be pruned by the API server), in
/// each state of its last reload, and every printer column shows a field.
#[cfg(feature = "k8s")]
#[test]
fn k8s_node_report_is_what_the_crd_declares() {
    use crate::k8s::report;
    use crate::runtime::protocol::{LastReload, Status};
    let all = manifests();
    let crd = all
        .iter()
        .flat_map(|(_, d)| d)
        .find(|d| d["metadata"]["name"] == "bulkheadnodes.bulkhead.dev")
        .expect("the BulkheadNode CRD");
    assert_eq!(crd["spec"]["group"], report::GROUP);
    assert_eq!(crd["spec"]["names"]["kind"], report::KIND);
    assert_eq!(crd["spec"]["names"]["plural"], report::PLURAL);
    assert_eq!(crd["spec"]["scope"], "Cluster");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], report::VERSION);
    let schema = closed(&version["schema"]["openAPIV3Schema"]);
    let mut status: Status = serde_json::from_value(serde_json::json!({
        "pid": 1, "policy": "/etc/bulkhead/policy.yaml", "sha256": "ab".repeat(32),
        "mode": "enforce", "generation": 7, "running_since": "2026-12-05T10:00:00.5Z",
        "cgroup_root": "/sys/fs/cgroup", "bpffs_dir": "/sys/fs/bpf/bulkhead", "layout": "v1",
        "programs": [{"name": "bh_connect4", "hook": "connect4", "pinned": true}],
        "maps": {"cgroups": 3, "addr_words": 10, "addr_words_max": 100, "addr_classes": 2, "bridge_pairs": 1},
        "domains": ["a", "b"], "bridges": [], "decisions": [],
        "events": {"wanted": 1, "rate_limited": 0, "lost_ring_full": 0, "delivered": 1,
                   "sequence_gaps": 0, "subscribers": 0, "subscriber_drops": 0},
        "connections_cut": {"marked": 0, "destroyed": 0, "how": "x"},
        "packet_sockets": "refused", "capabilities": "CAP_BPF", "pods": null,
    }))
    .expect("a status");
    let schemas = schemas();
    for last in [
        None,
        Some(LastReload {
            at: "2026-12-05T10:01:00Z".into(),
            outcome: "applied".into(),
            errors: vec![],
        }),
        Some(LastReload {
            at: "2026-12-05T10:02:00Z".into(),
            outcome: "rejected".into(),
            errors: vec!["policy.yaml:3:5: unknown field `domian`".into()],
        }),
    ] {
        status.last_reload = last;
        let object = report::object("node-1", &report::report(&status), &status);
        let problems = schemas.check_schema(&schema, &object);
        assert!(problems.is_empty(), "{object:#}\n{}", problems.join("\n"));
        for column in version["additionalPrinterColumns"].as_array().unwrap() {
            let path = column["jsonPath"].as_str().unwrap();
            let mut v = &object;
            for part in path.trim_start_matches('.').split('.') {
                v = &v[part];
            }
            assert!(
                !v.is_null(),
                "column {} shows {path}: nothing there",
                column["name"]
            );
        }
    }
}

/// The BulkheadBridge CRD names what the agent watches, and what a node
/// writes into its status is what the CRD declares.
#[cfg(feature = "k8s")]
#[test]
fn k8s_bridge_status_is_what_the_crd_declares() {
    use crate::k8s::{bridges, report};
    let all = manifests();
    let crd = all
        .iter()
        .flat_map(|(_, d)| d)
        .find(|d| d["metadata"]["name"] == "bulkheadbridges.bulkhead.dev")
        .expect("the BulkheadBridge CRD");
    assert_eq!(crd["spec"]["group"], report::GROUP);
    assert_eq!(crd["spec"]["names"]["kind"], bridges::KIND);
    assert_eq!(crd["spec"]["names"]["plural"], bridges::PLURAL);
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], report::VERSION);
    let status = closed(&version["schema"]["openAPIV3Schema"]["properties"]["status"]);
    let sample = bridges::tests::sample_status();
    let problems = schemas().check_schema(&status, &sample);
    assert!(problems.is_empty(), "{sample:#}\n{}", problems.join("\n"));
}
