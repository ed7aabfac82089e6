//! `bench/results.json`, `bench/*.svg` and `BENCHMARKS.md` from one run's
//! results. Plots are hand-written SVG (no plotting dependency).

use std::{fmt::Write as _, fs};

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

use super::stats::stdev;
use crate::cmd::workspace_root;

const PALETTE: [&str; 6] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A grouped bar chart: one group per category, one bar per series.
/// `reference` draws a dashed horizontal line (e.g. ratio 1.0).
pub fn bar_chart(
    title: &str,
    y_label: &str,
    categories: &[String],
    series: &[(String, Vec<f64>)],
    reference: Option<(f64, &str)>,
) -> String {
    let (w, h) = (860.0, 400.0);
    let (left, right, top, bottom) = (70.0, 20.0, 40.0, 95.0);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .chain(reference.map(|r| r.0))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-9);
    // A "nice" axis maximum and tick step.
    let raw_step = max / 5.0;
    let mag = 10f64.powf(raw_step.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw_step)
        .unwrap_or(10.0 * mag);
    let ymax = (max / step).ceil() * step;
    let y = |v: f64| top + ph - (v / ymax) * ph;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{}</text>
"#,
        w / 2.0,
        esc(title)
    );
    let mut t = 0.0;
    while t <= ymax + step / 2.0 {
        let yy = y(t);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + pw,
            left - 6.0,
            yy + 4.0,
            fmt_num(t)
        );
        t += step;
    }
    let _ = writeln!(
        s,
        r#"<text transform="translate(16,{}) rotate(-90)" text-anchor="middle">{}</text>"#,
        top + ph / 2.0,
        esc(y_label)
    );
    let groups = categories.len().max(1) as f64;
    let gw = pw / groups;
    let nb = series.len().max(1) as f64;
    let bw = (gw * 0.8) / nb;
    for (ci, cat) in categories.iter().enumerate() {
        let gx = left + ci as f64 * gw + gw * 0.1;
        for (si, (_, vals)) in series.iter().enumerate() {
            let v = vals.get(ci).copied().unwrap_or(f64::NAN);
            if !v.is_finite() {
                continue;
            }
            let x = gx + si as f64 * bw;
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}</title></rect>"#,
                y(v),
                (bw - 2.0).max(1.0),
                (top + ph - y(v)).max(0.0),
                PALETTE[si % PALETTE.len()],
                fmt_num(v)
            );
            if bw > 22.0 {
                let _ = writeln!(
                    s,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}</text>"#,
                    x + bw / 2.0 - 1.0,
                    y(v) - 3.0,
                    fmt_num(v)
                );
            }
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            gx + gw * 0.4,
            top + ph + 16.0,
            esc(cat)
        );
    }
    if let Some((v, label)) = reference {
        let yy = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#333" stroke-dasharray="5,4"/><text x="{}" y="{:.1}" text-anchor="end" font-size="11">{}</text>"##,
            left + pw,
            left + pw - 4.0,
            yy - 4.0,
            esc(label)
        );
    }
    let _ = writeln!(
        s,
        r##"<line x1="{left}" x2="{left}" y1="{top}" y2="{}" stroke="#333"/><line x1="{left}" x2="{}" y1="{}" y2="{}" stroke="#333"/>"##,
        top + ph,
        left + pw,
        top + ph,
        top + ph
    );
    // Legend below the plot.
    let mut lx = left;
    let mut ly = h - 44.0;
    for (si, (name, _)) in series.iter().enumerate() {
        let width = 30.0 + name.chars().count() as f64 * 6.5;
        if lx > left && lx + width > w - right {
            // Next row.
            lx = left;
            ly += 18.0;
        }
        let _ = writeln!(
            s,
            r#"<rect x="{lx:.1}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            ly - 10.0,
            PALETTE[si % PALETTE.len()],
            lx + 16.0,
            ly,
            esc(name)
        );
        lx += width;
    }
    s.push_str("</svg>\n");
    s
}

pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        "–".into()
    } else if v.abs() >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v.abs() >= 10_000.0 {
        format!("{:.0}k", v / 1e3)
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// Median warm/cold ns of a program on a packet set.
fn timing(r: &Value, prog: &str, set: &str) -> (f64, f64) {
    r["decision"]["timings"]
        .as_array()
        .and_then(|a| a.iter().find(|t| t["prog"] == prog && t["set"] == set))
        .map_or((f64::NAN, f64::NAN), |t| {
            (f(&t["warm_ns"]), f(&t["cold_ns"]))
        })
}

/// Median ns per call of a sock_addr hook's program under `policy` (or
/// `allow-all`), measured on real calls (`decision.hooks`).
fn hook_ns(r: &Value, hook: &str, policy: &str) -> f64 {
    f(&r["decision"]["hooks"]["hooks"][hook][policy]["ns_per_call"])
}

/// The hooks of the per-call plot and table: the sock_addr hooks on real
/// calls (bpf_stats), then `bh_egress` in the test run (warm, allowed
/// destinations).
const HOOK_ROWS: [(&str, &str); 6] = [
    ("bh_connect4", "`connect4` (UDP `connect()`, bpf_stats)"),
    ("bh_connect6", "`connect6` (UDP `connect()`, bpf_stats)"),
    (
        "bh_sendmsg4",
        "`sendmsg4` (unconnected `sendto()`, bpf_stats)",
    ),
    (
        "bh_sendmsg6",
        "`sendmsg6` (unconnected `sendto()`, bpf_stats)",
    ),
    ("allowed-v4", "`bh_egress` IPv4 (test run, warm)"),
    ("allowed-v6", "`bh_egress` IPv6 (test run, warm)"),
];

/// One row of [`HOOK_ROWS`]: `r0 = 1`, then each policy of the ladder.
fn hook_row(r: &Value, key: &str) -> Vec<f64> {
    std::iter::once("allow-all")
        .chain(LADDER)
        .map(|p| {
            if key.starts_with("allowed") {
                timing(r, p, key).0
            } else {
                hook_ns(r, key, p)
            }
        })
        .collect()
}

/// A bar chart's categories and series.
type Chart = (Vec<String>, Vec<(String, Vec<f64>)>);

fn hooks_chart(r: &Value) -> Option<Chart> {
    r["decision"]["hooks"]["hooks"].as_object()?;
    let cats: Vec<String> = HOOK_ROWS
        .iter()
        .map(|(k, _)| match k.strip_prefix("allowed-") {
            Some(fam) => format!("bh_egress {fam} (test run)"),
            None => (*k).to_string(),
        })
        .collect();
    let rows: Vec<Vec<f64>> = HOOK_ROWS.iter().map(|(k, _)| hook_row(r, k)).collect();
    let series = std::iter::once("r0 = 1")
        .chain(LADDER)
        .enumerate()
        .map(|(i, name)| (name.to_string(), rows.iter().map(|row| row[i]).collect()))
        .collect();
    Some((cats, series))
}

/// The per-call cost of every hook against policy size.
fn hooks_section(s: &mut String, r: &Value) {
    let h = &r["decision"]["hooks"];
    if !h["hooks"].is_object() {
        if let Some(e) = h["error"].as_str() {
            let _ = writeln!(
                s,
                "\nPer-call cost of the connect and sendmsg hooks: not measured ({e})."
            );
        }
        return;
    }
    let _ = write!(
        s,
        "\n**Every hook by policy size.** `BPF_PROG_TEST_RUN` does not run `sock_addr` programs, so the connect \
         and sendmsg hooks are measured on real calls: one UDP socket in the workload's domain cgroup `connect()`s, \
         then `sendto()`s, to every allowed destination above ({} passes over the set per round, {} rounds), inside a \
         namespace with no route (each call is decided, allowed, and fails with `ENETUNREACH`: nothing is sent). \
         Each policy's programs are measured alone: the other agents' generation is set to 0 for the while, so their \
         programs return at their first map read and the measured one is the first to touch the socket and the task, \
         as a lone agent's is; `r0 = 1` is attached beside it on the same calls. Run time per call from \
         `kernel.bpf_stats_enabled` (two clock reads included), median over rounds. The socket's storage exists \
         after its first call, so these are the decisions; a TCP connect adds the storage's creation and a TCP \
         listener lookup (section 3). `bh_egress` is the test run above (warm, allowed destinations); `bh_ingress` \
         runs the same decision on the packet's source.\n\n![per-hook cost](bench/hooks.svg)\n\n| hook | ",
        h["passes"], h["rounds"]
    );
    for p in std::iter::once("`r0 = 1`").chain(LADDER) {
        let _ = write!(s, "{p} | ");
    }
    s.push_str("full / empty |\n|---|");
    s.push_str(&"---|".repeat(LADDER.len() + 2));
    s.push('\n');
    for (key, label) in HOOK_ROWS {
        let row = hook_row(r, key);
        let _ = write!(s, "| {label} | ");
        for v in &row {
            let _ = write!(s, "{v:.0} ns | ");
        }
        let _ = writeln!(s, "{:.2}× |", row[LADDER.len()] / row[1]);
    }
}

fn policy<'a>(r: &'a Value, key: &str) -> &'a Value {
    r["policies"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["key"] == key))
        .unwrap_or(&Value::Null)
}

