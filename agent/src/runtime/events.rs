//! Kernel events → enriched JSON lines.
//!
//! The kernel writes bare ids (cgroup id, domain ids, bridge id, generation);
//! the agent turns them into names with the tables of the generation that
//! made the decision, so an event is named by the policy that decided it
//! even when a reload happened in between.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use bulkhead_common::{
    DomainId, Event, Hook, Reason, Verdict,
    event::{EVENT_SIZE, FAMILY_INET, FAMILY_INET6},
};
use serde::Serialize;

use crate::{compile::BridgeName, geo::GeoDb, kernel::cgroup::PathCache};

/// Names for one policy generation.
pub struct Generation {
    pub domain_names: Vec<String>,
    pub bridge_names: Vec<BridgeName>,
    pub geo: Arc<GeoDb>,
}

/// One decision as users see it (`--json`, the events log, the store).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct Record {
    pub ts: String,
    pub verdict: String,
    pub reason: String,
    pub hook: String,
    pub proto: String,
    pub src: Option<String>,
    pub sport: Option<u16>,
    pub dst: Option<String>,
    pub dport: Option<u16>,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub uid: Option<u32>,
    pub cgroup: String,
    pub cgroup_id: u64,
    pub src_domain: Option<String>,
    pub dst_domain: Option<String>,
    pub country: Option<String>,
    pub geo_source: Option<String>,
    /// Build time of that source (database metadata, or the geofeed's mtime).
    #[serde(default)]
    pub geo_source_built: Option<String>,
    pub bridge: Option<String>,
    /// `name-allowed`/`name-denied`: the `egress.names` rule whose name an
    /// answer gave the destination's address for.
    #[serde(default)]
    pub name: Option<String>,
    pub generation: u64,
    pub seq: u64,
    pub cpu: u16,
}

pub struct Enricher {
    paths: PathCache,
    generations: BTreeMap<u64, Arc<Generation>>,
    tai_offset_ns: i64,
    /// Last sequence number seen per CPU, to report gaps.
    last_seq: HashMap<u16, u64>,
    pub gaps: u64,
    /// Where the names of recent generations are kept (see
    /// [`Enricher::recall`]).
    names_file: Option<PathBuf>,
    /// When new geo sources came in with a generation: older generations
    /// keep theirs until [`GEO_GRACE`] has passed (see
    /// [`Enricher::release_replaced_geo`]).
    geo_replaced: Option<Instant>,
    /// The kernel's learned addresses (`BH_LEARNED`), for the `name` of
    /// events decided by one.
    learned: Option<LearnedMap>,
    /// `(domain key, wildcard, rule hash)` → the rule as the policy writes
    /// it, of every generation seen.
    name_rules: HashMap<(u32, u8, u64), String>,
}

type LearnedMap = aya::maps::HashMap<
    aya::maps::MapData,
    bulkhead_common::maps::LearnedKey,
    bulkhead_common::maps::Learned,
>;

/// How long older generations keep the geo sources they were compiled
/// from after newer ones came in: long enough for the events they decided
/// to leave the ring buffer (the loop drains it every 100 ms), not so long
/// that every database update holds two databases in memory.
pub const GEO_GRACE: Duration = Duration::from_secs(10);

/// Geo sources held at once: the newest and the one it replaced (during
/// [`GEO_GRACE`]). Sources replaced again before the grace ended are let
/// go at once, so databases that change faster than that do not pile up.
const KEEP_GEO: usize = 2;

/// Generations whose names are kept on disk: those whose programs may have
/// queued events while no agent ran.
const KEEP_ON_DISK: usize = 16;

/// One generation's names as kept on disk.
#[derive(Serialize, serde::Deserialize)]
struct Names {
    generation: u64,
    domains: Vec<String>,
    bridges: Vec<BridgeName>,
    /// The newest generation's: every `egress.names` rule known (an
    /// address learned under an older generation keeps its rule).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    rules: Vec<KeptRule>,
}

