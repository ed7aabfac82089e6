//! Kernel feature probe, run by `bulkhead run` before anything is loaded.
//!
//! The supported minimum is **Linux 5.10** (Debian 11's kernel). Newer
//! helpers are used where the kernel has them, with a fallback where not:
//! `bpf_ktime_get_tai_ns` (6.1; else boot time plus an offset the agent
//! keeps), `bpf_loop` (5.17; else an object whose cgroup walk is a bounded
//! loop), BPF LSM cgroup hooks (6.0), `bpf_sock_destroy` (6.5). Instead of trusting
//! the version number (distribution kernels backport features, and configs
//! turn them off), every feature is probed on the running kernel the way
//! libbpf does it: a map of that type is created, or a two-instruction
//! program of the right type calling the helper is offered to the verifier,
//! and the answer decides. Only when a probe cannot answer (for example the
//! bpf() syscall itself is refused) does the `uname -r` version decide.
//!
//! A missing required feature stops the agent with a message naming it and
//! a kernel that has it; a missing optional feature is a warning naming
//! what degrades. [`probe`] returns the whole table (for `status`).

use std::{fmt, fs, path::Path};

use anyhow::{Result, bail};
use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};

use super::sys::{Attr, BPF_LINK_CREATE, bpf_fd};

/// A kernel release, `major.minor.patch`, compared numerically.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl KernelVersion {
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        KernelVersion {
            major,
            minor,
            patch,
        }
    }

    /// Parses the numeric head of a release string as `uname -r` prints it:
    /// `6.1.0-56-amd64`, `6.18.44-fc-v782`, `5.15.0-1050-azure`,
    /// `6.8.0-rc3+`, `6.1`. The patch level defaults to 0 and is capped at
    /// 255 as the kernel's own `KERNEL_VERSION` does. `None` unless at least
    /// `major.minor` are numbers.
    pub fn parse(release: &str) -> Option<Self> {
        let head = release.trim().split(['-', '+', ' ', '_', '~']).next()?;
        let mut parts = head.split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        let patch = parts
            .next()
            .map(|p| {
                let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
                digits.parse::<u32>().unwrap_or(0)
            })
            .unwrap_or(0)
            .min(255);
        Some(KernelVersion::new(major, minor, patch))
    }
}

impl fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.patch == 0 {
            write!(f, "{}.{}", self.major, self.minor)
        } else {
            write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
        }
    }
}

/// The oldest kernel bulkhead supports (and is tested on, in a VM).
pub const MIN_KERNEL: KernelVersion = KernelVersion::new(5, 10, 0);

/// Whether the agent cannot work without a feature or only degrades.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    Required,
    /// What is lost without it.
    Optional(&'static str),
}

/// What one probe found out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probed {
    Yes,
    No,
    /// The probe could not answer (the error says why).
    Unknown(String),
}

/// The verdict for one feature, and how it was reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The probe found it.
    Present,
    /// The probe did not find it.
    Missing,
    /// No probe answer; the kernel version says it should be there.
    AssumedByVersion,
    /// No probe answer, and the version is older than a kernel that has it.
    MissingByVersion,
    /// No probe answer and no readable version: assumed there, with a warning.
    Unknown,
}

impl Verdict {
    pub fn available(self) -> bool {
        matches!(
            self,
            Verdict::Present | Verdict::AssumedByVersion | Verdict::Unknown
        )
    }

    fn name(self) -> &'static str {
        match self {
            Verdict::Present => "present",
            Verdict::Missing => "missing",
            Verdict::AssumedByVersion => "assumed (kernel version)",
            Verdict::MissingByVersion => "missing (kernel version)",
            Verdict::Unknown => "unknown",
        }
    }
}

/// Combines a probe's answer with the version fallback.
pub fn decide(probed: &Probed, since: KernelVersion, running: Option<KernelVersion>) -> Verdict {
    match probed {
        Probed::Yes => Verdict::Present,
        Probed::No => Verdict::Missing,
        Probed::Unknown(_) => match running {
            Some(v) if v >= since => Verdict::AssumedByVersion,
            Some(_) => Verdict::MissingByVersion,
            None => Verdict::Unknown,
        },
    }
}

