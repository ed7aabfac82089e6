//! Client side of the CLI: talking to the agent and printing for people.

pub mod client;

use std::{
    io::{BufRead as _, Write as _},
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize as _;
use serde_json::Value;

use bulkhead::{
    Candidate, LoadError, candidate, cgroup, clock,
    compile::EventLimits,
    explain::{self, Answer, Query},
    policy::Proto,
    runtime::events::Record,
    runtime::protocol::{Filter, Request, SOCKET_NAME, Status},
};

/// `10.0.0.1`, `10.0.0.1:443`, `fd00::1`, `[fd00::1]:443` → (address, port; 0 = any).
pub fn parse_dst(s: &str) -> Result<(IpAddr, u16)> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok((ip, 0));
    }
    let sa: std::net::SocketAddr = s
        .parse()
        .with_context(|| format!("--dst {s}: expected ADDR, ADDR:PORT or [V6]:PORT"))?;
    Ok((sa.ip(), sa.port()))
}

/// A policy file compiled as the agent would, without touching the kernel.
/// Any owner will do: the caller chose the file to read, nothing is
/// enforced from it.
pub fn candidate(path: &Path) -> Result<Candidate, LoadError> {
    let mount = cgroup::cgroup2_mount().unwrap_or_else(|_| "/sys/fs/cgroup".into());
    let opts = candidate::Options {
        cgroup_mount: &mount,
        limits: EventLimits { rate: 0, burst: 0 },
        tai: clock::tai_offset_ns(),
    };
    Candidate::load(path, &mut candidate::trust_any, &opts)
}

/// Explains against a candidate policy file, without any agent.
pub fn explain_file(
    path: &Path,
    cgroup_path: &str,
    ip: IpAddr,
    port: u16,
    proto: &str,
) -> Result<Answer> {
    let Candidate {
        policy: p,
        geo,
        compiled: c,
        ..
    } = candidate(path)?;
    let proto = Proto::from_name(proto).unwrap_or(Proto::Tcp);
    let q = Query {
        cgroup: cgroup_path.to_string(),
        dst: ip,
        port,
        proto,
    };
    let now = clock::now_ns();
    Ok(explain::explain(&p, &c, &geo, &q, now))
}

/// `explain --replay EVENTS --policy NEW`: every recorded connection
/// decision whose verdict NEW would change. Returns how many changed.
pub fn replay(events: &Path, path: &Path, json: bool) -> Result<usize> {
    let Candidate {
        policy: p,
        geo,
        compiled: c,
        ..
    } = candidate(path)?;
    let text =
        std::fs::read_to_string(events).with_context(|| format!("reading {}", events.display()))?;
    let (mut seen, mut changed) = (0, 0);
    let mut out = std::io::stdout().lock();
    for (n, line) in text.lines().enumerate() {
        let Ok(e) = serde_json::from_str::<Value>(line) else {
            bail!("{}:{}: not a JSON event", events.display(), n + 1);
        };
        // Only connection-level decisions have a workload, a destination and a port.
        let hook = e["hook"].as_str().unwrap_or("");
        let (Some(dst), Some(cg)) = (e["dst"].as_str(), e["cgroup"].as_str()) else {
            continue;
        };
        if !hook.starts_with("connect") && !hook.starts_with("sendmsg") {
            continue;
        }
        let Ok(ip) = dst.parse::<IpAddr>() else {
            continue;
        };
        let proto = e["proto"]
            .as_str()
            .and_then(Proto::from_name)
            .unwrap_or(Proto::Tcp);
        let q = Query {
            cgroup: cg.to_string(),
            dst: ip,
            port: e["dport"].as_u64().unwrap_or(0) as u16,
            proto,
        };
        let ts = e["ts"]
            .as_str()
            .map(rfc3339_ns)
            .transpose()?
            .unwrap_or_else(clock::now_ns);
        let a = explain::explain(&p, &c, &geo, &q, ts);
        seen += 1;
        let was_allowed = e["verdict"] == "allow";
        let now_allowed = a.verdict == "allow";
        if was_allowed != now_allowed {
            changed += 1;
            if json {
                writeln!(out, "{}", serde_json::json!({"event": e, "now": a}))?;
            } else {
                writeln!(
                    out,
                    "{} {} {} -> {}:{} was {} ({}), would be {} ({}): {}",
                    e["ts"].as_str().unwrap_or(""),
                    cg,
                    e["proto"].as_str().unwrap_or(""),
                    dst,
                    q.port,
                    e["verdict"].as_str().unwrap_or(""),
                    e["reason"].as_str().unwrap_or(""),
                    a.verdict,
                    a.reason,
                    a.rule
                )?;
            }
        }
    }
    if !json {
        writeln!(
            out,
            "{seen} decisions replayed against {}; {changed} would change",
            path.display()
        )?;
    }
    Ok(changed)
}

