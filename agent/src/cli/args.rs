//! The command line as clap parses it (the doc comments are the help
//! text), and the defaults that flags resolve to.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

// Every duration flag takes the policy's durations (`30s`, `10m`, `2h`, `7d`).
use bulkhead::duration::parse_duration;
use bulkhead::{
    clock,
    runtime::{
        audit_full::Stance,
        bridges::OpenRequest,
        logging::LogFormat,
        otlp::{self, Protocol as OtlpProtocol},
        protocol::Filter,
    },
};

const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/bulkhead";

#[derive(Parser)]
#[command(
    name = "bulkhead",
    version,
    about = "eBPF host network enforcement: domains, bridges, geofencing, audit trail"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
    Run(RunFlags),
    /// Just-in-time bridges: time-boxed, recorded with who opened them and
    /// why; the policy's `jit_bridges:` says which pairs may get one and
    /// for how long at most.
    Bridge {
        #[command(subcommand)]
        what: BridgeCommand,
    },
    /// The audit trail: query the store, seal the trail, verify it (works
    /// without a running agent).
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
        #[command(flatten)]
        filter: EventFilter,
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
        /// The agent's state directory, where it keeps the names that
        /// learned addresses are shown with [default: /var/lib/<name of the
        /// bpffs dir>].
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Accepted like every command that prints JSON (dump prints
        /// nothing else).
        #[arg(long)]
        json: bool,
    },
    /// Make what `run` cannot make inside its sandbox: the socket storage
    /// map, charged to no memory cgroup
    ///
    /// The socket storage map, pinned, created from the root memory cgroup
    /// so that no memory cgroup pays for the host's sockets (README,
    /// Memory). For systemd's `ExecStartPre=-+` (the unit's
    /// `ProtectControlGroups=yes` keeps the agent from it) and for a pod's
    /// init container (the pod's cgroup namespace keeps the agent from it;
    /// `prepare` enters PID 1's, which takes CAP_SYS_ADMIN: see
    /// deploy/kubernetes/README.md). Nothing to do when the map is pinned
    /// already. Exit 1 when it could not be made: `run` then makes it,
    /// charged to its own memory cgroup.
    Prepare {
        /// bpffs directory used by `run`.
        #[arg(long, default_value = DEFAULT_BPFFS_DIR, env = "BULKHEAD_BPFFS_DIR")]
        bpffs_dir: PathBuf,
        /// Exit 0 even when the map could not be made (it says why): for
        /// an init container, which must not keep the agent from starting.
        #[arg(long)]
        warn_only: bool,
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

/// `run`'s flags, as given; `run::run_args` resolves them.
#[derive(clap::Args)]
pub struct RunFlags {
    /// The policy file (YAML).
    #[arg(long, env = "BULKHEAD_POLICY")]
    pub policy: PathBuf,
    /// Attach to this cgroup instead of the cgroup v2 root (found in
    /// /proc/self/mountinfo); only workloads below it are enforced.
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// bpffs directory for pinned maps and links; one agent per directory.
    #[arg(long, default_value = DEFAULT_BPFFS_DIR, env = "BULKHEAD_BPFFS_DIR")]
    pub bpffs_dir: PathBuf,
    /// Also append events (JSON lines) to this file.
    #[arg(long)]
    pub events_log: Option<PathBuf>,
    /// Do not write events to stdout.
    #[arg(long)]
    pub no_stdout_events: bool,
    /// Size of the kernel's event ring buffer in bytes (a power of two,
    /// at least 4096). Events that do not fit are counted as lost.
    #[arg(long, default_value_t = 1 << 20, value_parser = ring_size)]
    pub ring_buffer_bytes: u32,
    /// Events each cgroup may emit per second (token bucket in the
    /// kernel); 0 = unlimited. Events over the limit are counted.
    #[arg(long, default_value_t = 1000)]
    pub event_rate: u32,
    /// Burst size of the per-cgroup event token bucket.
    #[arg(long, default_value_t = 2000)]
    pub event_burst: u32,
    /// Directory for the control socket [default: /run/<name of the
    /// bpffs dir>, i.e. /run/bulkhead].
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Group (name or gid) whose members may use the control socket
    /// besides root.
    #[arg(long)]
    pub control_group: Option<String>,
    /// Rotate the events log when it reaches this size (bytes; 0 = never:
    /// use 0 when logrotate rotates it, see deploy/logrotate/bulkhead).
    #[arg(long, default_value_t = 64 << 20)]
    pub events_log_max_bytes: u64,
    /// Rotated events logs kept (events.jsonl.1 ... .N).
    #[arg(long, default_value_t = 5)]
    pub events_log_keep: u32,
    /// Persistent state: just-in-time bridges, and the audit store
    /// unless --audit-db says otherwise [default: /var/lib/<name of the
    /// bpffs dir>, i.e. /var/lib/bulkhead].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// The queryable audit store (SQLite) [default: <state dir>/audit.db].
    #[arg(long)]
    pub audit_db: Option<PathBuf>,
    /// Do not keep the SQLite audit store.
    #[arg(long, conflicts_with = "audit_db")]
    pub no_audit_db: bool,
    /// Delete audit store rows older than this (e.g. 30d, 12h).
    #[arg(long, default_value = "30d", value_parser = parse_duration)]
    pub audit_retention: u64,
    /// What enforcement does while the audit trail (the events log, the
    /// audit store) cannot be written: `keep` enforces the policy as
    /// usual (events are held, then dropped and counted); `refuse` also
    /// refuses new connections of domain workloads (EPERM, reason
    /// audit-unavailable) until it can be written again.
    #[arg(long, value_enum, default_value_t)]
    pub audit_full: Stance,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9477);
    /// off by default.
    #[arg(long)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Also send every event to this OpenTelemetry collector, as an OTLP
    /// log record (http:// or https://; e.g. http://127.0.0.1:4317 for
    /// gRPC, http://127.0.0.1:4318 for HTTP, which appends /v1/logs to a
    /// URL without a path).
    #[arg(long, value_name = "URL", env = "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// How events reach the collector (the OpenTelemetry default:
    /// http/protobuf).
    #[arg(
        long,
        value_enum,
        default_value = "http/protobuf",
        value_name = "PROTOCOL",
        env = "OTEL_EXPORTER_OTLP_PROTOCOL"
    )]
    pub otlp_protocol: OtlpProtocol,
    /// A header sent with every export (e.g. `authorization=Bearer TOKEN`);
    /// repeatable.
    #[arg(long = "otlp-header", value_name = "KEY=VALUE", value_parser = otlp::parse_header)]
    pub otlp_headers: Vec<(String, String)>,
    /// PEM certificates to trust for an https:// collector, besides the
    /// system's roots.
    #[arg(long, value_name = "FILE")]
    pub otlp_ca: Option<PathBuf>,
    /// Events held while the collector is down or slow (about 1.5 KB of
    /// memory each); past this they are dropped and counted (status, metrics) and
    /// a gap record is sent once it takes events again.
    #[arg(long, value_name = "EVENTS", default_value_t = 32_768)]
    pub otlp_hold: usize,
    /// Accept a policy file (or geo file) that a non-root user could
    /// change; by default the agent refuses it, since that user could
    /// open every domain at the next reload.
    #[arg(long)]
    pub allow_untrusted_policy: bool,
    /// Watch this Kubernetes node's pods through the API server
    /// (in-cluster service account, or KUBECONFIG) and place the pods
    /// that domains select with `pods:`. The DaemonSet passes
    /// spec.nodeName. Needs a build with the `k8s` feature.
    #[arg(long, value_name = "NODE")]
    pub k8s_node: Option<String>,
    /// For `cargo xtask bench`: also load and pin the benchmark probe
    /// programs (never attached) under <bpffs dir>/probes.
    #[arg(long, hide = true)]
    pub bench_probes: bool,
    /// Which log records are written: a level (error, warn, info,
    /// debug, trace) or a filter in RUST_LOG syntax
    /// (`info,bulkhead::runtime=debug`) [default: BULKHEAD_LOG, else
    /// RUST_LOG, else info].
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// `text` for terminals and the journal; `json` (one object per
    /// line) for Kubernetes and log pipelines.
    #[arg(long, value_enum, default_value_t)]
    pub log_format: LogFormat,
}

