//! The agent's life as an operator sees it: `status`, `reload`, `events`,
//! `explain` over the control socket, reloads that are rejected or switch
//! atomically, and restarts.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use bulkhead_common::Reason;
use tests::{Agent, AgentLog, Server, Value, bulkhead_bin, field, privileged, probe, world::world};

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
    let w = world();
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

/// A memory cgroup of the agent's own, as a systemd unit or a pod gives
/// it: a child of the root of the memory controller's hierarchy (cgroup v1
/// `memory`, or cgroup v2 where it has the controller). Removed on drop,
/// once the agent is gone.
struct MemoryCgroup {
    root: std::path::PathBuf,
    path: std::path::PathBuf,
    usage_file: &'static str,
}

impl MemoryCgroup {
    fn new() -> MemoryCgroup {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mount = |v1: bool| {
            info.lines().find_map(|l| {
                let (left, right) = l.split_once(" - ")?;
                let mut right = right.split_whitespace();
                let (fstype, opts) = (right.next()?, right.nth(1)?);
                let ok = if v1 {
                    fstype == "cgroup" && opts.split(',').any(|o| o == "memory")
                } else {
                    fstype == "cgroup2"
                };
                ok.then(|| std::path::PathBuf::from(left.split_whitespace().nth(4).unwrap()))
            })
        };
        let (root, usage_file) = match mount(true) {
            Some(root) => (root, "memory.usage_in_bytes"),
            None => {
                let root = mount(false).expect("a cgroup2 mount");
                std::fs::write(root.join("cgroup.subtree_control"), "+memory")
                    .expect("enabling the memory controller below the cgroup v2 root");
                (root, "memory.current")
            }
        };
        let path = root.join(tests::unique("bulkhead-test-mem-"));
        std::fs::create_dir(&path).unwrap();
        MemoryCgroup {
            root,
            path,
            usage_file,
        }
    }

    fn usage(&self) -> i64 {
        let s = std::fs::read_to_string(self.path.join(self.usage_file)).unwrap();
        s.trim().parse().unwrap()
    }

    /// A wrapper that runs the agent in this cgroup; with `read_only`, in
    /// a mount namespace where the memory hierarchy is read-only, as
    /// systemd's `ProtectControlGroups=` leaves it.
    fn wrapper(&self, read_only: bool) -> Vec<String> {
        let mut script = format!("echo 0 > {}/cgroup.procs && ", self.path.display());
        if read_only {
            script += &format!("mount -o remount,bind,ro {} && ", self.root.display());
        }
        script += "exec \"$@\"";
        let mut w: Vec<String> = Vec::new();
        if read_only {
            w.extend(["unshare", "-m", "--propagation", "private"].map(String::from));
        }
        w.extend(["sh".into(), "-c".into(), script, "sh".into()]);
        w
    }

    /// `bulkhead prepare ARGS` for `agent`'s pins, run by `then` (a command
    /// that ends by running its arguments) from inside this cgroup.
    fn prepare_in(&self, then: &str, args: &[&str], agent: &Agent) -> std::process::Output {
        let script = format!(
            "echo 0 > {}/cgroup.procs && exec {then} \"$@\"",
            self.path.display()
        );
        Command::new("sh")
            .args(["-c", &script, "sh"])
            .arg(bulkhead_bin())
            .arg("prepare")
            .args(args)
            .arg("--bpffs-dir")
            .arg(&agent.bpffs)
            .output()
            .unwrap()
    }

    /// How much this cgroup grows while a workload in `cgroup` holds 8000
    /// bound sockets.
    fn growth_with_bound_sockets(&self, cgroup: &tests::Cgroup) -> i64 {
        // Settled: the agent's start-up allocations are done.
        std::thread::sleep(Duration::from_millis(500));
        let before = self.usage();
        let mut binder = tests::command_in(
            cgroup,
            None,
            tests::probe_bin().to_str().unwrap(),
            &["bind-many", "8000", "60"],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
        let mut out = BufReader::new(binder.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "bound 8000");
        let grown = self.usage() - before;
        drop(binder.stdin.take());
        binder.wait().unwrap();
        grown
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        for _ in 0..100 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The kernel charges each socket's storage to the memory cgroup of the
/// process that created the map, past any limit (the programs allocate
/// atomically); a full cgroup gets the agent OOM-killed at its next
/// allocation of its own. So the host's sockets must not be charged to
/// the agent. Where it cannot help it (a read-only cgroup tree), it still
/// starts, and says so; `bulkhead prepare` from outside helps it there,
/// from a pod's cgroup namespace too.
#[test]
fn the_hosts_sockets_are_not_charged_to_the_agents_memory_cgroup() {
    if !privileged("sockets_not_charged") {
        return;
    }
    let w = world();
    let mem = MemoryCgroup::new();
    let wrapper = mem.wrapper(false);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let agent = Agent::start_under(&w.root, &w.policy("", ""), &wrapper);
    let own = std::fs::read_to_string(format!("/proc/{}/cgroup", agent.pid())).unwrap();
    let name = mem.path.file_name().unwrap().to_str().unwrap();
    assert!(own.contains(name), "the agent is not in {name}: {own}");
    // Each of these sockets gets its owner's record (the domains tests
    // connect to such sockets from other domains): charged to no cgroup.
    let grown = mem.growth_with_bound_sockets(&w.outside);
    assert!(
        grown < 1 << 20,
        "the agent's memory cgroup grew by {grown} bytes while 8000 sockets were bound"
    );
    drop(agent);

    // A fresh agent (its own pins) that cannot leave its memory cgroup.
    let wrapper = mem.wrapper(true);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let (agent, log) = Agent::start_under_capturing(&w.root, &w.policy("", ""), &wrapper);
    let said = log
        .lines()
        .iter()
        .any(|l| l.contains("WARN") && l.contains("socket storage is charged to this agent"));
    assert!(said, "no warning at start: {:#?}", log.lines());
    // 720 bytes a socket.
    let grown = mem.growth_with_bound_sockets(&w.outside);
    assert!(
        grown > 4 << 20,
        "the agent's memory cgroup grew by only {grown} bytes: are the sockets recorded?"
    );
    drop(agent);

    // The same, with the map made before the start by `bulkhead prepare`
    // from outside the agent's read-only view, as the systemd unit's
    // `ExecStartPre=-+` does: adopted, charged to none.
    let agent = Agent::unstarted_under(&w.root, &w.policy("", ""), &wrapper);
    let out = agent.cli(&["prepare"]);
    adopts_the_prepared_map(agent, &out, &mem, &w.outside);

    // The same from a pod's init container (deploy/kubernetes/examples):
    // in a memory cgroup and a cgroup namespace of its own, whose
    // mountinfo shows the host's tree mounted at `/..`, and the
    // namespace's root at `/`. (`--warn-only` exits 0 either way: what it
    // says tells.)
    let agent = Agent::unstarted_under(&w.root, &w.policy("", ""), &wrapper);
    let out = mem.prepare_in("unshare --cgroup", &["--warn-only"], &agent);
    adopts_the_prepared_map(agent, &out, &mem, &w.outside);

    // A container that mounts only its own cgroup namespace's view of the
    // hierarchy (`/` there is its own cgroup): no root to move to, and
    // `prepare` says so instead of making the map in its own cgroup.
    let agent = Agent::unstarted_under(&w.root, &w.policy("", ""), &wrapper);
    let (fstype, opts) = if mem.usage_file == "memory.current" {
        ("cgroup2", "")
    } else {
        ("cgroup", "-o memory")
    };
    let own_view = format!(
        "unshare --cgroup --mount --propagation private \
         sh -c 'umount {root} && mount -t {fstype} {opts} none {root} && exec \"$@\"' sh",
        root = mem.root.display(),
    );
    let out = mem.prepare_in(&own_view, &[], &agent);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1)
            && said.contains("not its root: the view of a cgroup namespace"),
        "bulkhead prepare in a container's own view: {}: {said}",
        out.status
    );
}

/// `bulkhead prepare` (its output `out`) made the map from the root memory
/// cgroup; `agent`, started in `mem` with a read-only memory hierarchy,
/// takes it and is not charged for the sockets bound in `outside`.
fn adopts_the_prepared_map(
    mut agent: Agent,
    out: &std::process::Output,
    mem: &MemoryCgroup,
    outside: &tests::Cgroup,
) {
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && said.contains("created from the root memory cgroup"),
        "bulkhead prepare: {}: {said}",
        out.status
    );
    let log = AgentLog::default();
    agent.spawn_capturing(&[], &log);
    let lines = log.lines();
    assert!(
        lines.iter().any(|l| l.contains("pinned before this start"))
            && !lines.iter().any(|l| l.contains("charged to this agent")),
        "the agent did not adopt the prepared map: {lines:#?}"
    );
    let grown = mem.growth_with_bound_sockets(outside);
    assert!(
        grown < 1 << 20,
        "the agent's memory cgroup grew by {grown} bytes while 8000 sockets were bound"
    );
}

