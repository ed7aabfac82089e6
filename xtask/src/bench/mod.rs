//! `cargo xtask bench`: bulkhead's benchmarks, measured side by side with
//! their baselines in one run on one machine, written to
//! `bench/results.json`, `bench/*.svg` and `BENCHMARKS.md`.
//!
//! Phases (each runs in the benchmark's own cgroup subtree, network
//! namespaces and bpffs directories, all removed at the end):
//! 1. load: every policy of the ladder (empty → full country DB + 10k
//!    networks) through `bulkhead check` and `bulkhead run` (spawn →
//!    `READY=1`), agent RSS, kernel map memory;
//! 2. decision: `BPF_PROG_TEST_RUN` of each policy's real `bh_egress`
//!    against an allow-all program and bare LPM lookups;
//! 3. update: one network added by SIGHUP reload;
//! 4. network: UDP/TCP request/response, UDP send rate and TCP connect
//!    rate between namespaces over veth: no policy, bulkhead, nftables
//!    with the same address sets (and its `nft -f` load time);
//! 5. storm: a bounded deny storm, events delivered against the kernel's
//!    counters;
//! 6. names: 1,000 lookups at a real resolver and connects to the learned
//!    addresses, with and without `egress.names` (`bpf_stats`).

mod ab;
mod decision;
mod geo;
mod hooks;
mod names;
mod net;
mod policy;
mod profile;
mod report;
mod stats;
mod storm;
mod sys;
mod world;

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::{Value, json};

use crate::{
    cmd::{is_root, workspace_root},
    setup::{ensure_bpffs, geo_db_path, skip_or_fail},
};
use geo::{Db, Rng, V4, V6};
use policy::Spec;
use stats::median;
use world::{Agent, Cgroup, MemCgroup};

#[derive(clap::Args)]
pub struct Args {
    /// A sanity run in under 3 minutes: fewer packets, repetitions and
    /// rounds. The numbers are noisier; the full run takes under 20.
    #[arg(long)]
    quick: bool,
    /// Run only these phases after the load phase (comma-separated:
    /// decision, update, network, storm, names; `load` for none), for working on
    /// one of them. The
    /// results go to target/bench-partial.json; BENCHMARKS.md is not
    /// touched.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Internal: the helper processes the benchmark starts inside cgroups
    /// and network namespaces (test-run loop, connect loops, servers).
    #[arg(long, hide = true, num_args = 1.., allow_hyphen_values = true)]
    internal: Vec<String>,
}

/// How much of everything to do.
#[derive(Clone, Copy, Debug)]
pub struct Params {
    /// Packets per packet set (each a different destination).
    pub packets: usize,
    /// `BPF_PROG_TEST_RUN` repetitions per packet in the warm measurement.
    pub repeat: u32,
    /// Rounds over all programs (medians are taken over rounds).
    pub rounds: usize,
    /// Agent starts per policy (spawn → READY).
    pub load_reps: usize,
    pub check_reps: usize,
    pub nft_reps: usize,
    pub update_reps: usize,
    /// Alternating rounds over the network modes.
    pub net_rounds: usize,
    /// Seconds per network measurement.
    pub net_secs: u32,
    /// Seconds of each interleaved request/response run.
    pub ab_secs: u32,
    /// Denied connects in the deny storm.
    pub storm_n: usize,
}

impl Params {
    fn new(quick: bool) -> Params {
        if quick {
            Params {
                packets: 1024,
                repeat: 50,
                rounds: 3,
                load_reps: 1,
                check_reps: 1,
                nft_reps: 1,
                update_reps: 1,
                net_rounds: 1,
                net_secs: 1,
                ab_secs: 3,
                storm_n: 20_000,
            }
        } else {
            Params {
                packets: 4096,
                repeat: 200,
                rounds: 7,
                load_reps: 3,
                check_reps: 5,
                nft_reps: 3,
                update_reps: 3,
                net_rounds: 10,
                net_secs: 2,
                ab_secs: 20,
                storm_n: 200_000,
            }
        }
    }
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Everything the phases share.
pub struct Ctx {
    pub p: Params,
    pub quick: bool,
    /// The `bulkhead` binary.
    pub bin: PathBuf,
    /// This executable, for the helper processes.
    pub exe: PathBuf,
    pub work: PathBuf,
    /// Short unique tag for namespace and interface names.
    pub tag: String,
    pub root: Cgroup,
    pub cg_work: Cgroup,
    pub cg_plain: Cgroup,
    pub _cg_others: Vec<Cgroup>,
    /// Outside the subtree the agents attach to: no bulkhead programs.
    pub cg_free: Cgroup,
    /// Outside it too, for the network phase's `r0 = 1` floor.
    pub cg_floor: Cgroup,
    pub db_path: PathBuf,
    pub feed_path: PathBuf,
    pub db: Db,
    /// The agents' memory cgroup (`None`: the kernel has no controller).
    pub memcg: Option<MemCgroup>,
}

impl Ctx {
    pub fn policy_path(&self, key: &str) -> PathBuf {
        self.work.join(format!("policy-{key}.yaml"))
    }

