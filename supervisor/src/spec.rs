//! What the supervisor needs to know to run one plugin.
//!
//! A [`PluginSpec`] is plain data with sensible defaults: build one in code
//! with [`PluginSpec::new`] and struct update syntax, or load it from the TOML
//! config (see [`crate::config`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use aurora_protocol::DEFAULT_MAX_FRAME;

/// Everything about how one plugin is started, called and restarted.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginSpec {
    /// The name callers use; unique within a supervisor.
    pub name: String,
    /// The executable to run.
    pub command: PathBuf,
    pub args: Vec<String>,
    /// Variables added to the supervisor's environment for the plugin.
    pub env: BTreeMap<String, String>,
    /// The working directory; the supervisor's own when `None`.
    pub cwd: Option<PathBuf>,
    /// How long a call may take when the caller does not say.
    pub call_timeout: Duration,
    /// How many calls may be in flight at once; further callers wait.
    pub max_concurrent_calls: usize,
    /// The largest frame body either side may send, in bytes.
    pub max_frame: u32,
    /// How long the plugin has from spawn to a valid `Hello`.
    pub handshake_timeout: Duration,
    /// How long a cancelled call may keep running before the plugin is judged
    /// stuck, killed and restarted.
    pub cancel_grace: Duration,
    /// Each stage of a graceful stop (after `Shutdown`, after SIGTERM) waits
    /// this long before the next, harsher one.
    pub stop_timeout: Duration,
    /// How often to ping a ready plugin; `None` disables health checks.
    pub health_interval: Option<Duration>,
    /// How long a ping may go unanswered before the plugin is restarted.
    pub health_timeout: Duration,
    pub restart: RestartPolicy,
    /// The most verbose level of the plugin's own logs to forward.
    pub log_level: String,
    /// Whether the process waits, unstarted, for the first call.
    pub lazy: bool,
    /// Stop the process after this long without a call; the next call starts
    /// it again. `None` keeps it running.
    pub idle_timeout: Option<Duration>,
    /// The version the plugin must report in its hello (its manifest's);
    /// a process reporting another is refused. `None` accepts any.
    pub version: Option<semver::Version>,
    /// Resource limits, enforced by rlimits and, where available, cgroups.
    pub limits: Limits,
    /// What the plugin may touch, enforced by Landlock and credentials.
    pub permissions: Permissions,
    /// A method a new generation must answer, called with JSON `null` within
    /// `health_timeout`, before a reload routes calls to it. `None` trusts
    /// the handshake alone.
    pub health_method: Option<String>,
    /// How long a generation being replaced may keep serving the calls it
    /// had accepted before it is stopped; calls still running then fail.
    pub drain_timeout: Duration,
    /// When a newly swapped-in version counts as bad and is replaced by the
    /// one before it.
    pub rollback: RollbackPolicy,
    /// The manifest that defined the plugin, if one did: the version store
    /// keeps its text beside each binary.
    pub manifest: Option<PathBuf>,
}

impl PluginSpec {
    /// A spec with every setting at its default.
    pub fn new(name: impl Into<String>, command: impl Into<PathBuf>) -> PluginSpec {
        PluginSpec {
            name: name.into(),
            command: command.into(),
            args: Vec::new(),
            env: BTreeMap::new(),
            cwd: None,
            call_timeout: Duration::from_secs(30),
            max_concurrent_calls: 256,
            max_frame: DEFAULT_MAX_FRAME,
            handshake_timeout: Duration::from_secs(5),
            cancel_grace: Duration::from_millis(500),
            stop_timeout: Duration::from_secs(2),
            health_interval: Some(Duration::from_secs(10)),
            health_timeout: Duration::from_secs(5),
            restart: RestartPolicy::default(),
            log_level: "info".to_owned(),
            lazy: false,
            idle_timeout: None,
            version: None,
            limits: Limits::default(),
            permissions: Permissions::default(),
            health_method: None,
            drain_timeout: Duration::from_secs(30),
            rollback: RollbackPolicy::default(),
            manifest: None,
        }
    }
}