pub fn render_status(v: &Status) -> String {
    let mut s = String::new();
    s += &format!(
        "agent:       pid {} running since {}\n",
        v.pid, v.running_since
    );
    s += &format!(
        "policy:      {} (sha256 {}), mode {}, generation {}\n",
        v.policy.display(),
        v.sha256,
        v.mode,
        v.generation
    );
    s += &format!(
        "cgroup root: {}\npinned:      {}/{} (map layout)\n",
        v.cgroup_root.display(),
        v.bpffs_dir.display(),
        v.layout
    );
    s += "programs:\n";
    for p in &v.programs {
        let pinned = if p.pinned {
            "attached, pinned"
        } else {
            "NOT PINNED"
        };
        s += &format!("  {:<20} {:<16} {pinned}\n", p.hook, p.name);
    }
    let m = &v.maps;
    s += &format!(
        "maps:        {} cgroups, address table {} of {} words ({} classes), {} bridge pairs\n",
        m.cgroups, m.addr_words, m.addr_words_max, m.addr_classes, m.bridge_pairs
    );
    s += "bridges:\n";
    for b in &v.bridges {
        let left = match b.seconds_left {
            Some(n) if n > 0 => format!("{n}s left"),
            Some(_) => "expired".into(),
            None => "no expiry".into(),
        };
        s += &format!(
            "  {} {} -> {} {:?} {} ({left}) {}\n",
            b.name,
            b.from,
            b.to,
            b.ports,
            if b.open { "open" } else { "closed" },
            b.reason
        );
    }
    s += "decisions:\n";
    for d in &v.decisions {
        s += &format!(
            "  {:<12} {:<6} {:<24} {}\n",
            d.hook, d.verdict, d.reason, d.count
        );
    }
    let e = &v.events;
    s += &format!(
        "events:      {} wanted, {} delivered, {} rate limited, {} lost (ring full), {} sequence gaps, {} subscribers ({} dropped)\n",
        e.wanted,
        e.delivered,
        e.rate_limited,
        e.lost_ring_full,
        e.sequence_gaps,
        e.subscribers,
        e.subscriber_drops
    );
    let c = &v.connections_cut;
    s += &format!(
        "cut:         {} established connections marked, {} destroyed; {}\n",
        c.marked, c.destroyed, c.how
    );
    s += &format!("packet sockets: {}\n", v.packet_sockets);
    s += &format!("{}\n", v.capabilities);
    if let Some(p) = &v.pods {
        s += &format!(
            "pods:        node {}, {}, {} pods, {} placed, {} waiting for their cgroup, {} in conflict\n",
            p.node,
            if p.synced {
                "synced"
            } else {
                "NOT SYNCED with the API server yet"
            },
            p.pods,
            p.placed.len(),
            p.pending.len(),
            p.conflicts.len(),
        );
        for a in &p.placed {
            s += &format!("  {} -> {} ({})\n", a.pod, a.domain, a.cgroup);
        }
        for c in &p.conflicts {
            s += &format!("  {} selected by {:?} (none applied)\n", c.pod, c.domains);
        }
    }
    s
}

/// Prints events as a table (default) or JSON lines. With `follow`, see
/// [`follow_events`].
pub fn events(run_dir: &Path, filter: Filter, follow: bool, json: bool) -> Result<()> {
    if follow {
        return follow_events(run_dir, filter, json);
    }
    let request = Request::Events {
        follow,
        filter,
        from_ns: None,
        counts_seq_gaps: false,
    };
    let mut reader = client::connect(run_dir, &request)?;
    let mut out = Printer::new(json)?;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        let text = line.trim_end();
        let v = parse_line(text)?;
        if !out.print(&v, text, reader.buffer().is_empty())? {
            return Ok(());
        }
    }
    quiet_on_broken_pipe(out.flush())?;
    Ok(())
}

