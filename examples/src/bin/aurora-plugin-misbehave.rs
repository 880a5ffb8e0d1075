//! The misbehave plugin: every way a plugin can go wrong, on request.
//!
//! A supervisor is judged by what it does when a plugin fails it, so each
//! method here breaks one promise: never answering, ignoring cancellation,
//! flooding its output pipes, dying by exit code or by signal, panicking,
//! leaving a process behind, or writing bytes to the channel that are not a
//! valid frame. `ok` is the one well-behaved method; calling it first proves
//! the plugin started, so a later failure is the one a test asked for.
//!
//! A second group of methods attacks the sandbox rather than the protocol:
//! `alloc_forever`, `burn_cpu` and `fork_bomb` run into the resource limits;
//! `read_file`, `write_file` and `connect` reach for what the plugin was not
//! granted and report the operating system's answer word for word; `escape`
//! leaves the plugin's process group and session; `ignore_sigterm` and
//! `stubborn` refuse to stop politely; `env` shows what survived the
//! scrubbing of the environment.
//!
//! The channel-corrupting methods write straight to [`CHANNEL_FD`], behind
//! the SDK's back. That works because the SDK keeps the socket at the number
//! the supervisor gave it (it only marks it close-on-exec) and because all of
//! the SDK runs on this one thread, so no SDK write is in progress while a
//! handler runs. The SDK's writer may still hold a frame it has only partly
//! sent if the socket was full; the tests that use these methods call them on
//! an otherwise idle plugin, where that does not happen.
//!
//! The methods that fork run their children on async-signal-safe calls
//! alone: the fork copies one thread of a process whose allocator and
//! runtime may hold locks, so a child that touched either could deadlock.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::process::ExitCode;
use std::time::Duration;

use aurora_plugin_sdk::{Context, Error, Plugin};
use aurora_protocol::CHANNEL_FD;
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::signal::{SigHandler, Signal};
use nix::sys::wait::waitpid;
use nix::unistd::Pid;

/// How long the channel-corrupting methods wait after their damage: long
/// enough that the supervisor always acts on the bad bytes first.
const WAIT_AFTER_DAMAGE: Duration = Duration::from_secs(24 * 3600);

/// Padding that makes each `flood` line about a hundred bytes long.
const FLOOD_PADDING: &str = "................................................................";

/// How long a write to the channel waits before retrying when the
/// non-blocking socket is full.
const FULL_SOCKET_BACKOFF: Duration = Duration::from_millis(1);

/// The size of each block `alloc_forever` takes and writes.
const ALLOC_CHUNK: usize = 16 << 20;

/// Where `alloc_forever` gives up when no limit stopped it: far above any
/// limit a test sets, far below what the machines running the tests hold,
/// so that a memory limit the sandbox failed to enforce fails a test rather
/// than exhausting the machine.
const ALLOC_CEILING: usize = 4 << 30;

