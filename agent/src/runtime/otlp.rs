//! The OpenTelemetry output: every event as an OTLP log record, sent to a
//! collector (gRPC or HTTP/protobuf, plain or TLS) by a thread of its own.
//!
//! It follows the same model as the other outputs ([`super::sink`]): the
//! events task only `try_send`s to its bounded queue; the exporter holds
//! what it could not send (up to `--otlp-hold` events) and retries with
//! backoff; beyond that it drops, counts, and sends a gap record (a log
//! record whose `type` attribute is `gap`) once the collector takes
//! records again. A collector that refuses a batch as malformed (HTTP 400,
//! gRPC `INVALID_ARGUMENT`) has it dropped and counted, not retried
//! forever. For this output `written + pending + dropped` = handed, too.

use std::{
    collections::VecDeque,
    path::PathBuf,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use opentelemetry_proto::tonic::{
    collector::logs::v1::{
        ExportLogsServiceRequest, ExportLogsServiceResponse, logs_service_client::LogsServiceClient,
    },
    common::v1::{AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList, any_value},
    logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber},
    resource::v1::Resource,
};
use prost::Message as _;
use tokio::sync::mpsc::{self, error::TrySendError};

use super::{
    events::Record,
    health::{Cause, Counts, Health},
};

/// Records in one export request (about 1.5 MB: under the 4 MiB a gRPC
/// collector takes by default).
const BATCH: usize = 2048;
/// A partial batch waits at most this long.
const LINGER: Duration = Duration::from_millis(200);
/// One export may take this long before it counts as failed.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Events queued for the exporter before the events task drops them.
const QUEUE: usize = 16_384;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    // OTLP/gRPC (the collector's port 4317).
    Grpc,
    // OTLP/HTTP with protobuf bodies (port 4318, path `/v1/logs`).
    #[value(name = "http/protobuf")]
    HttpProtobuf,
}

#[derive(Clone, Debug)]
pub struct Config {
    /// `http://` or `https://`; for HTTP/protobuf, a URL without a path
    /// gets `/v1/logs`.
    pub endpoint: String,
    pub protocol: Protocol,
    /// Sent with every export (`authorization=Bearer ...`).
    pub headers: Vec<(String, String)>,
    /// PEM certificates trusted besides the system's roots (`https://`).
    pub ca: Option<PathBuf>,
    /// Events held while the collector is unreachable, before drops.
    pub hold: usize,
    /// `host.name`, and `k8s.node.name` when running as a DaemonSet.
    pub host: String,
    pub k8s_node: Option<String>,
}

impl Config {
    /// Checks what can be checked before the agent starts: the URL's
    /// scheme, the headers' syntax, the CA file.
    pub fn check(&self) -> Result<()> {
        let url: http::Uri = self
            .endpoint
            .parse()
            .with_context(|| format!("--otlp-endpoint {}: not a URL", self.endpoint))?;
        match url.scheme_str() {
            Some("http") | Some("https") => {}
            _ => bail!(
                "--otlp-endpoint {}: the URL must begin with http:// or https://",
                self.endpoint
            ),
        }
        if url.host().is_none() {
            bail!("--otlp-endpoint {}: the URL names no host", self.endpoint);
        }
        for (k, v) in &self.headers {
            http::HeaderName::from_bytes(k.as_bytes())
                .with_context(|| format!("--otlp-header {k}: not a header name"))?;
            http::HeaderValue::from_str(v)
                .with_context(|| format!("--otlp-header {k}: not a header value"))?;
        }
        if let Some(ca) = &self.ca {
            read_pem(ca)?;
        }
        if self.hold == 0 {
            bail!("--otlp-hold must be at least 1");
        }
        Ok(())
    }

    /// The URL the HTTP exporter posts to.
    fn http_url(&self) -> String {
        let after_scheme = self.endpoint.split_once("://").map_or("", |(_, r)| r);
        if after_scheme.trim_end_matches('/').contains('/') {
            self.endpoint.clone()
        } else {
            format!("{}/v1/logs", self.endpoint.trim_end_matches('/'))
        }
    }
}

