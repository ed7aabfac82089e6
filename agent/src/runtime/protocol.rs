//! The control socket's protocol, shared by the agent (server) and the CLI
//! (client): one request line of JSON, then one [`Reply`] line (or, for
//! `events`, one line per event). Both sides use these types, so a field
//! renamed on one side is a compile error on the other, not a silent
//! default.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{
    bridges::{JitBridge, OpenRequest},
    events::Record,
};

pub const SOCKET_NAME: &str = "control.sock";

/// The longest request line accepted (the CLI's are a few hundred bytes).
pub const MAX_REQUEST: usize = 1 << 20;
/// How long a client has to send its request line.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Reload,
    Explain {
        cgroup: String,
        dst: String,
        port: u16,
        proto: String,
    },
    Events {
        follow: bool,
        filter: Filter,
        /// Only events at or after this time (Unix ns): a follower that
        /// reconnects asks for what it may not have seen yet.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from_ns: Option<i64>,
        /// The follower counts what it missed from the events' `seq`
        /// itself: this subscriber's loss notes then count only the events
        /// it lost that carry no sequence number, so nothing is counted twice.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        counts_seq_gaps: bool,
    },
    BridgeOpen(OpenRequest),
    BridgeClose {
        name: String,
    },
    BridgeList,
}

/// Which events a subscriber wants.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Filter {
    pub domain: Option<String>,
    pub verdict: Option<String>,
    pub reason: Option<String>,
    /// Only events at most this old (seconds).
    pub since_secs: Option<u64>,
    /// Events buffered for this subscriber before it starts losing them
    /// (default 16384, at most 65536).
    #[serde(default)]
    pub queue: Option<usize>,
}

impl Filter {
    pub fn matches(&self, r: &Record, now_unix: i64) -> bool {
        if let Some(d) = &self.domain
            && r.src_domain.as_deref() != Some(d.as_str())
            && r.dst_domain.as_deref() != Some(d.as_str())
        {
            return false;
        }
        if self.verdict.as_ref().is_some_and(|v| *v != r.verdict)
            || self.reason.as_ref().is_some_and(|v| *v != r.reason)
        {
            return false;
        }
        if let Some(s) = self.since_secs {
            let ts =
                crate::clock::parse_ts(&r.ts).map_or(i64::MAX, |t| t.div_euclid(1_000_000_000));
            if ts < now_unix - s as i64 {
                return false;
            }
        }
        true
    }

    /// Narrows by domain, verdict or reason (not only by age).
    pub fn narrows(&self) -> bool {
        self.domain.is_some() || self.verdict.is_some() || self.reason.is_some()
    }
}

/// Who is on the other end of the socket (SO_PEERCRED).
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

impl Peer {
    /// The agent itself (its Kubernetes watchers' calls into its loop):
    /// no process but the agent has its pid.
    pub fn agent() -> Peer {
        Peer {
            pid: std::process::id() as i32,
            uid: 0,
            gid: 0,
        }
    }

    pub fn is_agent(&self) -> bool {
        self.pid == std::process::id() as i32
    }
}

/// One answer line: `{"ok": true|false, "reply": "<kind>", ...}`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(flatten)]
    pub response: Response,
}

impl From<Response> for Reply {
    fn from(response: Response) -> Reply {
        Reply {
            ok: !matches!(response, Response::Error { .. }),
            response,
        }
    }
}

/// What the agent answers to each [`Request`] (`events` streams records).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum Response {
    Status(Box<Status>),
    Reloaded { generation: u64, sha256: String },
    Explained { answer: crate::explain::Answer },
    BridgeOpened { bridge: JitBridge, generation: u64 },
    BridgeClosed { bridge: JitBridge, generation: u64 },
    Bridges { bridges: Vec<OpenBridge> },
    Error { error: String },
}

impl Response {
    pub fn error(e: impl std::fmt::Display) -> Response {
        Response::Error {
            error: e.to_string(),
        }
    }
}

/// A just-in-time bridge in `bridge list`.
#[derive(Debug, Serialize, Deserialize)]
pub struct OpenBridge {
    pub bridge: JitBridge,
    pub seconds_left: i64,
}

/// `bulkhead status`: what the agent enforces and how its outputs fare.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub policy: PathBuf,
    pub sha256: String,
    /// `enforce` or `audit`.
    pub mode: String,
    /// `--audit-full` and whether it refuses now (absent from an older
    /// agent's answer).
    #[serde(default)]
    pub audit_full: super::audit_full::AuditFullState,
    pub generation: u64,
    pub running_since: String,
    pub cgroup_root: PathBuf,
    pub bpffs_dir: PathBuf,
    /// The map layout's directory under `bpffs_dir`.
    pub layout: String,
    pub programs: Vec<ProgramState>,
    pub maps: MapFill,
    pub domains: Vec<String>,
    pub bridges: Vec<BridgeState>,
    pub decisions: Vec<DecisionCount>,
    pub events: EventCounts,
    pub connections_cut: CutCounts,
    /// What the kernel learned from DNS answers (absent from an older
    /// agent's answer).
    #[serde(default)]
    pub dns: DnsCounts,
    pub packet_sockets: String,
    pub capabilities: String,
    pub pods: Option<PodsState>,
    /// Each output of the audit trail: the events log, stdout, the audit
    /// store, live followers (absent from an older agent's answer).
    #[serde(default)]
    pub outputs: Vec<OutputCounts>,
    /// The last reload of the policy file since the agent started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reload: Option<LastReload>,
}

