//! From the YAML tree to a [`Policy`], collecting every problem on the way.
//!
//! Each field is checked on its own and a bad one only adds a message (the
//! value falls back to a default), so one run reports all problems. The
//! policy is returned only when there were none.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use bulkhead_common::maps::{MAX_BRIDGE_RULES, MAX_DOMAINS};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::model::*;
use super::yaml::{Kind, Node, Pos};
use super::{country, glob};
use crate::duration::parse_duration;

/// Domain ids are 1..=63: id 0 means "no domain" and ids are bit positions
/// in the kernel's 64-bit geo masks.
const MAX_DOMAIN_COUNT: usize = MAX_DOMAINS as usize - 1;
const MAX_NAME_LEN: usize = 63;

pub(super) fn policy(
    root: &Node,
    path: &Path,
    sha256: String,
) -> Result<Policy, Vec<(Pos, String)>> {
    let mut cx = Checker::default();
    let policy = cx.top(root, path, sha256);
    if cx.problems.is_empty() {
        Ok(policy)
    } else {
        Err(cx.problems)
    }
}

#[derive(Default)]
struct Checker {
    problems: Vec<(Pos, String)>,
    /// Kept with their positions for the checks across domains.
    networks: Vec<Located<IpNet>>,
    cgroups: Vec<Located<String>>,
}

struct Located<T> {
    value: T,
    pos: Pos,
    domain: usize,
}

/// A network as the overlap check reads it: IPv4-mapped IPv6 as IPv4, the
/// way the kernel decides such destinations (`bulkhead_common::maps::v4_mapped`).
struct View {
    net: IpNet,
    /// Into [`Checker::networks`].
    index: usize,
    how: How,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum How {
    AsWritten,
    /// `::ffff:a.b.c.d/N`, N >= 96: the IPv4 network it spells.
    Mapped,
    /// All of IPv4, for an IPv6 network around `::ffff:0:0/96`; the
    /// network is also seen as written.
    HoldsMapped,
}

impl View {
    fn of(net: IpNet, index: usize) -> Vec<View> {
        let view = |net, how| View { net, index, how };
        let IpNet::V6(v6) = net else {
            return vec![view(net, How::AsWritten)];
        };
        if let Some(v4) = v6.network().to_ipv4_mapped()
            && let Some(len) = v6.prefix_len().checked_sub(96)
        {
            return vec![view(IpNet::V4(Ipv4Net::new_assert(v4, len)), How::Mapped)];
        }
        let all_v4 = Ipv4Net::new_assert(Ipv4Addr::UNSPECIFIED, 0);
        let mapped = Ipv6Net::new_assert(Ipv4Addr::UNSPECIFIED.to_ipv6_mapped(), 96);
        if v6.contains(&mapped) {
            // Its mapped part decides nothing in the kernel (those
            // destinations are looked up as IPv4), but the policy still
            // gives them to this domain: that is the overlap to report.
            return vec![
                view(net, How::AsWritten),
                view(IpNet::V4(all_v4), How::HoldsMapped),
            ];
        }
        vec![view(net, How::AsWritten)]
    }

    /// `written` for a message, with how it is read when that differs.
    fn describe(&self, written: IpNet) -> String {
        match self.how {
            How::AsWritten => format!("`{written}`"),
            How::Mapped => format!("`{written}` (IPv4-mapped: {})", self.net),
            How::HoldsMapped => format!(
                "`{written}` (holds all IPv4-mapped addresses, decided as IPv4: {})",
                self.net
            ),
        }
    }
}

/// A bridge with what [`Checker::bridges`] needs to check bridges together.
struct Checked {
    bridge: Bridge,
    /// Where its name is, if it has a valid one (for duplicates).
    name_pos: Option<Pos>,
    /// Where its ports are, if both ends are valid (for the per-pair limit).
    ports_pos: Option<Pos>,
}

/// The entries of a YAML mapping that stands for a struct.
struct Fields<'a> {
    pos: Pos,
    /// Key, where the key is, value.
    entries: Vec<(&'a str, Pos, &'a Node)>,
}

impl<'a> Fields<'a> {
    /// An optional field; an explicit null (`expires:`) counts as absent.
    fn get(&self, name: &str) -> Option<&'a Node> {
        self.entries
            .iter()
            .find(|(key, _, node)| *key == name && !matches!(node.kind, Kind::Null))
            .map(|(_, _, node)| *node)
    }
}

impl Checker {
    fn problem(&mut self, pos: Pos, message: impl Into<String>) {
        self.problems.push((pos, message.into()));
    }

    fn top(&mut self, root: &Node, path: &Path, sha256: String) -> Policy {
        let mut policy = Policy {
            path: path.to_owned(),
            sha256,
            version: 1,
            mode: Mode::Enforce,
            geo: GeoSources::default(),
            domains: Vec::new(),
            bridges: Vec::new(),
            jit_bridges: Vec::new(),
        };
        if matches!(root.kind, Kind::Null) {
            self.problem(
                Pos::START,
                "the policy is empty (expected `version: 1` and `domains:`)",
            );
            return policy;
        }
        let known = [
            "version",
            "mode",
            "geo",
            "domains",
            "bridges",
            "jit_bridges",
        ];
        let Some(top) = self.fields(root, "the policy", &known) else {
            return policy;
        };

        if let Some(node) = self.required(&top, "version") {
            match node.kind {
                Kind::Int(1) => {}
                Kind::Int(v) => {
                    self.problem(
                        node.pos,
                        format!("unsupported `version: {v}`; this agent reads version 1"),
                    );
                }
                _ => self.wrong_type(node, "`version`", "the number 1"),
            }
        }
        if let Some(node) = top.get("mode") {
            let choices = [("enforce", Mode::Enforce), ("audit", Mode::Audit)];
            policy.mode = self.choice(node, "mode", &choices).unwrap_or(Mode::Enforce);
        }
        if let Some(node) = top.get("geo") {
            policy.geo = self.geo(node);
        }
        if let Some(node) = self.required(&top, "domains") {
            policy.domains = self.domains(node);
        }
        if let Some(node) = top.get("bridges") {
            policy.bridges = self.bridges(node, &policy.domains);
        }
        if let Some(node) = top.get("jit_bridges") {
            policy.jit_bridges = self.jit_rules(node, &policy.domains);
        }
        self.overlapping_networks(&policy.domains);
        self.overlapping_cgroups(&policy.domains);
        policy
    }

