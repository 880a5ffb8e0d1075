//! Hot reload and rollback: replacing a plugin's running version without
//! failing a call, and going back when the new version is bad.
//!
//! A swap runs inside the plugin's task, beside the serving process:
//!
//! 1. The new version is prepared: on a reload its binary is admitted to
//!    the version store (hashed and copied); on a rollback an earlier
//!    version is looked up.
//! 2. A new generation is spawned from it and handshaken, and its health
//!    method, when the spec names one, must answer. Meanwhile the old
//!    generation serves every call. If any step fails, the new process is
//!    killed and reaped, a `ReloadFailed` event says why, and nothing else
//!    changes.
//! 3. The new connection is published: calls that look from now on get it.
//!    Only then does the old connection stop accepting calls; a caller that
//!    took the old connection just before is turned away by it and retries
//!    on the new one, so no call fails because of the swap.
//! 4. The old generation finishes the calls it accepted (within the old
//!    spec's `drain_timeout`), is stopped like any other (`Shutdown`,
//!    SIGTERM, SIGKILL) and reaped, and its process group and cgroup are
//!    cleaned up. The task watches it through its own future, not the serve
//!    loop, so its exit is never taken for a crash.
//!
//! Swaps requested while one is under way wait their turn. After a swap the
//! version swapped out is remembered: if the new one crashes
//! `rollback.crashes` times within `rollback.window`, the task goes back to
//! it by itself (`RolledBack { automatic: true }`).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aurora_protocol::Payload;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{
    Emitter, Next, PluginState, PluginTask, Reaches, Running, finish, kill_and_reap,
    kill_leftovers, launch, stop_process,
};
use crate::connection::Outcome;
use crate::error::{Crash, ExitReason};
use crate::event::EventKind;
use crate::spec::PluginSpec;
use crate::store::VersionStore;

/// How many earlier versions the task remembers in memory, with their full
/// specs, for rollbacks.
const REMEMBERED_VERSIONS: usize = 8;

/// What a successful reload or rollback did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// The process serving now; `None` when the plugin is idle and will
    /// start the new version at its next call.
    pub pid: Option<u32>,
    /// The version that process reported.
    pub version: Option<String>,
    /// The process that was replaced, now exited and reaped; `None` when
    /// none was running.
    pub replaced: Option<u32>,
    /// From the request until calls went to the new process.
    pub swap_time: Duration,
}

/// One version a plugin has run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    /// The semver version its processes reported; `None` if none ever said
    /// hello.
    pub version: Option<String>,
    /// The BLAKE3 hash of its binary, in hex, when there is a version store.
    pub hash: Option<String>,
    /// What runs: the stored copy, or the binary in place without a store.
    pub binary: PathBuf,
    /// Where the binary came from.
    pub source: PathBuf,
    /// Whether it is the version running now.
    pub active: bool,
    /// When it last became the running version, when known.
    pub activated: Option<SystemTime>,
}

/// What a swap should put in place.
#[derive(Debug, Clone)]
pub(crate) enum SwapRequest {
    /// Run this spec, reading its binary from disk again; the same spec as
    /// before picks up a new binary at the same path.
    Reload(Box<PluginSpec>),
    /// Run an earlier version: the one before the current, or the one whose
    /// version or hash prefix is given.
    Rollback(Option<String>),
}

/// Where the outcome of a swap goes.
pub(crate) type SwapReply = oneshot::Sender<Result<Reloaded, String>>;

/// One version of a plugin as its task knows it.
#[derive(Debug, Clone)]
pub(super) struct Build {
    /// The spec as its caller gave it.
    pub(super) given: Arc<PluginSpec>,
    /// The spec it runs with: the same, with the stored copy as its command
    /// when there is a version store.
    pub(super) run: Arc<PluginSpec>,
    pub(super) hash: Option<String>,
    /// What its processes reported, once one did.
    pub(super) version: Option<String>,
}

