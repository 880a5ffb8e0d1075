//! Hostile plugins. Each test runs the misbehave plugin beside the
//! well-behaved echo plugin and has it attack one promise: the protocol, a
//! resource limit, a permission, or the way a plugin is stopped. Then it
//! checks three things. Echo keeps answering, on the same process, before,
//! during and after the attack. Every caller of the hostile plugin gets a
//! typed error that names the cause. And when the test is over, no process
//! the hostile plugin ever had, nor any it started, remains.
//!
//! Some protections rest on kernel features or privileges: Landlock for
//! files and TCP, and cgroups (root or a delegated subtree) for processes
//! that leave the plugin's process group. A test that needs one checks for
//! it first and, when it is missing, prints a line starting with
//! "skipping:" and returns. CI runs as root on a kernel that has them all,
//! so there nothing is skipped.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aurora_supervisor::{
    CallError, ErrorKind, Event, EventKind, ExitReason, PluginSpec, Supervisor,
};
use aurora_tests::{
    PATIENCE, assert_all_gone, cgroup_support, descendants_of, echo, ignores_signal, is_alive,
    is_root, landlock_support, misbehave, pid_of, process_group_of, session_of, supervisor_with,
    wait_for_event, wait_until,
};
use nix::sys::signal::Signal;
use tokio::sync::broadcast;
use tokio::task::{JoinHandle, JoinSet};

/// The name the hostile plugin runs under.
const HOSTILE: &str = "misbehave";

/// How many callers call a hostile method at once: the one whose call runs
/// and the ones queued behind it must all hear why the plugin went away.
const HOSTILE_CALLERS: usize = 3;

/// How often the bystander calls echo while the hostile plugin misbehaves.
const BYSTANDER_PACE: Duration = Duration::from_millis(20);

/// The memory limit of the allocating plugin: far below the machine's memory
/// and far above what the plugin needs to start.
const MEMORY_LIMIT: u64 = 256 << 20;

/// The process limit of the fork-bombing plugin, itself included.
const PROCESS_LIMIT: u64 = 16;

/// How many forks the fork bomb asks for: enough that a limit that holds is
/// obvious, few enough that a limit that fails does not take the machine.
const FORKS_REQUESTED: u32 = 1_000;

/// What the misbehave plugin's `write_file` writes.
const WRITTEN_TEXT: &str = "misbehave was here\n";

/// The well-behaved plugin, called over and over from its own task while the
/// hostile one misbehaves.
struct Bystander {
    /// The echo process at the start; it must still serve at the end.
    pid: u32,
    keep_calling: Arc<AtomicBool>,
    /// Ends with the number of calls answered.
    calls: JoinHandle<u64>,
}

impl Bystander {
    /// Checks that echo answers, then keeps calling it until
    /// [`Bystander::finish`].
    async fn start(supervisor: &Supervisor) -> Bystander {
        let before: String = supervisor
            .call("echo", "upper", "before")
            .await
            .expect("echo answers before the attack");
        assert_eq!(before, "BEFORE");

        let keep_calling = Arc::new(AtomicBool::new(true));
        let calls = tokio::spawn({
            let supervisor = supervisor.clone();
            let keep_calling = Arc::clone(&keep_calling);
            async move {
                let mut pace = tokio::time::interval(BYSTANDER_PACE);
                let mut answered = 0;
                while keep_calling.load(Ordering::Relaxed) {
                    pace.tick().await;
                    let text = format!("during {answered}");
                    let reply: Result<String, _> = supervisor.call("echo", "upper", &text).await;
                    match reply {
                        Ok(loud) => assert_eq!(loud, text.to_uppercase()),
                        Err(err) => panic!("echo failed during the attack: {err}"),
                    }
                    answered += 1;
                }
                answered
            }
        });
        Bystander {
            pid: pid_of(supervisor, "echo"),
            keep_calling,
            calls,
        }
    }

    /// Stops calling, checks that echo answered every call on its original
    /// process and still answers, and returns how many calls it answered
    /// during the attack.
    async fn finish(self, supervisor: &Supervisor) -> u64 {
        self.keep_calling.store(false, Ordering::Relaxed);
        let answered = match self.calls.await {
            Ok(answered) => answered,
            Err(failed) => std::panic::resume_unwind(failed.into_panic()),
        };

        let after: String = supervisor
            .call("echo", "upper", "after")
            .await
            .expect("echo answers after the attack");
        assert_eq!(after, "AFTER");
        assert_eq!(
            pid_of(supervisor, "echo"),
            self.pid,
            "echo was restarted because of another plugin"
        );
        answered
    }
}