    fn geo(&mut self, node: &Node) -> GeoSources {
        let mut geo = GeoSources::default();
        let Some(fields) = self.fields(node, "`geo`", &["databases", "geofeeds"]) else {
            return geo;
        };
        for (name, list) in [
            ("databases", &mut geo.databases),
            ("geofeeds", &mut geo.geofeeds),
        ] {
            let Some(node) = fields.get(name) else {
                continue;
            };
            for (path, pos) in self.strings(node, name) {
                if path.is_empty() {
                    self.problem(pos, format!("empty path in `{name}`"));
                }
                list.push(PathBuf::from(path));
            }
        }
        geo
    }

    fn domains(&mut self, node: &Node) -> Vec<Domain> {
        let Kind::Map(entries) = &node.kind else {
            self.wrong_type(node, "`domains`", "a mapping of domain names to domains");
            return Vec::new();
        };
        let mut domains = Vec::new();
        let mut seen: HashMap<&str, Pos> = HashMap::new();
        for (key, value) in entries {
            let Kind::Str(name) = &key.kind else {
                self.problem(
                    key.pos,
                    format!(
                        "domain name must be a string, not {}; quote it",
                        key.kind.describe()
                    ),
                );
                continue;
            };
            if let Some(first) = seen.get(name.as_str()) {
                self.problem(
                    key.pos,
                    format!("duplicate domain `{name}` (first defined at {first})"),
                );
                continue;
            }
            seen.insert(name, key.pos);
            if let Err(why) = check_name(name) {
                self.problem(key.pos, format!("domain name `{name}` {why}"));
            }
            if domains.len() == MAX_DOMAIN_COUNT {
                self.problem(
                    key.pos,
                    format!("too many domains: the kernel supports at most {MAX_DOMAIN_COUNT}"),
                );
            }
            let domain = self.domain(name, key.pos, value, domains.len());
            domains.push(domain);
        }
        domains
    }

    fn domain(&mut self, name: &str, name_pos: Pos, node: &Node, index: usize) -> Domain {
        let mut domain = Domain {
            name: name.to_owned(),
            cgroups: Vec::new(),
            pods: Vec::new(),
            networks: Vec::new(),
            expires: None,
            egress: None,
            ingress: None,
            audit: AuditLevel::Deny,
            allow_raw_sockets: false,
            names: None,
            dns: None,
        };
        let known = [
            "cgroups",
            "pods",
            "networks",
            "expires",
            "egress",
            "ingress",
            "audit",
            "allow_raw_sockets",
            "dns",
        ];
        let Some(fields) = self.fields(node, &format!("domain `{name}`"), &known) else {
            return domain;
        };

        // Without cgroups or pods the domain would hold no workload: surely
        // a mistake.
        let cgroups = fields.get("cgroups");
        let pods = fields.get("pods");
        let no_workloads = match (cgroups, pods) {
            (None, None) => Some(name_pos),
            (Some(c), None) if is_empty_list(c) => Some(c.pos),
            (None, Some(p)) if is_empty_list(p) => Some(p.pos),
            (Some(c), Some(p)) if is_empty_list(c) && is_empty_list(p) => Some(c.pos),
            _ => None,
        };
        if let Some(pos) = no_workloads {
            self.problem(
                pos,
                format!("domain `{name}` has no `cgroups` and no `pods`"),
            );
        }
        if let Some(node) = pods {
            domain.pods = self.pod_selectors(node);
        }
        if let Some(node) = cgroups {
            for (pattern, pos) in self.strings(node, "cgroups") {
                match glob::check(pattern) {
                    Ok(()) => {
                        let value = pattern.to_owned();
                        self.cgroups.push(Located {
                            value,
                            pos,
                            domain: index,
                        });
                    }
                    Err(why) => self.problem(pos, why),
                }
                domain.cgroups.push(pattern.to_owned());
            }
        }
        if let Some(node) = fields.get("networks") {
            for (text, pos) in self.strings(node, "networks") {
                match parse_network(text) {
                    Ok(net) => {
                        domain.networks.push(net);
                        self.networks.push(Located {
                            value: net,
                            pos,
                            domain: index,
                        });
                    }
                    Err(why) => self.problem(pos, why),
                }
            }
        }
        if let Some(node) = fields.get("expires") {
            domain.expires = self.time(node, "expires");
        }
        if let Some(node) = fields.get("egress") {
            (domain.egress, domain.names) = self.egress(node);
        }
        if let Some(node) = fields.get("dns") {
            domain.dns = self.dns(node);
        }
        if let (Some(_), None) = (&domain.names, &domain.dns)
            && let Some(node) = fields.get("egress")
        {
            self.problem(
                node.pos,
                "`egress.names` needs `dns: { resolvers: [...] }`: the resolvers whose answers count",
            );
        }
        if let Some(node) = fields.get("ingress") {
            domain.ingress = self.geo_rule(node, "ingress");
        }
        if let Some(node) = fields.get("audit") {
            let choices = [("deny", AuditLevel::Deny), ("all", AuditLevel::All)];
            domain.audit = self
                .choice(node, "audit", &choices)
                .unwrap_or(AuditLevel::Deny);
        }
        if let Some(node) = fields.get("allow_raw_sockets") {
            match node.kind {
                Kind::Bool(b) => domain.allow_raw_sockets = b,
                _ => self.wrong_type(node, "`allow_raw_sockets`", "true or false"),
            }
        }
        domain
    }

