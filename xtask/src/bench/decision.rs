//! Kernel decision cost: `BPF_PROG_TEST_RUN` on the real `bh_egress`
//! programs (one per policy size, each loaded and attached by a real
//! `bulkhead run`), a "return allow" program, and bare LPM-lookup probes,
//! over sets of prebuilt packets with many different destinations.
//!
//! The test run allocates its skb's socket in the calling process's cgroup,
//! so the measuring loop runs in a child process placed in the workload's
//! domain cgroup; the programs' per-CPU counters show that every run was a
//! full decision for the reason the policy gives, not an early exit.

use std::{collections::BTreeMap, fs, os::fd::OwnedFd, path::PathBuf};

use anyhow::{Context as _, Result, anyhow, bail};
use bulkhead_common::{
    Hook,
    maps::{
        COUNTER_EVENTS_LOST, COUNTER_EVENTS_RATE_LIMITED, COUNTER_EVENTS_WANTED, counter_index,
    },
    reason::REASON_SLOTS,
};
use serde_json::{Value, json};

use super::{
    geo::{Rng, V4, V6},
    stats::median,
    sys,
};

pub const PKT_V4: usize = 14 + 20 + 20;
pub const PKT_V6: usize = 14 + 40 + 20;

/// An Ethernet + IPv4/IPv6 + TCP packet from the workload to `dst`.
pub fn packet(family: usize, dst: u128, sport: u16) -> Vec<u8> {
    let mut p = Vec::with_capacity(PKT_V6);
    p.extend_from_slice(&[2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1]);
    if family == V4 {
        p.extend_from_slice(&[0x08, 0x00]);
        p.extend_from_slice(&[0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0]);
        p.extend_from_slice(&[10, 251, 0, 1]);
        p.extend_from_slice(&(dst as u32).to_be_bytes());
    } else {
        p.extend_from_slice(&[0x86, 0xdd]);
        p.extend_from_slice(&[0x60, 0, 0, 0, 0, 20, 6, 64]);
        p.extend_from_slice(&(0xfd00_0251_0000_0000_0000_0000_0000_0001u128).to_be_bytes());
        p.extend_from_slice(&dst.to_be_bytes());
    }
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&443u16.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0]);
    p
}

/// A named set of destinations of one family.
pub struct PacketSet {
    pub name: String,
    pub family: usize,
    pub addrs: Vec<u128>,
}

impl PacketSet {
    pub fn write(&self, path: &PathBuf, rng: &mut Rng) -> Result<()> {
        let mut buf = Vec::new();
        for &a in &self.addrs {
            buf.extend(packet(self.family, a, 32768 + (rng.next() % 28000) as u16));
        }
        fs::write(path, buf).with_context(|| format!("writing {}", path.display()))
    }
}

/// A program the helper measures.
pub enum ProgSpec {
    /// The program behind a pinned link, with its counters map.
    Link { link: PathBuf, counters: PathBuf },
    /// `r0 = 1; exit`.
    AllowAll,
    /// A pinned program (the agent's benchmark probes).
    Pinned { prog: PathBuf },
    /// One lookup in a plain LPM trie of the prefixes in a file of 17-byte
    /// records (`u128` network, little-endian, and the prefix length).
    Lpm { prefixes: PathBuf, family: usize },
}

pub fn prog_json(name: &str, p: &ProgSpec) -> Value {
    match p {
        ProgSpec::Link { link, counters } => {
            json!({"name": name, "kind": "link", "link": link, "counters": counters})
        }
        ProgSpec::AllowAll => json!({"name": name, "kind": "allow"}),
        ProgSpec::Pinned { prog } => json!({"name": name, "kind": "pinned", "prog": prog}),
        ProgSpec::Lpm { prefixes, family } => {
            json!({"name": name, "kind": "lpm", "prefixes": prefixes, "family": family})
        }
    }
}

/// The counters of one `bh_egress` row plus the event counters.
fn snapshot(map: &OwnedFd, cpus: usize) -> Result<Vec<u64>> {
    let mut out = Vec::with_capacity(REASON_SLOTS as usize + 3);
    for r in 0..REASON_SLOTS {
        out.push(sys::percpu_u64_sum(
            map,
            counter_index(Hook::SkbEgress as u8, r as u8),
            cpus,
        )?);
    }
    for i in [
        COUNTER_EVENTS_WANTED,
        COUNTER_EVENTS_RATE_LIMITED,
        COUNTER_EVENTS_LOST,
    ] {
        out.push(sys::percpu_u64_sum(map, i, cpus)?);
    }
    Ok(out)
}

struct Prog {
    name: String,
    fd: OwnedFd,
    counters: Option<OwnedFd>,
    family: Option<usize>,
}

struct Set {
    name: String,
    family: usize,
    pkts: Vec<Vec<u8>>,
}

fn s(v: &Value, k: &str) -> Result<String> {
    v[k].as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("spec: `{k}` missing"))
}

