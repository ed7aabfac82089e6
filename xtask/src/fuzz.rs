//! `cargo xtask fuzz`: runs the cargo-fuzz targets in `fuzz/` (policy
//! parser and compiler, geofeed parser, `.mmdb` loader, event decoding),
//! each for a fixed time, and fails on the first crash with the input that
//! caused it.
//!
//! Needs nightly Rust (`cargo xtask setup` installs it) and cargo-fuzz,
//! which this task installs on first use (about 50 s; the default setup
//! leaves it out so `cargo xtask test` stays quick).
//!
//! Each target starts from the committed seeds in `fuzz/seeds/<target>/`
//! and keeps what it learns in `fuzz/corpus/<target>/` (not committed), so
//! later runs start further along. Crashing inputs land in
//! `fuzz/artifacts/<target>/`; each one found becomes a regression test in
//! the agent crate.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{cargo, cargo_nightly, display, in_ci, probe, run, workspace_root};

/// The targets, in the order they run, with the largest input each gets.
pub const TARGETS: &[(&str, usize)] = &[
    ("policy", 16 * 1024),
    ("geofeed", 16 * 1024),
    ("mmdb", 64 * 1024),
    ("events", 10 * 120),
    ("dns", 1024),
];

/// cargo-fuzz series this task installs.
const CARGO_FUZZ_SERIES: &str = "0.13";

/// Seconds per target with `--smoke`.
const SMOKE_SECS: u64 = 10;

/// How `--smoke` builds: without optimizations and without AddressSanitizer
/// (a third of the build time: about 170 CPU-seconds instead of 550 for
/// a clean build), still with overflow checks and debug assertions, which
/// is what turns most bugs in safe Rust into crashes.
const SMOKE_BUILD: &[&str] = &["--dev", "--sanitizer", "none"];

// `cargo xtask fuzz` options (the help text is on `Task::Fuzz`).
#[derive(clap::Args)]
pub struct Args {
    /// Seconds each target runs.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    time: u64,
    /// A short run for CI: 10 seconds per target (overrides --time), built
    /// without optimizations and AddressSanitizer, which builds in a third
    /// of the time.
    #[arg(long)]
    smoke: bool,
    /// Build the targets and stop (CI builds them ahead, in the background).
    #[arg(long)]
    build_only: bool,
    /// Only these targets [default: all: policy, geofeed, mmdb, events, dns].
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(TARGETS.iter().map(|(t, _)| *t)))]
    targets: Vec<String>,
}

/// Read by the agent's build script: build it without kernel programs.
const NO_KERNEL_PROGRAMS: &str = "BULKHEAD_NO_KERNEL_PROGRAMS";

/// What one target's run showed.
#[derive(Debug, Default, PartialEq, Eq)]
struct Outcome {
    execs: Option<u64>,
    peak_rss_mb: Option<u64>,
    /// Inputs in the working corpus at the end.
    corpus: Option<u64>,
    /// Where libFuzzer saved the input that crashed it.
    artifact: Option<String>,
}

