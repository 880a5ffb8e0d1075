//! Hot reload and rollback against real processes: builds of the versioned
//! plugin replace each other on disk while callers keep calling, broken
//! builds are refused or rolled back, and no replaced process survives.
//!
//! The two "releases" are two stamps on the same binary (see
//! `aurora-plugin-versioned`): different files with different content
//! hashes that report different versions in their hello.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use aurora_supervisor::{EventKind, Supervisor, SupervisorError, VersionStore};
use aurora_tests::{
    PATIENCE, assert_all_gone, is_alive, pid_of, scratch_dir, stamp_build, versioned,
    wait_for_event,
};
use serde::Deserialize;

/// What the versioned plugin's `version` method answers.
#[derive(Debug, Deserialize)]
struct Served {
    version: String,
    pid: u32,
}

/// Callers that keep calling `version` until told to stop, counting what
/// answered and what failed.
struct Load {
    stop: Arc<AtomicBool>,
    callers: Vec<tokio::task::JoinHandle<Tally>>,
}

#[derive(Default)]
struct Tally {
    calls: u64,
    failures: Vec<String>,
    versions: BTreeSet<String>,
}

impl Load {
    fn start(supervisor: &Supervisor, callers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let callers = (0..callers)
            .map(|_| {
                let supervisor = supervisor.clone();
                let stop = Arc::clone(&stop);
                tokio::spawn(async move {
                    let mut tally = Tally::default();
                    while !stop.load(Ordering::Relaxed) {
                        tally.calls += 1;
                        let served: Result<Served, _> =
                            supervisor.call("versioned", "version", &()).await;
                        match served {
                            Ok(served) => {
                                tally.versions.insert(served.version);
                            }
                            Err(err) => tally.failures.push(err.to_string()),
                        }
                    }
                    tally
                })
            })
            .collect();
        Load { stop, callers }
    }

    async fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = Tally::default();
        for caller in self.callers {
            let tally = caller.await.expect("a caller does not panic");
            total.calls += tally.calls;
            total.failures.extend(tally.failures);
            total.versions.extend(tally.versions);
        }
        total
    }
}

async fn served(supervisor: &Supervisor) -> Served {
    supervisor
        .call("versioned", "version", &())
        .await
        .expect("the plugin serves")
}

