//! Shared helpers for the integration tests: finding the real binaries,
//! specs tuned for tests, waiting on events, and checking which processes
//! are still alive.
//!
//! The binaries are the ones `cargo test --workspace` builds into the same
//! target directory as the test executables; nothing here builds anything.

use std::path::PathBuf;
use std::time::Duration;

use aurora_supervisor::{Event, EventKind, PluginSpec, Supervisor};
use tokio::sync::broadcast;

/// A bound for things that should take milliseconds; generous because the
/// machines running the tests are shared and slow.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The path of a binary built from this workspace.
///
/// # Panics
///
/// When the binary is missing, naming the command that builds it.
pub fn binary(name: &str) -> PathBuf {
    let test_exe = std::env::current_exe().expect("a test knows its own path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let profile_dir = test_exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("tests run in target/");
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run the tests with `cargo test --workspace`, which builds it",
        path.display()
    );
    path
}

/// A spec for one of the example plugins, with timings suited to tests:
/// quick restarts and no pings unless a test wants them.
pub fn spec(name: &str, binary_name: &str) -> PluginSpec {
    let mut spec = PluginSpec::new(name, binary(binary_name));
    spec.health_interval = None;
    spec.call_timeout = PATIENCE;
    spec.handshake_timeout = PATIENCE;
    spec.cancel_grace = Duration::from_millis(300);
    spec.stop_timeout = Duration::from_secs(2);
    spec.restart.backoff_initial = Duration::from_millis(10);
    spec.restart.backoff_max = Duration::from_millis(100);
    spec
}

pub fn echo() -> PluginSpec {
    spec("echo", "aurora-plugin-echo")
}

pub fn misbehave() -> PluginSpec {
    spec("misbehave", "aurora-plugin-misbehave")
}

/// A supervisor running `specs`, each ready.
pub async fn supervisor_with(specs: impl IntoIterator<Item = PluginSpec>) -> Supervisor {
    let supervisor = Supervisor::new();
    let mut names = Vec::new();
    for spec in specs {
        names.push(spec.name.clone());
        supervisor
            .add(spec)
            .expect("test plugins have distinct names");
    }
    for name in names {
        supervisor
            .wait_ready(&name, PATIENCE)
            .await
            .expect("test plugin starts");
    }
    supervisor
}

/// Waits for the first event about `plugin` that `matches` accepts.
///
/// # Panics
///
/// After [`PATIENCE`] without one, listing what was seen instead.
pub async fn wait_for_event(
    events: &mut broadcast::Receiver<Event>,
    plugin: &str,
    matches: impl Fn(&EventKind) -> bool,
) -> EventKind {
    let mut seen = Vec::new();
    let found = tokio::time::timeout(PATIENCE, async {
        loop {
            match events.recv().await {
                Ok(event) if event.plugin == plugin && matches(&event.kind) => return event.kind,
                Ok(event) => seen.push(event),
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => panic!("event stream closed"),
            }
        }
    })
    .await;
    match found {
        Ok(kind) => kind,
        Err(_) => panic!("no matching event for {plugin}; saw {seen:#?}"),
    }
}

/// The pid of the process currently serving `plugin`.
pub fn pid_of(supervisor: &Supervisor, plugin: &str) -> u32 {
    let status = supervisor.status(plugin).expect("plugin exists");
    status.pid.expect("plugin is running")
}

/// Whether `pid` names a live process; a zombie counts as gone.
pub fn is_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may itself
    // contain spaces or parentheses.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z") | Some("X") | None)
}

/// Polls until every pid in `pids` is gone, for up to [`PATIENCE`].
///
/// # Panics
///
/// Naming the survivors.
pub async fn assert_all_gone(pids: &[u32]) {
    let gone = tokio::time::timeout(PATIENCE, async {
        while pids.iter().any(|&pid| is_alive(pid)) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    if gone.is_err() {
        let survivors: Vec<_> = pids.iter().filter(|&&pid| is_alive(pid)).collect();
        panic!("processes outlived their supervisor: {survivors:?}");
    }
}

/// The pids of the direct children of `parent`.
pub fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| parent_of(pid) == Some(parent) && is_alive(pid))
        .collect()
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}
