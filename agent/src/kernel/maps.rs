//! Writing a compiled policy into the kernel maps, one slot at a time.
//!
//! The new policy goes completely into the inactive slot; then one 8-byte
//! write of `BH_STATE.generation` switches every program to it. The slot
//! being written was last in force two generations ago: no program still
//! reads it (a program reads the generation once and finishes in
//! microseconds; a compile takes milliseconds), so it can be rewritten.
//! Of the hash maps only the difference to what the slot holds is written;
//! the address table is copied whole into the slot's half of `BH_ADDR`
//! through `mmap` (a few milliseconds for a full country database).

use std::{
    collections::HashMap,
    os::fd::{AsFd, AsRawFd as _, BorrowedFd},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHash, Map, MapData},
};
use bulkhead_common::{
    addr::{AddrClass, MAX_CLASSES, SLOT_WORDS},
    maps::{
        BridgeKey, BridgeSet, CONFIG_AUDIT_REFUSE, CgroupKey, Config, DomainRec, Learned,
        LearnedKey, MAP_ADDR, MAP_BRIDGES, MAP_CGROUPS, MAP_CLASSES, MAP_CONFIG, MAP_DOMAINS,
        MAP_LEARNED, MAP_NAMES, MAP_RESOLVERS, MAP_STATE, MAX_DOMAINS, NameKey, ResolverKey, State,
    },
};
use sha2::{Digest as _, Sha256};

use crate::compile::Compiled;

/// What one slot of the hash maps holds, mirrored in memory.
#[derive(Default)]
struct Slot {
    cgroups: HashMap<u64, u32>,
    bridges: HashMap<(u16, u16), BridgeSet>,
    names: HashMap<(u16, u8, u64), u32>,
    resolvers: HashMap<(u16, u8, [u8; 16]), u32>,
    /// Address table size, from the slot's config.
    addr_words: u32,
    addr_classes: u32,
}

pub struct PolicyMaps {
    slots: [Slot; 2],
    /// [`CONFIG_AUDIT_REFUSE`] is set in both slots' configs, and in every
    /// slot written ([`PolicyMaps::set_refusing`]).
    refusing: bool,
}

/// A policy written into the inactive slot, not yet in force.
#[must_use = "a staged policy is not in force until committed"]
pub struct Staged(Written);

impl Staged {
    pub fn generation(&self) -> u64 {
        self.0.generation
    }
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

/// [`CONFIG_AUDIT_REFUSE`] set or cleared in both slots' configs; whether
/// either slot had it before.
fn write_refusal(ebpf: &mut Ebpf, on: bool) -> Result<bool> {
    let mut cfg: Array<&mut MapData, Config> = Array::try_from(map(ebpf, MAP_CONFIG)?)?;
    let mut had = false;
    for slot in 0..2 {
        let mut c = cfg.get(&slot, 0).context("reading BH_CONFIG")?;
        had |= c.flags & CONFIG_AUDIT_REFUSE != 0;
        if c.flags & CONFIG_AUDIT_REFUSE != 0 || on {
            c.flags = with_refusal(c.flags, on);
            cfg.set(slot, c, 0).context("writing BH_CONFIG")?;
        }
    }
    Ok(had)
}

fn with_refusal(flags: u32, on: bool) -> u32 {
    if on {
        flags | CONFIG_AUDIT_REFUSE
    } else {
        flags & !CONFIG_AUDIT_REFUSE
    }
}

impl PolicyMaps {
    /// Reads what both slots hold now (left by an earlier agent, or empty),
    /// and clears a refusal (`--audit-full=refuse`) an agent that died
    /// while refusing left behind: this agent writes the trail from now on,
    /// and sets it again if it cannot.
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
        {
            let cfg: Array<&mut MapData, Config> = Array::try_from(map(ebpf, MAP_CONFIG)?)?;
            for (i, slot) in slots.iter_mut().enumerate() {
                let c = cfg.get(&(i as u32), 0).context("reading BH_CONFIG")?;
                slot.addr_words = c.addr_words;
                slot.addr_classes = c.addr_classes;
            }
        }
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
        {
            let m: BpfHash<&mut MapData, NameKey, u32> = BpfHash::try_from(map(ebpf, MAP_NAMES)?)?;
            for kv in m.iter() {
                let (k, v) = kv.context("reading BH_NAMES")?;
                slots[(k.slot & 1) as usize]
                    .names
                    .insert((k.domain, k.wildcard, k.hash), v);
            }
        }
        {
            let m: BpfHash<&mut MapData, ResolverKey, u32> =
                BpfHash::try_from(map(ebpf, MAP_RESOLVERS)?)?;
            for kv in m.iter() {
                let (k, v) = kv.context("reading BH_RESOLVERS")?;
                slots[(k.slot & 1) as usize]
                    .resolvers
                    .insert((k.domain, k.family, k.addr), v);
            }
        }
        if write_refusal(ebpf, false)? {
            tracing::warn!(
                "an earlier agent stopped while refusing new connections of domain workloads \
                 (--audit-full=refuse, its audit trail could not be written): cleared"
            );
        }
        Ok(PolicyMaps {
            slots,
            refusing: false,
        })
    }

