//! Map names, sizes, keys and values shared by the kernel programs and the agent.
//!
//! Policy maps are double-buffered: every key carries a `slot` (0 or 1), or
//! every array holds both slots one after the other. The
//! agent writes a new policy completely into the inactive slot and then
//! flips [`State::generation`] in one 8-byte write; each program reads that
//! word once per decision, so a decision never mixes two policies.

/// Highest domain id + 1. Domain id 0 means "no domain"; ids are bit
/// positions in the geo deny masks, so at most 63 domains.
pub const MAX_DOMAINS: u32 = 64;
/// Port/proto rules per (from, to) domain pair.
pub const MAX_BRIDGE_RULES: usize = 16;
/// Cgroup levels walked to find the nearest configured ancestor.
pub const MAX_CGROUP_DEPTH: usize = 16;
/// Configured cgroups per slot.
pub const MAX_CGROUPS: u32 = 16 * 1024;
/// Bridge (from, to) pairs per slot.
pub const MAX_BRIDGE_PAIRS: u32 = 1024;
/// Number of per-CPU counters; see [`counter_index`].
pub const NUM_COUNTERS: u32 = 8 * crate::reason::REASON_SLOTS + 16;

pub const MAP_STATE: &str = "BH_STATE";
pub const MAP_CONFIG: &str = "BH_CONFIG";
pub const MAP_CGROUPS: &str = "BH_CGROUPS";
pub const MAP_DOMAINS: &str = "BH_DOMAINS";
/// The address table's words and classes ([`crate::addr`]).
pub const MAP_ADDR: &str = "BH_ADDR";
pub const MAP_CLASSES: &str = "BH_CLASSES";
pub const MAP_BRIDGES: &str = "BH_BRIDGES";
pub const MAP_SOCKS: &str = "BH_SOCKS";
pub const MAP_EVENTS: &str = "BH_EVENTS";
pub const MAP_COUNTERS: &str = "BH_COUNTERS";
pub const MAP_RATE: &str = "BH_RATE";
pub const MAP_DOMAIN_COUNTERS: &str = "BH_DOMSTATS";
/// `BH_LISTEN[0]`: bumped by every bind (`post_bind`), so a remembered
/// datagram verdict ([`SendCache`]) that named no listener, or another
/// one, is not used after a socket binds.
pub const MAP_LISTEN: &str = "BH_LISTEN";
/// One `i64`: CLOCK_TAI minus CLOCK_BOOTTIME in nanoseconds, which the
/// agent keeps current on kernels without `bpf_ktime_get_tai_ns` (before
/// 6.1); the programs there read TAI as boot time plus this. Pinned, so
/// expiry still runs while no agent does (on the last offset written).
pub const MAP_CLOCK: &str = "BH_CLOCK";
/// The `.rodata` flag the agent sets at load where the kernel lacks
/// `bpf_ktime_get_tai_ns` (1); the verifier then never sees that branch.
pub const GLOBAL_NO_TAI: &str = "BH_NO_TAI";
/// The names each domain's `egress.names` rules mention ([`NameKey`]).
pub const MAP_NAMES: &str = "BH_NAMES";
/// Each domain's `dns.resolvers` ([`ResolverKey`]).
pub const MAP_RESOLVERS: &str = "BH_RESOLVERS";
/// Addresses learned from answers ([`LearnedKey`] → [`Learned`]); kept
/// across policy generations and agents, expired by the kernel.
pub const MAP_LEARNED: &str = "BH_LEARNED";
/// Queries sent to a resolver and not answered yet ([`DnsQueryKey`]).
pub const MAP_DNS_QUERIES: &str = "BH_DNSQ";
/// Where the next answer of each DNS-over-TCP stream starts (socket cookie
/// → TCP sequence number).
pub const MAP_DNS_STREAMS: &str = "BH_DNST";
/// Answers sent by a domain's own sockets ([`ForgedKey`]): they teach
/// that domain nothing.
pub const MAP_DNS_FORGED: &str = "BH_DNSF";
/// Program arrays of one entry each: `bh_dns_egress` and `bh_dns_ingress`,
/// which the packet hooks enter by a tail call for a packet they let pass
/// under a policy that uses names. Never attached themselves, so every
/// other packet costs no second program. Pinned: the kernel empties a
/// program array when the last file or pin holding it goes, and learning
/// must go on while no agent runs.
pub const MAP_DNS_EGRESS_TAIL: &str = "BH_DNSOUT";
pub const MAP_DNS_INGRESS_TAIL: &str = "BH_DNSIN";
/// Learned addresses kept at most; the least recently used go first.
pub const MAX_LEARNED: u32 = 64 * 1024;
/// `egress.names` entries per slot, all domains together.
pub const MAX_NAMES: u32 = 8 * 1024;
/// `dns.resolvers` entries per slot, all domains together.
pub const MAX_RESOLVERS: u32 = 1024;

