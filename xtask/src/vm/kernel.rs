//! The kernel a VM boots: Debian 12's 6.1 image fetched with `apt-get
//! download`, the host's own `/boot/vmlinuz-$(uname -r)`, or a `.deb` /
//! kernel image a user names. Besides the image, the modules the end-to-end
//! tests need (veth, when it is not built in) are collected, dependencies
//! first, for `insmod` in the initramfs.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{run, run_capture};

/// Modules the end-to-end tests use that distributions build as modules.
const MODULES: &[(&str, &str)] = &[
    ("veth", "CONFIG_VETH"),
    ("inet_diag", "CONFIG_INET_DIAG"),
    ("tcp_diag", "CONFIG_INET_TCP_DIAG"),
    ("udp_diag", "CONFIG_INET_UDP_DIAG"),
    // nftables with NAT: a bypass test rewrites a destination after
    // connect with a DNAT rule. libcrc32c (which they need) asks the
    // crypto API for crc32c when it loads: a module on Debian 11.
    ("crc32c_generic", "CONFIG_CRYPTO_CRC32C"),
    ("nf_tables", "CONFIG_NF_TABLES"),
    ("nft_chain_nat", "CONFIG_NFT_NAT"),
    ("nft_nat", "CONFIG_NFT_NAT"),
];

/// Written beside an unpacked kernel: the [`MODULES`] it was unpacked for,
/// so a kernel cached before the list changed is unpacked again.
const MODULES_STAMP: &str = "modules.wanted";

fn modules_wanted() -> String {
    MODULES.iter().map(|(m, _)| format!("{m}\n")).collect()
}

/// Options the VM run needs built in (`=y`): without them the kernel cannot
/// boot from the initramfs, show a console, or run the agent at all.
const REQUIRED_CONFIG: &[&str] = &[
    "CONFIG_BLK_DEV_INITRD",
    "CONFIG_DEVTMPFS",
    "CONFIG_SERIAL_8250_CONSOLE",
    "CONFIG_CGROUPS",
    "CONFIG_CGROUP_BPF",
    "CONFIG_BPF_SYSCALL",
    "CONFIG_DEBUG_INFO_BTF",
    "CONFIG_NET_NS",
    "CONFIG_INET",
    "CONFIG_IPV6",
];

pub struct Kernel {
    /// What to call it in reports: `debian-6.1 (6.1.0-56-amd64)`.
    pub label: String,
    /// Short name for directories: `debian-6.1`, `host`, or the file stem.
    pub slug: String,
    pub image: PathBuf,
    /// `.ko` files to insmod, dependencies first.
    pub modules: Vec<PathBuf>,
    /// The kernel's build config, when known.
    pub config: Option<String>,
}

/// Debian releases `--kernel debian-N` boots, each with its own kernel:
/// (number, codename, kernel series).
pub const RELEASES: &[(&str, &str, &str)] = &[
    ("11", "bullseye", "5.10"),
    ("12", "bookworm", "6.1"),
    ("13", "trixie", "6.12"),
];

/// Ubuntu LTS releases `--kernel ubuntu-N` boots, each with its
/// general-availability kernel (`linux-image-generic`): (number, codename,
/// kernel series).
pub const UBUNTU_RELEASES: &[(&str, &str, &str)] =
    &[("22.04", "jammy", "5.15"), ("24.04", "noble", "6.8")];

