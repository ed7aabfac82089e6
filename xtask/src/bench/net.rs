//! Traffic between network namespaces over veth, side by side:
//! no policy, bulkhead enforcing the full policy, bulkhead on a domain
//! without country rules, and nftables holding the same address sets in
//! interval sets. Each round runs every test once per mode, a test's
//! modes back to back in an order that rotates each round; each number is
//! the median over rounds.
//!
//! Layout: namespace S (servers) is joined to C0 (`10.251.0.0/24`) and C1
//! (`10.251.1.0/24`) by two veth pairs. Clients in C0 run either in a
//! cgroup outside the agent's subtree (no programs: "none") or in a domain
//! cgroup below it; C1 holds the nftables ruleset. Servers run outside the
//! subtree, so only the client side differs between modes. Clients and
//! servers share CPU 0 at `SCHED_FIFO` priority: a request/response then
//! runs as one serial chain on one CPU, which is far steadier than bouncing
//! between idle CPUs or sharing them with whatever else the machine runs,
//! and every nanosecond a hook adds shows up in it.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use bulkhead_common::{Hook, maps::counter_index, reason::REASON_SLOTS};
use serde_json::{Value, json};

use super::{
    Ctx, ab,
    geo::{self, V4, V6},
    policy::Spec,
    profile,
    stats::median,
    sys,
    world::{self, Agent, Bg, Netns, command_in, run_timed, veth},
};

const UDP_PORT: u16 = 11111;
const TCP_PORT: u16 = 11112;
const CRR_PORT: u16 = 11113;
const AB_PORT: u16 = 11114;

struct Mode<'a> {
    key: &'static str,
    label: &'static str,
    ns: &'a Netns,
    cgroup: &'a Path,
    server: &'static str,
}

/// The tests run in each mode: (key, label, unit, higher is better).
const TESTS: [(&str, &str, &str); 4] = [
    ("udp_tp", "UDP 64 B send rate (sockperf tp)", "msg/s"),
    (
        "udp_rr",
        "UDP 64 B request/response (sockperf pp)",
        "trans/s",
    ),
    (
        "tcp_rr",
        "TCP 64 B request/response (sockperf pp --tcp)",
        "trans/s",
    ),
    (
        "tcp_crr",
        "TCP connect + 1 B request/response + close",
        "conn/s",
    ),
];

