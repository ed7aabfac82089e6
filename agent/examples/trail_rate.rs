//! For `cargo xtask bench`: the sustained rate of the audit trail's writers
//! (events per second written to the events log, and to the audit store),
//! unsealed against sealed, alternating, in one run. Each round hands
//! `N` events to a fresh output as fast as its queue takes them and times
//! until every one is written. Prints one JSON object.
//!
//! `trail_rate DIR N ROUNDS`

use std::{
    path::Path,
    sync::{Arc, Mutex, atomic::Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use bulkhead::{
    runtime::{
        events::Record,
        health::Counts,
        sink::{Lines, Rotation},
        store::Store,
    },
    seal::{self, Sealer},
};

fn record(i: u64) -> Record {
    let some = |s: &str| Some(s.to_string());
    Record {
        ts: bulkhead::clock::format_ts(bulkhead::clock::now_ns() as u64, 0),
        verdict: "deny".into(),
        reason: "cross-domain".into(),
        hook: "connect4".into(),
        proto: "tcp".into(),
        src: some("10.20.0.5"),
        sport: Some(40000 + (i % 20000) as u16),
        dst: some("10.40.0.7"),
        dport: Some(5432),
        pid: Some(4242),
        comm: some("psql"),
        uid: Some(1000),
        cgroup: "/contractor.slice/job-17.scope".into(),
        cgroup_id: 7,
        src_domain: some("contractor-staging"),
        dst_domain: some("production"),
        country: None,
        geo_source: None,
        geo_source_built: None,
        name: None,
        bridge: None,
        generation: 3,
        seq: i,
        cpu: 0,
    }
}

/// CPU time (ns) of this process's thread named `name` (the writer).
fn thread_cpu_ns(name: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let stat = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
            return stat
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        }
    }
    0
}

/// Hands `n` events over, waiting whenever the queue is full (so none is
/// dropped); returns the seconds until `written` reaches `n` and the
/// writer thread's CPU nanoseconds per event.
fn time_until_written(n: u64, counts: &Counts, mut send: impl FnMut(u64)) -> (f64, f64) {
    let start = Instant::now();
    let mut i = 0;
    while i < n {
        // Keep the queue below its bound: the rate measured is the
        // writer's, with nothing dropped.
        if counts.pending.load(Ordering::Relaxed) > 8000 {
            thread::sleep(Duration::from_micros(200));
            continue;
        }
        send(i);
        i += 1;
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while counts.written.load(Ordering::Relaxed) < n && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        counts.dropped_total(),
        0,
        "{}: nothing dropped",
        counts.name
    );
    assert_eq!(counts.written.load(Ordering::Relaxed), n, "{}", counts.name);
    let secs = start.elapsed().as_secs_f64();
    (secs, thread_cpu_ns(counts.name) as f64 / n as f64)
}

fn sealer(dir: &Path) -> Result<Arc<Mutex<Sealer>>> {
    seal::setup(dir, 60, true)?;
    Ok(Arc::new(Mutex::new(
        Sealer::open(dir)?.context("the key just made")?,
    )))
}

fn log_round(dir: &Path, n: u64, sealed: bool) -> Result<(f64, f64)> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let chain = if sealed {
        Some((sealer(dir)?, dir.join("head")))
    } else {
        None
    };
    let rotation = Rotation {
        max_bytes: 0,
        keep: 0,
    };
    let (l, _) = Lines::file(&dir.join("events.jsonl"), rotation, chain)?;
    // The events task serializes each record once for every line output.
    let took = time_until_written(n, &l.counts.clone(), |i| {
        let r = record(i);
        let mut line = serde_json::to_string(&r).unwrap_or_default();
        line.push('\n');
        l.send(&r.ts, line);
    });
    l.finish(Duration::from_secs(10));
    Ok(took)
}

fn store_round(dir: &Path, n: u64, sealed: bool) -> Result<(f64, f64)> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let s = Store::start(
        &dir.join("audit.db"),
        Duration::from_secs(86400 * 30),
        if sealed { Some(sealer(dir)?) } else { None },
    )?;
    let took = time_until_written(n, &s.counts.clone(), |i| s.event(record(i)));
    s.finish(Duration::from_secs(10));
    Ok(took)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (dir, n, rounds) = match &args[1..] {
        [d, n, r] => (Path::new(d).to_path_buf(), n.parse()?, r.parse()?),
        _ => anyhow::bail!("usage: trail_rate DIR N ROUNDS"),
    };
    let mut out = serde_json::Map::new();
    for (output, round) in [
        (
            "events_log",
            log_round as fn(&Path, u64, bool) -> Result<(f64, f64)>,
        ),
        ("audit_store", store_round),
    ] {
        // TRAIL_ONLY=events_log (or audit_store): one output, for a profile.
        if std::env::var("TRAIL_ONLY").is_ok_and(|o| o != output) {
            continue;
        }
        let (mut plain, mut sealed) = (Vec::new(), Vec::new());
        let (mut plain_ns, mut sealed_ns) = (Vec::new(), Vec::new());
        for r in 0..rounds {
            // Alternate which goes first, so drift favours neither.
            for s in if r % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            } {
                let (secs, ns) = round(&dir.join(format!("{output}-{s}")), n, s)?;
                if s { &mut sealed_ns } else { &mut plain_ns }.push(ns);

                if s { &mut sealed } else { &mut plain }.push(n as f64 / secs);
            }
        }
        let (p, s) = (median(plain.clone()), median(sealed.clone()));
        let (pn, sn) = (median(plain_ns.clone()), median(sealed_ns.clone()));
        eprintln!(
            "  {output}: {p:.0} events/s unsealed, {s:.0} sealed ({:.1}% of the unsealed rate); writer CPU {pn:.0} ns/event unsealed, {sn:.0} sealed (its capacity {:.1}%)",
            100.0 * s / p,
            100.0 * pn / sn
        );
        out.insert(
            output.into(),
            serde_json::json!({
                "unsealed_per_s": p,
                "sealed_per_s": s,
                "ratio": s / p,
                "writer_ns_unsealed": pn,
                "writer_ns_sealed": sn,
                "capacity_ratio": pn / sn,
                "unsealed_rounds": plain,
                "sealed_rounds": sealed,
            }),
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    out.insert("events".into(), n.into());
    out.insert("rounds".into(), rounds.into());
    println!("{}", serde_json::Value::Object(out));
    Ok(())
}