    pub fn write_policy(&self, spec: &Spec) -> Result<PathBuf> {
        let path = self.policy_path(spec.key);
        let yaml = spec.yaml(
            &self.root.rel,
            &self.db_path.to_string_lossy(),
            &self.feed_path.to_string_lossy(),
        );
        fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    pub fn start_agent(&self, key: &str, policy: &Path, extra: &[&str]) -> Result<Agent> {
        Agent::start(
            &self.bin,
            &self.work,
            key,
            policy,
            &self.root.path,
            self.memcg.as_ref(),
            extra,
        )
    }

    /// Arguments for a helper: `bench --internal KIND ARGS...`.
    pub fn helper_args(&self, kind: &str, args: &[String]) -> Vec<String> {
        let mut v = vec!["bench".to_string(), "--internal".into(), kind.into()];
        v.extend_from_slice(args);
        v
    }

    /// Runs helper `KIND ARGS` in the workload's cgroup and `ns` and
    /// returns the JSON it prints; `what` names it in errors.
    pub fn workload_helper(
        &self,
        ns: &world::Netns,
        kind: &str,
        args: &[String],
        what: &str,
    ) -> Result<Value> {
        let run = world::command_in(
            &self.cg_work.path,
            Some(ns),
            &self.exe,
            &self.helper_args(kind, args),
        )
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running the {what}"))?;
        if !run.status.success() {
            bail!(
                "the {what} failed: {}",
                String::from_utf8_lossy(&run.stdout)
            );
        }
        Ok(serde_json::from_slice(&run.stdout)?)
    }
}

pub fn run(args: Args) -> Result<()> {
    if !args.internal.is_empty() {
        return internal(&args.internal);
    }
    if !is_root() {
        return skip_or_fail(
            "cargo xtask bench",
            "it loads eBPF programs and creates cgroups and network namespaces: run it as root",
        );
    }
    let started = Instant::now();
    let p = Params::new(args.quick);
    eprintln!(
        "bench: {} run ({p:?})",
        if args.quick { "quick" } else { "full" }
    );
    // BULKHEAD_BIN names a prebuilt agent (as for the end-to-end tests);
    // otherwise build the release binary.
    let bin = match std::env::var_os("BULKHEAD_BIN") {
        Some(p) => PathBuf::from(p),
        // The features the tests build with, so that after `cargo xtask
        // test` nothing is compiled again.
        None => crate::build_agent(true)?,
    };
    if !bin.is_file() {
        bail!("{} missing after the build", bin.display());
    }
    ensure_bpffs()?;
    for tool in ["ip", "nft", "sockperf", "taskset", "chrt", "timeout"] {
        if crate::cmd::probe(Command::new("sh").args(["-c", &format!("command -v {tool}")]))
            .is_none()
        {
            bail!(
                "`{tool}` not found: run `cargo xtask setup` (it installs iproute2, nftables, sockperf, util-linux)"
            );
        }
    }
    let db_path = geo_db_path()?;
    if !db_path.is_file() {
        bail!(
            "the test country database {} is missing: run `cargo xtask setup`",
            db_path.display()
        );
    }

    let pid = std::process::id();
    let work = PathBuf::from(format!("/tmp/bulkhead-bench-{pid}"));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    // The agent refuses policy files others could change, whatever the umask.
    fs::set_permissions(&work, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    let _work_guard = TempDir(work.clone());
    let mount = world::cgroup2_mount()?;
    let root = Cgroup::new(&mount, &format!("/bulkhead-bench-{pid}"))?;
    let cg_free = Cgroup::new(&mount, &format!("/bulkhead-bench-{pid}-free"))?;
    let cg_floor = Cgroup::new(&mount, &format!("/bulkhead-bench-{pid}-floor"))?;
    let memcg = MemCgroup::new(&format!("bulkhead-bench-{pid}-agent"))?;
    let cg_work = root.child("work")?;
    let cg_plain = root.child("plain")?;
    let mut others = Vec::new();
    for d in 3..=10 {
        others.push(root.child(&format!("d{d}"))?);
    }
    let feed_path = work.join("geofeed.csv");
    fs::write(&feed_path, policy::FEED)?;
    let t = Instant::now();
    let db = Db::load(&db_path)?;
    eprintln!(
        "bench: read {} ({} IPv4 + {} IPv6 networks, {} + {} country ranges) in {:.2} s",
        db_path.display(),
        db.records[V4],
        db.records[V6],
        db.spans[V4].len(),
        db.spans[V6].len(),
        t.elapsed().as_secs_f64()
    );
    let ctx = Ctx {
        p,
        quick: args.quick,
        bin,
        exe: std::env::current_exe().context("locating the xtask executable")?,
        work,
        tag: format!("bb{}", pid % 100_000),
        root,
        cg_work,
        cg_plain,
        _cg_others: others,
        cg_free,
        cg_floor,
        db_path,
        feed_path,
        db,
        memcg,
    };

    let mut rng = Rng::new(0x6275_6c6b_6865_6164);
    let nets = policy::gen_nets(&mut rng, 8000, 2000, 10);
    let specs = policy::ladder(&nets);

    let meta = meta(&ctx)?;
    let mut phases = serde_json::Map::new();
    let mut clock = Instant::now();
    let mut lap = |name: &str| {
        phases.insert(name.into(), json!(clock.elapsed().as_secs_f64()));
        clock = Instant::now();
    };
    lap("setup");
    let wanted = |phase: &str| args.only.is_empty() || args.only.iter().any(|p| p == phase);
    for p in &args.only {
        if !["load", "decision", "update", "network", "storm", "names"].contains(&p.as_str()) {
            bail!("--only: unknown phase {p:?} (load, decision, update, network, storm, names)");
        }
    }
    eprintln!("bench: phase 1/6: policy compile + load, agent memory");
    let (mut agents, loads) = phase_load(&ctx, &specs)?;
    lap("load");
    // How the measured agent made the socket storage map (README, Memory):
    // it decides what a connect's storage creation is charged to.
    let socket_storage = agents.last().and_then(|a| {
        let log = a.log.lock().expect("agent log");
        log.iter().find_map(|l| {
            l.split_once("socket storage")
                .map(|(_, t)| t.trim().to_string())
        })
    });
    let mut decision = Value::Null;
    if wanted("decision") {
        eprintln!("bench: phase 2/6: kernel decision cost (BPF_PROG_TEST_RUN)");
        decision = phase_decision(&ctx, &specs, &agents, &mut rng)?;
        lap("decision");
    }
    // Only the full policy stays attached for the rest.
    let mut full = agents.pop().expect("five agents");
    drop(agents);
    let mut update = Value::Null;
    if wanted("update") {
        eprintln!("bench: phase 3/6: policy update (one network, SIGHUP)");
        update = phase_update(&ctx, &mut full, specs.last().expect("ladder"))?;
        lap("update");
    }
    let mut network = Value::Null;
    if wanted("network") {
        eprintln!("bench: phase 4/6: network namespaces over veth: none vs bulkhead vs nftables");
        network = net::phase(&ctx, &full, specs.last().expect("ladder"))?;
        lap("network");
    }
    drop(full);
    let (mut storm, mut trail) = (Value::Null, Value::Null);
    if wanted("storm") {
        eprintln!(
            "bench: phase 5/6: deny storm, events against kernel counters; the trail's writers, sealed and not"
        );
        storm = storm::phase(&ctx, &specs[1])?;
        trail = storm::trail(&ctx)?;
        lap("storm");
    }
    let mut names = Value::Null;
    if wanted("names") {
        eprintln!(
            "bench: phase 6/6: names: learning from DNS answers, and connects with 1,000 learned names, against no names"
        );
        names = names::phase(&ctx)?;
        lap("names");
    }
    eprintln!("bench: phase seconds: {}", Value::Object(phases.clone()));

    let geo_analysis = geo_analysis(&ctx, &loads);
    let mut results = json!({
        "meta": meta,
        "params": {
            "quick": ctx.quick,
            "packets_per_set": p.packets,
            "repeat": p.repeat,
            "rounds": p.rounds,
            "load_reps": p.load_reps,
            "net_rounds": p.net_rounds,
            "net_secs": p.net_secs,
            "ab_secs": p.ab_secs,
            "storm_connects": p.storm_n,
        },
        "policies": loads,
        "geo_analysis": geo_analysis,
        "decision": decision,
        "update": update,
        "network": network,
        "storm": storm,
        "trail": trail,
        "names": names,
    });
    results["meta"]["duration_s"] = json!(started.elapsed().as_secs_f64());
    results["meta"]["phase_s"] = Value::Object(phases);
    results["meta"]["loadavg_end"] = json!(first_line("cat /proc/loadavg"));
    results["meta"]["socket_storage"] = json!(socket_storage);
    if !args.only.is_empty() {
        let path = workspace_root().join("target/bench-partial.json");
        fs::write(&path, serde_json::to_string_pretty(&results)?)?;
        eprintln!(
            "bench: partial run ({}): {}",
            args.only.join(","),
            path.display()
        );
        return Ok(());
    }
    report::write(&mut results)?;
    eprintln!(
        "bench: done in {:.0} s: bench/results.json, bench/*.svg, BENCHMARKS.md",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn internal(args: &[String]) -> Result<()> {
    match args.first().map(String::as_str) {
        Some("testrun") => decision::helper(args.get(1).ok_or_else(|| anyhow!("spec path"))?),
        Some("rr-server") => ab::server(&args[1..]),
        Some("rr-client") => ab::client(&args[1..]),
        Some("crr-server") => net::crr_server(&args[1..]),
        Some("crr-client") => net::crr_client(&args[1..]),
        Some("storm") => storm::helper(&args[1..]),
        Some("names-lookups") => names::lookups(&args[1..]),
        Some("names-connects") => names::connects(&args[1..]),
        Some("hooks-calls") => hooks::calls(&args[1..]),
        // Rewrites BENCHMARKS.md and the plots from bench/results.json.
        Some("report") => {
            let path = workspace_root().join("bench/results.json");
            let mut r: Value = serde_json::from_slice(&fs::read(&path)?)?;
            report::write(&mut r)
        }
        other => bail!("unknown internal helper {other:?}"),
    }
}

fn first_line(cmd: &str) -> String {
    world::sh(cmd)
        .map(|s| s.lines().next().unwrap_or_default().trim().to_string())
        .unwrap_or_default()
}

fn meta(ctx: &Ctx) -> Result<Value> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let mem_kib: u64 = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let root = workspace_root();
    let rev = first_line(&format!("git -C {} rev-parse --short HEAD", root.display()));
    let dirty = !first_line(&format!("git -C {} status --porcelain", root.display())).is_empty();
    Ok(json!({
        "date": first_line("date -u +%Y-%m-%dT%H:%M:%SZ"),
        "loadavg_start": first_line("cat /proc/loadavg"),
        "kernel": first_line("uname -r"),
        "cpu": cpu,
        "online_cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "mem_mib": mem_kib / 1024,
        "git": format!("{rev}{}", if dirty { "+dirty" } else { "" }),
        "sockperf": first_line("sockperf --version 2>&1"),
        "nft": first_line("nft --version"),
        "agent_memcg": ctx.memcg.as_ref().map(|m| m.describe.clone()),
        "geo_db": {
            "path": ctx.db_path,
            "networks_v4": ctx.db.records[V4],
            "networks_v6": ctx.db.records[V6],
            "country_ranges_v4": ctx.db.spans[V4].len(),
            "country_ranges_v6": ctx.db.spans[V6].len(),
        },
    }))
}

/// Total kernel memory of the maps pinned under an agent's directory.
fn map_memory(agent: &Agent) -> Value {
    let mut maps = serde_json::Map::new();
    let mut total = 0u64;
    if let Ok(entries) = fs::read_dir(agent.pins().join("maps")) {
        let mut names: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        names.sort();
        for path in names {
            let Ok(fd) = sys::obj_get(&path) else {
                continue;
            };
            let mem = sys::map_memlock(&fd).unwrap_or(0);
            let info = sys::map_info(&fd).unwrap_or_default();
            total += mem;
            maps.insert(
                path.file_name().unwrap_or_default().to_string_lossy().into(),
                json!({"bytes": mem, "type": info.map_type, "max_entries": info.max_entries, "key_size": info.key_size, "value_size": info.value_size}),
            );
        }
    }
    json!({"total_bytes": total, "maps": maps})
}

/// Size and verifier work of every program an agent pinned a link for,
/// and of those the packet hooks enter by a tail call.
fn program_sizes(agent: &Agent) -> Value {
    let mut progs = Vec::new();
    if let Ok(entries) = fs::read_dir(agent.pins().join("links")) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            progs.push((
                name,
                sys::obj_get(&e.path()).and_then(|l| sys::link_prog(&l)),
            ));
        }
    }
    for (name, array) in [
        ("bh_dns_egress", bulkhead_common::maps::MAP_DNS_EGRESS_TAIL),
        (
            "bh_dns_ingress",
            bulkhead_common::maps::MAP_DNS_INGRESS_TAIL,
        ),
    ] {
        let path = agent.pins().join("maps").join(array);
        let prog = sys::obj_get(&path).and_then(|a| sys::prog_array_prog(&a, 0));
        progs.push((name.to_string(), prog));
    }
    progs.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = serde_json::Map::new();
    for (name, prog) in progs {
        let Ok(info) = prog.and_then(|p| sys::prog_info(&p)) else {
            continue;
        };
        out.insert(
            name,
            json!({"verified_insns": info.verified_insns, "xlated_insns": info.xlated_len / 8, "jited_bytes": info.jited_len}),
        );
    }
    Value::Object(out)
}

/// `bulkhead check`: median wall and CPU ms, peak RSS (KiB), and its
/// "compiled:" line.
fn check_time(ctx: &Ctx, policy: &Path) -> Result<(f64, f64, u64, String)> {
    let mut wall = Vec::new();
    let mut cpu = Vec::new();
    let mut line = String::new();
    let mut peak = 0;
    for _ in 0..ctx.p.check_reps {
        let mut cmd = Command::new(&ctx.bin);
        cmd.arg("check").arg(policy);
        let (w, c, ok, out, err) = world::run_timed(&mut cmd)?;
        if !ok {
            bail!("bulkhead check {} failed:\n{out}{err}", policy.display());
        }
        wall.push(w);
        cpu.push(c);
        line = out
            .lines()
            .find(|l| l.starts_with("compiled:"))
            .unwrap_or_default()
            .to_string();
    }
    if let Some(kib) = check_peak_rss_kib(ctx, policy) {
        peak = kib;
    }
    Ok((median(&wall), median(&cpu), peak, line))
}

/// Peak RSS of `bulkhead check` (compile only) via wait4's rusage.
fn check_peak_rss_kib(ctx: &Ctx, policy: &Path) -> Option<u64> {
    let child = Command::new(&ctx.bin)
        .arg("check")
        .arg(policy)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut status = 0;
    // SAFETY: zeroed rusage filled by wait4 for our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    (rc > 0).then_some(ru.ru_maxrss as u64)
}

fn phase_load(ctx: &Ctx, specs: &[Spec]) -> Result<(Vec<Agent>, Value)> {
    let mut agents = Vec::new();
    let mut out = Vec::new();
    for spec in specs {
        let path = ctx.write_policy(spec)?;
        let (check_ms, check_cpu_ms, check_rss, compiled) = check_time(ctx, &path)?;
        let mut ready = Vec::new();
        let mut ready_cpu = Vec::new();
        let mut agent = None;
        for rep in 0..ctx.p.load_reps {
            if let Some(mut a) = agent.take() {
                Agent::stop(&mut a);
                drop(a);
            }
            // The probe programs (verified, pinned, never attached) serve
            // the decision phase's bare address-table walks.
            let a = ctx.start_agent(spec.key, &path, &["--bench-probes"])?;
            ready.push(a.ready.as_secs_f64() * 1e3);
            ready_cpu.push(a.ready_cpu_ms);
            eprintln!(
                "  {:<34} start {} → READY in {:>7.1} ms",
                spec.label,
                rep + 1,
                a.ready.as_secs_f64() * 1e3
            );
            agent = Some(a);
        }
        let mut agent = agent.expect("at least one start");
        // Memory once the agent has settled.
        std::thread::sleep(Duration::from_millis(300));
        let (rss, hwm) = world::rss_kib(agent.pid).unwrap_or((0, 0));
        let maps = map_memory(&agent);
        let prog = sys::obj_get(&agent.link("bh_egress"))
            .and_then(|l| sys::link_prog(&l))
            .and_then(|p| sys::prog_info(&p))
            .unwrap_or_default();
        let programs = program_sizes(&agent);
        let line = agent.enforcing_line();
        let is_last = std::ptr::eq(spec, specs.last().expect("ladder"));
        if !is_last {
            // Exits; the pinned programs and maps stay for the decision phase.
            agent.stop();
        }
        out.push(json!({
            "key": spec.key,
            "label": spec.label,
            "domains": spec.domains,
            "networks_v4": spec.nets.iter().filter(|n| n.family == V4).count(),
            "networks_v6": spec.nets.iter().filter(|n| n.family == V6).count(),
            "geo": spec.geo,
            "check_ms": check_ms,
            "check_cpu_ms": check_cpu_ms,
            "check_peak_rss_kib": check_rss,
            "compiled": compiled,
            "ready_ms": median(&ready),
            "ready_ms_all": ready,
            "ready_cpu_ms": median(&ready_cpu),
            "rss_kib": rss,
            "rss_peak_kib": hwm,
            "kernel_maps": maps,
            "bh_egress": {"xlated_bytes": prog.xlated_len, "jited_bytes": prog.jited_len, "verified_insns": prog.verified_insns},
            "programs": programs,
            "agent_log": line,
        }));
        agents.push(agent);
    }
    Ok((agents, Value::Array(out)))
}

fn phase_decision(ctx: &Ctx, specs: &[Spec], agents: &[Agent], rng: &mut Rng) -> Result<Value> {
    let n = ctx.p.packets;
    let full = specs.last().expect("ladder");
    let tables = [full.table(V4), full.table(V6)];
    let in_nets = |fam: usize, a: u128| {
        let t = &tables[fam];
        let i = t.partition_point(|r| r.1 < a);
        t.get(i).is_some_and(|r| r.0 <= a)
    };
    let mut sets = Vec::new();
    for fam in [V4, V6] {
        let allowed = ctx.db.ranges_of(fam, &policy::ALLOW);
        let mut addrs = Vec::with_capacity(n);
        while addrs.len() < n {
            let a = rng.in_ranges(&allowed);
            if !in_nets(fam, a) {
                addrs.push(a);
            }
        }
        sets.push(decision::PacketSet {
            name: format!("allowed-{}", if fam == V4 { "v4" } else { "v6" }),
            family: fam,
            addrs,
        });
    }
    for fam in [V4, V6] {
        let universe = if fam == V4 {
            geo::UNIVERSE_V4
        } else {
            geo::UNIVERSE_V6
        };
        let addrs = (0..n).map(|_| rng.uniform(universe)).collect();
        sets.push(decision::PacketSet {
            name: format!("random-{}", if fam == V4 { "v4" } else { "v6" }),
            family: fam,
            addrs,
        });
    }
    let mut set_specs = Vec::new();
    for s in &sets {
        let file = ctx.work.join(format!("packets-{}.bin", s.name));
        s.write(&file, rng)?;
        set_specs.push(json!({"name": s.name, "family": s.family, "file": file}));
    }

    use decision::{ProgSpec, prog_json};
    let mut progs = vec![prog_json("allow-all", &ProgSpec::AllowAll)];
    for (spec, agent) in specs.iter().zip(agents) {
        progs.push(prog_json(
            spec.key,
            &ProgSpec::Link {
                link: agent.link("bh_egress"),
                counters: agent.map("BH_COUNTERS"),
            },
        ));
    }
    // Bare address-table walks (the agent's own probe program on its own
    // maps): empty table, 10k networks, full geo + 10k networks.
    for key in ["empty", "n10k", "geo_n10k"] {
        let i = specs.iter().position(|s| s.key == key).expect("ladder key");
        progs.push(prog_json(
            &format!("walk:{key}"),
            &ProgSpec::Pinned {
                prog: agents[i].probe("bh_probe_addr"),
            },
        ));
    }
    // The layout bulkhead had before, for comparison: a plain kernel LPM
    // trie holding the CIDR prefixes of the full policy's allowed ranges
    // (with `unknown_country: deny` an allow-list needs nothing else).
    let mut lpm_prefixes = serde_json::Map::new();
    for (fam, feed, bits) in [(V4, policy::FEED_V4, 32), (V6, policy::FEED_V6, 128)] {
        let allowed = geo::union(&[&ctx.db.ranges_of(fam, &policy::ALLOW)[..], &[feed][..]]);
        let mut prefixes = Vec::new();
        for &(a, b) in &allowed {
            geo::for_prefixes(a, b, bits, |net, len| prefixes.push((net, len)));
        }
        let file = ctx.work.join(format!("lpm-{fam}.bin"));
        fs::write(
            &file,
            prefixes
                .iter()
                .flat_map(|(net, len)| net.to_le_bytes().into_iter().chain([*len as u8]))
                .collect::<Vec<u8>>(),
        )?;
        lpm_prefixes.insert(
            if fam == V4 { "v4" } else { "v6" }.into(),
            json!(prefixes.len()),
        );
        progs.push(prog_json(
            &format!("lpm:{}", if fam == V4 { "v4" } else { "v6" }),
            &ProgSpec::Lpm {
                prefixes: file,
                family: fam,
            },
        ));
    }
    let spec =
        json!({"progs": progs, "sets": set_specs, "repeat": ctx.p.repeat, "rounds": ctx.p.rounds});
    let mut res = run_testrun(ctx, &ctx.cg_work, "testrun", &spec)?;
    res["lpm_prefixes"] = Value::Object(lpm_prefixes);

    // Ground truth per policy and set, against the counters.
    let mut problems = Vec::new();
    if let Some(checks) = res["checks"].as_array_mut() {
        for c in checks.iter_mut() {
            let prog = c["prog"].as_str().unwrap_or_default().to_string();
            let Some(spec) = specs.iter().find(|s| s.key == prog) else {
                continue;
            };
            let set = sets
                .iter()
                .find(|s| c["set"] == s.name.as_str())
                .expect("set");
            let table = spec.table(set.family);
            let mut want: BTreeMap<String, u64> = Default::default();
            for &a in &set.addrs {
                *want
                    .entry(spec.expected(&table, &ctx.db, set.family, a).to_string())
                    .or_default() += 1;
            }
            let got: BTreeMap<String, u64> =
                serde_json::from_value(c["reasons"].clone()).unwrap_or_default();
            let ok = got == want;
            if !ok {
                problems.push(format!(
                    "{prog} on {}: counters {got:?}, policy says {want:?}",
                    set.name
                ));
            }
            c["expected_reasons"] = json!(want);
            c["matches_policy"] = json!(ok);
        }
    }
    for p in &problems {
        eprintln!("bench: WARNING: decision counters differ from the policy: {p}");
    }
    res["problems"] = json!(problems);
    res["sets"] = json!(
        sets.iter()
            .map(|s| json!({"name": s.name, "family": s.family, "packets": s.addrs.len()}))
            .collect::<Vec<_>>()
    );

    // The connect and sendmsg hooks on real calls, every policy side by
    // side (BPF_PROG_TEST_RUN does not run sock_addr programs).
    res["hooks"] = hooks::measure(ctx, specs, agents, &sets).unwrap_or_else(|e| {
        eprintln!("bench: WARNING: per-call cost of the sock_addr hooks: {e:#}");
        json!({"error": format!("{e:#}")})
    });

    // The same programs called from deeper in the cgroup tree: the domain
    // walk does one hash lookup per level.
    let mut deep = vec![ctx.cg_work.child("l3")?];
    for l in 4..=8 {
        let next = deep.last().expect("chain").child(&format!("l{l}"))?;
        deep.push(next);
    }
    let depth_progs: Vec<Value> = progs
        .iter()
        .filter(|p| p["name"] == "allow-all" || p["name"] == "empty" || p["name"] == "geo_n10k")
        .cloned()
        .collect();
    let depth_spec = json!({
        "progs": depth_progs,
        "sets": [set_specs[0]],
        "repeat": ctx.p.repeat,
        "rounds": ctx.p.rounds.min(3),
    });
    let mut shallow: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut deeper: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for _ in 0..2 {
        for (cg, acc) in [
            (&ctx.cg_work, &mut shallow),
            (deep.last().expect("chain"), &mut deeper),
        ] {
            let out = run_testrun(ctx, cg, "testrun-depth", &depth_spec)?;
            for t in out["timings"].as_array().into_iter().flatten() {
                acc.entry(t["prog"].as_str().unwrap_or("").to_string())
                    .or_default()
                    .push(t["warm_ns"].as_f64().unwrap_or(f64::NAN));
            }
        }
    }
    let med = |m: &BTreeMap<String, Vec<f64>>| -> Value {
        Value::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), json!(median(v))))
                .collect(),
        )
    };
    res["depth"] = json!({
        "shallow_depth": 2,
        "deep_depth": 2 + deep.len(),
        "shallow": med(&shallow),
        "deep": med(&deeper),
    });
    drop(deep);
    Ok(res)
}

