//! Names: the addresses that answers from a domain's resolvers give the
//! names its `egress.names` rules mention, learned in the kernel as the
//! answer is delivered, before the workload can read it, so the first
//! connect after a lookup is decided with them. Learning and expiry need
//! no agent.
//!
//! Two packet programs of their own (`bh_dns_egress`, `bh_dns_ingress`),
//! never attached: the packet hooks enter them by a tail call
//! ([`hand_over`]) with a packet they let pass, only while the policy in
//! force uses names ([`CONFIG_NAMES`]), so no other packet pays for a
//! second program. They never refuse a packet, and return at once unless
//! it is UDP or TCP from or to port 53. A UDP datagram holds one
//! message; a TCP answer segment is read when it starts where the
//! stream's next message does (its two-byte length first), and up to two
//! messages in it (glibc writes its `A` and `AAAA` queries in one go).
//! An answer teaches a domain something
//! only when it comes from one of the domain's resolvers, to a socket of
//! the domain that sent a query with the same transaction id to that
//! resolver from that port (then the query is used up), and no socket of
//! the same domain sent it (an answer a workload forges over loopback or
//! a raw socket teaches its own domain nothing).

use aya_ebpf::{
    helpers::generated::{bpf_get_socket_cookie, bpf_loop, bpf_skb_load_bytes},
    maps::ProgramArray,
    programs::SkBuffContext,
};
use bulkhead_common::{
    decide::{DNS_PORT, Names, PeerAddr},
    dns::{self, DNS_BUF, HASH_STEPS, MAX_ANSWERS, MAX_LABELS, Scratch},
    maps::{
        CONFIG_NAMES, COUNTER_DNS_ANSWERS, COUNTER_DNS_LEARNED, COUNTER_DNS_NEW,
        COUNTER_DNS_SPOOFED, COUNTER_DNS_UNREAD, DOMAIN_NAMES, DnsQueryKey, DomainRec, ForgedKey,
        Learned, LearnedKey, NameKey, ResolverKey,
    },
};

use crate::{
    clock::now_tai,
    events::{ALLOW, count},
    maps::{BH_DNSBUF, BH_DNSF, BH_DNSQ, BH_DNST, BH_LEARNED, BH_NAMES, BH_RESOLVERS},
    packet::{Parsed, parse},
    peer::{IPPROTO_TCP, IPPROTO_UDP},
    policy::{Active, active, domain_rec},
    walk::skb_domain,
};

const NS: u64 = 1_000_000_000;

/// Hands a packet its hook lets pass to the DNS program of its direction
/// (`programs`, at 0) while the policy in force (`a`) uses names. A tail call:
/// on success it does not return, and the DNS program's [`ALLOW`] is the
/// packet's verdict; with nothing in the array it returns and the hook's
/// verdict stands. It must be called from the hook's own frame (the
/// kernel refuses tail calls from a function called with a deep stack).
#[inline(always)]
pub(crate) fn hand_over(ctx: &SkBuffContext, a: &Active, programs: &ProgramArray) {
    // Kernels without `bpf_loop` learn no names (see [`dns_packet`]).
    if cfg!(feature = "unrolled") {
        return;
    }
    if a.config.flags & CONFIG_NAMES != 0 {
        // SAFETY: the array holds only this direction's DNS program, a
        // cgroup_skb program of the same attach type.
        unsafe { programs.tail_call(ctx, 0) };
    }
}

/// What the domain's DNS rules know of `peer`, reached on `port`. `fresh`:
/// the connect and sendmsg hooks count an address only within its
/// answer's TTL; the packet hooks count it as long as it is remembered, so
/// an established connection keeps its verdict past the TTL.
#[inline(always)]
pub(crate) fn names_of(
    a: &Active,
    dom_id: u32,
    dom: &DomainRec,
    peer: &PeerAddr,
    port: u16,
    fresh: bool,
) -> Names {
    let mut n = Names::default();
    if dom.flags & DOMAIN_NAMES == 0 {
        return n;
    }
    // Only DNS asks whether the peer is a resolver.
    if port == DNS_PORT {
        n.resolver = is_resolver(a.slot, dom_id, peer.family, &peer.addr);
    }
    let key = LearnedKey {
        addr: peer.addr,
        domain_key: dom.key,
        family: peer.family,
        _pad: [0; 3],
    };
    let Some(l) = (unsafe { BH_LEARNED.get(key) }) else {
        return n;
    };
    let rule = NameKey {
        hash: l.rule_hash,
        slot: a.slot,
        domain: dom_id as u16,
        wildcard: l.wildcard,
        _pad: 0,
    };
    if unsafe { BH_NAMES.get(rule) }.is_none() {
        return n;
    }
    if fresh {
        if now_tai() >= l.expires_tai_ns {
            return n;
        }
        n.until_tai_ns = l.expires_tai_ns;
    } else {
        n.until_tai_ns = u64::MAX;
    }
    n.named = true;
    n
}