/// What `write_file` writes.
const WRITTEN_TEXT: &[u8] = b"misbehave was here\n";

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
        .method(
            "alloc_forever",
            |_ctx: &Context, (): ()| -> Result<(), Error> { alloc_forever() },
        )
        .method("burn_cpu", |_ctx: &Context, (): ()| -> Result<(), Error> {
            burn_cpu()
        })
        .method(
            "fork_bomb",
            |_ctx: &Context, max: u32| -> Result<u32, Error> { Ok(fork_bomb(max)) },
        )
        .method(
            "read_file",
            |_ctx: &Context, path: String| -> Result<String, Error> { read_file(&path) },
        )
        .method(
            "write_file",
            |_ctx: &Context, path: String| -> Result<(), Error> { write_file(&path) },
        )
        .method(
            "connect",
            |_ctx: &Context, port: u16| -> Result<(), Error> { connect(port) },
        )
        .method("escape", |_ctx: &Context, (): ()| -> Result<u32, Error> {
            escape()
        })
        .method(
            "ignore_sigterm",
            |_ctx: &Context, (): ()| -> Result<(), Error> { ignore_sigterm() },
        )
        .method("stubborn", |_ctx: &Context, (): ()| -> Result<(), Error> {
            ignore_sigterm()?;
            hang()
        })
        .method(
            "env",
            |_ctx: &Context, (): ()| -> Result<Vec<(String, String)>, Error> { Ok(environment()) },
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

/// Allocates memory in blocks of [`ALLOC_CHUNK`], writing every byte so the
/// pages are really used, until the allocator fails. Rust then aborts the
/// process with "memory allocation of N bytes failed" on stderr.
///
/// # Errors
///
/// Only when [`ALLOC_CEILING`] is reached without a failure, which means no
/// memory limit is in force.
fn alloc_forever() -> Result<(), Error> {
    let mut held: Vec<Vec<u8>> = Vec::with_capacity(ALLOC_CEILING / ALLOC_CHUNK);
    while held.len() * ALLOC_CHUNK < ALLOC_CEILING {
        let mut chunk = Vec::with_capacity(ALLOC_CHUNK);
        chunk.resize(ALLOC_CHUNK, 0xa5_u8);
        held.push(std::hint::black_box(chunk));
    }
    Err(Error::msg(format!(
        "allocated {} MiB and no memory limit stopped it",
        ALLOC_CEILING >> 20
    )))
}

/// Spins on the plugin's only thread until something kills the process.
fn burn_cpu() -> ! {
    let mut spins: u64 = 0;
    loop {
        spins = std::hint::black_box(spins.wrapping_add(1));
    }
}

/// Forks up to `max` children that each wait forever, and returns how many
/// forks succeeded before the first one failed.
///
/// The children stay in the plugin's process group; reaping them is the
/// supervisor's job, as is stopping the forks early.
fn fork_bomb(max: u32) -> u32 {
    let mut forked = 0;
    while forked < max {
        // SAFETY: fork has no memory-safety preconditions of its own; what
        // matters is what the child does, and the child only ever calls
        // `wait_forever`, which is async-signal-safe.
        match unsafe { libc::fork() } {
            -1 => {
                let errno = Errno::last();
                // Stderr is the plugin's own; a failed write changes nothing.
                let _ = writeln!(
                    std::io::stderr(),
                    "misbehave: fork {} of {max} failed: {errno}",
                    forked + 1
                );
                break;
            }
            0 => wait_forever(),
            _ => forked += 1,
        }
    }
    forked
}

/// What a forked child does: nothing, until a signal kills it. Only pause(2)
/// is called, which is async-signal-safe.
fn wait_forever() -> ! {
    loop {
        // SAFETY: pause takes no arguments and touches no memory.
        unsafe {
            libc::pause();
        }
    }
}

/// Reads the file at `path` and returns its length in bytes, as text.
///
/// # Errors
///
/// When the file cannot be read; the message carries the operating system's
/// own words, such as "Permission denied".
fn read_file(path: &str) -> Result<String, Error> {
    let contents =
        std::fs::read(path).map_err(|err| Error::msg(format!("cannot read {path}: {err}")))?;
    Ok(contents.len().to_string())
}

/// Creates or truncates the file at `path` and writes a line to it.
///
/// # Errors
///
/// When the file cannot be written, with the operating system's own words.
fn write_file(path: &str) -> Result<(), Error> {
    std::fs::write(path, WRITTEN_TEXT)
        .map_err(|err| Error::msg(format!("cannot write {path}: {err}")))
}

/// Opens a TCP connection to `port` on the loopback address, then closes it.
///
/// # Errors
///
/// When the connection cannot be made, with the operating system's own words.
fn connect(port: u16) -> Result<(), Error> {
    let stream = std::net::TcpStream::connect(("127.0.0.1", port))
        .map_err(|err| Error::msg(format!("cannot connect to 127.0.0.1:{port}: {err}")))?;
    drop(stream);
    Ok(())
}

/// Leaves a process behind that has left the plugin's session and process
/// group and whose parent is gone, and returns its pid.
///
/// The classic double fork: a first child calls setsid(2), forks the
/// escapee and exits at once, so the escapee is reparented away from the
/// plugin. The escapee writes its pid to a pipe and waits forever; killing
/// the plugin's process group does not reach it.
///
/// # Errors
///
/// When the pipe or the first fork fails, or the escapee never reports its
/// pid (the second fork failed).
fn escape() -> Result<u32, Error> {
    let (pid_reader, pid_writer) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    let pid_writer_fd = pid_writer.as_raw_fd();

    // SAFETY: as in `fork_bomb`; the child runs `start_escapee`, which calls
    // only async-signal-safe functions.
    let first = unsafe { libc::fork() };
    if first == -1 {
        return Err(Error::msg(format!("cannot fork: {}", Errno::last())));
    }
    if first == 0 {
        start_escapee(pid_writer_fd);
    }

    // Only the escapee may hold the writing end, so that reading it ends in
    // end-of-file if the escapee never started.
    drop(pid_writer);
    let first_exit = waitpid(Pid::from_raw(first), None);
    let escapee = read_pid(pid_reader)
        .map_err(|err| Error::msg(format!("no escaped process ({first_exit:?}): {err}")))?;
    Ok(escapee)
}

/// The first child of [`escape`]: a new session, one more fork, and an exit
/// that leaves the escapee without its parent. Calls only setsid, fork,
/// getpid, write, close, pause and _exit, all async-signal-safe.
fn start_escapee(pid_writer: RawFd) -> ! {
    // SAFETY: each call below is async-signal-safe and takes plain integers
    // or a pointer to a live local array with its true length.
    unsafe {
        libc::setsid();
        match libc::fork() {
            -1 => libc::_exit(1),
            0 => {
                let pid = libc::getpid().to_le_bytes();
                libc::write(pid_writer, pid.as_ptr().cast(), pid.len());
                libc::close(pid_writer);
                wait_forever()
            }
            _ => libc::_exit(0),
        }
    }
}

/// Reads the pid the escapee wrote to its pipe.
///
/// # Errors
///
/// When the pipe ends before four bytes arrive.
fn read_pid(pid_reader: OwnedFd) -> std::io::Result<u32> {
    let mut bytes = [0_u8; 4];
    std::fs::File::from(pid_reader).read_exact(&mut bytes)?;
    Ok(u32::from_le_bytes(bytes))
}

/// Makes the process ignore SIGTERM, overriding the SDK's handler, so a
/// graceful stop must escalate to SIGKILL.
///
/// # Errors
///
/// When the disposition cannot be changed.
fn ignore_sigterm() -> Result<(), Error> {
    // SAFETY: SIG_IGN runs no code in signal context, so replacing the SDK's
    // handler with it cannot break any invariant of ours; the SDK simply
    // never hears of SIGTERM again.
    unsafe { nix::sys::signal::signal(Signal::SIGTERM, SigHandler::SigIgn) }?;
    Ok(())
}

/// Every variable in the plugin's environment, sorted by name; names and
/// values that are not UTF-8 are converted lossily.
fn environment() -> Vec<(String, String)> {
    let mut variables: Vec<(String, String)> = std::env::vars_os()
        .map(|(name, value)| {
            (
                name.to_string_lossy().into_owned(),
                value.to_string_lossy().into_owned(),
            )
        })
        .collect();
    variables.sort();
    variables
}
