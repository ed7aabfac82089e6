//! Printing for people: the status text, the events table, CSV, and the
//! one-line summaries of compiled policies and bridges.

use serde_json::Value;

use bulkhead::{
    compile::Compiled,
    runtime::protocol::{OpenBridge, PodsState, Status},
};

/// `check`'s line about what the policy compiled to.
pub fn compiled(c: &Compiled) -> String {
    let t = &c.addr;
    format!(
        "compiled: {} cgroups present now, {} IPv4 + {} IPv6 domain networks, {} IPv4 + {} IPv6 geo ranges; address table {} words ({} KiB) in {} IPv4 + {} IPv6 nodes, {} classes",
        c.cgroups.len(),
        c.net4.len(),
        c.net6.len(),
        t.stats.geo.v4.merged_ranges,
        t.stats.geo.v6.merged_ranges,
        t.words.len(),
        t.words.len() * 4 / 1024,
        t.stats.nodes_v4,
        t.stats.nodes_v6,
        t.classes.len(),
    )
}

/// Where a bridge leads: `from -> to ["tcp/5432"]`.
pub fn route(from: &str, to: &str, ports: &[String]) -> String {
    format!("{from} -> {to} {ports:?}")
}

/// A line of `bridge list`.
pub fn open_bridge(e: &OpenBridge) -> String {
    let b = &e.bridge;
    format!(
        "{:<32} {} {}s left, opened by uid {}: {}",
        b.name,
        route(&b.from, &b.to, &b.ports),
        e.seconds_left,
        b.opened_by.uid,
        b.reason
    )
}

/// A line of `bridge list --cluster`: the object, its time left, and the
/// nodes that enforce it or refused it (with why).
#[cfg(feature = "k8s")]
pub fn cluster_bridge(b: &bulkhead::k8s::bridges::Listed) -> String {
    if let Some(e) = &b.error {
        return format!("{:<32} not enforced: {e}", b.name);
    }
    let left = if b.seconds_left > 0 {
        format!("{}s left (until {})", b.seconds_left, b.expires)
    } else {
        format!("expired at {}", b.expires)
    };
    let mut line = format!(
        "{:<32} {} {left}, enforced on {} node{}, requested by {}: {}",
        b.name,
        route(&b.from, &b.to, &b.ports),
        b.enforcing,
        if b.enforcing == 1 { "" } else { "s" },
        b.requested_by,
        b.reason
    );
    for n in b.nodes.iter().filter(|n| n["state"] != "enforced") {
        line += &format!(
            "\n    {} {}: {}",
            n["state"].as_str().unwrap_or_default(),
            n["node"].as_str().unwrap_or_default(),
            n["message"].as_str().unwrap_or_default()
        );
    }
    line
}

/// `status` as text.
pub fn status(v: &Status) -> String {
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
    if let Some(r) = &v.last_reload {
        s += &format!("last reload: {} at {}\n", r.outcome, r.at);
        for e in &r.errors {
            s += &format!("             {e}\n");
        }
    }
    let a = &v.audit_full;
    s += &format!(
        "audit full:  {}{}{}\n",
        if a.stance.is_empty() {
            "keep"
        } else {
            &a.stance
        },
        if a.refusing {
            ": REFUSING new connections of domain workloads"
        } else {
            ""
        },
        if a.unwritable.is_empty() {
            String::new()
        } else {
            format!(
                " (the audit trail cannot be written: {})",
                a.unwritable.join(", ")
            )
        }
    );
    s += &format!(
        "cgroup root: {}\npinned:      {}/{} (map layout)\n",
        v.cgroup_root.display(),
        v.bpffs_dir.display(),
        v.layout
    );
    s += "programs:\n";
    for p in &v.programs {
        let pinned = match (&p.entered_from, p.pinned) {
            (None, true) => "attached, pinned".to_string(),
            (Some(from), true) => format!("entered from {from}, pinned"),
            (_, false) => "NOT PINNED".to_string(),
        };
        s += &format!("  {:<20} {:<16} {pinned}\n", p.hook, p.name);
    }
    let m = &v.maps;
    s += &format!(
        "maps:        {} cgroups, address table {} of {} words ({} classes), {} bridge pairs\n",
        m.cgroups, m.addr_words, m.addr_words_max, m.addr_classes, m.bridge_pairs
    );
    s += &status_bridges(v);
    s += "decisions:\n";
    for d in &v.decisions {
        s += &format!(
            "  {:<12} {:<6} {:<24} {}\n",
            d.hook, d.verdict, d.reason, d.count
        );
    }
    s += &status_outputs(v);
    if let Some(p) = &v.pods {
        s += &status_pods(p);
    }
    s
}

fn status_bridges(v: &Status) -> String {
    let mut s = String::from("bridges:\n");
    for b in &v.bridges {
        let left = match b.seconds_left {
            Some(n) if n > 0 => format!("{n}s left"),
            Some(_) => "expired".into(),
            None => "no expiry".into(),
        };
        s += &format!(
            "  {} {} {} ({left}) {}\n",
            b.name,
            route(&b.from, &b.to, &b.ports),
            if b.open { "open" } else { "closed" },
            b.reason
        );
    }
    s
}