/// A supervisor with a version store in `dir`, running build 1.0.0 from
/// `dir/versioned`.
async fn running_version_one(dir: &std::path::Path) -> (Supervisor, std::path::PathBuf) {
    let path = dir.join("versioned");
    stamp_build(&path, "1.0.0", "healthy");
    let supervisor = Supervisor::with_version_store(VersionStore::new(dir.join("store"), 5));
    supervisor.add(versioned(&path)).unwrap();
    supervisor.wait_ready("versioned", PATIENCE).await.unwrap();
    (supervisor, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_reloads_under_load_fail_no_call() {
    let dir = scratch_dir("fifty-reloads");
    let (supervisor, path) = running_version_one(&dir).await;
    let spec = supervisor.spec("versioned").unwrap();
    let load = Load::start(&supervisor, 4);

    let mut replaced = Vec::new();
    for round in 0..50 {
        let version = if round % 2 == 0 { "2.0.0" } else { "1.0.0" };
        stamp_build(&path, version, "healthy");
        let reloaded = supervisor
            .reload("versioned", spec.clone())
            .await
            .unwrap_or_else(|err| panic!("reload {round} failed: {err}"));
        assert_eq!(reloaded.version.as_deref(), Some(version));
        let old = reloaded.replaced.expect("a process was running");
        // The reload returns once the replaced process is reaped.
        assert!(!is_alive(old), "replaced process {old} still alive");
        replaced.push(old);
    }

    let tally = load.finish().await;
    let status = supervisor.status("versioned").unwrap();
    assert_eq!((status.generation, status.reloads), (51, 50));
    assert!(
        tally.failures.is_empty(),
        "{} of {} calls failed: {:?}",
        tally.failures.len(),
        tally.calls,
        &tally.failures[..tally.failures.len().min(5)]
    );
    let both: BTreeSet<String> = ["1.0.0".into(), "2.0.0".into()].into();
    assert_eq!(tally.versions, both, "replies came from both versions");
    eprintln!("{} calls during 50 reloads, none failed", tally.calls);
    assert_all_gone(&replaced).await;
    supervisor.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_build_that_exits_at_start_leaves_the_old_one_serving() {
    let dir = scratch_dir("exits-at-start");
    let (supervisor, path) = running_version_one(&dir).await;
    let before = served(&supervisor).await;
    let mut events = supervisor.subscribe();

    stamp_build(&path, "2.0.0", "exit-at-start");
    let spec = supervisor.spec("versioned").unwrap();
    let err = supervisor.reload("versioned", spec).await.unwrap_err();
    assert!(
        matches!(&err, SupervisorError::ReloadFailed { reason, .. } if reason.contains("did not start")),
        "{err}"
    );
    let event = wait_for_event(&mut events, "versioned", |kind| {
        matches!(kind, EventKind::ReloadFailed { .. })
    })
    .await;
    assert!(format!("{event:?}").contains("did not start"), "{event:?}");

    let after = served(&supervisor).await;
    assert_eq!((after.version.as_str(), after.pid), ("1.0.0", before.pid));
    supervisor.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_build_that_fails_its_health_probe_is_refused() {
    let dir = scratch_dir("unhealthy");
    let (supervisor, path) = running_version_one(&dir).await;
    let before = pid_of(&supervisor, "versioned");

    stamp_build(&path, "2.0.0", "unhealthy");
    let spec = supervisor.spec("versioned").unwrap();
    let err = supervisor.reload("versioned", spec).await.unwrap_err();
    assert!(err.to_string().contains("health probe"), "{err}");

    let after = served(&supervisor).await;
    assert_eq!((after.version.as_str(), after.pid), ("1.0.0", before));
    supervisor.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_build_reporting_another_version_than_declared_is_refused() {
    let dir = scratch_dir("wrong-version");
    let path = dir.join("versioned");
    stamp_build(&path, "1.0.0", "healthy");
    let mut spec = versioned(&path);
    spec.version = Some(semver::Version::new(1, 0, 0));
    let supervisor = Supervisor::new();
    supervisor.add(spec.clone()).unwrap();
    supervisor.wait_ready("versioned", PATIENCE).await.unwrap();

    stamp_build(&path, "2.0.0", "healthy");
    let err = supervisor.reload("versioned", spec).await.unwrap_err();
    assert!(err.to_string().contains("2.0.0"), "{err}");
    assert_eq!(served(&supervisor).await.version, "1.0.0");
    supervisor.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_build_that_keeps_crashing_is_rolled_back_automatically() {
    let dir = scratch_dir("crash-after");
    let (supervisor, path) = running_version_one(&dir).await;
    let mut events = supervisor.subscribe();

    // Healthy enough to pass its probe and take over, then it crashes on
    // every second call. The file on disk stays the broken build: the
    // rollback runs the stored copy of 1.0.0.
    stamp_build(&path, "3.0.0", "crash-after:2");
    let spec = supervisor.spec("versioned").unwrap();
    let reloaded = supervisor.reload("versioned", spec).await.unwrap();
    assert_eq!(reloaded.version.as_deref(), Some("3.0.0"));

    let calls = AtomicU64::new(0);
    let caller = async {
        loop {
            calls.fetch_add(1, Ordering::Relaxed);
            let _ = supervisor
                .call::<_, Served>("versioned", "version", &())
                .await;
        }
    };
    let rolled_back = wait_for_event(&mut events, "versioned", |kind| {
        matches!(
            kind,
            EventKind::RolledBack {
                automatic: true,
                ..
            }
        )
    });
    let event = tokio::select! {
        event = rolled_back => event,
        () = caller => unreachable!("the caller never stops"),
    };
    let EventKind::RolledBack { from, to, .. } = event else {
        unreachable!("matched above");
    };
    assert_eq!(
        (from.as_deref(), to.as_deref()),
        (Some("3.0.0"), Some("1.0.0"))
    );

    supervisor.wait_ready("versioned", PATIENCE).await.unwrap();
    assert_eq!(served(&supervisor).await.version, "1.0.0");
    let versions = supervisor.versions("versioned").await.unwrap();
    let active: Vec<_> = versions.iter().filter(|v| v.active).collect();
    assert_eq!(active.len(), 1);
    assert_eq!(active[0].version.as_deref(), Some("1.0.0"));
    supervisor.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn rollback_runs_a_stored_version_whose_file_is_gone() {
    let dir = scratch_dir("rollback");
    let (supervisor, path) = running_version_one(&dir).await;
    let spec = supervisor.spec("versioned").unwrap();
    stamp_build(&path, "2.0.0", "healthy");
    supervisor.reload("versioned", spec).await.unwrap();
    std::fs::remove_file(&path).unwrap();

    let back = supervisor.rollback("versioned", None).await.unwrap();
    assert_eq!(back.version.as_deref(), Some("1.0.0"));
    assert_eq!(served(&supervisor).await.version, "1.0.0");

    let forward = supervisor
        .rollback("versioned", Some("2.0.0"))
        .await
        .unwrap();
    assert_eq!(forward.version.as_deref(), Some("2.0.0"));
    let err = supervisor
        .rollback("versioned", Some("9.9.9"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("9.9.9"), "{err}");

    let versions = supervisor.versions("versioned").await.unwrap();
    let listed: Vec<_> = versions
        .iter()
        .map(|v| (v.version.as_deref(), v.active))
        .collect();
    assert_eq!(listed, [(Some("2.0.0"), true), (Some("1.0.0"), false)]);
    supervisor.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_call_in_flight_finishes_on_the_replaced_process() {
    let dir = scratch_dir("drain");
    let (supervisor, path) = running_version_one(&dir).await;
    let old = pid_of(&supervisor, "versioned");

    let slow = {
        let supervisor = supervisor.clone();
        tokio::spawn(async move {
            supervisor
                .call::<u64, u64>("versioned", "sleep", &800)
                .await
        })
    };
    // The sleep call is accepted by the old process once it is counted.
    aurora_tests::wait_until("the slow call is in flight", || {
        supervisor.status("versioned").unwrap().calls >= 1
    })
    .await;
    stamp_build(&path, "2.0.0", "healthy");
    let spec = supervisor.spec("versioned").unwrap();
    let reloaded = supervisor.reload("versioned", spec).await.unwrap();
    assert_eq!(reloaded.replaced, Some(old));
    assert_eq!(slow.await.unwrap().unwrap(), 800);
    assert!(!is_alive(old));
    supervisor.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_call_outliving_the_drain_timeout_fails_with_the_reason() {
    let dir = scratch_dir("drain-timeout");
    let path = dir.join("versioned");
    stamp_build(&path, "1.0.0", "healthy");
    let mut spec = versioned(&path);
    spec.drain_timeout = std::time::Duration::from_millis(100);
    let supervisor = Supervisor::new();
    supervisor.add(spec.clone()).unwrap();
    supervisor.wait_ready("versioned", PATIENCE).await.unwrap();

    let slow = {
        let supervisor = supervisor.clone();
        tokio::spawn(async move {
            supervisor
                .call::<u64, u64>("versioned", "sleep", &60_000)
                .await
        })
    };
    aurora_tests::wait_until("the slow call is in flight", || {
        supervisor.status("versioned").unwrap().calls >= 1
    })
    .await;
    stamp_build(&path, "2.0.0", "healthy");
    supervisor.reload("versioned", spec).await.unwrap();
    let err = slow.await.unwrap().unwrap_err();
    assert!(
        err.to_string().contains("replaced by a new version"),
        "{err}"
    );
    assert_eq!(served(&supervisor).await.version, "2.0.0");
    supervisor.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn an_idle_plugin_takes_the_new_version_at_its_next_call() {
    let dir = scratch_dir("idle-reload");
    let path = dir.join("versioned");
    stamp_build(&path, "1.0.0", "healthy");
    let mut spec = versioned(&path);
    spec.lazy = true;
    let supervisor = Supervisor::new();
    supervisor.add(spec.clone()).unwrap();

    stamp_build(&path, "2.0.0", "healthy");
    let reloaded = supervisor.reload("versioned", spec).await.unwrap();
    assert_eq!(reloaded.pid, None, "an idle plugin starts nothing");
    assert_eq!(
        supervisor.status("versioned").unwrap().state,
        aurora_supervisor::PluginState::Idle
    );
    assert_eq!(served(&supervisor).await.version, "2.0.0");
    supervisor.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_process_takes_its_children_with_it() {
    let supervisor = aurora_tests::supervisor_with([aurora_tests::misbehave()]).await;
    let grandchild: u32 = supervisor
        .call("misbehave", "spawn_grandchild", &())
        .await
        .unwrap();
    let old = pid_of(&supervisor, "misbehave");
    assert!(is_alive(grandchild));

    // The same spec: a new process from the same binary.
    let spec = supervisor.spec("misbehave").unwrap();
    let reloaded = supervisor.reload("misbehave", spec).await.unwrap();
    assert_eq!(reloaded.replaced, Some(old));
    assert_all_gone(&[old, grandchild]).await;
    let still: String = supervisor
        .call("misbehave", "ok", "still here")
        .await
        .unwrap();
    assert_eq!(still, "still here");
    supervisor.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_during_a_swap_ends_the_swap_and_leaves_nothing_behind() {
    let dir = scratch_dir("crash-mid-swap");
    let path = dir.join("versioned");
    // The serving build dies at its second call, on cue. Its restart runs
    // the stored copy, not the slow build then on disk.
    stamp_build(&path, "1.0.0", "crash-after:2");
    let supervisor = Supervisor::with_version_store(VersionStore::new(dir.join("store"), 5));
    supervisor.add(versioned(&path)).unwrap();
    supervisor.wait_ready("versioned", PATIENCE).await.unwrap();
    assert_eq!(served(&supervisor).await.version, "1.0.0");
    let mut events = supervisor.subscribe();

    // A new build that takes long to greet: the swap is still starting it
    // when the serving process dies.
    stamp_build(&path, "2.0.0", "slow-start:60000");
    let spec = supervisor.spec("versioned").unwrap();
    let reloading = {
        let supervisor = supervisor.clone();
        tokio::spawn(async move { supervisor.reload("versioned", spec).await })
    };
    let spawned = wait_for_event(&mut events, "versioned", |kind| {
        matches!(kind, EventKind::Spawned { generation: 2, .. })
    })
    .await;
    let EventKind::Spawned { pid: starting, .. } = spawned else {
        unreachable!("matched above");
    };
    let _ = supervisor
        .call::<_, Served>("versioned", "version", &())
        .await;

    let err = reloading.await.unwrap().unwrap_err();
    assert!(err.to_string().contains("went away"), "{err}");
    assert_all_gone(&[starting]).await;
    // The restart policy brings the serving version back.
    supervisor.wait_ready("versioned", PATIENCE).await.unwrap();
    let status = supervisor.status("versioned").unwrap();
    assert_eq!(status.version.as_deref(), Some("1.0.0"));
    supervisor.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_new_spec_timings_hold_from_the_swap() {
    let dir = scratch_dir("new-timings");
    let (supervisor, _path) = running_version_one(&dir).await;
    let mut events = supervisor.subscribe();

    // Added without an idle timeout; the reloaded spec has one, so the new
    // process goes idle without another start.
    let mut spec = supervisor.spec("versioned").unwrap();
    spec.idle_timeout = Some(std::time::Duration::from_millis(300));
    supervisor.reload("versioned", spec).await.unwrap();
    wait_for_event(&mut events, "versioned", |kind| {
        matches!(kind, EventKind::Idle)
    })
    .await;
    assert_eq!(
        supervisor.spec("versioned").unwrap().idle_timeout,
        Some(std::time::Duration::from_millis(300))
    );
    supervisor.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_larger_concurrency_limit_holds_after_the_reload() {
    let dir = scratch_dir("more-permits");
    let path = dir.join("versioned");
    stamp_build(&path, "1.0.0", "healthy");
    let mut spec = versioned(&path);
    spec.max_concurrent_calls = 1;
    let supervisor = Supervisor::new();
    supervisor.add(spec.clone()).unwrap();
    supervisor.wait_ready("versioned", PATIENCE).await.unwrap();

    spec.max_concurrent_calls = 2;
    supervisor.reload("versioned", spec).await.unwrap();
    let long = {
        let supervisor = supervisor.clone();
        tokio::spawn(async move {
            supervisor
                .call::<u64, u64>("versioned", "sleep", &60_000)
                .await
        })
    };
    aurora_tests::wait_until("the long call has begun", || {
        supervisor.status("versioned").unwrap().calls >= 1
    })
    .await;
    // With one permit this would wait for the long call and time out.
    let quick: Served = supervisor
        .call_with_timeout("versioned", "version", &(), Some(PATIENCE))
        .await
        .unwrap();
    assert_eq!(quick.version, "1.0.0");
    long.abort();
    supervisor.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