/// One kernel feature the agent uses.
pub struct Feature {
    /// Stable key (`lsm_cgroup`, `sock_destroy`, ...) for code that adapts
    /// to what the kernel has ([`Report::has`]) and for `status` JSON.
    pub id: &'static str,
    pub name: &'static str,
    /// A mainline kernel that has it: the release that introduced it where
    /// that is certain, otherwise the supported minimum (which has it).
    pub since: KernelVersion,
    pub need: Need,
    /// Which part of bulkhead uses it.
    pub used_for: &'static str,
    probe: fn() -> Probed,
}

/// Every feature bulkhead's kernel side uses, in the order they are checked.
pub fn features() -> &'static [Feature] {
    const V: fn(u32, u32) -> KernelVersion = |a, b| KernelVersion::new(a, b, 0);
    static FEATURES: std::sync::OnceLock<Vec<Feature>> = std::sync::OnceLock::new();
    FEATURES.get_or_init(|| {
        vec![
            Feature {
                id: "cgroup2",
                name: "cgroup v2 (unified hierarchy) mounted",
                since: V(4, 5),
                need: Need::Required,
                used_for: "domains are cgroups; every program attaches to a cgroup v2 directory",
                probe: || match crate::kernel::cgroup::cgroup2_mount() {
                    Ok(_) => Probed::Yes,
                    Err(_) => Probed::No,
                },
            },
            Feature {
                id: "prog_cgroup_skb",
                name: "cgroup_skb programs",
                since: V(4, 10),
                need: Need::Required,
                used_for: "cgroup_skb/egress and /ingress (backstop, inbound)",
                probe: || program(ProgramType::CgroupSkb),
            },
            Feature {
                id: "prog_cgroup_sock",
                name: "cgroup sock programs (sock_create, post_bind)",
                since: V(4, 17),
                need: Need::Required,
                used_for: "raw socket refusal, listener ownership",
                probe: || program(ProgramType::CgroupSock),
            },
            Feature {
                id: "prog_cgroup_sock_addr",
                name: "cgroup sock_addr programs (connect, sendmsg)",
                since: V(4, 18),
                need: Need::Required,
                used_for: "the connect4/6 and sendmsg4/6 decisions",
                probe: || program(ProgramType::CgroupSockAddr),
            },
            Feature {
                id: "cgroup_link",
                name: "BPF link-based cgroup attach (BPF_LINK_CREATE)",
                since: V(5, 7),
                need: Need::Required,
                used_for: "pinned links that keep enforcing after the agent exits",
                probe: link_create,
            },
            Feature {
                id: "map_lpm_trie",
                name: "LPM trie maps",
                since: V(4, 11),
                need: Need::Required,
                used_for: "domain networks and country prefixes",
                probe: || map(MapType::LpmTrie),
            },
            Feature {
                id: "map_lru_hash",
                name: "LRU hash maps",
                since: V(4, 10),
                need: Need::Required,
                used_for: "the per-cgroup event rate limiter",
                probe: || map(MapType::LruHash),
            },
            Feature {
                id: "map_ringbuf",
                name: "ring buffer maps (BPF_MAP_TYPE_RINGBUF)",
                since: V(5, 8),
                need: Need::Required,
                used_for: "the event stream",
                probe: || map(MapType::RingBuf),
            },
            Feature {
                id: "map_sk_storage",
                name: "socket local storage maps (BPF_MAP_TYPE_SK_STORAGE)",
                since: V(5, 2),
                need: Need::Required,
                used_for: "listener ownership and flow initiators",
                probe: || map(MapType::SkStorage),
            },
            Feature {
                id: "sk_storage_sock_addr",
                name: "bpf_sk_storage_get in cgroup sock_addr programs",
                since: MIN_KERNEL,
                need: Need::Required,
                used_for: "the domain of a same-host listener, looked up on connect",
                probe: || helper(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_sk_storage_get),
            },
            Feature {
                id: "sk_storage_sock",
                name: "bpf_sk_storage_get in cgroup sock programs",
                since: MIN_KERNEL,
                need: Need::Required,
                used_for: "recording a bound socket's owner in post_bind",
                probe: || helper(ProgramType::CgroupSock, BpfHelper::BPF_FUNC_sk_storage_get),
            },
            Feature {
                id: "sk_storage_skb",
                name: "bpf_sk_storage_get in cgroup_skb programs",
                since: MIN_KERNEL,
                need: Need::Required,
                used_for: "telling initiated flows from inbound ones in the skb hooks",
                probe: || helper(ProgramType::CgroupSkb, BpfHelper::BPF_FUNC_sk_storage_get),
            },
            Feature {
                id: "sk_lookup_sock_addr",
                name: "bpf_sk_lookup_tcp/udp in cgroup sock_addr programs",
                since: MIN_KERNEL,
                need: Need::Required,
                used_for: "finding the listener a same-host connect goes to",
                probe: || helper(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_sk_lookup_tcp),
            },
            Feature {
                id: "current_ancestor_cgroup_id",
                name: "bpf_get_current_ancestor_cgroup_id",
                since: V(5, 7),
                need: Need::Required,
                used_for: "nested cgroups belong to their nearest configured ancestor",
                probe: || {
                    both(
                        helper(
                            ProgramType::CgroupSockAddr,
                            BpfHelper::BPF_FUNC_get_current_ancestor_cgroup_id,
                        ),
                        helper(
                            ProgramType::CgroupSock,
                            BpfHelper::BPF_FUNC_get_current_ancestor_cgroup_id,
                        ),
                    )
                },
            },
            Feature {
                id: "skb_ancestor_cgroup_id",
                name: "bpf_skb_ancestor_cgroup_id in cgroup_skb programs",
                since: MIN_KERNEL,
                need: Need::Required,
                used_for: "the domain of a packet's cgroup",
                probe: || helper(ProgramType::CgroupSkb, BpfHelper::BPF_FUNC_skb_ancestor_cgroup_id),
            },
            Feature {
                id: "ktime_get_tai_ns",
                name: "bpf_ktime_get_tai_ns",
                since: V(6, 1),
                need: Need::Optional(
                    "the kernel programs read boot time plus the TAI offset the agent keeps current: while no agent runs, a clock step (NTP, `date -s`) moves bridge and domain windows by the step",
                ),
                used_for: "bridge and domain expiry on wall-clock (TAI) time, in the kernel",
                probe: || helper(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_ktime_get_tai_ns),
            },
            Feature {
                id: "loop",
                name: "bpf_loop",
                since: V(5, 17),
                need: Need::Optional(
                    "the cgroup ancestry walk is a loop the verifier unrolls: slower to load, the same decisions",
                ),
                used_for: "walking a workload's cgroup ancestry for its domain, in every hook",
                probe: || helper(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_loop),
            },
            Feature {
                id: "lsm_cgroup",
                name: "BPF LSM cgroup hooks (lsm_cgroup, with `bpf` in the active LSMs)",
                since: V(6, 0),
                need: Need::Optional(
                    "packet sockets (AF_PACKET) of domain workloads cannot be refused: run them without CAP_NET_RAW",
                ),
                used_for: "refusing AF_PACKET sockets (lsm_cgroup/socket_create)",
                probe: lsm_cgroup,
            },
            Feature {
                id: "sock_destroy",
                name: "bpf_sock_destroy kfunc",
                since: V(6, 5),
                need: Need::Optional(
                    "connections a policy stops allowing are not destroyed (the application sees no error); the cgroup_skb hooks drop their packets instead",
                ),
                used_for: "destroying established connections a policy stops allowing (agent's network namespace)",
                probe: || btf_has_name("bpf_sock_destroy"),
            },
        ]
    })
}

