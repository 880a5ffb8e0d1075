//! The errors callers of the supervisor see, and how a plugin's death is
//! described.

use std::fmt;
use std::time::Duration;

use aurora_protocol::{ErrorKind, FrameError, PayloadError};

/// How a plugin process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

impl ExitReason {
    pub(crate) fn from_status(status: std::process::ExitStatus) -> ExitReason {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => ExitReason::Code(code),
            (None, Some(signal)) => ExitReason::Signal(signal),
            // A wait status is either an exit or a signal; treat anything else
            // as an unclean exit rather than trusting it.
            (None, None) => ExitReason::Code(-1),
        }
    }

    /// Whether the process exited by itself with status zero.
    pub fn is_clean(self) -> bool {
        self == ExitReason::Code(0)
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ExitReason::Code(code) => write!(f, "exited with code {code}"),
            ExitReason::Signal(signal) => match nix::sys::signal::Signal::try_from(signal) {
                Ok(name) => write!(f, "killed by signal {signal} ({name})"),
                Err(_) => write!(f, "killed by signal {signal}"),
            },
        }
    }
}

/// Everything known about a plugin process that went away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crash {
    /// What the supervisor noticed first, such as "connection closed" or
    /// "malformed frame: ...".
    pub cause: String,
    /// The exit status, when the process could be reaped.
    pub exit: Option<ExitReason>,
    /// The last lines the plugin wrote to stderr, oldest first.
    pub stderr_tail: Vec<String>,
}

impl fmt::Display for Crash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.exit {
            Some(exit) => write!(f, "{exit} ({})", self.cause)?,
            None => f.write_str(&self.cause)?,
        }
        if !self.stderr_tail.is_empty() {
            write!(f, "; last stderr lines:")?;
            for line in &self.stderr_tail {
                write!(f, "\n  | {line}")?;
            }
        }
        Ok(())
    }
}

/// Why a call did not return a value.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("no plugin named {plugin:?}")]
    UnknownPlugin { plugin: String },
    #[error("plugin {plugin:?} has no method {method:?}; it serves: {available}")]
    UnknownMethod {
        plugin: String,
        method: String,
        available: String,
    },
    #[error("call to {plugin}.{method} timed out after {}", humantime::format_duration(*.after))]
    Timeout {
        plugin: String,
        method: String,
        after: Duration,
    },
    #[error("plugin {plugin:?} went away during the call to {method}: {crash}")]
    PluginCrashed {
        plugin: String,
        method: String,
        crash: Crash,
    },
    #[error("plugin {plugin:?} is failed and not restarting: {reason}")]
    PluginFailed { plugin: String, reason: String },
    #[error("plugin {plugin:?} is stopped")]
    PluginStopped { plugin: String },
    #[error("{plugin}.{method} returned an error ({kind}): {message}")]
    Remote {
        plugin: String,
        method: String,
        kind: ErrorKind,
        message: String,
    },
    #[error("cannot encode the request to {plugin}.{method}: {source}")]
    EncodeRequest {
        plugin: String,
        method: String,
        source: PayloadError,
    },
    #[error("cannot decode the reply from {plugin}.{method}: {source}")]
    DecodeReply {
        plugin: String,
        method: String,
        source: PayloadError,
    },
    #[error("request to {plugin}.{method} is too large: {source}")]
    RequestTooLarge {
        plugin: String,
        method: String,
        source: FrameError,
    },
}

/// Why the supervisor refused a request about its plugins.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("a plugin named {name:?} already exists")]
    DuplicatePlugin { name: String },
    #[error("no plugin named {name:?}")]
    UnknownPlugin { name: String },
    #[error("plugin {name:?} did not become ready: {reason}")]
    NotReady { name: String, reason: String },
    /// A reload or rollback left the running version in place.
    #[error("reload of plugin {name:?} failed, and the running version keeps serving: {reason}")]
    ReloadFailed { name: String, reason: String },
}