pub fn run_fuzz(args: Args) -> Result<()> {
    let secs = if args.smoke { SMOKE_SECS } else { args.time };
    let targets: Vec<(&str, usize)> = TARGETS
        .iter()
        .copied()
        .filter(|(t, _)| args.targets.is_empty() || args.targets.iter().any(|a| a == t))
        .collect();
    ensure_nightly()?;
    ensure_cargo_fuzz()?;

    let root = workspace_root();
    let fuzz = root.join("fuzz");
    let build_flags: &[&str] = if args.smoke { SMOKE_BUILD } else { &[] };
    let started = Instant::now();
    // The fuzz targets never load kernel programs: building them (twice,
    // in fuzz/target) would only add a minute and a half.
    run(cargo_nightly()
        .env(NO_KERNEL_PROGRAMS, "1")
        .args(["fuzz", "build"])
        .args(build_flags))?;
    eprintln!("fuzz: built the targets in {:.0?}", started.elapsed());
    if args.build_only {
        return Ok(());
    }

    let mut results = Vec::new();
    for (target, max_len) in &targets {
        let corpus = fuzz.join("corpus").join(target);
        fs::create_dir_all(&corpus)
            .with_context(|| format!("cannot create {}", corpus.display()))?;
        let mut cmd = cargo_nightly();
        cmd.env(NO_KERNEL_PROGRAMS, "1")
            .args(["fuzz", "run"])
            .args(build_flags)
            .arg(target)
            .arg(rel(&root, &corpus))
            .arg(rel(&root, &fuzz.join("seeds").join(target)))
            .arg("--")
            .arg(format!("-max_total_time={secs}"))
            .arg(format!("-max_len={max_len}"))
            // A single input that takes this long is a hang, i.e. a bug.
            .arg("-timeout=10")
            .arg("-rss_limit_mb=2048")
            .arg("-print_final_stats=1");
        let dict = fuzz.join("dicts").join(format!("{target}.dict"));
        if dict.is_file() {
            cmd.arg(format!("-dict={}", rel(&root, &dict).display()));
        }
        let t0 = Instant::now();
        let (ok, outcome) = run_filtered(&mut cmd)?;
        let took = t0.elapsed().as_secs_f64();
        if !ok {
            match &outcome.artifact {
                Some(at) => bail!(
                    "fuzz target `{target}` crashed; the input is in {at}\n  \
                     reproduce: cargo +nightly fuzz run {target} {at}\n  \
                     then add it to the agent's unit tests as a regression test"
                ),
                None => bail!("fuzz target `{target}` failed without a crashing input (see above)"),
            }
        }
        results.push((*target, took, outcome));
    }

    eprintln!("\nfuzz: {secs} s per target, no crashes");
    eprintln!(
        "{:<8} {:>8} {:>12} {:>10} {:>8} {:>8}",
        "target", "seconds", "execs", "execs/s", "corpus", "rss MB"
    );
    let show = |v: Option<u64>| v.map_or_else(|| "?".to_string(), |v| v.to_string());
    for (target, took, o) in &results {
        let rate = o
            .execs
            .map_or_else(|| "?".to_string(), |e| format!("{:.0}", e as f64 / took));
        eprintln!(
            "{target:<8} {took:>8.1} {:>12} {rate:>10} {:>8} {:>8}",
            show(o.execs),
            show(o.corpus),
            show(o.peak_rss_mb)
        );
    }
    Ok(())
}

/// `path` relative to the workspace root (cargo fuzz runs from there), so
/// the commands it prints are short and can be pasted.
fn rel(root: &Path, path: &Path) -> PathBuf {
    path.strip_prefix(root).unwrap_or(path).to_path_buf()
}

/// Runs libFuzzer showing what matters: everything but its progress lines
/// (`#123 NEW ...`, thousands a minute), of which only the last is kept.
fn run_filtered(cmd: &mut Command) -> Result<(bool, Outcome)> {
    let shown = display(cmd);
    eprintln!("+ {shown}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{shown}`"))?;
    let stderr = child.stderr.take().context("no stderr pipe")?;
    let mut outcome = Outcome::default();
    let mut last_progress = None;
    for line in BufReader::new(stderr).lines() {
        let line = line.context("reading libFuzzer's output")?;
        note(&line, &mut outcome);
        if is_progress(&line) {
            last_progress = Some(line);
        } else {
            if let Some(p) = last_progress.take() {
                eprintln!("{p}");
            }
            eprintln!("{line}");
        }
    }
    if let Some(p) = last_progress {
        eprintln!("{p}");
    }
    let status = child.wait().context("waiting for cargo fuzz")?;
    Ok((status.success(), outcome))
}

fn is_progress(line: &str) -> bool {
    (line.starts_with('#') && !line.contains("DONE")) || line.trim_start().starts_with("NEW_FUNC")
}

/// Picks the numbers out of libFuzzer's output.
fn note(line: &str, o: &mut Outcome) {
    let stat = |name: &str| {
        line.strip_prefix(name)
            .and_then(|rest| rest.trim().parse::<u64>().ok())
    };
    if let Some(n) = stat("stat::number_of_executed_units:") {
        o.execs = Some(n);
    } else if let Some(n) = stat("stat::peak_rss_mb:") {
        o.peak_rss_mb = Some(n);
    } else if let Some(rest) = line.split_once("Test unit written to ").map(|(_, r)| r) {
        o.artifact = Some(rest.trim().to_string());
    }
    // `#4096 pulse  cov: 812 ft: 1903 corp: 95/4211b ...` and the final
    // `#60123 DONE  cov: ... corp: 120/6Kb ...`.
    if line.starts_with('#')
        && let Some(corp) = line.split_whitespace().skip_while(|w| *w != "corp:").nth(1)
        && let Some(n) = corp.split('/').next().and_then(|n| n.parse().ok())
    {
        o.corpus = Some(n);
    }
}