/// One hostile case in progress.
struct Case {
    supervisor: Supervisor,
    /// Subscribed before the attack, to learn every pid the hostile plugin
    /// is given by restarts.
    events: broadcast::Receiver<Event>,
    bystander: Bystander,
    /// Every process known to belong to the hostile plugin; all must be gone
    /// at the end.
    hostile_pids: Vec<u32>,
}

impl Case {
    /// Starts echo and `hostile`, checks echo answers and starts calling it.
    async fn start(hostile: PluginSpec) -> Case {
        assert_eq!(hostile.name, HOSTILE);
        let supervisor = supervisor_with([echo(), hostile]).await;
        let events = supervisor.subscribe();
        let hostile_pids = vec![pid_of(&supervisor, HOSTILE)];
        let bystander = Bystander::start(&supervisor).await;
        Case {
            supervisor,
            events,
            bystander,
            hostile_pids,
        }
    }

    /// The process serving the hostile plugin now.
    fn hostile_pid(&self) -> u32 {
        pid_of(&self.supervisor, HOSTILE)
    }

    /// Checks that the hostile plugin serves calls again, on whatever
    /// process it now has.
    async fn expect_hostile_back(&self) {
        let back: String = self
            .supervisor
            .call(HOSTILE, "ok", "back")
            .await
            .expect("the hostile plugin is restarted and answers");
        assert_eq!(back, "back");
    }