/// Resolves `--kernel`: `debian-11`, `debian-12` or `debian-13` (that
/// release's newest kernel, from Debian's archive through a private apt
/// configuration), `ubuntu-22.04` or `ubuntu-24.04` (the same from
/// Ubuntu's archive), `debian-6.1` (or another `debian-X.Y` series the
/// host's apt sources carry, e.g. `debian-6.12`), `host`, a `.deb`, or an
/// image path.
pub fn resolve(which: &str, cache: &Path) -> Result<Kernel> {
    if let Some((number, codename, _)) = RELEASES
        .iter()
        .find(|(n, _, _)| which.strip_prefix("debian-") == Some(n))
    {
        return debian_release(number, codename, cache);
    }
    if let Some((number, codename, _)) = UBUNTU_RELEASES
        .iter()
        .find(|(n, _, _)| which.strip_prefix("ubuntu-") == Some(n))
    {
        return ubuntu_release(number, codename, cache);
    }
    match which {
        "host" => host(),
        series if series.starts_with("debian-") && !series.ends_with(".deb") => {
            debian(&series["debian-".len()..], cache)
        }
        path if path.ends_with(".deb") => from_deb(Path::new(path), cache, "custom"),
        path => from_image(Path::new(path)),
    }
}

/// The newest Debian kernel package of `series` (`6.1`: the
/// `linux-image-6.1.0-N-amd64` with the highest N, Debian 12's own kernel;
/// others through their `linux-image-X.Y-amd64` meta-package, e.g. 6.12,
/// which Debian 12 also carries), downloaded and unpacked once.
fn debian(series: &str, cache: &Path) -> Result<Kernel> {
    if !series
        .split('.')
        .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
    {
        bail!("--kernel debian-{series}: expected a series like debian-6.1 or debian-6.12");
    }
    let pattern = format!(
        r"^linux-image-{}\.0-[0-9]+-amd64$",
        series.replace('.', r"\.")
    );
    let list = run_capture(Command::new("apt-cache").args(["search", "--names-only", &pattern]))?;
    let pkg = match newest_abi(&list, series) {
        Some(pkg) => pkg,
        None => {
            let meta = format!("linux-image-{series}-amd64");
            let deps = crate::cmd::probe(Command::new("apt-cache").args(["depends", &meta]))
                .unwrap_or_default();
            match meta_target(&deps, "-amd64") {
                Some(pkg) => pkg,
                None => bail!(
                    "apt-cache knows no Debian {series} kernel (linux-image-{series}.0-*-amd64 or {meta}): \
                     run `apt-get update` on a Debian 12 (bookworm) host, or add bookworm to the apt \
                     sources; or pass --kernel PATH.deb"
                ),
            }
        }
    };
    let dir = fetch(std::slice::from_ref(&pkg), &pkg, cache, |_| {})?;
    let release = pkg.trim_start_matches("linux-image-").to_string();
    cached(
        &dir,
        &format!("debian-{series} ({release})"),
        &format!("debian-{series}"),
    )
}

/// An apt configuration of its own under `cache/apt/NAME`, for one
/// release's archive: the host's sources, lists and dpkg state are neither
/// read nor changed.
struct PrivateApt {
    dir: PathBuf,
}

impl PrivateApt {
    /// `sources`: the `sources.list` lines. Fetches the index once a day at
    /// most: a kernel update is what it is for.
    fn new(cache: &Path, name: &str, sources: &str) -> Result<PrivateApt> {
        let apt = PrivateApt {
            dir: cache.join("apt").join(name),
        };
        let dir = &apt.dir;
        for d in ["lists/partial", "archives/partial", "parts", "prefs"] {
            fs::create_dir_all(dir.join(d))
                .with_context(|| format!("creating {}", dir.display()))?;
        }
        let list = dir.join("sources.list");
        let changed = fs::read_to_string(&list).ok().as_deref() != Some(sources);
        fs::write(&list, sources)?;
        fs::write(dir.join("status"), "")?;
        let fresh = fs::metadata(dir.join("lists"))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age.as_secs() < 86_400);
        let has_lists = fs::read_dir(dir.join("lists"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
            })
            .unwrap_or(false);
        if changed || !(fresh && has_lists) {
            let mut update = Command::new("apt-get");
            apt.opts(&mut update);
            run(update.args(["-q", "update"]))
                .with_context(|| format!("apt-get update for {name}"))?;
        }
        Ok(apt)
    }

    fn opts(&self, cmd: &mut Command) {
        let apt = &self.dir;
        for (k, v) in [
            ("Dir::Etc::SourceList", apt.join("sources.list")),
            ("Dir::Etc::SourceParts", apt.join("parts")),
            ("Dir::Etc::Preferences", apt.join("preferences")),
            ("Dir::Etc::PreferencesParts", apt.join("prefs")),
            ("Dir::State::Lists", apt.join("lists")),
            ("Dir::State::status", apt.join("status")),
            ("Dir::Cache", apt.join("cache")),
            ("Dir::Cache::archives", apt.join("archives")),
        ] {
            cmd.arg("-o").arg(format!("{k}={}", v.display()));
        }
        cmd.args(["-o", "APT::Architecture=amd64"]);
    }

    /// `apt-cache depends PKG`.
    fn depends(&self, pkg: &str) -> Result<String> {
        let mut depends = Command::new("apt-cache");
        self.opts(&mut depends);
        run_capture(depends.args(["depends", pkg]))
    }
}

