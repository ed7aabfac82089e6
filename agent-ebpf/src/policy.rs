//! The policy in force: every program reads the generation once and uses
//! its slot for all lookups, so a decision never mixes two policies.

use bulkhead_common::maps::{Config, DomainRec, MAX_DOMAINS};

use crate::maps::{BH_CONFIG, BH_DOMAINS, BH_STATE};

/// The policy in force for this decision.
pub(crate) struct Active {
    pub(crate) generation: u64,
    pub(crate) slot: u32,
    pub(crate) config: Config,
}

#[inline(always)]
pub(crate) fn active() -> Option<Active> {
    let state = BH_STATE.get(0)?;
    let generation = state.generation;
    // No policy loaded yet (generation 0): nothing is in any domain.
    if generation == 0 {
        return None;
    }
    let slot = (generation & 1) as u32;
    let config = *BH_CONFIG.get(slot)?;
    Some(Active {
        generation,
        slot,
        config,
    })
}

#[inline(always)]
pub(crate) fn domain_rec(slot: u32, id: u32) -> Option<&'static DomainRec> {
    if id == 0 || id >= MAX_DOMAINS {
        return None;
    }
    BH_DOMAINS.get(slot * MAX_DOMAINS + id)
}
