//! A validated policy + geo sources + the live cgroup tree → the exact
//! contents of one slot of the kernel's policy maps.

use std::{collections::BTreeMap, path::Path, sync::Arc};

use anyhow::{Result, bail};
use bulkhead_common::DomainId;
use bulkhead_common::maps::{
    BRIDGE_REVERSE, BridgeRule, BridgeSet, Config, DOMAIN_ALLOW_RAW, DOMAIN_AUDIT_ALL,
    DOMAIN_EGRESS_GEO, DOMAIN_EGRESS_UNKNOWN_DENY, DOMAIN_EXISTS, DOMAIN_INGRESS_GEO,
    DOMAIN_INGRESS_UNKNOWN_DENY, DOMAIN_NAMES_ALLOW, DOMAIN_NAMES_DENY, DomainRec,
    MAX_BRIDGE_RULES, MAX_NAMES, MAX_RESOLVERS, MODE_AUDIT, MODE_ENFORCE, PROTO_UDP,
};
use bulkhead_common::{
    dns::name_hash,
    event::{FAMILY_INET, FAMILY_INET6},
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::{
    addr::AddrTable,
    cgroup,
    clock::to_tai,
    geo::{DomainGeo, GeoDb},
    policy::{AuditLevel, Mode, NameList, Policy, UnknownCountry},
    selector::Assignment,
};

/// Event settings that live beside the policy in the kernel config.
#[derive(Clone, Copy, Debug)]
pub struct EventLimits {
    /// Events per second per cgroup; 0 = unlimited.
    pub rate: u32,
    pub burst: u32,
}

/// A bridge as the agent names it in events: policy bridges first, then
/// just-in-time ones; `bridge_id` in the kernel is `index + 1` (0 is no
/// bridge, as with [`DomainId`]).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BridgeName {
    pub name: String,
    pub reason: String,
}

pub struct Compiled {
    pub config: Config,
    /// `(domain id, record)` for ids 1..=n.
    pub domains: Vec<(u32, DomainRec)>,
    /// `(cgroup id, domain id, path)` of every existing cgroup a pattern names.
    pub cgroups: Vec<(u64, u32, String)>,
    pub net4: Vec<(Ipv4Net, u32)>,
    pub net6: Vec<(Ipv6Net, u32)>,
    /// What the kernel knows about peer addresses (networks and geo
    /// verdicts). Shared between generations of the same policy file:
    /// bridges and pods do not change it (see [`recompile`]).
    pub addr: Arc<AddrTable>,
    pub bridges: BTreeMap<(u16, u16), BridgeSet>,
    pub bridge_names: Vec<BridgeName>,
    pub domain_names: Vec<String>,
    /// Pods the policy's `pods:` selectors placed (their cgroups are in
    /// `cgroups` too); empty without a pod watch.
    pub pods: Vec<Assignment>,
    /// `BH_NAMES` of the slot: (domain id, wildcard, name hash) → the
    /// rule's index + 1 in the domain's `egress.names`.
    pub names: BTreeMap<(u16, u8, u64), u32>,
    /// `BH_RESOLVERS` of the slot: (domain id, family, address).
    pub resolvers: BTreeMap<(u16, u8, [u8; 16]), u32>,
}

/// The key a domain's learned addresses are kept under
/// ([`DomainRec::key`]): its name's hash, so they outlive reloads that
/// number domains differently. FNV-1a, never 0.
pub fn domain_key(name: &str) -> u32 {
    let h = name.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    h.max(1)
}

/// An address as the kernel's maps hold it: IPv4 in the first four bytes.
pub fn addr_bytes(a: std::net::IpAddr) -> (u8, [u8; 16]) {
    match a {
        std::net::IpAddr::V4(v4) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&v4.octets());
            (FAMILY_INET, b)
        }
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => addr_bytes(std::net::IpAddr::V4(v4)),
            None => (FAMILY_INET6, v6.octets()),
        },
    }
}

impl Compiled {
    /// Adds the cgroups of placed pods. A cgroup a path pattern already
    /// names keeps that domain: the pattern is the more specific rule.
    pub fn place_pods(&mut self, placed: &[Assignment]) {
        for a in placed {
            if self.cgroups.iter().any(|(id, _, _)| *id == a.cgroup_id) {
                continue;
            }
            self.cgroups.push((
                a.cgroup_id,
                DomainId::from_index(a.domain).raw(),
                a.cgroup.clone(),
            ));
            self.pods.push(a.clone());
        }
    }
}

pub fn compile(
    policy: &Policy,
    geo: &GeoDb,
    cgroup_mount: &Path,
    limits: EventLimits,
    tai: i64,
) -> Result<Compiled> {
    build(policy, cgroup_mount, limits, tai, |net4, net6, rules| {
        Ok(Arc::new(AddrTable::build(net4, net6, geo.compile(rules))?))
    })
}