#[inline(always)]
fn is_resolver(slot: u32, dom_id: u32, family: u8, addr: &[u8; 16]) -> bool {
    let key = ResolverKey {
        addr: *addr,
        slot,
        domain: dom_id as u16,
        family,
        _pad: 0,
    };
    unsafe { BH_RESOLVERS.get(key) }.is_some()
}

/// A UDP or TCP packet from or to port 53 under a policy that uses names,
/// and the domain of its socket; the packet's addresses and ports in `p`.
#[inline(always)]
fn dns_packet(ctx: &SkBuffContext, p: &mut Parsed) -> Option<(Active, u32, &'static DomainRec)> {
    // Kernels without `bpf_loop` (before 5.17) learn no names: their
    // verifier would walk every byte of every answer (README). Both
    // programs stop here in that object.
    if cfg!(feature = "unrolled") {
        return None;
    }
    let a = active()?;
    if a.config.flags & CONFIG_NAMES == 0 || !parse_dns(ctx, p) {
        return None;
    }
    let dom_id = skb_domain(&a, ctx.skb.skb);
    let dom = domain_rec(a.slot, dom_id)?;
    Some((a, dom_id, dom))
}

/// Parses a UDP or TCP packet from or to port 53 into `p`. A function of
/// its own, so what parsing needs is off the stack by the time answers
/// are read (see [`learn`]).
#[inline(never)]
fn parse_dns(ctx: &SkBuffContext, out: &mut Parsed) -> bool {
    let Some(p) = parse(ctx) else {
        return false;
    };
    let dns = DNS_PORT.to_be_bytes();
    let transport = p.proto == IPPROTO_UDP as u8 || p.proto == IPPROTO_TCP as u8;
    if !transport || (p.sport != dns && p.dport != dns) {
        return false;
    }
    *out = p;
    true
}

/// A DNS message in the packet: where it starts, its length as far as the
/// packet holds it (at least a header's), and its transaction id; or
/// [`Msg::NONE`]. (Not an `Option`: what a `None` leaves undefined, the
/// compiler may copy from any register, which the verifier refuses.)
#[derive(Clone, Copy)]
struct Msg {
    off: u32,
    len: u32,
    id: u16,
    /// The domain an answer teaches, for [`learn`] (a BPF call takes five
    /// arguments).
    dom_id: u32,
}

impl Msg {
    const NONE: Msg = Msg {
        off: 0,
        len: 0,
        id: 0,
        dom_id: 0,
    };

    fn is_some(&self) -> bool {
        self.len >= 12
    }
}

/// Messages a TCP segment is read for.
const TCP_MESSAGES: usize = 2;

/// Where the packet's first message (a datagram's one; a segment's first,
/// after its two-byte length) is: the cursor for [`next_message`].
#[inline(always)]
fn first_message(ctx: &SkBuffContext, p: &Parsed) -> u32 {
    let l4 = p.l4 as u32;
    if p.proto == IPPROTO_UDP as u8 {
        return l4 + 8;
    }
    match ctx.load::<u8>(l4 as usize + 12) {
        Ok(doff) => l4 + (doff >> 4) as u32 * 4,
        Err(_) => ctx.len(),
    }
}

/// The message at the cursor `at`, which moves past it: a datagram holds
/// one; of a segment that starts at a message ([`at_boundary`]), up to
/// [`TCP_MESSAGES`] are read, each after its length.
#[inline(always)]
fn next_message(ctx: &SkBuffContext, p: &Parsed, at: &mut u32) -> Msg {
    let total = ctx.len();
    if p.proto == IPPROTO_UDP as u8 {
        let m = msg_at(ctx, *at, u32::MAX, total);
        *at = total;
        return m;
    }
    let Ok(b) = ctx.load::<[u8; 2]>(*at as usize) else {
        return Msg::NONE;
    };
    let len = u16::from_be_bytes(b) as u32;
    let m = msg_at(ctx, *at + 2, len, total);
    *at += 2 + len;
    m
}