/// Resource limits for one plugin process and everything it starts.
///
/// `None` means unlimited. The defaults are safe for a well-behaved plugin
/// and stop a runaway one: no core dumps, a bounded address space, a bounded
/// number of processes and open files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of address space (`RLIMIT_AS`), and of memory for the plugin's
    /// cgroup where one can be made.
    pub memory: Option<u64>,
    /// Seconds of CPU time (`RLIMIT_CPU`): SIGXCPU at the limit, SIGKILL one
    /// second later. CPU time adds up over the process's whole life.
    pub cpu_seconds: Option<u64>,
    /// Open file descriptors (`RLIMIT_NOFILE`).
    pub open_files: Option<u64>,
    /// Processes and threads: the pids cgroup where one can be made, and
    /// `RLIMIT_NPROC` when the plugin runs as an unprivileged user.
    pub processes: Option<u64>,
    /// Bytes in any one file the plugin writes (`RLIMIT_FSIZE`).
    pub file_size: Option<u64>,
    /// Whether a crash may leave a core dump (`RLIMIT_CORE`).
    pub core_dumps: bool,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            memory: Some(1 << 30),
            cpu_seconds: None,
            open_files: Some(1024),
            processes: Some(64),
            file_size: None,
            core_dumps: false,
        }
    }
}

/// What a plugin may reach beyond its own memory.
///
/// Paths are granted with everything beneath them. The defaults allow what a
/// dynamically linked program needs to start (its own executable, the system
/// libraries, a few device files) and nothing else: no writes, no TCP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    /// Paths the plugin may read, beyond the defaults.
    pub read: Vec<std::path::PathBuf>,
    /// Paths the plugin may read and write.
    pub write: Vec<std::path::PathBuf>,
    /// Programs or directories the plugin may execute, beyond its own binary.
    pub execute: Vec<std::path::PathBuf>,
    /// TCP ports the plugin may connect to.
    pub connect_tcp: Vec<u16>,
    /// TCP ports the plugin may listen on.
    pub bind_tcp: Vec<u16>,
    /// Variables passed through from the supervisor's environment; all
    /// others are scrubbed (the spec's own `env` is always set).
    pub pass_env: Vec<String>,
    /// The user to run as when the supervisor runs as root.
    pub user: Option<String>,
    /// The group to run as; the user's primary group when unset.
    pub group: Option<String>,
    /// What to do when the kernel cannot enforce part of the sandbox.
    pub enforce: Enforcement,
}

impl Default for Permissions {
    fn default() -> Permissions {
        Permissions {
            read: Vec::new(),
            write: Vec::new(),
            execute: Vec::new(),
            connect_tcp: Vec::new(),
            bind_tcp: Vec::new(),
            pass_env: ["PATH", "LANG", "LC_ALL", "TZ", "RUST_BACKTRACE"]
                .map(String::from)
                .to_vec(),
            user: None,
            group: None,
            enforce: Enforcement::BestEffort,
        }
    }
}

/// How strictly a sandbox the kernel cannot fully enforce is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Enforcement {
    /// Run with what the kernel can enforce and log what it cannot.
    #[default]
    BestEffort,
    /// Refuse to start rather than run with less than the whole sandbox.
    Strict,
}

/// When a plugin that stopped on its own is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartMode {
    /// Never: the plugin stays down.
    Never,
    /// After a crash, a hang or an unclean exit, not after a clean exit.
    #[default]
    OnFailure,
    /// Whenever it stops, unless the supervisor stopped it.
    Always,
}

/// How often, and how quickly, a plugin is restarted.
#[derive(Debug, Clone, PartialEq)]
pub struct RestartPolicy {
    pub mode: RestartMode,
    /// At most this many restarts within `window`; one more and the plugin is
    /// marked failed, so calls fail fast instead of waiting on a lost cause.
    pub max_restarts: u32,
    pub window: Duration,
    /// The first delay before a restart; each further one doubles it.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// A plugin that stayed up this long starts again from `backoff_initial`.
    pub reset_after: Duration,
}

impl Default for RestartPolicy {
    fn default() -> RestartPolicy {
        RestartPolicy {
            mode: RestartMode::OnFailure,
            max_restarts: 5,
            window: Duration::from_secs(60),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            reset_after: Duration::from_secs(30),
        }
    }
}

/// Automatic rollback: a version that crashes `crashes` times within
/// `window` of taking over through a reload is replaced by the version that
/// ran before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackPolicy {
    /// Crashes (including failed restarts) that condemn a new version; zero
    /// disables automatic rollback.
    pub crashes: u32,
    /// How long after the swap crashes count.
    pub window: Duration,
}

impl Default for RollbackPolicy {
    fn default() -> RollbackPolicy {
        RollbackPolicy {
            crashes: 3,
            window: Duration::from_secs(60),
        }
    }
}
