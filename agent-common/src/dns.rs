//! DNS answers as the kernel reads them, to learn the addresses of the
//! names a domain's `egress.names` rules mention ([`crate::maps::Learned`]).
//!
//! Pure functions over the first [`DNS_BUF`] bytes of a UDP payload: the
//! ingress program copies them into a scratch buffer and calls these, and
//! the agent's tests call the same ones on answers `dnsmasq` wrote. Every
//! index is masked to the buffer and every loop has a fixed bound, so the
//! verifier accepts them; whatever does not fit the bounds (a name of more
//! than [`MAX_LABELS`] labels, records past the buffer or past
//! [`MAX_ANSWERS`]) is not learned: fail closed.
//!
//! Names are matched by hash: [`hash_step`] gives the hash of every
//! suffix of the question's name that starts at a label, and the agent
//! puts the hash of each rule's name ([`name_hash`]) in `BH_NAMES`. An
//! exact rule matches the whole name, a `*.` rule any strictly shorter
//! suffix. Hashes are over the wire form (length-prefixed labels and the
//! final zero), lower-cased, read from the end, so one backward pass over
//! the name gives every suffix's hash.

/// Bytes of an answer read; the rest is not looked at.
pub const DNS_BUF: usize = 1024;
/// Labels of a question's name; longer names are not learned.
pub const MAX_LABELS: usize = 16;
/// Answer records read per answer.
pub const MAX_ANSWERS: usize = 16;
/// Longest name in wire form (RFC 1035).
const MAX_NAME: usize = 255;
const HEADER: usize = 12;
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

#[inline(always)]
fn at(buf: &[u8; DNS_BUF], i: usize) -> u8 {
    buf[i & (DNS_BUF - 1)]
}

#[inline(always)]
fn be16(buf: &[u8; DNS_BUF], i: usize) -> u16 {
    u16::from_be_bytes([at(buf, i), at(buf, i + 1)])
}

#[inline(always)]
fn fold(h: u64, b: u8) -> u64 {
    (h ^ u64::from(b.to_ascii_lowercase())).wrapping_mul(FNV_PRIME)
}

/// An answer being read: too big for the kernel programs' stack, so it
/// lives in a per-CPU map there.
#[repr(C)]
pub struct Scratch {
    /// The first bytes of the UDP payload.
    pub buf: [u8; DNS_BUF],
    /// Filled by [`hash_step`]: `hashes[i]` is the hash of the suffix made
    /// of the question name's last `i + 1` labels; `hashes[labels - 1]` is
    /// the whole name's.
    pub hashes: [u64; MAX_LABELS],
    starts: [u16; MAX_LABELS],
    /// Where the kernel programs pass values through memory, so the
    /// verifier stops telling apart the paths that led to them.
    pub spill: [u64; 4],
    /// What the kernel writes for each address learned (off the stack,
    /// which the verifier limits).
    pub key: crate::maps::LearnedKey,
    pub value: crate::maps::Learned,
    /// The kernel's `bpf_loop` callbacks keep what changes from one step
    /// to the next here, not on the stack: read from a map, it is unknown
    /// to the verifier, so every step starts from the same state and the
    /// loop is verified once (kernels 6.7 and 6.8 verify a callback until
    /// its states repeat, and tracked values never do).
    pub hashing: Hashing,
    /// The answer record to read next.
    pub pos: u32,
    /// Addresses learned from this answer.
    pub learned: u32,
}

impl Scratch {
    pub const fn new() -> Scratch {
        Scratch {
            buf: [0; DNS_BUF],
            hashes: [0; MAX_LABELS],
            starts: [0; MAX_LABELS],
            spill: [0; 4],
            key: crate::maps::LearnedKey {
                addr: [0; 16],
                domain_key: 0,
                family: 0,
                _pad: [0; 3],
            },
            value: crate::maps::Learned {
                expires_tai_ns: 0,
                learned_tai_ns: 0,
                rule_hash: 0,
                resolver: [0; 16],
                wildcard: 0,
                resolver_family: 0,
                _pad: [0; 6],
            },
            hashing: Hashing {
                h: 0,
                p: 0,
                left: 0,
                labels: 0,
            },
            pos: 0,
            learned: 0,
        }
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch::new()
    }
}

