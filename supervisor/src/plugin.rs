//! One plugin's life: a task that owns its process and its connection, and a
//! handle that callers use to reach it.
//!
//! The task runs an explicit state machine:
//!
//! ```text
//!            +----------------------------------------------+
//!            v                                              |
//! Starting --ok--> Ready --crash/hang--> Stopping --> BackingOff
//!    |                |                      |
//!    |             stop request            budget spent / policy says no
//!    |                v                      v
//!    +--fail--> (as a crash)    Stopped    Failed
//! ```
//!
//! Callers never touch the process. They read the published [`Status`] to
//! find the live connection, wait while the plugin is starting or backing
//! off, and fail fast when it is failed or stopped. Commands arrive as
//! [`Control`] messages; closing the control channel stops the plugin.
//!
//! A reload or rollback (`swap.rs`) runs beside `Ready`: the new generation
//! starts, greets and passes its probe while the old one keeps serving, and
//! the state stays `Ready` throughout, with the connection switching from
//! the old process to the new in one publish.

mod swap;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use aurora_protocol::{ErrorKind, HostMessage, MethodInfo, Payload};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::sync::{Semaphore, broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::backoff::{Backoff, Decision};
use crate::connection::{CONNECTION_CLOSED, Connection, ConnectionTasks, Outcome};
use crate::error::{CallError, Crash, ExitReason};
use crate::event::{Event, EventKind};
use crate::sandbox::{self, PluginCgroup};
use crate::spawn::{ChildProcess, StderrTail, spawn_plugin};
use crate::spec::{PluginSpec, RestartMode};
use crate::store::VersionStore;
use swap::{Build, Probation, Retiring, Swap};
pub use swap::{Reloaded, VersionInfo};
pub(crate) use swap::{SwapReply, SwapRequest, find_executable};

/// How long a process that closed its socket has to exit on its own before
/// it is killed.
const EXIT_AFTER_CLOSE: Duration = Duration::from_secs(1);

/// How often to look whether a killed plugin's cgroup has emptied, and how
/// long to keep looking.
const CGROUP_POLL: Duration = Duration::from_millis(10);
const CGROUP_EMPTY_WAIT: Duration = Duration::from_secs(2);

/// The cause of an exit with nothing else to say about it.
const PROCESS_EXITED: &str = "process exited";

/// How long to wait for the last of a dead plugin's output to be read.
const OUTPUT_DRAIN: Duration = Duration::from_millis(500);

/// Where a plugin is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PluginState {
    /// No process, and none until a call arrives: a lazy plugin before its
    /// first call, or a plugin stopped after `idle_timeout` without calls.
    /// A call starts it and waits.
    Idle,
    /// A process is being spawned and handshaken. Calls wait.
    Starting,
    /// Calls are being served.
    Ready,
    /// The process is being stopped or cleaned up after a crash. Calls wait
    /// for what comes next.
    Stopping,
    /// A restart is scheduled. Calls wait.
    BackingOff { delay: Duration },
    /// Restarts were given up; calls fail fast with the reason.
    Failed { reason: String },
    /// Stopped on request or by its restart policy; calls fail fast.
    Stopped,
}

impl PluginState {
    /// The state's name as it appears in status output.
    pub fn name(&self) -> &'static str {
        match self {
            PluginState::Idle => "idle",
            PluginState::Starting => "starting",
            PluginState::Ready => "ready",
            PluginState::Stopping => "stopping",
            PluginState::BackingOff { .. } => "backing-off",
            PluginState::Failed { .. } => "failed",
            PluginState::Stopped => "stopped",
        }
    }
}

/// What the plugin task publishes after every change.
#[derive(Clone)]
pub(crate) struct Status {
    pub(crate) state: PluginState,
    /// Present exactly when `state` is `Ready`.
    pub(crate) connection: Option<Arc<Connection>>,
    pub(crate) pid: Option<u32>,
    /// How many processes have been started.
    pub(crate) generation: u64,
    /// How many of them were started by a reload or rollback.
    pub(crate) swaps: u64,
    pub(crate) started_at: Option<std::time::Instant>,
    /// What the kernel could not enforce of the latest process's sandbox.
    pub(crate) sandbox_gaps: Vec<String>,
    /// The spec of the version running now, as its caller gave it: a
    /// reload or rollback replaces it.
    pub(crate) spec: Arc<PluginSpec>,
}

/// A snapshot of one plugin, for status displays.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginStatus {
    pub name: String,
    pub state: PluginState,
    pub pid: Option<u32>,
    /// The version the running process reported in its hello.
    pub version: Option<String>,
    pub methods: Vec<MethodInfo>,
    /// Processes started so far: the first, restarts, and the new
    /// generations of reloads and rollbacks (`reloads`).
    pub generation: u64,
    /// Processes started by reloads and rollbacks, refused ones included.
    pub reloads: u64,
    pub uptime: Option<Duration>,
    /// Calls made to the plugin, and how many of them failed.
    pub calls: u64,
    pub errors: u64,
    /// Parts of the sandbox the kernel could not enforce; empty when all of
    /// it holds.
    pub sandbox_gaps: Vec<String>,
}

/// Requests to the plugin task.
pub(crate) enum Control {
    /// Stop the process gracefully and stay stopped.
    Stop { done: oneshot::Sender<()> },
    /// A call is waiting for an idle plugin: start it. Ignored in any other
    /// state, so callers may send it freely.
    Wake,
    /// Stop the process if running, forget past failures, start afresh.
    Restart { done: oneshot::Sender<()> },
    /// Replace the running version without dropping a call: a reload to a
    /// new spec (or the same spec, for a new binary at its path), or a
    /// rollback to a version that ran before.
    Swap {
        request: SwapRequest,
        done: SwapReply,
    },
    /// List the versions this plugin has run.
    Versions {
        done: oneshot::Sender<Vec<VersionInfo>>,
    },
}

