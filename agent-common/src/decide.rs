//! The decision, as one pure function: the kernel programs call it after
//! their map lookups, and `bulkhead explain` calls it after the same lookups
//! against a compiled policy, so the two cannot disagree.

use crate::event::{FAMILY_INET, FAMILY_INET6, Verdict};
use crate::maps::{
    BRIDGE_REVERSE, BridgeRule, BridgeSet, DOMAIN_EGRESS_GEO, DOMAIN_EGRESS_UNKNOWN_DENY,
    DOMAIN_INGRESS_GEO, DOMAIN_INGRESS_UNKNOWN_DENY, DOMAIN_NAMES, DOMAIN_NAMES_ALLOW, DomainRec,
    GeoValue, MAX_BRIDGE_RULES, MODE_AUDIT, PROTO_TCP, PROTO_UDP, is_loopback_v4, is_loopback_v6,
    v4_mapped,
};
use crate::reason::Reason;

/// The two ports of a connection or datagram, host byte order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ports {
    /// The port being connected to: the peer's for egress, the
    /// workload's own for ingress.
    pub service: u16,
    /// The other end's: the workload's own for egress, the peer's for
    /// ingress; 0 where not known yet (a connect before its bind).
    pub other: u16,
}

/// Which side of the workload the peer is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The workload connects or sends to the peer.
    Egress,
    /// The peer connects or sends to the workload.
    Ingress,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allow: bool,
    pub reason: Reason,
    /// Bridge that allowed (or whose window refused) it; 0 = none.
    pub bridge_id: u32,
    /// TAI ns until which the same question gets the same answer under
    /// the same policy generation: the domain's or the bridge's expiry.
    pub until_tai_ns: u64,
}

impl Decision {
    const fn new(reason: Reason, bridge_id: u32) -> Self {
        Decision {
            allow: !reason.is_deny(),
            reason,
            bridge_id,
            until_tai_ns: u64::MAX,
        }
    }

    /// A connection refused while the audit trail cannot be written
    /// ([`refused_unaudited`]).
    #[inline(always)]
    pub const fn unaudited() -> Self {
        Decision::new(Reason::AuditUnavailable, 0)
    }

    /// What happens to the connection under the policy's `mode`
    /// ([`MODE_AUDIT`]: a denial is recorded as `would-deny` and let through).
    #[inline(always)]
    pub const fn verdict(&self, mode: u32) -> Verdict {
        match (self.allow, mode == MODE_AUDIT) {
            (true, _) => Verdict::Allow,
            (false, true) => Verdict::WouldDeny,
            (false, false) => Verdict::Deny,
        }
    }
}

/// A peer address as every decision sees it: an IPv4-mapped IPv6 address
/// (`::ffff:a.b.c.d`) is the IPv4 address it stands for, and an IPv4
/// address sits in the first four bytes. (IPv4-compatible `::a.b.c.d`
/// stays IPv6: the kernel routes it as the IPv6 address it is.)
///
/// The address first, on an 8-byte boundary: the kernel programs then
/// build it with word stores (at an odd offset, it took byte stores and a
/// byte-by-byte `memset` call).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C, align(8))]
pub struct PeerAddr {
    pub addr: [u8; 16],
    /// [`FAMILY_INET`] or [`FAMILY_INET6`].
    pub family: u8,
}

impl PeerAddr {
    /// `addr` of `family`, as the socket or packet carries it.
    #[inline(always)]
    pub fn new(family: u8, addr: [u8; 16]) -> PeerAddr {
        if family == FAMILY_INET6
            && let Some(v4) = v4_mapped(addr)
        {
            // Byte by byte, not `v4_in_16`: built from the integer here, the
            // unrolled object's `sendmsg6` shifted the context pointer on a
            // path that skips it, which every verifier refuses.
            let mut a = [0u8; 16];
            a[0] = v4[0];
            a[1] = v4[1];
            a[2] = v4[2];
            a[3] = v4[3];
            return PeerAddr {
                family: FAMILY_INET,
                addr: a,
            };
        }
        PeerAddr { family, addr }
    }

