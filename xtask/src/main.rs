//! `cargo xtask`: bulkhead's developer tasks (setup, build, test, demo, bench).
//!
//! Every task prints each command it runs (`+ cmd args`), like `set -x`,
//! and stops at the first failure with a non-zero exit code.

mod bench;
mod cmd;
mod fuzz;
mod setup;
mod suites;
mod vmtest;

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};

use crate::{
    cmd::{cargo, cargo_nightly, is_root, locked, run, workspace_root},
    setup::{ensure_bpffs, ensure_securityfs, geo_db_path, skip_or_fail},
};

/// Environment variable naming the agent binary for end-to-end tests and the demo.
const BIN_ENV: &str = "BULKHEAD_BIN";
/// Environment variable naming the test country database (set for all tests).
const GEO_DB_ENV: &str = "BULKHEAD_TEST_GEO_DB";

/// bulkhead developer tasks. Each prints the commands it runs.
#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need, skipping what is there.
    ///
    /// Nightly Rust with rust-src and clippy (the eBPF crate is built with
    /// `-Z build-std=core`), bpf-linker 0.13 built against nightly's LLVM,
    /// the Debian packages the tests call (apt-get needs root), and the CC0
    /// test country database in ~/.cache/bulkhead/ (via npm). Idempotent.
    Setup {
        /// Also what `build --static` and `vm-test` need: the musl target,
        /// musl-tools, QEMU and busybox.
        #[arg(long)]
        vm: bool,
    },
    /// Build the agent binary, kernel programs included (runs setup first).
    ///
    /// Output: target/debug/bulkhead, or target/release/bulkhead with
    /// --release, or with --static
    /// target/x86_64-unknown-linux-musl/release/bulkhead.
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
        /// A static (musl) release build, for containers and VMs: adds the
        /// x86_64-unknown-linux-musl target and musl-tools (for the bundled
        /// SQLite) when missing, and checks the result has no interpreter.
        #[arg(long = "static")]
        static_build: bool,
        /// With --static: agent features to enable, comma-separated (`k8s`
        /// for the Kubernetes pod mapping the DaemonSet image uses).
        #[arg(long, value_delimiter = ',', requires = "static_build")]
        features: Vec<String>,
    },
    /// Run every check CI runs; as root, the privileged end-to-end tests too.
    ///
    /// Steps: setup; cargo fmt --check; clippy -D warnings for the host
    /// crates and for the eBPF crate (bpfel target, nightly); cargo test
    /// (unprivileged unit tests); then, as root, a release build of the agent
    /// and the end-to-end suites in `tests/`, two suites at a time (each
    /// one's tests one at a time; each suite's output is printed when it
    /// ends and kept in target/e2e/), with BULKHEAD_BIN set to the agent
    /// binary. BULKHEAD_TEST_GEO_DB names the test country database. When
    /// not root the end-to-end tests are skipped with a notice, unless the
    /// CI environment variable is set: then not being root is an error.
    Test {
        /// Stop after the unprivileged unit tests (no root needed).
        #[arg(long)]
        unprivileged_only: bool,
        /// How many end-to-end suites run at once. They wait on agents,
        /// timers and sockets much of their time: two on two cores took
        /// 60% of the time of one at a time.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
        jobs: u16,
        /// Arguments for the test binaries, e.g. a test name filter:
        /// `cargo xtask test -- bridge`.
        #[arg(last = true, value_name = "TEST_ARGS")]
        test_args: Vec<String>,
    },
    /// Build the agent (release) and run the demo, tests/demo.sh (needs root).
    Demo,
    /// Benchmarks, each measured side by side with its baseline in one run
    /// (needs root): kernel decision cost (BPF_PROG_TEST_RUN) by policy
    /// size, policy compile + load time and memory against `nft -f`,
    /// traffic between network namespaces against no policy and nftables,
    /// and a deny storm with every event accounted for.
    ///
    /// Writes bench/results.json, bench/*.svg and BENCHMARKS.md. The full
    /// run takes under 20 minutes, `--quick` under 3. Builds the release
    /// agent first unless BULKHEAD_BIN names one.
    Bench(bench::Args),
    /// Run the end-to-end suites inside a QEMU VM booting another kernel
    /// (as root, or with /dev/kvm access).
    ///
    /// Default: Debian 12's 6.1 kernel (`apt-get download`, cached in
    /// ~/.cache/bulkhead/vm/), KVM when /dev/kvm works, else TCG. Builds
    /// the agent and the tests statically (musl), packs them with busybox,
    /// ip/nc/curl and the test geo database into an initramfs, boots it
    /// with no network device, and reports each test; exits non-zero when
    /// any fails. Output in target/vm-test/<kernel>/ (console.log,
    /// results.json).
    VmTest(vmtest::Args),
    /// Run the cargo-fuzz targets in fuzz/ (policy, geofeed, mmdb, events),
    /// each for --time seconds (default 60; --smoke: 10), with nightly.
    ///
    /// Installs cargo-fuzz on first use. Starts from fuzz/seeds/, keeps new
    /// inputs in fuzz/corpus/; a crash fails the task and names the input
    /// (saved in fuzz/artifacts/), which then becomes a regression test.
    Fuzz(fuzz::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup { vm: false } => setup::setup(),
        Task::Setup { vm: true } => setup::setup_vm(),
        Task::Build {
            static_build: true,
            features,
            ..
        } => vmtest::build_static_task(&features).map(|bin| {
            eprintln!("built {} (static)", bin.display());
        }),
        Task::Build { release, .. } => build(release).map(|bin| {
            eprintln!("built {}", bin.display());
        }),
        Task::Test {
            unprivileged_only,
            jobs,
            test_args,
        } => test(unprivileged_only, usize::from(jobs), &test_args),
        Task::Demo => demo(),
        Task::Bench(args) => bench::run(args),
        Task::Fuzz(args) => fuzz::run_fuzz(args),
        Task::VmTest(args) => vmtest::run_task(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs setup, builds the agent and returns the binary's absolute path.
fn build(release: bool) -> Result<PathBuf> {
    setup::setup()?;
    build_agent(release)
}

/// The agent as users get it: with the Kubernetes pod watch (`k8s`), so
/// the binary the tests and the demo run is the one a DaemonSet runs.
const AGENT_FEATURES: &str = "bulkhead/k8s";

fn build_agent(release: bool) -> Result<PathBuf> {
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--package",
        "bulkhead",
        "--features",
        AGENT_FEATURES,
    ])
    .args(locked());
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || workspace_root().join("target"),
        |d| workspace_root().join(d),
    );
    let bin = target_dir
        .join(if release { "release" } else { "debug" })
        .join("bulkhead");
    if !bin.is_file() {
        bail!("the build succeeded but {} does not exist", bin.display());
    }
    Ok(bin)
}

