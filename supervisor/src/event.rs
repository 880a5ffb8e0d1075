//! Lifecycle events, for hosts that want to watch their plugins.

use std::time::Duration;

use crate::error::{Crash, ExitReason};

/// Something that happened to a plugin.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub plugin: String,
    pub kind: EventKind,
}

/// The kinds of [`Event`], in the order a plugin's life usually produces them.
#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    /// A process was started; `generation` counts starts from 1.
    Spawned { pid: u32, generation: u64 },
    /// The handshake succeeded and calls are being routed to the process.
    Ready { pid: u32, version: String },
    /// The process stopped answering (a ping or a cancelled call) and is
    /// being killed.
    Unresponsive { pid: u32, reason: String },
    /// The process went away without being asked to, or could not be
    /// started (`pid` is then `None`).
    Crashed { pid: Option<u32>, crash: Crash },
    /// A restart is scheduled after `delay`.
    BackingOff { delay: Duration, restarts: u32 },
    /// No more restarts: calls fail fast until an explicit restart.
    Failed { reason: String },
    /// The plugin was stopped on request, and its process reaped.
    Stopped { exit: Option<ExitReason> },
    /// The plugin has no process and waits for a call to start one: it is
    /// lazy and not yet called, or went `idle_timeout` without calls.
    Idle,
    /// A reload or rollback routed new calls to a new process (`pid`); the
    /// process it replaced finishes the calls it had and then stops.
    /// `swap_time` runs from the request to the switch.
    Reloaded {
        pid: u32,
        version: String,
        replaced: u32,
        swap_time: Duration,
    },
    /// A reload or rollback found the new version unfit (it did not start,
    /// greet, speak a compatible protocol or pass its health probe); the
    /// running version keeps serving.
    ReloadFailed { reason: String },
    /// The plugin went back to an earlier version: on request, or by itself
    /// (`automatic`) because the new one kept crashing after taking over.
    RolledBack {
        from: Option<String>,
        to: Option<String>,
        automatic: bool,
        reason: String,
    },
    /// A replaced process finished its calls (or ran out of drain time) and
    /// was stopped and reaped.
    Retired { pid: u32, exit: Option<ExitReason> },
}
