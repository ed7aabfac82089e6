//! The kernel programs: the declarative table, loading, verifying,
//! attaching (each link pinned the moment it exists).

use std::fs;

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::ProgramArray,
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, links::FdLink,
    },
};

use bulkhead_common::maps::{GLOBAL_NO_TAI, MAP_CLOCK, MAP_DNS_EGRESS_TAIL, MAP_DNS_INGRESS_TAIL};

use super::{
    features::Fallbacks,
    pins::{Pins, retire, test_layout},
    storage::{self, Storage},
};

/// Set only by tests: the program named is treated as refused by the
/// verifier, to show that such a start changes nothing that enforces.
const TEST_REFUSE_ENV: &str = "BULKHEAD_TEST_REFUSE_PROGRAM";

/// The kernel programs, embedded at build time (see build.rs).
pub(super) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bulkhead"));

/// The same programs with the cgroup walk a bounded loop, for kernels
/// without `bpf_loop` (before 5.17). The maps are the same, so is the
/// layout.
static EBPF_OBJECT_UNROLLED: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bulkhead-unrolled"));

/// The embedded programs, or why there are none.
pub(super) fn object() -> Result<&'static [u8]> {
    object_for(Fallbacks::default())
}

/// The embedded programs this kernel can load.
fn object_for(fallbacks: Fallbacks) -> Result<&'static [u8]> {
    embedded(if fallbacks.no_loop {
        EBPF_OBJECT_UNROLLED
    } else {
        EBPF_OBJECT
    })
}

/// `object`, unless the build left it empty (no bpf-linker).
pub(super) fn embedded(object: &[u8]) -> Result<&[u8]> {
    if object.is_empty() {
        bail!(
            "this bulkhead binary was built without its kernel programs (bpf-linker was missing); run `cargo xtask setup` and rebuild"
        );
    }
    Ok(object)
}

/// What kind of cgroup program, so loading and attaching need no name
/// matching.
#[derive(Clone, Copy)]
pub enum Kind {
    SockAddr,
    Sock,
    Skb(CgroupSkbAttachType),
}

/// When a program attaches during start-up.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Records who binds what; refuses nothing. Attached before the
    /// sockets bound earlier are recorded, so none is missed in between.
    Owners,
    /// Decides. Inert while the generation in force is 0.
    Enforce,
    /// Never attached: the program `from` enters it by a tail call through
    /// the program array pinned as `array`, filled just before the deciding
    /// hooks attach.
    Tail {
        array: &'static str,
        from: &'static str,
    },
}

/// One kernel program of the object.
pub struct Program {
    /// Name in the object (and of its pinned link).
    pub name: &'static str,
    /// The hook, for `status`.
    pub hook: &'static str,
    pub kind: Kind,
    pub stage: Stage,
}

/// Every cgroup program, in attach order: the packet hooks (the backstop)
/// before the `connect`/`sendmsg` hooks, so when a new agent's own maps
/// start deciding, all its hooks decide together.
pub const PROGRAMS: [Program; 11] = [
    Program {
        name: "bh_post_bind4",
        hook: "cgroup/post_bind4",
        kind: Kind::Sock,
        stage: Stage::Owners,
    },
    Program {
        name: "bh_post_bind6",
        hook: "cgroup/post_bind6",
        kind: Kind::Sock,
        stage: Stage::Owners,
    },
    Program {
        name: "bh_sock_create",
        hook: "cgroup/sock_create",
        kind: Kind::Sock,
        stage: Stage::Enforce,
    },
    Program {
        name: "bh_egress",
        hook: "cgroup_skb/egress",
        kind: Kind::Skb(CgroupSkbAttachType::Egress),
        stage: Stage::Enforce,
    },
    Program {
        name: "bh_ingress",
        hook: "cgroup_skb/ingress",
        kind: Kind::Skb(CgroupSkbAttachType::Ingress),
        stage: Stage::Enforce,
    },
    // Learn the addresses of names from DNS answers; never refuse. Entered
    // from the packet hooks, which are attached (with these in their
    // arrays) before the connect hooks, so an answer is learned from the
    // moment those decide with what it taught.
    Program {
        name: "bh_dns_egress",
        hook: "cgroup_skb/egress",
        kind: Kind::Skb(CgroupSkbAttachType::Egress),
        stage: Stage::Tail {
            array: MAP_DNS_EGRESS_TAIL,
            from: "bh_egress",
        },
    },
    Program {
        name: "bh_dns_ingress",
        hook: "cgroup_skb/ingress",
        kind: Kind::Skb(CgroupSkbAttachType::Ingress),
        stage: Stage::Tail {
            array: MAP_DNS_INGRESS_TAIL,
            from: "bh_ingress",
        },
    },
    Program {
        name: "bh_connect4",
        hook: "cgroup/connect4",
        kind: Kind::SockAddr,
        stage: Stage::Enforce,
    },
    Program {
        name: "bh_connect6",
        hook: "cgroup/connect6",
        kind: Kind::SockAddr,
        stage: Stage::Enforce,
    },
    Program {
        name: "bh_sendmsg4",
        hook: "cgroup/sendmsg4",
        kind: Kind::SockAddr,
        stage: Stage::Enforce,
    },
    Program {
        name: "bh_sendmsg6",
        hook: "cgroup/sendmsg6",
        kind: Kind::SockAddr,
        stage: Stage::Enforce,
    },
];