/// [`compile`] for `policy` when only its bridges differ from the policy
/// `prev` was compiled from (just-in-time bridges, placed pods): the
/// address table depends on the domains' networks, their country rules and
/// the geo sources alone, so `prev`'s is reused instead of being built
/// again (the costly part with a full country database).
pub fn recompile(
    policy: &Policy,
    prev: &Compiled,
    cgroup_mount: &Path,
    limits: EventLimits,
    tai: i64,
) -> Result<Compiled> {
    build(policy, cgroup_mount, limits, tai, |_, _, _| {
        Ok(prev.addr.clone())
    })
}

fn build(
    policy: &Policy,
    cgroup_mount: &Path,
    limits: EventLimits,
    tai: i64,
    addr: impl FnOnce(&[(Ipv4Net, u32)], &[(Ipv6Net, u32)], &[DomainGeo]) -> Result<Arc<AddrTable>>,
) -> Result<Compiled> {
    let config = Config {
        mode: match policy.mode {
            Mode::Enforce => MODE_ENFORCE,
            Mode::Audit => MODE_AUDIT,
        },
        event_rate: limits.rate,
        event_burst: limits.burst,
        addr_words: 0,
        addr_classes: 0,
        flags: 0,
    };

    let mut domains = Vec::new();
    let mut cgroups = Vec::new();
    let mut net4 = Vec::new();
    let mut net6 = Vec::new();
    let mut geo_rules = Vec::new();
    let mut names = BTreeMap::new();
    let mut resolvers = BTreeMap::new();
    let mut config_flags = 0;
    let mut keys = BTreeMap::new();
    for (i, d) in policy.domains.iter().enumerate() {
        let id = DomainId::from_index(i).raw();
        let key = domain_key(&d.name);
        if let Some(other) = keys.insert(key, &d.name) {
            bail!(
                "domains `{other}` and `{}` have the same key for learned addresses; rename one",
                d.name
            );
        }
        let mut flags = DOMAIN_EXISTS;
        match &d.names {
            Some(NameList::Allow(_)) => flags |= DOMAIN_NAMES_ALLOW,
            Some(NameList::Deny(_)) => flags |= DOMAIN_NAMES_DENY,
            None => {}
        }
        if let Some(list) = &d.names {
            config_flags |= bulkhead_common::maps::CONFIG_NAMES;
            for (n, name) in list.names().iter().enumerate() {
                let (wildcard, bare) = match name.strip_prefix("*.") {
                    Some(rest) => (1u8, rest),
                    None => (0u8, name.as_str()),
                };
                let Some(hash) = name_hash(bare) else {
                    bail!("name `{name}` of domain `{}` is not a DNS name", d.name);
                };
                names.insert((id as u16, wildcard, hash), n as u32 + 1);
            }
            for r in d.dns.iter().flat_map(|dns| &dns.resolvers) {
                let (family, addr) = addr_bytes(*r);
                resolvers.insert((id as u16, family, addr), 1);
            }
        }
        if d.audit == AuditLevel::All {
            flags |= DOMAIN_AUDIT_ALL;
        }
        if d.allow_raw_sockets {
            flags |= DOMAIN_ALLOW_RAW;
        }
        if let Some(r) = &d.egress {
            flags |= DOMAIN_EGRESS_GEO;
            if r.unknown_country == UnknownCountry::Deny {
                flags |= DOMAIN_EGRESS_UNKNOWN_DENY;
            }
        }
        if let Some(r) = &d.ingress {
            flags |= DOMAIN_INGRESS_GEO;
            if r.unknown_country == UnknownCountry::Deny {
                flags |= DOMAIN_INGRESS_UNKNOWN_DENY;
            }
        }
        domains.push((
            id,
            DomainRec {
                expires_tai_ns: to_tai(d.expires, tai, u64::MAX),
                flags,
                key,
                min_ttl: d.dns.as_ref().map_or(0, |x| x.min_ttl),
                max_ttl: d.dns.as_ref().map_or(0, |x| x.max_ttl),
            },
        ));
        for pattern in &d.cgroups {
            for (path, cg) in cgroup::resolve(cgroup_mount, pattern) {
                cgroups.push((cg, id, path));
            }
        }
        for n in &d.networks {
            match n {
                IpNet::V4(n) => net4.push((*n, id)),
                IpNet::V6(n) => match v4_mapped_net(n) {
                    // IPv4-mapped networks are decided as IPv4.
                    Some(v4) => net4.push((v4, id)),
                    None => net6.push((*n, id)),
                },
            }
        }
        if d.egress.is_some() || d.ingress.is_some() {
            geo_rules.push(DomainGeo {
                id,
                egress: d.egress.clone(),
                ingress: d.ingress.clone(),
            });
        }
    }

    let mut bridges: BTreeMap<(u16, u16), BridgeSet> = BTreeMap::new();
    let mut bridge_names = Vec::new();
    for (i, b) in policy.bridges.iter().enumerate() {
        let bridge_id = i as u32 + 1;
        bridge_names.push(BridgeName {
            name: b.name.clone(),
            reason: b.reason.clone(),
        });
        let from = DomainId::from_index(b.from).raw16();
        let to = DomainId::from_index(b.to).raw16();
        for p in &b.ports {
            let rule = BridgeRule {
                not_before_tai_ns: to_tai(b.not_before, tai, 0),
                expires_tai_ns: to_tai(b.expires, tai, u64::MAX),
                bridge_id,
                port_lo: p.lo,
                port_hi: p.hi,
                proto: p.proto.number(),
                flags: 0,
                _pad: [0; 6],
            };
            add_rule(&mut bridges, (from, to), rule, policy)?;
            // Datagrams both ways: see `BRIDGE_REVERSE`.
            if rule.proto == PROTO_UDP {
                let back = BridgeRule {
                    flags: BRIDGE_REVERSE,
                    ..rule
                };
                add_rule(&mut bridges, (to, from), back, policy)?;
            }
        }
    }

    if names.len() > MAX_NAMES as usize {
        bail!("more than {MAX_NAMES} `egress.names` entries in all domains together");
    }
    if resolvers.len() > MAX_RESOLVERS as usize {
        bail!("more than {MAX_RESOLVERS} `dns.resolvers` in all domains together");
    }
    let addr = addr(&net4, &net6, &geo_rules)?;
    Ok(Compiled {
        config: Config {
            addr_words: addr.words.len() as u32,
            addr_classes: addr.classes.len() as u32,
            flags: config_flags,
            ..config
        },
        domains,
        cgroups,
        net4,
        net6,
        addr,
        bridges,
        bridge_names,
        domain_names: policy.domains.iter().map(|d| d.name.clone()).collect(),
        pods: Vec::new(),
        names,
        resolvers,
    })
}