    /// `pods:` — Kubernetes label selectors inside namespaces, spelled as
    /// in Kubernetes but with the policy's snake_case keys.
    fn pod_selectors(&mut self, node: &Node) -> Vec<PodSelector> {
        let Kind::Seq(items) = &node.kind else {
            self.wrong_type(node, "`pods`", "a list of selectors");
            return Vec::new();
        };
        let known = ["namespaces", "match_labels", "match_expressions"];
        let mut out = Vec::new();
        for item in items {
            let Some(fields) = self.fields(item, "a pod selector", &known) else {
                continue;
            };
            let mut sel = PodSelector::default();
            // Namespaces are required: labels are chosen by whoever creates
            // the pod, namespaces by whoever may create pods there.
            if let Some(ns) = self.required(&fields, "namespaces") {
                if is_empty_list(ns) {
                    self.problem(ns.pos, "`namespaces` must name at least one namespace");
                }
                for (name, pos) in self.strings(ns, "namespaces") {
                    match check_dns_label(name) {
                        Ok(()) => sel.namespaces.push(name.to_owned()),
                        Err(why) => self.problem(pos, format!("namespace `{name}`: {why}")),
                    }
                }
            }
            if let Some(labels) = fields.get("match_labels")
                && let Some(labels) = self.mapping(labels, "`match_labels`", None)
            {
                for (key, key_pos, value) in labels.entries {
                    if let Err(why) = check_label_key(key) {
                        self.problem(key_pos, format!("label key `{key}`: {why}"));
                        continue;
                    }
                    let Some(value) = self.label_value(value) else {
                        continue;
                    };
                    sel.match_labels.insert(key.to_owned(), value);
                }
            }
            if let Some(exprs) = fields.get("match_expressions") {
                if let Kind::Seq(items) = &exprs.kind {
                    for e in items {
                        if let Some(r) = self.requirement(e) {
                            sel.match_expressions.push(r);
                        }
                    }
                } else {
                    self.wrong_type(exprs, "`match_expressions`", "a list");
                }
            }
            out.push(sel);
        }
        out
    }

    fn requirement(&mut self, node: &Node) -> Option<Requirement> {
        let fields = self.fields(node, "a match expression", &["key", "operator", "values"])?;
        let key_node = self.required(&fields, "key");
        let op_node = self.required(&fields, "operator");
        let key = key_node.and_then(|n| Some((self.string(n, "key")?, n.pos)));
        if let Some((key, pos)) = key
            && let Err(why) = check_label_key(key)
        {
            self.problem(pos, format!("label key `{key}`: {why}"));
        }
        let choices = [
            ("In", Operator::In),
            ("NotIn", Operator::NotIn),
            ("Exists", Operator::Exists),
            ("DoesNotExist", Operator::DoesNotExist),
        ];
        let operator = op_node.and_then(|n| self.choice(n, "operator", &choices));
        let mut values = Vec::new();
        let values_node = fields.get("values");
        if let Some(n) = values_node {
            if let Kind::Seq(items) = &n.kind {
                values.extend(items.iter().filter_map(|v| self.label_value(v)));
            } else {
                self.wrong_type(n, "`values`", "a list");
            }
        }
        let operator = operator?;
        match (operator, values_node) {
            (Operator::In | Operator::NotIn, None) => {
                self.problem(fields.pos, "operators `In` and `NotIn` need `values`");
            }
            (Operator::In | Operator::NotIn, Some(n)) if is_empty_list(n) => {
                self.problem(n.pos, "operators `In` and `NotIn` need at least one value");
            }
            (Operator::Exists | Operator::DoesNotExist, Some(n)) if !is_empty_list(n) => {
                self.problem(
                    n.pos,
                    "operators `Exists` and `DoesNotExist` take no `values`",
                );
            }
            _ => {}
        }
        Some(Requirement {
            key: key?.0.to_owned(),
            operator,
            values,
        })
    }

    /// Label values are strings in Kubernetes; a bare `1` or `true` in
    /// YAML is not, and would never match.
    fn label_value(&mut self, node: &Node) -> Option<String> {
        let Kind::Str(v) = &node.kind else {
            let found = node.kind.describe();
            self.problem(
                node.pos,
                format!("label value: expected a string (quote it), found {found}"),
            );
            return None;
        };
        match check_label_value(v) {
            Ok(()) => Some(v.clone()),
            Err(why) => {
                self.problem(node.pos, format!("label value `{v}`: {why}"));
                None
            }
        }
    }

    /// `egress:` — a country rule, names, or both.
    fn egress(&mut self, node: &Node) -> (Option<GeoRule>, Option<NameList>) {
        let Some(fields) =
            self.fields(node, "`egress`", &["countries", "unknown_country", "names"])
        else {
            return (None, None);
        };
        let names = fields.get("names").and_then(|n| self.names(n));
        if fields.get("names").is_some() && fields.get("countries").is_none() {
            if let Some(n) = fields.get("unknown_country") {
                self.problem(n.pos, "`unknown_country` needs `countries`");
            }
            return (None, names);
        }
        (self.geo_fields(&fields), names)
    }

