//! `bulkhead explain`: the verdict a compiled policy gives one connection,
//! and which rule made it — by the same steps the kernel's connect hook
//! takes, most of them the same code (`bulkhead_common::decide`): the peer
//! address prepared as the hook prepares it ([`PeerAddr`]), the same walk
//! of the same address table, for an address in no domain network the
//! domain of the socket listening on it, found in the workload's network
//! namespace as the hook's `bpf_sk_lookup_tcp`/`udp` finds it (asked of
//! the caller: `bulkhead::explain::HostListeners` on a host) with its owner's cgroup ancestry walked level by
//! level as the hook walks it ([`walk_level`]), the geofence set aside for a
//! loopback peer in no domain and the bridges asked for the same pair
//! ([`decide_peer`]), and the verdict for the policy's mode
//! ([`Decision::verdict`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bulkhead_common::{
    Decision, Direction, DomainId, Ports, Reason,
    decide::{Names, Peer, PeerAddr, decide_peer, peer_domain, v4_in_16, walk_level},
    event::{FAMILY_INET, FAMILY_INET6},
    maps::{DOMAIN_EGRESS_GEO, DomainRec},
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Deserializer, Serialize};

use crate::{
    cgroup::glob_match,
    compile::Compiled,
    geo::GeoDb,
    listener::{Listener, Lookup, Owner},
    policy::{Policy, Proto},
};

/// One connection to explain.
pub struct Query {
    /// Cgroup path relative to the cgroup v2 mount.
    pub cgroup: String,
    pub dst: IpAddr,
    pub port: u16,
    pub proto: Proto,
    /// What the kernel learned about `dst` from answers, per domain
    /// (`BH_LEARNED`): the live agent reads it; a policy file alone knows
    /// none.
    pub learned: Vec<LearnedAddr>,
}

/// An address a domain learned from an answer (`BH_LEARNED`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LearnedAddr {
    /// The domain's [`crate::compile::domain_key`].
    pub domain_key: u32,
    pub rule_hash: u64,
    pub wildcard: bool,
    pub resolver: Option<IpAddr>,
    pub until_tai_ns: u64,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Answer {
    /// `allow`, `deny`, `would-deny` (audit mode), or `unknown` where the
    /// decision hangs on a listener whose owner cannot be read.
    #[serde(deserialize_with = "known_name")]
    pub verdict: Name,
    #[serde(deserialize_with = "known_name")]
    pub reason: Name,
    /// The reason's code; 0 with verdict `unknown`.
    pub reason_code: u8,
    /// Human sentence naming the rule that decided.
    pub rule: String,
    pub workload_domain: Option<String>,
    /// The pattern that put the workload in its domain.
    pub workload_pattern: Option<String>,
    pub dst_domain: Option<String>,
    /// What put the destination in its domain: a network of the policy,
    /// or the socket listening on it (`listener 127.0.0.1:7411 of cgroup
    /// /prod.slice`).
    pub dst_network: Option<String>,
    pub country: Option<String>,
    pub geo_source: Option<String>,
    pub bridge: Option<String>,
}

/// The nearest configured ancestor of `cgroup` (deepest prefix a pattern
/// or a placed pod names), as the kernel walks it; with the rule that put
/// it there.
fn workload_domain(policy: &Policy, c: &Compiled, cgroup: &str) -> Option<(usize, String)> {
    let segs: Vec<&str> = cgroup.split('/').filter(|s| !s.is_empty()).collect();
    let split = |p: &str| -> Vec<String> {
        p.split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    };
    for depth in (1..=segs.len()).rev() {
        for (i, d) in policy.domains.iter().enumerate() {
            for p in &d.cgroups {
                let psegs = split(p);
                if psegs.len() == depth && psegs.iter().zip(&segs).all(|(p, s)| glob_match(p, s)) {
                    return Some((i, p.clone()));
                }
            }
        }
        for a in &c.pods {
            let psegs = split(&a.cgroup);
            if psegs.len() == depth && psegs.iter().zip(&segs).all(|(p, s)| p == s) {
                return Some((a.domain, format!("pod {} ({})", a.pod, a.cgroup)));
            }
        }
    }
    None
}

