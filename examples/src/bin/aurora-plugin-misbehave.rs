//! The misbehave plugin: every way a plugin can go wrong, on request.
//!
//! A supervisor is judged by what it does when a plugin fails it, so each
//! method here breaks one promise: never answering, ignoring cancellation,
//! flooding its output pipes, dying by exit code or by signal, panicking,
//! leaving a process behind, or writing bytes to the channel that are not a
//! valid frame. `ok` is the one well-behaved method; calling it first proves
//! the plugin started, so a later failure is the one a test asked for.
//!
//! The channel-corrupting methods write straight to [`CHANNEL_FD`], behind
//! the SDK's back. That works because the SDK keeps the socket at the number
//! the supervisor gave it (it only marks it close-on-exec) and because all of
//! the SDK runs on this one thread, so no SDK write is in progress while a
//! handler runs. The SDK's writer may still hold a frame it has only partly
//! sent if the socket was full; the tests that use these methods call them on
//! an otherwise idle plugin, where that does not happen.

use std::io::Write;
use std::os::fd::BorrowedFd;
use std::process::ExitCode;
use std::time::Duration;

use aurora_plugin_sdk::{Context, Error, Plugin};
use aurora_protocol::CHANNEL_FD;
use nix::errno::Errno;

/// How long the channel-corrupting methods wait after their damage: long
/// enough that the supervisor always acts on the bad bytes first.
const WAIT_AFTER_DAMAGE: Duration = Duration::from_secs(24 * 3600);

/// Padding that makes each `flood` line about a hundred bytes long.
const FLOOD_PADDING: &str = "................................................................";

/// How long a write to the channel waits before retrying when the
/// non-blocking socket is full.
const FULL_SOCKET_BACKOFF: Duration = Duration::from_millis(1);

fn main() -> ExitCode {
    Plugin::new("misbehave", env!("CARGO_PKG_VERSION"))
        .method(
            "ok",
            |_ctx: &Context, text: String| -> Result<String, Error> { Ok(text) },
        )
        .method("hang", |_ctx: &Context, (): ()| -> Result<(), Error> {
            hang()
        })
        .method_async("ignore_cancel", |_ctx: Context, millis: u64| async move {
            // Deliberately not `ctx.sleep`: this call runs to the end whatever
            // the supervisor says.
            tokio::time::sleep(Duration::from_millis(millis)).await;
            Ok::<u64, Error>(millis)
        })
        .method(
            "flood",
            |_ctx: &Context, lines: u64| -> Result<u64, Error> {
                flood(lines)?;
                Ok(lines)
            },
        )
        .method("exit", |_ctx: &Context, code: u8| -> Result<(), Error> {
            exit_with(code)
        })
        .method("abort", |_ctx: &Context, (): ()| -> Result<(), Error> {
            std::process::abort()
        })
        .method("panic", |_ctx: &Context, (): ()| -> Result<(), Error> {
            panic!("misbehave: panicking on request")
        })
        .method(
            "spawn_grandchild",
            |_ctx: &Context, (): ()| -> Result<u32, Error> { spawn_grandchild() },
        )
        .method_async("garbage", |ctx: Context, (): ()| async move {
            write_garbage_frame()?;
            wait_after_damage(&ctx).await
        })
        .method_async("huge_frame", |ctx: Context, (): ()| async move {
            write_huge_frame_header()?;
            wait_after_damage(&ctx).await
        })
        .method(
            "close_mid_frame",
            |_ctx: &Context, (): ()| -> Result<(), Error> { close_mid_frame() },
        )
        .run()
}

/// Blocks the plugin's only thread for good, so it answers neither this call,
/// nor any other, nor the supervisor's pings.
fn hang() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Writes `lines` lines of about a hundred bytes to stdout and as many to
/// stderr, alternating, so that both pipes fill if the supervisor drains only
/// one of them.
///
/// # Errors
///
/// When either stream cannot be written, for instance because its reader is
/// gone.
fn flood(lines: u64) -> Result<(), Error> {
    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr().lock();
    for line in 0..lines {
        writeln!(stdout, "misbehave: flood stdout {line:>10} {FLOOD_PADDING}")?;
        writeln!(stderr, "misbehave: flood stderr {line:>10} {FLOOD_PADDING}")?;
    }
    stdout.flush()?;
    Ok(())
}

