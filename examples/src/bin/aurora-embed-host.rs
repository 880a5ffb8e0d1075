//! A small service that embeds the supervisor, the way a Rust host would use
//! Aurora as a library: start plugins from code, call them with typed
//! requests, watch their lifecycle, survive one of them crashing, shut down.
//!
//! It expects the example plugins beside its own executable, which is where
//! `cargo build --workspace` puts them, and prints what it does on stdout.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use aurora_supervisor::{CallError, EventKind, PluginSpec, Supervisor};
use serde::Deserialize;

/// The reply of wordcount's `count` method, as this host reads it. The
/// host declares only the fields it uses; serde ignores the rest when the
/// payload is JSON, but bincode needs the full shape, so all are here.
#[derive(Debug, Deserialize)]
struct TextCounts {
    words: u64,
    lines: u64,
    #[allow(dead_code, reason = "part of the wire shape, unused by this host")]
    bytes: u64,
    top: Vec<(String, u64)>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("aurora-embed-host: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let supervisor = Supervisor::new();

    // Watch lifecycle events in the background, as a service would to feed
    // its own monitoring.
    let mut events = supervisor.subscribe();
    let watcher = tokio::spawn(async move {
        while let Ok(event) = events.recv().await {
            if let Some(line) = describe(&event.kind) {
                println!("event: {} {line}", event.plugin);
            }
        }
    });

    for (name, binary) in [
        ("echo", "aurora-plugin-echo"),
        ("wordcount", "aurora-plugin-wordcount"),
    ] {
        let mut spec = PluginSpec::new(name, beside_me(binary)?);
        spec.call_timeout = Duration::from_secs(5);
        supervisor.add(spec)?;
        supervisor.wait_ready(name, Duration::from_secs(10)).await?;
    }

    let loud: String = supervisor
        .call("echo", "upper", "hello from the host")
        .await?;
    println!("echo.upper -> {loud}");

    let text = "the quick brown fox jumps over the lazy dog\nthe dog sleeps";
    let counts: TextCounts = supervisor.call("wordcount", "count", text).await?;
    println!(
        "wordcount.count -> {} words, {} lines, top word {:?}",
        counts.words,
        counts.lines,
        counts.top.first()
    );

    // A plugin crash costs the plugin a restart, never the host: the caller
    // gets a typed error with the exit status, and the next call works.
    match supervisor.call::<_, ()>("echo", "crash", &()).await {
        Err(CallError::PluginCrashed { crash, .. }) => println!("echo.crash -> crashed: {crash}"),
        other => anyhow::bail!("expected echo.crash to crash, got {other:?}"),
    }
    let again: String = supervisor.call("echo", "upper", "still serving").await?;
    println!("echo.upper -> {again}");

    supervisor.shutdown().await;
    drop(supervisor);
    watcher.await.context("the event watcher panicked")?;
    println!("shut down cleanly");
    Ok(())
}

fn describe(kind: &EventKind) -> Option<String> {
    match kind {
        EventKind::Ready { pid, version } => Some(format!("ready (pid {pid}, version {version})")),
        EventKind::Crashed { crash, .. } => Some(format!(
            "crashed: {}",
            crash
                .exit
                .map_or_else(|| crash.cause.clone(), |exit| exit.to_string(),)
        )),
        EventKind::BackingOff { delay, .. } => Some(format!("restarting in {delay:?}")),
        EventKind::Stopped { .. } => Some("stopped".to_owned()),
        _ => None,
    }
}

/// The path of a plugin binary built next to this executable.
fn beside_me(binary: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("cannot find my own executable")?;
    let path = me.with_file_name(binary);
    anyhow::ensure!(
        path.is_file(),
        "{} is missing; build the workspace first (cargo build --workspace)",
        path.display()
    );
    Ok(path)
}