/// The header and question of an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Question {
    /// The transaction id.
    pub id: u16,
    /// Answer records announced.
    pub answers: u16,
    /// Where the answer section starts.
    pub next: usize,
    /// Labels of the name: [`Scratch::hashes`] holds this many.
    pub labels: usize,
    /// Where the name's final zero is.
    pub end: usize,
}

/// The transaction id of a query or answer (its first two bytes).
#[inline(always)]
pub fn id(buf: &[u8; DNS_BUF]) -> u16 {
    be16(buf, 0)
}

/// Reads an answer's header and its one question (`len` bytes of `buf`
/// are the payload). `None` for anything but a successful answer
/// (`QR` set, opcode 0, `RCODE` 0) to exactly one question whose name is
/// not compressed and has at most [`MAX_LABELS`] labels.
#[inline(always)]
pub fn question(s: &mut Scratch, len: usize) -> Option<Question> {
    let buf = &s.buf;
    if !(HEADER..=DNS_BUF).contains(&len) {
        return None;
    }
    let flags = be16(buf, 2);
    let is_answer = flags & 0x8000 != 0;
    let opcode = (flags >> 11) & 0xf;
    let rcode = flags & 0xf;
    if !is_answer || opcode != 0 || rcode != 0 || be16(buf, 4) != 1 {
        return None;
    }
    // Forward: where the name ends and where each label starts.
    let starts = &mut s.starts;
    let mut labels = 0usize;
    let mut pos = HEADER;
    let mut i = 0;
    while i <= MAX_LABELS {
        if pos >= len || pos >= HEADER + MAX_NAME {
            return None;
        }
        let l = at(buf, pos) as usize;
        if l == 0 {
            break;
        }
        // A pointer (or a reserved label type) in the question: not read.
        if l & 0xc0 != 0 || labels >= MAX_LABELS {
            return None;
        }
        starts[labels & (MAX_LABELS - 1)] = pos as u16;
        labels += 1;
        pos += l + 1;
        i += 1;
    }
    if labels == 0 || i > MAX_LABELS {
        return None;
    }
    let end = pos;
    // qtype and qclass follow the name.
    if end + 5 > len {
        return None;
    }
    Some(Question {
        id: be16(buf, 0),
        answers: be16(buf, 6),
        next: end + 5,
        labels,
        end,
    })
}

/// The backward pass over a question's name that fills
/// [`Scratch::hashes`]: one byte per [`hash_step`], so the kernel runs it
/// under `bpf_loop` (a verifier walks one step, not 255 of them).
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct Hashing {
    h: u64,
    /// The byte to fold next.
    p: usize,
    /// Suffix hashes still to store.
    pub left: usize,
    labels: usize,
}

impl Hashing {
    pub fn new(q: &Question) -> Hashing {
        Hashing {
            h: FNV_OFFSET,
            p: q.end,
            left: q.labels,
            labels: q.labels,
        }
    }
}

/// Folds one byte; `false` once every suffix hash is stored (or the start
/// of the name is passed, which leaves `left` non-zero).
#[inline(always)]
pub fn hash_step(s: &mut Scratch, st: &mut Hashing) -> bool {
    st.h = fold(st.h, at(&s.buf, st.p));
    if st.left > 0 && st.p == s.starts[(st.left - 1) & (MAX_LABELS - 1)] as usize {
        s.hashes[(st.labels - st.left) & (MAX_LABELS - 1)] = st.h;
        st.left -= 1;
        if st.left == 0 {
            return false;
        }
    }
    if st.p <= HEADER {
        return false;
    }
    st.p -= 1;
    true
}

/// Steps a backward pass needs at most.
pub const HASH_STEPS: u32 = MAX_NAME as u32 + 1;

/// [`question`], then every [`hash_step`]: `None` unless all the suffix
/// hashes are in `s.hashes`.
pub fn question_hashed(s: &mut Scratch, len: usize) -> Option<Question> {
    let q = question(s, len)?;
    let mut st = Hashing::new(&q);
    for _ in 0..HASH_STEPS {
        if !hash_step(s, &mut st) {
            break;
        }
    }
    (st.left == 0).then_some(q)
}