/// Runs in the child process inside the workload's cgroup: opens the
/// programs, checks one pass against the counters, then times rounds.
/// Prints one JSON object on stdout.
pub fn helper(spec_path: &str) -> Result<()> {
    let spec: Value = serde_json::from_slice(&fs::read(spec_path)?)?;
    let cpus = sys::possible_cpus();
    let mut progs = Vec::new();
    for p in spec["progs"]
        .as_array()
        .ok_or_else(|| anyhow!("spec: progs"))?
    {
        let name = s(p, "name")?;
        let (fd, counters, family) = match p["kind"].as_str() {
            Some("link") => {
                let link = sys::obj_get(s(p, "link")?.as_ref())
                    .with_context(|| format!("opening link of {name}"))?;
                let fd = sys::link_prog(&link).with_context(|| format!("program of {name}"))?;
                let c = sys::obj_get(s(p, "counters")?.as_ref())
                    .with_context(|| format!("counters of {name}"))?;
                (fd, Some(c), None)
            }
            Some("allow") => (
                sys::load_allow_all().map_err(|e| anyhow!("loading allow-all: {e}"))?,
                None,
                None,
            ),
            Some("pinned") => {
                let fd = sys::obj_get(s(p, "prog")?.as_ref())
                    .with_context(|| format!("opening pinned {name}"))?;
                (fd, None, None)
            }
            Some("lpm") => {
                let family = p["family"].as_u64().unwrap_or(0) as usize;
                let prefixes: Vec<(u128, u8)> = fs::read(s(p, "prefixes")?)?
                    .chunks_exact(17)
                    .map(|c| {
                        let net = u128::from_le_bytes(c[..16].try_into().expect("16 bytes"));
                        (net, c[16])
                    })
                    .collect();
                let map = sys::lpm_trie(family == V6, &prefixes)
                    .with_context(|| format!("filling the LPM trie of {name}"))?;
                let fd = sys::load_lpm_probe(&map, 0, family == V6)
                    .map_err(|e| anyhow!("loading LPM probe {name}: {e}"))?;
                // The program holds its own reference to the map.
                drop(map);
                (fd, None, Some(family))
            }
            k => bail!("spec: unknown program kind {k:?}"),
        };
        progs.push(Prog {
            name,
            fd,
            counters,
            family,
        });
    }
    let mut sets = Vec::new();
    for st in spec["sets"]
        .as_array()
        .ok_or_else(|| anyhow!("spec: sets"))?
    {
        let family = st["family"].as_u64().unwrap_or(0) as usize;
        let len = if family == V4 { PKT_V4 } else { PKT_V6 };
        let bytes = fs::read(s(st, "file")?)?;
        sets.push(Set {
            name: s(st, "name")?,
            family,
            pkts: bytes.chunks_exact(len).map(<[u8]>::to_vec).collect(),
        });
    }
    let repeat = spec["repeat"].as_u64().unwrap_or(100) as u32;
    let rounds = spec["rounds"].as_u64().unwrap_or(3) as usize;

    // One checked pass: every run must show up in the counters.
    let mut checks = Vec::new();
    for p in &progs {
        for set in &sets {
            if p.family.is_some_and(|f| f != set.family) {
                continue;
            }
            let before = match &p.counters {
                Some(c) => Some(snapshot(c, cpus)?),
                None => None,
            };
            let mut rets: BTreeMap<u32, u64> = BTreeMap::new();
            for pkt in &set.pkts {
                let (ret, _) = sys::test_run(&p.fd, pkt, 1)
                    .with_context(|| format!("BPF_PROG_TEST_RUN of {}", p.name))?;
                *rets.entry(ret).or_default() += 1;
            }
            let mut entry = json!({"prog": p.name, "set": set.name, "retvals": rets});
            if let (Some(c), Some(before)) = (&p.counters, before) {
                let after = snapshot(c, cpus)?;
                let d: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
                let reasons: BTreeMap<String, u64> = d[..REASON_SLOTS as usize]
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| **n > 0)
                    .map(|(r, n)| (r.to_string(), *n))
                    .collect();
                let n = REASON_SLOTS as usize;
                entry["reasons"] = json!(reasons);
                entry["events_wanted"] = json!(d[n]);
                entry["events_rate_limited"] = json!(d[n + 1]);
                entry["events_lost"] = json!(d[n + 2]);
            }
            checks.push(entry);
        }
    }

    // Timed rounds; the program order rotates every round so drift and
    // neighbours' noise spread over all of them.
    let mut warm: BTreeMap<(usize, usize), Vec<f64>> = BTreeMap::new();
    let mut cold: BTreeMap<(usize, usize), Vec<f64>> = BTreeMap::new();
    for round in 0..rounds {
        for k in 0..progs.len() {
            let pi = (k + round) % progs.len();
            let p = &progs[pi];
            for (si, set) in sets.iter().enumerate() {
                if p.family.is_some_and(|f| f != set.family) {
                    continue;
                }
                let mut total = 0f64;
                for pkt in &set.pkts {
                    total += f64::from(sys::test_run(&p.fd, pkt, repeat)?.1);
                }
                warm.entry((pi, si))
                    .or_default()
                    .push(total / set.pkts.len() as f64);
                let mut total = 0f64;
                for pkt in &set.pkts {
                    total += f64::from(sys::test_run(&p.fd, pkt, 1)?.1);
                }
                cold.entry((pi, si))
                    .or_default()
                    .push(total / set.pkts.len() as f64);
            }
        }
    }
    let mut timings = Vec::new();
    for ((pi, si), w) in &warm {
        let c = &cold[&(*pi, *si)];
        let info = sys::prog_info(&progs[*pi].fd).unwrap_or_default();
        timings.push(json!({
            "prog": progs[*pi].name,
            "set": sets[*si].name,
            "warm_ns": median(w),
            "warm_rounds": w,
            "cold_ns": median(c),
            "cold_rounds": c,
            "xlated_bytes": info.xlated_len,
            "jited_bytes": info.jited_len,
            "verified_insns": info.verified_insns,
        }));
    }
    let out = json!({
        "cpus": cpus,
        "repeat": repeat,
        "rounds": rounds,
        "checks": checks,
        "timings": timings,
    });
    println!("{out}");
    Ok(())
}
