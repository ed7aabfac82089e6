//! What a connect to an address in no domain network reaches: the
//! listening socket and its owner, as the connect hook learns them. The
//! agent finds them on the host (`bulkhead::listeners`); `explain` decides
//! on them.

use std::net::SocketAddr;

use bulkhead_common::maps::MAX_CGROUP_DEPTH;

/// Who owns the socket a connect reaches, as the connect hook learns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owner {
    /// Its `BH_SOCKS` entry: the cgroup ancestry the connect hook walks.
    Recorded([u64; MAX_CGROUP_DEPTH]),
    /// It has no `BH_SOCKS` entry: the connect hook finds no owner.
    Unrecorded,
    /// No socket storage to read: the ancestry of the cgroup it was
    /// created in, which is what `post_bind` records unless another
    /// process bound it.
    Creator([u64; MAX_CGROUP_DEPTH]),
    /// No `sock_diag` either: the ancestry of the cgroup of the process
    /// holding it, what the agent records for a socket bound before it
    /// started (`bulkhead::listeners::seed`).
    Holder([u64; MAX_CGROUP_DEPTH]),
}

impl Owner {
    /// The owner's cgroup ancestry, if it has one.
    pub fn ancestors(&self) -> Option<&[u64; MAX_CGROUP_DEPTH]> {
        match self {
            Owner::Recorded(a) | Owner::Creator(a) | Owner::Holder(a) => Some(a),
            Owner::Unrecorded => None,
        }
    }
}

/// What a connect to an address in no domain network reaches on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listener {
    /// Nothing listens there.
    Nothing,
    Found {
        /// Where it is bound, e.g. `127.0.0.1:7411` or `[::]:53`.
        bound: SocketAddr,
        owner: Owner,
        /// The owner's cgroup path, while it exists.
        path: Option<String>,
    },
    /// Something may listen there, but whose it is cannot be read: why.
    Unknown(String),
}

/// A listener lookup and where it looked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lookup {
    /// The network namespace, in words.
    pub netns: String,
    pub listener: Listener,
}
