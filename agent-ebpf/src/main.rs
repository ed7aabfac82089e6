//! bulkhead's kernel programs.
//!
//! The sock_addr hooks (`connect4/6`, `sendmsg4/6`) are the decision point:
//! a denied `connect()`/`sendto()` fails at once with `EPERM` and no packet
//! is sent. The skb hooks are the backstop for flows older than the policy
//! and the ingress side. `sock_create` refuses raw sockets, the BPF LSM
//! hook `socket_create` refuses packet sockets (which `sock_create` never
//! sees), and `post_bind` records who owns a bound socket, so a connect to a
//! local listener is decided by the listener's domain.
//!
//! Every program reads the policy generation once and uses its slot for all
//! lookups, so a decision never mixes two policies.
#![no_std]
#![no_main]

mod packet;

use core::mem::{size_of, zeroed};

use agent_common::{
    Decision, Direction, Event, Hook, Ports, Reason, Verdict,
    addr::{self, AddrClass, AddrLine, LINE_WORDS, MAX_CLASSES, SLOT_LINES, SLOT_WORDS},
    decide::{self, Peer, PeerAddr, decide_peer, peer_domain},
    event::{FAMILY_INET, FAMILY_INET6},
    maps::{
        BridgeKey, BridgeSet, COUNTER_CUT_MARKED, COUNTER_EVENTS_LOST, COUNTER_EVENTS_RATE_LIMITED,
        COUNTER_EVENTS_WANTED, CgroupKey, Config, CutRecord, DOMAIN_ALLOW_RAW, DOMAIN_AUDIT_ALL,
        DomainRec, FlowKey, MAX_BRIDGE_PAIRS, MAX_CGROUP_DEPTH, MAX_CGROUPS, MAX_DOMAINS,
        MODE_AUDIT, NUM_COUNTERS, NUM_DOMAIN_COUNTERS, SOCK_CUT, SOCK_FLOW_SEEN, SOCK_INITIATOR,
        SockInfo, State, TokenBucket, VerdictCache, counter_index, domain_counter_index,
    },
};
use aya_ebpf::{
    bindings::{
        BPF_F_NO_PREALLOC, BPF_SK_STORAGE_GET_F_CREATE, bpf_map_type::BPF_MAP_TYPE_SK_STORAGE,
        bpf_sock, bpf_sock_tuple,
    },
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm,
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_get_smp_processor_id,
        bpf_ktime_get_tai_ns, bpf_loop, bpf_sk_fullsock, bpf_sk_lookup_tcp, bpf_sk_lookup_udp,
        bpf_sk_release, bpf_sk_storage_get, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
    },
    macros::{btf_map, cgroup_skb, cgroup_sock, cgroup_sock_addr, lsm_cgroup, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{LsmContext, SkBuffContext, SockAddrContext, SockContext},
};

use crate::packet::{Parsed, parse};

#[map(name = "BH_STATE")]
static BH_STATE: Array<State> = Array::pinned(1, 0);
#[map(name = "BH_CONFIG")]
static BH_CONFIG: Array<Config> = Array::pinned(2, 0);
#[map(name = "BH_CGROUPS")]
static BH_CGROUPS: HashMap<CgroupKey, u32> = HashMap::pinned(2 * MAX_CGROUPS, 0);
#[map(name = "BH_DOMAINS")]
static BH_DOMAINS: Array<DomainRec> = Array::pinned(2 * MAX_DOMAINS, 0);
/// Both slots of the address table (`agent_common::addr`); the agent
/// writes a slot through `mmap`.
#[map(name = "BH_ADDR")]
static BH_ADDR: Array<AddrLine> = Array::pinned(2 * SLOT_LINES, BPF_F_MMAPABLE);
#[map(name = "BH_CLASSES")]
static BH_CLASSES: Array<AddrClass> = Array::pinned(2 * MAX_CLASSES, 0);
#[map(name = "BH_BRIDGES")]
static BH_BRIDGES: HashMap<BridgeKey, BridgeSet> = HashMap::pinned(2 * MAX_BRIDGE_PAIRS, 0);
#[map(name = "BH_COUNTERS")]
static BH_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(NUM_COUNTERS, 0);
#[map(name = "BH_DOMSTATS")]
static BH_DOMSTATS: PerCpuArray<u64> = PerCpuArray::pinned(NUM_DOMAIN_COUNTERS, 0);
#[map(name = "BH_RATE")]
static BH_RATE: LruHashMap<u64, TokenBucket> = LruHashMap::pinned(16 * 1024, 0);
/// Sized by the agent at load time (`--ring-buffer-bytes`).
#[map(name = "BH_EVENTS")]
static BH_EVENTS: RingBuf = RingBuf::pinned(1 << 20, 0);
#[btf_map]
static BH_SOCKS: PinnedSkStorage<SockInfo> = PinnedSkStorage::new();

/// A socket storage map definition (BTF-style, as aya-ebpf's `SkStorage`)
/// that asks to be pinned by name, which aya-ebpf's cannot: what a socket's
/// storage holds (which side opened a connection, its cached verdict, a
/// listener's owner) must outlive the agent that loaded the programs, or
/// every restart would judge open connections as if older than the agent.
#[repr(C)]
struct PinnedSkStorage<T> {
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
    /// `LIBBPF_PIN_BY_NAME`.
    pinning: *const [i32; 1],
}

// SAFETY: placeholder pointers the loader reads from BTF; never dereferenced.
unsafe impl<T> Sync for PinnedSkStorage<T> {}

impl<T> PinnedSkStorage<T> {
    const fn new() -> Self {
        PinnedSkStorage {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
            pinning: core::ptr::null(),
        }
    }
}