/// The caller's side of a plugin.
pub(crate) struct PluginHandle {
    spec: Arc<PluginSpec>,
    status: watch::Receiver<Status>,
    control: mpsc::UnboundedSender<Control>,
    permits: Semaphore,
    /// How many permits `permits` stands for now: the running spec's
    /// `max_concurrent_calls`, once a resize after a reload has caught up.
    permit_limit: AtomicUsize,
    activity: Arc<idle::Activity>,
    /// How to kill the running process trees without the task, for drops
    /// that cannot wait.
    reaches: Reaches,
    task: JoinHandle<()>,
}

impl PluginHandle {
    /// Starts the plugin's task, which spawns the process at once (or, for
    /// a lazy plugin, at the first call). When `gate` is given, the task
    /// spawns nothing until it resolves (sent or dropped): a replacement
    /// waits until the process it replaces is gone, a dependent until its
    /// requirements are up. Calls made meanwhile wait as for a starting
    /// plugin.
    pub(crate) fn start_after(
        spec: PluginSpec,
        events: broadcast::Sender<Event>,
        gate: Option<oneshot::Receiver<()>>,
        store: Option<Arc<VersionStore>>,
    ) -> PluginHandle {
        let spec = Arc::new(spec);
        let initial = if spec.lazy {
            PluginState::Idle
        } else {
            PluginState::Starting
        };
        let (status_tx, status) = watch::channel(Status {
            state: initial,
            connection: None,
            pid: None,
            generation: 0,
            swaps: 0,
            started_at: None,
            sandbox_gaps: Vec::new(),
            spec: Arc::clone(&spec),
        });
        let (control, control_rx) = mpsc::unbounded_channel();
        let activity = Arc::new(idle::Activity::default());
        let reaches = Reaches::default();
        let task = PluginTask {
            spec: Arc::clone(&spec),
            status: status_tx,
            control: control_rx,
            emitter: Emitter {
                plugin: spec.name.clone(),
                events,
            },
            reaches: reaches.clone(),
            backoff: Backoff::new(spec.restart.clone()),
            activity: Arc::clone(&activity),
            gate,
            store,
            build: Build::unadmitted(Arc::clone(&spec)),
            history: Vec::new(),
            probation: None,
            swap: None,
            retiring: None,
            queued: VecDeque::new(),
            start_reply: None,
        };
        let span = tracing::info_span!("plugin", name = %spec.name);
        let task = tokio::spawn(task.run().instrument(span));
        let permit_limit = AtomicUsize::new(spec.max_concurrent_calls.max(1));
        let permits = Semaphore::new(spec.max_concurrent_calls.max(1));
        PluginHandle {
            spec,
            status,
            control,
            permits,
            permit_limit,
            activity,
            reaches,
            task,
        }
    }

    /// The spec of the version running now, as it was given.
    pub(crate) fn spec(&self) -> Arc<PluginSpec> {
        Arc::clone(&self.status.borrow().spec)
    }

    /// Asks the task for a swap and waits for its outcome: the new version
    /// serving and the old one gone, or the reason nothing changed.
    pub(crate) async fn swap(&self, request: SwapRequest) -> Result<Reloaded, String> {
        let (done, outcome) = oneshot::channel();
        let gone = || "the plugin's task has ended".to_owned();
        self.control
            .send(Control::Swap { request, done })
            .map_err(|_| gone())?;
        outcome.await.map_err(|_| gone())?
    }

    /// The versions the plugin has run, the running one marked.
    pub(crate) async fn versions(&self) -> Vec<VersionInfo> {
        let (done, listed) = oneshot::channel();
        if self.control.send(Control::Versions { done }).is_err() {
            return Vec::new();
        }
        listed.await.unwrap_or_default()
    }

    pub(crate) fn snapshot(&self) -> PluginStatus {
        let status = self.status.borrow();
        let hello = status.connection.as_ref().map(|c| c.hello());
        PluginStatus {
            name: self.spec.name.clone(),
            state: status.state.clone(),
            pid: status.pid,
            version: hello.map(|h| h.version.clone()),
            methods: hello.map(|h| h.methods.clone()).unwrap_or_default(),
            generation: status.generation,
            reloads: status.swaps,
            uptime: status.started_at.map(|t| t.elapsed()),
            calls: self.activity.calls(),
            errors: self.activity.errors(),
            sandbox_gaps: status.sandbox_gaps.clone(),
        }
    }

    /// Waits until the plugin is ready (or idle, ready to start on demand),
    /// failed or stopped, or `deadline`.
    pub(crate) async fn settled(&self, deadline: Instant) -> Result<(), String> {
        let mut status = self.status.clone();
        let settled = status.wait_for(|s| {
            matches!(
                s.state,
                PluginState::Ready
                    | PluginState::Idle
                    | PluginState::Failed { .. }
                    | PluginState::Stopped
            )
        });
        match tokio::time::timeout_at(deadline, settled).await {
            Ok(Ok(status)) => match &status.state {
                PluginState::Ready | PluginState::Idle => Ok(()),
                PluginState::Failed { reason } => Err(reason.clone()),
                other => Err(format!("it is {}", other.name())),
            },
            Ok(Err(_)) => Err("its task has ended".to_owned()),
            Err(_) => Err(format!("it is still {}", self.status.borrow().state.name())),
        }
    }

    /// Asks the task to do something and waits until it has.
    pub(crate) async fn command(&self, make: impl FnOnce(oneshot::Sender<()>) -> Control) {
        let (done, finished) = oneshot::channel();
        if self.control.send(make(done)).is_ok() {
            let _ = finished.await;
        }
    }

    /// Kills the process tree at once, without waiting, for drops.
    pub(crate) fn kill_now(&self) {
        self.reaches.kill_all();
        self.task.abort();
    }

