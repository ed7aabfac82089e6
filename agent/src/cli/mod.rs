//! The command line: parse once, resolve the flags, run one command.

mod args;
mod audit;
mod check;
mod client;
mod control;
mod events;
mod explain;
mod pins;
mod render;
mod run;

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser as _;

use args::{AuditCommand, BridgeCommand, Cli, Command};

/// Runs the command line's command; an error is printed once, with its
/// causes, and exits 1.
pub fn main() -> ExitCode {
    bulkhead::runtime::hold_stop_signals();
    bulkhead::memory::large_allocations_get_own_pages();
    let cli = Cli::parse();
    // Only `run` handles them; every other command keeps their default
    // action.
    if !matches!(cli.command, Command::Run(_)) {
        bulkhead::runtime::release_stop_signals();
    }
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
        Command::Check { policy } => check::check(&policy),
        Command::Run(flags) => run::run(flags),
        Command::Status { agent, json } => control::status(&agent.run_dir(), json),
        Command::Reload { agent } => control::reload(&agent.run_dir()),
        Command::Events {
            agent,
            follow,
            json,
            filter,
        } => events::events(&agent.run_dir(), filter.into(), follow, json),
        Command::Explain {
            replay: Some(events),
            policy: Some(policy),
            json,
            ..
        } => explain::replay(&events, &policy, json),
        Command::Explain {
            agent,
            cgroup,
            dst,
            proto,
            policy,
            json,
            ..
        } => {
            // Present unless --replay is, which the arm above took.
            let (cgroup, dst) = (cgroup.unwrap_or_default(), dst.unwrap_or_default());
            explain::explain(
                &agent.run_dir(),
                policy.as_deref(),
                cgroup,
                &dst,
                proto,
                json,
            )
        }
        Command::Bridge { what } => match what {
            BridgeCommand::Open {
                bridge,
                cluster: true,
                ..
            } => control::cluster_bridge_open(bridge),
            BridgeCommand::Open { agent, bridge, .. } => {
                control::bridge_open(&agent.run_dir(), bridge)
            }
            BridgeCommand::Close {
                name,
                cluster: true,
                ..
            } => control::cluster_bridge_close(&name),
            BridgeCommand::Close { agent, name, .. } => {
                control::bridge_close(&agent.run_dir(), name)
            }
            BridgeCommand::List {
                json,
                cluster: true,
                ..
            } => control::cluster_bridge_list(json),
            BridgeCommand::List { agent, json, .. } => control::bridge_list(&agent.run_dir(), json),
        },
        Command::Audit { what } => match what {
            AuditCommand::Query { db, query } => audit::query(&db.path(), query),
            AuditCommand::Changes { db, since, json } => audit::changes(&db.path(), since, json),
            AuditCommand::SetupKeys {
                state_dir,
                bpffs_dir,
                epoch,
                force,
            } => audit::setup_keys(
                &state_dir.unwrap_or_else(|| args::default_state_dir(&bpffs_dir)),
                epoch,
                force,
            ),
            AuditCommand::Verify {
                key,
                logs,
                db,
                head,
            } => audit::verify(
                &key,
                &logs,
                (db.given() || logs.is_empty()).then(|| db.path()),
                &head,
            ),
        },
        Command::Dump {
            bpffs_dir,
            state_dir,
            json: _,
        } => pins::dump(bpffs_dir, state_dir),
        Command::Prepare {
            bpffs_dir,
            warn_only,
        } => pins::prepare(&bpffs_dir, warn_only),
        Command::Detach { bpffs_dir, force } => pins::detach(&bpffs_dir, force),
    }
}