impl Build {
    /// A version run in place, not (yet) admitted to a store.
    pub(super) fn unadmitted(given: Arc<PluginSpec>) -> Build {
        Build {
            run: Arc::clone(&given),
            given,
            hash: None,
            version: None,
        }
    }

    fn same_as(&self, other: &Build) -> bool {
        self.hash == other.hash && self.given == other.given
    }

    /// Whether `wanted` names this version: its semver version exactly, or
    /// a prefix of its hash of at least four digits.
    fn is_named(&self, wanted: &str) -> bool {
        let by_hash = wanted.len() >= 4
            && self
                .hash
                .as_deref()
                .is_some_and(|hash| hash.starts_with(wanted));
        self.version.as_deref() == Some(wanted) || by_hash
    }

    fn label(&self) -> String {
        let version = self.version.as_deref().unwrap_or("unknown version");
        match &self.hash {
            Some(hash) => format!("{version} ({})", &hash[..12.min(hash.len())]),
            None => version.to_owned(),
        }
    }
}

/// After a swap: the version swapped out, and the new one's record so far.
pub(super) struct Probation {
    previous: Build,
    since: Instant,
    crashes: u32,
}

/// The work of starting a new generation: its version and its process,
/// ready and probed, or why not.
type Starting = Pin<Box<dyn Future<Output = Result<(Build, Running), String>> + Send>>;

/// A new generation being started beside the serving one.
pub(super) struct Swap {
    starting: Starting,
    reply: SwapReply,
    requested_at: Instant,
    is_rollback: bool,
}

/// A replaced generation finishing its calls and stopping.
pub(super) struct Retiring {
    work: Pin<Box<dyn Future<Output = ()> + Send>>,
    reply: SwapReply,
    report: Reloaded,
}

/// Resolves when the swap under way has a new generation ready (or has
/// failed); never, when there is none.
pub(super) async fn starting(swap: &mut Option<Swap>) -> Result<(Build, Running), String> {
    match swap {
        Some(swap) => swap.starting.as_mut().await,
        None => std::future::pending().await,
    }
}

/// Resolves when the replaced generation is gone; never, when there is none.
pub(super) async fn retired(retiring: &mut Option<Retiring>) {
    match retiring {
        Some(retiring) => retiring.work.as_mut().await,
        None => std::future::pending().await,
    }
}

impl PluginTask {
    /// Admits the first version to the store, so even the first process
    /// runs the stored copy. A binary that cannot be stored runs in place;
    /// its start will say what is wrong with it.
    pub(super) async fn admit_first(&mut self) {
        if self.store.is_none() {
            return;
        }
        match admit(self.store.clone(), Arc::clone(&self.build.given)).await {
            Ok(build) => self.adopt(build),
            Err(reason) => {
                tracing::warn!(%reason, "cannot store the plugin's binary; running it in place");
            }
        }
    }

    /// Makes `build` the current version, remembering the one it replaces.
    fn adopt(&mut self, build: Build) {
        let previous = std::mem::replace(&mut self.build, build);
        self.spec = Arc::clone(&self.build.run);
        self.remember(previous);
        let given = Arc::clone(&self.build.given);
        self.status.send_modify(|status| status.spec = given);
    }

    /// Keeps `build` among the earlier versions, unless it never ran or is
    /// the current one.
    fn remember(&mut self, build: Build) {
        if build.version.is_none() || build.same_as(&self.build) {
            return;
        }
        self.history.retain(|known| !known.same_as(&build));
        self.history.push(build);
        if self.history.len() > REMEMBERED_VERSIONS {
            self.history.remove(0);
        }
    }

    /// Records the version a process of the current build reported.
    pub(super) async fn activate(&mut self, version: &str) {
        self.build.version = Some(version.to_owned());
        let (Some(store), Some(hash)) = (self.store.clone(), self.build.hash.clone()) else {
            return;
        };
        let plugin = self.spec.name.clone();
        let version = version.to_owned();
        let recorded =
            tokio::task::spawn_blocking(move || store.activate(&plugin, &hash, &version)).await;
        if let Ok(Err(err)) = recorded {
            tracing::warn!(%err, "cannot record the running version in the store");
        }
    }

