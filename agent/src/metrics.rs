//! Prometheus metrics on `--metrics-addr` (`GET /metrics`), plus
//! `GET /healthz` for liveness probes. Counters come straight from the
//! pinned kernel maps, so they are exact even across agent restarts.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use agent_common::{
    Hook, Reason,
    maps::{
        COUNTER_CUT_MARKED, COUNTER_EVENTS_LOST, COUNTER_EVENTS_RATE_LIMITED,
        COUNTER_EVENTS_WANTED, MAP_COUNTERS, MAP_DOMAIN_COUNTERS, counter_index,
        domain_counter_index,
    },
};
use anyhow::{Context as _, Result};
use aya::maps::{Map, MapData, PerCpuArray};

/// Values the agent updates for the metrics endpoint.
#[derive(Default)]
pub struct Gauges {
    pub generation: AtomicU64,
    pub load_micros: AtomicU64,
    pub delivered: Arc<AtomicU64>,
    pub subscriber_drops: AtomicU64,
    /// Established connections the agent destroyed.
    pub cuts_destroyed: Arc<AtomicU64>,
    /// The audit store's (written, dropped) counters, when there is a store.
    store: Mutex<Option<(Arc<AtomicU64>, Arc<AtomicU64>)>>,
    pub domain_names: Mutex<Vec<String>>,
}

impl Gauges {
    pub fn note_policy(&self, domains: &[String], generation: u64, took: Duration) {
        self.generation.store(generation, Ordering::Relaxed);
        self.load_micros
            .store(took.as_micros() as u64, Ordering::Relaxed);
        if let Ok(mut n) = self.domain_names.lock() {
            *n = domains.to_vec();
        }
    }

    pub fn set_store(&self, store: &crate::store::Store) {
        if let Ok(mut s) = self.store.lock() {
            *s = Some((store.written.clone(), store.dropped.clone()));
        }
    }
}

fn sums(path: &Path) -> Vec<u64> {
    let Ok(data) = MapData::from_pin(path) else {
        return Vec::new();
    };
    let Ok(arr) = PerCpuArray::<_, u64>::try_from(Map::PerCpuArray(data)) else {
        return Vec::new();
    };
    arr.iter()
        .map(|v| v.map(|v| v.iter().sum()).unwrap_or(0))
        .collect()
}

pub fn render(maps_dir: &Path, g: &Gauges) -> String {
    let counters = sums(&maps_dir.join(MAP_COUNTERS));
    let domains = sums(&maps_dir.join(MAP_DOMAIN_COUNTERS));
    let at = |v: &[u64], i: u32| v.get(i as usize).copied().unwrap_or(0);
    let verdict = |r: Reason| if r.is_deny() { "deny" } else { "allow" };
    let mut s = String::new();
    s += "# HELP bulkhead_decisions_total Kernel decisions by workload domain, verdict and reason.\n";
    s += "# TYPE bulkhead_decisions_total counter\n";
    let names = g.domain_names.lock().map(|n| n.clone()).unwrap_or_default();
    for (i, name) in names.iter().enumerate() {
        for r in Reason::ALL {
            let n = at(&domains, domain_counter_index(i as u32 + 1, r as u8));
            if n > 0 {
                s += &format!(
                    "bulkhead_decisions_total{{domain=\"{name}\",verdict=\"{}\",reason=\"{}\"}} {n}\n",
                    verdict(r),
                    r.name()
                );
            }
        }
    }
    s += "# HELP bulkhead_hook_decisions_total Kernel decisions by hook, verdict and reason.\n";
    s += "# TYPE bulkhead_hook_decisions_total counter\n";
    for h in Hook::ALL {
        for r in Reason::ALL {
            let n = at(&counters, counter_index(h as u8, r as u8));
            if n > 0 {
                s += &format!(
                    "bulkhead_hook_decisions_total{{hook=\"{}\",verdict=\"{}\",reason=\"{}\"}} {n}\n",
                    h.name(),
                    verdict(r),
                    r.name()
                );
            }
        }
    }
    let counter = |s: &mut String, name: &str, help: &str, v: u64| {
        *s += &format!("# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n");
    };
    counter(
        &mut s,
        "bulkhead_events_wanted_total",
        "Decisions that asked for an event.",
        at(&counters, COUNTER_EVENTS_WANTED),
    );
    counter(
        &mut s,
        "bulkhead_events_emitted_total",
        "Events delivered to the agent.",
        g.delivered.load(Ordering::Relaxed),
    );
    counter(
        &mut s,
        "bulkhead_events_rate_limited_total",
        "Events refused by the per-cgroup rate limit.",
        at(&counters, COUNTER_EVENTS_RATE_LIMITED),
    );
    counter(
        &mut s,
        "bulkhead_events_lost_total",
        "Events lost because the ring buffer was full.",
        at(&counters, COUNTER_EVENTS_LOST),
    );
    counter(
        &mut s,
        "bulkhead_connections_marked_total",
        "Established connections whose packets the policy started to deny.",
        at(&counters, COUNTER_CUT_MARKED),
    );
    counter(
        &mut s,
        "bulkhead_connections_destroyed_total",
        "Of those, connections the agent destroyed (bpf_sock_destroy, its own network namespace).",
        g.cuts_destroyed.load(Ordering::Relaxed),
    );
    counter(
        &mut s,
        "bulkhead_subscriber_drops_total",
        "Events dropped for live subscribers that fell behind.",
        g.subscriber_drops.load(Ordering::Relaxed),
    );
    let (written, dropped) = g
        .store
        .lock()
        .ok()
        .and_then(|s| s.clone())
        .map_or((0, 0), |(w, d)| {
            (w.load(Ordering::Relaxed), d.load(Ordering::Relaxed))
        });
    counter(
        &mut s,
        "bulkhead_store_rows_total",
        "Rows written to the audit store.",
        written,
    );
    counter(
        &mut s,
        "bulkhead_store_dropped_total",
        "Rows the audit store could not keep up with.",
        dropped,
    );
    s += &format!(
        "# HELP bulkhead_policy_generation Policy generation in force.\n# TYPE bulkhead_policy_generation gauge\nbulkhead_policy_generation {}\n",
        g.generation.load(Ordering::Relaxed)
    );
    s += &format!(
        "# HELP bulkhead_policy_load_seconds Time the last policy took to compile and load.\n# TYPE bulkhead_policy_load_seconds gauge\nbulkhead_policy_load_seconds {:.6}\n",
        g.load_micros.load(Ordering::Relaxed) as f64 / 1e6
    );
    s
}

/// Serves until the process exits.
/// Binds before the agent drops its capabilities (a port below 1024 needs
/// CAP_NET_BIND_SERVICE); `serve` answers on it afterwards.
pub fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).with_context(|| format!("binding metrics address {addr}"))
}

pub fn serve(listener: TcpListener, maps_dir: PathBuf, g: Arc<Gauges>) -> Result<()> {
    thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = answer(conn, &maps_dir, &g);
            }
        })?;
    Ok(())
}

fn answer(mut conn: TcpStream, maps_dir: &Path, g: &Gauges) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = match path {
        "/metrics" => ("200 OK", render(maps_dir, g)),
        "/healthz" => ("200 OK", "ok\n".to_string()),
        _ => ("404 Not Found", "not found\n".to_string()),
    };
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}