const ALLOW: i32 = 1;
const DENY: i32 = 0;
const IPPROTO_TCP: u32 = 6;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// `BPF_TCP_ESTABLISHED` of the uapi's TCP state enum.
const BPF_TCP_ESTABLISHED: u32 = 1;
const IPPROTO_UDP: u32 = 17;
const IPPROTO_ICMP: u32 = 1;
const IPPROTO_ICMPV6: u32 = 58;
const SOCK_DGRAM: u32 = 2;
const SOCK_RAW: u32 = 3;
const AF_PACKET: i32 = 17;
const AF_XDP: i32 = 44;
/// What an `lsm_cgroup` program returns to let the call go on, or to fail
/// it with `EPERM`.
const LSM_ALLOW: i32 = 1;
const LSM_DENY: i32 = 0;
/// Map flag: userspace may `mmap` the array.
const BPF_F_MMAPABLE: u32 = 1 << 10;
/// The loopback device's index, the same in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
/// `BPF_F_CURRENT_NETNS` as the helpers' u64 netns argument.
const CURRENT_NETNS: u64 = 0xffff_ffff;

/// One decision's facts, gathered by the hook and passed to [`finish`].
/// 8-byte aligned, addresses first: LLVM then copies them with word
/// stores instead of calling `memcpy`/`memset`, each call a stack frame
/// that older verifiers charge 32 bytes for (6.1 refused `bh_egress` at
/// 544 bytes of 512).
#[repr(C, align(8))]
struct Flow {
    src: [u8; 16],
    dst: [u8; 16],
    family: u8,
    proto: u8,
    hook: Hook,
    /// Process context: pid/comm/uid mean something.
    task: bool,
    /// Not a repeat of the socket's previous allowed `sendmsg` destination:
    /// allowed events are recorded once per flow, not per datagram.
    first: bool,
    sport: [u8; 2],
    dport: [u8; 2],
}

/// The policy in force for this decision.
struct Active {
    generation: u64,
    slot: u32,
    config: Config,
}

#[inline(always)]
fn active() -> Option<Active> {
    let state = BH_STATE.get(0)?;
    let generation = state.generation;
    // No policy loaded yet (generation 0): nothing is in any domain.
    if generation == 0 {
        return None;
    }
    let slot = (generation & 1) as u32;
    let config = *BH_CONFIG.get(slot)?;
    Some(Active {
        generation,
        slot,
        config,
    })
}

/// One walk up a cgroup's ancestry to its nearest configured ancestor
/// (from the root down, so the deepest match wins), run by `bpf_loop`: the
/// verifier checks a level once instead of once per level, which on older
/// kernels is most of what loading the packet hooks costs.
#[repr(C)]
struct Walk {
    /// What a level reads the ancestor id from: the skb, or an owner's
    /// [`SockInfo`]; unused for the current task.
    from: *const core::ffi::c_void,
    slot: u32,
    found: u32,
}

type WalkBody = extern "C" fn(u64, *mut core::ffi::c_void) -> i64;

#[inline(always)]
fn domain_of(slot: u32, from: *const core::ffi::c_void, body: WalkBody) -> u32 {
    let mut w = Walk {
        from,
        slot,
        found: 0,
    };
    unsafe {
        bpf_loop(
            MAX_CGROUP_DEPTH as u32,
            body as *mut core::ffi::c_void,
            (&mut w as *mut Walk).cast(),
            0,
        )
    };
    w.found
}

/// One level: `id` is its cgroup (0 past the leaf, which ends the walk).
/// The step itself is `agent_common`'s, which `explain` takes too.
#[inline(always)]
fn walk_level(ctx: *mut core::ffi::c_void, id: u64) -> i64 {
    let w = unsafe { &mut *ctx.cast::<Walk>() };
    let slot = w.slot;
    let configured = |id| {
        let key = CgroupKey {
            cgroup_id: id,
            slot,
            _pad: 0,
        };
        unsafe { BH_CGROUPS.get(key) }.copied()
    };
    if decide::walk_level(&mut w.found, id, configured) {
        0
    } else {
        1
    }
}

#[inline(never)]
extern "C" fn walk_current(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    walk_level(ctx, unsafe {
        bpf_get_current_ancestor_cgroup_id(i as i32 + 1)
    })
}

#[inline(never)]
extern "C" fn walk_skb(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    let skb = unsafe { (*ctx.cast::<Walk>()).from }.cast_mut().cast();
    walk_level(ctx, unsafe {
        bpf_skb_ancestor_cgroup_id(skb, i as i32 + 1)
    })
}

#[inline(never)]
extern "C" fn walk_owner(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    let owner = unsafe { (*ctx.cast::<Walk>()).from }.cast::<SockInfo>();
    let id = if (i as usize) < MAX_CGROUP_DEPTH {
        unsafe { (*owner).ancestors[i as usize] }
    } else {
        0
    };
    walk_level(ctx, id)
}

#[inline(always)]
fn domain_rec(slot: u32, id: u32) -> Option<&'static DomainRec> {
    if id == 0 || id >= MAX_DOMAINS {
        return None;
    }
    BH_DOMAINS.get(slot * MAX_DOMAINS + id)
}

#[inline(always)]
fn current_domain(slot: u32) -> u32 {
    domain_of(slot, core::ptr::null(), walk_current)
}

fn to16(a: [u8; 4]) -> [u8; 16] {
    let mut o = [0u8; 16];
    o[0] = a[0];
    o[1] = a[1];
    o[2] = a[2];
    o[3] = a[3];
    o
}

fn first4(a: &[u8; 16]) -> [u8; 4] {
    [a[0], a[1], a[2], a[3]]
}