#[test]
fn reload_switches_generations_and_rejected_reloads_change_nothing() {
    if !privileged("reload") {
        return;
    }
    let w = world();
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

/// One connection of [`explain_agrees_with_the_kernel`]: who connects, from
/// which network namespace (`None`: the host's, where the agent runs), how,
/// where, and the reason the kernel gives.
struct Case<'a> {
    cg: &'a tests::Cgroup,
    netns: Option<&'a tests::Netns>,
    proto: &'static str,
    dst: String,
    reason: &'static str,
}

/// Makes the connection (`connect` for TCP, `sendto` for UDP) and returns
/// the probe's result and the agent's event for it (`None` for a workload
/// in no domain, which the kernel does not decide).
fn kernel_decides(agent: &Agent, c: &Case) -> (String, Option<Value>) {
    // The kernel records an IPv4-mapped destination as the IPv4 it is.
    let to: std::net::SocketAddr = c.dst.parse().unwrap();
    let (ip, port) = (to.ip().to_canonical().to_string(), to.port());
    let this = |e: &Value| {
        let hook = field(e, "hook");
        (hook.starts_with("connect") || hook.starts_with("sendmsg"))
            && field(e, "cgroup") == c.cg.rel
            && field(e, "dst") == ip
            && e["dport"].as_u64() == Some(u64::from(port))
            && field(e, "proto") == c.proto
    };
    let before = agent.events().iter().filter(|e| this(e)).count();
    let how = if c.proto == "udp" {
        "sendto"
    } else {
        "connect"
    };
    let got = probe(c.cg, c.netns, &[how, c.proto, &c.dst]);
    if c.reason.is_empty() {
        return (got, None);
    }
    let mut ev = agent.wait_events(before + 1, this);
    assert_eq!(
        ev.len(),
        before + 1,
        "{} {} from {}: one new event, got {ev:?}",
        c.proto,
        c.dst,
        c.cg.rel
    );
    (got, ev.pop())
}

/// `explain --json` for the case, from the live agent or (`policy`) for a
/// policy file, without the agent.
fn explained(agent: &Agent, c: &Case, policy: Option<&std::path::Path>) -> Value {
    let mut args = vec![
        "explain", "--json", "--cgroup", &c.cg.rel, "--dst", &c.dst, "--proto", c.proto,
    ];
    let file;
    if let Some(p) = policy {
        file = p.display().to_string();
        args.extend(["--policy", &file]);
    }
    json(&agent.cli(&args))
}

/// Reason codes no connect or sendmsg can get from the policy (the cases
/// below explain), and why.
const NOT_FROM_A_CONNECT: [(Reason, &str); 4] = [
    (
        Reason::RawSocketDenied,
        "decided when a raw socket is created (cgroup/sock_create), never at connect",
    ),
    (
        Reason::Unparsable,
        "only the packet hooks parse headers; a connect's address is given whole",
    ),
    (
        Reason::PacketSocketDenied,
        "decided when an AF_PACKET socket is created (BPF LSM socket_create), never at connect",
    ),
    (
        Reason::AuditUnavailable,
        "decided by the audit trail's health (--audit-full=refuse), not by the policy: outputs.rs",
    ),
];

/// Reason codes a connect gets from a domain's DNS rules: `names.rs`
/// checks `explain` against the kernel for them, with a real resolver.
const EXPLAINED_IN_NAMES: [(Reason, &str); 5] = [
    (Reason::NameAllowed, "an address learned from an answer"),
    (Reason::DnsResolver, "DNS to one of the domain's resolvers"),
    (
        Reason::NameNotAllowed,
        "an allow list of names, nothing learned",
    ),
    (Reason::NameDenied, "an address learned for a denied name"),
    (
        Reason::DnsResolverDenied,
        "DNS to anything but the resolvers",
    ),
];

