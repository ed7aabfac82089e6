//! A bounded deny storm: N `connect()`s from the workload's cgroup to
//! another domain's addresses, inside a namespace with no route out (so
//! even a wrongly allowed connect sends nothing). Every connect must fail
//! with `EPERM`; every decision that wanted an event must be accounted
//! for: delivered to the events log, rate limited, or lost in the ring
//! buffer, each counted by the kernel.

use std::{
    fs,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use bulkhead_common::{
    Hook, Reason,
    maps::{
        COUNTER_EVENTS_LOST, COUNTER_EVENTS_RATE_LIMITED, COUNTER_EVENTS_WANTED, counter_index,
    },
};
use serde_json::{Value, json};

use super::{
    Ctx,
    geo::{self, V4},
    policy::{BENCH, Spec},
    sys,
    world::{Agent, Netns, command_in},
};

fn counters(agent: &Agent) -> Result<[u64; 4]> {
    let map = sys::obj_get(&agent.map("BH_COUNTERS"))?;
    let cpus = sys::possible_cpus();
    let mut out = [0u64; 4];
    for (i, idx) in [
        counter_index(Hook::Connect4 as u8, Reason::CrossDomain as u8),
        COUNTER_EVENTS_WANTED,
        COUNTER_EVENTS_RATE_LIMITED,
        COUNTER_EVENTS_LOST,
    ]
    .into_iter()
    .enumerate()
    {
        out[i] = sys::percpu_u64_sum(&map, idx, cpus)?;
    }
    Ok(out)
}

fn size(path: &std::path::Path) -> u64 {
    fs::metadata(path).map_or(0, |m| m.len())
}

pub fn phase(ctx: &Ctx, spec: &Spec) -> Result<Value> {
    let policy = ctx.write_policy(spec)?;
    // Targets: hosts in the other domains' IPv4 networks of this policy.
    let targets: Vec<String> = spec
        .nets
        .iter()
        .filter(|n| n.family == V4 && n.domain != BENCH)
        .map(|n| format!("{}:443", geo::fmt_addr(V4, n.start + 7)))
        .collect();
    if targets.is_empty() {
        bail!("storm: the policy has no other-domain networks");
    }
    let targets_path = ctx.work.join("storm-targets.txt");
    fs::write(&targets_path, targets.join("\n"))?;
    let ns = Netns::new(format!("{}st", ctx.tag))?;
    let n = ctx.p.storm_n;
    let mut runs = Vec::new();
    for (key, label, extra) in [
        (
            "unlimited",
            "no rate limit, 1 MiB ring",
            vec!["--event-rate", "0"],
        ),
        (
            "unlimited_no_db",
            "no rate limit, 1 MiB ring, no SQLite audit store",
            vec!["--event-rate", "0", "--no-audit-db"],
        ),
        (
            "unlimited_sealed",
            "no rate limit, 1 MiB ring, trail sealed (audit setup-keys)",
            vec!["--event-rate", "0"],
        ),
        (
            "default",
            "default limits (1000/s per cgroup, burst 2000)",
            vec![],
        ),
        (
            "small_ring",
            "no rate limit, 16 KiB ring",
            vec!["--event-rate", "0", "--ring-buffer-bytes", "16384"],
        ),
    ] {
        if ctx.quick && key == "unlimited_no_db" {
            continue;
        }
        if key == "unlimited_sealed" {
            // The key where the agent's state goes: it seals from its start.
            let state = ctx.work.join(format!("state-storm-{key}"));
            crate::cmd::run(
                std::process::Command::new(&ctx.bin)
                    .args(["audit", "setup-keys", "--force", "--state-dir"])
                    .arg(&state)
                    .stdout(Stdio::null()),
            )?;
        }
        let mut agent = ctx.start_agent(&format!("storm-{key}"), &policy, &extra)?;
        let before = counters(&agent)?;
        let start = Instant::now();
        let out = command_in(
            &ctx.cg_work.path,
            Some(&ns),
            &ctx.exe,
            &ctx.helper_args(
                "storm",
                &[targets_path.to_string_lossy().into(), n.to_string()],
            ),
        )
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running the storm helper")?;
        let storm_s = start.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!("storm helper failed ({})", out.status);
        }
        let h: Value = serde_json::from_slice(&out.stdout).context("storm helper output")?;
        let after = counters(&agent)?;
        let d: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        let (decisions, wanted, limited, lost) = (d[0], d[1], d[2], d[3]);
        let emitted = wanted - limited - lost;
        // Wait (bounded) until the events log stops growing: the agent has
        // written what it could.
        let mut last = size(&agent.events);
        let mut last_change = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline && last_change.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(100));
            let now = size(&agent.events);
            if now != last {
                last = now;
                last_change = Instant::now();
            }
        }
        let drained_s = last_change.duration_since(start).as_secs_f64();
        agent.stop();
        let text = fs::read_to_string(&agent.events).unwrap_or_default();
        let delivered = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<Value>(l).is_ok_and(|e| {
                    e["verdict"] == "deny"
                        && e["hook"] == "connect4"
                        && e["reason"] == "cross-domain"
                })
            })
            .count() as u64;
        let eperm = h["eperm"].as_u64().unwrap_or(0);
        let ok = eperm == n as u64
            && decisions == n as u64
            && wanted == decisions
            && delivered == emitted;
        eprintln!(
            "  storm {key}: {n} connects in {:.2} s ({:.0}/s), EPERM {eperm}; events wanted {wanted}, delivered {delivered}, rate limited {limited}, lost {lost}; accounted: {ok}",
            h["secs"].as_f64().unwrap_or(f64::NAN),
            n as f64 / h["secs"].as_f64().unwrap_or(f64::NAN),
        );
        runs.push(json!({
            "key": key,
            "label": label,
            "connects": n,
            "eperm": eperm,
            "other_errors": h["other"],
            "connect_secs": h["secs"],
            "connects_per_s": n as f64 / h["secs"].as_f64().unwrap_or(f64::NAN),
            "decisions": decisions,
            "events_wanted": wanted,
            "events_rate_limited": limited,
            "events_lost": lost,
            "events_emitted": emitted,
            "events_delivered": delivered,
            "storm_wall_s": storm_s,
            "delivered_by_s": drained_s,
            "delivered_per_s": delivered as f64 / drained_s.max(1e-9),
            "accounted": ok,
        }));
        drop(agent);
    }
    Ok(json!({"targets": targets.len(), "runs": runs}))
}