/// Per-domain decision counters: `BH_DOMSTATS[domain * REASON_SLOTS + reason]`.
pub const NUM_DOMAIN_COUNTERS: u32 = MAX_DOMAINS * crate::reason::REASON_SLOTS;

pub const fn domain_counter_index(domain: u32, reason: u8) -> u32 {
    (domain % MAX_DOMAINS) * crate::reason::REASON_SLOTS
        + (reason as u32 % crate::reason::REASON_SLOTS)
}

/// Counter slots after the per-hook reason rows.
pub const COUNTER_EVENTS_WANTED: u32 = 8 * crate::reason::REASON_SLOTS;
pub const COUNTER_EVENTS_RATE_LIMITED: u32 = COUNTER_EVENTS_WANTED + 1;
pub const COUNTER_EVENTS_LOST: u32 = COUNTER_EVENTS_WANTED + 2;
/// Established sockets whose packets the packet hooks started to deny
/// ([`SOCK_CUT`]): the agent destroys the ones it can reach.
pub const COUNTER_CUT_MARKED: u32 = COUNTER_EVENTS_WANTED + 3;
/// Addresses written to [`MAP_LEARNED`] from answers.
pub const COUNTER_DNS_LEARNED: u32 = COUNTER_EVENTS_WANTED + 4;
/// Answers from a resolver to a domain that uses names that taught
/// nothing because no query of the receiving socket matched them
/// (transaction id, ports, resolver), or a socket of the receiving domain
/// sent them: spoofed.
pub const COUNTER_DNS_SPOOFED: u32 = COUNTER_EVENTS_WANTED + 5;
/// Answers that matched a query but could not be read (see
/// [`crate::dns`]): nothing learned from them.
pub const COUNTER_DNS_UNREAD: u32 = COUNTER_EVENTS_WANTED + 6;
/// Answers a domain learned addresses from.
pub const COUNTER_DNS_ANSWERS: u32 = COUNTER_EVENTS_WANTED + 7;
/// Addresses that were not in [`MAP_LEARNED`] when learned: what it
/// holds now is this minus what it evicted (nothing else removes them).
pub const COUNTER_DNS_NEW: u32 = COUNTER_EVENTS_WANTED + 8;

/// Index of the counter for one decision of `hook` with `reason`.
pub const fn counter_index(hook: u8, reason: u8) -> u32 {
    (hook as u32 & 7) * crate::reason::REASON_SLOTS + (reason as u32 % crate::reason::REASON_SLOTS)
}

/// The one word every program reads first. Slot in force = `generation & 1`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct State {
    pub generation: u64,
}

pub const MODE_ENFORCE: u32 = 0;
pub const MODE_AUDIT: u32 = 1;

/// Per-slot policy settings (`BH_CONFIG[slot]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// [`MODE_ENFORCE`] or [`MODE_AUDIT`].
    pub mode: u32,
    /// Events a cgroup may emit per second (token bucket refill); 0 = unlimited.
    pub event_rate: u32,
    /// Token bucket depth.
    pub event_burst: u32,
    /// Words of the slot's address table in use (the rest is unreachable).
    pub addr_words: u32,
    /// Classes of the slot's address table in use.
    pub addr_classes: u32,
    /// [`CONFIG_AUDIT_REFUSE`]; not part of the policy: the agent sets it
    /// in both slots at run time (and carries it into every slot it
    /// writes).
    pub flags: u32,
}

