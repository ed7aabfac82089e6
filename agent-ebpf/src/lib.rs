//! Empty on purpose: the agent's build script has a build-dependency on this
//! crate so cargo rebuilds the agent whenever the kernel programs change;
//! the programs themselves are the binary targets: `bulkhead` (production)
//! and `bulkhead-bench` (benchmark probes only).
#![no_std]
