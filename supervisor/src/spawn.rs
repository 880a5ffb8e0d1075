//! Starting a plugin process: the socket it inherits, the process group it
//! leads, the death signal that ties it to the supervisor, and the capture of
//! its stdout and stderr.
//!
//! # Why spawner threads
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits,
//! not the process. Tokio's worker and blocking-pool threads come and go, so
//! a plugin spawned from one of them could be killed when that thread is
//! retired. Every spawn therefore happens on one of a few threads that live
//! as long as the process. There are two: a spawn blocks its thread until
//! the child has set up its sandbox and called `exec`, much of which the
//! child spends waiting in the kernel (joining cgroups, loading the binary),
//! so a second thread forks the next plugin meanwhile: a hundred plugins
//! started at once were ready about 15 % sooner. Four threads measured
//! within the noise of two on a two-core machine.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::process::Stdio;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};

use aurora_protocol::{CHANNEL_FD, CHANNEL_FD_ENV, LOG_LEVEL_ENV};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::sandbox::{self, PluginCgroup, Prepared, SandboxError};
use crate::spec::PluginSpec;

/// How many stderr lines are kept for crash reports.
pub(crate) const STDERR_TAIL_LINES: usize = 20;

/// Output lines longer than this are cut, so a plugin that writes without
/// newlines cannot grow the supervisor's memory.
const MAX_LINE: usize = 4096;

/// How much of a plugin's stdout or stderr is read at a time.
const OUTPUT_BUFFER: usize = 1024;

/// The last lines a plugin wrote to stderr.
pub(crate) type StderrTail = Arc<Mutex<VecDeque<String>>>;

/// A freshly started plugin process.
pub(crate) struct Spawned {
    pub(crate) child: Child,
    pub(crate) pid: u32,
    /// The supervisor's end of the plugin's socket.
    pub(crate) channel: std::os::unix::net::UnixStream,
    pub(crate) stderr_tail: StderrTail,
    /// The tasks copying stdout and stderr into the log; they end when the
    /// plugin (and anything it started that shares the pipes) is gone.
    pub(crate) output: Vec<JoinHandle<()>>,
    /// The plugin's cgroups, when the machine offers any.
    pub(crate) cgroup: Option<Arc<PluginCgroup>>,
    /// Parts of the sandbox the kernel could not enforce.
    pub(crate) sandbox_gaps: Vec<String>,
}

/// Why a plugin process could not be started.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SpawnError {
    #[error("cannot start {command}: {source}")]
    Exec { command: String, source: io::Error },
    #[error("cannot sandbox {command}: {source}")]
    Sandbox {
        command: String,
        source: SandboxError,
    },
}

/// Starts the process `spec` describes, with its socket at
/// [`CHANNEL_FD`].
pub(crate) async fn spawn_plugin(spec: &PluginSpec) -> Result<Spawned, SpawnError> {
    let command_name = || spec.command.display().to_string();
    let spawn_error = |source| SpawnError::Exec {
        command: command_name(),
        source,
    };

    let sandbox = Prepared::prepare(spec).map_err(|source| SpawnError::Sandbox {
        command: command_name(),
        source,
    })?;
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(spawn_error)?;
    let command = build_command(spec, theirs.as_raw_fd(), &sandbox);
    let spawned = spawn_on_spawner_thread(command).await;
    // The child has its own copies now; ours must go, or the supervisor would
    // never see end-of-file when the plugin dies. The sandbox's descriptors
    // (ruleset, cgroup files) go with it.
    drop(theirs);
    let Prepared {
        cgroup,
        gaps: sandbox_gaps,
        ..
    } = sandbox;
    let mut child = match spawned {
        Ok(child) => child,
        Err(err) => {
            if let Some(cgroup) = &cgroup {
                cgroup.remove();
            }
            return Err(spawn_error(err));
        }
    };

    let pid = child.id().unwrap_or_default();
    sandbox::guardian::track(pid as i32);
    let channel = ours;

    let stderr_tail: StderrTail = Arc::default();
    let mut output = Vec::with_capacity(2);
    if let Some(stdout) = child.stdout.take() {
        output.push(tokio::spawn(
            forward_lines(stdout, "stdout", None).in_current_span(),
        ));
    }
    if let Some(stderr) = child.stderr.take() {
        let tail = Some(Arc::clone(&stderr_tail));
        output.push(tokio::spawn(
            forward_lines(stderr, "stderr", tail).in_current_span(),
        ));
    }
    Ok(Spawned {
        child,
        pid,
        channel,
        stderr_tail,
        output,
        cgroup,
        sandbox_gaps,
    })
}

