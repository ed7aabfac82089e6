//! The commands that ask the running agent one thing and print its answer:
//! `status`, `reload` and `bridge open|close|list`.

use std::{path::Path, process::ExitCode};

use anyhow::Result;

use bulkhead::runtime::protocol::{Reply, Request, Response};

use super::{
    args::NewBridge,
    client::{call, unexpected},
    render,
};

/// `status`: as text, or with `--json` the agent's reply as it came.
pub fn status(run_dir: &Path, json: bool) -> Result<ExitCode> {
    let reply = call(run_dir, &Request::Status)?;
    let Response::Status(status) = reply else {
        return Err(unexpected(reply));
    };
    if json {
        let reply = Reply::from(Response::Status(status));
        println!("{}", serde_json::to_string_pretty(&reply)?);
    } else {
        print!("{}", render::status(&status));
    }
    Ok(ExitCode::SUCCESS)
}

/// `reload`: the generation now in force; a rejected policy is the error.
pub fn reload(run_dir: &Path) -> Result<ExitCode> {
    let reply = call(run_dir, &Request::Reload)?;
    let Response::Reloaded { generation, sha256 } = reply else {
        return Err(unexpected(reply));
    };
    println!("reloaded: generation {generation} (sha256 {sha256})");
    Ok(ExitCode::SUCCESS)
}

/// `bridge open`: until when, and from which policy generation.
pub fn bridge_open(run_dir: &Path, bridge: NewBridge) -> Result<ExitCode> {
    let reply = call(run_dir, &Request::BridgeOpen(bridge.into()))?;
    let Response::BridgeOpened {
        bridge: b,
        generation,
    } = reply
    else {
        return Err(unexpected(reply));
    };
    println!(
        "opened {} ({}) until {} (generation {generation})",
        b.name,
        render::route(&b.from, &b.to, &b.ports),
        bulkhead::clock::format_ts(b.expires as u64, 0),
    );
    Ok(ExitCode::SUCCESS)
}

/// `bridge open --cluster`.
#[cfg(feature = "k8s")]
pub fn cluster_bridge_open(b: NewBridge) -> Result<ExitCode> {
    use bulkhead::k8s::bridges;
    let route = render::route(&b.from, &b.to, &b.ports);
    let secs = b.for_secs;
    let name = bridges::create(b.into())?;
    println!(
        "created {} {name} ({route}) for {secs}s; every node's agent opens it as `{}{name}` \
         (kubectl get {} {name}: the nodes that enforce it)",
        bridges::KIND,
        bridges::PREFIX,
        bridges::PLURAL
    );
    Ok(ExitCode::SUCCESS)
}

/// `bridge close --cluster`.
#[cfg(feature = "k8s")]
pub fn cluster_bridge_close(name: &str) -> Result<ExitCode> {
    bulkhead::k8s::bridges::delete(name)?;
    println!("deleted BulkheadBridge {name}; every node's agent closes it");
    Ok(ExitCode::SUCCESS)
}

/// `bridge list --cluster`.
#[cfg(feature = "k8s")]
pub fn cluster_bridge_list(json: bool) -> Result<ExitCode> {
    let listed = bulkhead::k8s::bridges::list()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&listed)?);
    } else {
        for b in &listed {
            println!("{}", render::cluster_bridge(b));
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(not(feature = "k8s"))]
pub fn cluster_bridge_list(_: bool) -> Result<ExitCode> {
    anyhow::bail!("--cluster needs a build with the `k8s` feature")
}

#[cfg(not(feature = "k8s"))]
pub fn cluster_bridge_open(_: NewBridge) -> Result<ExitCode> {
    anyhow::bail!("--cluster needs a build with the `k8s` feature")
}

#[cfg(not(feature = "k8s"))]
pub fn cluster_bridge_close(_: &str) -> Result<ExitCode> {
    anyhow::bail!("--cluster needs a build with the `k8s` feature")
}

/// `bridge close`.
pub fn bridge_close(run_dir: &Path, name: String) -> Result<ExitCode> {
    let reply = call(run_dir, &Request::BridgeClose { name })?;
    let Response::BridgeClosed { bridge, generation } = reply else {
        return Err(unexpected(reply));
    };
    println!("closed {} (generation {generation})", bridge.name);
    Ok(ExitCode::SUCCESS)
}

/// `bridge list`: one line per bridge, or JSON.
pub fn bridge_list(run_dir: &Path, json: bool) -> Result<ExitCode> {
    let reply = call(run_dir, &Request::BridgeList)?;
    let Response::Bridges { bridges } = reply else {
        return Err(unexpected(reply));
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&bridges)?);
    } else {
        for e in &bridges {
            println!("{}", render::open_bridge(e));
        }
    }
    Ok(ExitCode::SUCCESS)
}