/// `Config::flags`: `run --audit-full=refuse` and the audit trail cannot be
/// written: new connects and sendmsgs of domain workloads are refused
/// ([`crate::Reason::AuditUnavailable`]; see
/// [`crate::decide::refused_unaudited`]).
pub const CONFIG_AUDIT_REFUSE: u32 = 1 << 0;
/// `Config::flags`, from the policy: some domain uses names, so the packet
/// hooks hand the packets they allow to the DNS programs
/// ([`MAP_DNS_EGRESS_TAIL`]); without it nothing reads DNS.
pub const CONFIG_NAMES: u32 = 1 << 1;

/// `BH_CGROUPS` key: a configured cgroup (by id) in one slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CgroupKey {
    pub cgroup_id: u64,
    pub slot: u32,
    pub _pad: u32,
}

pub const DOMAIN_EXISTS: u32 = 1 << 0;
/// `audit: all`: allowed connections are recorded too.
pub const DOMAIN_AUDIT_ALL: u32 = 1 << 1;
pub const DOMAIN_EGRESS_GEO: u32 = 1 << 2;
pub const DOMAIN_INGRESS_GEO: u32 = 1 << 3;
pub const DOMAIN_EGRESS_UNKNOWN_DENY: u32 = 1 << 4;
pub const DOMAIN_INGRESS_UNKNOWN_DENY: u32 = 1 << 5;
/// Raw IP and packet sockets are allowed to this domain's workloads.
pub const DOMAIN_ALLOW_RAW: u32 = 1 << 6;
/// `egress.names: { allow: [...] }`.
pub const DOMAIN_NAMES_ALLOW: u32 = 1 << 7;
/// `egress.names: { deny: [...] }`.
pub const DOMAIN_NAMES_DENY: u32 = 1 << 8;
/// The domain uses names: its DNS goes to its resolvers only, and their
/// answers are learned.
pub const DOMAIN_NAMES: u32 = DOMAIN_NAMES_ALLOW | DOMAIN_NAMES_DENY;

/// `BH_DOMAINS[slot * MAX_DOMAINS + id]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DomainRec {
    /// `CLOCK_TAI` nanoseconds after which the domain reaches nothing;
    /// `u64::MAX` for never.
    pub expires_tai_ns: u64,
    pub flags: u32,
    /// A hash of the domain's name: what learned addresses are keyed by
    /// ([`LearnedKey`]), so they outlive policy generations that number
    /// domains differently.
    pub key: u32,
    /// Learned addresses are kept at least this long (seconds), whatever
    /// the answer's TTL (`dns.min_ttl`)...
    pub min_ttl: u32,
    /// ... and at most this long (`dns.max_ttl`).
    pub max_ttl: u32,
}

/// `BH_NAMES` key: a name (or with `wildcard`, the names below it) a
/// domain's `egress.names` rule mentions, by [`crate::dns::name_hash`].
/// The value is the rule's index + 1 in the domain's list.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NameKey {
    pub hash: u64,
    pub slot: u32,
    pub domain: u16,
    pub wildcard: u8,
    pub _pad: u8,
}

/// `BH_RESOLVERS` key: one of a domain's `dns.resolvers`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ResolverKey {
    pub addr: [u8; 16],
    pub slot: u32,
    pub domain: u16,
    pub family: u8,
    pub _pad: u8,
}

/// `BH_LEARNED` key: an address a domain learned ([`DomainRec::key`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LearnedKey {
    pub addr: [u8; 16],
    pub domain_key: u32,
    pub family: u8,
    pub _pad: [u8; 3],
}

/// `BH_LEARNED` value: which rule's name an answer gave the address for,
/// from which resolver, and until when it counts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Learned {
    pub expires_tai_ns: u64,
    pub learned_tai_ns: u64,
    /// The [`NameKey::hash`] that matched: still in the policy in force
    /// (as [`NameKey`] with `wildcard`) or the address counts for nothing.
    pub rule_hash: u64,
    pub resolver: [u8; 16],
    pub wildcard: u8,
    pub resolver_family: u8,
    pub _pad: [u8; 6],
}

/// `BH_DNSQ` key: a query a socket sent to a resolver.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DnsQueryKey {
    pub cookie: u64,
    pub server: [u8; 16],
    pub id: u16,
    /// The socket's own port, as in the header.
    pub port: [u8; 2],
    pub family: u8,
    pub _pad: [u8; 3],
}

