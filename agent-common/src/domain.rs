//! Domain ids as the kernel's maps hold them.

/// A domain as the kernel knows it: `0` is no domain, any other value is
/// the domain's index in the policy (file order) plus one. The maps keep the
/// bare integer (`u32` in the cgroup and address maps and in [`DomainRec`]
/// keys, `u16` in bridge keys and events); this type is the one place
/// that does the `+ 1` / `- 1`.
///
/// [`DomainRec`]: crate::maps::DomainRec
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DomainId(u32);

impl DomainId {
    /// No domain: a workload or address bulkhead does not place.
    pub const NONE: DomainId = DomainId(0);

    /// The id of the domain at `index` in the policy's domains.
    pub const fn from_index(index: usize) -> DomainId {
        DomainId(index as u32 + 1)
    }

    /// The id a map holds.
    pub const fn from_raw(raw: u32) -> DomainId {
        DomainId(raw)
    }

    /// The value the maps hold.
    pub const fn raw(self) -> u32 {
        self.0
    }

    /// The value bridge keys and events hold (ids stay below
    /// [`MAX_DOMAINS`](crate::maps::MAX_DOMAINS)).
    pub const fn raw16(self) -> u16 {
        self.0 as u16
    }

    /// The index in the policy's domains; `None` for no domain.
    pub const fn index(self) -> Option<usize> {
        match self.0 {
            0 => None,
            n => Some(n as usize - 1),
        }
    }

    pub const fn is_none(self) -> bool {
        self.0 == 0
    }
}

impl From<u32> for DomainId {
    fn from(raw: u32) -> DomainId {
        DomainId(raw)
    }
}

impl From<u16> for DomainId {
    fn from(raw: u16) -> DomainId {
        DomainId(raw as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_is_no_domain_and_ids_are_index_plus_one() {
        assert_eq!(DomainId::NONE.index(), None);
        assert!(DomainId::from_raw(0).is_none());
        assert_eq!(DomainId::from_index(0).raw(), 1);
        assert_eq!(DomainId::from_index(4).raw16(), 5);
        assert_eq!(DomainId::from_raw(5).index(), Some(4));
        assert_eq!(DomainId::from(3u16), DomainId::from_index(2));
        assert_eq!(core::mem::size_of::<DomainId>(), 4);
    }
}