/// Debian's archive for `codename`, security updates included.
fn debian_apt(codename: &str, cache: &Path) -> Result<PrivateApt> {
    let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
    PrivateApt::new(
        cache,
        codename,
        &format!(
            "deb [signed-by={keyring}] http://deb.debian.org/debian {codename} main\n\
             deb [signed-by={keyring}] http://deb.debian.org/debian-security {codename}-security main\n"
        ),
    )
}

/// The newest kernel of Debian `codename` (what its `linux-image-amd64`
/// points to, security updates included).
fn debian_release(number: &str, codename: &str, cache: &Path) -> Result<Kernel> {
    let apt = debian_apt(codename, cache)?;
    let deps = apt.depends("linux-image-amd64")?;
    let pkg = meta_target(&deps, "-amd64").with_context(|| {
        format!("Debian {number} ({codename}): linux-image-amd64 depends on no kernel image")
    })?;
    let dir = fetch(std::slice::from_ref(&pkg), &pkg, cache, |c| apt.opts(c))?;
    let release = pkg.trim_start_matches("linux-image-");
    cached(
        &dir,
        &format!("debian-{number} ({release})"),
        &format!("debian-{number}"),
    )
}

/// Ubuntu's archive key, from Debian's `ubuntu-keyring` package (fetched
/// through Debian 13's archive, whose key the host has; Debian 12 does
/// not carry it), unpacked once.
fn ubuntu_keyring(cache: &Path) -> Result<PathBuf> {
    let dir = cache.join("ubuntu-keyring");
    let keyring = dir.join("usr/share/keyrings/ubuntu-archive-keyring.gpg");
    if keyring.is_file() {
        return Ok(keyring);
    }
    let apt = debian_apt("trixie", cache)?;
    let deb = download("ubuntu-keyring", cache, &|c| apt.opts(c))?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&dir))?;
    fs::remove_file(&deb).with_context(|| format!("removing {}", deb.display()))?;
    if !keyring.is_file() {
        bail!(
            "Debian's ubuntu-keyring package has no {}",
            keyring.display()
        );
    }
    Ok(keyring)
}

/// The newest general-availability kernel of Ubuntu `codename` (what its
/// `linux-image-generic` points to, updates and security updates
/// included): the image package and its modules package (where Ubuntu
/// keeps the config too).
fn ubuntu_release(number: &str, codename: &str, cache: &Path) -> Result<Kernel> {
    let keyring = ubuntu_keyring(cache)?;
    let keyring = keyring.display();
    let archive = "http://archive.ubuntu.com/ubuntu";
    let apt = PrivateApt::new(
        cache,
        &format!("ubuntu-{codename}"),
        &format!(
            "deb [signed-by={keyring}] {archive} {codename} main\n\
             deb [signed-by={keyring}] {archive} {codename}-updates main\n\
             deb [signed-by={keyring}] {archive} {codename}-security main\n"
        ),
    )?;
    let deps = apt.depends("linux-image-generic")?;
    let pkg = meta_target(&deps, "-generic").with_context(|| {
        format!("Ubuntu {number} ({codename}): linux-image-generic depends on no kernel image")
    })?;
    let release = pkg.trim_start_matches("linux-image-").to_string();
    let pkgs = [pkg.clone(), format!("linux-modules-{release}")];
    let dir = fetch(&pkgs, &pkg, cache, |c| apt.opts(c))?;
    cached(
        &dir,
        &format!("ubuntu-{number} ({release})"),
        &format!("ubuntu-{number}"),
    )
}