    /// The host itself (`127.0.0.0/8`, `::1`).
    #[inline(always)]
    pub fn is_loopback(&self) -> bool {
        if self.family == FAMILY_INET {
            is_loopback_v4([self.addr[0], self.addr[1], self.addr[2], self.addr[3]])
        } else {
            is_loopback_v6(self.addr)
        }
    }
}

/// An IPv4 address in the first four bytes of sixteen, the rest zero.
/// Built as one integer: a zeroed array with four bytes copied in becomes
/// a byte-by-byte `memset` loop in the kernel programs.
#[inline(always)]
pub fn v4_in_16(a: [u8; 4]) -> [u8; 16] {
    (u32::from_le_bytes(a) as u128).to_le_bytes()
}

/// The time a decision is taken at (CLOCK_TAI, ns): a value, or read only
/// when the decision needs it (a domain that expires, a bridge), as the
/// kernel programs do: a clock read costs them about as much as the rest
/// of a cached decision.
pub trait Now: Copy {
    fn tai_ns(self) -> u64;
}

impl Now for u64 {
    #[inline(always)]
    fn tai_ns(self) -> u64 {
        self
    }
}

/// A clock read when needed (see [`Now`]).
#[derive(Clone, Copy)]
pub struct ReadClock<F>(pub F);

impl<F: Fn() -> u64 + Copy> Now for ReadClock<F> {
    #[inline(always)]
    fn tai_ns(self) -> u64 {
        (self.0)()
    }
}

/// What the decision knows about a peer.
#[derive(Clone, Copy, Debug)]
pub struct Peer<'a> {
    /// Its domain, from [`peer_domain`]; 0 = none.
    pub domain: u32,
    /// Its geo verdicts; `None` where no source places it.
    pub geo: Option<&'a GeoValue>,
    /// Loopback ([`PeerAddr::is_loopback`]): the host itself, which no geo
    /// source places, so a geofence does not judge it.
    pub loopback: bool,
    /// What the domain's DNS rules know of it (only looked up for a domain
    /// that uses names: [`crate::maps::DOMAIN_NAMES`]).
    pub names: Names,
}

/// A peer as a domain's `dns` and `egress.names` rules see it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Names {
    /// One of the domain's `dns.resolvers`.
    pub resolver: bool,
    /// An answer for a name the domain's rules mention gave this address,
    /// and holds until `until_tai_ns`.
    pub named: bool,
    pub until_tai_ns: u64,
}

/// DNS: the port a domain that uses names may reach its resolvers on only.
pub const DNS_PORT: u16 = 53;

/// A peer's domain: that of the domain networks holding its address, else
/// that of the socket on this host listening on it (`listener`: the
/// owner's domain, 0 where nothing listens or its owner is in no domain).
/// `listener` runs only when the networks give none: in the kernel it is a
/// socket lookup.
#[inline(always)]
pub fn peer_domain(network: u32, listener: impl FnOnce() -> u32) -> u32 {
    if network != 0 { network } else { listener() }
}

/// One level of the walk down a cgroup's ancestry (from the root's child
/// to the cgroup itself) to its nearest configured ancestor: a level whose
/// cgroup `domain_of` knows gives `found` its domain, so the deepest one
/// wins. Returns `false` past the cgroup's own level (`id` 0), which ends
/// the walk.
#[inline(always)]
pub fn walk_level(found: &mut u32, id: u64, domain_of: impl FnOnce(u64) -> Option<u32>) -> bool {
    if id == 0 {
        return false;
    }
    if let Some(d) = domain_of(id) {
        *found = d;
    }
    true
}

/// [`decide`] for a peer as [`Peer`] describes it: `bridges` is asked for
/// the rules from the connecting domain to the accepting one only when the
/// peer is in another domain, and a loopback peer in no domain is not
/// judged by a geofence (nothing places the host in a country: its
/// listener's domain decides, or nothing does).
#[expect(
    clippy::too_many_arguments,
    reason = "flat scalars keep the kernel call cheap"
)]
#[inline(always)]
pub fn decide_peer<'b>(
    dir: Direction,
    local_id: u32,
    local: &DomainRec,
    peer: &Peer<'_>,
    bridges: impl Bridges<'b>,
    proto: u8,
    ports: Ports,
    now: impl Now,
) -> Decision {
    if local.flags & DOMAIN_NAMES != 0
        && dir == Direction::Egress
        && (local.expires_tai_ns == u64::MAX || now.tai_ns() < local.expires_tai_ns)
        && let Some(mut d) = names_decision(local, peer, proto, ports)
    {
        if d.until_tai_ns > local.expires_tai_ns {
            d.until_tai_ns = local.expires_tai_ns;
        }
        return d;
    }
    let mut local = *local;
    if peer.domain == 0 && peer.loopback {
        local.flags &= !(DOMAIN_EGRESS_GEO | DOMAIN_INGRESS_GEO);
    }
    decide(
        dir,
        local_id,
        &local,
        peer.domain,
        bridges,
        proto,
        ports,
        now,
        peer.geo,
    )
}