/// A `key=value` of `--otlp-header`.
pub fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("{s:?}: expected KEY=VALUE")),
    }
}

fn read_pem(path: &std::path::Path) -> Result<Vec<u8>> {
    let pem =
        std::fs::read(path).with_context(|| format!("--otlp-ca {}: reading", path.display()))?;
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
        bail!("--otlp-ca {}: no PEM certificate in it", path.display());
    }
    Ok(pem)
}

/// One event for the exporter, numbered by [`Counts::hand`].
struct Item {
    rec: Record,
    seq: u64,
}

/// The events task's handle on the exporter.
#[derive(Clone)]
pub struct Otlp {
    tx: mpsc::Sender<Item>,
    pub counts: Arc<Counts>,
    done: Arc<Mutex<Option<thread::JoinHandle<()>>>>,
}

impl Otlp {
    /// Starts the exporter thread; it connects lazily, so a collector that
    /// is down at start only delays the first export.
    pub fn start(config: Config) -> Result<Otlp> {
        config.check()?;
        let counts = Counts::new("otlp");
        let (tx, rx) = mpsc::channel(QUEUE);
        let exporter = Exporter::new(&config, counts.clone())?;
        let done = thread::Builder::new()
            .name("otlp".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                match rt {
                    Ok(rt) => rt.block_on(exporter.run(rx)),
                    Err(e) => tracing::warn!("otlp: no runtime for the exporter: {e}"),
                }
            })
            .context("starting the otlp exporter thread")?;
        tracing::info!(
            "exporting events to {} over OTLP/{}",
            config.endpoint,
            match config.protocol {
                Protocol::Grpc => "gRPC",
                Protocol::HttpProtobuf => "HTTP (protobuf)",
            }
        );
        Ok(Otlp {
            tx,
            counts,
            done: Arc::new(Mutex::new(Some(done))),
        })
    }

    /// Queues one event; never waits.
    pub fn send(&self, rec: &Record) {
        let seq = self.counts.hand();
        match self.tx.try_send(Item {
            rec: rec.clone(),
            seq,
        }) {
            Ok(()) => {}
            Err(TrySendError::Full(i)) | Err(TrySendError::Closed(i)) => {
                self.counts
                    .drop_event(&i.rec.ts, self.counts.drop_cause(), i.seq)
            }
        }
    }

    /// Waits (at most `within`) for the exporter to send what it holds
    /// once every handle is dropped; what it could not send stays counted
    /// as pending.
    pub fn finish(self, within: Duration) {
        let done = self.done.clone();
        drop(self);
        super::sink::join_within(&done, within);
    }
}

/// A record held for export: an event (with its hand-over number), or a
/// gap record. Held as the event itself (about 1.5 KB of memory,
/// measured), made a log record (several times that) only when its batch
/// is sent.
// Nearly every held record is an event; boxing it would cost an
// allocation each, to save space only beside the rare gap record.
#[allow(clippy::large_enum_variant)]
enum Held {
    Event(Item),
    Gap(serde_json::Value),
}

impl Held {
    fn record(&self) -> LogRecord {
        match self {
            Held::Event(item) => log_record(&item.rec),
            Held::Gap(value) => record_of(value, SeverityNumber::Warn, "gap"),
        }
    }

    fn event(&self) -> Option<&Item> {
        match self {
            Held::Event(item) => Some(item),
            Held::Gap(_) => None,
        }
    }
}

/// Why an export failed, and whether trying the same batch again can help.
struct Failed {
    error: anyhow::Error,
    retry: bool,
}

/// How batches reach the collector. Cheap to clone (the connection pools
/// are shared), so each export owns one and the exporter's hold stays free
/// for the hand-over queue while a batch is in flight.
#[derive(Clone)]
enum Transport {
    Grpc(LogsServiceClient<tonic::transport::Channel>),
    Http {
        client: hyper_util::client::legacy::Client<
            hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
            http_body_util::Full<bytes::Bytes>,
        >,
        url: http::Uri,
    },
}

#[derive(Clone)]
struct Sender {
    transport: Transport,
    headers: Arc<Vec<(String, String)>>,
}