fn build_command(spec: &PluginSpec, channel_fd: i32, sandbox: &Prepared) -> Command {
    let mut command = Command::new(&spec.command);
    command
        .args(&spec.args)
        .env_clear()
        .envs(sandbox::environment(spec))
        .env(CHANNEL_FD_ENV, CHANNEL_FD.to_string())
        .env(LOG_LEVEL_ENV, &spec.log_level)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(cwd) = &spec.cwd {
        command.current_dir(cwd);
    }

    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe functions may be called. It calls prctl, getppid,
    // dup2 and fcntl, all of which are, and it allocates nothing: its errors
    // are built from raw OS error numbers.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The supervisor may have died between fork and prctl, in which
            // case no death signal will ever come.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            // dup2 gives the copy no close-on-exec flag; when the socket is
            // already at the right number, clear the flag instead.
            let placed = if channel_fd == CHANNEL_FD {
                libc::fcntl(CHANNEL_FD, libc::F_SETFD, 0)
            } else {
                libc::dup2(channel_fd, CHANNEL_FD)
            };
            if placed < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
        // SAFETY: see `Prepared::child_setup`, which documents that its
        // closure makes only async-signal-safe calls.
        command.pre_exec(sandbox.child_setup());
    }
    command
}

type SpawnJob = Box<dyn FnOnce() + Send>;

/// How many spawner threads there are.
const SPAWNER_THREADS: usize = 2;

/// Runs `command.spawn()` on one of the process-wide spawner threads.
async fn spawn_on_spawner_thread(mut command: Command) -> io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnJob>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (jobs, queue) = mpsc::channel::<SpawnJob>();
        // Whichever thread is free takes the next job.
        let queue = Arc::new(Mutex::new(queue));
        for _ in 0..SPAWNER_THREADS {
            let queue = Arc::clone(&queue);
            std::thread::Builder::new()
                .name("aurora-spawner".into())
                .spawn(move || {
                    loop {
                        let job = queue.lock().unwrap_or_else(|p| p.into_inner()).recv();
                        match job {
                            Ok(job) => job(),
                            Err(mpsc::RecvError) => return,
                        }
                    }
                })
                .expect("the spawner threads are created once, at the first spawn");
        }
        jobs
    });

    let runtime = tokio::runtime::Handle::current();
    let (done, spawned) = oneshot::channel();
    let job = Box::new(move || {
        // Tokio registers the child with the runtime's SIGCHLD handling.
        let _runtime = runtime.enter();
        let _ = done.send(command.spawn());
    });
    spawner
        .send(job)
        .map_err(|_| io::Error::other("the spawner thread has stopped"))?;
    spawned
        .await
        .map_err(|_| io::Error::other("the spawner thread dropped a spawn request"))?
}

/// Copies a plugin's output into the log a line at a time, keeping the last
/// lines in `tail` when given one.
async fn forward_lines(
    stream: impl AsyncRead + Unpin,
    name: &'static str,
    tail: Option<StderrTail>,
) {
    // A small read buffer: lines longer than it are assembled in `line`, and
    // a supervisor with a thousand quiet plugins holds two of these each.
    let mut reader = BufReader::with_capacity(OUTPUT_BUFFER, stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match read_line_bounded(&mut reader, &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\n', '\r']);
        tracing::info!(stream = name, "{text}");
        if let Some(tail) = &tail {
            let mut tail = tail.lock().unwrap_or_else(|poison| poison.into_inner());
            if tail.len() == STDERR_TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(text.to_owned());
        }
    }
}

/// Reads up to and including the next newline into `line`, keeping at most
/// [`MAX_LINE`] bytes of it. Returns how many bytes were consumed.
async fn read_line_bounded(
    reader: &mut BufReader<impl AsyncRead + Unpin>,
    line: &mut Vec<u8>,
) -> io::Result<usize> {
    let mut consumed = 0;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(consumed);
        }
        let (chunk, found_newline) = match available.iter().position(|&b| b == b'\n') {
            Some(end) => (&available[..=end], true),
            None => (available, false),
        };
        let room = MAX_LINE.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let used = chunk.len();
        reader.consume(used);
        consumed += used;
        if found_newline {
            return Ok(consumed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn long_lines_are_cut_and_the_rest_still_read() {
        let mut input = vec![b'x'; MAX_LINE * 3];
        input.extend_from_slice(b"\nshort\n");
        let mut reader = BufReader::new(&input[..]);
        let mut line = Vec::new();

        let consumed = read_line_bounded(&mut reader, &mut line).await.unwrap();
        assert_eq!(consumed, MAX_LINE * 3 + 1);
        assert_eq!(line.len(), MAX_LINE);

        line.clear();
        read_line_bounded(&mut reader, &mut line).await.unwrap();
        assert_eq!(line, b"short\n");

        line.clear();
        assert_eq!(read_line_bounded(&mut reader, &mut line).await.unwrap(), 0);
    }
}
