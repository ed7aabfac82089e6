//! Kubernetes pods placed in domains by namespace and labels, end to end:
//! the real agent (built with the `k8s` feature) watches a node's pods
//! through the `kube` client, against a small API server on loopback that
//! serves recorded-shape pod objects (list, then a watch stream); the pods'
//! cgroups are laid out as the kubelet's cgroupfs driver does, below the
//! test's own cgroup; real sockets decide whether a pod got its domain.
//!
//! The policy: pods of namespace `acme` labelled `team: acme` are domain
//! `contractor`, which has a bridge to `prod` on tcp/8080. Every other pod
//! stays in domain `pods` (the kubelet's `kubepods` cgroup, by path), which
//! has none. So a connect from a pod to prod:8080 succeeds exactly when the
//! agent placed the pod.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{TcpListener, TcpStream},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use tests::{
    Agent, Cgroup, Server, Value,
    gaps::{Guards, Rng},
    helper_python, privileged, probe,
    world::world,
};

/// What the fake API server knows: every pod change in order. The list is
/// the state after all of them (resourceVersion = their count + 1); a
/// watch from resourceVersion N streams the changes after N.
#[derive(Default)]
struct ApiState {
    /// `(type, pod)`: ADDED, MODIFIED, DELETED.
    changes: Vec<(&'static str, Value)>,
    /// `BulkheadNode` objects the agents applied, in order: `(request
    /// line, content type, object)`.
    applied: Vec<(String, String, Value)>,
    /// `BulkheadBridge` changes, as `changes` for pods.
    bridge_changes: Vec<(&'static str, Value)>,
    /// Each bridge object's status as the agents wrote it, and its
    /// resourceVersion (bumped by every status write).
    bridge_status: std::collections::BTreeMap<String, (u64, Value)>,
}

/// The state after `changes`, keyed by uid.
fn current(changes: &[(&'static str, Value)]) -> Vec<Value> {
    let mut objects: Vec<Value> = Vec::new();
    for (kind, o) in changes {
        objects.retain(|p| p["metadata"]["uid"] != o["metadata"]["uid"]);
        if *kind != "DELETED" {
            objects.push(o.clone());
        }
    }
    objects
}

impl ApiState {
    /// A bridge object as a GET returns it: with its status and version.
    fn bridge(&self, name: &str) -> Option<Value> {
        let mut o = current(&self.bridge_changes)
            .into_iter()
            .find(|o| o["metadata"]["name"] == name)?;
        let (rv, status) = self
            .bridge_status
            .get(name)
            .cloned()
            .unwrap_or((1, Value::Null));
        o["metadata"]["resourceVersion"] = rv.to_string().into();
        if !status.is_null() {
            o["status"] = status;
        }
        Some(o)
    }
}

const BRIDGES: &str = "/apis/bulkhead.dev/v1alpha1/bulkheadbridges";

struct FakeApi {
    state: Arc<Mutex<ApiState>>,
    port: u16,
    /// Requests seen, for failure messages.
    log: Arc<Mutex<Vec<String>>>,
}

impl FakeApi {
    fn start() -> FakeApi {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(ApiState::default()));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (st, lg) = (state.clone(), log.clone());
        thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (st, lg) = (st.clone(), lg.clone());
                thread::spawn(move || serve(conn, &st, &lg));
            }
        });
        FakeApi { state, port, log }
    }

    fn change(&self, kind: &'static str, pod: Value) {
        self.state.lock().unwrap().changes.push((kind, pod));
    }

    fn bridge_change(&self, kind: &'static str, bridge: Value) {
        self.state
            .lock()
            .unwrap()
            .bridge_changes
            .push((kind, bridge));
    }

    fn bridge_status(&self, name: &str) -> Value {
        let s = self.state.lock().unwrap();
        s.bridge_status
            .get(name)
            .map_or(Value::Null, |(_, v)| v.clone())
    }

    fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://127.0.0.1:{}\"}}\n\
                 users:\n- name: agent\n  user: {{token: test-token}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: agent}}\n\
                 current-context: fake\n",
                self.port
            ),
        )
        .unwrap();
        path
    }
}

