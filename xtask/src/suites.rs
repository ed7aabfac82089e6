//! The end-to-end test executables of `tests/`: built once, then run on the
//! host a few suites at a time (`cargo xtask test`) or packed into a VM's
//! initramfs (`cargo xtask vm-test`).
//!
//! Suites may run at once because every test owns what it touches: its
//! cgroups, namespaces, pins and control socket are named after its process
//! and a counter, and its addresses come from a network number no other
//! live test holds (`tests::net_id`, an `flock` shared by every test
//! process on the host). Inside a suite the tests still run one at a time,
//! as each suite was written for.

use std::{
    collections::{BTreeMap, VecDeque},
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{cargo, display, locked, workspace_root};

/// The test executables of the `tests` package, built by one
/// `cargo test --release --no-run`.
pub struct TestBins {
    /// The integration suites (`tests/tests/*.rs`) by target name.
    pub suites: BTreeMap<String, PathBuf>,
    /// The harness's own unit tests (its library and `probe`), by target
    /// name.
    pub harness: Vec<(String, PathBuf)>,
    /// The `probe` helper the suites run inside cgroups and namespaces.
    pub probe: PathBuf,
}

/// Builds the `tests` package's executables, for `target` when given (the
/// VMs' static musl build), else for the host.
pub fn build(target: Option<&str>) -> Result<TestBins> {
    let mut cmd = cargo();
    cmd.args(["test", "--release", "--package", "tests"]);
    if let Some(target) = target {
        cmd.args(["--target", target]);
    }
    cmd.args(["--no-run", "--message-format=json-render-diagnostics"])
        .args(locked())
        .stdout(Stdio::piped());
    eprintln!("+ {}", display(&cmd));
    let out = cmd.output().context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the end-to-end tests failed (`{}`)", display(&cmd));
    }
    let mut suites = BTreeMap::new();
    let mut harness = Vec::new();
    let mut probe = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(m) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if m["reason"] != "compiler-artifact" {
            continue;
        }
        let (Some(name), Some(exe)) = (m["target"]["name"].as_str(), m["executable"].as_str())
        else {
            continue;
        };
        let kinds = m["target"]["kind"].as_array().cloned().unwrap_or_default();
        let is_test = m["profile"]["test"].as_bool() == Some(true);
        if kinds.iter().any(|k| k == "test") {
            suites.insert(name.to_string(), PathBuf::from(exe));
        } else if is_test {
            harness.push((name.to_string(), PathBuf::from(exe)));
        } else if name == "probe" && kinds.iter().any(|k| k == "bin") {
            probe = Some(PathBuf::from(exe));
        }
    }
    let probe = probe.context("cargo built no `probe` binary")?;
    Ok(TestBins {
        suites,
        harness,
        probe,
    })
}

/// One executable to run, and what to call it in the report.
struct Job {
    name: String,
    exe: PathBuf,
}

/// Runs the harness's unit tests and every suite on the host, `jobs` at a
/// time, each with `--test-threads=1` and `test_args`, in the environment
/// `env`. Each one's output goes to `target/e2e/<name>.log` and is printed
/// whole when it ends, so the outputs of suites running at once are never
/// interleaved. Every suite runs even after one fails; the error names the
/// ones that failed.
pub fn run_host(
    bins: &TestBins,
    env: &[(&str, OsString)],
    jobs: usize,
    test_args: &[String],
) -> Result<()> {
    let mut queue: VecDeque<Job> = bins
        .harness
        .iter()
        .map(|(name, exe)| Job {
            name: format!("harness-{name}"),
            exe: exe.clone(),
        })
        .collect();
    queue.extend(bins.suites.iter().map(|(name, exe)| Job {
        name: name.clone(),
        exe: exe.clone(),
    }));
    let logs = workspace_root().join("target").join("e2e");
    run_jobs(queue, &logs, env, jobs, test_args)
}

