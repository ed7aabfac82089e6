//! The capabilities the agent needs, checked at start so a missing one is
//! named instead of surfacing as a verifier "Permission denied".

use anyhow::{Result, bail};

const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

fn effective() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))?
        .trim();
    u64::from_str_radix(hex, 16).ok()
}

fn has(set: u64, cap: u32) -> bool {
    set & (1 << cap) != 0
}

/// Fails naming what is missing; returns warnings for what only degrades.
pub fn check() -> Result<Vec<String>> {
    let Some(eff) = effective() else {
        return Ok(Vec::new());
    };
    let admin = has(eff, CAP_SYS_ADMIN);
    let mut missing = Vec::new();
    if !has(eff, CAP_BPF) && !admin {
        missing.push("CAP_BPF (load programs and maps)");
    }
    if !has(eff, CAP_PERFMON) && !admin {
        missing.push("CAP_PERFMON (programs that read kernel pointers and socket storage)");
    }
    if !has(eff, CAP_NET_ADMIN) && !admin {
        missing.push("CAP_NET_ADMIN (attach to cgroups)");
    }
    if !missing.is_empty() {
        bail!(
            "missing capabilities: {}; run as root or grant them (see deploy/systemd/bulkhead.service)",
            missing.join(", ")
        );
    }
    let mut warnings = Vec::new();
    if !has(eff, CAP_SYS_PTRACE) || !has(eff, CAP_DAC_READ_SEARCH) {
        warnings.push(
            "without CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH the owners of sockets bound before the agent started \
             cannot be recorded: connections to such listeners are decided as if they had no domain"
                .to_string(),
        );
    }
    Ok(warnings)
}
