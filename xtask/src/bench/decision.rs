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

use agent_common::{
    Hook,
    maps::{
        COUNTER_EVENTS_LOST, COUNTER_EVENTS_RATE_LIMITED, COUNTER_EVENTS_WANTED, counter_index,
    },
    reason::REASON_SLOTS,
};
use anyhow::{Context as _, Result, anyhow, bail};
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
    /// One LPM lookup in a pinned map.
    Lpm {
        map: PathBuf,
        slot: u8,
        family: usize,
    },
    /// The two-level direct-index prototype (IPv4): level 1 from a file of
    /// packed `u64`s, level 2 from a file of 68-byte records.
    Direct { level1: PathBuf, level2: PathBuf },
}

pub fn prog_json(name: &str, p: &ProgSpec) -> Value {
    match p {
        ProgSpec::Link { link, counters } => {
            json!({"name": name, "kind": "link", "link": link, "counters": counters})
        }
        ProgSpec::AllowAll => json!({"name": name, "kind": "allow"}),
        ProgSpec::Lpm { map, slot, family } => {
            json!({"name": name, "kind": "lpm", "map": map, "slot": slot, "family": family})
        }
        ProgSpec::Direct { level1, level2 } => {
            json!({"name": name, "kind": "direct", "level1": level1, "level2": level2, "family": V4})
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
            Some("lpm") => {
                let map = sys::obj_get(s(p, "map")?.as_ref())?;
                let family = p["family"].as_u64().unwrap_or(0) as usize;
                let slot = p["slot"].as_u64().unwrap_or(0) as u8;
                let fd = sys::load_lpm_probe(&map, slot, family == V6)
                    .map_err(|e| anyhow!("loading LPM probe {name}: {e}"))?;
                (fd, None, Some(family))
            }
            Some("direct") => {
                let bytes = fs::read(s(p, "level1")?)?;
                let values: Vec<u64> = bytes
                    .chunks_exact(8)
                    .map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")))
                    .collect();
                let l1 = sys::mmapable_u64_array(&values)
                    .with_context(|| format!("creating level 1 of {name}"))?;
                let items: Vec<(u32, Vec<u8>)> = fs::read(s(p, "level2")?)?
                    .chunks_exact(68)
                    .map(|c| {
                        (
                            u32::from_ne_bytes(c[..4].try_into().expect("4 bytes")),
                            c[4..].to_vec(),
                        )
                    })
                    .collect();
                let l2 = sys::u32_hash(64, &items)
                    .with_context(|| format!("creating level 2 of {name}"))?;
                let fd = sys::load_direct_index_probe(&l1, &l2)
                    .map_err(|e| anyhow!("loading direct-index probe {name}: {e}"))?;
                // The program holds its own references to the maps.
                drop((l1, l2));
                (fd, None, Some(V4))
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

/// Level 1 packed, level 2 records, level-1 class per /24.
pub type DirectIndex = (Vec<u64>, Vec<(u32, Vec<u8>)>, Vec<u8>);

/// The two-level direct-index tables of an IPv4 allow-set (see
/// `sys::load_direct_index_probe`): level 1 packed (a 2-bit class per /24:
/// 0 denied, 1 allowed, 3 split), level 2 as `(/24 number, 64 bytes)`
/// records for the split /24s, and the level-1 class of every /24.
pub fn direct_index_table(allowed: &[(u128, u128)]) -> DirectIndex {
    let mut class = vec![0u8; 1 << 24];
    for &(a, b) in allowed {
        let (first, last) = ((a >> 8) as usize, (b >> 8) as usize);
        for (blk, c) in class.iter_mut().enumerate().take(last + 1).skip(first) {
            let lo = (blk as u128) << 8;
            let hi = lo | 0xff;
            *c = if a <= lo && hi <= b { 1 } else { 3 };
        }
    }
    let mut packed = vec![0u64; 1 << 19];
    let mut level2 = Vec::new();
    for (blk, c) in class.iter().enumerate() {
        packed[blk >> 5] |= u64::from(*c) << ((blk & 31) * 2);
        if *c == 3 {
            let mut words = [0u64; 4 * 2];
            let base = (blk as u128) << 8;
            let i = allowed.partition_point(|r| r.1 < base);
            for r in &allowed[i..] {
                if r.0 > base | 0xff {
                    break;
                }
                let lo = r.0.max(base) - base;
                let hi = r.1.min(base | 0xff) - base;
                for host in lo..=hi {
                    words[(host >> 5) as usize] |= 1u64 << ((host & 31) * 2);
                }
            }
            level2.push((
                blk as u32,
                words.iter().flat_map(|w| w.to_ne_bytes()).collect(),
            ));
        }
    }
    (packed, level2, class)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_index_classes() {
        // 10.0.0.0/24 allowed whole; 10.0.1.16-10.0.1.31 allowed (split).
        let allowed = [(0x0a00_0000, 0x0a00_00ff), (0x0a00_0110, 0x0a00_011f)];
        let (packed, level2, class) = direct_index_table(&allowed);
        assert_eq!(class[0x0a0000], 1);
        assert_eq!(class[0x0a0001], 3);
        assert_eq!(class[0x0a0002], 0);
        let blk = 0x0a0001usize;
        assert_eq!((packed[blk >> 5] >> ((blk & 31) * 2)) & 3, 3);
        assert_eq!(level2.len(), 1);
        let (blk, bytes) = &level2[0];
        assert_eq!(*blk, 0x0a0001);
        let w0 = u64::from_ne_bytes(bytes[0..8].try_into().unwrap());
        // hosts 16..=31 live in word 0, bits 32..64.
        assert_eq!(w0, 0x5555_5555_0000_0000);
    }
}