/// Runs `queue` `jobs` at a time, as [`run_host`] describes.
fn run_jobs(
    queue: VecDeque<Job>,
    logs: &Path,
    env: &[(&str, OsString)],
    jobs: usize,
    test_args: &[String],
) -> Result<()> {
    fs::create_dir_all(logs).with_context(|| format!("creating {}", logs.display()))?;
    let total = queue.len();
    let workers = jobs.max(1);
    let queue = Mutex::new(queue);
    let failed = Mutex::new(Vec::new());
    let started = Instant::now();
    eprintln!(
        "e2e: {total} test executables, {workers} at a time; logs in {}",
        logs.display()
    );
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    // Taken in its own statement: the guard must not live
                    // while the job runs.
                    let next = queue.lock().unwrap().pop_front();
                    let Some(job) = next else { break };
                    if let Err(e) = run_one(&job, logs, env, test_args) {
                        eprintln!("e2e: {}: {e:#}", job.name);
                        failed.lock().unwrap().push(job.name);
                    }
                }
            });
        }
    });
    let failed = failed.into_inner().unwrap();
    let secs = started.elapsed().as_secs();
    if !failed.is_empty() {
        bail!(
            "{} of {total} test executables failed after {secs} s: {} (logs in {})",
            failed.len(),
            failed.join(", "),
            logs.display()
        );
    }
    eprintln!("e2e: all {total} test executables passed in {secs} s");
    Ok(())
}

/// Runs one executable with its output in its log, then prints the log.
fn run_one(job: &Job, logs: &Path, env: &[(&str, OsString)], test_args: &[String]) -> Result<()> {
    let log_path = logs.join(format!("{}.log", job.name));
    let log =
        fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = Command::new(&job.exe);
    // Where `cargo test` runs them: the package's directory.
    cmd.current_dir(workspace_root().join("tests"))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .arg("--test-threads=1")
        .args(test_args)
        .stdin(Stdio::null())
        .stdout(
            log.try_clone()
                .context("duplicating the log's descriptor")?,
        )
        .stderr(log);
    eprintln!("e2e: start {}", job.name);
    let began = Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{}`", display(&cmd)))?;
    let secs = began.elapsed().as_secs();
    let output = fs::read_to_string(&log_path).unwrap_or_default();
    // One write, so that a line of another thread cannot land inside it.
    let verdict = if status.success() { "ok" } else { "FAILED" };
    eprint!(
        "== e2e {}: {verdict} in {secs} s (`{}`)\n{output}",
        job.name,
        display(&cmd)
    );
    if !status.success() {
        bail!(
            "{status}; its output is above and in {}",
            log_path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    /// A script standing in for a test executable: it records that it ran
    /// and with what, then exits with `code`.
    fn script(dir: &Path, name: &str, code: i32) -> Job {
        let exe = dir.join(name);
        let body = format!(
            "#!/bin/sh\necho \"$NAME_ENV $*\" > {}/{name}.ran\nexit {code}\n",
            dir.display()
        );
        fs::write(&exe, body).unwrap();
        fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
        Job {
            name: name.to_string(),
            exe,
        }
    }

    #[test]
    fn every_executable_runs_and_a_failure_names_its_suite() {
        let dir = std::env::temp_dir().join(format!("xtask-suites-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let queue: VecDeque<Job> = [("a", 0), ("b", 1), ("c", 0), ("d", 0)]
            .into_iter()
            .map(|(n, code)| script(&dir, n, code))
            .collect();
        let env = [("NAME_ENV", OsString::from("set"))];
        let args = ["filter".to_string()];
        // One at a time: what runs after a failure runs in the same worker.
        let err = run_jobs(queue, &dir.join("logs"), &env, 1, &args).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("1 of 4") && msg.contains(": b "), "{msg}");
        for n in ["a", "b", "c", "d"] {
            let ran = fs::read_to_string(dir.join(format!("{n}.ran"))).unwrap();
            assert_eq!(ran.trim(), "set --test-threads=1 filter", "{n}");
            assert!(dir.join("logs").join(format!("{n}.log")).is_file(), "{n}");
        }
        let ok: VecDeque<Job> = ["e", "f", "g"].map(|n| script(&dir, n, 0)).into();
        run_jobs(ok, &dir.join("logs"), &env, 2, &args).unwrap();
        for n in ["e", "f", "g"] {
            assert!(dir.join(format!("{n}.ran")).is_file(), "{n}");
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
