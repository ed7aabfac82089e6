//! Writing a compiled policy into the kernel maps, one slot at a time.
//!
//! The new policy goes completely into the inactive slot; then one 8-byte
//! write of `BH_STATE.generation` switches every program to it. The slot
//! being written was last in force two generations ago: no program still
//! reads it (a program reads the generation once and finishes in
//! microseconds; a compile takes milliseconds), so it can be rewritten.
//! Only the difference to what the slot holds is written, so alternating
//! between two policies costs almost nothing.

use std::collections::HashMap;

use agent_common::maps::{
    BridgeKey, BridgeSet, CgroupKey, Config, DomainRec, GeoValue, MAP_BRIDGES, MAP_CGROUPS,
    MAP_CONFIG, MAP_DOMAINS, MAP_GEO4, MAP_GEO6, MAP_NET4, MAP_NET6, MAP_STATE, MAX_DOMAINS,
    NetValue, State,
};
use anyhow::{Context as _, Result, anyhow};
use aya::{
    Ebpf, Pod,
    maps::{Array, HashMap as BpfHash, LpmTrie, MapData, lpm_trie::Key},
};
use ipnet::{Ipv4Net, Ipv6Net};

use crate::compile::Compiled;

/// What one slot of the LPM and hash maps holds, mirrored in memory.
#[derive(Default)]
struct Slot {
    cgroups: HashMap<u64, u32>,
    net4: HashMap<(u32, [u8; 4]), NetValue>,
    net6: HashMap<(u32, [u8; 16]), NetValue>,
    geo4: HashMap<(u32, [u8; 4]), GeoValue>,
    geo6: HashMap<(u32, [u8; 16]), GeoValue>,
    bridges: HashMap<(u16, u16), BridgeSet>,
}

pub struct PolicyMaps {
    slots: [Slot; 2],
}

/// Counts of what a switch wrote, for logs and benchmarks.
#[derive(Debug, Default, Clone, Copy)]
pub struct Written {
    pub generation: u64,
    pub updated: usize,
    pub deleted: usize,
}

fn map<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name)
        .ok_or_else(|| anyhow!("map {name} missing from the object"))
}

impl PolicyMaps {
    /// Reads what both slots hold now (left by an earlier agent, or empty).
    pub fn adopt(ebpf: &mut Ebpf) -> Result<Self> {
        let mut slots = [Slot::default(), Slot::default()];
        {
            let m: BpfHash<&mut MapData, CgroupKey, u32> =
                BpfHash::try_from(map(ebpf, MAP_CGROUPS)?)?;
            for kv in m.iter() {
                let (k, v) = kv.context("reading BH_CGROUPS")?;
                slots[(k.slot & 1) as usize].cgroups.insert(k.cgroup_id, v);
            }
        }
        read_lpm::<5, 4, NetValue>(ebpf, MAP_NET4, |s, k, v| {
            slots[s].net4.insert(k, v);
        })?;
        read_lpm::<17, 16, NetValue>(ebpf, MAP_NET6, |s, k, v| {
            slots[s].net6.insert(k, v);
        })?;
        read_lpm::<5, 4, GeoValue>(ebpf, MAP_GEO4, |s, k, v| {
            slots[s].geo4.insert(k, v);
        })?;
        read_lpm::<17, 16, GeoValue>(ebpf, MAP_GEO6, |s, k, v| {
            slots[s].geo6.insert(k, v);
        })?;
        {
            let m: BpfHash<&mut MapData, BridgeKey, BridgeSet> =
                BpfHash::try_from(map(ebpf, MAP_BRIDGES)?)?;
            for kv in m.iter() {
                let (k, v) = kv.context("reading BH_BRIDGES")?;
                slots[(k.slot & 1) as usize]
                    .bridges
                    .insert((k.from, k.to), v);
            }
        }
        Ok(PolicyMaps { slots })
    }

    /// The generation in force (0 = no policy yet).
    pub fn generation(ebpf: &mut Ebpf) -> Result<u64> {
        let a: Array<&mut MapData, State> = Array::try_from(map(ebpf, MAP_STATE)?)?;
        Ok(a.get(&0, 0)?.generation)
    }

