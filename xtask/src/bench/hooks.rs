//! What one call of each `sock_addr` hook costs under each policy of the
//! ladder, measured on real calls: `connect()` and unconnected `sendto()`
//! of a UDP socket to the decision phase's allowed destinations, from the
//! workload's domain cgroup, inside a namespace with no route (the hook
//! decides before routing: an allowed call then fails with `ENETUNREACH`
//! and nothing is sent).
//!
//! Every policy's agent has its programs attached to the same cgroup
//! root, so each call runs all of them. Measured alone, one policy at a
//! time: the others' generation is set to 0 for the while (no policy
//! loaded: their programs return at their first map read), so the
//! measured program is the one that touches the socket and the task
//! first, as a lone agent's is, wherever it runs in the row.
//! `kernel.bpf_stats_enabled` gives its run time per call, with `r0 = 1`
//! attached on the workload's cgroup beside it as the floor. One socket
//! makes all the calls of a step, so its storage is created once and the
//! figures are the decision (a TCP connect adds the storage's creation:
//! the network section).

use std::{collections::BTreeMap, fs, path::Path};

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::{Value, json};

use super::{
    Ctx,
    decision::PacketSet,
    geo::{V4, V6},
    policy::Spec,
    stats::median,
    sys,
    world::{Agent, Netns},
};

/// The hooks measured, with the family and call that reaches each.
pub const HOOKS: [(&str, usize, &str); 4] = [
    ("bh_connect4", V4, "connect"),
    ("bh_connect6", V6, "connect"),
    ("bh_sendmsg4", V4, "sendto"),
    ("bh_sendmsg6", V6, "sendto"),
];

/// Calls per program and round, at least: a round of a few milliseconds
/// takes a pause of the machine whole (it shares its host).
const CALLS: usize = 65_536;

pub fn measure(ctx: &Ctx, specs: &[Spec], agents: &[Agent], sets: &[PacketSet]) -> Result<Value> {
    let ns = Netns::new(format!("{}-hk", ctx.tag))?;
    let floor = sys::attach_allow_all_sock_addr(&ctx.cg_work.path).map_err(|e| anyhow!("{e}"))?;
    let mut files = BTreeMap::new();
    for (_, family, _) in HOOKS {
        let set = sets
            .iter()
            .find(|s| s.family == family && s.name.starts_with("allowed"))
            .ok_or_else(|| anyhow!("no allowed set of family {family}"))?;
        let file = ctx.work.join(format!("hooks-{}.bin", set.name));
        let bytes: Vec<u8> = set.addrs.iter().flat_map(|a| a.to_le_bytes()).collect();
        fs::write(&file, bytes)?;
        files.insert(family, file);
    }
    // Per hook: the programs that run on its call, named by policy.
    let mut progs: Vec<(&str, &str, std::os::fd::OwnedFd)> = Vec::new();
    for (hook, _, _) in HOOKS {
        for (spec, agent) in specs.iter().zip(agents) {
            let fd = sys::obj_get(&agent.link(hook))
                .and_then(|l| sys::link_prog(&l))
                .with_context(|| format!("{hook} of {}", spec.key))?;
            progs.push((hook, spec.key, fd));
        }
    }
    for (hook, fd) in &floor {
        progs.push((hook, ALLOW_ALL, sys::link_prog(fd)?));
    }
    let passes = CALLS.div_ceil(ctx.p.packets.max(1));
    let states = Generations::of(agents)?;
    let stats = "/proc/sys/kernel/bpf_stats_enabled";
    let old = fs::read_to_string(stats)?.trim().to_string();
    fs::write(stats, "1")?;
    let snap = || -> std::io::Result<Vec<sys::ProgInfo>> {
        progs.iter().map(|(_, _, fd)| sys::prog_info(fd)).collect()
    };
    let result = (|| -> Result<Value> {
        let mut per: BTreeMap<(&str, &str), Vec<f64>> = BTreeMap::new();
        let mut outcomes = serde_json::Map::new();
        for round in 0..ctx.p.rounds {
            for j in 0..specs.len() {
                let alone = (j + round) % specs.len();
                states.only(alone)?;
                for k in 0..HOOKS.len() {
                    let (hook, family, call) = HOOKS[(k + round) % HOOKS.len()];
                    let before = snap()?;
                    let out = helper(ctx, &ns, call, family, &files[&family], passes)?;
                    let after = snap()?;
                    for ((h, policy, _), (b, a)) in progs.iter().zip(before.iter().zip(&after)) {
                        let calls = a.run_cnt - b.run_cnt;
                        // The floor runs in every pass; each policy in its own.
                        let measured = *policy == specs[alone].key || *policy == ALLOW_ALL;
                        if *h == hook && measured && calls > 0 {
                            per.entry((h, policy))
                                .or_default()
                                .push((a.run_time_ns - b.run_time_ns) as f64 / calls as f64);
                        }
                    }
                    outcomes.insert(hook.into(), out);
                }
            }
            states.restore()?;
        }
        let mut hooks = serde_json::Map::new();
        for ((hook, policy), v) in &per {
            let entry = hooks
                .entry((*hook).to_string())
                .or_insert_with(|| json!({}));
            entry[*policy] = json!({"ns_per_call": median(v), "rounds": v});
        }
        for (hook, out) in outcomes {
            if let Some(h) = hooks.get_mut(&hook) {
                h["calls"] = out;
            }
        }
        Ok(json!({"passes": passes, "rounds": ctx.p.rounds, "hooks": hooks}))
    })();
    let _ = fs::write(stats, old);
    drop(floor);
    result
}

