//! The capabilities the agent needs, checked at start so a missing one is
//! named instead of surfacing as a verifier "Permission denied".

use anyhow::{Result, bail};

const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_SETPCAP: u32 = 8;
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
    if !has(eff, CAP_SETPCAP) {
        warnings.push(
            "without CAP_SETPCAP the bounding set cannot be cleared once the programs are attached \
             (no_new_privs still keeps an exec from gaining capabilities)"
                .to_string(),
        );
    }
    if !has(eff, CAP_SYS_PTRACE) || !has(eff, CAP_DAC_READ_SEARCH) {
        warnings.push(
            "without CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH the owners of sockets bound before the agent started \
             cannot be recorded: connections to such listeners are decided as if they had no domain"
                .to_string(),
        );
    }
    Ok(warnings)
}

/// Keeps only what a running agent still uses once its programs are
/// attached: CAP_BPF, because policy maps are rewritten on every reload and
/// bridge change, and kernels before 6.5 with unprivileged BPF disabled
/// check it on every bpf() call. Attaching (CAP_NET_ADMIN), loading with
/// kernel pointers (CAP_PERFMON) and recording pre-existing listeners
/// (CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH) happen only at start. The bounding
/// and ambient sets are cleared too, and no_new_privs is set, so nothing the
/// agent could be made to execute gets them back.
///
/// Capabilities belong to threads, so this must run before the agent starts
/// any: it refuses otherwise rather than leave a privileged thread behind.
pub fn drop_after_attach() -> Result<String> {
    let threads = std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(1);
    if threads != 1 {
        bail!("dropping capabilities with {threads} threads running would leave some privileged");
    }
    let Some(eff) = effective() else {
        return Ok("capabilities unknown (no /proc/self/status)".into());
    };
    let keep = if has(eff, CAP_BPF) {
        CAP_BPF
    } else {
        // Kernels before 5.8 have no CAP_BPF; bpf() then wants CAP_SYS_ADMIN.
        CAP_SYS_ADMIN
    };
    let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(40);
    let mut bounding = "kept";
    if has(eff, CAP_SETPCAP) {
        for cap in (0..=last).filter(|&c| c != keep) {
            // SAFETY: prctl with integer arguments only.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
                bail!(
                    "dropping capability {cap} from the bounding set: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
        bounding = "cleared";
    }
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        );
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0);
    }
    let kept = eff & (1u64 << keep);
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let word = |i: u32| CapData {
        effective: (kept >> (32 * i)) as u32,
        permitted: (kept >> (32 * i)) as u32,
        inheritable: 0,
    };
    let data = [word(0), word(1)];
    // SAFETY: header and two data words, as capset(2) v3 expects.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        bail!("capset: {}", std::io::Error::last_os_error());
    }
    let name = if keep == CAP_BPF {
        "CAP_BPF"
    } else {
        "CAP_SYS_ADMIN"
    };
    Ok(format!(
        "capabilities after attach: {name} only (bounding set {bounding}, no_new_privs)"
    ))
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}
