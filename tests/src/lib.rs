//! Shared helpers for the integration tests: finding the real binaries,
//! specs tuned for tests, waiting on events, checking which processes are
//! still alive, and asking the kernel which parts of the sandbox it can
//! enforce here.
//!
//! The binaries are the ones `cargo test --workspace` builds into the same
//! target directory as the test executables; nothing here builds anything.

pub mod daemon;

use std::path::PathBuf;
use std::time::Duration;

use aurora_supervisor::{Event, EventKind, PluginSpec, Supervisor};
use nix::sys::signal::Signal;
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

/// A fresh, empty directory for one test, under the system's temporary
/// directory; `name` tells tests apart, the pid test runs.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("aurora-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("the temporary directory is writable");
    dir
}

/// Writes a build of the versioned plugin to `path`: its binary with the
/// stamp `version` and `mode` appended (see the plugin's documentation).
/// The file is written beside `path` and renamed over it, the way a deploy
/// replaces a binary that may be running.
pub fn stamp_build(path: &std::path::Path, version: &str, mode: &str) {
    use std::os::unix::fs::PermissionsExt;

    let mut bytes = std::fs::read(binary("aurora-plugin-versioned")).expect("the plugin is built");
    bytes.extend_from_slice(format!("\naurora-build version={version} mode={mode}\n").as_bytes());
    let partial = path.with_extension("partial");
    std::fs::write(&partial, &bytes).expect("the build directory is writable");
    std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755))
        .expect("the build was just written");
    std::fs::rename(&partial, path).expect("the build directory is writable");
}

/// A spec for the versioned plugin at `path`, probed through its `health`
/// method on every reload.
pub fn versioned(path: &std::path::Path) -> PluginSpec {
    let mut spec = PluginSpec::new("versioned", path);
    let test_spec = self::spec("versioned", "aurora-plugin-versioned");
    spec.health_method = Some("health".to_owned());
    spec.health_interval = None;
    spec.health_timeout = Duration::from_secs(5);
    spec.call_timeout = test_spec.call_timeout;
    spec.handshake_timeout = test_spec.handshake_timeout;
    spec.cancel_grace = test_spec.cancel_grace;
    spec.stop_timeout = test_spec.stop_timeout;
    spec.restart = test_spec.restart;
    spec
}