/// Documentation addresses the explain test's geofeed places (DE, FR) and
/// one it leaves out (`NOWHERE4`, the benchmarking range).
const DE4: &str = "198.51.100.7";
const FR4: &str = "203.0.113.7";
const NOWHERE4: &str = "198.18.0.7";
const DE6: &str = "2001:db8:2::7";
const FR6: &str = "2001:db8:1::7";

/// The explain test's geofeed: two addresses of the link and the public
/// documentation ranges.
fn writeln_feed(feed: &std::path::Path, n: u8) {
    std::fs::write(
        feed,
        format!(
            "10.{n}.0.3/32,DE,,,\n10.{n}.0.4/32,FR,,,\n198.51.100.0/24,DE,,,\n203.0.113.0/24,FR,,,\n\
             2001:db8:2::/48,DE,,,\n2001:db8:1::/48,FR,,,\n"
        ),
    )
    .unwrap();
}

/// `explain` gives the kernel's verdict and reason for every reason a
/// connect can get: decided by domain networks, bridges and their windows,
/// expiry, the geofence (a geofeed places test addresses), and by the
/// socket listening on a loopback address of the host (the listener's
/// domain; in no domain, no geofence judges the host). The live agent reads
/// a listener's owner from the socket storage the kernel reads; `explain
/// --policy` from the cgroup the socket was created in.
#[test]
fn explain_agrees_with_the_kernel() {
    if !privileged("explain_vs_kernel") {
        return;
    }
    let w = world();
    let gone = w.root.child("gone");
    let lab = w.root.child("lab");
    let n = w.link.net;
    let dir = tempfile::tempdir().unwrap();
    let feed = dir.path().join("geofeed.csv");
    // Public addresses the geofeed places, reached only from `lone`, a
    // namespace with no route out: allowed ends in ENETUNREACH, denied in
    // EPERM, and nothing leaves the host.
    writeln_feed(&feed, n);
    let lone = tests::Netns::new();
    // Loopback ports of the host's namespace, below the ephemeral range:
    // 20 per network number, which no other running test holds.
    let base = 20000 + u16::from(n) * 20;
    let (lo_prod, lo_bridged, lo_udp, lo6_prod, lo_outside, lo_nothing) =
        (base, base + 1, base + 2, base + 3, base + 4, base + 5);
    let (lo_wild, lo_wild_udp) = (base + 6, base + 7);
    let policy = format!(
        r#"version: 1
mode: enforce
geo:
  geofeeds: ["{feed}"]
domains:
  contractor:
    cgroups: ["{c}"]
    networks: [10.{n}.0.1/32, "fd00:{n}::1/128"]
    egress: {{ countries: {{ allow: [DE] }}, unknown_country: deny }}
    audit: all
  gone:
    cgroups: ["{g}"]
    networks: [10.{n}.0.9/32]
    expires: 2020-01-01T00:00:00Z
    audit: all
  lab:
    cgroups: ["{l}"]
    audit: all
  prod:
    cgroups: ["{p}"]
    networks: [10.{n}.0.2/32, "fd00:{n}::2/128"]
    egress: {{ countries: {{ deny: [FR] }}, unknown_country: allow }}
    audit: all
bridges:
  - name: b
    from: contractor
    to: prod
    ports: [tcp/8080, udp/5300, tcp/{lo_bridged}]
    reason: "T-1"
  - name: later
    from: contractor
    to: prod
    ports: [tcp/8082]
    not_before: 2099-01-01T00:00:00Z
    expires: 2099-02-01T00:00:00Z
    reason: "T-2"
"#,
        feed = feed.display(),
        c = w.contractor.rel,
        g = gone.rel,
        l = lab.rel,
        p = w.prod.rel,
    );
    let agent = Agent::start(&w.root, &policy);
    let secs = 60 + tests::slack_secs();
    // Listeners on the host's loopback: prod's, and one in no domain.
    let _servers = [
        Server::start(&w.prod, None, "tcp", &format!("127.0.0.1:{lo_prod}"), secs),
        Server::start(
            &w.prod,
            None,
            "tcp",
            &format!("127.0.0.1:{lo_bridged}"),
            secs,
        ),
        Server::start(&w.prod, None, "udp", &format!("127.0.0.1:{lo_udp}"), secs),
        Server::start(&w.prod, None, "tcp", &format!("[::1]:{lo6_prod}"), secs),
        Server::start(
            &w.outside,
            None,
            "tcp",
            &format!("127.0.0.1:{lo_outside}"),
            secs,
        ),
        // Wildcard listeners of prod, reached at 127.0.0.1.
        Server::start(&w.prod, None, "tcp", &format!("0.0.0.0:{lo_wild}"), secs),
        Server::start(
            &w.prod,
            None,
            "udp",
            &format!("0.0.0.0:{lo_wild_udp}"),
            secs,
        ),
    ];
    let (v4, v6) = (w.link.v4(2), w.link.v6(2));
    let a = Some(&w.link.a);
    let out = Some(&lone);
    let case = |cg, netns, proto, dst: String, reason| Case {
        cg,
        netns,
        proto,
        dst,
        reason,
    };
    let cases = vec![
        case(
            &w.contractor,
            a,
            "tcp",
            format!("{}:9", w.link.v4(1)),
            "same-domain",
        ),
        case(&w.contractor, a, "tcp", format!("{v4}:8080"), "bridge"),
        case(
            &w.contractor,
            a,
            "tcp",
            format!("{v4}:8081"),
            "cross-domain",
        ),
        case(
            &w.contractor,
            a,
            "tcp",
            format!("{v4}:8082"),
            "bridge-outside-window",
        ),
        case(&w.contractor, a, "udp", format!("{v4}:5300"), "bridge"),
        case(
            &w.contractor,
            a,
            "udp",
            format!("{v4}:5301"),
            "cross-domain",
        ),
        case(&w.contractor, a, "tcp", format!("[{v6}]:8080"), "bridge"),
        case(&w.contractor, a, "tcp", format!("[{v6}]:9"), "cross-domain"),
        case(
            &w.contractor,
            a,
            "tcp",
            format!("[::ffff:{v4}]:9"),
            "cross-domain",
        ),
        case(
            &w.contractor,
            a,
            "tcp",
            format!("[::ffff:{v4}]:8080"),
            "bridge",
        ),
        case(
            &w.contractor,
            a,
            "udp",
            format!("10.{n}.0.3:7000"),
            "country-allowed",
        ),
        case(
            &w.contractor,
            a,
            "tcp",
            format!("10.{n}.0.4:7000"),
            "country-denied",
        ),
        case(
            &w.contractor,
            a,
            "tcp",
            format!("10.{n}.0.5:7000"),
            "country-unknown",
        ),
        case(
            &w.prod,
            a,
            "udp",
            format!("10.{n}.0.5:7000"),
            "country-unknown-allowed",
        ),
        case(
            &w.prod,
            a,
            "tcp",
            format!("10.{n}.0.4:7001"),
            "country-denied",
        ),
        case(&lab, a, "udp", format!("10.{n}.0.5:7002"), "no-domain"),
        // Public destinations, from the namespace with no route out.
        case(
            &w.contractor,
            out,
            "tcp",
            format!("{DE4}:443"),
            "country-allowed",
        ),
        case(
            &w.contractor,
            out,
            "tcp",
            format!("{FR4}:443"),
            "country-denied",
        ),
        case(
            &w.contractor,
            out,
            "udp",
            format!("{NOWHERE4}:53"),
            "country-unknown",
        ),
        case(
            &w.contractor,
            out,
            "tcp",
            format!("[{DE6}]:443"),
            "country-allowed",
        ),
        case(
            &w.contractor,
            out,
            "udp",
            format!("[{FR6}]:53"),
            "country-denied",
        ),
        case(
            &w.contractor,
            out,
            "tcp",
            format!("[::ffff:{FR4}]:443"),
            "country-denied",
        ),
        case(
            &w.contractor,
            out,
            "udp",
            format!("[::ffff:{DE4}]:53"),
            "country-allowed",
        ),
        case(
            &w.prod,
            out,
            "tcp",
            format!("[::ffff:{NOWHERE4}]:443"),
            "country-unknown-allowed",
        ),
        case(
            &w.prod,
            out,
            "tcp",
            format!("[{FR6}]:443"),
            "country-denied",
        ),
        case(&w.prod, out, "udp", format!("{DE4}:53"), "country-allowed"),
        case(&lab, out, "tcp", format!("{FR4}:443"), "no-domain"),
        case(&gone, out, "udp", format!("{DE4}:53"), "domain-expired"),
        case(&w.outside, out, "tcp", format!("{FR4}:443"), ""),
        case(&gone, a, "tcp", format!("{v4}:8080"), "domain-expired"),
        case(
            &w.prod,
            a,
            "tcp",
            format!("{}:9", w.link.v4(1)),
            "cross-domain",
        ),
        case(&w.outside, a, "tcp", format!("{v4}:9"), ""),
        // Same-host destinations: the listener's domain decides.
        case(
            &w.contractor,
            None,
            "tcp",
            format!("127.0.0.1:{lo_prod}"),
            "cross-domain",
        ),
        case(
            &w.contractor,
            None,
            "tcp",
            format!("127.0.0.1:{lo_bridged}"),
            "bridge",
        ),
        case(
            &w.contractor,
            None,
            "udp",
            format!("127.0.0.1:{lo_udp}"),
            "cross-domain",
        ),
        case(
            &w.contractor,
            None,
            "tcp",
            format!("[::1]:{lo6_prod}"),
            "cross-domain",
        ),
        case(
            &w.contractor,
            None,
            "tcp",
            format!("[::ffff:127.0.0.1]:{lo_prod}"),
            "cross-domain",
        ),
        case(
            &w.prod,
            None,
            "tcp",
            format!("127.0.0.1:{lo_prod}"),
            "same-domain",
        ),
        case(
            &lab,
            None,
            "tcp",
            format!("127.0.0.1:{lo_prod}"),
            "cross-domain",
        ),
        // Wildcard listeners of prod (0.0.0.0), asked for as 127.0.0.1.
        case(
            &w.contractor,
            None,
            "tcp",
            format!("127.0.0.1:{lo_wild}"),
            "cross-domain",
        ),
        case(
            &w.contractor,
            None,
            "udp",
            format!("127.0.0.1:{lo_wild_udp}"),
            "cross-domain",
        ),
        case(
            &w.contractor,
            None,
            "tcp",
            format!("[::ffff:127.0.0.1]:{lo_wild}"),
            "cross-domain",
        ),
        case(
            &w.prod,
            None,
            "tcp",
            format!("127.0.0.1:{lo_wild}"),
            "same-domain",
        ),
        // In no domain, the host is not judged by contractor's geofence.
        case(
            &w.contractor,
            None,
            "tcp",
            format!("127.0.0.1:{lo_outside}"),
            "no-domain",
        ),
        case(
            &w.contractor,
            None,
            "tcp",
            format!("127.0.0.1:{lo_nothing}"),
            "no-domain",
        ),
    ];
    let mut seen = BTreeSet::new();
    for c in &cases {
        let (got, event) = kernel_decides(&agent, c);
        let live = explained(&agent, c, None);
        let file = explained(&agent, c, Some(&agent.policy));
        let what = format!("{} {} from {}", c.proto, c.dst, c.cg.rel);
        let Some(e) = event else {
            assert_ne!(got, "EPERM", "{what}");
            for ex in [&live, &file] {
                assert_eq!(
                    (field(ex, "verdict"), &ex["workload_domain"]),
                    ("allow", &Value::Null),
                    "{what}: {ex}"
                );
            }
            continue;
        };
        assert_eq!(
            field(&e, "reason"),
            c.reason,
            "{what}: the kernel's event {e}"
        );
        assert_eq!(
            got == "EPERM",
            field(&e, "verdict") == "deny",
            "{what}: {got}, {e}"
        );
        if c.netns.is_some_and(|ns| std::ptr::eq(ns, &lone)) {
            assert!(
                ["EPERM", "ENETUNREACH"].contains(&got.as_str()),
                "{what}: a public address, from a namespace with no route out: {got}"
            );
        }
        for ex in [&live, &file] {
            assert_eq!(
                (field(ex, "verdict"), field(ex, "reason")),
                (field(&e, "verdict"), field(&e, "reason")),
                "{what}: kernel's event {e}, explain said {ex}"
            );
            assert_eq!(
                field(ex, "dst_domain"),
                field(&e, "dst_domain"),
                "{what}: {ex}"
            );
        }
        seen.insert(c.reason);
    }
    // Every reason code is either covered above or cannot come from a
    // connect/sendmsg: a new code fails here until a case covers it.
    let all: BTreeSet<&str> = Reason::ALL.iter().map(|r| r.name()).collect();
    let not_from_a_connect: BTreeSet<&str> = NOT_FROM_A_CONNECT
        .iter()
        .chain(&EXPLAINED_IN_NAMES)
        .map(|(r, _)| r.name())
        .collect();
    assert!(
        seen.is_disjoint(&not_from_a_connect),
        "{seen:?} vs {not_from_a_connect:?}"
    );
    assert_eq!(
        seen.union(&not_from_a_connect)
            .copied()
            .collect::<BTreeSet<_>>(),
        all,
        "every reason code is covered by a case or listed in NOT_FROM_A_CONNECT"
    );
    // The live answer names the listener that made the destination prod's.
    let c = cases
        .iter()
        .find(|c| c.dst == format!("127.0.0.1:{lo_prod}") && c.reason == "cross-domain")
        .unwrap();
    let rule = explained(&agent, c, None)["rule"].to_string();
    assert!(
        rule.contains(&format!(
            "listener 127.0.0.1:{lo_prod} of cgroup {}, domain prod",
            w.prod.rel
        )),
        "{rule}"
    );

    // A listener in another network namespace than the agent's: prod's in
    // the contractor's, where a contractor process runs. The agent, left
    // with CAP_BPF, cannot enter it to read the owner: it says so rather
    // than guess. `explain --policy`, run as root, enters it.
    let _prod_in_a = Server::start(&w.prod, a, "tcp", &format!("127.0.0.1:{lo_prod}"), secs);
    let _wildcard_in_a = Server::start(&w.prod, a, "tcp", &format!("0.0.0.0:{lo_udp}"), secs);
    let mut resident = tests::command_in(&w.contractor, a, "sleep", &[&secs.to_string()])
        .spawn()
        .unwrap();
    let foreign = [
        case(
            &w.contractor,
            a,
            "tcp",
            format!("127.0.0.1:{lo_prod}"),
            "cross-domain",
        ),
        // The kernel's lookup does not ask whether the address is this
        // host's: a wildcard listener gives any address in no domain
        // network its owner's domain.
        case(
            &w.contractor,
            a,
            "tcp",
            format!("10.{n}.0.77:{lo_udp}"),
            "cross-domain",
        ),
    ];
    for c in &foreign {
        let (_, event) = kernel_decides(&agent, c);
        let e = event.unwrap();
        let what = format!("{} {} from {} in its namespace", c.proto, c.dst, c.cg.rel);
        assert_eq!(field(&e, "reason"), c.reason, "{what}: {e}");
        let file = explained(&agent, c, Some(&agent.policy));
        assert_eq!(
            (field(&file, "verdict"), field(&file, "reason")),
            (field(&e, "verdict"), field(&e, "reason")),
            "{what}: kernel's event {e}, explain --policy said {file}"
        );
        let live = explained(&agent, c, None);
        eprintln!("{what}: the kernel's event {e}; the agent's explain {live}");
        let agrees = (field(&live, "verdict"), field(&live, "reason"))
            == (field(&e, "verdict"), field(&e, "reason"));
        // `unknown` is explain's own answer, no reason code: only where the
        // owner cannot be read, with code 0 and a rule that says why.
        let unknown = (field(&live, "verdict"), field(&live, "reason")) == ("unknown", "unknown")
            && live["reason_code"] == 0
            && field(&live, "rule").contains(&format!("socket listening on {}", c.dst));
        assert!(
            agrees || unknown,
            "{what}: kernel's event {e}, explain said {live}"
        );
    }
    let _ = resident.kill();
    let _ = resident.wait();
}

