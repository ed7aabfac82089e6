//! The agent as a state machine. [`Agent::start`] brings up enforcement
//! with no gap; after that every change of the policy in force (a reload,
//! a bridge opened, closed or expired, pods placed) goes through one
//! transition, [`Agent::apply`]; requests are answered by
//! [`Agent::handle`] and the clock by [`Agent::tick`]. The loop that drives
//! them is in [`super::run`].

use std::{
    fs,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray, RingBuf},
};
use bulkhead_common::{DomainId, maps::MAP_EVENTS};
use tracing::{Level, field, info, warn};

use super::{
    audit_full::{Refusal, Stance},
    bridges::{Jit, JitBridge, Opener},
    events::{Enricher, Generation},
    health::Counts,
    metrics::Gauges,
    otlp::Otlp,
    sink::{Lines, Rotation},
    store::{Change, Store},
};
use super::{
    control::Hub,
    output::{CutState, Cuts, socks_fd},
    protocol::{
        BridgeState, CutCounts, DecisionCount, EventCounts, LastReload, OpenBridge, Peer,
        PlacedPod, PodConflict, PodsState, ProgramState, Request, Response, Status,
    },
};
use crate::{
    Candidate, LoadError, clock,
    compile::{self, Compiled, EventLimits},
    explain,
    geo::GeoDb,
    k8s::{
        Assignment, Assignments,
        node::{NodePods, selects_pods},
    },
    kernel::{
        self, PinLock, Pins, caps,
        cgroup::{self, PathCache},
        cut::Cutter,
        listeners,
        maps::PolicyMaps,
    },
    policy::{self, Policy},
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
    /// What enforcement does while the audit trail cannot be written.
    pub audit_full: Stance,
    /// Events to an OpenTelemetry collector too.
    pub otlp: Option<super::otlp::Config>,
}

/// Everything one loaded policy needs beside the kernel maps.
pub struct Loaded {
    /// The policy file as read.
    file: Policy,
    /// The file plus the open just-in-time bridges: what is enforced.
    policy: Policy,
    geo: Arc<GeoDb>,
    compiled: Compiled,
    /// Modification times of the policy and geo files, to notice changes.
    stamps: Stamps,
}

/// The stamps of the policy file and then its geo files.
type Stamps = Vec<(PathBuf, Option<Stamp>)>;

/// A file's identity and change times: a write, a new file renamed over
/// it, a chmod or chown all change it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: Option<SystemTime>,
    ctime: (i64, i64),
}