fn longest<N: Copy, V: Copy>(
    list: &[(N, V)],
    contains: impl Fn(&N) -> bool,
    len: impl Fn(&N) -> u8,
) -> Option<(N, V)> {
    list.iter()
        .filter(|(n, _)| contains(n))
        .max_by_key(|(n, _)| len(n))
        .copied()
}

fn net_domain(c: &Compiled, ip: IpAddr) -> Option<(IpNet, u32)> {
    match ip {
        IpAddr::V4(a) => longest(&c.net4, |n: &Ipv4Net| n.contains(&a), |n| n.prefix_len())
            .map(|(n, d)| (IpNet::V4(n), d)),
        IpAddr::V6(a) => longest(&c.net6, |n: &Ipv6Net| n.contains(&a), |n| n.prefix_len())
            .map(|(n, d)| (IpNet::V6(n), d)),
    }
}

/// The destination as the connect hook prepares it (IPv4-mapped IPv6 as
/// IPv4).
fn peer_addr(ip: IpAddr) -> (PeerAddr, IpAddr) {
    let p = match ip {
        IpAddr::V4(a) => PeerAddr::new(FAMILY_INET, v4_in_16(a.octets())),
        IpAddr::V6(a) => PeerAddr::new(FAMILY_INET6, a.octets()),
    };
    let ip = if p.family == FAMILY_INET {
        IpAddr::V4(Ipv4Addr::new(p.addr[0], p.addr[1], p.addr[2], p.addr[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(p.addr))
    };
    (p, ip)
}

/// The domain of a listener's owner under `c`: its ancestry walked as the
/// connect hook walks it, each level looked up among the cgroups the
/// policy's patterns (and placed pods) name.
fn owner_domain(c: &Compiled, owner: &Owner) -> u32 {
    let mut found = 0;
    if let Some(ancestors) = owner.ancestors() {
        for &id in ancestors {
            let known = |id| {
                c.cgroups
                    .iter()
                    .find(|(cg, _, _)| *cg == id)
                    .map(|(_, d, _)| *d)
            };
            if !walk_level(&mut found, id, known) {
                break;
            }
        }
    }
    found
}

/// A verdict or reason name, from the tables in `agent-common`. (An alias,
/// so serde's derive does not ask the input to live for `'static`.)
pub type Name = &'static str;

/// Reads a verdict or reason name back as the reason table's own
/// `&'static str`: the names are a closed set, so the CLI reading an
/// answer needs no owned copy (a name outside the set is an error).
fn known_name<'de, D: Deserializer<'de>>(d: D) -> Result<&'static str, D::Error> {
    use serde::de::Error as _;
    let s = String::deserialize(d)?;
    const VERDICTS: [&str; 5] = ["allow", "deny", "would-deny", "cut", "unknown"];
    Reason::ALL
        .iter()
        .map(|r| r.name())
        .chain(VERDICTS)
        .find(|n| *n == s)
        .ok_or_else(|| D::Error::custom(format!("unknown verdict or reason `{s}`")))
}

/// The answer for `q` at `now_tai` (the kernel's clock, see
/// [`crate::clock::now_tai`]). `listener` says what listens on the
/// (prepared) destination address; it is asked only when that address is
/// in no domain network, as in the kernel.
pub fn explain_at(
    policy: &Policy,
    c: &Compiled,
    geo: &GeoDb,
    q: &Query,
    now_tai: u64,
    listener: &dyn Fn(&Query, IpAddr) -> Lookup,
) -> Answer {
    let (addr, dst) = peer_addr(q.dst);
    let hit = geo.lookup(dst);
    let country = hit
        .as_ref()
        .map(|h| String::from_utf8_lossy(&h.country).into_owned());
    let geo_source = hit
        .as_ref()
        .and_then(|h| geo.sources().get(h.source))
        .map(|s| s.path.display().to_string());
    let Some((local_idx, pattern)) = workload_domain(policy, c, &q.cgroup) else {
        return Answer {
            verdict: "allow",
            reason: "no-domain",
            reason_code: 0,
            rule: format!("{} is in no domain: bulkhead does not touch it", q.cgroup),
            workload_domain: None,
            workload_pattern: None,
            dst_domain: None,
            dst_network: None,
            country,
            geo_source,
            bridge: None,
        };
    };
    let local_id = DomainId::from_index(local_idx).raw();
    let local: DomainRec = c
        .domains
        .iter()
        .find(|(id, _)| *id == local_id)
        .map(|(_, r)| *r)
        .unwrap_or_default();
    // The verdict comes from the kernel's own lookup; the network list
    // only names the rule.
    let class = *c.addr.class(dst);
    let mut looked = None;
    let peer_id = peer_domain(class.domain, || {
        let l = listener(q, dst);
        let d = match &l.listener {
            Listener::Found { owner, .. } => owner_domain(c, owner),
            _ => 0,
        };
        looked = Some(l);
        d
    });
    let name = |id: u32| {
        DomainId::from_raw(id)
            .index()
            .and_then(|i| policy.domains.get(i))
            .map(|d| d.name.clone())
    };
    let local_name = policy.domains[local_idx].name.clone();
    let svc = format!("{}/{}", q.proto.name(), q.port);
    // The name an answer learned the address for, if the rule that
    // matched is still in the policy and the answer's TTL holds.
    let learned = q
        .learned
        .iter()
        .find(|l| l.domain_key == local.key && l.until_tai_ns > now_tai)
        .and_then(|l| {
            let rule = c
                .names
                .get(&(local_id as u16, u8::from(l.wildcard), l.rule_hash))?;
            let names = policy.domains[local_idx].names.as_ref()?.names();
            Some((names.get(*rule as usize - 1)?.clone(), l))
        });
    if let Some(Lookup {
        netns,
        listener: Listener::Unknown(why),
    }) = &looked
    {
        return Answer {
            verdict: "unknown",
            reason: "unknown",
            reason_code: 0,
            rule: format!(
                "{dst} is in no domain network, so the kernel decides {svc} to it by the domain \
                 of the socket listening on {dst}:{} in {netns}: {why}",
                q.port
            ),
            workload_domain: Some(local_name),
            workload_pattern: Some(pattern),
            dst_domain: None,
            dst_network: None,
            country,
            geo_source,
            bridge: None,
        };
    }
    let peer = Peer {
        domain: peer_id,
        geo: Some(&class.geo),
        loopback: addr.is_loopback(),
        names: Names {
            resolver: c
                .resolvers
                .contains_key(&(local_id as u16, addr.family, addr.addr)),
            named: learned.is_some(),
            until_tai_ns: learned.as_ref().map_or(0, |(_, l)| l.until_tai_ns),
        },
    };
    let d: Decision = decide_peer(
        Direction::Egress,
        local_id,
        &local,
        &peer,
        |from: u32, to: u32| c.bridges.get(&(from as u16, to as u16)),
        q.proto.number(),
        // A new connection: its own port is not chosen yet.
        Ports {
            service: q.port,
            other: 0,
        },
        now_tai,
    );
    let bridge = (d.bridge_id != 0)
        .then(|| {
            c.bridge_names
                .get(d.bridge_id as usize - 1)
                .map(|b| b.name.clone())
        })
        .flatten();
    // What made the destination's domain: a network, or the listener.
    let (listening, dst_network) = match &looked {
        Some(Lookup {
            listener: Listener::Found {
                bound, owner, path, ..
            },
            ..
        }) => {
            let of = match (owner, path) {
                (Owner::Unrecorded, _) => "with no recorded owner".to_string(),
                (_, Some(p)) => format!("of cgroup {p}"),
                (_, None) => "of a cgroup that no longer exists".to_string(),
            };
            let l = format!("listener {bound} {of}");
            (Some(l.clone()), Some(l))
        }
        _ => (
            None,
            net_domain(c, dst)
                .filter(|(_, d)| *d == peer_id)
                .map(|(n, _)| n.to_string()),
        ),
    };
    let peer_name = name(peer_id).unwrap_or_default();
    let dst_is = match &listening {
        Some(l) if peer_id != 0 => format!("{dst}:{} reaches {l}, domain {peer_name}", q.port),
        Some(l) => format!("{dst}:{} reaches {l}, which is in no domain", q.port),
        None if peer_id != 0 => format!("{dst} belongs to domain {peer_name}"),
        None => format!("{dst} belongs to no domain"),
    };
    let geofenced = local.flags & DOMAIN_EGRESS_GEO != 0;
    let rule = match d.reason {
        Reason::DomainExpired => format!("domain {local_name} has expired: it reaches nothing"),
        Reason::SameDomain if listening.is_some() => format!("{dst_is}: {local_name}'s own"),
        Reason::SameDomain => format!("{dst} belongs to {local_name}'s own networks"),
        Reason::Bridge => format!(
            "bridge {} opens {svc} from {local_name} to {peer_name}{}",
            bridge.clone().unwrap_or_default(),
            listening
                .as_ref()
                .map(|_| format!(" ({dst_is})"))
                .unwrap_or_default()
        ),
        Reason::BridgeOutsideWindow => format!(
            "bridge {} covers {svc} but is outside its time window ({dst_is})",
            bridge.clone().unwrap_or_default()
        ),
        Reason::CrossDomain => format!("{dst_is}; no bridge from {local_name} covers {svc}"),
        Reason::NoDomain if peer.loopback && geofenced => {
            let nothing = match &looked {
                Some(Lookup {
                    netns,
                    listener: Listener::Nothing,
                }) if q.port != 0 => format!(" (nothing listens on it in {netns})"),
                _ => String::new(),
            };
            format!(
                "{dst_is}{nothing}: the host itself, which no geo source places, so \
                 {local_name}'s egress geofence does not judge it"
            )
        }
        Reason::NoDomain => format!("{dst_is} and {local_name} has no egress geofence"),
        Reason::CountryAllowed => format!(
            "{local_name}'s egress geofence allows {}",
            country.clone().unwrap_or_default()
        ),
        Reason::CountryDenied => format!(
            "{local_name}'s egress geofence denies {}",
            country.clone().unwrap_or_default()
        ),
        Reason::CountryUnknown => {
            format!("no geo source places {dst} and {local_name} has unknown_country: deny")
        }
        Reason::CountryUnknownAllowed => {
            format!("no geo source places {dst} and {local_name} has unknown_country: allow")
        }
        Reason::DnsResolverDenied => format!(
            "{local_name} uses names: its DNS goes to its `dns.resolvers` only, and {dst} is not one"
        ),
        Reason::DnsResolver => format!("{dst} is one of {local_name}'s `dns.resolvers`"),
        Reason::NameAllowed | Reason::NameDenied => {
            let (name, l) = learned.as_ref().expect("decided by a learned name");
            format!(
                "{dst} was learned from an answer of {} for `{name}`, which {local_name}'s \
                 `egress.names` {} ({} s of its TTL left)",
                l.resolver.map_or("a resolver".into(), |r| r.to_string()),
                if d.reason == Reason::NameAllowed {
                    "allow"
                } else {
                    "deny"
                },
                (l.until_tai_ns - now_tai) / 1_000_000_000
            )
        }
        Reason::NameNotAllowed => format!(
            "{dst_is}, and no answer from {local_name}'s resolvers for a name its `egress.names` \
             allow (within its TTL) gave this address; it has no country rule"
        ),
        other => other.name().to_string(),
    };
    Answer {
        verdict: d.verdict(c.config.mode).name(),
        reason: d.reason.name(),
        reason_code: d.reason as u8,
        rule,
        workload_domain: Some(local_name),
        workload_pattern: Some(pattern),
        dst_domain: (peer_id != 0).then(|| name(peer_id)).flatten(),
        dst_network,
        country,
        geo_source,
        bridge,
    }
}

pub fn render(a: &Answer) -> String {
    let mut s = format!(
        "verdict: {}\nreason:  {} ({})\nrule:    {}\n",
        a.verdict, a.reason, a.reason_code, a.rule
    );
    if let (Some(d), Some(p)) = (&a.workload_domain, &a.workload_pattern) {
        s += &format!("workload: domain {d} (cgroup pattern {p})\n");
    }
    if let Some(d) = &a.dst_domain {
        let by = match a.dst_network.as_deref() {
            Some(l) if l.starts_with("listener ") => l.to_string(),
            n => format!("network {}", n.unwrap_or("?")),
        };
        s += &format!("destination: domain {d} ({by})\n");
    }
    if let Some(c) = &a.country {
        s += &format!(
            "country: {c} (from {})\n",
            a.geo_source.as_deref().unwrap_or("?")
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::{EventLimits, compile};
    use std::path::Path;

    /// The TAI offset of these hosts; the tests give Unix times.
    const TAI: i64 = 37_000_000_000;

    fn explain_with(
        p: &Policy,
        c: &Compiled,
        g: &GeoDb,
        q: &Query,
        now_unix_ns: i64,
        listener: &dyn Fn(&Query, IpAddr) -> Lookup,
    ) -> Answer {
        explain_at(
            p,
            c,
            g,
            q,
            crate::clock::now_tai(now_unix_ns, TAI),
            listener,
        )
    }

    /// With nothing listening: the tests' destinations in no domain network
    /// are addresses no socket on a host is bound to.
    fn explain(p: &Policy, c: &Compiled, g: &GeoDb, q: &Query, now_unix_ns: i64) -> Answer {
        explain_with(p, c, g, q, now_unix_ns, &|_, _| nothing())
    }

    fn setup(text: &str) -> (Policy, Compiled) {
        let p = crate::policy::parse_str(Path::new("t.yaml"), text).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let c = compile(
            &p,
            &GeoDb::empty(),
            dir.path(),
            EventLimits { rate: 0, burst: 0 },
            0,
        )
        .unwrap();
        (p, c)
    }

    const POLICY: &str = "version: 1\ndomains:\n  contractor:\n    cgroups: [\"/contractors.slice\", \"/k/*contractor*\"]\n    networks: [10.20.0.0/16]\n  prod:\n    cgroups: [\"/prod.slice\"]\n    networks: [10.40.0.0/16, \"fd00:40::/48\"]\nbridges:\n  - name: ci\n    from: contractor\n    to: prod\n    ports: [tcp/443]\n    reason: \"T-1\"\n";

    fn q(cgroup: &str, dst: &str, port: u16, proto: Proto) -> Query {
        Query {
            cgroup: cgroup.into(),
            dst: dst.parse().unwrap(),
            port,
            proto,
            learned: Vec::new(),
        }
    }

    /// A placed pod's cgroup is deeper than the path rule above it, so its
    /// domain wins, for the pod and its containers, as in the kernel.
    #[test]
    fn placed_pods_decide_below_their_path_rule() {
        let (p, mut c) = setup(&POLICY.replace("/prod.slice", "/prod.slice\", \"/k"));
        c.place_pods(&[crate::selector::Assignment {
            domain: 0,
            pod: "acme/web-1".into(),
            uid: "u1".into(),
            cgroup: "/k/podu1".into(),
            cgroup_id: 4242,
        }]);
        let g = GeoDb::empty();
        let pod = explain(
            &p,
            &c,
            &g,
            &q("/k/podu1/crio-1", "10.40.1.1", 443, Proto::Tcp),
            0,
        );
        assert_eq!(pod.workload_domain.as_deref(), Some("contractor"));
        assert_eq!(
            pod.workload_pattern.as_deref(),
            Some("pod acme/web-1 (/k/podu1)")
        );
        assert_eq!((pod.verdict, pod.bridge.as_deref()), ("allow", Some("ci")));
        let other = explain(&p, &c, &g, &q("/k/podu2", "10.40.1.1", 443, Proto::Tcp), 0);
        assert_eq!(other.workload_domain.as_deref(), Some("prod"));
        assert_eq!(other.workload_pattern.as_deref(), Some("/k"));
    }

    #[test]
    fn explains_cross_domain_bridge_and_same_domain() {
        let (p, c) = setup(POLICY);
        let g = GeoDb::empty();
        let a = explain(
            &p,
            &c,
            &g,
            &q("/contractors.slice/job/x", "10.40.1.1", 5432, Proto::Tcp),
            0,
        );
        assert_eq!((a.verdict, a.reason), ("deny", "cross-domain"));
        assert!(
            a.rule.contains("no bridge from contractor covers tcp/5432"),
            "{}",
            a.rule
        );
        assert_eq!(a.dst_network.as_deref(), Some("10.40.0.0/16"));
        let b = explain(
            &p,
            &c,
            &g,
            &q("/k/pod-contractor-7", "10.40.1.1", 443, Proto::Tcp),
            0,
        );
        assert_eq!(
            (b.verdict, b.reason, b.bridge.as_deref()),
            ("allow", "bridge", Some("ci"))
        );
        let m = explain(
            &p,
            &c,
            &g,
            &q("/contractors.slice", "::ffff:10.20.3.4", 1, Proto::Udp),
            0,
        );
        assert_eq!(m.reason, "same-domain");
        let none = explain(
            &p,
            &c,
            &g,
            &q("/system.slice/sshd.service", "10.40.1.1", 22, Proto::Tcp),
            0,
        );
        assert_eq!(none.workload_domain, None);
        assert_eq!(none.verdict, "allow");
        assert!(render(&a).starts_with("verdict: deny\nreason:  cross-domain (16)\n"));
    }

    fn owned_by(path: &str, ancestors: &[u64]) -> Lookup {
        let mut a = [0u64; bulkhead_common::maps::MAX_CGROUP_DEPTH];
        a[..ancestors.len()].copy_from_slice(ancestors);
        Lookup {
            netns: "the test's".into(),
            listener: Listener::Found {
                bound: "127.0.0.1:7411".parse().unwrap(),
                owner: Owner::Recorded(a),
                path: Some(path.into()),
            },
        }
    }

    fn nothing() -> Lookup {
        Lookup {
            netns: "the test's".into(),
            listener: Listener::Nothing,
        }
    }

    /// A loopback destination is decided by the domain of the socket
    /// listening on it, whose ancestry is walked as the kernel walks it
    /// (the deepest configured level wins), and the answer names it.
    #[test]
    fn a_listener_gives_a_loopback_destination_its_owners_domain() {
        let (p, mut c) = setup(POLICY);
        c.cgroups.push((4242, 2, "/prod.slice".into()));
        let g = GeoDb::empty();
        let prod = |q: &Query, ip: IpAddr| {
            assert_eq!(
                ip,
                "127.0.0.1".parse::<IpAddr>().unwrap(),
                "prepared as IPv4"
            );
            assert_eq!(q.port, 7411);
            owned_by("/prod.slice/web", &[4242, 4243])
        };
        let x = explain_with(
            &p,
            &c,
            &g,
            &q("/contractors.slice", "127.0.0.1", 7411, Proto::Tcp),
            0,
            &prod,
        );
        assert_eq!((x.verdict, x.reason), ("deny", "cross-domain"));
        assert_eq!(x.dst_domain.as_deref(), Some("prod"));
        assert!(
            x.rule
                .contains("listener 127.0.0.1:7411 of cgroup /prod.slice/web, domain prod"),
            "{}",
            x.rule
        );
        assert!(
            render(&x).contains(
                "destination: domain prod (listener 127.0.0.1:7411 of cgroup /prod.slice/web)"
            ),
            "{}",
            render(&x)
        );
        // IPv4-mapped, it is the same address; over the bridge's port it passes.
        let mapped = |q: &Query, ip: IpAddr| {
            assert_eq!(ip, "127.0.0.1".parse::<IpAddr>().unwrap());
            let mut l = owned_by("/prod.slice", &[4242]);
            if let Listener::Found { bound, .. } = &mut l.listener {
                bound.set_port(q.port);
            }
            l
        };
        let b = explain_with(
            &p,
            &c,
            &g,
            &q("/contractors.slice", "::ffff:127.0.0.1", 443, Proto::Tcp),
            0,
            &mapped,
        );
        assert_eq!((b.reason, b.bridge.as_deref()), ("bridge", Some("ci")));
        assert!(
            b.rule.contains("(127.0.0.1:443 reaches listener"),
            "{}",
            b.rule
        );
        // Prod's own listener is prod's.
        let own = explain_with(
            &p,
            &c,
            &g,
            &q("/prod.slice/db", "127.0.0.1", 7411, Proto::Tcp),
            0,
            &prod,
        );
        assert_eq!((own.verdict, own.reason), ("allow", "same-domain"));
        // A destination in a domain network never asks.
        let never = |_: &Query, _: IpAddr| -> Lookup { panic!("listener looked up") };
        let net = explain_with(
            &p,
            &c,
            &g,
            &q("/contractors.slice", "10.40.0.9", 7411, Proto::Tcp),
            0,
            &never,
        );
        assert_eq!(net.reason, "cross-domain");
        assert_eq!(net.dst_network.as_deref(), Some("10.40.0.0/16"));
    }

    /// Loopback in no domain (nothing listens, or its owner is in none) is
    /// not judged by a geofence, which knows no country for the host; any
    /// other address in no domain is.
    #[test]
    fn loopback_in_no_domain_is_not_geofenced() {
        let fenced = POLICY.replace(
            "    networks: [10.20.0.0/16]\n",
            "    networks: [10.20.0.0/16]\n    egress: { countries: { allow: [DE] }, unknown_country: deny }\n",
        );
        let (p, c) = setup(&fenced);
        let g = GeoDb::empty();
        let contractor = |dst| q("/contractors.slice", dst, 9, Proto::Udp);
        let lo = explain_with(&p, &c, &g, &contractor("127.0.0.1"), 0, &|_, _| nothing());
        assert_eq!((lo.verdict, lo.reason), ("allow", "no-domain"));
        assert!(
            lo.rule.contains("nothing listens on it in the test's"),
            "{}",
            lo.rule
        );
        let lo6 = explain_with(&p, &c, &g, &contractor("::1"), 0, &|_, _| nothing());
        assert_eq!(lo6.reason, "no-domain");
        let nobody = |_: &Query, _: IpAddr| Lookup {
            netns: "the test's".into(),
            listener: Listener::Found {
                bound: "0.0.0.0:9".parse().unwrap(),
                owner: Owner::Unrecorded,
                path: None,
            },
        };
        let unowned = explain_with(&p, &c, &g, &contractor("127.0.0.1"), 0, &nobody);
        assert_eq!(unowned.reason, "no-domain");
        assert!(
            unowned
                .rule
                .contains("listener 0.0.0.0:9 with no recorded owner, which is in no domain"),
            "{}",
            unowned.rule
        );
        let far = explain_with(&p, &c, &g, &contractor("10.99.0.1"), 0, &|_, _| nothing());
        assert_eq!((far.verdict, far.reason), ("deny", "country-unknown"));
    }

    /// When the listener's owner cannot be read, the answer says so instead
    /// of guessing.
    #[test]
    fn an_unreadable_listener_makes_the_answer_unknown() {
        let (p, c) = setup(POLICY);
        let unknown = |_: &Query, _: IpAddr| Lookup {
            netns: "the network namespace of /x (that of pid 7)".into(),
            listener: Listener::Unknown("no rights".into()),
        };
        let a = explain_with(
            &p,
            &c,
            &GeoDb::empty(),
            &q("/contractors.slice", "127.0.0.1", 7411, Proto::Tcp),
            0,
            &unknown,
        );
        assert_eq!(
            (a.verdict, a.reason, a.reason_code),
            ("unknown", "unknown", 0)
        );
        assert!(
            a.rule.contains("listening on 127.0.0.1:7411 in the network namespace of /x (that of pid 7): no rights"),
            "{}",
            a.rule
        );
    }
}
