//! `check`: a policy file compiled as the agent would, without the kernel.

use std::{path::Path, process::ExitCode};

use anyhow::Result;

use bulkhead::{
    Candidate, LoadError, candidate, clock, compile::EventLimits, kernel::cgroup, policy,
};

use super::render;

/// A policy file compiled as the agent would, without touching the kernel.
/// Any owner will do: the caller chose the file to read, nothing is
/// enforced from it.
pub fn candidate(path: &Path) -> Result<Candidate, LoadError> {
    let mount = cgroup::cgroup2_mount().unwrap_or_else(|_| "/sys/fs/cgroup".into());
    let opts = candidate::Options {
        cgroup_mount: &mount,
        limits: EventLimits { rate: 0, burst: 0 },
        tai: clock::tai_offset_ns(),
    };
    Candidate::load(path, &mut candidate::trust_any, &opts)
}

/// `check`: the policy's summary, or its errors (exit 1).
pub fn check(path: &Path) -> Result<ExitCode> {
    let cand = match candidate(path) {
        Ok(cand) => cand,
        Err(LoadError::Policy(diags)) => {
            eprint!("{diags}");
            if !diags.to_string().ends_with('\n') {
                eprintln!();
            }
            return Ok(ExitCode::from(1));
        }
        Err(e) => return Err(e.into()),
    };
    print!("{}", policy::summary(&cand.policy));
    println!("{}", render::compiled(&cand.compiled));
    Ok(ExitCode::SUCCESS)
}