fn stamp(p: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt as _;
    let m = fs::metadata(p).ok()?;
    Some(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime: m.modified().ok(),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

/// What reading a policy file needs; owned, so it can be done off the loop.
struct Source {
    path: PathBuf,
    allow_untrusted: bool,
    mount: PathBuf,
    limits: EventLimits,
    jit: Jit,
    /// The geo part of the policy in force, reused when its files are unchanged.
    prev: Option<(policy::GeoSources, Stamps, Arc<GeoDb>)>,
}

impl Source {
    /// The policy file `args` names, with the bridges of `jit` and, when
    /// `prev` is given, the geo part of the policy in force to reuse.
    fn new(
        args: &RunArgs,
        mount: &Path,
        jit: &Jit,
        prev: Option<(policy::GeoSources, Stamps, Arc<GeoDb>)>,
    ) -> Source {
        Source {
            path: args.policy.clone(),
            allow_untrusted: args.allow_untrusted_policy,
            mount: mount.to_path_buf(),
            limits: args.limits,
            jit: jit.clone(),
            prev,
        }
    }

    /// Reads, checks and compiles the policy file (pods are placed after).
    fn load(self) -> Result<Loaded> {
        let path = &self.path;
        // Each file's stamp is taken when it is checked, before it is read,
        // so a change made during the load is noticed at the next tick.
        let stamps = std::cell::RefCell::new(Vec::new());
        let opts = crate::candidate::Options {
            cgroup_mount: &self.mount,
            limits: self.limits,
            tai: clock::tai_offset_ns(),
        };
        let loaded = Candidate::load_with(
            path,
            &mut |what, p| {
                if !self.allow_untrusted {
                    crate::trust::check(what, p)?;
                }
                stamps.borrow_mut().push((p.to_path_buf(), stamp(p)));
                Ok(())
            },
            &opts,
            // Unchanged geo files are not read again: reloads stay fast and
            // events of recent generations share one database in memory.
            |file| {
                self.prev
                    .as_ref()
                    .filter(|(cfg, st, _)| *cfg == file.geo && st[1..] == stamps.borrow()[1..])
                    .map(|(_, _, geo)| geo.clone())
            },
            |file| self.jit.merged(file, None),
        );
        let c = match loaded {
            Ok(c) => c,
            // One diagnostic per line, each starting with `file:line:col:`.
            Err(LoadError::Policy(d)) => bail!("policy {} rejected:\n{d}", path.display()),
            Err(e @ LoadError::Compile(_)) => return Err(e.into()),
            Err(e) => {
                return Err(
                    anyhow::Error::new(e).context(format!("policy {} rejected", path.display()))
                );
            }
        };
        Ok(Loaded {
            file: c.file,
            policy: c.policy,
            geo: c.geo,
            compiled: c.compiled,
            stamps: stamps.into_inner(),
        })
    }
}

/// The answer to a reload that was rejected, `why` being its errors.
fn reload_rejected(why: impl std::fmt::Display) -> Response {
    Response::error(format!(
        "reload rejected, the running policy stays in force:\n{why}"
    ))
}

/// Tells systemd (Type=notify) what the agent is doing.
pub fn sd_notify(state: &str) {
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

/// Why the policy in force changes: the one input of [`Agent::apply`]
/// beside the next policy, deciding what is logged and recorded.
pub enum Why {
    /// The policy file (or a geo file) changed, SIGHUP, or `reload`.
    Reload {
        started: Instant,
    },
    BridgeOpened(JitBridge),
    BridgeClosed {
        bridge: JitBridge,
        by: Peer,
    },
    BridgesExpired(Vec<JitBridge>),
    Pods {
        before: Assignments,
    },
}

impl Why {
    fn kind(&self) -> &'static str {
        match self {
            Why::Reload { .. } => "reload",
            Why::BridgeOpened(_) => "bridge-opened",
            Why::BridgeClosed { .. } => "bridge-closed",
            Why::BridgesExpired(_) => "bridge-expired",
            Why::Pods { .. } => "pods",
        }
    }
}

/// What [`Agent::start`] hands to the tasks around the state machine.
pub struct Started {
    pub ring: RingBuf<MapData>,
    /// The kernel programs' own log (aya-log), when the object has one.
    pub kernel_log: Option<kernel::KernelLog>,
    pub cuts: Option<Cuts>,
    pub control: (std::os::unix::net::UnixListener, PathBuf),
    pub metrics: Option<std::net::TcpListener>,
}

pub struct Agent {
    args: RunArgs,
    mount: PathBuf,
    root: PathBuf,
    pins: Pins,
    /// Held while the agent runs: one agent per pin directory.
    _lock: PinLock,
    ebpf: Ebpf,
    pmaps: PolicyMaps,
    current: Loaded,
    jit: Jit,
    pub pods: Option<NodePods>,
    pub enricher: Arc<Mutex<Enricher>>,
    pub gauges: Arc<Gauges>,
    pub store: Option<Store>,
    /// The events log (`--events-log`) and stdout outputs.
    pub log: Option<Lines>,
    pub stdout: Option<Lines>,
    pub otlp: Option<Otlp>,
    pub hub: Arc<Hub>,
    pub delivered: Arc<AtomicU64>,
    cuts: Arc<CutState>,
    packet_sockets: String,
    capabilities: String,
    started: String,
    last_tick: Instant,
    /// `--audit-full`: whether the kernel refuses for lack of a trail.
    refusal: Refusal,
    /// Writing the refusal flag failed (warned once until it works).
    refusal_unwritten: bool,
    /// For `status` (and the node's report to the API server).
    last_reload: Option<LastReload>,
    /// The policy file the last reload rejected, while the policy in force
    /// is another: (its sha256, why).
    rejected_file: Option<(String, String)>,
}

impl Agent {
    /// Loads, verifies, stages, attaches and commits, in the order that
    /// keeps a whole policy enforced at every instant, so a death anywhere
    /// in it (kill -9, OOM) opens nothing.
    pub fn start(args: RunArgs) -> Result<(Agent, Started)> {
        let span = tracing::span!(
            Level::WARN,
            "start",
            generation = field::Empty,
            policy = field::Empty
        );
        let _entered = span.enter();
        let load_started = Instant::now();
        let FirstPolicy {
            mount,
            root,
            jit,
            expired_while_down,
            pods,
            loaded,
        } = first_policy(&args)?;
        span.record("policy", short(&loaded.policy.sha256));

        for w in caps::check()? {
            warn!("{w}");
        }
        let kernel_report = crate::kernel::features::check()?;
        for w in kernel_report.warnings() {
            warn!("{w}");
        }
        let fallbacks = kernel_report.fallbacks();
        if fallbacks.no_loop && loaded.policy.domains.iter().any(|d| d.names.is_some()) {
            warn!(
                "this kernel has no bpf_loop (Linux 5.17): DNS answers are not learned, so \
                 `egress.names` allow nothing and deny nothing by name here (README, Names)"
            );
        }
        let pins = Pins::new(args.bpffs_dir.clone(), kernel::layout()?);
        kernel::ensure_bpffs(&pins.root)?;
        let lock = kernel::lock(&pins)?;
        kernel::secure(&pins)?;
        let cgroup_dir =
            fs::File::open(&root).with_context(|| format!("opening cgroup {}", root.display()))?;
        // 1. every program verified and loaded: a refusal stops here, with
        //    nothing that enforces changed;
        let verify_started = Instant::now();
        let btf = kernel::KernelBtf::read();
        let (mut ebpf, storage) = kernel::load(&pins, args.ring_buffer_bytes, fallbacks, &btf)?;
        match storage {
            kernel::Storage::Charged(_) => warn!("{}", storage.describe()),
            _ => info!("{}", storage.describe()),
        }
        let lsm = kernel::verify_all(&mut ebpf, &btf)?;
        info!("{}", kernel::verified(&ebpf, verify_started.elapsed()));
        // After verification: the loaded programs hold its ring buffer open.
        let kernel_log = kernel::start_kernel_log(&mut ebpf)?;
        // 2. the policy written into the slot no program reads;
        let mut pmaps = PolicyMaps::adopt(&mut ebpf)?;
        let previous = PolicyMaps::generation(&mut ebpf)?;
        let staged = pmaps.stage(&mut ebpf, &loaded.compiled)?;
        // (Read only where the kernel lacks bpf_ktime_get_tai_ns; written
        // everywhere, it is one map update a second.)
        kernel::write_clock(&mut ebpf)?;
        // 3. the post_bind hooks attached, then the sockets bound before them
        //    recorded, so none is missed in between;
        kernel::attach(&mut ebpf, &pins, &cgroup_dir, kernel::Stage::Owners)?;
        let seeded = seed_listeners(&mut ebpf, &mount);
        // 4. every deciding hook attached, each link pinned as it is made
        //    (with a fresh layout they decide nothing until step 5; adopting
        //    a pinned one, they decide as the links they replace);
        kernel::attach(&mut ebpf, &pins, &cgroup_dir, kernel::Stage::Enforce)?;
        if args.bench_probes {
            kernel::pin_probes(&mut ebpf, &pins)?;
        }
        // The names of the generation about to go live (and of those
        // before it, whose events may wait in the ring) are known first.
        let tai = clock::tai_offset_ns();
        let enricher = enricher(&mount, &loaded, &args.state_dir, &pins.layout, tai);
        {
            let mut en = enricher.lock().expect("enricher lock");
            en.read_learned(&pins.maps().join(bulkhead_common::maps::MAP_LEARNED));
            en.add_name_rules(name_rules(&loaded));
            en.add_generation(staged.generation(), generation_names(&loaded));
        }
        // 5. the policy put in force, in one write;
        let written = PolicyMaps::commit(&mut ebpf, staged)?;
        span.record("generation", written.generation);
        // 6. and only then what earlier agents left retired: other
        //    layouts' links and maps (an upgrade across map layouts), stray
        //    pins.
        for gone in kernel::retire_others(&pins)? {
            info!(
                "retired the programs and maps of layout {gone} (this binary's is {})",
                pins.layout
            );
        }
        let gauges = Arc::new(Gauges::default());
        gauges.note_policy(
            &loaded.compiled.domain_names,
            written.generation,
            load_started.elapsed(),
        );
        let packet_sockets = packet_sockets(lsm);
        // The new maps and links are pinned now.
        kernel::secure(&pins)?;
        let control = super::control::bind(&args.run_dir, args.control_group)?;
        let metrics = args
            .metrics_addr
            .map(crate::runtime::metrics::bind)
            .transpose()?;
        // Tracing programs need CAP_PERFMON: load the socket iterators now.
        let (cut_state, cuts) = cuts(&ebpf, &pins, &gauges, tai, &btf)?;
        drop(btf);
        // Everything that needs more than CAP_BPF is done.
        let capabilities = caps::drop_after_attach()?;
        info!("{capabilities}");
        // The trail is sealed once `audit setup-keys` made a key.
        let sealer =
            crate::seal::Sealer::open(&args.state_dir)?.map(|s| Arc::new(std::sync::Mutex::new(s)));
        if sealer.is_some() {
            info!(
                "sealing the audit trail with the key in {}",
                args.state_dir.join(crate::seal::KEY_FILE).display()
            );
        }
        let store = args
            .audit_db
            .as_deref()
            .map(|p| Store::start(p, args.audit_retention, sealer.clone()))
            .transpose()?;
        let ring: RingBuf<MapData> = RingBuf::try_from(
            ebpf.take_map(MAP_EVENTS)
                .ok_or_else(|| anyhow!("map {MAP_EVENTS} missing"))?,
        )?;
        // The events log and stdout: each its own writer thread and queue.
        let (log, repaired) = match &args.events_log {
            Some(p) => {
                let chain = sealer
                    .clone()
                    .map(|s| (s, crate::seal::head_file(&args.state_dir, "events-log")));
                let (l, r) = Lines::file(p, args.rotation, chain)?;
                (Some(l), r)
            }
            None => (None, None),
        };
        let stdout = args.stdout_events.then(Lines::stdout);
        let otlp = args.otlp.clone().map(Otlp::start).transpose()?;
        let hub = Hub::new();
        gauges.set_outputs(
            log.iter()
                .chain(&stdout)
                .map(|l| l.counts.clone())
                .chain(otlp.iter().map(|o| o.counts.clone()))
                .chain(store.iter().map(|s| s.counts.clone()))
                .chain([hub.counts.clone()])
                .collect(),
        );
        let started = now_ts();
        info!(
            "enforcing {} (sha256 {}, generation {}{}) on cgroup {}; {} domains, {} cgroups, {} bridges, address table of {} words; pinned under {}; {} pre-existing sockets recorded; control socket {}",
            args.policy.display(),
            short(&loaded.policy.sha256),
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
            control.1.display(),
        );
        let agent = Agent {
            mount,
            root,
            pins,
            _lock: lock,
            ebpf,
            pmaps,
            current: loaded,
            jit,
            pods,
            enricher,
            delivered: gauges.delivered.clone(),
            gauges,
            store,
            log,
            stdout,
            otlp,
            hub,
            cuts: cut_state,
            packet_sockets,
            capabilities,
            started,
            last_tick: Instant::now(),
            refusal: Refusal::new(args.audit_full),
            refusal_unwritten: false,
            last_reload: None,
            rejected_file: None,
            args,
        };
        agent.record(
            "start",
            Some(written.generation),
            format!(
                "agent pid {} attached to {}",
                std::process::id(),
                agent.root.display()
            ),
        );
        if let Some(r) = repaired {
            agent.record(
                "events-log-repaired",
                Some(written.generation),
                format!(
                    "{}: a torn last line ({} bytes, left by a crash or power loss) was cut off",
                    r.path.display(),
                    r.cut
                ),
            );
        }
        for b in &expired_while_down {
            agent.record("bridge-expired", Some(written.generation), bridge_detail(b));
        }
        crate::memory::release_freed();
        Ok((
            agent,
            Started {
                ring,
                kernel_log,
                cuts,
                control,
                metrics,
            },
        ))
    }

    /// Adds a row to the audit trail's changes, naming the policy in force.
    fn record(&self, kind: &str, generation: Option<u64>, detail: String) {
        if let Some(s) = &self.store {
            s.change(Change {
                kind: kind.to_string(),
                policy: Some(self.args.policy.display().to_string()),
                sha256: generation.map(|_| self.current.policy.sha256.clone()),
                generation,
                detail,
            });
        }
    }

    /// The one transition: puts `next` in force (its names known to the
    /// enricher before any event of its generation can arrive), then notes,
    /// logs and records it as `why` says; or, when `next` could not be built
    /// or written, keeps the policy in force and reports why.
    pub fn apply(&mut self, next: Result<Loaded>, why: Why) -> Result<u64> {
        // At WARN, so a log filtered to warnings still says which change a
        // warning is about. The outcome is a field of the one line that
        // reports it, not of the span (it would repeat on every line after).
        let span = tracing::span!(
            Level::WARN,
            "apply",
            why = why.kind(),
            generation = field::Empty,
            policy = field::Empty
        );
        let _entered = span.enter();
        let switched = next.and_then(|next| {
            span.record("policy", short(&next.policy.sha256));
            let generation = PolicyMaps::next_generation(&mut self.ebpf)?;
            {
                let mut en = self.enricher.lock().expect("enricher lock");
                en.add_name_rules(name_rules(&next));
                en.add_generation(generation, generation_names(&next));
            }
            let w = self
                .pmaps
                .switch(&mut self.ebpf, &next.compiled)
                .context("writing the maps failed; the generation in force is unchanged")?;
            if let Why::BridgeOpened(b) = &why {
                self.jit.commit(b.clone())?;
            }
            Ok((next, w))
        });
        let (next, w) = match switched {
            Ok(done) => done,
            Err(e) => {
                self.rejected(why, &e);
                return Err(e);
            }
        };
        span.record("generation", w.generation);
        self.applied(next, why, &w);
        Ok(w.generation)
    }

    /// Logs and records a change that could not be made; the policy in
    /// force stays.
    fn rejected(&mut self, why: Why, e: &anyhow::Error) {
        match why {
            Why::Reload { .. } => {
                // The rejected file's stamps are remembered, so it
                // is not read again every second.
                for (p, t) in &mut self.current.stamps {
                    *t = stamp(p);
                }
                warn!(
                    outcome = "rejected",
                    "reload rejected, the running policy stays in force:\n{e:#}"
                );
                self.last_reload = Some(LastReload {
                    at: now_ts(),
                    outcome: "rejected".into(),
                    errors: format!("{e:#}")
                        .lines()
                        .map(|l| l.trim().to_string())
                        .filter(|l| !l.is_empty())
                        .collect(),
                });
                self.record("reload-rejected", None, format!("{e:#}"));
            }
            Why::BridgesExpired(_) => {
                warn!(
                    outcome = "rejected",
                    "removing expired bridges from the maps failed: {e:#}"
                )
            }
            Why::Pods { before } => {
                warn!(outcome = "rejected", "placing pods failed: {e:#}");
                if let Some(p) = &mut self.pods {
                    p.failed(before);
                }
            }
            // The client is told; its mistake is not the agent's.
            Why::BridgeOpened(_) | Why::BridgeClosed { .. } => {
                info!(outcome = "rejected", "{e:#}")
            }
        }
    }

    /// Puts `next` in the agent's hands once the kernel enforces it; logs
    /// and records it as `why` says.
    fn applied(&mut self, next: Loaded, why: Why, w: &crate::kernel::maps::Written) {
        let took = match &why {
            Why::Reload { started } => started.elapsed(),
            _ => Duration::ZERO,
        };
        self.gauges
            .note_policy(&next.compiled.domain_names, w.generation, took);
        let before = std::mem::replace(&mut self.current, next);
        let g = Some(w.generation);
        match why {
            Why::Reload { .. } => {
                info!(
                    outcome = "applied",
                    "reloaded {} (sha256 {}): generation {} ({} entries written, {} removed)",
                    self.args.policy.display(),
                    short(&self.current.policy.sha256),
                    w.generation,
                    w.updated,
                    w.deleted
                );
                self.last_reload = Some(LastReload {
                    at: now_ts(),
                    outcome: "applied".into(),
                    errors: Vec::new(),
                });
                self.rejected_file = None;
                self.record(
                    "reload",
                    g,
                    format!("{} entries written, {} removed", w.updated, w.deleted),
                );
            }
            Why::BridgeOpened(b) => {
                info!(outcome = "applied", "bridge opened: {}", bridge_detail(&b));
                self.record("bridge-opened", g, bridge_detail(&b));
            }
            Why::BridgeClosed { bridge, by } => {
                // The agent asks itself only for a cluster bridge whose
                // object is gone or changed; the API server does not say
                // who deleted it (its own audit log does).
                let who = if by.is_agent() {
                    "closed as its BulkheadBridge object was deleted or changed".to_string()
                } else {
                    format!("closed by uid {} pid {}", by.uid, by.pid)
                };
                info!(
                    outcome = "applied",
                    "bridge closed: {} ({who})", bridge.name
                );
                self.record(
                    "bridge-closed",
                    g,
                    format!("{} ({who})", bridge_detail(&bridge)),
                );
            }
            Why::BridgesExpired(gone) => {
                let names: Vec<&str> = gone.iter().map(|b| b.name.as_str()).collect();
                info!(outcome = "applied", "bridges expired: {}", names.join(", "));
                for b in &gone {
                    self.record("bridge-expired", g, bridge_detail(b));
                }
            }
            Why::Pods { before: placed } => {
                let detail = pod_moves(
                    &self.current.policy,
                    &placed.assigned,
                    &self.current.compiled.pods,
                );
                info!(
                    outcome = "applied",
                    "pods: {detail} (generation {})", w.generation
                );
                self.record("pods", g, detail);
                let mut en = self.enricher.lock().expect("enricher lock");
                for a in &self.current.compiled.pods {
                    en.paths().insert(a.cgroup_id, a.cgroup.clone());
                }
            }
        }
        drop(before);
    }

    /// The same policy file with another set of just-in-time bridges, or
    /// with pods placed anew (`placed`; `None` keeps the current ones).
    fn rebuild(&self, extra: Option<&JitBridge>, placed: Option<&[Assignment]>) -> Result<Loaded> {
        let l = &self.current;
        let policy = self.jit.merged(&l.file, extra);
        let mut compiled = compile::recompile(
            &policy,
            &l.compiled,
            &self.mount,
            self.args.limits,
            clock::tai_offset_ns(),
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

    /// SIGHUP and `bulkhead reload` (not a reload because the policy file
    /// changed): the events log is reopened at its path, as logrotate's
    /// `create` mode expects.
    pub fn reopen_outputs(&self) {
        if let Some(l) = &self.log {
            l.reopen();
        }
    }

    /// Reads the policy file again, off the loop (compiling a full country
    /// database takes a second), and puts it in force.
    pub async fn reload(&mut self) -> Response {
        sd_notify("RELOADING=1");
        if let Some(answer) = self.unchanged() {
            sd_notify("READY=1");
            return answer;
        }
        let started = Instant::now();
        let prev = (
            self.current.file.geo.clone(),
            self.current.stamps.clone(),
            self.current.geo.clone(),
        );
        let source = Source::new(&self.args, &self.mount, &self.jit, Some(prev));
        let next = match tokio::task::spawn_blocking(move || source.load()).await {
            Ok(r) => r,
            Err(e) => Err(anyhow!("compiling the policy failed: {e}")),
        };
        let next = next.and_then(|mut l| {
            place_pods(&mut l, self.pods.as_mut(), &self.args.policy)?;
            Ok(l)
        });
        // A file that cannot be read, checked or compiled is rejected the
        // same way until it changes; a failed write into the maps is
        // tried again.
        let bad_file = next.as_ref().err().map(|e| format!("{e:#}"));
        let answer = match self.apply(next, Why::Reload { started }) {
            Ok(generation) => Response::Reloaded {
                generation,
                sha256: self.current.policy.sha256.clone(),
            },
            Err(e) => {
                self.rejected_file = bad_file.and_then(|why| {
                    policy::file_sha256(&self.args.policy)
                        .ok()
                        .map(|sha| (sha, why))
                });
                reload_rejected(format!("{e:#}"))
            }
        };
        crate::memory::release_freed();
        sd_notify("READY=1");
        answer
    }

    /// The answer to a reload of files unchanged since the last one (the
    /// once-a-second check may have handled an edit a moment before the
    /// SIGHUP or `bulkhead reload` for it; logrotate's SIGHUP changes no
    /// file): that reload's outcome again, without applying, logging or
    /// recording the same files twice.
    fn unchanged(&mut self) -> Option<Response> {
        let l = &self.current;
        if l.stamps.is_empty() || !l.stamps.iter().all(|(p, t)| stamp(p) == *t) {
            return None;
        }
        // The bytes too: a write within the file system's clock tick may
        // leave every stamp as it was.
        let sha = policy::file_sha256(&self.args.policy).ok()?;
        match &self.rejected_file {
            Some((rejected, e)) if *rejected == sha => {
                info!(
                    "reload: {} is unchanged since it was rejected; the running policy stays in force",
                    self.args.policy.display()
                );
                Some(reload_rejected(e))
            }
            None if sha == l.policy.sha256 => {
                let generation = PolicyMaps::generation(&mut self.ebpf).ok()?;
                info!(
                    "reload: {} (sha256 {}) and its geo files are unchanged; generation {generation} stays",
                    self.args.policy.display(),
                    short(&sha)
                );
                Some(Response::Reloaded {
                    generation,
                    sha256: sha,
                })
            }
            _ => None,
        }
    }

    /// Answers one control request.
    pub async fn handle(&mut self, request: Request, peer: Peer) -> Response {
        match request {
            Request::Status => Response::Status(Box::new(self.status())),
            Request::Reload => {
                self.reopen_outputs();
                self.reload().await
            }
            Request::Explain {
                cgroup,
                dst,
                port,
                proto,
            } => self.explain(&cgroup, &dst, port, &proto),
            Request::BridgeOpen(req) => {
                let by = Opener {
                    uid: peer.uid,
                    gid: peer.gid,
                    pid: peer.pid,
                };
                let bridge = match self
                    .jit
                    .prepare(&self.current.file, req, by, clock::now_ns())
                {
                    Ok(b) => b,
                    Err(e) => return Response::error(format!("{e:#}")),
                };
                let next = self.rebuild(Some(&bridge), None);
                match self.apply(next, Why::BridgeOpened(bridge.clone())) {
                    Ok(generation) => Response::BridgeOpened { bridge, generation },
                    Err(e) => Response::error(format!("{e:#}")),
                }
            }
            Request::BridgeClose { name } => {
                let bridge = match self.jit.close(&name) {
                    Ok(b) => b,
                    Err(e) => return Response::error(format!("{e:#}")),
                };
                let next = self.rebuild(None, None);
                let why = Why::BridgeClosed {
                    bridge: bridge.clone(),
                    by: peer,
                };
                match self.apply(next, why) {
                    Ok(generation) => Response::BridgeClosed { bridge, generation },
                    Err(e) => Response::error(format!("{e:#}")),
                }
            }
            Request::BridgeList => {
                let now = clock::now_ns();
                Response::Bridges {
                    bridges: self
                        .jit
                        .open
                        .iter()
                        .map(|b| OpenBridge {
                            bridge: b.clone(),
                            seconds_left: (b.expires - now) / 1_000_000_000,
                        })
                        .collect(),
                }
            }
            // Streamed by the control task itself.
            Request::Events { .. } => Response::error("events are streamed, not answered"),
        }
    }

    /// Every turn of the loop (100 ms): pods to place; every second also
    /// changed files, new cgroups and expired bridges. Returns whether the
    /// policy file should be read again.
    pub fn tick(&mut self) -> bool {
        // /healthz: the loop turns.
        self.gauges.beat();
        self.gauges.subscriber_drops.store(
            self.hub.subscriber_drops.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        self.hub.note_pending();
        self.audit_full();
        let second = self.last_tick.elapsed() >= Duration::from_secs(1);
        let mut reload = false;
        if second {
            self.last_tick = Instant::now();
            let released =
                (self.enricher.lock().expect("enricher lock")).release_replaced_geo(self.last_tick);
            if released {
                crate::memory::release_freed();
            }
            reload = self.files_changed();
            self.refresh_cgroups();
            if let Err(e) = kernel::write_clock(&mut self.ebpf) {
                warn!("{e:#}");
            }
            // The kernel stopped honouring expired bridges at their
            // instant; here they leave the state file, the maps and the
            // audit trail.
            match self.jit.expire(clock::now_ns()) {
                Ok(gone) if !gone.is_empty() => {
                    let next = self.rebuild(None, None);
                    let _ = self.apply(next, Why::BridgesExpired(gone));
                }
                Ok(_) => {}
                Err(e) => warn!("updating {}: {e:#}", self.args.state_dir.display()),
            }
        }
        let place = self
            .pods
            .as_ref()
            .is_some_and(|p| p.due(&self.current.policy, second));
        if place && !reload {
            self.place();
        }
        reload
    }

    /// `--audit-full`: refuses (or stops refusing) as the trail's outputs
    /// fare; only this loop writes the flag, as it writes every slot.
    fn audit_full(&mut self) {
        let trail: Vec<Arc<Counts>> = self
            .log
            .iter()
            .map(|l| l.counts.clone())
            .chain(self.store.iter().map(|s| s.counts.clone()))
            .collect();
        let counters = self.pins.maps().join(bulkhead_common::maps::MAP_COUNTERS);
        let refuse = self
            .refusal
            .turn(&trail, Instant::now(), || refused(&counters));
        if refuse == self.pmaps.refusing() {
            return;
        }
        match self.pmaps.set_refusing(&mut self.ebpf, refuse) {
            Ok(()) => {
                self.refusal_unwritten = false;
                self.gauges
                    .audit_refusing
                    .store(u64::from(refuse), Ordering::Relaxed);
            }
            Err(e) if !self.refusal_unwritten => {
                self.refusal_unwritten = true;
                warn!(
                    "{} refusing new connections of domain workloads failed (retrying every turn): {e:#}",
                    if refuse { "starting" } else { "stopping" }
                );
            }
            Err(_) => {}
        }
    }

    /// A touch or a rewrite with the same bytes is not a new policy.
    fn files_changed(&mut self) -> bool {
        let l = &mut self.current;
        if l.stamps.iter().all(|(p, t)| stamp(p) == *t) {
            return false;
        }
        let same_policy =
            policy::file_sha256(&self.args.policy).is_ok_and(|h| h == l.policy.sha256);
        let geo_same = l.stamps.iter().skip(1).all(|(p, t)| stamp(p) == *t);
        if same_policy && geo_same {
            for (p, t) in &mut l.stamps {
                *t = stamp(p);
            }
            return false;
        }
        true
    }

    fn place(&mut self) {
        let Some(p) = self.pods.as_mut() else { return };
        let before = p.last.clone();
        let now = p.place(&self.current.policy);
        if now.assigned != before.assigned {
            let next = self.rebuild(None, Some(&now.assigned));
            let _ = self.apply(
                next,
                Why::Pods {
                    before: before.clone(),
                },
            );
        }
        if now.conflicts != before.conflicts {
            for (pod, ds) in &now.conflicts {
                let names: Vec<&str> = ds
                    .iter()
                    .map(|d| self.current.policy.domains[*d].name.as_str())
                    .collect();
                warn!(
                    "pod {pod} is selected by domains {}; it gets none of them \
                     (its cgroup path decides)",
                    names.join(", ")
                );
            }
        }
    }

    /// Cgroups created after the policy was compiled that a glob or path
    /// now names: the kernel already treats children of configured cgroups
    /// as theirs; this adds new top-level matches (e.g. a new contractor pod).
    fn refresh_cgroups(&mut self) {
        let mut found = Vec::new();
        for (i, d) in self.current.policy.domains.iter().enumerate() {
            for pattern in &d.cgroups {
                for (path, id) in cgroup::resolve(&self.mount, pattern) {
                    found.push((id, DomainId::from_index(i).raw(), path));
                }
            }
        }
        let pairs: Vec<(u64, u32)> = found.iter().map(|(id, d, _)| (*id, *d)).collect();
        match self.pmaps.add_cgroups(&mut self.ebpf, &pairs) {
            Ok(0) => {}
            Ok(n) => {
                let mut en = self.enricher.lock().expect("enricher lock");
                for (id, _, p) in found {
                    en.paths().insert(id, p);
                }
                info!("{n} new cgroups joined their domains");
            }
            Err(e) => warn!("adding new cgroups failed: {e:#}"),
        }
    }

    /// `explain` for the policy in force. A destination in no domain
    /// network is decided by the socket listening on it, a TCP listener's
    /// owner read from the socket storage the connect hook reads
    /// (`BH_SOCKS`, through `sock_diag`, which needs only the CAP_BPF the
    /// agent keeps).
    fn explain(&self, cgroup: &str, dst: &str, port: u16, proto: &str) -> Response {
        let Ok(ip) = dst.parse() else {
            return Response::error(format!("not an IP address: {dst}"));
        };
        let proto = policy::Proto::from_name(proto).unwrap_or(policy::Proto::Tcp);
        let l = &self.current;
        let keys: Vec<u32> = l.compiled.domains.iter().map(|(_, r)| r.key).collect();
        let q = explain::Query {
            cgroup: cgroup.to_string(),
            dst: ip,
            port,
            proto,
            learned: crate::kernel::maps::learned_for(&self.ebpf, &keys, ip),
        };
        let host = explain::HostListeners::new(socks_fd(&self.ebpf).ok());
        let mut answer = explain::explain_with(
            &l.policy,
            &l.compiled,
            &l.geo,
            &q,
            clock::now_ns(),
            &|q, ip| host.lookup(q, ip),
        );
        if self.pmaps.refusing() {
            answer = explain::while_refusing(
                answer,
                ip,
                l.compiled.config.mode,
                &self.refusal.state().unwritable,
            );
        }
        Response::Explained { answer }
    }

    /// What `bulkhead status` shows.
    pub fn status(&mut self) -> Status {
        use bulkhead_common::{
            Hook, Reason,
            maps::{
                COUNTER_CUT_MARKED, COUNTER_EVENTS_LOST, COUNTER_EVENTS_RATE_LIMITED,
                COUNTER_EVENTS_WANTED, MAP_COUNTERS, counter_index,
            },
        };
        let generation = PolicyMaps::generation(&mut self.ebpf).unwrap_or(0);
        let learned_now = crate::kernel::maps::learned_count(&self.ebpf);
        let counters = super::metrics::sums(&self.pins.maps().join(MAP_COUNTERS));
        let get = |i: u32| counters.get(i as usize).copied().unwrap_or(0);
        let mut decisions = Vec::new();
        for hook in Hook::ALL {
            for reason in Reason::ALL {
                let n = get(counter_index(hook as u8, reason as u8));
                if n > 0 {
                    decisions.push(DecisionCount {
                        hook: hook.name().into(),
                        reason: reason.name().into(),
                        verdict: if reason.is_deny() { "deny" } else { "allow" }.into(),
                        count: n,
                    });
                }
            }
        }
        let l = &self.current;
        let now = clock::now_ns();
        let bridges = l
            .policy
            .bridges
            .iter()
            .map(|b| BridgeState {
                name: b.name.clone(),
                from: l.policy.domains[b.from].name.clone(),
                to: l.policy.domains[b.to].name.clone(),
                ports: b
                    .ports
                    .iter()
                    .map(|p| {
                        if p.lo == p.hi {
                            format!("{}/{}", p.proto.name(), p.lo)
                        } else {
                            format!("{}/{}-{}", p.proto.name(), p.lo, p.hi)
                        }
                    })
                    .collect(),
                open: b.not_before.is_none_or(|t| t <= now) && b.expires.is_none_or(|t| t > now),
                seconds_left: b.expires.map(|t| (t - now) / 1_000_000_000),
                reason: b.reason.clone(),
            })
            .collect();
        let names = &l.policy.domains;
        let pods = self.pods.as_ref().map(|p| PodsState {
            node: p.node.clone(),
            synced: p.store.synced(),
            pods: p.store.snapshot().1.len(),
            placed: l
                .compiled
                .pods
                .iter()
                .map(|a| PlacedPod {
                    pod: a.pod.clone(),
                    domain: names[a.domain].name.clone(),
                    cgroup: a.cgroup.clone(),
                })
                .collect(),
            pending: p.last.pending.clone(),
            conflicts: p
                .last
                .conflicts
                .iter()
                .map(|(pod, ds)| PodConflict {
                    pod: pod.clone(),
                    domains: ds.iter().map(|d| names[*d].name.clone()).collect(),
                })
                .collect(),
        });
        Status {
            pid: std::process::id(),
            policy: self.args.policy.clone(),
            sha256: l.policy.sha256.clone(),
            mode: format!("{:?}", l.policy.mode).to_lowercase(),
            audit_full: self.refusal.state(),
            generation,
            running_since: self.started.clone(),
            last_reload: self.last_reload.clone(),
            cgroup_root: self.root.clone(),
            bpffs_dir: self.args.bpffs_dir.clone(),
            layout: self.pins.layout.clone(),
            programs: kernel::PROGRAMS
                .iter()
                .map(|p| ProgramState {
                    name: p.name.into(),
                    hook: p.hook.into(),
                    pinned: p.pin(&self.pins).exists(),
                    entered_from: p.entered_from().map(Into::into),
                })
                .collect(),
            maps: self.pmaps.fill(generation),
            domains: l.policy.domains.iter().map(|d| d.name.clone()).collect(),
            bridges,
            decisions,
            events: EventCounts {
                wanted: get(COUNTER_EVENTS_WANTED),
                rate_limited: get(COUNTER_EVENTS_RATE_LIMITED),
                lost_ring_full: get(COUNTER_EVENTS_LOST),
                delivered: self.delivered.load(Ordering::Relaxed),
                sequence_gaps: self.enricher.lock().map(|e| e.gaps).unwrap_or(0),
                subscribers: self.hub.subscribers(),
                subscriber_drops: self.hub.subscriber_drops.load(Ordering::Relaxed),
            },
            connections_cut: CutCounts {
                marked: get(COUNTER_CUT_MARKED),
                destroyed: self.cuts.destroyed.load(Ordering::Relaxed),
                how: if self.cuts.enabled {
                    "destroyed with bpf_sock_destroy (the application sees ECONNABORTED) in the agent's network namespace; elsewhere their packets are dropped"
                } else {
                    "their packets are dropped (no bpf_sock_destroy: Linux 6.5+)"
                }
                .into(),
            },
            dns: super::protocol::DnsCounts {
                evicted: get(bulkhead_common::maps::COUNTER_DNS_NEW).saturating_sub(learned_now as u64),
                learned_now,
                max: bulkhead_common::maps::MAX_LEARNED,
                answers: get(bulkhead_common::maps::COUNTER_DNS_ANSWERS),
                addresses: get(bulkhead_common::maps::COUNTER_DNS_LEARNED),
                spoofed: get(bulkhead_common::maps::COUNTER_DNS_SPOOFED),
                unread: get(bulkhead_common::maps::COUNTER_DNS_UNREAD),
            },
            packet_sockets: self.packet_sockets.clone(),
            capabilities: self.capabilities.clone(),
            pods,
            outputs: self.outputs().iter().map(|c| c.snapshot()).collect(),
        }
    }

    /// Every output's counters: the events log, stdout, the audit store,
    /// live followers.
    fn outputs(&self) -> Vec<Arc<Counts>> {
        self.log
            .iter()
            .chain(&self.stdout)
            .map(|l| l.counts.clone())
            .chain(self.otlp.iter().map(|o| o.counts.clone()))
            .chain(self.store.iter().map(|s| s.counts.clone()))
            .chain([self.hub.counts.clone()])
            .collect()
    }

    /// The pinned maps' directory (the metrics read the counters there).
    pub fn pins_maps(&self) -> PathBuf {
        self.pins.maps()
    }

    /// Records the stop; enforcement stays pinned, but not a refusal for
    /// lack of an audit trail (`--audit-full=refuse`): with no agent the
    /// flag would refuse domain workloads until the next start.
    pub fn stop(mut self, socket: &Path) {
        if self.pmaps.refusing() {
            match self.pmaps.set_refusing(&mut self.ebpf, false) {
                Ok(()) => warn!(
                    "stopping while refusing new connections of domain workloads \
                     (--audit-full=refuse): no longer refused"
                ),
                Err(e) => warn!(
                    "stopping while refusing new connections of domain workloads, and clearing \
                     the flag failed: they stay refused until an agent starts or \
                     `bulkhead detach`: {e:#}"
                ),
            }
        }
        let last = PolicyMaps::generation(&mut self.ebpf).unwrap_or(0);
        self.record("stop", Some(last), "enforcement stays pinned".into());
        let _ = fs::remove_file(socket);
        // Each output writes what it holds (and a sealed one its `stop`
        // record), for at most 2 s.
        for l in [self.log.take(), self.stdout.take()].into_iter().flatten() {
            l.finish(Duration::from_secs(2));
        }
        if let Some(o) = self.otlp.take() {
            o.finish(Duration::from_secs(2));
        }
        if let Some(s) = &self.store {
            s.finish(Duration::from_secs(2));
        }
        for c in self.outputs() {
            let pending = c.pending.load(Ordering::Relaxed);
            if pending > 0 && c.name != "followers" {
                warn!("{}: {pending} events not written at stop", c.name);
            }
        }
        info!(
            "stopping; {} events delivered; enforcement stays pinned under {} (`bulkhead detach` removes it)",
            self.delivered.load(Ordering::Relaxed),
            self.pins.root.display()
        );
    }
}

/// Connections the kernel refused for lack of an audit trail so far
/// (`audit-unavailable`, every hook), from the pinned counters.
fn refused(counters: &Path) -> u64 {
    use bulkhead_common::{Hook, Reason, maps::counter_index};
    let sums = super::metrics::sums(counters);
    Hook::ALL
        .into_iter()
        .map(|h| counter_index(h as u8, Reason::AuditUnavailable as u8))
        .filter_map(|i| sums.get(i as usize))
        .sum()
}

/// The policy side of a start: where the cgroups are, the bridges still
/// open, the pods, and the policy file read and compiled.
struct FirstPolicy {
    mount: PathBuf,
    root: PathBuf,
    jit: Jit,
    /// Just-in-time bridges that expired while no agent ran.
    expired_while_down: Vec<JitBridge>,
    pods: Option<NodePods>,
    loaded: Loaded,
}

fn first_policy(args: &RunArgs) -> Result<FirstPolicy> {
    let mount = cgroup::cgroup2_mount()?;
    let root = args.cgroup_root.clone().unwrap_or_else(|| mount.clone());
    if !root.starts_with(&mount) {
        bail!(
            "--cgroup-root {} is not inside the cgroup v2 mount {}",
            root.display(),
            mount.display()
        );
    }
    let mut jit = Jit::load(&args.state_dir.join("bridges.json"))?;
    let expired_while_down = jit.expire(clock::now_ns())?;
    if args.k8s_node.is_some() && !cfg!(feature = "k8s") {
        bail!(
            "--k8s-node: this bulkhead was built without Kubernetes support (cargo feature `k8s`)"
        );
    }
    let mut pods = args
        .k8s_node
        .as_ref()
        .map(|node| NodePods::new(node.clone(), &mount));
    let mut loaded = Source::new(args, &mount, &jit, None).load()?;
    place_pods(&mut loaded, pods.as_mut(), &args.policy)?;
    Ok(FirstPolicy {
        mount,
        root,
        jit,
        expired_while_down,
        pods,
        loaded,
    })
}

/// Records the sockets bound before the post_bind hooks were attached;
/// how many. A failure costs those sockets their domain, not the start.
fn seed_listeners(ebpf: &mut Ebpf, mount: &Path) -> usize {
    match listeners::seed(ebpf, mount) {
        Ok((ok, failed)) => {
            if failed > 0 {
                warn!(
                    "{failed} sockets bound before start could not be recorded (pidfd_getfd refused: \
                     CAP_SYS_PTRACE missing?); connections to them are decided as if they had no domain"
                );
            }
            ok
        }
        Err(e) => {
            warn!("could not record sockets bound before start: {e:#}");
            0
        }
    }
}

/// The enricher, knowing the cgroups of the policy and the names of the
/// generations earlier agents left events of.
fn enricher(
    mount: &Path,
    loaded: &Loaded,
    state_dir: &Path,
    layout: &str,
    tai: i64,
) -> Arc<Mutex<Enricher>> {
    let mut paths = PathCache::new(mount.to_path_buf());
    for (id, _, p) in &loaded.compiled.cgroups {
        paths.insert(*id, p.clone());
    }
    let mut en = Enricher::new(paths, tai);
    en.recall(names_file(state_dir, layout), &loaded.geo);
    Arc::new(Mutex::new(en))
}

/// Where the agent keeps the names of recent generations (see
/// [`Enricher::recall`]).
pub fn names_file(state_dir: &Path, layout: &str) -> PathBuf {
    state_dir.join(format!("generations-{layout}.json"))
}

/// What `status` says of packet sockets, warning when they are not refused.
fn packet_sockets(lsm: Option<String>) -> String {
    match lsm {
        None => "refused in domain workloads (BPF LSM)".to_string(),
        Some(why) => {
            warn!(
                "packet sockets (AF_PACKET) are NOT refused: {why}; run domain workloads without CAP_NET_RAW"
            );
            format!("not refused ({why}): run domain workloads without CAP_NET_RAW")
        }
    }
}

/// Now, as `status` writes times (RFC 3339, UTC).
fn now_ts() -> String {
    clock::format_ts(clock::now_ns() as u64, 0)
}

/// The connection cutter (socket iterators and `bpf_sock_destroy`), when
/// the kernel has it, with its own handle on the counters for the marks.
fn cuts(
    ebpf: &Ebpf,
    pins: &Pins,
    gauges: &Gauges,
    tai: i64,
    btf: &kernel::KernelBtf,
) -> Result<(Arc<CutState>, Option<Cuts>)> {
    let cutter = match btf.get().and_then(|btf| Cutter::new(socks_fd(ebpf)?, btf)) {
        Ok(c) => {
            info!(
                "established connections that a policy stops allowing are destroyed (bpf_sock_destroy) in this \
                 network namespace; in others the packet hooks drop their traffic"
            );
            Some(c)
        }
        Err(e) => {
            warn!(
                "established connections that a policy stops allowing are not destroyed ({e:#}); \
                 the packet hooks drop their traffic"
            );
            None
        }
    };
    let cut_state = Arc::new(CutState {
        enabled: cutter.is_some(),
        destroyed: gauges.cuts_destroyed.clone(),
        marked: AtomicU64::new(0),
    });
    let cuts = match cutter {
        Some(cutter) => {
            // The events task's own handle on the counters, for the marks.
            let pin = pins.maps().join(bulkhead_common::maps::MAP_COUNTERS);
            let counters = PerCpuArray::<MapData, u64>::try_from(aya::maps::Map::PerCpuArray(
                MapData::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))?,
            ))?;
            Some(Cuts {
                cutter,
                counters,
                tai_offset_ns: tai,
                state: cut_state.clone(),
            })
        }
        None => None,
    };
    Ok((cut_state, cuts))
}

/// Places the node's pods for a freshly read policy; without a pod watch,
/// a policy that selects pods is refused.
fn place_pods(l: &mut Loaded, pods: Option<&mut NodePods>, path: &Path) -> Result<()> {
    match pods {
        Some(pods) => l.compiled.place_pods(&pods.place(&l.policy).assigned),
        None if selects_pods(&l.policy) => bail!(
            "policy {} rejected: its domains select pods (`pods:`) but the agent does not \
             watch Kubernetes; run it with --k8s-node",
            path.display()
        ),
        None => {}
    }
    Ok(())
}

/// The first 12 hex digits of a policy's sha256, as logs show it.
fn short(sha256: &str) -> &str {
    &sha256[..12.min(sha256.len())]
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

/// The `egress.names` rules of a loaded policy, as events name them:
/// `(domain key, wildcard, hash)` → the rule as written.
fn name_rules(l: &Loaded) -> Vec<((u32, u8, u64), String)> {
    l.compiled
        .names
        .iter()
        .filter_map(|((domain, wildcard, hash), rule)| {
            let index = bulkhead_common::DomainId::from(*domain).index()?;
            let d = l.policy.domains.get(index)?;
            let name = d.names.as_ref()?.names().get(*rule as usize - 1)?;
            Some((
                (crate::compile::domain_key(&d.name), *wildcard, *hash),
                name.clone(),
            ))
        })
        .collect()
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