/// What the policy says about a peer address: the domain whose networks
/// hold it, or its geo verdicts (`None` only if the class map could not be
/// read). Indices are masked, not checked: a corrupt table reads wrong
/// words of its own slot, never another slot's, and needs no branch.
#[inline(always)]
fn classify(slot: u32, family: u8, addr: &[u8; 16]) -> Option<&'static AddrClass> {
    let base = slot * SLOT_LINES;
    let class = addr::lookup(family == FAMILY_INET6, addr, |w| {
        let w = w & (SLOT_WORDS - 1);
        BH_ADDR
            .get(base + w / LINE_WORDS)
            .map(|line| line.0[(w % LINE_WORDS) as usize])
    });
    BH_CLASSES.get(slot * MAX_CLASSES + (class & (MAX_CLASSES - 1)))
}

/// Finds the local socket a connect would reach and returns its owner's
/// domain under the current policy; 0 when there is none or it has no owner.
#[inline(always)]
fn listener_domain(
    ctx: *mut core::ffi::c_void,
    slot: u32,
    family: u8,
    proto: u32,
    dst: &[u8; 16],
    dport: [u8; 2],
) -> u32 {
    let mut tuple: bpf_sock_tuple = unsafe { zeroed() };
    let size = if family == FAMILY_INET {
        tuple.__bindgen_anon_1.ipv4.daddr = u32::from_ne_bytes(first4(dst));
        tuple.__bindgen_anon_1.ipv4.dport = u16::from_ne_bytes(dport);
        12u32
    } else {
        // SAFETY: both are 16 plain bytes.
        tuple.__bindgen_anon_1.ipv6.daddr =
            unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(*dst) };
        tuple.__bindgen_anon_1.ipv6.dport = u16::from_ne_bytes(dport);
        36u32
    };
    let sk = unsafe {
        if proto == IPPROTO_TCP {
            bpf_sk_lookup_tcp(ctx, &mut tuple, size, CURRENT_NETNS, 0)
        } else if proto == IPPROTO_UDP {
            bpf_sk_lookup_udp(ctx, &mut tuple, size, CURRENT_NETNS, 0)
        } else {
            return 0;
        }
    };
    if sk.is_null() {
        return 0;
    }
    let owner = unsafe {
        bpf_sk_storage_get(socks_map(), sk.cast(), core::ptr::null_mut(), 0) as *const SockInfo
    };
    let mut domain = 0;
    if !owner.is_null() {
        domain = domain_of(slot, owner.cast(), walk_owner);
    }
    unsafe { bpf_sk_release(sk.cast()) };
    domain
}

#[inline(always)]
fn socks_map() -> *mut core::ffi::c_void {
    core::ptr::from_ref(&BH_SOCKS).cast_mut().cast()
}

#[inline(always)]
fn count(index: u32) -> u64 {
    bump(&BH_COUNTERS, index)
}

#[inline(always)]
fn bump(map: &PerCpuArray<u64>, index: u32) -> u64 {
    match map.get_ptr_mut(index) {
        Some(p) => unsafe {
            *p += 1;
            *p
        },
        None => 0,
    }
}

/// Token bucket per cgroup, so one noisy workload cannot drown the others'
/// events. Races between CPUs only blur the rate a little.
#[inline(always)]
fn rate_ok(cfg: &Config, cgroup_id: u64, now: u64) -> bool {
    if cfg.event_rate == 0 {
        return true;
    }
    let rate = cfg.event_rate as u64;
    let burst = (cfg.event_burst.max(1) as u64) << 10;
    match BH_RATE.get_ptr_mut(cgroup_id) {
        Some(b) => unsafe {
            let elapsed = now.saturating_sub((*b).last_ns);
            // tokens are scaled by 1024; cap elapsed so the product cannot overflow.
            let refill = (elapsed.min(60_000_000_000) / 1000) * rate / 976;
            let mut tokens = ((*b).tokens_milli + refill).min(burst);
            (*b).last_ns = now;
            if tokens < 1024 {
                (*b).tokens_milli = tokens;
                return false;
            }
            tokens -= 1024;
            (*b).tokens_milli = tokens;
            true
        },
        None => {
            let b = TokenBucket {
                last_ns: now,
                tokens_milli: burst.saturating_sub(1024),
            };
            let _ = BH_RATE.insert(cgroup_id, b, 0);
            true
        }
    }
}

/// Counts the decision, emits its event if it asks for one, and returns the
/// program's return code.
#[inline(always)]
fn finish(
    a: &Active,
    dom_id: u32,
    dom: &DomainRec,
    peer: u32,
    cgroup_id: u64,
    d: Decision,
    f: &Flow,
) -> i32 {
    count(counter_index(f.hook as u8, d.reason as u8));
    bump(&BH_DOMSTATS, domain_counter_index(dom_id, d.reason as u8));
    let verdict = d.verdict(a.config.mode);
    // Denials and bridge crossings are always recorded; with `audit: all`,
    // allowed connections too, but only from the connection-level hooks so
    // it is one event per connect, not per packet.
    let wants_event = !d.allow
        || f.first && f.task && (d.reason == Reason::Bridge || dom.flags & DOMAIN_AUDIT_ALL != 0);
    if wants_event {
        emit(a, dom_id, peer, cgroup_id, d, verdict, f);
    }
    if verdict == Verdict::Deny {
        DENY
    } else {
        ALLOW
    }
}