fn test(unprivileged_only: bool, jobs: usize, test_args: &[String]) -> Result<()> {
    setup::setup()?;
    let geo_db = geo_db_path()?;

    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo()
        .args([
            "clippy",
            "--workspace",
            "--exclude",
            "bulkhead-ebpf",
            "--all-targets",
            "--features",
            AGENT_FEATURES,
        ])
        .args(locked())
        .args(["--", "-D", "warnings"]))?;
    run(cargo_nightly()
        .args([
            "clippy",
            "--package",
            "bulkhead-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .args(locked())
        .args(["--", "-D", "warnings"]))?;
    let mut unit = cargo();
    unit.env(GEO_DB_ENV, &geo_db)
        .args(["test", "--features", AGENT_FEATURES])
        .args(locked());
    if !test_args.is_empty() {
        unit.arg("--").args(test_args);
    }
    run(&mut unit)?;

    let what = "privileged end-to-end tests (tests/)";
    if unprivileged_only {
        eprintln!("test: lints and unit tests passed");
        eprintln!("SKIPPED: {what}: --unprivileged-only");
        return Ok(());
    }
    if !is_root() {
        skip_or_fail(
            what,
            "they need root (eBPF, cgroups, network namespaces); run `cargo xtask test` as root",
        )?;
        eprintln!("test: lints and unit tests passed; end-to-end tests were skipped (see above)");
        return Ok(());
    }

    let bin = build_agent(true)?;
    ensure_bpffs()?;
    ensure_securityfs()?;
    let bins = suites::build(None)?;
    let env = [(BIN_ENV, bin.into()), (GEO_DB_ENV, geo_db.into())];
    suites::run_host(&bins, &env, jobs, test_args)?;
    eprintln!("test: all checks and tests passed");
    Ok(())
}

fn demo() -> Result<()> {
    setup::setup()?;
    if !is_root() {
        bail!("the demo loads eBPF programs and creates cgroups: run `cargo xtask demo` as root");
    }
    let script = workspace_root().join("tests").join("demo.sh");
    let bin = build_agent(true)?;
    if !script.is_file() {
        bail!("{} does not exist yet", script.display());
    }
    ensure_bpffs()?;
    ensure_securityfs()?;
    run(std::process::Command::new("bash")
        .arg(&script)
        .env(BIN_ENV, &bin)
        .env(GEO_DB_ENV, geo_db_path()?)
        .current_dir(workspace_root()))
}