/// Policy A and B give the same connections the same verdict by different
/// routes: domain ids are swapped and the bridge differs. A decision that
/// mixed lookups from both (cgroup from one, network from the other) would
/// come out `same-domain` or `cross-domain` instead of `bridge`.
fn policy_ab(w: &tests::world::World, a: bool) -> String {
    let n = w.link.net;
    let contractor = format!(
        "  contractor:\n    cgroups: [\"{}\"]\n    networks: [10.{n}.0.1/32]\n    audit: all\n",
        w.contractor.rel
    );
    let prod = format!(
        "  prod:\n    cgroups: [\"{}\"]\n    networks: [10.{n}.0.2/32]\n",
        w.prod.rel
    );
    let (domains, bridge) = if a {
        (
            format!("{contractor}{prod}"),
            "  - name: bridge-a\n    from: contractor\n    to: prod\n    ports: [udp/8080]\n    reason: A\n",
        )
    } else {
        (
            format!("{prod}{contractor}"),
            "  - name: bridge-b\n    from: contractor\n    to: prod\n    ports: [udp/8000-8100, tcp/1]\n    reason: B\n",
        )
    };
    format!("version: 1\ndomains:\n{domains}bridges:\n{bridge}")
}

#[test]
fn a_thousand_reloads_never_mix_two_policies() {
    if !privileged("reload_atomicity") {
        return;
    }
    let w = world();
    let (a, b) = (policy_ab(&w, true), policy_ab(&w, false));
    let mut agent = Agent::start_with(
        &w.root,
        &a,
        &[
            "--event-rate",
            "0",
            "--ring-buffer-bytes",
            "16777216",
            "--no-audit-db",
        ],
    );
    let dst = format!("{}:8080", w.link.v4(2));
    let traffic = tests::command_in(
        &w.contractor,
        Some(&w.link.a),
        tests::probe_bin().to_str().unwrap(),
        &["storm", &dst, "150000", "50"],
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let started = std::time::Instant::now();
    for i in 0..1000 {
        agent.reload(if i % 2 == 0 { &b } else { &a });
    }
    let took = started.elapsed();
    let out = traffic.wait_with_output().unwrap();
    let summary = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        summary.trim(),
        "eperm 0 other 150000",
        "every connect was allowed by one of the two policies"
    );
    // Let the agent drain the ring, then check every recorded decision.
    std::thread::sleep(Duration::from_secs(2));
    let events = agent.events();
    let connects: Vec<_> = events
        .iter()
        .filter(|e| field(e, "hook") == "connect4")
        .collect();
    let mixed: Vec<_> = connects
        .iter()
        .filter(|e| {
            !(field(e, "reason") == "bridge"
                && field(e, "src_domain") == "contractor"
                && field(e, "dst_domain") == "prod")
        })
        .collect();
    let generations: std::collections::BTreeSet<u64> = connects
        .iter()
        .filter_map(|e| e["generation"].as_u64())
        .collect();
    eprintln!(
        "1000 reloads in {took:?}; {} decisions recorded across {} generations; {} mixed",
        connects.len(),
        generations.len(),
        mixed.len()
    );
    assert!(
        mixed.is_empty(),
        "mixed decisions: {:?}",
        &mixed[..mixed.len().min(5)]
    );
    assert!(
        generations.len() > 100,
        "traffic ran across many generations"
    );
    let bridges: std::collections::BTreeSet<&str> =
        connects.iter().map(|e| field(e, "bridge")).collect();
    assert_eq!(
        bridges.into_iter().collect::<Vec<_>>(),
        vec!["bridge-a", "bridge-b"]
    );
}