/// The kernel's BTF, read and parsed once per start: it is megabytes (a
/// second or more to parse under emulation), and the loader's relocations,
/// the BPF LSM program and the socket iterators each need it.
pub struct KernelBtf(std::result::Result<aya::Btf, String>);

impl KernelBtf {
    pub fn read() -> KernelBtf {
        KernelBtf(aya::Btf::from_sys_fs().map_err(|e| e.to_string()))
    }

    pub fn get(&self) -> Result<&aya::Btf> {
        self.0
            .as_ref()
            .map_err(|e| anyhow!("reading the kernel's BTF (/sys/kernel/btf/vmlinux): {e}"))
    }
}

/// Loads the object, reusing the maps pinned by an earlier agent of the
/// same layout (so the policy in force stays in force) and pinning new
/// ones, the socket storage first where no memory cgroup pays for it
/// ([`storage`]). Nothing is verified or attached yet.
pub fn load(
    pins: &Pins,
    ring_bytes: u32,
    fallbacks: Fallbacks,
    btf: &KernelBtf,
) -> Result<(Ebpf, Storage)> {
    let storage = storage::prepare(pins)?;
    let mut loader = EbpfLoader::new();
    loader.btf(btf.get().ok());
    loader.default_map_pin_directory(pins.maps());
    let no_tai = u8::from(fallbacks.no_tai);
    loader.override_global(GLOBAL_NO_TAI, &no_tai, true);
    loader.map_max_entries(bulkhead_common::maps::MAP_EVENTS, ring_bytes);
    if test_layout().is_some() {
        loader.map_max_entries(
            bulkhead_common::maps::MAP_CGROUPS,
            bulkhead_common::maps::MAX_CGROUPS + 1,
        );
    }
    let ebpf = loader
        .load(object_for(fallbacks)?)
        .map_err(|e| explain_load_error(e.into()))?;
    Ok((ebpf, storage))
}

/// Where the kernel lacks `bpf_ktime_get_tai_ns`, the programs read boot
/// time plus `BH_CLOCK`: written before anything is attached and then
/// every second, so it follows NTP while an agent runs.
pub fn write_clock(ebpf: &mut Ebpf) -> Result<()> {
    let map = ebpf
        .map_mut(MAP_CLOCK)
        .ok_or_else(|| anyhow!("map {MAP_CLOCK} missing from the object"))?;
    let mut clock: aya::maps::Array<_, i64> = aya::maps::Array::try_from(map)?;
    clock
        .set(0, crate::clock::tai_from_boot_ns(), 0)
        .with_context(|| format!("writing {MAP_CLOCK}"))
}

/// Turns the common failures into what is missing and how to fix it,
/// instead of a verifier dump.
pub(super) fn explain_load_error(e: anyhow::Error) -> anyhow::Error {
    let chain = format!("{e:#}");
    if chain.contains("Operation not permitted") || chain.contains("EPERM") {
        return e.context("loading BPF programs was refused: run as root, or with CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN (and CAP_SYS_ADMIN to mount bpffs)");
    }
    if chain.contains("map pin") || chain.contains("pinned") {
        return e.context(
            "the maps pinned under this layout's directory do not fit this binary (a build that \
             changed a map without changing the layout name?); `bulkhead detach` removes them",
        );
    }
    e.context("loading the kernel programs failed")
}