fn program(ty: ProgramType) -> Probed {
    match is_program_supported(ty) {
        Ok(true) => Probed::Yes,
        Ok(false) => Probed::No,
        Err(e) => Probed::Unknown(format!("{e:?}")),
    }
}

fn map(ty: MapType) -> Probed {
    match is_map_supported(ty) {
        Ok(true) => Probed::Yes,
        Ok(false) => Probed::No,
        Err(e) => Probed::Unknown(format!("{e:?}")),
    }
}

fn helper(ty: ProgramType, h: BpfHelper) -> Probed {
    match is_helper_supported(ty, h) {
        Ok(true) => Probed::Yes,
        Ok(false) => Probed::No,
        Err(e) => Probed::Unknown(format!("{e:?}")),
    }
}

fn both(a: Probed, b: Probed) -> Probed {
    match (a, b) {
        (Probed::No, _) | (_, Probed::No) => Probed::No,
        (Probed::Unknown(e), _) | (_, Probed::Unknown(e)) => Probed::Unknown(e),
        (Probed::Yes, Probed::Yes) => Probed::Yes,
    }
}

/// `BPF_LINK_CREATE` with an invalid program fd: kernels that know the
/// command (5.7+) answer `EBADF`; older ones do not know it (`EINVAL`).
fn link_create() -> Probed {
    // bpf_attr's link_create: prog_fd, target_fd, attach_type
    // (BPF_CGROUP_INET_INGRESS = 0), flags; the rest zero.
    let mut attr = Attr::new();
    attr.u32(0, u32::MAX).u32(4, u32::MAX);
    // Cannot succeed with fd -1; whatever came back is closed on drop.
    match bpf_fd(BPF_LINK_CREATE, &mut attr) {
        Ok(_) => Probed::Yes,
        Err(e) => match e.raw_os_error() {
            Some(libc::EBADF) => Probed::Yes,
            Some(libc::EINVAL) => Probed::No,
            _ => Probed::Unknown(format!("bpf(BPF_LINK_CREATE): {e}")),
        },
    }
}

