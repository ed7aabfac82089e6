//! `run`: the agent itself.

use std::process::ExitCode;

use anyhow::Result;

use bulkhead::{
    compile::EventLimits,
    runtime::{self, RunArgs, logging::LogFormat, otlp, sink},
};

use super::args::{RunFlags, default_run_dir, default_state_dir};

/// `run`: enforces until stopped.
pub fn run(flags: RunFlags) -> Result<ExitCode> {
    let log_format = flags.log_format;
    runtime::logging::init(flags.log_level.as_deref(), log_format)?;
    match runtime::run(run_args(flags)?) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        // In the log's own format, so a pipeline parsing it sees why.
        Err(e) if log_format == LogFormat::Json => {
            tracing::error!("{e:#}");
            Ok(ExitCode::from(1))
        }
        Err(e) => Err(e),
    }
}

/// `run`'s flags with every default filled in and the control group looked up.
fn run_args(f: RunFlags) -> Result<RunArgs> {
    let state_dir = f
        .state_dir
        .unwrap_or_else(|| default_state_dir(&f.bpffs_dir));
    let audit_db = match (f.no_audit_db, f.audit_db) {
        (true, _) => None,
        (false, Some(p)) => Some(p),
        (false, None) => Some(state_dir.join("audit.db")),
    };
    let control_group = f
        .control_group
        .as_deref()
        .map(runtime::control::group_id)
        .transpose()?;
    Ok(RunArgs {
        run_dir: f.run_dir.unwrap_or_else(|| default_run_dir(&f.bpffs_dir)),
        control_group,
        rotation: sink::Rotation {
            max_bytes: f.events_log_max_bytes,
            keep: f.events_log_keep,
        },
        audit_db,
        audit_retention: std::time::Duration::from_secs(f.audit_retention),
        metrics_addr: f.metrics_addr,
        state_dir,
        allow_untrusted_policy: f.allow_untrusted_policy,
        k8s_node: f.k8s_node.clone(),
        bench_probes: f.bench_probes,
        audit_full: f.audit_full,
        otlp: f.otlp_endpoint.map(|endpoint| otlp::Config {
            endpoint,
            protocol: f.otlp_protocol,
            headers: f.otlp_headers,
            ca: f.otlp_ca,
            hold: f.otlp_hold,
            host: hostname(),
            k8s_node: f.k8s_node,
        }),
        policy: f.policy,
        cgroup_root: f.cgroup_root,
        bpffs_dir: f.bpffs_dir,
        events_log: f.events_log,
        stdout_events: !f.no_stdout_events,
        ring_buffer_bytes: f.ring_buffer_bytes,
        limits: EventLimits {
            rate: f.event_rate,
            burst: f.event_burst,
        },
    })
}

/// The host's name, for the events' `host.name`.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}