    /// Starts a swap now, or queues it behind the one under way.
    pub(super) fn request_swap(&mut self, request: SwapRequest, done: SwapReply) {
        if self.swap.is_some() || self.retiring.is_some() {
            self.queued.push_back((request, done));
            return;
        }
        self.begin_swap(request, done);
    }

    fn begin_swap(&mut self, request: SwapRequest, done: SwapReply) {
        let requested_at = Instant::now();
        let is_rollback = matches!(request, SwapRequest::Rollback(_));
        let source = match self.source_of(request) {
            Ok(source) => source,
            Err(reason) => {
                self.swap_refused(reason, done);
                return;
            }
        };
        tracing::info!(
            rollback = is_rollback,
            "starting a new generation beside the serving one"
        );

        let generation = self.next_generation();
        self.status.send_modify(|status| status.swaps += 1);
        let store = self.store.clone();
        let reaches = self.reaches.clone();
        let emitter = self.emitter.clone();
        let starting = Box::pin(async move {
            let build = match source {
                Source::Admit(given) => admit(store, given).await?,
                Source::Known(build) => build,
            };
            let spec = Arc::clone(&build.run);
            let mut running = launch(spec, reaches.clone(), emitter, generation)
                .await
                .map_err(|(_, crash)| format!("the new version did not start: {crash}"))?;
            if let Err(reason) = probe(&mut running, &build.run).await {
                let exit = kill_and_reap(&reaches, running.pid, &mut running.child).await;
                finish(&reaches, running, reason.clone(), exit).await;
                return Err(reason);
            }
            Ok((build, running))
        });
        self.swap = Some(Swap {
            starting,
            reply: done,
            requested_at,
            is_rollback,
        });
    }

    /// What a request asks to run.
    fn source_of(&self, request: SwapRequest) -> Result<Source, String> {
        match request {
            SwapRequest::Reload(spec) if spec.name != self.spec.name => Err(format!(
                "a reload of {:?} cannot run a spec named {:?}",
                self.spec.name, spec.name
            )),
            SwapRequest::Reload(spec) => Ok(Source::Admit(Arc::new(*spec))),
            SwapRequest::Rollback(to) => self.rollback_target(to.as_deref()).map(Source::Known),
        }
    }

    fn swap_refused(&mut self, reason: String, done: SwapReply) {
        tracing::warn!(%reason, "reload failed; the running version keeps serving");
        self.emit(EventKind::ReloadFailed {
            reason: reason.clone(),
        });
        let _ = done.send(Err(reason));
    }

    /// The new generation is ready, or failed: switch calls to it and
    /// retire the old one, or keep the old one. Returns whether `running`
    /// is now the new generation.
    pub(super) async fn swap_started(
        &mut self,
        started: Result<(Build, Running), String>,
        running: &mut Running,
    ) -> bool {
        let swap = self
            .swap
            .take()
            .expect("a swap resolved, so one was under way");
        let (build, new) = match started {
            Ok(started) => started,
            Err(reason) => {
                self.swap_refused(reason, swap.reply);
                self.next_queued();
                return false;
            }
        };

        let swap_time = swap.requested_at.elapsed();
        let old = std::mem::replace(running, new);
        let version = running.connection.hello().version.clone();
        let previous = self.build.clone();
        let drain_spec = Arc::clone(&self.spec);
        self.adopt(build);
        // New calls go to the new process from this publish on; only then
        // does the old connection turn latecomers away, to retry here.
        self.publish(PluginState::Ready, Some(running));
        old.connection.stop_accepting();
        tracing::info!(
            pid = running.pid,
            replaced = old.pid,
            %version,
            swap_ms = swap_time.as_secs_f64() * 1000.0,
            "new generation serving; the replaced one drains"
        );
        self.emit(EventKind::Reloaded {
            pid: running.pid,
            version: version.clone(),
            replaced: old.pid,
            swap_time,
        });
        self.activate(&version).await;
        if swap.is_rollback {
            let reason = "rollback requested".to_owned();
            tracing::warn!(from = %previous.label(), to = %self.build.label(), "rolled back");
            self.emit(EventKind::RolledBack {
                from: previous.version.clone(),
                to: Some(version.clone()),
                automatic: false,
                reason,
            });
            self.probation = None;
        } else if !previous.same_as(&self.build) && previous.version.is_some() {
            self.probation = Some(Probation {
                previous,
                since: Instant::now(),
                crashes: 0,
            });
        }

        let report = Reloaded {
            pid: Some(running.pid),
            version: Some(version),
            replaced: Some(old.pid),
            swap_time,
        };
        let work = retire(old, drain_spec, self.reaches.clone(), self.emitter.clone());
        self.retiring = Some(Retiring {
            work: Box::pin(work),
            reply: swap.reply,
            report,
        });
        true
    }