/// What a domain that uses names decides before (and instead of) the
/// rest: its DNS goes to its resolvers only, wherever they are; then, for
/// a peer in no domain outside the host, an address learned for a name
/// the rules mention is allowed or denied by them, and with an allow list
/// and no country rule anything else is denied. `None`: the usual
/// decision (domains, bridges, countries) applies.
#[inline(always)]
fn names_decision(local: &DomainRec, peer: &Peer<'_>, proto: u8, ports: Ports) -> Option<Decision> {
    let dns = ports.service == DNS_PORT && (proto == PROTO_UDP || proto == PROTO_TCP);
    if dns && !peer.names.resolver {
        return Some(Decision::new(Reason::DnsResolverDenied, 0));
    }
    if peer.domain != 0 || peer.loopback {
        return None;
    }
    if dns {
        return Some(Decision::new(Reason::DnsResolver, 0));
    }
    let allow_list = local.flags & DOMAIN_NAMES_ALLOW != 0;
    if peer.names.named {
        let mut d = Decision::new(
            if allow_list {
                Reason::NameAllowed
            } else {
                Reason::NameDenied
            },
            0,
        );
        d.until_tai_ns = peer.names.until_tai_ns;
        return Some(d);
    }
    if allow_list && local.flags & DOMAIN_EGRESS_GEO == 0 {
        return Some(Decision::new(Reason::NameNotAllowed, 0));
    }
    None
}

/// Whether a new connect or sendmsg of a workload of domain `local_id`
/// (never 0) to `peer` is refused while `run --audit-full=refuse` is in
/// force and the audit trail cannot be written
/// ([`crate::maps::CONFIG_AUDIT_REFUSE`]): every one but loopback to the
/// workload's own domain (a listener of the domain owns the address),
/// which never leaves the host or the domain. A refused one is not decided
/// by the policy at all: its decision is [`Decision::unaudited`], so the
/// verifier walks one more path, not one more per policy outcome. The
/// kernel's connect/sendmsg hooks and the live `explain` both call this.
#[inline(always)]
pub fn refused_unaudited(local_id: u32, peer: &Peer<'_>) -> bool {
    !(peer.loopback && peer.domain == local_id)
}

/// Decides one connection or packet of a workload in domain `local` (id
/// `local_id`, never 0) with a peer in domain `peer_id` (0 = no domain).
///
/// - `bridges`: the rules from the connecting domain to the accepting one
///   (`local → peer` for egress, `peer → local` for ingress).
/// - `ports`: the service port bridges match, and the other end's, which
///   reverse datagram rules ([`BRIDGE_REVERSE`]) match instead.
/// - `geo`: the merged geo range holding the peer address, if any source
///   places it; only consulted when the peer is in no domain.
#[expect(
    clippy::too_many_arguments,
    reason = "flat scalars keep the kernel call cheap"
)]
#[inline(always)]
pub fn decide<'b>(
    dir: Direction,
    local_id: u32,
    local: &DomainRec,
    peer_id: u32,
    bridges: impl Bridges<'b>,
    proto: u8,
    ports: Ports,
    now: impl Now,
    geo: Option<&GeoValue>,
) -> Decision {
    // Most domains never expire: no clock read for them.
    if local.expires_tai_ns != u64::MAX && now.tai_ns() >= local.expires_tai_ns {
        return Decision::new(Reason::DomainExpired, 0);
    }
    let mut d = decide_unexpired(
        dir, local_id, local, peer_id, bridges, proto, ports, now, geo,
    );
    if d.until_tai_ns > local.expires_tai_ns {
        d.until_tai_ns = local.expires_tai_ns;
    }
    d
}