/// The message at `off` of `len` bytes, cut to the packet's `total`; none
/// shorter than a header.
#[inline(always)]
fn msg_at(ctx: &SkBuffContext, off: u32, len: u32, total: u32) -> Msg {
    if off >= total {
        return Msg::NONE;
    }
    let len = len.min(total - off);
    if len < 12 {
        return Msg::NONE;
    }
    match ctx.load::<[u8; 2]>(off as usize) {
        Ok(id) => Msg {
            off,
            len,
            id: u16::from_be_bytes(id),
            dom_id: 0,
        },
        Err(_) => Msg::NONE,
    }
}

/// `bh_dns_egress`: remembers the queries a domain that uses names sends
/// to its resolvers, and the answers any domain's sockets send.
#[inline(always)]
pub(crate) fn egress(ctx: &SkBuffContext) -> i32 {
    let mut p = Parsed::EMPTY;
    let Some((a, dom_id, dom)) = dns_packet(ctx, &mut p) else {
        return ALLOW;
    };
    let dns = DNS_PORT.to_be_bytes();
    let query = p.dport == dns
        && dom.flags & DOMAIN_NAMES != 0
        && is_resolver(a.slot, dom_id, p.family, &p.dst);
    let mut at = first_message(ctx, &p);
    for _ in 0..TCP_MESSAGES {
        let m = next_message(ctx, &p, &mut at);
        if !m.is_some() {
            break;
        }
        if query {
            let key = query_key(ctx, p.dst, p.sport, p.family, m.id);
            let _ = BH_DNSQ.insert(key, now_tai(), 0);
        }
        if p.sport == dns {
            let _ = BH_DNSF.insert(forged_key(&p, m.id), dom.key, 0);
        }
    }
    ALLOW
}

/// A query of the packet's socket to `server` from its `port`, as the
/// query leaves and as its answer comes in.
#[inline(always)]
fn query_key(
    ctx: &SkBuffContext,
    server: [u8; 16],
    port: [u8; 2],
    family: u8,
    id: u16,
) -> DnsQueryKey {
    DnsQueryKey {
        cookie: socket_cookie(ctx),
        server,
        id,
        port,
        family,
        _pad: [0; 3],
    }
}

/// An answer-shaped datagram, as its sender sends it and as it arrives.
#[inline(always)]
fn forged_key(p: &Parsed, id: u16) -> ForgedKey {
    ForgedKey {
        src: p.src,
        dst: p.dst,
        dport: p.dport,
        id,
        family: p.family,
        _pad: [0; 3],
    }
}

/// `bh_dns_ingress`: learns from an answer to a query of the receiving
/// socket (see the module's rules).
#[inline(always)]
pub(crate) fn ingress(ctx: &SkBuffContext) -> i32 {
    let mut p = Parsed::EMPTY;
    let Some((a, dom_id, dom)) = dns_packet(ctx, &mut p) else {
        return ALLOW;
    };
    if p.sport != DNS_PORT.to_be_bytes()
        || dom.flags & DOMAIN_NAMES == 0
        || !is_resolver(a.slot, dom_id, p.family, &p.src)
    {
        return ALLOW;
    }
    if p.proto == IPPROTO_TCP as u8 && !at_boundary(ctx, &p) {
        return ALLOW;
    }
    let mut at = first_message(ctx, &p);
    for _ in 0..TCP_MESSAGES {
        let mut m = next_message(ctx, &p, &mut at);
        if !m.is_some() {
            break;
        }
        if !answers_a_query(ctx, &p, dom.key, m.id) {
            count(COUNTER_DNS_SPOOFED);
            continue;
        }
        m.dom_id = dom_id;
        if !learn(ctx, &a, &p, &m, dom) {
            count(COUNTER_DNS_UNREAD);
        }
    }
    ALLOW
}

#[inline(always)]
fn socket_cookie(ctx: &SkBuffContext) -> u64 {
    unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) }
}

const TCP_SYN: u8 = 0x02;