fn net_test<'a>(r: &'a Value, key: &str) -> &'a Value {
    r["network"]["tests"]
        .as_array()
        .and_then(|a| a.iter().find(|t| t["key"] == key))
        .unwrap_or(&Value::Null)
}

/// A mode's median per-round ratio to no policy in an interleaved run.
fn interleaved(r: &Value, test: &str, mode: &str) -> f64 {
    f(&r["network"]["interleaved"][test]["modes"][mode]["paired_ratio_median"])
}

/// `, r0 = 1 on the same hooks 0.990×`: the floor of an interleaved test,
/// when the run measured it.
fn floor(r: &Value, test: &str) -> String {
    let v = interleaved(r, test, "allow_all");
    if v.is_finite() {
        format!(", `r0 = 1` on the same hooks {v:.3}×")
    } else {
        String::new()
    }
}

fn mark(ok: bool) -> &'static str {
    if ok { "**met**" } else { "**not met**" }
}

const SETS: [&str; 4] = ["allowed-v4", "allowed-v6", "random-v4", "random-v6"];
const LADDER: [&str; 5] = ["empty", "d10", "n10k", "geo", "geo_n10k"];

/// The issue-7 targets, computed from the results.
fn targets(r: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    let ratio = |set: &str| timing(r, "geo_n10k", set).0 / timing(r, "empty", set).0;
    let worst = ratio("allowed-v4").max(ratio("allowed-v6"));
    out.push(json!({
        "target": "decision cost, full DB + 10k networks ≤ 1.5× empty policy (allowed traffic, warm)",
        "measured": format!("{:.2}× (IPv4 {:.2}×, IPv6 {:.2}×; denied traffic {:.2}× / {:.2}×)", worst, ratio("allowed-v4"), ratio("allowed-v6"), ratio("random-v4"), ratio("random-v6")),
        "value": worst,
        "met": worst <= 1.5,
    }));
    // Interleaved: every mode's connection in one client, batches taking
    // turns milliseconds apart. Separate runs seconds apart scatter by
    // ±10% on a VM, more than the effect measured.
    let ab = |mode: &str| interleaved(r, "tcp_rr", mode);
    let (bh, nft) = (ab("bulkhead"), ab("nftables"));
    let rr = net_test(r, "tcp_rr");
    let hooks = &r["network"]["bpf_stats"]["by_test"]["tcp_rr"]["per_unit"];
    out.push(json!({
        "target": "TCP_RR with the full policy ≥ 97% of no policy",
        "measured": format!(
            "{:.1}% (interleaved, median of {} per-round ratios; a second no-policy connection: {:.1}%; separate sockperf runs: {:.1}% by per-round pairs; the hooks' own run time: {:.0} ns per transaction, {:.1}% of it)",
            100.0 * bh,
            r["network"]["interleaved"]["tcp_rr"]["rounds"],
            100.0 * ab("none_again"),
            100.0 * f(&rr["modes"]["bulkhead"]["paired_ratio_median"]),
            f(&hooks["ns"]),
            100.0 * f(&hooks["share"]),
        ),
        "value": bh,
        "met": bh >= 0.97,
    }));
    out.push(json!({
        "target": "TCP_RR with the full policy ≥ nftables with the same sets",
        "measured": format!(
            "{:.3}× nftables ({:.1}% vs {:.1}% of no policy, interleaved; separate sockperf runs: {:.1}% vs {:.1}%)",
            bh / nft,
            100.0 * bh,
            100.0 * nft,
            100.0 * f(&rr["modes"]["bulkhead"]["paired_ratio_median"]),
            100.0 * f(&rr["modes"]["nftables"]["paired_ratio_median"]),
        ),
        "value": bh / nft,
        "met": bh >= nft,
    }));
    let full = policy(r, "geo_n10k");
    let ready = f(&full["ready_ms"]);
    let load = f(&r["update"]["first_reload_ms"]);
    let nft_ms = f(&r["network"]["nft"]["load_ms"]);
    out.push(json!({
        "target": "full DB compile + load ≤ 1 s",
        "measured": format!("{:.0} ms (reload of the full DB + 10k networks policy: read the database, compile, write every map entry into the empty slot; start → READY=1 incl. verifying the programs {:.0} ms; `bulkhead check` {:.0} ms)", load, ready, f(&full["check_ms"])),
        "value": load,
        "met": load <= 1000.0,
    }));
    out.push(json!({
        "target": "full DB compile + load ≤ 0.25× `nft -f` of the same sets",
        "measured": format!("{:.2}× ({:.0} ms vs {:.0} ms; from start, verifier included: {:.2}×)", load / nft_ms, load, nft_ms, ready / nft_ms),
        "value": load / nft_ms,
        "met": load / nft_ms <= 0.25,
    }));
    // Issue 18: short connections, datagrams, each hook's cost. Judged
    // interleaved when the run has it (older runs: separate runs).
    let sep = |key: &str, mode: &str| f(&net_test(r, key)["modes"][mode]["ratio_to_none"]);
    for (key, label, goal) in [
        ("tcp_crr", "TCP connect + request + close", 0.97),
        ("udp_tp", "unconnected UDP 64 B send rate", 0.95),
    ] {
        let (bh, nft, how) = if interleaved(r, key, "bulkhead").is_finite() {
            (
                interleaved(r, key, "bulkhead"),
                interleaved(r, key, "nftables"),
                format!(
                    "interleaved; a second no-policy mode {:.3}×; separate runs {:.3}×",
                    interleaved(r, key, "none_again"),
                    sep(key, "bulkhead")
                ),
            )
        } else {
            (
                sep(key, "bulkhead"),
                sep(key, "nftables"),
                format!(
                    "separate runs, paired {:.3}×",
                    f(&net_test(r, key)["modes"]["bulkhead"]["paired_ratio_median"])
                ),
            )
        };
        out.push(json!({
            "target": format!("{label} ≥ {goal}× of no policy, ahead of nftables"),
            "measured": format!("{bh:.3}× (nftables {nft:.3}×{}; {how})", floor(r, key)),
            "value": bh,
            "met": bh >= goal && bh >= nft,
        }));
    }
    for (test, label, goal) in [
        ("udp_rr", "connected UDP_RR", 0.98),
        ("tcp_rr", "TCP_RR", 0.985),
    ] {
        let (bh, nft) = (
            interleaved(r, test, "bulkhead"),
            interleaved(r, test, "nftables"),
        );
        out.push(json!({
            "target": format!("{label} ≥ {goal}× of no policy (interleaved)"),
            "measured": format!("{bh:.3}× (nftables {nft:.3}×{})", floor(r, test)),
            "value": bh,
            "met": bh >= goal && bh >= nft,
        }));
    }
    let per_call = |prog: &str| f(&r["network"]["bpf_stats"][prog]["ns_per_call"]);
    // `r0 = 1` under the same traffic and statistics when the run has it
    // (its calls carry the same clock reads); its test-run cost otherwise.
    let (allow, allow_how) = match per_call(super::net::ALLOW_ALL) {
        ns if ns.is_finite() => (ns, "per call beside them, under the same traffic"),
        _ => (timing(r, "allow-all", "allowed-v4").0, "per test run"),
    };
    for (progs, label, goal) in [
        (&["bh_connect4"][..], "connect hooks", 300.0),
        (&["bh_sendmsg4"][..], "`sendmsg`", 200.0),
        (
            &["bh_egress", "bh_ingress"][..],
            "packet hooks (mostly the cached path)",
            80.0,
        ),
    ] {
        let worst = progs.iter().map(|p| per_call(p)).fold(f64::NAN, f64::max);
        let each: Vec<String> = progs
            .iter()
            .map(|p| {
                format!(
                    "`{p}` {:.0} ns = {:.1}× `r0 = 1`",
                    per_call(p),
                    per_call(p) / allow
                )
            })
            .collect();
        out.push(json!({
            "target": format!("{label} ≤ {goal:.0} ns per call under traffic, full policy"),
            "measured": format!("{} (bpf_stats; `r0 = 1` costs {allow:.1} ns {allow_how})", each.join(", ")),
            "value": worst,
            "met": worst <= goal,
        }));
    }
    let mb = |v: &Value| f(v) * 1024.0 / 1e6;
    let update = &r["update"];
    // Steady: the larger of idle after start and after the reloads (a
    // newer database among them), once replaced sources were let go.
    let steady = mb(&update["idle"]["rss_kib"]).max(mb(&update["rss_after_reloads_kib"]));
    out.push(json!({
        "target": "agent RSS with the full DB + 10k networks ≤ 64 MB steady",
        "measured": format!(
            "{steady:.1} MB (idle after start {:.1} MB, after the reloads {:.1} MB; at READY {:.1} MB, start-up peak {:.1} MB)",
            mb(&update["idle"]["rss_kib"]),
            mb(&update["rss_after_reloads_kib"]),
            mb(&full["rss_kib"]),
            mb(&full["rss_peak_kib"])
        ),
        "value": steady,
        "met": steady <= 64.0,
    }));
    let peak = mb(&update["first_reload_peak_rss_kib"]);
    out.push(json!({
        "target": "agent RSS ≤ 100 MB at the peak of a reload",
        "measured": format!("{peak:.1} MB (the first reload: a newer database read and compiled into the empty slot)"),
        "value": peak,
        "met": peak <= 100.0,
    }));
    out
}

