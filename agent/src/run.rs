//! `bulkhead run`: load, attach, pin, enforce, stream events, reload.

use std::{
    fs,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime},
};

use agent_common::{
    Event,
    maps::{COUNTER_CUT_MARKED, CutRecord, MAP_EVENTS},
};
use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray, RingBuf},
};

use crate::{
    bridges::{Jit, JitBridge, OpenRequest, Opener},
    caps,
    cgroup::{self, PathCache},
    compile::{self, Compiled, EventLimits},
    control::{self, Call, Hub, Request},
    cut::Cutter,
    events::{self, Enricher, Generation},
    explain,
    geo::GeoDb,
    k8s::{
        Assignment,
        node::{NodePods, selects_pods},
    },
    kernel::{self, Pins},
    listeners,
    maps::PolicyMaps,
    metrics::{self, Gauges},
    policy::{self, Policy},
    sink::{Rotation, Sink},
    store::{Change, Store},
};

pub struct RunArgs {
    pub policy: PathBuf,
    pub cgroup_root: Option<PathBuf>,
    pub bpffs_dir: PathBuf,
    pub events_log: Option<PathBuf>,
    pub stdout_events: bool,
    pub ring_buffer_bytes: u32,
    pub limits: EventLimits,
    pub run_dir: PathBuf,
    pub control_group: Option<u32>,
    pub rotation: Rotation,
    pub audit_db: Option<PathBuf>,
    pub audit_retention: Duration,
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Persistent state (just-in-time bridges).
    pub state_dir: PathBuf,
    /// Accept policy and geo files that non-root users could change.
    pub allow_untrusted_policy: bool,
    /// Watch this Kubernetes node's pods (`pods:` selectors).
    pub k8s_node: Option<String>,
    /// Pin the benchmark probe programs too.
    pub bench_probes: bool,
}

/// Everything one loaded policy needs beside the kernel maps.
struct Loaded {
    /// The policy file as read.
    file: Policy,
    /// The file plus the open just-in-time bridges: what is enforced.
    policy: Policy,
    geo: Arc<GeoDb>,
    compiled: Compiled,
    /// Modification times of the policy and geo files, to notice changes.
    stamps: Vec<(PathBuf, Option<SystemTime>)>,
}

fn stamp(p: &Path) -> Option<SystemTime> {
    fs::metadata(p).and_then(|m| m.modified()).ok()
}

fn load_policy(
    args: &RunArgs,
    mount: &Path,
    jit: &Jit,
    prev: Option<&Loaded>,
    pods: Option<&mut NodePods>,
) -> Result<Loaded> {
    let path = &args.policy;
    let trusted = |what: &str, p: &Path| {
        if args.allow_untrusted_policy {
            return Ok(());
        }
        crate::trust::check(what, p).with_context(|| format!("policy {} rejected", path.display()))
    };
    trusted("policy file", path)?;
    // One diagnostic per line, each starting with `file:line:col:`.
    let file =
        policy::load(path).map_err(|d| anyhow!("policy {} rejected:\n{d}", path.display()))?;
    let mut stamps = vec![(path.to_path_buf(), stamp(path))];
    for p in file.geo.databases.iter().chain(&file.geo.geofeeds) {
        trusted("geo file", p)?;
        stamps.push((p.clone(), stamp(p)));
    }
    // Unchanged geo files are not read again: reloads stay fast and events
    // of recent generations share one database in memory.
    let geo = match prev {
        Some(l) if l.file.geo == file.geo && l.stamps[1..] == stamps[1..] => l.geo.clone(),
        _ => Arc::new(
            GeoDb::load(&file.geo)
                .with_context(|| format!("policy {} rejected", path.display()))?,
        ),
    };
    let policy = jit.merged(&file, None);
    let mut compiled =
        compile::compile(&policy, &geo, mount, args.limits, compile::tai_offset_ns())?;
    match pods {
        Some(pods) => compiled.place_pods(&pods.place(&policy).assigned),
        None if selects_pods(&policy) => bail!(
            "policy {} rejected: its domains select pods (`pods:`) but the agent does not \
             watch Kubernetes; run it with --k8s-node",
            path.display()
        ),
        None => {}
    }
    Ok(Loaded {
        file,
        policy,
        geo,
        compiled,
        stamps,
    })
}

/// The same policy file with a different set of just-in-time bridges, or
/// with pods placed anew (`placed`; `None` keeps `l`'s).
fn rebuild(
    l: &Loaded,
    mount: &Path,
    limits: EventLimits,
    jit: &Jit,
    extra: Option<&JitBridge>,
    placed: Option<&[Assignment]>,
) -> Result<Loaded> {
    let policy = jit.merged(&l.file, extra);
    let mut compiled = compile::recompile(
        &policy,
        &l.compiled,
        mount,
        limits,
        compile::tai_offset_ns(),
    )?;
    compiled.place_pods(placed.unwrap_or(&l.compiled.pods));
    Ok(Loaded {
        file: l.file.clone(),
        policy,
        geo: l.geo.clone(),
        compiled,
        stamps: l.stamps.clone(),
    })
}