/// Verifies and loads every program into the kernel, attaching none: a
/// program the kernel refuses stops the start before anything that is
/// enforced changes. Returns why packet sockets cannot be refused (the
/// optional BPF LSM program), or `None` when they can.
pub fn verify_all(ebpf: &mut Ebpf, btf: &KernelBtf) -> Result<Option<String>> {
    for p in &PROGRAMS {
        let name = p.name;
        let prog = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing from the object"))?;
        if std::env::var(TEST_REFUSE_ENV).is_ok_and(|v| v == name) {
            bail!("the kernel verifier rejected {name} ({TEST_REFUSE_ENV} says so, for a test)");
        }
        let loaded = match p.kind {
            Kind::SockAddr => TryInto::<&mut CgroupSockAddr>::try_into(prog)?.load(),
            Kind::Sock => TryInto::<&mut CgroupSock>::try_into(prog)?.load(),
            Kind::Skb(_) => TryInto::<&mut CgroupSkb>::try_into(prog)?.load(),
        };
        loaded.map_err(|e| verifier(name, e.into()))?;
    }
    // Packet sockets are only visible to the BPF LSM hook; it is optional
    // because many kernels run without BPF LSM.
    Ok(load_lsm(ebpf, btf).err().map(|e| format!("{e:#}")))
}

/// Attaches the verified programs of `stage` to `cgroup` and pins each
/// link the moment it exists: a new link is pinned under a temporary name
/// and renamed over the pin of the link it replaces, so the old link
/// detaches only once the new one enforces, and a death between the two
/// steps leaves both (a stray temporary pin, retired by the next agent).
pub fn attach(ebpf: &mut Ebpf, pins: &Pins, cgroup: &fs::File, stage: Stage) -> Result<()> {
    fs::create_dir_all(pins.links())
        .with_context(|| format!("creating {}", pins.links().display()))?;
    // These attach as BPF links, which the kernel always attaches with
    // BPF_F_ALLOW_MULTI (coexisting with systemd's and others' programs);
    // link_create itself takes no flags, so the mode passed is "no flags".
    let mode = CgroupAttachMode::Single;
    if stage == Stage::Enforce {
        fill_tails(ebpf)?;
    }
    for p in PROGRAMS.iter().filter(|p| p.stage == stage) {
        let name = p.name;
        let prog = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing from the object"))?;
        let link: FdLink = match p.kind {
            Kind::SockAddr => {
                let p: &mut CgroupSockAddr = prog.try_into()?;
                let id = p.attach(cgroup, mode);
                p.take_link(id.with_context(|| format!("attaching {name}"))?)?
                    .try_into()?
            }
            Kind::Sock => {
                let p: &mut CgroupSock = prog.try_into()?;
                let id = p.attach(cgroup, mode);
                p.take_link(id.with_context(|| format!("attaching {name}"))?)?
                    .try_into()?
            }
            Kind::Skb(ty) => {
                let p: &mut CgroupSkb = prog.try_into()?;
                let id = p.attach(cgroup, ty, mode);
                p.take_link(id.with_context(|| format!("attaching {name}"))?)?
                    .try_into()?
            }
        };
        pin_link(link, pins, name)?;
    }
    if stage == Stage::Enforce && ebpf.program(LSM_PROGRAM).is_some_and(|p| p.fd().is_ok()) {
        let p: &mut aya::programs::LsmCgroup = ebpf
            .program_mut(LSM_PROGRAM)
            .ok_or_else(|| anyhow!("program {LSM_PROGRAM} missing from the object"))?
            .try_into()?;
        let id = p.attach(cgroup).context("attaching the BPF LSM program")?;
        pin_link(p.take_link(id)?.into(), pins, LSM_PROGRAM)?;
    }
    Ok(())
}

/// Puts each tail program into its program array. With the maps of an
/// earlier agent of the same layout this replaces its program there, which
/// reads the same maps the same way: the hooks still attached go on
/// entering one.
fn fill_tails(ebpf: &mut Ebpf) -> Result<()> {
    for p in &PROGRAMS {
        let Stage::Tail { array, .. } = p.stage else {
            continue;
        };
        let name = p.name;
        let fd = ebpf
            .program(name)
            .ok_or_else(|| anyhow!("program {name} missing from the object"))?
            .fd()
            .with_context(|| format!("{name} is not loaded"))?
            .try_clone()
            .with_context(|| format!("duplicating the fd of {name}"))?;
        let map = ebpf
            .map_mut(array)
            .ok_or_else(|| anyhow!("map {array} missing from the object"))?;
        let mut tails: ProgramArray<_> = ProgramArray::try_from(map)?;
        tails
            .set(0, &fd, 0)
            .with_context(|| format!("putting {name} into {array}"))?;
    }
    Ok(())
}