pub fn write(r: &mut Value) -> Result<()> {
    let dir = workspace_root().join("bench");
    fs::create_dir_all(&dir)?;
    r["targets"] = Value::Array(targets(r));

    // Plots.
    let mut cats: Vec<String> = vec!["allow-all".into()];
    cats.extend(LADDER.iter().map(|k| (*k).to_string()));
    let series: Vec<(String, Vec<f64>)> = SETS
        .iter()
        .map(|set| {
            let mut v = vec![timing(r, "allow-all", set).0];
            v.extend(LADDER.iter().map(|k| timing(r, k, set).0));
            (format!("{set} (ns)"), v)
        })
        .collect();
    let empty4 = timing(r, "empty", "allowed-v4").0;
    fs::write(
        dir.join("decision.svg"),
        bar_chart(
            "bh_egress decision cost by policy size (BPF_PROG_TEST_RUN, warm)",
            "ns per decision",
            &cats,
            &series,
            Some((empty4 * 1.5, "1.5× empty (IPv4 allowed)")),
        ),
    )?;
    if let Some((cats, series)) = hooks_chart(r) {
        fs::write(
            dir.join("hooks.svg"),
            bar_chart(
                "Per-call cost of each hook by policy size (allowed destinations)",
                "ns per call",
                &cats,
                &series,
                None,
            ),
        )?;
    }
    let load_cats: Vec<String> = LADDER.iter().map(|k| (*k).to_string()).collect();
    let mut ready: Vec<f64> = LADDER
        .iter()
        .map(|k| f(&policy(r, k)["ready_ms"]))
        .collect();
    let mut check: Vec<f64> = LADDER
        .iter()
        .map(|k| f(&policy(r, k)["check_ms"]))
        .collect();
    let mut nft = vec![f64::NAN; LADDER.len()];
    let mut load_cats = load_cats;
    load_cats.push("nft -f (same sets)".into());
    ready.push(f64::NAN);
    check.push(f64::NAN);
    nft.push(f(&r["network"]["nft"]["load_ms"]));
    fs::write(
        dir.join("load.svg"),
        bar_chart(
            "Policy compile + load time",
            "milliseconds",
            &load_cats,
            &[
                ("bulkhead run: spawn → READY=1".into(), ready),
                ("bulkhead check (compile only)".into(), check),
                ("nft -f".into(), nft),
            ],
            Some((1000.0, "1 s target")),
        ),
    )?;
    let modes: Vec<(String, String)> = r["network"]["modes"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| {
                    (
                        m["key"].as_str().unwrap_or_default().to_string(),
                        m["label"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let test_keys = ["udp_tp", "udp_rr", "tcp_rr", "tcp_crr"];
    let ab_keys: Vec<&str> = ["tcp_rr", "udp_rr", "tcp_crr", "udp_tp"]
        .into_iter()
        .filter(|t| r["network"]["interleaved"][t].is_object())
        .collect();
    let net_series: Vec<(String, Vec<f64>)> = modes
        .iter()
        .map(|(k, label)| {
            let mut v: Vec<f64> = test_keys
                .iter()
                .map(|t| f(&net_test(r, t)["modes"][k]["ratio_to_none"]))
                .collect();
            v.extend(ab_keys.iter().map(|t| interleaved(r, t, k)));
            (label.clone(), v)
        })
        .collect();
    let mut net_cats: Vec<String> = test_keys.iter().map(|s| (*s).to_string()).collect();
    net_cats.extend(ab_keys.iter().map(|t| format!("{t} interleaved")));
    fs::write(
        dir.join("network.svg"),
        bar_chart(
            "Traffic between namespaces over veth, relative to no policy",
            "rate ÷ no-policy rate",
            &net_cats,
            &net_series,
            Some((0.97, "97%")),
        ),
    )?;

    fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(r)? + "\n",
    )
    .context("writing bench/results.json")?;
    fs::write(workspace_root().join("BENCHMARKS.md"), markdown(r))
        .context("writing BENCHMARKS.md")?;
    Ok(())
}

fn markdown(r: &Value) -> String {
    let m = &r["meta"];
    let mut s = String::new();
    let quick = r["params"]["quick"].as_bool().unwrap_or(false);
    let _ = writeln!(s, "# Benchmarks\n");
    let _ = writeln!(
        s,
        "Generated by `cargo xtask bench{}` — regenerate with the same command (as root). \
         Every figure is a ratio against a baseline measured **in the same run on the same machine**; \
         absolute numbers stand beside them but depend on the machine. Raw data: \
         [`bench/results.json`](bench/results.json).\n",
        if quick { " --quick" } else { "" }
    );
    let _ = writeln!(s, "| | |\n|---|---|");
    let _ = writeln!(s, "| date | {} |", m["date"].as_str().unwrap_or(""));
    let _ = writeln!(s, "| kernel | {} |", m["kernel"].as_str().unwrap_or(""));
    let _ = writeln!(
        s,
        "| machine | {} × {}, {} MiB RAM |",
        m["online_cpus"],
        m["cpu"].as_str().unwrap_or(""),
        m["mem_mib"]
    );
    let _ = writeln!(s, "| bulkhead | git {} |", m["git"].as_str().unwrap_or(""));
    let _ = writeln!(
        s,
        "| memory cgroups | {} |",
        match m["agent_memcg"].as_str() {
            Some(h) => format!(
                "the agent in one of its own ({h}), the clients in another, as a systemd unit or a pod runs it; {}",
                storage_charge(m).1
            ),
            None => "none (the kernel has no memory controller)".into(),
        }
    );
    let _ = writeln!(
        s,
        "| load average | {} at start, {} at the end (the machine is shared: ratios, alternating rounds and medians absorb most of it) |",
        m["loadavg_start"]
            .as_str()
            .unwrap_or("")
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        m["loadavg_end"]
            .as_str()
            .unwrap_or("")
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let _ = writeln!(
        s,
        "| run | {} ({:.0} s); {} packets per set, {} repetitions each, {} rounds; {} network rounds of {} s |",
        if quick { "quick (noisier)" } else { "full" },
        f(&m["duration_s"]),
        r["params"]["packets_per_set"],
        r["params"]["repeat"],
        r["params"]["rounds"],
        r["params"]["net_rounds"],
        r["params"]["net_secs"]
    );
    let g = &m["geo_db"];
    let _ = writeln!(
        s,
        "| geo DB | `{}`: {} IPv4 + {} IPv6 networks |",
        g["path"]
            .as_str()
            .unwrap_or("")
            .rsplit('/')
            .next()
            .unwrap_or(""),
        g["networks_v4"],
        g["networks_v6"]
    );
    let _ = writeln!(
        s,
        "| tools | {}; {} |\n",
        m["sockperf"].as_str().unwrap_or(""),
        m["nft"].as_str().unwrap_or("")
    );

    s.push_str("## Where the targets stand\n\n| target | measured | status |\n|---|---|---|\n");
    for t in r["targets"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "| {} | {} | {} |",
            t["target"].as_str().unwrap_or(""),
            t["measured"].as_str().unwrap_or(""),
            mark(t["met"].as_bool().unwrap_or(false))
        );
    }
    s.push('\n');

    // 1. Decision cost.
    s.push_str("## 1. Kernel decision cost (`BPF_PROG_TEST_RUN`)\n\n");
    s.push_str(
        "Each policy is loaded and attached by a real `bulkhead run` on a private cgroup subtree; \
         the program measured is the `bh_egress` behind its pinned link. The measuring loop runs in a \
         child process inside the workload's domain cgroup (the test run's socket belongs to the \
         caller's cgroup). Packet sets: `allowed-*` are random addresses in DE/FR/NL ranges of the \
         database (traffic the strictest policy allows), `random-*` are uniform over IPv4 unicast / \
         `2000::/3` (mostly denied under the country policies: that path includes the event rate \
         limiter). *Warm*: each packet repeated N times in a row; *cold*: each packet once per \
         syscall, so caches are disturbed between decisions. Medians over rounds; the program order \
         rotates each round.\n\n",
    );
    s.push_str("![decision cost](bench/decision.svg)\n\n");
    s.push_str("| program | ");
    for set in SETS {
        let _ = write!(s, "{set} warm | ");
    }
    s.push_str("allowed-v4 cold | allowed-v6 cold |\n|---|");
    for _ in 0..SETS.len() + 2 {
        s.push_str("---|");
    }
    s.push('\n');
    let label = |k: &str| -> String {
        if k == "allow-all" {
            "`r0 = 1; exit` (allow-all)".into()
        } else {
            policy(r, k)["label"].as_str().unwrap_or(k).to_string()
        }
    };
    for k in std::iter::once("allow-all").chain(LADDER) {
        let _ = write!(s, "| {} | ", label(k));
        for set in SETS {
            let (w, _) = timing(r, k, set);
            let (e, _) = timing(r, "empty", set);
            let _ = write!(s, "{:.1} ns ({:.2}×) | ", w, w / e);
        }
        for set in ["allowed-v4", "allowed-v6"] {
            let (_, c) = timing(r, k, set);
            let (_, e) = timing(r, "empty", set);
            let _ = write!(s, "{:.1} ns ({:.2}×) | ", c, c / e);
        }
        s.push('\n');
    }
    s.push_str("\nRatios in parentheses are against the same program with the empty policy, same packets.\n\n");
    s.push_str(
        "Bare lookups: `bh_probe_addr` is the agent's own address-table walk (the `classify` of every hook) \
         for the packet's destination and nothing else, loaded by the agent that holds the policy and run on \
         its maps; `lpm` is one lookup in a plain kernel LPM trie holding the CIDR prefixes of the full \
         policy's allowed ranges (what a prefix-based layout must hold for the same allow-list; bulkhead kept \
         its verdicts in LPM tries before the address table). Both read the address from the packet first, \
         as the allow-all loop does not.\n\n| probe | holds | warm | cold |\n|---|---|---|---|\n",
    );
    for t in r["decision"]["timings"].as_array().into_iter().flatten() {
        let name = t["prog"].as_str().unwrap_or("");
        let set = t["set"].as_str().unwrap_or("");
        let row = if let Some(key) = name.strip_prefix("walk:") {
            let nums = compiled_counts(policy(r, key)["compiled"].as_str().unwrap_or(""));
            Some((
                format!("`bh_probe_addr` on `{key}`, {set}"),
                format!(
                    "address table of {} words",
                    nums.get(5).map_or("?".into(), |n| n.to_string())
                ),
            ))
        } else {
            name.strip_prefix("lpm:").map(|fam| {
                (
                    format!("plain LPM trie, {set}"),
                    format!("{} {fam} prefixes", r["decision"]["lpm_prefixes"][fam]),
                )
            })
        };
        if let Some((probe, holds)) = row {
            let _ = writeln!(
                s,
                "| {probe} | {holds} | {:.1} ns | {:.1} ns |",
                f(&t["warm_ns"]),
                f(&t["cold_ns"])
            );
        }
    }
    if let Some(depth) = r["decision"]["depth"].as_object() {
        let _ = writeln!(
            s,
            "\nCgroup depth (the domain is found by walking the workload's cgroup ancestry, one hash lookup per level, \
             once per policy generation; later packets of the cgroup take it from a per-cgroup cache): \
             `empty` policy, allowed-v4, warm: {:.1} ns at depth {} vs {:.1} ns at depth {} ({:.1} ns per extra level); \
             full policy {:.1} ns vs {:.1} ns.",
            f(&depth["shallow"]["empty"]),
            depth["shallow_depth"],
            f(&depth["deep"]["empty"]),
            depth["deep_depth"],
            (f(&depth["deep"]["empty"]) - f(&depth["shallow"]["empty"]))
                / (f(&depth["deep_depth"]) - f(&depth["shallow_depth"])),
            f(&depth["shallow"]["geo_n10k"]),
            f(&depth["deep"]["geo_n10k"]),
        );
    }
    hooks_section(&mut s, r);
    s.push_str("\nCounter check (one pass, every packet once): the per-CPU counters of each program moved once per run, for the reason the policy gives each destination (ground truth computed from the database with the `maxminddb` crate):\n\n| policy | set | reasons counted (runs) | matches policy | events wanted / rate-limited / lost |\n|---|---|---|---|---|\n");
    for c in r["decision"]["checks"].as_array().into_iter().flatten() {
        if c.get("reasons").is_none() {
            continue;
        }
        let reasons: Vec<String> = c["reasons"]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(k, v)| {
                        let name = k
                            .parse::<u8>()
                            .ok()
                            .and_then(bulkhead_common::Reason::from_code)
                            .map_or(k.as_str(), |r| r.name());
                        format!("{name}: {v}")
                    })
                    .collect()
            })
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} / {} / {} |",
            c["prog"].as_str().unwrap_or(""),
            c["set"].as_str().unwrap_or(""),
            reasons.join(", "),
            if c["matches_policy"].as_bool().unwrap_or(false) {
                "yes"
            } else {
                "**no**"
            },
            c["events_wanted"],
            c["events_rate_limited"],
            c["events_lost"],
        );
    }

    // 2. Load.
    s.push_str("\n## 2. Policy compile + load, memory\n\n");
    s.push_str("`ready` is the wall time from spawning `bulkhead run` to `READY=1` on its `NOTIFY_SOCKET` (parse, read the geo DB, compile, load programs, write maps, attach); in parentheses the CPU time the agent used for it (user + system, from `/proc/PID/stat`, 10 ms ticks), which a busy machine inflates far less than wall time. `check` is `bulkhead check` (parse + read DB + compile, no kernel), CPU from `wait4`. Kernel map memory is the sum of `memlock` in `/proc/self/fdinfo` of every pinned map.\n\n![load time](bench/load.svg)\n\n");
    s.push_str("| policy | compiled | check (CPU) | ready (CPU) | agent RSS (peak) | `check` peak RSS | kernel maps | bh_egress size |\n|---|---|---|---|---|---|---|---|\n");
    for k in LADDER {
        let p = policy(r, k);
        let _ = writeln!(
            s,
            "| {} | {} | {:.0} ms ({:.0} ms) | {:.0} ms ({:.0} ms) | {:.1} MB ({:.1} MB) | {:.1} MB | {:.1} MB | {} insns, {} B JIT |",
            p["label"].as_str().unwrap_or(k),
            p["compiled"]
                .as_str()
                .unwrap_or("")
                .trim_start_matches("compiled: "),
            f(&p["check_ms"]),
            f(&p["check_cpu_ms"]),
            f(&p["ready_ms"]),
            f(&p["ready_cpu_ms"]),
            f(&p["rss_kib"]) * 1024.0 / 1e6,
            f(&p["rss_peak_kib"]) * 1024.0 / 1e6,
            f(&p["check_peak_rss_kib"]) * 1024.0 / 1e6,
            f(&p["kernel_maps"]["total_bytes"]) / 1e6,
            p["bh_egress"]["xlated_bytes"].as_u64().unwrap_or(0) / 8,
            p["bh_egress"]["jited_bytes"]
        );
    }
    let nft = &r["network"]["nft"];
    let _ = writeln!(
        s,
        "| nftables, same sets | {} IPv4 + {} IPv6 interval elements | | {:.0} ms ({:.0} ms) `nft -f` | | | | |",
        nft["elements_v4"],
        nft["elements_v6"],
        f(&nft["load_ms"]),
        f(&nft["load_cpu_ms"])
    );
    let _ = writeln!(
        s,
        "\nThe same sets written as CIDR prefixes ({} IPv4 + {} IPv6, as prefix-based tools hold them) take {:.0} ms ({:.0} ms CPU) to load with `nft -f`.",
        nft["prefix_form"]["elements_v4"],
        nft["prefix_form"]["elements_v6"],
        f(&nft["prefix_form"]["load_ms"]),
        f(&nft["prefix_form"]["load_cpu_ms"])
    );
    let _ = writeln!(
        s,
        "\nUpdate of one network: agent reload (SIGHUP → `READY=1`) {:.0} ms; `nft add element` of one interval {:.1} ms. \
         The first reload after start takes {:.0} ms: the database is newer, so it is read and compiled again, and the whole policy goes into the second, still empty slot of the double buffer (this is the compile + load figure of the targets).",
        f(&r["update"]["reload_ms"]),
        f(&nft["update_one_element_ms"]),
        f(&r["update"]["first_reload_ms"])
    );
    let idle = &r["update"]["idle"];
    if idle.is_object() {
        let peak = r["update"]["first_reload_peak_rss_kib"].as_f64().map_or(
            "not measured (`/proc/PID/clear_refs` refused)".into(),
            |k| format!("{:.1} MB", k * 1.024 / 1e3),
        );
        let _ = writeln!(
            s,
            "\nThe agent with the full policy, idle: RSS {:.1} MB; {} CPU ticks in {} s ({:.2}% of one CPU: timers, file watches, the event poll). \
             Peak RSS during the first reload (full compile into the empty slot; the peak counter reset just before it): {peak}.",
            f(&idle["rss_kib"]) * 1.024 / 1e3,
            idle["cpu_ticks"],
            idle["secs"],
            f(&idle["cpu_share"]) * 100.0
        );
    }
    let progs = &policy(r, "empty")["programs"];
    if let Some(o) = progs.as_object() {
        let total: u64 = o
            .values()
            .map(|v| v["verified_insns"].as_u64().unwrap_or(0))
            .sum();
        let parts: Vec<String> = o
            .iter()
            .map(|(k, v)| format!("`{k}` {}", v["verified_insns"]))
            .collect();
        let _ = writeln!(
            s,
            "\nWith the empty policy, start-up takes {:.0} ms for a {:.0} ms compile: that is loading and verifying the programs ({total} instructions verified in all: {}).",
            f(&policy(r, "empty")["ready_ms"]),
            f(&policy(r, "empty")["check_ms"]),
            parts.join(", ")
        );
    }
    if let Some(mm) = r["update"]["kernel_maps_after_reload"].as_f64() {
        let _ = writeln!(
            s,
            "Kernel map memory of the full policy: {:.1} MB after the first load, {:.1} MB after reloads (both slots of the double buffer filled).",
            f(&policy(r, "geo_n10k")["kernel_maps"]["total_bytes"]) / 1e6,
            mm / 1e6
        );
    }
    if let Some(ga) = r["geo_analysis"].as_object() {
        let _ = writeln!(
            s,
            "\nWhat the full policy compiles to: {} IPv4 + {} IPv6 geo ranges (every placed range, merged by \
             verdict), and with the 10k networks an address table of {} words ({:.1} MiB of the slot's 16 MiB): \
             {} IPv4 + {} IPv6 distinct nodes of 16 or 256 words, identical nodes stored once \
             (`agent/policy/src/addr.rs`). A prefix layout needs {} IPv4 + {} IPv6 CIDR prefixes just to cover the \
             *allowed* ranges (DE/FR/NL + geofeed; {} + {} ranges), which is what the LPM probe above holds.",
            ga["geo_ranges_v4"],
            ga["geo_ranges_v6"],
            ga["table_words"],
            f(&ga["table_words"]) * 4.0 / 1048576.0,
            ga["nodes_v4"],
            ga["nodes_v6"],
            ga["allowed_only_v4"],
            ga["allowed_only_v6"],
            ga["allowed_ranges_v4"],
            ga["allowed_ranges_v6"],
        );
    }

    // 3. Network.
    s.push_str("\n## 3. Traffic between network namespaces (veth)\n\n");
    s.push_str("Client namespace ↔ server namespace over veth; clients and servers share CPU 0 at `SCHED_FIFO` priority 10, so each request/response is one serial chain on one CPU that the rest of the machine cannot interrupt (much steadier than waking an idle second CPU or sharing it with compilers), and every hook's cost adds to it. Each round runs a test in every mode back to back, in an order that rotates each round, so a round's pair is seconds apart; values are medians over rounds, ratios are against *no policy* in the same run. *bulkhead*: client in the workload's domain (country allow-list + 10k networks loaded; the server's address is placed in DE by the geofeed, so every packet takes the geo lookup). *nftables*: the same denied addresses as interval sets, checked on output (`daddr`) and input (`saddr`), in the client's namespace.\n\n![network](bench/network.svg)\n\n");
    let mode_keys: Vec<String> = r["network"]["modes"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| m["key"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default();
    s.push_str("| test | ");
    for mk in &mode_keys {
        let _ = write!(s, "{mk} | ");
    }
    s.push_str("\n|---|");
    for _ in &mode_keys {
        s.push_str("---|");
    }
    s.push('\n');
    for t in r["network"]["tests"].as_array().into_iter().flatten() {
        let _ = write!(
            s,
            "| {} ({}) | ",
            t["label"].as_str().unwrap_or(""),
            t["unit"].as_str().unwrap_or("")
        );
        for mk in &mode_keys {
            let md = &t["modes"][mk];
            let _ = write!(
                s,
                "{} ({:.3}×, paired {:.3}×) | ",
                fmt_num(f(&md["median"])),
                f(&md["ratio_to_none"]),
                f(&md["paired_ratio_median"])
            );
        }
        s.push('\n');
    }
    if let Some(ab) = r["network"]["interleaved"].as_object() {
        let _ = write!(
            s,
            "\n**Interleaved request/response** (64 B each way; the judged TCP_RR figures). One client holds a \
             connection per mode, each opened from that mode's cgroup and namespace, and runs batches of {} \
             transactions on each in turn, in an order that rotates, for {} s per protocol; a mode's figure is the \
             median over rounds of its batch against the same round's no-policy batch, milliseconds apart. \
             *none_again* is a second no-policy connection: its distance from 100% is the method's own error. \
             *allow_all* (when the run has it) attaches `r0 = 1` to the hooks a domain's client passes (both packet directions, \
             socket creation, IPv4 connect and sendmsg) in a cgroup of its own: the floor that enforcing anything at those hooks pays. \
             UDP is a connected socket: its datagrams run the packet hooks only, which take the verdict the socket remembers (for that peer until the peer's first answer, then for every datagram while it stays connected). \
             TCP_CRR opens a new connection per transaction (connect, 1 B each way, close with RST) and UDP send is unconnected \
             `sendto()`s of 64 B to one address: the connect and sendmsg hooks decide by the calling task's cgroup, so the client \
             moves into the mode's cgroup and namespace before each of their batches, outside the batch's time.\n\n",
            ab["tcp_rr"]["batch"], r["params"]["ab_secs"],
        );
        let tests: Vec<(&str, &str)> = [
            ("tcp_rr", "TCP_RR (trans/s)"),
            ("udp_rr", "UDP_RR (trans/s)"),
            ("tcp_crr", "TCP_CRR (conn/s)"),
            ("udp_tp", "UDP send (msg/s)"),
        ]
        .into_iter()
        .filter(|(t, _)| ab.contains_key(*t))
        .collect();
        s.push_str("| mode |");
        for (_, label) in &tests {
            let _ = write!(s, " {label} | ratio |");
        }
        s.push_str("\n|---|");
        s.push_str(&"---|---|".repeat(tests.len()));
        s.push('\n');
        let mut keys: Vec<String> = mode_keys.clone();
        keys.insert(1, "none_again".into());
        for k in &keys {
            let _ = write!(s, "| {k} |");
            for (t, _) in &tests {
                let m = &ab[*t]["modes"][k];
                let _ = write!(
                    s,
                    " {} | {:.4} |",
                    fmt_num(f(&m["rate"])),
                    f(&m["paired_ratio_median"])
                );
            }
            s.push('\n');
        }
        let rounds: Vec<String> = tests
            .iter()
            .map(|(t, _)| format!("{t} {} (batches of {})", ab[*t]["rounds"], ab[*t]["batch"]))
            .collect();
        let _ = writeln!(s, "\nRounds: {}.", rounds.join(", "));
    }
    if let Some(st) = r["network"]["bpf_stats"].as_object() {
        s.push_str("\nRun time per real call under this traffic (`kernel.bpf_stats_enabled`, which adds two clock reads per call, in one more bulkhead-mode run of each test): ");
        let parts: Vec<String> = st
            .iter()
            .filter(|(k, _)| *k != "by_test" && *k != "profile")
            .map(|(k, v)| {
                let name = if k == super::net::ALLOW_ALL {
                    "r0 = 1"
                } else {
                    k.as_str()
                };
                format!("`{name}` {:.0} ns × {}", f(&v["ns_per_call"]), v["calls"])
            })
            .collect();
        s.push_str(&parts.join(", "));
        s.push_str(". Per test, the hooks' run time per unit (transaction, message, connection) and its share of the unit's time:");
        for (test, label, _) in [
            ("tcp_rr", "TCP_RR", ""),
            ("udp_rr", "UDP request/response", ""),
            ("udp_tp", "UDP send", ""),
            ("tcp_crr", "TCP connect", ""),
        ] {
            let u = &st["by_test"][test]["per_unit"];
            let _ = write!(
                s,
                " {label} {:.0} ns ({:.1}%);",
                f(&u["ns"]),
                100.0 * f(&u["share"])
            );
        }
        s.pop();
        s.push_str(".\n");
        profile_table(&mut s, st);
    }
    if let Some(c) = r["network"]["bulkhead_counters"].as_object() {
        let parts: Vec<String> = c.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        let _ = writeln!(
            s,
            "\nbulkhead's counters during the timed rounds: {}.",
            parts.join(", ")
        );
    }

    // 4. Storm.
    s.push_str("\n## 4. Deny storm and event accounting\n\n");
    let _ = writeln!(
        s,
        "{} `connect()`s from the workload's cgroup to another domain's addresses (inside a namespace with no route out), each refused with `EPERM` by `connect4`. *accounted* means: every connect got EPERM, the kernel counted one decision each, and events delivered to the log = events wanted − rate-limited − lost (all three counted by the kernel).\n",
        r["params"]["storm_connects"]
    );
    s.push_str("| run | connects/s | EPERM | events wanted | delivered | rate-limited | lost | delivered by | accounted |\n|---|---|---|---|---|---|---|---|---|\n");
    for run in r["storm"]["runs"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {:.2} s | {} |",
            run["label"].as_str().unwrap_or(""),
            fmt_num(f(&run["connects_per_s"])),
            run["eperm"],
            run["events_wanted"],
            run["events_delivered"],
            run["events_rate_limited"],
            run["events_lost"],
            f(&run["delivered_by_s"]),
            if run["accounted"].as_bool().unwrap_or(false) {
                "yes"
            } else {
                "**no**"
            }
        );
    }

    s.push_str(&trail(r));
    s.push_str(&names(r));
    s.push_str("\n## Where the time goes\n\n");
    s.push_str(&analysis(r));
    s
}