/// An `egress.names` rule as `BH_LEARNED` refers to it.
#[derive(Serialize, serde::Deserialize)]
struct KeptRule {
    domain_key: u32,
    wildcard: u8,
    hash: u64,
    rule: String,
}

impl KeptRule {
    /// Its key in `Enricher::name_rules` and [`KeptNames::rules`].
    fn key(&self) -> (u32, u8, u64) {
        (self.domain_key, self.wildcard, self.hash)
    }
}

/// What the kept names say of learned addresses, for `bulkhead dump`
/// (no agent): domain names by their key, rules by their key.
#[derive(Default)]
pub struct KeptNames {
    pub domains: HashMap<u32, String>,
    pub rules: HashMap<(u32, u8, u64), String>,
}

/// Reads the names an agent keeps in `file` (none if it cannot).
pub fn kept_names(file: &Path) -> KeptNames {
    let mut k = KeptNames::default();
    for n in read_names(file) {
        for d in n.domains {
            k.domains.insert(crate::compile::domain_key(&d), d);
        }
        for r in n.rules {
            k.rules.insert(r.key(), r.rule);
        }
    }
    k
}

/// Keep names for this many past generations: events decided under them may
/// still be in the ring buffer after a reload.
const KEEP_GENERATIONS: usize = 1024;

fn read_names(file: &Path) -> Vec<Names> {
    std::fs::read(file)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Written whole and renamed into place, so a crash leaves the old file.
fn write_names(file: &Path, names: &[Names]) -> anyhow::Result<()> {
    use anyhow::Context as _;
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(names)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, file).with_context(|| format!("renaming {}", tmp.display()))?;
    Ok(())
}

pub fn decode(bytes: &[u8]) -> Option<Event> {
    if bytes.len() < EVENT_SIZE {
        return None;
    }
    // SAFETY: Event is repr(C) plain data of EVENT_SIZE bytes; any bit
    // pattern is valid; read_unaligned copes with the ring's alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) })
}

pub(crate) fn addr(family: u8, raw: &[u8; 16]) -> Option<IpAddr> {
    match family {
        FAMILY_INET => Some(IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))),
        FAMILY_INET6 => Some(IpAddr::V6(Ipv6Addr::from(*raw))),
        _ => None,
    }
}

// Timestamps are the clock module's: kernel time to RFC 3339.
pub use crate::clock::format_ts;

/// The protocol's name from the one table (`bulkhead_common::proto`), or its
/// number.
pub fn proto_name(p: u8) -> String {
    match bulkhead_common::proto::proto_name(p) {
        Some(name) => name.into(),
        None => p.to_string(),
    }
}

impl Enricher {
    pub fn new(paths: PathCache, tai_offset_ns: i64) -> Self {
        Enricher {
            paths,
            generations: BTreeMap::new(),
            tai_offset_ns,
            last_seq: HashMap::new(),
            gaps: 0,
            names_file: None,
            geo_replaced: None,
            learned: None,
            name_rules: HashMap::new(),
        }
    }

    /// Reads the `name` of events from the pinned `BH_LEARNED` at `pin`.
    pub fn read_learned(&mut self, pin: &Path) {
        match aya::maps::MapData::from_pin(pin)
            .map_err(anyhow::Error::from)
            .and_then(|m| Ok(LearnedMap::try_from(aya::maps::Map::LruHashMap(m))?))
        {
            Ok(m) => self.learned = Some(m),
            Err(e) => tracing::warn!(
                "events will not name the names their addresses were learned for: opening {}: {e:#}",
                pin.display()
            ),
        }
    }

    fn kept_rules(&self) -> Vec<KeptRule> {
        let mut v: Vec<KeptRule> = self
            .name_rules
            .iter()
            .map(|(&(domain_key, wildcard, hash), rule)| KeptRule {
                domain_key,
                wildcard,
                hash,
                rule: rule.clone(),
            })
            .collect();
        v.sort_by_key(|r| (r.domain_key, r.wildcard, r.hash));
        v
    }