    /// `names: { allow: [...] }` or `{ deny: [...] }`.
    fn names(&mut self, node: &Node) -> Option<NameList> {
        let lists = self.fields(node, "`names`", &["allow", "deny"])?;
        let (list, allow) = match (lists.get("allow"), lists.get("deny")) {
            (Some(n), None) => (n, true),
            (None, Some(n)) => (n, false),
            (Some(_), Some(_)) => {
                self.problem(
                    lists.pos,
                    "`names` takes either `allow` or `deny`, not both",
                );
                return None;
            }
            (None, None) => {
                self.problem(lists.pos, "`names` needs an `allow` or a `deny` list");
                return None;
            }
        };
        if is_empty_list(list) {
            self.problem(list.pos, "empty name list");
        }
        let mut names = Vec::new();
        for (text, pos) in self.strings(list, "names") {
            match check_dns_name(text) {
                Ok(n) if names.contains(&n) => self.problem(pos, format!("`{n}` is listed twice")),
                Ok(n) => names.push(n),
                Err(why) => self.problem(pos, why),
            }
        }
        Some(if allow {
            NameList::Allow(names)
        } else {
            NameList::Deny(names)
        })
    }

    /// `dns: { resolvers: [...], min_ttl: 60s, max_ttl: 1d }`.
    fn dns(&mut self, node: &Node) -> Option<Dns> {
        let fields = self.fields(node, "`dns`", &["resolvers", "min_ttl", "max_ttl"])?;
        let list = self.required(&fields, "resolvers")?;
        if is_empty_list(list) {
            self.problem(list.pos, "empty resolver list");
        }
        let mut resolvers = Vec::new();
        for (text, pos) in self.strings(list, "resolvers") {
            match text.parse::<IpAddr>() {
                Ok(a) => resolvers.push(a),
                Err(_) => self.problem(
                    pos,
                    format!("invalid resolver `{text}` (expected an address like 10.20.0.53 or fd00:20::53)"),
                ),
            }
        }
        let mut ttl = |name: &str, default: u32| -> u32 {
            let Some(n) = fields.get(name) else {
                return default;
            };
            let Some(text) = self.string(n, name) else {
                return default;
            };
            match parse_duration(text) {
                Ok(secs) if secs <= u64::from(u32::MAX) => secs as u32,
                Ok(_) => {
                    self.problem(n.pos, format!("`{name}` is too long"));
                    default
                }
                Err(e) => {
                    self.problem(n.pos, e);
                    default
                }
            }
        };
        let min_ttl = ttl("min_ttl", Dns::DEFAULT_MIN_TTL);
        let max_ttl = ttl("max_ttl", Dns::DEFAULT_MAX_TTL);
        if min_ttl > max_ttl {
            self.problem(fields.pos, "`min_ttl` is longer than `max_ttl`");
        }
        Some(Dns {
            resolvers,
            min_ttl,
            max_ttl,
        })
    }

    fn geo_rule(&mut self, node: &Node, what: &str) -> Option<GeoRule> {
        let fields = self.fields(
            node,
            &format!("`{what}`"),
            &["countries", "unknown_country"],
        )?;
        self.geo_fields(&fields)
    }

    /// The country rule of `egress:` or `ingress:`.
    fn geo_fields(&mut self, fields: &Fields<'_>) -> Option<GeoRule> {
        let unknown = match fields.get("unknown_country") {
            None => None,
            Some(node) => {
                let choices = [
                    ("allow", UnknownCountry::Allow),
                    ("deny", UnknownCountry::Deny),
                ];
                self.choice(node, "unknown_country", &choices)
            }
        };
        let countries = self.required(fields, "countries")?;
        let lists = self.fields(countries, "`countries`", &["allow", "deny"])?;
        let (allow, deny) = (lists.get("allow"), lists.get("deny"));
        let (list, node) = match (allow, deny) {
            (Some(node), None) => (CountryList::Allow(self.countries(node)), node),
            (None, Some(node)) => (CountryList::Deny(self.countries(node)), node),
            (Some(_), Some(_)) => {
                self.problem(
                    lists.pos,
                    "`countries` takes either `allow` or `deny`, not both",
                );
                return None;
            }
            (None, None) => {
                self.problem(lists.pos, "`countries` needs an `allow` or a `deny` list");
                return None;
            }
        };
        if is_empty_list(node) {
            self.problem(node.pos, "empty country list");
        }
        // An allow list means "only these": an unknown country is not among
        // them. A deny list means "all but these": it is not denied.
        let default = match list {
            CountryList::Allow(_) => UnknownCountry::Deny,
            CountryList::Deny(_) => UnknownCountry::Allow,
        };
        Some(GeoRule {
            countries: list,
            unknown_country: unknown.unwrap_or(default),
        })
    }

    fn countries(&mut self, node: &Node) -> Vec<Country> {
        let mut codes = Vec::new();
        for (code, pos) in self.strings(node, "countries") {
            if country::is_known(code) {
                codes.push([code.as_bytes()[0], code.as_bytes()[1]]);
            } else if country::is_known(&code.to_ascii_uppercase()) {
                let upper = code.to_ascii_uppercase();
                self.problem(
                    pos,
                    format!("country codes are upper case: `{upper}`, not `{code}`"),
                );
            } else {
                let message = format!(
                    "unknown country code `{code}` (expected an ISO 3166-1 alpha-2 code like DE)"
                );
                self.problem(pos, message);
            }
        }
        codes
    }