    /// Whether [`CONFIG_AUDIT_REFUSE`] is set.
    pub fn refusing(&self) -> bool {
        self.refusing
    }

    /// Sets or clears [`CONFIG_AUDIT_REFUSE`] in both slots: the one in
    /// force and the one the next generation is written into. Only the
    /// flag changes, so a program reading a config meanwhile sees either
    /// value of it with the same policy.
    pub fn set_refusing(&mut self, ebpf: &mut Ebpf, on: bool) -> Result<()> {
        if on != self.refusing {
            write_refusal(ebpf, on)?;
            self.refusing = on;
        }
        Ok(())
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
        let staged = self.stage(ebpf, c)?;
        Self::commit(ebpf, staged)
    }

    /// Writes `c` into the inactive slot without putting it in force:
    /// nothing any program decides changes until [`PolicyMaps::commit`].
    pub fn stage(&mut self, ebpf: &mut Ebpf, c: &Compiled) -> Result<Staged> {
        let next = Self::generation(ebpf)? + 1;
        let slot = (next & 1) as u32;
        let mut w = Written {
            generation: next,
            ..Default::default()
        };
        self.write_slot(ebpf, slot, c, &mut w)?;
        Ok(Staged(w))
    }

    /// Puts a staged slot in force: one 8-byte write of the generation.
    pub fn commit(ebpf: &mut Ebpf, staged: Staged) -> Result<Written> {
        let w = staged.0;
        let mut state: Array<&mut MapData, State> = Array::try_from(map(ebpf, MAP_STATE)?)?;
        // Only this agent writes the maps (it holds the pin directory's
        // lock), so the generation cannot have moved since the slot was
        // written; if it did, the slot may be the one in force.
        let now = state.get(&0, 0)?.generation;
        if now + 1 != w.generation {
            bail!(
                "the generation moved from {} to {now} while generation {} was written",
                w.generation - 1,
                w.generation
            );
        }
        state
            .set(
                0,
                State {
                    generation: w.generation,
                },
                0,
            )
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
        write_addr(ebpf, slot, c)?;
        s.addr_words = c.config.addr_words;
        s.addr_classes = c.config.addr_classes;
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
        {
            let want: HashMap<_, _> = c.names.iter().map(|(k, v)| (*k, *v)).collect();
            let mut m: BpfHash<&mut MapData, NameKey, u32> =
                BpfHash::try_from(map(ebpf, MAP_NAMES)?)?;
            sync(&mut s.names, want, w, |(domain, wildcard, hash), v| {
                let key = NameKey {
                    hash: *hash,
                    slot,
                    domain: *domain,
                    wildcard: *wildcard,
                    _pad: 0,
                };
                match v {
                    Some(v) => m.insert(key, v, 0),
                    None => m.remove(&key),
                }
            })
            .context("writing BH_NAMES")?;
        }
        {
            let want: HashMap<_, _> = c.resolvers.iter().map(|(k, v)| (*k, *v)).collect();
            let mut m: BpfHash<&mut MapData, ResolverKey, u32> =
                BpfHash::try_from(map(ebpf, MAP_RESOLVERS)?)?;
            sync(&mut s.resolvers, want, w, |(domain, family, addr), v| {
                let key = ResolverKey {
                    addr: *addr,
                    slot,
                    domain: *domain,
                    family: *family,
                    _pad: 0,
                };
                match v {
                    Some(v) => m.insert(key, v, 0),
                    None => m.remove(&key),
                }
            })
            .context("writing BH_RESOLVERS")?;
        }
        let mut cfg: Array<&mut MapData, Config> = Array::try_from(map(ebpf, MAP_CONFIG)?)?;
        let config = Config {
            flags: with_refusal(c.config.flags, self.refusing),
            ..c.config
        };
        cfg.set(slot, config, 0).context("writing BH_CONFIG")?;
        Ok(())
    }

