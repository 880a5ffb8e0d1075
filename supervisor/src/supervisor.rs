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
use crate::plugin::{Control, PluginHandle, PluginStatus};
use crate::spec::PluginSpec;

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
}

impl Default for Supervisor {
    fn default() -> Supervisor {
        Supervisor::new()
    }
}

impl Supervisor {
    pub fn new() -> Supervisor {
        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        Supervisor {
            inner: Arc::new(Inner {
                plugins: RwLock::default(),
                events,
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
        let handle = PluginHandle::start_after(spec, self.inner.events.clone(), gate);
        plugins.insert(name, Arc::new(handle));
        Ok(())
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

    /// Puts `spec` in place of the plugin of the same name, or adds it. The
    /// old process is stopped gracefully first, so its calls in flight
    /// finish; calls made meanwhile go to the new definition and wait for its
    /// process, within their deadline. Returns once the old process is gone.
    ///
    /// FIXME: this is stop-then-start, not hot reload: the plugin serves
    /// nothing between the old process's exit and the new one's handshake,
    /// and a caller that took the old plugin just before the swap gets
    /// `PluginStopped`. Starting the new process first, draining the old one
    /// and rolling back on failure is a separate issue.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub async fn replace(&self, spec: PluginSpec) {
        let (open_gate, gate) = oneshot::channel();
        let name = spec.name.clone();
        let handle = PluginHandle::start_after(spec, self.inner.events.clone(), Some(gate));
        let old = {
            let mut plugins = self
                .inner
                .plugins
                .write()
                .unwrap_or_else(|p| p.into_inner());
            plugins.insert(name, Arc::new(handle))
        };
        if let Some(old) = old {
            old.command(|done| Control::Stop { done }).await;
        }
        let _ = open_gate.send(());
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
        self.handle(name).map(|handle| handle.spec().clone())
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