/// The kernel has lsm_cgroup hooks (6.0: its BTF names the socket hook's
/// runner, `__cgroup_bpf_run_lsm_socket`) and BPF LSM is active (`bpf` in
/// `/sys/kernel/security/lsm`). A load probe is not used: a trivial LSM
/// program needs a real hook's BTF id, and some kernels (lockdown) refuse
/// a load that names another hook with EPERM.
fn lsm_cgroup() -> Probed {
    match btf_has_name("__cgroup_bpf_run_lsm_socket") {
        Probed::Yes => {}
        other => return other,
    }
    match fs::read_to_string("/sys/kernel/security/lsm") {
        Ok(list) if lsm_list_has_bpf(&list) => Probed::Yes,
        Ok(_) => Probed::No,
        Err(e) => Probed::Unknown(format!(
            "/sys/kernel/security/lsm: {e} (mount securityfs: mount -t securityfs securityfs /sys/kernel/security)"
        )),
    }
}

fn lsm_list_has_bpf(list: &str) -> bool {
    list.trim().split(',').any(|m| m == "bpf")
}

/// Whether the kernel's BTF names `name` (a kfunc is a BTF function; its
/// name is in the string section). Reads `/sys/kernel/btf/vmlinux`.
pub(super) fn btf_has_name(name: &str) -> Probed {
    match fs::read(Path::new("/sys/kernel/btf/vmlinux")) {
        Ok(btf) => {
            if btf_strings_contain(&btf, name) {
                Probed::Yes
            } else {
                Probed::No
            }
        }
        Err(e) => Probed::Unknown(format!("/sys/kernel/btf/vmlinux: {e}")),
    }
}