/// First wait between attempts to reach the agent, doubled up to
/// [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// `events --follow`: streams until stopped. Waits for an agent that is not
/// up (no socket, or one that refuses), and reconnects when the agent goes
/// away (the stream ends or fails), saying so once per outage on stderr. On
/// reconnecting it asks for the events since shortly before the newest one
/// it handled and drops those it handled already ([`client::Seen`]), so
/// no event is printed twice; events the kernel queued in the pinned ring
/// buffer while no agent ran come from the next agent. The domain, verdict
/// and reason filters are applied here, not by the agent, so every event's
/// `seq` is seen: a jump in a CPU's sequence is printed as a loss note
/// (`"type": "lost"`) with the number of events missed, across reconnects
/// too.
fn follow_events(run_dir: &Path, filter: Filter, json: bool) -> Result<()> {
    let socket = run_dir.join(SOCKET_NAME);
    let since_floor = filter
        .since_secs
        .map(|s| clock::now_ns().saturating_sub(s.saturating_mul(1_000_000_000) as i64));
    // The agent filters by age only; the rest is done here.
    let local = Filter {
        since_secs: None,
        queue: None,
        ..filter.clone()
    };
    let narrowed = filter.narrows();
    let mut asked = Filter {
        domain: None,
        verdict: None,
        reason: None,
        ..filter
    };
    let mut out = Printer::new(json)?;
    let mut seen = client::Seen::default();
    // When the current outage started (said once on stderr).
    let mut outage: Option<Instant> = None;
    let mut connected_before = false;
    let mut retry = RETRY_FIRST;
    loop {
        let mut from_ns = None;
        if connected_before {
            // `--since` counts from the start, not from this reconnect.
            asked.since_secs = None;
            from_ns = since_floor.max(seen.resume_from_ns());
        }
        let request = Request::Events {
            follow: true,
            filter: asked.clone(),
            from_ns,
            counts_seq_gaps: true,
        };
        let reader = match client::connect(run_dir, &request) {
            Ok(r) => r,
            Err(e) if client::agent_absent(&e) => {
                if outage.is_none() {
                    quiet_on_broken_pipe(out.flush())?;
                    eprintln!(
                        "bulkhead: waiting for the agent (control socket {})…",
                        socket.display()
                    );
                    outage = Some(Instant::now());
                }
                std::thread::sleep(retry);
                retry = (retry * 2).min(RETRY_MAX);
                continue;
            }
            Err(e) => return Err(e),
        };
        retry = RETRY_FIRST;
        if let Some(since) = outage.take() {
            eprintln!(
                "bulkhead: {} the agent after {:.1} s",
                if connected_before {
                    "reconnected to"
                } else {
                    "connected to"
                },
                since.elapsed().as_secs_f64()
            );
        }
        if connected_before {
            seen.reconnected();
        }
        connected_before = true;
        if !pump(reader, &mut out, &mut seen, &local, narrowed)? {
            return Ok(());
        }
        quiet_on_broken_pipe(out.flush())?;
        eprintln!(
            "bulkhead: the agent went away; waiting for it to come back (control socket {})…",
            socket.display()
        );
        outage = Some(Instant::now());
        std::thread::sleep(retry);
    }
}

/// Prints one connection's stream until it ends or fails (`Ok(true)`: the
/// agent went away) or whoever reads our output went away (`Ok(false)`).
fn pump(
    mut reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    out: &mut Printer,
    seen: &mut client::Seen,
    local: &Filter,
    narrowed: bool,
) -> Result<bool> {
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            // A line cut short by the agent's death is not an event.
            Ok(_) if !line.ends_with('\n') => return Ok(true),
            Ok(_) => {}
            Err(e) if client::gone(&e) => return Ok(true),
            Err(e) => return Err(e.into()),
        }
        let text = line.trim_end();
        let v = parse_line(text)?;
        let idle = reader.buffer().is_empty();
        if v.get("type").is_some() {
            if !out.print(&v, text, idle)? {
                return Ok(false);
            }
            continue;
        }
        let Ok(r) = Record::deserialize(&v) else {
            // Not an event this version knows: shown as it came.
            if !out.print(&v, text, idle)? {
                return Ok(false);
            }
            continue;
        };
        let missed = match seen.admit(&r, text) {
            client::Admit::Repeat => continue,
            client::Admit::New(m) => m,
        };
        if let Some(m) = missed {
            let note = m.note(narrowed);
            if !out.print(&note, &note.to_string(), false)? {
                return Ok(false);
            }
        }
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let shown = !local.narrows() || local.matches(&r, now);
        if shown && !out.print(&v, text, idle)? {
            return Ok(false);
        }
        if !shown && idle && !quiet_on_broken_pipe(out.flush())? {
            return Ok(false);
        }
    }
}