/// [`decide`] for a domain that has not expired.
#[expect(
    clippy::too_many_arguments,
    reason = "flat scalars keep the kernel call cheap"
)]
#[inline(always)]
fn decide_unexpired<'b>(
    dir: Direction,
    local_id: u32,
    local: &DomainRec,
    peer_id: u32,
    bridges: impl Bridges<'b>,
    proto: u8,
    ports: Ports,
    now: impl Now,
    geo: Option<&GeoValue>,
) -> Decision {
    if peer_id == local_id {
        return Decision::new(Reason::SameDomain, 0);
    }
    if peer_id != 0 {
        let (from, to) = match dir {
            Direction::Egress => (local_id, peer_id),
            Direction::Ingress => (peer_id, local_id),
        };
        return match bridges.answer(from, to, proto, ports, now.tai_ns()) {
            Some((r, true)) => {
                let mut d = Decision::new(Reason::Bridge, r.bridge_id);
                d.until_tai_ns = r.expires_tai_ns;
                d
            }
            Some((r, false)) => Decision::new(Reason::BridgeOutsideWindow, r.bridge_id),
            None => Decision::new(Reason::CrossDomain, 0),
        };
    }
    let (geo_flag, unknown_deny_flag) = match dir {
        Direction::Egress => (DOMAIN_EGRESS_GEO, DOMAIN_EGRESS_UNKNOWN_DENY),
        Direction::Ingress => (DOMAIN_INGRESS_GEO, DOMAIN_INGRESS_UNKNOWN_DENY),
    };
    if local.flags & geo_flag == 0 {
        return Decision::new(Reason::NoDomain, 0);
    }
    match geo.filter(|g| !g.is_unknown()) {
        Some(g) => {
            let mask = match dir {
                Direction::Egress => g.egress_deny,
                Direction::Ingress => g.ingress_deny,
            };
            if local_id < 64 && mask & (1u64 << local_id) != 0 {
                Decision::new(Reason::CountryDenied, 0)
            } else {
                Decision::new(Reason::CountryAllowed, 0)
            }
        }
        None if local.flags & unknown_deny_flag != 0 => Decision::new(Reason::CountryUnknown, 0),
        None => Decision::new(Reason::CountryUnknownAllowed, 0),
    }
}

/// Where a decision finds the bridges from one domain to another. A
/// lookup of their rules (`|from, to| -> Option<&BridgeSet>`, as `explain`
/// passes) is matched here by [`bridge_rule`]; the kernel programs run that
/// match as a BPF function of its own (see `bh_bridge_rule` there).
pub trait Bridges<'b> {
    /// The rule of the bridges from domain `from` to domain `to` that
    /// answers this flow ([`bridge_rule`]), and whether `now_tai_ns` is
    /// inside its window; `None` when no rule matches or none exist.
    fn answer(
        self,
        from: u32,
        to: u32,
        proto: u8,
        ports: Ports,
        now_tai_ns: u64,
    ) -> Option<(&'b BridgeRule, bool)>;
}

impl<'b, F: FnOnce(u32, u32) -> Option<&'b BridgeSet>> Bridges<'b> for F {
    #[inline(always)]
    fn answer(
        self,
        from: u32,
        to: u32,
        proto: u8,
        ports: Ports,
        now_tai_ns: u64,
    ) -> Option<(&'b BridgeRule, bool)> {
        let set = self(from, to)?;
        let (i, open) = bridge_rule(set, proto, ports, now_tai_ns)?;
        Some((&set.rules[i], open))
    }
}

