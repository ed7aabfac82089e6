//! Every map the programs share with the agent, pinned by name so a new
//! agent (and the benchmark probes) open the same ones.

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, bpf_map_type::BPF_MAP_TYPE_SK_STORAGE},
    macros::{btf_map, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use bulkhead_common::{
    addr::{AddrClass, AddrLine, MAX_CLASSES, SLOT_LINES},
    dns::Scratch,
    maps::{
        BridgeKey, BridgeSet, CgroupKey, Config, DnsQueryKey, DomainCache, DomainRec, ForgedKey,
        Learned, LearnedKey, MAX_BRIDGE_PAIRS, MAX_CGROUPS, MAX_DOMAINS, MAX_LEARNED, MAX_NAMES,
        MAX_RESOLVERS, NUM_COUNTERS, NUM_DOMAIN_COUNTERS, NameKey, ResolverKey, SockInfo, State,
        TokenBucket,
    },
};

#[map(name = "BH_STATE")]
pub(crate) static BH_STATE: Array<State> = Array::pinned(1, 0);
#[map(name = "BH_CONFIG")]
pub(crate) static BH_CONFIG: Array<Config> = Array::pinned(2, 0);
#[map(name = "BH_CGROUPS")]
pub(crate) static BH_CGROUPS: HashMap<CgroupKey, u32> = HashMap::pinned(2 * MAX_CGROUPS, 0);
#[map(name = "BH_DOMAINS")]
pub(crate) static BH_DOMAINS: Array<DomainRec> = Array::pinned(2 * MAX_DOMAINS, 0);
/// Both slots of the address table (`bulkhead_common::addr`); the agent
/// writes a slot through `mmap`.
#[map(name = "BH_ADDR")]
pub(crate) static BH_ADDR: Array<AddrLine> = Array::pinned(2 * SLOT_LINES, BPF_F_MMAPABLE);
#[map(name = "BH_CLASSES")]
pub(crate) static BH_CLASSES: Array<AddrClass> = Array::pinned(2 * MAX_CLASSES, 0);
#[map(name = "BH_BRIDGES")]
pub(crate) static BH_BRIDGES: HashMap<BridgeKey, BridgeSet> =
    HashMap::pinned(2 * MAX_BRIDGE_PAIRS, 0);
#[map(name = "BH_COUNTERS")]
pub(crate) static BH_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(NUM_COUNTERS, 0);
#[map(name = "BH_DOMSTATS")]
pub(crate) static BH_DOMSTATS: PerCpuArray<u64> = PerCpuArray::pinned(NUM_DOMAIN_COUNTERS, 0);
/// The domain of each cgroup seen (tasks', packets' sockets') under a generation
/// (`bulkhead_common::maps::DomainCache`). Not pinned: a cache, private to
/// the programs of one load.
#[map(name = "BH_DOMCACHE")]
pub(crate) static BH_DOMCACHE: LruHashMap<u64, DomainCache> =
    LruHashMap::with_max_entries(16 * 1024, 0);
/// Bumped by every bind: see `bulkhead_common::maps::MAP_LISTEN`.
#[map(name = "BH_LISTEN")]
pub(crate) static BH_LISTEN: Array<u64> = Array::pinned(1, 0);
/// TAI minus boot time (`bulkhead_common::maps::MAP_CLOCK`).
#[map(name = "BH_CLOCK")]
pub(crate) static BH_CLOCK: Array<i64> = Array::pinned(1, 0);
#[map(name = "BH_RATE")]
pub(crate) static BH_RATE: LruHashMap<u64, TokenBucket> = LruHashMap::pinned(16 * 1024, 0);
/// Sized by the agent at load time (`--ring-buffer-bytes`).
#[map(name = "BH_EVENTS")]
pub(crate) static BH_EVENTS: RingBuf = RingBuf::pinned(1 << 20, 0);
/// `bulkhead_common::maps::MAP_NAMES`, both slots.
#[map(name = "BH_NAMES")]
pub(crate) static BH_NAMES: HashMap<NameKey, u32> = HashMap::pinned(2 * MAX_NAMES, 0);
/// `bulkhead_common::maps::MAP_RESOLVERS`, both slots.
#[map(name = "BH_RESOLVERS")]
pub(crate) static BH_RESOLVERS: HashMap<ResolverKey, u32> = HashMap::pinned(2 * MAX_RESOLVERS, 0);
/// `bulkhead_common::maps::MAP_LEARNED`: outlives policies and agents.
#[map(name = "BH_LEARNED")]
pub(crate) static BH_LEARNED: LruHashMap<LearnedKey, Learned> = LruHashMap::pinned(MAX_LEARNED, 0);
/// `bulkhead_common::maps::MAP_DNS_QUERIES`; the value is when it was sent.
#[map(name = "BH_DNSQ")]
pub(crate) static BH_DNSQ: LruHashMap<DnsQueryKey, u64> = LruHashMap::pinned(8 * 1024, 0);
/// `bulkhead_common::maps::MAP_DNS_STREAMS`: socket cookie → the sequence
/// number where the next answer of its TCP stream starts.
#[map(name = "BH_DNST")]
pub(crate) static BH_DNST: LruHashMap<u64, u32> = LruHashMap::pinned(8 * 1024, 0);
/// `bulkhead_common::maps::MAP_DNS_FORGED`.
#[map(name = "BH_DNSF")]
pub(crate) static BH_DNSF: LruHashMap<ForgedKey, u32> = LruHashMap::pinned(1024, 0);
/// `bulkhead_common::maps::MAP_DNS_EGRESS_TAIL`: `bh_dns_egress` at 0.
#[map(name = "BH_DNSOUT")]
pub(crate) static BH_DNSOUT: ProgramArray = ProgramArray::pinned(1, 0);
/// `bulkhead_common::maps::MAP_DNS_INGRESS_TAIL`: `bh_dns_ingress` at 0.
#[map(name = "BH_DNSIN")]
pub(crate) static BH_DNSIN: ProgramArray = ProgramArray::pinned(1, 0);
/// Where an answer is copied to be read (`bulkhead_common::dns`): too
/// big for the stack. Private to one load.
#[map(name = "BH_DNSBUF")]
pub(crate) static BH_DNSBUF: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);
#[btf_map]
pub(crate) static BH_SOCKS: PinnedSkStorage<SockInfo> = PinnedSkStorage::new();

/// A socket storage map definition (BTF-style, as aya-ebpf's `SkStorage`)
/// that asks to be pinned by name, which aya-ebpf's cannot: what a socket's
/// storage holds (which side opened a connection, its cached verdict, a
/// listener's owner) must outlive the agent that loaded the programs, or
/// every restart would judge open connections as if older than the agent.
#[repr(C)]
pub(crate) struct PinnedSkStorage<T> {
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

/// Map flag: userspace may `mmap` the array.
pub(crate) const BPF_F_MMAPABLE: u32 = 1 << 10;