/// A line from the agent: an event, a loss note, or a refusal (an error).
fn parse_line(text: &str) -> Result<Value> {
    let v: Value =
        serde_json::from_str(text).with_context(|| format!("bad event from the agent: {text}"))?;
    if v.get("ok") == Some(&Value::Bool(false)) {
        bail!("{}", v["error"].as_str().unwrap_or("refused"));
    }
    Ok(v)
}

/// Events and loss notes on stdout, as a table or JSON lines.
struct Printer {
    out: std::io::BufWriter<std::io::StdoutLock<'static>>,
    json: bool,
}

impl Printer {
    /// Writes the table's header unless printing JSON.
    fn new(json: bool) -> Result<Printer> {
        let mut p = Printer {
            out: std::io::BufWriter::new(std::io::stdout().lock()),
            json,
        };
        if !json {
            let header = writeln!(
                p.out,
                "{:<30} {:<10} {:<22} {:<11} {:<5} {:<40} {:<28} COMM",
                "TIME", "VERDICT", "REASON", "HOOK", "PROTO", "SRC -> DST", "DOMAINS"
            );
            quiet_on_broken_pipe(header)?;
        }
        Ok(p)
    }

    /// Prints one line; flushes when `idle` (nothing more is waiting, so
    /// bursts cost few writes). `Ok(false)` when our reader went away.
    fn print(&mut self, v: &Value, text: &str, idle: bool) -> Result<bool> {
        let written = if self.json {
            writeln!(self.out, "{text}")
        } else if v.get("type").and_then(Value::as_str) == Some("lost") {
            writeln!(
                self.out,
                "-- {} events lost: {}",
                v["count"],
                v["why"].as_str().unwrap_or("")
            )
        } else {
            writeln!(self.out, "{}", table_row(v))
        };
        let written = written.and_then(|()| if idle { self.out.flush() } else { Ok(()) });
        quiet_on_broken_pipe(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// `Ok(true)` to go on, `Ok(false)` when whoever reads our output went away
/// (`| head`), which is not an error.
fn quiet_on_broken_pipe(r: std::io::Result<()>) -> Result<bool> {
    match r {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn table_row(v: &Value) -> String {
    let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
    let ep = |a: &str, p: &str| match (v[a].as_str(), v[p].as_u64()) {
        (Some(a), Some(p)) if a.contains(':') => format!("[{a}]:{p}"),
        (Some(a), Some(p)) => format!("{a}:{p}"),
        (Some(a), None) => a.to_string(),
        _ => "-".into(),
    };
    let domains = format!(
        "{} -> {}",
        v["src_domain"].as_str().unwrap_or("-"),
        v["dst_domain"]
            .as_str()
            .or(v["country"].as_str())
            .unwrap_or("-")
    );
    format!(
        "{:<30} {:<10} {:<22} {:<11} {:<5} {:<40} {:<28} {}",
        s("ts"),
        s("verdict"),
        s("reason"),
        s("hook"),
        s("proto"),
        format!("{} -> {}", ep("src", "sport"), ep("dst", "dport")),
        domains,
        s("comm")
    )
}

fn rfc3339_ns(s: &str) -> Result<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .with_context(|| format!("`{s}` is not an RFC 3339 time (e.g. 2026-11-23T10:00:00Z)"))?;
    Ok(t.unix_timestamp_nanos() as i64)
}

/// `bulkhead audit query|changes`.
pub fn audit(cmd: crate::AuditCommand) -> Result<()> {
    match cmd {
        crate::AuditCommand::Query {
            db,
            since,
            from,
            to,
            domain,
            src_domain,
            dst_domain,
            cgroup,
            dst,
            port,
            country,
            verdict,
            reason,
            format,
            limit,
        } => {
            let mut from_ns = from.as_deref().map(rfc3339_ns).transpose()?;
            if let Some(s) = since {
                from_ns = Some(
                    from_ns
                        .unwrap_or(i64::MIN)
                        .max(clock::now_ns() - s as i64 * 1_000_000_000),
                );
            }
            let dst = match dst {
                Some(d) => Some(match d.parse::<ipnet::IpNet>() {
                    Ok(n) => n,
                    Err(_) => ipnet::IpNet::from(
                        d.parse::<IpAddr>()
                            .with_context(|| format!("--dst {d}: not an address or CIDR"))?,
                    ),
                }),
                None => None,
            };
            let q = bulkhead::runtime::store::Query {
                from_ns,
                to_ns: to.as_deref().map(rfc3339_ns).transpose()?,
                domain,
                src_domain,
                dst_domain,
                cgroup,
                dst,
                port,
                country,
                verdict,
                reason,
                limit,
            };
            let rows = bulkhead::runtime::store::query(&db.path(), &q)?;
            let mut out = std::io::stdout().lock();
            match format.as_str() {
                "json" => {
                    for r in &rows {
                        writeln!(out, "{}", serde_json::to_string(r)?)?;
                    }
                }
                "csv" => {
                    writeln!(
                        out,
                        "ts,verdict,reason,hook,proto,src,sport,dst,dport,pid,comm,uid,cgroup,src_domain,dst_domain,country,bridge,generation"
                    )?;
                    for r in &rows {
                        let f = |o: Option<String>| csv_field(&o.unwrap_or_default());
                        writeln!(
                            out,
                            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                            r.ts,
                            r.verdict,
                            r.reason,
                            r.hook,
                            r.proto,
                            f(r.src.clone()),
                            f(r.sport.map(|p| p.to_string())),
                            f(r.dst.clone()),
                            f(r.dport.map(|p| p.to_string())),
                            f(r.pid.map(|p| p.to_string())),
                            f(r.comm.clone()),
                            f(r.uid.map(|p| p.to_string())),
                            csv_field(&r.cgroup),
                            f(r.src_domain.clone()),
                            f(r.dst_domain.clone()),
                            f(r.country.clone()),
                            f(r.bridge.clone()),
                            r.generation
                        )?;
                    }
                }
                _ => {
                    writeln!(
                        out,
                        "{:<30} {:<10} {:<22} {:<11} {:<5} {:<40} {:<28} COMM",
                        "TIME", "VERDICT", "REASON", "HOOK", "PROTO", "SRC -> DST", "DOMAINS"
                    )?;
                    for r in &rows {
                        writeln!(out, "{}", table_row(&serde_json::to_value(r)?))?;
                    }
                    writeln!(out, "{} events", rows.len())?;
                }
            }
            Ok(())
        }
        crate::AuditCommand::Changes { db, since } => {
            let from = since.map(|s| clock::now_ns() - s as i64 * 1_000_000_000);
            for c in bulkhead::runtime::store::changes(&db.path(), from, 100_000)? {
                println!(
                    "{} {:<16} gen {:<5} {} {} {}",
                    c["ts"].as_str().unwrap_or(""),
                    c["kind"].as_str().unwrap_or(""),
                    c["generation"]
                        .as_u64()
                        .map_or("-".to_string(), |g| g.to_string()),
                    c["policy"].as_str().unwrap_or(""),
                    c["sha256"]
                        .as_str()
                        .map(|s| &s[..12.min(s.len())])
                        .unwrap_or(""),
                    c["detail"].as_str().unwrap_or("")
                );
            }
            Ok(())
        }
    }
}

/// RFC 4180 quoting where needed.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_destinations() {
        assert_eq!(
            parse_dst("10.0.0.1").unwrap(),
            ("10.0.0.1".parse().unwrap(), 0)
        );
        assert_eq!(
            parse_dst("10.0.0.1:443").unwrap(),
            ("10.0.0.1".parse().unwrap(), 443)
        );
        assert_eq!(
            parse_dst("[fd00::1]:53").unwrap(),
            ("fd00::1".parse().unwrap(), 53)
        );
        assert_eq!(parse_dst("fd00::1").unwrap().1, 0);
        assert!(parse_dst("nope").is_err());
    }

    #[test]
    fn table_rows_show_endpoints_and_domains() {
        let v: Value = serde_json::json!({"ts": "2026-01-01T00:00:00Z", "verdict": "deny", "reason": "cross-domain", "hook": "connect4", "proto": "tcp", "dst": "10.0.0.2", "dport": 443, "src_domain": "a", "dst_domain": "b", "comm": "curl"});
        let row = table_row(&v);
        assert!(row.contains("- -> 10.0.0.2:443"), "{row}");
        assert!(row.contains("a -> b"));
        assert!(row.ends_with("curl"));
    }
}