/// Whether a segment from a resolver starts where the stream's next
/// message does ([`BH_DNST`]): counted from the first byte after the
/// SYN-ACK, moved on here by the length of each message the segment is
/// read for. Bytes a workload can choose inside an answer (the name it
/// asked for, a record of a zone it runs) may look like a message at the
/// start of a segment that continues one; the framing, which only the
/// resolver writes, is what tells them apart. A function of its own, for
/// the stack (see [`learn`]).
#[inline(never)]
fn at_boundary(ctx: &SkBuffContext, p: &Parsed) -> bool {
    // Ports, sequence, acknowledgment, data offset, flags.
    let Ok(h) = ctx.load::<[u8; 14]>(p.l4 as usize) else {
        return false;
    };
    let cookie = socket_cookie(ctx);
    let seq = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
    if h[13] & TCP_SYN != 0 {
        let _ = BH_DNST.insert(cookie, seq.wrapping_add(1), 0);
        return false;
    }
    if unsafe { BH_DNST.get(cookie) }.is_none_or(|next| *next != seq) {
        return false;
    }
    // The next message starts where the last one read here ends (in this
    // segment or a later one). With more left in this segment than is
    // read, the framing is lost: nothing more is learned from the stream.
    let start = first_message(ctx, p);
    let mut at = start;
    for _ in 0..TCP_MESSAGES {
        // Moves past each message whose length is in the segment.
        let _ = next_message(ctx, p, &mut at);
    }
    if at < ctx.len() {
        let _ = BH_DNST.remove(cookie);
    } else {
        let _ = BH_DNST.insert(cookie, seq.wrapping_add(at - start), 0);
    }
    true
}

/// Whether an answer from a resolver answers a query the receiving socket
/// sent it (used up here), and no socket of the receiving domain (`own`,
/// its key) sent it. A function of its own, for the stack (see [`learn`]).
#[inline(never)]
fn answers_a_query(ctx: &SkBuffContext, p: &Parsed, own: u32, id: u16) -> bool {
    let forged = forged_key(p, id);
    if let Some(sender) = unsafe { BH_DNSF.get(forged) } {
        let mine = *sender == own;
        let _ = BH_DNSF.remove(forged);
        if mine {
            return false;
        }
    }
    let query = query_key(ctx, p.src, p.dport, p.family, id);
    if unsafe { BH_DNSQ.get(query) }.is_none() {
        return false;
    }
    let _ = BH_DNSQ.remove(query);
    true
}

/// Copies the answer out of the packet and learns its addresses if its
/// question names a name the domain's rules mention. `false`: it could
/// not be read. A function of its own: the verifier limits the stack of a
/// program and its calls together, and the hook's frame ends here.
#[inline(never)]
fn learn(ctx: &SkBuffContext, a: &Active, p: &Parsed, m: &Msg, dom: &DomainRec) -> bool {
    let Some(buf) = BH_DNSBUF.get_ptr_mut(0) else {
        return false;
    };
    let dom_id = m.dom_id;
    // In 64 bits, branch by branch: the verifier must see the length is
    // 12..=DNS_BUF when the helper is called (6.1's loses the bounds of
    // 32-bit arithmetic here).
    // The lower bound before the upper, so it holds on every copy of `n`
    // the compiler makes.
    let off = m.off as u64;
    let mut n = m.len as u64;
    if n < 12 {
        return false;
    }
    if n > DNS_BUF as u64 {
        n = DNS_BUF as u64;
    }
    let s = unsafe { &mut *buf };
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            off as u32,
            s.buf.as_mut_ptr().cast(),
            n as u32,
        )
    };
    if rc != 0 {
        return false;
    }
    let len = n as usize;
    let Some(q) = dns::question(s, len) else {
        return false;
    };
    // Each way out of the question's label loop is its own state to the
    // verifier, and so is everything after it, once per way: passed
    // through memory, the values are the same unknowns on every path.
    let q = dns::Question {
        id: q.id,
        answers: launder(&mut s.spill[0], q.answers as u64) as u16,
        next: launder(&mut s.spill[1], q.next as u64) as usize,
        labels: launder(&mut s.spill[2], q.labels as u64) as usize,
        end: launder(&mut s.spill[3], q.end as u64) as usize,
    };
    if q.labels == 0 || q.labels > MAX_LABELS {
        return false;
    }
    s.hashing = dns::Hashing::new(&q);
    let mut steps = Steps { s: buf };
    unsafe {
        bpf_loop(
            HASH_STEPS,
            hash_one as *mut core::ffi::c_void,
            (&mut steps as *mut Steps).cast(),
            0,
        )
    };
    if s.hashing.left != 0 {
        return false;
    }
    let Some((rule_hash, wildcard)) = matching_rule(a.slot, dom_id, &q, &s.hashes) else {
        // A name the rules do not mention: nothing to learn.
        return true;
    };
    let rule_hash = launder(&mut s.spill[0], rule_hash);
    let wildcard = launder(&mut s.spill[1], wildcard as u64) as u8;
    let now = now_tai();
    s.value = Learned {
        expires_tai_ns: now,
        learned_tai_ns: now,
        rule_hash,
        resolver: p.src,
        wildcard,
        resolver_family: p.family,
        _pad: [0; 6],
    };
    s.key.domain_key = dom.key;
    s.spill[0] = dom.min_ttl as u64;
    s.spill[1] = dom.max_ttl as u64;
    s.pos = q.next as u32;
    s.learned = 0;
    let mut r = Records {
        s: buf,
        len: len as u32,
        answers: q.answers as u32,
    };
    unsafe {
        bpf_loop(
            MAX_ANSWERS as u32,
            record_one as *mut core::ffi::c_void,
            (&mut r as *mut Records).cast(),
            0,
        )
    };
    if s.learned > 0 {
        count(COUNTER_DNS_ANSWERS);
    }
    true
}

