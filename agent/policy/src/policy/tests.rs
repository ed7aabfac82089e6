//! Policy files as a user writes them, and the messages they get back.

use std::path::Path;

use super::*;

/// The example from DESIGN.md, with every field used.
const FULL: &str = r#"version: 1
mode: audit
geo:
  databases: [/var/lib/bulkhead/GeoLite2-Country.mmdb]
  geofeeds: [/etc/bulkhead/geofeed.csv]
domains:
  contractor-staging:
    cgroups: ["/contractors.slice", "/kubepods.slice/*contractor*"]
    networks: [10.20.0.0/16, "fd00:20::/48"]
    expires: 2027-03-31T00:00:00Z
    egress:  { countries: { allow: [DE, FR, NL] }, unknown_country: deny }
    ingress: { countries: { deny: [KP, IR] } }
    audit: all
    allow_raw_sockets: true
  core-staging: { cgroups: ["/core.slice"], networks: [10.30.0.0/16] }
bridges:
  - name: contractor-ci-to-artifacts
    from: contractor-staging
    to: core-staging
    ports: [tcp/443, udp/53, tcp/8000-8100]
    not_before: 2026-12-01T00:00:00Z
    expires:    2026-12-15T00:00:00Z
    reason: "TICKET-123 artifact upload"
"#;

/// Two domains `a` and `b` and nothing else; tests append to it.
const TWO: &str = "version: 1
domains:
  a: { cgroups: [/a], networks: [10.1.0.0/16] }
  b: { cgroups: [/b], networks: [10.2.0.0/16] }
";

const SEC: i64 = 1_000_000_000;

fn parse(text: &str) -> Result<Policy, Diagnostics> {
    parse_str(Path::new("p.yaml"), text)
}

/// The problems as `line:col: message`, without the file name.
fn problems(text: &str) -> Vec<String> {
    match parse(text) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(d) => {
            d.0.iter()
                .map(|d| format!("{}:{}: {}", d.line, d.col, d.message))
                .collect()
        }
    }
}

/// Asserts that `text` is rejected with exactly one problem, at `at`
/// (`line:col`), whose message contains `needle`.
#[track_caller]
fn rejects(text: &str, at: &str, needle: &str) {
    let found = problems(text);
    assert_eq!(found.len(), 1, "expected one problem, got {found:#?}");
    let (pos, message) = found[0].split_once(": ").unwrap();
    assert_eq!(pos, at, "{}", found[0]);
    assert!(message.contains(needle), "{message:?} lacks {needle:?}");
}

#[test]
fn full_policy_round_trip() {
    let p = parse(FULL).unwrap();
    let expected = Policy {
        jit_bridges: Vec::new(),
        path: "p.yaml".into(),
        sha256: p.sha256.clone(),
        version: 1,
        mode: Mode::Audit,
        geo: GeoSources {
            databases: vec!["/var/lib/bulkhead/GeoLite2-Country.mmdb".into()],
            geofeeds: vec!["/etc/bulkhead/geofeed.csv".into()],
        },
        domains: vec![
            Domain {
                name: "contractor-staging".into(),
                cgroups: vec![
                    "/contractors.slice".into(),
                    "/kubepods.slice/*contractor*".into(),
                ],
                pods: Vec::new(),
                networks: vec![
                    "10.20.0.0/16".parse().unwrap(),
                    "fd00:20::/48".parse().unwrap(),
                ],
                expires: Some(1_806_451_200 * SEC),
                egress: Some(GeoRule {
                    countries: CountryList::Allow(vec![*b"DE", *b"FR", *b"NL"]),
                    unknown_country: UnknownCountry::Deny,
                }),
                ingress: Some(GeoRule {
                    countries: CountryList::Deny(vec![*b"KP", *b"IR"]),
                    unknown_country: UnknownCountry::Allow,
                }),
                audit: AuditLevel::All,
                allow_raw_sockets: true,
                names: None,
                dns: None,
            },
            Domain {
                name: "core-staging".into(),
                cgroups: vec!["/core.slice".into()],
                pods: Vec::new(),
                networks: vec!["10.30.0.0/16".parse().unwrap()],
                expires: None,
                egress: None,
                ingress: None,
                audit: AuditLevel::Deny,
                allow_raw_sockets: false,
                names: None,
                dns: None,
            },
        ],
        bridges: vec![Bridge {
            name: "contractor-ci-to-artifacts".into(),
            from: 0,
            to: 1,
            ports: vec![
                PortRange {
                    proto: Proto::Tcp,
                    lo: 443,
                    hi: 443,
                },
                PortRange {
                    proto: Proto::Udp,
                    lo: 53,
                    hi: 53,
                },
                PortRange {
                    proto: Proto::Tcp,
                    lo: 8000,
                    hi: 8100,
                },
            ],
            not_before: Some(1_796_083_200 * SEC),
            expires: Some(1_797_292_800 * SEC),
            reason: "TICKET-123 artifact upload".into(),
        }],
    };
    assert_eq!(p, expected);
    assert_eq!(p.domain_id("core-staging"), Some(2));
}