impl Program {
    /// What keeps the program in force while no agent runs: its link, or
    /// the program array it is entered through.
    pub fn pin(&self, pins: &Pins) -> std::path::PathBuf {
        match self.stage {
            Stage::Tail { array, .. } => pins.maps().join(array),
            Stage::Owners | Stage::Enforce => pins.link(self.name),
        }
    }

    /// The program that enters this one, for one that is never attached.
    pub fn entered_from(&self) -> Option<&'static str> {
        match self.stage {
            Stage::Tail { from, .. } => Some(from),
            Stage::Owners | Stage::Enforce => None,
        }
    }
}

/// Suffix of a link pinned but not yet renamed into place (bpffs refuses
/// names with dots).
pub(super) const PENDING: &str = "_pending";

fn pin_link(link: FdLink, pins: &Pins, name: &str) -> Result<()> {
    let path = pins.link(name);
    let pending = pins.link(&format!("{name}{PENDING}"));
    // A stray pending pin of a dead agent: its link enforces the same maps;
    // replacing the pin retires it.
    retire(&pending)?;
    link.pin(&pending)
        .with_context(|| format!("pinning {}", pending.display()))?;
    fs::rename(&pending, &path)
        .with_context(|| format!("renaming {} to {}", pending.display(), path.display()))?;
    Ok(())
}

/// How much the verifier had to check, per program: what start-up time on
/// a slow machine or an old kernel goes into.
pub fn verified(ebpf: &Ebpf, took: std::time::Duration) -> String {
    let mut total = 0u64;
    let mut parts = Vec::new();
    for name in PROGRAMS.iter().map(|p| p.name).chain([LSM_PROGRAM]) {
        let n = ebpf
            .program(name)
            .and_then(|p| p.info().ok())
            .and_then(|i| i.verified_instruction_count());
        if let Some(n) = n {
            total += u64::from(n);
            parts.push(format!("{name} {n}"));
        }
    }
    if parts.is_empty() {
        // Kernels before 5.16 do not report the count.
        return format!(
            "programs verified and loaded in {:.1} s",
            took.as_secs_f64()
        );
    }
    format!(
        "programs verified and loaded in {:.1} s; the verifier checked {total} instructions ({})",
        took.as_secs_f64(),
        parts.join(", ")
    )
}

/// The `lsm_cgroup/socket_create` program refusing packet sockets.
pub const LSM_PROGRAM: &str = "bh_socket_create";

fn load_lsm(ebpf: &mut Ebpf, btf: &KernelBtf) -> Result<()> {
    // Before 6.0 there are no lsm_cgroup hooks to load for (the kernel
    // would only answer EINVAL).
    if let super::features::Probed::No =
        super::features::btf_has_name("__cgroup_bpf_run_lsm_socket")
    {
        bail!("the kernel has no BPF LSM cgroup hooks (Linux 6.0+)");
    }
    let lsms = fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
    if !lsms.split(',').any(|l| l.trim() == "bpf") {
        bail!(
            "BPF LSM is not active (/sys/kernel/security/lsm: {:?}; boot with lsm=...,bpf)",
            lsms.trim()
        );
    }
    let btf = btf.get()?;
    let p: &mut aya::programs::LsmCgroup = ebpf
        .program_mut(LSM_PROGRAM)
        .ok_or_else(|| anyhow!("program {LSM_PROGRAM} missing from the object"))?
        .try_into()?;
    // EPERM here means the kernel (or a lockdown) refuses LSM programs,
    // not missing privileges: the cgroup programs loaded fine.
    p.load("socket_create", btf)
        .context("the kernel refused the BPF LSM program")
}

pub(super) fn verifier(name: &str, e: anyhow::Error) -> anyhow::Error {
    let chain = format!("{e:#}");
    if chain.contains("Operation not permitted") {
        return e.context(format!("the kernel refused to load {name}: run as root, or with CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN (and CAP_SYS_ADMIN to mount bpffs)"));
    }
    // The verifier log is long; keep it for debugging but lead with what failed.
    e.context(format!(
        "the kernel verifier rejected {name} (kernel too old or missing a feature?)"
    ))
}
