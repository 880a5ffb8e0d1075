//! The echo plugin: small, predictable methods for exercising a supervisor.
//!
//! Every method here does almost no work, so a test or benchmark that calls it
//! measures the supervisor and the wire rather than the plugin. `sleep` gives
//! a call that lasts as long as the caller asks and stops early when it is
//! cancelled; `crash` gives a plugin that dies mid-call with a known exit code
//! and a known last line on stderr, for the supervisor's crash report.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use aurora_plugin_sdk::{Context, Error, Plugin};
use serde::Serialize;
use serde_bytes::ByteBuf;

/// The name this plugin announces in its handshake.
const PLUGIN_NAME: &str = "echo";

/// The exit code of the `crash` method, chosen to differ from the SDK's own
/// failure code (1) so a test can tell a requested crash from a broken start.
const CRASH_EXIT_CODE: i32 = 3;

/// What `stats` reports: enough for a caller to check it reached the process
/// it thinks it did.
#[derive(Debug, Serialize)]
struct Stats {
    /// The plugin's process id, to compare with the one the supervisor saw.
    pid: u32,
    /// The version announced in the handshake.
    version: String,
    /// The name announced in the handshake.
    name: String,
}

fn main() -> ExitCode {
    Plugin::new(PLUGIN_NAME, env!("CARGO_PKG_VERSION"))
        .method(
            "echo",
            |_ctx: &Context, text: String| -> Result<String, Error> { Ok(text) },
        )
        .method(
            "bytes",
            |_ctx: &Context, bytes: ByteBuf| -> Result<ByteBuf, Error> { Ok(bytes) },
        )
        .method(
            "upper",
            |_ctx: &Context, text: String| -> Result<String, Error> { Ok(text.to_uppercase()) },
        )
        .method(
            "reverse",
            |_ctx: &Context, text: String| -> Result<String, Error> {
                Ok(text.chars().rev().collect())
            },
        )
        .method_async("sleep", |ctx: Context, millis: u64| async move {
            ctx.sleep(Duration::from_millis(millis)).await?;
            Ok(millis)
        })
        .method("crash", |_ctx: &Context, (): ()| -> Result<(), Error> {
            crash()
        })
        .method("stats", |_ctx: &Context, (): ()| -> Result<Stats, Error> {
            Ok(Stats {
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                name: PLUGIN_NAME.to_owned(),
            })
        })
        .run()
}

/// Ends the process at once, as a crashing plugin would: no reply, no
/// shutdown handshake, only a last line on stderr for the supervisor to show.
fn crash() -> ! {
    // The process is about to end, so a failed write has nowhere to be
    // reported; the exit code still tells the story.
    let _ = writeln!(std::io::stderr(), "echo: crashing on request");
    std::process::exit(CRASH_EXIT_CODE)
}