#[test]
fn load_reads_the_file_and_hashes_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.yaml");
    std::fs::write(&path, "version: 1\ndomains: {}\n").unwrap();
    let p = load(&path).unwrap();
    assert_eq!(p.path, path);
    // `printf 'version: 1\ndomains: {}\n' | sha256sum`
    assert_eq!(
        p.sha256,
        "0621714c08617726e4bffa31bdaa919732d5856f62f33afe2d5e69800c94c234"
    );
    assert!(p.domains.is_empty() && p.bridges.is_empty());
}

#[test]
fn load_of_a_missing_file_names_the_file() {
    let err = load(Path::new("/nonexistent/policy.yaml")).unwrap_err();
    assert_eq!(err.0.len(), 1);
    assert_eq!(err.0[0].line, 0);
    let text = err.to_string();
    assert!(
        text.starts_with("/nonexistent/policy.yaml: cannot read policy: "),
        "{text}"
    );
}

#[test]
fn defaults() {
    let p = parse(
        "version: 1
domains:
  a:
    cgroups: [/a]
    egress: { countries: { deny: [NO] } }
    ingress: { countries: { allow: [NO] } }
",
    )
    .unwrap();
    assert_eq!(p.mode, Mode::Enforce);
    assert_eq!(p.geo, GeoSources::default());
    let a = &p.domains[0];
    assert!(a.networks.is_empty() && a.expires.is_none());
    assert_eq!(a.audit, AuditLevel::Deny);
    assert!(!a.allow_raw_sockets);
    // `NO` is Norway, not the YAML 1.1 boolean.
    let egress = a.egress.as_ref().unwrap();
    assert_eq!(egress.countries, CountryList::Deny(vec![*b"NO"]));
    assert_eq!(egress.unknown_country, UnknownCountry::Allow);
    assert_eq!(
        a.ingress.as_ref().unwrap().unknown_country,
        UnknownCountry::Deny
    );
}

#[test]
fn optional_fields_may_be_empty() {
    let p = parse(&format!(
        "{TWO}bridges:\n  - {{ name: x, from: a, to: b, ports: [tcp/1], reason: r, expires: }}\n"
    ));
    assert_eq!(p.unwrap().bridges[0].expires, None);
}

#[test]
fn aliases_and_merge_keys_work() {
    let p = parse(
        "version: 1
domains:
  a: { cgroups: [/a], egress: &eu { countries: { allow: [DE, FR] } } }
  b: { cgroups: [/b], egress: *eu }
",
    )
    .unwrap();
    assert_eq!(p.domains[0].egress, p.domains[1].egress);
}

// ---- Syntax ----

#[test]
fn syntax_error() {
    rejects("version: 1\ndomains: [\n", "2:10", "unclosed bracket");
    rejects(
        "version: 1\n domains: {}\n",
        "2:9",
        "mapping values are not allowed",
    );
}

#[test]
fn not_utf8() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.yaml");
    std::fs::write(&path, b"version: 1\nmode: \xc3\xa9\xff\n").unwrap();
    let err = load(&path).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("{}:2:8: the file is not valid UTF-8", path.display())
    );
}

#[test]
fn empty_and_multi_document_files() {
    rejects("", "1:1", "the policy is empty");
    rejects("# nothing\n", "1:1", "the policy is empty");
    rejects(
        "version: 1\ndomains: {}\n---\nversion: 1\n",
        "4:1",
        "one YAML document",
    );
    rejects(
        "- version: 1\n",
        "1:1",
        "the policy: expected a mapping, found a list",
    );
}

// ---- Keys, types, required fields ----

#[test]
fn unknown_keys_anywhere() {
    rejects(
        "version: 1\ndomains: {}\nmodes: audit\n",
        "3:1",
        "unknown key `modes` in the policy",
    );
    rejects(
        &format!("{TWO}geo: {{ database: [] }}\n"),
        "5:8",
        "unknown key `database` in `geo`",
    );
    rejects(
        "version: 1\ndomains:\n  a: { cgroups: [/a], network: [] }\n",
        "3:23",
        "unknown key `network` in domain `a` (expected `cgroups`, `pods`, `networks`",
    );
    rejects(
        "version: 1\ndomains:\n  a: { cgroups: [/a], egress: { countries: { allow: [DE] }, unknown: deny } }\n",
        "3:61",
        "unknown key `unknown` in `egress`",
    );
    rejects(
        "version: 1\ndomains:\n  a: { cgroups: [/a], egress: { countries: { allow: [DE], block: [FR] } } }\n",
        "3:59",
        "unknown key `block` in `countries`",
    );
    rejects(
        &format!(
            "{TWO}bridges:\n  - {{ name: x, from: a, to: b, ports: [tcp/1], reason: r, until: 2027-01-01T00:00:00Z }}\n"
        ),
        "6:59",
        "unknown key `until` in a bridge",
    );
}

