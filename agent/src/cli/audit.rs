//! `audit query` and `audit changes`: the audit store, read without an
//! agent; `audit setup-keys` and `audit verify`: the sealed trail.

use std::{io::Write as _, net::IpAddr, path::Path, process::ExitCode};

use anyhow::{Context as _, Result};
use ipnet::IpNet;

use bulkhead::{
    runtime::store,
    seal::{self, Head, verify},
};

use super::{
    args::{AuditQuery, rfc3339_ns, since_ns},
    render,
};

/// `audit query`: the matching events as a table, JSON lines or CSV.
pub fn query(db: &Path, flags: AuditQuery) -> Result<ExitCode> {
    let format = if flags.json {
        "json".to_string()
    } else {
        flags.format.clone()
    };
    let rows = store::query(db, &store_query(flags)?)?;
    let mut out = std::io::stdout().lock();
    match format.as_str() {
        "json" => {
            for r in &rows {
                writeln!(out, "{}", serde_json::to_string(r)?)?;
            }
        }
        "csv" => {
            writeln!(out, "{}", render::csv_header())?;
            for r in &rows {
                writeln!(out, "{}", render::csv_row(&serde_json::to_value(r)?))?;
            }
        }
        _ => {
            writeln!(out, "{}", render::table_header())?;
            for r in &rows {
                writeln!(out, "{}", render::table_row(&serde_json::to_value(r)?))?;
            }
            writeln!(out, "{} events", rows.len())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The flags as the store's query: times in Unix ns, `--dst` as a network.
fn store_query(f: AuditQuery) -> Result<store::Query> {
    let mut from_ns = f.from.as_deref().map(rfc3339_ns).transpose()?;
    if let Some(s) = f.since {
        from_ns = Some(from_ns.unwrap_or(i64::MIN).max(since_ns(s)));
    }
    let dst = match f.dst {
        Some(d) => Some(match d.parse::<IpNet>() {
            Ok(n) => n,
            Err(_) => IpNet::from(
                d.parse::<IpAddr>()
                    .with_context(|| format!("--dst {d}: not an address or CIDR"))?,
            ),
        }),
        None => None,
    };
    Ok(store::Query {
        from_ns,
        to_ns: f.to.as_deref().map(rfc3339_ns).transpose()?,
        domain: f.domain,
        src_domain: f.src_domain,
        dst_domain: f.dst_domain,
        cgroup: f.cgroup,
        dst,
        port: f.port,
        country: f.country,
        verdict: f.verdict,
        reason: f.reason,
        name: f.name,
        limit: f.limit,
    })
}

/// `audit changes`: one line per change (text or a JSON object), oldest
/// first.
pub fn changes(db: &Path, since: Option<u64>, json: bool) -> Result<ExitCode> {
    for c in store::changes(db, since.map(since_ns), 100_000)? {
        if json {
            println!("{c}");
            continue;
        }
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
    Ok(ExitCode::SUCCESS)
}

/// `audit setup-keys`: the key, and the verification key printed once.
pub fn setup_keys(state_dir: &Path, epoch: u64, force: bool) -> Result<ExitCode> {
    let vk = seal::setup(state_dir, epoch, force)?;
    println!(
        "Sealing key: {} (the agent seals the events log and the audit store from its next start)",
        state_dir.join(seal::KEY_FILE).display()
    );
    println!("Verification key (shown only now; keep it off this node):");
    println!();
    println!("    {vk}");
    println!();
    println!(
        "Check the trail with: bulkhead audit verify --key <verification key> [--log FILE...] [--db FILE]"
    );
    Ok(ExitCode::SUCCESS)
}

/// `audit verify`: each chain's report; exit 4 when one fails.
pub fn verify(
    key: &str,
    logs: &[std::path::PathBuf],
    db: Option<std::path::PathBuf>,
    heads: &[String],
) -> Result<ExitCode> {
    let key = seal::VerifyKey::parse(key).context("--key")?;
    let head = |chain: &str| -> Result<Option<Head>> {
        for h in heads {
            let (name, rest) = h
                .split_once('=')
                .with_context(|| format!("--head {h}: expected OUTPUT=SEQ:MAC"))?;
            if name != chain {
                continue;
            }
            let (seq, mac) = rest
                .split_once(':')
                .with_context(|| format!("--head {h}: expected OUTPUT=SEQ:MAC"))?;
            return Ok(Some(Head {
                seq: seq
                    .parse()
                    .with_context(|| format!("--head {h}: a bad seq"))?,
                mac: seal::unhex(mac).with_context(|| format!("--head {h}: a bad MAC"))?,
            }));
        }
        Ok(None)
    };
    let mut reports = Vec::new();
    if !logs.is_empty() {
        let files: Vec<&Path> = logs.iter().map(|p| p.as_path()).collect();
        reports.push(verify::logs(&files, &key, head("events-log")?)?);
    }
    if let Some(db) = db {
        reports.push(verify::store(&db, &key, head("audit-store")?)?);
    }
    let mut ok = true;
    for r in &reports {
        print!("{r}");
        ok &= r.ok();
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(4)
    })
}
