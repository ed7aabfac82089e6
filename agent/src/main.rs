//! `bulkhead`: keeps every workload (cgroup) inside its domain, lets traffic
//! cross domains only over explicit, time-bounded bridges, enforces
//! geofencing, and records every decision.
//!
//! Exit codes: 0 success; 1 a rejected policy or a runtime error (printed
//! once, with its cause chain); 2 bad command-line usage; 3 `explain
//! --replay` found decisions that the candidate policy would change.

mod cli;

use cli::client;

use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::{Parser, Subcommand};

// Every duration flag takes the policy's durations (`30s`, `10m`, `2h`, `7d`).
use bulkhead::duration::parse_duration;
use bulkhead::{
    LoadError,
    compile::EventLimits,
    explain, kernel, policy,
    runtime::{
        self,
        logging::LogFormat,
        protocol::{Filter, Reply, Request, Response},
        sink,
    },
};

const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/bulkhead";

#[derive(Parser)]
#[command(
    name = "bulkhead",
    version,
    about = "eBPF host network enforcement: domains, bridges, geofencing, audit trail"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate and compile a policy; print a summary, or every error as
    /// `file:line:col: message` (exit 1). Changes nothing that is running.
    Check {
        /// The policy file (YAML).
        policy: PathBuf,
    },
    /// Load the kernel programs, attach them to the cgroup v2 root, pin
    /// everything, enforce the policy and stream events as JSON lines.
    /// Reloads on SIGHUP and when the policy or a geo file changes. Exiting
    /// (or crashing) leaves the last policy enforced.
    Run {
        /// The policy file (YAML).
        #[arg(long, env = "BULKHEAD_POLICY")]
        policy: PathBuf,
        /// Attach to this cgroup instead of the cgroup v2 root (found in
        /// /proc/self/mountinfo); only workloads below it are enforced.
        #[arg(long)]
        cgroup_root: Option<PathBuf>,
        /// bpffs directory for pinned maps and links; one agent per directory.
        #[arg(long, default_value = DEFAULT_BPFFS_DIR, env = "BULKHEAD_BPFFS_DIR")]
        bpffs_dir: PathBuf,
        /// Also append events (JSON lines) to this file.
        #[arg(long)]
        events_log: Option<PathBuf>,
        /// Do not write events to stdout.
        #[arg(long)]
        no_stdout_events: bool,
        /// Size of the kernel's event ring buffer in bytes (a power of two,
        /// at least 4096). Events that do not fit are counted as lost.
        #[arg(long, default_value_t = 1 << 20, value_parser = ring_size)]
        ring_buffer_bytes: u32,
        /// Events each cgroup may emit per second (token bucket in the
        /// kernel); 0 = unlimited. Events over the limit are counted.
        #[arg(long, default_value_t = 1000)]
        event_rate: u32,
        /// Burst size of the per-cgroup event token bucket.
        #[arg(long, default_value_t = 2000)]
        event_burst: u32,
        /// Directory for the control socket [default: /run/<name of the
        /// bpffs dir>, i.e. /run/bulkhead].
        #[arg(long)]
        run_dir: Option<PathBuf>,
        /// Group (name or gid) whose members may use the control socket
        /// besides root.
        #[arg(long)]
        control_group: Option<String>,
        /// Rotate the events log when it reaches this size (bytes; 0 = never).
        #[arg(long, default_value_t = 64 << 20)]
        events_log_max_bytes: u64,
        /// Rotated events logs kept (events.jsonl.1 ... .N).
        #[arg(long, default_value_t = 5)]
        events_log_keep: u32,
        /// Persistent state: just-in-time bridges, and the audit store
        /// unless --audit-db says otherwise [default: /var/lib/<name of the
        /// bpffs dir>, i.e. /var/lib/bulkhead].
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// The queryable audit store (SQLite) [default: <state dir>/audit.db].
        #[arg(long)]
        audit_db: Option<PathBuf>,
        /// Do not keep the SQLite audit store.
        #[arg(long, conflicts_with = "audit_db")]
        no_audit_db: bool,
        /// Delete audit store rows older than this (e.g. 30d, 12h).
        #[arg(long, default_value = "30d", value_parser = parse_duration)]
        audit_retention: u64,
        /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9477);
        /// off by default.
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
        /// Accept a policy file (or geo file) that a non-root user could
        /// change; by default the agent refuses it, since that user could
        /// open every domain at the next reload.
        #[arg(long)]
        allow_untrusted_policy: bool,
        /// Watch this Kubernetes node's pods through the API server
        /// (in-cluster service account, or KUBECONFIG) and place the pods
        /// that domains select with `pods:`. The DaemonSet passes
        /// spec.nodeName. Needs a build with the `k8s` feature.
        #[arg(long, value_name = "NODE")]
        k8s_node: Option<String>,
        /// For `cargo xtask bench`: also load and pin the benchmark probe
        /// programs (never attached) under <bpffs dir>/probes.
        #[arg(long, hide = true)]
        bench_probes: bool,
        /// Which log records are written: a level (error, warn, info,
        /// debug, trace) or a filter in RUST_LOG syntax
        /// (`info,bulkhead::runtime=debug`) [default: BULKHEAD_LOG, else
        /// RUST_LOG, else info].
        #[arg(long, value_name = "FILTER")]
        log_level: Option<String>,
        /// `text` for terminals and the journal; `json` (one object per
        /// line) for Kubernetes and log pipelines.
        #[arg(long, value_enum, default_value_t)]
        log_format: LogFormat,
    },
    /// Just-in-time bridges: time-boxed, recorded with who opened them and
    /// why; the policy's `jit_bridges:` says which pairs may get one and
    /// for how long at most.
    Bridge {
        #[command(subcommand)]
        what: BridgeCommand,
    },
    /// Query the audit store (works without a running agent).
    Audit {
        #[command(subcommand)]
        what: AuditCommand,
    },
    /// Show what is enforced: programs, policy generation and hash, map
    /// fill levels, decision counters, event losses, bridges.
    Status {
        #[command(flatten)]
        agent: AgentArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Ask the running agent to reload its policy now (like SIGHUP) and
    /// report the result; a rejected policy leaves the running one in force.
    Reload {
        #[command(flatten)]
        agent: AgentArgs,
    },
    /// Print recent events and, with --follow, stream new ones.
    Events {
        #[command(flatten)]
        agent: AgentArgs,
        /// Keep streaming new events.
        #[arg(long, short)]
        follow: bool,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        /// Only events whose source or destination is in this domain.
        #[arg(long)]
        domain: Option<String>,
        /// Only this verdict: allow, deny, would-deny or cut.
        #[arg(long)]
        verdict: Option<String>,
        /// Only this reason (e.g. cross-domain, country-denied).
        #[arg(long)]
        reason: Option<String>,
        /// Only events newer than this (e.g. 30s, 10m, 2h, 1d).
        #[arg(long, value_parser = parse_duration)]
        since: Option<u64>,
        /// Events the agent buffers for this follower before it loses them
        /// (64..65536); losses are reported in the stream.
        #[arg(long, default_value_t = 16384)]
        queue: usize,
    },
    /// The verdict and reason the live policy (or --policy FILE) gives a
    /// connection from a cgroup, and the rule that decided it.
    Explain {
        #[command(flatten)]
        agent: AgentArgs,
        /// Cgroup path relative to the cgroup v2 mount, e.g. /contractors.slice/job.scope.
        #[arg(long, required_unless_present = "replay")]
        cgroup: Option<String>,
        /// Destination address, optionally with :port ([v6]:port for IPv6).
        #[arg(long, required_unless_present = "replay")]
        dst: Option<String>,
        /// Replay the decisions in this events file (JSON lines, as
        /// `--events-log` writes them) against --policy and list those
        /// whose verdict would change.
        #[arg(long, requires = "policy", conflicts_with_all = ["cgroup", "dst"])]
        replay: Option<PathBuf>,
        /// Protocol of the connection.
        #[arg(long, default_value = "tcp", value_parser = ["tcp", "udp"])]
        proto: String,
        /// Answer for this candidate policy file instead of the live one.
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print every entry of the pinned policy maps (both slots) as JSON:
    /// what the kernel enforces, independent of any agent.
    Dump {
        /// bpffs directory used by `run`.
        #[arg(long, default_value = DEFAULT_BPFFS_DIR, env = "BULKHEAD_BPFFS_DIR")]
        bpffs_dir: PathBuf,
    },
    /// Remove everything bulkhead pinned and attached: enforcement stops.
    Detach {
        /// bpffs directory used by `run`.
        #[arg(long, default_value = DEFAULT_BPFFS_DIR, env = "BULKHEAD_BPFFS_DIR")]
        bpffs_dir: PathBuf,
        /// Detach even while an agent is running with that directory.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
#[expect(clippy::large_enum_variant, reason = "parsed once per process")]
enum AuditCommand {
    /// Events from the audit store, filtered; oldest first.
    Query {
        #[command(flatten)]
        db: AuditDb,
        /// Only events newer than this (e.g. 10m, 24h, 7d).
        #[arg(long, value_parser = parse_duration)]
        since: Option<u64>,
        /// Only events at or after this RFC 3339 time.
        #[arg(long)]
        from: Option<String>,
        /// Only events before this RFC 3339 time.
        #[arg(long)]
        to: Option<String>,
        /// Source or destination domain.
        #[arg(long)]
        domain: Option<String>,
        /// Source domain (the workload's, for egress).
        #[arg(long)]
        src_domain: Option<String>,
        /// Destination domain.
        #[arg(long)]
        dst_domain: Option<String>,
        /// Cgroup path or a parent of it.
        #[arg(long)]
        cgroup: Option<String>,
        /// Destination address or CIDR.
        #[arg(long)]
        dst: Option<String>,
        /// Destination port.
        #[arg(long)]
        port: Option<u16>,
        /// Country (ISO code) of the peer.
        #[arg(long)]
        country: Option<String>,
        /// allow, deny, would-deny or cut.
        #[arg(long)]
        verdict: Option<String>,
        /// Reason name (see README).
        #[arg(long)]
        reason: Option<String>,
        /// Output format.
        #[arg(long, default_value = "table", value_parser = ["table", "json", "csv"])]
        format: String,
        /// At most this many rows.
        #[arg(long, default_value_t = 10_000)]
        limit: usize,
    },
    /// Policy and agent changes (start, reload, rejected reload, bridges,
    /// stop) and every control command with its caller.
    Changes {
        #[command(flatten)]
        db: AuditDb,
        /// Only changes newer than this (e.g. 24h).
        #[arg(long, value_parser = parse_duration)]
        since: Option<u64>,
    },
}

#[derive(Subcommand)]
enum BridgeCommand {
    /// Open a bridge now, for a bounded time.
    Open {
        #[command(flatten)]
        agent: AgentArgs,
        /// Domain the connections come from.
        #[arg(long)]
        from: String,
        /// Domain they go to.
        #[arg(long)]
        to: String,
        /// Protocol and port(s), e.g. tcp/5432 or udp/8000-8100; repeatable.
        #[arg(long = "port", required = true)]
        ports: Vec<String>,
        /// How long it stays open (e.g. 30m, 2h); at most the policy's max_duration.
        #[arg(long = "for", value_parser = parse_duration)]
        for_secs: u64,
        /// Why (e.g. a ticket); recorded in the audit trail.
        #[arg(long)]
        reason: String,
        /// A name for it [default: jit-<from>-<to>-<time>].
        #[arg(long)]
        name: Option<String>,
    },
    /// Close a just-in-time bridge before its time is up.
    Close {
        #[command(flatten)]
        agent: AgentArgs,
        /// Its name (see `bridge list`).
        name: String,
    },
    /// List the open just-in-time bridges with their time left.
    List {
        #[command(flatten)]
        agent: AgentArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Which audit store to read.
#[derive(clap::Args)]
struct AuditDb {
    /// The SQLite file [default: /var/lib/<name of the bpffs dir>/audit.db].
    #[arg(long)]
    db: Option<PathBuf>,
    /// bpffs directory of the agent (names the default database).
    #[arg(long, default_value = DEFAULT_BPFFS_DIR, env = "BULKHEAD_BPFFS_DIR")]
    bpffs_dir: PathBuf,
}

impl AuditDb {
    fn path(&self) -> PathBuf {
        self.db
            .clone()
            .unwrap_or_else(|| client::default_state_dir(&self.bpffs_dir).join("audit.db"))
    }
}

/// Where to find a running agent.
#[derive(clap::Args)]
struct AgentArgs {
    /// bpffs directory the agent was started with.
    #[arg(long, default_value = DEFAULT_BPFFS_DIR, env = "BULKHEAD_BPFFS_DIR")]
    bpffs_dir: PathBuf,
    /// The agent's run directory [default: /run/<name of the bpffs dir>].
    #[arg(long)]
    run_dir: Option<PathBuf>,
}

impl AgentArgs {
    fn run_dir(&self) -> PathBuf {
        self.run_dir
            .clone()
            .unwrap_or_else(|| client::default_run_dir(&self.bpffs_dir))
    }
}

/// A reply of another kind than the request asks for: an agent of another
/// version, most likely.
fn unexpected(r: Response) -> Result<ExitCode> {
    anyhow::bail!("unexpected reply from the agent (another version?): {r:?}")
}

fn ring_size(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|e| format!("{e}"))?;
    if n < 4096 || !n.is_power_of_two() {
        return Err("must be a power of two of at least 4096".into());
    }
    Ok(n)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bulkhead: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn dispatch(cmd: Command) -> Result<ExitCode> {
    match cmd {
        Command::Check { policy: path } => {
            let (p, c) = match cli::candidate(&path) {
                Ok(cand) => (cand.policy, cand.compiled),
                Err(LoadError::Policy(diags)) => {
                    eprint!("{diags}");
                    if !diags.to_string().ends_with('\n') {
                        eprintln!();
                    }
                    return Ok(ExitCode::from(1));
                }
                Err(e) => return Err(e.into()),
            };
            print!("{}", policy::summary(&p));
            let t = &c.addr;
            println!(
                "compiled: {} cgroups present now, {} IPv4 + {} IPv6 domain networks, {} IPv4 + {} IPv6 geo ranges; address table {} words ({} KiB) in {} IPv4 + {} IPv6 nodes, {} classes",
                c.cgroups.len(),
                c.net4.len(),
                c.net6.len(),
                t.stats.geo.v4.merged_ranges,
                t.stats.geo.v6.merged_ranges,
                t.words.len(),
                t.words.len() * 4 / 1024,
                t.stats.nodes_v4,
                t.stats.nodes_v6,
                t.classes.len(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            policy,
            cgroup_root,
            bpffs_dir,
            events_log,
            no_stdout_events,
            ring_buffer_bytes,
            event_rate,
            event_burst,
            run_dir,
            control_group,
            events_log_max_bytes,
            events_log_keep,
            state_dir,
            audit_db,
            no_audit_db,
            audit_retention,
            metrics_addr,
            allow_untrusted_policy,
            k8s_node,
            bench_probes,
            log_level,
            log_format,
        } => {
            runtime::logging::init(log_level.as_deref(), log_format)?;
            let state_dir = state_dir.unwrap_or_else(|| client::default_state_dir(&bpffs_dir));
            let audit_db = match (no_audit_db, audit_db) {
                (true, _) => None,
                (false, Some(p)) => Some(p),
                (false, None) => Some(state_dir.join("audit.db")),
            };
            let control_group = control_group
                .as_deref()
                .map(runtime::control::group_id)
                .transpose()?;
            let run_dir = run_dir.unwrap_or_else(|| client::default_run_dir(&bpffs_dir));
            let ran = runtime::run(runtime::RunArgs {
                run_dir,
                control_group,
                rotation: sink::Rotation {
                    max_bytes: events_log_max_bytes,
                    keep: events_log_keep,
                },
                audit_db,
                audit_retention: std::time::Duration::from_secs(audit_retention),
                metrics_addr,
                state_dir,
                allow_untrusted_policy,
                k8s_node,
                bench_probes,
                policy,
                cgroup_root,
                bpffs_dir,
                events_log,
                stdout_events: !no_stdout_events,
                ring_buffer_bytes,
                limits: EventLimits {
                    rate: event_rate,
                    burst: event_burst,
                },
            });
            match ran {
                Ok(()) => Ok(ExitCode::SUCCESS),
                // In the log's own format, so a pipeline parsing it sees why.
                Err(e) if log_format == LogFormat::Json => {
                    tracing::error!("{e:#}");
                    Ok(ExitCode::from(1))
                }
                Err(e) => Err(e),
            }
        }
        Command::Status { agent, json } => {
            let status = match client::call(&agent.run_dir(), &Request::Status)? {
                Response::Status(s) => s,
                other => return unexpected(other),
            };
            if json {
                let reply = Reply::from(Response::Status(status));
                println!("{}", serde_json::to_string_pretty(&reply)?);
            } else {
                print!("{}", cli::render_status(&status));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Reload { agent } => {
            match client::call(&agent.run_dir(), &Request::Reload)? {
                Response::Reloaded { generation, sha256 } => {
                    println!("reloaded: generation {generation} (sha256 {sha256})")
                }
                other => return unexpected(other),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Events {
            agent,
            follow,
            json,
            domain,
            verdict,
            reason,
            since,
            queue,
        } => {
            let filter = Filter {
                queue: Some(queue),
                domain,
                verdict,
                reason,
                since_secs: since,
            };
            cli::events(&agent.run_dir(), filter, follow, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Explain {
            agent,
            cgroup,
            dst,
            proto,
            policy,
            json,
            replay,
        } => {
            if let (Some(events), Some(path)) = (&replay, &policy) {
                let changed = cli::replay(events, path, json)?;
                return Ok(if changed > 0 {
                    ExitCode::from(3)
                } else {
                    ExitCode::SUCCESS
                });
            }
            let (cgroup, dst) = (cgroup.unwrap_or_default(), dst.unwrap_or_default());
            let (ip, port) = cli::parse_dst(&dst)?;
            let answer = match policy {
                Some(path) => cli::explain_file(&path, &cgroup, ip, port, &proto)?,
                None => {
                    let req = Request::Explain {
                        cgroup,
                        dst: ip.to_string(),
                        port,
                        proto,
                    };
                    match client::call(&agent.run_dir(), &req)? {
                        Response::Explained { answer } => answer,
                        other => return unexpected(other),
                    }
                }
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                print!("{}", explain::render(&answer));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bridge { what } => {
            match what {
                BridgeCommand::Open {
                    agent,
                    from,
                    to,
                    ports,
                    for_secs,
                    reason,
                    name,
                } => {
                    let req = Request::BridgeOpen {
                        name,
                        from,
                        to,
                        ports,
                        for_secs,
                        reason,
                    };
                    let (b, generation) = match client::call(&agent.run_dir(), &req)? {
                        Response::BridgeOpened { bridge, generation } => (bridge, generation),
                        other => return unexpected(other),
                    };
                    println!(
                        "opened {} ({} -> {} {:?}) until {} (generation {generation})",
                        b.name,
                        b.from,
                        b.to,
                        b.ports,
                        bulkhead::clock::format_ts(b.expires as u64, 0),
                    );
                }
                BridgeCommand::Close { agent, name } => {
                    match client::call(&agent.run_dir(), &Request::BridgeClose { name })? {
                        Response::BridgeClosed { bridge, generation } => {
                            println!("closed {} (generation {generation})", bridge.name)
                        }
                        other => return unexpected(other),
                    }
                }
                BridgeCommand::List { agent, json } => {
                    let bridges = match client::call(&agent.run_dir(), &Request::BridgeList)? {
                        Response::Bridges { bridges } => bridges,
                        other => return unexpected(other),
                    };
                    if json {
                        println!("{}", serde_json::to_string_pretty(&bridges)?);
                    } else {
                        for e in &bridges {
                            let b = &e.bridge;
                            println!(
                                "{:<32} {} -> {} {:?} {}s left, opened by uid {}: {}",
                                b.name,
                                b.from,
                                b.to,
                                b.ports,
                                e.seconds_left,
                                b.opened_by.uid,
                                b.reason
                            );
                        }
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit { what } => {
            cli::audit(what)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Dump { bpffs_dir } => {
            let pins = kernel::Pins::found(bpffs_dir)?;
            println!(
                "{}",
                serde_json::to_string_pretty(&bulkhead::maps::dump(&pins.maps())?)?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Detach { bpffs_dir, force } => {
            if !force && kernel::is_locked(&bpffs_dir) {
                anyhow::bail!(
                    "an agent is running with {}; stop it first (its exit keeps enforcement pinned) or pass --force",
                    bpffs_dir.display()
                );
            }
            let removed = kernel::detach(&bpffs_dir)?;
            println!(
                "detached: removed {} pinned objects under {}",
                removed.len(),
                bpffs_dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
