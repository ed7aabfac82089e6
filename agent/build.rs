//! Compiles the kernel programs (`agent-ebpf`) and leaves the objects in
//! OUT_DIR, where `include_bytes_aligned!` embeds them: the agent is one
//! binary. `bulkhead` is the production object; `bulkhead-bench` holds the
//! programs only benchmarks load (`run --bench-probes`).
//!
//! The eBPF build needs nightly and bpf-linker (`cargo xtask setup`). Without
//! them the agent still builds, with an empty object, so `cargo build` and
//! `cargo test` work anywhere; `bulkhead run` then refuses with a message
//! naming the missing setup.

use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=PATH");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
    if which::which("bpf-linker").is_err() {
        println!(
            "cargo:warning=bpf-linker not found: building without kernel programs (run `cargo xtask setup`)"
        );
        for object in ["bulkhead", "bulkhead-bench"] {
            fs::write(out_dir.join(object), b"").context("writing the empty eBPF placeholder")?;
        }
        return Ok(());
    }
    let ebpf = Package {
        name: "bulkhead-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../agent-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::Nightly)
}