/// Downloads kernel packages `pkgs` (the image first, then any package
/// with its modules) with `apt-get` (its options set by `apt`) and unpacks
/// them together into `cache/NAME`, once; returns that directory.
fn fetch(pkgs: &[String], name: &str, cache: &Path, apt: impl Fn(&mut Command)) -> Result<PathBuf> {
    let dir = cache.join(name);
    let stamp = fs::read_to_string(dir.join(MODULES_STAMP)).unwrap_or_default();
    if dir.join("vmlinuz").is_file() && stamp == modules_wanted() {
        eprintln!("  ok   {name} (cached in {})", dir.display());
        return Ok(dir);
    }
    let debs = pkgs
        .iter()
        .map(|pkg| download(pkg, cache, &apt))
        .collect::<Result<Vec<_>>>()?;
    unpack_debs(&debs, &dir)?;
    for deb in debs {
        fs::remove_file(&deb).with_context(|| format!("removing {}", deb.display()))?;
    }
    Ok(dir)
}

/// `apt-get download PKG` (its options set by `apt`) into `cache`; the
/// path of the `.deb`.
fn download(pkg: &str, cache: &Path, apt: &impl Fn(&mut Command)) -> Result<PathBuf> {
    fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    let mut download = Command::new("apt-get");
    apt(&mut download);
    // Downloads into the current directory; as root apt warns that it
    // cannot drop to the _apt user there, which is harmless.
    run(download.args(["download", pkg]).current_dir(cache))?;
    find_deb(cache, pkg)
}

/// The kernel package a meta-package depends on (`apt-cache depends`),
/// named `linux-image-…SUFFIX`.
fn meta_target(deps: &str, suffix: &str) -> Option<String> {
    deps.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .map(str::trim)
        .find(|d| d.starts_with("linux-image-") && d.ends_with(suffix))
        .map(str::to_string)
}

/// Extracts kernel packages (an image, and where a distribution keeps them
/// apart, its modules) and keeps only the image, its config and the
/// modules in [`MODULES`] (with their dependencies), under `dir`:
/// `vmlinuz`, `config`, `modules/NAME.ko`, `modules.order`.
fn unpack_debs(debs: &[PathBuf], dir: &Path) -> Result<()> {
    // Not with_extension: kernel package names have dots ("6.12.118+deb13").
    let tmp = PathBuf::from(format!("{}.unpack", dir.display()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp)?;
    for deb in debs {
        run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&tmp))?;
    }
    let boot = tmp.join("boot");
    let image = find_prefixed(&boot, "vmlinuz-")?
        .with_context(|| format!("{} has no boot/vmlinuz-*", debs[0].display()))?;
    let config_file = find_prefixed(&boot, "config-")?;
    let config = config_file.as_deref().map(fs::read_to_string).transpose()?;
    let release = image
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .unwrap_or_default()
        .to_string();
    // Debian 13's packages are merged-/usr: modules under usr/lib.
    let moddir = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| tmp.join(d).join(&release))
        .find(|d| d.is_dir())
        .unwrap_or_else(|| tmp.join("lib/modules").join(&release));
    let modules = needed_modules(config.as_deref(), &moddir)?;

    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir.join("modules"))?;
    fs::copy(&image, dir.join("vmlinuz"))?;
    if let Some(c) = &config {
        fs::write(dir.join("config"), c)?;
    }
    let mut order = String::new();
    for m in &modules {
        let name = m.file_name().context("module name")?;
        fs::write(dir.join("modules").join(name), read_module(m)?)?;
        order.push_str(&name.to_string_lossy());
        order.push('\n');
    }
    fs::write(dir.join("modules.order"), order)?;
    fs::write(dir.join(MODULES_STAMP), modules_wanted())?;
    fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    Ok(())
}