/// One connection: `GET /api/v1/pods?...` answered with a PodList, or with
/// `watch=true` a chunked stream of watch events until the client leaves
/// (or 60 s, so no thread outlives the test by much).
fn serve(conn: TcpStream, state: &Mutex<ApiState>, log: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    loop {
        let mut request = String::new();
        if reader.read_line(&mut request).unwrap_or(0) == 0 {
            return;
        }
        let (mut length, mut content_type) = (0usize, String::new());
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                break;
            }
            let (name, value) = header.split_once(':').unwrap_or(("", ""));
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().unwrap_or(0),
                "content-type" => content_type = value.trim().to_string(),
                _ => {}
            }
        }
        let mut body = vec![0u8; length];
        if std::io::Read::read_exact(&mut reader, &mut body).is_err() {
            return;
        }
        log.lock().unwrap().push(request.trim().to_string());
        let target = request.split_whitespace().nth(1).unwrap_or("").to_string();
        let query = target.split_once('?').map_or("", |(_, q)| q).to_string();
        let param = |name: &str| {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                .map(str::to_owned)
        };
        // Server-side apply of a node's report: kept, and answered with
        // the object as stored.
        if request.starts_with("PATCH /apis/bulkhead.dev/v1alpha1/bulkheadnodes/") {
            let mut object: Value = serde_json::from_slice(&body).unwrap_or_default();
            let rv = {
                let mut s = state.lock().unwrap();
                s.applied
                    .push((request.trim().to_string(), content_type, object.clone()));
                s.applied.len()
            };
            object["metadata"]["resourceVersion"] = rv.to_string().into();
            object["metadata"]["uid"] = "5b1d0a2e-0000-4000-8000-000000000001".into();
            let body = object.to_string();
            if !respond_json(&mut conn, &body) {
                return;
            }
            continue;
        }
        let path = target.split('?').next().unwrap_or("");
        // Who the caller is (`bridge open --cluster` asks): the token's user.
        if request.starts_with("POST /apis/authentication.k8s.io/v1/selfsubjectreviews") {
            let review = serde_json::json!({"apiVersion": "authentication.k8s.io/v1",
                "kind": "SelfSubjectReview", "status": {"userInfo": {"username": "alice@example.com"}}});
            if !respond_json(&mut conn, &review.to_string()) {
                return;
            }
            continue;
        }
        // `bridge open --cluster` creates an object; the watchers see it.
        if request.starts_with("POST ") && path == BRIDGES {
            let mut object: Value = serde_json::from_slice(&body).unwrap_or_default();
            let mut s = state.lock().unwrap();
            object["metadata"]["uid"] =
                format!("00000000-0000-4000-8000-{:012}", s.bridge_changes.len()).into();
            object["metadata"]["creationTimestamp"] = time_now_rfc3339().into();
            s.bridge_changes.push(("ADDED", object.clone()));
            drop(s);
            if !respond_json(&mut conn, &object.to_string()) {
                return;
            }
            continue;
        }
        // A bridge object, and its status written by the agents: a merge
        // patch on the condition of the object's resourceVersion.
        if let Some(rest) = path.strip_prefix(BRIDGES).and_then(|r| r.strip_prefix('/')) {
            let (name, sub) = rest.split_once('/').unwrap_or((rest, ""));
            let mut s = state.lock().unwrap();
            let Some(object) = s.bridge(name) else {
                drop(s);
                let _ = conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
                continue;
            };
            let answer = if request.starts_with("DELETE") {
                s.bridge_changes.push(("DELETED", object.clone()));
                object
            } else if request.starts_with("PATCH") && sub == "status" {
                let patch: Value = serde_json::from_slice(&body).unwrap_or_default();
                if patch["metadata"]["resourceVersion"] != object["metadata"]["resourceVersion"] {
                    drop(s);
                    let conflict = serde_json::json!({"kind": "Status", "apiVersion": "v1",
                        "status": "Failure", "reason": "Conflict", "code": 409,
                        "message": "the object has been modified"})
                    .to_string();
                    let head = format!(
                        "HTTP/1.1 409 Conflict\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                        conflict.len()
                    );
                    let _ = conn.write_all(head.as_bytes());
                    let _ = conn.write_all(conflict.as_bytes());
                    continue;
                }
                let rv = s.bridge_status.get(name).map_or(1, |(rv, _)| *rv) + 1;
                s.bridge_status
                    .insert(name.to_string(), (rv, patch["status"].clone()));
                s.bridge(name).unwrap()
            } else {
                object
            };
            drop(s);
            if !respond_json(&mut conn, &answer.to_string()) {
                return;
            }
            continue;
        }
        let bridges = path == BRIDGES;
        if !target.starts_with("/api/v1/pods") && !bridges {
            let _ = conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
            continue;
        }
        let changes_of = |s: &ApiState| -> Vec<(&'static str, Value)> {
            if bridges {
                s.bridge_changes.clone()
            } else {
                s.changes.clone()
            }
        };
        if param("watch").as_deref() != Some("true") {
            let (items, rv) = {
                let s = state.lock().unwrap();
                let changes = changes_of(&s);
                let mut items = current(&changes);
                if bridges {
                    // As a GET has them: with their status.
                    items = items
                        .iter()
                        .map(|o| s.bridge(o["metadata"]["name"].as_str().unwrap()).unwrap())
                        .collect();
                }
                (items, changes.len() + 1)
            };
            let kind = if bridges {
                "BulkheadBridgeList"
            } else {
                "PodList"
            };
            let api_version = if bridges {
                "bulkhead.dev/v1alpha1"
            } else {
                "v1"
            };
            let body = serde_json::json!({
                "kind": kind, "apiVersion": api_version,
                "metadata": {"resourceVersion": rv.to_string()},
                "items": items,
            })
            .to_string();
            if !respond_json(&mut conn, &body) {
                return;
            }
            continue;
        }
        let mut sent: usize = param("resourceVersion")
            .and_then(|v| v.parse::<usize>().ok())
            .map_or(0, |v| v.saturating_sub(1));
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
        if conn.write_all(head.as_bytes()).is_err() {
            return;
        }
        let until = Instant::now() + Duration::from_secs(60);
        while Instant::now() < until {
            let next: Vec<String> = {
                let s = state.lock().unwrap();
                let changes = changes_of(&s);
                changes[sent.min(changes.len())..]
                    .iter()
                    .enumerate()
                    .map(|(i, (kind, pod))| {
                        let mut pod = pod.clone();
                        pod["metadata"]["resourceVersion"] = (sent + i + 2).to_string().into();
                        format!("{}\n", serde_json::json!({"type": kind, "object": pod}))
                    })
                    .collect()
            };
            for line in &next {
                let chunk = format!("{:x}\r\n{line}\r\n", line.len());
                if conn.write_all(chunk.as_bytes()).is_err() {
                    return;
                }
            }
            sent += next.len();
            thread::sleep(Duration::from_millis(20));
        }
        let _ = conn.write_all(b"0\r\n\r\n");
        return;
    }
}