    /// Entries per map in the slot of `generation`, for `status`.
    pub fn fill(&self, generation: u64) -> crate::runtime::protocol::MapFill {
        let s = &self.slots[(generation & 1) as usize];
        crate::runtime::protocol::MapFill {
            cgroups: s.cgroups.len(),
            addr_words: s.addr_words as usize,
            addr_words_max: SLOT_WORDS as usize,
            addr_classes: s.addr_classes as usize,
            bridge_pairs: s.bridges.len(),
        }
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

/// Words of the address table mapped at a time while it is written: a
/// mapping's pages count in the agent's RSS while it exists, and a full
/// table is 9 MB of them.
const WRITE_WINDOW: usize = 256 * 1024;

/// The address table into the slot's half of `BH_ADDR` (copied through
/// `mmap`, a window at a time), its classes into `BH_CLASSES`.
fn write_addr(ebpf: &mut Ebpf, slot: u32, c: &Compiled) -> Result<()> {
    let t = &c.addr;
    {
        let Map::Array(data) = map(ebpf, MAP_ADDR)? else {
            bail!("{MAP_ADDR} is not an array map");
        };
        for (i, words) in t.words.chunks(WRITE_WINDOW).enumerate() {
            let first = i * WRITE_WINDOW;
            let mut m = SlotMapping::new(data.fd().as_fd(), slot, first, words.len(), true)?;
            m.words_mut().copy_from_slice(words);
        }
    }
    let mut classes: Array<&mut MapData, AddrClass> = Array::try_from(map(ebpf, MAP_CLASSES)?)?;
    for (i, class) in t.classes.iter().enumerate() {
        classes
            .set(slot * MAX_CLASSES + i as u32, class, 0)
            .context("writing BH_CLASSES")?;
    }
    Ok(())
}

/// `words` words of one slot of `BH_ADDR` from word `first` (a multiple of
/// a page's words), mapped into memory (`BPF_F_MMAPABLE`); unmapped on
/// drop.
struct SlotMapping {
    ptr: *mut libc::c_void,
    len: usize,
    words: usize,
}

impl SlotMapping {
    fn new(
        fd: BorrowedFd<'_>,
        slot: u32,
        first: usize,
        words: usize,
        write: bool,
    ) -> Result<SlotMapping> {
        if first + words > SLOT_WORDS as usize {
            bail!(
                "address table of {} words exceeds a slot ({SLOT_WORDS})",
                first + words
            );
        }
        const PAGE: usize = 4096;
        if !(first * 4).is_multiple_of(PAGE) {
            bail!("mapping {MAP_ADDR} from word {first}, not a page boundary");
        }
        let len = (words * 4).div_ceil(PAGE).max(1) * PAGE;
        let prot = if write {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        let offset = (slot as libc::off_t * SLOT_WORDS as libc::off_t + first as libc::off_t) * 4;
        // SAFETY: a fresh shared mapping of the map's own pages; the kernel
        // checks the range against the map's size.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mapping slot {slot} of {MAP_ADDR}"));
        }
        Ok(SlotMapping { ptr, len, words })
    }

    fn words(&self) -> &[u32] {
        // SAFETY: the mapping holds at least `words` u32s and lives as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr.cast(), self.words) }
    }

    fn words_mut(&mut self) -> &mut [u32] {
        // SAFETY: as above; mapped writable by `new(.., true)`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.cast(), self.words) }
    }
}

impl Drop for SlotMapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
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
    let names: BpfHash<MapData, NameKey, u32> = BpfHash::try_from(Map::HashMap(open(MAP_NAMES)?))?;
    let mut nm: Vec<String> = names
        .iter()
        .filter_map(|kv| kv.ok())
        .map(|(k, v)| format!("{k:?}={v}"))
        .collect();
    nm.sort();
    out.insert("names".into(), nm.into());
    let resolvers: BpfHash<MapData, ResolverKey, u32> =
        BpfHash::try_from(Map::HashMap(open(MAP_RESOLVERS)?))?;
    let mut rs: Vec<String> = resolvers
        .iter()
        .filter_map(|kv| kv.ok())
        .map(|(k, v)| format!("{k:?}={v}"))
        .collect();
    rs.sort();
    out.insert("resolvers".into(), rs.into());
    out.insert("learned".into(), learned(maps_dir)?.into());
    // The address table: each slot's words in use as a digest (they are
    // millions), its classes in full.
    let addr = open(MAP_ADDR)?;
    let classes: Array<MapData, AddrClass> = Array::try_from(Map::Array(open(MAP_CLASSES)?))?;
    let mut tables = Vec::new();
    for slot in 0..2u32 {
        let cfg = config.get(&slot, 0)?;
        let words = SlotMapping::new(addr.fd().as_fd(), slot, 0, cfg.addr_words as usize, false)?;
        let bytes: Vec<u8> = words.words().iter().flat_map(|w| w.to_le_bytes()).collect();
        let used: Vec<String> = (0..cfg.addr_classes)
            .map(|i| {
                classes
                    .get(&(slot * MAX_CLASSES + i), 0)
                    .map(|c| format!("{c:?}"))
            })
            .collect::<Result<_, _>>()?;
        tables.push(serde_json::json!({
            "words": cfg.addr_words,
            "sha256": format!("{:x}", Sha256::digest(&bytes)),
            "classes": used,
        }));
    }
    out.insert("addr".into(), tables.into());
    Ok(out.into())
}

/// Every address learned from answers (`BH_LEARNED`), for `bulkhead dump`:
/// domain key, address, the rule hash it was learned for, the resolver,
/// and its expiry (TAI ns). Not part of a policy: it changes as workloads
/// look names up.
pub fn learned(maps_dir: &std::path::Path) -> Result<Vec<serde_json::Value>> {
    let path = maps_dir.join(MAP_LEARNED);
    let data = MapData::from_pin(&path).with_context(|| format!("opening pinned {MAP_LEARNED}"))?;
    let m: BpfHash<MapData, LearnedKey, Learned> = BpfHash::try_from(Map::LruHashMap(data))?;
    let mut out: Vec<serde_json::Value> = m
        .iter()
        .filter_map(|kv| kv.ok())
        .map(|(k, v)| {
            serde_json::json!({
                "domain_key": k.domain_key,
                "addr": crate::runtime::events::addr(k.family, &k.addr).map(|a| a.to_string()),
                "rule_hash": format!("{:016x}", v.rule_hash),
                "wildcard": v.wildcard != 0,
                "resolver": crate::runtime::events::addr(v.resolver_family, &v.resolver).map(|a| a.to_string()),
                "expires_tai_ns": v.expires_tai_ns,
                "learned_tai_ns": v.learned_tai_ns,
            })
        })
        .collect();
    out.sort_by_key(|v| v.to_string());
    Ok(out)
}

/// What the domains with `keys` learned about `ip` (`BH_LEARNED`), for the
/// live `explain`; nothing where the map cannot be read.
pub fn learned_for(
    ebpf: &Ebpf,
    keys: &[u32],
    ip: std::net::IpAddr,
) -> Vec<crate::explain::LearnedAddr> {
    let Some(m) = ebpf.map(MAP_LEARNED) else {
        return Vec::new();
    };
    let Ok(m) = BpfHash::<_, LearnedKey, Learned>::try_from(m) else {
        return Vec::new();
    };
    let (family, addr) = crate::compile::addr_bytes(ip);
    keys.iter()
        .filter_map(|k| {
            let key = LearnedKey {
                addr,
                domain_key: *k,
                family,
                _pad: [0; 3],
            };
            let v = m.get(&key, 0).ok()?;
            Some(crate::explain::LearnedAddr {
                domain_key: *k,
                rule_hash: v.rule_hash,
                wildcard: v.wildcard != 0,
                resolver: crate::runtime::events::addr(v.resolver_family, &v.resolver),
                until_tai_ns: v.expires_tai_ns,
            })
        })
        .collect()
}

/// Addresses held in `BH_LEARNED` now, for `status`.
pub fn learned_count(ebpf: &Ebpf) -> usize {
    ebpf.map(MAP_LEARNED)
        .and_then(|m| BpfHash::<_, LearnedKey, Learned>::try_from(m).ok())
        .map_or(0, |m| m.keys().count())
}
