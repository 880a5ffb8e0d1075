//! The floor: the least a plugin can be, for Aurora to be measured against.
//!
//! It speaks the real protocol, so a supervisor could drive it too, but with
//! nothing Aurora's SDK adds: no async runtime, no tasks, no channels, no
//! protocol values after the handshake. Calls are read with blocking reads
//! into one reused buffer, each reply is written around the payload it
//! answers, and output is flushed only once no more input is buffered, so a
//! pipelined window of calls costs one read and one write. What an SDK plugin
//! costs above this program is what the benchmark calls overhead.
//!
//! Methods: `spin` takes a bincode `u64` and runs the same CPU loop as the
//! wordcount plugin's `spin` ([`aurora_bench::work::spin`]); every other
//! method answers with its own payload, which for `bytes` is exactly what the
//! echo plugin answers.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use aurora_bench::wire::{
    self, CallView, ENCODING_BINCODE, ERROR_BAD_REQUEST, ERROR_DEADLINE_EXCEEDED, HostFrame,
};
use aurora_bench::work;
use aurora_protocol::codec;
use aurora_protocol::{
    CHANNEL_FD_ENV, DEFAULT_MAX_FRAME, Hello, HostMessage, MethodInfo, PROTOCOL_VERSION,
    PluginMessage, SCHEMA_FINGERPRINT, encode_frame,
};

/// The read buffer: one read takes a whole window of small calls.
const READ_BUFFER: usize = 64 * 1024;

/// The write buffer: large enough that a 64 KiB reply and its header leave in
/// one write instead of a small one followed by a large one.
const WRITE_BUFFER: usize = 128 * 1024;

fn main() -> ExitCode {
    match serve() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // stderr is the plugin's place for a last word before a failed
            // exit; the harness lets it through to the terminal.
            eprintln!("aurora-bench-floor: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Handshakes, then answers frames until the supervisor closes the socket or
/// asks the floor to shut down.
fn serve() -> io::Result<()> {
    let channel = take_channel()?;
    let mut input = BufReader::with_capacity(READ_BUFFER, channel.try_clone()?);
    let mut output = BufWriter::with_capacity(WRITE_BUFFER, channel);
    let max_frame = handshake(&mut input, &mut output)?;

    let mut body = Vec::new();
    loop {
        let Some(len) = wire::read_frame(&mut input, max_frame, &mut body)? else {
            return output.flush();
        };
        match wire::parse_host_frame(&body[..len])? {
            HostFrame::Call(call) => answer(&mut output, &call)?,
            HostFrame::Ping { nonce } => wire::write_pong(&mut output, nonce)?,
            // Every call is answered before the next frame is read, so a
            // cancel always names a call that has finished.
            HostFrame::Cancel { .. } => {}
            HostFrame::Shutdown => return output.flush(),
            HostFrame::Handshake => {
                let message = "the supervisor sent a handshake message after the handshake";
                return Err(io::Error::new(io::ErrorKind::InvalidData, message));
            }
        }

        let is_input_drained = input.buffer().is_empty();
        if is_input_drained {
            output.flush()?;
        }
    }
}

/// Takes the socket the parent left at the descriptor `AURORA_CHANNEL_FD`
/// names, and keeps it from leaking into anything this process might start.
fn take_channel() -> io::Result<UnixStream> {
    let not_supervised = || {
        let message = format!(
            "{CHANNEL_FD_ENV} is not set to a descriptor: this program is started by \
             aurora-bench or an Aurora supervisor"
        );
        io::Error::new(io::ErrorKind::NotFound, message)
    };
    let value = std::env::var(CHANNEL_FD_ENV).map_err(|_| not_supervised())?;
    let fd: i32 = value.parse().map_err(|_| not_supervised())?;
    if fd < 0 {
        return Err(not_supervised());
    }

    // SAFETY: F_GETFD only reports a descriptor's flags, and fails harmlessly
    // on a number that is not open.
    let is_open = unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
    if !is_open {
        return Err(not_supervised());
    }
    // SAFETY: the parent placed this process's end of the socket at `fd`,
    // which was just seen to be open, and nothing else here claims it.
    let channel = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain fcntl on a descriptor this function owns.
    let flagged = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    if flagged < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(channel))
}

/// Sends the hello and reads the supervisor's answer; returns the frame limit
/// it set.
fn handshake(input: &mut impl Read, output: &mut impl Write) -> io::Result<u32> {
    let method = |name: &str, request: &str, response: &str| MethodInfo {
        name: name.to_owned(),
        request: request.to_owned(),
        response: response.to_owned(),
    };
    let hello = PluginMessage::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        schema: SCHEMA_FINGERPRINT,
        sdk: concat!("aurora-bench-floor/", env!("CARGO_PKG_VERSION")).to_owned(),
        name: "floor".to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        pid: std::process::id(),
        methods: vec![
            method("bytes", "bytes", "bytes"),
            method("spin", "u64", "u64"),
        ],
    });
    let mut frame = Vec::new();
    encode_frame(&hello, DEFAULT_MAX_FRAME, &mut frame).map_err(io::Error::other)?;
    output.write_all(&frame)?;
    output.flush()?;

    let mut body = Vec::new();
    let Some(len) = wire::read_frame(input, DEFAULT_MAX_FRAME, &mut body)? else {
        let message = "the supervisor closed the socket during the handshake";
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, message));
    };
    let answer: HostMessage = codec::decode(&body[..len]).map_err(io::Error::other)?;
    match answer {
        HostMessage::Welcome(welcome) => Ok(welcome.max_frame),
        HostMessage::Reject { reason } => Err(io::Error::other(format!(
            "the supervisor refused the handshake: {reason}"
        ))),
        _ => {
            let message = "the supervisor answered the hello with neither Welcome nor Reject";
            Err(io::Error::new(io::ErrorKind::InvalidData, message))
        }
    }
}

/// Answers one call: `spin` does its work, anything else is echoed.
fn answer(output: &mut impl Write, call: &CallView<'_>) -> io::Result<()> {
    if call.method != b"spin" {
        return wire::write_reply_ok(output, call.id, call.encoding, call.payload);
    }

    let Some(iterations) = spin_iterations(call) else {
        let message = "spin takes a bincode-encoded u64";
        return wire::write_reply_err(output, call.id, ERROR_BAD_REQUEST, message);
    };
    let deadline = Instant::now() + Duration::from_millis(call.timeout_ms);
    match work::spin(iterations, deadline) {
        Some(hash) => wire::write_reply_ok(output, call.id, ENCODING_BINCODE, &hash.to_le_bytes()),
        None => {
            let message = "deadline passed while spinning";
            wire::write_reply_err(output, call.id, ERROR_DEADLINE_EXCEEDED, message)
        }
    }
}

/// The iteration count of a `spin` call: a bincode `u64` is its eight
/// little-endian bytes.
fn spin_iterations(call: &CallView<'_>) -> Option<u64> {
    if call.encoding != ENCODING_BINCODE {
        return None;
    }
    let bytes: [u8; 8] = call.payload.try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}