#[test]
fn malformed_policies_are_rejected_and_change_nothing() {
    if !privileged("malformed_policies") {
        return;
    }
    let w = world();
    let good = w.policy(
        "    expires: 2099-01-01T00:00:00Z\n    audit: all\n",
        "bridges:\n  - name: b\n    from: contractor\n    to: prod\n    ports: [tcp/8080]\n    reason: \"T-1\"\n  - name: window\n    from: prod\n    to: contractor\n    ports: [udp/5300-5310]\n    not_before: 2026-01-01T00:00:00Z\n    expires: 2099-01-01T00:00:00Z\n    reason: \"T-2\"\njit_bridges:\n  - from: contractor\n    to: prod\n    max_duration: 2h\n",
    );
    let agent = Agent::start_with(&w.root, &good, &["--no-audit-db"]);
    let dump = || {
        let out = Command::new(bulkhead_bin())
            .arg("dump")
            .arg("--bpffs-dir")
            .arg(&agent.bpffs)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let before = dump();
    let mut candidates: Vec<String> = Vec::new();
    // Truncated at every few bytes.
    for cut in 1..good.len() {
        candidates.push(good[..cut].to_string());
    }
    // Each line deleted, indented, dedented or doubled.
    let lines: Vec<&str> = good.lines().collect();
    for i in 0..lines.len() {
        let with = |f: &dyn Fn(&str) -> String| {
            lines
                .iter()
                .enumerate()
                .map(|(j, l)| if i == j { f(l) } else { format!("{l}\n") })
                .collect::<String>()
        };
        candidates.push(with(&|_| String::new()));
        candidates.push(with(&|l| format!(" {l}\n")));
        candidates.push(with(&|l| format!("{}\n", l.trim_start())));
        candidates.push(with(&|l| format!("{l}\n{l}\n")));
    }
    // Wrong types, unknown references, bad values, huge numbers, duplicates.
    let swaps = [
        ("version: 1", "version: 2"),
        ("version: 1", "version: \"one\""),
        ("version: 1", "version: 99999999999999999999999"),
        ("mode: enforce", "mode: maybe"),
        ("mode: enforce", "mode: [enforce]"),
        ("to: prod", "to: nowhere"),
        ("from: contractor", "from: prod"),
        ("tcp/8080", "tcp/80800"),
        ("tcp/8080", "sctp/8080"),
        ("tcp/8080", "tcp/9-3"),
        ("tcp/8080", "8080"),
        ("reason: \"T-1\"", "reason: \"\""),
        ("/32", "/33"),
        ("/32", "/8"),
        ("10.", "300."),
        ("networks:", "network:"),
        ("cgroups:", "cgroups: 5\n    x:"),
        ("domains:", "domains: []\ndomains:"),
        ("  prod:", "  contractor:"),
        ("  prod:", "  PROD:"),
        ("bridges:", "bridges: {}\nbridges:"),
        ("name: b", "name: [b]"),
        ("ports: [tcp/8080]", "ports: tcp/8080"),
        (
            "ports: [tcp/8080]",
            "ports: []\n    expires: 2020-01-01T00:00:00Z\n    not_before: 2021-01-01T00:00:00Z",
        ),
    ];
    for (from, to) in swaps {
        if good.contains(from) {
            candidates.push(good.replacen(from, to, 1));
        }
    }
    for junk in [
        "\t",
        "{",
        "- - -",
        "version: 1\n  bad indent",
        "\u{0}",
        ": : :",
        "[[[[",
        "domains: !!binary AAAA",
    ] {
        candidates.push(format!("{good}{junk}"));
        candidates.push(format!("{junk}\n{good}"));
    }
    let dir = tempfile::tempdir().unwrap();
    let mut rejected = 0;
    let line_col = |err: &str, path: &std::path::Path| {
        let prefix = format!("{}:", path.display());
        err.lines().any(|l| {
            l.strip_prefix(&prefix).is_some_and(|rest| {
                let mut it = rest.splitn(3, ':');
                matches!((it.next(), it.next()), (Some(a), Some(b)) if a.parse::<u32>().is_ok() && b.parse::<u32>().is_ok())
            })
        })
    };
    for (i, text) in candidates.iter().enumerate() {
        let path = dir.path().join(format!("bad-{i}.yaml"));
        std::fs::write(&path, text).unwrap();
        let check = Command::new(bulkhead_bin())
            .arg("check")
            .arg(&path)
            .output()
            .unwrap();
        if check.status.success() {
            continue; // still a valid policy (e.g. cut at the end of a line)
        }
        std::fs::write(&agent.policy, text).unwrap();
        let out = agent.cli(&["reload"]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "case {i} was not rejected:\n{text}"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            line_col(&err, &agent.policy),
            "case {i}: no file:line:col in:\n{err}"
        );
        let check_err = String::from_utf8_lossy(&check.stderr);
        assert!(
            line_col(&check_err, &path),
            "case {i}: `check` gave no file:line:col:\n{check_err}"
        );
        rejected += 1;
    }
    eprintln!("{} candidates, {rejected} rejected", candidates.len());
    assert!(
        rejected >= 500,
        "only {rejected} malformed policies generated"
    );
    assert_eq!(
        dump(),
        before,
        "the running maps are byte for byte the same"
    );
}

#[test]
fn jit_bridge_lifecycle_and_cut_within_100ms_with_the_agent_dead() {
    if !privileged("jit_bridge") {
        return;
    }
    let w = world();
    let p = w.policy(
        "",
        "jit_bridges:\n  - from: contractor\n    to: prod\n    max_duration: 1h\n",
    );
    let db = tempfile::tempdir().unwrap();
    let db_path = db.path().join("audit.db");
    let mut agent = Agent::start_with(&w.root, &p, &["--audit-db", db_path.to_str().unwrap()]);
    let dst = format!("{}:8080", w.link.v4(2));
    assert_eq!(
        probe(&w.contractor, Some(&w.link.a), &["connect", "tcp", &dst]),
        "EPERM"
    );

    // Refused: too long, no rule for the pair, no reason.
    let too_long = agent.cli(&[
        "bridge",
        "open",
        "--from",
        "contractor",
        "--to",
        "prod",
        "--port",
        "tcp/8080",
        "--for",
        "2h",
        "--reason",
        "x",
    ]);
    assert_eq!(too_long.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&too_long.stderr).contains("between 1s and 3600s"));
    let wrong_way = agent.cli(&[
        "bridge",
        "open",
        "--from",
        "prod",
        "--to",
        "contractor",
        "--port",
        "tcp/8080",
        "--for",
        "1m",
        "--reason",
        "x",
    ]);
    assert!(String::from_utf8_lossy(&wrong_way.stderr).contains("allows no just-in-time bridges"));

    let sink = tests::command_in(
        &w.prod,
        Some(&w.link.b),
        tests::probe_bin().to_str().unwrap(),
        &["sink", &dst, "9"],
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let opened = agent.cli(&[
        "bridge",
        "open",
        "--from",
        "contractor",
        "--to",
        "prod",
        "--port",
        "tcp/8080",
        "--for",
        "3s",
        "--reason",
        "TICKET-123",
        "--name",
        "dba-access",
    ]);
    assert!(
        opened.status.success(),
        "{}",
        String::from_utf8_lossy(&opened.stderr)
    );
    let opened_ns = unix_ns();
    let list = String::from_utf8(agent.cli(&["bridge", "list"]).stdout).unwrap();
    assert!(
        list.contains("dba-access") && list.contains("TICKET-123"),
        "{list}"
    );

    // An open connection across the bridge, trickling data...
    let trickle = tests::command_in(
        &w.contractor,
        Some(&w.link.a),
        tests::probe_bin().to_str().unwrap(),
        &["trickle", &dst, "6"],
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // ... and the agent dies before the bridge expires.
    agent.kill9();
    let out = sink.wait_with_output().unwrap();
    let _ = trickle.wait_with_output();
    let line = String::from_utf8(out.stdout).unwrap();
    let last_ns: i128 = line
        .lines()
        .last()
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse().ok())
        .unwrap();
    let got: u64 = line
        .lines()
        .last()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap();
    // The bridge expires 3 s after it was opened (the agent stamped it a
    // moment before `opened_ns`).
    let after_expiry_ms = (last_ns - (opened_ns + 3_000_000_000)) / 1_000_000;
    eprintln!("received {got} bytes; last one {after_expiry_ms} ms after expiry");
    assert!(got > 50, "data flowed while the bridge was open");
    assert!(
        after_expiry_ms <= 100,
        "the flow was cut {after_expiry_ms} ms after expiry"
    );
    assert_eq!(
        probe(&w.contractor, Some(&w.link.a), &["connect", "tcp", &dst]),
        "EPERM"
    );

    // A new agent drops it from the list and records the expiry.
    agent.spawn(&["--audit-db", db_path.to_str().unwrap()]);
    let list = String::from_utf8(agent.cli(&["bridge", "list"]).stdout).unwrap();
    assert!(!list.contains("dba-access"), "{list}");
    // The store commits in batches within a second.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let changes = loop {
        let out = Command::new(bulkhead_bin())
            .args(["audit", "changes", "--db", db_path.to_str().unwrap()])
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        if text.contains("bridge-expired") || std::time::Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        changes.contains("bridge-opened")
            && changes.contains("bridge-expired")
            && changes.contains("TICKET-123")
            && changes.contains("uid 0"),
        "{changes}"
    );
    // The cut was recorded too: the kernel's backstop denied the flow's packets.
    let cut = agent.wait_events(1, |e| {
        field(e, "reason") == "bridge-outside-window" && field(e, "hook").starts_with("skb")
    });
    assert!(!cut.is_empty(), "the cut is an audit event");
}