/// How the last reload of the policy file went.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastReload {
    pub at: String,
    /// `applied` or `rejected` (the policy in force stayed).
    pub outcome: String,
    /// Why it was rejected: the `file:line:col: message` lines.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// What became of the events handed to one output. For the events log,
/// stdout and the audit store, `written + pending + dropped` = the events
/// delivered since the agent started; for `followers`, the copies handed
/// to live subscribers (each gets those its filter matches).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputCounts {
    /// `events-log`, `stdout`, `audit-store` or `followers`.
    pub name: String,
    /// Written (for followers: queued to a subscriber).
    pub written: u64,
    /// Queued or held for a retry, not written yet.
    pub pending: u64,
    pub dropped: Dropped,
    /// A sealed output's chain head (`audit setup-keys`): keep it off the
    /// node, and `audit verify --head` notices a trail cut short of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<crate::seal::Head>,
}

/// Events an output dropped, by cause.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dropped {
    /// The disk was full for longer than the output's backlog could hold.
    pub disk_full: u64,
    /// Another write error, for longer than the backlog could hold.
    pub io_error: u64,
    /// The SQLite database was locked by another process, for longer than
    /// the backlog could hold.
    pub locked: u64,
    /// The output's queue was full (its writer, or a follower, fell behind).
    pub queue_full: u64,
}

impl Dropped {
    pub fn total(&self) -> u64 {
        self.disk_full + self.io_error + self.locked + self.queue_full
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ProgramState {
    pub name: String,
    pub hook: String,
    pub pinned: bool,
    /// Set for a program that is never attached: the hook that enters it
    /// by a tail call (`pinned` is then its program array's pin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entered_from: Option<String>,
}

/// How full the policy slot in force is.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct MapFill {
    pub cgroups: usize,
    pub addr_words: usize,
    pub addr_words_max: usize,
    pub addr_classes: usize,
    pub bridge_pairs: usize,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BridgeState {
    pub name: String,
    pub from: String,
    pub to: String,
    /// `tcp/5432`, `udp/8000-8100`.
    pub ports: Vec<String>,
    pub open: bool,
    /// `None`: no expiry.
    pub seconds_left: Option<i64>,
    pub reason: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DecisionCount {
    pub hook: String,
    pub reason: String,
    pub verdict: String,
    pub count: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct EventCounts {
    pub wanted: u64,
    pub rate_limited: u64,
    pub lost_ring_full: u64,
    /// Events the agent received (from the kernel, and the `cut` events it
    /// makes) and handed to its outputs; what each output did with them is
    /// in [`Status::outputs`].
    pub delivered: u64,
    pub sequence_gaps: u64,
    pub subscribers: usize,
    pub subscriber_drops: u64,
}

/// Names (`egress.names`): answers and addresses the kernel learned.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct DnsCounts {
    /// Addresses held in `BH_LEARNED` now (at most `max`; the least
    /// recently used go first).
    pub learned_now: usize,
    pub max: u32,
    /// Learned addresses the map let go to make room (least recently used
    /// first) since the maps were created.
    pub evicted: u64,
    /// Answers addresses were learned from, and the addresses written.
    pub answers: u64,
    pub addresses: u64,
    /// Answers that taught nothing: no query of the receiving socket asked
    /// for them, or a socket of the receiving domain sent them.
    pub spoofed: u64,
    /// Answers that matched a query but could not be read (too long,
    /// compressed question, ...).
    pub unread: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CutCounts {
    pub marked: u64,
    pub destroyed: u64,
    pub how: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PodsState {
    pub node: String,
    pub synced: bool,
    pub pods: usize,
    pub placed: Vec<PlacedPod>,
    pub pending: Vec<String>,
    pub conflicts: Vec<PodConflict>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PlacedPod {
    pub pod: String,
    pub domain: String,
    pub cgroup: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PodConflict {
    pub pod: String,
    pub domains: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wire shape the CLI, scripts and tests read: `ok`, the reply's
    /// kind, and its fields at the top level.
    #[test]
    fn replies_keep_their_wire_shape() {
        let r: Reply = Response::Reloaded {
            generation: 7,
            sha256: "ab".into(),
        }
        .into();
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(
            text,
            r#"{"ok":true,"reply":"reloaded","generation":7,"sha256":"ab"}"#
        );
        let back: Reply = serde_json::from_str(&text).unwrap();
        assert!(matches!(
            back.response,
            Response::Reloaded { generation: 7, .. }
        ));
        let open = Request::BridgeOpen(OpenRequest {
            name: None,
            from: "contractor".into(),
            to: "prod".into(),
            ports: vec!["tcp/5432".into()],
            for_secs: 600,
            reason: "T-1".into(),
            cluster: false,
        });
        assert_eq!(
            serde_json::to_string(&open).unwrap(),
            r#"{"cmd":"bridge-open","name":null,"from":"contractor","to":"prod","ports":["tcp/5432"],"for_secs":600,"reason":"T-1"}"#
        );
        let e: Reply = Response::error("no such bridge: x").into();
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"ok":false,"reply":"error","error":"no such bridge: x"}"#
        );
    }
}