/// A kernel unpacked by [`unpack_deb`].
fn cached(dir: &Path, label: &str, slug: &str) -> Result<Kernel> {
    let order = fs::read_to_string(dir.join("modules.order")).unwrap_or_default();
    let modules = order
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| dir.join("modules").join(l))
        .collect();
    Ok(Kernel {
        label: label.to_string(),
        slug: slug.to_string(),
        image: dir.join("vmlinuz"),
        modules,
        config: fs::read_to_string(dir.join("config")).ok(),
    })
}

fn from_deb(deb: &Path, cache: &Path, slug: &str) -> Result<Kernel> {
    let stem = deb
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| slug.to_string());
    let dir = cache.join(&stem);
    unpack_debs(&[deb.to_path_buf()], &dir)?;
    cached(&dir, &stem, &stem)
}

fn from_image(image: &Path) -> Result<Kernel> {
    if !image.is_file() {
        bail!(
            "--kernel {}: not debian-6.1, host, a .deb, or an existing kernel image",
            image.display()
        );
    }
    eprintln!(
        "  note a bare kernel image brings no modules: veth must be built in (CONFIG_VETH=y)"
    );
    let stem = image
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "custom".into());
    Ok(Kernel {
        label: image.display().to_string(),
        slug: stem,
        image: image.to_path_buf(),
        modules: Vec::new(),
        config: None,
    })
}

/// The running kernel's image and modules, when this host has them in
/// `/boot` and `/lib/modules` (VMs booted by firecracker or similar, and
/// most containers, do not).
fn host() -> Result<Kernel> {
    let release = run_capture(Command::new("uname").arg("-r"))?
        .trim()
        .to_string();
    let image = PathBuf::from(format!("/boot/vmlinuz-{release}"));
    if !image.is_file() {
        bail!(
            "--kernel host: {} does not exist: this machine's kernel ({release}) was not installed from a \
             package (a firecracker-style VM or a container boots a kernel from outside); use --kernel \
             debian-6.1, or pass a kernel image or .deb path; the host kernel itself is covered by \
             `cargo xtask test`",
            image.display()
        );
    }
    let config = fs::read_to_string(format!("/boot/config-{release}")).ok();
    let moddir = PathBuf::from(format!("/lib/modules/{release}"));
    let modules = needed_modules(config.as_deref(), &moddir)?;
    let dir = std::env::temp_dir().join(format!("bulkhead-vm-host-modules-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let mut plain = Vec::new();
    for m in modules {
        let name = module_name(&m);
        let out = dir.join(format!("{name}.ko"));
        fs::write(&out, read_module(&m)?)?;
        plain.push(out);
    }
    Ok(Kernel {
        label: format!("host ({release})"),
        slug: "host".into(),
        image,
        modules: plain,
        config,
    })
}

/// The `linux-image-SERIES.0-N-amd64` with the highest N in `apt-cache
/// search` output.
fn newest_abi(list: &str, series: &str) -> Option<String> {
    let prefix = format!("linux-image-{series}.0-");
    list.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|name| {
            let abi = name.strip_prefix(&prefix)?.strip_suffix("-amd64")?;
            Some((abi.parse::<u32>().ok()?, name.to_string()))
        })
        .max()
        .map(|(_, name)| name)
}

fn find_deb(dir: &Path, pkg: &str) -> Result<PathBuf> {
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        let name = p.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with(&format!("{pkg}_")) && name.ends_with(".deb") {
            return Ok(p);
        }
    }
    bail!(
        "apt-get download {pkg} left no {pkg}_*.deb in {}",
        dir.display()
    )
}

