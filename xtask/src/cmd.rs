//! Running external commands: every command is echoed (`+ cmd args`) before
//! it runs, and a failure names the command and its exit status.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// The workspace root (the parent of `xtask/`).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// A `cargo` command run from the workspace root.
///
/// Uses the `cargo` on `PATH` (the rustup proxy), not `$CARGO`, so that
/// `rustup run nightly cargo` and plain `cargo` agree on where cargo lives.
pub fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root());
    cmd
}

/// `--locked` in CI, so a stale Cargo.lock fails instead of being rewritten.
pub fn locked() -> &'static [&'static str] {
    if in_ci() { &["--locked"] } else { &[] }
}

/// A `cargo` command run with the nightly toolchain (for the eBPF crate).
pub fn cargo_nightly() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo"])
        .current_dir(workspace_root());
    cmd
}

/// Echoes `cmd`, runs it with inherited stdio and fails unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = display(cmd);
    eprintln!("+ {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` quietly (a check, not an action) and returns its stdout when
/// it exits 0, or `None` when it cannot start or fails.
pub fn probe(cmd: &mut Command) -> Option<String> {
    let output = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Echoes `cmd`, runs it and returns its stdout (stderr is inherited);
/// fails unless it exits 0.
pub fn run_capture(cmd: &mut Command) -> Result<String> {
    let shown = display(cmd);
    eprintln!("+ {shown}");
    let output = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !output.status.success() {
        bail!("`{shown}` failed ({})", output.status);
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The command as a shell would show it: `[cd DIR &&] [VAR=value ...] prog args`.
pub fn display(cmd: &Command) -> String {
    let mut parts = Vec::new();
    if let Some(dir) = cmd.get_current_dir()
        && dir != workspace_root()
    {
        parts.push(format!("cd {} &&", quote(dir.as_os_str())));
    }
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            parts.push(format!("{}={}", key.to_string_lossy(), quote(value)));
        }
    }
    parts.push(quote(cmd.get_program()));
    parts.extend(cmd.get_args().map(quote));
    parts.join(" ")
}

/// Quotes `s` for a POSIX shell when it contains anything but safe characters.
fn quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    let safe = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+^@%".contains(c));
    if safe {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Whether the process runs with effective uid 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Whether we run in CI (`CI` set to anything but empty, `0` or `false`),
/// where a skipped privileged test is a failure.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "0" && v != "false")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_like_a_shell() {
        let mut cmd = cargo();
        cmd.env("BULKHEAD_BIN", "/a b/bulkhead")
            .args(["test", "--", "it's", "--test-threads=1"]);
        assert_eq!(
            display(&cmd),
            r"BULKHEAD_BIN='/a b/bulkhead' cargo test -- 'it'\''s' --test-threads=1"
        );
    }
}
