//! Loading, attaching and pinning the kernel programs.
//!
//! Everything lives under one bpffs directory (default
//! `/sys/fs/bpf/bulkhead`), in a subdirectory per map layout
//! (`<layout>/maps`, `<layout>/links`): a binary whose maps differ from the
//! pinned ones loads next to them instead of into them. Pinned links keep
//! enforcing when the agent exits or crashes (fail closed).
//!
//! Start-up is ordered so that a process death at any instant leaves a
//! whole policy enforced: every program is verified before anything is
//! written or attached ([`verify_all`]); each link is pinned the moment it
//! exists ([`attach`]), and a new policy only goes live once every link
//! is pinned; links and maps of an earlier agent (or layout) are retired
//! only after that ([`retire_others`]).

//!
//! The modules: [`load`] (the declarative program table, loading,
//! verifying and attaching), [`pins`] (the pin directory, its layouts, the
//! lock, retiring), [`maps`] (the policy map writer), [`features`] (what
//! this kernel offers), [`caps`], [`listeners`] (sockets bound before the
//! agent, and their owners), [`cut`] (destroying connections a policy
//! stops allowing), [`cgroup`] (the host's cgroup v2 tree), [`storage`] (the
//! socket storage map, made where no memory cgroup pays for it), [`log`] (the
//! programs' own log) and [`probes`] (benchmark-only programs).

pub mod caps;
pub mod cgroup;
pub mod cut;
pub mod features;
pub mod listeners;
mod load;
pub mod log;
pub mod maps;
mod pins;
pub mod probes;
mod storage;
mod sys;

pub use load::*;
pub use log::{KernelLog, drive_kernel_log, start_kernel_log};
pub use pins::*;
pub use probes::{PROBES, pin_probes};
pub use storage::{Storage, prepare as prepare_storage};
