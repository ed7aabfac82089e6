//! One MaxMind-format database: opened, its country schema detected, and its
//! whole tree read once into country ranges (which also proves every record
//! decodes, so nothing can fail later). Only the ranges are kept: lookups
//! search them, and the file's bytes are let go (a country database is 8 MB,
//! a city database 60 MB; its ranges take a few).

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::Arc;

use maxminddb::{LookupResult, MaxMindDbError, Reader, WithinOptions};
use serde::Deserialize;
use serde::de::IgnoredAny;

use super::{GeoError, countries};
use crate::fxhash::FxBuild;
use crate::policy::Country;
use crate::ranges::{Packed, Span};

/// Where a database keeps the country.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Schema {
    /// MaxMind GeoIP2/GeoLite2 Country and City, DB-IP lite:
    /// `country.iso_code`, else `registered_country.iso_code`.
    MaxMind,
    /// `country_code` at the top level (ip-location-db, ipinfo).
    Flat,
}

#[derive(Deserialize)]
struct MaxMindRecord<'a> {
    #[serde(borrow)]
    country: Option<IsoCode<'a>>,
    #[serde(borrow)]
    registered_country: Option<IsoCode<'a>>,
}

#[derive(Deserialize)]
struct IsoCode<'a> {
    #[serde(borrow)]
    iso_code: Option<&'a str>,
}

#[derive(Deserialize)]
struct FlatRecord<'a> {
    #[serde(borrow)]
    country_code: Option<&'a str>,
}

/// IPv6 space that is IPv4 in disguise: `::/96` (IPv4-compatible, where
/// IPv6 databases keep their IPv4 tree) and `::ffff:0:0/96` (IPv4-mapped,
/// decided as IPv4). No IPv6 verdict is ever given for these.
pub(super) const V6_HOLES: [(u128, u128); 2] =
    [(0, 0xffff_ffff), (0xffff_0000_0000, 0xffff_ffff_ffff)];

/// The file's bytes, shared by the reader and the tree walk (the reader
/// keeps its own handle to itself).
#[derive(Clone)]
pub(super) struct Bytes(Arc<Vec<u8>>);

impl AsRef<[u8]> for Bytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

pub(super) struct Mmdb {
    /// The metadata's `database_type` and `build_epoch`.
    pub database_type: String,
    pub build_epoch: u64,
    /// Every placed network, neighbours with one country joined: IPv4,
    /// IPv6 (without the IPv4 subtree and the aliases of it).
    pub spans: [Packed<Country>; 2],
    /// Networks read from the tree (before joining): IPv4, IPv6.
    pub records: [usize; 2],
}

/// The file while it is read.
struct File {
    bytes: Bytes,
    reader: Reader<Bytes>,
    schema: Schema,
}

impl Mmdb {
    pub fn open(path: &Path, bytes: Vec<u8>) -> Result<Mmdb, GeoError> {
        let not_mmdb = |e: MaxMindDbError| GeoError::NotMmdb {
            path: path.to_owned(),
            message: e.to_string(),
        };
        let corrupt = |e: MaxMindDbError| GeoError::Corrupt {
            path: path.to_owned(),
            message: e.to_string(),
        };
        let bytes = Bytes(Arc::new(bytes));
        let reader = Reader::from_source(bytes.clone()).map_err(not_mmdb)?;
        let (schema, keys) = detect_schema(&reader).map_err(corrupt)?;
        let no_country = || GeoError::NoCountry {
            path: path.to_owned(),
            keys: keys.clone(),
        };
        let schema = schema.ok_or_else(no_country)?;
        let file = File {
            bytes,
            reader,
            schema,
        };
        let (spans, records) = file.read_tree().map_err(corrupt)?;
        if spans.iter().all(Packed::is_empty) {
            return Err(no_country());
        }
        let meta = file.reader.metadata();
        Ok(Mmdb {
            database_type: meta.database_type.clone(),
            build_epoch: meta.build_epoch,
            spans,
            records,
        })
    }

    /// The country this database gives `ip` (already canonical: IPv4-mapped
    /// addresses arrive as IPv4). The spans hold what the reader iterates:
    /// the IPv6 prefixes that MaxMind-written databases alias to their IPv4
    /// tree (Teredo `2001::/32`, 6to4 `2002::/16`) are not in them, since
    /// the kernel decides those addresses as IPv6 (the tests compare the
    /// spans with the reader's own iteration).
    pub fn country(&self, ip: IpAddr) -> Option<Country> {
        match ip {
            IpAddr::V4(a) => self.spans[0].find(u32::from(a).into()),
            IpAddr::V6(a) => self.spans[1].find(a.into()),
        }
    }
}