    /// The generation the next [`PolicyMaps::switch`] will create: events
    /// of it can arrive right after the switch, so their names must be
    /// known before.
    pub fn next_generation(ebpf: &mut Ebpf) -> Result<u64> {
        Ok(Self::generation(ebpf)? + 1)
    }

    /// Writes `c` into the inactive slot and switches to it.
    pub fn switch(&mut self, ebpf: &mut Ebpf, c: &Compiled) -> Result<Written> {
        let current = Self::generation(ebpf)?;
        let next = current + 1;
        let slot = (next & 1) as u32;
        let mut w = Written {
            generation: next,
            ..Default::default()
        };
        self.write_slot(ebpf, slot, c, &mut w)?;
        let mut state: Array<&mut MapData, State> = Array::try_from(map(ebpf, MAP_STATE)?)?;
        state
            .set(0, State { generation: next }, 0)
            .context("switching BH_STATE")?;
        Ok(w)
    }

    fn write_slot(
        &mut self,
        ebpf: &mut Ebpf,
        slot: u32,
        c: &Compiled,
        w: &mut Written,
    ) -> Result<()> {
        let s = &mut self.slots[slot as usize];
        {
            let mut cfg: Array<&mut MapData, Config> = Array::try_from(map(ebpf, MAP_CONFIG)?)?;
            cfg.set(slot, c.config, 0).context("writing BH_CONFIG")?;
        }
        {
            let mut doms: Array<&mut MapData, DomainRec> =
                Array::try_from(map(ebpf, MAP_DOMAINS)?)?;
            let mut want = [DomainRec::default(); MAX_DOMAINS as usize];
            for (id, rec) in &c.domains {
                want[*id as usize] = *rec;
            }
            for (id, rec) in want.iter().enumerate() {
                doms.set(slot * MAX_DOMAINS + id as u32, rec, 0)
                    .context("writing BH_DOMAINS")?;
            }
        }
        {
            let want: HashMap<u64, u32> = c.cgroups.iter().map(|(cg, d, _)| (*cg, *d)).collect();
            let mut m: BpfHash<&mut MapData, CgroupKey, u32> =
                BpfHash::try_from(map(ebpf, MAP_CGROUPS)?)?;
            sync(&mut s.cgroups, want, w, |k, v| match v {
                Some(v) => m.insert(
                    CgroupKey {
                        cgroup_id: *k,
                        slot,
                        _pad: 0,
                    },
                    v,
                    0,
                ),
                None => m.remove(&CgroupKey {
                    cgroup_id: *k,
                    slot,
                    _pad: 0,
                }),
            })
            .context("writing BH_CGROUPS")?;
        }
        let net4 = c
            .net4
            .iter()
            .map(|(n, d)| (v4(n), NetValue { domain: *d }))
            .collect();
        sync_lpm::<5, 4, _>(ebpf, MAP_NET4, slot, &mut s.net4, net4, w)?;
        let net6 = c
            .net6
            .iter()
            .map(|(n, d)| (v6(n), NetValue { domain: *d }))
            .collect();
        sync_lpm::<17, 16, _>(ebpf, MAP_NET6, slot, &mut s.net6, net6, w)?;
        let geo4 = c.geo.v4.iter().map(|(n, g)| (v4(n), *g)).collect();
        sync_lpm::<5, 4, _>(ebpf, MAP_GEO4, slot, &mut s.geo4, geo4, w)?;
        let geo6 = c.geo.v6.iter().map(|(n, g)| (v6(n), *g)).collect();
        sync_lpm::<17, 16, _>(ebpf, MAP_GEO6, slot, &mut s.geo6, geo6, w)?;
        {
            let want: HashMap<(u16, u16), BridgeSet> =
                c.bridges.iter().map(|(k, v)| (*k, *v)).collect();
            let mut m: BpfHash<&mut MapData, BridgeKey, BridgeSet> =
                BpfHash::try_from(map(ebpf, MAP_BRIDGES)?)?;
            sync(&mut s.bridges, want, w, |(from, to), v| {
                let key = BridgeKey {
                    slot,
                    from: *from,
                    to: *to,
                };
                match v {
                    Some(v) => m.insert(key, v, 0),
                    None => m.remove(&key),
                }
            })
            .context("writing BH_BRIDGES")?;
        }
        Ok(())
    }