/// The numbers of `bulkhead check`'s "compiled:" line, in order: cgroups,
/// IPv4 + IPv6 domain networks, IPv4 + IPv6 geo ranges, address table
/// words, KiB, IPv4 + IPv6 nodes, classes.
pub fn compiled_counts(line: &str) -> Vec<u64> {
    line.split_whitespace()
        .filter_map(|w| {
            w.trim_start_matches('(')
                .trim_end_matches([',', ';'])
                .parse()
                .ok()
        })
        .collect()
}

fn analysis(r: &Value) -> String {
    let mut s = String::new();
    let t = |p: &str, set: &str| timing(r, p, set).0;
    let allow = t("allow-all", "allowed-v4");
    let empty = t("empty", "allowed-v4");
    let n10k = t("n10k", "allowed-v4");
    let geo = t("geo", "allowed-v4");
    let full = t("geo_n10k", "allowed-v4");
    let full6 = t("geo_n10k", "allowed-v6");
    let empty6 = t("empty", "allowed-v6");
    let walk_empty4 = t("walk:empty", "allowed-v4");
    let walk_empty6 = t("walk:empty", "allowed-v6");
    let walk_n10k4 = t("walk:n10k", "allowed-v4");
    let walk_full4 = t("walk:geo_n10k", "allowed-v4");
    let walk_full6 = t("walk:geo_n10k", "allowed-v6");
    let lpm4 = t("lpm:v4", "allowed-v4");
    let lpm6 = t("lpm:v6", "allowed-v6");
    let _ = writeln!(
        s,
        "- **Fixed cost.** The test-run loop with an allow-all program costs {allow:.1} ns per run; bulkhead's \
         `bh_egress` with the empty policy costs {empty:.1} ns on the same IPv4 packets, so the decision path \
         itself (the socket's cgroup's domain from a per-cgroup cache, its ancestry walked once per policy \
         generation; packet parse, socket-storage lookup, \
         an address-table walk that ends at the root, the decision, per-CPU counters) is about {:.0} ns.",
        empty - allow
    );
    let _ = writeln!(
        s,
        "- **Domain networks.** 10k networks add {:.1} ns over empty (IPv4): they live in the same table as \
         the countries, so they only lengthen some walks (bare walk {walk_n10k4:.1} ns against {walk_empty4:.1} ns \
         on the empty table).",
        n10k - empty
    );
    let _ = writeln!(
        s,
        "- **Country database.** The full DB adds {:.1} ns (IPv4). Full DB + 10k networks: {full:.1} ns = {:.2}× \
         empty (IPv4), {full6:.1} ns = {:.2}× (IPv6); net of the test-run loop: {:.2}× / {:.2}×. The bare walk of \
         that table costs {walk_full4:.1} ns (IPv4) / {walk_full6:.1} ns (IPv6) against {walk_empty4:.1} / \
         {walk_empty6:.1} ns on the empty one; one lookup in a plain LPM trie of only the allowed prefixes costs \
         {lpm4:.1} / {lpm6:.1} ns.",
        geo - empty,
        full / empty,
        full6 / empty6,
        (full - allow) / (empty - allow),
        (full6 - t("allow-all", "allowed-v6")) / (empty6 - t("allow-all", "allowed-v6")),
    );
    let rnd = t("geo_n10k", "random-v4");
    let _ = writeln!(
        s,
        "- **Denied traffic** (random-v4 under the full policy: mostly `country-denied`, each asking for an event): \
         {rnd:.1} ns vs {full:.1} ns for allowed destinations. The event path (TAI clock, per-cgroup token bucket \
         in an LRU hash, ring-buffer reserve or the rate-limited/lost counter) is paid here; the walk itself is \
         short for random addresses ({:.1} ns bare), most of which land in blocks of one verdict. Denied \
         connections stop at `connect()`, so in steady state the packet hooks mostly see allowed traffic.",
        t("walk:geo_n10k", "random-v4")
    );
    let (_, cold_full) = timing(r, "geo_n10k", "allowed-v4");
    let (_, cold_empty) = timing(r, "empty", "allowed-v4");
    let (_, cold_walk) = timing(r, "walk:geo_n10k", "allowed-v4");
    let (_, cold_lpm) = timing(r, "lpm:v4", "allowed-v4");
    let _ = writeln!(
        s,
        "- **Cold caches.** With one decision per syscall (caches disturbed in between) the full policy costs \
         {cold_full:.1} ns vs {cold_empty:.1} ns empty ({:.2}×). A walk reads at most five words for IPv4 (each \
         node a cache line or a few), an LPM trie lookup one node per branching bit: cold, the bare walk takes \
         {cold_walk:.1} ns and the LPM lookup {cold_lpm:.1} ns.",
        cold_full / cold_empty
    );
    let p = policy(r, "geo_n10k");
    let ready = f(&p["ready_ms"]);
    let check = f(&p["check_ms"]);
    let _ = writeln!(
        s,
        "- **Load time.** `bulkhead check` (parse, read the DB, compile) takes {check:.0} ms of the {ready:.0} ms to \
         READY; the rest ({:.0} ms) is almost all loading and verifying the programs ({:.0} ms on its own with the \
         empty policy): the address table goes into its slot with one copy through `mmap`, the classes and the \
         few hash maps with one syscall per entry. The database is read (both families at once), merged by \
         verdict and turned into the table on two threads. In CPU time: {:.0} ms to READY, {:.0} ms of it in \
         `check`. nftables needs {:.0} ms ({:.0} ms CPU) for its range-shaped elements. A reload that reads the \
         database again takes {:.0} ms (the compile + load target).",
        ready - check,
        f(&policy(r, "empty")["ready_ms"]) - f(&policy(r, "empty")["check_ms"]),
        f(&p["ready_cpu_ms"]),
        f(&p["check_cpu_ms"]),
        f(&r["network"]["nft"]["load_ms"]),
        f(&r["network"]["nft"]["load_cpu_ms"]),
        f(&r["update"]["first_reload_ms"]),
    );
    let e = policy(r, "empty");
    let words = compiled_counts(p["compiled"].as_str().unwrap_or(""))
        .get(5)
        .copied()
        .unwrap_or(0);
    let _ = writeln!(
        s,
        "- **Memory.** The agent holds {:.1} MB RSS with the full policy against {:.1} MB with the empty one; \
         of the difference, {:.1} MB is the address table it keeps for `explain` and for the next slot, the rest \
         mostly the geo sources' country ranges, kept to name countries in events (packed: 10 bytes an IPv4 range, \
         34 an IPv6 one; the database file itself is not kept). Allocations from 256 KiB up get pages of their own, \
         so what a compile frees goes back to the kernel. `bulkhead check` of the same policy peaks at \
         {:.1} MB. The kernel maps take {:.1} MB, most of it the address table's two preallocated 16 MiB slots.",
        f(&p["rss_kib"]) * 1024.0 / 1e6,
        f(&e["rss_kib"]) * 1024.0 / 1e6,
        words as f64 * 4.0 / 1e6,
        f(&p["check_peak_rss_kib"]) * 1024.0 / 1e6,
        f(&p["kernel_maps"]["total_bytes"]) / 1e6
    );
    let rr = net_test(r, "tcp_rr");
    let tp = net_test(r, "udp_tp");
    let pairs = |t: &Value, mode: &str| -> Vec<f64> {
        let rounds = |m: &str| -> Vec<f64> {
            t["modes"][m]["rounds"]
                .as_array()
                .map(|a| a.iter().map(f).collect())
                .unwrap_or_default()
        };
        rounds(mode)
            .iter()
            .zip(rounds("none"))
            .map(|(a, b)| a / b)
            .collect()
    };
    let paired = |t: &Value, mode: &str| 100.0 * f(&t["modes"][mode]["paired_ratio_median"]);
    let unit = |test: &str| &r["network"]["bpf_stats"]["by_test"][test]["per_unit"];
    let ab = |test: &str, mode: &str| 100.0 * interleaved(r, test, mode);
    // The send rate interleaved when the run has it (older runs: separate
    // runs' per-round pairs).
    let send_interleaved = interleaved(r, "udp_tp", "bulkhead").is_finite();
    let send = |mode: &str| {
        if send_interleaved {
            ab("udp_tp", mode)
        } else {
            paired(tp, mode)
        }
    };
    let send_how = if send_interleaved {
        "interleaved"
    } else {
        "separate runs"
    };
    let _ = writeln!(
        s,
        "- **On the wire.** Interleaved TCP_RR with bulkhead is {:.1}% of no policy, nftables {:.1}%; a second \
         no-policy connection lands at {:.1}%, so the method resolves a few tenths of a percent. Separate runs \
         cannot: sockperf's per-round TCP_RR pairs (bulkhead against no policy, seconds apart) scatter with \
         a standard deviation of {:.1}%, and their median lands at {:.1}%. The hooks' own run time per TCP transaction \
         is {:.0} ns ({:.1}% of the transaction, bpf_stats included): `bh_egress` and `bh_ingress` on the \
         client, each taking the verdict cached on the established socket (valid for the policy generation \
         and until the domain's or bridge's expiry) instead of deciding again; the kernel's dispatch of a \
         cgroup program and the socket-storage lookup make up the rest of the difference. A datagram \
         socket's verdict is remembered for its peer (address, port, own port, direction): a datagram to or \
         from that peer parses its headers and compares, skipping the cgroup walk, the address table and \
         the rules; a connected one, once its peer has answered, takes it like an established TCP \
         socket while it stays connected. UDP_RR is {:.1}% interleaved (nftables {:.1}%). The UDP 64-byte send rate is {:.1}% with \
         bulkhead and {:.1}% with nftables ({}): an unconnected `sendto()` to the socket's previous \
         destination takes the verdict `sendmsg4` remembered on the socket (valid for the same cgroup and \
         policy generation while no socket has been bound since, so a new listener is never missed), then \
         the packet hook's remembered one: {:.0} ns per message ({:.1}% of it).{}",
        ab("tcp_rr", "bulkhead"),
        ab("tcp_rr", "nftables"),
        ab("tcp_rr", "none_again"),
        100.0 * stdev(&pairs(rr, "bulkhead")),
        paired(rr, "bulkhead"),
        f(&unit("tcp_rr")["ns"]),
        100.0 * f(&unit("tcp_rr")["share"]),
        ab("udp_rr", "bulkhead"),
        ab("udp_rr", "nftables"),
        send("bulkhead"),
        send("nftables"),
        send_how,
        f(&unit("udp_tp")["ns"]),
        100.0 * f(&unit("udp_tp")["share"]),
        if r["network"]["interleaved"]["tcp_rr"]["modes"]["bulkhead_nogeo"].is_object() {
            format!(
                " A domain without country rules costs about the same (interleaved TCP_RR {:.1}%, UDP_RR \
                 {:.1}%): the address-table walk is a small part of the per-packet cost.",
                ab("tcp_rr", "bulkhead_nogeo"),
                ab("udp_rr", "bulkhead_nogeo"),
            )
        } else {
            String::new()
        },
    );
    connects(&mut s, r);
    let _ = writeln!(
        s,
        "- **Layout.** Domain networks and every country verdict are one class per address, found by a \
         multibit trie in one array map: a 16-bit root per family, then nodes of 16 entries (256 where most of \
         the children would be nodes themselves), each word a class or the next node, identical nodes shared. \
         The verifier inlines every array access, so a step is a few instructions; the bare walk costs \
         {walk_full4:.1} ns (IPv4) and {walk_full6:.1} ns (IPv6) against {lpm4:.1} and {lpm6:.1} ns for one LPM \
         trie lookup, and the decision needs one walk where LPM tries needed two lookups (networks, then \
         countries). It serves both families (a flat direct index does not scale to IPv6), and it is written by \
         one memory copy instead of one trie insert per prefix."
    );
    s
}