#[test]
fn explain_replay_lists_the_decisions_a_candidate_policy_would_change() {
    if !privileged("explain_replay") {
        return;
    }
    let w = world();
    let agent = Agent::start(&w.root, &w.policy("", ""));
    let dst = format!("{}:8080", w.link.v4(2));
    assert_eq!(
        probe(&w.contractor, Some(&w.link.a), &["connect", "tcp", &dst]),
        "EPERM"
    );
    assert_eq!(
        probe(
            &w.contractor,
            Some(&w.link.a),
            &["connect", "tcp", &format!("{}:22", w.link.v4(2))]
        ),
        "EPERM"
    );
    assert_eq!(
        agent
            .wait_events(2, |e| field(e, "verdict") == "deny")
            .len(),
        2
    );
    let candidate = agent.dir.path().join("candidate.yaml");
    std::fs::write(&candidate, w.policy("", "bridges:\n  - name: new\n    from: contractor\n    to: prod\n    ports: [tcp/8080]\n    reason: \"T-5\"\n")).unwrap();
    let out = Command::new(bulkhead_bin())
        .args(["explain", "--replay"])
        .arg(&agent.events)
        .arg("--policy")
        .arg(&candidate)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!(
            "-> {dst} was deny (cross-domain), would be allow (bridge)"
        )),
        "{text}"
    );
    assert!(
        text.contains("2 decisions replayed") && text.contains("1 would change"),
        "{text}"
    );
}