/// `BH_DNSF` key: an answer-shaped datagram (from port 53) a domain's
/// socket sent; the value is that domain's [`DomainRec::key`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ForgedKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub dport: [u8; 2],
    pub id: u16,
    pub family: u8,
    pub _pad: [u8; 3],
}

/// The geo verdicts of an address for every domain: bit `d` set in a mask
/// = domain `d` denies it in that direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GeoValue {
    pub egress_deny: u64,
    pub ingress_deny: u64,
}

impl GeoValue {
    /// An address no geo source places. Bit 0 is no domain's (ids start
    /// at 1).
    pub const UNKNOWN: GeoValue = GeoValue {
        egress_deny: 1,
        ingress_deny: 1,
    };

    pub fn is_unknown(&self) -> bool {
        self.egress_deny & 1 != 0
    }
}

/// `BH_BRIDGES` key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BridgeKey {
    pub slot: u32,
    pub from: u16,
    pub to: u16,
}

// The numbers live in the protocol table; here for the kernel side.
pub use crate::proto::{PROTO_TCP, PROTO_UDP};

/// One proto/port-range rule of a bridge, with its validity window.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BridgeRule {
    /// `CLOCK_TAI` ns; 0 = always started.
    pub not_before_tai_ns: u64,
    /// `CLOCK_TAI` ns; `u64::MAX` = never expires.
    pub expires_tai_ns: u64,
    /// Index into the agent's bridge-name table (events name the bridge).
    pub bridge_id: u32,
    pub port_lo: u16,
    pub port_hi: u16,
    pub proto: u8,
    /// [`BRIDGE_REVERSE`].
    pub flags: u8,
    pub _pad: [u8; 6],
}

/// A datagram bridge `A → B` on ports P carries datagrams between any port
/// of A and port P of B both ways: it is also compiled into the rules of
/// `B → A`, flagged so, where it matches on B's own port (the sender's
/// local port) instead of the destination port. That is what lets a
/// server in B answer its clients in A, and A's replies come back, in the
/// sendmsg hooks and in the packet hooks alike.
pub const BRIDGE_REVERSE: u8 = 1;

/// All bridge rules from one domain to another.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BridgeSet {
    pub count: u32,
    pub _pad: u32,
    pub rules: [BridgeRule; MAX_BRIDGE_RULES],
}

/// The socket connected or sent first: packets to its peer are the
/// workload's own egress, packets from the peer are replies.
pub const SOCK_INITIATOR: u64 = 1 << 0;
/// [`SockInfo::last_flow`] holds the last allowed datagram destination.
pub const SOCK_FLOW_SEEN: u64 = 1 << 1;
/// A packet of this established socket was denied (a policy tightened, a
/// bridge or the domain expired): [`SockInfo::cut`] says which, and the
/// agent's socket iterators destroy it (`bpf_sock_destroy`), so the
/// application gets `ECONNABORTED` instead of waiting on a dead flow.
pub const SOCK_CUT: u64 = 1 << 2;

/// The decision that cut an established socket, kept in its storage for
/// the agent's iterator to report once the socket is destroyed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CutRecord {
    pub generation: u64,
    /// The socket's cgroup.
    pub cgroup_id: u64,
    pub local: [u8; 16],
    pub peer: [u8; 16],
    pub bridge_id: u32,
    pub local_port: [u8; 2],
    pub peer_port: [u8; 2],
    pub domain: u16,
    pub peer_domain: u16,
    pub family: u8,
    pub proto: u8,
    pub reason: u8,
    /// The denied packet came from the peer.
    pub ingress: u8,
}

/// An unconnected socket's last allowed datagram flow: with `audit: all`
/// only a datagram to a different destination (or allowed for a different
/// reason) is recorded again.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowKey {
    pub dst: [u8; 16],
    pub port: [u8; 2],
    pub proto: u8,
    pub reason: u8,
    pub _pad: [u8; 4],
}

