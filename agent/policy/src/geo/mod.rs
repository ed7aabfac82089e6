//! Geo sources: MaxMind-format country databases and RFC 8805 geofeeds.
//!
//! [`GeoDb::load`] reads and checks every source; [`GeoDb::lookup`] places
//! one address (events, `explain`); [`GeoDb::compile`] turns the sources and
//! the domains' country rules into the kernel's per-range verdicts.
//!
//! Precedence: geofeeds first (most specific prefix wins; for the same
//! prefix, the earlier line and file), then the databases in order.
//! IPv4-mapped IPv6 addresses are placed as IPv4. IPv6 addresses in `::/96`
//! (IPv4-compatible) and in the IPv4 aliases of MaxMind databases (Teredo
//! `2001::/32`, 6to4 `2002::/16`) are not placed by a database: the kernel
//! decides them as IPv6, and their country is the IPv4 one only by a
//! convention of the database writer.

mod compile;
mod countries;
mod geofeed;
mod mmdb;
#[cfg(test)]
mod testdb;
#[cfg(test)]
mod tests;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use bulkhead_common::maps::GeoValue;
use ipnet::IpNet;

use crate::ranges::{self, Span};
use mmdb::Mmdb;

use crate::policy::{Country, CountryList, GeoRule, GeoSources, UnknownCountry};

#[derive(Debug, thiserror::Error)]
pub enum GeoError {
    #[error("{}: cannot read: {message}", path.display())]
    Read { path: PathBuf, message: String },
    #[error("{}: not a MaxMind DB: {message}", path.display())]
    NotMmdb { path: PathBuf, message: String },
    #[error("{}: corrupt MaxMind DB: {message}", path.display())]
    Corrupt { path: PathBuf, message: String },
    #[error("{}: no usable country field (found keys: {keys})", path.display())]
    NoCountry { path: PathBuf, keys: String },
    #[error("{}:{line}: {message}", path.display())]
    Geofeed {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    Mmdb,
    Geofeed,
}

/// One loaded source, for events (`which database said so, built when`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceInfo {
    pub path: PathBuf,
    pub kind: SourceKind,
    /// The database's `database_type` metadata; `"geofeed"` for geofeeds.
    pub database_type: String,
    /// Unix seconds: the database's `build_epoch`; a geofeed's modification
    /// time (`None` if the file system does not say).
    pub build_epoch: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GeoHit {
    pub country: Country,
    /// Index into [`GeoDb::sources`].
    pub source: usize,
}

/// The country rules of one domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainGeo {
    /// Kernel domain id, 1..=63: the bit it owns in [`GeoValue`] masks.
    pub id: u32,
    pub egress: Option<GeoRule>,
    pub ingress: Option<GeoRule>,
}

/// Every domain's geo verdicts, as merged ranges per family (sorted,
/// disjoint), each holding an index into `values`. Addresses in none are
/// "unknown country" (each domain's `unknown_country` decides).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompiledGeo {
    pub v4: Vec<Span<u16>>,
    pub v6: Vec<Span<u16>>,
    /// The distinct verdicts.
    pub values: Vec<GeoValue>,
    pub stats: CompileStats,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompileStats {
    pub v4: FamilyStats,
    pub v6: FamilyStats,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FamilyStats {
    /// Networks read from the databases plus geofeed lines.
    pub source_ranges: usize,
    /// Ranges left after joining neighbours with the same verdict.
    pub merged_ranges: usize,
}

/// Whether `rule` denies an address placed in `country` (`None`: no source
/// places it).
pub fn rule_denies(rule: &GeoRule, country: Option<Country>) -> bool {
    match (country, &rule.countries) {
        (None, _) => rule.unknown_country == UnknownCountry::Deny,
        (Some(c), CountryList::Allow(list)) => !list.contains(&c),
        (Some(c), CountryList::Deny(list)) => list.contains(&c),
    }
}

/// A place given by a geofeed line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Place {
    country: Country,
    source: usize,
}

