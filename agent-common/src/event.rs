//! The event record the kernel writes into the ring buffer.

/// Which program made a decision. Numbered once, like reason codes.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Connect4 = 1,
    Connect6 = 2,
    Sendmsg4 = 3,
    Sendmsg6 = 4,
    SkbEgress = 5,
    SkbIngress = 6,
    SockCreate = 7,
    /// The agent's socket iterator, destroying a socket the packet hooks
    /// cut ([`crate::maps::SOCK_CUT`]).
    SockDestroy = 8,
}

impl Hook {
    pub const ALL: [Hook; 8] = [
        Hook::Connect4,
        Hook::Connect6,
        Hook::Sendmsg4,
        Hook::Sendmsg6,
        Hook::SkbEgress,
        Hook::SkbIngress,
        Hook::SockCreate,
        Hook::SockDestroy,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Hook::Connect4 => "connect4",
            Hook::Connect6 => "connect6",
            Hook::Sendmsg4 => "sendmsg4",
            Hook::Sendmsg6 => "sendmsg6",
            Hook::SkbEgress => "skb-egress",
            Hook::SkbIngress => "skb-ingress",
            Hook::SockCreate => "sock-create",
            Hook::SockDestroy => "sock-destroy",
        }
    }

    pub fn from_code(code: u8) -> Option<Hook> {
        Hook::ALL.into_iter().find(|h| *h as u8 == code)
    }
}

/// What happened to the connection or packet.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow = 0,
    Deny = 1,
    /// `mode: audit`: the policy denies it, but it was let through.
    WouldDeny = 2,
    /// An established connection was destroyed: its packets had started
    /// to be denied.
    Cut = 3,
}

impl Verdict {
    pub const fn name(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::WouldDeny => "would-deny",
            Verdict::Cut => "cut",
        }
    }

    pub fn from_code(code: u8) -> Option<Verdict> {
        match code {
            0 => Some(Verdict::Allow),
            1 => Some(Verdict::Deny),
            2 => Some(Verdict::WouldDeny),
            3 => Some(Verdict::Cut),
            _ => None,
        }
    }
}

pub const FAMILY_INET: u8 = 2;
pub const FAMILY_INET6: u8 = 10;

/// One decision, as written to `BH_EVENTS`. IPv4 addresses sit in the first
/// four bytes of the 16-byte fields and `family` says which it is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `CLOCK_TAI` nanoseconds.
    pub ts_tai_ns: u64,
    /// Per-CPU sequence number of decisions that asked for an event: a gap
    /// on one CPU means events were rate limited or lost (both counted).
    pub seq: u64,
    pub cgroup_id: u64,
    /// `tgid << 32 | pid`; 0 where the hook runs outside process context.
    pub pid_tgid: u64,
    /// `gid << 32 | uid`.
    pub uid_gid: u64,
    /// Policy generation in force for the decision.
    pub generation: u64,
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    pub comm: [u8; 16],
    /// 1-based bridge index, 0 = none.
    pub bridge_id: u32,
    pub src_port: [u8; 2],
    pub dst_port: [u8; 2],
    pub src_domain: u16,
    pub dst_domain: u16,
    pub family: u8,
    pub proto: u8,
    pub hook: u8,
    pub verdict: u8,
    pub reason: u8,
    pub _pad0: u8,
    /// CPU that made the decision; `seq` counts per CPU.
    pub cpu: u16,
    pub _pad: [u8; 4],
}

pub const EVENT_SIZE: usize = core::mem::size_of::<Event>();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_has_no_padding() {
        assert_eq!(EVENT_SIZE, 120);
        assert_eq!(core::mem::align_of::<Event>(), 8);
    }
}