/// Which events `events` prints.
#[derive(clap::Args)]
pub struct EventFilter {
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
}

impl From<EventFilter> for Filter {
    fn from(f: EventFilter) -> Filter {
        Filter {
            queue: Some(f.queue),
            domain: f.domain,
            verdict: f.verdict,
            reason: f.reason,
            since_secs: f.since,
        }
    }
}

#[derive(Subcommand)]
#[expect(clippy::large_enum_variant, reason = "parsed once per process")]
pub enum AuditCommand {
    /// Events from the audit store, filtered; oldest first.
    Query {
        #[command(flatten)]
        db: AuditDb,
        #[command(flatten)]
        query: AuditQuery,
    },
    /// Policy and agent changes (start, reload, rejected reload, bridges,
    /// stop) and every control command with its caller.
    Changes {
        #[command(flatten)]
        db: AuditDb,
        /// Only changes newer than this (e.g. 24h).
        #[arg(long, value_parser = parse_duration)]
        since: Option<u64>,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Make the key that seals the events log and the audit store (a hash
    /// chain whose key evolves one way every epoch) and print the
    /// verification key, once: keep it off this node. The agent seals
    /// from its next start.
    SetupKeys {
        /// Where the agent keeps its state [default: /var/lib/<name of the
        /// bpffs dir>].
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// bpffs directory of the agent (names the default state dir).
        #[arg(long, default_value = DEFAULT_BPFFS_DIR, env = "BULKHEAD_BPFFS_DIR")]
        bpffs_dir: PathBuf,
        /// How long one key seals before it is replaced (e.g. 1m, 15m).
        #[arg(long, default_value = "1m", value_parser = parse_duration)]
        epoch: u64,
        /// Replace an existing key (new chains begin; the records sealed
        /// so far stay verifiable with the old verification key only).
        #[arg(long)]
        force: bool,
    },
    /// Check the sealed trail (the events log files given with --log, and
    /// the audit store: --db, or the default one when no --log is given):
    /// report the first record that was changed, deleted, inserted or
    /// reordered, and the range that verified. Exits 4 when it fails.
    Verify {
        /// The verification key that `audit setup-keys` printed.
        #[arg(long, env = "BULKHEAD_VERIFY_KEY")]
        key: String,
        /// Events log files (the live one and its rotations, any order).
        #[arg(long = "log", value_name = "FILE", num_args = 1..)]
        logs: Vec<PathBuf>,
        /// Verify the audit store too (the default store when no --log
        /// and no --db is given).
        #[command(flatten)]
        db: AuditDb,
        /// A chain head kept off the node (`status --json`:
        /// outputs[].chain), as OUTPUT=SEQ:MAC (e.g.
        /// events-log=812:3fa1...): a trail cut short of it fails.
        #[arg(long, value_name = "OUTPUT=SEQ:MAC")]
        head: Vec<String>,
    },
}

/// What `audit query` looks for, and how it prints it.
#[derive(clap::Args)]
pub struct AuditQuery {
    /// Only events newer than this (e.g. 10m, 24h, 7d).
    #[arg(long, value_parser = parse_duration)]
    pub since: Option<u64>,
    /// Only events at or after this RFC 3339 time.
    #[arg(long)]
    pub from: Option<String>,
    /// Only events before this RFC 3339 time.
    #[arg(long)]
    pub to: Option<String>,
    /// Source or destination domain.
    #[arg(long)]
    pub domain: Option<String>,
    /// Source domain (the workload's, for egress).
    #[arg(long)]
    pub src_domain: Option<String>,
    /// Destination domain.
    #[arg(long)]
    pub dst_domain: Option<String>,
    /// Cgroup path or a parent of it.
    #[arg(long)]
    pub cgroup: Option<String>,
    /// Destination address or CIDR.
    #[arg(long)]
    pub dst: Option<String>,
    /// Destination port.
    #[arg(long)]
    pub port: Option<u16>,
    /// Country (ISO code) of the peer.
    #[arg(long)]
    pub country: Option<String>,
    /// allow, deny, would-deny or cut.
    #[arg(long)]
    pub verdict: Option<String>,
    /// Reason name (see README).
    #[arg(long)]
    pub reason: Option<String>,
    /// A DNS name: events decided by an `egress.names` rule for it (the
    /// name itself, or a `*.` rule covering it); `*.example.com`: events of
    /// that rule.
    #[arg(long)]
    pub name: Option<String>,
    /// Output format.
    #[arg(long, default_value = "table", value_parser = ["table", "json", "csv"])]
    pub format: String,
    /// One JSON object per line (the same as --format json).
    #[arg(long, conflicts_with = "format")]
    pub json: bool,
    /// At most this many rows.
    #[arg(long, default_value_t = 10_000)]
    pub limit: usize,
}

#[derive(Subcommand)]
pub enum BridgeCommand {
    /// Open a bridge now, for a bounded time.
    Open {
        #[command(flatten)]
        agent: AgentArgs,
        #[command(flatten)]
        bridge: NewBridge,
        /// On every node of the Kubernetes cluster: create a
        /// BulkheadBridge object (KUBECONFIG or in-cluster credentials),
        /// recording who the API server says you are.
        #[arg(long)]
        cluster: bool,
    },
    /// Close a just-in-time bridge before its time is up.
    Close {
        #[command(flatten)]
        agent: AgentArgs,
        /// Its name (see `bridge list`; with --cluster, the object's).
        name: String,
        /// Delete the cluster's BulkheadBridge object: every node closes it.
        #[arg(long)]
        cluster: bool,
    },
    /// List the open just-in-time bridges with their time left.
    List {
        #[command(flatten)]
        agent: AgentArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// The cluster's BulkheadBridge objects instead, with the nodes
        /// that enforce each.
        #[arg(long)]
        cluster: bool,
    },
}

/// The bridge `bridge open` asks for.
#[derive(clap::Args)]
pub struct NewBridge {
    /// Domain the connections come from.
    #[arg(long)]
    pub from: String,
    /// Domain they go to.
    #[arg(long)]
    pub to: String,
    /// Protocol and port(s), e.g. tcp/5432 or udp/8000-8100; repeatable.
    #[arg(long = "port", required = true)]
    pub ports: Vec<String>,
    /// How long it stays open (e.g. 30m, 2h); at most the policy's max_duration.
    #[arg(long = "for", value_parser = parse_duration)]
    pub for_secs: u64,
    /// Why (e.g. a ticket); recorded in the audit trail.
    #[arg(long)]
    pub reason: String,
    /// A name for it [default: jit-<from>-<to>-<time>].
    #[arg(long)]
    pub name: Option<String>,
}

impl From<NewBridge> for OpenRequest {
    fn from(b: NewBridge) -> OpenRequest {
        OpenRequest {
            name: b.name,
            from: b.from,
            to: b.to,
            ports: b.ports,
            for_secs: b.for_secs,
            reason: b.reason,
            cluster: false,
        }
    }
}

/// Which audit store to read.
#[derive(clap::Args)]
pub struct AuditDb {
    /// The SQLite file [default: /var/lib/<name of the bpffs dir>/audit.db].
    #[arg(long)]
    db: Option<PathBuf>,
    /// bpffs directory of the agent (names the default database).
    #[arg(long, default_value = DEFAULT_BPFFS_DIR, env = "BULKHEAD_BPFFS_DIR")]
    bpffs_dir: PathBuf,
}

impl AuditDb {
    /// `--db` was given.
    pub fn given(&self) -> bool {
        self.db.is_some()
    }

    pub fn path(&self) -> PathBuf {
        self.db
            .clone()
            .unwrap_or_else(|| default_state_dir(&self.bpffs_dir).join("audit.db"))
    }
}

/// Where to find a running agent.
#[derive(clap::Args)]
pub struct AgentArgs {
    /// bpffs directory the agent was started with.
    #[arg(long, default_value = DEFAULT_BPFFS_DIR, env = "BULKHEAD_BPFFS_DIR")]
    bpffs_dir: PathBuf,
    /// The agent's run directory [default: /run/<name of the bpffs dir>].
    #[arg(long)]
    run_dir: Option<PathBuf>,
}

impl AgentArgs {
    pub fn run_dir(&self) -> PathBuf {
        self.run_dir
            .clone()
            .unwrap_or_else(|| default_run_dir(&self.bpffs_dir))
    }
}

fn ring_size(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|e| format!("{e}"))?;
    if n < 4096 || !n.is_power_of_two() {
        return Err("must be a power of two of at least 4096".into());
    }
    Ok(n)
}

/// Default run directory for a pin directory: `/run/<its name>`, so agents
/// with different pin directories never share a control socket.
pub fn default_run_dir(bpffs_dir: &Path) -> PathBuf {
    PathBuf::from("/run").join(instance_name(bpffs_dir))
}

/// `/var/lib/<name of the bpffs dir>`: the default state directory.
pub fn default_state_dir(bpffs_dir: &Path) -> PathBuf {
    PathBuf::from("/var/lib").join(instance_name(bpffs_dir))
}

/// An agent instance is named by its pin directory (`bulkhead` by default).
fn instance_name(bpffs_dir: &Path) -> String {
    bpffs_dir
        .file_name()
        .map_or_else(|| "bulkhead".into(), |n| n.to_string_lossy().into_owned())
}

/// `--since`: the time (Unix ns) that many seconds ago.
pub fn since_ns(secs: u64) -> i64 {
    clock::now_ns().saturating_sub(secs.saturating_mul(1_000_000_000) as i64)
}

/// `--from`, `--to` and the events' own times: Unix ns.
pub fn rfc3339_ns(s: &str) -> Result<i64> {
    clock::parse_ts(s).with_context(|| {
        format!("`{s}` is not an RFC 3339 time (e.g. 2026-11-23T10:00:00Z) between 1678 and 2262")
    })
}