fn find_prefixed(dir: &Path, prefix: &str) -> Result<Option<PathBuf>> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(None);
    };
    for e in entries {
        let p = e?.path();
        if p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        {
            return Ok(Some(p));
        }
    }
    Ok(None)
}

/// The value of `key` in a kernel config (`y`, `m`, a string), if set.
pub fn config_value<'a>(config: &'a str, key: &str) -> Option<&'a str> {
    config.lines().find_map(|l| {
        l.strip_prefix(key)
            .and_then(|rest| rest.strip_prefix('='))
            .map(|v| v.trim_matches('"'))
    })
}

/// Fails when the config lacks what the VM run needs; returns notes
/// (BPF LSM state) otherwise.
pub fn check_config(config: &str) -> Result<Vec<String>> {
    let missing: Vec<&str> = REQUIRED_CONFIG
        .iter()
        .copied()
        .filter(|k| config_value(config, k) != Some("y"))
        .collect();
    if !missing.is_empty() {
        bail!(
            "this kernel's config lacks (=y): {}; bulkhead or the VM harness cannot run on it",
            missing.join(", ")
        );
    }
    let mut notes = Vec::new();
    let bpf_lsm = config_value(config, "CONFIG_BPF_LSM") == Some("y");
    let lsm_list = config_value(config, "CONFIG_LSM").unwrap_or("");
    notes.push(format!(
        "CONFIG_BPF_LSM={} and CONFIG_LSM={lsm_list:?}: BPF LSM {}",
        if bpf_lsm { "y" } else { "n" },
        if bpf_lsm && lsm_list.split(',').any(|m| m == "bpf") {
            "active by default"
        } else {
            "not active"
        }
    ));
    for (module, key) in MODULES {
        notes.push(format!(
            "{key}={} ({module})",
            config_value(config, key).unwrap_or("n")
        ));
    }
    Ok(notes)
}

/// The `.ko` files of [`MODULES`] that this kernel builds as modules, with
/// their dependencies, dependencies first.
fn needed_modules(config: Option<&str>, moddir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for (module, key) in MODULES {
        match config.and_then(|c| config_value(c, key)) {
            Some("y") => continue,
            Some("m") | None => {}
            Some(other) => bail!("{key}={other}: the tests need {module}"),
        }
        let builtin = fs::read_to_string(moddir.join("modules.builtin")).unwrap_or_default();
        if builtin
            .lines()
            .any(|l| module_name(Path::new(l)) == *module)
        {
            continue;
        }
        add_module(module, moddir, &mut out)?;
    }
    Ok(out)
}

fn add_module(name: &str, moddir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    if out.iter().any(|p| module_name(p) == name) {
        return Ok(());
    }
    let path = find_module(&moddir.join("kernel"), name)?.with_context(|| {
        format!(
            "module {name} not found under {} (and not built in)",
            moddir.display()
        )
    })?;
    let data = read_module(&path)?;
    for dep in module_depends(&data) {
        add_module(&dep, moddir, out)?;
    }
    out.push(path);
    Ok(())
}

/// `NAME` of `.../NAME.ko[.xz|.zst|.gz]`, with `-` read as `_` as modprobe does.
fn module_name(p: &Path) -> String {
    let file = p.file_name().unwrap_or_default().to_string_lossy();
    let base = file.split(".ko").next().unwrap_or_default();
    base.replace('-', "_")
}

fn find_module(dir: &Path, name: &str) -> Result<Option<PathBuf>> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(None);
    };
    for e in entries {
        let p = e?.path();
        if p.is_dir() {
            if let Some(found) = find_module(&p, name)? {
                return Ok(Some(found));
            }
        } else if p.to_string_lossy().contains(".ko") && module_name(&p) == name {
            return Ok(Some(p));
        }
    }
    Ok(None)
}

