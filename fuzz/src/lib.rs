//! What the fuzz targets share: a scratch directory for the files the
//! agent's loaders read, a small cgroup tree, a reference geo source and
//! country rules to compile against.
//!
//! Every target must be deterministic for a given input, so nothing here
//! depends on time or on what earlier inputs did.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
};

use bulkhead_policy::{
    geo::{DomainGeo, GeoDb},
    policy::{CountryList, GeoRule, GeoSources, UnknownCountry},
};

/// A directory of this process's own (fuzzers may run several processes).
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("bulkhead-fuzz-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("creating the scratch directory");
        dir
    })
}

/// Writes `data` to `name` in the scratch directory (the loaders take paths).
pub fn write(name: &str, data: &[u8]) -> PathBuf {
    let path = scratch().join(name);
    fs::write(&path, data).expect("writing a scratch file");
    path
}

/// A cgroup v2 tree stand-in (plain directories) for pattern resolution.
pub fn cgroup_mount() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = scratch().join("cgroup");
        for p in [
            "contractors.slice/job-1.scope",
            "core.slice",
            "prod.slice/api.service",
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podcontractor_1.slice",
            "system.slice/sshd.service",
        ] {
            fs::create_dir_all(root.join(p)).expect("creating the cgroup tree");
        }
        root
    })
}

/// A geofeed-backed source that places a few ranges (IPv4 and IPv6).
pub fn reference_geo() -> Arc<GeoDb> {
    static GEO: OnceLock<Arc<GeoDb>> = OnceLock::new();
    GEO.get_or_init(|| {
        let feed = write(
            "reference-geofeed.csv",
            b"10.0.0.0/8,DE\n10.20.0.0/16,FR\n192.0.2.0/24,NL\n198.51.100.0/24,KP\n\
              2001:db8::/32,DE\n2001:db8:20::/48,IR\n",
        );
        let sources = GeoSources {
            databases: Vec::new(),
            geofeeds: vec![feed],
        };
        Arc::new(GeoDb::load(&sources).expect("the reference geofeed loads"))
    })
    .clone()
}

/// Country rules of three domains: an allow list, a deny list, both sides.
pub fn geo_rules() -> Vec<DomainGeo> {
    let rule = |countries, unknown_country| GeoRule {
        countries,
        unknown_country,
    };
    vec![
        DomainGeo {
            id: 1,
            egress: Some(rule(
                CountryList::Allow(vec![*b"DE", *b"FR", *b"NL"]),
                UnknownCountry::Deny,
            )),
            ingress: None,
        },
        DomainGeo {
            id: 2,
            egress: None,
            ingress: Some(rule(
                CountryList::Deny(vec![*b"KP", *b"IR"]),
                UnknownCountry::Allow,
            )),
        },
        DomainGeo {
            id: 63,
            egress: Some(rule(CountryList::Deny(vec![*b"US"]), UnknownCountry::Allow)),
            ingress: Some(rule(CountryList::Allow(vec![*b"DE"]), UnknownCountry::Deny)),
        },
    ]
}

/// Addresses to look up: fixed edge cases plus some taken from the input.
pub fn probe_addrs(data: &[u8]) -> Vec<IpAddr> {
    let mut out = vec![
        IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V4(Ipv4Addr::BROADCAST),
        IpAddr::V4(Ipv4Addr::new(10, 20, 1, 1)),
        IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        IpAddr::V6(Ipv6Addr::from(u128::MAX)),
        "::ffff:10.20.1.1".parse().expect("literal"),
        "2001:db8:20::1".parse().expect("literal"),
        "2002:c000:0201::1".parse().expect("literal"),
    ];
    for chunk in data.chunks(16).take(8) {
        let mut b = [0u8; 16];
        b[..chunk.len()].copy_from_slice(chunk);
        out.push(IpAddr::V6(Ipv6Addr::from(b)));
        out.push(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])));
    }
    out
}

/// Loads `sources` like the agent does and, when that works, uses the
/// result the ways the agent does: lookups and compiling country rules.
/// Loading may fail (bad input is expected); it must never panic.
pub fn load_and_use(sources: &GeoSources, data: &[u8]) {
    let Ok(geo) = GeoDb::load(sources) else {
        return;
    };
    for ip in probe_addrs(data) {
        if let Some(hit) = geo.lookup(ip) {
            assert!(
                hit.source < geo.sources().len(),
                "a lookup names a source that does not exist"
            );
        }
    }
    let compiled = geo.compile(&geo_rules());
    for (spans, top) in [
        (&compiled.v4, u128::from(u32::MAX)),
        (&compiled.v6, u128::MAX),
    ] {
        for s in spans.iter() {
            assert!(
                s.start <= s.end && s.end <= top,
                "a span outside its family"
            );
            assert!(
                usize::from(s.val) < compiled.values.len(),
                "a span names a verdict that does not exist"
            );
        }
        // The address table is built from these: sorted and disjoint.
        assert!(
            spans.windows(2).all(|w| w[0].end < w[1].start),
            "spans overlap or are unsorted"
        );
    }
}