/// Compiling a policy with a full country database allocates far more than
/// it keeps; hand the freed pages back so the agent's RSS is what it holds.
/// (glibc keeps them otherwise; musl's allocator, of the static build,
/// returns them by itself and has no `malloc_trim`.)
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn log(msg: impl AsRef<str>) {
    eprintln!("bulkhead: {}", msg.as_ref());
}

/// Tells systemd (Type=notify) the agent is enforcing.
fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    // Never wait for the service manager: a reader that stopped reading
    // (its queue is only ~10 datagrams) must not stall the agent.
    let _ = sock.set_nonblocking(true);
    let bytes = path.as_encoded_bytes();
    let _ = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt as _;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), Path::new(&path))
    };
}

pub fn run(args: RunArgs) -> Result<()> {
    // Before anything is loaded: from here on SIGHUP, SIGTERM and SIGINT
    // wait (queued) for the main loop instead of ending the agent with
    // their default action halfway through a start.
    let signals = {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        signal_hook::iterator::Signals::new([SIGHUP, SIGTERM, SIGINT])
            .context("installing signal handlers")?
    };
    let mount = cgroup::cgroup2_mount()?;
    let root = args.cgroup_root.clone().unwrap_or_else(|| mount.clone());
    if !root.starts_with(&mount) {
        return Err(anyhow!(
            "--cgroup-root {} is not inside the cgroup v2 mount {}",
            root.display(),
            mount.display()
        ));
    }
    let mut jit = Jit::load(&args.state_dir.join("bridges.json"))?;
    let expired_while_down = jit.expire(compile::now_ns())?;
    let load_started = Instant::now();
    if args.k8s_node.is_some() && !cfg!(feature = "k8s") {
        bail!(
            "--k8s-node: this bulkhead was built without Kubernetes support (cargo feature `k8s`)"
        );
    }
    let mut pods = args
        .k8s_node
        .as_ref()
        .map(|node| NodePods::new(node.clone(), &mount));
    let loaded = load_policy(&args, &mount, &jit, None, pods.as_mut())?;

    for w in caps::check()? {
        log(format!("warning: {w}"));
    }
    for w in crate::probe::check()? {
        log(format!("warning: {w}"));
    }
    let pins = Pins::new(args.bpffs_dir.clone(), kernel::layout()?);
    kernel::ensure_bpffs(&pins.root)?;
    let _lock = kernel::lock(&pins)?;
    kernel::secure(&pins)?;
    let cgroup_dir =
        fs::File::open(&root).with_context(|| format!("opening cgroup {}", root.display()))?;
    // The order below keeps a whole policy enforced at every instant, so a
    // death anywhere in it (kill -9, OOM) opens nothing:
    // 1. every program verified and loaded: a refusal stops here, with
    //    nothing that enforces changed;
    let verify_started = Instant::now();
    let mut ebpf = kernel::load(&pins, args.ring_buffer_bytes)?;
    let lsm = kernel::verify_all(&mut ebpf)?;
    log(kernel::verified(&ebpf, verify_started.elapsed()));
    // 2. the policy written into the slot no program reads;
    let mut pmaps = PolicyMaps::adopt(&mut ebpf)?;
    let previous = PolicyMaps::generation(&mut ebpf)?;
    let staged = pmaps.stage(&mut ebpf, &loaded.compiled)?;
    // 3. the post_bind hooks attached, then the sockets bound before them
    //    recorded, so none is missed in between;
    kernel::attach(&mut ebpf, &pins, &cgroup_dir, kernel::Stage::Owners)?;
    let seeded = listeners::seed(&mut ebpf, &mount).map(|(ok, failed)| {
        if failed > 0 {
            log(format!(
                "warning: {failed} sockets bound before start could not be recorded (pidfd_getfd refused: \
                 CAP_SYS_PTRACE missing?); connections to them are decided as if they had no domain"
            ));
        }
        ok
    });
    let seeded = seeded.unwrap_or_else(|e| {
        log(format!(
            "warning: could not record sockets bound before start: {e:#}"
        ));
        0
    });
    // 4. every deciding hook attached, each link pinned as it is made
    //    (with a fresh layout they decide nothing until step 5; adopting a
    //    pinned one, they decide as the links they replace);
    kernel::attach(&mut ebpf, &pins, &cgroup_dir, kernel::Stage::Enforce)?;
    if args.bench_probes {
        kernel::pin_probes(&mut ebpf, &pins)?;
    }
    // The names of the generation about to go live (and of those before
    // it, whose events may wait in the ring) are known and kept first.
    let tai = compile::tai_offset_ns();
    let mut paths = PathCache::new(mount.clone());
    for (id, _, p) in &loaded.compiled.cgroups {
        paths.insert(*id, p.clone());
    }
    let enricher = Arc::new(Mutex::new(Enricher::new(paths, tai)));
    {
        let mut en = enricher.lock().expect("enricher lock");
        en.recall(
            args.state_dir
                .join(format!("generations-{}.json", pins.layout)),
            &loaded.geo,
        );
        en.add_generation(staged.generation(), generation_names(&loaded));
    }
    // 5. the policy put in force, in one write;
    let written = PolicyMaps::commit(&mut ebpf, staged)?;
    // 6. and only then what earlier agents left retired: other layouts'
    //    links and maps (an upgrade across map layouts), stray pins.
    for gone in kernel::retire_others(&pins)? {
        log(format!(
            "retired the programs and maps of layout {gone} (this binary's is {})",
            pins.layout
        ));
    }
    let gauges = Arc::new(Gauges::default());
    gauges.note_policy(
        &loaded.compiled.domain_names,
        written.generation,
        load_started.elapsed(),
    );
    let packet_sockets = match lsm {
        None => "refused in domain workloads (BPF LSM)".to_string(),
        Some(why) => {
            log(format!(
                "warning: packet sockets (AF_PACKET) are NOT refused: {why}; run domain workloads without CAP_NET_RAW"
            ));
            format!("not refused ({why}): run domain workloads without CAP_NET_RAW")
        }
    };
    // The new maps and links are pinned now.
    kernel::secure(&pins)?;
    let control = control::bind(&args.run_dir, args.control_group)?;
    let metrics_listener = args.metrics_addr.map(metrics::bind).transpose()?;
    // Tracing programs need CAP_PERFMON: load the socket iterators now.
    let cutter = match socks_fd(&ebpf).and_then(Cutter::new) {
        Ok(c) => {
            log(
                "established connections that a policy stops allowing are destroyed (bpf_sock_destroy) in this \
                 network namespace; in others the packet hooks drop their traffic",
            );
            Some(c)
        }
        Err(e) => {
            log(format!(
                "warning: established connections that a policy stops allowing are not destroyed ({e:#}); \
                 the packet hooks drop their traffic"
            ));
            None
        }
    };
    let cuts = Arc::new(CutState {
        enabled: cutter.is_some(),
        destroyed: gauges.cuts_destroyed.clone(),
        marked: AtomicU64::new(0),
    });
    // The reader thread's own handle on the counters, for the cut marks.
    let counters_pin = pins.maps().join(agent_common::maps::MAP_COUNTERS);
    let counters = PerCpuArray::<MapData, u64>::try_from(aya::maps::Map::PerCpuArray(
        MapData::from_pin(&counters_pin)
            .with_context(|| format!("opening {}", counters_pin.display()))?,
    ))?;
    // Everything that needs more than CAP_BPF is done; threads start below.
    let kept = caps::drop_after_attach()?;
    log(&kept);
    let store = args
        .audit_db
        .as_deref()
        .map(|p| Store::start(p, args.audit_retention))
        .transpose()?;
    let record = |kind: &str, l: Option<(&Loaded, u64)>, detail: String| {
        if let Some(s) = &store {
            s.change(Change {
                kind: kind.to_string(),
                policy: Some(args.policy.display().to_string()),
                sha256: l.map(|(l, _)| l.policy.sha256.clone()),
                generation: l.map(|(_, g)| g),
                detail,
            });
        }
    };

    let ring: RingBuf<MapData> = RingBuf::try_from(
        ebpf.take_map(MAP_EVENTS)
            .ok_or_else(|| anyhow!("map {MAP_EVENTS} missing"))?,
    )?;
    let sink = Sink::open(
        args.stdout_events,
        args.events_log.as_deref(),
        args.rotation,
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    let delivered = gauges.delivered.clone();
    if let Some(st) = &store {
        gauges.set_store(st);
    }
    if let Some(listener) = metrics_listener {
        let addr = listener.local_addr()?;
        metrics::serve(listener, pins.maps(), gauges.clone())?;
        log(format!("metrics on http://{addr}/metrics"));
    }
    let hub = Hub::new();
    let reader = {
        let out = Output {
            enricher: enricher.clone(),
            sink,
            delivered: delivered.clone(),
            hub: hub.clone(),
            store: store.clone(),
        };
        let (stop, cuts) = (stop.clone(), cuts.clone());
        let cutter = cutter.map(|c| (c, counters, tai));
        thread::Builder::new()
            .name("events".into())
            .spawn(move || read_events(ring, out, cutter, cuts, stop))?
    };
    let (calls_tx, calls) = std::sync::mpsc::channel::<Call>();
    let wake_tx = calls_tx.clone();
    let (listener, socket) = control;
    control::serve(
        listener,
        args.control_group,
        calls_tx,
        hub.clone(),
        store.clone(),
    )?;
    #[cfg(feature = "k8s")]
    let _watch = pods
        .as_ref()
        .map(|p| crate::k8s::watch::spawn(p.node.clone(), p.store.clone(), Box::new(log)))
        .transpose()?;
    let started = events::format_ts((compile::now_ns() + tai) as u64, tai);

    log(format!(
        "enforcing {} (sha256 {}, generation {}{}) on cgroup {}; {} domains, {} cgroups, {} bridges, address table of {} words; pinned under {}; {} pre-existing sockets recorded; control socket {}",
        args.policy.display(),
        &loaded.policy.sha256[..12.min(loaded.policy.sha256.len())],
        written.generation,
        if previous != 0 {
            format!(", adopted generation {previous}")
        } else {
            String::new()
        },
        root.display(),
        loaded.policy.domains.len(),
        loaded.compiled.cgroups.len(),
        loaded.policy.bridges.len(),
        loaded.compiled.addr.words.len(),
        pins.root.display(),
        seeded,
        socket.display(),
    ));
    record(
        "start",
        Some((&loaded, written.generation)),
        format!(
            "agent pid {} attached to {}",
            std::process::id(),
            root.display()
        ),
    );
    for b in &expired_while_down {
        record(
            "bridge-expired",
            Some((&loaded, written.generation)),
            bridge_detail(b),
        );
    }
    release_freed_memory();
    sd_notify("READY=1");

    let hup = Arc::new(AtomicBool::new(false));
    let term = Arc::new(AtomicBool::new(false));
    {
        use signal_hook::consts::SIGHUP;
        let mut signals = signals;
        let (hup, term, wake) = (hup.clone(), term.clone(), wake_tx);
        thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    if sig == SIGHUP { &hup } else { &term }.store(true, Ordering::Relaxed);
                    let (reply, _) = std::sync::mpsc::channel();
                    let me = control::Peer {
                        pid: std::process::id() as i32,
                        uid: 0,
                        gid: 0,
                    };
                    // Wake the main loop now instead of at its next tick.
                    let _ = wake.send(Call {
                        request: Request::Wake,
                        peer: me,
                        reply,
                    });
                }
            })?;
    }

    let mut current = loaded;
    let mut last_check = Instant::now();
    while !term.load(Ordering::Relaxed) {
        // /healthz: the loop turns (at least every 100 ms).
        gauges.beat();
        gauges.subscriber_drops.store(
            hub.subscriber_drops.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        let mut reload = false;
        let mut reload_reply = None;
        match calls.recv_timeout(Duration::from_millis(100)) {
            Ok(call) => match call.request {
                Request::Reload => {
                    reload = true;
                    reload_reply = Some(call.reply);
                }
                Request::Status => {
                    let st = Status {
                        packet_sockets: &packet_sockets,
                        capabilities: &kept,
                        args: &args,
                        loaded: &current,
                        pods: pods.as_ref(),
                        generation: PolicyMaps::generation(&mut ebpf).unwrap_or(0),
                        started: &started,
                        delivered: delivered.load(Ordering::Relaxed),
                        hub: &hub,
                        enricher: &enricher,
                        cgroup_root: &root,
                        cuts: &cuts,
                        pins: &pins,
                    };
                    let _ = call.reply.send(st.to_json(&mut ebpf, &pmaps));
                }
                Request::Explain {
                    cgroup,
                    dst,
                    port,
                    proto,
                } => {
                    let _ = call
                        .reply
                        .send(explain_call(&current, &ebpf, &cgroup, &dst, port, &proto));
                }
                Request::BridgeOpen {
                    name,
                    from,
                    to,
                    ports,
                    for_secs,
                    reason,
                } => {
                    let by = Opener {
                        uid: call.peer.uid,
                        gid: call.peer.gid,
                        pid: call.peer.pid,
                    };
                    let req = OpenRequest {
                        name,
                        from,
                        to,
                        ports,
                        for_secs,
                        reason,
                    };
                    let result = jit
                        .prepare(&current.file, req, by, compile::now_ns())
                        .and_then(|b| {
                            let next =
                                rebuild(&current, &mount, args.limits, &jit, Some(&b), None)?;
                            let w = switch_named(&mut pmaps, &mut ebpf, &enricher, &next)?;
                            jit.commit(b.clone())?;
                            Ok((b, next, w))
                        });
                    let answer = match result {
                        Ok((b, next, w)) => {
                            gauges.note_policy(
                                &next.compiled.domain_names,
                                w.generation,
                                Duration::ZERO,
                            );
                            log(format!("bridge opened: {}", bridge_detail(&b)));
                            record(
                                "bridge-opened",
                                Some((&next, w.generation)),
                                bridge_detail(&b),
                            );
                            current = next;
                            serde_json::json!({"ok": true, "bridge": b, "generation": w.generation})
                        }
                        Err(e) => serde_json::json!({"ok": false, "error": format!("{e:#}")}),
                    };
                    let _ = call.reply.send(answer);
                }
                Request::BridgeClose { name } => {
                    let answer = match jit.close(&name) {
                        Ok(b) => match rebuild(&current, &mount, args.limits, &jit, None, None)
                            .and_then(|next| {
                                Ok((switch_named(&mut pmaps, &mut ebpf, &enricher, &next)?, next))
                            }) {
                            Ok((w, next)) => {
                                let who = format!(
                                    "closed by uid {} pid {}",
                                    call.peer.uid, call.peer.pid
                                );
                                log(format!("bridge closed: {} ({who})", b.name));
                                record(
                                    "bridge-closed",
                                    Some((&next, w.generation)),
                                    format!("{} ({who})", bridge_detail(&b)),
                                );
                                current = next;
                                serde_json::json!({"ok": true, "bridge": b, "generation": w.generation})
                            }
                            Err(e) => serde_json::json!({"ok": false, "error": format!("{e:#}")}),
                        },
                        Err(e) => serde_json::json!({"ok": false, "error": format!("{e:#}")}),
                    };
                    let _ = call.reply.send(answer);
                }
                Request::BridgeList => {
                    let now = compile::now_ns();
                    let list: Vec<_> = jit
                        .open
                        .iter()
                        .map(|b| serde_json::json!({"bridge": b, "seconds_left": (b.expires - now) / 1_000_000_000}))
                        .collect();
                    let _ = call
                        .reply
                        .send(serde_json::json!({"ok": true, "bridges": list}));
                }
                Request::Events { .. } | Request::Wake => {}
            },
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
        // After the wait, so a SIGHUP that woke us is handled right away.
        reload |= hup.swap(false, Ordering::Relaxed);
        let tick = last_check.elapsed() >= Duration::from_secs(1);
        let place = pods.as_ref().is_some_and(|p| p.due(&current.policy, tick));
        if tick {
            last_check = Instant::now();
            if current.stamps.iter().any(|(p, t)| stamp(p) != *t) {
                // A touch or a rewrite with the same bytes is not a new policy.
                let same_policy =
                    policy::file_sha256(&args.policy).is_ok_and(|h| h == current.policy.sha256);
                let geo_same = current.stamps.iter().skip(1).all(|(p, t)| stamp(p) == *t);
                if same_policy && geo_same {
                    current.stamps = current
                        .stamps
                        .iter()
                        .map(|(p, _)| (p.clone(), stamp(p)))
                        .collect();
                } else {
                    reload = true;
                }
            }
            refresh_cgroups(&mut ebpf, &mut pmaps, &current, &mount, &enricher);
            // The kernel stopped honouring expired bridges at their instant;
            // here they leave the state file, the maps and the audit trail.
            match jit.expire(compile::now_ns()) {
                Ok(gone) if !gone.is_empty() => {
                    match rebuild(&current, &mount, args.limits, &jit, None, None).and_then(
                        |next| Ok((switch_named(&mut pmaps, &mut ebpf, &enricher, &next)?, next)),
                    ) {
                        Ok((w, next)) => {
                            for b in &gone {
                                log(format!("bridge expired: {}", b.name));
                                record(
                                    "bridge-expired",
                                    Some((&next, w.generation)),
                                    bridge_detail(b),
                                );
                            }
                            current = next;
                        }
                        Err(e) => log(format!(
                            "warning: removing expired bridges from the maps failed: {e:#}"
                        )),
                    }
                }
                Ok(_) => {}
                Err(e) => log(format!(
                    "warning: updating {}: {e:#}",
                    args.state_dir.display()
                )),
            }
        }
        if let Some(p) = pods.as_mut().filter(|_| place && !reload) {
            let before = p.last.clone();
            let now = p.place(&current.policy);
            if now.assigned != before.assigned {
                match rebuild(
                    &current,
                    &mount,
                    args.limits,
                    &jit,
                    None,
                    Some(&now.assigned),
                )
                .and_then(|next| Ok((switch_named(&mut pmaps, &mut ebpf, &enricher, &next)?, next)))
                {
                    Ok((w, next)) => {
                        let detail = pod_moves(&next.policy, &before.assigned, &next.compiled.pods);
                        log(format!("pods: {detail} (generation {})", w.generation));
                        record("pods", Some((&next, w.generation)), detail);
                        let mut en = enricher.lock().expect("enricher lock");
                        for a in &next.compiled.pods {
                            en.paths().insert(a.cgroup_id, a.cgroup.clone());
                        }
                        drop(en);
                        current = next;
                    }
                    Err(e) => {
                        log(format!("warning: placing pods failed: {e:#}"));
                        p.failed(before.clone());
                    }
                }
            }
            if now.conflicts != before.conflicts {
                for (pod, ds) in &now.conflicts {
                    let names: Vec<&str> = ds
                        .iter()
                        .map(|d| current.policy.domains[*d].name.as_str())
                        .collect();
                    log(format!(
                        "warning: pod {pod} is selected by domains {}; it gets none of them \
                         (its cgroup path decides)",
                        names.join(", ")
                    ));
                }
            }
        }
        if reload {
            sd_notify("RELOADING=1");
            let load_started = Instant::now();
            let result =
                load_policy(&args, &mount, &jit, Some(&current), pods.as_mut()).and_then(|next| {
                    let w = switch_named(&mut pmaps, &mut ebpf, &enricher, &next)
                        .context("writing the maps failed; the generation in force is unchanged")?;
                    Ok((next, w))
                });
            let answer = match result {
                Ok((next, w)) => {
                    log(format!(
                        "reloaded {} (sha256 {}): generation {} ({} entries written, {} removed)",
                        args.policy.display(),
                        &next.policy.sha256[..12.min(next.policy.sha256.len())],
                        w.generation,
                        w.updated,
                        w.deleted
                    ));
                    record(
                        "reload",
                        Some((&next, w.generation)),
                        format!("{} entries written, {} removed", w.updated, w.deleted),
                    );
                    let a = serde_json::json!({"ok": true, "generation": w.generation, "sha256": next.policy.sha256});
                    gauges.note_policy(
                        &next.compiled.domain_names,
                        w.generation,
                        load_started.elapsed(),
                    );
                    current = next;
                    a
                }
                Err(e) => {
                    // Remember the rejected file's stamps so it is not re-read every second.
                    current.stamps = current
                        .stamps
                        .iter()
                        .map(|(p, _)| (p.clone(), stamp(p)))
                        .collect();
                    let msg = format!("reload rejected, the running policy stays in force:\n{e:#}");
                    log(&msg);
                    record("reload-rejected", None, format!("{e:#}"));
                    serde_json::json!({"ok": false, "error": msg})
                }
            };
            if let Some(r) = reload_reply.take() {
                let _ = r.send(answer);
            }
            release_freed_memory();
            sd_notify("READY=1");
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = reader.join();
    let last = PolicyMaps::generation(&mut ebpf).unwrap_or(0);
    record(
        "stop",
        Some((&current, last)),
        "enforcement stays pinned".into(),
    );
    let _ = fs::remove_file(&socket);
    // Give the store's writer a moment to commit the last batch.
    if store.is_some() {
        thread::sleep(Duration::from_millis(600));
    }
    log(format!(
        "stopping; {} events delivered; enforcement stays pinned under {} (`bulkhead detach` removes it)",
        delivered.load(Ordering::Relaxed),
        pins.root.display()
    ));
    Ok(())
}

/// "acme/web-1 -> contractor, acme/old left contractor" for the log and
/// the audit trail.
fn pod_moves(policy: &Policy, before: &[Assignment], after: &[Assignment]) -> String {
    let name = |d: usize| policy.domains.get(d).map_or("?", |d| d.name.as_str());
    let mut out = Vec::new();
    for a in after {
        if !before
            .iter()
            .any(|b| b.uid == a.uid && b.domain == a.domain && b.cgroup_id == a.cgroup_id)
        {
            out.push(format!("{} -> {} ({})", a.pod, name(a.domain), a.cgroup));
        }
    }
    for b in before {
        if !after.iter().any(|a| a.uid == b.uid && a.domain == b.domain) {
            out.push(format!("{} left {}", b.pod, name(b.domain)));
        }
    }
    if out.is_empty() {
        "no change".into()
    } else {
        out.join(", ")
    }
}

fn generation_names(l: &Loaded) -> Generation {
    Generation {
        domain_names: l.compiled.domain_names.clone(),
        bridge_names: l.compiled.bridge_names.clone(),
        geo: l.geo.clone(),
    }
}

/// Cgroups created after the policy was compiled that a glob or path now
/// names: the kernel already treats children of configured cgroups as
/// theirs; this adds new top-level matches (e.g. a new contractor pod).
fn refresh_cgroups(
    ebpf: &mut Ebpf,
    pmaps: &mut PolicyMaps,
    l: &Loaded,
    mount: &Path,
    enricher: &Mutex<Enricher>,
) {
    let mut found = Vec::new();
    for (i, d) in l.policy.domains.iter().enumerate() {
        for pattern in &d.cgroups {
            for (path, id) in cgroup::resolve(mount, pattern) {
                found.push((id, i as u32 + 1, path));
            }
        }
    }
    let pairs: Vec<(u64, u32)> = found.iter().map(|(id, d, _)| (*id, *d)).collect();
    match pmaps.add_cgroups(ebpf, &pairs) {
        Ok(0) => {}
        Ok(n) => {
            let mut en = enricher.lock().expect("enricher lock");
            for (id, _, p) in found {
                en.paths().insert(id, p);
            }
            log(format!("{n} new cgroups joined their domains"));
        }
        Err(e) => log(format!("warning: adding new cgroups failed: {e:#}")),
    }
}

/// Where enriched events go.
struct Output {
    enricher: Arc<Mutex<Enricher>>,
    sink: Sink,
    delivered: Arc<AtomicU64>,
    hub: Arc<Hub>,
    store: Option<Store>,
}

impl Output {
    /// Enriches, then writes to the log, the store and live subscribers.
    fn send(&mut self, events: impl IntoIterator<Item = Event>, kernel: bool) {
        let mut batch = String::new();
        {
            let mut en = self.enricher.lock().expect("enricher lock");
            for e in events {
                // Only the kernel's events carry per-CPU sequence numbers.
                if kernel {
                    en.gap(&e);
                }
                let rec = en.enrich(&e);
                if let Ok(json) = serde_json::to_string(&rec) {
                    batch.push_str(&json);
                    batch.push('\n');
                }
                if let Some(s) = &self.store {
                    s.event(rec.clone());
                }
                self.hub.publish(rec);
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
        }
        if !batch.is_empty() {
            self.sink.write(&batch);
        }
    }
}

/// Connections cut, for `status` and the metrics.
struct CutState {
    /// The kernel has `bpf_sock_destroy` and the iterators loaded.
    enabled: bool,
    destroyed: Arc<AtomicU64>,
    /// Marked by the packet hooks (all namespaces).
    marked: AtomicU64,
}

/// The `BH_SOCKS` socket storage the iterators read.
fn socks_fd(ebpf: &Ebpf) -> Result<std::os::fd::BorrowedFd<'_>> {
    use std::os::fd::AsFd as _;
    match ebpf.map(agent_common::maps::MAP_SOCKS) {
        Some(aya::maps::Map::SkStorage(m)) => Ok(m.fd().as_fd()),
        _ => bail!("map BH_SOCKS missing from the object"),
    }
}

/// The event for a socket an iterator destroyed: the workload's side as
/// source, as for its own connections.
fn cut_event(r: &CutRecord, now_tai_ns: u64) -> Event {
    Event {
        ts_tai_ns: now_tai_ns,
        cgroup_id: r.cgroup_id,
        generation: r.generation,
        src_addr: r.local,
        dst_addr: r.peer,
        bridge_id: r.bridge_id,
        src_port: r.local_port,
        dst_port: r.peer_port,
        src_domain: r.domain,
        dst_domain: r.peer_domain,
        family: r.family,
        proto: r.proto,
        hook: agent_common::Hook::SockDestroy as u8,
        verdict: agent_common::Verdict::Cut as u8,
        reason: r.reason,
        ..Event::default()
    }
}

fn read_events(
    mut ring: RingBuf<MapData>,
    mut out: Output,
    cutter: Option<(Cutter, PerCpuArray<MapData, u64>, i64)>,
    cuts: Arc<CutState>,
    stop: Arc<AtomicBool>,
) {
    let fd = ring.as_raw_fd();
    loop {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, 100) };
        let mut events = Vec::new();
        while let Some(item) = ring.next() {
            if let Some(e) = events::decode(&item) {
                events.push(e);
            }
        }
        out.send(events, true);
        // Sockets the packet hooks marked since the last turn: destroy
        // them (at most one iteration per turn, and only when there are
        // new marks).
        if let Some((cutter, counters, tai)) = &cutter {
            let marked = counters
                .get(&COUNTER_CUT_MARKED, 0)
                .map(|v| v.iter().sum::<u64>())
                .unwrap_or(0);
            if marked > cuts.marked.swap(marked, Ordering::Relaxed) {
                match cutter.run() {
                    Ok(records) => {
                        let now = (compile::now_ns() + tai).max(0) as u64;
                        cuts.destroyed
                            .fetch_add(records.len() as u64, Ordering::Relaxed);
                        out.send(records.iter().map(|r| cut_event(r, now)), false);
                    }
                    Err(e) => eprintln!("bulkhead: warning: cutting connections failed: {e:#}"),
                }
            }
        }
        if stop.load(Ordering::Relaxed) {
            return;
        }
    }
}

/// What `bulkhead status` shows, gathered on the main loop.
struct Status<'a> {
    packet_sockets: &'a str,
    capabilities: &'a str,
    args: &'a RunArgs,
    loaded: &'a Loaded,
    pods: Option<&'a NodePods>,
    generation: u64,
    started: &'a str,
    delivered: u64,
    hub: &'a Hub,
    enricher: &'a Mutex<Enricher>,
    cgroup_root: &'a Path,
    cuts: &'a CutState,
    pins: &'a Pins,
}

