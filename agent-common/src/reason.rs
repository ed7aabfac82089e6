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
}

/// Highest code + 1; sizes the per-hook counter rows.
pub const REASON_SLOTS: u32 = 32;

impl Reason {
    /// Every reason, in code order.
    pub const ALL: [Reason; 14] = [
        Reason::SameDomain,
        Reason::Bridge,
        Reason::NoDomain,
        Reason::CountryAllowed,
        Reason::CountryUnknownAllowed,
        Reason::CrossDomain,
        Reason::BridgeOutsideWindow,
        Reason::CountryDenied,
        Reason::CountryUnknown,
        Reason::DomainExpired,
        Reason::RawSocketDenied,
        Reason::Unparsable,
        Reason::PacketSocketDenied,
        Reason::AuditUnavailable,
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
    }
}
