//! `bulkhead explain` on this host: the pure answer
//! ([`bulkhead_policy::explain`]), with the listeners a connect would reach
//! looked up on the host (`sock_diag`, `/proc`) and the kernel's clock read.

use std::{net::IpAddr, os::fd::BorrowedFd, path::PathBuf};

pub use bulkhead_policy::explain::*;

use crate::{
    clock,
    compile::Compiled,
    geo::GeoDb,
    kernel::{
        cgroup,
        listeners::{self, Lookup},
    },
    policy::{Policy, Proto},
};

/// The listeners of this host, looked up for a query as the connect hook
/// looks them up: in the network namespace of the query's cgroup, with a
/// TCP listener's owner from the socket storage `BH_SOCKS` where its map is
/// given (see [`listeners::lookup`]).
pub struct HostListeners<'a> {
    mount: PathBuf,
    storage: Option<BorrowedFd<'a>>,
}

impl<'a> HostListeners<'a> {
    pub fn new(storage: Option<BorrowedFd<'a>>) -> Self {
        HostListeners {
            mount: cgroup::cgroup2_mount().unwrap_or_else(|_| "/sys/fs/cgroup".into()),
            storage,
        }
    }

    pub fn lookup(&self, q: &Query, dst: IpAddr) -> Lookup {
        let netns = listeners::netns_of_cgroup(&self.mount, &q.cgroup);
        listeners::lookup(
            &netns,
            q.proto == Proto::Tcp,
            dst,
            q.port,
            self.storage,
            &self.mount,
        )
    }
}

/// [`explain_with`] looking listeners up on this host, with owners from the
/// cgroups their sockets were created in (no socket storage at hand): what
/// `explain --policy` does, from the caller's view of the host.
pub fn explain(policy: &Policy, c: &Compiled, geo: &GeoDb, q: &Query, now_unix_ns: i64) -> Answer {
    let host = HostListeners::new(None);
    explain_with(policy, c, geo, q, now_unix_ns, &|q, ip| host.lookup(q, ip))
}

/// [`explain_at`] at `now_unix_ns`, on the kernel's clock of this host.
pub fn explain_with(
    policy: &Policy,
    c: &Compiled,
    geo: &GeoDb,
    q: &Query,
    now_unix_ns: i64,
    listener: &dyn Fn(&Query, IpAddr) -> Lookup,
) -> Answer {
    let now_tai = clock::now_tai(now_unix_ns, clock::tai_offset_ns());
    explain_at(policy, c, geo, q, now_tai, listener)
}

/// The live answer while `--audit-full=refuse` refuses (the audit trail
/// cannot be written, `unwritable` says why): what the connect hook then
/// decides, by the same test ([`refused_unaudited`]); the policy's own
/// answer stays in `rule`. `mode` is the policy's (`MODE_AUDIT`: a
/// refusal is `would-deny`).
pub fn while_refusing(mut a: Answer, dst: IpAddr, mode: u32, unwritable: &[String]) -> Answer {
    use bulkhead_common::{
        Decision,
        decide::{Peer, refused_unaudited},
    };
    // Workloads in no domain are never refused.
    if a.workload_domain.is_none() {
        return a;
    }
    let own = a.dst_domain.is_some() && a.dst_domain == a.workload_domain;
    let peer = Peer {
        domain: u32::from(own),
        geo: None,
        loopback: dst.to_canonical().is_loopback(),
        names: Default::default(),
    };
    if !refused_unaudited(1, &peer) {
        return a;
    }
    let d = Decision::unaudited();
    a.rule = format!(
        "--audit-full=refuse: new connections of domain workloads are refused while the audit \
         trail cannot be written ({}); the policy alone: {} {} ({})",
        unwritable.join(", "),
        a.verdict,
        a.reason,
        a.rule
    );
    a.verdict = d.verdict(mode).name();
    a.reason = d.reason.name();
    a.reason_code = d.reason as u8;
    a.bridge = None;
    a
}