/// One answer record: an address of the question's name, or another
/// record (a CNAME of the chain, a signature) that only moves `next` on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// [`crate::event::FAMILY_INET`], [`crate::event::FAMILY_INET6`], or 0
    /// for a record that is not an address.
    pub family: u8,
    pub addr: [u8; 16],
    pub ttl: u32,
    pub next: usize,
}

/// The record at `pos`; `None` where it does not fit in `len` bytes.
#[inline(always)]
pub fn record(buf: &[u8; DNS_BUF], len: usize, pos: usize) -> Option<Record> {
    let mut pos = pos;
    // The owner name: labels, then a zero or a pointer. Its value does not
    // matter: a recursive resolver answers with the chain that leads from
    // the question to its addresses.
    let mut i = 0;
    while i < MAX_NAME / 2 {
        if pos >= len {
            return None;
        }
        let l = at(buf, pos) as usize;
        if l & 0xc0 == 0xc0 {
            pos += 2;
            break;
        }
        if l & 0xc0 != 0 {
            return None;
        }
        pos += 1 + l;
        if l == 0 {
            break;
        }
        i += 1;
    }
    if pos + 10 > len || pos > DNS_BUF {
        return None;
    }
    let rtype = be16(buf, pos);
    let class = be16(buf, pos + 2);
    let ttl = u32::from_be_bytes([
        at(buf, pos + 4),
        at(buf, pos + 5),
        at(buf, pos + 6),
        at(buf, pos + 7),
    ]);
    let rdlen = be16(buf, pos + 8) as usize;
    let data = pos + 10;
    if data + rdlen > len {
        return None;
    }
    let mut r = Record {
        family: 0,
        addr: [0; 16],
        ttl,
        next: data + rdlen,
    };
    if class != CLASS_IN {
        return Some(r);
    }
    if rtype == TYPE_A && rdlen == 4 {
        r.family = crate::event::FAMILY_INET;
        let mut j = 0;
        while j < 4 {
            r.addr[j] = at(buf, data + j);
            j += 1;
        }
    } else if rtype == TYPE_AAAA && rdlen == 16 {
        r.family = crate::event::FAMILY_INET6;
        let mut j = 0;
        while j < 16 {
            r.addr[j] = at(buf, data + j);
            j += 1;
        }
    }
    Some(r)
}