    /// The replaced generation is gone: the swap is complete.
    pub(super) fn retire_finished(&mut self) {
        let retiring = self
            .retiring
            .take()
            .expect("a retirement resolved, so one was under way");
        let _ = retiring.reply.send(Ok(retiring.report));
        self.next_queued();
    }

    fn next_queued(&mut self) {
        if let Some((request, done)) = self.queued.pop_front() {
            self.begin_swap(request, done);
        }
    }

    /// Ends every swap before the serving process `serving` goes away:
    /// a generation still starting is killed and reaped, a retiring one is
    /// waited for, and queued requests are refused.
    pub(super) async fn settle_swaps(&mut self, serving: u32, reason: &str) {
        if let Some(retiring) = self.retiring.take() {
            retiring.work.await;
            let _ = retiring.reply.send(Ok(retiring.report));
        }
        if let Some(swap) = self.swap.take() {
            // Dropping the future kills its child (the handle's drop); what is
            // left of its tree is still registered, and cleaned up here.
            drop(swap.starting);
            for leader in self.reaches.leaders() {
                if leader != serving {
                    kill_leftovers(&self.reaches, leader).await;
                }
            }
            let _ = swap
                .reply
                .send(Err(format!("{reason} before the reload finished")));
        }
        for (_, done) in self.queued.drain(..) {
            let _ = done.send(Err(format!("{reason} before the reload could start")));
        }
    }

    /// A swap requested while no process runs: make its version the one the
    /// next start runs. The answer comes now when `answer_now` (an idle
    /// plugin), else when that start succeeds or fails. Returns whether the
    /// version was adopted.
    pub(super) async fn adopt_while_down(
        &mut self,
        request: SwapRequest,
        done: SwapReply,
        answer_now: bool,
    ) -> bool {
        let requested_at = Instant::now();
        let build = match self.source_of(request) {
            Ok(Source::Admit(given)) => admit(self.store.clone(), given).await,
            Ok(Source::Known(build)) => Ok(build),
            Err(reason) => Err(reason),
        };
        let build = match build {
            Ok(build) => build,
            Err(reason) => {
                self.swap_refused(reason, done);
                return false;
            }
        };
        tracing::info!(version = %build.label(), "no process runs; the next start runs the new version");
        self.adopt(build);
        self.probation = None;
        if answer_now {
            let _ = done.send(Ok(Reloaded {
                pid: None,
                version: None,
                replaced: None,
                swap_time: requested_at.elapsed(),
            }));
        } else if let Some((earlier, _)) = self.start_reply.replace((done, requested_at)) {
            let _ = earlier.send(Err("superseded by a later reload".to_owned()));
        }
        true
    }