/// Socket storage (`BH_SOCKS`). On a bound socket: the cgroup ancestry of
/// its owner, so a connect to a local listener is decided by the listener's
/// domain under whatever policy is in force at that moment. On a connecting
/// socket: [`SOCK_INITIATOR`], so the packet hooks know the connection's
/// direction.
///
/// One record for every use, though a connecting TCP socket needs only
/// its flags and verdict: what a connect pays for its creation (about half
/// of `bh_connect4`) is two allocations and their locks, not their size.
/// Measured under the benchmark's short connections: a 56-byte record in
/// a map of its own (a 128-byte slab object instead of this one's 512) took
/// 1.3 µs to create against this one's 1.2; charged to the agent's memory
/// cgroup, 2.2 µs (which `bulkhead prepare` avoids).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockInfo {
    /// `ancestors[i]` = cgroup id at level `i + 1`; 0 past the owner's depth.
    pub ancestors: [u64; MAX_CGROUP_DEPTH],
    pub flags: u64,
    pub last_flow: FlowKey,
    pub verdict: VerdictCache,
    /// Set with [`SOCK_CUT`].
    pub cut: CutRecord,
    pub send: SendCache,
}

/// `BH_DOMCACHE` value: the domain of a cgroup (a task's, or a packet's
/// socket's) under one policy generation, so connects, sends and packets
/// walk a cgroup's ancestry once per generation instead of every time. A cgroup's ancestry never
/// changes (a task that moves gets another cgroup id), and each generation
/// maps cgroups to domains once and for all.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DomainCache {
    pub generation: u64,
    pub domain: u32,
    pub _pad: u32,
}

/// An unconnected datagram socket's last allowed `sendmsg` decision, so
/// the next datagram to the same destination is allowed without deciding
/// again while it holds: the same policy generation, before `until_tai_ns`,
/// sent from the same cgroup, and no socket bound since (`BH_LISTEN`
/// unchanged: a new listener at the destination may belong to another
/// domain). Only allowed decisions are kept; `--audit-full=refuse` skips
/// it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendCache {
    /// 0 = nothing remembered (generations start at 1).
    pub generation: u64,
    pub until_tai_ns: u64,
    /// `BH_LISTEN[0]` before the decision.
    pub listeners: u64,
    /// The sending task's cgroup.
    pub cgroup_id: u64,
    pub dst: [u8; 16],
    pub port: [u8; 2],
    pub proto: u8,
    pub reason: u8,
    /// The sender's domain (its per-domain counters).
    pub domain: u16,
    pub _pad: [u8; 2],
}

/// A socket's last allowed packet verdict, so its later packets are
/// allowed without deciding again while it holds: same policy generation,
/// before `until_tai_ns`, and for a datagram socket the same conversation
/// (a datagram socket can change peers with every packet). A TCP socket
/// keeps one peer from its SYN on, so its key is compared only until its
/// SYN matched it; a connect clears the cache. A connected datagram socket's verdict stops
/// being keyed once a datagram from its peer matched it
/// ([`VERDICT_CONNECTED`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerdictCache {
    /// 0 = nothing cached (generations start at 1).
    pub generation: u64,
    pub until_tai_ns: u64,
    pub domain: u32,
    pub reason: u8,
    /// Datagrams: the packet's address family, and whether the socket had
    /// [`SOCK_INITIATOR`] (which rules judge it). Unkeyed verdicts: 0 (a TCP
    /// socket's, from its SYN on) or [`VERDICT_CONNECTED`].
    pub family: u8,
    pub initiator: u8,
    pub _pad: u8,
    /// Datagrams: the peer's address and port, and the socket's own port,
    /// as in the packet header.
    pub peer: [u8; 16],
    pub peer_port: [u8; 2],
    pub local_port: [u8; 2],
    pub _pad2: [u8; 4],
}

/// `VerdictCache::family` of a connected datagram socket whose verdict
/// holds for all its packets while it stays connected: the kernel then
/// hands it only datagrams from its peer, and every datagram it sends
/// elsewhere (`sendto` with an address) is decided by the sendmsg hook
/// first. Not 0, so a program that predates it (an upgrade's overlap)
/// takes it for a keyed verdict that no packet matches, and decides.
pub const VERDICT_CONNECTED: u8 = 0xff;

