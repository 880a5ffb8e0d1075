//! Aurora's supervisor: run plugins as child processes and call them over a
//! socket, surviving whatever they do.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use aurora_supervisor::{PluginSpec, Supervisor};
//!
//! let supervisor = Supervisor::new();
//! supervisor.add(PluginSpec::new("echo", "/usr/lib/aurora/aurora-plugin-echo"))?;
//! let loud: String = supervisor.call("echo", "upper", "hello").await?;
//! assert_eq!(loud, "HELLO");
//! supervisor.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! Layout:
//! - [`Supervisor`] (`supervisor.rs`): the set of plugins and the public API;
//! - `plugin.rs`: one task per plugin, owning its process, with an explicit
//!   state machine, restarts and health checks;
//! - `connection.rs`: the handshake, the batched writer, the reader that
//!   routes replies, and the table of calls in flight;
//! - `spawn.rs`: process creation (socket, process group, death signal) and
//!   output capture;
//! - `sandbox/`: rlimits, credentials, Landlock and cgroups, prepared before
//!   the fork and applied in the child, plus the guardian that kills every
//!   plugin if the supervisor is killed outright;
//! - `plugin/swap.rs`: hot reload and rollback inside the plugin's task:
//!   a new generation beside the old, the switch, the drain, automatic
//!   rollback;
//! - `store.rs`: the version store, copies of every binary a plugin ran;
//! - `backoff.rs`: restart delays and the restart budget;
//! - [`config`]: the TOML config the `aurora` binary reads;
//! - [`daemon`]: `aurora run` as a service: discovery, dependencies, the
//!   control socket, systemd notification, per-plugin log rings.

mod backoff;
pub mod config;
mod connection;
pub mod daemon;
mod error;
mod event;
mod plugin;
mod sandbox;
mod spawn;
mod spec;
mod store;
mod supervisor;

pub use aurora_protocol::{Encoding, ErrorKind, Payload};
pub use error::{CallError, Crash, ExitReason, SupervisorError};
pub use event::{Event, EventKind};
pub use plugin::{PluginState, PluginStatus, Reloaded, VersionInfo};
pub use spec::{
    Enforcement, Limits, Permissions, PluginSpec, RestartMode, RestartPolicy, RollbackPolicy,
};
pub use store::{DEFAULT_KEEP, StoreError, StoredVersion, VersionStore};
pub use supervisor::Supervisor;
