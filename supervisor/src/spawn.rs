//! Starting a plugin process: the program, arguments and environment it
//! gets, the socket it inherits, and the capture of its stdout and stderr.
//! `process` does the clone and exec (process group, death signal, sandbox)
//! and owns the child from then on.
//!
//! # Why spawner threads
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits,
//! not the process. Tokio's worker and blocking-pool threads come and go, so
//! a plugin spawned from one of them could be killed when that thread is
//! retired. Every spawn therefore happens on one of a few threads that live
//! as long as the process. There are two: a spawn blocks its thread until
//! the child has set up its sandbox and called `exec`, much of which the
//! child spends waiting in the kernel (joining v1 cgroups, loading the
//! binary), so a second thread forks the next plugin meanwhile: a hundred
//! plugins started at once were ready about 15 % sooner. Four threads measured
//! within the noise of two on a two-core machine.

mod process;

use std::collections::VecDeque;
use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};

use aurora_protocol::{CHANNEL_FD, CHANNEL_FD_ENV, LOG_LEVEL_ENV};
use nix::fcntl::OFlag;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::net::unix::pipe;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::Instrument;

pub(crate) use process::ChildProcess;

use crate::sandbox::{self, PluginCgroup, Prepared, SandboxError, above_channel};
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
    pub(crate) child: ChildProcess,
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
    let plan = ProcessPlan::new(spec, theirs).map_err(spawn_error)?;
    let setup = sandbox.child_setup();
    let cgroup_dir = sandbox.unified_dir.as_ref().map(AsRawFd::as_raw_fd);
    let spawned = spawn_on_spawner_thread(plan, cgroup_dir, setup).await;
    // The child has its own copies of the descriptors the plan held (its
    // end of the socket, its ends of the pipes); ours went with the plan, or
    // the supervisor would never see end-of-file when the plugin dies. The
    // sandbox's descriptors (ruleset, cgroup files) go now.
    let Prepared {
        cgroup,
        gaps: sandbox_gaps,
        ..
    } = sandbox;
    let (child, stdout, stderr) = match spawned {
        Ok(spawned) => spawned,
        Err(err) => {
            if let Some(cgroup) = &cgroup {
                cgroup.remove();
            }
            return Err(spawn_error(err));
        }
    };

    let pid = child.id();
    sandbox::guardian::track(pid as i32);
    let channel = ours;

    let stderr_tail: StderrTail = Arc::default();
    let output = vec![
        tokio::spawn(forward_lines(stdout, "stdout", None).in_current_span()),
        tokio::spawn(
            forward_lines(stderr, "stderr", Some(Arc::clone(&stderr_tail))).in_current_span(),
        ),
    ];
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

/// The program, arguments, environment and descriptors of one plugin
/// process, made ready before it is handed to a spawner thread.
struct ProcessPlan {
    program: CString,
    args: Vec<CString>,
    env: Vec<CString>,
    cwd: Option<CString>,
    stdin: OwnedFd,
    stdout: (OwnedFd, OwnedFd),
    stderr: (OwnedFd, OwnedFd),
    channel: OwnedFd,
}

impl ProcessPlan {
    fn new(spec: &PluginSpec, channel: std::os::unix::net::UnixStream) -> io::Result<ProcessPlan> {
        let c_string = |bytes: &[u8]| {
            CString::new(bytes)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "contains a NUL byte"))
        };
        let program = resolve_program(&spec.command);
        let mut args = vec![c_string(program.as_os_str().as_bytes())?];
        for arg in &spec.args {
            args.push(c_string(arg.as_bytes())?);
        }
        let mut env = Vec::new();
        let own = [
            (
                OsString::from(CHANNEL_FD_ENV),
                OsString::from(CHANNEL_FD.to_string()),
            ),
            (
                OsString::from(LOG_LEVEL_ENV),
                OsString::from(&spec.log_level),
            ),
        ];
        for (name, value) in sandbox::environment(spec).into_iter().chain(own) {
            let mut pair = name.into_vec();
            pair.push(b'=');
            pair.extend_from_slice(value.as_bytes());
            env.push(c_string(&pair)?);
        }
        let cwd = spec
            .cwd
            .as_ref()
            .map(|cwd| c_string(cwd.as_os_str().as_bytes()))
            .transpose()?;

        let pipe = || -> io::Result<(OwnedFd, OwnedFd)> {
            let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
            // Only our end is read without blocking; the plugin's end is
            // an ordinary blocking pipe.
            nix::fcntl::fcntl(&write, nix::fcntl::FcntlArg::F_SETFL(OFlag::empty()))?;
            Ok((read, above_channel(write)?))
        };
        let null = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")?;
        Ok(ProcessPlan {
            program: c_string(program.as_os_str().as_bytes())?,
            args,
            env,
            cwd,
            stdin: above_channel(OwnedFd::from(null))?,
            stdout: pipe()?,
            stderr: pipe()?,
            channel: above_channel(OwnedFd::from(channel))?,
        })
    }

    /// Starts the process. Runs on a spawner thread, inside the runtime.
    fn spawn(
        self,
        cgroup_dir: Option<RawFd>,
        setup: impl FnMut(bool) -> io::Result<()>,
    ) -> io::Result<(ChildProcess, pipe::Receiver, pipe::Receiver)> {
        let pointers = |strings: &[CString]| -> Vec<*const libc::c_char> {
            let mut pointers: Vec<_> = strings.iter().map(|s| s.as_ptr()).collect();
            pointers.push(std::ptr::null());
            pointers
        };
        let argv = pointers(&self.args);
        let envp = pointers(&self.env);
        let plan = process::Plan {
            program: &self.program,
            argv: &argv,
            envp: &envp,
            cwd: self.cwd.as_ref(),
            stdio: [
                self.stdin.as_raw_fd(),
                self.stdout.1.as_raw_fd(),
                self.stderr.1.as_raw_fd(),
            ],
            channel: self.channel.as_raw_fd(),
            cgroup_dir,
        };
        // SAFETY: `setup` is the sandbox's child closure, which makes only
        // async-signal-safe calls and allocates nothing; every pointer in
        // `plan` points into `self`, `argv` or `envp`, which outlive the call.
        let child = unsafe { process::spawn(&plan, setup)? };
        let stdout = pipe::Receiver::from_owned_fd_unchecked(self.stdout.0)?;
        let stderr = pipe::Receiver::from_owned_fd_unchecked(self.stderr.0)?;
        Ok((child, stdout, stderr))
    }
}

/// A program named without a slash is looked up in the supervisor's PATH,
/// as a shell would.
fn resolve_program(command: &Path) -> PathBuf {
    if command.as_os_str().as_bytes().contains(&b'/') {
        return command.to_owned();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(command))
        .find(|candidate| {
            candidate
                .metadata()
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
        .unwrap_or_else(|| command.to_owned())
}

type SpawnJob = Box<dyn FnOnce() + Send>;

/// How many spawner threads there are.
const SPAWNER_THREADS: usize = 2;

type SpawnedProcess = (ChildProcess, pipe::Receiver, pipe::Receiver);

/// Starts `plan` on one of the process-wide spawner threads.
async fn spawn_on_spawner_thread(
    plan: ProcessPlan,
    cgroup_dir: Option<RawFd>,
    setup: impl FnMut(bool) -> io::Result<()> + Send + 'static,
) -> io::Result<SpawnedProcess> {
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
        // The pidfd and pipes are registered with the runtime.
        let _runtime = runtime.enter();
        let _ = done.send(plan.spawn(cgroup_dir, setup));
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