#[test]
fn wrong_types() {
    rejects(
        "version: \"1\"\ndomains: {}\n",
        "1:10",
        "`version`: expected the number 1, found a string",
    );
    rejects(
        "version: 1\ndomains: []\n",
        "2:10",
        "`domains`: expected a mapping of domain names to domains, found a list",
    );
    rejects(
        "version: 1\nmode: 1\ndomains: {}\n",
        "2:7",
        "`mode`: expected a string, found a number",
    );
    rejects(
        "version: 1\nmode: block\ndomains: {}\n",
        "2:7",
        "`mode` must be enforce or audit, not `block`",
    );
    rejects(
        "version: 1\ndomains:\n  a: { cgroups: /a }\n",
        "3:17",
        "`cgroups`: expected a list, found a string",
    );
    rejects(
        "version: 1\ndomains:\n  a: { cgroups: [/a], networks: 10.0.0.0/8 }\n",
        "3:33",
        "`networks`: expected a list, found a string",
    );
    rejects(
        "version: 1\ndomains:\n  a: { cgroups: [/a], allow_raw_sockets: yes }\n",
        "3:42",
        "`allow_raw_sockets`: expected true or false, found a string",
    );
    rejects(
        "version: 1\ndomains:\n  a: { cgroups: [/a], audit: [all] }\n",
        "3:30",
        "`audit`: expected a string, found a list",
    );
    rejects(
        "version: 1\ndomains:\n  a: [/a]\n",
        "3:6",
        "domain `a`: expected a mapping, found a list",
    );
    rejects(
        "version: 1\ndomains:\n  7: { cgroups: [/a] }\n",
        "3:3",
        "domain name must be a string, not a number",
    );
    rejects(
        &format!("{TWO}bridges: {{}}\n"),
        "5:10",
        "`bridges`: expected a list of bridges, found a mapping",
    );
    rejects(
        &format!("{TWO}bridges:\n  - {{ name: x, from: a, to: b, ports: [1.5], reason: r }}\n"),
        "6:40",
        "`ports` item: expected a string",
    );
}

#[test]
fn missing_required_fields() {
    rejects("domains: {}\n", "1:1", "missing required field `version`");
    rejects("version: 1\n", "1:1", "missing required field `domains`");
    rejects(
        "version: 1\ndomains:\n  a: { cgroups: [/a], egress: { unknown_country: deny } }\n",
        "3:31",
        "missing required field `countries`",
    );
    let all = ["name: x", "from: a", "to: b", "ports: [tcp/1]", "reason: r"];
    for missing in all {
        let fields: Vec<&str> = all.into_iter().filter(|f| *f != missing).collect();
        let text = format!("{TWO}bridges:\n  - {{ {} }}\n", fields.join(", "));
        let field = missing.split(':').next().unwrap();
        rejects(&text, "6:5", &format!("missing required field `{field}`"));
    }
}

#[test]
fn version_must_be_1() {
    rejects(
        "version: 2\ndomains: {}\n",
        "1:10",
        "unsupported `version: 2`",
    );
}

#[test]
fn duplicate_keys() {
    rejects(
        "version: 1\ndomains:\n  a: { cgroups: [/a] }\n  a: { cgroups: [/b] }\n",
        "4:3",
        "duplicate domain `a` (first defined at 3:3)",
    );
    rejects(
        "version: 1\nversion: 1\ndomains: {}\n",
        "2:1",
        "duplicate key `version` (first at 1:1)",
    );
    rejects(
        "version: 1\ndomains:\n  a: { cgroups: [/a], audit: all, audit: deny }\n",
        "3:35",
        "duplicate key `audit` (first at 3:23)",
    );
}

// ---- Domains ----

#[test]
fn domain_names() {
    rejects(
        "version: 1\ndomains:\n  Prod: { cgroups: [/a] }\n",
        "3:3",
        "domain name `Prod` must match [a-z0-9][a-z0-9._-]*",
    );
    let long = "x".repeat(64);
    rejects(
        &format!("version: 1\ndomains:\n  {long}: {{ cgroups: [/a] }}\n"),
        "3:3",
        "is longer than 63 characters",
    );
    let ok = "x".repeat(63);
    parse(&format!(
        "version: 1\ndomains:\n  {ok}: {{ cgroups: [/a] }}\n"
    ))
    .unwrap();
}

#[test]
fn domain_without_cgroups() {
    rejects(
        "version: 1\ndomains:\n  a: { networks: [10.0.0.0/8] }\n",
        "3:3",
        "domain `a` has no `cgroups`",
    );
    rejects(
        "version: 1\ndomains:\n  a: { cgroups: [] }\n",
        "3:17",
        "domain `a` has no `cgroups`",
    );
}

#[test]
fn at_most_63_domains() {
    let domains = |n: usize| -> String {
        let mut text = String::from("version: 1\ndomains:\n");
        for i in 0..n {
            text.push_str(&format!("  d{i}: {{ cgroups: [/d{i}] }}\n"));
        }
        text
    };
    assert_eq!(parse(&domains(63)).unwrap().domains.len(), 63);
    rejects(
        &domains(64),
        "66:3",
        "too many domains: the kernel supports at most 63",
    );
}