#[inline(always)]
fn emit(
    a: &Active,
    dom_id: u32,
    peer: u32,
    cgroup_id: u64,
    d: Decision,
    verdict: Verdict,
    f: &Flow,
) {
    let seq = count(COUNTER_EVENTS_WANTED);
    let now = unsafe { bpf_ktime_get_tai_ns() };
    if !rate_ok(&a.config, cgroup_id, now) {
        count(COUNTER_EVENTS_RATE_LIMITED);
        return;
    }
    let Some(mut entry) = BH_EVENTS.reserve::<Event>(0) else {
        count(COUNTER_EVENTS_LOST);
        return;
    };
    let e = entry.as_mut_ptr();
    unsafe {
        (*e).ts_tai_ns = now;
        (*e).seq = seq;
        (*e).cgroup_id = cgroup_id;
        (*e).generation = a.generation;
        copy16(&raw mut (*e).src_addr, &f.src);
        copy16(&raw mut (*e).dst_addr, &f.dst);
        (*e).bridge_id = d.bridge_id;
        (*e).src_port = f.sport;
        (*e).dst_port = f.dport;
        (*e).src_domain = dom_id as u16;
        (*e).dst_domain = peer as u16;
        (*e).family = f.family;
        (*e).proto = f.proto;
        (*e).hook = f.hook as u8;
        (*e).verdict = verdict as u8;
        (*e).reason = d.reason as u8;
        (*e)._pad0 = 0;
        (*e).cpu = bpf_get_smp_processor_id() as u16;
        core::ptr::write_volatile((&raw mut (*e)._pad).cast::<u32>(), 0);
        copy16(&raw mut (*e).comm, &[0; 16]);
        if f.task {
            (*e).pid_tgid = bpf_get_current_pid_tgid();
            (*e).uid_gid = bpf_get_current_uid_gid();
            let _ = bpf_get_current_comm((*e).comm.as_mut_ptr().cast(), 16);
        } else {
            // Volatile: two adjacent zero stores would become a `memset`.
            core::ptr::write_volatile(&raw mut (*e).pid_tgid, 0);
            core::ptr::write_volatile(&raw mut (*e).uid_gid, 0);
        }
    }
    entry.submit(0);
}

/// Sixteen bytes as two volatile 8-byte stores, never a `memcpy`/`memset`
/// call (see `Flow`). Both sides are 8-byte aligned: `Flow` and `Event`
/// fields, or a constant.
#[inline(always)]
unsafe fn copy16(dst: *mut [u8; 16], src: &[u8; 16]) {
    let (d, s) = (dst.cast::<u64>(), src.as_ptr().cast::<u64>());
    unsafe {
        core::ptr::write_volatile(d, s.read_unaligned());
        core::ptr::write_volatile(d.add(1), s.add(1).read_unaligned());
    }
}

/// The sock_addr decision shared by connect and sendmsg, v4 and v6.
#[inline(always)]
fn sock_addr<const V6: bool>(ctx: &SockAddrContext, hook4: Hook, hook6: Hook) -> i32 {
    let Some(a) = active() else { return ALLOW };
    let dom_id = current_domain(a.slot);
    let Some(dom) = domain_rec(a.slot, dom_id) else {
        return ALLOW;
    };
    let sa = unsafe { &*ctx.sock_addr };
    let proto = sa.protocol;
    let dport = (sa.user_port as u16).to_ne_bytes();
    // The verifier refuses `user_ip6` reads in v4 programs (and vice versa),
    // so the family is fixed per program, not read from the context. An
    // IPv4-mapped address is decided as IPv4; IPv4-compatible `::a.b.c.d`
    // stays IPv6: the kernel routes it as IPv6, to the IPv6 address it is
    // (docs/THREAT_MODEL.md).
    let (addr, hook) = if !V6 {
        (
            PeerAddr::new(FAMILY_INET, to16(sa.user_ip4.to_ne_bytes())),
            hook4,
        )
    } else {
        (PeerAddr::new(FAMILY_INET6, user_ip6(sa)), hook6)
    };
    let (family, dst) = (addr.family, addr.addr);
    let mut peer = peer_of(a.slot, &addr);
    peer.domain = peer_domain(peer.domain, || {
        listener_domain(ctx.sock_addr.cast(), a.slot, family, proto, &dst, dport)
    });
    let port = u16::from_be_bytes(dport);
    let mut f = Flow {
        family,
        proto: proto as u8,
        hook,
        task: true,
        first: true,
        src: [0; 16],
        dst,
        sport: [0; 2],
        dport,
    };
    let sk = unsafe { sa.__bindgen_anon_1.sk };
    // The socket's own port (0 before its bind): a datagram server's answer
    // goes out by the reverse rule of the bridge that let the request in.
    let ports = Ports {
        service: port,
        other: unsafe { (*sk).src_port } as u16,
    };
    let d = decide_flow(
        &a,
        dom_id,
        dom,
        &peer,
        Direction::Egress,
        proto as u8,
        ports,
    );
    if d.allow || a.config.mode == MODE_AUDIT {
        // Connects always count as a new flow; a datagram is one when its
        // destination or reason differs from the socket's previous one.
        let info = mark_initiator(sk, !is_sendmsg(hook));
        f.first =
            !d.allow || !is_sendmsg(hook) || new_flow(info, &dst, dport, proto as u8, d.reason);
    }
    finish(
        &a,
        dom_id,
        dom,
        peer.domain,
        unsafe { bpf_get_current_cgroup_id() },
        d,
        &f,
    )
}

/// The context only allows 4-byte loads of `user_ip6`: read word by word.
#[inline(always)]
fn user_ip6(sa: &aya_ebpf::bindings::bpf_sock_addr) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let w = unsafe { core::ptr::read_volatile(&sa.user_ip6[i]) }.to_ne_bytes();
        out[i * 4] = w[0];
        out[i * 4 + 1] = w[1];
        out[i * 4 + 2] = w[2];
        out[i * 4 + 3] = w[3];
        i += 1;
    }
    out
}

