//! Names (issue 19): what learning the addresses of names from DNS answers
//! costs in the kernel, and what a connect costs with 1,000 learned names,
//! side by side with the same traffic under the same policy without names,
//! in one run.
//!
//! A workload in the benchmark's domain looks up 1,000 names
//! (`nI.bench.test`) at a real resolver (`dnsmasq`, in a namespace of its
//! own, outside every domain), then `connect()`s UDP sockets to their
//! addresses round robin (a UDP connect sends nothing, so only the hook's
//! cost and the syscall's remain). `kernel.bpf_stats_enabled` gives each
//! program's run time per call: `bh_ingress` on the answers (with names:
//! its decision, then `bh_dns_ingress`, which it enters by a tail call and
//! which copies, parses, matches and learns; without: the decision only)
//! and `bh_connect4` on the connects (with names: the learned address
//! found and its rule checked; without: decided as `no-domain`).
//!
//! The alternative the issue names, a DNS proxy that holds each answer
//! until the datapath knows its addresses, is measured by its floor: the
//! same lookups through a forwarding `dnsmasq` (no cache) in front of the
//! resolver, which adds the proxy's hop and nothing of its map updates.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::{Value, json};

use super::{
    Ctx, sys,
    world::{Agent, Bg, Netns, command_in, veth},
};

const NAMES: u32 = 1000;
const SERVER: &str = "10.252.0.2";
/// Rounds of lookups for a lookup's round trip (the median is taken).
const LOOKUP_ROUNDS: usize = 7;
/// The forwarding proxy, beside the resolver.
const PROXY: &str = "10.252.0.3";

/// The address `dnsmasq` gives name `i`.
fn addr_of(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 253, (i / 250) as u8, (i % 250 + 1) as u8)
}