impl Status<'_> {
    fn to_json(&self, ebpf: &mut Ebpf, pmaps: &PolicyMaps) -> serde_json::Value {
        use agent_common::{
            Hook, Reason,
            maps::{
                COUNTER_EVENTS_LOST, COUNTER_EVENTS_RATE_LIMITED, COUNTER_EVENTS_WANTED,
                MAP_COUNTERS, counter_index,
            },
        };
        let counters = read_counters(ebpf, MAP_COUNTERS);
        let get = |i: u32| counters.get(i as usize).copied().unwrap_or(0);
        let mut decisions = Vec::new();
        for hook in Hook::ALL {
            for reason in Reason::ALL {
                let n = get(counter_index(hook as u8, reason as u8));
                if n > 0 {
                    decisions.push(serde_json::json!({
                        "hook": hook.name(),
                        "reason": reason.name(),
                        "verdict": if reason.is_deny() { "deny" } else { "allow" },
                        "count": n,
                    }));
                }
            }
        }
        let pins = self.pins;
        let programs: Vec<_> = kernel::PROGRAMS
            .iter()
            .map(|p| serde_json::json!({"name": p.name, "hook": p.hook, "pinned": pins.link(p.name).exists()}))
            .collect();
        let now = compile::now_ns();
        let bridges: Vec<_> = self
            .loaded
            .policy
            .bridges
            .iter()
            .map(|b| {
                serde_json::json!({
                    "name": b.name,
                    "from": self.loaded.policy.domains[b.from].name,
                    "to": self.loaded.policy.domains[b.to].name,
                    "ports": b.ports.iter().map(|p| if p.lo == p.hi { format!("{}/{}", p.proto.name(), p.lo) } else { format!("{}/{}-{}", p.proto.name(), p.lo, p.hi) }).collect::<Vec<_>>(),
                    "open": b.not_before.is_none_or(|t| t <= now) && b.expires.is_none_or(|t| t > now),
                    "seconds_left": b.expires.map(|t| (t - now) / 1_000_000_000),
                    "reason": b.reason,
                })
            })
            .collect();
        let gaps = self.enricher.lock().map(|e| e.gaps).unwrap_or(0);
        serde_json::json!({
            "ok": true,
            "pid": std::process::id(),
            "policy": self.args.policy,
            "sha256": self.loaded.policy.sha256,
            "mode": format!("{:?}", self.loaded.policy.mode).to_lowercase(),
            "generation": self.generation,
            "running_since": self.started,
            "cgroup_root": self.cgroup_root,
            "bpffs_dir": self.args.bpffs_dir,
            "layout": pins.layout,
            "programs": programs,
            "maps": pmaps.fill(self.generation),
            "domains": self.loaded.policy.domains.iter().map(|d| &d.name).collect::<Vec<_>>(),
            "bridges": bridges,
            "decisions": decisions,
            "events": {
                "wanted": get(COUNTER_EVENTS_WANTED),
                "rate_limited": get(COUNTER_EVENTS_RATE_LIMITED),
                "lost_ring_full": get(COUNTER_EVENTS_LOST),
                "delivered": self.delivered,
                "sequence_gaps": gaps,
                "subscribers": self.hub.subscribers(),
                "subscriber_drops": self.hub.subscriber_drops.load(Ordering::Relaxed),
            },
            "connections_cut": {
                "marked": get(COUNTER_CUT_MARKED),
                "destroyed": self.cuts.destroyed.load(Ordering::Relaxed),
                "how": if self.cuts.enabled {
                    "destroyed with bpf_sock_destroy (the application sees ECONNABORTED) in the agent's network namespace; elsewhere their packets are dropped"
                } else {
                    "their packets are dropped (no bpf_sock_destroy: Linux 6.5+)"
                },
            },
            "packet_sockets": self.packet_sockets,
            "capabilities": self.capabilities,
            "pods": self.pods.map(|p| self.pods_json(p)),
        })
    }
}

