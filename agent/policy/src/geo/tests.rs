//! Lookups and compile checks on fixtures written by [`super::testdb`], and
//! on the real, full CC0 database from `@ip-location-db/geo-whois-asn-country-mmdb`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Instant;

use bulkhead_common::maps::GeoValue;
use maxminddb::WithinOptions;
use tempfile::TempDir;

use super::testdb::{TestDb, Value, s};
use super::*;
use crate::policy::{CountryList, GeoRule, UnknownCountry};
use crate::ranges::Span;

fn write(dir: &TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn load(dbs: &[&Path], feeds: &[&Path]) -> Result<GeoDb, GeoError> {
    GeoDb::load(&GeoSources {
        databases: dbs.iter().map(|p| p.to_path_buf()).collect(),
        geofeeds: feeds.iter().map(|p| p.to_path_buf()).collect(),
    })
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn country_of(geo: &GeoDb, addr: &str) -> Option<String> {
    geo.lookup(ip(addr))
        .map(|h| String::from_utf8(h.country.to_vec()).unwrap())
}

/// `{ iso_code, names, geoname_id }`, as GeoIP2 stores a country.
fn mm_country(code: &str) -> Value {
    Value::Map(vec![
        ("geoname_id", Value::U32(1)),
        ("iso_code", s(code)),
        (
            "names",
            Value::Map(vec![("en", s("Somewhere")), ("de", s("Irgendwo"))]),
        ),
    ])
}

fn continent() -> Value {
    Value::Map(vec![("code", s("EU")), ("geoname_id", Value::U32(6255148))])
}

/// GeoLite2-Country shape; `country: None` leaves only `registered_country`.
fn geolite_country(country: Option<&str>, registered: &str) -> Value {
    let mut m = vec![
        ("continent", continent()),
        ("registered_country", mm_country(registered)),
    ];
    if let Some(c) = country {
        m.push(("country", mm_country(c)));
    }
    Value::Map(m)
}

fn city(country: &str) -> Value {
    Value::Map(vec![
        (
            "city",
            Value::Map(vec![
                ("geoname_id", Value::U32(2950159)),
                ("names", Value::Map(vec![("en", s("Berlin"))])),
            ]),
        ),
        ("continent", continent()),
        ("country", mm_country(country)),
        (
            "location",
            Value::Map(vec![
                ("accuracy_radius", Value::U16(20)),
                ("time_zone", s("Europe/Berlin")),
            ]),
        ),
        ("registered_country", mm_country(country)),
        (
            "subdivisions",
            Value::Array(vec![Value::Map(vec![("iso_code", s("BE"))])]),
        ),
    ])
}

fn dbip(country: &str) -> Value {
    Value::Map(vec![
        ("continent", continent()),
        (
            "country",
            Value::Map(vec![
                ("is_in_european_union", Value::Bool(true)),
                ("iso_code", s(country)),
                ("names", Value::Map(vec![("en", s("Somewhere"))])),
            ]),
        ),
    ])
}

fn flat(country: &str) -> Value {
    Value::Map(vec![("country_code", s(country))])
}

fn geolite_fixture() -> Vec<u8> {
    let mut db = TestDb::new(6, "GeoLite2-Country");
    db.insert("1.0.0.0/24", geolite_country(Some("DE"), "DE"))
        .insert("1.0.1.0/24", geolite_country(None, "FR"))
        .insert("1.0.2.0/23", Value::Map(vec![("continent", continent())]))
        .insert("5.0.0.0/8", geolite_country(Some("US"), "US"))
        .insert("5.5.0.0/16", geolite_country(Some("NL"), "US"))
        .alias("::ffff:0:0/96")
        .alias("2001::/32")
        .alias("2002::/16")
        .insert("2a00::/16", geolite_country(Some("GB"), "GB"))
        .insert("2a00:1::/32", geolite_country(Some("CH"), "CH"));
    db.build()
}

#[test]
fn geo_lookup_geolite2_country() {
    let dir = TempDir::new().unwrap();
    let path = write(&dir, "GeoLite2-Country.mmdb", &geolite_fixture());
    let geo = load(&[&path], &[]).unwrap();
    assert_eq!(country_of(&geo, "1.0.0.1").as_deref(), Some("DE"));
    // No `country`: falls back to `registered_country`.
    assert_eq!(country_of(&geo, "1.0.1.255").as_deref(), Some("FR"));
    // A record with neither places nothing.
    assert_eq!(country_of(&geo, "1.0.2.7"), None);
    assert_eq!(country_of(&geo, "5.1.2.3").as_deref(), Some("US"));
    assert_eq!(country_of(&geo, "5.5.2.3").as_deref(), Some("NL"));
    assert_eq!(country_of(&geo, "9.9.9.9"), None);
    assert_eq!(country_of(&geo, "2a00:2::1").as_deref(), Some("GB"));
    assert_eq!(country_of(&geo, "2a00:1:ffff::1").as_deref(), Some("CH"));
    // IPv4-mapped is IPv4; IPv4-compatible and the 6to4/Teredo aliases are not placed.
    assert_eq!(country_of(&geo, "::ffff:1.0.0.1").as_deref(), Some("DE"));
    assert_eq!(country_of(&geo, "::1.0.0.1"), None);
    assert_eq!(country_of(&geo, "2002:100:1::1"), None);
    assert_eq!(country_of(&geo, "2001:0:100:1::"), None);
    assert_eq!(geo.lookup(ip("1.0.0.1")).unwrap().source, 0);
    assert_eq!(
        geo.sources(),
        [SourceInfo {
            path: path.clone(),
            kind: SourceKind::Mmdb,
            database_type: "GeoLite2-Country".into(),
            build_epoch: Some(1_700_000_000)
        }]
    );
}

#[test]
fn geo_lookup_city_dbip_and_flat_schemas() {
    let dir = TempDir::new().unwrap();
    // GeoIP2 City, an IPv4-only tree with 32-bit records.
    let mut db = TestDb::new(4, "GeoIP2-City");
    db.record_size = 32;
    db.insert("81.0.0.0/8", city("DE"))
        .insert("81.1.0.0/16", city("AT"));
    let city_db = write(&dir, "city.mmdb", &db.build());
    let geo = load(&[&city_db], &[]).unwrap();
    assert_eq!(country_of(&geo, "81.2.0.1").as_deref(), Some("DE"));
    assert_eq!(country_of(&geo, "81.1.0.1").as_deref(), Some("AT"));
    assert_eq!(country_of(&geo, "2a00::1"), None);

    let mut db = TestDb::new(6, "DBIP-Country-Lite");
    db.insert("2.0.0.0/8", dbip("FR"))
        .insert("2c0f::/16", dbip("ZA"));
    let dbip_db = write(&dir, "dbip.mmdb", &db.build());
    let geo = load(&[&dbip_db], &[]).unwrap();
    assert_eq!(country_of(&geo, "2.3.4.5").as_deref(), Some("FR"));
    assert_eq!(country_of(&geo, "2c0f:1::1").as_deref(), Some("ZA"));

    // Flat `country_code` (ip-location-db), also next to a `country` name
    // (ipinfo); case is normalised; a malformed code places nothing.
    let mut db = TestDb::new(6, "country ipvAll");
    db.insert("3.0.0.0/8", flat("us"))
        .insert(
            "4.0.0.0/8",
            Value::Map(vec![("country", s("Japan")), ("country_code", s("JP"))]),
        )
        .insert("6.0.0.0/8", flat("ZZZ"))
        .insert("2400::/12", flat("AU"));
    let flat_db = write(&dir, "flat.mmdb", &db.build());
    let geo = load(&[&flat_db], &[]).unwrap();
    assert_eq!(country_of(&geo, "3.0.0.0").as_deref(), Some("US"));
    assert_eq!(country_of(&geo, "4.255.255.255").as_deref(), Some("JP"));
    assert_eq!(country_of(&geo, "6.1.1.1"), None);
    assert_eq!(country_of(&geo, "2401::1").as_deref(), Some("AU"));

    // Databases in order: the first one that places an address wins.
    let geo = load(&[&city_db, &dbip_db, &flat_db], &[]).unwrap();
    assert_eq!(
        geo.lookup(ip("81.1.0.1")),
        Some(GeoHit {
            country: *b"AT",
            source: 0
        })
    );
    assert_eq!(
        geo.lookup(ip("2.0.0.1")),
        Some(GeoHit {
            country: *b"FR",
            source: 1
        })
    );
    assert_eq!(
        geo.lookup(ip("3.0.0.1")),
        Some(GeoHit {
            country: *b"US",
            source: 2
        })
    );
    assert_eq!(geo.sources()[2].database_type, "country ipvAll");
}

#[test]
fn geo_rejects_databases_without_a_country() {
    let dir = TempDir::new().unwrap();
    let mut db = TestDb::new(6, "GeoLite2-ASN");
    db.insert(
        "1.0.0.0/24",
        Value::Map(vec![
            ("asn", Value::U32(13335)),
            ("as_name", s("CLOUDFLARENET")),
        ]),
    );
    let path = write(&dir, "asn.mmdb", &db.build());
    let err = load(&[&path], &[]).err().unwrap().to_string();
    assert_eq!(
        err,
        format!(
            "{}: no usable country field (found keys: as_name, asn)",
            path.display()
        )
    );

    // `country` as a plain name is not a usable country field.
    let mut db = TestDb::new(4, "names");
    db.insert("1.0.0.0/24", Value::Map(vec![("country", s("Germany"))]));
    let path = write(&dir, "names.mmdb", &db.build());
    let err = load(&[&path], &[]).err().unwrap().to_string();
    assert_eq!(
        err,
        format!(
            "{}: no usable country field (found keys: country)",
            path.display()
        )
    );

    let empty = write(&dir, "empty-tree.mmdb", &TestDb::new(6, "empty").build());
    let err = load(&[&empty], &[]).err().unwrap().to_string();
    assert_eq!(
        err,
        format!(
            "{}: no usable country field (found keys: none)",
            empty.display()
        )
    );
}

#[test]
fn geo_rejects_missing_truncated_and_corrupt_files() {
    let dir = TempDir::new().unwrap();
    let good = geolite_fixture();
    let err = |name: &str, bytes: Option<&[u8]>| {
        let path = match bytes {
            Some(b) => write(&dir, name, b),
            None => dir.path().join(name),
        };
        let e = load(&[&path], &[]).err().unwrap().to_string();
        assert!(e.starts_with(&format!("{}: ", path.display())), "{e}");
        e
    };
    let e = err("missing.mmdb", None);
    assert!(e.contains("cannot read: No such file or directory"), "{e}");
    let e = err("empty.mmdb", Some(b""));
    assert!(e.contains(": not a MaxMind DB: "), "{e}");
    let e = err("text.mmdb", Some(b"# this is a CSV\n1.0.0.0/8,DE\n"));
    assert!(e.contains(": not a MaxMind DB: "), "{e}");
    let e = err("truncated.mmdb", Some(&good[..good.len() / 2]));
    assert!(e.contains(": not a MaxMind DB: "), "{e}");
    // Cut inside the metadata map.
    let e = err("short-meta.mmdb", Some(&good[..good.len() - 20]));
    assert!(e.contains(": not a MaxMind DB: "), "{e}");

    // A tree record pointing past the data section.
    let mut bad = good.clone();
    bad[0..3].copy_from_slice(&[0xff, 0xff, 0xf0]);
    let e = err("bad-pointer.mmdb", Some(&bad));
    assert!(e.contains(": corrupt MaxMind DB: "), "{e}");
    // Garbage in the data section (the 16 zero bytes end the tree).
    let mut bad = good.clone();
    let data = bad.windows(16).position(|w| w == [0; 16]).unwrap() + 16;
    bad[data..data + 8].fill(0xff);
    let e = err("bad-data.mmdb", Some(&bad));
    assert!(e.contains(": corrupt MaxMind DB: "), "{e}");
}

#[test]
fn geo_geofeed_overrides_databases() {
    let dir = TempDir::new().unwrap();
    let db = write(&dir, "db.mmdb", &geolite_fixture());
    let feed1 = write(
        &dir,
        "office.csv",
        b"# prefix,country,region,city,postal\n\
          5.5.5.0/24,FR,FR-75,Paris,\n\
          5.5.5.128/25,BE,,,\n\
          5.5.6.0/24,,,,\n\
          10.0.0.0/8,DE,,,\n\
          2a00:1:2::/48,IT\n",
    );
    let feed2 = write(&dir, "cloud.csv", b"10.0.0.0/8,PL\n10.1.0.0/16,PL\n");
    let geo = load(&[&db], &[&feed1, &feed2]).unwrap();
    assert_eq!(
        geo.lookup(ip("5.5.5.1")),
        Some(GeoHit {
            country: *b"FR",
            source: 1
        })
    );
    assert_eq!(
        geo.lookup(ip("5.5.5.200")),
        Some(GeoHit {
            country: *b"BE",
            source: 1
        })
    );
    // Empty country: the database still decides.
    assert_eq!(
        geo.lookup(ip("5.5.6.1")),
        Some(GeoHit {
            country: *b"NL",
            source: 0
        })
    );
    // Same prefix in two feeds: the first wins; a more specific one wins over both.
    assert_eq!(
        geo.lookup(ip("10.2.0.1")),
        Some(GeoHit {
            country: *b"DE",
            source: 1
        })
    );
    assert_eq!(
        geo.lookup(ip("10.1.0.1")),
        Some(GeoHit {
            country: *b"PL",
            source: 2
        })
    );
    assert_eq!(
        geo.lookup(ip("::ffff:10.1.0.1")),
        Some(GeoHit {
            country: *b"PL",
            source: 2
        })
    );
    assert_eq!(country_of(&geo, "2a00:1:2:3::1").as_deref(), Some("IT"));
    assert_eq!(country_of(&geo, "2a00:1:3::1").as_deref(), Some("CH"));
    let info = &geo.sources()[2];
    assert_eq!(
        (info.kind, info.database_type.as_str()),
        (SourceKind::Geofeed, "geofeed")
    );
    assert!(info.build_epoch.is_some());

    let bad = write(&dir, "bad.csv", b"# ok\n10.0.0.0/8,DE\n\n10.0.0.0/33,DE\n");
    let err = load(&[&db], &[&feed1, &bad]).err().unwrap().to_string();
    assert_eq!(
        err,
        format!("{}:4: bad prefix `10.0.0.0/33`", bad.display())
    );
    let err = load(&[], &[&dir.path().join("nope.csv")])
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("nope.csv: cannot read: "), "{err}");
}

fn rule(list: CountryList, unknown: UnknownCountry) -> GeoRule {
    GeoRule {
        countries: list,
        unknown_country: unknown,
    }
}

fn allow(codes: &[&str], unknown: UnknownCountry) -> Option<GeoRule> {
    Some(rule(
        CountryList::Allow(
            codes
                .iter()
                .map(|c| <[u8; 2]>::try_from(c.as_bytes()).unwrap())
                .collect(),
        ),
        unknown,
    ))
}

fn deny(codes: &[&str], unknown: UnknownCountry) -> Option<GeoRule> {
    Some(rule(
        CountryList::Deny(
            codes
                .iter()
                .map(|c| <[u8; 2]>::try_from(c.as_bytes()).unwrap())
                .collect(),
        ),
        unknown,
    ))
}

#[test]
fn geo_compile_merges_ranges_by_verdict() {
    let dir = TempDir::new().unwrap();
    let mut db = TestDb::new(6, "GeoLite2-Country");
    db.insert("1.0.0.0/24", geolite_country(Some("DE"), "DE"))
        .insert("1.0.1.0/24", geolite_country(Some("FR"), "FR"))
        .insert("1.0.2.0/23", geolite_country(Some("US"), "US"))
        .insert("1.0.4.0/22", geolite_country(Some("CN"), "CN"))
        .alias("2002::/16")
        .insert("2a00::/16", geolite_country(Some("DE"), "DE"))
        .insert("2a01::/16", geolite_country(Some("DE"), "DE"));
    let path = write(&dir, "db.mmdb", &db.build());
    let geo = load(&[&path], &[]).unwrap();

    let nobody = [DomainGeo {
        id: 1,
        egress: None,
        ingress: None,
    }];
    assert_eq!(geo.compile(&nobody), CompiledGeo::default());

    let domains = [
        DomainGeo {
            id: 1,
            egress: allow(&["DE", "FR"], UnknownCountry::Deny),
            ingress: None,
        },
        DomainGeo {
            id: 63,
            egress: None,
            ingress: deny(&["CN"], UnknownCountry::Allow),
        },
    ];
    let c = geo.compile(&domains);
    let v = |e: u64, i: u64| GeoValue {
        egress_deny: e,
        ingress_deny: i,
    };
    assert_eq!(
        spans(&c, false),
        [
            // DE and FR share a verdict: one range.
            ("1.0.0.0 - 1.0.1.255".to_string(), v(0, 0)),
            ("1.0.2.0 - 1.0.3.255".to_string(), v(1 << 1, 0)),
            ("1.0.4.0 - 1.0.7.255".to_string(), v(1 << 1, 1 << 63))
        ]
    );
    // The two /16 joined; the 6to4 alias is not there.
    assert_eq!(
        spans(&c, true),
        [(
            "2a00:: - 2a01:ffff:ffff:ffff:ffff:ffff:ffff:ffff".to_string(),
            v(0, 0)
        )]
    );
    assert_eq!(
        c.stats.v4,
        FamilyStats {
            source_ranges: 4,
            merged_ranges: 3,
        }
    );
    assert_eq!(
        c.stats.v6,
        FamilyStats {
            source_ranges: 2,
            merged_ranges: 1,
        }
    );
}

/// Compiled ranges of one family as `first - last` and their verdict.
fn spans(c: &CompiledGeo, v6: bool) -> Vec<(String, GeoValue)> {
    let list = if v6 { &c.v6 } else { &c.v4 };
    let addr = |a: u128| {
        if v6 {
            Ipv6Addr::from(a).to_string()
        } else {
            Ipv4Addr::from(a as u32).to_string()
        }
    };
    list.iter()
        .map(|s| {
            let range = format!("{} - {}", addr(s.start), addr(s.end));
            (range, c.values[usize::from(s.val)])
        })
        .collect()
}

#[test]
fn geo_compile_without_ipv4_subtree() {
    // An IPv6 tree whose ::/64 record also covers all of IPv4.
    let dir = TempDir::new().unwrap();
    let mut db = TestDb::new(6, "odd");
    db.insert("::/64", flat("DE"))
        .insert("2a00::/16", flat("FR"));
    let path = write(&dir, "db.mmdb", &db.build());
    let geo = load(&[&path], &[]).unwrap();
    assert_eq!(country_of(&geo, "1.2.3.4").as_deref(), Some("DE"));
    assert_eq!(country_of(&geo, "::ffff:1.2.3.4").as_deref(), Some("DE"));
    assert_eq!(country_of(&geo, "::1:0:0").as_deref(), Some("DE"));
    assert_eq!(country_of(&geo, "::1.2.3.4"), None);
    let domains = [DomainGeo {
        id: 3,
        egress: allow(&["DE"], UnknownCountry::Deny),
        ingress: None,
    }];
    let c = geo.compile(&domains);
    assert_eq!(
        spans(&c, false),
        [("0.0.0.0 - 255.255.255.255".to_string(), GeoValue::default())]
    );
    // ::/64 without the two /96 inside it that no source places
    // (IPv4-compatible and IPv4-mapped).
    assert_eq!(
        spans(&c, true),
        [
            (
                "::1:0:0 - ::fffe:ffff:ffff".to_string(),
                GeoValue::default()
            ),
            (
                "::1:0:0:0 - ::ffff:ffff:ffff:ffff".to_string(),
                GeoValue::default()
            ),
            (
                "2a00:: - 2a00:ffff:ffff:ffff:ffff:ffff:ffff:ffff".to_string(),
                GeoValue {
                    egress_deny: 1 << 3,
                    ingress_deny: 0
                }
            ),
        ]
    );
    check_verdicts(&geo, &domains, &sample_addresses(&geo, 1000, 1));
}

/// Checks every address: the compiled verdict equals `lookup` + the rule,
/// for every domain and both directions. Returns how many were checked.
fn check_verdicts(geo: &GeoDb, domains: &[DomainGeo], addrs: &[IpAddr]) -> usize {
    let t = Instant::now();
    let compiled = geo.compile(domains);
    let took = t.elapsed();
    let st = compiled.stats;
    let t = Instant::now();
    // The kernel's view: its own walk of the address table built from it.
    let table = crate::addr::AddrTable::build(&[], &[], compiled.clone()).unwrap();
    println!(
        "compile {took:?}: IPv4 {} source ranges → {} merged; IPv6 {} → {}; address table {} words in {:?}",
        st.v4.source_ranges,
        st.v4.merged_ranges,
        st.v6.source_ranges,
        st.v6.merged_ranges,
        table.words.len(),
        t.elapsed(),
    );
    assert_eq!(
        (compiled.v4.len(), compiled.v6.len()),
        (st.v4.merged_ranges, st.v6.merged_ranges)
    );
    for &addr in addrs {
        let country = geo.lookup(addr).map(|h| h.country);
        let value = Some(table.class(addr).geo).filter(|v| !v.is_unknown());
        for d in domains {
            for (dir, rule, mask) in [
                ("egress", &d.egress, value.map(|v| v.egress_deny)),
                ("ingress", &d.ingress, value.map(|v| v.ingress_deny)),
            ] {
                let Some(rule) = rule else { continue };
                let want = rule_denies(rule, country);
                let got = match mask {
                    Some(m) => m >> d.id & 1 == 1,
                    None => rule.unknown_country == UnknownCountry::Deny,
                };
                assert_eq!(
                    got,
                    want,
                    "{addr} ({:?}), domain {} {dir}: compiled {value:?}",
                    country.map(|c| String::from_utf8_lossy(&c).into_owned()),
                    d.id
                );
            }
        }
    }
    addrs.len()
}

fn policies() -> [(&'static str, Vec<DomainGeo>); 2] {
    [
        (
            "allow-list",
            vec![
                DomainGeo {
                    id: 1,
                    egress: allow(&["DE", "FR", "NL"], UnknownCountry::Deny),
                    ingress: None,
                },
                DomainGeo {
                    id: 5,
                    egress: None,
                    ingress: allow(&["US", "CA", "GB", "DE"], UnknownCountry::Allow),
                },
            ],
        ),
        (
            "deny-list",
            vec![
                DomainGeo {
                    id: 63,
                    egress: deny(&["CN", "RU", "KP", "IR"], UnknownCountry::Allow),
                    ingress: None,
                },
                DomainGeo {
                    id: 2,
                    egress: None,
                    ingress: deny(&["BR", "IN", "DE"], UnknownCountry::Deny),
                },
            ],
        ),
    ]
}

/// splitmix64: reproducible test addresses without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Random IPv4, random IPv6 in 2000::/3, and start/end ±1 of every `step`-th
/// network of every database (read straight from the `maxminddb` walk) and
/// of every geofeed range.
fn sample_addresses(geo: &GeoDb, random: usize, step: usize) -> Vec<IpAddr> {
    let mut rng = Rng(42);
    let mut out = Vec::new();
    for _ in 0..random {
        out.push(IpAddr::V4(Ipv4Addr::from(rng.next() as u32)));
        let v6 = (u128::from(rng.next()) << 64 | u128::from(rng.next())) >> 3 | 1u128 << 125;
        out.push(IpAddr::V6(Ipv6Addr::from(v6)));
    }
    let mut edges = |start: u128, end: u128, v4: bool| {
        for a in [start.wrapping_sub(1), start, end, end.wrapping_add(1)] {
            out.push(if v4 {
                IpAddr::V4(Ipv4Addr::from(a as u32))
            } else {
                IpAddr::V6(Ipv6Addr::from(a))
            });
        }
    };
    for source in geo.sources.iter().filter(|s| s.kind == SourceKind::Mmdb) {
        let (reader, _) = mmdb::reader_of(&source.path);
        let roots: &[&str] = if reader.metadata().ip_version == 6 {
            &["0.0.0.0/0", "::/0"]
        } else {
            &["0.0.0.0/0"]
        };
        for root in roots {
            let opts = WithinOptions::default().include_networks_without_data();
            for r in reader
                .within(root.parse().unwrap(), opts)
                .unwrap()
                .step_by(step)
            {
                let net = r.unwrap().network().unwrap();
                let (start, end, v4) = match net.ip() {
                    IpAddr::V4(a) => {
                        let size = 1u128 << (32 - net.prefix());
                        (
                            u128::from(u32::from(a)),
                            u128::from(u32::from(a)) + size - 1,
                            true,
                        )
                    }
                    IpAddr::V6(a) => {
                        let host = 128 - u32::from(net.prefix());
                        let mask = if host == 128 {
                            u128::MAX
                        } else {
                            (1u128 << host) - 1
                        };
                        (u128::from(a), u128::from(a) | mask, false)
                    }
                };
                edges(start, end, v4);
            }
        }
    }
    for (family, spans) in geo.feed.iter().enumerate() {
        for s in spans {
            edges(s.start, s.end, family == 0);
        }
    }
    for special in [
        "::ffff:8.8.8.8",
        "::8.8.8.8",
        "2002:808:808::1",
        "2001:0:808:808::1",
        "::",
        "::1",
        "0.0.0.0",
    ] {
        out.push(ip(special));
    }
    out
}

/// What the tree walk must find: the crate's own iteration over every
/// network (`within`, aliases left out), each decoded by the crate, joined
/// the same way.
fn spans_by_within(path: &Path) -> [Vec<Span<Country>>; 2] {
    let (r, schema) = mmdb::reader_of(path);
    let mut out = [Vec::new(), Vec::new()];
    let roots: &[&str] = if r.metadata().ip_version == 6 {
        &["0.0.0.0/0", "::/0"]
    } else {
        &["0.0.0.0/0"]
    };
    for (family, root) in roots.iter().enumerate() {
        for n in r
            .within(root.parse().unwrap(), WithinOptions::default())
            .unwrap()
        {
            let n = n.unwrap();
            let net = n.network().unwrap();
            let host = |bits: u32| (1u128 << (bits - u32::from(net.prefix()))) - 1;
            let (start, end) = match (family, net.ip()) {
                (0, IpAddr::V4(a)) => {
                    let a = u128::from(u32::from(a));
                    (a, a | host(32))
                }
                (0, IpAddr::V6(_)) => (0, u128::from(u32::MAX)),
                (_, IpAddr::V4(_)) => continue,
                (_, IpAddr::V6(a)) => {
                    let a = u128::from(a);
                    let h = if net.prefix() == 0 {
                        u128::MAX
                    } else {
                        host(128)
                    };
                    (a, a | h)
                }
            };
            let Some(c) = mmdb::decode_country(schema, &n).unwrap() else {
                continue;
            };
            crate::ranges::push(&mut out[family], Span { start, end, val: c });
        }
    }
    out
}

#[test]
fn geo_tree_walk_finds_what_the_reader_iterates() {
    let dir = TempDir::new().unwrap();
    let mut fixtures = vec![write(&dir, "geolite.mmdb", &geolite_fixture())];
    let mut odd = TestDb::new(6, "odd");
    odd.insert("::/64", flat("DE"))
        .insert("2a00::/16", flat("FR"));
    fixtures.push(write(&dir, "odd.mmdb", &odd.build()));
    let mut v4 = TestDb::new(4, "v4");
    v4.insert("1.0.0.0/8", flat("RU"))
        .insert("9.0.0.0/8", flat("KP"));
    fixtures.push(write(&dir, "v4.mmdb", &v4.build()));
    fixtures.extend(full_db());
    for path in &fixtures {
        let geo = load(&[path], &[]).unwrap();
        let db = &geo.dbs[0];
        let want = spans_by_within(path);
        for (family, want) in want.iter().enumerate() {
            let spans: Vec<_> = db.spans[family].iter().collect();
            assert_eq!(&spans, want, "{}: family {family}", path.display());
        }
    }
}

#[test]
fn geo_compile_matches_lookup_on_fixture() {
    let dir = TempDir::new().unwrap();
    let db = write(&dir, "db.mmdb", &geolite_fixture());
    let feed = write(
        &dir,
        "feed.csv",
        b"5.5.5.0/24,FR\n5.5.5.128/25,DE\n2a00:1:2::/48,NL\n1.0.2.0/24,CN\n",
    );
    let mut other = TestDb::new(4, "second");
    other
        .insert("1.0.0.0/8", flat("RU"))
        .insert("9.0.0.0/8", flat("KP"));
    let other = write(&dir, "second.mmdb", &other.build());
    let geo = load(&[&db, &other], &[&feed]).unwrap();
    for (name, domains) in policies() {
        println!("{name}:");
        let addrs = sample_addresses(&geo, 2000, 1);
        check_verdicts(&geo, &domains, &addrs);
    }
}

/// The real, full database. Tests that need it skip (saying why) when it is
/// missing, and fail instead when `CI` is set.
fn full_db() -> Option<PathBuf> {
    let path = match std::env::var_os("BULKHEAD_TEST_GEO_DB") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/bulkhead/geo-whois-asn-country.mmdb"),
    };
    if path.exists() {
        return Some(path);
    }
    let why = format!(
        "{} is missing: run `cargo xtask setup` (or `npm pack @ip-location-db/geo-whois-asn-country-mmdb` \
         and extract geo-whois-asn-country.mmdb there), or set BULKHEAD_GEO_DB",
        path.display()
    );
    if std::env::var_os("CI").is_some() {
        panic!("{why}");
    }
    eprintln!("skipped: {why}");
    None
}

#[test]
fn geo_full_db_compile_matches_lookup() {
    let Some(path) = full_db() else { return };
    let dir = TempDir::new().unwrap();
    let feed = write(
        &dir,
        "feed.csv",
        b"8.8.0.0/16,KP\n8.8.8.0/24,DE\n1.1.1.1,NL\n10.0.0.0/8,FR\n\
          2001:4860::/32,FR\n2001:4860:4860::/48,CN\nfd00::/8,NL\n",
    );
    let t = Instant::now();
    let plain = load(&[&path], &[]).unwrap();
    println!("load {:?}: {:?}", t.elapsed(), plain.sources()[0]);
    let db = &plain.dbs[0];
    println!(
        "networks read: IPv4 {}, IPv6 {}; kept as {} + {} country ranges",
        db.records[0],
        db.records[1],
        db.spans[0].len(),
        db.spans[1].len()
    );
    let with_feed = load(&[&path], &[&feed]).unwrap();
    assert_eq!(with_feed.lookup(ip("8.8.8.8")).map(|h| h.source), Some(1));
    assert_eq!(
        with_feed.lookup(ip("8.8.4.4")).map(|h| h.country),
        Some(*b"KP")
    );

    let mut checked = 0;
    for (name, geo) in [("database", &plain), ("database + geofeed", &with_feed)] {
        let addrs = sample_addresses(geo, 10_000, 250);
        for (policy, domains) in policies() {
            println!("{name}, {policy}:");
            checked += check_verdicts(geo, &domains, &addrs);
        }
    }
    println!("checked {checked} address verdicts");

    let whole = std::fs::read(&path).unwrap();
    let cut = write(&dir, "cut.mmdb", &whole[..whole.len() - 100]);
    let err = load(&[&cut], &[]).err().unwrap().to_string();
    println!("{err}");
    assert!(
        err.starts_with(&format!("{}: not a MaxMind DB: ", cut.display())),
        "{err}"
    );
    assert!(checked >= 4 * 20_000, "{checked}");
}
