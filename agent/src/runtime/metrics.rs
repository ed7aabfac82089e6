//! Prometheus metrics and health on `--metrics-addr`: `GET /metrics`,
//! `GET /healthz` (liveness: the agent's main loop turns), `GET /readyz`
//! (readiness: a policy is in force). Counters come straight from the pinned
//! kernel maps, so they are exact even across agent restarts; the exposition
//! is written by `prometheus-client`, in the Prometheus text format, or in
//! OpenMetrics when the scraper asks for it (`Accept`).
//!
//! HTTP is hyper's, on a tokio runtime, one task per connection, so no
//! client can stall another:
//! - a client that does not send its request headers within
//!   [`HEADER_TIMEOUT`] (idle, or sending them byte by byte) is disconnected,
//!   and so is a connection older than [`MAX_LIFETIME`] (a client that stops
//!   reading its response);
//! - connections are bounded ([`max_connections`]), so a flood of them cannot
//!   use up the agent's file descriptors, which reloads, the control socket
//!   and the events log need too. At the bound, a new connection takes the
//!   place of the one that has been quiet longest (no request begun), as
//!   nginx reuses its idle connections when it runs out: a kubelet probe,
//!   which sends its request at once, is answered however many connections
//!   others hold.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::runtime::health::{Cause, Counts};
use anyhow::{Context as _, Result};
use aya::maps::{Map, MapData, PerCpuArray};
use bulkhead_common::{
    DomainId, Hook, Reason,
    maps::{
        COUNTER_CUT_MARKED, COUNTER_EVENTS_LOST, COUNTER_EVENTS_RATE_LIMITED,
        COUNTER_EVENTS_WANTED, MAP_COUNTERS, MAP_DOMAIN_COUNTERS, counter_index,
        domain_counter_index,
    },
};
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::{Registry, Unit},
};

/// Values the agent updates for the metrics endpoint.
#[derive(Default)]
pub struct Gauges {
    pub generation: AtomicU64,
    pub load_micros: AtomicU64,
    pub delivered: Arc<AtomicU64>,
    pub subscriber_drops: AtomicU64,
    /// Established connections the agent destroyed.
    pub cuts_destroyed: Arc<AtomicU64>,
    /// 1 while `--audit-full=refuse` refuses new connections of domain
    /// workloads (the audit trail cannot be written).
    pub audit_refusing: AtomicU64,
    /// Every output's counters (events log, stdout, audit store, followers).
    outputs: Mutex<Vec<Arc<Counts>>>,
    pub domain_names: Mutex<Vec<String>>,
    /// When the main loop last turned ([`Gauges::beat`]), in milliseconds
    /// of [`monotonic_ms`]; 0 until it first does.
    heartbeat_ms: AtomicU64,
}

/// `/healthz` fails once the main loop has not turned for this long. Long
/// enough for the slowest thing the loop does in one turn (compiling a
/// full country database on a slow machine).
pub const STALLED_AFTER: Duration = Duration::from_secs(60);

impl Gauges {
    pub fn note_policy(&self, domains: &[String], generation: u64, took: Duration) {
        self.generation.store(generation, Ordering::Relaxed);
        self.load_micros
            .store(took.as_micros() as u64, Ordering::Relaxed);
        if let Ok(mut n) = self.domain_names.lock() {
            *n = domains.to_vec();
        }
    }

    pub fn set_outputs(&self, outputs: Vec<Arc<Counts>>) {
        if let Ok(mut o) = self.outputs.lock() {
            *o = outputs;
        }
    }

    /// The main loop is alive: call on every turn. Until the first call,
    /// `/healthz` answers for the process alone.
    pub fn beat(&self) {
        self.heartbeat_ms.store(monotonic_ms(), Ordering::Relaxed);
    }

    /// How long since the main loop last turned (`None`: it never said).
    fn quiet_for(&self) -> Option<Duration> {
        match self.heartbeat_ms.load(Ordering::Relaxed) {
            0 => None,
            last => Some(Duration::from_millis(monotonic_ms().saturating_sub(last))),
        }
    }
}

/// Milliseconds on a monotonic clock, never 0.
fn monotonic_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// A pinned per-CPU array of counters, each summed over the CPUs (empty
/// when it cannot be read).
pub fn sums(path: &Path) -> Vec<u64> {
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

/// Everything `/metrics` shows, read at each scrape.
struct Exposition {
    maps_dir: PathBuf,
    gauges: Arc<Gauges>,
}

impl std::fmt::Debug for Exposition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exposition")
            .field("maps_dir", &self.maps_dir)
            .finish_non_exhaustive()
    }
}