    /// Entries per map in the slot of `generation`, for `status`.
    pub fn fill(&self, generation: u64) -> serde_json::Value {
        let s = &self.slots[(generation & 1) as usize];
        serde_json::json!({
            "cgroups": s.cgroups.len(),
            "net4": s.net4.len(),
            "net6": s.net6.len(),
            "geo4": s.geo4.len(),
            "geo6": s.geo6.len(),
            "bridge_pairs": s.bridges.len(),
        })
    }

    /// Adds cgroups that appeared after the policy was compiled (a new pod
    /// matching a glob) to the slot in force. Adding keys never mixes
    /// policies: the domain they name is the one the policy in force says.
    pub fn add_cgroups(&mut self, ebpf: &mut Ebpf, cgroups: &[(u64, u32)]) -> Result<usize> {
        let slot = (Self::generation(ebpf)? & 1) as u32;
        let s = &mut self.slots[slot as usize];
        let mut m: BpfHash<&mut MapData, CgroupKey, u32> =
            BpfHash::try_from(map(ebpf, MAP_CGROUPS)?)?;
        let mut added = 0;
        for (cg, d) in cgroups {
            if s.cgroups.get(cg) != Some(d) {
                m.insert(
                    CgroupKey {
                        cgroup_id: *cg,
                        slot,
                        _pad: 0,
                    },
                    d,
                    0,
                )
                .context("writing BH_CGROUPS")?;
                s.cgroups.insert(*cg, *d);
                added += 1;
            }
        }
        Ok(added)
    }
}

fn v4(n: &Ipv4Net) -> (u32, [u8; 4]) {
    (n.prefix_len() as u32, n.network().octets())
}

fn v6(n: &Ipv6Net) -> (u32, [u8; 16]) {
    (n.prefix_len() as u32, n.network().octets())
}

/// Brings `have` to `want`, calling `op(key, Some(value))` to write and
/// `op(key, None)` to delete.
fn sync<K, V, E>(
    have: &mut HashMap<K, V>,
    want: HashMap<K, V>,
    w: &mut Written,
    mut op: impl FnMut(&K, Option<&V>) -> Result<(), E>,
) -> Result<(), E>
where
    K: std::hash::Hash + Eq + Clone,
    V: PartialEq + Clone,
{
    let stale: Vec<K> = have
        .keys()
        .filter(|k| !want.contains_key(*k))
        .cloned()
        .collect();
    for k in stale {
        op(&k, None)?;
        have.remove(&k);
        w.deleted += 1;
    }
    for (k, v) in want {
        if have.get(&k) != Some(&v) {
            op(&k, Some(&v))?;
            have.insert(k, v);
            w.updated += 1;
        }
    }
    Ok(())
}

/// Key data with the slot byte first (as `agent_common::maps::net4_key`);
/// the prefix length covers it too.
fn lpm_key<const K: usize, const A: usize>(slot: u32, len: u32, addr: &[u8; A]) -> Key<[u8; K]> {
    let mut data = [0u8; K];
    data[0] = slot as u8;
    data[1..].copy_from_slice(addr);
    Key::new(8 + len, data)
}

fn sync_lpm<const K: usize, const A: usize, V: Pod + PartialEq>(
    ebpf: &mut Ebpf,
    name: &str,
    slot: u32,
    have: &mut HashMap<(u32, [u8; A]), V>,
    want: HashMap<(u32, [u8; A]), V>,
    w: &mut Written,
) -> Result<()>
where
    [u8; K]: Pod,
{
    let mut m: LpmTrie<&mut MapData, [u8; K], V> = LpmTrie::try_from(map(ebpf, name)?)?;
    sync(have, want, w, |(len, addr), v| {
        let key = lpm_key::<K, A>(slot, *len, addr);
        match v {
            Some(v) => m.insert(&key, v, 0),
            None => m.remove(&key),
        }
    })
    .with_context(|| format!("writing {name}"))
}