    fn bridges(&mut self, node: &Node, domains: &[Domain]) -> Vec<Bridge> {
        let Kind::Seq(items) = &node.kind else {
            self.wrong_type(node, "`bridges`", "a list of bridges");
            return Vec::new();
        };
        let mut bridges = Vec::new();
        let mut names: HashMap<String, Pos> = HashMap::new();
        // Port ranges per (from, to) pair so far, and where the limit was
        // first exceeded.
        let mut rules: HashMap<(usize, usize), usize> = HashMap::new();
        let mut over_limit: Vec<((usize, usize), Pos)> = Vec::new();
        for item in items {
            let Some(Checked {
                bridge,
                name_pos,
                ports_pos,
            }) = self.bridge(item, domains)
            else {
                continue;
            };
            if let Some(pos) = name_pos {
                if let Some(first) = names.get(&bridge.name) {
                    self.problem(
                        pos,
                        format!("duplicate bridge name `{}` (first at {first})", bridge.name),
                    );
                } else {
                    names.insert(bridge.name.clone(), pos);
                }
            }
            if let Some(pos) = ports_pos {
                let pair = (bridge.from, bridge.to);
                let count = rules.entry(pair).or_default();
                let before = *count;
                *count += bridge.ports.len();
                if before <= MAX_BRIDGE_RULES && *count > MAX_BRIDGE_RULES {
                    over_limit.push((pair, pos));
                }
            }
            bridges.push(bridge);
        }
        for ((from, to), pos) in over_limit {
            let (from_name, to_name) = (&domains[from].name, &domains[to].name);
            let total = rules[&(from, to)];
            self.problem(
                pos,
                format!(
                    "bridges from `{from_name}` to `{to_name}` have {total} port ranges in total; \
                     the kernel holds at most {MAX_BRIDGE_RULES} per domain pair"
                ),
            );
        }
        bridges
    }

    fn bridge(&mut self, node: &Node, domains: &[Domain]) -> Option<Checked> {
        let known = [
            "name",
            "from",
            "to",
            "ports",
            "not_before",
            "expires",
            "reason",
        ];
        let fields = self.fields(node, "a bridge", &known)?;
        let mut bridge = Bridge {
            name: String::new(),
            from: 0,
            to: 0,
            ports: Vec::new(),
            not_before: None,
            expires: None,
            reason: String::new(),
        };
        let mut name_pos = None;
        if let Some(node) = self.required(&fields, "name") {
            match self.string(node, "name") {
                Some("") => self.problem(node.pos, "empty bridge `name`"),
                Some(name) => {
                    bridge.name = name.to_owned();
                    name_pos = Some(node.pos);
                }
                None => {}
            }
        }
        let from = self
            .required(&fields, "from")
            .and_then(|n| self.domain_ref(n, "from", domains));
        let to = self
            .required(&fields, "to")
            .and_then(|n| self.domain_ref(n, "to", domains));
        if let (Some(from), Some(to)) = (from, to) {
            if from == to {
                let pos = fields.get("to").map_or(fields.pos, |n| n.pos);
                let name = &domains[from].name;
                self.problem(
                    pos,
                    format!("bridge from `{name}` to itself; a domain always reaches itself"),
                );
            }
            bridge.from = from;
            bridge.to = to;
        }
        let ports_node = self.required(&fields, "ports");
        if let Some(node) = ports_node {
            if is_empty_list(node) {
                let message = "empty `ports` list; a bridge needs at least one port";
                self.problem(node.pos, message);
            }
            for (text, pos) in self.scalars(node, "ports") {
                match parse_ports(&text) {
                    Ok(range) => bridge.ports.push(range),
                    Err(why) => self.problem(pos, why),
                }
            }
        }
        if let Some(node) = fields.get("not_before") {
            bridge.not_before = self.time(node, "not_before");
        }
        if let Some(node) = fields.get("expires") {
            bridge.expires = self.time(node, "expires");
            if let (Some(start), Some(end)) = (bridge.not_before, bridge.expires)
                && end <= start
            {
                self.problem(
                    node.pos,
                    "`expires` must be after `not_before`; the bridge would never open",
                );
            }
        }
        if let Some(node) = self.required(&fields, "reason") {
            match self.string(node, "reason") {
                Some(reason) if reason.trim().is_empty() => {
                    self.problem(
                        node.pos,
                        "empty `reason`; say why the bridge exists (e.g. a ticket)",
                    );
                }
                Some(reason) => bridge.reason = reason.to_owned(),
                None => {}
            }
        }
        let ports_pos = match (from, to) {
            (Some(from), Some(to)) if from != to => ports_node.map(|n| n.pos),
            _ => None,
        };
        Some(Checked {
            bridge,
            name_pos,
            ports_pos,
        })
    }

    /// `jit_bridges: [{from, to, max_duration}]`.
    fn jit_rules(&mut self, node: &Node, domains: &[Domain]) -> Vec<JitRule> {
        let Kind::Seq(items) = &node.kind else {
            self.wrong_type(node, "`jit_bridges`", "a list of {from, to, max_duration}");
            return Vec::new();
        };
        let mut rules = Vec::new();
        for item in items {
            let Some(f) = self.fields(item, "a jit_bridges entry", &["from", "to", "max_duration"])
            else {
                continue;
            };
            let from = self
                .required(&f, "from")
                .and_then(|n| self.domain_ref(n, "from", domains));
            let to = self
                .required(&f, "to")
                .and_then(|n| self.domain_ref(n, "to", domains));
            let max = self.required(&f, "max_duration").and_then(|n| {
                let text = self.string(n, "max_duration")?;
                match parse_duration(text) {
                    Ok(secs) => Some(secs),
                    Err(e) => {
                        self.problem(n.pos, e);
                        None
                    }
                }
            });
            if let (Some(from), Some(to)) = (from, to)
                && from == to
            {
                self.problem(
                    item.pos,
                    format!(
                        "a jit bridge from `{}` to itself makes no sense",
                        domains[from].name
                    ),
                );
                continue;
            }
            if let (Some(from), Some(to), Some(max_secs)) = (from, to, max) {
                rules.push(JitRule { from, to, max_secs });
            }
        }
        rules
    }

