//! The validated policy, as the rest of the agent sees it. Produced only by
//! [`super::load`] / [`super::parse_str`]; every cross-reference is already
//! checked, so consumers never re-validate.

use std::path::PathBuf;

use bulkhead_common::{DomainId, proto};
use ipnet::IpNet;

pub use crate::selector::{Operator, PodSelector, Requirement};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Deny what the policy denies.
    Enforce,
    /// Decide and log (`verdict: "would-deny"`), never block.
    Audit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditLevel {
    /// Record denials (and bridge crossings, which are always recorded).
    Deny,
    /// Record allowed connections too.
    All,
}

/// ISO 3166-1 alpha-2 code, upper case ASCII, e.g. `*b"DE"`.
pub type Country = [u8; 2];

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CountryList {
    Allow(Vec<Country>),
    Deny(Vec<Country>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnknownCountry {
    Allow,
    Deny,
}

/// `egress:` or `ingress:` of a domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GeoRule {
    pub countries: CountryList,
    /// For addresses no geo source places. Default: `deny` with an allow
    /// list, `allow` with a deny list.
    pub unknown_country: UnknownCountry,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Domain {
    pub name: String,
    /// Cgroup paths relative to the cgroup v2 mount, starting with `/`;
    /// `*` matches within one path segment.
    pub cgroups: Vec<String>,
    /// Kubernetes pods chosen by namespace and labels; the agent places
    /// their cgroups in this domain once the pod watch reports them.
    pub pods: Vec<PodSelector>,
    pub networks: Vec<IpNet>,
    /// Unix time in nanoseconds (UTC); after it the domain reaches nothing.
    pub expires: Option<i64>,
    pub egress: Option<GeoRule>,
    pub ingress: Option<GeoRule>,
    pub audit: AuditLevel,
    /// `allow_raw_sockets: true` lets the domain's workloads open raw IP and
    /// packet sockets (default false).
    pub allow_raw_sockets: bool,
    /// `egress.names`: destinations by the DNS names they were looked up
    /// by.
    pub names: Option<NameList>,
    /// `dns:` the resolvers whose answers count; set whenever `names` is.
    pub dns: Option<Dns>,
}

/// `egress.names`: lower-case names without the trailing dot; `*.x`
/// stands for every name below `x`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NameList {
    Allow(Vec<String>),
    Deny(Vec<String>),
}

impl NameList {
    pub fn names(&self) -> &[String] {
        match self {
            NameList::Allow(n) | NameList::Deny(n) => n,
        }
    }
}

/// A domain's `dns:`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dns {
    /// The only resolvers the domain may query, and whose answers teach it
    /// the addresses of names.
    pub resolvers: Vec<std::net::IpAddr>,
    /// A learned address counts at least this long (seconds), whatever the
    /// answer's TTL, so clients that cache a little longer keep working.
    pub min_ttl: u32,
    /// ... and at most this long.
    pub max_ttl: u32,
}

impl Dns {
    pub const DEFAULT_MIN_TTL: u32 = 60;
    pub const DEFAULT_MAX_TTL: u32 = 86_400;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

/// Numbers and names from the one protocol table, `bulkhead_common::proto`.
impl Proto {
    pub const fn number(self) -> u8 {
        match self {
            Proto::Tcp => proto::PROTO_TCP,
            Proto::Udp => proto::PROTO_UDP,
        }
    }

    pub fn name(self) -> &'static str {
        proto::proto_name(self.number()).expect("tcp and udp are in the protocol table")
    }

    /// `tcp` or `udp`: the protocols a port rule can name.
    pub fn from_name(name: &str) -> Option<Proto> {
        match proto::proto_number(name)? {
            proto::PROTO_TCP => Some(Proto::Tcp),
            proto::PROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }
}

/// `tcp/443` or `tcp/8000-8100` (inclusive).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub proto: Proto,
    pub lo: u16,
    pub hi: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bridge {
    pub name: String,
    /// Index into [`Policy::domains`].
    pub from: usize,
    pub to: usize,
    pub ports: Vec<PortRange>,
    /// Unix ns (UTC); `None` = already open.
    pub not_before: Option<i64>,
    /// Unix ns (UTC); `None` = never expires.
    pub expires: Option<i64>,
    pub reason: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GeoSources {
    /// MaxMind-format country databases, in lookup order.
    pub databases: Vec<PathBuf>,
    /// RFC 8805 geofeeds; they override the databases.
    pub geofeeds: Vec<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The file it was read from (as given).
    pub path: PathBuf,
    /// Hex SHA-256 of the file's bytes.
    pub sha256: String,
    pub version: u32,
    pub mode: Mode,
    pub geo: GeoSources,
    /// In file order; the kernel's id is [`DomainId::from_index`].
    pub domains: Vec<Domain>,
    pub bridges: Vec<Bridge>,
    /// Which domain pairs may get just-in-time bridges (`bulkhead bridge
    /// open`), and for how long at most. Pairs not listed get none.
    pub jit_bridges: Vec<JitRule>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JitRule {
    /// Indexes into [`Policy::domains`].
    pub from: usize,
    pub to: usize,
    /// Longest time a just-in-time bridge of this pair may stay open.
    pub max_secs: u64,
}

impl Policy {
    /// The kernel's id of a domain ([`DomainId::from_index`]).
    pub fn domain_id(&self, name: &str) -> Option<u32> {
        self.domains
            .iter()
            .position(|d| d.name == name)
            .map(|i| DomainId::from_index(i).raw())
    }
}