/// Each agent's `BH_STATE` generation, restored on drop: the agents
/// keep enforcing their policies after the measurement.
struct Generations {
    maps: Vec<(std::os::fd::OwnedFd, u64)>,
}

impl Generations {
    fn of(agents: &[Agent]) -> Result<Generations> {
        let maps = agents
            .iter()
            .map(|a| {
                let m = sys::obj_get(&a.map("BH_STATE"))?;
                let g = sys::array_u64(&m, 0)?;
                Ok((m, g))
            })
            .collect::<std::io::Result<_>>()
            .context("reading the agents' generations")?;
        Ok(Generations { maps })
    }

    /// Agent `i`'s policy in force, the others' none.
    fn only(&self, i: usize) -> Result<()> {
        for (j, (m, g)) in self.maps.iter().enumerate() {
            sys::set_array_u64(m, 0, if i == j { *g } else { 0 })?;
        }
        Ok(())
    }

    fn restore(&self) -> Result<()> {
        for (m, g) in &self.maps {
            sys::set_array_u64(m, 0, *g)?;
        }
        Ok(())
    }
}

impl Drop for Generations {
    fn drop(&mut self) {
        let _ = self.restore();
    }
}

/// The `r0 = 1` programs in the results.
pub const ALLOW_ALL: &str = "allow-all";

/// Runs `hooks-calls CALL FAMILY FILE PASSES` in the workload's cgroup
/// and `ns`; returns the counts it prints.
fn helper(
    ctx: &Ctx,
    ns: &Netns,
    call: &str,
    family: usize,
    file: &Path,
    passes: usize,
) -> Result<Value> {
    let args = [
        call.to_string(),
        family.to_string(),
        file.to_string_lossy().into(),
        passes.to_string(),
    ];
    ctx.workload_helper(ns, "hooks-calls", &args, &format!("{call} calls"))
}

/// Helper `hooks-calls connect|sendto FAMILY FILE PASSES`: one UDP socket
/// makes a call to every address of FILE (16-byte little-endian records),
/// PASSES times over. Prints the outcomes: `{"calls", "enetunreach",
/// "eperm"}`; anything else is an error (a call that got through would
/// mean a route the namespace must not have).
pub fn calls(args: &[String]) -> Result<()> {
    let [call, family, file, passes] = args else {
        bail!("want: connect|sendto FAMILY FILE PASSES");
    };
    let v6 = family.parse::<usize>()? != V4;
    let passes: usize = passes.parse()?;
    let addrs: Vec<u128> = fs::read(file)?
        .chunks_exact(16)
        .map(|c| u128::from_le_bytes(c.try_into().expect("16 bytes")))
        .collect();
    let domain = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe { libc::socket(domain, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned to us.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&sock);
    let (mut unreach, mut eperm) = (0u64, 0u64);
    let payload = [0u8; 8];
    for _ in 0..passes {
        for &a in &addrs {
            let (sa, len) = sockaddr(v6, a, 443);
            let sa_ptr = (&raw const sa).cast::<libc::sockaddr>();
            // SAFETY: `sa` is a valid sockaddr of `len` bytes.
            let rc = unsafe {
                if call == "connect" {
                    libc::connect(raw, sa_ptr, len)
                } else {
                    libc::sendto(raw, payload.as_ptr().cast(), payload.len(), 0, sa_ptr, len) as i32
                }
            };
            match std::io::Error::last_os_error().raw_os_error() {
                _ if rc >= 0 => bail!("a {call} to {a:#x} got through: the namespace has a route"),
                Some(libc::ENETUNREACH) => unreach += 1,
                Some(libc::EPERM) => eperm += 1,
                _ => bail!("{call}: {}", std::io::Error::last_os_error()),
            }
        }
    }
    println!(
        "{}",
        json!({"calls": unreach + eperm, "enetunreach": unreach, "eperm": eperm})
    );
    Ok(())
}

/// A `sockaddr_in` or `sockaddr_in6` (in the larger one's storage).
fn sockaddr(v6: bool, a: u128, port: u16) -> (libc::sockaddr_in6, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_in6.
    let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    if v6 {
        sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        sa.sin6_port = port.to_be();
        sa.sin6_addr.s6_addr = a.to_be_bytes();
        (sa, size_of::<libc::sockaddr_in6>() as libc::socklen_t)
    } else {
        // SAFETY: sockaddr_in fits in (and is laid out at the start of)
        // the sockaddr_in6 storage.
        let sin = unsafe { &mut *(&raw mut sa).cast::<libc::sockaddr_in>() };
        sin.sin_family = libc::AF_INET as libc::sa_family_t;
        sin.sin_port = port.to_be();
        sin.sin_addr.s_addr = (a as u32).to_be();
        (sa, size_of::<libc::sockaddr_in>() as libc::socklen_t)
    }
}
