//! The embeddable supervisor: a set of named plugins and the calls into them.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use aurora_protocol::{Encoding, Payload};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{broadcast, oneshot};
use tracing::Instrument;

use crate::error::{CallError, SupervisorError};
use crate::event::Event;
use crate::plugin::{Control, PluginHandle, PluginStatus, Reloaded, SwapRequest, VersionInfo};
use crate::spec::PluginSpec;
use crate::store::VersionStore;

/// How many events a slow subscriber may fall behind before it misses some.
const EVENT_BACKLOG: usize = 1024;

/// Runs plugins as supervised child processes and routes calls to them.
///
/// Cloning is cheap and every clone drives the same plugins. Prefer
/// [`Supervisor::shutdown`], which stops each plugin gracefully; when the last
/// clone is dropped without it, every plugin's process group is killed at
/// once (and the processes are reaped by the runtime).
///
/// Every method must be called from within a tokio runtime.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

struct Inner {
    plugins: RwLock<HashMap<String, Arc<PluginHandle>>>,
    events: broadcast::Sender<Event>,
    /// Where plugin binaries are kept for rollback; `None` runs them in
    /// place.
    store: Option<Arc<VersionStore>>,
}

impl Default for Supervisor {
    fn default() -> Supervisor {
        Supervisor::new()
    }
}

impl Supervisor {
    /// A supervisor that runs each plugin's binary where its spec says.
    pub fn new() -> Supervisor {
        Supervisor::with_store(None)
    }

    /// A supervisor that copies every plugin binary it runs into `store`
    /// and runs the copy, so that [`Supervisor::rollback`] can return to a
    /// version whose file has since been replaced or deleted.
    pub fn with_version_store(store: VersionStore) -> Supervisor {
        Supervisor::with_store(Some(Arc::new(store)))
    }

    fn with_store(store: Option<Arc<VersionStore>>) -> Supervisor {
        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        Supervisor {
            inner: Arc::new(Inner {
                plugins: RwLock::default(),
                events,
                store,
            }),
        }
    }

