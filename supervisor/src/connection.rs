//! The supervisor's side of one plugin connection: the handshake, a writer
//! that batches outgoing frames, a reader that routes replies, and the table
//! of calls in flight.
//!
//! A connection lives exactly as long as one plugin process. Callers register
//! a call under a fresh id and wait on a oneshot; the reader completes it when
//! the reply arrives. When the process dies, the plugin task closes the
//! connection with a [`Crash`] that every waiting caller receives, so nobody
//! is left waiting on a reply that cannot come.

use std::collections::{HashMap, HashSet};
use std::io::IoSlice;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use aurora_protocol::channel::{self, ChannelReader, ChannelWriter};
use aurora_protocol::{
    Call, FrameError, FrameReader, Hello, HostMessage, LogLevel, LogRecord, PROTOCOL_VERSION,
    Payload, PluginMessage, RemoteError, Reply, Welcome, encode_frame, encode_frame_around,
};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::error::Crash;

/// The reader's account of a socket that reached end-of-file between frames.
pub(crate) const CONNECTION_CLOSED: &str = "connection closed";

/// Writes are gathered up to about this many bytes before one system call.
const WRITE_BATCH: usize = 64 * 1024;

/// How a call ended, as delivered to its caller.
#[derive(Debug)]
pub(crate) enum Outcome {
    Replied(Result<Payload, RemoteError>),
    /// The process went away first.
    Lost(Crash),
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeFailure {
    #[error("plugin closed its socket before saying hello")]
    Closed,
    #[error("plugin's first message was not a hello")]
    NotHello,
    #[error("handshake refused: {0}")]
    Incompatible(#[from] aurora_protocol::HandshakeError),
    #[error("handshake failed: {0}")]
    Frame(#[from] FrameError),
    #[error("plugin reports version {reported:?} but its manifest declares {expected}")]
    WrongVersion {
        reported: String,
        expected: semver::Version,
    },
}

/// Hashing for call ids, which the supervisor itself hands out in sequence:
/// nothing a plugin controls can choose them, so the DoS-resistant default
/// hasher buys nothing on this, the hottest table of a call. One multiply
/// spreads sequential ids over the hash's high bits, which the table uses.
#[derive(Default, Clone, Copy)]
struct CallIds;

impl std::hash::BuildHasher for CallIds {
    type Hasher = CallIdHasher;

    fn build_hasher(&self) -> CallIdHasher {
        CallIdHasher(0)
    }
}

struct CallIdHasher(u64);

impl std::hash::Hasher for CallIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(byte)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = id.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// The calls in flight on a connection.
#[derive(Default)]
struct Calls {
    waiting: HashMap<u64, oneshot::Sender<Outcome>, CallIds>,
    /// Calls whose caller gave up; their plugin was sent `Cancel` and should
    /// answer soon. One still here after the grace period is stuck.
    abandoned: HashSet<u64, CallIds>,
    /// Set once the process is known to be gone; no call may be added after.
    closed: bool,
}

/// One live connection to one plugin process.
pub(crate) struct Connection {
    hello: Hello,
    outgoing: mpsc::UnboundedSender<HostMessage>,
    calls: Mutex<Calls>,
    next_id: AtomicU64,
    max_frame: u32,
    /// Tells the plugin task that a cancelled call did not stop in time.
    stuck: mpsc::UnboundedSender<String>,
    /// Woken whenever the last waiting call completes, so a generation being
    /// replaced knows when it has drained.
    drained: Notify,
}

/// The parts of a connection that only the plugin task watches.
pub(crate) struct ConnectionTasks {
    /// Resolves with the reason the reader stopped: end-of-file or a broken
    /// frame.
    pub(crate) closed: oneshot::Receiver<String>,
    /// The nonce of the latest `Pong`.
    pub(crate) pongs: watch::Receiver<u64>,
    /// Reasons to consider the plugin stuck.
    pub(crate) stuck: mpsc::UnboundedReceiver<String>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl ConnectionTasks {
    /// Stops the reader and writer at once.
    pub(crate) fn abort(&self) {
        self.reader.abort();
        self.writer.abort();
    }
}

impl Connection {
    /// Reads the plugin's hello from `channel`, answers it, and starts the
    /// reader and writer. A plugin whose hello reports a version other than
    /// `expected_version` (when given) is refused. The caller bounds this
    /// with the handshake timeout.
    pub(crate) async fn handshake(
        channel: std::os::unix::net::UnixStream,
        max_frame: u32,
        expected_version: Option<&semver::Version>,
    ) -> Result<(Arc<Connection>, ConnectionTasks), HandshakeFailure> {
        let (read_half, mut write_half) = channel::split(channel).map_err(FrameError::Io)?;
        let mut reader = FrameReader::new(read_half, max_frame);
        let hello = match reader.read::<PluginMessage>().await? {
            Some(PluginMessage::Hello(hello)) => hello,
            Some(_) => return Err(HandshakeFailure::NotHello),
            None => return Err(HandshakeFailure::Closed),
        };

        let verdict = hello
            .check_compatible()
            .map_err(HandshakeFailure::from)
            .and_then(|()| check_version(&hello.version, expected_version));
        let answer = match &verdict {
            Ok(()) => HostMessage::Welcome(Welcome {
                protocol: PROTOCOL_VERSION,
                max_frame,
            }),
            Err(err) => HostMessage::Reject {
                reason: err.to_string(),
            },
        };
        let mut buf = Vec::new();
        encode_frame(&answer, max_frame, &mut buf)?;
        write_half.write_all(&buf).await.map_err(FrameError::Io)?;
        verdict?;

        let (outgoing, outgoing_rx) = mpsc::unbounded_channel();
        let (stuck, stuck_rx) = mpsc::unbounded_channel();
        let connection = Arc::new(Connection {
            hello,
            outgoing,
            calls: Mutex::default(),
            next_id: AtomicU64::new(1),
            max_frame,
            stuck,
            drained: Notify::new(),
        });

        let (closed_tx, closed) = oneshot::channel();
        let (pongs_tx, pongs) = watch::channel(0);
        let reader_loop = read_loop(reader, Arc::clone(&connection), pongs_tx, closed_tx);
        let reader = tokio::spawn(reader_loop.in_current_span());
        let writer = tokio::spawn(write_loop(write_half, outgoing_rx, max_frame).in_current_span());
        let tasks = ConnectionTasks {
            closed,
            pongs,
            stuck: stuck_rx,
            reader,
            writer,
        };
        Ok((connection, tasks))
    }

    pub(crate) fn hello(&self) -> &Hello {
        &self.hello
    }

    pub(crate) fn serves(&self, method: &str) -> bool {
        self.hello.methods.iter().any(|m| m.name == method)
    }

    /// The plugin's methods, comma-separated, for error messages.
    pub(crate) fn method_list(&self) -> String {
        let names: Vec<&str> = self.hello.methods.iter().map(|m| m.name.as_str()).collect();
        names.join(", ")
    }

    fn lock_calls(&self) -> MutexGuard<'_, Calls> {
        // The lock is never held across anything that can panic, but a
        // poisoned table is still a consistent table.
        self.calls
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Sends a call. Returns its id and where its outcome will arrive, or
    /// gives the payload back when the connection is already closed.
    ///
    /// # Errors
    ///
    /// `Err(Ok(payload))` when the connection is closed (the caller should
    /// wait for the next process), `Err(Err(_))` when the request cannot fit
    /// in a frame.
    pub(crate) fn start_call(
        &self,
        method: &str,
        payload: Payload,
        timeout: Duration,
    ) -> Result<(u64, oneshot::Receiver<Outcome>), Result<Payload, FrameError>> {
        // The fixed part of a Call frame body: variant, id, two lengths, the
        // encoding tag and the timeout.
        const CALL_OVERHEAD: usize = 4 + 8 + 8 + 4 + 8 + 8;
        let len = CALL_OVERHEAD + method.len() + payload.bytes.len();
        if len > self.max_frame as usize {
            return Err(Err(FrameError::TooLarge {
                len: len as u64,
                max: self.max_frame,
            }));
        }

        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (done, outcome) = oneshot::channel();
        {
            let mut calls = self.lock_calls();
            if calls.closed {
                return Err(Ok(payload));
            }
            calls.waiting.insert(id, done);
        }
        let timeout_ms = u64::try_from(timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let call = Call {
            id,
            method: method.to_owned(),
            payload,
            timeout_ms,
        };
        // If the writer is gone the process is dying; the plugin task will
        // close the table and this call will receive the crash.
        let _ = self.outgoing.send(HostMessage::Call(call));
        Ok((id, outcome))
    }

    /// Gives up on call `id`: tells the plugin to cancel it and, unless the
    /// plugin answers within `grace`, reports the plugin as stuck.
    pub(crate) fn abandon(self: &Arc<Self>, id: u64, method: &str, grace: Duration) {
        {
            let mut calls = self.lock_calls();
            if calls.waiting.remove(&id).is_none() {
                return;
            }
            calls.abandoned.insert(id);
            if calls.waiting.is_empty() {
                self.drained.notify_waiters();
            }
        }
        let _ = self.outgoing.send(HostMessage::Cancel { id });

        let connection = Arc::clone(self);
        let reason = format!(
            "call {id} to {method} was cancelled and still had not finished {} later",
            humantime::format_duration(grace)
        );
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            if connection.lock_calls().abandoned.remove(&id) {
                let _ = connection.stuck.send(reason);
            }
        });
    }

    /// Waits until no accepted call is waiting for its reply. Calls whose
    /// caller gave up do not count: nobody waits for them.
    pub(crate) async fn drained(&self) {
        loop {
            let woken = self.drained.notified();
            tokio::pin!(woken);
            // Registered before the look, so a completion in between wakes it.
            woken.as_mut().enable();
            if self.lock_calls().waiting.is_empty() {
                return;
            }
            woken.await;
        }
    }

    pub(crate) fn send(&self, message: HostMessage) {
        let _ = self.outgoing.send(message);
    }

    /// Refuses new calls, so callers wait for the next process instead.
    pub(crate) fn stop_accepting(&self) {
        self.lock_calls().closed = true;
    }

    /// Fails every call still waiting with `crash`.
    pub(crate) fn close(&self, crash: &Crash) {
        let waiting = {
            let mut calls = self.lock_calls();
            calls.closed = true;
            calls.abandoned.clear();
            std::mem::take(&mut calls.waiting)
        };
        for (_, done) in waiting {
            let _ = done.send(Outcome::Lost(crash.clone()));
        }
    }

    fn complete(&self, reply: Reply) {
        let mut calls = self.lock_calls();
        match calls.waiting.remove(&reply.id) {
            Some(done) => {
                let now_empty = calls.waiting.is_empty();
                drop(calls);
                let _ = done.send(Outcome::Replied(reply.result));
                if now_empty {
                    self.drained.notify_waiters();
                }
            }
            // A late answer to a cancelled call: the plugin is not stuck.
            None => {
                calls.abandoned.remove(&reply.id);
            }
        }
    }
}

/// Whether a reported version is the expected one. Build metadata is
/// ignored, as semver says it does not distinguish versions.
fn check_version(
    reported: &str,
    expected: Option<&semver::Version>,
) -> Result<(), HandshakeFailure> {
    let Some(expected) = expected else {
        return Ok(());
    };
    let same = semver::Version::parse(reported).is_ok_and(|version| {
        let core = (version.major, version.minor, version.patch);
        core == (expected.major, expected.minor, expected.patch) && version.pre == expected.pre
    });
    if same {
        Ok(())
    } else {
        Err(HandshakeFailure::WrongVersion {
            reported: reported.to_owned(),
            expected: expected.clone(),
        })
    }
}

async fn read_loop(
    mut reader: FrameReader<ChannelReader>,
    connection: Arc<Connection>,
    pongs: watch::Sender<u64>,
    closed: oneshot::Sender<String>,
) {
    let cause = loop {
        match reader.read::<PluginMessage>().await {
            Ok(Some(PluginMessage::Reply(reply))) => connection.complete(reply),
            Ok(Some(PluginMessage::Pong { nonce })) => {
                pongs.send_replace(nonce);
            }
            Ok(Some(PluginMessage::Log(record))) => emit_plugin_log(record),
            Ok(Some(PluginMessage::Hello(_))) => {
                break "protocol violation: a second hello".to_owned();
            }
            Ok(None) => break CONNECTION_CLOSED.to_owned(),
            Err(err) => break err.to_string(),
        }
    };
    tracing::debug!(%cause, "plugin connection ended");
    let _ = closed.send(cause);
}

async fn write_loop(
    mut socket: ChannelWriter,
    mut outgoing: mpsc::UnboundedReceiver<HostMessage>,
    max_frame: u32,
) {
    // Grown on the first write and kept: an idle plugin costs no buffer.
    let mut buf = Vec::new();
    while let Some(first) = outgoing.recv().await {
        let mut next = Some(first);
        while let Some(message) = next.take() {
            match encode_frame_around(&message, max_frame, &mut buf) {
                Ok(None) => {}
                // A large payload goes out from where it lies, right after
                // what was batched before it.
                Ok(Some(around)) => {
                    let mut parts = [
                        IoSlice::new(&buf),
                        IoSlice::new(&around.payload),
                        IoSlice::new(&around.tail),
                    ];
                    if let Err(err) = socket.write_all_vectored(&mut parts).await {
                        tracing::debug!(%err, "cannot write to plugin");
                        return;
                    }
                    buf.clear();
                }
                // Calls are size-checked before they are queued, and every
                // other message is small: this is a bug, not bad input.
                Err(err) => {
                    tracing::error!(%err, "bug: a message the supervisor built does not fit a frame");
                }
            }
            if buf.len() < WRITE_BATCH {
                next = outgoing.try_recv().ok();
            }
        }
        if !buf.is_empty()
            && let Err(err) = socket.write_all(&buf).await
        {
            tracing::debug!(%err, "cannot write to plugin");
            return;
        }
        buf.clear();
    }
}

/// Re-emits a plugin's log record under the plugin's span.
fn emit_plugin_log(record: LogRecord) {
    let LogRecord {
        level,
        target,
        message,
        fields,
    } = record;
    let fields: String = fields.iter().map(|(k, v)| format!(" {k}={v}")).collect();
    let fields = fields.trim_start();
    match level {
        LogLevel::Error => {
            tracing::error!(source = "plugin", plugin_target = %target, fields, "{message}")
        }
        LogLevel::Warn => {
            tracing::warn!(source = "plugin", plugin_target = %target, fields, "{message}")
        }
        LogLevel::Info => {
            tracing::info!(source = "plugin", plugin_target = %target, fields, "{message}")
        }
        LogLevel::Debug => {
            tracing::debug!(source = "plugin", plugin_target = %target, fields, "{message}")
        }
        LogLevel::Trace => {
            tracing::trace!(source = "plugin", plugin_target = %target, fields, "{message}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_must_match_except_for_build_metadata() {
        let expected = semver::Version::parse("1.2.3-rc.1").unwrap();
        assert!(check_version("anything", None).is_ok());
        assert!(check_version("1.2.3-rc.1", Some(&expected)).is_ok());
        assert!(check_version("1.2.3-rc.1+build.7", Some(&expected)).is_ok());
        for reported in ["1.2.3", "1.2.4-rc.1", "one"] {
            let err = check_version(reported, Some(&expected)).unwrap_err();
            assert!(err.to_string().contains("1.2.3-rc.1"), "{err}");
        }
    }
}