/// Looks for `name` as a whole NUL-terminated string in a BTF blob's string
/// section (the header gives its offset and length).
fn btf_strings_contain(btf: &[u8], name: &str) -> bool {
    let u32_at = |off: usize| -> Option<u32> {
        btf.get(off..off + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    // struct btf_header { u16 magic; u8 version, flags; u32 hdr_len;
    //   u32 type_off, type_len, str_off, str_len; }
    if btf.get(0..2) != Some(&0xeb9f_u16.to_le_bytes()[..]) {
        return false;
    }
    let (Some(hdr_len), Some(str_off), Some(str_len)) = (u32_at(4), u32_at(16), u32_at(20)) else {
        return false;
    };
    let start = hdr_len as usize + str_off as usize;
    let Some(strings) = btf.get(start..start + str_len as usize) else {
        return false;
    };
    strings.split(|&b| b == 0).any(|s| s == name.as_bytes())
}

/// The running kernel's release string (`uname -r`).
pub fn release() -> String {
    // SAFETY: uname fills a zeroed struct; the fields are NUL-terminated.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return String::new();
    }
    let bytes: Vec<u8> = u
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// One row of the probe table.
pub struct Finding {
    pub feature: &'static Feature,
    pub probed: Probed,
    pub verdict: Verdict,
}

/// What the running kernel has.
pub struct Report {
    pub release: String,
    pub version: Option<KernelVersion>,
    pub findings: Vec<Finding>,
}

/// Feature ids (comma-separated) the probe reports missing, so that the
/// fallbacks for older kernels are tested on a new one.
pub const TEST_LACKS_ENV: &str = "BULKHEAD_TEST_KERNEL_LACKS";

/// Probes every feature (a few dozen bpf() calls; milliseconds).
pub fn probe() -> Report {
    let release = release();
    let version = KernelVersion::parse(&release);
    let pretend = std::env::var(TEST_LACKS_ENV).unwrap_or_default();
    let findings = features()
        .iter()
        .map(|feature| {
            let probed = if pretend.split(',').any(|id| id.trim() == feature.id) {
                Probed::No
            } else {
                (feature.probe)()
            };
            let verdict = decide(&probed, feature.since, version);
            Finding {
                feature,
                probed,
                verdict,
            }
        })
        .collect();
    Report {
        release,
        version,
        findings,
    }
}

impl Report {
    /// Whether the feature with this [`Feature::id`] is usable (present, or
    /// assumed by version when the probe could not answer). Optional
    /// features gate what the agent loads: e.g. attach the
    /// `lsm_cgroup/socket_create` program only when `has("lsm_cgroup")`.
    pub fn has(&self, id: &str) -> bool {
        self.findings
            .iter()
            .any(|f| f.feature.id == id && f.verdict.available())
    }

    /// Required features this kernel lacks.
    pub fn missing(&self) -> impl Iterator<Item = &Finding> {
        self.findings
            .iter()
            .filter(|f| f.feature.need == Need::Required && !f.verdict.available())
    }

    /// The refusal message naming every missing required feature, or `None`.
    pub fn refusal(&self) -> Option<String> {
        let lines: Vec<String> = self
            .missing()
            .map(|f| {
                format!(
                    "  - {} (Linux {} has it; used for {}){}",
                    f.feature.name,
                    f.feature.since,
                    f.feature.used_for,
                    match (&f.verdict, &f.probed) {
                        (Verdict::MissingByVersion, Probed::Unknown(e)) =>
                            format!(" [probe failed: {e}; decided by the kernel version]"),
                        _ => String::new(),
                    }
                )
            })
            .collect();
        if lines.is_empty() {
            return None;
        }
        Some(format!(
            "this kernel ({}) lacks what bulkhead needs:\n{}\nbulkhead supports Linux {} and later (Debian 11's kernel is the oldest it is tested on)",
            if self.release.is_empty() {
                "unknown release"
            } else {
                &self.release
            },
            lines.join("\n"),
            MIN_KERNEL
        ))
    }

    /// Warnings: missing optional features, probes that could not answer,
    /// and a kernel older than the minimum that still passed every probe.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for f in &self.findings {
            match (f.feature.need, f.verdict.available()) {
                (Need::Optional(loss), false) => out.push(format!(
                    "optional kernel feature missing: {} (Linux {} has it): {loss}",
                    f.feature.name, f.feature.since
                )),
                _ => {
                    if let (true, Probed::Unknown(e)) = (f.verdict.available(), &f.probed) {
                        out.push(format!(
                            "could not probe {} ({e}); {}",
                            f.feature.name,
                            if f.verdict == Verdict::AssumedByVersion {
                                "the kernel version says it is there"
                            } else {
                                "assuming it is there"
                            }
                        ));
                    }
                }
            }
        }
        if let Some(v) = self.version
            && v < MIN_KERNEL
            && self.refusal().is_none()
        {
            out.push(format!(
                "kernel {} is older than Linux {MIN_KERNEL}, the oldest bulkhead is tested on; it has every feature bulkhead probes for, so it starts",
                self.release
            ));
        }
        out
    }

    /// The table as JSON, e.g. for `bulkhead status`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "release": self.release,
            "minimum": MIN_KERNEL.to_string(),
            "features": self.findings.iter().map(|f| serde_json::json!({
                "id": f.feature.id,
                "name": f.feature.name,
                "required": f.feature.need == Need::Required,
                "since": f.feature.since.to_string(),
                "state": f.verdict.name(),
                "available": f.verdict.available(),
                "probe_error": match &f.probed { Probed::Unknown(e) => Some(e.as_str()), _ => None },
            })).collect::<Vec<_>>(),
        })
    }
}

/// Probes the kernel; fails naming every missing required feature.
/// [`Report::warnings`] says what only degrades.
pub fn check() -> Result<Report> {
    let report = probe();
    if let Some(refusal) = report.refusal() {
        bail!("{refusal}");
    }
    Ok(report)
}

/// What the kernel programs must do without, set in their `.rodata` at load.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fallbacks {
    /// No `bpf_ktime_get_tai_ns`: boot time plus `BH_CLOCK`.
    pub no_tai: bool,
    /// No `bpf_loop`: the object whose walk is a bounded loop.
    pub no_loop: bool,
}