struct Exporter {
    sender: Sender,
    resource: Resource,
    counts: Arc<Counts>,
    health: Health,
    held: VecDeque<Held>,
    /// When the oldest record held was taken (a partial batch waits
    /// [`LINGER`] after it).
    since: Option<Instant>,
    hold: usize,
}

impl Exporter {
    fn new(config: &Config, counts: Arc<Counts>) -> Result<Exporter> {
        let ca = config.ca.as_deref().map(read_pem).transpose()?;
        let transport = match config.protocol {
            Protocol::Grpc => {
                let mut endpoint = tonic::transport::Endpoint::from_shared(config.endpoint.clone())
                    .with_context(|| format!("--otlp-endpoint {}", config.endpoint))?
                    .connect_timeout(Duration::from_secs(5))
                    .timeout(EXPORT_TIMEOUT);
                if config.endpoint.starts_with("https://") {
                    let mut tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
                    if let Some(pem) = &ca {
                        tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
                    }
                    endpoint = endpoint
                        .tls_config(tls)
                        .context("the OTLP endpoint's TLS settings")?;
                }
                Transport::Grpc(LogsServiceClient::new(endpoint.connect_lazy()))
            }
            Protocol::HttpProtobuf => {
                let tls = tls_config(ca.as_deref())?;
                let https = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(tls)
                    .https_or_http()
                    .enable_http1()
                    .build();
                let client = hyper_util::client::legacy::Client::builder(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .build(https);
                let url = config.http_url();
                Transport::Http {
                    client,
                    url: url
                        .parse()
                        .with_context(|| format!("--otlp-endpoint {url}"))?,
                }
            }
        };
        let mut resource = vec![
            kv("service.name", text("bulkhead")),
            kv("service.version", text(env!("CARGO_PKG_VERSION"))),
            kv("host.name", text(&config.host)),
        ];
        if let Some(node) = &config.k8s_node {
            resource.push(kv("k8s.node.name", text(node)));
        }
        Ok(Exporter {
            sender: Sender {
                transport,
                headers: Arc::new(config.headers.clone()),
            },
            resource: Resource {
                attributes: resource,
                ..Default::default()
            },
            health: Health::new(counts.clone(), "--otlp-hold events"),
            counts,
            held: VecDeque::new(),
            since: None,
            hold: config.hold,
        })
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Item>) {
        let mut open = true;
        loop {
            // Drops since the last gap record (a full queue, a full hold):
            // announced once the collector takes records again.
            if self.health.cause().is_none() && self.counts.has_gap() && rx.is_empty() {
                self.push_gap();
            }
            // Wait for an event, a due retry, or a partial batch's linger.
            let wake = match self.since {
                None => None,
                Some(_) if self.health.cause().is_some() => self.health.retry_at,
                // A full batch goes at once (after a burst the hold has
                // many).
                Some(_) if self.held.len() >= BATCH => Some(Instant::now()),
                Some(t) => Some(t + LINGER),
            };
            if open {
                let next = match wake {
                    Some(at) => {
                        let at = tokio::time::Instant::from_std(at);
                        tokio::time::timeout_at(at, rx.recv()).await.ok()
                    }
                    None => Some(rx.recv().await),
                };
                match next {
                    // The queue is only the hand-over: everything in it
                    // moves to the hold (or is counted), so a burst waits
                    // there, not in a queue that fills during an export.
                    // (At most a queue's worth a turn, so a storm that
                    // outruns the drain cannot starve the exports.)
                    Some(Some(item)) => {
                        self.accept(item);
                        for _ in 1..QUEUE {
                            let Ok(item) = rx.try_recv() else { break };
                            self.accept(item);
                        }
                    }
                    Some(None) => open = false,
                    None => {}
                }
            }
            let ready = self.held.len() >= BATCH
                || self.since.is_some_and(|t| t.elapsed() >= LINGER)
                || self.health.cause().is_some()
                || !open;
            if ready && !self.held.is_empty() && self.health.due() {
                let n = self.held.len().min(BATCH);
                let sent = self.sender.clone().send(self.request(n));
                tokio::pin!(sent);
                // While the batch is in flight the hand-over queue keeps
                // moving to the hold: a burst during a slow export waits
                // there (up to --otlp-hold), not in the queue, which
                // would overflow.
                let result = loop {
                    tokio::select! {
                        result = &mut sent => break result,
                        item = rx.recv(), if open => match item {
                            Some(item) => self.accept(item),
                            None => open = false,
                        },
                    }
                };
                self.exported(n, result);
                self.since = (!self.held.is_empty()).then(Instant::now);
            }
            self.health.tick();
            if !open {
                // Stopping: sends what it holds until `finish` gives up.
                if self.held.is_empty() {
                    return;
                }
                if let Some(at) = self.health.retry_at {
                    tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
                }
            }
        }
    }

    /// Holds a record; the batch's linger starts with the first.
    fn hold(&mut self, held: Held) {
        self.since.get_or_insert_with(Instant::now);
        self.held.push_back(held);
    }

    /// Holds an event's record, or drops it (counted) when the hold is full.
    fn accept(&mut self, item: Item) {
        if self.held.len() >= self.hold {
            self.counts
                .drop_event(&item.rec.ts, self.counts.drop_cause(), item.seq);
            return;
        }
        if self.counts.has_gap_before(item.seq) {
            self.push_gap();
        }
        self.hold(Held::Event(item));
    }

    fn push_gap(&mut self) {
        if let Some(g) = self.counts.take_gap() {
            self.hold(Held::Gap(g.record(self.counts.name)));
        }
    }

    /// The request for the first `n` records held.
    fn request(&self, n: usize) -> ExportLogsServiceRequest {
        ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                resource: Some(self.resource.clone()),
                scope_logs: vec![ScopeLogs {
                    scope: Some(InstrumentationScope {
                        name: "bulkhead.audit".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    log_records: self.held.iter().take(n).map(Held::record).collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    /// Settles the first `n` records held, sent with `result`: written,
    /// dropped (counted) or kept for the retry.
    fn exported(&mut self, n: usize, result: Result<u64, Failed>) {
        match result {
            Ok(rejected) => {
                let batch: Vec<Held> = self.held.drain(..n).collect();
                let events = batch.iter().filter_map(Held::event).count() as u64;
                let rejected = rejected.min(events);
                if rejected > 0 {
                    tracing::warn!(
                        "otlp: the collector rejected {rejected} of {events} records (partial success); counted as dropped"
                    );
                    for item in batch
                        .iter()
                        .rev()
                        .filter_map(Held::event)
                        .take(rejected as usize)
                    {
                        self.counts
                            .drop_event(&item.rec.ts, Cause::IoError, item.seq);
                    }
                }
                self.counts.wrote(events - rejected);
                self.health.ok();
            }
            Err(Failed { error, retry: true }) => {
                self.health
                    .failed(Cause::IoError, &format!("{error:#}"), self.held.len());
            }
            Err(Failed {
                error,
                retry: false,
            }) => {
                tracing::warn!(
                    "otlp: the collector refused a batch of {n} records ({error:#}); they are dropped, not retried"
                );
                for h in self.held.drain(..n) {
                    if let Some(item) = h.event() {
                        self.counts
                            .drop_event(&item.rec.ts, Cause::IoError, item.seq);
                    }
                }
            }
        }
    }
}

impl Sender {
    /// One export; `Ok` carries the records the collector rejected.
    async fn send(self, request: ExportLogsServiceRequest) -> Result<u64, Failed> {
        match self.transport {
            Transport::Grpc(mut client) => {
                let mut req = tonic::Request::new(request);
                for (k, v) in self.headers.iter() {
                    let key = tonic::metadata::MetadataKey::from_bytes(k.to_lowercase().as_bytes());
                    if let (Ok(key), Ok(value)) = (key, v.parse()) {
                        req.metadata_mut().insert(key, value);
                    }
                }
                match client.export(req).await {
                    Ok(resp) => Ok(rejected(&resp.into_inner())),
                    Err(status) => Err(Failed {
                        retry: !matches!(
                            status.code(),
                            tonic::Code::InvalidArgument | tonic::Code::OutOfRange
                        ),
                        error: anyhow!("gRPC {:?}: {}", status.code(), status.message()),
                    }),
                }
            }
            Transport::Http { client, url } => {
                let mut req = http::Request::post(url.clone())
                    .header(http::header::CONTENT_TYPE, "application/x-protobuf");
                for (k, v) in self.headers.iter() {
                    req = req.header(k.as_str(), v.as_str());
                }
                let body = http_body_util::Full::new(bytes::Bytes::from(request.encode_to_vec()));
                let req = req.body(body).map_err(|e| Failed {
                    error: anyhow!("building the request: {e}"),
                    retry: false,
                })?;
                let sent = tokio::time::timeout(EXPORT_TIMEOUT, client.request(req)).await;
                let resp = match sent {
                    Err(_) => {
                        return Err(Failed {
                            error: anyhow!("no answer within {EXPORT_TIMEOUT:?}"),
                            retry: true,
                        });
                    }
                    Ok(Err(e)) => {
                        return Err(Failed {
                            error: anyhow!("{url}: {e:#}"),
                            retry: true,
                        });
                    }
                    Ok(Ok(r)) => r,
                };
                let status = resp.status();
                use http_body_util::BodyExt as _;
                let body = tokio::time::timeout(EXPORT_TIMEOUT, resp.into_body().collect())
                    .await
                    .ok()
                    .and_then(|b| b.ok())
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                if status.is_success() {
                    let resp = ExportLogsServiceResponse::decode(body).unwrap_or_default();
                    return Ok(rejected(&resp));
                }
                Err(Failed {
                    error: anyhow!(
                        "{url}: HTTP {status}: {}",
                        String::from_utf8_lossy(&body[..body.len().min(200)])
                    ),
                    // The OTLP/HTTP specification's retryable codes, and
                    // those an operator fixes without the batch changing
                    // (authentication, a missing route).
                    retry: !matches!(status.as_u16(), 400 | 413 | 415),
                })
            }
        }
    }
}

fn rejected(resp: &ExportLogsServiceResponse) -> u64 {
    resp.partial_success
        .as_ref()
        .map_or(0, |p| p.rejected_log_records.max(0) as u64)
}

/// The rustls settings for HTTPS: the system's roots plus `--otlp-ca`.
fn tls_config(ca: Option<&[u8]>) -> Result<rustls::ClientConfig> {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(pem) = ca {
        for cert in CertificateDer::pem_slice_iter(pem) {
            roots
                .add(cert.context("--otlp-ca: a certificate that cannot be read")?)
                .context("--otlp-ca: a certificate rustls does not accept")?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// An event as a log record: the JSON fields as attributes (nulls left
/// out), the JSON line as the body, deny and cut as `WARN`.
fn log_record(rec: &Record) -> LogRecord {
    let value = serde_json::to_value(rec).unwrap_or_default();
    let severity = match rec.verdict.as_str() {
        "allow" => SeverityNumber::Info,
        _ => SeverityNumber::Warn,
    };
    record_of(&value, severity, "bulkhead.decision")
}

fn record_of(value: &serde_json::Value, severity: SeverityNumber, event: &str) -> LogRecord {
    let time = value["ts"]
        .as_str()
        .and_then(crate::clock::parse_ts)
        .map_or(0, |t| t.max(0) as u64);
    let observed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let attributes = match value {
        serde_json::Value::Object(m) => m
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| kv(k, any(v)))
            .collect(),
        _ => Vec::new(),
    };
    LogRecord {
        time_unix_nano: time,
        observed_time_unix_nano: observed,
        severity_number: severity as i32,
        severity_text: match severity {
            SeverityNumber::Info => "INFO",
            _ => "WARN",
        }
        .into(),
        body: Some(text(&value.to_string())),
        attributes,
        event_name: event.into(),
        ..Default::default()
    }
}

fn kv(key: &str, value: AnyValue) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(value),
        ..Default::default()
    }
}

fn text(s: &str) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::StringValue(s.into())),
    }
}

/// A JSON value as an OTLP value, keeping its type.
fn any(v: &serde_json::Value) -> AnyValue {
    use serde_json::Value as J;
    let value = match v {
        J::Null => None,
        J::Bool(b) => Some(any_value::Value::BoolValue(*b)),
        J::Number(n) => Some(match n.as_i64() {
            Some(i) => any_value::Value::IntValue(i),
            None => any_value::Value::DoubleValue(n.as_f64().unwrap_or_default()),
        }),
        J::String(s) => Some(any_value::Value::StringValue(s.clone())),
        J::Array(a) => Some(any_value::Value::ArrayValue(ArrayValue {
            values: a.iter().map(any).collect(),
        })),
        J::Object(m) => Some(any_value::Value::KvlistValue(KeyValueList {
            values: m.iter().map(|(k, v)| kv(k, any(v))).collect(),
        })),
    };
    AnyValue { value }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(endpoint: &str) -> Config {
        Config {
            endpoint: endpoint.into(),
            protocol: Protocol::HttpProtobuf,
            headers: vec![],
            ca: None,
            hold: 10,
            host: "h".into(),
            k8s_node: None,
        }
    }

    #[test]
    fn http_endpoint_without_a_path_gets_v1_logs() {
        assert_eq!(
            config("http://127.0.0.1:4318").http_url(),
            "http://127.0.0.1:4318/v1/logs"
        );
        assert_eq!(
            config("http://127.0.0.1:4318/").http_url(),
            "http://127.0.0.1:4318/v1/logs"
        );
        assert_eq!(
            config("https://c.example:443/custom/logs").http_url(),
            "https://c.example:443/custom/logs"
        );
    }

    #[test]
    fn bad_endpoints_and_headers_are_refused_before_start() {
        assert!(config("127.0.0.1:4317").check().is_err());
        assert!(config("ftp://c:1").check().is_err());
        assert!(config("http://127.0.0.1:4317").check().is_ok());
        let mut c = config("http://127.0.0.1:4317");
        c.headers = vec![("bad header".into(), "v".into())];
        assert!(c.check().is_err());
        assert_eq!(
            parse_header("authorization=Bearer a=b"),
            Ok(("authorization".into(), "Bearer a=b".into()))
        );
        assert!(parse_header("novalue").is_err());
    }

    /// deploy/otel/collector.yaml: the OTLP receiver on the ports the
    /// README names, and every pipeline's parts defined.
    #[test]
    fn the_shipped_collector_config_wires_every_pipeline() {
        let config: serde_json::Value =
            serde_saphyr::from_str(include_str!("../../../deploy/otel/collector.yaml"))
                .expect("the collector config is YAML");
        let protocols = &config["receivers"]["otlp"]["protocols"];
        assert_eq!(protocols["grpc"]["endpoint"], "0.0.0.0:4317");
        assert_eq!(protocols["http"]["endpoint"], "0.0.0.0:4318");
        let logs = &config["service"]["pipelines"]["logs"];
        for (part, section) in [
            ("receivers", "receivers"),
            ("processors", "processors"),
            ("exporters", "exporters"),
        ] {
            let names = logs[part].as_array().unwrap();
            assert!(!names.is_empty(), "{part}");
            for name in names {
                let name = name.as_str().unwrap();
                assert!(
                    config[section].get(name).is_some(),
                    "pipeline names {part} {name}, which is not defined"
                );
            }
        }
    }

    #[test]
    fn attributes_keep_the_json_types_and_leave_nulls_out() {
        let v = serde_json::json!({
            "ts": "2026-12-05T10:00:00.5Z", "verdict": "deny", "dport": 443,
            "pid": null, "ok": true,
        });
        let r = record_of(&v, SeverityNumber::Warn, "e");
        assert_eq!(r.time_unix_nano, 1_796_464_800_500_000_000);
        let keys: Vec<&str> = r.attributes.iter().map(|a| a.key.as_str()).collect();
        assert_eq!(keys, ["dport", "ok", "ts", "verdict"]);
        assert_eq!(
            r.attributes[0].value.as_ref().unwrap().value,
            Some(any_value::Value::IntValue(443))
        );
        assert_eq!(
            r.attributes[1].value.as_ref().unwrap().value,
            Some(any_value::Value::BoolValue(true))
        );
    }
}