    /// A bridge end: the index of the named domain.
    fn domain_ref(&mut self, node: &Node, what: &str, domains: &[Domain]) -> Option<usize> {
        let name = self.string(node, what)?;
        let index = domains.iter().position(|d| d.name == name);
        if index.is_none() {
            self.problem(node.pos, format!("unknown domain `{name}` in `{what}`"));
        }
        index
    }

    /// Networks are disjoint between domains, so an address belongs to at
    /// most one domain. Overlaps within one domain are harmless.
    fn overlapping_networks(&mut self, domains: &[Domain]) {
        // The kernel decides an IPv4-mapped destination as the IPv4
        // address it embeds, so networks are compared as it reads them.
        let views: Vec<View> = self
            .networks
            .iter()
            .enumerate()
            .flat_map(|(index, n)| View::of(n.value, index))
            .collect();
        // CIDRs either nest or are disjoint, so after sorting by start
        // address (shorter prefix first) the networks containing the
        // current one are exactly those on a stack: O(n log n), not O(n²).
        let mut order: Vec<usize> = (0..views.len()).collect();
        order.sort_by_key(|&v| {
            let n = views[v].net;
            (n.network(), n.prefix_len(), views[v].index)
        });
        let mut stack: Vec<usize> = Vec::new();
        let mut found = Vec::new();
        for &v in &order {
            let net = views[v].net;
            while let Some(&top) = stack.last() {
                if views[top].net.contains(&net) {
                    break;
                }
                stack.pop();
            }
            for &w in &stack {
                let (a, b) = if views[w].index < views[v].index {
                    (&views[w], &views[v])
                } else {
                    (&views[v], &views[w])
                };
                // Two networks around the mapped range overlap as IPv6
                // too: that is the one report.
                if a.how == How::HoldsMapped && b.how == How::HoldsMapped {
                    continue;
                }
                let (na, nb) = (&self.networks[a.index], &self.networks[b.index]);
                if na.domain != nb.domain {
                    let message = format!(
                        "network {} of domain `{}` overlaps {} of domain `{}` (at {})",
                        b.describe(nb.value),
                        domains[nb.domain].name,
                        a.describe(na.value),
                        domains[na.domain].name,
                        na.pos
                    );
                    found.push((nb.pos, message));
                }
            }
            stack.push(v);
        }
        found.sort_by_key(|x| x.0);
        self.problems.extend(found);
    }

    /// A cgroup belongs to at most one domain. Nested patterns (`/a` and
    /// `/a/b`) are fine: the nearest configured ancestor wins.
    fn overlapping_cgroups(&mut self, domains: &[Domain]) {
        let mut found = Vec::new();
        for (i, b) in self.cgroups.iter().enumerate() {
            for a in &self.cgroups[..i] {
                if a.domain != b.domain && glob::may_overlap(&a.value, &b.value) {
                    let (this, other) = (&domains[b.domain].name, &domains[a.domain].name);
                    let message = format!(
                        "cgroup `{}` of domain `{this}` can match the same cgroup as `{}` \
                         of domain `{other}` (at {})",
                        b.value, a.value, a.pos
                    );
                    found.push((b.pos, message));
                }
            }
        }
        self.problems.extend(found);
    }

    // ---- Typed access to nodes; each reports what it expected. ----

    fn wrong_type(&mut self, node: &Node, what: &str, expected: &str) {
        let found = node.kind.describe();
        self.problem(
            node.pos,
            format!("{what}: expected {expected}, found {found}"),
        );
    }