#[inline(always)]
fn is_sendmsg(hook: Hook) -> bool {
    matches!(hook, Hook::Sendmsg4 | Hook::Sendmsg6)
}

/// Flags the socket as the side that started the conversation, so the
/// packet hooks judge its traffic by the egress rules. Returns its storage
/// (null when the kernel could not allocate it).
#[inline(always)]
fn mark_initiator(sk: *mut bpf_sock, connect: bool) -> *mut SockInfo {
    // No initial value: a new storage starts zeroed (a SockInfo on this
    // stack would not fit beside the connect hook's own).
    let p = unsafe {
        bpf_sk_storage_get(
            socks_map(),
            sk.cast(),
            core::ptr::null_mut(),
            BPF_SK_STORAGE_GET_F_CREATE as u64,
        ) as *mut SockInfo
    };
    if !p.is_null() {
        unsafe {
            (*p).flags |= SOCK_INITIATOR;
            // A (re)connect may change the peer: decide its packets anew,
            // and a mark for the old peer no longer holds. A datagram
            // send keeps its socket's verdict, which names its peer
            // (`connect` is known when the program is compiled: no
            // branch for the verifier).
            if connect {
                (*p).verdict.generation = 0;
            }
            (*p).flags &= !SOCK_CUT;
        }
    }
    p
}

/// Byte by byte: a derived `==` on arrays may become a `bcmp` call, which
/// BPF does not have.
#[inline(always)]
fn same_flow(a: &FlowKey, b: &FlowKey) -> bool {
    let mut diff = 0u8;
    let mut i = 0;
    while i < 16 {
        diff |= a.dst[i] ^ b.dst[i];
        i += 1;
    }
    diff == 0 && a.port == b.port && a.proto == b.proto && a.reason == b.reason
}

/// Whether an allowed datagram starts a new flow on its socket: its
/// destination or reason differs from the previous one. Remembers it.
#[inline(always)]
fn new_flow(
    info: *mut SockInfo,
    dst: &[u8; 16],
    dport: [u8; 2],
    proto: u8,
    reason: Reason,
) -> bool {
    if info.is_null() {
        return true;
    }
    let info = unsafe { &mut *info };
    let flow = FlowKey {
        dst: *dst,
        port: dport,
        proto,
        reason: reason as u8,
        _pad: [0; 4],
    };
    if info.flags & SOCK_FLOW_SEEN != 0 && same_flow(&info.last_flow, &flow) {
        return false;
    }
    info.last_flow = flow;
    info.flags |= SOCK_FLOW_SEEN;
    true
}

/// What the address table says about a peer: one walk gives both the
/// domain of the networks holding it and its country. (A local listener's
/// domain comes on top: [`peer_domain`].)
#[inline(always)]
fn peer_of(slot: u32, addr: &PeerAddr) -> Peer<'static> {
    let class = classify(slot, addr.family, &addr.addr);
    Peer {
        domain: class.map_or(0, |c| c.domain),
        geo: class.map(|c| &c.geo),
        loopback: addr.is_loopback(),
    }
}

/// The decision for a peer, as `agent_common` (and `explain`) takes it:
/// bridges looked up only when it needs them.
#[inline(always)]
fn decide_flow(
    a: &Active,
    dom_id: u32,
    dom: &DomainRec,
    peer: &Peer,
    dir: Direction,
    proto: u8,
    ports: Ports,
) -> Decision {
    let now = unsafe { bpf_ktime_get_tai_ns() };
    let slot = a.slot;
    let bridges = |from: u32, to: u32| {
        let key = BridgeKey {
            slot,
            from: from as u16,
            to: to as u16,
        };
        unsafe { BH_BRIDGES.get(key) }
    };
    decide_peer(dir, dom_id, dom, peer, bridges, proto, ports, now)
}

#[cgroup_sock_addr(connect4)]
pub fn bh_connect4(ctx: SockAddrContext) -> i32 {
    sock_addr::<false>(&ctx, Hook::Connect4, Hook::Connect6)
}

#[cgroup_sock_addr(connect6)]
pub fn bh_connect6(ctx: SockAddrContext) -> i32 {
    sock_addr::<true>(&ctx, Hook::Connect4, Hook::Connect6)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn bh_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock_addr::<false>(&ctx, Hook::Sendmsg4, Hook::Sendmsg6)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn bh_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock_addr::<true>(&ctx, Hook::Sendmsg4, Hook::Sendmsg6)
}

/// Raw IP sockets would bypass the sock_addr hooks: domain workloads may
/// not open them unless their domain allows it.
///
/// Ping sockets (`SOCK_DGRAM` with `IPPROTO_ICMP`/`IPPROTO_ICMPV6`) can only
/// send echo requests, and an unconnected `sendto()` on them runs no
/// sock_addr hook: they are marked as initiators from birth, so the packet
/// hooks judge their traffic by the egress rules (geofence included), not
/// as replies to a conversation the peer started.
#[cgroup_sock(sock_create)]
pub fn bh_sock_create(ctx: SockContext) -> i32 {
    let sk = unsafe { &*ctx.sock };
    if sk.type_ == SOCK_DGRAM && (sk.protocol == IPPROTO_ICMP || sk.protocol == IPPROTO_ICMPV6) {
        mark_initiator(ctx.sock, true);
        return ALLOW;
    }
    if sk.type_ != SOCK_RAW {
        return ALLOW;
    }
    let Some(a) = active() else { return ALLOW };
    let dom_id = current_domain(a.slot);
    let Some(dom) = domain_rec(a.slot, dom_id) else {
        return ALLOW;
    };
    if dom.flags & DOMAIN_ALLOW_RAW != 0 {
        return ALLOW;
    }
    let d = Decision {
        allow: false,
        reason: Reason::RawSocketDenied,
        bridge_id: 0,
        until_tai_ns: 0,
    };
    let f = Flow {
        family: sk.family as u8,
        proto: sk.protocol as u8,
        hook: Hook::SockCreate,
        task: true,
        first: true,
        src: [0; 16],
        dst: [0; 16],
        sport: [0; 2],
        dport: [0; 2],
    };
    finish(
        &a,
        dom_id,
        dom,
        0,
        unsafe { bpf_get_current_cgroup_id() },
        d,
        &f,
    )
}