/// `BH_RATE` value: a per-cgroup token bucket for events.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenBucket {
    pub last_ns: u64,
    /// Tokens scaled by 2^10 for sub-token refill precision.
    pub tokens_milli: u64,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, and have no padding.
    unsafe impl aya::Pod for State {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for CgroupKey {}
    unsafe impl aya::Pod for DomainRec {}
    unsafe impl aya::Pod for GeoValue {}
    unsafe impl aya::Pod for BridgeKey {}
    unsafe impl aya::Pod for BridgeRule {}
    unsafe impl aya::Pod for BridgeSet {}
    unsafe impl aya::Pod for SockInfo {}
    unsafe impl aya::Pod for CutRecord {}
    unsafe impl aya::Pod for TokenBucket {}
    unsafe impl aya::Pod for NameKey {}
    unsafe impl aya::Pod for ResolverKey {}
    unsafe impl aya::Pod for LearnedKey {}
    unsafe impl aya::Pod for Learned {}
    unsafe impl aya::Pod for DnsQueryKey {}
    unsafe impl aya::Pod for ForgedKey {}
    unsafe impl aya::Pod for crate::event::Event {}
    unsafe impl aya::Pod for crate::addr::AddrLine {}
    unsafe impl aya::Pod for crate::addr::AddrClass {}
}

/// Loopback destinations are the host itself: no geo source places them,
/// so the geofence leaves them to the listener's domain.
pub const fn is_loopback_v4(addr: [u8; 4]) -> bool {
    addr[0] == 127
}

pub const fn is_loopback_v6(addr: [u8; 16]) -> bool {
    let mut i = 0;
    while i < 15 {
        if addr[i] != 0 {
            return false;
        }
        i += 1;
    }
    addr[15] == 1
}

/// `::ffff:a.b.c.d` → `a.b.c.d`: IPv4-mapped destinations are decided as IPv4.
pub const fn v4_mapped(addr: [u8; 16]) -> Option<[u8; 4]> {
    let mut i = 0;
    while i < 10 {
        if addr[i] != 0 {
            return None;
        }
        i += 1;
    }
    if addr[10] == 0xff && addr[11] == 0xff {
        Some([addr[12], addr[13], addr[14], addr[15]])
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(size_of::<State>(), 8);
        assert_eq!(size_of::<Config>(), 24);
        assert_eq!(size_of::<CgroupKey>(), 16);
        assert_eq!(size_of::<DomainRec>(), 24);
        assert_eq!(size_of::<NameKey>(), 16);
        assert_eq!(size_of::<ResolverKey>(), 24);
        assert_eq!(size_of::<LearnedKey>(), 24);
        assert_eq!(size_of::<Learned>(), 48);
        assert_eq!(size_of::<DnsQueryKey>(), 32);
        assert_eq!(size_of::<ForgedKey>(), 40);
        assert_eq!(size_of::<GeoValue>(), 16);
        assert_eq!(size_of::<BridgeKey>(), 8);
        assert_eq!(size_of::<BridgeRule>(), 32);
        assert_eq!(size_of::<BridgeSet>(), 8 + 32 * MAX_BRIDGE_RULES);
        assert_eq!(size_of::<CutRecord>(), 64);
        assert_eq!(
            size_of::<SockInfo>(),
            8 * MAX_CGROUP_DEPTH + 8 + 24 + 48 + 64 + 56
        );
        assert_eq!(size_of::<SendCache>(), 56);
        assert_eq!(size_of::<DomainCache>(), 16);
        assert_eq!(size_of::<VerdictCache>(), 48);
        assert_eq!(size_of::<TokenBucket>(), 16);
        assert_eq!(size_of::<crate::addr::AddrLine>(), 64);
        assert_eq!(size_of::<crate::addr::AddrClass>(), 24);
    }

    #[test]
    fn counter_indices_fit() {
        const { assert!(counter_index(7, 31) < COUNTER_EVENTS_WANTED) };
        const { assert!(COUNTER_CUT_MARKED < NUM_COUNTERS) };
        const { assert!(COUNTER_DNS_NEW < NUM_COUNTERS) };
    }

    #[test]
    fn address_classes() {
        assert!(is_loopback_v4([127, 1, 2, 3]));
        assert!(!is_loopback_v4([10, 0, 0, 1]));
        let mut one = [0u8; 16];
        one[15] = 1;
        assert!(is_loopback_v6(one));
        let mut mapped = [0u8; 16];
        mapped[10] = 0xff;
        mapped[11] = 0xff;
        mapped[12..].copy_from_slice(&[10, 1, 2, 3]);
        assert_eq!(v4_mapped(mapped), Some([10, 1, 2, 3]));
        assert_eq!(v4_mapped(one), None);
    }
}
