//! Where a hook's time goes: `perf record -a -g` during one more run of a
//! network test, each sample taken inside a bulkhead program attributed to
//! what the program was doing at that moment: its own instructions (map
//! lookups the verifier inlines included) or the kernel function it had
//! called (a helper, and what the helper called). bpf_stats gives the
//! nanoseconds of a call; these shares split them.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

use crate::cmd::probe;

/// Samples per second and CPU: enough to put a few hundred samples in a
/// connect hook that takes 1% of the machine over a 2 s test.
const FREQ: &str = "20000";

/// A `perf record` running until [`Recording::finish`].
pub struct Recording {
    child: Child,
    path: PathBuf,
}

/// Starts recording every CPU with call graphs, or says why it cannot.
pub fn start(dir: &Path, test: &str) -> Result<Recording> {
    if probe(Command::new("perf").arg("--version")).is_none() {
        bail!("perf is not installed (Debian: linux-perf)");
    }
    // The JIT's symbols name the programs (`bpf_prog_<tag>_<name>`).
    let kallsyms = "/proc/sys/net/core/bpf_jit_kallsyms";
    if std::fs::read_to_string(kallsyms).is_ok_and(|s| s.trim() == "0") {
        std::fs::write(kallsyms, "1").context("enabling bpf_jit_kallsyms")?;
    }
    let path = dir.join(format!("perf-{test}.data"));
    let child = Command::new("perf")
        .args(["record", "-a", "-g", "-F", FREQ, "-q", "-o"])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting perf record")?;
    // perf opens its events before it records anything.
    std::thread::sleep(std::time::Duration::from_millis(500));
    Ok(Recording { child, path })
}

impl Recording {
    /// Stops recording and attributes the samples of `progs`.
    pub fn finish(mut self, progs: &[&str]) -> Result<Value> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait()?;
        let out = (|| {
            // perf ends by raising the SIGINT it caught, once its file is
            // written.
            if !status.success() && status.signal() != Some(libc::SIGINT) {
                bail!("perf record failed ({status})");
            }
            let mut script = Command::new("perf")
                .args(["script", "-F", "ip,sym", "-i"])
                .arg(&self.path)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .context("starting perf script")?;
            let stdout = script.stdout.take().context("perf script's output")?;
            let shares = attribute(BufReader::new(stdout).lines().map_while(Result::ok), progs);
            script.wait()?;
            Ok(shares)
        })();
        let _ = std::fs::remove_file(&self.path);
        out
    }
}

/// `perf script -F ip,sym` prints each sample as its stack, innermost
/// frame first, one `address symbol` per line, and a blank line after it. A sample is
/// counted for the innermost frame that is one of `progs`, under the frame
/// it had called (or "self").
pub fn attribute(lines: impl Iterator<Item = String>, progs: &[&str]) -> Value {
    let mut counts: BTreeMap<&str, BTreeMap<&'static str, u64>> = BTreeMap::new();
    let mut stack: Vec<String> = Vec::new();
    let mut flush = |stack: &mut Vec<String>| {
        let found = stack.iter().enumerate().find_map(|(i, f)| {
            progs
                .iter()
                .find(|p| f.starts_with("bpf_prog_") && f.ends_with(&format!("_{p}")))
                .map(|p| (i, *p))
        });
        if let Some((i, prog)) = found {
            *counts
                .entry(prog)
                .or_default()
                .entry(part(&stack[..i]))
                .or_default() += 1;
        }
        stack.clear();
    };
    for line in lines {
        let line = line.trim();
        if line.is_empty() {
            flush(&mut stack);
        } else {
            let sym = line.split_once(char::is_whitespace).map_or("", |(_, s)| s);
            stack.push(sym.trim().to_string());
        }
    }
    flush(&mut stack);
    let mut out = serde_json::Map::new();
    for (prog, parts) in counts {
        let total: u64 = parts.values().sum();
        let shares: serde_json::Map<String, Value> = parts
            .iter()
            .map(|(k, v)| ((*k).into(), json!(*v as f64 / total as f64)))
            .collect();
        out.insert(prog.into(), json!({"samples": total, "shares": shares}));
    }
    Value::Object(out)
}

/// What the program was doing, from the frames it had called (innermost
/// first; none: its own instructions).
fn part(called: &[String]) -> &'static str {
    let any = |names: &[&str]| called.iter().any(|f| names.contains(&f.as_str()));
    let Some(direct) = called.last() else {
        return "own instructions";
    };
    if any(&[
        "bpf_local_storage_update",
        "bpf_selem_alloc",
        "bpf_local_storage_alloc",
    ]) {
        "socket storage created"
    } else if direct.contains("sk_storage") {
        "socket storage looked up"
    } else if direct.contains("sk_lookup") || direct.contains("sk_release") {
        "listener lookup"
    } else if direct.contains("map_lookup") || direct.contains("map_update") {
        "hash map lookups"
    } else if direct.contains("ringbuf") {
        "event ring buffer"
    } else if direct.contains("ktime") {
        "clock"
    } else if direct.contains("cgroup_id") || direct.contains("cgroup_classid") {
        "cgroup id"
    } else if direct.contains("skb_load_bytes") {
        "packet reads"
    } else {
        "other helpers"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_go_to_what_the_program_had_called() {
        let script = "\
	ffffffff81000000 bpf_map_kzalloc
	ffffffff81000000 bpf_selem_alloc
	ffffffff81000000 bpf_local_storage_update
	ffffffff81000000 bpf_sk_storage_get
	ffffffff81000000 bpf_prog_92ac05f83043f72c_bh_connect4
	ffffffff81000000 __cgroup_bpf_run_filter_sock_addr

	ffffffff81000000 bpf_prog_92ac05f83043f72c_bh_connect4
	ffffffff81000000 __cgroup_bpf_run_filter_sock_addr

	ffffffff81000000 __inet_lookup_listener
	ffffffff81000000 bpf_sock_addr_sk_lookup_tcp
	ffffffff81000000 bpf_prog_92ac05f83043f72c_bh_connect4

	ffffffff81000000 bpf_sk_storage_get
	ffffffff81000000 bpf_prog_e91a3d734013f654_bh_egress

	ffffffff81000000 bpf_prog_e91a3d734013f654_bh_egress_other

	ffffffff81000000 tcp_v4_connect
";
        let v = attribute(
            script.lines().map(String::from),
            &["bh_connect4", "bh_egress"],
        );
        let c = &v["bh_connect4"];
        assert_eq!(c["samples"], 3);
        for part in [
            "socket storage created",
            "own instructions",
            "listener lookup",
        ] {
            assert!((c["shares"][part].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-9);
        }
        // Another program whose name only starts like one of ours is not it.
        assert_eq!(v["bh_egress"]["samples"], 1);
        assert_eq!(v["bh_egress"]["shares"]["socket storage looked up"], 1.0);
    }
}