/// Section 5: the sealed trail's cost.
fn trail(r: &Value) -> String {
    let mut s = String::from("\n## 5. Audit trail: the hash chain's cost\n\n");
    let t = &r["trail"];
    if t.is_null() {
        s.push_str("Not measured in this run.\n");
        return s;
    }
    let _ = writeln!(
        s,
        "Each writer alone (`agent/examples/trail_rate.rs`): {} events handed to a fresh events log or audit store as fast as its queue takes them, unsealed and sealed (`audit setup-keys`) alternating, median of {} rounds each. *Rate* is events written per second (the producer shares the 2 cores); *writer CPU* is the writer thread's own CPU time per event, from which its capacity follows.\n",
        t["events"], t["rounds"]
    );
    s.push_str("| output | unsealed events/s | sealed events/s | sealed / unsealed | writer CPU unsealed | writer CPU sealed | writer capacity sealed / unsealed |\n|---|---|---|---|---|---|---|\n");
    for (key, label) in [
        ("events_log", "events log"),
        ("audit_store", "audit store (SQLite)"),
    ] {
        let o = &t[key];
        let _ = writeln!(
            s,
            "| {label} | {} | {} | {:.1}% | {:.0} ns | {:.0} ns | {:.1}% |",
            fmt_num(f(&o["unsealed_per_s"])),
            fmt_num(f(&o["sealed_per_s"])),
            100.0 * f(&o["ratio"]),
            f(&o["writer_ns_unsealed"]),
            f(&o["writer_ns_sealed"]),
            100.0 * f(&o["capacity_ratio"]),
        );
    }
    let runs = r["storm"]["runs"].as_array().cloned().unwrap_or_default();
    let run = |k: &str| runs.iter().find(|x| x["key"] == k).cloned();
    if let (Some(a), Some(b)) = (run("unlimited"), run("unlimited_sealed")) {
        let rate = |x: &Value| f(&x["events_delivered"]) / f(&x["delivered_by_s"]).max(1e-9);
        let _ = writeln!(
            s,
            "\nThe whole agent in the deny storm above (events log and audit store, no rate limit): {} events delivered in {:.2} s unsealed, {} in {:.2} s sealed: {:.1}% of the unsealed rate.",
            a["events_delivered"],
            f(&a["delivered_by_s"]),
            b["events_delivered"],
            f(&b["delivered_by_s"]),
            100.0 * rate(&b) / rate(&a).max(1e-9),
        );
    }
    s
}