/// Per-CPU counters summed over CPUs.
impl Status<'_> {
    fn pods_json(&self, p: &NodePods) -> serde_json::Value {
        let names = &self.loaded.policy.domains;
        serde_json::json!({
            "node": p.node,
            "synced": p.store.synced(),
            "pods": p.store.snapshot().1.len(),
            "placed": self.loaded.compiled.pods.iter().map(|a| serde_json::json!({
                "pod": a.pod,
                "domain": names[a.domain].name,
                "cgroup": a.cgroup,
            })).collect::<Vec<_>>(),
            "pending": p.last.pending,
            "conflicts": p.last.conflicts.iter().map(|(pod, ds)| serde_json::json!({
                "pod": pod,
                "domains": ds.iter().map(|d| &names[*d].name).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })
    }
}

fn read_counters(ebpf: &mut Ebpf, name: &str) -> Vec<u64> {
    let Some(map) = ebpf.map(name) else {
        return Vec::new();
    };
    let Ok(arr) = aya::maps::PerCpuArray::<_, u64>::try_from(map) else {
        return Vec::new();
    };
    arr.iter()
        .map(|v| v.map(|v| v.iter().sum()).unwrap_or(0))
        .collect()
}

/// `explain` for the policy in force. A destination in no domain network
/// is decided by the socket listening on it, a TCP listener's owner read
/// from the socket storage the connect hook reads (`BH_SOCKS`, through
/// `sock_diag`, which needs only the CAP_BPF the agent keeps).
fn explain_call(
    l: &Loaded,
    ebpf: &Ebpf,
    cgroup: &str,
    dst: &str,
    port: u16,
    proto: &str,
) -> serde_json::Value {
    let Ok(ip) = dst.parse() else {
        return serde_json::json!({"ok": false, "error": format!("not an IP address: {dst}")});
    };
    let proto = match proto {
        "udp" => policy::Proto::Udp,
        _ => policy::Proto::Tcp,
    };
    let q = explain::Query {
        cgroup: cgroup.to_string(),
        dst: ip,
        port,
        proto,
    };
    let socks = match ebpf.map(agent_common::maps::MAP_SOCKS) {
        Some(aya::maps::Map::SkStorage(m)) => Some(std::os::fd::AsFd::as_fd(m.fd())),
        _ => None,
    };
    let host = explain::HostListeners::new(socks);
    let now = compile::now_ns();
    let a = explain::explain_with(&l.policy, &l.compiled, &l.geo, &q, now, &|q, ip| {
        host.lookup(q, ip)
    });
    serde_json::json!({"ok": true, "answer": a})
}

fn bridge_detail(b: &JitBridge) -> String {
    format!(
        "{} {} -> {} {} for {}s by uid {} pid {}: {}",
        b.name,
        b.from,
        b.to,
        b.ports.join(","),
        (b.expires - b.opened) / 1_000_000_000,
        b.opened_by.uid,
        b.opened_by.pid,
        b.reason
    )
}

/// Switches to `next`, with its names known to the enricher before any
/// event of the new generation can arrive.
fn switch_named(
    pmaps: &mut PolicyMaps,
    ebpf: &mut Ebpf,
    enricher: &Mutex<Enricher>,
    next: &Loaded,
) -> Result<crate::maps::Written> {
    let generation = PolicyMaps::next_generation(ebpf)?;
    enricher
        .lock()
        .expect("enricher lock")
        .add_generation(generation, generation_names(next));
    pmaps.switch(ebpf, &next.compiled)
}
