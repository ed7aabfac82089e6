//! The agent's life as an operator sees it: `status`, `reload`, `events`,
//! `explain` over the control socket, reloads that are rejected or switch
//! atomically, and restarts.

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use tests::{Agent, Server, Value, bulkhead_bin, field, privileged, probe, world::world};

fn json(out: &std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "command failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn status_events_and_explain_over_the_control_socket() {
    if !privileged("status_events_explain") {
        return;
    }
    let w = world(121);
    let agent = Agent::start(&w.root, &w.policy("", ""));
    let dst = format!("{}:8080", w.link.v4(2));

    // A live follower sees the denial as it happens.
    let mut follower = Command::new(bulkhead_bin())
        .args([
            "events",
            "--follow",
            "--json",
            "--domain",
            "contractor",
            "--bpffs-dir",
        ])
        .arg(&agent.bpffs)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    std::thread::sleep(Duration::from_millis(300));

    assert_eq!(
        probe(&w.contractor, Some(&w.link.a), &["connect", "tcp", &dst]),
        "EPERM"
    );
    let line = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the follower received the deny event");
    let ev: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(field(&ev, "reason"), "cross-domain");
    assert_eq!(field(&ev, "dst_domain"), "prod");
    let _ = follower.kill();
    let _ = follower.wait();

    let st = json(&agent.cli(&["status", "--json"]));
    assert_eq!(st["generation"], 1);
    assert_eq!(st["sha256"].as_str().unwrap().len(), 64);
    assert!(
        st["programs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["pinned"] == true),
        "{st}"
    );
    let denied: u64 = st["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["reason"] == "cross-domain" && d["hook"] == "connect4")
        .map(|d| d["count"].as_u64().unwrap())
        .sum();
    assert_eq!(denied, 1);
    assert_eq!(st["events"]["wanted"], 1);
    assert_eq!(st["events"]["delivered"], 1);
    assert_eq!(st["maps"]["cgroups"], 2);
    // The human form names the same things.
    let text = String::from_utf8(agent.cli(&["status"]).stdout).unwrap();
    assert!(
        text.contains("cgroup/connect4") && text.contains("cross-domain"),
        "{text}"
    );

    // Recent events, filtered, as a table.
    let table = String::from_utf8(
        agent
            .cli(&["events", "--verdict", "deny", "--since", "5m"])
            .stdout,
    )
    .unwrap();
    assert!(
        table.lines().count() >= 2 && table.contains("cross-domain") && table.contains(&dst),
        "{table}"
    );

    // explain agrees with the kernel.
    let cg = &w.contractor.rel;
    let ex = json(&agent.cli(&["explain", "--json", "--cgroup", cg, "--dst", &dst]));
    assert_eq!(field(&ex, "verdict"), "deny");
    assert_eq!(field(&ex, "reason"), "cross-domain");
    assert_eq!(field(&ex, "dst_domain"), "prod");
    let text = String::from_utf8(
        agent
            .cli(&["explain", "--cgroup", cg, "--dst", &dst])
            .stdout,
    )
    .unwrap();
    assert!(text.starts_with("verdict: deny"), "{text}");
}

#[test]
fn reload_switches_generations_and_rejected_reloads_change_nothing() {
    if !privileged("reload") {
        return;
    }
    let w = world(122);
    let base = w.policy("", "");
    let mut agent = Agent::start(&w.root, &base);
    let dst = format!("{}:8080", w.link.v4(2));
    let server = Server::start(&w.prod, Some(&w.link.b), "tcp", &dst, 6);

    // A broken policy over the control socket: refused with file:line:col,
    // the running policy stays.
    std::fs::write(&agent.policy, format!("{base}bridges:\n  - name: b\n    from: contractor\n    to: nowhere\n    ports: [tcp/8080]\n    reason: r\n")).unwrap();
    let out = agent.cli(&["reload"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("reload rejected") && err.contains(&format!("{}:", agent.policy.display())),
        "{err}"
    );
    assert_eq!(
        probe(&w.contractor, Some(&w.link.a), &["connect", "tcp", &dst]),
        "EPERM"
    );
    assert_eq!(json(&agent.cli(&["status", "--json"]))["generation"], 1);

    // A good one with a bridge: switched, and the connection now passes.
    let bridged = w.policy("", "bridges:\n  - name: b\n    from: contractor\n    to: prod\n    ports: [tcp/8080]\n    reason: \"T-9\"\n");
    agent.reload(&bridged);
    assert_eq!(
        probe(&w.contractor, Some(&w.link.a), &["connect", "tcp", &dst]),
        "ok"
    );
    assert_eq!(json(&agent.cli(&["status", "--json"]))["generation"], 2);

    // And `bulkhead reload` back to the base policy.
    std::fs::write(&agent.policy, &base).unwrap();
    let out = agent.cli(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("generation 3"));
    assert_eq!(
        probe(&w.contractor, Some(&w.link.a), &["connect", "tcp", &dst]),
        "EPERM"
    );
    assert_eq!(server.finish(), 1);
}

#[test]
fn explain_agrees_with_the_kernel() {
    if !privileged("explain_vs_kernel") {
        return;
    }
    let w = world(123);
    let bridges = "bridges:\n  - name: b\n    from: contractor\n    to: prod\n    ports: [tcp/8080, udp/5300]\n    reason: \"T-1\"\n";
    let agent = Agent::start(&w.root, &w.policy("", bridges));
    let (v4, v6) = (w.link.v4(2), w.link.v6(2));
    let cases: Vec<(&tests::Cgroup, &str, String)> = vec![
        (&w.contractor, "tcp", format!("{v4}:8080")),
        (&w.contractor, "tcp", format!("{v4}:8081")),
        (&w.contractor, "udp", format!("{v4}:5300")),
        (&w.contractor, "udp", format!("{v4}:5301")),
        (&w.contractor, "tcp", format!("[{v6}]:8080")),
        (&w.contractor, "tcp", format!("[{v6}]:9")),
        (&w.contractor, "tcp", format!("[::ffff:{v4}]:9")),
        (&w.contractor, "tcp", format!("{}:9", w.link.v4(1))),
        (&w.prod, "tcp", format!("{}:9", w.link.v4(1))),
        (&w.outside, "tcp", format!("{v4}:9")),
    ];
    for (cg, proto, dst) in cases {
        let kernel = if proto == "udp" {
            probe(cg, Some(&w.link.a), &["sendto", "udp", &dst])
        } else {
            probe(cg, Some(&w.link.a), &["connect", "tcp", &dst])
        };
        let ex = json(&agent.cli(&[
            "explain", "--json", "--cgroup", &cg.rel, "--dst", &dst, "--proto", proto,
        ]));
        let explained_deny = field(&ex, "verdict") == "deny";
        assert_eq!(
            kernel == "EPERM",
            explained_deny,
            "{proto} {dst} from {}: kernel said {kernel}, explain said {ex}",
            cg.rel
        );
    }
}