/// The hash [`question`] gives the name `name` (dotted, any case, no
/// trailing dot): what the agent stores for a rule. `None` for a name that
/// is not valid in DNS.
pub fn name_hash(name: &str) -> Option<u64> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > MAX_NAME - 2 {
        return None;
    }
    let mut wire = [0u8; MAX_NAME];
    let mut n = 0;
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return None;
        }
        wire[n] = label.len() as u8;
        wire[n + 1..n + 1 + label.len()].copy_from_slice(label.as_bytes());
        n += 1 + label.len();
    }
    // The final zero length.
    n += 1;
    Some(wire[..n].iter().rev().fold(FNV_OFFSET, |h, b| fold(h, *b)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{FAMILY_INET, FAMILY_INET6};
    use std::boxed::Box;
    use std::vec::Vec;

    fn name(out: &mut Vec<u8>, n: &str) {
        for l in n.split('.') {
            out.push(l.len() as u8);
            out.extend_from_slice(l.as_bytes());
        }
        out.push(0);
    }

    /// An answer for `q`: a CNAME to `alias` (pointer to the question),
    /// then A and AAAA records of the alias.
    fn answer(q: &str, alias: &str) -> Vec<u8> {
        let mut m = vec![0x12, 0x34, 0x81, 0x80, 0, 1, 0, 3, 0, 0, 0, 0];
        name(&mut m, q);
        m.extend_from_slice(&[0, 1, 0, 1]);
        // CNAME: owner = pointer to the question name at 12.
        m.extend_from_slice(&[0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 60]);
        let mut target = Vec::new();
        name(&mut target, alias);
        m.extend_from_slice(&(target.len() as u16).to_be_bytes());
        let alias_at = m.len();
        m.extend_from_slice(&target);
        let ptr = [0xc0 | (alias_at >> 8) as u8, alias_at as u8];
        m.extend_from_slice(&ptr);
        m.extend_from_slice(&[0, 1, 0, 1, 0, 0, 1, 44, 0, 4, 192, 0, 2, 7]);
        m.extend_from_slice(&ptr);
        m.extend_from_slice(&[0, 28, 0, 1, 0, 0, 0, 30, 0, 16]);
        m.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9]);
        m
    }

    fn scratch(m: &[u8]) -> Box<Scratch> {
        let mut s = Box::new(Scratch::new());
        s.buf[..m.len()].copy_from_slice(m);
        s
    }

    #[test]
    fn suffix_hashes_match_the_rules_names() {
        let m = answer("API.GitHub.com", "lb.example.net");
        let mut s = scratch(&m);
        let q = question_hashed(&mut s, m.len()).unwrap();
        assert_eq!((q.id, q.answers, q.labels), (0x1234, 3, 3));
        assert_eq!(s.hashes[0], name_hash("com").unwrap());
        assert_eq!(s.hashes[1], name_hash("github.com").unwrap());
        assert_eq!(s.hashes[2], name_hash("api.github.com.").unwrap());
        assert_ne!(s.hashes[2], name_hash("api.github.co").unwrap());
        assert_ne!(name_hash("a.bc"), name_hash("ab.c"));
    }

    #[test]
    fn records_walk_a_cname_chain_to_its_addresses() {
        let m = answer("api.github.com", "lb.example.net");
        let mut s = scratch(&m);
        let q = question(&mut s, m.len()).unwrap();
        let b = &s.buf;
        let mut pos = q.next;
        let mut got = Vec::new();
        for _ in 0..q.answers {
            let r = record(b, m.len(), pos).unwrap();
            got.push((r.family, r.ttl, r.addr));
            pos = r.next;
        }
        assert_eq!(pos, m.len());
        assert_eq!(got[0].0, 0, "the CNAME is no address");
        assert_eq!(got[1].0, FAMILY_INET);
        assert_eq!((got[1].1, &got[1].2[..4]), (300, &[192, 0, 2, 7][..]));
        assert_eq!((got[2].0, got[2].1, got[2].2[15]), (FAMILY_INET6, 30, 9));
        // Cut short: the last record no longer fits.
        let third = record(b, m.len(), q.next).unwrap().next;
        let third = record(b, m.len(), third).unwrap().next;
        assert!(record(b, m.len(), third).is_some());
        assert!(record(b, m.len() - 1, third).is_none());
    }

    #[test]
    fn only_successful_answers_to_one_plain_question_are_read() {
        let q = |m: &[u8], len: usize| question_hashed(&mut scratch(m), len);
        let m = answer("a.example", "b.example");
        assert!(q(&m, m.len()).is_some());
        let mut query = m.clone();
        query[2] &= 0x7f;
        assert!(q(&query, query.len()).is_none(), "a query");
        let mut nx = m.clone();
        nx[3] |= 3;
        assert!(q(&nx, nx.len()).is_none(), "NXDOMAIN");
        let mut two = m.clone();
        two[5] = 2;
        assert!(q(&two, two.len()).is_none(), "two questions");
        assert!(q(&m, 11).is_none(), "shorter than a header");
        let long = (0..MAX_LABELS + 1)
            .map(|_| "a")
            .collect::<Vec<_>>()
            .join(".");
        let l = answer(&long, "b.example");
        assert!(q(&l, l.len()).is_none(), "too many labels");
        let most = (0..MAX_LABELS).map(|_| "a").collect::<Vec<_>>().join(".");
        let l = answer(&most, "b.example");
        let mut s = scratch(&l);
        assert_eq!(question_hashed(&mut s, l.len()).unwrap().labels, MAX_LABELS);
        assert_eq!(s.hashes[MAX_LABELS - 1], name_hash(&most).unwrap());
    }

    #[test]
    fn rule_names_hash_only_when_valid() {
        assert!(name_hash("").is_none());
        assert!(name_hash("a..b").is_none());
        assert!(name_hash(&"x".repeat(64)).is_none());
        assert_eq!(name_hash("Example.COM"), name_hash("example.com."));
    }
}
