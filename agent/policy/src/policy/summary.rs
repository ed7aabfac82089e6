//! What `bulkhead check` prints for a valid policy: enough to review what
//! the policy will do without rereading the YAML.

use std::fmt::Write;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::model::*;

/// Human summary for `bulkhead check` (domains with cgroups/networks/expiry/
/// geo, bridges with ports & windows, mode).
pub fn summary(p: &Policy) -> String {
    let mut out = String::new();
    let mut line = |text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    line(format!("policy {} (sha256 {})", p.path.display(), p.sha256));
    line(match p.mode {
        Mode::Enforce => "mode: enforce".to_owned(),
        Mode::Audit => "mode: audit (decisions are logged, nothing is blocked)".to_owned(),
    });
    if !p.geo.databases.is_empty() || !p.geo.geofeeds.is_empty() {
        line(format!(
            "geo: databases {}; geofeeds {}",
            list(p.geo.databases.iter().map(|d| d.display())),
            list(p.geo.geofeeds.iter().map(|f| f.display())),
        ));
    }

    line(format!("domains ({}):", p.domains.len()));
    for (i, d) in p.domains.iter().enumerate() {
        line(format!("  {} (id {})", d.name, i + 1));
        line(format!("    cgroups:  {}", list(&d.cgroups)));
        for s in &d.pods {
            line(format!("    pods:     {s}"));
        }
        line(format!("    networks: {}", list(&d.networks)));
        if let Some(t) = d.expires {
            line(format!("    expires:  {}", time(t)));
        }
        for (dir, rule) in [("egress: ", &d.egress), ("ingress:", &d.ingress)] {
            if let Some(rule) = rule {
                line(format!("    {dir}  {}", geo_rule(rule)));
            }
        }
        if d.audit == AuditLevel::All {
            line("    audit:    all (allowed connections are logged too)".to_owned());
        }
        if d.allow_raw_sockets {
            line("    raw sockets allowed".to_owned());
        }
    }

    line(format!("bridges ({}):", p.bridges.len()));
    for b in &p.bridges {
        let (from, to) = (&p.domains[b.from].name, &p.domains[b.to].name);
        line(format!("  {}: {from} -> {to}", b.name));
        let ports = b.ports.iter().map(|r| {
            if r.lo == r.hi {
                format!("{}/{}", r.proto.name(), r.lo)
            } else {
                format!("{}/{}-{}", r.proto.name(), r.lo, r.hi)
            }
        });
        line(format!("    ports:  {}", list(ports)));
        line(format!("    open:   {}", window(b.not_before, b.expires)));
        line(format!("    reason: {}", b.reason));
    }
    out
}

fn list<T: std::fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    let mut out = String::new();
    for (i, item) in items.into_iter().enumerate() {
        let sep = if i == 0 { "" } else { ", " };
        // Writing to a String cannot fail.
        let _ = write!(out, "{sep}{item}");
    }
    if out.is_empty() {
        "(none)".to_owned()
    } else {
        out
    }
}

fn geo_rule(rule: &GeoRule) -> String {
    let (verb, codes) = match &rule.countries {
        CountryList::Allow(codes) => ("only", codes),
        CountryList::Deny(codes) => ("all but", codes),
    };
    let codes = list(
        codes
            .iter()
            .map(|c| String::from_utf8_lossy(c).into_owned()),
    );
    let unknown = match rule.unknown_country {
        UnknownCountry::Allow => "allowed",
        UnknownCountry::Deny => "denied",
    };
    format!("{verb} {codes}; unknown country {unknown}")
}

fn window(not_before: Option<i64>, expires: Option<i64>) -> String {
    match (not_before, expires) {
        (None, None) => "always".to_owned(),
        (Some(start), None) => format!("from {}", time(start)),
        (None, Some(end)) => format!("until {}", time(end)),
        (Some(start), Some(end)) => format!("from {} until {}", time(start), time(end)),
    }
}

/// Unix nanoseconds as RFC 3339 UTC, the way the policy writes times.
fn time(ns: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(ns.into())
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("{ns} ns"))
}
