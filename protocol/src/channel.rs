//! The plugin channel: one end of a Unix socketpair, read by one task and
//! written by another.
//!
//! tokio's `UnixStream` registers its socket for both read and write
//! readiness, edge-triggered. A Unix socket reports itself writable again
//! every time the peer reads from it, so in a request-and-reply exchange each
//! side was woken twice per call: once for the message it waited for, once
//! for the peer having read the last one. Waking an idle thread is the most
//! expensive step of a small call, so here the socket is registered for
//! reading only. Writes go straight to the socket, and a second registration
//! for write readiness exists only while a write waits for a full socket
//! buffer to drain.

use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::{MsgFlags, Shutdown, sendmsg, shutdown};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, Interest, ReadBuf};

/// Splits a connected socket into its reading and writing halves.
///
/// Must be called inside a tokio runtime with I/O enabled.
///
/// # Errors
///
/// When the socket cannot be made non-blocking or registered with the
/// runtime.
pub fn split(socket: UnixStream) -> io::Result<(ChannelReader, ChannelWriter)> {
    socket.set_nonblocking(true)?;
    let socket = Arc::new(socket);
    // SAFETY: the registration owns a reference to the socket, so the
    // descriptor stays open for as long as it is registered.
    let readable =
        unsafe { AsyncFd::register_with_interest(Arc::clone(&socket), Interest::READABLE)? };
    let reader = ChannelReader { socket: readable };
    let writer = ChannelWriter {
        socket,
        blocked: None,
    };
    Ok((reader, writer))
}

/// The reading half; wakes its task only when there is something to read.
#[derive(Debug)]
pub struct ChannelReader {
    socket: AsyncFd<Arc<UnixStream>>,
}

impl AsyncRead for ChannelReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut ready = ready!(self.socket.poll_read_ready(cx))?;
            // SAFETY: recv only writes into the unfilled part, and only the
            // bytes it reports are marked initialised below.
            let unfilled = unsafe { buf.unfilled_mut() };
            match ready.try_io(|socket| receive(socket.get_ref().as_raw_fd(), unfilled)) {
                Ok(Ok(read)) => {
                    // SAFETY: recv initialised exactly `read` bytes.
                    unsafe { buf.assume_init(read) };
                    buf.advance(read);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(err)) => return Poll::Ready(Err(err)),
                // Readiness was stale; `try_io` cleared it, so wait again.
                Err(_would_block) => {}
            }
        }
    }
}

/// One non-blocking receive into memory that need not be initialised: a
/// large frame's buffer is read into without being zeroed first.
fn receive(socket: RawFd, into: &mut [MaybeUninit<u8>]) -> io::Result<usize> {
    loop {
        // SAFETY: the kernel writes at most `into.len()` bytes into `into`.
        let read = unsafe { libc::recv(socket, into.as_mut_ptr().cast(), into.len(), 0) };
        match usize::try_from(read) {
            Ok(read) => return Ok(read),
            Err(_) if Errno::last() == Errno::EINTR => {}
            Err(_) => return Err(io::Error::last_os_error()),
        }
    }
}

/// The writing half. Dropping it shuts the socket down for writing, so the
/// peer reads end-of-file once it has read everything sent before.
#[derive(Debug)]
pub struct ChannelWriter {
    socket: Arc<UnixStream>,
    /// A duplicate of the socket registered for write readiness, present only
    /// while a write is waiting for the peer to make room.
    blocked: Option<AsyncFd<OwnedFd>>,
}