/// Issue 19: learning from DNS answers and connects with learned names,
/// against the same traffic under the policy without names.
fn names(r: &Value) -> String {
    let mut s = String::from("\n## 6. Names: learning from DNS answers\n\n");
    let n = &r["names"];
    if n.is_null() {
        s.push_str("Not measured in this run.\n");
        return s;
    }
    let _ = writeln!(
        s,
        "A workload looks up {} names at a real resolver (`dnsmasq`, another namespace), then makes {} UDP `connect()`s to their addresses round robin (a UDP connect sends nothing: the hook and the syscall remain). Run time per call from `kernel.bpf_stats_enabled` (which adds two clock reads to each), under the same domain with and without `egress.names: {{ allow: [\"*.bench.test\"] }}` (with: every answer copied, parsed, matched and its address learned by `bh_dns_ingress`, which `bh_ingress` enters by a tail call once it lets the answer pass, so its time counts under `bh_ingress`; {} addresses learned when the connects run).\n",
        n["with"]["bh_ingress"]["lookups"]["n"],
        n["with"]["bh_connect4"]["connects"]["n"],
        n["with"]["bh_ingress"]["lookups"]["ok"],
    );
    s.push_str(
        "| program, per call | without names | with names | with / without |\n|---|---|---|---|\n",
    );
    for (prog, what) in [
        (
            "bh_ingress",
            "`bh_ingress` (with `bh_dns_ingress`), per answer",
        ),
        ("bh_connect4", "`bh_connect4`, per connect"),
    ] {
        let _ = writeln!(
            s,
            "| {what} | {:.0} ns | {:.0} ns | {:.2}× |",
            f(&n["without"][prog]["ns_per_call"]),
            f(&n["with"][prog]["ns_per_call"]),
            f(&n[format!("{prog}_ratio")]),
        );
    }
    let c = &n["with"]["bh_connect4"]["connects"];
    let _ = writeln!(
        s,
        "\nWith names, {} of {} connects were allowed (`name-allowed`), {} refused.",
        c["ok"], c["n"], c["eperm"]
    );
    // A lookup's round trip: the answer learned in the kernel on its way,
    // against the floor of the proxy design (a forwarding hop, no map
    // updates, no holding).
    if n["proxy"].is_null() {
        return s;
    }
    let per_lookup = |v: &Value| f(&v["secs"]) * 1e6 / f(&v["n"]).max(1.0);
    let direct = per_lookup(&n["without"]["direct"]);
    let learned = per_lookup(&n["with"]["direct"]);
    let proxy = per_lookup(&n["proxy"]);
    let _ = writeln!(
        s,
        "\nA lookup's round trip, {} sequential lookups from one client (the workload's wait for each answer; median of {} rounds, no `bpf_stats`):\n\n\
         | resolver path | µs per lookup | against direct |\n|---|---|---|\n\
         | direct, no names | {direct:.1} | 1.00× |\n\
         | direct, answers learned in the kernel on their way (bulkhead) | {learned:.1} | {:.2}× |\n\
         | through a forwarding proxy (`dnsmasq --cache-size=0`), no names | {proxy:.1} | {:.2}× |\n\n\
         The proxy row is the floor of the design that holds answers in a DNS proxy until the datapath knows their addresses: it has the extra hop only, none of the proxy's map updates or its hold.",
        n["proxy"]["n"],
        n["proxy"]["rounds"].as_array().map_or(0, Vec::len),
        learned / direct,
        proxy / direct,
    );
    s
}

