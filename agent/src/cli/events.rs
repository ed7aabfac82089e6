//! `events`: recent events, and with `--follow` a stream that outlives
//! the agent's restarts.

use std::{
    io::{BufRead as _, Write as _},
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize as _;
use serde_json::Value;

use bulkhead::runtime::{
    events::Record,
    protocol::{Filter, Request, SOCKET_NAME},
};

use super::{
    args::since_ns,
    client::{self, Admit, Seen},
    render,
};

/// `events`: as a table (default) or JSON lines. With `follow`, see
/// [`follow_events`].
pub fn events(run_dir: &Path, filter: Filter, follow: bool, json: bool) -> Result<ExitCode> {
    if follow {
        follow_events(run_dir, filter, json)?;
    } else {
        recent(run_dir, filter, json)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The events the agent keeps, then done.
fn recent(run_dir: &Path, filter: Filter, json: bool) -> Result<()> {
    let request = Request::Events {
        follow: false,
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
/// it handled and drops those it handled already ([`Seen`]), so
/// no event is printed twice; events the kernel queued in the pinned ring
/// buffer while no agent ran come from the next agent. The domain, verdict
/// and reason filters are applied here, not by the agent, so every event's
/// `seq` is seen: a jump in a CPU's sequence is printed as a loss note
/// (`"type": "lost"`) with the number of events missed, across reconnects
/// too.
fn follow_events(run_dir: &Path, filter: Filter, json: bool) -> Result<()> {
    let since_floor = filter.since_secs.map(since_ns);
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
    let mut seen = Seen::default();
    let mut link = Link::new(run_dir);
    loop {
        let again = link.connected_before;
        let mut from_ns = None;
        if again {
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
        let reader = link.connect(&request, &mut out)?;
        if again {
            seen.reconnected();
        }
        if !pump(reader, &mut out, &mut seen, &local, narrowed)? {
            return Ok(());
        }
        link.went_away(&mut out)?;
    }
}

/// A follower's way to whichever agent is up, and what it said on stderr
/// about the outages.
struct Link<'a> {
    run_dir: &'a Path,
    socket: PathBuf,
    /// When the current outage started (said once on stderr).
    outage: Option<Instant>,
    connected_before: bool,
    retry: Duration,
}

impl Link<'_> {
    fn new(run_dir: &Path) -> Link<'_> {
        Link {
            run_dir,
            socket: run_dir.join(SOCKET_NAME),
            outage: None,
            connected_before: false,
            retry: RETRY_FIRST,
        }
    }

    /// Sends `request` to the agent, waiting for one while none is there.
    fn connect(&mut self, request: &Request, out: &mut Printer) -> Result<Connection> {
        let reader = loop {
            match client::connect(self.run_dir, request) {
                Ok(r) => break r,
                Err(e) if client::agent_absent(&e) => {
                    if self.outage.is_none() {
                        self.outage_begins(out, "waiting for the agent")?;
                    }
                    std::thread::sleep(self.retry);
                    self.retry = (self.retry * 2).min(RETRY_MAX);
                }
                Err(e) => return Err(e),
            }
        };
        self.retry = RETRY_FIRST;
        if let Some(since) = self.outage.take() {
            eprintln!(
                "bulkhead: {} the agent after {:.1} s",
                if self.connected_before {
                    "reconnected to"
                } else {
                    "connected to"
                },
                since.elapsed().as_secs_f64()
            );
        }
        self.connected_before = true;
        Ok(reader)
    }

    /// Says that the agent went away, and gives it a moment.
    fn went_away(&mut self, out: &mut Printer) -> Result<()> {
        self.outage_begins(out, "the agent went away; waiting for it to come back")?;
        std::thread::sleep(self.retry);
        Ok(())
    }

    /// Says on stderr, after the events printed so far, what the follower
    /// waits for.
    fn outage_begins(&mut self, out: &mut Printer, what: &str) -> Result<()> {
        quiet_on_broken_pipe(out.flush())?;
        eprintln!(
            "bulkhead: {what} (control socket {})…",
            self.socket.display()
        );
        self.outage = Some(Instant::now());
        Ok(())
    }
}

type Connection = std::io::BufReader<std::os::unix::net::UnixStream>;

/// Prints one connection's stream until it ends or fails (`Ok(true)`: the
/// agent went away) or whoever reads our output went away (`Ok(false)`).
fn pump(
    mut reader: Connection,
    out: &mut Printer,
    seen: &mut Seen,
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
            Admit::Repeat => continue,
            Admit::New(m) => m,
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
            quiet_on_broken_pipe(writeln!(p.out, "{}", render::table_header()))?;
        }
        Ok(p)
    }

    /// Prints one line; flushes when `idle` (nothing more is waiting, so
    /// bursts cost few writes). `Ok(false)` when our reader went away.
    fn print(&mut self, v: &Value, text: &str, idle: bool) -> Result<bool> {
        let written = if self.json {
            writeln!(self.out, "{text}")
        } else if v.get("type").and_then(Value::as_str) == Some("lost") {
            writeln!(self.out, "{}", render::lost(v))
        } else {
            writeln!(self.out, "{}", render::table_row(v))
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