fn read_lpm<const K: usize, const A: usize, V: Pod>(
    ebpf: &mut Ebpf,
    name: &str,
    mut put: impl FnMut(usize, (u32, [u8; A]), V),
) -> Result<()>
where
    [u8; K]: Pod,
{
    let m: LpmTrie<&mut MapData, [u8; K], V> = LpmTrie::try_from(map(ebpf, name)?)?;
    for kv in m.iter() {
        let (k, v) = kv.with_context(|| format!("reading {name}"))?;
        let data = k.data();
        let mut addr = [0u8; A];
        addr.copy_from_slice(&data[1..]);
        put((data[0] & 1) as usize, (k.prefix_len() - 8, addr), v);
    }
    Ok(())
}

/// Every entry of the pinned policy maps, both slots, in a stable order:
/// `bulkhead dump` prints it, and tests compare dumps to prove a rejected
/// policy changed nothing.
pub fn dump(maps_dir: &std::path::Path) -> Result<serde_json::Value> {
    use aya::maps::Map;
    let open = |name: &str| {
        MapData::from_pin(maps_dir.join(name)).with_context(|| format!("opening pinned {name}"))
    };
    let state: Array<MapData, State> = Array::try_from(Map::Array(open(MAP_STATE)?))?;
    let config: Array<MapData, Config> = Array::try_from(Map::Array(open(MAP_CONFIG)?))?;
    let domains: Array<MapData, DomainRec> = Array::try_from(Map::Array(open(MAP_DOMAINS)?))?;
    let cgroups: BpfHash<MapData, CgroupKey, u32> =
        BpfHash::try_from(Map::HashMap(open(MAP_CGROUPS)?))?;
    let bridges: BpfHash<MapData, BridgeKey, BridgeSet> =
        BpfHash::try_from(Map::HashMap(open(MAP_BRIDGES)?))?;
    let mut out = serde_json::Map::new();
    out.insert("generation".into(), state.get(&0, 0)?.generation.into());
    out.insert(
        "config".into(),
        format!("{:?}", [config.get(&0, 0)?, config.get(&1, 0)?]).into(),
    );
    let doms: Vec<String> = domains
        .iter()
        .filter_map(|d| d.ok())
        .map(|d| format!("{d:?}"))
        .collect();
    out.insert("domains".into(), doms.into());
    let mut cg: Vec<String> = cgroups
        .iter()
        .filter_map(|kv| kv.ok())
        .map(|(k, v)| format!("{}/{}={v}", k.slot, k.cgroup_id))
        .collect();
    cg.sort();
    out.insert("cgroups".into(), cg.into());
    let mut br: Vec<String> = bridges
        .iter()
        .filter_map(|kv| kv.ok())
        .map(|(k, v)| format!("{k:?}={v:?}"))
        .collect();
    br.sort();
    out.insert("bridges".into(), br.into());
    for (name, v6) in [
        (MAP_NET4, false),
        (MAP_NET6, true),
        (MAP_GEO4, false),
        (MAP_GEO6, true),
    ] {
        let data = open(name)?;
        let mut rows: Vec<String> = if name == MAP_NET4 || name == MAP_NET6 {
            lpm_rows::<NetValue>(data, v6)?
        } else {
            lpm_rows::<GeoValue>(data, v6)?
        };
        rows.sort();
        out.insert(name.to_lowercase(), rows.into());
    }
    Ok(out.into())
}

fn lpm_rows<V: Pod + std::fmt::Debug>(data: MapData, v6: bool) -> Result<Vec<String>> {
    use aya::maps::Map;
    let fmt = |k: &[u8], len: u32, v: &V| format!("{}:{:?}/{}={v:?}", k[0], &k[1..], len - 8);
    if v6 {
        let m: LpmTrie<MapData, [u8; 17], V> = LpmTrie::try_from(Map::LpmTrie(data))?;
        Ok(m.iter()
            .filter_map(|kv| kv.ok())
            .map(|(k, v)| fmt(&k.data(), k.prefix_len(), &v))
            .collect())
    } else {
        let m: LpmTrie<MapData, [u8; 5], V> = LpmTrie::try_from(Map::LpmTrie(data))?;
        Ok(m.iter()
            .filter_map(|kv| kv.ok())
            .map(|(k, v)| fmt(&k.data(), k.prefix_len(), &v))
            .collect())
    }
}