pub struct GeoDb {
    /// Databases in policy order, then geofeeds in policy order.
    sources: Vec<SourceInfo>,
    /// Databases in lookup order; `dbs[i]` is `sources[i]`.
    dbs: Vec<Mmdb>,
    /// All geofeeds, flattened to disjoint ranges: IPv4, IPv6.
    feed: [Vec<Span<Place>>; 2],
    /// Geofeed lines with a country: IPv4, IPv6.
    feed_lines: [usize; 2],
}

impl GeoDb {
    /// Loads every database and geofeed. Errors name the file and say what
    /// is wrong.
    pub fn load(sources: &GeoSources) -> Result<GeoDb, GeoError> {
        let mut geo = GeoDb::empty();
        for path in &sources.databases {
            let db = Mmdb::open(path, read(path)?)?;
            geo.sources.push(SourceInfo {
                path: path.clone(),
                kind: SourceKind::Mmdb,
                database_type: db.database_type.clone(),
                build_epoch: Some(db.build_epoch),
            });
            geo.dbs.push(db);
        }
        let mut entries = Vec::new();
        for path in &sources.geofeeds {
            let source = geo.sources.len();
            entries.extend(geofeed::parse(path, &read(path)?)?.into_iter().map(|e| {
                (
                    e.net,
                    Place {
                        country: e.country,
                        source,
                    },
                )
            }));
            let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
            geo.sources.push(SourceInfo {
                path: path.clone(),
                kind: SourceKind::Geofeed,
                database_type: "geofeed".into(),
                build_epoch: mtime
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map(|d| d.as_secs()),
            });
        }
        geo.feed_lines = [
            entries.iter().filter(|e| e.0.addr().is_ipv4()).count(),
            entries.iter().filter(|e| e.0.addr().is_ipv6()).count(),
        ];
        geo.feed = flatten(&entries);
        Ok(geo)
    }

    /// No sources: places nothing.
    pub fn empty() -> GeoDb {
        GeoDb {
            sources: Vec::new(),
            dbs: Vec::new(),
            feed: [Vec::new(), Vec::new()],
            feed_lines: [0, 0],
        }
    }

    /// Geofeed first (most specific prefix wins), then databases in order.
    pub fn lookup(&self, ip: IpAddr) -> Option<GeoHit> {
        let ip = ip.to_canonical();
        let (feed, key) = match ip {
            IpAddr::V4(a) => (&self.feed[0], u128::from(u32::from(a))),
            IpAddr::V6(a) => {
                let key = u128::from(a);
                if mmdb::V6_HOLES
                    .iter()
                    .any(|&(lo, hi)| (lo..=hi).contains(&key))
                {
                    return None;
                }
                (&self.feed[1], key)
            }
        };
        let i = feed.partition_point(|s| s.end < key);
        if let Some(s) = feed.get(i).filter(|s| s.start <= key) {
            return Some(GeoHit {
                country: s.val.country,
                source: s.val.source,
            });
        }
        self.dbs.iter().enumerate().find_map(|(source, db)| {
            Some(GeoHit {
                country: db.country(ip)?,
                source,
            })
        })
    }

    pub fn sources(&self) -> &[SourceInfo] {
        &self.sources
    }
}

fn read(path: &Path) -> Result<Vec<u8>, GeoError> {
    std::fs::read(path).map_err(|e| GeoError::Read {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// Geofeed prefixes (possibly nested) → disjoint ranges per family, the
/// most specific prefix winning, then the first one given.
fn flatten(entries: &[(IpNet, Place)]) -> [Vec<Span<Place>>; 2] {
    let mut prefixes = [Vec::new(), Vec::new()];
    for (net, place) in entries {
        let (family, start, end) = match net {
            IpNet::V4(n) => (
                0,
                u32::from(n.network()).into(),
                u32::from(n.broadcast()).into(),
            ),
            IpNet::V6(n) => (1, n.network().into(), n.broadcast().into()),
        };
        prefixes[family].push((start, end, net.prefix_len(), *place));
    }
    prefixes.map(|p| ranges::nested(&p))
}