fn sockperf_value(out: &str, key: &str) -> Option<f64> {
    match key {
        "udp_tp" => out
            .lines()
            .find_map(|l| l.split("Message Rate is ").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok()),
        // sockperf reports half the round trip as "latency".
        _ => out
            .lines()
            .find_map(|l| l.split("Latency is ").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .map(|half_rtt_us| 1e6 / (2.0 * half_rtt_us)),
    }
}

fn run_test(ctx: &Ctx, m: &Mode, test: &str) -> Result<f64> {
    let secs = ctx.p.net_secs;
    let mut args: Vec<String> = vec![(secs + 20).to_string()];
    args.extend(pinned_rt());
    let port = match test {
        "udp_tp" | "udp_rr" => UDP_PORT,
        _ => TCP_PORT,
    };
    if test == "tcp_crr" {
        args.push(ctx.exe.to_string_lossy().into());
        args.extend(ctx.helper_args(
            "crr-client",
            &[format!("{}:{CRR_PORT}", m.server), secs.to_string()],
        ));
    } else {
        args.push("sockperf".into());
        args.push(if test == "udp_tp" { "tp" } else { "pp" }.into());
        if test == "tcp_rr" {
            args.push("--tcp".into());
        }
        for a in [
            "-i",
            m.server,
            "-p",
            &port.to_string(),
            "-m",
            "64",
            "-t",
            &secs.to_string(),
        ] {
            args.push(a.into());
        }
    }
    let out = command_in(m.cgroup, Some(m.ns), Path::new("timeout"), &args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {test} in mode {}", m.key))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("{test} in mode {} failed ({}): {text}", m.key, out.status);
    }
    if test == "tcp_crr" {
        let f: Vec<f64> = text
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        if f.len() < 3 || f[0] == 0.0 {
            bail!("tcp_crr in mode {}: no connections ({text})", m.key);
        }
        return Ok(f[0] / f[2]);
    }
    sockperf_value(&text, test).ok_or_else(|| {
        anyhow!(
            "{test} in mode {}: cannot parse sockperf output: {text}",
            m.key
        )
    })
}

/// The command prefix every client and server runs under: CPU 0 and
/// `SCHED_FIFO` priority 10, so a busy machine (compilers, other tests)
/// cannot slip into the middle of a measurement; the kernel's RT throttle
/// (`sched_rt_runtime_us`) still leaves the CPU to others 5% of each
/// second, and every run is bounded by `timeout`.
fn pinned_rt() -> Vec<String> {
    ["chrt", "-f", "10", "taskset", "-c", "0"]
        .map(String::from)
        .to_vec()
}

/// `ip netns exec NS true`: what the timed nft commands pay besides nft.
fn exec_overhead_ms(ns: &Netns) -> f64 {
    let mut t = Vec::new();
    for _ in 0..5 {
        let s = Instant::now();
        let _ = ns.exec("true");
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    median(&t)
}

fn nft_ruleset(spec: &Spec, ctx: &Ctx) -> (String, usize, usize) {
    let d4 = spec.deny_ranges(&ctx.db, V4);
    let d6 = spec.deny_ranges(&ctx.db, V6);
    let text = format!(
        "table inet bhbench {{\n\
         \tset deny4 {{ type ipv4_addr; flags interval; elements = {{\n{}\n}} }}\n\
         \tset deny6 {{ type ipv6_addr; flags interval; elements = {{\n{}\n}} }}\n\
         \tchain output {{ type filter hook output priority 0; policy accept;\n\
         \t\tip daddr @deny4 drop\n\t\tip6 daddr @deny6 drop\n\t}}\n\
         \tchain input {{ type filter hook input priority 0; policy accept;\n\
         \t\tip saddr @deny4 drop\n\t\tip6 saddr @deny6 drop\n\t}}\n\
         }}\n",
        geo::nft_elements(V4, &d4),
        geo::nft_elements(V6, &d6),
    );
    (text, d4.len(), d6.len())
}

/// Starts one of the bench's own servers and waits for its "listening".
fn helper_server(
    cgroup: &Path,
    ns: &Netns,
    program: &str,
    args: &[String],
    what: &str,
) -> Result<Bg> {
    let mut child = command_in(cgroup, Some(ns), Path::new(program), args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting the {what} server"))?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
    if line.trim() != "listening" {
        bail!("{what} server did not start: {line:?}");
    }
    Ok(Bg(child))
}

/// Sums the agent's counters per (hook, reason) for the hooks traffic hits.
fn counter_rows(agent: &Agent) -> Result<Vec<(Hook, u8, u64)>> {
    let map = sys::obj_get(&agent.map("BH_COUNTERS"))?;
    let cpus = sys::possible_cpus();
    let mut out = Vec::new();
    for hook in [
        Hook::Connect4,
        Hook::Sendmsg4,
        Hook::SkbEgress,
        Hook::SkbIngress,
    ] {
        for r in 0..REASON_SLOTS as u8 {
            let n = sys::percpu_u64_sum(&map, counter_index(hook as u8, r), cpus)?;
            out.push((hook, r, n));
        }
    }
    Ok(out)
}

fn counter_delta(before: &[(Hook, u8, u64)], after: &[(Hook, u8, u64)]) -> Value {
    let mut m = serde_json::Map::new();
    for ((h, r, a), (_, _, b)) in after.iter().zip(before) {
        if a > b {
            let name = bulkhead_common::Reason::from_code(*r).map_or("?", |x| x.name());
            m.insert(format!("{}/{}", h.name(), name), json!(a - b));
        }
    }
    Value::Object(m)
}

pub fn phase(ctx: &Ctx, agent: &Agent, spec: &Spec) -> Result<Value> {
    let t = &ctx.tag;
    let s = Netns::new(format!("{t}s"))?;
    let c0 = Netns::new(format!("{t}c0"))?;
    let c1 = Netns::new(format!("{t}c1"))?;
    veth(
        &c0,
        &s,
        (&format!("{t}a0"), &format!("{t}b0")),
        "10.251.0",
        0,
    )?;
    veth(
        &c1,
        &s,
        (&format!("{t}a1"), &format!("{t}b1")),
        "10.251.1",
        1,
    )?;
    for ns in [&c0, &c1] {
        ns.exec("sysctl -q -w net.ipv4.ip_local_port_range='1024 65000'")?;
    }

    // nftables: the same denied addresses as the full policy, loaded into
    // C1 (timed), and into fresh namespaces for more samples.
    let (rules, n4, n6) = nft_ruleset(spec, ctx);
    let rules_path = ctx.work.join("nft-full.nft");
    std::fs::write(&rules_path, &rules)?;
    let overhead = exec_overhead_ms(&c1);
    let nft_load = |ns: &Netns, file: &Path| -> Result<(f64, f64)> {
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &ns.name, "nft", "-f"]).arg(file);
        let (wall, cpu, ok, _, err) = run_timed(&mut cmd)?;
        if !ok {
            bail!("nft -f {} failed: {err}", file.display());
        }
        Ok((wall - overhead, cpu))
    };
    let mut loads = Vec::new();
    let mut load_cpu = Vec::new();
    let (w, c) = nft_load(&c1, &rules_path)?;
    loads.push(w);
    load_cpu.push(c);
    eprintln!("  nft -f with {n4} IPv4 + {n6} IPv6 interval elements: {w:.0} ms ({c:.0} ms CPU)");
    for i in 1..ctx.p.nft_reps {
        let ns = Netns::new(format!("{t}n{i}"))?;
        let (w, c) = nft_load(&ns, &rules_path)?;
        loads.push(w);
        load_cpu.push(c);
        eprintln!("  nft -f again: {w:.0} ms ({c:.0} ms CPU)");
    }
    // The same sets as CIDR prefixes (how prefix-based tools hold them).
    let (p4, np4) = geo::nft_prefix_elements(V4, &spec.deny_ranges(&ctx.db, V4));
    let (p6, np6) = geo::nft_prefix_elements(V6, &spec.deny_ranges(&ctx.db, V6));
    let prefix_rules = format!(
        "table inet bhbench {{\n\tset deny4 {{ type ipv4_addr; flags interval; elements = {{\n{p4}\n}} }}\n\tset deny6 {{ type ipv6_addr; flags interval; elements = {{\n{p6}\n}} }}\n}}\n"
    );
    let prefix_path = ctx.work.join("nft-prefixes.nft");
    std::fs::write(&prefix_path, &prefix_rules)?;
    let (prefix_ms, prefix_cpu_ms) = {
        let ns = Netns::new(format!("{t}np"))?;
        nft_load(&ns, &prefix_path)?
    };
    eprintln!("  nft -f of the same sets as {np4} IPv4 + {np6} IPv6 prefixes: {prefix_ms:.0} ms");
    // One-element update, like the agent's one-network reload.
    let d4 = spec.deny_ranges(&ctx.db, V4);
    let (a, b) = d4[d4.len() / 2];
    let elem = format!("{}-{}", geo::fmt_addr(V4, a), geo::fmt_addr(V4, b));
    c1.exec(&format!(
        "nft delete element inet bhbench deny4 {{ {elem} }}"
    ))?;
    let start = Instant::now();
    c1.exec(&format!("nft add element inet bhbench deny4 {{ {elem} }}"))?;
    let nft_update_ms = start.elapsed().as_secs_f64() * 1e3 - overhead;

    // Servers, outside the agent's subtree, on the clients' CPU.
    let free = &ctx.cg_free.path;
    let mut servers = Vec::new();
    for (proto, port) in [("", UDP_PORT), ("--tcp", TCP_PORT)] {
        // chrt and taskset exec, so killing the child kills the server.
        let mut args = pinned_rt().split_off(1);
        args.extend(["sockperf".into(), "sr".into()]);
        if !proto.is_empty() {
            args.push(proto.into());
        }
        args.extend(["-i".into(), "0.0.0.0".into(), "-p".into(), port.to_string()]);
        let child = command_in(free, Some(&s), Path::new("chrt"), &args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting sockperf server")?;
        servers.push(Bg(child));
    }
    let mut args = vec![
        "-c".to_string(),
        "1".into(),
        ctx.exe.to_string_lossy().into(),
    ];
    args.extend(ctx.helper_args("crr-server", &[CRR_PORT.to_string(), "3600".into()]));
    servers.push(helper_server(free, &s, "taskset", &args, "connect")?);
    let mut args = pinned_rt().split_off(1);
    args.push(ctx.exe.to_string_lossy().into());
    args.extend(ctx.helper_args("rr-server", &[AB_PORT.to_string(), "3600".into()]));
    servers.push(helper_server(free, &s, "chrt", &args, "request/response")?);
    std::thread::sleep(Duration::from_millis(300));

    // The floor: `r0 = 1` on the hooks a client of a domain passes, in a
    // cgroup of its own outside the agent's subtree. Its distance from no
    // policy is what attaching anything there costs, which no program can
    // win back. The links detach when the phase ends.
    let floor = &ctx.cg_floor.path;
    let _floor_links = sys::attach_allow_all(floor).map_err(|e| anyhow!("{e}"))?;
    let all = [
        Mode {
            key: "none",
            label: "no policy",
            ns: &c0,
            cgroup: free,
            server: "10.251.0.2",
        },
        Mode {
            key: "allow_all",
            label: "r0 = 1 on the same hooks",
            ns: &c0,
            cgroup: floor,
            server: "10.251.0.2",
        },
        Mode {
            key: "bulkhead",
            label: "bulkhead, full DB + 10k networks",
            ns: &c0,
            cgroup: &ctx.cg_work.path,
            server: "10.251.0.2",
        },
        Mode {
            key: "bulkhead_nogeo",
            label: "bulkhead, domain without country rules",
            ns: &c0,
            cgroup: &ctx.cg_plain.path,
            server: "10.251.0.2",
        },
        Mode {
            key: "nftables",
            label: "nftables, same sets",
            ns: &c1,
            cgroup: free,
            server: "10.251.1.2",
        },
    ];
    // The quick run skips the extra modes to stay within its time budget.
    let modes: Vec<Mode> = all
        .into_iter()
        .filter(|m| !(ctx.quick && matches!(m.key, "bulkhead_nogeo" | "allow_all")))
        .collect();

    // Warm-up, and a check that every mode reaches its server.
    for m in &modes {
        run_test(ctx, m, "udp_rr")?;
    }
    let before = counter_rows(agent)?;
    let mut vals: std::collections::BTreeMap<(&str, &str), Vec<f64>> = Default::default();
    for round in 0..ctx.p.net_rounds {
        // A test's modes run back to back, so a round's pair (mode, no
        // policy) is seconds apart and shares the machine's mood.
        for (test, _, _) in TESTS {
            for k in 0..modes.len() {
                let m = &modes[(k + round) % modes.len()];
                let v = run_test(ctx, m, test)?;
                vals.entry((m.key, test)).or_default().push(v);
            }
        }
        eprintln!(
            "  round {}/{}: {}",
            round + 1,
            ctx.p.net_rounds,
            TESTS
                .iter()
                .map(|(test, _, _)| {
                    let none = vals[&("none", *test)].last().copied().unwrap_or(f64::NAN);
                    let bh = vals[&("bulkhead", *test)]
                        .last()
                        .copied()
                        .unwrap_or(f64::NAN);
                    let nft = vals[&("nftables", *test)]
                        .last()
                        .copied()
                        .unwrap_or(f64::NAN);
                    format!("{test} bh {:.3} nft {:.3}", bh / none, nft / none)
                })
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let after = counter_rows(agent)?;
    let interleaved = interleaved(ctx, &modes)?;

    // Per-call run time of the programs under this traffic (bpf_stats).
    let bulkhead = modes
        .iter()
        .find(|m| m.key == "bulkhead")
        .expect("the bulkhead mode runs in every bench");
    let stats =
        bpf_stats(ctx, agent, bulkhead).unwrap_or_else(|e| json!({"error": format!("{e:#}")}));

    let mut tests = Vec::new();
    for (test, label, unit) in TESTS {
        let none = median(&vals[&("none", test)]);
        let mut by_mode = serde_json::Map::new();
        for m in &modes {
            let v = &vals[&(m.key, test)];
            // Paired ratios: each round's value against that round's no-policy value.
            let paired: Vec<f64> = v
                .iter()
                .zip(&vals[&("none", test)])
                .map(|(a, b)| a / b)
                .collect();
            by_mode.insert(
                m.key.into(),
                json!({
                    "median": median(v),
                    "ratio_to_none": median(v) / none,
                    "paired_ratio_median": median(&paired),
                    "rounds": v,
                }),
            );
        }
        tests.push(json!({"key": test, "label": label, "unit": unit, "modes": by_mode}));
    }
    Ok(json!({
        "modes": modes.iter().map(|m| json!({"key": m.key, "label": m.label})).collect::<Vec<_>>(),
        "tests": tests,
        "interleaved": interleaved,
        "bulkhead_counters": counter_delta(&before, &after),
        "bpf_stats": stats,
        "nft": {
            "elements_v4": n4,
            "elements_v6": n6,
            "load_ms": median(&loads),
            "load_ms_all": loads,
            "load_cpu_ms": median(&load_cpu),
            "update_one_element_ms": nft_update_ms,
            "prefix_form": {"elements_v4": np4, "elements_v6": np6, "load_ms": prefix_ms, "load_cpu_ms": prefix_cpu_ms},
            "exec_overhead_ms": overhead,
            "ruleset_bytes": rules.len(),
        },
    }))
}

/// The interleaved tests: (the `ab` client's protocol, the test's key,
/// the server's port).
const INTERLEAVED: [(&str, &str, u16); 4] = [
    ("tcp", "tcp_rr", AB_PORT),
    ("udp", "udp_rr", AB_PORT),
    ("crr", "tcp_crr", CRR_PORT),
    ("send", "udp_tp", AB_PORT + 1),
];

/// TCP and UDP request/response, short connections and unconnected
/// datagrams, every mode in one client process, batches taking turns (see
/// `ab`), plus a second no-policy mode: how far two identical modes land
/// apart is the method's own error.
fn interleaved(ctx: &Ctx, modes: &[Mode]) -> Result<Value> {
    let free = ctx.cg_free.path.to_string_lossy();
    let secs = ctx.p.ab_secs;
    let mut out = serde_json::Map::new();
    for (proto, key, port) in INTERLEAVED {
        let mut specs = Vec::new();
        for m in modes {
            let spec = |key: &str| {
                format!(
                    "{key}={},{},{}:{port}",
                    m.cgroup.display(),
                    m.ns.path().display(),
                    m.server
                )
            };
            specs.push(spec(m.key));
            if m.key == "none" {
                specs.push(spec("none_again"));
            }
        }
        let mut args: Vec<String> = vec![(secs + 30).to_string()];
        args.extend(pinned_rt());
        args.push(ctx.exe.to_string_lossy().into());
        let mut helper = vec![proto.to_string(), secs.to_string(), free.to_string()];
        helper.extend(specs.iter().cloned());
        args.extend(ctx.helper_args("rr-client", &helper));
        let run = command_in(&ctx.cg_free.path, None, Path::new("timeout"), &args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running the interleaved {key} client"))?;
        if !run.status.success() {
            bail!(
                "interleaved {key} failed ({}): {}",
                run.status,
                String::from_utf8_lossy(&run.stderr)
            );
        }
        let v: Value = serde_json::from_slice(&run.stdout)
            .with_context(|| format!("parsing the interleaved {key} client's output"))?;
        eprintln!(
            "  interleaved {key} over {} rounds: {}",
            v["rounds"],
            modes
                .iter()
                .map(|m| m.key)
                .chain(["none_again"])
                .map(|k| format!(
                    "{k} {:.4}",
                    v["modes"][k]["paired_ratio_median"]
                        .as_f64()
                        .unwrap_or(f64::NAN)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        out.insert(key.into(), v);
    }
    Ok(Value::Object(out))
}

fn per_call(calls: u64, ns: u64) -> Value {
    json!({"calls": calls, "ns_per_call": if calls > 0 { ns as f64 / calls as f64 } else { f64::NAN }})
}

/// The `r0 = 1` program in the bpf_stats report.
pub const ALLOW_ALL: &str = "allow_all";

/// Enables `kernel.bpf_stats_enabled` for one more bulkhead-mode run of
/// each test and reports the programs' run time per call, per test, and
/// per unit of each test (what the hooks add to one transaction).
fn bpf_stats(ctx: &Ctx, agent: &Agent, m: &Mode) -> Result<Value> {
    let path = "/proc/sys/kernel/bpf_stats_enabled";
    let old = std::fs::read_to_string(path)?.trim().to_string();
    // `bh_sock_create` returns at once for TCP and UDP sockets, and
    // `r0 = 1` (attached beside the agent's programs, on the client's
    // cgroup, both directions) does nothing: what a call costs under the
    // same traffic before a program does any work, the clock reads of the
    // statistics included.
    let hooks = [
        "bh_egress",
        "bh_ingress",
        "bh_connect4",
        "bh_sendmsg4",
        "bh_sock_create",
    ];
    let mut progs: Vec<&str> = hooks.to_vec();
    let mut fds: Vec<_> = hooks
        .iter()
        .map(|p| sys::obj_get(&agent.link(p)).and_then(|l| sys::link_prog(&l)))
        .collect::<std::io::Result<_>>()?;
    let allow = sys::load_allow_all().map_err(|e| anyhow!("loading allow-all: {e}"))?;
    let _links = [sys::BPF_CGROUP_INET_EGRESS, sys::BPF_CGROUP_INET_INGRESS]
        .map(|t| sys::link_cgroup(&allow, m.cgroup, t))
        .into_iter()
        .collect::<std::io::Result<Vec<_>>>()
        .context("attaching r0 = 1 beside the agent")?;
    progs.push(ALLOW_ALL);
    fds.push(allow);
    std::fs::write(path, "1")?;
    let result = (|| -> Result<Value> {
        let snap =
            || -> std::io::Result<Vec<sys::ProgInfo>> { fds.iter().map(sys::prog_info).collect() };
        let mut totals = vec![(0u64, 0u64); progs.len()];
        let mut by_test = serde_json::Map::new();
        for (test, _, _) in TESTS {
            let before = snap()?;
            let rate = run_test(ctx, m, test)?;
            let after = snap()?;
            let mut per = serde_json::Map::new();
            let mut ns_total = 0u64;
            for (i, (b, a)) in before.iter().zip(&after).enumerate() {
                let (calls, ns) = (a.run_cnt - b.run_cnt, a.run_time_ns - b.run_time_ns);
                totals[i].0 += calls;
                totals[i].1 += ns;
                if progs[i] != ALLOW_ALL {
                    ns_total += ns;
                }
                per.insert(progs[i].into(), per_call(calls, ns));
            }
            // Program time per unit of the test (transaction, message,
            // connection), against the unit's time at the measured rate.
            let units = rate * f64::from(ctx.p.net_secs);
            let ns_per_unit = ns_total as f64 / units;
            per.insert(
                "per_unit".into(),
                json!({"ns": ns_per_unit, "share": ns_per_unit * rate / 1e9, "rate": rate}),
            );
            by_test.insert(test.into(), Value::Object(per));
        }
        let mut out = serde_json::Map::new();
        for (name, (calls, ns)) in progs.iter().zip(totals) {
            out.insert((*name).into(), per_call(calls, ns));
        }
        out.insert("by_test".into(), Value::Object(by_test));
        // One more run of the tests where the hooks' cost is the
        // question (connects; the cached path of established packets)
        // under `perf`, whose sampling must not skew the run times above.
        let mut profile = serde_json::Map::new();
        for test in ["tcp_crr", "tcp_rr"] {
            let v = profile::start(&ctx.work, test)
                .and_then(|rec| {
                    run_test(ctx, m, test)?;
                    rec.finish(&hooks)
                })
                .unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
            profile.insert(test.into(), v);
        }
        out.insert("profile".into(), Value::Object(profile));
        Ok(Value::Object(out))
    })();
    let _ = std::fs::write(path, old);
    result
}

/// Helper: accepts connections, echoes one byte, closes. Exits after the
/// given number of seconds at the latest.
pub fn crr_server(args: &[String]) -> Result<()> {
    let port = world::server_args(args)?;
    let l = TcpListener::bind(("0.0.0.0", port))?;
    println!("listening");
    std::io::stdout().flush()?;
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        let mut b = [0u8; 1];
        if s.read_exact(&mut b).is_ok() {
            let _ = s.write_all(&b);
        }
    }
    Ok(())
}

/// Helper: connect, send one byte, read it back, close with RST (no
/// TIME_WAIT), for the given seconds. Prints `connections errors seconds`.
pub fn crr_client(args: &[String]) -> Result<()> {
    let addr: SocketAddr = args.first().ok_or_else(|| anyhow!("address"))?.parse()?;
    let secs: f64 = args.get(1).map_or(Ok(1.0), |s| s.parse())?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let (mut n, mut errors) = (0u64, 0u64);
    while Instant::now() < deadline && errors < 1000 {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(mut s) => {
                ab::close_with_rst(&s);
                let mut b = [0u8; 1];
                if s.write_all(b"x").is_ok() && s.read_exact(&mut b).is_ok() {
                    n += 1;
                } else {
                    errors += 1;
                }
            }
            Err(_) => errors += 1,
        }
    }
    println!("{n} {errors} {:.6}", start.elapsed().as_secs_f64());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sockperf() {
        let tp = "sockperf: Summary: Message Rate is 140986 [msg/sec]\n";
        assert_eq!(sockperf_value(tp, "udp_tp"), Some(140986.0));
        let pp = "sockperf: Summary: Latency is 10.000 usec\n";
        assert_eq!(sockperf_value(pp, "tcp_rr"), Some(50_000.0));
    }
}
