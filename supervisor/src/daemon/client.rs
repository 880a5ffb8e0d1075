//! The client side of the control socket, used by the `aurora` CLI.
//!
//! A request is one connection: [`send`] connects, writes the request and
//! returns a [`Response`] stream to read answers from. Errors say what a
//! person can do about them; above all, a daemon that is not running is
//! reported as exactly that, with how to start one.

use std::io;
use std::path::{Path, PathBuf};

use aurora_protocol::control::{
    CONTROL_MAX_FRAME, ControlCommand, ControlError, ControlErrorKind, ControlRequest,
    ControlResponse,
};
use aurora_protocol::{FrameError, FrameReader, encode_frame};
use interprocess::local_socket::tokio::Stream;
use interprocess::local_socket::tokio::prelude::*;
use interprocess::local_socket::{GenericFilePath, ToFsName};
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};

/// Why the daemon could not be asked, or did not answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no aurora daemon is running at {socket} (start one with `aurora run`, or \
         `systemctl start aurora` where it is installed as a service; `--socket` or \
         AURORA_SOCKET name another socket)"
    )]
    NotRunning { socket: PathBuf },
    #[error("not allowed to use the control socket {socket}: {source}")]
    PermissionDenied { socket: PathBuf, source: io::Error },
    #[error("cannot reach the daemon at {socket}: {source}")]
    Connect { socket: PathBuf, source: io::Error },
    #[error("cannot talk to the daemon: {0}")]
    Frame(#[from] FrameError),
    #[error(
        "the daemon closed the connection without answering; it may be shutting down, or be a \
         different version of aurora"
    )]
    NoAnswer,
    /// The daemon answered with an error.
    #[error("{}", .0.message)]
    Refused(ControlError),
}

impl ClientError {
    /// The daemon's reason, when it gave one.
    pub fn kind(&self) -> Option<ControlErrorKind> {
        match self {
            ClientError::Refused(error) => Some(error.kind),
            _ => None,
        }
    }
}

/// The answers to one request, read one frame at a time.
pub struct Response {
    reader: FrameReader<ReadHalf<Stream>>,
    /// Kept so the connection stays open while answers are read.
    _writer: WriteHalf<Stream>,
}

impl Response {
    /// The next answer; `None` when the daemon has closed the connection.
    /// An `Error` answer becomes [`ClientError::Refused`].
    ///
    /// # Errors
    ///
    /// [`ClientError::Frame`] for a broken connection or an answer that does
    /// not decode, [`ClientError::Refused`] for the daemon's own error.
    pub async fn next(&mut self) -> Result<Option<ControlResponse>, ClientError> {
        match self.reader.read::<ControlResponse>().await? {
            Some(ControlResponse::Error(error)) => Err(ClientError::Refused(error)),
            other => Ok(other),
        }
    }

    /// The one answer a request gets.
    ///
    /// # Errors
    ///
    /// As [`Response::next`], and [`ClientError::NoAnswer`] when there is
    /// none.
    pub async fn single(mut self) -> Result<ControlResponse, ClientError> {
        self.next().await?.ok_or(ClientError::NoAnswer)
    }
}

/// Connects to the daemon at `socket` and sends `command`.
///
/// # Errors
///
/// [`ClientError::NotRunning`] when nothing listens there,
/// [`ClientError::PermissionDenied`] when the socket's permissions keep us
/// out, and the other variants for everything else.
pub async fn send(socket: &Path, command: ControlCommand) -> Result<Response, ClientError> {
    let connect_error = |source: io::Error| match source.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => ClientError::NotRunning {
            socket: socket.to_owned(),
        },
        io::ErrorKind::PermissionDenied => ClientError::PermissionDenied {
            socket: socket.to_owned(),
            source,
        },
        _ => ClientError::Connect {
            socket: socket.to_owned(),
            source,
        },
    };
    let name = socket
        .to_fs_name::<GenericFilePath>()
        .map_err(connect_error)?;
    let stream = Stream::connect(name).await.map_err(connect_error)?;
    let (read_half, mut write_half) = tokio::io::split(stream);

    let mut frame = Vec::new();
    encode_frame(&ControlRequest::new(command), CONTROL_MAX_FRAME, &mut frame)?;
    write_half.write_all(&frame).await.map_err(FrameError::Io)?;
    Ok(Response {
        reader: FrameReader::new(read_half, CONTROL_MAX_FRAME),
        _writer: write_half,
    })
}