/// The reader and schema of the database at `path`, for tests that check
/// the spans against the reader.
#[cfg(test)]
pub(super) fn reader_of(path: &Path) -> (Reader<Bytes>, Schema) {
    let bytes = Bytes(Arc::new(std::fs::read(path).unwrap()));
    let reader = Reader::from_source(bytes).unwrap();
    let schema = detect_schema(&reader).unwrap().0.unwrap();
    (reader, schema)
}

impl File {
    /// Walks the whole tree (IPv4, then IPv6 without the IPv4 subtree and
    /// without aliases) into `spans`. The walk reads the search tree itself
    /// (the format is the MaxMind DB spec's) and decodes each distinct
    /// record once through the reader, which is what makes reading a
    /// country database take milliseconds, not a second.
    fn read_tree(&self) -> Result<([Packed<Country>; 2], [usize; 2]), MaxMindDbError> {
        let tree = Tree::new(self.reader.metadata(), self.bytes.as_ref())?;
        let v6 = self.reader.metadata().ip_version == 6;
        let ipv4_start = if v6 { tree.ipv4_start() } else { 0 };
        // One family's networks: (joined spans, networks read).
        let family = |family: usize| -> Result<(Packed<Country>, usize), MaxMindDbError> {
            let (start, bits) = if family == 0 {
                (ipv4_start, 32)
            } else {
                (0, 128)
            };
            // In the IPv6 walk the IPv4 subtree was read already, and every
            // other record leading to it is an alias (Teredo, 6to4, mapped).
            let skip = (family == 1 && ipv4_start < tree.node_count).then_some(ipv4_start);
            let mut cache: HashMap<usize, Option<Country>, FxBuild> = HashMap::default();
            let mut spans = Packed::new(bits);
            let mut records = 0;
            tree.walk(start, bits, skip, |net, len, pointer| {
                records += 1;
                let country = match cache.get(&pointer) {
                    Some(c) => *c,
                    None => {
                        let c = self.decode_at(family, net, pointer)?;
                        cache.insert(pointer, c);
                        c
                    }
                };
                if let Some(country) = country {
                    let (start, end) = bounds(net, len, bits);
                    spans.push(Span {
                        start,
                        end,
                        val: country,
                    });
                }
                Ok(())
            })?;
            spans.shrink_to_fit();
            Ok((spans, records))
        };
        // The two families' subtrees are disjoint: one thread each.
        let (v4, v6_spans) = std::thread::scope(|s| {
            let v4 = s.spawn(|| family(0));
            let v6_spans = if v6 {
                family(1)
            } else {
                Ok((Packed::new(128), 0))
            };
            (v4.join().expect("IPv4 tree walk panicked"), v6_spans)
        });
        let ((s4, r4), (s6, r6)) = (v4?, v6_spans?);
        Ok(([s4, s6], [r4, r6]))
    }

    /// The country of the record the tree walk found at `pointer` for the
    /// network at `net`, decoded through the reader's own lookup (which
    /// must land on the same record).
    fn decode_at(
        &self,
        family: usize,
        net: u128,
        pointer: usize,
    ) -> Result<Option<Country>, MaxMindDbError> {
        let ip = if family == 0 {
            IpAddr::V4(Ipv4Addr::from(net as u32))
        } else {
            IpAddr::V6(Ipv6Addr::from(net))
        };
        let r = self.reader.lookup(ip)?;
        let node_count = self.reader.metadata().node_count as usize;
        if r.offset() != pointer.checked_sub(node_count + 16) {
            return Err(MaxMindDbError::invalid_database(
                "the search tree and a lookup disagree about a network's record",
            ));
        }
        decode_country(self.schema, &r)
    }
}

/// The search tree, read directly: `node_count` nodes of two records each,
/// 24, 28 or 32 bits a record. A record below `node_count` is a node, equal
/// to it means no data, above it points into the data section.
struct Tree<'a> {
    buf: &'a [u8],
    node_count: usize,
    record_size: u16,
}