type Labels<'a> = [(&'static str, &'a str); 3];

impl Collector for Exposition {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let g = &self.gauges;
        let counters = sums(&self.maps_dir.join(MAP_COUNTERS));
        let domains = sums(&self.maps_dir.join(MAP_DOMAIN_COUNTERS));
        let at = |v: &[u64], i: u32| v.get(i as usize).copied().unwrap_or(0);
        let verdict = |r: Reason| if r.is_deny() { "deny" } else { "allow" };

        // Families: one sample per label set that counted something.
        let family = |enc: &mut DescriptorEncoder,
                      name: &str,
                      help: &str,
                      samples: Vec<(Labels, u64)>|
         -> std::fmt::Result {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (labels, n) in &samples {
                ConstCounter::new(*n).encode(m.encode_family(labels)?)?;
            }
            Ok(())
        };
        let names = g.domain_names.lock().map(|n| n.clone()).unwrap_or_default();
        let mut samples: Vec<(Labels, u64)> = Vec::new();
        for (i, name) in names.iter().enumerate() {
            for r in Reason::ALL {
                let n = at(
                    &domains,
                    domain_counter_index(DomainId::from_index(i).raw(), r as u8),
                );
                if n > 0 {
                    samples.push((
                        [
                            ("domain", name),
                            ("verdict", verdict(r)),
                            ("reason", r.name()),
                        ],
                        n,
                    ));
                }
            }
        }
        family(
            &mut enc,
            "bulkhead_decisions",
            "Kernel decisions by workload domain, verdict and reason.",
            samples,
        )?;
        let mut samples: Vec<(Labels, u64)> = Vec::new();
        for h in Hook::ALL {
            for r in Reason::ALL {
                let n = at(&counters, counter_index(h as u8, r as u8));
                if n > 0 {
                    samples.push((
                        [
                            ("hook", h.name()),
                            ("verdict", verdict(r)),
                            ("reason", r.name()),
                        ],
                        n,
                    ));
                }
            }
        }
        family(
            &mut enc,
            "bulkhead_hook_decisions",
            "Kernel decisions by hook, verdict and reason.",
            samples,
        )?;