/// `v`, written to `slot` and read back: see its use in [`learn`].
#[inline(always)]
fn launder(slot: &mut u64, v: u64) -> u64 {
    unsafe {
        core::ptr::write_volatile(slot, v);
        core::ptr::read_volatile(slot)
    }
}

/// The backward pass over the question's name ([`dns::hash_step`]); its
/// state is the scratch buffer's `hashing` (see [`Scratch::hashing`]).
#[repr(C)]
struct Steps {
    s: *mut Scratch,
}

#[inline(never)]
extern "C" fn hash_one(_i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    let h = unsafe { &mut *ctx.cast::<Steps>() };
    let s = unsafe { &mut *h.s };
    let mut st = s.hashing;
    let more = dns::hash_step(s, &mut st);
    s.hashing = st;
    if more { 0 } else { 1 }
}

/// The walk over the answer records, learning each address: the key and
/// value written are the scratch buffer's, the TTL bounds in its `spill`,
/// the record to read and the count learned its `pos` and `learned`
/// (what changes from step to step is kept in the map: see
/// [`Scratch::hashing`]). What stays is here.
#[repr(C)]
struct Records {
    s: *mut Scratch,
    len: u32,
    answers: u32,
}

#[inline(never)]
extern "C" fn record_one(i: u64, ctx: *mut core::ffi::c_void) -> i64 {
    let w = unsafe { &mut *ctx.cast::<Records>() };
    if i >= w.answers as u64 {
        return 1;
    }
    let s = unsafe { &mut *w.s };
    let Some(r) = dns::record(&s.buf, w.len as usize, s.pos as usize) else {
        return 1;
    };
    s.pos = r.next as u32;
    if r.family == 0 {
        return 0;
    }
    let ttl = (r.ttl as u64).clamp(s.spill[0], s.spill[1].max(s.spill[0]));
    s.key.addr = r.addr;
    s.key.family = r.family;
    s.value.expires_tai_ns = s.value.learned_tai_ns + ttl * NS;
    // Counted when new, so what the LRU map evicted is known: it holds
    // the new ones less the evicted.
    let new = unsafe { BH_LEARNED.get(s.key) }.is_none();
    if BH_LEARNED.insert(s.key, s.value, 0).is_ok() {
        count(COUNTER_DNS_LEARNED);
        if new {
            count(COUNTER_DNS_NEW);
        }
        s.learned += 1;
    }
    0
}

/// The rule that mentions the question's name: the whole name exactly,
/// else the longest suffix a `*.` rule names.
#[inline(always)]
fn matching_rule(
    slot: u32,
    dom_id: u32,
    q: &dns::Question,
    hashes: &[u64; MAX_LABELS],
) -> Option<(u64, u8)> {
    let mut key = NameKey {
        hash: hashes[(q.labels - 1) & (MAX_LABELS - 1)],
        slot,
        domain: dom_id as u16,
        wildcard: 0,
        _pad: 0,
    };
    if unsafe { BH_NAMES.get(key) }.is_some() {
        return Some((key.hash, 0));
    }
    key.wildcard = 1;
    let mut i = 1;
    while i < MAX_LABELS {
        if i >= q.labels {
            break;
        }
        key.hash = hashes[(q.labels - 1 - i) & (MAX_LABELS - 1)];
        if unsafe { BH_NAMES.get(key) }.is_some() {
            return Some((key.hash, 1));
        }
        i += 1;
    }
    None
}