/// How events and cuts fared, and what the agent may do.
fn status_outputs(v: &Status) -> String {
    let e = &v.events;
    let c = &v.connections_cut;
    let mut s = format!(
        "events:      {} wanted, {} delivered (handed to the outputs), {} rate limited, {} lost (ring full), {} sequence gaps, {} subscribers ({} dropped)\n",
        e.wanted,
        e.delivered,
        e.rate_limited,
        e.lost_ring_full,
        e.sequence_gaps,
        e.subscribers,
        e.subscriber_drops,
    );
    s += "outputs:\n";
    for o in &v.outputs {
        let d = &o.dropped;
        s += &format!(
            "  {:<12} {} written, {} pending, {} dropped ({} disk full, {} I/O error, {} locked, {} queue full)\n",
            o.name,
            o.written,
            o.pending,
            d.total(),
            d.disk_full,
            d.io_error,
            d.locked,
            d.queue_full
        );
        if let Some(h) = &o.chain {
            // As `audit verify --head` takes it.
            s += &format!(
                "  {:<12} sealed; chain head {}={}:{}\n",
                "",
                o.name,
                h.seq,
                bulkhead::seal::hex(&h.mac)
            );
        }
    }
    let d = &v.dns;
    s + &format!(
        "cut:         {} established connections marked, {} destroyed; {}\n\
         names:       {} addresses learned now (of {}, {} evicted); {} answers taught {} addresses, {} spoofed answers ignored, {} unread\n\
         packet sockets: {}\n\
         {}\n",
        c.marked,
        c.destroyed,
        c.how,
        d.learned_now,
        d.max,
        d.evicted,
        d.answers,
        d.addresses,
        d.spoofed,
        d.unread,
        v.packet_sockets,
        v.capabilities,
    )
}

fn status_pods(p: &PodsState) -> String {
    let mut s = format!(
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
    s
}

/// One line of the events table, in its columns.
fn table_line(cells: [&str; 8]) -> String {
    let [time, verdict, reason, hook, proto, endpoints, domains, comm] = cells;
    format!(
        "{time:<30} {verdict:<10} {reason:<22} {hook:<11} {proto:<5} {endpoints:<40} {domains:<28} {comm}"
    )
}

/// The events table's header.
pub fn table_header() -> String {
    table_line([
        "TIME",
        "VERDICT",
        "REASON",
        "HOOK",
        "PROTO",
        "SRC -> DST",
        "DOMAINS",
        "COMM",
    ])
}

/// An event (as its JSON) as a row of the events table.
pub fn table_row(v: &Value) -> String {
    let s = |k: &str| v[k].as_str().unwrap_or("");
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
            .or(v["name"].as_str())
            .or(v["country"].as_str())
            .unwrap_or("-")
    );
    table_line([
        s("ts"),
        s("verdict"),
        s("reason"),
        s("hook"),
        s("proto"),
        &format!("{} -> {}", ep("src", "sport"), ep("dst", "dport")),
        &domains,
        s("comm"),
    ])
}

/// A loss note (`"type": "lost"`) in the events table.
pub fn lost(v: &Value) -> String {
    format!(
        "-- {} events lost: {}",
        v["count"],
        v["why"].as_str().unwrap_or("")
    )
}

/// The columns of `audit query --format csv`: the events' JSON fields.
const CSV_COLUMNS: [&str; 19] = [
    "ts",
    "verdict",
    "reason",
    "hook",
    "proto",
    "src",
    "sport",
    "dst",
    "dport",
    "pid",
    "comm",
    "uid",
    "cgroup",
    "src_domain",
    "dst_domain",
    "country",
    "bridge",
    "generation",
    "name",
];

pub fn csv_header() -> String {
    CSV_COLUMNS.join(",")
}

/// An event (as its JSON) as a CSV row; an absent field is empty.
pub fn csv_row(v: &Value) -> String {
    let cells: Vec<String> = CSV_COLUMNS
        .iter()
        .map(|k| match &v[*k] {
            Value::String(s) => csv_field(s),
            Value::Null => String::new(),
            other => other.to_string(),
        })
        .collect();
    cells.join(",")
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
    fn table_rows_show_endpoints_and_domains() {
        let v: Value = serde_json::json!({"ts": "2026-01-01T00:00:00Z", "verdict": "deny", "reason": "cross-domain", "hook": "connect4", "proto": "tcp", "dst": "10.0.0.2", "dport": 443, "src_domain": "a", "dst_domain": "b", "comm": "curl"});
        let row = table_row(&v);
        assert!(row.contains("- -> 10.0.0.2:443"), "{row}");
        assert!(row.contains("a -> b"));
        assert!(row.ends_with("curl"));
    }

    #[test]
    fn csv_rows_quote_what_needs_it_and_leave_absent_fields_empty() {
        let v: Value = serde_json::json!({"ts": "2026-01-01T00:00:00Z", "verdict": "deny", "reason": "cross-domain", "hook": "connect4", "proto": "tcp", "src": null, "dst": "10.0.0.2", "dport": 443, "comm": "a,\"b\"", "cgroup": "/c", "generation": 3});
        assert_eq!(
            csv_row(&v),
            "2026-01-01T00:00:00Z,deny,cross-domain,connect4,tcp,,,10.0.0.2,443,,\"a,\"\"b\"\"\",,/c,,,,,3,"
        );
        assert_eq!(csv_header().split(',').count(), 19);
    }
}