/// Packet sockets (`AF_PACKET`, and `AF_INET`+`SOCK_PACKET`, which the
/// kernel turns into `AF_PACKET` before this hook) and XDP sockets hand
/// frames to the driver below the IP stack, past every hook above: domain
/// workloads may not open them unless their domain allows raw sockets.
/// `cgroup/sock_create` only ever sees `AF_INET`/`AF_INET6`, so this is the
/// BPF LSM hook (`lsm_cgroup/socket_create`, which runs for the creating
/// task's cgroup). Sockets the kernel opens for itself are left alone.
#[lsm_cgroup(hook = "socket_create")]
pub fn bh_socket_create(ctx: LsmContext) -> i32 {
    // LSM_HOOK(int, 0, socket_create, int family, int type, int protocol, int kern)
    let family: i32 = ctx.arg(0);
    let kern: i32 = ctx.arg(3);
    if kern != 0 || family != AF_PACKET && family != AF_XDP {
        return LSM_ALLOW;
    }
    let Some(a) = active() else {
        return LSM_ALLOW;
    };
    let dom_id = current_domain(a.slot);
    let Some(dom) = domain_rec(a.slot, dom_id) else {
        return LSM_ALLOW;
    };
    if dom.flags & DOMAIN_ALLOW_RAW != 0 {
        return LSM_ALLOW;
    }
    let d = Decision {
        allow: false,
        reason: Reason::PacketSocketDenied,
        bridge_id: 0,
        until_tai_ns: 0,
    };
    let f = Flow {
        family: family as u8,
        proto: 0,
        hook: Hook::SockCreate,
        task: true,
        first: true,
        src: [0; 16],
        dst: [0; 16],
        sport: [0; 2],
        dport: [0; 2],
    };
    let rc = finish(
        &a,
        dom_id,
        dom,
        0,
        unsafe { bpf_get_current_cgroup_id() },
        d,
        &f,
    );
    if rc == DENY { LSM_DENY } else { LSM_ALLOW }
}

/// Records the owner's cgroup ancestry on every bound socket so connects
/// to it can be decided by its domain.
#[inline(always)]
fn record_owner(ctx: &SockContext) -> i32 {
    let mut owner: SockInfo = unsafe { zeroed() };
    let mut i = 0;
    while i < MAX_CGROUP_DEPTH {
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(i as i32 + 1) };
        if id == 0 {
            break;
        }
        owner.ancestors[i] = id;
        i += 1;
    }
    let p = unsafe {
        bpf_sk_storage_get(
            socks_map(),
            ctx.sock.cast(),
            (&mut owner as *mut SockInfo).cast(),
            BPF_SK_STORAGE_GET_F_CREATE as u64,
        ) as *mut SockInfo
    };
    if !p.is_null() {
        // An entry may exist already (seeded by the agent for a socket that
        // predates it): the binder's ancestry wins, its flags stay.
        unsafe { (*p).ancestors = owner.ancestors };
    }
    ALLOW
}

#[cgroup_sock(post_bind4)]
pub fn bh_post_bind4(ctx: SockContext) -> i32 {
    record_owner(&ctx)
}

#[cgroup_sock(post_bind6)]
pub fn bh_post_bind6(ctx: SockContext) -> i32 {
    record_owner(&ctx)
}

