//! What a socket's storage holds: who binds it, which side started its
//! conversation, its cached verdict and its cut mark.

use core::mem::zeroed;

use aya_ebpf::{
    bindings::{BPF_SK_STORAGE_GET_F_CREATE, bpf_sock},
    helpers::generated::{bpf_get_current_ancestor_cgroup_id, bpf_sk_fullsock, bpf_sk_storage_get},
    programs::{SkBuffContext, SockContext},
};
use bulkhead_common::{
    Decision, Direction, Hook, Reason,
    decide::Peer,
    maps::{
        COUNTER_CUT_MARKED, CutRecord, FlowKey, MAX_CGROUP_DEPTH, SOCK_CUT, SOCK_FLOW_SEEN,
        SOCK_INITIATOR, SockInfo, VERDICT_CONNECTED, VerdictCache, counter_index,
        domain_counter_index,
    },
};
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use crate::{
    events::{ALLOW, bump, copy16, count},
    log::rare,
    maps::{BH_DOMSTATS, BH_LISTEN, BH_SOCKS},
    packet::Parsed,
    peer::{IPPROTO_TCP, IPPROTO_UDP},
    policy::Active,
    walk::current_cgroup,
};

/// `BPF_TCP_ESTABLISHED` of the uapi's TCP state enum (a connected
/// datagram socket's state too).
pub(crate) const BPF_TCP_ESTABLISHED: u32 = 1;
/// `BPF_TCP_SYN_SENT` of the same enum: a connecting socket's, from the
/// connect to the peer's answer.
pub(crate) const BPF_TCP_SYN_SENT: u32 = 2;
/// `BPF_TCP_LISTEN` of the same enum.
pub(crate) const BPF_TCP_LISTEN: u32 = 10;

#[inline(always)]
pub(crate) fn socks_map() -> *mut core::ffi::c_void {
    core::ptr::from_ref(&BH_SOCKS).cast_mut().cast()
}

/// Records the owner's cgroup ancestry on every bound socket so connects
/// to it can be decided by its domain.
#[inline(always)]
pub(crate) fn record_owner(ctx: &SockContext, program: &'static str) -> i32 {
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
    if p.is_null() {
        rare!(
            program,
            "no storage for a bound socket of cgroup {}: connects to it are decided as if it had no owner",
            current_cgroup()
        );
    } else {
        // An entry may exist already (seeded by the agent for a socket that
        // predates it): the binder's ancestry wins, its flags stay.
        unsafe { (*p).ancestors = owner.ancestors };
    }
    // A new listener: remembered datagram verdicts no longer hold (one of
    // them may name this address and port as a destination with no
    // listener, or another's).
    if let Some(n) = BH_LISTEN.get_ptr_mut(0) {
        // Atomic: two binds at once must both change it (a lost update
        // would let a verdict remembered between them outlive the second).
        // SAFETY: the map value is a u64 that lives as long as the map.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(n, 1) };
    }
    ALLOW
}

/// `BH_LISTEN[0]`: how many sockets were bound so far.
#[inline(always)]
pub(crate) fn listen_epoch() -> u64 {
    match BH_LISTEN.get_ptr(0) {
        Some(n) => unsafe { core::ptr::read_volatile(n) },
        None => 0,
    }
}

/// The socket's remembered `sendmsg` verdict, if it holds for this
/// datagram (see `SendCache`): counted like a decision, and the datagram
/// is allowed without deciding again.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "one datagram's facts, inlined")]
pub(crate) fn repeat_send(
    sk: *mut bpf_sock,
    a: &Active,
    cgroup_id: u64,
    listeners: u64,
    dst: &[u8; 16],
    port: [u8; 2],
    proto: u8,
    hook: Hook,
) -> bool {
    let p = unsafe {
        bpf_sk_storage_get(socks_map(), sk.cast(), core::ptr::null_mut(), 0) as *const SockInfo
    };
    if p.is_null() {
        return false;
    }
    let c = unsafe { &raw const (*p).send };
    // The generation first, as it was written last (see `remember_send`).
    if unsafe { core::ptr::read_volatile(&raw const (*c).generation) } != a.generation {
        return false;
    }
    let c = unsafe { &*c };
    let mut diff = 0u8;
    let mut i = 0;
    while i < 16 {
        diff |= c.dst[i] ^ dst[i];
        i += 1;
    }
    if diff != 0
        || c.port != port
        || c.proto != proto
        || c.cgroup_id != cgroup_id
        || c.listeners != listeners
    {
        return false;
    }
    if c.until_tai_ns != u64::MAX && crate::clock::now_tai() >= c.until_tai_ns {
        return false;
    }
    count(counter_index(hook as u8, c.reason));
    bump(
        &BH_DOMSTATS,
        domain_counter_index(c.domain as u32, c.reason),
    );
    true
}