    /// The version a rollback goes to: the latest earlier one, or the one
    /// `wanted` names, from memory first, then from the store.
    fn rollback_target(&self, wanted: Option<&str>) -> Result<Build, String> {
        let remembered = self
            .history
            .iter()
            .rev()
            .filter(|build| !build.same_as(&self.build))
            .find(|build| wanted.is_none_or(|wanted| build.is_named(wanted)));
        if let Some(build) = remembered {
            return Ok(build.clone());
        }

        let stored = self.store.as_ref().and_then(|store| {
            store
                .list(&self.spec.name)
                .into_iter()
                .filter(|stored| Some(&stored.hash) != self.build.hash.as_ref())
                .map(|stored| {
                    // FIXME: a version known only from the store (from
                    // before a restart of the supervisor) runs with the
                    // current spec and its stored binary; its manifest text
                    // is kept but not parsed back into a spec.
                    let mut given = (*self.build.given).clone();
                    given.command = stored.source.clone();
                    let mut run = given.clone();
                    run.command = stored.binary.clone();
                    Build {
                        given: Arc::new(given),
                        run: Arc::new(run),
                        hash: Some(stored.hash),
                        version: stored.version,
                    }
                })
                .find(|build| wanted.is_none_or(|wanted| build.is_named(wanted)))
        });
        stored.ok_or_else(|| match wanted {
            Some(wanted) => format!(
                "no earlier version of {} is named {wanted:?}; `aurora versions {}` lists them",
                self.spec.name, self.spec.name
            ),
            None => format!("{} has no earlier version to roll back to", self.spec.name),
        })
    }

    /// Every version this plugin has run, the running one marked.
    pub(super) fn versions(&self) -> Vec<VersionInfo> {
        if let Some(store) = &self.store {
            let stored = store.list(&self.spec.name);
            if !stored.is_empty() {
                return stored
                    .into_iter()
                    .map(|stored| VersionInfo {
                        active: Some(&stored.hash) == self.build.hash.as_ref(),
                        version: stored.version,
                        hash: Some(stored.hash),
                        binary: stored.binary,
                        source: stored.source,
                        activated: Some(UNIX_EPOCH + Duration::from_millis(stored.active_unix_ms)),
                    })
                    .collect();
            }
        }
        std::iter::once(&self.build)
            .chain(self.history.iter().rev())
            .map(|build| VersionInfo {
                version: build.version.clone(),
                hash: build.hash.clone(),
                binary: build.run.command.clone(),
                source: build.given.command.clone(),
                active: std::ptr::eq(build, &self.build),
                activated: None,
            })
            .collect()
    }

    /// Counts a crash against a version on probation. Returns the version
    /// to go back to when this crash condemns the new one: it reached the
    /// policy's count, or `giving_up` (the restart policy would leave the
    /// plugin down).
    pub(super) fn condemned(&mut self, giving_up: bool) -> Option<Build> {
        let policy = &self.spec.rollback;
        let probation = self.probation.as_mut()?;
        if policy.crashes == 0 || probation.since.elapsed() > policy.window {
            self.probation = None;
            return None;
        }
        if !giving_up {
            probation.crashes += 1;
        }
        if giving_up || probation.crashes >= policy.crashes {
            return self.probation.take().map(|probation| probation.previous);
        }
        None
    }

    /// Goes back to `previous` after the current version crashed once too
    /// often, and starts it.
    pub(super) fn roll_back_automatically(&mut self, previous: Build, crash: &Crash) -> Next {
        let reason = format!(
            "version {} kept crashing within {} of taking over; last failure: {crash}",
            self.build.label(),
            humantime::format_duration(self.spec.rollback.window)
        );
        tracing::error!(
            from = %self.build.label(),
            to = %previous.label(),
            %reason,
            "rolling back to the previous version"
        );
        self.emit(EventKind::RolledBack {
            from: self.build.version.clone(),
            to: previous.version.clone(),
            automatic: true,
            reason,
        });
        self.adopt(previous);
        self.backoff.reset();
        Next::Start
    }
}

/// What a swap runs.
enum Source {
    /// A spec whose binary is still to be read (and stored).
    Admit(Arc<PluginSpec>),
    /// A version known already.
    Known(Build),
}

