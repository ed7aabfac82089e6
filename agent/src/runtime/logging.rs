//! The agent's log: `tracing`, written to stderr as text (terminals and
//! systemd's journal) or one JSON object per line (Kubernetes and log
//! pipelines). The CLI's own output (check errors, status, events) is not
//! log output and does not come here.
//!
//! Records of the `log` crate (aya, aya-log: the kernel programs' own
//! messages) are captured into the same log.

use anyhow::{Context as _, Result};
use tracing_subscriber::{EnvFilter, fmt};

/// How log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    // `LEVEL span{fields}: message`, for people and the journal. (Plain
    // comments: doc comments here would turn `run --help` into its long form.)
    #[default]
    Text,
    // One JSON object per line: timestamp, level, target, fields, spans.
    Json,
}

/// Which records are written: `level` (`--log-level`), else
/// `BULKHEAD_LOG`, else `RUST_LOG`, else `info`. Each is a filter in
/// `RUST_LOG` syntax (`debug`, `info,bulkhead::runtime=debug`).
pub fn filter(level: Option<&str>) -> Result<EnvFilter> {
    let from_env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let spec = level
        .map(str::to_string)
        .or_else(|| from_env("BULKHEAD_LOG"))
        .or_else(|| from_env("RUST_LOG"))
        .unwrap_or_else(|| "info".into());
    EnvFilter::try_new(&spec).with_context(|| format!("bad log filter `{spec}`"))
}

/// Installs the agent's log for the rest of the process.
pub fn init(level: Option<&str>, format: LogFormat) -> Result<()> {
    let filter = filter(level)?;
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    let installed = match format {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
        // The journal stamps every line itself.
        LogFormat::Text if std::env::var_os("JOURNAL_STREAM").is_some() => {
            builder.with_target(false).without_time().try_init()
        }
        LogFormat::Text => builder.with_target(false).try_init(),
    };
    installed.map_err(|e| anyhow::anyhow!("installing the log: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_wins_and_bad_filters_are_refused() {
        assert_eq!(filter(Some("debug")).unwrap().to_string(), "debug");
        assert!(filter(Some("bulkhead=notalevel")).is_err());
    }
}