/// Whether the running kernel has the `bpf_sock_destroy` kfunc (6.5+),
/// read from its BTF by the test itself.
fn kernel_has_sock_destroy() -> bool {
    let btf = std::fs::read("/sys/kernel/btf/vmlinux").expect("kernel BTF");
    btf.windows(b"bpf_sock_destroy\0".len())
        .any(|w| w == b"bpf_sock_destroy\0")
}

/// A server in `prod` and a client in `contractor` holding a connection to
/// it, in the test's own network namespace (so over loopback).
struct Held {
    sink: std::process::Child,
    sink_out: BufReader<std::process::ChildStdout>,
    hold: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Held {
    fn open(w: &tests::world::World, dst: &str) -> Held {
        let start = |cg, args: &[&str]| {
            tests::command_in(cg, None, tests::probe_bin().to_str().unwrap(), args)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let mut line = String::new();
        let mut sink = start(&w.prod, &["sink", dst, "15"]);
        let mut sink_out = BufReader::new(sink.stdout.take().unwrap());
        sink_out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "listening");
        let mut hold = start(&w.contractor, &["hold", dst, "10"]);
        let mut out = BufReader::new(hold.stdout.take().unwrap());
        line.clear();
        out.read_line(&mut line).unwrap();
        assert_eq!(
            line.trim(),
            "connected",
            "the bridge lets the connection in"
        );
        Held {
            sink,
            sink_out,
            hold,
            out,
        }
    }

    /// Before Linux 6.5 (no `bpf_sock_destroy`) the connection is not
    /// ended: its packets are dropped. Waits for both ends; asserts that
    /// the client saw no error and returns when the server got its last
    /// byte (Unix ns).
    fn dropped(mut self) -> i128 {
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        let _ = self.hold.wait();
        assert_eq!(line.trim(), "open", "the client sees no error");
        line.clear();
        self.sink_out.read_line(&mut line).unwrap();
        let _ = self.sink.wait();
        let words: Vec<&str> = line.split_whitespace().collect();
        assert!(
            matches!(words[..], ["got", n, "last", _] if n != "0"),
            "server saw: {line}"
        );
        words[3].parse().unwrap()
    }

    /// Waits for the client's write to fail; asserts it failed with
    /// `ECONNABORTED` and returns when (Unix ns).
    fn ended(mut self) -> i128 {
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        let _ = self.hold.wait();
        let _ = self.sink.kill();
        let _ = self.sink.wait();
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            words.get(..2),
            Some(&["error", "ECONNABORTED"][..]),
            "client saw: {line}"
        );
        words[3].parse().unwrap()
    }
}