        let outputs = g.outputs.lock().map(|o| o.clone()).unwrap_or_default();
        let (written, dropped) = outputs
            .iter()
            .find(|c| c.name == "audit-store")
            .map_or((0, 0), |c| {
                (c.written.load(Ordering::Relaxed), c.dropped_total())
            });
        {
            let mut m = enc.encode_descriptor(
                "bulkhead_output_written",
                "Events each output wrote (followers: to a subscriber's socket).",
                None,
                MetricType::Counter,
            )?;
            for c in &outputs {
                ConstCounter::new(c.written.load(Ordering::Relaxed))
                    .encode(m.encode_family(&[("output", c.name)])?)?;
            }
            let mut m = enc.encode_descriptor(
                "bulkhead_output_pending",
                "Events each output holds, queued or for a retry, not written yet.",
                None,
                MetricType::Gauge,
            )?;
            for c in &outputs {
                ConstGauge::new(c.pending.load(Ordering::Relaxed) as i64)
                    .encode(m.encode_family(&[("output", c.name)])?)?;
            }
            let mut m = enc.encode_descriptor(
                "bulkhead_output_dropped",
                "Events each output dropped, by cause (disk_full, io_error, locked, queue_full).",
                None,
                MetricType::Counter,
            )?;
            for c in &outputs {
                for cause in Cause::ALL {
                    ConstCounter::new(c.dropped(cause))
                        .encode(m.encode_family(&[("output", c.name), ("cause", cause.name())])?)?;
                }
            }
        }
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        for (name, help, v) in [
            (
                "bulkhead_events_wanted",
                "Decisions that asked for an event.",
                at(&counters, COUNTER_EVENTS_WANTED),
            ),
            (
                "bulkhead_events_emitted",
                "Events the agent received and handed to its outputs (see bulkhead_output_*).",
                load(&g.delivered),
            ),
            (
                "bulkhead_events_rate_limited",
                "Events refused by the per-cgroup rate limit.",
                at(&counters, COUNTER_EVENTS_RATE_LIMITED),
            ),
            (
                "bulkhead_events_lost",
                "Events lost because the ring buffer was full.",
                at(&counters, COUNTER_EVENTS_LOST),
            ),
            (
                "bulkhead_connections_marked",
                "Established connections whose packets the policy started to deny.",
                at(&counters, COUNTER_CUT_MARKED),
            ),
            (
                "bulkhead_dns_answers_learned",
                "DNS answers the kernel learned addresses of names from.",
                at(&counters, bulkhead_common::maps::COUNTER_DNS_ANSWERS),
            ),
            (
                "bulkhead_dns_addresses_learned",
                "Addresses written to the learned-names map from DNS answers.",
                at(&counters, bulkhead_common::maps::COUNTER_DNS_LEARNED),
            ),
            (
                "bulkhead_dns_answers_spoofed",
                "DNS answers that taught nothing: no query asked for them, or the receiving domain sent them.",
                at(&counters, bulkhead_common::maps::COUNTER_DNS_SPOOFED),
            ),
            (
                "bulkhead_dns_addresses_new",
                "Learned addresses that were new to the map; minus those it holds, the evicted.",
                at(&counters, bulkhead_common::maps::COUNTER_DNS_NEW),
            ),
            (
                "bulkhead_dns_answers_unread",
                "DNS answers to a query that could not be read (nothing learned).",
                at(&counters, bulkhead_common::maps::COUNTER_DNS_UNREAD),
            ),
            (
                "bulkhead_connections_destroyed",
                "Of those, connections the agent destroyed (bpf_sock_destroy, its own network namespace).",
                load(&g.cuts_destroyed),
            ),
            (
                "bulkhead_subscriber_drops",
                "Events dropped for live subscribers that fell behind.",
                load(&g.subscriber_drops),
            ),
            (
                "bulkhead_store_rows",
                "Event rows written to the audit store.",
                written,
            ),
            (
                "bulkhead_store_dropped",
                "Event rows the audit store dropped (any cause; see bulkhead_output_dropped).",
                dropped,
            ),
        ] {
            let c = ConstCounter::new(v);
            c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)?;
        }

        let generation = ConstGauge::new(load(&g.generation) as i64);
        generation.encode(enc.encode_descriptor(
            "bulkhead_policy_generation",
            "Policy generation in force.",
            None,
            generation.metric_type(),
        )?)?;
        let refusing = ConstGauge::new(load(&g.audit_refusing) as i64);
        refusing.encode(enc.encode_descriptor(
            "bulkhead_audit_refusing",
            "1 while --audit-full=refuse refuses new connections of domain workloads because the \
             audit trail cannot be written (reason audit-unavailable), else 0.",
            None,
            refusing.metric_type(),
        )?)?;
        let took = ConstGauge::new(load(&g.load_micros) as f64 / 1e6);
        took.encode(enc.encode_descriptor(
            "bulkhead_policy_load",
            "Time the last policy took to compile and load.",
            Some(&Unit::Seconds),
            took.metric_type(),
        )?)?;
        Ok(())
    }
}

/// The text exposition formats `/metrics` speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4 (the default).
    Prometheus,
    /// OpenMetrics 1.0 text, for scrapers that ask for it.
    OpenMetrics,
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

impl Format {
    fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => OPENMETRICS,
        }
    }
}

fn registry(maps_dir: PathBuf, gauges: Arc<Gauges>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(Exposition { maps_dir, gauges }));
    r
}

fn encode(registry: &Registry, format: Format) -> String {
    use prometheus_client::encoding::{prometheus_text, text};
    let mut s = String::new();
    let done = match format {
        Format::Prometheus => prometheus_text::encode(&mut s, registry),
        Format::OpenMetrics => text::encode(&mut s, registry),
    };
    // Writing into a String fails only if a collector does; ours never does.
    debug_assert!(done.is_ok());
    s
}

/// The Prometheus text exposition, as `GET /metrics` serves it.
pub fn render(maps_dir: &Path, g: &Arc<Gauges>, format: Format) -> String {
    encode(&registry(maps_dir.to_path_buf(), g.clone()), format)
}

/// A client has this long to send its request headers, from the moment
/// the connection opens or its previous response is written.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection is closed after this long, whatever it is doing (a client
/// that stops reading its response holds it at most this long).
pub const MAX_LIFETIME: Duration = Duration::from_secs(60);

/// How many connections are served at once: a quarter of the file
/// descriptors the agent may open (`RLIMIT_NOFILE`), between 64 and 4096.
/// Under systemd's default soft limit (1024) that is 256.
fn max_connections() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit into a struct of the right type.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        1024
    };
    (soft / 4).clamp(64, 4096) as usize
}

