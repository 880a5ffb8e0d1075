//! The daemon: `aurora run` as a long-lived service that sysadmins operate
//! from the shell.
//!
//! A daemon's life:
//!
//! 1. [`load`] reads the config (`document.rs`, `settings.rs`), finds the
//!    manifests under the plugins directory (`discovery.rs`) and resolves
//!    the whole set (`resolve.rs`). Any problem stops here, before anything
//!    starts.
//! 2. [`run`] binds the control socket (`control.rs`), adds every plugin to
//!    a [`Supervisor`] at once, each held back until what it requires has
//!    settled, so independent plugins start concurrently and dependents
//!    start after their requirements. Lazy plugins wait for a call.
//! 3. Once the eager plugins are up it tells systemd `READY=1`
//!    (`notify.rs`), then serves control requests, applies SIGHUP reloads,
//!    feeds the watchdog and keeps the `STATUS=` line current.
//! 4. SIGTERM, SIGINT or `aurora shutdown` stop the plugins in reverse
//!    dependency order, dependents first.
//!
//! The main loop owns the plan (what runs, and why); reloads and shutdowns
//! go through it so they never overlap. Control requests that only read or
//! touch one plugin (status, call, start, stop, logs) are served by the
//! connection's own task.

pub mod client;
mod control;
pub mod discovery;
pub mod document;
pub mod logs;
pub mod notify;
pub mod resolve;
pub mod settings;
mod stats;
pub mod watcher;

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use aurora_protocol::PROTOCOL_VERSION;
use aurora_protocol::control::{ControlError, ControlErrorKind, ReloadSummary};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{DEFAULT_CONFIG, executable_dir};
use crate::event::EventKind;
use crate::plugin::PluginState;
use crate::spec::PluginSpec;
use crate::store::VersionStore;
use crate::supervisor::Supervisor;
use document::{PluginDefinition, Problem};
use logs::LogStore;
use notify::Notifier;
use resolve::Plan;
use settings::{ConfigSource, DaemonSettings};
use stats::ProcessStats;

/// The variable through which a plugin learns its state directory.
pub const STATE_DIR_ENV: &str = "AURORA_STATE_DIR";

/// Everything one reading of the config and manifests yields.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub settings: DaemonSettings,
    /// Every plugin, resolved and in start order.
    pub plan: Plan,
    /// The config file, or `(embedded default)`.
    pub source: String,
    /// The manifests found.
    pub manifests: Vec<PathBuf>,
}

/// The protocol version plugins' `protocol` ranges are checked against.
pub fn protocol_version() -> semver::Version {
    semver::Version::new(
        u64::from(PROTOCOL_VERSION.major),
        u64::from(PROTOCOL_VERSION.minor),
        0,
    )
}

/// Reads the config at `config` (the embedded default when `None`), the
/// manifests under its plugins directory, and resolves them.
///
/// # Errors
///
/// Every problem in the config, the manifests and the set as a whole.
pub fn load(config: Option<&Path>) -> Result<Loaded, Vec<Problem>> {
    let (text, source, base, origin) = match config {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|err| {
                vec![Problem::in_file(
                    path.display().to_string(),
                    format!("cannot read config: {err}"),
                )]
            })?;
            let base = path.parent().map(Path::to_owned).unwrap_or_default();
            (
                text,
                path.display().to_string(),
                base,
                ConfigSource::File(path),
            )
        }
        None => (
            DEFAULT_CONFIG.to_owned(),
            "(embedded default)".to_owned(),
            executable_dir(),
            ConfigSource::Embedded,
        ),
    };

    // Keep going after a broken config, so one run of `aurora check` shows
    // the manifests' problems too.
    let mut problems = Vec::new();
    let document = document::parse(&text, &source, &base).unwrap_or_else(|found| {
        problems.extend(found);
        document::Document::default()
    });
    let settings = match document.daemon.clone().resolve(origin) {
        Ok(settings) => Some(settings),
        Err(found) => {
            problems.extend(found);
            None
        }
    };
    let settings = match settings {
        Some(settings) => settings,
        None => settings::DaemonSection::default()
            .resolve(origin)
            .map_err(|mut more| {
                problems.append(&mut more);
                problems.clone()
            })?,
    };

    let builtin = PluginSpec::new("(defaults)", "(defaults)");
    let template = document.template.as_ref().unwrap_or(&builtin);
    let discovered = discovery::discover(
        &settings.plugins_dir,
        settings.plugins_dir_required,
        template,
    );
    problems.extend(discovered.problems);

    let mut definitions = document.plugins;
    definitions.extend(discovered.plugins);
    match resolve::resolve(definitions, &protocol_version()) {
        Ok(plan) if problems.is_empty() => Ok(Loaded {
            settings,
            plan,
            source,
            manifests: discovered.manifests,
        }),
        Ok(_) => Err(problems),
        Err(found) => {
            problems.extend(found);
            Err(problems)
        }
    }
}

