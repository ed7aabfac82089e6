//! The running agent: one tokio runtime (current-thread) whose loop drives
//! the [`agent::Agent`] state machine. Around it, tasks on the same loop:
//! the events task ([`output`]), a task per control client ([`control`]),
//! the metrics endpoint, the Kubernetes pod watch. Blocking work (policy
//! compilation, file and SQLite writes) runs off the loop: `spawn_blocking`,
//! and one writer thread per output (the events log, stdout, the audit
//! store), each fed by a bounded queue the events task only `try_send`s to
//! (see [`health`] for their counters).
//!
//! Current-thread, measured against a 2-worker multi-thread runtime and the
//! threads it replaces: capabilities are per thread, so the agent must drop
//! them while it is the only thread (the multi-thread runtime starts its
//! workers first, and the drop refuses); the state machine owns its state
//! without locks; `status` answers in 0.48 ms (p50; 0.72 ms with the
//! threads before) and the idle agent uses 0.2 % of a core. What the loop
//! does per event is microseconds; the one long step, compiling a policy,
//! runs off it.

pub mod agent;
pub mod audit_full;
pub mod bridges;
pub mod control;
pub mod events;
pub mod health;
pub mod logging;
pub mod metrics;
pub mod otlp;
pub mod output;
pub mod protocol;
pub mod sink;
pub mod store;

use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
};
use tracing::{info, warn};

pub use agent::RunArgs;
use agent::{Agent, sd_notify};
use output::Output;

/// The signals that stop or reload the agent.
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGHUP, libc::SIGTERM, libc::SIGINT];

/// Holds SIGHUP, SIGTERM and SIGINT pending (blocked) from the first thing
/// `main` does until the agent's handlers are installed: with their default
/// action a signal in between (a `logrotate` postrotate, a stop while
/// starting) would end the process halfway through its start instead of
/// reaching the loop. Threads started meanwhile inherit the mask; the main
/// thread takes them once it unblocks.
pub fn hold_stop_signals() {
    set_stop_signals(libc::SIG_BLOCK);
}

/// Lets the signals [`hold_stop_signals`] held through (the pending ones
/// now reach their handlers, or their default action for commands other
/// than `run`).
pub fn release_stop_signals() {
    set_stop_signals(libc::SIG_UNBLOCK);
}

fn set_stop_signals(how: libc::c_int) {
    // SAFETY: plain libc calls on a local, initialised signal set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in STOP_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

/// `bulkhead run`.
pub fn run(args: RunArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("bulkhead")
        .build()
        .context("starting the agent's runtime")?;
    let result = rt.block_on(serve(args));
    // Tasks still waiting on clients (followers, idle connections) end here.
    rt.shutdown_timeout(Duration::from_millis(200));
    result
}

async fn serve(args: RunArgs) -> Result<()> {
    // Before anything is loaded: from here on SIGHUP, SIGTERM and SIGINT
    // wait (queued) for the loop instead of ending the agent with their
    // default action halfway through a start. Until now `main` held them
    // blocked.
    let mut hup = signal(SignalKind::hangup()).context("installing signal handlers")?;
    let mut term = signal(SignalKind::terminate()).context("installing signal handlers")?;
    let mut int = signal(SignalKind::interrupt()).context("installing signal handlers")?;
    release_stop_signals();

    let control_group = args.control_group;
    let (mut agent, started) = Agent::start(args)?;
    start_pod_watch(&agent);

    if let Some(log) = started.kernel_log {
        tokio::spawn(async move {
            if let Err(e) = crate::kernel::drive_kernel_log(log).await {
                warn!("the kernel programs' log is no longer read: {e:#}");
            }
        });
    }
    let (stop_events, stopped) = oneshot::channel();
    let events = tokio::spawn(output::read(
        started.ring,
        Output {
            enricher: agent.enricher.clone(),
            log: agent.log.clone(),
            stdout: agent.stdout.clone(),
            otlp: agent.otlp.clone(),
            delivered: agent.delivered.clone(),
            hub: agent.hub.clone(),
            store: agent.store.clone(),
        },
        started.cuts,
        stopped,
    ));
    // Room for a burst of clients; each waits for its answer anyway.
    let (calls_tx, mut calls) = mpsc::channel(256);
    start_node_report(&agent, &calls_tx);
    let (listener, socket) = started.control;
    tokio::spawn(control::serve(
        listener,
        control::Server {
            group: control_group,
            calls: calls_tx,
            hub: agent.hub.clone(),
            store: agent.store.clone(),
        },
    ));
    if let Some(listener) = started.metrics {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        tokio::spawn(crate::runtime::metrics::run(
            listener,
            agent.pins_maps(),
            agent.gauges.clone(),
        ));
        info!("metrics on http://{addr}/metrics");
    }
    sd_notify("READY=1");

    let mut turn = tokio::time::interval(Duration::from_millis(100));
    turn.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let reload = tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                agent.reopen_outputs();
                true
            }
            Some(call) = calls.recv() => {
                let answer = agent.handle(call.request, call.peer).await;
                let _ = call.reply.send(answer);
                false
            }
            _ = turn.tick() => agent.tick(),
        };
        if reload {
            agent.reload().await;
        }
    }
    let _ = stop_events.send(());
    if let Err(e) = events.await {
        warn!("the events task ended badly: {e}");
    }
    agent.stop(&socket);
    Ok(())
}

/// The pod watch on the agent's loop (feature `k8s`).
#[cfg(feature = "k8s")]
fn start_pod_watch(agent: &Agent) {
    if let Some(p) = &agent.pods {
        tokio::spawn(crate::k8s::watch::run(p.node.clone(), p.store.clone()));
    }
}

#[cfg(not(feature = "k8s"))]
fn start_pod_watch(_: &Agent) {}

/// The node's `BulkheadNode` report and the cluster's `BulkheadBridge`s,
/// with `--k8s-node` (feature `k8s`).
#[cfg(feature = "k8s")]
fn start_node_report(agent: &Agent, calls: &mpsc::Sender<control::Call>) {
    if let Some(p) = &agent.pods {
        tokio::spawn(crate::k8s::report::run(p.node.clone(), calls.clone()));
        tokio::spawn(crate::k8s::bridges::run(p.node.clone(), calls.clone()));
    }
}

#[cfg(not(feature = "k8s"))]
fn start_node_report(_: &Agent, _: &mpsc::Sender<control::Call>) {}
