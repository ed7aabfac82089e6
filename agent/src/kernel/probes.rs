//! Benchmark-only programs, in an object of their own.

use std::fs;

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{Ebpf, EbpfLoader, programs::CgroupSkb};

use super::{
    load::{explain_load_error, object, verifier},
    pins::Pins,
};

/// The benchmark-only programs, embedded apart from the production object
/// (agent-ebpf's `bulkhead-bench` binary), so production never carries them.
static BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bulkhead-bench"));

/// Programs only benchmarks use, loaded and pinned by `run --bench-probes`.
pub const PROBES: [&str; 1] = ["bh_probe_addr"];

/// Loads the benchmark object on the maps the agent's object (`_agent`,
/// loaded, so its maps are pinned) pinned, and pins [`PROBES`] under
/// [`Pins::probes`] (not attached: they only serve `BPF_PROG_TEST_RUN`).
/// Every map the probes use must already be pinned, or a probe would
/// measure a fresh empty map of its own.
pub fn pin_probes(_agent: &mut Ebpf, pins: &Pins) -> Result<()> {
    if BENCH_OBJECT.is_empty() {
        object()?;
        bail!("this bulkhead binary was built without its benchmark programs");
    }
    let bench =
        aya_obj::Object::parse(BENCH_OBJECT).context("parsing the embedded benchmark programs")?;
    for (name, m) in &bench.maps {
        if m.pinning() == aya_obj::maps::PinningType::ByName && !pins.maps().join(name).exists() {
            bail!(
                "the benchmark programs use map {name}, which the agent has not pinned under {}",
                pins.maps().display()
            );
        }
    }
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(pins.maps());
    let mut probes = loader
        .load(BENCH_OBJECT)
        .map_err(|e| explain_load_error(e.into()))?;
    fs::create_dir_all(pins.probes())
        .with_context(|| format!("creating {}", pins.probes().display()))?;
    for name in PROBES {
        let p: &mut CgroupSkb = probes
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing from the object"))?
            .try_into()?;
        p.load().map_err(|e| verifier(name, e.into()))?;
        let path = pins.probes().join(name);
        let _ = fs::remove_file(&path);
        p.pin(&path)
            .with_context(|| format!("pinning {}", path.display()))?;
    }
    Ok(())
}