    /// Adds a plugin and starts it in the background. Calls made before it
    /// is ready wait for it, within their own deadline; use
    /// [`Supervisor::wait_ready`] to wait explicitly.
    ///
    /// # Errors
    ///
    /// [`SupervisorError::DuplicatePlugin`] when the name is taken.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn add(&self, spec: PluginSpec) -> Result<(), SupervisorError> {
        self.insert(spec, None)
    }

    /// As [`Supervisor::add`], but the plugin starts nothing until `gate`
    /// resolves (sent or dropped); calls made meanwhile wait for it, within
    /// their deadline. The daemon uses it to start a plugin only after the
    /// plugins it requires.
    ///
    /// # Errors
    ///
    /// [`SupervisorError::DuplicatePlugin`] when the name is taken.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub fn add_gated(
        &self,
        spec: PluginSpec,
        gate: oneshot::Receiver<()>,
    ) -> Result<(), SupervisorError> {
        self.insert(spec, Some(gate))
    }

    fn insert(
        &self,
        spec: PluginSpec,
        gate: Option<oneshot::Receiver<()>>,
    ) -> Result<(), SupervisorError> {
        let mut plugins = self
            .inner
            .plugins
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if plugins.contains_key(&spec.name) {
            return Err(SupervisorError::DuplicatePlugin { name: spec.name });
        }
        let name = spec.name.clone();
        let handle = self.start_handle(spec, gate);
        plugins.insert(name, Arc::new(handle));
        Ok(())
    }

    fn start_handle(&self, spec: PluginSpec, gate: Option<oneshot::Receiver<()>>) -> PluginHandle {
        let events = self.inner.events.clone();
        PluginHandle::start_after(spec, events, gate, self.inner.store.clone())
    }

    fn handle(&self, name: &str) -> Option<Arc<PluginHandle>> {
        let plugins = self.inner.plugins.read().unwrap_or_else(|p| p.into_inner());
        plugins.get(name).cloned()
    }

    fn require(&self, name: &str) -> Result<Arc<PluginHandle>, SupervisorError> {
        self.handle(name)
            .ok_or_else(|| SupervisorError::UnknownPlugin {
                name: name.to_owned(),
            })
    }

    /// Waits until plugin `name` is ready to take calls.
    ///
    /// # Errors
    ///
    /// [`SupervisorError::NotReady`] with the reason when it failed, was
    /// stopped, or was still starting after `timeout`.
    pub async fn wait_ready(&self, name: &str, timeout: Duration) -> Result<(), SupervisorError> {
        let handle = self.require(name)?;
        let deadline = tokio::time::Instant::now() + timeout;
        handle
            .settled(deadline)
            .await
            .map_err(|reason| SupervisorError::NotReady {
                name: name.to_owned(),
                reason,
            })
    }

    /// Calls `method` on `plugin` with a bincode-encoded request, within the
    /// plugin's default call timeout.
    ///
    /// # Errors
    ///
    /// Any [`CallError`]: the plugin or method is unknown, the call timed
    /// out, the plugin crashed during it or is failed, or the handler itself
    /// returned an error.
    pub async fn call<Req, Resp>(
        &self,
        plugin: &str,
        method: &str,
        request: &Req,
    ) -> Result<Resp, CallError>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        self.call_with_timeout(plugin, method, request, None).await
    }

    /// As [`Supervisor::call`], with a deadline of `timeout` from now instead
    /// of the plugin's default when given.
    ///
    /// # Errors
    ///
    /// As [`Supervisor::call`].
    pub async fn call_with_timeout<Req, Resp>(
        &self,
        plugin: &str,
        method: &str,
        request: &Req,
        timeout: Option<Duration>,
    ) -> Result<Resp, CallError>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        let payload = Payload::encode(Encoding::Bincode, request).map_err(|source| {
            CallError::EncodeRequest {
                plugin: plugin.to_owned(),
                method: method.to_owned(),
                source,
            }
        })?;
        let reply = self.call_raw(plugin, method, payload, timeout).await?;
        reply.decode().map_err(|source| CallError::DecodeReply {
            plugin: plugin.to_owned(),
            method: method.to_owned(),
            source,
        })
    }

    /// Calls `method` with an already encoded payload (JSON or bincode); the
    /// reply comes back in the same encoding.
    ///
    /// # Errors
    ///
    /// As [`Supervisor::call`], less the encoding errors.
    pub async fn call_raw(
        &self,
        plugin: &str,
        method: &str,
        payload: Payload,
        timeout: Option<Duration>,
    ) -> Result<Payload, CallError> {
        let Some(handle) = self.handle(plugin) else {
            return Err(CallError::UnknownPlugin {
                plugin: plugin.to_owned(),
            });
        };
        let span = tracing::debug_span!("call", plugin, method);
        handle.call(method, payload, timeout).instrument(span).await
    }

    /// Stops plugin `name` gracefully; it stays registered, and calls fail
    /// until it is restarted.
    ///
    /// # Errors
    ///
    /// [`SupervisorError::UnknownPlugin`].
    pub async fn stop(&self, name: &str) -> Result<(), SupervisorError> {
        let handle = self.require(name)?;
        handle.command(|done| Control::Stop { done }).await;
        Ok(())
    }

    /// Stops plugin `name` if it runs and starts it afresh, forgetting past
    /// failures; this is also how a failed or stopped plugin is started again.
    ///
    /// # Errors
    ///
    /// [`SupervisorError::UnknownPlugin`].
    pub async fn restart(&self, name: &str) -> Result<(), SupervisorError> {
        let handle = self.require(name)?;
        handle.command(|done| Control::Restart { done }).await;
        Ok(())
    }

    /// Replaces the running version of plugin `name` with `spec` without
    /// failing a call: a new process starts beside the old one, greets, and
    /// answers `spec.health_method` (when set); only then do new calls go
    /// to it, while the old process finishes the calls it had (within its
    /// `drain_timeout`) and is stopped. Passing the plugin's current spec
    /// (see [`Supervisor::spec`]) restarts it from the binary now at its
    /// path. Returns once the old process is gone.
    ///
    /// A plugin with no process takes the new spec at once: a failed or
    /// stopped one starts it (and this waits for that start), an idle one
    /// starts it at its next call. Swaps requested while one is under way
    /// run one after the other. After a swap, a new version that crashes
    /// `spec.rollback.crashes` times within `spec.rollback.window` is
    /// replaced by the previous one automatically.
    ///
    /// A new `max_concurrent_calls` takes effect with the calls that follow;
    /// a smaller limit is reached as calls in flight end.
    ///
    /// # Errors
    ///
    /// [`SupervisorError::UnknownPlugin`];
    /// [`SupervisorError::ReloadFailed`] when the new version cannot be
    /// stored, does not start, fails its handshake or health probe, or the
    /// plugin stopped meanwhile. The running version then keeps serving,
    /// and an [`EventKind::ReloadFailed`](crate::EventKind::ReloadFailed)
    /// says why.
    pub async fn reload(&self, name: &str, spec: PluginSpec) -> Result<Reloaded, SupervisorError> {
        self.swap(name, SwapRequest::Reload(Box::new(spec))).await
    }

    /// Goes back to an earlier version of plugin `name` through the same
    /// swap as [`Supervisor::reload`]: the version before the running one,
    /// or the one whose semver version or hash prefix is `to`.
    ///
    /// # Errors
    ///
    /// As [`Supervisor::reload`], and [`SupervisorError::ReloadFailed`]
    /// when no such version is known.
    pub async fn rollback(
        &self,
        name: &str,
        to: Option<&str>,
    ) -> Result<Reloaded, SupervisorError> {
        self.swap(name, SwapRequest::Rollback(to.map(str::to_owned)))
            .await
    }

    async fn swap(&self, name: &str, request: SwapRequest) -> Result<Reloaded, SupervisorError> {
        let handle = self.require(name)?;
        handle
            .swap(request)
            .await
            .map_err(|reason| SupervisorError::ReloadFailed {
                name: name.to_owned(),
                reason,
            })
    }

    /// The versions plugin `name` has run, the most recent first, the
    /// running one marked: from the version store when there is one, else
    /// those this supervisor remembers.
    ///
    /// # Errors
    ///
    /// [`SupervisorError::UnknownPlugin`].
    pub async fn versions(&self, name: &str) -> Result<Vec<VersionInfo>, SupervisorError> {
        let handle = self.require(name)?;
        Ok(handle.versions().await)
    }

    /// Puts `spec` in place of the plugin of the same name, through
    /// [`Supervisor::reload`], or adds it when there is none.
    ///
    /// # Errors
    ///
    /// As [`Supervisor::reload`]; the old version then keeps serving.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub async fn replace(&self, spec: PluginSpec) -> Result<Option<Reloaded>, SupervisorError> {
        let name = spec.name.clone();
        match self.insert(spec.clone(), None) {
            Ok(()) => Ok(None),
            Err(SupervisorError::DuplicatePlugin { .. }) => {
                self.reload(&name, spec).await.map(Some)
            }
            Err(other) => Err(other),
        }
    }

    /// Stops plugin `name` and forgets it.
    ///
    /// # Errors
    ///
    /// [`SupervisorError::UnknownPlugin`].
    pub async fn remove(&self, name: &str) -> Result<(), SupervisorError> {
        self.stop(name).await?;
        let mut plugins = self
            .inner
            .plugins
            .write()
            .unwrap_or_else(|p| p.into_inner());
        plugins.remove(name);
        Ok(())
    }

    /// A snapshot of plugin `name`.
    pub fn status(&self, name: &str) -> Option<PluginStatus> {
        self.handle(name).map(|handle| handle.snapshot())
    }

    /// Snapshots of every plugin, sorted by name.
    pub fn statuses(&self) -> Vec<PluginStatus> {
        let plugins = self.inner.plugins.read().unwrap_or_else(|p| p.into_inner());
        let mut statuses: Vec<_> = plugins.values().map(|h| h.snapshot()).collect();
        statuses.sort_by(|a, b| a.name.cmp(&b.name));
        statuses
    }

    /// The spec plugin `name` was added with.
    pub fn spec(&self, name: &str) -> Option<PluginSpec> {
        self.handle(name).map(|handle| (*handle.spec()).clone())
    }

    /// Lifecycle events from now on, for every plugin.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Stops every plugin gracefully, all at once, and waits until each
    /// process is reaped. The plugins stay registered, stopped.
    pub async fn shutdown(&self) {
        let handles: Vec<_> = {
            let plugins = self.inner.plugins.read().unwrap_or_else(|p| p.into_inner());
            plugins.values().cloned().collect()
        };
        let mut stopping = tokio::task::JoinSet::new();
        for handle in handles {
            stopping.spawn(async move { handle.command(|done| Control::Stop { done }).await });
        }
        while stopping.join_next().await.is_some() {}
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let plugins = self.plugins.get_mut().unwrap_or_else(|p| p.into_inner());
        for handle in plugins.values() {
            handle.kill_now();
        }
    }
}