/// The packet-level check, for both directions.
#[inline(always)]
fn skb(ctx: &SkBuffContext, dir: Direction) -> i32 {
    let Some(a) = active() else { return ALLOW };
    let hook = match dir {
        Direction::Egress => Hook::SkbEgress,
        Direction::Ingress => Hook::SkbIngress,
    };
    let full = skb_full_sock(ctx);
    let info = sock_info(full);
    let cached = cached_verdict(info, &a);
    // An established TCP socket's verdict holds for all its packets.
    if let Some(c) = cached
        && c.family == 0
    {
        return cached_allow(hook, c);
    }
    let initiator = !info.is_null() && unsafe { (*info).flags } & SOCK_INITIATOR != 0;
    let skb_ptr = ctx.skb.skb;
    // A datagram socket's holds for the conversation it was decided for:
    // parse first to see, and find the domain only when it does not. The
    // parse has one call site, which keeps the verifier's work down.
    let mut dom_id = 0;
    let mut dom = None;
    if cached.is_none() {
        dom_id = domain_of(a.slot, skb_ptr.cast_const().cast(), walk_skb);
        dom = domain_rec(a.slot, dom_id);
        if dom.is_none() {
            return ALLOW;
        }
    }
    let parsed = parse(ctx);
    if let Some(c) = cached {
        if let Some(p) = &parsed
            && same_conversation(c, p, dir, initiator)
        {
            return cached_allow(hook, c);
        }
        dom_id = domain_of(a.slot, skb_ptr.cast_const().cast(), walk_skb);
        dom = domain_rec(a.slot, dom_id);
    }
    let Some(dom) = dom else { return ALLOW };
    let cgroup_id = unsafe { bpf_skb_cgroup_id(skb_ptr) };
    let p: Parsed = match parsed {
        Some(p) => p,
        None => {
            let d = Decision {
                allow: false,
                reason: Reason::Unparsable,
                bridge_id: 0,
                until_tai_ns: 0,
            };
            let f = Flow {
                family: 0,
                proto: 0,
                hook,
                task: false,
                first: true,
                src: [0; 16],
                dst: [0; 16],
                sport: [0; 2],
                dport: [0; 2],
            };
            return finish(&a, dom_id, dom, 0, cgroup_id, d, &f);
        }
    };
    let (peer_addr, peer_port, local_port) = conversation(&p, dir);
    // Judge the packet by who started the conversation: the workload's own
    // connections by its egress rules (bridge local → peer on the peer's
    // port), everything else by its ingress rules (bridge peer → local on
    // the workload's port). Replies then pass exactly when the opening did.
    let (conn_dir, service_port, other_port) = if initiator {
        (Direction::Egress, peer_port, local_port)
    } else {
        (Direction::Ingress, local_port, peer_port)
    };
    // An IPv4-mapped IPv6 peer is decided as its IPv4 address, as in the
    // connect hooks; the event keeps the real header.
    let key = PeerAddr::new(p.family, *peer_addr);
    let (peer_family, peer_key) = (key.family, key.addr);
    // Loopback packets were decided at connect time, where the listener's
    // domain is known; here the peer address has no domain.
    let mut peer = peer_of(a.slot, &key);
    // A TCP segment through the loopback device is a connection to or from
    // this host: as at connect time, a peer in no domain network has the
    // domain of the socket listening on its address, so a bridge that
    // expires or a policy that tightens ends same-host connections too.
    // (Datagrams keep their connect-time decision: which side is serving
    // is not known here.)
    if p.proto == IPPROTO_TCP as u8 && unsafe { (*ctx.skb.skb).ifindex } == LOOPBACK_IFINDEX {
        peer.domain = peer_domain(peer.domain, || {
            listener_domain(
                ctx.skb.skb.cast(),
                a.slot,
                peer_family,
                IPPROTO_TCP,
                &peer_key,
                peer_port,
            )
        });
    }
    let ports = Ports {
        service: u16::from_be_bytes(service_port),
        other: u16::from_be_bytes(other_port),
    };
    let d = decide_flow(&a, dom_id, dom, &peer, conn_dir, p.proto, ports);
    if d.allow {
        cache_verdict(full, info, &a, dom_id, &d, &p, dir, initiator);
    }
    if !d.allow && a.config.mode != MODE_AUDIT {
        mark_cut(full, info, &a, dom_id, &peer, &d, &p, dir, cgroup_id);
    }
    let f = Flow {
        family: p.family,
        proto: p.proto,
        hook,
        task: false,
        first: true,
        src: p.src,
        dst: p.dst,
        sport: p.sport,
        dport: p.dport,
    };
    finish(&a, dom_id, dom, peer.domain, cgroup_id, d, &f)
}

/// The full socket behind a packet (null if none).
#[inline(always)]
fn skb_full_sock(ctx: &SkBuffContext) -> *mut bpf_sock {
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return core::ptr::null_mut();
    }
    unsafe { bpf_sk_fullsock(sk) }
}

/// A full socket's storage, if it has any (null otherwise).
#[inline(always)]
fn sock_info(full: *mut bpf_sock) -> *mut SockInfo {
    if full.is_null() {
        return core::ptr::null_mut();
    }
    unsafe {
        bpf_sk_storage_get(socks_map(), full.cast(), core::ptr::null_mut(), 0) as *mut SockInfo
    }
}

/// The allowed verdict cached on this packet's socket, if it was decided
/// under the policy in force and has not expired since; for a datagram
/// socket (`family` set) it still has to be this packet's conversation.
/// A reference into the storage, not a copy: the packet hooks' stack is
/// nearly full.
#[inline(always)]
fn cached_verdict(info: *const SockInfo, a: &Active) -> Option<&'static VerdictCache> {
    if info.is_null() {
        return None;
    }
    let c = unsafe { &(*info).verdict };
    // Before any other field (see `cache_verdict`).
    if unsafe { core::ptr::read_volatile(&c.generation) } != a.generation {
        return None;
    }
    // Most verdicts never expire: no clock read for them.
    let until = unsafe { core::ptr::read_volatile(&c.until_tai_ns) };
    if until != u64::MAX && unsafe { bpf_ktime_get_tai_ns() } >= until {
        return None;
    }
    Some(c)
}

#[inline(always)]
fn cached_allow(hook: Hook, c: &VerdictCache) -> i32 {
    count(counter_index(hook as u8, c.reason));
    bump(&BH_DOMSTATS, domain_counter_index(c.domain, c.reason));
    ALLOW
}

/// The packet's peer and the socket's own port, as the cache keys them.
#[inline(always)]
fn conversation(p: &Parsed, dir: Direction) -> (&[u8; 16], [u8; 2], [u8; 2]) {
    match dir {
        Direction::Egress => (&p.dst, p.dport, p.sport),
        Direction::Ingress => (&p.src, p.sport, p.dport),
    }
}

/// Whether a datagram belongs to the conversation its socket's verdict was
/// decided for: everything the decision read from the packet and socket.
/// (A socket has one protocol, and only datagrams leave a keyed verdict.)
#[inline(always)]
fn same_conversation(c: &VerdictCache, p: &Parsed, dir: Direction, initiator: bool) -> bool {
    use core::ptr::read_volatile as get;
    let (peer, peer_port, local_port) = conversation(p, dir);
    // Volatile: read after the generation (see `cache_verdict`).
    let cached = c.peer.as_ptr().cast::<u64>();
    let ours = peer.as_ptr().cast::<u64>();
    unsafe {
        get(cached) == ours.read_unaligned()
            && get(cached.add(1)) == ours.add(1).read_unaligned()
            && get(&c.family) == p.family
            && get(&c.initiator) == initiator as u8
            && get(&c.peer_port) == peer_port
            && get(&c.local_port) == local_port
    }
}

