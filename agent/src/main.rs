//! `bulkhead`: keeps every workload (cgroup) inside its domain, lets traffic
//! cross domains only over explicit, time-bounded bridges, enforces
//! geofencing, and records every decision.
//!
//! Exit codes: 0 success; 1 a rejected policy or a runtime error (printed
//! once, with its cause chain); 2 bad command-line usage; 3 `explain
//! --replay` found decisions that the candidate policy would change; 4
//! `audit verify` found a record changed, deleted, inserted or reordered.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