impl<'a> Tree<'a> {
    fn new(m: &maxminddb::Metadata, buf: &'a [u8]) -> Result<Tree<'a>, MaxMindDbError> {
        let node_count = m.node_count as usize;
        let tree_bytes = node_count
            .checked_mul(usize::from(m.record_size) / 4)
            .filter(|n| *n <= buf.len())
            .ok_or_else(|| MaxMindDbError::invalid_database("search tree beyond the file"))?;
        Ok(Tree {
            buf: &buf[..tree_bytes],
            node_count,
            record_size: m.record_size,
        })
    }

    /// Record `side` (0 left, 1 right) of `node`.
    fn record(&self, node: usize, side: usize) -> usize {
        let b = self.buf;
        let be = |o: usize, n: usize| b[o..o + n].iter().fold(0usize, |a, &x| a << 8 | x as usize);
        match self.record_size {
            24 => be(node * 6 + side * 3, 3),
            28 => {
                let o = node * 7;
                let mid = b[o + 3] as usize;
                if side == 0 {
                    (mid & 0xf0) << 20 | be(o, 3)
                } else {
                    (mid & 0x0f) << 24 | be(o + 4, 3)
                }
            }
            _ => be(node * 8 + side * 4, 4),
        }
    }

    /// The record reached from the root by 96 zero bits: where an IPv6
    /// database keeps IPv4 (a node, or the record covering all of it).
    fn ipv4_start(&self) -> usize {
        let mut node = 0;
        for _ in 0..96 {
            if node >= self.node_count {
                break;
            }
            node = self.record(node, 0);
        }
        node
    }

    /// Every network with data below record `start` of a `bits`-bit
    /// space, in address order: `f(network, prefix length, record)`.
    /// Records equal to `skip` are left out. A tree whose walk goes deeper
    /// than the address or visits more nodes than it has is corrupt (a
    /// cycle or shared subtrees), not walked for ever.
    fn walk(
        &self,
        start: usize,
        bits: u32,
        skip: Option<usize>,
        mut f: impl FnMut(u128, u8, usize) -> Result<(), MaxMindDbError>,
    ) -> Result<(), MaxMindDbError> {
        let mut stack = vec![(start, 0u128, 0u32)];
        let mut visited = 0usize;
        while let Some((node, net, depth)) = stack.pop() {
            if Some(node) == skip {
                continue;
            }
            if node > self.node_count {
                f(net, depth as u8, node)?;
                continue;
            }
            if node == self.node_count {
                continue;
            }
            visited += 1;
            if depth >= bits || visited > self.node_count {
                return Err(MaxMindDbError::invalid_database(
                    "search tree has a cycle or shared subtrees",
                ));
            }
            let bit = 1u128 << (bits - 1 - depth);
            stack.push((self.record(node, 1), net | bit, depth + 1));
            stack.push((self.record(node, 0), net, depth + 1));
        }
        Ok(())
    }
}

pub(super) fn decode_country(
    schema: Schema,
    r: &LookupResult<'_, Bytes>,
) -> Result<Option<Country>, MaxMindDbError> {
    let code = match schema {
        Schema::MaxMind => r.decode::<MaxMindRecord>()?.and_then(|m| {
            m.country
                .and_then(|c| c.iso_code)
                .or(m.registered_country.and_then(|c| c.iso_code))
        }),
        Schema::Flat => r.decode::<FlatRecord>()?.and_then(|f| f.country_code),
    };
    Ok(code.and_then(countries::parse_any))
}

/// First and last address of `net/prefix` in a `bits`-bit space.
fn bounds(net: u128, prefix: u8, bits: u32) -> (u128, u128) {
    let host = bits - u32::from(prefix);
    let size_minus_one = if host == 128 {
        u128::MAX
    } else {
        (1u128 << host) - 1
    };
    (net, net | size_minus_one)
}

/// Looks at the top-level keys of the first records to find the schema.
/// Returns `None` and the keys seen when no country field is there.
fn detect_schema(reader: &Reader<Bytes>) -> Result<(Option<Schema>, String), MaxMindDbError> {
    const SAMPLE: usize = 16;
    let mut keys = BTreeSet::new();
    let mut seen = BTreeSet::new();
    let mut samples = Vec::new();
    let root = if reader.metadata().ip_version == 6 {
        "::/0"
    } else {
        "0.0.0.0/0"
    };
    for r in reader.within(
        root.parse().expect("valid CIDR literal"),
        WithinOptions::default(),
    )? {
        let r = r?;
        if !seen.insert(r.offset()) {
            continue;
        }
        r.decode::<IgnoredAny>()?;
        // Records that are not maps (a bare string, say) have no fields.
        if let Ok(Some(map)) = r.decode::<HashMap<String, IgnoredAny>>() {
            keys.extend(map.into_keys());
        }
        samples.push(r);
        if seen.len() == SAMPLE {
            break;
        }
    }
    let found = if keys.is_empty() {
        "none".to_string()
    } else {
        keys.iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let schema = if keys.contains("country_code") {
        Some(Schema::Flat)
    } else if keys.contains("country") || keys.contains("registered_country") {
        Some(Schema::MaxMind)
    } else {
        None
    };
    // The field must also have the expected shape (`country` may be a name).
    let fits = |s: Schema| samples.iter().all(|r| decode_country(s, r).is_ok());
    Ok((schema.filter(|&s| fits(s)), found))
}