/// Ends the process mid-call with `code`, after saying so on stderr.
fn exit_with(code: u8) -> ! {
    // The process is about to end, so a failed write has nowhere to be
    // reported; the exit code still tells the story.
    let _ = writeln!(std::io::stderr(), "misbehave: exiting with code {code}");
    std::process::exit(i32::from(code))
}

/// Starts `sleep 1000` and returns its pid without waiting for it, leaving a
/// process in the plugin's process group for the supervisor to clean up.
///
/// # Errors
///
/// When `sleep` cannot be started.
fn spawn_grandchild() -> Result<u32, Error> {
    let grandchild = std::process::Command::new("sleep").arg("1000").spawn()?;
    let pid = grandchild.id();
    // Dropping a `Child` neither kills nor waits for it, which is the point:
    // the grandchild outlives this call.
    drop(grandchild);
    Ok(pid)
}

/// Sends a frame whose length is honest but whose body decodes as no message.
///
/// # Errors
///
/// When the channel cannot be written.
fn write_garbage_frame() -> Result<(), Error> {
    let body = [0xff_u8; 8];
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    write_to_channel(&frame)
}

/// Sends a header declaring the largest length a header can hold, followed by
/// a few bytes of body that will never be completed.
///
/// # Errors
///
/// When the channel cannot be written.
fn write_huge_frame_header() -> Result<(), Error> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&u32::MAX.to_le_bytes());
    frame.extend_from_slice(&[0xab; 8]);
    write_to_channel(&frame)
}

/// Starts a 100-byte frame, sends 10 bytes of it, and exits with code 0, so
/// the supervisor meets end of file in the middle of a frame.
///
/// # Errors
///
/// When the channel cannot be written; on success the process has exited.
fn close_mid_frame() -> Result<(), Error> {
    let declared_len: u32 = 100;
    let mut partial_frame = Vec::new();
    partial_frame.extend_from_slice(&declared_len.to_le_bytes());
    partial_frame.extend_from_slice(&[0x00; 10]);
    write_to_channel(&partial_frame)?;
    std::process::exit(0)
}

/// Waits, cancellably, after corrupting the channel, so that what the
/// supervisor sees first is the bad bytes and not the plugin's exit.
///
/// # Errors
///
/// Always, eventually: the wait ends only when the call is cancelled or its
/// deadline passes, and then there is nothing to answer with.
async fn wait_after_damage(ctx: &Context) -> Result<(), Error> {
    match ctx.sleep(WAIT_AFTER_DAMAGE).await {
        Ok(()) => Err(Error::msg(
            "the supervisor never reacted to the corrupted channel",
        )),
        Err(cancelled) => Err(cancelled.into()),
    }
}

/// Writes all of `bytes` to the channel socket, bypassing the SDK.
///
/// # Errors
///
/// When the socket reports an error other than being momentarily full.
fn write_to_channel(bytes: &[u8]) -> Result<(), Error> {
    // SAFETY: the SDK owns the socket at CHANNEL_FD and keeps it open for as
    // long as it serves calls, which includes the whole of this handler; the
    // borrow ends before the handler returns.
    let channel = unsafe { BorrowedFd::borrow_raw(CHANNEL_FD) };
    let mut unwritten = bytes;
    while !unwritten.is_empty() {
        match nix::unistd::write(channel, unwritten) {
            Ok(written) => unwritten = &unwritten[written..],
            // The SDK made the socket non-blocking; a full buffer is waited out.
            Err(Errno::EAGAIN) => std::thread::sleep(FULL_SOCKET_BACKOFF),
            Err(Errno::EINTR) => {}
            Err(errno) => return Err(Error::msg(format!("cannot write to the channel: {errno}"))),
        }
    }
    Ok(())
}