/// Connections the kernel queues for the metrics port until they are
/// accepted (at most `net.core.somaxconn`). std's 128 overflows under a
/// burst of connections, and a connection whose SYN is dropped waits a
/// second for its retransmission, so a probe would too.
const BACKLOG: i32 = 4096;

/// Binds before the agent drops its capabilities (a port below 1024 needs
/// CAP_NET_BIND_SERVICE); `serve` answers on it afterwards.
pub fn bind(addr: SocketAddr) -> Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let bound = (|| {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        // As std does: a restarted agent can bind while connections of the
        // previous one are in TIME_WAIT.
        s.set_reuse_address(true)?;
        s.bind(&addr.into())?;
        s.listen(BACKLOG)?;
        Ok::<_, std::io::Error>(TcpListener::from(s))
    })();
    bound.with_context(|| format!("binding metrics address {addr}"))
}

/// What a connection's task and the accept loop share.
struct Shared {
    registry: Registry,
    gauges: Arc<Gauges>,
    /// Live connections: id → (when it last began a request or opened,
    /// in [`monotonic_ms`]; its task).
    conns: Mutex<Conns>,
}

/// Removes a connection from [`Shared::conns`] when its task ends, however
/// it ends (done, failed, timed out, or aborted to make room).
struct Registered(Arc<Shared>, u64);

impl Drop for Registered {
    fn drop(&mut self) {
        let mut conns = self.0.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.remove(&self.1);
    }
}

/// Accepts and answers connections until the process exits.
pub async fn run(listener: tokio::net::TcpListener, maps_dir: PathBuf, gauges: Arc<Gauges>) {
    let shared = Arc::new(Shared {
        registry: registry(maps_dir, gauges.clone()),
        gauges,
        conns: Mutex::new(HashMap::new()),
    });
    let max = max_connections();
    let mut next_id = 0u64;
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors or memory (EMFILE, ENFILE,
                // ENOBUFS): the connection waits in the backlog; try again
                // shortly instead of spinning.
                if !matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset
                ) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        next_id += 1;
        let id = next_id;
        let active = Arc::new(AtomicU64::new(monotonic_ms()));
        // Spawned under the lock, so the task cannot remove its entry
        // before it is there (on a multi-thread runtime it may end at once).
        let mut conns = shared.conns.lock().unwrap_or_else(|e| e.into_inner());
        make_room(&mut conns, max);
        let task = tokio::spawn(connection(
            stream,
            Registered(shared.clone(), id),
            active.clone(),
        ));
        conns.insert(id, (active, task.abort_handle()));
    }
}

type Conns = HashMap<u64, (Arc<AtomicU64>, tokio::task::AbortHandle)>;

/// At the bound, closes the connection that has been quiet longest.
fn make_room(conns: &mut Conns, max: usize) {
    while conns.len() >= max {
        let Some(oldest) = conns
            .iter()
            .min_by_key(|(_, (active, _))| active.load(Ordering::Relaxed))
            .map(|(id, _)| *id)
        else {
            return;
        };
        if let Some((_, task)) = conns.remove(&oldest) {
            task.abort();
        }
    }
}