fn unix_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i128
}

/// Same-host workloads of two domains (one network namespace, over
/// loopback): a policy that drops their bridge destroys the open
/// connection at its next packet, so the client's write fails with
/// `ECONNABORTED` instead of the flow going quiet, and the cut is an
/// audit event; so does the end of a just-in-time bridge. (Sockets in
/// other namespaces keep the packet backstop,
/// `jit_bridge_lifecycle_and_cut_within_100ms_with_the_agent_dead`.)
#[test]
fn a_connection_the_policy_stops_allowing_is_destroyed() {
    if !privileged("cut") {
        return;
    }
    let w = world();
    let bridge = "bridges:\n  - name: loop\n    from: contractor\n    to: prod\n    ports: [tcp/27128]\n    reason: \"T-9\"\n";
    let mut agent = Agent::start(&w.root, &w.policy("", bridge));
    // On the host's loopback, which every process shares: a port below the
    // ephemeral range (32768-60999 by default), so no outgoing connection
    // of another process can hold it (47128 once did: EADDRINUSE).
    let dst = "127.0.0.1:27128";
    let held = Held::open(&w, dst);
    std::thread::sleep(Duration::from_millis(300));
    let reload_ns = unix_ns();
    agent.reload(&w.policy("", ""));
    if !kernel_has_sock_destroy() {
        // The documented fallback: the packet hooks drop the connection's
        // traffic, and say so.
        let after_ms = (held.dropped() - reload_ns) / 1_000_000;
        eprintln!(
            "no bpf_sock_destroy: the server's last byte came {after_ms} ms after the reload began"
        );
        assert!(after_ms < 2000, "traffic {after_ms} ms after the reload");
        let denied = agent.wait_events(1, |e| {
            field(e, "verdict") == "deny"
                && field(e, "hook").starts_with("skb")
                && e["dport"] == 27128
        });
        assert_eq!(field(&denied[0], "reason"), "cross-domain", "{}", denied[0]);
        return;
    }
    let after_ms = (held.ended() - reload_ns) / 1_000_000;
    eprintln!("the client's write failed {after_ms} ms after the reload began");
    assert!(after_ms < 2000, "cut {after_ms} ms after the reload");
    let cut = agent.wait_events(1, |e| field(e, "verdict") == "cut");
    assert_eq!(cut.len(), 1, "one cut event: {:?}", agent.events());
    let e = &cut[0];
    assert_eq!(field(e, "hook"), "sock-destroy", "{e}");
    assert_eq!(field(e, "reason"), "cross-domain", "{e}");
    assert_eq!(field(e, "src_domain"), "contractor", "{e}");
    assert_eq!(field(e, "dst_domain"), "prod", "{e}");
    assert_eq!(e["dport"], 27128, "{e}");
    assert_eq!(field(e, "proto"), "tcp", "{e}");

    // A just-in-time bridge ends in the kernel at its instant, and the
    // connection across it ends with it.
    agent.reload(&w.policy(
        "",
        "jit_bridges:\n  - from: contractor\n    to: prod\n    max_duration: 1h\n",
    ));
    let opened = agent.cli(&[
        "bridge",
        "open",
        "--from",
        "contractor",
        "--to",
        "prod",
        "--port",
        "tcp/27128",
        "--for",
        "2s",
        "--reason",
        "T-10",
    ]);
    assert!(
        opened.status.success(),
        "{}",
        String::from_utf8_lossy(&opened.stderr)
    );
    // The agent stamped the bridge a moment before this.
    let expiry_ns = unix_ns() + 2_000_000_000;
    let after_expiry_ms = (Held::open(&w, dst).ended() - expiry_ns) / 1_000_000;
    eprintln!("the client's write failed {after_expiry_ms} ms after the bridge expired");
    assert!(
        after_expiry_ms <= 200,
        "cut {after_expiry_ms} ms after expiry"
    );
    let cut = agent.wait_events(2, |e| field(e, "verdict") == "cut");
    assert_eq!(cut.len(), 2, "{:?}", agent.events());
    assert!(
        ["bridge-outside-window", "cross-domain"].contains(&field(&cut[1], "reason")),
        "{}",
        cut[1]
    );
    let status = json(&agent.cli(&["status", "--json"]));
    assert_eq!(status["connections_cut"]["destroyed"], 2, "{status}");
}
