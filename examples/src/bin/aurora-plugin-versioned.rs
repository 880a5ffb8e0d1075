//! The versioned plugin: one source, many builds, for exercising reloads
//! and rollbacks.
//!
//! A release pipeline often stamps a build after compiling it. This plugin
//! reads such a stamp from the end of its own executable: a last line of
//! the form
//!
//! ```text
//! aurora-build version=2.0.0 mode=crash-after:3
//! ```
//!
//! appended to the binary (ELF loaders ignore trailing bytes). Copying the
//! binary and appending a different stamp gives a different file, with a
//! different content hash, that reports a different version in its hello:
//! for the supervisor, a different build in every respect that matters.
//! Without a stamp it is version `CARGO_PKG_VERSION` and healthy.
//!
//! Modes, for broken releases:
//! - `healthy` (the default);
//! - `exit-at-start`: exits with code 1 before saying hello;
//! - `unhealthy`: serves, but its `health` method fails;
//! - `crash-after:N`: exits with code 3 on its N-th `version` call;
//! - `slow-start:MS`: waits MS milliseconds before saying hello.

use std::io::{Read, Seek, SeekFrom, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aurora_plugin_sdk::{Context, Error, Plugin};
use serde::Serialize;

/// Where a stamp starts.
const STAMP_PREFIX: &str = "aurora-build ";

/// How far from the end of the executable a stamp is looked for.
const STAMP_WINDOW: u64 = 256;

/// How the build behaves, from its stamp.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Healthy,
    ExitAtStart,
    Unhealthy,
    CrashAfter(u64),
    SlowStart(u64),
}

/// What `version` answers: which build, and which process, served the call.
#[derive(Serialize)]
struct Served {
    version: String,
    pid: u32,
}

fn main() -> ExitCode {
    let (version, mode) = read_stamp();
    if mode == Mode::ExitAtStart {
        let _ = writeln!(std::io::stderr(), "versioned: this build exits at start");
        return ExitCode::from(1);
    }
    if let Mode::SlowStart(millis) = mode {
        std::thread::sleep(Duration::from_millis(millis));
    }

    let served = AtomicU64::new(0);
    let reported = version.clone();
    Plugin::new("versioned", &version)
        .method(
            "version",
            move |_ctx: &Context, (): ()| -> Result<Served, Error> {
                let count = served.fetch_add(1, Ordering::Relaxed) + 1;
                if let Mode::CrashAfter(limit) = mode
                    && count >= limit
                {
                    let _ = writeln!(std::io::stderr(), "versioned: crashing after {count} calls");
                    std::process::exit(3);
                }
                Ok(Served {
                    version: reported.clone(),
                    pid: std::process::id(),
                })
            },
        )
        .method(
            "health",
            move |_ctx: &Context, (): ()| -> Result<(), Error> {
                match mode {
                    Mode::Unhealthy => Err(Error::msg("this build is unhealthy")),
                    _ => Ok(()),
                }
            },
        )
        .method_async("sleep", |ctx: Context, millis: u64| async move {
            ctx.sleep(Duration::from_millis(millis)).await?;
            Ok(millis)
        })
        .run()
}

/// The version and mode stamped on this executable, or the defaults.
fn read_stamp() -> (String, Mode) {
    let default = (env!("CARGO_PKG_VERSION").to_owned(), Mode::Healthy);
    let Some(tail) = executable_tail() else {
        return default;
    };
    let Some(line) = tail
        .lines()
        .rev()
        .find_map(|line| line.strip_prefix(STAMP_PREFIX))
    else {
        return default;
    };

    let (mut version, mut mode) = default;
    for field in line.split_whitespace() {
        match field.split_once('=') {
            Some(("version", value)) => value.clone_into(&mut version),
            Some(("mode", "exit-at-start")) => mode = Mode::ExitAtStart,
            Some(("mode", "unhealthy")) => mode = Mode::Unhealthy,
            Some(("mode", value)) => {
                let number = |prefix: &str| value.strip_prefix(prefix)?.parse().ok();
                if let Some(limit) = number("crash-after:") {
                    mode = Mode::CrashAfter(limit);
                } else if let Some(millis) = number("slow-start:") {
                    mode = Mode::SlowStart(millis);
                }
            }
            _ => {}
        }
    }
    (version, mode)
}

/// The last bytes of this executable, as text where they are text.
fn executable_tail() -> Option<String> {
    let mut file = std::fs::File::open("/proc/self/exe").ok()?;
    let length = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(length.saturating_sub(STAMP_WINDOW)))
        .ok()?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).ok()?;
    Some(String::from_utf8_lossy(&tail).into_owned())
}