/// A `200 OK` with a JSON body; false when the client is gone.
fn respond_json(conn: &mut TcpStream, body: &str) -> bool {
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).is_ok() && conn.write_all(body.as_bytes()).is_ok()
}

fn pod(namespace: &str, name: &str, uid: &str, labels: Value) -> Value {
    pod_on(namespace, name, uid, labels, "cri-o")
}

/// A pod whose container runs under `runtime` (`cri-o`, `containerd`).
fn pod_on(namespace: &str, name: &str, uid: &str, labels: Value, runtime: &str) -> Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": uid, "labels": labels},
        "spec": {"nodeName": "node-1", "containers": [{"name": "app", "image": "app:1"}]},
        "status": {
            "phase": "Running",
            "qosClass": "BestEffort",
            "containerStatuses": [{"name": "app", "containerID": format!("{runtime}://{}", uid.replace('-', "")),
                                   "ready": true, "restartCount": 0, "image": "app:1", "imageID": ""}],
        },
    })
}

/// A pod's cgroup as the kubelet's cgroupfs driver makes it below
/// `kubelet_root` (`--cgroup-root`), with one CRI-O container inside,
/// where its processes run.
struct PodCgroup {
    container: Cgroup,
    /// Removes the pod's cgroup (after the container's) on drop.
    _pod: Cgroup,
}

fn pod_cgroup(kubelet_root: &Cgroup, uid: &str) -> PodCgroup {
    let pod = kubelet_root.child(&format!("kubepods/besteffort/pod{uid}"));
    PodCgroup {
        container: pod.child(&format!("crio-{}", uid.replace('-', ""))),
        _pod: pod,
    }
}