async fn connection(stream: tokio::net::TcpStream, registered: Registered, active: Arc<AtomicU64>) {
    let shared = registered.0.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        active.store(monotonic_ms(), Ordering::Relaxed);
        let response = answer(&shared, &req);
        async move { Ok::<_, Infallible>(response) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    if tokio::time::timeout(MAX_LIFETIME, conn.as_mut())
        .await
        .is_err()
    {
        // Finish a response under way, briefly; then close regardless.
        conn.as_mut().graceful_shutdown();
        let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
    }
    drop(registered);
}

fn answer(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let g = &shared.gauges;
    match req.uri().path() {
        "/metrics" => {
            let format = Format::from_accept(
                req.headers()
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok()),
            );
            let mut r = text(StatusCode::OK, encode(&shared.registry, format));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(format.content_type()),
            );
            r
        }
        "/healthz" => match g.quiet_for() {
            Some(q) if q > STALLED_AFTER => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the main loop has not turned for {} s\n", q.as_secs()),
            ),
            _ => text(StatusCode::OK, "ok\n".into()),
        },
        "/readyz" => match g.generation.load(Ordering::Relaxed) {
            0 => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "no policy in force\n".into(),
            ),
            n => text(StatusCode::OK, format!("ready: generation {n}\n")),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: /metrics, /healthz, /readyz\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauges() -> Arc<Gauges> {
        let g = Arc::new(Gauges::default());
        g.note_policy(
            &["contractor".into(), "prod".into()],
            3,
            Duration::from_micros(12_345),
        );
        g.delivered.store(5, Ordering::Relaxed);
        g.audit_refusing.store(1, Ordering::Relaxed);
        let log = Counts::new("events-log");
        for _ in 0..2 {
            log.hand();
        }
        log.wrote(1);
        let seq = log.hand();
        log.drop_event("2026-12-05T00:00:00Z", Cause::DiskFull, seq);
        g.set_outputs(vec![log, Counts::new("audit-store")]);
        g
    }

    /// The names dashboards and tests use, in both formats.
    #[test]
    fn the_exposition_keeps_every_metric_name() {
        let dir = crate::testdir::tempdir().unwrap();
        let g = gauges();
        let text = render(dir.path(), &g, Format::Prometheus);
        for line in [
            "# HELP bulkhead_decisions_total Kernel decisions by workload domain, verdict and reason.",
            "# TYPE bulkhead_decisions_total counter",
            "# TYPE bulkhead_hook_decisions_total counter",
            "bulkhead_events_wanted_total 0",
            "bulkhead_events_emitted_total 5",
            "bulkhead_events_rate_limited_total 0",
            "bulkhead_events_lost_total 0",
            "bulkhead_connections_marked_total 0",
            "bulkhead_connections_destroyed_total 0",
            "bulkhead_subscriber_drops_total 0",
            "bulkhead_store_rows_total 0",
            "bulkhead_store_dropped_total 0",
            "# TYPE bulkhead_output_written_total counter",
            "bulkhead_output_written_total{output=\"events-log\"} 1",
            "bulkhead_output_written_total{output=\"audit-store\"} 0",
            "# TYPE bulkhead_output_pending gauge",
            "bulkhead_output_pending{output=\"events-log\"} 1",
            "bulkhead_output_dropped_total{output=\"events-log\",cause=\"disk_full\"} 1",
            "bulkhead_output_dropped_total{output=\"events-log\",cause=\"locked\"} 0",
            "bulkhead_output_dropped_total{output=\"audit-store\",cause=\"queue_full\"} 0",
            "# TYPE bulkhead_audit_refusing gauge",
            "bulkhead_audit_refusing 1",
            "# TYPE bulkhead_policy_generation gauge",
            "bulkhead_policy_generation 3",
            "bulkhead_policy_load_seconds 0.012345",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        }
        let om = render(dir.path(), &g, Format::OpenMetrics);
        assert!(om.contains("\nbulkhead_events_emitted_total 5\n"), "{om}");
        assert!(
            om.contains("# UNIT bulkhead_policy_load_seconds seconds"),
            "{om}"
        );
        assert!(om.ends_with("# EOF\n"), "{om}");
    }

    /// deploy/otel's Grafana dashboard queries only metrics the agent
    /// exports (a renamed metric would leave a panel empty, silently).
    #[test]
    fn the_shipped_dashboard_names_only_exported_metrics() {
        let dir = crate::testdir::tempdir().unwrap();
        let text = render(dir.path(), &gauges(), Format::Prometheus);
        let exported: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../../../deploy/otel/grafana-dashboard.json"))
                .expect("the dashboard is JSON");
        let mut queried = 0;
        for panel in dashboard["panels"].as_array().unwrap() {
            if panel["datasource"]["type"] != "prometheus" {
                continue;
            }
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"].as_str().unwrap();
                let names = expr
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .filter(|w| w.starts_with("bulkhead_"));
                for name in names {
                    queried += 1;
                    assert!(
                        exported.contains(&name),
                        "panel {}: {name} is not exported (exported: {exported:?})",
                        panel["title"]
                    );
                }
            }
        }
        assert!(queried >= 10, "{queried}");
    }

    #[test]
    fn the_scraper_chooses_the_format() {
        assert_eq!(Format::from_accept(None), Format::Prometheus);
        assert_eq!(Format::from_accept(Some("*/*")), Format::Prometheus);
        // What Prometheus sends.
        let p = "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3,*/*;q=0.1";
        assert_eq!(Format::from_accept(Some(p)), Format::OpenMetrics);
    }

    #[test]
    fn health_follows_the_heartbeat() {
        let g = Gauges::default();
        assert_eq!(g.quiet_for(), None);
        g.beat();
        assert!(g.quiet_for().unwrap() < Duration::from_secs(1));
        g.heartbeat_ms.store(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(5));
        assert!(g.quiet_for().unwrap() >= Duration::from_millis(4));
    }
}
