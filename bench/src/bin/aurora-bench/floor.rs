//! The harness's side of the floor: starting `aurora-bench-floor` with its
//! socket at descriptor 3, as a supervisor would, and talking to it with
//! blocking reads and writes on the calling thread, with no supervisor, task
//! or channel in between.
//!
//! Together with the floor program this is the bare-socket floor: a process,
//! a socketpair and length-prefixed frames, which is what the operating system
//! charges for a plugin before any of Aurora's own work.

use std::io::{self, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use aurora_bench::wire::{self, CallView, ENCODING_BINCODE, ReplyOutcome};
use aurora_protocol::codec;
use aurora_protocol::{
    CHANNEL_FD, CHANNEL_FD_ENV, DEFAULT_MAX_FRAME, HostMessage, PROTOCOL_VERSION, PluginMessage,
    Welcome, encode_frame,
};

/// The `timeout_ms` sent with each call, the supervisor's default call
/// timeout, so that `spin` in the floor checks the same kind of deadline.
const CALL_TIMEOUT_MS: u64 = 30_000;

/// How long a read from the floor may block before the harness gives up
/// instead of hanging: far beyond any figure's time, short of forever.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// The harness's read buffer, the same size as the supervisor's.
const READ_BUFFER: usize = 8 * 1024;

/// One running floor process and the harness's end of its socket.
///
/// Dropping it kills and reaps the process.
pub struct FloorChild {
    child: Child,
    input: BufReader<UnixStream>,
    output: UnixStream,
    /// Frames gathered for the next write.
    outgoing: Vec<u8>,
    /// The body of the last frame read.
    body: Vec<u8>,
    next_id: u64,
    /// The id of the oldest call not yet answered; the floor answers in order.
    next_reply_id: u64,
}

impl FloorChild {
    /// Starts the floor program at `program`, its socket at [`CHANNEL_FD`].
    ///
    /// Call this from the main thread only: the child asks for SIGKILL when
    /// the thread that forked it exits, as a supervisor's plugin does, and
    /// the main thread lives as long as the harness.
    ///
    /// # Errors
    ///
    /// When the socket cannot be made or the program cannot be started.
    pub fn spawn(program: &Path) -> anyhow::Result<FloorChild> {
        let (ours, theirs) = UnixStream::pair().context("cannot create a socketpair")?;
        let channel_fd = theirs.as_raw_fd();
        let parent = std::process::id() as libc::pid_t;

        let mut command = Command::new(program);
        command
            .env(CHANNEL_FD_ENV, CHANNEL_FD.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .process_group(0);
        // SAFETY: the closure runs in the forked child before exec, where only
        // async-signal-safe functions may be called: prctl, getppid, fcntl and
        // dup2 are, and it allocates nothing, building errors from errno.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The harness may have died before prctl took effect.
                if libc::getppid() != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                // dup2 leaves the copy open across exec; a socket already at
                // the right number only needs its close-on-exec flag cleared.
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
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        // The child holds its own copy; ours must close, or the floor would
        // never see the end of its input.
        drop(theirs);

        ours.set_read_timeout(Some(READ_TIMEOUT))
            .context("cannot set a read timeout on the floor's socket")?;
        let input = BufReader::with_capacity(READ_BUFFER, ours.try_clone()?);
        Ok(FloorChild {
            child,
            input,
            output: ours,
            outgoing: Vec::new(),
            body: Vec::new(),
            next_id: 1,
            next_reply_id: 1,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reads the floor's hello and welcomes it.
    ///
    /// # Errors
    ///
    /// When the floor closes the socket, sends anything but a compatible
    /// hello, or the socket fails.
    pub fn handshake(&mut self) -> anyhow::Result<()> {
        let len = wire::read_frame(&mut self.input, DEFAULT_MAX_FRAME, &mut self.body)?
            .context("the floor closed its socket before saying hello")?;
        let hello: PluginMessage = codec::decode(&self.body[..len])?;
        let PluginMessage::Hello(hello) = hello else {
            bail!("the floor's first message was not a hello");
        };
        hello.check_compatible()?;

        let welcome = HostMessage::Welcome(Welcome {
            protocol: PROTOCOL_VERSION,
            max_frame: DEFAULT_MAX_FRAME,
        });
        self.outgoing.clear();
        encode_frame(&welcome, DEFAULT_MAX_FRAME, &mut self.outgoing)?;
        self.output.write_all(&self.outgoing)?;
        self.outgoing.clear();
        Ok(())
    }

    /// Adds a bincode call of `method` to the next write; returns its id.
    pub fn queue_call(&mut self, method: &str, payload: &[u8]) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let call = CallView {
            id,
            method: method.as_bytes(),
            encoding: ENCODING_BINCODE,
            payload,
            timeout_ms: CALL_TIMEOUT_MS,
        };
        wire::append_call(&mut self.outgoing, &call);
        id
    }

    /// Writes every queued call at once.
    ///
    /// # Errors
    ///
    /// When the socket fails.
    pub fn send_queued(&mut self) -> io::Result<()> {
        self.output.write_all(&self.outgoing)?;
        self.outgoing.clear();
        Ok(())
    }

    /// Reads the reply to the oldest unanswered call and returns its payload.
    ///
    /// # Errors
    ///
    /// When the floor closes the socket, answers out of order, answers with
    /// an error, or the socket fails.
    pub fn receive_reply(&mut self) -> anyhow::Result<&[u8]> {
        let len = wire::read_frame(&mut self.input, DEFAULT_MAX_FRAME, &mut self.body)?
            .context("the floor closed its socket with calls unanswered")?;
        let reply = wire::parse_reply(&self.body[..len])?;
        ensure!(
            reply.id == self.next_reply_id,
            "the floor answered call {} when call {} was the oldest",
            reply.id,
            self.next_reply_id
        );
        self.next_reply_id += 1;
        match reply.outcome {
            ReplyOutcome::Ok { payload, .. } => Ok(payload),
            ReplyOutcome::Err { kind, message } => bail!(
                "the floor failed call {} with error kind {kind}: {}",
                reply.id,
                String::from_utf8_lossy(message)
            ),
        }
    }

    /// Makes one call and waits for its answer.
    ///
    /// # Errors
    ///
    /// As [`FloorChild::send_queued`] and [`FloorChild::receive_reply`].
    pub fn call(&mut self, method: &str, payload: &[u8]) -> anyhow::Result<&[u8]> {
        self.queue_call(method, payload);
        self.send_queued()?;
        self.receive_reply()
    }
}

impl Drop for FloorChild {
    fn drop(&mut self) {
        // The floor holds no state worth a graceful stop; killing it is
        // quicker and cannot hang the harness. Either call fails only if the
        // process is already gone, which is the goal anyway.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