/// Helper: `connect()`s round robin to the targets; prints a JSON summary.
pub fn helper(args: &[String]) -> Result<()> {
    let text = fs::read_to_string(args.first().ok_or_else(|| anyhow!("targets"))?)?;
    let n: usize = args.get(1).ok_or_else(|| anyhow!("count"))?.parse()?;
    let targets: Vec<libc::sockaddr_in> = text
        .lines()
        .map(|l| {
            let a: std::net::SocketAddrV4 = l.parse()?;
            Ok(libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            })
        })
        .collect::<Result<_>>()?;
    let (mut eperm, mut other) = (0u64, 0u64);
    let start = Instant::now();
    for i in 0..n {
        let t = &targets[i % targets.len()];
        // SAFETY: plain socket calls on a descriptor we own and close.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                bail!("socket: {}", std::io::Error::last_os_error());
            }
            let rc = libc::connect(
                fd,
                (t as *const libc::sockaddr_in).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            if rc != 0 && *libc::__errno_location() == libc::EPERM {
                eperm += 1;
            } else {
                other += 1;
            }
            libc::close(fd);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"n": n, "eperm": eperm, "other": other, "secs": secs})
    );
    Ok(())
}

/// The audit trail's writers alone (`agent/examples/trail_rate.rs`): events
/// per second to the events log and to the audit store, and each writer's
/// CPU per event, unsealed against sealed, alternating in one run.
pub fn trail(ctx: &Ctx) -> Result<Value> {
    crate::cmd::run(crate::cmd::cargo().args([
        "build",
        "--release",
        "--package",
        "bulkhead",
        "--features",
        crate::AGENT_FEATURES,
        "--example",
        "trail_rate",
    ]))?;
    let exe = crate::cmd::workspace_root().join("target/release/examples/trail_rate");
    let (n, rounds) = if ctx.quick { (50_000, 1) } else { (200_000, 5) };
    let out = std::process::Command::new(&exe)
        .arg(ctx.work.join("trail"))
        .args([n.to_string(), rounds.to_string()])
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", exe.display()))?;
    if !out.status.success() {
        bail!("trail_rate failed ({})", out.status);
    }
    serde_json::from_slice(&out.stdout).context("trail_rate output")
}