/// Where a new connection's hook time goes, from the `perf` profile of
/// `tcp_crr` (runs without one say nothing).
fn connects(s: &mut String, r: &Value) {
    let st = &r["network"]["bpf_stats"];
    let p = &st["profile"]["tcp_crr"]["bh_connect4"];
    if p["samples"].as_u64().unwrap_or(0) < MIN_SAMPLES {
        return;
    }
    let ns = f(&st["by_test"]["tcp_crr"]["bh_connect4"]["ns_per_call"]);
    let part = |k: &str| share_cell(p["shares"][k].as_f64().unwrap_or(0.0), ns);
    let unit = &st["by_test"]["tcp_crr"]["per_unit"];
    let charged = storage_charge(&r["meta"]).0;
    let _ = writeln!(
        s,
        "- **Connects.** The hooks cost {:.0} ns per TCP connection ({:.1}% of its time). `bh_connect4` takes \
         {ns:.0} ns per call: {} creating the socket's storage (`bpf_sk_storage_get` with `F_CREATE`: the \
         kernel allocates the storage and its element, each charged to the memory cgroup that made the map{charged}, \
         and links them), {} the listener lookup (`bpf_sk_lookup_tcp`: a connect to a local listener of another domain \
         crosses domains, and a cgroup program cannot tell whether an address is local; a filter by bound port \
         would miss sockets that an `sk_lookup` program steers connections to), {} its own instructions. The \
         storage is what the connection's packets read: it marks the socket as the side that connected (its \
         packets are judged by the egress rules) and holds the connect's verdict, which the SYN compares with its own destination (a later connect \
         program may have rewritten it) and, matching, makes hold for every later packet of the socket \
         without a parse: without it the connect hook would be cheaper and every packet of the connection \
         dearer.",
        f(&unit["ns"]),
        100.0 * f(&unit["share"]),
        part("socket storage created"),
        part("listener lookup"),
        part("own instructions"),
    );
}

