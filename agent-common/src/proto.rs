//! IP protocol numbers and their names: the one table userspace names
//! protocols from (events, policy ports, explain).

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
/// `IPPROTO_RAW`: what a raw socket's events carry.
pub const PROTO_RAW: u8 = 255;

/// `(number, name)` of every protocol bulkhead names; any other number is
/// shown as digits.
pub const PROTOCOLS: [(u8, &str); 5] = [
    (PROTO_TCP, "tcp"),
    (PROTO_UDP, "udp"),
    (PROTO_ICMP, "icmp"),
    (PROTO_ICMPV6, "icmpv6"),
    (PROTO_RAW, "raw"),
];

/// The name of protocol `number`, if the table has it.
pub fn proto_name(number: u8) -> Option<&'static str> {
    PROTOCOLS
        .iter()
        .find(|(n, _)| *n == number)
        .map(|(_, name)| *name)
}

/// The number of the protocol called `name` (lower case).
pub fn proto_number(name: &str) -> Option<u8> {
    PROTOCOLS
        .iter()
        .find(|(_, n)| *n == name)
        .map(|(number, _)| *number)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_round_trip() {
        for (n, name) in PROTOCOLS {
            assert_eq!(proto_name(n), Some(name));
            assert_eq!(proto_number(name), Some(n));
        }
        assert_eq!(proto_name(132), None);
        assert_eq!(proto_number("sctp"), None);
    }
}