    /// A mapping with the given keys; unknown and repeated keys are reported.
    fn fields<'a>(&mut self, node: &'a Node, what: &str, known: &[&str]) -> Option<Fields<'a>> {
        self.mapping(node, what, Some(known))
    }

    /// A mapping; keys not in `known` (when given) and repeated keys are
    /// reported and skipped. `None` takes any string key (labels).
    fn mapping<'a>(
        &mut self,
        node: &'a Node,
        what: &str,
        known: Option<&[&str]>,
    ) -> Option<Fields<'a>> {
        let Kind::Map(entries) = &node.kind else {
            self.wrong_type(node, what, "a mapping");
            return None;
        };
        let mut fields = Fields {
            pos: node.pos,
            entries: Vec::new(),
        };
        for (key, value) in entries {
            let name = match (&key.kind, known) {
                (Kind::Str(name), None) => name.as_str(),
                (Kind::Str(name), Some(known)) if known.contains(&name.as_str()) => name.as_str(),
                (Kind::Str(name), Some(known)) => {
                    let expected = known.join("`, `");
                    self.problem(
                        key.pos,
                        format!("unknown key `{name}` in {what} (expected `{expected}`)"),
                    );
                    continue;
                }
                (other, _) => {
                    self.problem(
                        key.pos,
                        format!("unexpected key in {what}: {}", other.describe()),
                    );
                    continue;
                }
            };
            if let Some((_, first, _)) = fields.entries.iter().find(|(k, _, _)| *k == name) {
                let first = *first;
                self.problem(
                    key.pos,
                    format!("duplicate key `{name}` (first at {first})"),
                );
                continue;
            }
            fields.entries.push((name, key.pos, value));
        }
        Some(fields)
    }

    /// A required field; its absence is reported at the mapping.
    fn required<'a>(&mut self, fields: &Fields<'a>, name: &str) -> Option<&'a Node> {
        let node = fields.get(name);
        if node.is_none() {
            self.problem(fields.pos, format!("missing required field `{name}`"));
        }
        node
    }

    fn string<'a>(&mut self, node: &'a Node, what: &str) -> Option<&'a str> {
        match &node.kind {
            Kind::Str(s) => Some(s),
            _ => {
                self.wrong_type(node, &format!("`{what}`"), "a string");
                None
            }
        }
    }

    /// A list of strings; wrong items are reported and skipped.
    fn strings<'a>(&mut self, node: &'a Node, what: &str) -> Vec<(&'a str, Pos)> {
        let Kind::Seq(items) = &node.kind else {
            self.wrong_type(node, &format!("`{what}`"), "a list");
            return Vec::new();
        };
        items
            .iter()
            .filter_map(|item| Some((self.string(item, what)?, item.pos)))
            .collect()
    }

    /// A list of scalars as text, for lists where a bare number is a
    /// likely mistake we want to explain (`ports: [443]`).
    fn scalars(&mut self, node: &Node, what: &str) -> Vec<(String, Pos)> {
        let Kind::Seq(items) = &node.kind else {
            self.wrong_type(node, &format!("`{what}`"), "a list");
            return Vec::new();
        };
        let mut out = Vec::new();
        for item in items {
            match &item.kind {
                Kind::Str(s) => out.push((s.clone(), item.pos)),
                Kind::Int(i) => out.push((i.to_string(), item.pos)),
                _ => self.wrong_type(item, &format!("`{what}` item"), "a string"),
            }
        }
        out
    }

    fn choice<T: Copy>(&mut self, node: &Node, what: &str, choices: &[(&str, T)]) -> Option<T> {
        let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
        let expected = names.join(" or ");
        let text = self.string(node, what)?;
        let found = choices
            .iter()
            .find(|(name, _)| *name == text)
            .map(|(_, v)| *v);
        if found.is_none() {
            self.problem(
                node.pos,
                format!("`{what}` must be {expected}, not `{text}`"),
            );
        }
        found
    }

    fn time(&mut self, node: &Node, what: &str) -> Option<i64> {
        let Kind::Str(text) = &node.kind else {
            self.wrong_type(
                node,
                &format!("`{what}`"),
                "an RFC 3339 time like 2027-03-31T00:00:00Z",
            );
            return None;
        };
        let parsed = parse_time(text);
        if let Err(why) = &parsed {
            self.problem(node.pos, format!("`{what}`: {why}"));
        }
        parsed.ok()
    }
}

/// `[]`; other types are reported where the list is read.
fn is_empty_list(node: &Node) -> bool {
    matches!(&node.kind, Kind::Seq(items) if items.is_empty())
}

/// `[a-z0-9][a-z0-9._-]*`, at most 63 characters: safe in file names, log
/// lines and metric labels.
fn check_name(name: &str) -> Result<(), String> {
    let first_ok = name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
    if !first_ok || !rest_ok {
        return Err("must match [a-z0-9][a-z0-9._-]*".to_owned());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("is longer than {MAX_NAME_LEN} characters"));
    }
    Ok(())
}

/// An `egress.names` entry: a DNS name, or `*.` and one, any case, with or
/// without the trailing dot; returned lower case without it. At most
/// `bulkhead_common::dns::MAX_LABELS` labels: the kernel learns no longer
/// names.
fn check_dns_name(text: &str) -> Result<String, String> {
    let lower = text.to_ascii_lowercase();
    let name = lower.strip_suffix('.').unwrap_or(&lower);
    let (wild, rest) = match name.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, name),
    };
    let bad = |why: &str| Err(format!("invalid name `{text}`: {why}"));
    if rest.contains('*') {
        return bad("`*` stands only as the first label, as in `*.example.com`");
    }
    if rest.is_empty() || rest.len() > 253 {
        return bad("expected a DNS name like api.example.com (at most 253 characters)");
    }
    let labels: Vec<&str> = rest.split('.').collect();
    let max = bulkhead_common::dns::MAX_LABELS - usize::from(wild);
    if labels.len() > max {
        return bad(&format!(
            "more than {} labels (bulkhead learns no longer names)",
            bulkhead_common::dns::MAX_LABELS
        ));
    }
    for l in &labels {
        let ok = !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
            && !l.starts_with('-')
            && !l.ends_with('-');
        if !ok {
            return bad(&format!(
                "label `{l}` (letters, digits, `-` and `_`, 1 to 63 characters)"
            ));
        }
    }
    Ok(if wild {
        format!("*.{rest}")
    } else {
        rest.to_owned()
    })
}

/// A Kubernetes namespace name (RFC 1123 label).
fn check_dns_label(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err("not a namespace name (lower case letters, digits and `-`, at most 63)".into())
    }
}

/// The name part of a label key, and a label value (which may be empty).
fn label_word(w: &str) -> bool {
    w.len() <= 63
        && w.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && w.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
        && w.bytes().last().is_none_or(|b| b.is_ascii_alphanumeric())
}

/// `name` or `prefix/name`, as Kubernetes accepts label keys.
fn check_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty() && p.len() <= 253 && p.split('.').all(|l| check_dns_label(l).is_ok())
    });
    if !name.is_empty() && label_word(name) && prefix_ok {
        Ok(())
    } else {
        Err(
            "not a Kubernetes label key ([prefix/]name; name: letters, digits, `-_.`, at most 63)"
                .into(),
        )
    }
}

fn check_label_value(v: &str) -> Result<(), String> {
    if label_word(v) {
        Ok(())
    } else {
        Err("not a Kubernetes label value (letters, digits, `-_.`, at most 63)".into())
    }
}