impl ChannelWriter {
    /// Writes all of `bytes`, waiting while the socket buffer is full.
    ///
    /// Cancel-safe only in the sense that nothing is written twice: a
    /// write dropped halfway leaves part of `bytes` on the socket.
    ///
    /// # Errors
    ///
    /// The socket's error, such as a broken pipe once the peer has gone.
    pub async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.write_all_vectored(&mut [IoSlice::new(bytes)]).await
    }

    /// Writes all of `parts`, in order, as if they were one buffer; `parts`
    /// is consumed in the process.
    ///
    /// # Errors
    ///
    /// As [`ChannelWriter::write_all`].
    pub async fn write_all_vectored(&mut self, mut parts: &mut [IoSlice<'_>]) -> io::Result<()> {
        IoSlice::advance_slices(&mut parts, 0);
        while !parts.is_empty() {
            let sent = match send_now(self.socket.as_raw_fd(), parts) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    self.send_when_room(parts).await?
                }
                sent => sent?,
            };
            IoSlice::advance_slices(&mut parts, sent);
        }
        // Stay registered no longer than needed: while registered, every
        // read the peer makes would wake this process.
        self.blocked = None;
        Ok(())
    }

    /// Waits until the socket buffer has room, then sends what fits.
    async fn send_when_room(&mut self, parts: &[IoSlice<'_>]) -> io::Result<usize> {
        let blocked = match &mut self.blocked {
            Some(blocked) => blocked,
            None => {
                let duplicate = self.socket.as_fd().try_clone_to_owned()?;
                // SAFETY: the registration owns the duplicate, which stays
                // open until the registration is dropped.
                let registered =
                    unsafe { AsyncFd::register_with_interest(duplicate, Interest::WRITABLE)? };
                self.blocked.insert(registered)
            }
        };
        // Edge-triggered: a socket that drained between the failed send and
        // the registration above is reported ready at once.
        loop {
            let mut ready = blocked.writable().await?;
            if let Ok(sent) = ready.try_io(|duplicate| send_now(duplicate.as_raw_fd(), parts)) {
                return sent;
            }
        }
    }
}

/// One non-blocking send of as much of `parts` as fits; an interrupted one
/// sends nothing and is not an error. `MSG_NOSIGNAL` turns a closed peer into
/// `EPIPE` instead of SIGPIPE.
fn send_now(socket: RawFd, parts: &[IoSlice<'_>]) -> io::Result<usize> {
    match sendmsg::<()>(socket, parts, &[], MsgFlags::MSG_NOSIGNAL, None) {
        Ok(sent) => Ok(sent),
        Err(Errno::EINTR) => Ok(0),
        Err(errno) => Err(errno.into()),
    }
}

impl Drop for ChannelWriter {
    fn drop(&mut self) {
        // The reader may still be reading replies; only our direction ends.
        let _ = shutdown(self.socket.as_raw_fd(), Shutdown::Write);
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    #[tokio::test]
    async fn bytes_cross_in_both_directions_then_end_of_file() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a_reader, mut a_writer) = split(a).unwrap();
        let (mut b_reader, b_writer) = split(b).unwrap();

        a_writer.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        b_reader.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");

        drop(b_writer);
        let mut rest = Vec::new();
        a_reader.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "read {rest:?} after the peer shut down");
    }

    #[tokio::test]
    async fn a_write_larger_than_the_socket_buffer_waits_for_the_reader() {
        // Several megabytes cannot fit a socket buffer, so the writer must
        // block, register for room and resume as the reader drains.
        let (a, b) = UnixStream::pair().unwrap();
        let (_a_reader, mut a_writer) = split(a).unwrap();
        let (mut b_reader, _b_writer) = split(b).unwrap();
        let sent: Vec<u8> = (0..8 * 1024 * 1024).map(|i| (i % 251) as u8).collect();

        let expected = sent.clone();
        let reading = tokio::spawn(async move {
            let mut got = vec![0u8; expected.len()];
            b_reader.read_exact(&mut got).await.unwrap();
            assert!(got == expected, "the bytes changed in transit");
        });
        a_writer.write_all(&sent).await.unwrap();
        assert!(
            a_writer.blocked.is_none(),
            "still registered after the write"
        );
        reading.await.unwrap();
    }

    #[tokio::test]
    async fn vectored_writes_arrive_as_one_stream() {
        let (a, b) = UnixStream::pair().unwrap();
        let (_a_reader, mut a_writer) = split(a).unwrap();
        let (mut b_reader, _b_writer) = split(b).unwrap();
        let large = vec![5u8; 4 * 1024 * 1024];
        let expected: Vec<u8> = [&b"head"[..], &large, b"", b"tail"].concat();

        let reading = tokio::spawn(async move {
            let mut got = vec![0u8; expected.len()];
            b_reader.read_exact(&mut got).await.unwrap();
            assert!(
                got == expected,
                "the pieces arrived out of order or changed"
            );
        });
        let mut parts = [
            IoSlice::new(b"head"),
            IoSlice::new(&large),
            IoSlice::new(b""),
            IoSlice::new(b"tail"),
        ];
        a_writer.write_all_vectored(&mut parts).await.unwrap();
        reading.await.unwrap();
    }

    #[tokio::test]
    async fn writing_to_a_closed_peer_is_an_error_not_a_signal() {
        let (a, b) = UnixStream::pair().unwrap();
        let (_a_reader, mut a_writer) = split(a).unwrap();
        drop(b);
        let err = a_writer.write_all(b"anyone?").await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe, "{err}");
    }
}
