//! One MaxMind-format database: opened, its country schema detected, and its
//! whole tree read once into country ranges (which also proves every record
//! decodes, so nothing can fail later).

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::Path;

use maxminddb::{LookupResult, MaxMindDbError, Reader, WithinOptions};
use serde::Deserialize;
use serde::de::IgnoredAny;

use super::{GeoError, countries};
use crate::policy::Country;
use crate::ranges::{self, Span};

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

/// IPv6 prefixes that MaxMind-written databases alias to their IPv4 tree
/// (Teredo, 6to4). The kernel decides those addresses as IPv6, and the
/// tree walk skips aliases, so lookups treat them as not placed either.
const ALIASES: [&str; 2] = ["2001::/32", "2002::/16"];

/// IPv6 space that is IPv4 in disguise: `::/96` (IPv4-compatible, where
/// IPv6 databases keep their IPv4 tree) and `::ffff:0:0/96` (IPv4-mapped,
/// decided as IPv4). No IPv6 verdict is ever given for these.
pub(super) const V6_HOLES: [(u128, u128); 2] =
    [(0, 0xffff_ffff), (0xffff_0000_0000, 0xffff_ffff_ffff)];

pub(super) struct Mmdb {
    reader: Reader<Vec<u8>>,
    schema: Schema,
    /// [`ALIASES`] present in this database, as inclusive ranges.
    aliases: Vec<(u128, u128)>,
    /// Every placed network, neighbours with one country joined: IPv4, IPv6.
    pub spans: [Vec<Span<Country>>; 2],
    /// Networks read from the tree (before joining): IPv4, IPv6.
    pub records: [usize; 2],
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
        let reader = Reader::from_source(bytes).map_err(not_mmdb)?;
        let (schema, keys) = detect_schema(&reader).map_err(corrupt)?;
        let no_country = || GeoError::NoCountry {
            path: path.to_owned(),
            keys: keys.clone(),
        };
        let schema = schema.ok_or_else(no_country)?;
        let mut db = Mmdb {
            reader,
            schema,
            aliases: Vec::new(),
            spans: [Vec::new(), Vec::new()],
            records: [0, 0],
        };
        db.read_tree().map_err(corrupt)?;
        if db.spans.iter().all(Vec::is_empty) {
            return Err(no_country());
        }
        Ok(db)
    }

    pub fn reader(&self) -> &Reader<Vec<u8>> {
        &self.reader
    }

    /// The country this database gives `ip` (already canonical: IPv4-mapped
    /// addresses arrive as IPv4).
    pub fn country(&self, ip: IpAddr) -> Option<Country> {
        if let IpAddr::V6(a) = ip {
            let a = u128::from(a);
            if self.reader.metadata().ip_version != 6
                || self.aliases.iter().any(|&(lo, hi)| (lo..=hi).contains(&a))
            {
                return None;
            }
        }
        // Every record was decoded in `open`, so errors cannot happen here.
        decode_country(self.schema, &self.reader.lookup(ip).ok()?).ok()?
    }

    /// Walks the whole tree (IPv4, then IPv6 without the IPv4 subtree and
    /// without aliases) into `spans`.
    fn read_tree(&mut self) -> Result<(), MaxMindDbError> {
        let mut cache: HashMap<usize, Option<Country>> = HashMap::new();
        let mut spans = [Vec::new(), Vec::new()];
        let mut records = [0, 0];
        let v6 = self.reader.metadata().ip_version == 6;
        let roots: &[&str] = if v6 {
            &["0.0.0.0/0", "::/0"]
        } else {
            &["0.0.0.0/0"]
        };
        for (family, root) in roots.iter().enumerate() {
            let root = root.parse().expect("valid CIDR literal");
            for r in self.reader.within(root, WithinOptions::default())? {
                let r = r?;
                let net = r.network()?;
                let (start, end) = match (family, net.ip()) {
                    (0, IpAddr::V4(a)) => bounds(u32::from(a).into(), net.prefix(), 32),
                    // An IPv6 database whose tree places all of ::/96 at once
                    // (no IPv4 subtree): that record covers all of IPv4.
                    (0, IpAddr::V6(_)) => (0, u32::MAX.into()),
                    // The IPv4 subtree, already read.
                    (_, IpAddr::V4(_)) => continue,
                    (_, IpAddr::V6(a)) => bounds(a.into(), net.prefix(), 128),
                };
                records[family] += 1;
                let Some(offset) = r.offset() else { continue };
                let country = match cache.get(&offset) {
                    Some(c) => *c,
                    None => {
                        let c = decode_country(self.schema, &r)?;
                        cache.insert(offset, c);
                        c
                    }
                };
                let Some(country) = country else { continue };
                if spans[family]
                    .last()
                    .is_some_and(|s: &Span<Country>| s.end >= start)
                {
                    return Err(MaxMindDbError::invalid_database(
                        "search tree networks out of order",
                    ));
                }
                ranges::push(
                    &mut spans[family],
                    Span {
                        start,
                        end,
                        val: country,
                    },
                );
            }
        }
        if v6 {
            for alias in ALIASES {
                let net = alias.parse().expect("valid CIDR literal");
                let own = self
                    .reader
                    .within(net, WithinOptions::default())?
                    .next()
                    .is_some();
                let all = WithinOptions::default().include_aliased_networks();
                if !own && self.reader.within(net, all)?.next().is_some() {
                    let net: ipnet::Ipv6Net = alias.parse().expect("valid CIDR literal");
                    self.aliases
                        .push((net.network().into(), net.broadcast().into()));
                }
            }
        }
        self.spans = spans;
        self.records = records;
        Ok(())
    }
}

fn decode_country(
    schema: Schema,
    r: &LookupResult<'_, Vec<u8>>,
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
fn detect_schema(reader: &Reader<Vec<u8>>) -> Result<(Option<Schema>, String), MaxMindDbError> {
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