fn parse_network(text: &str) -> Result<IpNet, String> {
    let Ok(net) = text.parse::<IpNet>() else {
        return Err(match text.parse::<IpAddr>() {
            Ok(addr) => {
                let bits = if addr.is_ipv4() { 32 } else { 128 };
                format!("`{text}` is an address, not a network; write `{addr}/{bits}` for one host")
            }
            Err(_) => format!(
                "invalid network `{text}` (expected a CIDR like 10.20.0.0/16 or fd00:20::/48)"
            ),
        });
    };
    if net.trunc() != net {
        // The kernel would match the truncated prefix anyway; the extra bits
        // usually mean a typo in the prefix length or the address.
        return Err(format!(
            "`{text}` has host bits set, did you mean {}",
            net.trunc()
        ));
    }
    Ok(net)
}

/// `tcp/443` or `udp/8000-8100`.
pub(super) fn parse_ports(text: &str) -> Result<PortRange, String> {
    let Some((proto, ports)) = text.split_once('/') else {
        return Err(format!(
            "port `{text}` needs a protocol, e.g. tcp/{text} or udp/{text}"
        ));
    };
    let Some(proto) = Proto::from_name(proto) else {
        return Err(format!(
            "unknown protocol `{proto}` in `{text}` (expected tcp or udp)"
        ));
    };
    let port = |s: &str| -> Result<u16, String> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("invalid port `{s}` in `{text}`"));
        }
        match s.parse::<u16>() {
            Ok(0) => Err(format!(
                "port 0 in `{text}` is not a real port (ports are 1-65535)"
            )),
            Ok(p) => Ok(p),
            Err(_) => Err(format!(
                "port {s} in `{text}` is out of range (ports are 1-65535)"
            )),
        }
    };
    let (lo, hi) = match ports.split_once('-') {
        Some((lo, hi)) => (port(lo)?, port(hi)?),
        None => {
            let p = port(ports)?;
            (p, p)
        }
    };
    if lo > hi {
        return Err(format!(
            "reversed port range in `{text}` (write {lo}-{hi} as {hi}-{lo})"
        ));
    }
    Ok(PortRange { proto, lo, hi })
}

/// RFC 3339 to unix nanoseconds.
fn parse_time(text: &str) -> Result<i64, String> {
    let t = OffsetDateTime::parse(text, &Rfc3339).map_err(|e| {
        format!("invalid time `{text}` ({e}); expected RFC 3339 like 2027-03-31T00:00:00Z")
    })?;
    i64::try_from(t.unix_timestamp_nanos())
        .map_err(|_| format!("time `{text}` is out of range (1677-09-21 to 2262-04-11)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports() {
        let tcp = |lo, hi| {
            Ok(PortRange {
                proto: Proto::Tcp,
                lo,
                hi,
            })
        };
        assert_eq!(parse_ports("tcp/443"), tcp(443, 443));
        assert_eq!(parse_ports("tcp/8000-8100"), tcp(8000, 8100));
        assert_eq!(parse_ports("tcp/1-65535"), tcp(1, 65535));
        assert_eq!(
            parse_ports("udp/53"),
            Ok(PortRange {
                proto: Proto::Udp,
                lo: 53,
                hi: 53
            })
        );
        for (bad, why) in [
            ("tcp/0", "port 0"),
            ("tcp/70000", "out of range"),
            ("tcp/65536", "out of range"),
            ("sctp/1", "unknown protocol `sctp`"),
            ("TCP/1", "unknown protocol `TCP`"),
            ("tcp/9-3", "reversed port range"),
            ("443", "needs a protocol"),
            ("tcp/", "invalid port ``"),
            ("tcp/+5", "invalid port `+5`"),
            ("tcp/1-", "invalid port ``"),
            ("tcp/1-2-3", "invalid port `2-3`"),
            ("tcp/ 80", "invalid port ` 80`"),
        ] {
            let err = parse_ports(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn networks() {
        assert_eq!(
            parse_network("10.20.0.0/16"),
            Ok("10.20.0.0/16".parse().unwrap())
        );
        assert_eq!(
            parse_network("fd00:20::/48"),
            Ok("fd00:20::/48".parse().unwrap())
        );
        assert_eq!(parse_network("0.0.0.0/0"), Ok("0.0.0.0/0".parse().unwrap()));
        assert_eq!(
            parse_network("10.0.0.1/8").unwrap_err(),
            "`10.0.0.1/8` has host bits set, did you mean 10.0.0.0/8"
        );
        assert!(
            parse_network("fd00:20::1/48")
                .unwrap_err()
                .contains("did you mean fd00:20::/48")
        );
        assert!(
            parse_network("10.0.0.1")
                .unwrap_err()
                .contains("write `10.0.0.1/32`")
        );
        assert!(
            parse_network("10.0.0.0/33")
                .unwrap_err()
                .contains("invalid network")
        );
        assert!(
            parse_network("banana")
                .unwrap_err()
                .contains("invalid network")
        );
    }

    #[test]
    fn times() {
        assert_eq!(parse_time("1970-01-01T00:00:01Z"), Ok(1_000_000_000));
        assert_eq!(
            parse_time("2027-03-31T00:00:00Z"),
            Ok(1_806_451_200_000_000_000)
        );
        assert_eq!(
            parse_time("2027-03-31T02:00:00+02:00"),
            Ok(1_806_451_200_000_000_000)
        );
        assert!(parse_time("2027-03-31").is_err());
        assert!(parse_time("2027-02-30T00:00:00Z").is_err());
        assert!(
            parse_time("3000-01-01T00:00:00Z")
                .unwrap_err()
                .contains("out of range")
        );
    }

    #[test]
    fn names() {
        for ok in ["a", "0", "core-staging", "a.b_c-d", &"x".repeat(63)] {
            assert_eq!(check_name(ok), Ok(()), "{ok}");
        }
        for bad in ["", "-a", ".a", "A", "a b", "a/b", "ä", &"x".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
