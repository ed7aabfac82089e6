//! The one table of reason codes.
//!
//! A code is numbered once and never renumbered or reused: counters, events
//! already in the audit trail and dashboards refer to these numbers. Add new
//! codes at the end of their group.

/// Why a decision was made. Codes below 16 allow, codes from 16 deny.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The destination belongs to the workload's own domain.
    SameDomain = 1,
    /// Another domain, reached over a bridge that matches proto, port and time.
    Bridge = 2,
    /// The destination belongs to no domain and the domain has no geofence
    /// for this direction.
    NoDomain = 3,
    /// The destination belongs to no domain; its country is allowed.
    CountryAllowed = 4,
    /// The destination belongs to no domain, no geo source places it, and
    /// the domain's `unknown_country` is `allow`.
    CountryUnknownAllowed = 5,
    /// The destination belongs to no domain; an answer from one of the
    /// domain's resolvers to a query for a name its `egress.names` allow
    /// list names made its address known, and that answer's TTL holds.
    NameAllowed = 6,
    /// DNS (port 53) to one of the domain's `dns.resolvers`.
    DnsResolver = 7,

    /// The destination belongs to another domain and no bridge covers the
    /// proto and port.
    CrossDomain = 16,
    /// A bridge covers proto and port but the current time is outside its
    /// `not_before`..`expires` window.
    BridgeOutsideWindow = 17,
    /// The destination's country is denied by the domain's geofence.
    CountryDenied = 18,
    /// No geo source places the destination and `unknown_country` is `deny`.
    CountryUnknown = 19,
    /// The domain's `expires` has passed: it can reach nothing.
    DomainExpired = 20,
    /// A raw IP socket (`SOCK_RAW`) was refused to a domain workload.
    RawSocketDenied = 21,
    /// A packet of a domain workload could not be parsed and was dropped.
    Unparsable = 22,
    /// A packet socket (`AF_PACKET`) was refused to a domain workload.
    PacketSocketDenied = 23,
    /// `run --audit-full=refuse`: a new connect or sendmsg of a domain
    /// workload the policy allows, refused while the audit trail cannot be
    /// written (an output failing or dropping events). Loopback to a
    /// listener of the workload's own domain is not refused.
    AuditUnavailable = 24,
    /// The domain has an `egress.names` allow list and no country rule:
    /// the destination belongs to no domain and no answer for an allowed
    /// name (still within its TTL) made its address known.
    NameNotAllowed = 25,
    /// The destination's address was learned from an answer for a name the
    /// domain's `egress.names` deny list names.
    NameDenied = 26,
    /// DNS (UDP or TCP port 53) from a domain that uses names to an address
    /// that is not one of its `dns.resolvers`.
    DnsResolverDenied = 27,
}

/// Highest code + 1; sizes the per-hook counter rows.
pub const REASON_SLOTS: u32 = 32;

impl Reason {
    /// Every reason, in code order.
    pub const ALL: [Reason; 19] = [
        Reason::SameDomain,
        Reason::Bridge,
        Reason::NoDomain,
        Reason::CountryAllowed,
        Reason::CountryUnknownAllowed,
        Reason::NameAllowed,
        Reason::DnsResolver,
        Reason::CrossDomain,
        Reason::BridgeOutsideWindow,
        Reason::CountryDenied,
        Reason::CountryUnknown,
        Reason::DomainExpired,
        Reason::RawSocketDenied,
        Reason::Unparsable,
        Reason::PacketSocketDenied,
        Reason::AuditUnavailable,
        Reason::NameNotAllowed,
        Reason::NameDenied,
        Reason::DnsResolverDenied,
    ];

    pub const fn is_deny(self) -> bool {
        self as u8 >= 16
    }

    /// The stable name used in events, metrics and CLI filters.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::SameDomain => "same-domain",
            Reason::Bridge => "bridge",
            Reason::NoDomain => "no-domain",
            Reason::CountryAllowed => "country-allowed",
            Reason::CountryUnknownAllowed => "country-unknown-allowed",
            Reason::CrossDomain => "cross-domain",
            Reason::BridgeOutsideWindow => "bridge-outside-window",
            Reason::CountryDenied => "country-denied",
            Reason::CountryUnknown => "country-unknown",
            Reason::DomainExpired => "domain-expired",
            Reason::RawSocketDenied => "raw-socket-denied",
            Reason::Unparsable => "unparsable-packet",
            Reason::PacketSocketDenied => "packet-socket-denied",
            Reason::AuditUnavailable => "audit-unavailable",
            Reason::NameAllowed => "name-allowed",
            Reason::DnsResolver => "dns-resolver",
            Reason::NameNotAllowed => "name-not-allowed",
            Reason::NameDenied => "name-denied",
            Reason::DnsResolverDenied => "dns-resolver-denied",
        }
    }

    pub fn from_code(code: u8) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| *r as u8 == code)
    }

    pub fn from_name(name: &str) -> Option<Reason> {
        Reason::ALL.into_iter().find(|r| r.name() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_round_trip() {
        for r in Reason::ALL {
            assert_eq!(Reason::from_code(r as u8), Some(r));
            assert_eq!(Reason::from_name(r.name()), Some(r));
            assert!((r as u32) < REASON_SLOTS);
        }
        let mut codes: std::vec::Vec<u8> = Reason::ALL.iter().map(|r| *r as u8).collect();
        codes.dedup();
        assert_eq!(codes.len(), Reason::ALL.len());
    }

    #[test]
    fn codes_never_change() {
        // Renumbering breaks stored audit trails; this pins the table.
        assert_eq!(Reason::CrossDomain as u8, 16);
        assert_eq!(Reason::CountryDenied as u8, 18);
        assert_eq!(Reason::DomainExpired as u8, 20);
        assert_eq!(Reason::PacketSocketDenied as u8, 23);
        assert_eq!(Reason::AuditUnavailable as u8, 24);
        assert_eq!(Reason::AuditUnavailable.name(), "audit-unavailable");
        assert_eq!(Reason::NameAllowed as u8, 6);
        assert_eq!(Reason::DnsResolver as u8, 7);
        assert_eq!(Reason::NameNotAllowed as u8, 25);
        assert_eq!(Reason::NameDenied as u8, 26);
        assert_eq!(Reason::DnsResolverDenied as u8, 27);
    }
}