    /// Runs one call, waiting for the plugin to be ready (and starting it,
    /// when idle) if need be.
    pub(crate) async fn call(
        &self,
        method: &str,
        payload: Payload,
        timeout: Option<Duration>,
    ) -> Result<Payload, CallError> {
        // Counted as activity from the start, so the plugin is not stopped
        // for idleness while this call waits for a permit or a process.
        let _busy = self.activity.begin();
        let result = self.call_counted(method, payload, timeout).await;
        if result.is_err() {
            self.activity.failed();
        }
        result
    }

    async fn call_counted(
        &self,
        method: &str,
        payload: Payload,
        timeout: Option<Duration>,
    ) -> Result<Payload, CallError> {
        let plugin = &self.spec.name;
        // A reload may have changed the timeouts since the plugin was added.
        let (call_timeout, cancel_grace, max_calls) = {
            let status = self.status.borrow();
            let spec = &status.spec;
            (
                spec.call_timeout,
                spec.cancel_grace,
                spec.max_concurrent_calls,
            )
        };
        self.resize_permits(max_calls);
        let timeout = timeout.unwrap_or(call_timeout);
        let deadline = Instant::now() + timeout;
        let timed_out = || CallError::Timeout {
            plugin: plugin.clone(),
            method: method.to_owned(),
            after: timeout,
        };

        // Most calls find a free slot: take it without arming a timer.
        let _permit = match self.permits.try_acquire() {
            Ok(permit) => permit,
            Err(_) => tokio::time::timeout_at(deadline, self.permits.acquire())
                .await
                .map_err(|_| timed_out())?
                .expect("the semaphore is never closed"),
        };

        let mut payload = payload;
        let (connection, id, outcome) = loop {
            let connection = self.ready_connection(method, deadline, timed_out).await?;
            if !connection.serves(method) {
                return Err(CallError::UnknownMethod {
                    plugin: plugin.clone(),
                    method: method.to_owned(),
                    available: connection.method_list(),
                });
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            match connection.start_call(method, payload, remaining) {
                Ok((id, outcome)) => break (connection, id, outcome),
                Err(Ok(returned)) => {
                    // Closed between our look and our call: wait for the
                    // status to move on from this connection.
                    payload = returned;
                    self.wait_for_change(&connection, deadline)
                        .await
                        .map_err(|_| timed_out())?;
                }
                Err(Err(source)) => {
                    return Err(CallError::RequestTooLarge {
                        plugin: plugin.clone(),
                        method: method.to_owned(),
                        source,
                    });
                }
            }
        };

        match tokio::time::timeout_at(deadline, outcome).await {
            Ok(Ok(Outcome::Replied(Ok(payload)))) => Ok(payload),
            // The plugin saw the same deadline pass: to the caller that is a
            // timeout, whichever side noticed first.
            Ok(Ok(Outcome::Replied(Err(remote)))) if remote.kind == ErrorKind::DeadlineExceeded => {
                Err(timed_out())
            }
            Ok(Ok(Outcome::Replied(Err(remote)))) => Err(CallError::Remote {
                plugin: plugin.clone(),
                method: method.to_owned(),
                kind: remote.kind,
                message: remote.message,
            }),
            Ok(Ok(Outcome::Lost(crash))) => Err(CallError::PluginCrashed {
                plugin: plugin.clone(),
                method: method.to_owned(),
                crash,
            }),
            Ok(Err(_)) => unreachable!("a connection completes or fails every call it accepted"),
            Err(_) => {
                connection.abandon(id, method, cancel_grace);
                Err(timed_out())
            }
        }
    }

    /// Makes the concurrency limit `wanted`, after a reload changed it.
    /// Permits in use cannot be taken back: a smaller limit is reached as
    /// they are returned, by later calls retrying the resize.
    fn resize_permits(&self, wanted: usize) {
        let wanted = wanted.max(1);
        let current = self.permit_limit.load(Ordering::Acquire);
        if wanted == current {
            return;
        }
        // One caller resizes; the others go on with the limit as it is.
        if self
            .permit_limit
            .compare_exchange(current, wanted, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        if wanted > current {
            self.permits.add_permits(wanted - current);
            return;
        }
        let excess = current - wanted;
        let forgotten = self.permits.forget_permits(excess);
        if forgotten < excess {
            self.permit_limit
                .fetch_add(excess - forgotten, Ordering::AcqRel);
        }
    }

    async fn ready_connection(
        &self,
        method: &str,
        deadline: Instant,
        timed_out: impl Fn() -> CallError,
    ) -> Result<Arc<Connection>, CallError> {
        // The common case, a ready plugin, needs no receiver of its own.
        if let Some(connection) = &self.status.borrow().connection {
            return Ok(Arc::clone(connection));
        }

        let plugin = &self.spec.name;
        let mut status = self.status.clone();
        loop {
            {
                let current = status.borrow_and_update();
                match &current.state {
                    PluginState::Ready => {
                        if let Some(connection) = &current.connection {
                            return Ok(Arc::clone(connection));
                        }
                    }
                    PluginState::Failed { reason } => {
                        return Err(CallError::PluginFailed {
                            plugin: plugin.clone(),
                            reason: reason.clone(),
                        });
                    }
                    PluginState::Stopped => {
                        return Err(CallError::PluginStopped {
                            plugin: plugin.clone(),
                        });
                    }
                    PluginState::Idle => {
                        // The task may be gone already; then the wait
                        // below ends with `PluginStopped`.
                        let _ = self.control.send(Control::Wake);
                    }
                    PluginState::Starting
                    | PluginState::Stopping
                    | PluginState::BackingOff { .. } => {}
                }
            }
            tracing::trace!(method, "waiting for the plugin to be ready");
            match tokio::time::timeout_at(deadline, status.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => {
                    return Err(CallError::PluginStopped {
                        plugin: plugin.clone(),
                    });
                }
                Err(_) => return Err(timed_out()),
            }
        }
    }

    async fn wait_for_change(&self, seen: &Arc<Connection>, deadline: Instant) -> Result<(), ()> {
        let mut status = self.status.clone();
        let moved_on = status.wait_for(|s| match &s.connection {
            Some(connection) => !Arc::ptr_eq(connection, seen),
            None => true,
        });
        match tokio::time::timeout_at(deadline, moved_on).await {
            Ok(_) => Ok(()),
            Err(_) => Err(()),
        }
    }
}

/// A running process and everything tied to it.
struct Running {
    child: ChildProcess,
    /// Also the process group it leads.
    pid: u32,
    connection: Arc<Connection>,
    tasks: ConnectionTasks,
    stderr_tail: StderrTail,
    output: Vec<JoinHandle<()>>,
    started_at: Instant,
    /// What the kernel could not enforce of this process's sandbox.
    sandbox_gaps: Vec<String>,
}

/// How a running process came to an end.
enum Ended {
    /// It died, or was killed for hanging; `pid` is `None` when no process
    /// was started at all.
    Crashed {
        pid: Option<u32>,
        crash: Crash,
        uptime: Duration,
    },
    /// A `Stop` was served.
    Stopped { done: oneshot::Sender<()> },
    /// A `Restart` was served.
    Restarted { done: oneshot::Sender<()> },
    /// The handle went away; the process has been stopped.
    Abandoned,
    /// No call came for `idle_timeout`; the process has been stopped.
    Idled,
}

/// How to get an exit status from a process that is going away.
enum Reap {
    /// Already reaped, with this status (if waiting worked).
    Exited(Option<ExitReason>),
    /// Its socket closed: give it a moment to exit on its own.
    WaitThenKill,
    /// It is stuck or broken: kill it.
    KillNow,
}

/// What to do after a stretch of being down.
enum Next {
    Start,
    Exit,
}

struct PluginTask {
    /// The spec the current version runs with: its command is the stored
    /// copy of the binary when there is a version store.
    spec: Arc<PluginSpec>,
    status: watch::Sender<Status>,
    control: mpsc::UnboundedReceiver<Control>,
    emitter: Emitter,
    reaches: Reaches,
    backoff: Backoff,
    activity: Arc<idle::Activity>,
    /// Resolves when the task may spawn its first process.
    gate: Option<oneshot::Receiver<()>>,
    /// Where binaries are kept for rollback; `None` runs them in place.
    store: Option<Arc<VersionStore>>,
    /// The version running now (or next, when none runs).
    build: Build,
    /// Versions that ran before, the latest last.
    history: Vec<Build>,
    /// Set after a swap: the version swapped out, back to which a new
    /// version that keeps crashing is rolled.
    probation: Option<Probation>,
    /// A new generation starting beside the serving one.
    swap: Option<Swap>,
    /// A replaced generation finishing its calls and stopping.
    retiring: Option<Retiring>,
    /// Swap requests that arrived while another swap was under way.
    queued: VecDeque<(SwapRequest, SwapReply)>,
    /// A swap that had to wait for a start (the plugin was down): answered
    /// when the start succeeds or fails.
    start_reply: Option<(SwapReply, Instant)>,
}

impl PluginTask {
    async fn run(mut self) {
        if let Some(gate) = self.gate.take()
            && matches!(self.wait_for_gate(gate).await, Next::Exit)
        {
            return;
        }
        self.admit_first().await;
        if self.spec.lazy && matches!(self.stay_idle().await, Next::Exit) {
            return;
        }
        loop {
            let ended = match self.start().await {
                Ok(running) => self.serve(running).await,
                Err((pid, crash)) => Ended::Crashed {
                    pid,
                    crash,
                    uptime: Duration::ZERO,
                },
            };
            let next = match ended {
                Ended::Crashed { pid, crash, uptime } => self.after_crash(pid, crash, uptime).await,
                Ended::Stopped { done } => {
                    let _ = done.send(());
                    self.stay_down(PluginState::Stopped).await
                }
                Ended::Restarted { done } => self.restart_requested(done),
                Ended::Abandoned => Next::Exit,
                Ended::Idled => self.stay_idle().await,
            };
            if let Next::Exit = next {
                return;
            }
        }
    }

    fn publish(&self, state: PluginState, running: Option<&Running>) {
        self.status.send_modify(|status| {
            status.connection = match (&state, running) {
                (PluginState::Ready, Some(running)) => Some(Arc::clone(&running.connection)),
                _ => None,
            };
            status.pid = running.map(|r| r.pid);
            status.started_at = running.map(|r| r.started_at.into_std());
            if let Some(running) = running {
                status.sandbox_gaps.clone_from(&running.sandbox_gaps);
            }
            status.spec = Arc::clone(&self.build.given);
            status.state = state;
        });
    }

    fn emit(&self, kind: EventKind) {
        self.emitter.emit(kind);
    }

    /// Spawns a process of the current version and completes the handshake.
    async fn start(&mut self) -> Result<Running, (Option<u32>, Crash)> {
        self.publish(PluginState::Starting, None);
        let generation = self.next_generation();
        let launched = launch(
            Arc::clone(&self.spec),
            self.reaches.clone(),
            self.emitter.clone(),
            generation,
        )
        .await;
        let running = match launched {
            Ok(running) => running,
            Err((pid, crash)) => {
                tracing::warn!(pid, cause = %crash.cause, "plugin failed to start");
                return Err((pid, crash));
            }
        };

        let version = running.connection.hello().version.clone();
        self.publish(PluginState::Ready, Some(&running));
        tracing::info!(pid = running.pid, %version, "plugin ready");
        self.emit(EventKind::Ready {
            pid: running.pid,
            version: version.clone(),
        });
        self.activate(&version).await;
        if let Some((done, requested_at)) = self.start_reply.take() {
            let _ = done.send(Ok(Reloaded {
                pid: Some(running.pid),
                version: Some(version),
                replaced: None,
                swap_time: requested_at.elapsed(),
            }));
        }
        Ok(running)
    }

    /// Counts one more process started, and returns its number.
    fn next_generation(&self) -> u64 {
        let mut generation = 0;
        self.status.send_modify(|status| {
            status.generation += 1;
            generation = status.generation;
        });
        generation
    }

    /// Serves the running process until it ends or is told to stop.
    async fn serve(&mut self, mut running: Running) -> Ended {
        let mut health = health_checks(&self.spec);
        let mut ping: Option<(u64, Instant)> = None;
        let mut nonce = 0u64;
        let mut idle_check = self
            .spec
            .idle_timeout
            .map(|timeout| running.started_at + timeout);

        loop {
            let ping_deadline = ping.map(|(_, deadline)| deadline);
            tokio::select! {
                status = running.child.wait() => {
                    let exit = status.ok().map(ExitReason::from_status);
                    let cause = exit_cause(&mut running.tasks.closed).await;
                    return self.crashed(running, cause, Reap::Exited(exit)).await;
                }
                cause = &mut running.tasks.closed => {
                    // A clean end-of-file means the process is on its way
                    // out; its exit status will tell the rest.
                    let cause = match cause {
                        Ok(cause) if cause == CONNECTION_CLOSED => PROCESS_EXITED.to_owned(),
                        Ok(cause) => cause,
                        Err(_) => "connection reader stopped".to_owned(),
                    };
                    return self.crashed(running, cause, Reap::WaitThenKill).await;
                }
                Some(reason) = running.tasks.stuck.recv() => {
                    return self.unresponsive(running, reason).await;
                }
                _ = tick(&mut health) => {
                    if ping.is_none() {
                        nonce += 1;
                        running.connection.send(HostMessage::Ping { nonce });
                        ping = Some((nonce, Instant::now() + self.spec.health_timeout));
                    }
                }
                Ok(()) = running.tasks.pongs.changed() => {
                    let answered = *running.tasks.pongs.borrow_and_update();
                    if ping.is_some_and(|(sent, _)| answered >= sent) {
                        ping = None;
                    }
                }
                _ = sleep_until(ping_deadline), if ping_deadline.is_some() => {
                    let reason = format!(
                        "no answer to a ping within {}",
                        humantime::format_duration(self.spec.health_timeout)
                    );
                    return self.unresponsive(running, reason).await;
                }
                _ = sleep_until(idle_check), if idle_check.is_some() => {
                    let timeout = self.spec.idle_timeout.expect("checked only with a timeout");
                    idle_check = self.activity.busy_until(timeout, running.started_at);
                    if idle_check.is_none() {
                        tracing::info!(
                            idle = %humantime::format_duration(timeout),
                            "no calls for the idle timeout; stopping the plugin"
                        );
                        self.stop_gracefully(running).await;
                        return Ended::Idled;
                    }
                }
                started = swap::starting(&mut self.swap) => {
                    // The old connection's pings and the new one's nonces
                    // have nothing to do with each other.
                    ping = None;
                    if self.swap_started(started, &mut running).await {
                        // The new version's timings hold from its start.
                        health = health_checks(&self.spec);
                        idle_check = self
                            .spec
                            .idle_timeout
                            .map(|timeout| running.started_at + timeout);
                    }
                }
                () = swap::retired(&mut self.retiring) => self.retire_finished(),
                control = self.control.recv() => {
                    let ended = match control {
                        Some(Control::Wake) => continue,
                        Some(Control::Swap { request, done }) => {
                            self.request_swap(request, done);
                            continue;
                        }
                        Some(Control::Versions { done }) => {
                            let _ = done.send(self.versions());
                            continue;
                        }
                        Some(Control::Stop { done }) => Ended::Stopped { done },
                        Some(Control::Restart { done }) => Ended::Restarted { done },
                        None => Ended::Abandoned,
                    };
                    self.stop_gracefully(running).await;
                    return ended;
                }
            }
        }
    }

    /// The plugin stopped answering: kill it and report it as a crash.
    async fn unresponsive(&mut self, running: Running, reason: String) -> Ended {
        tracing::warn!(pid = running.pid, %reason, "plugin unresponsive; killing it");
        self.emit(EventKind::Unresponsive {
            pid: running.pid,
            reason: reason.clone(),
        });
        self.crashed(running, reason, Reap::KillNow).await
    }

    /// Cleans up after a process that died or must die, and describes it.
    async fn crashed(&mut self, mut running: Running, cause: String, reap: Reap) -> Ended {
        running.connection.stop_accepting();
        self.publish(PluginState::Stopping, None);

        let exit = match reap {
            Reap::Exited(exit) => exit,
            Reap::WaitThenKill => {
                match tokio::time::timeout(EXIT_AFTER_CLOSE, running.child.wait()).await {
                    Ok(Ok(status)) => Some(ExitReason::from_status(status)),
                    _ => kill_and_reap(&self.reaches, running.pid, &mut running.child).await,
                }
            }
            Reap::KillNow => kill_and_reap(&self.reaches, running.pid, &mut running.child).await,
        };
        let pid = running.pid;
        let (crash, uptime) = finish(&self.reaches, running, cause, exit).await;
        tracing::warn!(pid, %crash, "plugin went away");
        // After the dead process is dealt with, so its callers hear of it
        // without waiting for a replaced process to drain.
        self.settle_swaps(pid, "the serving process went away")
            .await;
        Ended::Crashed {
            pid: Some(pid),
            crash,
            uptime,
        }
    }

    /// Stops a healthy process: `Shutdown`, then SIGTERM, then SIGKILL, each
    /// after `stop_timeout`.
    async fn stop_gracefully(&mut self, mut running: Running) -> Option<ExitReason> {
        running.connection.stop_accepting();
        self.publish(PluginState::Stopping, None);
        self.settle_swaps(running.pid, "the plugin is stopping")
            .await;
        tracing::info!(pid = running.pid, "stopping plugin");

        let exit = stop_process(&self.reaches, &mut running, self.spec.stop_timeout).await;
        finish(&self.reaches, running, "plugin stopped".to_owned(), exit).await;
        self.emit(EventKind::Stopped { exit });
        exit
    }

    /// Applies the restart policy after a crash, unless the crash condemns
    /// a version that only just took over.
    async fn after_crash(&mut self, pid: Option<u32>, crash: Crash, uptime: Duration) -> Next {
        self.emit(EventKind::Crashed {
            pid,
            crash: crash.clone(),
        });
        if let Some((done, _)) = self.start_reply.take() {
            let _ = done.send(Err(format!("the new version did not start: {crash}")));
        }
        if let Some(previous) = self.condemned(false) {
            return self.roll_back_automatically(previous, &crash);
        }

        // Status zero after breaking the protocol is still a failure.
        let clean = crash.exit.is_some_and(ExitReason::is_clean) && crash.cause == PROCESS_EXITED;
        let restart = match self.spec.restart.mode {
            RestartMode::Never => false,
            RestartMode::OnFailure => !clean,
            RestartMode::Always => true,
        };
        if !restart {
            if !clean && let Some(previous) = self.condemned(true) {
                return self.roll_back_automatically(previous, &crash);
            }
            let state = if clean {
                PluginState::Stopped
            } else {
                PluginState::Failed {
                    reason: format!("{crash}; restart policy is never"),
                }
            };
            return self.stay_down(state).await;
        }

        match self
            .backoff
            .next(std::time::Instant::now(), uptime, fastrand::f64())
        {
            Decision::RestartAfter(delay) => self.back_off(delay).await,
            Decision::GiveUp { restarts, window } => {
                if let Some(previous) = self.condemned(true) {
                    return self.roll_back_automatically(previous, &crash);
                }
                let reason = format!(
                    "restarted {restarts} times within {}; last failure: {crash}",
                    humantime::format_duration(window)
                );
                tracing::error!(%reason, "plugin failed");
                self.stay_down(PluginState::Failed { reason }).await
            }
        }
    }

    async fn back_off(&mut self, delay: Duration) -> Next {
        let restarts = self.status.borrow().generation as u32;
        tracing::info!(delay = %humantime::format_duration(delay), "restarting plugin after a delay");
        self.publish(PluginState::BackingOff { delay }, None);
        self.emit(EventKind::BackingOff { delay, restarts });
        // A new version adopted meanwhile starts at once, with a fresh
        // restart budget.
        self.wait_down(tokio::time::sleep(delay), true).await
    }

    /// Waits for the gate to open (sent or dropped, either way the way is
    /// clear) while still obeying control messages, so a plugin stopped
    /// before its turn never starts. A new version adopted meanwhile starts
    /// when the gate opens.
    async fn wait_for_gate(&mut self, gate: oneshot::Receiver<()>) -> Next {
        let gate = async {
            let _ = gate.await;
        };
        self.wait_down(gate, false).await
    }

    /// Waits, with no process, for `until`, and then starts one, while
    /// obeying control messages: a stop or restart ends the wait, and a
    /// swap is adopted for the next start, which with `start_adopted` is at
    /// once.
    async fn wait_down(&mut self, until: impl Future<Output = ()>, start_adopted: bool) -> Next {
        tokio::pin!(until);
        loop {
            tokio::select! {
                () = &mut until => return Next::Start,
                control = self.control.recv() => match control {
                    Some(Control::Wake) => {}
                    Some(Control::Versions { done }) => {
                        let _ = done.send(self.versions());
                    }
                    Some(Control::Swap { request, done }) => {
                        let adopted = self.adopt_while_down(request, done, false).await;
                        if adopted && start_adopted {
                            self.backoff.reset();
                            return Next::Start;
                        }
                    }
                    Some(Control::Stop { done }) => {
                        let _ = done.send(());
                        return self.stay_down(PluginState::Stopped).await;
                    }
                    Some(Control::Restart { done }) => return self.restart_requested(done),
                    None => return Next::Exit,
                },
            }
        }
    }

    /// Waits, with no process, for a call (or a start request) to need one.
    async fn stay_idle(&mut self) -> Next {
        self.publish(PluginState::Idle, None);
        self.emit(EventKind::Idle);
        tracing::info!("plugin idle: no process until a call arrives");
        loop {
            match self.control.recv().await {
                Some(Control::Wake) => {
                    tracing::info!("a call is waiting; starting the idle plugin");
                    return Next::Start;
                }
                Some(Control::Versions { done }) => {
                    let _ = done.send(self.versions());
                }
                // The next call starts the new version.
                Some(Control::Swap { request, done }) => {
                    self.adopt_while_down(request, done, true).await;
                    self.publish(PluginState::Idle, None);
                }
                Some(Control::Restart { done }) => return self.restart_requested(done),
                Some(Control::Stop { done }) => {
                    let _ = done.send(());
                    return self.stay_down(PluginState::Stopped).await;
                }
                None => return Next::Exit,
            }
        }
    }

    /// Forgets past failures and acknowledges a restart request. `Starting`
    /// is published before the acknowledgement, so a caller that waited for
    /// the restart never sees the old failed state afterwards.
    fn restart_requested(&mut self, done: oneshot::Sender<()>) -> Next {
        self.backoff.reset();
        self.publish(PluginState::Starting, None);
        let _ = done.send(());
        Next::Start
    }

    /// Waits, with no process, for a restart request or the end.
    async fn stay_down(&mut self, state: PluginState) -> Next {
        match &state {
            PluginState::Failed { reason } => self.emit(EventKind::Failed {
                reason: reason.clone(),
            }),
            _ => self.emit(EventKind::Stopped { exit: None }),
        }
        self.publish(state, None);
        loop {
            match self.control.recv().await {
                Some(Control::Stop { done }) => {
                    let _ = done.send(());
                }
                // A stopped or failed plugin is not woken by calls; they
                // fail fast instead.
                Some(Control::Wake) => {}
                Some(Control::Versions { done }) => {
                    let _ = done.send(self.versions());
                }
                // A reload or rollback of a plugin that is down starts the
                // version it names: that is what the operator asked for.
                Some(Control::Swap { request, done }) => {
                    if self.adopt_while_down(request, done, false).await {
                        self.backoff.reset();
                        self.publish(PluginState::Starting, None);
                        return Next::Start;
                    }
                }
                Some(Control::Restart { done }) => return self.restart_requested(done),
                None => return Next::Exit,
            }
        }
    }
}

/// Spawns a process of `spec` and completes the handshake, registering the
/// process tree in `reaches` for as long as it may hold processes.
async fn launch(
    spec: Arc<PluginSpec>,
    reaches: Reaches,
    emitter: Emitter,
    generation: u64,
) -> Result<Running, (Option<u32>, Crash)> {
    let spawned = spawn_plugin(&spec).await.map_err(|err| {
        let crash = Crash {
            cause: err.to_string(),
            exit: None,
            stderr_tail: Vec::new(),
        };
        (None, crash)
    })?;
    let pid = spawned.pid;
    reaches.add(Reach {
        group: pid as i32,
        cgroup: spawned.cgroup.clone(),
    });
    if !spawned.sandbox_gaps.is_empty() && generation == 1 {
        let gaps = spawned.sandbox_gaps.join("; ");
        tracing::warn!(%gaps, "the kernel cannot enforce part of this plugin's sandbox");
    }
    tracing::info!(pid, generation, "plugin process started");
    emitter.emit(EventKind::Spawned { pid, generation });

    let handshake = tokio::time::timeout(
        spec.handshake_timeout,
        Connection::handshake(spawned.channel, spec.max_frame, spec.version.as_ref()),
    );
    let failure = match handshake.await {
        Ok(Ok(established)) => Ok(established),
        Ok(Err(failure)) => Err(failure.to_string()),
        Err(_) => Err(format!(
            "no handshake within {}",
            humantime::format_duration(spec.handshake_timeout)
        )),
    };
    let (connection, tasks) = match failure {
        Ok(established) => established,
        Err(cause) => {
            let crash =
                reap_failed_start(&reaches, pid, spawned.child, spawned.stderr_tail, cause).await;
            return Err((Some(pid), crash));
        }
    };

    Ok(Running {
        child: spawned.child,
        pid,
        connection,
        tasks,
        stderr_tail: spawned.stderr_tail,
        output: spawned.output,
        started_at: Instant::now(),
        sandbox_gaps: spawned.sandbox_gaps,
    })
}

async fn reap_failed_start(
    reaches: &Reaches,
    pid: u32,
    mut child: ChildProcess,
    tail: StderrTail,
    cause: String,
) -> Crash {
    let exit = match tokio::time::timeout(EXIT_AFTER_CLOSE, child.wait()).await {
        Ok(Ok(status)) => Some(ExitReason::from_status(status)),
        _ => kill_and_reap(reaches, pid, &mut child).await,
    };
    kill_leftovers(reaches, pid).await;
    Crash {
        cause,
        exit,
        stderr_tail: snapshot(&tail),
    }
}

/// The stages of a graceful stop: `Shutdown`, wait; SIGTERM to the group,
/// wait; SIGKILL. Returns the exit once reaped.
async fn stop_process(
    reaches: &Reaches,
    running: &mut Running,
    patience: Duration,
) -> Option<ExitReason> {
    running.connection.send(HostMessage::Shutdown);
    let mut exit = match tokio::time::timeout(patience, running.child.wait()).await {
        Ok(Ok(status)) => Some(ExitReason::from_status(status)),
        _ => None,
    };
    if exit.is_none() {
        tracing::info!(
            pid = running.pid,
            "plugin ignored shutdown; sending SIGTERM"
        );
        let _ = killpg(Pid::from_raw(running.pid as i32), Signal::SIGTERM);
        exit = match tokio::time::timeout(patience, running.child.wait()).await {
            Ok(Ok(status)) => Some(ExitReason::from_status(status)),
            _ => None,
        };
    }
    if exit.is_none() {
        tracing::warn!(pid = running.pid, "plugin ignored SIGTERM; killing it");
        exit = kill_and_reap(reaches, running.pid, &mut running.child).await;
    }
    exit
}

/// The common end of every process: leftovers killed, output drained,
/// waiting calls failed with the full story.
async fn finish(
    reaches: &Reaches,
    running: Running,
    cause: String,
    exit: Option<ExitReason>,
) -> (Crash, Duration) {
    kill_leftovers(reaches, running.pid).await;
    let drained = async {
        for output in running.output {
            let _ = output.await;
        }
    };
    let _ = tokio::time::timeout(OUTPUT_DRAIN, drained).await;
    running.tasks.abort();

    let crash = Crash {
        cause,
        exit,
        stderr_tail: snapshot(&running.stderr_tail),
    };
    running.connection.close(&crash);
    (crash, running.started_at.elapsed())
}

async fn kill_and_reap(
    reaches: &Reaches,
    pid: u32,
    child: &mut ChildProcess,
) -> Option<ExitReason> {
    reaches.kill(pid);
    let _ = child.start_kill();
    child.wait().await.ok().map(ExitReason::from_status)
}

/// Kills whatever is left of the process tree of the process `pid` leads
/// (grandchildren in its process group or its cgroup), waits for the cgroup
/// to empty, and removes it.
async fn kill_leftovers(reaches: &Reaches, pid: u32) {
    let Some(reach) = reaches.take(pid) else {
        return;
    };
    reach.kill();
    if let Some(cgroup) = &reach.cgroup {
        let emptied = async {
            while !cgroup.is_empty() {
                tokio::time::sleep(CGROUP_POLL).await;
                cgroup.kill();
            }
        };
        if tokio::time::timeout(CGROUP_EMPTY_WAIT, emptied)
            .await
            .is_err()
        {
            tracing::warn!("processes remain in the plugin's cgroup after SIGKILL");
        }
        cgroup.remove();
    }
    sandbox::guardian::untrack(reach.group);
}

/// Why a process that exited by itself went away: usually just that, but
/// when its last act was to break the protocol (a truncated or malformed
/// frame), the reader's account is the more useful one.
async fn exit_cause(closed: &mut oneshot::Receiver<String>) -> String {
    match tokio::time::timeout(EXIT_AFTER_CLOSE, closed).await {
        Ok(Ok(cause)) if cause != CONNECTION_CLOSED => cause,
        _ => PROCESS_EXITED.to_owned(),
    }
}

/// What is needed to kill a plugin's whole process tree.
struct Reach {
    /// The process group the plugin leads.
    group: i32,
    /// Its cgroups, which also hold descendants that left the group.
    cgroup: Option<Arc<PluginCgroup>>,
}

impl Reach {
    fn kill(&self) {
        // ESRCH, the usual answer, means the group is already empty.
        let _ = killpg(Pid::from_raw(self.group), Signal::SIGKILL);
        if let Some(cgroup) = &self.cgroup {
            cgroup.kill();
        }
    }
}

/// The process trees a plugin's task has alive: one, or two during a swap.
/// Shared with the handle, which kills them all when dropped.
#[derive(Clone, Default)]
struct Reaches(Arc<Mutex<Vec<Reach>>>);

impl Reaches {
    fn add(&self, reach: Reach) {
        lock(&self.0).push(reach);
    }

    /// Kills the tree of the process `pid` leads, if it is still known.
    fn kill(&self, pid: u32) {
        if let Some(reach) = lock(&self.0).iter().find(|r| r.group == pid as i32) {
            reach.kill();
        }
    }

    /// Forgets the tree of the process `pid` leads, handing it back.
    fn take(&self, pid: u32) -> Option<Reach> {
        let mut reaches = lock(&self.0);
        let index = reaches.iter().position(|r| r.group == pid as i32)?;
        Some(reaches.swap_remove(index))
    }

    /// The leaders of every tree known.
    fn leaders(&self) -> Vec<u32> {
        lock(&self.0).iter().map(|r| r.group as u32).collect()
    }

    fn kill_all(&self) {
        for reach in lock(&self.0).iter() {
            reach.kill();
        }
    }
}

/// Sends a plugin's events; cheap to clone into the futures of a swap.
#[derive(Clone)]
struct Emitter {
    plugin: String,
    events: broadcast::Sender<Event>,
}

impl Emitter {
    fn emit(&self, kind: EventKind) {
        // No receivers is normal: nobody has subscribed.
        let _ = self.events.send(Event {
            plugin: self.plugin.clone(),
            kind,
        });
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// Counting a plugin's calls, which also tells when it has gone idle.
mod idle {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::time::Duration;

    use tokio::time::Instant;

    /// Calls to one plugin: how many, how many failed, and whether any is
    /// in flight, which decides when an idle plugin is stopped.
    #[derive(Default)]
    pub(super) struct Activity {
        calls: AtomicU64,
        errors: AtomicU64,
        in_flight: AtomicUsize,
        /// When the latest call began or ended.
        last: Mutex<Option<Instant>>,
    }

    impl Activity {
        /// Records a call's start; the guard records its end.
        pub(super) fn begin(&self) -> Busy<'_> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            self.in_flight.fetch_add(1, Ordering::AcqRel);
            self.touch();
            Busy(self)
        }

        pub(super) fn failed(&self) {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }

        pub(super) fn calls(&self) -> u64 {
            self.calls.load(Ordering::Relaxed)
        }

        pub(super) fn errors(&self) -> u64 {
            self.errors.load(Ordering::Relaxed)
        }

        fn touch(&self) {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            *last = Some(Instant::now());
        }

        /// When to look again whether a process started at `started` has
        /// gone `timeout` without calls; `None` when it has.
        pub(super) fn busy_until(&self, timeout: Duration, started: Instant) -> Option<Instant> {
            let now = Instant::now();
            if self.in_flight.load(Ordering::Acquire) > 0 {
                return Some(now + timeout);
            }
            let last = *self.last.lock().unwrap_or_else(|p| p.into_inner());
            let quiet_since = last.map_or(started, |last| last.max(started));
            let idle_at = quiet_since + timeout;
            (idle_at > now).then_some(idle_at)
        }
    }

    /// A call in flight; dropping it ends the call's activity.
    pub(super) struct Busy<'a>(&'a Activity);

    impl Drop for Busy<'_> {
        fn drop(&mut self) {
            self.0.touch();
            self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

fn snapshot(tail: &StderrTail) -> Vec<String> {
    let tail = tail.lock().unwrap_or_else(|poison| poison.into_inner());
    tail.iter().cloned().collect()
}

/// The ping schedule of `spec`, the first ping one period from now.
fn health_checks(spec: &PluginSpec) -> Option<tokio::time::Interval> {
    spec.health_interval.map(|period| {
        let mut interval = tokio::time::interval_at(Instant::now() + period, period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval
    })
}

async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
