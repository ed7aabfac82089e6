//! `dump`, `prepare` and `detach`: what is pinned under the bpffs
//! directory, read, made or removed directly, with no agent in between.

use std::{
    fs,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context as _, Result};

use bulkhead::{
    kernel::{self, maps},
    runtime::{agent, events},
};

/// `dump`: the pinned policy maps as JSON; learned addresses with their
/// domain and rule, as the agent keeps them in its state directory.
pub fn dump(bpffs_dir: PathBuf, state_dir: Option<PathBuf>) -> Result<ExitCode> {
    let pins = kernel::Pins::found(bpffs_dir.clone())?;
    let mut out = maps::dump(&pins.maps())?;
    let state_dir = state_dir.unwrap_or_else(|| super::args::default_state_dir(&bpffs_dir));
    let kept = events::kept_names(&agent::names_file(&state_dir, &pins.layout));
    if let Some(learned) = out["learned"].as_array_mut() {
        for l in learned {
            name_learned(l, &kept);
        }
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(ExitCode::SUCCESS)
}

/// Adds `domain` and `name` to a learned address of [`maps::learned`],
/// where the kept names know them.
fn name_learned(l: &mut serde_json::Value, kept: &events::KeptNames) {
    let Some(key) = l["domain_key"].as_u64().map(|k| k as u32) else {
        return;
    };
    let wildcard = u8::from(l["wildcard"].as_bool().unwrap_or(false));
    let hash = l["rule_hash"]
        .as_str()
        .and_then(|h| u64::from_str_radix(h, 16).ok());
    let domain = kept.domains.get(&key).cloned();
    let name = hash.and_then(|h| kept.rules.get(&(key, wildcard, h)).cloned());
    l["domain"] = domain.into();
    l["name"] = name.into();
}

/// `prepare`: the socket storage map, made uncharged before `run` (see
/// `kernel::Storage`); with `warn_only`, success even where it could not,
/// for an init container that must not keep the agent from starting (the
/// agent then meets the same trouble and reports it).
pub fn prepare(bpffs_dir: &Path, warn_only: bool) -> Result<ExitCode> {
    let failed = if warn_only {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    };
    let (made, maps) = match make_storage(bpffs_dir) {
        Ok(made) => made,
        Err(e) if warn_only => {
            eprintln!("bulkhead prepare: {e:#}; the agent will make the socket storage map");
            return Ok(failed);
        }
        Err(e) => return Err(e),
    };
    // To stderr, where the unit's other lines go (journal).
    match made {
        kernel::Storage::Charged(why) => {
            eprintln!(
                "bulkhead prepare: the socket storage map could not be made from the root memory \
                 cgroup ({why}); the agent will make it, charged to its own memory cgroup"
            );
            Ok(failed)
        }
        kernel::Storage::Adopted => {
            eprintln!(
                "bulkhead prepare: the socket storage map is pinned already (at {}); nothing to do",
                maps.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        made => {
            eprintln!("bulkhead prepare: {}", made.describe());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The pin directories, kept as `run` keeps them (refused if someone else
/// owns them, closed to everyone but their owner), and the map in them;
/// how it came to be, and the maps directory.
fn make_storage(bpffs_dir: &Path) -> Result<(kernel::Storage, PathBuf)> {
    kernel::ensure_bpffs(bpffs_dir)?;
    let pins = kernel::Pins::new(bpffs_dir.to_path_buf(), kernel::layout()?);
    fs::create_dir_all(&pins.root).with_context(|| format!("creating {}", pins.root.display()))?;
    kernel::secure(&pins)?;
    let made = kernel::prepare_storage(&pins)?;
    kernel::secure(&pins)?;
    Ok((made, pins.maps()))
}

/// `detach`: enforcement stops.
pub fn detach(bpffs_dir: &Path, force: bool) -> Result<ExitCode> {
    if !force && kernel::is_locked(bpffs_dir) {
        anyhow::bail!(
            "an agent is running with {}; stop it first (its exit keeps enforcement pinned) or pass --force",
            bpffs_dir.display()
        );
    }
    let removed = kernel::detach(bpffs_dir)?;
    println!(
        "detached: removed {} pinned objects under {}",
        removed.len(),
        bpffs_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}