fn status(agent: &Agent) -> Value {
    let out = agent.cli(&["status", "--json"]);
    assert!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Waits (bounded) until the agent's `status` satisfies `pred`.
fn wait_status(agent: &Agent, api: &FakeApi, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20 + tests::slack_secs());
    loop {
        let s = status(agent);
        if pred(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; pods status: {:#}\nAPI requests: {:#?}",
            s["pods"],
            api.log.lock().unwrap()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

fn placed(s: &Value) -> Vec<String> {
    s["pods"]["placed"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            format!(
                "{} -> {}",
                p["pod"].as_str().unwrap(),
                p["domain"].as_str().unwrap()
            )
        })
        .collect()
}

#[test]
fn pods_join_and_leave_their_domain_as_the_api_server_reports_them() {
    if !privileged("k8s_pods") {
        return;
    }
    let w = world();
    let kubelet = w.root.child("kubelet");
    let api = FakeApi::start();
    const P1: &str = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
    const P2: &str = "6f1c0a2e-9d1b-4c55-a1f0-3b9e7c2d8a11";
    const P3: &str = "0a9d3f6e-2b7c-4e11-9c3a-5d8e1f2a4b77";
    let acme = serde_json::json!({"team": "acme"});
    api.change("ADDED", pod("acme", "web-1", P1, acme.clone()));
    // Labelled like acme's pods, but in another namespace: never contractor.
    api.change("ADDED", pod("other", "impostor", P3, acme.clone()));
    let p1 = pod_cgroup(&kubelet, P1);
    let p3 = pod_cgroup(&kubelet, P3);

    let n = w.link.net;
    let policy = format!(
        r#"version: 1
domains:
  contractor:
    pods:
      - namespaces: [acme]
        match_labels: {{team: acme}}
        match_expressions:
          - {{key: legacy, operator: DoesNotExist}}
    networks: [10.{n}.0.1/32]
  pods:
    cgroups: ["{kubelet}/kubepods"]
  prod:
    cgroups: ["{p}"]
    networks: [10.{n}.0.2/32]
bridges:
  - name: acme-to-prod
    from: contractor
    to: prod
    ports: [tcp/8080]
    reason: "TICKET-7"
"#,
        kubelet = kubelet.rel,
        p = w.prod.rel,
    );
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let agent = Agent::start_with_env(
        &w.root,
        &policy,
        &["--k8s-node", "node-1"],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    );
    let prod_addr = format!("{}:8080", w.link.v4(2));
    let connect = |p: &PodCgroup| {
        probe(
            &p.container,
            Some(&w.link.a),
            &["connect", "tcp", &prod_addr],
        )
    };
    let server = Server::start(
        &w.prod,
        Some(&w.link.b),
        "tcp",
        &prod_addr,
        60 + tests::slack_secs(),
    );

    // The list places web-1; the impostor stays in `pods`.
    let s = wait_status(&agent, &api, "web-1 placed", |s| {
        s["pods"]["synced"] == true && !placed(s).is_empty()
    });
    assert_eq!(placed(&s), ["acme/web-1 -> contractor"]);
    assert_eq!(s["pods"]["pods"], 2);
    assert_eq!(
        connect(&p1),
        "ok",
        "a placed pod crosses its domain's bridge"
    );
    assert_eq!(
        connect(&p3),
        "EPERM",
        "labels outside the selector's namespaces place nothing"
    );

    // `explain` names the pod as the rule and agrees with the kernel.
    let out = agent.cli(&[
        "explain",
        "--cgroup",
        &p1.container.rel,
        "--dst",
        &prod_addr,
        "--json",
    ]);
    assert!(
        out.status.success(),
        "explain: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(e["verdict"], "allow", "{e:#}");
    assert_eq!(e["workload_domain"], "contractor", "{e:#}");
    assert!(
        e["workload_pattern"]
            .as_str()
            .unwrap()
            .starts_with("pod acme/web-1"),
        "{e:#}"
    );

    // A label change on the running pod takes it out again.
    api.change(
        "MODIFIED",
        pod(
            "acme",
            "web-1",
            P1,
            serde_json::json!({"team": "acme", "legacy": "yes"}),
        ),
    );
    wait_status(&agent, &api, "web-1 removed", |s| placed(s).is_empty());
    assert_eq!(
        connect(&p1),
        "EPERM",
        "a pod that left the selector loses the bridge"
    );

    // A new pod the API server reports before the kubelet made its cgroup
    // waits, then joins when the cgroup appears.
    api.change("ADDED", pod("acme", "web-2", P2, acme.clone()));
    wait_status(&agent, &api, "web-2 pending", |s| {
        s["pods"]["pending"]
            .as_array()
            .is_some_and(|p| p.iter().any(|x| x == "acme/web-2"))
    });
    let p2 = pod_cgroup(&kubelet, P2);
    let appeared = Instant::now();
    let s = wait_status(&agent, &api, "web-2 placed", |s| !placed(s).is_empty());
    eprintln!(
        "web-2 placed at most {} ms after its cgroup appeared",
        appeared.elapsed().as_millis()
    );
    assert_eq!(placed(&s), ["acme/web-2 -> contractor"]);
    assert_eq!(connect(&p2), "ok");

    // Deleted: out of the domain.
    api.change("DELETED", pod("acme", "web-2", P2, acme));
    wait_status(&agent, &api, "web-2 deleted", |s| placed(s).is_empty());
    assert_eq!(connect(&p2), "EPERM");

    // Every move is in the audit trail.
    // The audit store writes in batches: wait (bounded) for the last row.
    let wanted = [
        "acme/web-1 -> contractor",
        "acme/web-1 left contractor",
        "acme/web-2 -> contractor",
        "acme/web-2 left contractor",
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = agent.cli(&["audit", "changes"]);
        assert!(
            out.status.success(),
            "audit: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let missing: Vec<&str> = wanted
            .iter()
            .copied()
            .filter(|w| !text.lines().any(|l| l.contains("pods") && l.contains(w)))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "audit changes lack {missing:?}:\n{text}"
        );
        thread::sleep(Duration::from_millis(200));
    }
    drop(server);
}

/// kill -9 at random instants while a pod is placed in its domain and
/// taken out again (each a generation switch): the pod's workload is in a
/// domain at every instant (its selector's, or its path's), so nothing it
/// may not do in either gets through.
#[test]
fn sigkill_at_random_instants_of_pod_placement_lets_nothing_through() {
    if !privileged("k8s_pod_kills") {
        return;
    }
    let mut rng = Rng::new("sigkill_at_random_instants_of_pod_placement_lets_nothing_through");
    let w = world();
    let kubelet = w.root.child("kubelet");
    let api = FakeApi::start();
    const P1: &str = "3c2d1e0f-4a5b-4c6d-8e7f-901a2b3c4d5e";
    let p1 = pod_cgroup(&kubelet, P1);
    let n = w.link.net;
    let policy = format!(
        r#"version: 1
domains:
  contractor:
    pods: [{{namespaces: [acme], match_labels: {{team: acme}}}}]
    networks: [10.{n}.0.1/32]
  pods:
    cgroups: ["{kubelet}/kubepods"]
  prod:
    cgroups: ["{p}"]
    networks: [10.{n}.0.2/32]
bridges:
  - name: acme-to-prod
    from: contractor
    to: prod
    ports: [tcp/9090]
    reason: "TICKET-8"
"#,
        kubelet = kubelet.rel,
        p = w.prod.rel,
    );
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let args = ["--k8s-node", "node-1", "--no-audit-db"];
    let mut agent = Agent::start_with_env(
        &w.root,
        &policy,
        &args,
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    );
    let guards = Guards::start(&w, &p1.container);
    guards.wait_refused();
    let placed_now = |agent: &Agent| !placed(&status(agent)).is_empty();
    let mut moves = 0;
    for i in 0..10 {
        let (kind, labels) = match i {
            0 => ("ADDED", serde_json::json!({"team": "acme"})),
            _ if i % 2 == 0 => ("MODIFIED", serde_json::json!({"team": "acme"})),
            _ => ("MODIFIED", serde_json::json!({"team": "other"})),
        };
        let before = placed_now(&agent);
        api.change(kind, pod("acme", "web-1", P1, labels));
        // The watch delivers the change and the agent places the pod within
        // about a second of it.
        thread::sleep(rng.between(Duration::ZERO, Duration::from_millis(1500)));
        agent.kill9();
        agent.spawn(&args);
        let want = i % 2 == 0;
        wait_status(&agent, &api, "placement after restart", |s| {
            s["pods"]["synced"] == true && placed(s).is_empty() != want
        });
        moves += usize::from(before != want);
    }
    assert_eq!(moves, 10);
    guards.wait_refused();
    guards.assert_no_leaks(&[]);
}

#[test]
fn a_policy_that_selects_pods_needs_the_pod_watch() {
    if !privileged("k8s_needs_watch") {
        return;
    }
    let root = Cgroup::new(&tests::unique("/bh-test-"));
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("p.yaml");
    std::fs::write(
        &policy,
        "version: 1\ndomains:\n  c:\n    pods:\n      - namespaces: [acme]\n",
    )
    .unwrap();
    let bpffs = format!("/sys/fs/bpf/{}", tests::unique("bulkhead-test-"));
    let out = std::process::Command::new(tests::bulkhead_bin())
        .arg("run")
        .arg("--policy")
        .arg(&policy)
        .arg("--cgroup-root")
        .arg(&root.path)
        .args(["--bpffs-dir", &bpffs, "--no-audit-db", "--no-stdout-events"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("select pods") && err.contains("--k8s-node"),
        "{err}"
    );
    assert!(
        !std::path::Path::new(&bpffs).exists(),
        "nothing may be pinned for a refused policy"
    );
}

/// The kubelet's systemd cgroup driver (with containerd), whose slices are
/// named after the whole path: the pod's cgroup is
/// `/R.slice/R-kubepods.slice/R-kubepods-besteffort.slice/R-kubepods-besteffort-pod<uid, _ for ->.slice`
/// for a kubelet `--cgroup-root=R.slice`; the agent attaches at `R.slice`.
#[test]
fn pods_are_found_in_the_systemd_drivers_layout() {
    if !privileged("k8s_systemd_layout") {
        return;
    }
    let r = tests::unique("bhk");
    let root = Cgroup::new(&format!("/{r}.slice"));
    let prod = root.child("prod");
    let link = tests::Link::new();
    const UID: &str = "3c1d2e4f-5a6b-4c7d-8e9f-0a1b2c3d4e5f";
    let pod_cg = root.child(&format!(
        "{r}-kubepods.slice/{r}-kubepods-besteffort.slice/{r}-kubepods-besteffort-pod{}.slice",
        UID.replace('-', "_")
    ));
    let container = pod_cg.child(&format!("cri-containerd-{}.scope", UID.replace('-', "")));
    let api = FakeApi::start();
    api.change(
        "ADDED",
        pod_on(
            "acme",
            "db-0",
            UID,
            serde_json::json!({"team": "acme"}),
            "containerd",
        ),
    );
    let kubepods = format!("{}/{r}-kubepods.slice", root.rel);
    let policy = format!(
        r#"version: 1
domains:
  contractor:
    pods:
      - namespaces: [acme]
    networks: [{c}/32]
  pods:
    cgroups: ["{kubepods}"]
  prod:
    cgroups: ["{p}"]
    networks: [{p4}/32]
bridges:
  - {{name: acme-to-prod, from: contractor, to: prod, ports: [tcp/8080], reason: "TICKET-8"}}
"#,
        p = prod.rel,
        c = link.v4(1),
        p4 = link.v4(2),
    );
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let agent = Agent::start_with_env(
        &root,
        &policy,
        &["--k8s-node", "node-1"],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    );
    let addr = format!("{}:8080", link.v4(2));
    let server = Server::start(&prod, Some(&link.b), "tcp", &addr, 30 + tests::slack_secs());
    let s = wait_status(&agent, &api, "db-0 placed", |s| !placed(s).is_empty());
    assert_eq!(placed(&s), ["acme/db-0 -> contractor"]);
    assert_eq!(s["pods"]["placed"][0]["cgroup"], pod_cg.rel.as_str());
    assert_eq!(
        probe(&container, Some(&link.a), &["connect", "tcp", &addr]),
        "ok",
        "the pod's container crosses the contractor bridge"
    );
    drop(server);
}

/// The node's `BulkheadNode` report (issue 20): the agent applies it with
/// what it enforces (the policy's sha256 and generation, as `status`
/// says), then again at once when a reload is rejected (with the policy's
/// `file:line:col` errors, the generation unchanged) and when the next
/// one applies.
#[test]
fn the_node_reports_its_policy_and_a_rejected_reload_to_the_api_server() {
    if !privileged("k8s_node_report") {
        return;
    }
    let w = world();
    let api = FakeApi::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let mut agent = Agent::start_with_env(
        &w.root,
        &w.policy("", ""),
        &["--k8s-node", "node-7"],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    );
    let wait_report = |what: &str, pred: &dyn Fn(&Value) -> bool| -> Value {
        let deadline = Instant::now() + Duration::from_secs(20 + tests::slack_secs());
        loop {
            let last = api.state.lock().unwrap().applied.last().cloned();
            if let Some((request, content_type, object)) = &last
                && pred(&object["status"])
            {
                assert!(
                    request.starts_with("PATCH /apis/bulkhead.dev/v1alpha1/bulkheadnodes/node-7?")
                        && request.contains("fieldManager=bulkhead-agent")
                        && request.contains("force=true"),
                    "server-side apply of the node's own object: {request}"
                );
                assert_eq!(content_type, "application/apply-patch+yaml");
                assert_eq!(object["kind"], "BulkheadNode");
                assert_eq!(object["metadata"]["name"], "node-7");
                return object["status"].clone();
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for a report with {what}; last: {last:#?}\nrequests: {:#?}",
                api.log.lock().unwrap()
            );
            thread::sleep(Duration::from_millis(100));
        }
    };
    let s = status(&agent);
    let first = wait_report("the policy in force", &|r| {
        r["policy"]["generation"] == s["generation"]
    });
    assert_eq!(first["policy"]["sha256"], s["sha256"]);
    assert_eq!(first["policy"]["mode"], "enforce");
    assert_eq!(first["reload"], "none");
    assert_eq!(first["domains"], 2);
    assert_eq!(first["agentVersion"], env!("CARGO_PKG_VERSION"));
    assert!(
        first["reportedAt"].as_str().unwrap().ends_with('Z'),
        "{first}"
    );

    // A broken policy: the agent keeps its own, and says so at once.
    std::fs::write(
        &agent.policy,
        "version: 1\ndomains:\n  a:\n    netwrks: [10.0.0.0/8]\n",
    )
    .unwrap();
    let rejected = wait_report("the rejected reload", &|r| r["reload"] == "rejected");
    assert_eq!(
        rejected["policy"]["generation"], s["generation"],
        "{rejected:#}"
    );
    assert_eq!(rejected["policy"]["sha256"], s["sha256"]);
    let errors: Vec<&str> = rejected["lastReload"]["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    let file = agent.policy.to_str().unwrap().to_string();
    assert!(
        errors
            .iter()
            .any(|e| e.contains(&format!("{file}:4:5:")) && e.contains("netwrks")),
        "the file:line:col error: {errors:#?}"
    );

    // A good one again: applied, one generation on.
    let extra = format!("  extra:\n    cgroups: [\"{}\"]\n", w.outside.rel);
    agent.reload(&w.policy(&extra, ""));
    let applied = wait_report("the applied reload", &|r| r["reload"] == "applied");
    let s2 = status(&agent);
    assert_eq!(applied["policy"]["generation"], s2["generation"]);
    assert_ne!(applied["policy"]["sha256"], s["sha256"]);
    assert_eq!(applied["domains"], 3);
    assert_eq!(
        applied["lastReload"]["errors"],
        serde_json::json!([]),
        "{applied:#}"
    );
}

/// A `BulkheadBridge` object as `kubectl apply` makes it (no annotation
/// saying who asked).
fn bridge_object(name: &str, uid: &str, duration: &str) -> Value {
    serde_json::json!({
        "apiVersion": "bulkhead.dev/v1alpha1", "kind": "BulkheadBridge",
        "metadata": {"name": name, "uid": uid, "resourceVersion": "1",
                     "creationTimestamp": time_now_rfc3339()},
        "spec": {"from": "contractor", "to": "prod", "ports": ["tcp/8080"],
                 "duration": duration, "reason": "INC-4711"},
    })
}

fn time_now_rfc3339() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A cluster-wide bridge (issue 20): one `BulkheadBridge` object is
/// enforced by the agents of two nodes (two agents, each on its own cgroup
/// tree, namespaces and pins, against one API server), within a second or
/// two of its creation; each node writes its line of the status and the
/// count; one that breaks the policy's `jit_bridges:` limits is refused on
/// every node, with the reason in the status; deleting the object closes
/// the bridge everywhere.
#[test]
fn a_cluster_bridge_is_enforced_on_every_node_and_closed_when_deleted() {
    if !privileged("k8s_cluster_bridge") {
        return;
    }
    let api = FakeApi::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let limits = "jit_bridges:\n  - from: contractor\n    to: prod\n    max_duration: 1h\n";
    let nodes: Vec<_> = ["node-a", "node-b"]
        .into_iter()
        .map(|node| {
            let w = world();
            let agent = Agent::start_with_env(
                &w.root,
                &w.policy("", limits),
                &["--k8s-node", node],
                &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
            );
            let addr = format!("{}:8080", w.link.v4(2));
            let server = Server::start(
                &w.prod,
                Some(&w.link.b),
                "tcp",
                &addr,
                90 + tests::slack_secs(),
            );
            (w, agent, addr, server)
        })
        .collect();
    let (worlds, mut agents): (Vec<_>, Vec<_>) = nodes
        .into_iter()
        .map(|(w, agent, addr, server)| ((w, addr, server), agent))
        .unzip();
    let connects = || -> Vec<String> {
        worlds
            .iter()
            .map(|(w, addr, _)| probe(&w.contractor, Some(&w.link.a), &["connect", "tcp", addr]))
            .collect()
    };
    assert_eq!(connects(), ["EPERM", "EPERM"], "no bridge yet");
    let wait = |what: &str, pred: &dyn Fn() -> bool| -> Duration {
        let started = Instant::now();
        while !pred() {
            assert!(
                started.elapsed() < Duration::from_secs(20 + tests::slack_secs()),
                "timed out waiting for {what}; requests: {:#?}",
                api.log.lock().unwrap()
            );
            thread::sleep(Duration::from_millis(50));
        }
        started.elapsed()
    };

    // Opened as a user would: the CLI creates the object, recording who
    // the API server says the caller is.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(tests::bulkhead_bin())
            .args(args)
            .env("KUBECONFIG", &kubeconfig)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let open = |name: &str, reason: &str| {
        cli(&[
            "bridge",
            "open",
            "--cluster",
            "--name",
            name,
            "--from",
            "contractor",
            "--to",
            "prod",
            "--port",
            "tcp/8080",
            "--for",
            "10m",
            "--reason",
            reason,
        ])
    };
    let said = open("db-debug", "INC-4711");
    assert!(
        said.starts_with("created BulkheadBridge db-debug"),
        "{said}"
    );
    let took = wait("the bridge on both nodes", &|| connects() == ["ok", "ok"]);
    eprintln!("BulkheadBridge created -> enforced on both nodes in {took:?}");
    wait("both nodes' status lines", &|| {
        api.bridge_status("db-debug")["enforcing"] == 2
    });
    let st = api.bridge_status("db-debug");
    assert_eq!(
        st["nodes"],
        serde_json::json!([{"node": "node-a", "state": "enforced"}, {"node": "node-b", "state": "enforced"}]),
        "{st:#}"
    );
    assert!(st["expires"].as_str().unwrap().ends_with('Z'), "{st:#}");
    for agent in &agents {
        let s = status(agent);
        let b = s["bridges"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == "k8s-db-debug")
            .unwrap_or_else(|| panic!("no k8s-db-debug in {:#}", s["bridges"]));
        let reason = b["reason"].as_str().unwrap();
        assert!(
            reason.contains("INC-4711") && reason.contains("requested by alice@example.com"),
            "who asked and why are recorded: {reason}"
        );
    }

    // Time left and the enforcing nodes, which `kubectl get` cannot show
    // together (it prints a future time as `<invalid>`).
    let listed: serde_json::Value =
        serde_json::from_str(&cli(&["bridge", "list", "--cluster", "--json"])).unwrap();
    let b = &listed[0];
    assert_eq!(b["name"], "db-debug", "{listed:#}");
    assert_eq!(b["enforcing"], 2, "{listed:#}");
    assert_eq!(b["requested_by"], "alice@example.com", "{listed:#}");
    let left = b["seconds_left"].as_u64().unwrap();
    assert!(
        (540..=600).contains(&left),
        "10 minutes, just begun: {listed:#}"
    );

    // Over the policy's limit (1 h): refused on every node, and said why.
    api.bridge_change(
        "ADDED",
        bridge_object("too-long", "7d0c9e1a-0000-4000-8000-0000000000b2", "2h"),
    );
    wait("the refusals", &|| {
        api.bridge_status("too-long")["nodes"]
            .as_array()
            .is_some_and(|n| n.len() == 2)
    });
    let refused = api.bridge_status("too-long");
    assert_eq!(refused["enforcing"], 0, "{refused:#}");
    for n in refused["nodes"].as_array().unwrap() {
        assert_eq!(n["state"], "refused", "{refused:#}");
        assert!(
            n["message"].as_str().unwrap().contains("max_duration"),
            "{refused:#}"
        );
    }

    let text = cli(&["bridge", "list", "--cluster"]);
    eprintln!("bridge list --cluster:\n{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("db-debug")
            && lines[0].contains("s left")
            && lines[0].contains("enforced on 2 nodes"),
        "{text}"
    );
    assert!(
        lines[1].starts_with("too-long") && lines[1].contains("enforced on 0 nodes"),
        "{text}"
    );
    assert!(
        lines[2].contains("refused node-a:") && lines[2].contains("max_duration"),
        "a refusal is listed with its node and why: {text}"
    );

    cli(&["bridge", "close", "--cluster", "db-debug"]);
    let took = wait("the bridge closed on both nodes", &|| {
        connects() == ["EPERM", "EPERM"]
    });
    eprintln!("BulkheadBridge deleted -> closed on both nodes in {took:?}");
    // The audit trail says why it closed (the agent's own uid and pid
    // would say nothing).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = agents[0].cli(&["audit", "changes"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let closed = text
            .lines()
            .find(|l| l.contains("bridge-closed") && l.contains("k8s-db-debug"));
        if let Some(line) = closed {
            assert!(
                line.contains("closed as its BulkheadBridge object was deleted"),
                "{line}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no bridge-closed row: {text}");
        thread::sleep(Duration::from_millis(200));
    }

    // Deleted while node-b's agent is down: node-b's kernel keeps the
    // bridge (enforcement outlives the agent) until the agent starts again
    // and finds the object gone.
    open("db-debug-2", "INC-4712");
    wait("the second bridge on both nodes", &|| {
        connects() == ["ok", "ok"]
    });
    agents[1].kill9();
    cli(&["bridge", "close", "--cluster", "db-debug-2"]);
    wait("node-a closing it", &|| connects()[0] == "EPERM");
    assert_eq!(
        connects()[1],
        "ok",
        "node-b's kernel keeps it while its agent is down"
    );
    agents[1].spawn(&["--k8s-node", "node-b"]);
    wait("node-b closing it once its agent is back", &|| {
        connects() == ["EPERM", "EPERM"]
    });
    drop(agents);
}

/// The shipped admission policy (deploy/kubernetes/
/// admission-bulkheadbridges.yaml) makes a bridge's requester the API
/// server's word: its CEL, evaluated by a CEL interpreter (cel-python) with
/// the bindings the API server gives it, refuses an annotation naming
/// anyone but the user creating the object, and an update that changes it
/// to someone else; it lets through the CLI's own objects and objects
/// without the annotation (recorded as `unknown`).
#[test]
fn the_admission_policy_refuses_a_forged_requester() {
    let Some(python) = helper_python("k8s_admission_policy") else {
        return;
    };
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let object = |by: Option<&str>, port: &str| {
        let mut o = serde_json::json!({"metadata": {"name": "db"},
            "spec": {"from": "contractor", "to": "prod", "ports": [port], "duration": "1h", "reason": "INC-1"}});
        if let Some(by) = by {
            o["metadata"]["annotations"] = serde_json::json!({"bulkhead.dev/requested-by": by});
        }
        o
    };
    struct Case {
        op: &'static str,
        user: &'static str,
        /// The annotation, and the one before the update.
        by: Option<&'static str>,
        before: Option<&'static str>,
        /// An update that changes the spec (the port).
        changes_spec: bool,
        allowed: bool,
    }
    let case = |op, user, by, before, changes_spec, allowed| Case {
        op,
        user,
        by,
        before,
        changes_spec,
        allowed,
    };
    let alice = Some("alice@example.com");
    let cases = [
        case("CREATE", "alice@example.com", alice, None, false, true),
        case("CREATE", "alice@example.com", None, None, false, true),
        case("CREATE", "mallory", alice, None, false, false),
        // A label added by an admin keeps the requester.
        case("UPDATE", "admin", alice, alice, false, true),
        case("UPDATE", "mallory", alice, Some("mallory"), false, false),
        // A changed bridge under the first requester's name.
        case("UPDATE", "mallory", alice, alice, true, false),
        case("UPDATE", "mallory", Some("mallory"), alice, true, true),
        case("UPDATE", "admin", None, alice, false, true),
    ];
    let input: Vec<Value> = cases
        .iter()
        .map(|c| {
            serde_json::json!({
                "object": object(c.by, if c.changes_spec { "tcp/22" } else { "tcp/5432" }),
                "oldObject": if c.op == "UPDATE" { object(c.before, "tcp/5432") } else { Value::Null },
                "request": {"operation": c.op, "userInfo": {"username": c.user}},
            })
        })
        .collect();
    let mut child = std::process::Command::new(python)
        .arg(root.join("tests/k8s/admission.py"))
        .arg(root.join("deploy/kubernetes/admission-bulkheadbridges.yaml"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&input).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "admission.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verdicts: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(verdicts.len(), cases.len());
    for (c, v) in cases.iter().zip(&verdicts) {
        let what = format!(
            "{} by {} of {:?} (before {:?}, spec changed: {})",
            c.op, c.user, c.by, c.before, c.changes_spec
        );
        assert_eq!(v["allowed"], c.allowed, "{what}: {v}");
        if !c.allowed {
            let message = v["message"].as_str().unwrap();
            assert!(
                message.contains(c.user) && message.contains("alice@example.com"),
                "{what}: the refusal names both: {message}"
            );
        }
    }
}