fn ensure_nightly() -> Result<()> {
    let toolchains = probe(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if toolchains.lines().any(|l| l.starts_with("nightly-")) {
        return Ok(());
    }
    run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))
}

/// Installs cargo-fuzz unless a 0.13.x is on PATH.
fn ensure_cargo_fuzz() -> Result<()> {
    let version = probe(cargo().args(["fuzz", "--version"]));
    if let Some(v) = &version
        && cargo_fuzz_version_ok(v)
    {
        eprintln!("  ok   {}", v.trim());
        return Ok(());
    }
    let started = Instant::now();
    let mut install = cargo();
    install.args([
        "install",
        "cargo-fuzz",
        "--version",
        &format!("^{CARGO_FUZZ_SERIES}"),
    ]);
    if in_ci() {
        install.arg("--locked");
    }
    if version.is_some() {
        install.arg("--force");
    }
    run(&mut install)?;
    eprintln!("fuzz: installed cargo-fuzz in {:.0?}", started.elapsed());
    match probe(cargo().args(["fuzz", "--version"])) {
        Some(v) if cargo_fuzz_version_ok(&v) => Ok(()),
        Some(v) => bail!(
            "installed cargo-fuzz reports `{}`; is another one earlier on PATH?",
            v.trim()
        ),
        None => bail!("cargo-fuzz was installed but does not run; is ~/.cargo/bin on PATH?"),
    }
}

/// `cargo-fuzz 0.13.2` → true.
fn cargo_fuzz_version_ok(version: &str) -> bool {
    version
        .split_whitespace()
        .nth(1)
        .is_some_and(|v| v.starts_with(&format!("{CARGO_FUZZ_SERIES}.")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_output() {
        let mut o = Outcome::default();
        for line in [
            "INFO: Seed: 1234",
            "#2\tINITED cov: 310 ft: 412 corp: 6/4107b exec/s: 0 rss: 41Mb",
            "#4096\tpulse  cov: 812 ft: 1903 corp: 95/4211b lim: 43 exec/s: 2048 rss: 60Mb",
            "#60123\tDONE   cov: 900 ft: 2100 corp: 120/6Kb lim: 4096 exec/s: 1001 rss: 63Mb",
            "stat::number_of_executed_units: 60123",
            "stat::average_exec_per_sec:     1001",
            "stat::peak_rss_mb:              63",
        ] {
            note(line, &mut o);
        }
        assert_eq!(
            o,
            Outcome {
                execs: Some(60123),
                peak_rss_mb: Some(63),
                corpus: Some(120),
                artifact: None,
            }
        );
        note(
            "artifact_prefix='fuzz/artifacts/events/'; Test unit written to fuzz/artifacts/events/crash-da39a3ee",
            &mut o,
        );
        assert_eq!(
            o.artifact.as_deref(),
            Some("fuzz/artifacts/events/crash-da39a3ee")
        );
        assert!(is_progress("#4096\tpulse  cov: 812"));
        assert!(!is_progress("#60123\tDONE   cov: 900"));
        assert!(!is_progress(
            "==1234==ERROR: AddressSanitizer: heap-buffer-overflow"
        ));
    }

    #[test]
    fn cargo_fuzz_series() {
        assert!(cargo_fuzz_version_ok("cargo-fuzz 0.13.2\n"));
        assert!(!cargo_fuzz_version_ok("cargo-fuzz 0.12.0"));
        assert!(!cargo_fuzz_version_ok(""));
    }

    #[test]
    fn every_target_has_a_source_and_seeds() {
        let fuzz = workspace_root().join("fuzz");
        for (t, _) in TARGETS {
            assert!(
                fuzz.join("fuzz_targets").join(format!("{t}.rs")).is_file(),
                "{t}"
            );
            let seeds = fs::read_dir(fuzz.join("seeds").join(t)).unwrap().count();
            assert!(seeds > 0, "no seeds for {t}");
        }
    }
}