#[test]
fn bad_networks() {
    let domain =
        |net: &str| format!("version: 1\ndomains:\n  a: {{ cgroups: [/a], networks: [{net}] }}\n");
    rejects(
        &domain("10.0.0.1/8"),
        "3:34",
        "`10.0.0.1/8` has host bits set, did you mean 10.0.0.0/8",
    );
    rejects(
        &domain("10.0.0.0/33"),
        "3:34",
        "invalid network `10.0.0.0/33`",
    );
    rejects(
        &domain("10.0.0.1"),
        "3:34",
        "write `10.0.0.1/32` for one host",
    );
    rejects(&domain("\"fd00::1/8\""), "3:34", "did you mean fd00::/8");
}

#[test]
fn networks_of_two_domains_must_not_overlap() {
    rejects(
        "version: 1
domains:
  a: { cgroups: [/a], networks: [10.0.0.0/8, 10.1.0.0/16] }
  b: { cgroups: [/b], networks: [192.168.0.0/16, 10.20.0.0/16] }
",
        "4:50",
        "network `10.20.0.0/16` of domain `b` overlaps `10.0.0.0/8` of domain `a` (at 3:34)",
    );
    rejects(
        "version: 1
domains:
  a: { cgroups: [/a], networks: [\"fd00:20:0:1::/64\"] }
  b: { cgroups: [/b], networks: [\"fd00:20::/48\"] }
",
        "4:34",
        "network `fd00:20::/48` of domain `b` overlaps `fd00:20:0:1::/64` of domain `a`",
    );
    // Within one domain an overlap is harmless; across families nothing overlaps.
    parse("version: 1\ndomains:\n  a: { cgroups: [/a], networks: [0.0.0.0/0, \"::/0\", 10.0.0.0/8] }\n").unwrap();
}

/// Domains `a` and `b` with these `networks` (the list's insides).
fn two_networks(a: &str, b: &str) -> String {
    format!(
        "version: 1\ndomains:\n  a: {{ cgroups: [/a], networks: [{a}] }}\n  b: {{ cgroups: [/b], networks: [{b}] }}\n"
    )
}

/// The kernel decides an IPv4-mapped destination (`::ffff:a.b.c.d`) as the
/// IPv4 address it embeds, so a mapped network claims IPv4 addresses.
#[test]
fn ipv4_mapped_networks_overlap_ipv4_ones() {
    rejects(
        &two_networks("10.40.0.0/16", "\"::ffff:10.40.0.0/120\""),
        "4:34",
        "network `::ffff:10.40.0.0/120` (IPv4-mapped: 10.40.0.0/24) of domain `b` overlaps `10.40.0.0/16` of domain `a` (at 3:34)",
    );
    rejects(
        &two_networks("\"::ffff:10.40.0.0/120\"", "10.40.0.0/16"),
        "4:34",
        "network `10.40.0.0/16` of domain `b` overlaps `::ffff:10.40.0.0/120` (IPv4-mapped: 10.40.0.0/24) of domain `a` (at 3:34)",
    );
    // The mapped network may be the larger one.
    rejects(
        &two_networks("\"::ffff:10.0.0.0/104\"", "10.40.0.0/16"),
        "4:34",
        "network `10.40.0.0/16` of domain `b` overlaps `::ffff:10.0.0.0/104` (IPv4-mapped: 10.0.0.0/8) of domain `a` (at 3:34)",
    );
    rejects(
        &two_networks("\"::ffff:10.40.0.0/112\"", "\"::ffff:10.40.1.0/120\""),
        "4:34",
        "network `::ffff:10.40.1.0/120` (IPv4-mapped: 10.40.1.0/24) of domain `b` overlaps `::ffff:10.40.0.0/112` (IPv4-mapped: 10.40.0.0/16) of domain `a` (at 3:34)",
    );
}

/// An IPv6 network around `::ffff:0:0/96` holds every mapped address, so
/// it claims all of IPv4 as well.
#[test]
fn ipv6_networks_holding_the_mapped_range_overlap_all_ipv4_ones() {
    rejects(
        &two_networks("\"::/0\"", "10.40.0.0/16"),
        "4:34",
        "network `10.40.0.0/16` of domain `b` overlaps `::/0` (holds all IPv4-mapped addresses, decided as IPv4: 0.0.0.0/0) of domain `a` (at 3:34)",
    );
    rejects(
        &two_networks("10.40.0.0/16", "\"::fffe:0:0/95\""),
        "4:34",
        "network `::fffe:0:0/95` (holds all IPv4-mapped addresses, decided as IPv4: 0.0.0.0/0) of domain `b` overlaps `10.40.0.0/16` of domain `a` (at 3:34)",
    );
    // Overlapping as IPv6 already: reported once, as IPv6.
    rejects(
        &two_networks("\"::/0\"", "\"::/64\""),
        "4:34",
        "network `::/64` of domain `b` overlaps `::/0` of domain `a` (at 3:34)",
    );
    // Networks beside the mapped range (`::/96` is IPv4-compatible) are
    // decided as IPv6.
    parse(&two_networks(
        "\"::/96\", \"::fffe:0:0/96\"",
        "10.40.0.0/16",
    ))
    .unwrap();
    parse(&two_networks("10.40.0.0/16", "\"::/81\"")).unwrap();
}

#[test]
fn ipv4_mapped_networks_apart_from_other_domains_are_accepted() {
    parse(&two_networks("\"::ffff:10.40.0.0/112\"", "10.41.0.0/16")).unwrap();
    parse(&two_networks("10.41.0.0/16", "\"::ffff:10.40.0.0/112\"")).unwrap();
    // Within one domain an overlap is harmless, mapped or not.
    let p = parse(&two_networks(
        "10.40.0.0/16, \"::ffff:10.40.0.0/120\"",
        "\"::ffff:10.41.0.0/112\", 10.41.0.0/16",
    ))
    .unwrap();
    // Kept as written: the compiler places mapped networks as IPv4.
    assert_eq!(
        p.domains[0].networks[1],
        "::ffff:10.40.0.0/120".parse().unwrap()
    );
}

#[test]
fn bad_cgroups() {
    let domain =
        |cg: &str| format!("version: 1\ndomains:\n  a: {{ cgroups: [\"/ok\", \"{cg}\"] }}\n");
    rejects(
        &domain("a.slice"),
        "3:25",
        "cgroup `a.slice` must be an absolute path",
    );
    rejects(&domain("/a/../b"), "3:25", "must not contain `..`");
    rejects(&domain("/a//b"), "3:25", "empty path segment");
    rejects(&domain("/a/"), "3:25", "empty path segment");
    rejects(&domain("/"), "3:25", "root cgroup");
}

#[test]
fn cgroups_of_two_domains_must_not_claim_one_cgroup() {
    let two = |a: &str, b: &str| {
        format!(
            "version: 1\ndomains:\n  a: {{ cgroups: [\"{a}\"] }}\n  b: {{ cgroups: [\"{b}\"] }}\n"
        )
    };
    rejects(
        &two("/x.slice", "/x.slice"),
        "4:18",
        "cgroup `/x.slice` of domain `b` can match the same cgroup as `/x.slice` of domain `a` (at 3:18)",
    );
    rejects(
        &two("/k/*contractor*", "/k/*-staging"),
        "4:18",
        "can match the same cgroup",
    );
    // Nested: the nearest configured ancestor decides, no conflict.
    parse(&two("/k", "/k/*")).unwrap();
    parse(&two("/k/*a", "/k/*b")).unwrap();
    // The same domain may list overlapping patterns.
    parse("version: 1\ndomains:\n  a: { cgroups: [/k, /k, \"/*\"] }\n").unwrap();
}

#[test]
fn countries() {
    let egress = |c: &str| {
        format!("version: 1\ndomains:\n  a: {{ cgroups: [/a], egress: {{ countries: {c} }} }}\n")
    };
    rejects(
        &egress("{ allow: [DE, EU] }"),
        "3:58",
        "unknown country code `EU`",
    );
    rejects(
        &egress("{ allow: [DE, UK] }"),
        "3:58",
        "unknown country code `UK`",
    );
    rejects(
        &egress("{ deny: [de] }"),
        "3:53",
        "country codes are upper case: `DE`, not `de`",
    );
    rejects(&egress("{ deny: [] }"), "3:52", "empty country list");
    rejects(
        &egress("{ allow: [DE], deny: [FR] }"),
        "3:44",
        "either `allow` or `deny`, not both",
    );
    rejects(&egress("{}"), "3:44", "needs an `allow` or a `deny` list");
    rejects(
        &egress("[DE]"),
        "3:44",
        "`countries`: expected a mapping, found a list",
    );
    let p = parse(&egress("{ allow: [XK, SS] }")).unwrap();
    assert_eq!(
        p.domains[0].egress.as_ref().unwrap().countries,
        CountryList::Allow(vec![*b"XK", *b"SS"])
    );
}

#[test]
fn names_and_resolvers() {
    let d = |egress: &str, dns: &str| {
        format!("version: 1\ndomains:\n  a: {{ cgroups: [/a], egress: {egress}{dns} }}\n")
    };
    let dns = ", dns: { resolvers: [10.0.0.53, \"fd00::53\"] }";
    let p = parse(&d(
        "{ names: { allow: [API.GitHub.com., \"*.pkg.dev\"] } }",
        dns,
    ))
    .unwrap();
    let a = &p.domains[0];
    assert_eq!(
        a.names,
        Some(NameList::Allow(vec![
            "api.github.com".into(),
            "*.pkg.dev".into()
        ]))
    );
    assert_eq!(a.egress, None, "names alone: no country rule");
    let dns_of = a.dns.as_ref().unwrap();
    assert_eq!(dns_of.resolvers.len(), 2);
    assert_eq!(
        (dns_of.min_ttl, dns_of.max_ttl),
        (Dns::DEFAULT_MIN_TTL, Dns::DEFAULT_MAX_TTL)
    );
    // Names and countries together.
    let both = parse(&d(
        "{ names: { deny: [x.example] }, countries: { allow: [DE] } }",
        dns,
    ))
    .unwrap();
    assert!(both.domains[0].egress.is_some());
    assert_eq!(
        both.domains[0].names,
        Some(NameList::Deny(vec!["x.example".into()]))
    );

    rejects(
        &d("{ names: { allow: [a.example] } }", ""),
        "3:31",
        "`egress.names` needs `dns: { resolvers: [...] }`",
    );
    rejects(
        &d("{ names: { allow: [\"a.*.example\"] } }", dns),
        "3:50",
        "invalid name `a.*.example`: `*` stands only as the first label",
    );
    rejects(
        &d("{ names: { allow: [a..example] } }", dns),
        "3:50",
        "invalid name `a..example`",
    );
    rejects(
        &d("{ names: { allow: [a.example, A.example.] } }", dns),
        "3:61",
        "`a.example` is listed twice",
    );
    rejects(
        &d("{ names: { allow: [], deny: [b] } }", dns),
        "3:40",
        "either `allow` or `deny`, not both",
    );
    rejects(
        &d(
            "{ names: { allow: [a.example] } }",
            ", dns: { resolvers: [dns.example] }",
        ),
        "3:85",
        "invalid resolver `dns.example`",
    );
    rejects(
        &d(
            "{ names: { allow: [a.example] } }",
            ", dns: { resolvers: [10.0.0.53], min_ttl: 2h, max_ttl: 1h }",
        ),
        "3:71",
        "`min_ttl` is longer than `max_ttl`",
    );
    let long = (0..17).map(|_| "a").collect::<Vec<_>>().join(".");
    rejects(
        &d(&format!("{{ names: {{ deny: [{long}] }} }}"), dns),
        "3:49",
        "more than 16 labels",
    );
}

#[test]
fn unknown_country_choice() {
    rejects(
        "version: 1\ndomains:\n  a: { cgroups: [/a], egress: { countries: { deny: [KP] }, unknown_country: maybe } }\n",
        "3:77",
        "`unknown_country` must be allow or deny, not `maybe`",
    );
}

#[test]
fn bad_times() {
    rejects(
        "version: 1\ndomains:\n  a: { cgroups: [/a], expires: 2027-03-31 }\n",
        "3:32",
        "`expires`: invalid time `2027-03-31`",
    );
    rejects(
        "version: 1\ndomains:\n  a: { cgroups: [/a], expires: 2027 }\n",
        "3:32",
        "`expires`: expected an RFC 3339 time",
    );
    rejects(
        "version: 1\ndomains:\n  a: { cgroups: [/a], expires: 2027-02-30T00:00:00Z }\n",
        "3:32",
        "invalid time `2027-02-30T00:00:00Z`",
    );
}

// ---- Bridges ----

/// `TWO` plus one bridge from a to b with the given extra fields.
fn bridge(extra: &str) -> String {
    format!("{TWO}bridges:\n  - {{ name: x, from: a, to: b, reason: r, {extra} }}\n")
}

#[test]
fn bad_ports() {
    let with = |p: &str| bridge(&format!("ports: [tcp/1, {p}]"));
    rejects(
        &with("tcp/0"),
        "6:58",
        "port 0 in `tcp/0` is not a real port",
    );
    rejects(
        &with("tcp/70000"),
        "6:58",
        "port 70000 in `tcp/70000` is out of range",
    );
    rejects(&with("sctp/1"), "6:58", "unknown protocol `sctp`");
    rejects(&with("tcp/9-3"), "6:58", "reversed port range in `tcp/9-3`");
    rejects(
        &with("443"),
        "6:58",
        "port `443` needs a protocol, e.g. tcp/443",
    );
    rejects(&with("tcp/http"), "6:58", "invalid port `http`");
    rejects(&bridge("ports: []"), "6:50", "empty `ports` list");
}

#[test]
fn bridge_ends() {
    rejects(
        &format!("{TWO}bridges:\n  - {{ name: x, from: c, to: b, ports: [tcp/1], reason: r }}\n"),
        "6:22",
        "unknown domain `c` in `from`",
    );
    rejects(
        &format!(
            "{TWO}bridges:\n  - {{ name: x, from: a, to: core, ports: [tcp/1], reason: r }}\n"
        ),
        "6:29",
        "unknown domain `core` in `to`",
    );
    rejects(
        &format!("{TWO}bridges:\n  - {{ name: x, from: a, to: a, ports: [tcp/1], reason: r }}\n"),
        "6:29",
        "bridge from `a` to itself",
    );
}

#[test]
fn bridge_window() {
    let window = |start: &str, end: &str| {
        bridge(&format!(
            "ports: [tcp/1], not_before: {start}, expires: {end}"
        ))
    };
    rejects(
        &window("2026-12-15T00:00:00Z", "2026-12-01T00:00:00Z"),
        "6:102",
        "`expires` must be after `not_before`",
    );
    rejects(
        &window("2026-12-15T00:00:00Z", "2026-12-15T00:00:00Z"),
        "6:102",
        "`expires` must be after `not_before`",
    );
    rejects(
        &window("2026-12-15T00:00:00Z", "soon"),
        "6:102",
        "`expires`: invalid time `soon`",
    );
    rejects(
        &window("yesterday", "2026-12-15T00:00:00Z"),
        "6:71",
        "`not_before`: invalid time `yesterday`",
    );
    parse(&window("2026-12-15T00:00:00Z", "2026-12-15T00:00:01Z")).unwrap();
}

#[test]
fn bridge_names_and_reasons() {
    rejects(
        &format!(
            "{TWO}bridges:
  - {{ name: x, from: a, to: b, ports: [tcp/1], reason: r }}
  - {{ name: x, from: b, to: a, ports: [tcp/1], reason: r }}
"
        ),
        "7:13",
        "duplicate bridge name `x` (first at 6:13)",
    );
    rejects(
        &format!(
            "{TWO}bridges:\n  - {{ name: x, from: a, to: b, ports: [tcp/1], reason: \"  \" }}\n"
        ),
        "6:56",
        "empty `reason`",
    );
}

#[test]
fn at_most_16_port_ranges_per_domain_pair() {
    let ports = |n: u16| {
        (1..=n)
            .map(|p| format!("tcp/{p}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let text = |first: u16, second: u16, back: u16| {
        format!(
            "{TWO}bridges:
  - {{ name: x, from: a, to: b, reason: r, ports: [{}] }}
  - {{ name: y, from: a, to: b, reason: r, ports: [{}] }}
  - {{ name: z, from: b, to: a, reason: r, ports: [{}] }}
",
            ports(first),
            ports(second),
            ports(back)
        )
    };
    // 16 per direction is the limit; the other direction is another pair.
    parse(&text(10, 6, 16)).unwrap();
    rejects(
        &text(10, 7, 1),
        "7:50",
        "bridges from `a` to `b` have 17 port ranges in total; the kernel holds at most 16 per domain pair",
    );
}

#[test]
fn block_style_positions() {
    let text = format!(
        "{TWO}bridges:
  - name: x
    from: a
    to: b
    ports:
      - tcp/443
      - tcp/99999
  - from: b
    to: a
    ports: [udp/53]
"
    );
    let found = problems(&text);
    assert_eq!(
        found,
        [
            "6:5: missing required field `reason`",
            "11:9: port 99999 in `tcp/99999` is out of range (ports are 1-65535)",
            "12:5: missing required field `name`",
            "12:5: missing required field `reason`",
        ]
    );
}

// ---- Reporting ----

#[test]
fn several_problems_at_once_in_file_order() {
    let text = "version: 2
mode: strict
domains:
  a: { cgroups: [relative], networks: [10.0.0.1/8] }
  b: { cgroups: [/b], networks: [10.0.0.0/16], egress: { countries: { allow: [ZZ] } } }
  a: { cgroups: [/c] }
bridges:
  - { name: x, from: a, to: nowhere, ports: [tcp/0], reason: r, color: red }
";
    let err = parse(text).unwrap_err();
    assert_eq!(
        err.to_string(),
        "p.yaml:1:10: unsupported `version: 2`; this agent reads version 1
p.yaml:2:7: `mode` must be enforce or audit, not `strict`
p.yaml:4:18: cgroup `relative` must be an absolute path starting with `/` (relative to the cgroup v2 mount)
p.yaml:4:40: `10.0.0.1/8` has host bits set, did you mean 10.0.0.0/8
p.yaml:5:79: unknown country code `ZZ` (expected an ISO 3166-1 alpha-2 code like DE)
p.yaml:6:3: duplicate domain `a` (first defined at 4:3)
p.yaml:8:29: unknown domain `nowhere` in `to`
p.yaml:8:46: port 0 in `tcp/0` is not a real port (ports are 1-65535)
p.yaml:8:65: unknown key `color` in a bridge (expected `name`, `from`, `to`, `ports`, `not_before`, `expires`, `reason`)"
    );
}

#[test]
fn summary_lists_what_the_policy_does() {
    let p = parse(FULL).unwrap();
    let expected = format!(
        "policy p.yaml (sha256 {})
mode: audit (decisions are logged, nothing is blocked)
geo: databases /var/lib/bulkhead/GeoLite2-Country.mmdb; geofeeds /etc/bulkhead/geofeed.csv
domains (2):
  contractor-staging (id 1)
    cgroups:  /contractors.slice, /kubepods.slice/*contractor*
    networks: 10.20.0.0/16, fd00:20::/48
    expires:  2027-03-31T00:00:00Z
    egress:   only DE, FR, NL; unknown country denied
    ingress:  all but KP, IR; unknown country allowed
    audit:    all (allowed connections are logged too)
    raw sockets allowed
  core-staging (id 2)
    cgroups:  /core.slice
    networks: 10.30.0.0/16
bridges (1):
  contractor-ci-to-artifacts: contractor-staging -> core-staging
    ports:  tcp/443, udp/53, tcp/8000-8100
    open:   from 2026-12-01T00:00:00Z until 2026-12-15T00:00:00Z
    reason: TICKET-123 artifact upload
",
        p.sha256
    );
    assert_eq!(summary(&p), expected);

    let p = parse(&format!(
        "{TWO}bridges:\n  - {{ name: x, from: a, to: b, ports: [udp/53], reason: r }}\n"
    ))
    .unwrap();
    let s = summary(&p);
    assert!(s.contains("mode: enforce\ndomains (2):\n"), "{s}");
    assert!(s.contains("    open:   always\n"), "{s}");
}

#[test]
fn jit_bridge_rules() {
    let text = "version: 1\ndomains:\n  a:\n    cgroups: [\"/a\"]\n  b:\n    cgroups: [\"/b\"]\njit_bridges:\n  - from: a\n    to: b\n    max_duration: 2h\n";
    let p = parse_str(Path::new("p.yaml"), text).unwrap();
    assert_eq!(
        p.jit_bridges,
        vec![JitRule {
            from: 0,
            to: 1,
            max_secs: 7200
        }]
    );
    let bad = text.replace("2h", "2 hours").replace("to: b", "to: a");
    let err = parse_str(Path::new("p.yaml"), &bad)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("p.yaml:10:19: invalid duration `2 hours`"),
        "{err}"
    );
    assert!(err.contains("to itself"), "{err}");
}

#[test]
fn ten_thousand_networks_are_checked_quickly_and_overlaps_still_found() {
    let mut text =
        String::from("version: 1\ndomains:\n  a:\n    cgroups: [\"/a\"]\n    networks: [");
    for i in 0..5000u32 {
        text += &format!("10.{}.{}.0/24, ", i / 256, i % 256);
    }
    text += "]\n  b:\n    cgroups: [\"/b\"]\n    networks: [";
    for i in 0..5000u32 {
        text += &format!("10.{}.{}.0/24, ", 100 + i / 256, i % 256);
    }
    text += "10.3.0.0/16]\n";
    let started = std::time::Instant::now();
    let err = parse_str(Path::new("p.yaml"), &text)
        .unwrap_err()
        .to_string();
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // 10.3.0.0/16 of b contains 256 /24s of a.
    assert_eq!(err.lines().count(), 256, "{}", &err[..err.len().min(400)]);
    assert!(
        err.contains("network `10.3.0.0/16` of domain `b` overlaps `10.3.0.0/24` of domain `a`")
    );
}

#[test]
fn pod_selectors() {
    let p = parse(
        "version: 1\ndomains:\n  contractor:\n    pods:\n      - namespaces: [acme, acme-ci]\n        match_labels: {team: acme, \"example.com/tier\": staging}\n        match_expressions:\n          - {key: track, operator: In, values: [canary, \"1\"]}\n          - {key: legacy, operator: DoesNotExist}\n",
    )
    .unwrap();
    let d = &p.domains[0];
    assert!(d.cgroups.is_empty());
    assert_eq!(d.pods.len(), 1);
    let s = &d.pods[0];
    assert_eq!(s.namespaces, ["acme", "acme-ci"]);
    assert_eq!(s.match_labels["example.com/tier"], "staging");
    assert_eq!(
        s.match_expressions,
        [
            Requirement {
                key: "track".into(),
                operator: Operator::In,
                values: vec!["canary".into(), "1".into()],
            },
            Requirement {
                key: "legacy".into(),
                operator: Operator::DoesNotExist,
                values: Vec::new(),
            },
        ]
    );
}

#[test]
fn bad_pod_selectors() {
    let head = "version: 1\ndomains:\n  c:\n    pods:\n";
    rejects(
        &format!("{head}      - match_labels: {{a: b}}\n"),
        "5:9",
        "missing required field `namespaces`",
    );
    rejects(
        &format!("{head}      - namespaces: []\n"),
        "5:21",
        "at least one namespace",
    );
    rejects(
        &format!("{head}      - namespaces: [Acme]\n"),
        "5:22",
        "namespace `Acme`",
    );
    rejects(
        &format!("{head}      - namespaces: [a]\n        match_labels: {{tier: 1}}\n"),
        "6:30",
        "expected a string (quote it)",
    );
    rejects(
        &format!("{head}      - namespaces: [a]\n        match_labels: {{\"-x\": y}}\n"),
        "6:24",
        "label key `-x`",
    );
    rejects(
        &format!("{head}      - namespaces: [a]\n        match_labels: {{t: a, t: b}}\n"),
        "6:30",
        "duplicate key `t`",
    );
    rejects(
        &format!(
            "{head}      - namespaces: [a]\n        match_expressions: [{{key: t, operator: In}}]\n"
        ),
        "6:29",
        "need `values`",
    );
    rejects(
        &format!(
            "{head}      - namespaces: [a]\n        match_expressions: [{{key: t, operator: Exists, values: [x]}}]\n"
        ),
        "6:64",
        "take no `values`",
    );
    rejects(
        &format!(
            "{head}      - namespaces: [a]\n        match_expressions: [{{key: t, operator: in, values: [x]}}]\n"
        ),
        "6:48",
        "must be In or NotIn or Exists or DoesNotExist",
    );
    rejects(
        &format!("{head}      - namespaces: [a]\n        labels: {{}}\n"),
        "6:9",
        "unknown key `labels`",
    );
    rejects(
        "version: 1\ndomains:\n  c:\n    pods: []\n",
        "4:11",
        "has no `cgroups` and no `pods`",
    );
    rejects(
        "version: 1\ndomains:\n  c:\n    pods: {}\n",
        "4:11",
        "`pods`: expected a list of selectors",
    );
}
