//! `audit query` and `audit changes`: the audit store, read without an
//! agent.

use std::{io::Write as _, net::IpAddr, path::Path, process::ExitCode};

use anyhow::{Context as _, Result};
use ipnet::IpNet;

use bulkhead::runtime::store;

use super::{
    args::{AuditQuery, rfc3339_ns, since_ns},
    render,
};

/// `audit query`: the matching events as a table, JSON lines or CSV.
pub fn query(db: &Path, flags: AuditQuery) -> Result<ExitCode> {
    let format = flags.format.clone();
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
        limit: f.limit,
    })
}

/// `audit changes`: one line per change, oldest first.
pub fn changes(db: &Path, since: Option<u64>) -> Result<ExitCode> {
    for c in store::changes(db, since.map(since_ns), 100_000)? {
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
