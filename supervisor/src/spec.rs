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
        }
    }
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