/// Which rule of `set` answers a flow: the first matching one whose window
/// is open at `now_tai_ns`, else the last matching one (its window closed,
/// so the refusal names that bridge); `None` when no rule matches. Its
/// index, and whether its window is open.
#[inline(always)]
pub fn bridge_rule(
    set: &BridgeSet,
    proto: u8,
    ports: Ports,
    now_tai_ns: u64,
) -> Option<(usize, bool)> {
    // Not an Option: its undefined payload may be spilled from a register
    // the verifier knows to be unset, which it refuses.
    let mut closed = MAX_BRIDGE_RULES;
    // A fixed trip count keeps the verifier happy; `count` bounds the work.
    for i in 0..MAX_BRIDGE_RULES {
        if i as u32 >= set.count {
            break;
        }
        let r = &set.rules[i];
        // Indexed, not branched: one path per rule for the verifier.
        let port = [ports.service, ports.other][usize::from(r.flags & BRIDGE_REVERSE)];
        if r.proto != proto || port < r.port_lo || port > r.port_hi {
            continue;
        }
        if now_tai_ns >= r.not_before_tai_ns && now_tai_ns < r.expires_tai_ns {
            return Some((i, true));
        }
        closed = i;
    }
    (closed < MAX_BRIDGE_RULES).then_some((closed, false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::{BridgeRule, DOMAIN_EXISTS, PROTO_TCP, PROTO_UDP};

    const NEVER: u64 = u64::MAX;

    fn none<'b>(_: u32, _: u32) -> Option<&'b BridgeSet> {
        None
    }

    fn dom(flags: u32) -> DomainRec {
        DomainRec {
            expires_tai_ns: NEVER,
            flags: DOMAIN_EXISTS | flags,
            key: 0,
            min_ttl: 0,
            max_ttl: 0,
        }
    }

    fn bridge(proto: u8, lo: u16, hi: u16, nb: u64, exp: u64, id: u32) -> BridgeSet {
        let mut s = BridgeSet {
            count: 1,
            ..Default::default()
        };
        s.rules[0] = BridgeRule {
            not_before_tai_ns: nb,
            expires_tai_ns: exp,
            bridge_id: id,
            port_lo: lo,
            port_hi: hi,
            proto,
            flags: 0,
            _pad: [0; 6],
        };
        s
    }

    fn eg(
        local: &DomainRec,
        peer: u32,
        b: Option<&BridgeSet>,
        proto: u8,
        port: u16,
        now: u64,
    ) -> Decision {
        let ports = Ports {
            service: port,
            other: 0,
        };
        decide(
            Direction::Egress,
            1,
            local,
            peer,
            move |_: u32, _: u32| b,
            proto,
            ports,
            now,
            None,
        )
    }

    #[test]
    fn same_domain_allowed_other_domain_denied() {
        let d = dom(0);
        assert_eq!(eg(&d, 1, None, PROTO_TCP, 80, 5).reason, Reason::SameDomain);
        let x = eg(&d, 2, None, PROTO_TCP, 80, 5);
        assert!(!x.allow);
        assert_eq!(x.reason, Reason::CrossDomain);
        assert_eq!(eg(&d, 0, None, PROTO_TCP, 80, 5).reason, Reason::NoDomain);
    }

    #[test]
    fn an_allow_holds_until_the_bridge_or_the_domain_expires() {
        let mut d = dom(0);
        assert_eq!(eg(&d, 1, None, PROTO_TCP, 80, 5).until_tai_ns, NEVER);
        let b = bridge(PROTO_TCP, 80, 80, 0, 300, 7);
        assert_eq!(eg(&d, 2, Some(&b), PROTO_TCP, 80, 5).until_tai_ns, 300);
        d.expires_tai_ns = 200;
        assert_eq!(eg(&d, 2, Some(&b), PROTO_TCP, 80, 5).until_tai_ns, 200);
        assert_eq!(eg(&d, 0, None, PROTO_TCP, 80, 5).until_tai_ns, 200);
    }

    #[test]
    fn bridge_matches_proto_port_and_window() {
        let d = dom(0);
        let b = bridge(PROTO_TCP, 8000, 8100, 100, 200, 7);
        let ok = eg(&d, 2, Some(&b), PROTO_TCP, 8050, 150);
        assert!(ok.allow);
        assert_eq!((ok.reason, ok.bridge_id), (Reason::Bridge, 7));
        assert_eq!(
            eg(&d, 2, Some(&b), PROTO_UDP, 8050, 150).reason,
            Reason::CrossDomain
        );
        assert_eq!(
            eg(&d, 2, Some(&b), PROTO_TCP, 8101, 150).reason,
            Reason::CrossDomain
        );
        assert_eq!(
            eg(&d, 2, Some(&b), PROTO_TCP, 7999, 150).reason,
            Reason::CrossDomain
        );
        let early = eg(&d, 2, Some(&b), PROTO_TCP, 8000, 99);
        assert_eq!(
            (early.reason, early.bridge_id),
            (Reason::BridgeOutsideWindow, 7)
        );
        // `expires` is exclusive: at that instant the bridge is closed.
        assert_eq!(
            eg(&d, 2, Some(&b), PROTO_TCP, 8100, 200).reason,
            Reason::BridgeOutsideWindow
        );
    }

    /// A datagram bridge's reverse rule matches the sender's own port: a
    /// server answering on the bridged port, not any port of the client.
    #[test]
    fn reverse_datagram_rules_match_the_other_port() {
        let d = dom(0);
        let mut b = bridge(PROTO_UDP, 53, 53, 0, NEVER, 4);
        b.rules[0].flags = BRIDGE_REVERSE;
        let send = |service, other| {
            let ports = Ports { service, other };
            decide(
                Direction::Egress,
                1,
                &d,
                2,
                |_: u32, _: u32| Some(&b),
                PROTO_UDP,
                ports,
                5,
                None,
            )
        };
        // From port 53 to the client's 40000: the answer.
        let answer = send(40000, 53);
        assert_eq!((answer.reason, answer.bridge_id), (Reason::Bridge, 4));
        // To port 53 (the destination's) from elsewhere: not this rule.
        assert_eq!(send(53, 40000).reason, Reason::CrossDomain);
    }

    #[test]
    fn expired_domain_reaches_nothing() {
        let mut d = dom(0);
        d.expires_tai_ns = 1000;
        assert_eq!(
            eg(&d, 1, None, PROTO_TCP, 1, 999).reason,
            Reason::SameDomain
        );
        assert_eq!(
            eg(&d, 1, None, PROTO_TCP, 1, 1000).reason,
            Reason::DomainExpired
        );
        assert_eq!(
            eg(&d, 0, None, PROTO_TCP, 1, 5000).reason,
            Reason::DomainExpired
        );
    }

    #[test]
    fn geofence_applies_only_outside_domains() {
        let d = dom(DOMAIN_EGRESS_GEO | DOMAIN_EGRESS_UNKNOWN_DENY);
        let deny_me = GeoValue {
            egress_deny: 1 << 1,
            ingress_deny: 0,
        };
        let other = GeoValue {
            egress_deny: 1 << 2,
            ingress_deny: 0,
        };
        let https = Ports {
            service: 443,
            other: 0,
        };
        let r =
            |peer, g| decide(Direction::Egress, 1, &d, peer, none, PROTO_TCP, https, 0, g).reason;
        assert_eq!(r(0, Some(&deny_me)), Reason::CountryDenied);
        assert_eq!(r(0, Some(&other)), Reason::CountryAllowed);
        assert_eq!(r(0, None), Reason::CountryUnknown);
        assert_eq!(r(1, Some(&deny_me)), Reason::SameDomain);
        let open = dom(DOMAIN_EGRESS_GEO);
        let r2 = decide(
            Direction::Egress,
            1,
            &open,
            0,
            none,
            PROTO_TCP,
            https,
            0,
            None,
        );
        assert_eq!(r2.reason, Reason::CountryUnknownAllowed);
        // The ingress side reads the ingress mask and flags only.
        let ing = decide(
            Direction::Ingress,
            1,
            &d,
            0,
            none,
            PROTO_TCP,
            https,
            0,
            Some(&deny_me),
        );
        assert_eq!(ing.reason, Reason::NoDomain);
    }

    #[test]
    fn peers_are_prepared_as_the_kernel_decides_them() {
        let mut mapped = [0u8; 16];
        mapped[10] = 0xff;
        mapped[11] = 0xff;
        mapped[12..].copy_from_slice(&[127, 0, 0, 1]);
        let p = PeerAddr::new(FAMILY_INET6, mapped);
        assert_eq!(p.family, FAMILY_INET);
        assert_eq!(&p.addr[..4], &[127, 0, 0, 1]);
        assert!(p.addr[4..].iter().all(|b| *b == 0));
        assert!(p.is_loopback());
        // IPv4-compatible `::127.0.0.1` is IPv6, and not `::1`.
        let mut compat = [0u8; 16];
        compat[12..].copy_from_slice(&[127, 0, 0, 1]);
        let c = PeerAddr::new(FAMILY_INET6, compat);
        assert_eq!(c.family, FAMILY_INET6);
        assert!(!c.is_loopback());
        let mut one = [0u8; 16];
        one[15] = 1;
        assert!(PeerAddr::new(FAMILY_INET6, one).is_loopback());
        let mut v4 = [0u8; 16];
        v4[..4].copy_from_slice(&[10, 0, 0, 1]);
        assert_eq!(PeerAddr::new(FAMILY_INET, v4).addr, v4);
    }

    #[test]
    fn the_listener_is_asked_only_outside_domain_networks() {
        assert_eq!(peer_domain(3, || panic!("looked up")), 3);
        assert_eq!(peer_domain(0, || 5), 5);
        // The deepest configured level wins; id 0 ends the walk.
        let known = |id: u64| match id {
            10 => Some(1),
            30 => Some(2),
            _ => None,
        };
        let mut found = 0;
        for id in [10, 20, 30, 40, 0, 10] {
            if !walk_level(&mut found, id, known) {
                break;
            }
        }
        assert_eq!(found, 2);
    }

    #[test]
    fn loopback_peers_in_no_domain_skip_the_geofence() {
        let d = dom(DOMAIN_EGRESS_GEO | DOMAIN_EGRESS_UNKNOWN_DENY);
        let https = Ports {
            service: 443,
            other: 0,
        };
        let no_bridges = |_: u32, _: u32| -> Option<&BridgeSet> { panic!("no bridge needed") };
        let r = |domain, loopback| {
            let peer = Peer {
                domain,
                geo: None,
                loopback,
                names: Names::default(),
            };
            decide_peer(
                Direction::Egress,
                1,
                &d,
                &peer,
                no_bridges,
                PROTO_TCP,
                https,
                0,
            )
            .reason
        };
        assert_eq!(r(0, false), Reason::CountryUnknown);
        assert_eq!(r(0, true), Reason::NoDomain);
        assert_eq!(r(1, true), Reason::SameDomain);
    }

    #[test]
    fn bridges_are_asked_from_the_connecting_domain() {
        let d = dom(0);
        let b = bridge(PROTO_TCP, 443, 443, 0, NEVER, 9);
        let https = Ports {
            service: 443,
            other: 0,
        };
        let peer = Peer {
            domain: 2,
            geo: None,
            loopback: true,
            names: Names::default(),
        };
        for (dir, want) in [(Direction::Egress, (1, 2)), (Direction::Ingress, (2, 1))] {
            let d = decide_peer(
                dir,
                1,
                &d,
                &peer,
                |from, to| ((from, to) == want).then_some(&b),
                PROTO_TCP,
                https,
                0,
            );
            assert_eq!((d.reason, d.bridge_id), (Reason::Bridge, 9), "{dir:?}");
        }
    }

    #[test]
    fn audit_mode_turns_denials_into_would_deny() {
        let d = dom(0);
        let deny = eg(&d, 2, None, PROTO_TCP, 80, 5);
        let allow = eg(&d, 1, None, PROTO_TCP, 80, 5);
        assert_eq!(deny.verdict(crate::maps::MODE_ENFORCE), Verdict::Deny);
        assert_eq!(deny.verdict(MODE_AUDIT), Verdict::WouldDeny);
        assert_eq!(allow.verdict(MODE_AUDIT), Verdict::Allow);
    }

    #[test]
    fn refusing_unaudited_spares_only_loopback_to_the_own_domain() {
        let peer = |domain, loopback| Peer {
            domain,
            geo: None,
            loopback,
            names: Names::default(),
        };
        // Loopback to a listener of the workload's own domain stays open.
        assert!(!refused_unaudited(1, &peer(1, true)));
        // Anything else is refused: the own domain elsewhere, another
        // domain or the host's own services (a resolver) over loopback,
        // anywhere outside.
        assert!(refused_unaudited(1, &peer(1, false)));
        assert!(refused_unaudited(1, &peer(2, true)));
        assert!(refused_unaudited(1, &peer(0, true)));
        assert!(refused_unaudited(1, &peer(0, false)));
        let d = Decision::unaudited();
        assert_eq!(
            (d.allow, d.reason, d.bridge_id),
            (false, Reason::AuditUnavailable, 0)
        );
        assert_eq!(d.verdict(crate::maps::MODE_ENFORCE), Verdict::Deny);
        assert_eq!(
            d.verdict(MODE_AUDIT),
            Verdict::WouldDeny,
            "audit mode never drops"
        );
    }

    #[test]
    fn names_decide_dns_and_learned_addresses_outside_domains() {
        use crate::maps::{DOMAIN_NAMES_ALLOW, DOMAIN_NAMES_DENY};
        let no_bridges = |_: u32, _: u32| -> Option<&BridgeSet> { None };
        let at = |service| Ports { service, other: 0 };
        let r = |d: &DomainRec, domain, loopback, names, proto, port| {
            let peer = Peer {
                domain,
                geo: None,
                loopback,
                names,
            };
            decide_peer(
                Direction::Egress,
                1,
                d,
                &peer,
                no_bridges,
                proto,
                at(port),
                5,
            )
        };
        let none = Names::default();
        let resolver = Names {
            resolver: true,
            ..none
        };
        let named = Names {
            named: true,
            until_tai_ns: 900,
            ..none
        };
        let only = dom(DOMAIN_NAMES_ALLOW);
        // DNS to a resolver only, even one in the own domain or on the host.
        assert_eq!(
            r(&only, 0, false, none, PROTO_UDP, 53).reason,
            Reason::DnsResolverDenied
        );
        assert_eq!(
            r(&only, 1, false, none, PROTO_TCP, 53).reason,
            Reason::DnsResolverDenied
        );
        assert_eq!(
            r(&only, 0, true, none, PROTO_UDP, 53).reason,
            Reason::DnsResolverDenied
        );
        assert_eq!(
            r(&only, 0, false, resolver, PROTO_UDP, 53).reason,
            Reason::DnsResolver
        );
        assert_eq!(
            r(&only, 0, true, resolver, PROTO_UDP, 53).reason,
            Reason::NoDomain
        );
        // Learned: allowed until the answer's TTL ends; anything else denied.
        let d = r(&only, 0, false, named, PROTO_TCP, 443);
        assert_eq!((d.reason, d.until_tai_ns), (Reason::NameAllowed, 900));
        assert_eq!(
            r(&only, 0, false, none, PROTO_TCP, 443).reason,
            Reason::NameNotAllowed
        );
        // Domains, bridges and the host come first.
        assert_eq!(
            r(&only, 1, false, none, PROTO_TCP, 443).reason,
            Reason::SameDomain
        );
        assert_eq!(
            r(&only, 2, false, none, PROTO_TCP, 443).reason,
            Reason::CrossDomain
        );
        assert_eq!(
            r(&only, 0, true, none, PROTO_TCP, 443).reason,
            Reason::NoDomain
        );
        // With a country rule too, the two allow lists add up.
        let both = dom(DOMAIN_NAMES_ALLOW | DOMAIN_EGRESS_GEO | DOMAIN_EGRESS_UNKNOWN_DENY);
        assert_eq!(
            r(&both, 0, false, none, PROTO_TCP, 443).reason,
            Reason::CountryUnknown
        );
        assert_eq!(
            r(&both, 0, false, named, PROTO_TCP, 443).reason,
            Reason::NameAllowed
        );
        // A deny list denies what it names, nothing else.
        let deny = dom(DOMAIN_NAMES_DENY);
        assert_eq!(
            r(&deny, 0, false, named, PROTO_TCP, 443).reason,
            Reason::NameDenied
        );
        assert_eq!(
            r(&deny, 0, false, none, PROTO_TCP, 443).reason,
            Reason::NoDomain
        );
        // Expiry first; domains without names never look.
        let mut expired = dom(DOMAIN_NAMES_ALLOW);
        expired.expires_tai_ns = 1;
        assert_eq!(
            r(&expired, 0, false, resolver, PROTO_UDP, 53).reason,
            Reason::DomainExpired
        );
        assert_eq!(
            r(&dom(0), 0, false, none, PROTO_UDP, 53).reason,
            Reason::NoDomain
        );
    }
}