/// A module file's bytes, decompressed when it is `.ko.xz`/`.zst`/`.gz`
/// (busybox's insmod wants a plain `.ko`).
fn read_module(p: &Path) -> Result<Vec<u8>> {
    let name = p.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => fs::read(p).with_context(|| format!("reading {}", p.display())),
        Some(tool) => {
            let out = Command::new(tool)
                .arg("-dc")
                .arg(p)
                .output()
                .with_context(|| format!("running {tool} -dc {}", p.display()))?;
            if !out.status.success() {
                bail!("{tool} -dc {} failed", p.display());
            }
            Ok(out.stdout)
        }
    }
}

/// The `depends=` entry of a module's `.modinfo` (comma-separated names).
fn module_depends(ko: &[u8]) -> Vec<String> {
    ko.split(|&b| b == 0)
        .find_map(|s| s.strip_prefix(b"depends="))
        .map(|d| {
            String::from_utf8_lossy(d)
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.replace('-', "_"))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_newest_abi() {
        let list = "linux-image-6.1.0-47-amd64 - Linux 6.1 for 64-bit PCs (signed)\n\
                    linux-image-6.1.0-56-amd64 - Linux 6.1 for 64-bit PCs (signed)\n\
                    linux-image-6.1.0-9-amd64 - Linux 6.1 for 64-bit PCs (signed)\n\
                    linux-image-6.1.0-60-cloud-amd64 - Linux 6.1 for x86-64 cloud (signed)\n";
        assert_eq!(
            newest_abi(list, "6.1").as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        assert_eq!(newest_abi(list, "6.12"), None);
        assert_eq!(newest_abi("", "6.1"), None);
        let deps = "linux-image-6.12-amd64\n  Depends: linux-image-6.12.117+deb12-amd64\n";
        assert_eq!(
            meta_target(deps, "-amd64").as_deref(),
            Some("linux-image-6.12.117+deb12-amd64")
        );
        assert_eq!(meta_target("E: No packages found", "-amd64"), None);
        let deps = "linux-image-generic\n  Depends: linux-image-5.15.0-163-generic\n  Depends: linux-firmware\n";
        assert_eq!(
            meta_target(deps, "-generic").as_deref(),
            Some("linux-image-5.15.0-163-generic")
        );
    }

    #[test]
    fn config_values_and_required_options() {
        let mut cfg = REQUIRED_CONFIG
            .iter()
            .map(|k| format!("{k}=y\n"))
            .collect::<String>();
        cfg.push_str("CONFIG_VETH=m\nCONFIG_BPF_LSM=y\nCONFIG_LSM=\"landlock,yama,bpf\"\n# CONFIG_FOO is not set\n");
        assert_eq!(config_value(&cfg, "CONFIG_VETH"), Some("m"));
        assert_eq!(config_value(&cfg, "CONFIG_LSM"), Some("landlock,yama,bpf"));
        assert_eq!(config_value(&cfg, "CONFIG_FOO"), None);
        assert_eq!(config_value(&cfg, "CONFIG_BPF"), None);
        let notes = check_config(&cfg).unwrap();
        assert!(notes[0].contains("active by default"), "{notes:?}");
        let err = check_config("CONFIG_BPF_SYSCALL=y\n").unwrap_err();
        assert!(format!("{err}").contains("CONFIG_CGROUP_BPF"));
    }

    #[test]
    fn module_names_and_depends() {
        assert_eq!(module_name(Path::new("a/b/veth.ko")), "veth");
        assert_eq!(module_name(Path::new("x/nf-nat.ko.zst")), "nf_nat");
        assert_eq!(module_name(Path::new("kernel/drivers/net/veth.ko")), "veth");
        let ko = b"\x7fELF...\0license=GPL\0depends=nf_conntrack,libcrc32c\0name=nf_nat\0";
        assert_eq!(module_depends(ko), ["nf_conntrack", "libcrc32c"]);
        assert!(module_depends(b"\0depends=\0name=veth\0").is_empty());
    }
}