pub fn phase(ctx: &Ctx) -> Result<Value> {
    let t = &ctx.tag;
    let c = Netns::new(format!("{t}dc"))?;
    let s = Netns::new(format!("{t}ds"))?;
    let (va, vb) = (format!("{t}dva"), format!("{t}dvb"));
    veth(&c, &s, (&va, &vb), "10.252.0", 252)?;
    c.ip(&format!("route add 10.253.0.0/16 via {SERVER}"))?;
    let hosts = ctx.work.join("names.hosts");
    let lines: String = (0..NAMES)
        .map(|i| format!("{} n{i}.bench.test\n", addr_of(i)))
        .collect();
    fs::write(&hosts, lines)?;
    s.ip(&format!("addr add {PROXY}/24 dev {vb}"))?;
    let dnsmasq = |args: Vec<String>| -> Result<Bg> {
        let mut all: Vec<String> = [
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--user=root",
            "--pid-file",
            // Every answer comes from the resolver, none from a cache.
            "--cache-size=0",
        ]
        .map(String::from)
        .to_vec();
        all.extend(args);
        Ok(Bg(command_in(
            &ctx.cg_free.path,
            Some(&s),
            std::path::Path::new("dnsmasq"),
            &all,
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context(
            "starting dnsmasq (Debian package dnsmasq-base: cargo xtask setup)",
        )?))
    };
    let _dns = dnsmasq(vec![
        "--local-ttl=3600".into(),
        format!("--listen-address={SERVER}"),
        format!("--addn-hosts={}", hosts.display()),
    ])?;
    let _proxy = dnsmasq(vec![
        format!("--listen-address={PROXY}"),
        format!("--server={SERVER}"),
    ])?;
    let mut out = serde_json::Map::new();
    for (key, names) in [("without", false), ("with", true)] {
        let policy = ctx.work.join(format!("policy-names-{key}.yaml"));
        fs::write(&policy, policy_text(ctx, names))?;
        let agent = ctx.start_agent(&format!("names-{key}"), &policy, &[])?;
        out.insert(key.into(), measure(ctx, &agent, &c)?);
        // A lookup's round trip, direct and (without names) through the
        // proxy: medians of rounds, as one pass is a few tens of ms.
        let mut paths = vec![("direct", SERVER)];
        if !names {
            paths.push(("proxy", PROXY));
        }
        for (path, server) in paths {
            let args = [server.to_string(), NAMES.to_string()];
            let mut secs = Vec::new();
            for _ in 0..LOOKUP_ROUNDS {
                let v = helper(ctx, &c, "lookups", &args)?;
                secs.push(v["secs"].as_f64().unwrap_or(f64::NAN));
            }
            secs.sort_by(f64::total_cmp);
            let entry = json!({"n": NAMES, "secs": secs[secs.len() / 2], "rounds": secs});
            if path == "proxy" {
                out.insert("proxy".into(), entry);
            } else {
                out[key]["direct"] = entry;
            }
        }
    }
    for prog in ["bh_ingress", "bh_connect4"] {
        let per = |k: &str| out[k][prog]["ns_per_call"].as_f64().unwrap_or(f64::NAN);
        let ratio = per("with") / per("without");
        out.insert(format!("{prog}_ratio"), json!(ratio));
    }
    Ok(Value::Object(out))
}

fn policy_text(ctx: &Ctx, names: bool) -> String {
    let rules = if names {
        format!(
            "    dns: {{ resolvers: [{SERVER}] }}\n    egress:\n      names: {{ allow: [\"*.bench.test\"] }}\n"
        )
    } else {
        String::new()
    };
    format!(
        "version: 1\nmode: enforce\ndomains:\n  bench:\n    cgroups: [\"{}\"]\n{rules}",
        ctx.cg_work.rel
    )
}

/// The lookups, then the connects, each under `bpf_stats`.
fn measure(ctx: &Ctx, agent: &Agent, c: &Netns) -> Result<Value> {
    // A tail call's run time counts under the program that made it.
    let progs = ["bh_ingress", "bh_connect4"];
    let fds: Vec<_> = progs
        .iter()
        .map(|p| sys::obj_get(&agent.link(p)).and_then(|l| sys::link_prog(&l)))
        .collect::<std::io::Result<_>>()?;
    let stats = "/proc/sys/kernel/bpf_stats_enabled";
    let old = fs::read_to_string(stats)?.trim().to_string();
    fs::write(stats, "1")?;
    let result = (|| -> Result<Value> {
        let snap =
            || -> std::io::Result<Vec<sys::ProgInfo>> { fds.iter().map(sys::prog_info).collect() };
        let mut v = serde_json::Map::new();
        let connects = if ctx.quick { 20_000 } else { 200_000 };
        for (step, args) in [
            ("lookups", vec![SERVER.to_string(), NAMES.to_string()]),
            ("connects", vec![NAMES.to_string(), connects.to_string()]),
        ] {
            let before = snap()?;
            let helper = helper(ctx, c, step, &args)?;
            let after = snap()?;
            let prog = if step == "lookups" { 0 } else { 1 };
            let (calls, ns) = (
                after[prog].run_cnt - before[prog].run_cnt,
                after[prog].run_time_ns - before[prog].run_time_ns,
            );
            v.insert(
                progs[prog].into(),
                json!({
                    "calls": calls,
                    "ns_per_call": ns as f64 / calls.max(1) as f64,
                    step: helper,
                }),
            );
        }
        Ok(Value::Object(v))
    })();
    let _ = fs::write(stats, old);
    result
}

/// Runs helper `names-STEP ARGS` in the workload's cgroup and namespace
/// and returns the JSON it prints.
fn helper(ctx: &Ctx, c: &Netns, step: &str, args: &[String]) -> Result<Value> {
    ctx.workload_helper(c, &format!("names-{step}"), args, step)
}

/// `names-lookups SERVER N`: looks up `n0.bench.test` .. and checks each
/// answer's address. Prints `{"n", "ok", "secs"}`.
pub fn lookups(args: &[String]) -> Result<()> {
    let server: Ipv4Addr = args.first().ok_or_else(|| anyhow!("server"))?.parse()?;
    let n: u32 = args.get(1).ok_or_else(|| anyhow!("count"))?.parse()?;
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.connect(SocketAddr::from((server, 53)))?;
    let start = Instant::now();
    let mut ok = 0;
    let mut buf = [0u8; 512];
    for i in 0..n {
        let id = (i as u16).wrapping_mul(7919);
        let mut q = id.to_be_bytes().to_vec();
        q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        for l in format!("n{i}.bench.test").split('.') {
            q.push(l.len() as u8);
            q.extend_from_slice(l.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        s.send(&q)?;
        let got = s.recv(&mut buf)?;
        // The address is the answer's last four bytes (one A record).
        if got >= 16 && buf[..2] == id.to_be_bytes() && buf[got - 4..got] == addr_of(i).octets() {
            ok += 1;
        }
    }
    println!(
        "{}",
        json!({"n": n, "ok": ok, "secs": start.elapsed().as_secs_f64()})
    );
    Ok(())
}

/// `names-connects NAMES N`: N UDP `connect()`s to the names' addresses
/// round robin. Prints `{"n", "ok", "eperm", "secs"}`.
pub fn connects(args: &[String]) -> Result<()> {
    let names: u32 = args.first().ok_or_else(|| anyhow!("names"))?.parse()?;
    let n: u32 = args.get(1).ok_or_else(|| anyhow!("count"))?.parse()?;
    let start = Instant::now();
    let (mut ok, mut eperm) = (0u32, 0u32);
    for i in 0..n {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        match s.connect(SocketAddr::from((addr_of(i % names), 443))) {
            Ok(()) => ok += 1,
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => eperm += 1,
            Err(e) => bail!("connect: {e}"),
        }
    }
    println!(
        "{}",
        json!({"n": n, "ok": ok, "eperm": eperm, "secs": start.elapsed().as_secs_f64()})
    );
    Ok(())
}