    /// Ends the case: checks the bystander, stops the hostile plugin, and
    /// checks that every process it ever had, and everything those started,
    /// is gone. Returns how many calls echo answered during the attack.
    async fn finish(mut self) -> u64 {
        let answered = self.bystander.finish(&self.supervisor).await;

        loop {
            match self.events.try_recv() {
                Ok(Event {
                    plugin,
                    kind: EventKind::Spawned { pid, .. },
                }) if plugin == HOSTILE => self.hostile_pids.push(pid),
                Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
        if let Some(pid) = self
            .supervisor
            .status(HOSTILE)
            .and_then(|status| status.pid)
        {
            self.hostile_pids.push(pid);
            self.hostile_pids.extend(descendants_of(pid));
        }

        tokio::time::timeout(PATIENCE, self.supervisor.stop(HOSTILE))
            .await
            .expect("stopping the hostile plugin completes")
            .expect("the hostile plugin exists");
        assert_all_gone(&self.hostile_pids).await;
        self.supervisor.shutdown().await;
        answered
    }
}

/// Starts [`HOSTILE_CALLERS`] calls of `method` on the hostile plugin, all
/// at once.
fn spawn_hostile_callers(
    supervisor: &Supervisor,
    method: &'static str,
) -> JoinSet<Result<(), CallError>> {
    let mut calls = JoinSet::new();
    for _ in 0..HOSTILE_CALLERS {
        let supervisor = supervisor.clone();
        calls.spawn(async move { supervisor.call::<_, ()>(HOSTILE, method, &()).await });
    }
    calls
}

/// Waits for every call in `calls` and returns their errors.
///
/// # Panics
///
/// When any of them succeeds: a hostile method has no good answer.
async fn expect_errors(method: &str, mut calls: JoinSet<Result<(), CallError>>) -> Vec<CallError> {
    let mut errors = Vec::new();
    while let Some(joined) = calls.join_next().await {
        match joined.expect("a caller's task does not panic") {
            Ok(()) => panic!("{method} succeeded instead of failing"),
            Err(err) => errors.push(err),
        }
    }
    errors
}

/// Calls `method` from [`HOSTILE_CALLERS`] callers at once and returns the
/// error each of them got.
async fn call_hostile_from_several(
    supervisor: &Supervisor,
    method: &'static str,
) -> Vec<CallError> {
    expect_errors(method, spawn_hostile_callers(supervisor, method)).await
}

/// Reports a test skipped because the machine cannot enforce what it tests.
fn skipping(test: &str, why: &str) {
    eprintln!("skipping: {test}: {why}");
}

/// A directory of the test's own under the system's temporary directory,
/// which the sandbox does not grant by default. Removed on drop.
struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates the directory afresh with permission bits `mode`, so that
    /// whichever user the plugin runs as, only the sandbox stands between it
    /// and the directory.
    fn new(test: &str, role: &str, mode: u32) -> ScratchDir {
        let name = format!("aurora-hostile-{}-{test}-{role}", std::process::id());
        let path = std::env::temp_dir().join(name);
        // A leftover from an earlier run with the same pid is stale.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("the temporary directory is writable");
        set_mode(&path, mode);
        ScratchDir { path }
    }

    /// A file in the directory, made readable by everyone, holding `text`.
    fn file_with(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path.join(name);
        std::fs::write(&path, text).expect("the scratch directory is writable");
        set_mode(&path, 0o644);
        path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        // Cleanup is best effort; a leftover directory harms no later run.
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .expect("the test owns what it created");
}

fn text_of(path: &Path) -> String {
    path.to_str().expect("scratch paths are UTF-8").to_owned()
}

/// Checks that `err` is the plugin's own refusal (not a crash, not a
/// timeout) and quotes the operating system's "Permission denied".
fn assert_permission_denied(err: &CallError) {
    assert!(
        matches!(
            err,
            CallError::Remote {
                kind: ErrorKind::Failed,
                ..
            }
        ),
        "expected the plugin's own error, got {err}"
    );
    assert!(err.to_string().contains("Permission denied"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocating_without_end_hits_the_memory_limit() {
    let mut hostile = misbehave();
    hostile.limits.memory = Some(MEMORY_LIMIT);
    let case = Case::start(hostile).await;

    for err in call_hostile_from_several(&case.supervisor, "alloc_forever").await {
        assert!(
            matches!(err, CallError::PluginCrashed { .. }),
            "expected a crash, got {err}"
        );
        // Either the allocator failed (an rlimit or the cgroup refused
        // memory) and Rust said so on stderr, or the kernel's OOM killer
        // struck and the supervisor said so.
        let message = err.to_string().to_lowercase();
        let names_memory = ["memory allocation", "out of memory", "oom"]
            .iter()
            .any(|cause| message.contains(cause));
        assert!(names_memory, "the error does not name memory: {err}");
    }

    case.expect_hostile_back().await;
    case.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burning_cpu_forever_hits_the_cpu_limit() {
    let mut hostile = misbehave();
    hostile.limits.cpu_seconds = Some(1);
    // Far beyond the CPU limit, even on a loaded machine: the limit, not
    // the deadline, must be what ends the call.
    hostile.call_timeout = Duration::from_secs(120);
    let case = Case::start(hostile).await;

    for err in call_hostile_from_several(&case.supervisor, "burn_cpu").await {
        let CallError::PluginCrashed { crash, .. } = &err else {
            panic!("expected a crash, got {err}");
        };
        // SIGXCPU at the soft limit; SIGKILL at the hard one, should the
        // first be caught.
        let by_cpu_limit = [Signal::SIGXCPU, Signal::SIGKILL]
            .map(|signal| Some(ExitReason::Signal(signal as i32)))
            .contains(&crash.exit);
        assert!(by_cpu_limit, "not killed by the CPU limit: {err}");
        let message = err.to_string();
        assert!(
            message.contains("SIGXCPU") || message.contains("SIGKILL"),
            "{err}"
        );
    }

    case.expect_hostile_back().await;
    let answered = case.finish().await;
    assert!(answered > 0, "echo was not called during a second of CPU");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_is_stopped_by_the_process_limit() {
    // Root ignores RLIMIT_NPROC, so as root only a pids cgroup holds the
    // limit (or a switch to another user, which the sandbox makes where it
    // can, but a cgroup is what the spec promises first).
    if is_root()
        && let Err(why) = cgroup_support(Some("pids"))
    {
        skipping("a_fork_bomb_is_stopped_by_the_process_limit", &why);
        return;
    }
    let mut hostile = misbehave();
    hostile.limits.processes = Some(PROCESS_LIMIT);
    let mut case = Case::start(hostile).await;
    let pid = case.hostile_pid();

    let forked: u32 = case
        .supervisor
        .call(HOSTILE, "fork_bomb", &FORKS_REQUESTED)
        .await
        .expect("the fork bomb reports how far it got");
    assert!(
        u64::from(forked) < PROCESS_LIMIT,
        "{forked} of {FORKS_REQUESTED} forks succeeded under a limit of {PROCESS_LIMIT} processes"
    );

    // Every fork that succeeded left a child waiting; the plugin itself is
    // unharmed and still answers.
    let children = descendants_of(pid);
    assert_eq!(children.len(), forked as usize, "{children:?}");
    case.hostile_pids.extend(&children);
    let alive: String = case.supervisor.call(HOSTILE, "ok", "alive").await.unwrap();
    assert_eq!(alive, "alive");
    assert_eq!(case.hostile_pid(), pid);

    case.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_stdout_and_stderr_disturb_no_one() {
    let case = Case::start(misbehave()).await;
    let pid = case.hostile_pid();

    let lines: u64 = case
        .supervisor
        .call(HOSTILE, "flood", &20_000u64)
        .await
        .expect("a flood of output is not an error");
    assert_eq!(lines, 20_000);
    let alive: String = case
        .supervisor
        .call(HOSTILE, "ok", "after the flood")
        .await
        .unwrap();
    assert_eq!(alive, "after the flood");
    assert_eq!(case.hostile_pid(), pid);

    case.finish().await;
}

/// Has the hostile plugin corrupt its channel with `method` and checks that
/// every caller hears one of `causes` in the crash, that the plugin comes
/// back, and that echo never notices.
async fn broken_frame_case(method: &'static str, causes: &[&str]) {
    let case = Case::start(misbehave()).await;

    for err in call_hostile_from_several(&case.supervisor, method).await {
        assert!(
            matches!(err, CallError::PluginCrashed { .. }),
            "{method}: expected a crash, got {err}"
        );
        let message = err.to_string();
        assert!(
            causes.iter().any(|cause| message.contains(cause)),
            "{method}: expected one of {causes:?} in {err}"
        );
    }

    case.expect_hostile_back().await;
    case.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_bytes_cost_the_sender_a_restart() {
    broken_frame_case("garbage", &["malformed frame"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_4_gib_frame_header_is_refused_before_allocating() {
    broken_frame_case("huge_frame", &["exceeds the limit"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_closed_mid_frame_costs_the_sender_a_restart() {
    // The callers queued behind the first leave their calls unread in the
    // plugin's socket when it exits, and closing a socket with unread data
    // makes the kernel reset the connection: after the partial frame the
    // supervisor may meet that reset rather than end-of-file.
    broken_frame_case(
        "close_mid_frame",
        &["inside a frame", "Connection reset by peer"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_deaf_to_shutdown_and_sigterm_is_killed_on_stop() {
    let mut hostile = misbehave();
    hostile.stop_timeout = Duration::from_millis(300);
    let case = Case::start(hostile).await;
    let mut events = case.supervisor.subscribe();
    let pid = case.hostile_pid();

    // The first call blocks the plugin's only thread, so the others, and
    // the Shutdown message, are never read.
    let callers = spawn_hostile_callers(&case.supervisor, "stubborn");
    wait_until("the plugin ignores SIGTERM", || {
        ignores_signal(pid, Signal::SIGTERM)
    })
    .await;

    tokio::time::timeout(PATIENCE, case.supervisor.stop(HOSTILE))
        .await
        .expect("stopping a stubborn plugin completes")
        .expect("the hostile plugin exists");
    assert!(!is_alive(pid), "the stubborn plugin survived its stop");
    let kind = wait_for_event(&mut events, HOSTILE, |kind| {
        matches!(kind, EventKind::Stopped { .. })
    })
    .await;
    assert_eq!(
        kind,
        EventKind::Stopped {
            exit: Some(ExitReason::Signal(Signal::SIGKILL as i32))
        }
    );

    // The callers whose calls reached the plugin hear how it was stopped; a
    // caller still on its way when the stop began hears only that.
    let mut killed_callers = 0;
    for err in expect_errors("stubborn", callers).await {
        match err {
            CallError::PluginCrashed { .. } => {
                let message = err.to_string();
                assert!(
                    message.contains("plugin stopped") && message.contains("SIGKILL"),
                    "{err}"
                );
                killed_callers += 1;
            }
            CallError::PluginStopped { .. } => {}
            err => panic!("expected the stop to end the call, got {err}"),
        }
    }
    assert!(killed_callers > 0, "no caller heard of the SIGKILL");

    let answered = case.finish().await;
    assert!(answered > 0, "echo was not called during the stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_ignoring_only_sigterm_still_stops_on_shutdown() {
    let case = Case::start(misbehave()).await;
    let mut events = case.supervisor.subscribe();
    let pid = case.hostile_pid();

    let () = case
        .supervisor
        .call(HOSTILE, "ignore_sigterm", &())
        .await
        .expect("changing a signal's disposition works");
    assert!(ignores_signal(pid, Signal::SIGTERM));

    case.supervisor.stop(HOSTILE).await.unwrap();
    let kind = wait_for_event(&mut events, HOSTILE, |kind| {
        matches!(kind, EventKind::Stopped { .. })
    })
    .await;
    assert_eq!(
        kind,
        EventKind::Stopped {
            exit: Some(ExitReason::Code(0))
        },
        "Shutdown, the first stage of a stop, needs no signal"
    );

    case.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_outside_the_granted_paths_is_denied() {
    const TEST: &str = "reading_outside_the_granted_paths_is_denied";
    if let Err(why) = landlock_support(1) {
        skipping(TEST, &why);
        return;
    }
    let granted = ScratchDir::new("read", "granted", 0o755);
    let private = ScratchDir::new("read", "private", 0o755);
    let granted_file = granted.file_with("secret.txt", "granted\n");
    let private_file = private.file_with("secret.txt", "private\n");
    let mut hostile = misbehave();
    hostile.permissions.read = vec![granted.path.clone()];
    let case = Case::start(hostile).await;
    let pid = case.hostile_pid();

    let err = case
        .supervisor
        .call::<_, String>(HOSTILE, "read_file", &text_of(&private_file))
        .await
        .expect_err("reading outside the grants succeeded");
    assert_permission_denied(&err);

    // The same kind of file under the same permission bits, in a granted
    // directory: what refused the first read was the sandbox.
    let length: String = case
        .supervisor
        .call(HOSTILE, "read_file", &text_of(&granted_file))
        .await
        .expect("a granted path is readable");
    assert_eq!(length, "granted\n".len().to_string());
    assert_eq!(case.hostile_pid(), pid, "a refusal is not a crash");

    case.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writing_outside_the_granted_paths_is_denied() {
    const TEST: &str = "writing_outside_the_granted_paths_is_denied";
    if let Err(why) = landlock_support(1) {
        skipping(TEST, &why);
        return;
    }
    // Writable by everyone, so no user the plugin could run as is refused
    // by the permission bits.
    let granted = ScratchDir::new("write", "granted", 0o777);
    let private = ScratchDir::new("write", "private", 0o777);
    let granted_file = granted.path.join("written.txt");
    let private_file = private.path.join("written.txt");
    let mut hostile = misbehave();
    hostile.permissions.write = vec![granted.path.clone()];
    let case = Case::start(hostile).await;

    let err = case
        .supervisor
        .call::<_, ()>(HOSTILE, "write_file", &text_of(&private_file))
        .await
        .expect_err("writing outside the grants succeeded");
    assert_permission_denied(&err);
    assert!(!private_file.exists(), "the refused write created the file");

    case.supervisor
        .call::<_, ()>(HOSTILE, "write_file", &text_of(&granted_file))
        .await
        .expect("a granted path is writable");
    let written = std::fs::read_to_string(&granted_file).unwrap();
    assert_eq!(written, WRITTEN_TEXT);

    case.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_an_ungranted_port_is_denied() {
    const TEST: &str = "connecting_to_an_ungranted_port_is_denied";
    // TCP rules arrived in Landlock ABI 4.
    if let Err(why) = landlock_support(4) {
        skipping(TEST, &why);
        return;
    }
    let granted = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let private = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let granted_port = granted.local_addr().unwrap().port();
    let private_port = private.local_addr().unwrap().port();
    let mut hostile = misbehave();
    hostile.permissions.connect_tcp = vec![granted_port];
    let case = Case::start(hostile).await;

    let err = case
        .supervisor
        .call::<_, ()>(HOSTILE, "connect", &private_port)
        .await
        .expect_err("connecting to an ungranted port succeeded");
    assert_permission_denied(&err);

    // Both listeners accept alike; only the grant differs.
    case.supervisor
        .call::<_, ()>(HOSTILE, "connect", &granted_port)
        .await
        .expect("a granted port accepts connections");

    case.finish().await;
    drop((granted, private));
}

/// Has the hostile plugin leave an escaped process behind (own session, own
/// process group, reparented away), then ends the plugin with `end` and
/// checks that the escapee died with it.
async fn escape_case(test: &str, end: End) {
    // Nothing but a cgroup follows a process out of its process group.
    if let Err(why) = cgroup_support(None) {
        skipping(test, &why);
        return;
    }
    let mut case = Case::start(misbehave()).await;
    let pid = case.hostile_pid();

    let escapee: u32 = case
        .supervisor
        .call(HOSTILE, "escape", &())
        .await
        .expect("the plugin can fork and leave a process behind");
    case.hostile_pids.push(escapee);
    assert!(is_alive(escapee), "the escapee is not running");
    assert_ne!(
        process_group_of(escapee),
        process_group_of(pid),
        "the escapee is still in the plugin's process group"
    );
    assert_ne!(
        session_of(escapee),
        session_of(pid),
        "the escapee is still in the plugin's session"
    );
    assert!(
        !descendants_of(pid).contains(&escapee),
        "the escapee was not reparented away from the plugin"
    );

    match end {
        End::Stop => {
            case.supervisor.stop(HOSTILE).await.unwrap();
        }
        End::Crash => {
            let err = case
                .supervisor
                .call::<_, ()>(HOSTILE, "abort", &())
                .await
                .expect_err("abort returned");
            assert!(
                matches!(err, CallError::PluginCrashed { .. }),
                "expected a crash, got {err}"
            );
        }
    }
    assert_all_gone(&[pid, escapee]).await;

    case.finish().await;
}

/// How [`escape_case`] ends the plugin.
enum End {
    Stop,
    Crash,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_escaped_grandchild_dies_when_its_plugin_is_stopped() {
    escape_case(
        "an_escaped_grandchild_dies_when_its_plugin_is_stopped",
        End::Stop,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_escaped_grandchild_dies_when_its_plugin_crashes() {
    escape_case(
        "an_escaped_grandchild_dies_when_its_plugin_crashes",
        End::Crash,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environment_is_scrubbed_but_for_what_the_spec_grants() {
    let mut hostile = misbehave();
    hostile.env.insert(
        "AURORA_TEST_EXPLICIT".to_owned(),
        "set by the spec".to_owned(),
    );

    // Everything this test process has that the defaults do not pass on
    // must be scrubbed, except one variable the spec passes by name. Only
    // names are ever printed: the values may be secrets.
    let ours: BTreeMap<String, String> = std::env::vars_os()
        .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)))
        .collect();
    let mut not_passed_by_default: Vec<&String> = ours
        .keys()
        .filter(|name| !hostile.permissions.pass_env.contains(*name))
        .collect();
    if let Some(passed) = not_passed_by_default.pop() {
        hostile.permissions.pass_env.push(passed.clone());
    }
    if not_passed_by_default.is_empty() {
        skipping(
            "the_environment_is_scrubbed_but_for_what_the_spec_grants",
            "this process has no variable to scrub",
        );
        return;
    }
    let case = Case::start(hostile.clone()).await;

    let theirs: Vec<(String, String)> = case
        .supervisor
        .call(HOSTILE, "env", &())
        .await
        .expect("the plugin reports its environment");
    let theirs: BTreeMap<String, String> = theirs.into_iter().collect();

    for (name, value) in &hostile.env {
        assert!(
            theirs.get(name) == Some(value),
            "{name}, set by the spec, did not reach the plugin unchanged"
        );
    }
    for name in &hostile.permissions.pass_env {
        assert!(
            theirs.get(name) == ours.get(name),
            "{name}, passed by the spec, did not reach the plugin unchanged"
        );
    }
    let leaked: Vec<&String> = theirs
        .iter()
        .filter(|&(name, value)| {
            let granted = hostile.permissions.pass_env.contains(name)
                || hostile.env.get(name) == Some(value)
                // The supervisor's own variables (the channel's fd, the log
                // level), which the test process does not have.
                || (name.starts_with("AURORA_") && !ours.contains_key(name));
            !granted
        })
        .map(|(name, _)| name)
        .collect();
    assert!(
        leaked.is_empty(),
        "variables the spec did not grant reached the plugin: {leaked:?}"
    );
    case.finish().await;
}
