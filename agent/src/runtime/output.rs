//! The events task: drains the kernel's ring buffer when it is readable,
//! enriches each event, and hands it to every output (the events log,
//! stdout, the OpenTelemetry collector, the audit store, live followers); destroys the connections the
//! packet hooks marked.

use std::{
    os::fd::BorrowedFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Result, bail};
use aya::maps::{MapData, PerCpuArray, RingBuf};
use bulkhead_common::{
    Event,
    maps::{COUNTER_CUT_MARKED, CutRecord},
};
use tokio::{io::unix::AsyncFd, sync::oneshot};
use tracing::warn;

use super::control::Hub;
use crate::{
    clock,
    kernel::cut::Cutter,
    runtime::events::{self, Enricher},
    runtime::otlp::Otlp,
    runtime::sink::Lines,
    runtime::store::Store,
};

/// Where enriched events go: each output has its own bounded queue and
/// writer, and is only ever `try_send`ed to, so none can stall another,
/// this task or enforcement.
pub struct Output {
    pub enricher: Arc<Mutex<Enricher>>,
    pub log: Option<Lines>,
    pub stdout: Option<Lines>,
    pub otlp: Option<Otlp>,
    pub delivered: Arc<AtomicU64>,
    pub hub: Arc<Hub>,
    pub store: Option<Store>,
}

impl Output {
    /// Enriches, then hands each event to the log, stdout, the store and
    /// live subscribers.
    fn send(&mut self, events: impl IntoIterator<Item = Event>, kernel: bool) {
        let mut en = self.enricher.lock().expect("enricher lock");
        for e in events {
            // Only the kernel's events carry per-CPU sequence numbers.
            if kernel {
                en.gap(&e);
            }
            let rec = en.enrich(&e);
            self.delivered.fetch_add(1, Ordering::Relaxed);
            // Serialized once: the followers' hub keeps and sends the JSON.
            let json = serde_json::to_string(&rec).unwrap_or_default();
            if self.log.is_some() || self.stdout.is_some() {
                let mut line = String::with_capacity(json.len() + 1);
                line.push_str(&json);
                line.push('\n');
                match (&self.log, &self.stdout) {
                    (Some(l), Some(o)) => {
                        o.send(&rec.ts, line.clone());
                        l.send(&rec.ts, line);
                    }
                    (Some(l), None) => l.send(&rec.ts, line),
                    (None, Some(o)) => o.send(&rec.ts, line),
                    (None, None) => {}
                }
            }
            if let Some(o) = &self.otlp {
                o.send(&rec);
            }
            self.hub.publish(&rec, json.into());
            if let Some(s) = &self.store {
                s.event(rec);
            }
        }
    }
}

/// Connections cut, for `status` and the metrics.
pub struct CutState {
    /// The kernel has `bpf_sock_destroy` and the iterators loaded.
    pub enabled: bool,
    pub destroyed: Arc<AtomicU64>,
    /// Marked by the packet hooks (all namespaces).
    pub marked: AtomicU64,
}

/// The `BH_SOCKS` socket storage the iterators and `explain` read.
pub fn socks_fd(ebpf: &aya::Ebpf) -> Result<BorrowedFd<'_>> {
    use std::os::fd::AsFd as _;
    match ebpf.map(bulkhead_common::maps::MAP_SOCKS) {
        Some(aya::maps::Map::SkStorage(m)) => Ok(m.fd().as_fd()),
        _ => bail!("map BH_SOCKS missing from the object"),
    }
}

/// The event for a socket an iterator destroyed: the workload's side as
/// source, as for its own connections.
fn cut_event(r: &CutRecord, now_tai_ns: u64) -> Event {
    Event {
        ts_tai_ns: now_tai_ns,
        cgroup_id: r.cgroup_id,
        generation: r.generation,
        src_addr: r.local,
        dst_addr: r.peer,
        bridge_id: r.bridge_id,
        src_port: r.local_port,
        dst_port: r.peer_port,
        src_domain: r.domain,
        dst_domain: r.peer_domain,
        family: r.family,
        proto: r.proto,
        hook: bulkhead_common::Hook::SockDestroy as u8,
        verdict: bulkhead_common::Verdict::Cut as u8,
        reason: r.reason,
        ..Event::default()
    }
}

/// The connection cutter with what it reads: the kernel's count of marks.
pub struct Cuts {
    pub cutter: Cutter,
    pub counters: PerCpuArray<MapData, u64>,
    pub tai_offset_ns: i64,
    pub state: Arc<CutState>,
}

impl Cuts {
    /// Sockets the packet hooks marked since the last look: destroys them
    /// (one iteration, and only when there are new marks).
    fn run(&self, out: &mut Output) {
        let marked = self
            .counters
            .get(&COUNTER_CUT_MARKED, 0)
            .map(|v| v.iter().sum::<u64>())
            .unwrap_or(0);
        if marked <= self.state.marked.swap(marked, Ordering::Relaxed) {
            return;
        }
        match self.cutter.run() {
            Ok(records) => {
                let now = clock::now_tai(clock::now_ns(), self.tai_offset_ns);
                self.state
                    .destroyed
                    .fetch_add(records.len() as u64, Ordering::Relaxed);
                out.send(records.iter().map(|r| cut_event(r, now)), false);
            }
            Err(e) => warn!("cutting connections failed: {e:#}"),
        }
    }
}

/// Events handed on per turn of the events task.
const TURN: usize = 4096;

/// Reads the ring until `stop` fires, then drains it once more.
pub async fn read(
    ring: RingBuf<MapData>,
    mut out: Output,
    cuts: Option<Cuts>,
    mut stop: oneshot::Receiver<()>,
) {
    // SAFETY: the ring buffer owns its map's file descriptor and keeps it
    // open, unreplaced, for as long as the AsyncFd holds it.
    let registered =
        unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
    let mut ring = match registered {
        Ok(r) => r,
        Err(e) => {
            warn!("events are not read: the ring buffer cannot be polled: {e}");
            return;
        }
    };
    // Marks are looked for at least this often, events or not.
    let mut marks = tokio::time::interval(Duration::from_millis(100));
    marks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            ready = ring.readable_mut() => {
                match ready {
                    Ok(mut guard) => guard.clear_ready(),
                    Err(e) => warn!("polling the ring buffer: {e}"),
                }
                false
            }
            _ = marks.tick() => false,
            _ = &mut stop => true,
        };
        // A turn hands on at most TURN events, then lets the loop answer
        // control requests and /healthz: a storm is read to its end, but
        // never keeps the agent deaf while it is.
        loop {
            let (mut events, mut read) = (Vec::new(), 0);
            while read < TURN
                && let Some(item) = ring.get_mut().next()
            {
                read += 1;
                if let Some(e) = events::decode(&item) {
                    events.push(e);
                }
            }
            out.send(events, true);
            if read < TURN {
                break;
            }
            tokio::task::yield_now().await;
        }
        if let Some(c) = &cuts {
            c.run(&mut out);
        }
        if stopping {
            return;
        }
    }
}