fn add_rule(
    bridges: &mut BTreeMap<(u16, u16), BridgeSet>,
    pair: (u16, u16),
    rule: BridgeRule,
    policy: &Policy,
) -> Result<()> {
    let set = bridges.entry(pair).or_default();
    let n = set.count as usize;
    if n >= MAX_BRIDGE_RULES {
        let name = |id: u16| {
            DomainId::from(id)
                .index()
                .and_then(|i| policy.domains.get(i))
                .map_or("?", |d| d.name.as_str())
        };
        bail!(
            "more than {MAX_BRIDGE_RULES} port rules between {} and {} (a UDP port counts for both directions)",
            name(pair.0),
            name(pair.1)
        );
    }
    set.rules[n] = rule;
    set.count += 1;
    Ok(())
}

fn v4_mapped_net(n: &Ipv6Net) -> Option<Ipv4Net> {
    let v4 = n.addr().to_ipv4_mapped()?;
    let len = n.prefix_len().checked_sub(96)?;
    Ipv4Net::new(v4, len).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_networks_become_v4() {
        let n: Ipv6Net = "::ffff:10.1.0.0/112".parse().unwrap();
        assert_eq!(v4_mapped_net(&n), Some("10.1.0.0/16".parse().unwrap()));
        let n: Ipv6Net = "fd00::/48".parse().unwrap();
        assert_eq!(v4_mapped_net(&n), None);
    }

    /// A bridge more: everything but the bridges as a full compile gives,
    /// and the address table shared instead of built again.
    #[test]
    fn recompile_shares_the_geo_tables_and_matches_a_full_compile() {
        let text = "version: 1\ndomains:\n  a: {cgroups: [/a], networks: [10.1.0.0/16]}\n  b: {cgroups: [/b], egress: {countries: {allow: [DE]}}}\n";
        let bridge = "bridges:\n  - {name: x, from: a, to: b, ports: [tcp/443], reason: r}\n";
        let parse = |t: &str| crate::policy::parse_str(Path::new("p.yaml"), t).unwrap();
        let (p1, p2) = (parse(text), parse(&format!("{text}{bridge}")));
        let mount = tempfile::tempdir().unwrap();
        let limits = EventLimits { rate: 0, burst: 0 };
        let geo = GeoDb::empty();
        let first = compile(&p1, &geo, mount.path(), limits, 0).unwrap();
        let again = recompile(&p2, &first, mount.path(), limits, 0).unwrap();
        let full = compile(&p2, &geo, mount.path(), limits, 0).unwrap();
        assert!(Arc::ptr_eq(&first.addr, &again.addr));
        assert_eq!(again.addr, full.addr);
        assert_eq!(again.bridges, full.bridges);
        assert_eq!(again.bridge_names, full.bridge_names);
        assert_eq!(again.net4, full.net4);
        assert_eq!(again.domains, full.domains);
        assert_ne!(again.bridges, first.bridges);
    }
}