/// Hashes and stores the binary of `given`, when there is a store.
async fn admit(store: Option<Arc<VersionStore>>, given: Arc<PluginSpec>) -> Result<Build, String> {
    let Some(store) = store else {
        return Ok(Build::unadmitted(given));
    };
    let plugin = given.name.clone();
    let source = find_executable(&given.command);
    let manifest = given.manifest.clone();
    let stored =
        tokio::task::spawn_blocking(move || store.admit(&plugin, &source, manifest.as_deref()))
            .await
            .map_err(|_| "bug: storing the binary panicked".to_owned())?
            .map_err(|err| err.to_string())?;

    let mut run = (*given).clone();
    run.command = stored.binary;
    Ok(Build {
        given,
        run: Arc::new(run),
        hash: Some(stored.hash),
        version: None,
    })
}

/// A bare command name as the system would find it on `PATH`; anything
/// with a slash as it is.
pub(crate) fn find_executable(command: &Path) -> PathBuf {
    if command.components().count() > 1 {
        return command.to_owned();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(command))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| command.to_owned())
}

/// Calls the spec's health method, if it names one, on a new generation:
/// it must answer without error within `health_timeout`.
async fn probe(running: &mut Running, spec: &PluginSpec) -> Result<(), String> {
    let Some(method) = &spec.health_method else {
        return Ok(());
    };
    if !running.connection.serves(method) {
        return Err(format!(
            "the new version has no health method {method:?}; it serves: {}",
            running.connection.method_list()
        ));
    }
    let null = Payload::json(b"null".to_vec());
    let patience = spec.health_timeout;
    let Ok((_, outcome)) = running.connection.start_call(method, null, patience) else {
        return Err(format!("cannot send the health probe {method}"));
    };
    tokio::select! {
        answered = tokio::time::timeout(patience, outcome) => match answered {
            Ok(Ok(Outcome::Replied(Ok(_)))) => Ok(()),
            Ok(Ok(Outcome::Replied(Err(remote)))) => Err(format!(
                "the new version failed its health probe {method} ({}): {}",
                remote.kind, remote.message
            )),
            Ok(Ok(Outcome::Lost(crash))) => {
                Err(format!("the new version went away during its health probe: {crash}"))
            }
            Ok(Err(_)) => Err("the health probe's call was dropped".to_owned()),
            Err(_) => Err(format!(
                "the new version did not answer its health probe {method} within {}",
                humantime::format_duration(patience)
            )),
        },
        status = running.child.wait() => {
            let exit = status.ok().map(ExitReason::from_status);
            let exit = exit.map_or_else(|| "exited".to_owned(), |exit| exit.to_string());
            Err(format!("the new version {exit} during its health probe"))
        }
    }
}

/// Lets a replaced generation finish its calls, within `spec.drain_timeout`,
/// then stops it gracefully and reaps it. Calls still running when the
/// drain time is up fail with the reason.
async fn retire(mut old: Running, spec: Arc<PluginSpec>, reaches: Reaches, emitter: Emitter) {
    let pid = old.pid;
    let drain = spec.drain_timeout;
    let mut exit = None;
    let mut cause = format!(
        "replaced by a new version; the call was still running {} after the swap",
        humantime::format_duration(drain)
    );
    tokio::select! {
        () = old.connection.drained() => {}
        status = old.child.wait() => {
            exit = status.ok().map(ExitReason::from_status);
            cause = "the replaced process exited while finishing its calls".to_owned();
        }
        () = tokio::time::sleep(drain) => {
            tracing::warn!(
                pid,
                drain = %humantime::format_duration(drain),
                "calls still running on the replaced process after the drain timeout; stopping it"
            );
            // Failed now, with this reason, rather than with whatever the
            // process answers while it shuts down.
            old.connection.close(&Crash {
                cause: cause.clone(),
                exit: None,
                stderr_tail: Vec::new(),
            });
        }
    }
    if exit.is_none() {
        exit = stop_process(&reaches, &mut old, spec.stop_timeout).await;
    }
    finish(&reaches, old, cause, exit).await;
    tracing::info!(pid, exit = ?exit, "replaced process stopped");
    emitter.emit(EventKind::Retired { pid, exit });
}
