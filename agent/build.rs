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
//! Each object comes twice: as is, and with feature `unrolled` for kernels
//! without `bpf_loop` (`*-unrolled`).
//!
//! This is what `aya_build::build_ebpf` does, with one difference: the
//! kernel programs are built in one directory per cargo target directory
//! (`target/ebpf`, `target/ebpf-unrolled`), not one per OUT_DIR. The
//! objects do not depend on the agent's profile, features or target, and
//! building `core` for BPF takes most of a minute, which every clippy,
//! test, release, static and fuzz build paid again.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, anyhow, bail};

const EBPF_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../agent-ebpf");
const OBJECTS: [&str; 2] = ["bulkhead", "bulkhead-bench"];
/// (directory under the target dir, cargo features, suffix of the objects
/// in OUT_DIR): the production objects, and the same programs for kernels
/// without `bpf_loop`, each built in a directory of its own so that neither
/// rebuild undoes the other.
const VARIANTS: [(&str, &str, &str); 2] =
    [("ebpf", "", ""), ("ebpf-unrolled", "unrolled", "-unrolled")];
/// `1`: build without kernel programs, as without bpf-linker (the fuzz
/// targets, which never load them).
const NO_KERNEL_PROGRAMS: &str = "BULKHEAD_NO_KERNEL_PROGRAMS";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=PATH");
    // Cargo rebuilds the agent when the library half of `bulkhead-ebpf` (a
    // build-dependency) changes; this covers its binaries.
    println!("cargo:rerun-if-changed={EBPF_DIR}");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
    println!("cargo:rerun-if-env-changed={NO_KERNEL_PROGRAMS}");
    let skip = env::var_os(NO_KERNEL_PROGRAMS).is_some_and(|v| v == "1");
    if skip || which::which("bpf-linker").is_err() {
        if !skip {
            println!(
                "cargo:warning=bpf-linker not found: building without kernel programs (run `cargo xtask setup`)"
            );
        }
        for (_, _, suffix) in VARIANTS {
            for object in OBJECTS {
                fs::write(out_dir.join(format!("{object}{suffix}")), b"")
                    .context("writing the empty eBPF placeholder")?;
            }
        }
        return Ok(());
    }
    let target = match env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() {
        Ok("little") => "bpfel-unknown-none",
        Ok("big") => "bpfeb-unknown-none",
        other => bail!("unsupported target endianness {other:?}"),
    };
    let arch = env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH not set")?;
    let shared = shared_target_dir(&out_dir);
    for (dir, features, suffix) in VARIANTS {
        build(target, &arch, &shared.join(dir), features)?;
        let built = shared.join(dir).join(target).join("release");
        for object in OBJECTS {
            let to = out_dir.join(format!("{object}{suffix}"));
            fs::copy(built.join(object), &to).with_context(|| {
                format!(
                    "copying {} to {}",
                    built.join(object).display(),
                    to.display()
                )
            })?;
        }
    }
    Ok(())
}

/// `cargo build` of the kernel programs for `target` into `target_dir`.
fn build(target: &str, arch: &str, target_dir: &Path, features: &str) -> anyhow::Result<()> {
    // CARGO_ENCODED_RUSTFLAGS separates flags with 0x1f.
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".to_string(),
        "-Clink-arg=--btf".to_string(),
        // Global BPF functions, which kernels verify once on their own
        // (bulkhead-ebpf's peer.rs says why).
        "-Clink-arg=--export=bh_bridge_rule".to_string(),
    ]
    .join("\x1f");
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
    .args(["--features", features])
    .arg("--target-dir")
    .arg(target_dir)
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
