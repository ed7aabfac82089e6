//! Egress by name (issue 19), end to end: a real DNS server (`dnsmasq`)
//! in the peer namespace serving a test zone, real clients (`dig` and
//! `probe`'s stub resolver) in a domain's cgroup, the real agent.
//!
//! Layout: namespaces A and B joined by veth. The workload runs in A in
//! domain `contractor` (`10.N.0.1`); B is in no domain and holds the
//! resolver (`10.N.0.2`) and the destinations the test zone names
//! (`10.N.0.10`...), each with a TCP server on port 8080.

use std::{
    path::Path,
    process::{Child, Stdio},
    thread,
    time::Duration,
};

use tests::{
    Agent, Cgroup, Netns, Server, command_in, field, kernel_older_than, listening, privileged,
    probe, probe_bin, with_resolv_conf,
    world::{World, world},
};

const PORT: &str = "8080";

/// Kernels without `bpf_loop` (before 5.17) learn no names (README).
fn learns_names() -> bool {
    if kernel_older_than(5, 17) {
        eprintln!("skipped: this kernel has no bpf_loop, so it learns no names");
        return false;
    }
    true
}

/// `dnsmasq` in the foreground, killed on drop.
struct Dnsmasq(Child);

impl Dnsmasq {
    fn start(cgroup: &Cgroup, netns: &Netns, listen: &str, extra: &[String]) -> Dnsmasq {
        let mut args: Vec<String> = [
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--user=root",
            "--pid-file",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("--listen-address={listen}"));
        args.extend(extra.iter().cloned());
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        // Killed on drop, also when it never answers.
        let running = Dnsmasq(
            command_in(cgroup, Some(netns), "dnsmasq", &a)
                .stderr(Stdio::null())
                .spawn()
                .expect("dnsmasq (Debian package dnsmasq-base; `cargo xtask setup` installs it)"),
        );
        // Ready once it answers.
        for _ in 0..50 {
            let out = probe(
                cgroup,
                Some(netns),
                &["resolve", &format!("{listen}:53"), "ready.test", "a"],
            );
            if out.starts_with("addrs ") {
                return running;
            }
            thread::sleep(Duration::from_millis(100));
        }
        panic!("dnsmasq did not answer on {listen}");
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The test zone, served from B: `allowed.test` and `other.test` (A),
/// `www.pkg.test`, a CNAME to `real.cdn.test` (A and AAAA), and
/// `viatcp.pkg.test` (A and AAAA), looked up over TCP.
fn zone(w: &World, ttl: u32) -> Vec<String> {
    let (v4, v6) = (|h| w.link.v4(h), |h| w.link.v6(h));
    vec![
        format!("--local-ttl={ttl}"),
        format!("--host-record=ready.test,{}", v4(2)),
        format!("--host-record=allowed.test,{}", v4(10)),
        format!("--host-record=other.test,{}", v4(11)),
        format!("--host-record=real.cdn.test,{},{}", v4(12), v6(12)),
        "--cname=www.pkg.test,real.cdn.test".into(),
        format!("--host-record=viatcp.pkg.test,{},{}", v4(14), v6(14)),
    ]
}

/// The destinations in B, each address with a server on [`PORT`].
fn destinations(w: &World, secs: u64) -> Server {
    for h in [10, 11, 12, 13, 14] {
        w.link.b.ip(&format!("addr add {}/32 dev lo", w.link.v4(h)));
    }
    for h in [12, 14] {
        w.link
            .b
            .ip(&format!("-6 addr add {}/128 dev lo nodad", w.link.v6(h)));
        // IPv6 neighbours are only answered for the interface's own
        // addresses.
        w.link.a.ip(&format!(
            "-6 route add {}/128 via {}",
            w.link.v6(h),
            w.link.v6(2)
        ));
    }
    Server::start(
        &w.outside,
        Some(&w.link.b),
        "tcp",
        &format!("[::]:{PORT}"),
        secs,
    )
}

/// A world whose namespace B serves the test [`zone`] (answers with `ttl`)
/// and holds its [`destinations`] for `secs`.
struct Zone {
    // Dropped before the world whose namespaces they run in.
    _dns: Dnsmasq,
    _servers: Server,
    w: World,
    /// `ADDR:53` of the resolver.
    resolver: String,
}

fn zone_world(ttl: u32, secs: u64) -> Zone {
    let w = world();
    Zone {
        _dns: Dnsmasq::start(&w.outside, &w.link.b, &w.link.v4(2), &zone(&w, ttl)),
        _servers: destinations(&w, secs),
        resolver: format!("{}:53", w.link.v4(2)),
        w,
    }
}

fn policy(w: &World, resolver: &str, names: &str, ttl: &str) -> String {
    policy_with(w, resolver, &format!("allow: [{names}]"), ttl)
}

fn policy_with(w: &World, resolver: &str, list: &str, ttl: &str) -> String {
    format!(
        r#"version: 1
mode: enforce
domains:
  contractor:
    cgroups: ["{c}"]
    networks: [10.{n}.0.1/32]
    dns: {{ resolvers: ["{resolver}"]{ttl} }}
    egress:
      names: {{ {list} }}
"#,
        c = w.contractor.rel,
        n = w.link.net,
    )
}

fn run(w: &World, args: &[&str]) -> String {
    probe(&w.contractor, Some(&w.link.a), args)
}

fn connect(w: &World, addr: &str) -> String {
    let to = if addr.contains(':') {
        format!("[{addr}]:{PORT}")
    } else {
        format!("{addr}:{PORT}")
    };
    run(w, &["connect", "tcp", &to])
}

#[test]
fn allowed_names_are_learned_before_the_first_connect_and_nothing_else_is_reached() {
    if !privileged("names_allow_list") || !learns_names() {
        return;
    }
    let z = zone_world(300, 120);
    let (w, resolver) = (&z.w, &z.resolver);
    let agent = Agent::start(
        &w.root,
        &policy(w, &w.link.v4(2), r#""allowed.test", "*.pkg.test""#, ""),
    );

    // Before any lookup, the address is nobody's: denied at connect.
    assert_eq!(connect(w, &w.link.v4(10)), "EPERM");

    // A lookup and a connect at once, a thousand times: the answer is
    // learned before the workload reads it.
    let out = run(
        w,
        &["lookup-connect", resolver, "allowed.test", PORT, "1000"],
    );
    assert_eq!(
        out, "ok 1000 failed 0",
        "every connect right after its lookup"
    );

    // `dig`, a real client, then a connect.
    let dig = command_in(
        &w.contractor,
        Some(&w.link.a),
        "dig",
        &[
            "+short",
            "+tries=1",
            "+time=2",
            &format!("@{}", w.link.v4(2)),
            "ALLOWED.test.",
        ],
    )
    .output()
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&dig.stdout).trim(), w.link.v4(10));
    assert_eq!(connect(w, &w.link.v4(10)), "ok");

    // A name the rules do not mention teaches nothing.
    let other = run(w, &["resolve", resolver, "other.test", "a"]);
    assert_eq!(other, format!("addrs {}", w.link.v4(11)));
    assert_eq!(connect(w, &w.link.v4(11)), "EPERM");

    // A CNAME chain below a `*.` rule, IPv4 and IPv6.
    let a = run(w, &["resolve", resolver, "www.pkg.test", "a"]);
    assert_eq!(a, format!("addrs {}", w.link.v4(12)));
    assert_eq!(connect(w, &w.link.v4(12)), "ok");
    let aaaa = run(w, &["resolve", resolver, "www.pkg.test", "aaaa"]);
    assert_eq!(aaaa, format!("addrs {}", w.link.v6(12)));
    assert_eq!(connect(w, &w.link.v6(12)), "ok");

    // DNS to anything but the resolvers is refused.
    let elsewhere = run(
        w,
        &[
            "resolve",
            &format!("{}:53", w.link.v4(13)),
            "allowed.test",
            "a",
        ],
    );
    assert_eq!(elsewhere, "error EPERM");

    let denied = agent.wait_events(1, |e| {
        field(e, "reason") == "name-not-allowed" && field(e, "dst") == w.link.v4(11)
    });
    assert_eq!(field(&denied[0], "verdict"), "deny");
    agent.wait_events(1, |e| {
        field(e, "reason") == "dns-resolver-denied" && field(e, "dst") == w.link.v4(13)
    });
    // `explain` agrees with the kernel, naming the rule and the resolver.
    let explain = |dst: &str, proto: &str| -> tests::Value {
        let out = agent.cli(&[
            "explain",
            "--json",
            "--cgroup",
            &w.contractor.rel,
            "--dst",
            dst,
            "--proto",
            proto,
        ]);
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
    };
    let allowed = explain(&format!("{}:{PORT}", w.link.v4(10)), "tcp");
    assert_eq!(field(&allowed, "reason"), "name-allowed", "{allowed}");
    let rule = field(&allowed, "rule");
    assert!(
        rule.contains("`allowed.test`") && rule.contains(&w.link.v4(2)),
        "{rule}"
    );
    let v6 = explain(&format!("[{}]:{PORT}", w.link.v6(12)), "tcp");
    assert!(field(&v6, "rule").contains("`*.pkg.test`"), "{v6}");
    for (dst, proto, reason) in [
        (
            format!("{}:{PORT}", w.link.v4(11)),
            "tcp",
            "name-not-allowed",
        ),
        (resolver.clone(), "udp", "dns-resolver"),
        (
            format!("{}:53", w.link.v4(13)),
            "udp",
            "dns-resolver-denied",
        ),
        (
            format!("{}:53", w.link.v4(13)),
            "tcp",
            "dns-resolver-denied",
        ),
    ] {
        let a = explain(&dst, proto);
        assert_eq!(field(&a, "reason"), reason, "{dst} {proto}: {a}");
    }

    let status = agent.cli(&["status", "--json"]);
    let status: tests::Value = serde_json::from_slice(&status.stdout).unwrap();
    let dns = &status["dns"];
    assert!(dns["answers"].as_u64().unwrap() >= 1002, "{dns}");
    assert!(dns["learned_now"].as_u64().unwrap() >= 3, "{dns}");
    assert_eq!(dns["spoofed"], 0, "{dns}");
    // The same four addresses learned again and again: nothing evicted.
    assert_eq!(dns["evicted"], 0, "{dns}");

    // `dump` (no agent needed) lists the learned addresses, named by the
    // names the agent keeps in its state directory.
    let dump = agent.cli(&["dump"]);
    let dump: tests::Value = serde_json::from_slice(&dump.stdout).unwrap();
    let learned = dump["learned"].as_array().unwrap();
    let v6 = learned
        .iter()
        .find(|l| l["addr"] == w.link.v6(12).as_str())
        .unwrap_or_else(|| panic!("dump lists learned addresses: {learned:?}"));
    assert_eq!(v6["name"], "*.pkg.test", "{v6}");
    assert_eq!(v6["domain"], "contractor", "{v6}");
    assert_eq!(v6["resolver"], w.link.v4(2).as_str(), "{v6}");
}

/// `getent` and `curl` resolve through glibc (A and AAAA at once, from one
/// socket; over UDP, then over TCP), then connect at once: learned in
/// time, through a CNAME chain.
#[test]
fn clients_of_the_libc_resolver_connect_to_allowed_names_at_once() {
    if !privileged("names_libc") || !learns_names() {
        return;
    }
    let z = zone_world(300, 60);
    let w = &z.w;
    let _agent = Agent::start(
        &w.root,
        &policy(w, &w.link.v4(2), r#""allowed.test", "*.pkg.test""#, ""),
    );
    let dir = tempfile::tempdir().unwrap();
    let resolv_conf = |name: &str, options: &str| {
        let conf = dir.path().join(name);
        let text = format!("nameserver {}\noptions {options}\n", w.link.v4(2));
        std::fs::write(&conf, text).unwrap();
        conf
    };
    let over_udp = resolv_conf("udp.conf", "timeout:2 attempts:1");
    // `use-vc`: glibc asks over TCP, both queries written at once.
    let over_tcp = resolv_conf("tcp.conf", "use-vc timeout:2 attempts:1");
    let client = |conf: &Path, program: &str, args: &[&str]| {
        with_resolv_conf(
            &mut command_in(&w.contractor, Some(&w.link.a), program, args),
            conf,
        )
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
    };
    let hosts = client(&over_udp, "getent", &["ahostsv4", "allowed.test"]);
    let text = String::from_utf8_lossy(&hosts.stdout);
    assert!(
        hosts.status.success() && text.contains(&w.link.v4(10)),
        "{hosts:?}"
    );
    assert_eq!(connect(w, &w.link.v4(10)), "ok");
    // curl: one lookup (A and AAAA), then its connect. The server answers
    // the request's first four bytes with "pong" (HTTP/0.9 for curl) and
    // closes on the rest, which curl reports as a reset: the reply is what
    // shows the connection was made.
    let curl = |conf: &Path, name: &str| {
        client(
            conf,
            "curl",
            &[
                "-sSv",
                "--http0.9",
                "--max-time",
                "5",
                &format!("http://{name}:{PORT}/"),
            ],
        )
    };
    for name in ["allowed.test", "www.pkg.test"] {
        let out = curl(&over_udp, name);
        assert_eq!(out.stdout, b"pong", "curl {name}: {out:?}");
    }
    // A name the rules do not mention: resolved, then refused at connect.
    let out = curl(&over_udp, "other.test");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.stdout.is_empty() && err.contains("Operation not permitted"),
        "curl other.test: {err}"
    );
    // Over TCP: nothing known before, connected at once after; both
    // answers (A and AAAA, to the two queries glibc wrote at once) learned.
    for h in [w.link.v4(14), w.link.v6(14)] {
        assert_eq!(connect(w, &h), "EPERM");
    }
    let out = curl(&over_tcp, "viatcp.pkg.test");
    assert_eq!(out.stdout, b"pong", "curl over TCP: {out:?}");
    for h in [w.link.v4(14), w.link.v6(14)] {
        assert_eq!(connect(w, &h), "ok", "{h}, learned over TCP");
    }
}

#[test]
fn a_deny_list_denies_the_addresses_of_its_names_only() {
    if !privileged("names_deny_list") || !learns_names() {
        return;
    }
    let z = zone_world(300, 60);
    let (w, resolver) = (&z.w, &z.resolver);
    let agent = Agent::start(
        &w.root,
        &policy_with(w, &w.link.v4(2), r#"deny: ["other.test"]"#, ""),
    );
    assert_eq!(connect(w, &w.link.v4(11)), "ok", "nothing learned yet");
    let other = run(w, &["resolve", resolver, "other.test", "a"]);
    assert_eq!(other, format!("addrs {}", w.link.v4(11)));
    assert_eq!(connect(w, &w.link.v4(11)), "EPERM");
    let e = agent.wait_events(1, |e| field(e, "reason") == "name-denied");
    assert_eq!(field(&e[0], "dst"), w.link.v4(11));
    assert_eq!(field(&e[0], "name"), "other.test", "the rule, in the event");
    // The audit store keeps the rule; `audit query --name` finds the event
    // by it (written within half a second of its delivery).
    let query = |name: &str| -> String {
        let out = agent.cli(&["audit", "query", "--name", name]);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut table = String::new();
    for _ in 0..50 {
        table = query("Other.Test.");
        if table.contains("name-denied") {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        table.contains(&format!("{}:{PORT}", w.link.v4(11)))
            && table.contains("contractor -> other.test"),
        "{table}"
    );
    assert!(!query("allowed.test").contains("name-denied"));
    let out = agent.cli(&[
        "explain",
        "--json",
        "--cgroup",
        &w.contractor.rel,
        "--dst",
        &format!("{}:{PORT}", w.link.v4(11)),
    ]);
    let a: tests::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(field(&a, "reason"), "name-denied", "{a}");
    // Names it does not list, and addresses not learned, stay open.
    run(w, &["resolve", resolver, "allowed.test", "a"]);
    assert_eq!(connect(w, &w.link.v4(10)), "ok");
}

#[test]
fn learned_addresses_expire_with_the_ttl_and_are_learned_without_an_agent() {
    if !privileged("names_expiry") || !learns_names() {
        return;
    }
    let z = zone_world(1, 120);
    let (w, resolver) = (&z.w, &z.resolver);
    let mut agent = Agent::start(
        &w.root,
        &policy(
            w,
            &w.link.v4(2),
            r#""allowed.test""#,
            ", min_ttl: 1s, max_ttl: 2s",
        ),
    );
    // No agent from here on: learning and expiry are the kernel's.
    agent.kill9();
    let out = run(w, &["lookup-connect", resolver, "allowed.test", PORT, "20"]);
    assert_eq!(out, "ok 20 failed 0");
    assert_eq!(connect(w, &w.link.v4(10)), "ok");
    // The answer's TTL (1 s, within the policy's 1 s..2 s) runs out.
    thread::sleep(Duration::from_secs(3));
    assert_eq!(connect(w, &w.link.v4(10)), "EPERM");
    let again = run(w, &["lookup-connect", resolver, "allowed.test", PORT, "1"]);
    assert_eq!(again, "ok 1 failed 0");
}

#[test]
fn answers_forged_by_the_domain_from_elsewhere_or_asked_by_no_query_teach_nothing() {
    if !privileged("names_forged") || !learns_names() {
        return;
    }
    let w = world();
    let _servers = destinations(&w, 120);
    // A resolver on the host (as systemd-resolved's 127.0.0.53).
    let resolver = "127.0.0.53:53";
    let agent = Agent::start(&w.root, &policy(&w, "127.0.0.53", r#""allowed.test""#, ""));
    let fake = |cgroup: &Cgroup, ip: String, how: &[&str]| {
        let mut args = vec!["fake-resolver", resolver, &ip, "3"];
        args.extend_from_slice(how);
        let mut child = command_in(
            cgroup,
            Some(&w.link.a),
            probe_bin().to_str().unwrap(),
            &args,
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
        listening(&mut child, "the fake resolver");
        child
    };
    w.link.a.ip("link set lo up");

    // Outside every domain, the host's resolver is trusted.
    let host = fake(&w.outside, w.link.v4(10), &[]);
    let out = run(&w, &["lookup-connect", resolver, "allowed.test", PORT, "1"]);
    assert_eq!(
        out, "ok 1 failed 0",
        "an answer from the host's resolver counts"
    );
    host.wait_with_output().unwrap();

    // The same answer, from a socket of the workload's own domain bound to
    // the resolver's address: the workload reads it, the kernel learns
    // nothing from it.
    let own = fake(&w.contractor, w.link.v4(13), &[]);
    let forged = run(&w, &["resolve", resolver, "allowed.test", "a"]);
    assert_eq!(forged, format!("addrs {}", w.link.v4(13)));
    assert_eq!(connect(&w, &w.link.v4(13)), "EPERM");
    own.wait_with_output().unwrap();
    agent.wait_events(1, |e| {
        field(e, "reason") == "name-not-allowed" && field(e, "dst") == w.link.v4(13)
    });

    // From the host's resolver again, but under another transaction id:
    // no query asked for it.
    let stray = fake(&w.outside, w.link.v4(11), &["wrong-id"]);
    let read = run(&w, &["resolve", resolver, "allowed.test", "a"]);
    assert_eq!(read, "error wrong transaction id");
    assert_eq!(connect(&w, &w.link.v4(11)), "EPERM");
    stray.wait_with_output().unwrap();
    // Asked of the host's resolver, answered from another address to the
    // asking socket, which would read it: DNS with anything but the
    // domain's resolvers is refused both ways, so it never arrives (the
    // packet hook drops it), and nothing is learned.
    let elsewhere = fake(&w.outside, w.link.v4(12), &["from", "127.0.0.54"]);
    let read = run(
        &w,
        &["resolve", resolver, "allowed.test", "a", "any-source"],
    );
    assert_eq!(read, "error EAGAIN", "no answer read");
    assert_eq!(connect(&w, &w.link.v4(12)), "EPERM");
    let sent = elsewhere.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&sent.stdout).trim(), "answered 1");
    agent.wait_events(1, |e| {
        field(e, "reason") == "dns-resolver-denied"
            && [field(e, "src"), field(e, "dst")].contains(&"127.0.0.54")
    });

    // Over TCP, bytes inside an answer that a workload can shape (here the
    // tail of the answer to its first query, in a segment of its own) look
    // like an answer to its second query: not where the stream's next
    // message starts, so nothing is learned.
    let mut shaped = command_in(
        &w.outside,
        Some(&w.link.a),
        probe_bin().to_str().unwrap(),
        &["fake-tcp-resolver", resolver, &w.link.v4(14), "5"],
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    listening(&mut shaped, "the fake resolver");
    let read = run(&w, &["tcp-resolve", resolver, "other.test", "allowed.test"]);
    assert!(read.starts_with("read ") && read != "read 0", "{read}");
    let sent = shaped.wait_with_output().unwrap();
    assert_ne!(String::from_utf8_lossy(&sent.stdout).trim(), "sent 0");
    assert_eq!(connect(&w, &w.link.v4(14)), "EPERM", "nothing learned");

    let status = agent.cli(&["status", "--json"]);
    let status: tests::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(
        status["dns"]["spoofed"], 2,
        "the forged and the stray answer"
    );
}