/// Runs the test-run helper in `cg` with `spec`; returns its JSON.
fn run_testrun(ctx: &Ctx, cg: &Cgroup, name: &str, spec: &Value) -> Result<Value> {
    let spec_path = ctx.work.join(format!("{name}.json"));
    fs::write(&spec_path, spec.to_string())?;
    let mut cmd = world::command_in(
        &cg.path,
        None,
        &ctx.exe,
        &ctx.helper_args("testrun", &[spec_path.to_string_lossy().into()]),
    );
    eprintln!(
        "+ [in cgroup {}] {} bench --internal testrun {}",
        cg.rel,
        ctx.exe.display(),
        spec_path.display()
    );
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .context("running the test-run helper")?;
    if !out.status.success() {
        bail!("the test-run helper failed ({})", out.status);
    }
    serde_json::from_slice(&out.stdout).context("test-run helper output")
}

/// The policy text with `net` added to the workload's domain.
fn with_net(base: &str, spec: &Spec, net: &str) -> String {
    if spec.nets.iter().any(|n| n.domain == policy::BENCH) {
        base.replacen("    networks: [", &format!("    networks: [\"{net}\", "), 1)
    } else {
        base.replacen(
            "    cgroups: [\"",
            &format!("    networks: [\"{net}\"]\n    cgroups: [\""),
            1,
        )
    }
}