impl Report {
    pub fn fallbacks(&self) -> Fallbacks {
        Fallbacks {
            no_tai: !self.has("ktime_get_tai_ns"),
            no_loop: !self.has("loop"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: u32, b: u32, c: u32) -> KernelVersion {
        KernelVersion::new(a, b, c)
    }

    #[test]
    fn parses_distribution_release_strings() {
        assert_eq!(KernelVersion::parse("6.1.0-56-amd64"), Some(v(6, 1, 0)));
        assert_eq!(KernelVersion::parse("6.18.44-fc-v782"), Some(v(6, 18, 44)));
        assert_eq!(KernelVersion::parse("5.15.0-1050-azure"), Some(v(5, 15, 0)));
        assert_eq!(KernelVersion::parse("6.8.0-rc3+"), Some(v(6, 8, 0)));
        assert_eq!(KernelVersion::parse("6.1"), Some(v(6, 1, 0)));
        assert_eq!(KernelVersion::parse("4.19.0+\n"), Some(v(4, 19, 0)));
        assert_eq!(
            KernelVersion::parse("5.14.0-427.13.1.el9_4.x86_64"),
            Some(v(5, 14, 0))
        );
        assert_eq!(KernelVersion::parse("6.6.30_1"), Some(v(6, 6, 30)));
        assert_eq!(KernelVersion::parse("4.9.300"), Some(v(4, 9, 255)));
        assert_eq!(KernelVersion::parse("6.10rc1"), None);
        assert_eq!(KernelVersion::parse(""), None);
        assert_eq!(KernelVersion::parse("linux"), None);
        assert_eq!(KernelVersion::parse("6"), None);
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(v(6, 10, 0) > v(6, 9, 0));
        assert!(v(5, 10, 0) >= MIN_KERNEL);
        assert!(v(5, 9, 19) < MIN_KERNEL);
        assert!(v(4, 19, 0) < MIN_KERNEL);
        assert!(v(10, 0, 0) > MIN_KERNEL);
        assert_eq!(v(6, 1, 0).to_string(), "6.1");
        assert_eq!(v(6, 18, 44).to_string(), "6.18.44");
    }

    #[test]
    fn probe_answers_win_over_the_version() {
        let old = Some(v(5, 10, 0));
        let new = Some(v(6, 18, 0));
        // A backport on an old kernel is used; a config that turned a
        // feature off on a new kernel is missing.
        assert_eq!(decide(&Probed::Yes, v(6, 1, 0), old), Verdict::Present);
        assert_eq!(decide(&Probed::No, v(6, 1, 0), new), Verdict::Missing);
        let unknown = Probed::Unknown("EPERM".into());
        assert_eq!(decide(&unknown, v(6, 1, 0), new), Verdict::AssumedByVersion);
        assert_eq!(
            decide(&unknown, v(6, 1, 0), Some(v(6, 1, 0))),
            Verdict::AssumedByVersion
        );
        assert_eq!(decide(&unknown, v(6, 1, 0), old), Verdict::MissingByVersion);
        assert_eq!(decide(&unknown, v(6, 1, 0), None), Verdict::Unknown);
        assert!(Verdict::Unknown.available());
        assert!(!Verdict::MissingByVersion.available());
    }

    fn report(version: &str, probed: impl Fn(&Feature) -> Probed) -> Report {
        let version_parsed = KernelVersion::parse(version);
        Report {
            release: version.into(),
            version: version_parsed,
            findings: features()
                .iter()
                .map(|feature| {
                    let p = probed(feature);
                    let verdict = decide(&p, feature.since, version_parsed);
                    Finding {
                        feature,
                        probed: p,
                        verdict,
                    }
                })
                .collect(),
        }
    }

    #[test]
    fn refusal_names_the_feature_and_a_kernel_that_has_it() {
        // A 5.4 kernel: no bpf_get_current_ancestor_cgroup_id, nothing
        // else required missing.
        let r = report("5.4.0-150-generic", |f| {
            if f.id == "current_ancestor_cgroup_id" || matches!(f.need, Need::Optional(_)) {
                Probed::No
            } else {
                Probed::Yes
            }
        });
        let msg = r.refusal().expect("refused");
        assert!(msg.contains("5.4.0-150-generic"), "{msg}");
        assert!(
            msg.contains("bpf_get_current_ancestor_cgroup_id (Linux 5.7 has it"),
            "{msg}"
        );
        assert!(msg.contains("Linux 5.10 and later"), "{msg}");
        assert_eq!(r.missing().count(), 1);
    }

    #[test]
    fn optional_features_only_warn() {
        // Debian 12: everything required, no bpf_sock_destroy (6.5).
        let r = report("6.1.0-56-amd64", |f| {
            if f.id == "sock_destroy" {
                Probed::No
            } else {
                Probed::Yes
            }
        });
        assert!(r.refusal().is_none());
        let w = r.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("bpf_sock_destroy kfunc (Linux 6.5 has it)"));
    }

    #[test]
    fn unanswered_probes_fall_back_to_the_version() {
        let r = report("6.1.0-56-amd64", |_| Probed::Unknown("EPERM".into()));
        // 6.0/6.1 features pass by version; 6.5's optional one is missing.
        assert!(r.refusal().is_none());
        let w = r.warnings();
        assert!(w.iter().any(|w| w.contains("bpf_sock_destroy")), "{w:?}");
        assert!(
            w.iter()
                .any(|w| w.contains("could not probe bpf_ktime_get_tai_ns (EPERM)")),
            "{w:?}"
        );
        let old = report("5.4.0-150-generic", |_| Probed::Unknown("EPERM".into()));
        let msg = old.refusal().expect("refused by version");
        assert!(msg.contains("bpf_get_current_ancestor_cgroup_id"), "{msg}");
        assert!(msg.contains("decided by the kernel version"), "{msg}");
    }

    #[test]
    fn an_old_kernel_with_backports_starts_with_a_warning() {
        let r = report("5.4.0-150-generic", |_| Probed::Yes);
        assert!(r.refusal().is_none());
        assert!(
            r.warnings()
                .iter()
                .any(|w| w.contains("older than Linux 5.10"))
        );
    }

    #[test]
    fn every_feature_names_a_kernel_that_has_it() {
        for f in features() {
            assert!(f.since <= v(6, 5, 0), "{}", f.name);
            if f.need == Need::Required {
                assert!(
                    f.since <= MIN_KERNEL,
                    "{} is newer than the minimum",
                    f.name
                );
            }
        }
    }

    #[test]
    fn ids_are_unique_and_answer_has() {
        let mut ids: Vec<&str> = features().iter().map(|f| f.id).collect();
        ids.sort_unstable();
        let n = ids.len();
        ids.dedup();
        assert_eq!(ids.len(), n);
        let r = report("6.1.0-56-amd64", |f| {
            if f.id == "sock_destroy" {
                Probed::No
            } else {
                Probed::Yes
            }
        });
        assert!(r.has("lsm_cgroup"));
        assert!(!r.has("sock_destroy"));
        assert!(!r.has("no_such_feature"));
    }

    #[test]
    fn lsm_list_and_btf_strings() {
        assert!(lsm_list_has_bpf("lockdown,capability,landlock,yama,bpf\n"));
        assert!(!lsm_list_has_bpf("lockdown,capability,apparmor"));
        assert!(!lsm_list_has_bpf("bpffoo"));
        // A minimal BTF blob: 24-byte header, no types, strings "\0a\0bpf_sock_destroy\0".
        let strings = b"\0a\0bpf_sock_destroy\0";
        let mut blob = Vec::new();
        blob.extend_from_slice(&0xeb9f_u16.to_le_bytes());
        blob.extend_from_slice(&[1, 0]);
        for x in [24u32, 0, 0, 0, strings.len() as u32] {
            blob.extend_from_slice(&x.to_le_bytes());
        }
        blob.extend_from_slice(strings);
        assert!(btf_strings_contain(&blob, "bpf_sock_destroy"));
        assert!(!btf_strings_contain(&blob, "bpf_sock"));
        assert!(!btf_strings_contain(&blob[..20], "bpf_sock_destroy"));
        assert!(!btf_strings_contain(b"not btf", "a"));
    }
}

#[cfg(test)]
mod host {
    /// Probes the kernel the tests run on. As root on a supported kernel
    /// nothing required may be missing; otherwise this only shows the table.
    #[test]
    fn probes_the_running_kernel() {
        let r = super::probe();
        eprintln!("{:#}", r.to_json());
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if root && r.version.is_some_and(|v| v >= super::MIN_KERNEL) {
            assert_eq!(r.refusal(), None);
        }
    }
}
