//! `bulkhead explain`: the verdict a compiled policy gives one connection,
//! and which rule made it — by the same `agent_common::decide` the kernel
//! runs, after the same walk of the same address table.

use std::net::IpAddr;

use agent_common::{
    Direction, Ports, Reason, decide,
    maps::{DomainRec, MODE_AUDIT, is_loopback_v4, is_loopback_v6},
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Serialize;

use crate::{
    cgroup::glob_match,
    compile::{Compiled, tai_offset_ns},
    geo::GeoDb,
    policy::{Policy, Proto},
};

/// One connection to explain.
pub struct Query {
    /// Cgroup path relative to the cgroup v2 mount.
    pub cgroup: String,
    pub dst: IpAddr,
    pub port: u16,
    pub proto: Proto,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Answer {
    pub verdict: &'static str,
    pub reason: &'static str,
    pub reason_code: u8,
    /// Human sentence naming the rule that decided.
    pub rule: String,
    pub workload_domain: Option<String>,
    /// The pattern that put the workload in its domain.
    pub workload_pattern: Option<String>,
    pub dst_domain: Option<String>,
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

/// IPv4-mapped IPv6 is decided as IPv4, as in the kernel.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

pub fn explain(policy: &Policy, c: &Compiled, geo: &GeoDb, q: &Query, now_unix_ns: i64) -> Answer {
    let dst = canonical(q.dst);
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
    let local_id = local_idx as u32 + 1;
    let mut local: DomainRec = c
        .domains
        .iter()
        .find(|(id, _)| *id == local_id)
        .map(|(_, r)| *r)
        .unwrap_or_default();
    // The verdict comes from the kernel's own lookup; the network list
    // only names the rule.
    let class = *c.addr.class(dst);
    let peer_id = class.domain;
    let net = net_domain(c, dst).filter(|(_, d)| *d == peer_id);
    let loopback = match dst {
        IpAddr::V4(a) => is_loopback_v4(a.octets()),
        IpAddr::V6(a) => is_loopback_v6(a.octets()),
    };
    if peer_id == 0 && loopback {
        local.flags &=
            !(agent_common::maps::DOMAIN_EGRESS_GEO | agent_common::maps::DOMAIN_INGRESS_GEO);
    }
    let bridges = c.bridges.get(&(local_id as u16, peer_id as u16));
    let g = (peer_id == 0).then_some(class.geo);
    let now_tai = (now_unix_ns.saturating_add(tai_offset_ns())).max(0) as u64;
    let d = decide(
        Direction::Egress,
        local_id,
        &local,
        peer_id,
        bridges,
        q.proto.number(),
        // A new connection: its own port is not chosen yet.
        Ports {
            service: q.port,
            other: 0,
        },
        now_tai,
        g.as_ref(),
    );
    let name = |id: u32| policy.domains.get(id as usize - 1).map(|d| d.name.clone());
    let local_name = policy.domains[local_idx].name.clone();
    let bridge = (d.bridge_id != 0)
        .then(|| {
            c.bridge_names
                .get(d.bridge_id as usize - 1)
                .map(|b| b.name.clone())
        })
        .flatten();
    let svc = format!("{}/{}", q.proto.name(), q.port);
    let rule = match d.reason {
        Reason::DomainExpired => format!("domain {local_name} has expired: it reaches nothing"),
        Reason::SameDomain => format!("{dst} belongs to {local_name}'s own networks"),
        Reason::Bridge => format!(
            "bridge {} opens {svc} from {local_name} to {}",
            bridge.clone().unwrap_or_default(),
            name(peer_id).unwrap_or_default()
        ),
        Reason::BridgeOutsideWindow => format!(
            "bridge {} covers {svc} but is outside its time window",
            bridge.clone().unwrap_or_default()
        ),
        Reason::CrossDomain => format!(
            "{dst} belongs to domain {}; no bridge from {local_name} covers {svc}",
            name(peer_id).unwrap_or_default()
        ),
        Reason::NoDomain => {
            format!("{dst} belongs to no domain and {local_name} has no egress geofence")
        }
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
        other => other.name().to_string(),
    };
    let verdict = match (d.allow, c.config.mode == MODE_AUDIT) {
        (true, _) => "allow",
        (false, true) => "would-deny",
        (false, false) => "deny",
    };
    Answer {
        verdict,
        reason: d.reason.name(),
        reason_code: d.reason as u8,
        rule,
        workload_domain: Some(local_name),
        workload_pattern: Some(pattern.to_string()),
        dst_domain: (peer_id != 0).then(|| name(peer_id)).flatten(),
        dst_network: net.map(|(n, _)| n.to_string()),
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
        s += &format!(
            "destination: domain {d} (network {})\n",
            a.dst_network.as_deref().unwrap_or("?")
        );
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
        }
    }

    /// A placed pod's cgroup is deeper than the path rule above it, so its
    /// domain wins, for the pod and its containers, as in the kernel.
    #[test]
    fn placed_pods_decide_below_their_path_rule() {
        let (p, mut c) = setup(&POLICY.replace("/prod.slice", "/prod.slice\", \"/k"));
        c.place_pods(&[crate::k8s::Assignment {
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
}
