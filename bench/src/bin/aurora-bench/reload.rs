//! The reload figures: how many calls fail while a plugin is reloaded over
//! and over under load (`reload_failed_calls`, the target being none), and
//! how long a swap takes against the floor's cost of a new process
//! (`reload_swap`, `reload_complete`).
//!
//! Aurora's side runs the echo plugin under a supervisor with a version
//! store, as the daemon does, with `stats` as its health method, while
//! eight callers make `bytes` calls without pause. Each reload passes the
//! plugin's own spec, as `aurora reload PLUGIN` does: the binary on disk is
//! looked at again (unchanged, the store knows it by its stamp and does not
//! hash it again) and a new process replaces the old one. The swap time is
//! the supervisor's own account: from the request until new calls go to the
//! new process (store, spawn, handshake and probe). The floor is what any new process costs here: the
//! floor program spawned, welcomed and called once, the same as
//! `spawn_ready`'s floor.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use aurora_supervisor::{PluginSpec, Supervisor, VersionStore};
use serde_bytes::ByteBuf;

use crate::Bench;
use crate::calls::{BYTES_METHOD, BytesRequest, ECHO};
use crate::figure::{Figure, Target, millis};
use crate::spawning::floor_spawn_ready;

/// Callers making calls throughout the reloads.
const CALLERS: usize = 8;

/// What the load and the reloads came to.
struct Reloads {
    swaps: Vec<Duration>,
    completions: Vec<Duration>,
    calls: u64,
    failed: u64,
    first_failure: Option<String>,
}

/// `reload_failed_calls`, `reload_swap` and `reload_complete`.
///
/// # Errors
///
/// When the plugin or the floor fails to start, or a reload is refused.
pub fn reload_under_load(bench: &Bench) -> anyhow::Result<Vec<Figure>> {
    let count = bench.plan.reloads;
    let request = BytesRequest::new(16)?;
    let echo = bench.binaries.echo.clone();
    let typed = request.typed.clone();
    let reloads = bench.on_worker(reload_repeatedly(echo, typed, count))?;

    let mut floor = Vec::with_capacity(count);
    for _ in 0..count {
        floor.push(millis(floor_spawn_ready(bench, &request)?));
    }
    let swaps: Vec<f64> = reloads.swaps.iter().copied().map(millis).collect();
    let completions: Vec<f64> = reloads.completions.iter().copied().map(millis).collect();

    let mut note = format!(
        "{} calls from {CALLERS} callers during {count} reloads",
        reloads.calls
    );
    if let Some(failure) = &reloads.first_failure {
        note.push_str(&format!("; first failure: {failure}"));
    }
    let failed = Figure::from_samples(
        "reload_failed_calls",
        "calls",
        &[reloads.failed as f64],
        &[0.0],
        Target::OursAtMost(0.0),
    )
    .with_note(note);
    let swap = Figure::from_samples(
        "reload_swap",
        "ms",
        &swaps,
        &floor,
        Target::RatioAtMost(1.5),
    )
    .with_note("request to new calls on the new process; floor: spawn, handshake, one call");
    let complete =
        Figure::from_samples("reload_complete", "ms", &completions, &floor, Target::None)
            .with_note("request until the replaced process has drained and exited");
    Ok(vec![failed, swap, complete])
}

async fn reload_repeatedly(
    echo: std::path::PathBuf,
    request: ByteBuf,
    count: usize,
) -> anyhow::Result<Reloads> {
    let store_dir = std::env::temp_dir().join(format!("aurora-bench-store-{}", std::process::id()));
    let supervisor = Supervisor::with_version_store(VersionStore::new(&store_dir, 2));
    let mut spec = PluginSpec::new(ECHO, echo);
    spec.health_method = Some("stats".to_owned());
    supervisor.add(spec.clone())?;
    supervisor
        .wait_ready(ECHO, Duration::from_secs(10))
        .await
        .context("the echo plugin did not start")?;

    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..CALLERS {
        let supervisor = supervisor.clone();
        let stop = Arc::clone(&stop);
        let calls = Arc::clone(&calls);
        let request = request.clone();
        callers.spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                calls.fetch_add(1, Ordering::Relaxed);
                let reply: Result<ByteBuf, _> = supervisor.call(ECHO, BYTES_METHOD, &request).await;
                match reply {
                    Ok(reply) if reply == request => {}
                    Ok(_) => failures.push("the echo plugin changed the payload".to_owned()),
                    Err(err) => failures.push(err.to_string()),
                }
            }
            failures
        });
    }

    let mut swaps = Vec::with_capacity(count);
    let mut completions = Vec::with_capacity(count);
    let mut refused = None;
    for _ in 0..count {
        let start = Instant::now();
        match supervisor.reload(ECHO, spec.clone()).await {
            Ok(reloaded) => {
                completions.push(start.elapsed());
                swaps.push(reloaded.swap_time);
            }
            Err(err) => {
                refused = Some(err);
                break;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);

    let mut failures = Vec::new();
    while let Some(joined) = callers.join_next().await {
        failures.extend(joined.context("a caller panicked")?);
    }
    supervisor.shutdown().await;
    let _ = std::fs::remove_dir_all(&store_dir);
    if let Some(err) = refused {
        return Err(err).context("a reload was refused");
    }
    ensure!(!swaps.is_empty(), "no reload was measured");
    Ok(Reloads {
        swaps,
        completions,
        calls: calls.load(Ordering::Relaxed),
        failed: failures.len() as u64,
        first_failure: failures.into_iter().next(),
    })
}
