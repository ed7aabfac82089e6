//! `explain`: the verdict of the live policy or of a policy file for one
//! connection, and `--replay` of recorded decisions against a policy file.

use std::{io::Write as _, net::IpAddr, path::Path, process::ExitCode};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use bulkhead::{
    clock,
    explain::{self, Answer, Query},
    policy::Proto,
    runtime::protocol::{Request, Response},
};

use super::{
    args::rfc3339_ns,
    check::candidate,
    client::{call, unexpected},
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

/// `explain`: asks the agent at `run_dir`, or reads `policy` when given.
pub fn explain(
    run_dir: &Path,
    policy: Option<&Path>,
    cgroup: String,
    dst: &str,
    proto: String,
    json: bool,
) -> Result<ExitCode> {
    let (ip, port) = parse_dst(dst)?;
    let answer = match policy {
        Some(path) => explain_file(path, cgroup, ip, port, &proto)?,
        None => {
            let req = Request::Explain {
                cgroup,
                dst: ip.to_string(),
                port,
                proto,
            };
            let reply = call(run_dir, &req)?;
            let Response::Explained { answer } = reply else {
                return Err(unexpected(reply));
            };
            answer
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        print!("{}", explain::render(&answer));
    }
    Ok(ExitCode::SUCCESS)
}

/// Explains against a candidate policy file, without any agent.
fn explain_file(path: &Path, cgroup: String, ip: IpAddr, port: u16, proto: &str) -> Result<Answer> {
    let cand = candidate(path)?;
    let q = Query {
        cgroup,
        dst: ip,
        port,
        proto: Proto::from_name(proto).unwrap_or(Proto::Tcp),
        learned: Vec::new(),
    };
    let now = clock::now_ns();
    Ok(explain::explain(
        &cand.policy,
        &cand.compiled,
        &cand.geo,
        &q,
        now,
    ))
}

/// `explain --replay EVENTS --policy NEW`: every recorded connection
/// decision whose verdict NEW would change; exit 3 when any would.
pub fn replay(events: &Path, path: &Path, json: bool) -> Result<ExitCode> {
    let cand = candidate(path)?;
    let text =
        std::fs::read_to_string(events).with_context(|| format!("reading {}", events.display()))?;
    let (mut seen, mut changed) = (0, 0);
    let mut out = std::io::stdout().lock();
    for (n, line) in text.lines().enumerate() {
        let Ok(e) = serde_json::from_str::<Value>(line) else {
            bail!("{}:{}: not a JSON event", events.display(), n + 1);
        };
        let Some(q) = decided(&e) else {
            continue;
        };
        let ts = e["ts"]
            .as_str()
            .map(rfc3339_ns)
            .transpose()?
            .unwrap_or_else(clock::now_ns);
        let a = explain::explain(&cand.policy, &cand.compiled, &cand.geo, &q, ts);
        seen += 1;
        let was_allowed = e["verdict"] == "allow";
        let now_allowed = a.verdict == "allow";
        if was_allowed != now_allowed {
            changed += 1;
            if json {
                writeln!(out, "{}", serde_json::json!({"event": e, "now": a}))?;
            } else {
                writeln!(out, "{}", change(&e, &q, &a))?;
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
    Ok(if changed > 0 {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

/// The connection a recorded event decided; `None` for the other events.
fn decided(e: &Value) -> Option<Query> {
    // Only connection-level decisions have a workload, a destination and a port.
    let hook = e["hook"].as_str().unwrap_or("");
    let (dst, cg) = (e["dst"].as_str()?, e["cgroup"].as_str()?);
    if !hook.starts_with("connect") && !hook.starts_with("sendmsg") {
        return None;
    }
    let proto = e["proto"]
        .as_str()
        .and_then(Proto::from_name)
        .unwrap_or(Proto::Tcp);
    Some(Query {
        cgroup: cg.to_string(),
        dst: dst.parse().ok()?,
        port: e["dport"].as_u64().unwrap_or(0) as u16,
        proto,
        learned: Vec::new(),
    })
}

/// A decision the candidate policy changes, for people.
fn change(e: &Value, q: &Query, a: &Answer) -> String {
    let s = |k: &str| e[k].as_str().unwrap_or("");
    format!(
        "{} {} {} -> {}:{} was {} ({}), would be {} ({}): {}",
        s("ts"),
        q.cgroup,
        s("proto"),
        s("dst"),
        q.port,
        s("verdict"),
        s("reason"),
        a.verdict,
        a.reason,
        a.rule
    )
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
}