    /// The `egress.names` rules of a generation (see `name_rules`); added
    /// before the generation, so the names kept on disk hold them.
    pub fn add_name_rules(&mut self, rules: impl IntoIterator<Item = ((u32, u8, u64), String)>) {
        self.name_rules.extend(rules);
    }

    /// The rule an address learned by the domain named `domain` was
    /// learned for.
    fn learned_name(&self, domain: &str, family: u8, addr: [u8; 16]) -> Option<String> {
        let peer = bulkhead_common::decide::PeerAddr::new(family, addr);
        let key = bulkhead_common::maps::LearnedKey {
            addr: peer.addr,
            domain_key: crate::compile::domain_key(domain),
            family: peer.family,
            _pad: [0; 3],
        };
        let v = self.learned.as_ref()?.get(&key, 0).ok()?;
        self.name_rules
            .get(&(key.domain_key, v.wildcard, v.rule_hash))
            .cloned()
    }

    /// Keeps the names of every generation added from now on in `file`, and
    /// reads those an earlier agent kept there: events its programs queued
    /// in the pinned ring buffer while no agent ran are named by the
    /// generation that decided them, which this agent did not compile.
    /// (Their countries come from this agent's geo sources.)
    pub fn recall(&mut self, file: PathBuf, geo: &Arc<GeoDb>) {
        for n in read_names(&file) {
            self.name_rules
                .extend(n.rules.into_iter().map(|r| (r.key(), r.rule)));
            self.generations.entry(n.generation).or_insert_with(|| {
                Arc::new(Generation {
                    domain_names: n.domains,
                    bridge_names: n.bridges,
                    geo: geo.clone(),
                })
            });
        }
        self.names_file = Some(file);
    }

    pub fn add_generation(&mut self, generation: u64, g: Generation) {
        if self
            .generations
            .last_key_value()
            .is_some_and(|(_, newest)| !Arc::ptr_eq(&newest.geo, &g.geo))
        {
            self.geo_replaced = Some(Instant::now());
        }
        self.generations.insert(generation, Arc::new(g));
        while self.generations.len() > KEEP_GENERATIONS {
            self.generations.pop_first();
        }
        self.keep_recent_geo();
        if let Some(file) = &self.names_file {
            let names: Vec<Names> = self
                .generations
                .iter()
                .rev()
                .take(KEEP_ON_DISK)
                .enumerate()
                .map(|(i, (generation, g))| Names {
                    generation: *generation,
                    domains: g.domain_names.clone(),
                    bridges: g.bridge_names.clone(),
                    rules: if i == 0 {
                        self.kept_rules()
                    } else {
                        Vec::new()
                    },
                })
                .collect();
            if let Err(e) = write_names(file, &names) {
                tracing::warn!("keeping generation names in {}: {e:#}", file.display());
            }
        }
    }

    /// Once [`GEO_GRACE`] has passed since new geo sources came in, gives
    /// every older generation the newest ones, so the old sources are freed.
    /// (An event of an older generation that arrives later still gets its
    /// names; its country is looked up in the sources in force, as for
    /// events an earlier agent left in the ring.) True when it let go.
    pub fn release_replaced_geo(&mut self, now: Instant) -> bool {
        if self
            .geo_replaced
            .is_none_or(|t| now.saturating_duration_since(t) < GEO_GRACE)
        {
            return false;
        }
        self.geo_replaced = None;
        let Some(newest) = self.generations.values().next_back().map(|g| g.geo.clone()) else {
            return false;
        };
        self.keep_only(&[newest]);
        true
    }

    /// Gives the generations whose geo sources are older than the
    /// [`KEEP_GEO`] most recent ones the newest sources, freeing the rest.
    fn keep_recent_geo(&mut self) {
        let mut recent: Vec<Arc<GeoDb>> = Vec::new();
        for g in self.generations.values().rev() {
            if recent.len() > KEEP_GEO {
                break;
            }
            if !recent.iter().any(|r| Arc::ptr_eq(r, &g.geo)) {
                recent.push(g.geo.clone());
            }
        }
        if recent.len() > KEEP_GEO {
            self.keep_only(&recent[..KEEP_GEO]);
        }
    }