/// A share `x` of a call's `ns`, as the profile shows it.
fn share_cell(x: f64, ns: f64) -> String {
    format!("{:.0} ns ({:.0}%)", x * ns, 100.0 * x)
}

/// Fewer samples than this in a program say too little to split it.
const MIN_SAMPLES: u64 = 20;

/// Where each hook's time goes, from the `perf` profile of the bpf_stats
/// run: its run time per call split by what the samples inside it were
/// doing.
fn profile_table(s: &mut String, st: &serde_json::Map<String, Value>) {
    let Some(prof) = st.get("profile").and_then(Value::as_object) else {
        return;
    };
    let mut parts: Vec<String> = Vec::new();
    for p in prof
        .values()
        .filter_map(Value::as_object)
        .flat_map(|t| t.values())
    {
        for k in p["shares"].as_object().into_iter().flat_map(|m| m.keys()) {
            if !parts.contains(k) {
                parts.push(k.clone());
            }
        }
    }
    // Own instructions first, then the largest parts overall.
    parts.sort_by_key(|k| k != "own instructions");
    s.push_str(
        "\n**Where a hook's time goes.** `perf record -a -g` at 20 kHz during one more \
         bulkhead-mode run of the test; each sample taken inside a program is counted under \
         what the program was doing (its own instructions, map lookups the verifier inlines \
         included, or the kernel function it had called), and its run time per call in that \
         test (bpf_stats) is split in those shares.\n\n",
    );
    let _ = writeln!(
        s,
        "| test | program | samples | ns per call | {} |",
        parts.join(" | ")
    );
    let _ = writeln!(s, "|---|---|---|---|{}", "---|".repeat(parts.len()));
    for (test, t) in prof {
        if let Some(e) = t.get("error") {
            let _ = writeln!(s, "| {test} | not profiled: {} |", e.as_str().unwrap_or(""));
            continue;
        }
        let Some(t) = t.as_object() else { continue };
        for (prog, p) in t {
            let n = p["samples"].as_u64().unwrap_or(0);
            if n < MIN_SAMPLES {
                continue;
            }
            let ns = f(&st["by_test"][test][prog]["ns_per_call"]);
            let cells: Vec<String> = parts
                .iter()
                .map(|k| {
                    p["shares"][k]
                        .as_f64()
                        .map_or("–".into(), |x| share_cell(x, ns))
                })
                .collect();
            let _ = writeln!(
                s,
                "| {test} | `{prog}` | {n} | {ns:.0} | {} |",
                cells.join(" | ")
            );
        }
    }
}

/// What the socket storage is charged to in this run, from the agent's
/// start-up line (`meta.socket_storage`): a parenthesis for the connects'
/// paragraph and a clause for the setup table.
fn storage_charge(meta: &Value) -> (&'static str, &'static str) {
    let line = meta["socket_storage"].as_str().unwrap_or("");
    if line.contains("root memory cgroup") {
        (
            " (none here: the agent made the map from the root memory cgroup, README, Memory)",
            "the socket storage map made from the root memory cgroup, charged to none",
        )
    } else if line.contains("charged to this agent") {
        (
            " (the agent's own here, as under systemd or in a pod)",
            "the socket storage charged to the agent's memory cgroup",
        )
    } else if meta["agent_memcg"].is_string() {
        (
            " (the agent's own, unless it made the map from the root memory cgroup: README, Memory)",
            "the socket storage's charge not recorded",
        )
    } else {
        ("", "")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_hook_gets_a_row_against_the_empty_policy() {
        let mut r =
            json!({"decision": {"hooks": {"passes": 4, "rounds": 3, "hooks": {}}, "timings": []}});
        for (i, p) in std::iter::once("allow-all").chain(LADDER).enumerate() {
            for (hook, _) in &HOOK_ROWS[..4] {
                r["decision"]["hooks"]["hooks"][*hook][p] =
                    json!({"ns_per_call": 100.0 * (i + 1) as f64});
            }
            for set in ["allowed-v4", "allowed-v6"] {
                r["decision"]["timings"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"prog": p, "set": set, "warm_ns": 10.0 * (i + 1) as f64, "cold_ns": 1.0}));
            }
        }
        let mut s = String::new();
        hooks_section(&mut s, &r);
        let rows: Vec<&str> = s.lines().filter(|l| l.starts_with("| `")).collect();
        assert_eq!(rows.len(), HOOK_ROWS.len(), "{s}");
        // r0 = 1 at 100 ns, empty at 200, the full policy at 600: 3×.
        assert!(rows[0].starts_with("| `connect4`"), "{}", rows[0]);
        assert!(
            rows[0].contains("| 100 ns | 200 ns |") && rows[0].ends_with("| 3.00× |"),
            "{}",
            rows[0]
        );
        assert!(
            rows[4].contains("| 10 ns | 20 ns |") && rows[4].ends_with("| 3.00× |"),
            "{}",
            rows[4]
        );
        let (cats, series) = hooks_chart(&r).expect("chart");
        assert_eq!(cats.len(), HOOK_ROWS.len());
        assert_eq!(series.len(), LADDER.len() + 1);
        // Not measured: a line saying why, and no chart.
        let failed = json!({"decision": {"hooks": {"error": "no bpf_stats"}}});
        let mut s = String::new();
        hooks_section(&mut s, &failed);
        assert!(s.contains("not measured (no bpf_stats)"), "{s}");
        assert!(hooks_chart(&failed).is_none());
    }

    #[test]
    fn chart_is_svg_with_bars() {
        let svg = bar_chart(
            "t",
            "y",
            &["a".into(), "b".into()],
            &[
                ("s1".into(), vec![1.0, 2.0]),
                ("s2".into(), vec![f64::NAN, 3.0]),
            ],
            Some((1.5, "ref")),
        );
        assert!(svg.starts_with("<svg"));
        assert_eq!(svg.matches("<rect x=").count(), 3 + 2);
        assert!(svg.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn compiled_line() {
        assert_eq!(
            compiled_counts(
                "compiled: 10 cgroups present now, 8000 IPv4 + 2000 IPv6 domain networks, 97843 IPv4 + 127551 IPv6 geo ranges; address table 2033552 words (7943 KiB) in 10063 IPv4 + 10967 IPv6 nodes, 3 classes"
            ),
            [
                10, 8000, 2000, 97843, 127551, 2033552, 7943, 10063, 10967, 3
            ]
        );
    }

    #[test]
    fn numbers() {
        assert_eq!(fmt_num(1234567.0), "1.23M");
        assert_eq!(fmt_num(12345.0), "12k");
        assert_eq!(fmt_num(123.4), "123");
        assert_eq!(fmt_num(12.34), "12.3");
        assert_eq!(fmt_num(f64::NAN), "–");
    }
}