/// Marks an established socket whose packet was just denied, once: the
/// agent's socket iterators destroy it and report the record.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "kept flat for the verifier")]
fn mark_cut(
    full: *mut bpf_sock,
    info: *mut SockInfo,
    a: &Active,
    dom_id: u32,
    peer: &Peer,
    d: &Decision,
    p: &Parsed,
    dir: Direction,
    cgroup_id: u64,
) {
    if full.is_null() || unsafe { (*full).state } != BPF_TCP_ESTABLISHED {
        return;
    }
    // An accepted socket has no storage of its own yet: give it one, so
    // the serving end is cut too.
    let info = if info.is_null() {
        unsafe {
            bpf_sk_storage_get(
                socks_map(),
                full.cast(),
                core::ptr::null_mut(),
                BPF_SK_STORAGE_GET_F_CREATE as u64,
            ) as *mut SockInfo
        }
    } else {
        info
    };
    if info.is_null() {
        return;
    }
    let info = unsafe { &mut *info };
    if info.flags & SOCK_CUT != 0 {
        return;
    }
    let ingress = matches!(dir, Direction::Ingress);
    let (local, peer_addr, local_port, peer_port) = if ingress {
        (&p.dst, &p.src, p.dport, p.sport)
    } else {
        (&p.src, &p.dst, p.sport, p.dport)
    };
    info.cut = CutRecord {
        generation: a.generation,
        cgroup_id,
        local: *local,
        peer: *peer_addr,
        bridge_id: d.bridge_id,
        local_port,
        peer_port,
        domain: dom_id as u16,
        peer_domain: peer.domain as u16,
        family: p.family,
        proto: p.proto,
        reason: d.reason as u8,
        ingress: ingress as u8,
    };
    info.flags |= SOCK_CUT;
    count(COUNTER_CUT_MARKED);
}

/// Remembers an allowed packet's verdict on its socket. An established
/// TCP socket keeps one peer for the rest of its life (a new connect clears
/// the cache), so its later packets ask the same question; a datagram
/// socket's verdict is keyed by the conversation (see `same_conversation`).
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "kept flat for the verifier")]
fn cache_verdict(
    full: *mut bpf_sock,
    info: *mut SockInfo,
    a: &Active,
    dom_id: u32,
    d: &Decision,
    p: &Parsed,
    dir: Direction,
    initiator: bool,
) {
    // `full` is checked again: the verifier does not know that a storage
    // pointer implies a socket.
    if info.is_null() || full.is_null() {
        return;
    }
    let tcp = p.proto == IPPROTO_TCP as u8;
    if tcp && unsafe { (*full).state } != BPF_TCP_ESTABLISHED {
        return;
    }
    // Field by field into the storage (a whole VerdictCache would not fit
    // on the stack beside the rest), and invalid while being written: a
    // packet of the same socket on another CPU reads the generation first,
    // so it never takes this peer with another's verdict, or the reverse.
    // Volatile, so the compiler keeps that order.
    let c = unsafe { &raw mut (*info).verdict };
    unsafe {
        use core::ptr::write_volatile as put;
        put(&raw mut (*c).generation, 0);
        put(&raw mut (*c).until_tai_ns, d.until_tai_ns);
        put(&raw mut (*c).domain, dom_id);
        put(&raw mut (*c).reason, d.reason as u8);
        let mut family = 0;
        if !tcp {
            let (peer, peer_port, local_port) = conversation(p, dir);
            family = p.family;
            put(&raw mut (*c).initiator, initiator as u8);
            copy16(&raw mut (*c).peer, peer);
            put(&raw mut (*c).peer_port, peer_port);
            put(&raw mut (*c).local_port, local_port);
        }
        put(&raw mut (*c).family, family);
        put(&raw mut (*c).generation, a.generation);
    }
}

#[cgroup_skb(egress)]
pub fn bh_egress(ctx: SkBuffContext) -> i32 {
    skb(&ctx, Direction::Egress)
}

#[cgroup_skb(ingress)]
pub fn bh_ingress(ctx: SkBuffContext) -> i32 {
    skb(&ctx, Direction::Ingress)
}

/// Benchmarks only (`bulkhead run --bench-probes` loads and pins it, nothing
/// attaches it): the address-table walk for the packet's destination and
/// nothing else, to weigh it against the whole decision. Returns 0 where
/// the destination is in a domain, 1 elsewhere.
#[cgroup_skb(egress)]
pub fn bh_probe_addr(ctx: SkBuffContext) -> i32 {
    let Some(a) = active() else { return ALLOW };
    let proto = u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16);
    let (family, dst) = if proto == ETH_P_IP {
        match ctx.load::<[u8; 4]>(16) {
            Ok(d) => (FAMILY_INET, to16(d)),
            Err(_) => return ALLOW,
        }
    } else if proto == ETH_P_IPV6 {
        match ctx.load::<[u8; 16]>(24) {
            Ok(d) => (FAMILY_INET6, d),
            Err(_) => return ALLOW,
        }
    } else {
        return ALLOW;
    };
    match classify(a.slot, family, &dst) {
        Some(c) if c.domain != 0 => DENY,
        _ => ALLOW,
    }
}

const _: () = assert!(size_of::<Event>() == agent_common::event::EVENT_SIZE);

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