    /// Gives every generation whose geo sources are not among `kept` the
    /// first of them (the newest), so the others are freed.
    fn keep_only(&mut self, kept: &[Arc<GeoDb>]) {
        for g in self.generations.values_mut() {
            if !kept.iter().any(|k| Arc::ptr_eq(k, &g.geo)) {
                *g = Arc::new(Generation {
                    domain_names: g.domain_names.clone(),
                    bridge_names: g.bridge_names.clone(),
                    geo: kept[0].clone(),
                });
            }
        }
    }

    pub fn paths(&mut self) -> &mut PathCache {
        &mut self.paths
    }

    /// Notes the event's sequence number; returns how many events of its CPU
    /// were not delivered since the previous one (rate limited or lost).
    pub fn gap(&mut self, e: &Event) -> u64 {
        let prev = self.last_seq.insert(e.cpu, e.seq);
        match prev {
            // Saturating: a corrupt or wrapped counter must not panic.
            Some(p) if e.seq > p.saturating_add(1) => {
                let lost = e.seq - p - 1;
                self.gaps = self.gaps.saturating_add(lost);
                lost
            }
            _ => 0,
        }
    }

    pub fn enrich(&mut self, e: &Event) -> Record {
        let g = self.generations.get(&e.generation).cloned();
        let name = |id: u16| -> Option<String> {
            let index = DomainId::from(id).index()?;
            Some(match &g {
                Some(g) => g
                    .domain_names
                    .get(index)
                    .cloned()
                    .unwrap_or_else(|| format!("#{id}")),
                None => format!("#{id}"),
            })
        };
        let hook = Hook::from_code(e.hook);
        let ingress = hook == Some(Hook::SkbIngress);
        // The kernel reports (workload, peer); users read (src, dst).
        let (src_domain, dst_domain) = if ingress {
            (name(e.dst_domain), name(e.src_domain))
        } else {
            (name(e.src_domain), name(e.dst_domain))
        };
        let src = addr(e.family, &e.src_addr).filter(|_| e.src_addr != [0; 16]);
        let dst = addr(e.family, &e.dst_addr).filter(|_| e.dst_addr != [0; 16]);
        let peer = if ingress { src } else { dst };
        let (country, geo_source, geo_source_built) = match (peer, &g) {
            (Some(ip), Some(g)) => match g.geo.lookup(ip) {
                Some(hit) => {
                    let src = g.geo.sources().get(hit.source);
                    (
                        Some(String::from_utf8_lossy(&hit.country).into_owned()),
                        src.map(|s| s.path.display().to_string()),
                        src.and_then(|s| s.build_epoch)
                            .map(|t| format_ts(t.saturating_mul(1_000_000_000), 0)),
                    )
                }
                None => (None, None, None),
            },
            _ => (None, None, None),
        };
        let bridge = if e.bridge_id == 0 {
            None
        } else {
            Some(
                match g
                    .as_ref()
                    .and_then(|g| g.bridge_names.get(e.bridge_id as usize - 1))
                {
                    Some(b) => b.name.clone(),
                    None => format!("#{}", e.bridge_id),
                },
            )
        };
        let reason = Reason::from_code(e.reason);
        let name = match (reason, &src_domain, ingress) {
            (Some(Reason::NameAllowed | Reason::NameDenied), Some(local), false) => {
                self.learned_name(local, e.family, e.dst_addr)
            }
            _ => None,
        };
        let task = e.pid_tgid != 0;
        let comm_len = e.comm.iter().position(|b| *b == 0).unwrap_or(e.comm.len());
        let port = |p: [u8; 2]| Some(u16::from_be_bytes(p)).filter(|p| *p != 0);
        Record {
            ts: format_ts(e.ts_tai_ns, self.tai_offset_ns),
            verdict: Verdict::from_code(e.verdict)
                .map_or_else(|| e.verdict.to_string(), |v| v.name().into()),
            reason: reason.map_or_else(|| e.reason.to_string(), |r| r.name().into()),
            hook: hook.map_or_else(|| e.hook.to_string(), |h| h.name().into()),
            proto: proto_name(e.proto),
            src: src.map(|a| a.to_string()),
            sport: port(e.src_port),
            dst: dst.map(|a| a.to_string()),
            dport: port(e.dst_port),
            pid: task.then_some((e.pid_tgid >> 32) as u32),
            comm: task.then(|| String::from_utf8_lossy(&e.comm[..comm_len]).into_owned()),
            uid: task.then_some(e.uid_gid as u32),
            cgroup: self
                .paths
                .path(e.cgroup_id)
                .unwrap_or_else(|| format!("<gone:{}>", e.cgroup_id)),
            cgroup_id: e.cgroup_id,
            src_domain,
            dst_domain,
            country,
            geo_source,
            geo_source_built,
            bridge,
            name,
            generation: e.generation,
            seq: e.seq,
            cpu: e.cpu,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gen_names() -> Generation {
        Generation {
            domain_names: vec!["contractor".into(), "prod".into()],
            bridge_names: vec![BridgeName {
                name: "ci".into(),
                reason: "T-1".into(),
            }],
            geo: Arc::new(GeoDb::empty()),
        }
    }

    #[test]
    fn decodes_and_names_an_event() {
        let dir = crate::testdir::tempdir().unwrap();
        let mut en = Enricher::new(PathCache::new(dir.path().to_path_buf()), 0);
        en.add_generation(3, gen_names());
        let mut e = Event {
            generation: 3,
            family: FAMILY_INET,
            proto: 6,
            hook: Hook::Connect4 as u8,
            ..Default::default()
        };
        e.verdict = Verdict::Deny as u8;
        e.reason = Reason::CrossDomain as u8;
        e.dst_addr[..4].copy_from_slice(&[10, 40, 0, 7]);
        e.dst_port = 443u16.to_be_bytes();
        e.src_domain = 1;
        e.dst_domain = 2;
        e.pid_tgid = (4242u64 << 32) | 4242;
        e.comm[..4].copy_from_slice(b"curl");
        e.ts_tai_ns = 1_700_000_000_000_000_000;
        e.cgroup_id = 999_999_999;
        // SAFETY: Event is plain data.
        let bytes =
            unsafe { std::slice::from_raw_parts((&e as *const Event).cast::<u8>(), EVENT_SIZE) };
        let d = decode(bytes).unwrap();
        let r = en.enrich(&d);
        assert_eq!(r.verdict, "deny");
        assert_eq!(r.reason, "cross-domain");
        assert_eq!(r.dst.as_deref(), Some("10.40.0.7"));
        assert_eq!(r.dport, Some(443));
        assert_eq!(r.src, None);
        assert_eq!(r.src_domain.as_deref(), Some("contractor"));
        assert_eq!(r.dst_domain.as_deref(), Some("prod"));
        assert_eq!(r.pid, Some(4242));
        assert_eq!(r.comm.as_deref(), Some("curl"));
        assert_eq!(r.cgroup, "<gone:999999999>");
        assert_eq!(r.ts, "2023-11-14T22:13:20Z");
        let json = serde_json::to_string(&r).unwrap();
        for key in [
            "\"ts\"",
            "\"verdict\"",
            "\"reason\"",
            "\"hook\"",
            "\"proto\"",
            "\"src\"",
            "\"sport\"",
            "\"dst\"",
            "\"dport\"",
            "\"pid\"",
            "\"comm\"",
            "\"uid\"",
            "\"cgroup\"",
            "\"src_domain\"",
            "\"dst_domain\"",
            "\"country\"",
            "\"bridge\"",
            "\"generation\"",
        ] {
            assert!(json.contains(key), "{key} missing in {json}");
        }
    }

    #[test]
    fn ingress_events_name_the_peer_as_source_and_gaps_are_counted() {
        let dir = crate::testdir::tempdir().unwrap();
        let mut en = Enricher::new(PathCache::new(dir.path().to_path_buf()), 0);
        en.add_generation(1, gen_names());
        let e = Event {
            generation: 1,
            hook: Hook::SkbIngress as u8,
            src_domain: 2,
            dst_domain: 1,
            bridge_id: 1,
            ..Default::default()
        };
        let r = en.enrich(&e);
        assert_eq!(r.src_domain.as_deref(), Some("contractor"));
        assert_eq!(r.dst_domain.as_deref(), Some("prod"));
        assert_eq!(r.bridge.as_deref(), Some("ci"));
        assert_eq!(
            en.gap(&Event {
                cpu: 0,
                seq: 1,
                ..Default::default()
            }),
            0
        );
        assert_eq!(
            en.gap(&Event {
                cpu: 0,
                seq: 5,
                ..Default::default()
            }),
            3
        );
        assert_eq!(
            en.gap(&Event {
                cpu: 1,
                seq: 9,
                ..Default::default()
            }),
            0
        );
        assert_eq!(en.gaps, 3);
    }

    #[test]
    fn replaced_geo_sources_are_let_go_after_the_grace() {
        let dir = crate::testdir::tempdir().unwrap();
        let mut en = Enricher::new(PathCache::new(dir.path().to_path_buf()), 0);
        let (old, new) = (Arc::new(GeoDb::empty()), Arc::new(GeoDb::empty()));
        let with = |geo: &Arc<GeoDb>| Generation {
            geo: geo.clone(),
            ..gen_names()
        };
        en.add_generation(1, with(&old));
        en.add_generation(2, with(&old));
        let start = Instant::now();
        assert!(
            !en.release_replaced_geo(start + GEO_GRACE),
            "nothing replaced"
        );
        en.add_generation(3, with(&new));
        // Events of generations 1 and 2 may still be in the ring.
        assert!(!en.release_replaced_geo(Instant::now()));
        assert_eq!(Arc::strong_count(&old), 3);
        assert!(en.release_replaced_geo(Instant::now() + GEO_GRACE));
        assert_eq!(Arc::strong_count(&old), 1, "the old sources are freed");
        for g in [1, 2, 3] {
            assert!(Arc::ptr_eq(&en.generations[&g].geo, &new), "generation {g}");
            assert_eq!(en.generations[&g].domain_names, gen_names().domain_names);
        }
        assert!(!en.release_replaced_geo(Instant::now() + GEO_GRACE), "once");
    }

    #[test]
    fn sources_replaced_again_within_the_grace_are_let_go_at_once() {
        let dir = crate::testdir::tempdir().unwrap();
        let mut en = Enricher::new(PathCache::new(dir.path().to_path_buf()), 0);
        let dbs: Vec<Arc<GeoDb>> = (0..4).map(|_| Arc::new(GeoDb::empty())).collect();
        for (i, db) in dbs.iter().enumerate() {
            en.add_generation(
                i as u64 + 1,
                Generation {
                    geo: db.clone(),
                    ..gen_names()
                },
            );
        }
        // No time has passed: only the newest two are held.
        assert_eq!(Arc::strong_count(&dbs[0]), 1, "the first sources are freed");
        assert_eq!(
            Arc::strong_count(&dbs[1]),
            1,
            "the second sources are freed"
        );
        assert!(Arc::ptr_eq(&en.generations[&4].geo, &dbs[3]));
        assert!(
            Arc::ptr_eq(&en.generations[&3].geo, &dbs[2]),
            "the previous sources stay"
        );
        for g in [1, 2] {
            let geo = &en.generations[&g].geo;
            assert!(
                Arc::ptr_eq(geo, &dbs[3]) || Arc::ptr_eq(geo, &dbs[2]),
                "generation {g} has sources still held"
            );
            assert_eq!(en.generations[&g].domain_names, gen_names().domain_names);
        }
    }
}
