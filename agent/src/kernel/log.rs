//! The kernel programs' own log (aya-log), forwarded into the agent's.

use anyhow::{Context as _, Result};
use aya::Ebpf;

/// The kernel programs' log records (aya-log: rare paths only, see
/// agent-ebpf's `log.rs`), each with its program as the `log` target
/// (`bulkhead::kernel::bh_ingress`, ...).
pub type KernelLog = aya_log::EbpfLogger<&'static dyn log::Log>;

/// Takes the kernel log's ring buffer out of `ebpf`, to be read by
/// [`drive_kernel_log`]. Call it after [`verify_all`]: the loaded programs
/// hold the ring buffer open, so a logger dropped later closes nothing
/// they need (taken before they load, it would). `None` when the object
/// has no log sites, which is not an error.
pub fn start_kernel_log(ebpf: &mut Ebpf) -> Result<Option<KernelLog>> {
    match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => Ok(Some(logger)),
        Err(aya_log::Error::MapNotFound) => Ok(None),
        Err(e) => Err(e).context("opening the kernel programs' log"),
    }
}

/// Forwards the kernel's log records into the `log` crate as they arrive,
/// for as long as the agent runs: a task on the agent's tokio runtime
/// (`tokio::spawn(drive_kernel_log(logger))`), woken by the ring buffer's
/// fd, so no thread polls. Records that arrive while nothing reads are
/// kept until the ring buffer is full, then dropped by the kernel.
pub async fn drive_kernel_log(logger: KernelLog) -> Result<()> {
    use tokio::io::{Interest, unix::AsyncFd};
    // SAFETY: the logger owns the ring buffer's fd for its whole life and
    // always returns that one.
    let mut fd = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(std::io::Error::from)
        .context("watching the kernel programs' log")?;
    loop {
        let mut ready = fd
            .readable_mut()
            .await
            .context("waiting for the kernel programs' log")?;
        ready.get_inner_mut().flush();
        ready.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use std::{path::PathBuf, time::Duration};

    use super::*;
    use crate::kernel::{Pins, detach, ensure_bpffs, layout, load, load::EBPF_OBJECT, verify_all};

    /// The kernel log opens on the real object once its programs are
    /// verified, and a task drives it. Needs root (loading programs): the
    /// unprivileged unit test run skips it with the reason; as root a
    /// missing object or bpffs fails it under CI.
    #[test]
    fn kernel_log_starts_after_verification() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: needs root to load BPF programs");
            return;
        }
        let skip = |why: &str| {
            assert!(std::env::var_os("CI").is_none(), "{why}");
            eprintln!("SKIPPED: {why}");
        };
        if EBPF_OBJECT.is_empty() {
            return skip("built without the kernel programs (bpf-linker missing)");
        }
        let root = PathBuf::from(format!(
            "/sys/fs/bpf/bulkhead-test-log-{}",
            std::process::id()
        ));
        if ensure_bpffs(&root).is_err() {
            return skip("no bpffs");
        }
        let pins = Pins::new(root.clone(), layout().expect("layout"));
        let result = (|| -> Result<()> {
            let btf = crate::kernel::KernelBtf::read();
            let fallbacks = crate::kernel::features::probe().fallbacks();
            let (mut ebpf, _) = load(&pins, 4096, fallbacks, &btf)?;
            verify_all(&mut ebpf, &btf)?;
            let logger = start_kernel_log(&mut ebpf)?.context("no kernel log in the object")?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let driven =
                    tokio::time::timeout(Duration::from_millis(200), drive_kernel_log(logger));
                // Nothing logs here: the task is still waiting when the time is up.
                assert!(driven.await.is_err(), "the kernel log task ended");
            });
            // A second start on the same object finds its log taken: no
            // logger, not an error.
            assert!(start_kernel_log(&mut ebpf)?.is_none());
            Ok(())
        })();
        let _ = detach(&root);
        result.expect("kernel log");
    }
}