/// Remembers an allowed `sendmsg` decision on its socket (field by field,
/// invalid while being written, like `cache_verdict`).
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "one datagram's facts, inlined")]
pub(crate) fn remember_send(
    info: *mut SockInfo,
    a: &Active,
    d: &Decision,
    dom_id: u32,
    cgroup_id: u64,
    listeners: u64,
    dst: &[u8; 16],
    port: [u8; 2],
    proto: u8,
) {
    if info.is_null() || !d.allow {
        return;
    }
    let c = unsafe { &raw mut (*info).send };
    unsafe {
        use core::ptr::write_volatile as put;
        put(&raw mut (*c).generation, 0);
        put(&raw mut (*c).until_tai_ns, d.until_tai_ns);
        put(&raw mut (*c).listeners, listeners);
        put(&raw mut (*c).cgroup_id, cgroup_id);
        copy16(&raw mut (*c).dst, dst);
        put(&raw mut (*c).port, port);
        put(&raw mut (*c).proto, proto);
        put(&raw mut (*c).reason, d.reason as u8);
        put(&raw mut (*c).domain, dom_id as u16);
        put(&raw mut (*c).generation, a.generation);
    }
}

/// Flags the socket as the side that started the conversation, so the
/// packet hooks judge its traffic by the egress rules. Returns its storage
/// (null when the kernel could not allocate it).
#[inline(always)]
pub(crate) fn mark_initiator(sk: *mut bpf_sock, connect: bool) -> *mut SockInfo {
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
pub(crate) fn same_flow(a: &FlowKey, b: &FlowKey) -> bool {
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
pub(crate) fn new_flow(
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

/// The socket behind a packet (null if none). It may be a request or
/// time-wait socket: the storage helper returns nothing for those (it
/// checks that the socket is full itself), and the only field read from
/// it, `state`, is in every socket. Kernels with `bpf_loop` take the
/// socket as is, one helper call (`bpf_sk_fullsock`) fewer per packet;
/// the unrolled object, for older kernels, still asks for the full socket,
/// as 5.10's storage helper takes nothing else.
#[inline(always)]
pub(crate) fn skb_sock(ctx: &SkBuffContext) -> *mut bpf_sock {
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() || !cfg!(feature = "unrolled") {
        return sk;
    }
    unsafe { bpf_sk_fullsock(sk) }
}

/// A socket's storage, if it has any (null otherwise).
#[inline(always)]
pub(crate) fn sock_info(sk: *mut bpf_sock) -> *mut SockInfo {
    if sk.is_null() {
        return core::ptr::null_mut();
    }
    unsafe { bpf_sk_storage_get(socks_map(), sk.cast(), core::ptr::null_mut(), 0) as *mut SockInfo }
}

/// The allowed verdict cached on this packet's socket, if it was decided
/// under the policy in force and has not expired since; for a datagram
/// socket (`family` set) it still has to be this packet's conversation.
/// A reference into the storage, not a copy: the packet hooks' stack is
/// nearly full.
#[inline(always)]
pub(crate) fn cached_verdict(info: *const SockInfo, a: &Active) -> Option<&'static VerdictCache> {
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
    if until != u64::MAX && crate::clock::now_tai() >= until {
        return None;
    }
    Some(c)
}

#[inline(always)]
pub(crate) fn cached_allow(hook: Hook, c: &VerdictCache) -> i32 {
    count(counter_index(hook as u8, c.reason));
    bump(&BH_DOMSTATS, domain_counter_index(c.domain, c.reason));
    ALLOW
}

/// The packet's peer and the socket's own port, as the cache keys them.
#[inline(always)]
pub(crate) fn conversation(p: &Parsed, dir: Direction) -> (&[u8; 16], [u8; 2], [u8; 2]) {
    match dir {
        Direction::Egress => (&p.dst, p.dport, p.sport),
        Direction::Ingress => (&p.src, p.sport, p.dport),
    }
}

/// Whether a datagram belongs to the conversation its socket's verdict was
/// decided for: everything the decision read from the packet and socket.
/// (A socket has one protocol. A TCP socket's keyed verdict comes from its
/// connect, before its local port was chosen: that port is not compared.)
#[inline(always)]
pub(crate) fn same_conversation(
    c: &VerdictCache,
    p: &Parsed,
    dir: Direction,
    initiator: bool,
) -> bool {
    use core::ptr::read_volatile as get;
    let (peer, peer_port, local_port) = conversation(p, dir);
    // Volatile: read after the generation (see `cache_verdict`). The
    // packet's side too, though it is on the stack: a plain load may be
    // hoisted above the caller's test that the parse succeeded, and before
    // 6.x the verifier refuses reading the stack where a failed parse
    // wrote nothing. (`Parsed` is 8-aligned and so are its addresses.)
    let cached = c.peer.as_ptr().cast::<u64>();
    let ours = peer.as_ptr().cast::<u64>();
    unsafe {
        get(cached) == get(ours)
            && get(cached.add(1)) == get(ours.add(1))
            && get(&c.family) == p.family
            && get(&c.initiator) == initiator as u8
            && get(&c.peer_port) == peer_port
            && (get(&c.local_port) == local_port || p.proto == IPPROTO_TCP as u8)
    }
}

/// Marks an established socket whose packet was just denied, once: the
/// agent's socket iterators destroy it and report the record.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "kept flat for the verifier")]
pub(crate) fn mark_cut(
    sk: *mut bpf_sock,
    info: *mut SockInfo,
    a: &Active,
    dom_id: u32,
    peer: &Peer,
    d: &Decision,
    p: &Parsed,
    dir: Direction,
    cgroup_id: u64,
) {
    if sk.is_null() || unsafe { (*sk).state } != BPF_TCP_ESTABLISHED {
        return;
    }
    // An accepted socket has no storage of its own yet: give it one, so
    // the serving end is cut too.
    let info = if info.is_null() {
        unsafe {
            bpf_sk_storage_get(
                socks_map(),
                sk.cast(),
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
pub(crate) fn cache_verdict(
    sk: *mut bpf_sock,
    info: *mut SockInfo,
    a: &Active,
    dom_id: u32,
    d: &Decision,
    p: &Parsed,
    dir: Direction,
    initiator: bool,
) {
    // `sk` is checked again: the verifier does not know that a storage
    // pointer implies a socket.
    if info.is_null() || sk.is_null() {
        return;
    }
    let tcp = p.proto == IPPROTO_TCP as u8;
    if tcp && unsafe { (*sk).state } != BPF_TCP_ESTABLISHED {
        return;
    }
    let (peer, peer_port, local_port) = conversation(p, dir);
    let key = (!tcp).then_some(Key {
        family: p.family,
        peer,
        peer_port,
        local_port,
    });
    store_verdict(info, a, dom_id, d, key, initiator);
}

/// A connect's allowed decision, remembered on its socket for the packets
/// of the handshake (which would each be decided again otherwise: the
/// connection is not established yet). Keyed by the peer the connect
/// named, so a destination rewritten after this hook (a socket load
/// balancer's connect program) is decided by its packets; the local port
/// is not known yet and not compared for TCP. The SYN, when it matches,
/// makes it the unkeyed verdict ([`settle`]).
#[inline(always)]
pub(crate) fn cache_connect(
    info: *mut SockInfo,
    a: &Active,
    dom_id: u32,
    d: &Decision,
    family: u8,
    peer: &[u8; 16],
    peer_port: [u8; 2],
) {
    if info.is_null() || !d.allow {
        return;
    }
    let key = Key {
        family,
        peer,
        peer_port,
        local_port: [0; 2],
    };
    store_verdict(info, a, dom_id, d, Some(key), true);
}

/// What a keyed verdict holds for (see `same_conversation`).
pub(crate) struct Key<'p> {
    family: u8,
    peer: &'p [u8; 16],
    peer_port: [u8; 2],
    local_port: [u8; 2],
}

/// Field by field into the storage (a whole VerdictCache would not fit on
/// the stack beside the rest), and invalid while being written: a packet
/// of the same socket on another CPU reads the generation first, so it
/// never takes this peer with another's verdict, or the reverse. Volatile,
/// so the compiler keeps that order. No key: the socket's only peer.
#[inline(always)]
fn store_verdict(
    info: *mut SockInfo,
    a: &Active,
    dom_id: u32,
    d: &Decision,
    key: Option<Key>,
    initiator: bool,
) {
    let c = unsafe { &raw mut (*info).verdict };
    unsafe {
        use core::ptr::write_volatile as put;
        put(&raw mut (*c).generation, 0);
        put(&raw mut (*c).until_tai_ns, d.until_tai_ns);
        put(&raw mut (*c).domain, dom_id);
        put(&raw mut (*c).reason, d.reason as u8);
        let mut family = 0;
        if let Some(k) = key {
            family = k.family;
            put(&raw mut (*c).initiator, initiator as u8);
            copy16(&raw mut (*c).peer, k.peer);
            put(&raw mut (*c).peer_port, k.peer_port);
            put(&raw mut (*c).local_port, k.local_port);
        }
        put(&raw mut (*c).family, family);
        put(&raw mut (*c).generation, a.generation);
    }
}

/// A keyed verdict that just matched a packet, made to hold for every
/// packet of its socket where the kernel guarantees the peer: a TCP
/// socket's from [`cache_connect`], from its SYN on (a connecting socket's
/// four-tuple is fixed once its SYN is sent: the kernel delivers it only
/// its peer's segments, and only another connect, which clears the
/// verdict, changes the peer), so the rest of the handshake is not parsed
/// and compared again; a connected datagram socket's, on a datagram from
/// its peer (delivered to it only because it came from the peer it is
/// connected to; one it sent may have gone to another address, by
/// `sendto`). One byte: a packet on another CPU sees the verdict keyed or
/// unkeyed, valid either way.
#[inline(always)]
pub(crate) fn settle(sk: *mut bpf_sock, info: *mut SockInfo, p: &Parsed, dir: Direction) {
    if info.is_null() || sk.is_null() {
        return;
    }
    let state = unsafe { (*sk).state };
    let unkeyed = if p.proto == IPPROTO_TCP as u8
        && (state == BPF_TCP_ESTABLISHED || state == BPF_TCP_SYN_SENT)
    {
        0
    } else if p.proto == IPPROTO_UDP as u8
        && matches!(dir, Direction::Ingress)
        && state == BPF_TCP_ESTABLISHED
    {
        VERDICT_CONNECTED
    } else {
        return;
    };
    unsafe { core::ptr::write_volatile(&raw mut (*info).verdict.family, unkeyed) };
}

/// Whether an unkeyed verdict (see [`settle`]) holds for the socket as it
/// is now: a TCP socket's until it listens (on kernels that let a socket
/// disconnected with `AF_UNSPEC` listen, anyone may then connect to it), a
/// datagram socket's while it stays connected (disconnected, it hears from
/// anyone).
#[inline(always)]
pub(crate) fn unkeyed(sk: *mut bpf_sock, c: &VerdictCache) -> bool {
    if sk.is_null() {
        return false;
    }
    let state = unsafe { (*sk).state };
    match c.family {
        0 => state != BPF_TCP_LISTEN,
        VERDICT_CONNECTED => state == BPF_TCP_ESTABLISHED,
        _ => false,
    }
}

/// Whether the socket started its conversations (see [`mark_initiator`]).
/// Not a listening one: a socket that connected, disconnected and then
/// listens serves the peers that connect to it.
#[inline(always)]
pub(crate) fn initiator(sk: *mut bpf_sock, info: *const SockInfo) -> bool {
    !info.is_null()
        && !sk.is_null()
        && unsafe { (*info).flags } & SOCK_INITIATOR != 0
        && unsafe { (*sk).state } != BPF_TCP_LISTEN
}
