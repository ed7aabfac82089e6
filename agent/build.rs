//! Compiles the kernel programs (`agent-ebpf`) and leaves the objects in
//! OUT_DIR, where `include_bytes_aligned!` embeds them: the agent is one
//! binary. `bulkhead` is the production object; `bulkhead-bench` holds the
//! programs only benchmarks load (`run --bench-probes`).
//!
//! The eBPF build needs nightly and bpf-linker (`cargo xtask setup`). Without
//! them the agent still builds, with an empty object, so `cargo build` and
//! `cargo test` work anywhere; `bulkhead run` then refuses with a message
//! naming the missing setup.
//!
//! This is what `aya_build::build_ebpf` does, with one difference: the
//! kernel programs are built in one directory per cargo target directory
//! (`target/ebpf`), not one per OUT_DIR. The objects do not depend on the
//! agent's profile, features or target, and building `core` for BPF takes
//! most of a minute, which every clippy, test, release, static and fuzz
//! build paid again.

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow, bail};

const EBPF_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../agent-ebpf");
const OBJECTS: [&str; 2] = ["bulkhead", "bulkhead-bench"];

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=PATH");
    // Cargo rebuilds the agent when the library half of `bulkhead-ebpf` (a
    // build-dependency) changes; this covers its binaries.
    println!("cargo:rerun-if-changed={EBPF_DIR}");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
    if which::which("bpf-linker").is_err() {
        println!(
            "cargo:warning=bpf-linker not found: building without kernel programs (run `cargo xtask setup`)"
        );
        for object in OBJECTS {
            fs::write(out_dir.join(object), b"").context("writing the empty eBPF placeholder")?;
        }
        return Ok(());
    }
    let target = match env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() {
        Ok("little") => "bpfel-unknown-none",
        Ok("big") => "bpfeb-unknown-none",
        other => bail!("unsupported target endianness {other:?}"),
    };
    let arch = env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH not set")?;
    let target_dir = shared_target_dir(&out_dir).join("ebpf");

    let mut rustflags = OsString::new();
    for (i, flag) in [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".to_string(),
        "-Clink-arg=--btf".to_string(),
    ]
    .iter()
    .enumerate()
    {
        if i > 0 {
            rustflags.push("\x1f");
        }
        rustflags.push(flag);
    }
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        "nightly",
        "cargo",
        "build",
        "--package",
        "bulkhead-ebpf",
    ])
    .args(["--bins", "--release", "--target", target])
    .args(["-Z", "build-std=core"])
    .arg("--target-dir")
    .arg(&target_dir)
    .current_dir(EBPF_DIR)
    .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
    // The outer build's compiler (stable) and wrappers must not leak in.
    .env_remove("RUSTC")
    .env_remove("RUSTC_WORKSPACE_WRAPPER")
    .env_remove("RUSTC_WRAPPER")
    .env_remove("RUSTUP_TOOLCHAIN");
    let out = cmd
        .output()
        .with_context(|| format!("running {cmd:?} (needs rustup's nightly: cargo xtask setup)"))?;
    if !out.status.success() {
        // Cargo shows a build script's output only as warnings.
        for line in String::from_utf8_lossy(&out.stderr).lines() {
            println!("cargo:warning={line}");
        }
        bail!(
            "building the kernel programs failed: {cmd:?}: {}",
            out.status
        );
    }
    let built = target_dir.join(target).join("release");
    for object in OBJECTS {
        fs::copy(built.join(object), out_dir.join(object))
            .with_context(|| format!("copying {} into OUT_DIR", built.join(object).display()))?;
    }
    Ok(())
}

/// The cargo target directory OUT_DIR is in (the nearest ancestor holding
/// the `CACHEDIR.TAG` cargo writes there), or OUT_DIR itself.
fn shared_target_dir(out_dir: &Path) -> PathBuf {
    out_dir
        .ancestors()
        .find(|d| d.join("CACHEDIR.TAG").is_file())
        .unwrap_or(out_dir)
        .to_path_buf()
}
