//! The address table lookup: what the policy says about an address.

use bulkhead_common::addr::{self, AddrClass, LINE_WORDS, MAX_CLASSES, SLOT_LINES, SLOT_WORDS};
use bulkhead_common::event::FAMILY_INET6;

use crate::maps::{BH_ADDR, BH_CLASSES};

pub(crate) fn first4(a: &[u8; 16]) -> [u8; 4] {
    [a[0], a[1], a[2], a[3]]
}

/// What the policy says about a peer address: the domain whose networks
/// hold it, or its geo verdicts (`None` only if the class map could not be
/// read). Indices are masked, not checked: a corrupt table reads wrong
/// words of its own slot, never another slot's, and needs no branch.
#[inline(always)]
pub(crate) fn classify(slot: u32, family: u8, addr: &[u8; 16]) -> Option<&'static AddrClass> {
    let base = slot * SLOT_LINES;
    let class = addr::lookup(family == FAMILY_INET6, addr, |w| {
        let w = w & (SLOT_WORDS - 1);
        BH_ADDR
            .get(base + w / LINE_WORDS)
            .map(|line| line.0[(w % LINE_WORDS) as usize])
    });
    BH_CLASSES.get(slot * MAX_CLASSES + (class & (MAX_CLASSES - 1)))
}