/// Seconds the idle agent is watched for its CPU use.
const IDLE_SECS: u64 = 10;

/// The idle agent's steady RSS and the CPU it uses doing nothing (ticks
/// of `/proc/PID/stat` over [`IDLE_SECS`]: timers, watches, the event
/// poll).
fn idle_agent(agent: &Agent) -> Value {
    let (rss, _) = world::rss_kib(agent.pid).unwrap_or((0, 0));
    let before = world::cpu_ms(agent.pid);
    std::thread::sleep(Duration::from_secs(IDLE_SECS));
    let after = world::cpu_ms(agent.pid);
    let cpu_ms = match (before, after) {
        (Some(b), Some(a)) => a - b,
        _ => f64::NAN,
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    json!({
        "rss_kib": rss,
        "secs": IDLE_SECS,
        "cpu_ms": cpu_ms,
        "cpu_ticks": (cpu_ms * hz / 1e3).round(),
        "cpu_share": cpu_ms / (IDLE_SECS as f64 * 1e3),
    })
}

/// Resets the agent's peak RSS (`VmHWM`) to its current RSS, so the next
/// read is the peak of what happened since.
fn reset_peak_rss(pid: u32) -> bool {
    fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

fn phase_update(ctx: &Ctx, agent: &mut Agent, spec: &Spec) -> Result<Value> {
    let base = fs::read_to_string(&agent.policy)?;
    let idle = idle_agent(agent);
    eprintln!(
        "  idle agent: RSS {:.1} MB, {} CPU ticks in {IDLE_SECS} s",
        idle["rss_kib"].as_f64().unwrap_or(f64::NAN) * 1024.0 / 1e6,
        idle["cpu_ticks"]
    );
    let peak_reset = reset_peak_rss(agent.pid);
    // The first reload is the full compile + load: a newer database makes
    // the agent read it again, and the still empty second slot of the
    // double buffer takes the whole policy. Later reloads write only the
    // difference to what that slot held two generations ago.
    fs::File::options()
        .write(true)
        .open(&ctx.db_path)?
        .set_modified(std::time::SystemTime::now())
        .context("touching the geo database")?;
    let first = agent.reload()?.as_secs_f64() * 1e3;
    // The peak of the full reload alone (start-up's is behind the reset).
    let reload_peak = world::rss_kib(agent.pid)
        .filter(|_| peak_reset)
        .map(|(_, hwm)| hwm);
    eprintln!(
        "  first reload (reads the database again, fills the second slot): {first:.0} ms, peak RSS {}",
        reload_peak.map_or("unknown".into(), |k| format!(
            "{:.1} MB",
            k as f64 * 1024.0 / 1e6
        ))
    );
    let taken: Vec<String> = spec.nets.iter().map(policy::Net::cidr).collect();
    let candidates: Vec<String> = (0..=255u32)
        .map(|i| format!("198.18.{i}.0/24"))
        .filter(|c| !taken.contains(c))
        .collect();
    let mut times = Vec::new();
    for net in candidates.iter().take(ctx.p.update_reps) {
        fs::write(&agent.policy, with_net(&base, spec, net))?;
        let d = agent.reload()?.as_secs_f64() * 1e3;
        times.push(d);
        eprintln!("  reload with one network added ({net}): {d:.0} ms");
    }
    // Back to the policy the network phase compares against.
    fs::write(&agent.policy, &base)?;
    agent.reload()?;
    // Steady again: events of older generations may name countries from
    // the database they were decided by for 10 s (GEO_GRACE), then it goes.
    std::thread::sleep(Duration::from_secs(12));
    let after_reloads = world::rss_kib(agent.pid).map(|(rss, _)| rss);
    eprintln!(
        "  RSS after the reloads: {}",
        after_reloads.map_or("unknown".into(), |k| format!(
            "{:.1} MB",
            k as f64 * 1024.0 / 1e6
        ))
    );
    let maps_after = map_memory(agent);
    let lines: Vec<String> = agent
        .log_lines()
        .into_iter()
        .filter(|l| l.contains("reload"))
        .collect();
    Ok(json!({
        "first_reload_ms": first,
        "first_reload_peak_rss_kib": reload_peak,
        "rss_after_reloads_kib": after_reloads,
        "idle": idle,
        "reload_ms": median(&times),
        "reload_ms_all": times,
        "kernel_maps_after_reload": maps_after["total_bytes"],
        "agent_log": lines,
    }))
}

/// How many prefixes the full policy loads, against how many would cover
/// only the allowed ranges (what an allow-list with `unknown_country: deny`
/// strictly needs, absent = denied).
fn geo_analysis(ctx: &Ctx, loads: &Value) -> Value {
    let compiled: Vec<u64> = loads
        .as_array()
        .and_then(|a| a.iter().find(|p| p["key"] == "geo_n10k"))
        .and_then(|p| p["compiled"].as_str())
        .map(report::compiled_counts)
        .unwrap_or_default();
    let allowed = |fam: usize| -> usize {
        let bits = if fam == V4 { 32 } else { 128 };
        let feed = if fam == V4 {
            policy::FEED_V4
        } else {
            policy::FEED_V6
        };
        geo::union(&[&ctx.db.ranges_of(fam, &policy::ALLOW)[..], &[feed][..]])
            .iter()
            .map(|&(a, b)| geo::prefix_count(a, b, bits))
            .sum()
    };
    json!({
        "allowed_ranges_v4": ctx.db.ranges_of(V4, &policy::ALLOW).len(),
        "allowed_ranges_v6": ctx.db.ranges_of(V6, &policy::ALLOW).len(),
        "geo_ranges_v4": compiled.get(3),
        "geo_ranges_v6": compiled.get(4),
        "table_words": compiled.get(5),
        "nodes_v4": compiled.get(7),
        "nodes_v6": compiled.get(8),
        "allowed_only_v4": allowed(V4),
        "allowed_only_v6": allowed(V6),
    })
}