/// What [`run`] needs besides the loaded config.
pub struct DaemonOptions {
    /// The config file, re-read on reload; the embedded default when `None`.
    pub config: Option<PathBuf>,
    /// Replaces the configured control socket (the CLI's `--socket`).
    pub socket: Option<PathBuf>,
    pub notifier: Notifier,
    /// Filled by the log layer the caller installed.
    pub logs: LogStore,
}

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot prepare the directory {path}: {source}")]
    Directory {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another aurora daemon is already running on {socket}")]
    AlreadyRunning { socket: PathBuf },
    #[error("cannot listen on {socket}: {reason}")]
    Listen { socket: PathBuf, reason: String },
    #[error("cannot watch {signal}: {source}")]
    Signal {
        signal: &'static str,
        source: std::io::Error,
    },
}

/// What connection tasks ask of the main loop.
pub(crate) enum Command {
    Reload {
        plugin: Option<String>,
        reply: oneshot::Sender<Result<ReloadSummary, ControlError>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// What the main loop shares with connection tasks.
pub(crate) struct Shared {
    pub(crate) supervisor: Supervisor,
    pub(crate) plan: RwLock<Plan>,
    pub(crate) settings: DaemonSettings,
    pub(crate) logs: LogStore,
    pub(crate) stats: ProcessStats,
    pub(crate) started: Instant,
    /// The config file, or `(embedded default)`.
    pub(crate) source: String,
    pub(crate) commands: mpsc::Sender<Command>,
    /// Becomes true when the daemon begins to stop; ends log followers.
    pub(crate) stopping: watch::Receiver<bool>,
    /// Counts changes of the plan, so the file watcher knows when to look
    /// at other paths.
    pub(crate) plan_changes: watch::Sender<u64>,
}

impl Shared {
    pub(crate) fn plan(&self) -> Plan {
        self.plan.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Runs the daemon until SIGTERM, SIGINT or `aurora shutdown`.
///
/// # Errors
///
/// When the directories, the control socket or the signal handlers cannot
/// be set up; nothing has been started then.
pub async fn run(loaded: Loaded, options: DaemonOptions) -> Result<(), DaemonError> {
    use tokio::signal::unix::{SignalKind, signal};

    let Loaded {
        mut settings,
        plan,
        source,
        manifests,
    } = loaded;
    if let Some(socket) = options.socket {
        settings.socket = socket;
    }
    let notifier = options.notifier;
    let watch_signal = |kind: SignalKind, name: &'static str| {
        signal(kind).map_err(|source| DaemonError::Signal {
            signal: name,
            source,
        })
    };
    let mut terminate = watch_signal(SignalKind::terminate(), "SIGTERM")?;
    let mut interrupt = watch_signal(SignalKind::interrupt(), "SIGINT")?;
    let mut hangup = watch_signal(SignalKind::hangup(), "SIGHUP")?;

    control::prepare_runtime_dir(&settings)?;
    // Searchable but not listable by others: a plugin that runs as another
    // user must reach its stored binary under `.versions`, while each
    // plugin's own directory stays 0700.
    prepare_dir(&settings.state_dir, 0o711)?;
    allow_search(&settings.state_dir)?;
    let listener = control::bind(&settings)?;

    let (commands_tx, mut commands) = mpsc::channel(16);
    let (stopping_tx, stopping) = watch::channel(false);
    // Outside every plugin's own state directory: a plugin must not be able
    // to change the binaries it would be rolled back to. No plugin name
    // starts with a dot.
    let store = VersionStore::new(settings.state_dir.join(".versions"), settings.keep_versions);
    let shared = Arc::new(Shared {
        supervisor: Supervisor::with_version_store(store),
        plan: RwLock::new(plan.clone()),
        settings,
        logs: options.logs,
        stats: ProcessStats::new(),
        started: Instant::now(),
        source,
        commands: commands_tx,
        stopping,
        plan_changes: watch::channel(0).0,
    });
    let server = tokio::spawn(control::serve(listener, Arc::clone(&shared)));
    let watcher = shared
        .settings
        .watch
        .then(|| tokio::spawn(watcher::watch_plugins(Arc::clone(&shared))));
    let mut events = shared.supervisor.subscribe();

    tracing::info!(
        config = %shared.source,
        socket = %shared.settings.socket.display(),
        plugins = plan.plugins.len(),
        manifests = manifests.len(),
        "aurora daemon starting"
    );
    let count = plan.plugins.len();
    let plural = if count == 1 { "" } else { "s" };
    notifier.status(&format!("starting {count} plugin{plural}"));
    let batch = plan
        .plugins
        .iter()
        .cloned()
        .map(|p| (p, Launch::Add))
        .collect();
    let startup = launch(Arc::clone(&shared), batch);
    tokio::pin!(startup);
    let mut started = false;
    let mut watchdog = notifier.watchdog_interval().map(|period| {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        interval
    });

    let shutdown_reply = loop {
        tokio::select! {
            _ = &mut startup, if !started => {
                started = true;
                let summary = summary(&shared.supervisor);
                let statuses = shared.supervisor.statuses();
                let ready = statuses.iter().filter(|s| s.state == PluginState::Ready).count();
                let idle = statuses.iter().filter(|s| s.state == PluginState::Idle).count();
                tracing::info!(
                    ready,
                    idle,
                    total = statuses.len(),
                    "aurora is running; Ctrl-C stops it"
                );
                notifier.ready(&summary);
            }
            _ = terminate.recv() => {
                tracing::info!("SIGTERM received; stopping");
                break None;
            }
            _ = interrupt.recv() => {
                tracing::info!("SIGINT received; stopping");
                break None;
            }
            _ = hangup.recv() => {
                if !started {
                    tracing::warn!("SIGHUP ignored: the plugins are still starting");
                    continue;
                }
                tracing::info!("SIGHUP received; reloading the config");
                let reloading = reload(&shared, options.config.as_deref(), None, &notifier);
                let outcome = feeding_watchdog(reloading, &mut watchdog, &notifier).await;
                if let Err(err) = outcome {
                    tracing::error!(reason = %err.message, "reload refused; nothing changed");
                }
            }
            Some(command) = commands.recv() => match command {
                Command::Reload { plugin, reply } => {
                    let outcome = if started {
                        let reloading = reload(&shared, options.config.as_deref(), plugin, &notifier);
                        feeding_watchdog(reloading, &mut watchdog, &notifier).await
                    } else {
                        Err(ControlError {
                            kind: ControlErrorKind::Failed,
                            message: "the daemon is still starting its plugins; try again".into(),
                        })
                    };
                    let _ = reply.send(outcome);
                }
                Command::Shutdown { reply } => {
                    tracing::info!("shutdown requested over the control socket");
                    break Some(reply);
                }
            },
            _ = tick(&mut watchdog) => notifier.watchdog(),
            event = events.recv() => {
                let is_change = matches!(
                    event,
                    Ok(crate::event::Event {
                        kind: EventKind::Ready { .. }
                            | EventKind::Failed { .. }
                            | EventKind::Idle
                            | EventKind::Stopped { .. },
                        ..
                    })
                );
                if started && is_change {
                    notifier.status(&summary(&shared.supervisor));
                }
            }
        }
    };

    notifier.stopping();
    let _ = stopping_tx.send(true);
    stop_in_reverse_order(&shared, &shared.plan()).await;
    // Anything left, such as plugins removed by a reload still stopping.
    shared.supervisor.shutdown().await;
    tracing::info!("every plugin stopped");
    if let Some(reply) = shutdown_reply {
        let _ = reply.send(());
    }
    // Give connections a moment to deliver their last answers; the listener
    // removes the socket file when it is dropped with the server task.
    if let Some(watcher) = watcher {
        watcher.abort();
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    Ok(())
}

/// The `STATUS=` line: how many plugins are in each state.
fn summary(supervisor: &Supervisor) -> String {
    let statuses = supervisor.statuses();
    let mut counts: Vec<(&'static str, usize)> = Vec::new();
    for status in &statuses {
        let name = status.state.name();
        match counts.iter_mut().find(|(state, _)| *state == name) {
            Some((_, count)) => *count += 1,
            None => counts.push((name, 1)),
        }
    }
    counts.sort_by_key(|(state, _)| *state);
    let parts: Vec<String> = counts
        .iter()
        .map(|(state, count)| format!("{count} {state}"))
        .collect();
    let plural = if statuses.len() == 1 { "" } else { "s" };
    if parts.is_empty() {
        "0 plugins".to_owned()
    } else {
        format!("{} plugin{plural}: {}", statuses.len(), parts.join(", "))
    }
}

/// How a plugin of a batch is put in place.
enum Launch {
    /// New: added, held back until what it requires has settled.
    Add,
    /// Changed: the old process stopped, the new definition started.
    Replace,
    /// Unchanged but reloaded by name: restarted.
    Restart,
}

/// One unit of work in dependency order.
struct Step {
    name: String,
    /// Names whose step must finish first (those outside the batch are
    /// ignored: they are already in place).
    after: Vec<String>,
    work: Pin<Box<dyn Future<Output = ()> + Send>>,
}

/// Runs every step once the steps it comes after have finished; steps that
/// wait on nothing run concurrently.
async fn in_order(steps: Vec<Step>) {
    let mut finished: HashMap<String, watch::Receiver<bool>> = HashMap::new();
    let mut senders = Vec::with_capacity(steps.len());
    for step in &steps {
        let (done, receiver) = watch::channel(false);
        finished.insert(step.name.clone(), receiver);
        senders.push(done);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (step, done) in steps.into_iter().zip(senders) {
        let waits: Vec<_> = step
            .after
            .iter()
            .filter_map(|name| finished.get(name).cloned())
            .collect();
        tasks.spawn(async move {
            for mut wait in waits {
                // An error means that step's task died: go on regardless.
                let _ = wait.wait_for(|done| *done).await;
            }
            step.work.await;
            let _ = done.send(true);
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Puts a batch of plugins in place in dependency order. New plugins are
/// added at once, so calls to them wait rather than fail while their
/// requirements start. Returns the plugins whose new version was refused,
/// with the reason; their old version keeps serving.
async fn launch(
    shared: Arc<Shared>,
    batch: Vec<(PluginDefinition, Launch)>,
) -> Vec<(String, String)> {
    let refused = Arc::new(Mutex::new(Vec::new()));
    let mut steps = Vec::with_capacity(batch.len());
    for (definition, how) in batch {
        let name = definition.spec.name.clone();
        let after = definition.requires.iter().map(|r| r.name.clone()).collect();
        let manifest = definition.origin.line.is_none();
        let mut spec = with_state_dir(&shared.settings, definition.spec);
        if manifest {
            spec.manifest = Some(PathBuf::from(&definition.origin.file));
        }
        let task_refused = Arc::clone(&refused);
        let lazy = spec.lazy;
        let patience = settle_patience(&spec);
        let task_shared = Arc::clone(&shared);
        let task_name = name.clone();
        let work: Pin<Box<dyn Future<Output = ()> + Send>> = match how {
            Launch::Add => {
                let (open, gate) = oneshot::channel();
                if let Err(err) = shared.supervisor.add_gated(spec, gate) {
                    tracing::error!(%err, "bug: a resolved plugin name is already taken");
                    continue;
                }
                Box::pin(async move {
                    let _ = open.send(());
                    if !lazy {
                        settle(&task_shared.supervisor, &task_name, patience).await;
                    }
                })
            }
            // Both swap safely: the new version starts beside the old one,
            // which serves until the new one is ready and then drains.
            Launch::Replace | Launch::Restart => Box::pin(async move {
                match task_shared.supervisor.reload(&task_name, spec).await {
                    Ok(_) if !lazy => settle(&task_shared.supervisor, &task_name, patience).await,
                    Ok(_) => {}
                    Err(err) => {
                        tracing::error!(plugin = %task_name, %err, "reload failed");
                        let reason = match err {
                            crate::SupervisorError::ReloadFailed { reason, .. } => reason,
                            other => other.to_string(),
                        };
                        lock(&task_refused).push((task_name, reason));
                    }
                }
            }),
        };
        steps.push(Step { name, after, work });
    }
    in_order(steps).await;
    std::mem::take(&mut *lock(&refused))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// How long a dependent waits for a plugin to become ready before starting
/// anyway: long enough for a handshake and a few quick restarts.
fn settle_patience(spec: &PluginSpec) -> Duration {
    spec.handshake_timeout * 2
}

/// Waits for plugin `name` to be ready, failed or stopped, and logs a
/// plugin that is not ready. Dependents start regardless: a requirement
/// orders starts, it does not chain failures.
async fn settle(supervisor: &Supervisor, name: &str, patience: Duration) {
    if let Err(err) = supervisor.wait_ready(name, patience).await {
        tracing::warn!(plugin = name, %err, "plugin not ready; starting what requires it anyway");
    }
}

/// Gives the plugin a directory of its own under the state directory, in
/// `AURORA_STATE_DIR`, and lets its sandbox write there. A directory that
/// cannot be made is logged and left out.
fn with_state_dir(settings: &DaemonSettings, mut spec: PluginSpec) -> PluginSpec {
    let dir = settings.state_dir.join(&spec.name);
    match prepare_dir(&dir, 0o700) {
        Ok(()) => {
            // FIXME: a plugin that runs as another user (`permissions.user`)
            // cannot write a directory owned by the daemon's user; the
            // directory should be handed to that user.
            spec.env
                .insert(STATE_DIR_ENV.to_owned(), dir.display().to_string());
            spec.permissions.write.push(dir);
        }
        Err(err) => tracing::warn!(plugin = %spec.name, %err, "no state directory for the plugin"),
    }
    spec
}

/// Creates `dir` (and its parents) if missing, with `mode` on the last one.
fn prepare_dir(dir: &Path, mode: u32) -> Result<(), DaemonError> {
    use std::os::unix::fs::DirBuilderExt;

    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(|source| DaemonError::Directory {
            path: dir.to_owned(),
            source,
        })
}

/// Adds the search bit for everyone to `dir`, which an older daemon may
/// have made owner-only.
fn allow_search(dir: &Path) -> Result<(), DaemonError> {
    use std::os::unix::fs::PermissionsExt;

    let directory_error = |source| DaemonError::Directory {
        path: dir.to_owned(),
        source,
    };
    let mode = std::fs::metadata(dir)
        .map_err(directory_error)?
        .permissions()
        .mode();
    if mode & 0o111 == 0o111 {
        return Ok(());
    }
    let searchable = std::fs::Permissions::from_mode((mode & 0o7777) | 0o111);
    std::fs::set_permissions(dir, searchable).map_err(directory_error)
}

/// Stops every plugin of `plan` that is running, each after the plugins
/// that require it.
async fn stop_in_reverse_order(shared: &Arc<Shared>, plan: &Plan) {
    let steps = plan
        .plugins
        .iter()
        .map(|definition| {
            let name = definition.spec.name.clone();
            let supervisor = shared.supervisor.clone();
            let task_name = name.clone();
            Step {
                after: plan.dependents_of(&name),
                name,
                work: Box::pin(async move {
                    let _ = supervisor.stop(&task_name).await;
                }),
            }
        })
        .collect();
    in_order(steps).await;
}

/// Stops and forgets the plugins named, dependents first.
async fn remove_in_reverse_order(shared: &Arc<Shared>, plan: &Plan, names: &[String]) {
    let steps = names
        .iter()
        .map(|name| {
            let supervisor = shared.supervisor.clone();
            let task_name = name.clone();
            Step {
                after: plan.dependents_of(name),
                name: name.clone(),
                work: Box::pin(async move {
                    let _ = supervisor.remove(&task_name).await;
                }),
            }
        })
        .collect();
    in_order(steps).await;
}

/// Whether two definitions run the same thing; where they are written does
/// not matter.
fn same_definition(a: &PluginDefinition, b: &PluginDefinition) -> bool {
    a.spec == b.spec && a.requires == b.requires && a.protocol == b.protocol
}

/// Re-reads the config and manifests and applies the difference, for every
/// plugin or only `only`. Nothing changes when the new config has problems.
async fn reload(
    shared: &Arc<Shared>,
    config: Option<&Path>,
    only: Option<String>,
    notifier: &Notifier,
) -> Result<ReloadSummary, ControlError> {
    notifier.reloading();
    let outcome = apply_reload(shared, config, only).await;
    let status = match &outcome {
        Ok(_) => summary(&shared.supervisor),
        Err(err) => format!(
            "{}; reload refused: {}",
            summary(&shared.supervisor),
            err.message.lines().next().unwrap_or_default()
        ),
    };
    notifier.ready(&status);
    outcome
}

async fn apply_reload(
    shared: &Arc<Shared>,
    config: Option<&Path>,
    only: Option<String>,
) -> Result<ReloadSummary, ControlError> {
    let loaded = load(config).map_err(|problems| {
        let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
        ControlError {
            kind: ControlErrorKind::InvalidConfig,
            message: format!(
                "the config has {} problem{}; nothing changed:\n{}",
                problems.len(),
                if problems.len() == 1 { "" } else { "s" },
                lines.join("\n")
            ),
        }
    })?;
    if loaded.settings.socket != shared.settings.socket
        || loaded.settings.runtime_dir != shared.settings.runtime_dir
        || loaded.settings.state_dir != shared.settings.state_dir
    {
        tracing::warn!("changes to the [daemon] directories and socket take effect on restart");
    }

    let old = shared.plan();
    let new = loaded.plan;
    let mut summary = ReloadSummary::default();
    let mut batch = Vec::new();
    let mut removed = Vec::new();
    let mut next_plan = old.clone();

    let in_scope = |name: &str| only.as_deref().is_none_or(|only| only == name);
    if let Some(name) = &only
        && old.get(name).is_none()
        && new.get(name).is_none()
    {
        return Err(ControlError {
            kind: ControlErrorKind::UnknownPlugin,
            message: format!("no plugin named {name:?}, before or after reading the config"),
        });
    }

    for definition in &old.plugins {
        let name = &definition.spec.name;
        if in_scope(name) && new.get(name).is_none() {
            removed.push(name.clone());
        }
    }
    for definition in &new.plugins {
        let name = &definition.spec.name;
        if !in_scope(name) {
            continue;
        }
        match old.get(name) {
            None => {
                summary.started.push(name.clone());
                batch.push((definition.clone(), Launch::Add));
            }
            Some(previous) if !same_definition(previous, definition) => {
                summary.replaced.push(name.clone());
                batch.push((definition.clone(), Launch::Replace));
            }
            Some(_) if only.is_some() => {
                summary.restarted.push(name.clone());
                batch.push((definition.clone(), Launch::Restart));
            }
            Some(_) => summary.unchanged.push(name.clone()),
        }
    }

    tracing::info!(
        started = ?summary.started,
        stopped = ?removed,
        replaced = ?summary.replaced,
        restarted = ?summary.restarted,
        "applying the reloaded config"
    );
    remove_in_reverse_order(shared, &old, &removed).await;
    let refused = launch(Arc::clone(shared), batch).await;

    // The plan is the new one for what was reloaded, the old one elsewhere
    // and for plugins whose new version was refused: they still run the old.
    match &only {
        None => next_plan = new,
        Some(name) => {
            next_plan.plugins.retain(|p| &p.spec.name != name);
            if let Some(definition) = new.get(name) {
                next_plan.plugins.push(definition.clone());
            }
        }
    }
    for (name, reason) in &refused {
        if let (Some(index), Some(previous)) = (
            next_plan.plugins.iter().position(|p| &p.spec.name == name),
            old.get(name),
        ) {
            next_plan.plugins[index] = previous.clone();
        }
        summary.replaced.retain(|n| n != name);
        summary.restarted.retain(|n| n != name);
        summary.failed.push(format!("{name}: {reason}"));
    }
    *shared.plan.write().unwrap_or_else(|p| p.into_inner()) = next_plan;
    shared.plan_changes.send_modify(|changes| *changes += 1);
    summary.stopped = removed;
    tracing::info!(unchanged = summary.unchanged.len(), "config reloaded");
    if let (Some(name), [(_, reason)]) = (&only, &refused[..]) {
        return Err(ControlError {
            kind: ControlErrorKind::Failed,
            message: format!(
                "the new version of {name} was refused, and the old one keeps serving: {reason}"
            ),
        });
    }
    Ok(summary)
}

/// Runs `work` while still feeding the watchdog, so that a long reload does
/// not look to systemd like a hung daemon.
async fn feeding_watchdog<T>(
    work: impl Future<Output = T>,
    watchdog: &mut Option<tokio::time::Interval>,
    notifier: &Notifier,
) -> T {
    tokio::pin!(work);
    loop {
        tokio::select! {
            output = &mut work => return output,
            _ = tick(watchdog) => notifier.watchdog(),
        }
    }
}

async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Whether a plugin state counts as running for `aurora start`.
pub(crate) fn is_running(state: &PluginState) -> bool {
    matches!(
        state,
        PluginState::Ready
            | PluginState::Starting
            | PluginState::BackingOff { .. }
            | PluginState::Stopping
    )
}
