//! Write an Aurora plugin in a few lines.
//!
//! A plugin is a `main` that names itself, registers typed methods and calls
//! [`Plugin::run`]:
//!
//! ```no_run
//! use aurora_plugin_sdk::{Context, Error, Plugin};
//!
//! fn main() -> std::process::ExitCode {
//!     Plugin::new("greeter", env!("CARGO_PKG_VERSION"))
//!         .method("greet", |_ctx: &Context, name: String| -> Result<String, Error> {
//!             Ok(format!("hello, {name}"))
//!         })
//!         .method_async("wait", |ctx: Context, ms: u64| async move {
//!             ctx.sleep(std::time::Duration::from_millis(ms)).await?;
//!             Ok(ms)
//!         })
//!         .run()
//! }
//! ```
//!
//! The plugin talks to its supervisor over an inherited socket (file
//! descriptor [`aurora_protocol::CHANNEL_FD`]), never over stdout, so it may
//! print whatever it likes. Everything runs on one thread with a
//! current-thread tokio runtime: an idle plugin costs a few hundred KiB and
//! starts in about a millisecond. Synchronous handlers run inline on that
//! thread and so hold up other calls while they run; long work belongs in an
//! async handler or on a thread the handler starts itself.
//!
//! `tracing` events inside the plugin are forwarded to the supervisor as log
//! records, with their level, target and fields. The plugin exits cleanly on
//! the supervisor's `Shutdown`, when its socket closes, and on SIGTERM.

mod context;
mod forward;
mod plugin;
mod serve;

pub use context::{Cancelled, Context};
pub use plugin::{Error, Plugin};

pub use aurora_protocol::ErrorKind;
