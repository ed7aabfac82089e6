//! The kernel programs' own diagnostics (aya-log), which the agent forwards
//! into its log (`kernel::start_kernel_log`). Rare paths only: a socket
//! without the storage it should have (the kernel could not allocate it).
//! Never a hot path: a record is a ring buffer reservation and a copy.
//!
//! Not in the packet hooks, not even on their rare paths (an unparsable
//! packet, a denied socket with no storage for its cut mark): the verifier
//! walks a log site once per state that reaches it, which cost `bh_egress`
//! and `bh_ingress` 70k–170k more instructions each, and the record writer
//! needs stack (`bh_egress` went from 408 to 480 of 512 bytes, over the
//! limit with its loop callback) and `memcpy` calls, frames that older
//! verifiers charge extra. An unparsable packet is an event and a counter
//! there already. Nor in the event rate limiter (a failed bucket insert):
//! it is inlined into every decision of every hook, the packet hooks'
//! included.

use bulkhead_common::Hook;

/// A warning from the kernel, with the program it came from as its log
/// target. aya-log-ebpf 0.2 ignores the context argument, so the helpers
/// that have none can log too.
macro_rules! rare {
    ($program:expr, $($fmt:tt)+) => {
        aya_log_ebpf::warn!((), target: $program, $($fmt)+)
    };
}
pub(crate) use rare;

/// The log target of the program a hook runs in (constant once inlined
/// into an entry point).
#[inline(always)]
pub(crate) fn program(hook: Hook) -> &'static str {
    match hook {
        Hook::Connect4 => "bulkhead::kernel::bh_connect4",
        Hook::Connect6 => "bulkhead::kernel::bh_connect6",
        Hook::Sendmsg4 => "bulkhead::kernel::bh_sendmsg4",
        Hook::Sendmsg6 => "bulkhead::kernel::bh_sendmsg6",
        Hook::SkbEgress => "bulkhead::kernel::bh_egress",
        Hook::SkbIngress => "bulkhead::kernel::bh_ingress",
        Hook::SockCreate | Hook::SockDestroy => "bulkhead::kernel::bh_sock_create",
    }
}
