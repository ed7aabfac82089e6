//! Types shared by the bulkhead kernel programs and the agent, and the one
//! decision function both of them (and `bulkhead explain`) use.
//!
//! Everything that crosses the kernel boundary is `#[repr(C)]`, sized
//! explicitly with `_pad` fields, and keeps addresses and ports as big-endian
//! byte arrays, so neither side has to guess layout or byte order.
#![cfg_attr(not(test), no_std)]

pub mod addr;
pub mod decide;
pub mod dns;
pub mod domain;
pub mod event;
pub mod maps;
pub mod proto;
pub mod reason;

pub use decide::{Decision, Direction, Ports, decide};
pub use domain::DomainId;
pub use event::{Event, Hook, Verdict};
pub use reason::Reason;