/// The misbehave plugin, allowed to run programs from the usual binary
/// directories: its `spawn_grandchild` method starts `sleep`, which the
/// sandbox would otherwise refuse to execute, and the tests that use it are
/// about the grandchild's fate, not about that refusal.
pub fn misbehave() -> PluginSpec {
    let mut spec = spec("misbehave", "aurora-plugin-misbehave");
    spec.permissions.execute = vec!["/usr/bin".into(), "/bin".into()];
    spec
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

/// Polls `condition` until it holds, for up to [`PATIENCE`].
///
/// # Panics
///
/// When it never does, saying what was awaited.
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let held = tokio::time::timeout(PATIENCE, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(held.is_ok(), "gave up waiting until {what}");
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

/// The pids of every live descendant of `ancestor`: its children, theirs,
/// and so on. A descendant whose parent died was reparented and is not found.
pub fn descendants_of(ancestor: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let mut unexplored = vec![ancestor];
    while let Some(parent) = unexplored.pop() {
        let children = children_of(parent);
        unexplored.extend(&children);
        found.extend(children);
    }
    found
}

/// The process group `pid` belongs to, while it lives.
pub fn process_group_of(pid: u32) -> Option<u32> {
    stat_field(pid, STAT_PROCESS_GROUP)
}

/// The session `pid` belongs to, while it lives.
pub fn session_of(pid: u32) -> Option<u32> {
    stat_field(pid, STAT_SESSION)
}

/// Whether `pid` has set `signal` to be ignored.
pub fn ignores_signal(pid: u32, signal: Signal) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    let ignored = status
        .lines()
        .find_map(|line| line.strip_prefix("SigIgn:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok());
    // Bit n - 1 of the mask stands for signal n.
    let bit = 1_u64 << (signal as i32 - 1);
    ignored.is_some_and(|mask| mask & bit != 0)
}

/// Where the parent pid sits among the fields after a process's name in
/// `/proc/<pid>/stat`.
const STAT_PARENT: usize = 1;
/// Where the process group sits, likewise.
const STAT_PROCESS_GROUP: usize = 2;
/// Where the session sits, likewise.
const STAT_SESSION: usize = 3;

fn parent_of(pid: u32) -> Option<u32> {
    stat_field(pid, STAT_PARENT)
}

/// A numeric field of `/proc/<pid>/stat`, counted from the state that
/// follows the parenthesised name (which may itself contain spaces).
fn stat_field(pid: u32, index: usize) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(index)?.parse().ok()
}

/// Checks that the kernel offers Landlock at ABI `minimum` or newer: 1 for
/// file system rules, 4 for TCP rules.
///
/// # Errors
///
/// Why not, in words fit for a "skipping" line.
pub fn landlock_support(minimum: i64) -> Result<(), String> {
    // The flag that makes landlock_create_ruleset report the ABI version
    // instead of creating a ruleset.
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;

    // SAFETY: with a null attribute pointer, a size of zero and the version
    // flag, the system call reads and writes no memory; it only returns the
    // ABI version or fails.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0_usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if abi < 0 {
        let err = std::io::Error::last_os_error();
        return Err(format!("the kernel offers no Landlock ({err})"));
    }
    if abi < minimum {
        return Err(format!(
            "the kernel offers Landlock ABI {abi}, and this needs {minimum}"
        ));
    }
    Ok(())
}

/// Checks that this process could make a cgroup for a plugin: a writable
/// cgroup v2 hierarchy, or a writable v1 hierarchy, with `controller`
/// available when one is named ("pids", "memory").
///
/// # Errors
///
/// Why not, in words fit for a "skipping" line.
pub fn cgroup_support(controller: Option<&str>) -> Result<(), String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")
        .map_err(|err| format!("cannot read /proc/self/mounts: {err}"))?;
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|err| format!("cannot read /proc/self/cgroup: {err}"))?;

    for mount in mounts.lines() {
        let fields: Vec<&str> = mount.split_whitespace().collect();
        let [_, mount_point, fs_type, options, ..] = fields[..] else {
            continue;
        };
        let dir = match fs_type {
            "cgroup2" => {
                let Some(path) = own_cgroup(&own, |list| list.is_empty()) else {
                    continue;
                };
                let dir = PathBuf::from(mount_point).join(path.trim_start_matches('/'));
                let controllers =
                    std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
                let has_controller = controller
                    .is_none_or(|wanted| controllers.split_whitespace().any(|c| c == wanted));
                if !has_controller {
                    continue;
                }
                dir
            }
            "cgroup" => {
                let mounted: Vec<&str> = options.split(',').collect();
                let has_controller = controller.is_none_or(|wanted| mounted.contains(&wanted));
                if !has_controller {
                    continue;
                }
                let in_this_hierarchy =
                    |list: &str| list.split(',').any(|name| mounted.contains(&name));
                let Some(path) = own_cgroup(&own, in_this_hierarchy) else {
                    continue;
                };
                PathBuf::from(mount_point).join(path.trim_start_matches('/'))
            }
            _ => continue,
        };
        if nix::unistd::access(&dir, nix::unistd::AccessFlags::W_OK).is_ok() {
            return Ok(());
        }
    }

    let wanted = controller.map_or(String::new(), |name| format!(" with the {name} controller"));
    Err(format!(
        "no cgroup hierarchy{wanted} is writable here (cgroups need root or a delegated subtree)"
    ))
}

/// This process's cgroup path in the hierarchy whose controller list
/// satisfies `is_hierarchy`, from the contents of `/proc/self/cgroup`.
fn own_cgroup(own: &str, is_hierarchy: impl Fn(&str) -> bool) -> Option<&str> {
    own.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, list, path) = (parts.next()?, parts.next()?, parts.next()?);
        is_hierarchy(list).then_some(path)
    })
}

/// Whether this process runs as root, where the sandbox switches the plugin
/// to an unprivileged user and can make cgroups.
pub fn is_root() -> bool {
    // SAFETY: geteuid takes nothing, touches no memory and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The lines `child` writes to its piped stderr, read on a thread of their
/// own so a test can wait for one with a timeout.
///
/// # Panics
///
/// When the child's stderr was not piped.
pub fn stderr_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::{BufRead, BufReader};

    let stderr = child.stderr.take().expect("stderr is piped");
    let (send, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if send.send(line).is_err() {
                return;
            }
        }
    });
    lines
}
