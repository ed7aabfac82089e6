//! `bulkhead`: keeps every workload (cgroup) inside its domain, lets traffic
//! cross domains only over explicit, time-bounded bridges, enforces
//! geofencing, and records every decision.
//!
//! Exit codes: 0 success; 1 a rejected policy or a runtime error (printed
//! once, with its cause chain); 2 bad command-line usage.

mod cgroup;
mod compile;
mod events;
mod geo;
mod kernel;
mod listeners;
mod maps;
mod policy;
mod run;

use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::compile::EventLimits;

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
            let p = match policy::load(&path) {
                Ok(p) => p,
                Err(diags) => {
                    eprint!("{diags}");
                    if !diags.to_string().ends_with('\n') {
                        eprintln!();
                    }
                    return Ok(ExitCode::from(1));
                }
            };
            let db = geo::GeoDb::load(&p.geo)?;
            let mount = cgroup::cgroup2_mount().unwrap_or_else(|_| PathBuf::from("/sys/fs/cgroup"));
            let limits = EventLimits { rate: 0, burst: 0 };
            let c = compile::compile(&p, &db, &mount, limits, compile::tai_offset_ns())?;
            print!("{}", policy::summary(&p));
            println!(
                "compiled: {} cgroups present now, {} IPv4 + {} IPv6 domain networks, {} IPv4 + {} IPv6 geo prefixes",
                c.cgroups.len(),
                c.net4.len(),
                c.net6.len(),
                c.geo.v4.len(),
                c.geo.v6.len()
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
        } => {
            run::run(run::RunArgs {
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
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Detach { bpffs_dir, force } => {
            let pins = kernel::Pins::new(bpffs_dir);
            if !force && kernel::is_locked(&pins) {
                anyhow::bail!(
                    "an agent is running with {}; stop it first (its exit keeps enforcement pinned) or pass --force",
                    pins.root.display()
                );
            }
            let removed = kernel::detach(&pins)?;
            println!(
                "detached: removed {} pinned objects under {}",
                removed.len(),
                pins.root.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
