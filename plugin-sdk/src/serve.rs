//! The plugin's side of a connection: handshake, dispatch, replies, shutdown.
//!
//! One current-thread runtime runs three kinds of task: the read loop (this
//! module's `read_loop`, which dispatches calls as they arrive), one task per
//! async call, and the writer, which batches every outgoing message into as
//! few writes as it can. Synchronous handlers run inside the read loop.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::io::IoSlice;
use std::os::fd::{FromRawFd, OwnedFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use aurora_protocol::channel::{self, ChannelReader, ChannelWriter};
use aurora_protocol::frame::Around;
use aurora_protocol::{
    CHANNEL_FD_ENV, DEFAULT_MAX_FRAME, ErrorKind, FrameError, FrameReader, Hello, HostMessage,
    LOG_LEVEL_ENV, PROTOCOL_VERSION, PluginMessage, RemoteError, Reply, SCHEMA_FINGERPRINT,
    encode_frame, encode_frame_around,
};
use tokio::sync::{mpsc, watch};
use tokio::task::LocalSet;

use crate::context::Context;
use crate::forward::{Forwarder, parse_level};
use crate::plugin::{Handler, HandlerResult, LocalFuture, Plugin};

/// How long the writer may take to flush what is queued at shutdown.
const FLUSH_AT_EXIT: Duration = Duration::from_secs(1);

/// Writes are gathered up to about this many bytes before one system call.
const WRITE_BATCH: usize = 64 * 1024;

/// Why a plugin stopped serving.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ServeError {
    #[error(
        "{CHANNEL_FD_ENV} is not set: this program is an Aurora plugin and is started by \
         the aurora supervisor (for example `aurora call PLUGIN METHOD`)"
    )]
    NotSupervised,
    #[error("{CHANNEL_FD_ENV}={0:?} is not a file descriptor number")]
    BadChannelFd(String),
    #[error("cannot use the channel socket: {0}")]
    Channel(#[source] std::io::Error),
    #[error("cannot start the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("supervisor refused the handshake: {0}")]
    Rejected(String),
    #[error("supervisor closed the socket during the handshake")]
    ClosedDuringHandshake,
    #[error("supervisor sent {0} where it should not")]
    Unexpected(&'static str),
    #[error("connection to the supervisor failed: {0}")]
    Frame(#[from] FrameError),
}

/// What the writer task is asked to do.
pub(crate) enum Outgoing {
    Message(PluginMessage),
    /// Write everything queued before this, then stop.
    Close,
}

/// State shared by the read loop and the call tasks.
struct Serving {
    methods: HashMap<String, Handler>,
    method_names: String,
    /// Cancellation signals of the async calls still running.
    in_flight: RefCell<HashMap<u64, watch::Sender<bool>>>,
    /// The cancellation signal of synchronous calls, which cannot be
    /// cancelled while they run.
    never_cancelled: watch::Sender<bool>,
    outgoing: mpsc::UnboundedSender<Outgoing>,
}

impl Serving {
    fn send(&self, message: PluginMessage) {
        // Fails only after the writer stopped, when nothing can be sent anyway.
        let _ = self.outgoing.send(Outgoing::Message(message));
    }

    fn reply(&self, id: u64, result: HandlerResult) {
        self.send(PluginMessage::Reply(Reply { id, result }));
    }
}

pub(crate) fn serve(plugin: Plugin) -> Result<(), ServeError> {
    let channel = take_channel_fd()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(ServeError::Runtime)?;
    LocalSet::new().block_on(&runtime, run_connection(plugin, channel))
}

/// Takes ownership of the socket the supervisor left at the announced fd.
fn take_channel_fd() -> Result<std::os::unix::net::UnixStream, ServeError> {
    let value = std::env::var(CHANNEL_FD_ENV).map_err(|_| ServeError::NotSupervised)?;
    let fd: i32 = value
        .parse()
        .map_err(|_| ServeError::BadChannelFd(value.clone()))?;
    let is_open = nix::fcntl::fcntl(
        // SAFETY: only borrowed for the duration of this fcntl call, which
        // merely reports whether the descriptor is open.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
        nix::fcntl::FcntlArg::F_GETFD,
    )
    .is_ok();
    if fd < 0 || !is_open {
        return Err(ServeError::BadChannelFd(value));
    }

    // SAFETY: the supervisor placed this process's end of the socket at `fd`
    // and nothing else in the process knows about it; we just checked that it
    // is open, and the variable is removed so it is taken only once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: called before any other thread exists (the runtime is built
    // after this), so nothing can read the environment concurrently.
    unsafe { std::env::remove_var(CHANNEL_FD_ENV) };

    // Programs this plugin starts must not inherit the channel: a grandchild
    // holding it open would hide the plugin's death from the supervisor.
    let flags = nix::fcntl::FdFlag::FD_CLOEXEC;
    nix::fcntl::fcntl(&owned, nix::fcntl::FcntlArg::F_SETFD(flags))
        .map_err(|errno| ServeError::Channel(errno.into()))?;

    let stream = std::os::unix::net::UnixStream::from(owned);
    Ok(stream)
}

async fn run_connection(
    plugin: Plugin,
    channel: std::os::unix::net::UnixStream,
) -> Result<(), ServeError> {
    let (read_half, write_half) = channel::split(channel).map_err(ServeError::Channel)?;
    let (outgoing, outgoing_rx) = mpsc::unbounded_channel();

    // The writer starts with the default limit; the supervisor's limit may be
    // lower, and the writer learns it from the Welcome below.
    let (limit_tx, limit_rx) = watch::channel(DEFAULT_MAX_FRAME);
    let writer = tokio::task::spawn_local(write_loop(write_half, outgoing_rx, limit_rx));

    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        schema: SCHEMA_FINGERPRINT,
        sdk: concat!("aurora-plugin-sdk/", env!("CARGO_PKG_VERSION")).to_owned(),
        name: plugin.name.clone(),
        version: plugin.version.clone(),
        pid: std::process::id(),
        methods: plugin.infos.clone(),
    };
    let _ = outgoing.send(Outgoing::Message(PluginMessage::Hello(hello)));

    let mut reader = FrameReader::new(read_half, DEFAULT_MAX_FRAME);
    match reader.read::<HostMessage>().await? {
        Some(HostMessage::Welcome(welcome)) => {
            reader.set_max_frame(welcome.max_frame);
            limit_tx.send_replace(welcome.max_frame);
        }
        Some(HostMessage::Reject { reason }) => return Err(ServeError::Rejected(reason)),
        Some(_) => return Err(ServeError::Unexpected("a message other than Welcome")),
        None => return Err(ServeError::ClosedDuringHandshake),
    }

    let level = parse_level(std::env::var(LOG_LEVEL_ENV).ok().as_deref());
    // A plugin that installed its own subscriber keeps it.
    let _ = tracing::subscriber::set_global_default(Forwarder::new(outgoing.clone(), level));

    let mut method_names: Vec<&str> = plugin.methods.keys().map(String::as_str).collect();
    method_names.sort_unstable();
    let serving = Rc::new(Serving {
        method_names: method_names.join(", "),
        methods: plugin.methods,
        in_flight: RefCell::new(HashMap::new()),
        never_cancelled: watch::Sender::new(false),
        outgoing,
    });

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(ServeError::Runtime)?;
    let outcome = tokio::select! {
        outcome = read_loop(&mut reader, &serving) => outcome,
        _ = sigterm.recv() => Ok(()),
    };

    // Whatever ended the loop, ask running handlers to stop and flush what
    // they and the loop already queued.
    for (_, cancel) in serving.in_flight.borrow_mut().drain() {
        cancel.send_replace(true);
    }
    let _ = serving.outgoing.send(Outgoing::Close);
    let _ = tokio::time::timeout(FLUSH_AT_EXIT, writer).await;
    outcome
}

async fn read_loop(
    reader: &mut FrameReader<ChannelReader>,
    serving: &Rc<Serving>,
) -> Result<(), ServeError> {
    loop {
        let Some(message) = reader.read::<HostMessage>().await? else {
            return Ok(());
        };
        match message {
            HostMessage::Call(call) => dispatch(serving, call),
            HostMessage::Cancel { id } => {
                if let Some(cancel) = serving.in_flight.borrow().get(&id) {
                    cancel.send_replace(true);
                }
            }
            HostMessage::Ping { nonce } => serving.send(PluginMessage::Pong { nonce }),
            HostMessage::Shutdown => return Ok(()),
            HostMessage::Welcome(_) | HostMessage::Reject { .. } => {
                return Err(ServeError::Unexpected(
                    "a handshake message after the handshake",
                ));
            }
        }
    }
}

fn dispatch(serving: &Rc<Serving>, call: aurora_protocol::Call) {
    let Some(handler) = serving.methods.get(&call.method) else {
        let message = format!(
            "no method named {:?}; this plugin serves: {}",
            call.method, serving.method_names
        );
        serving.reply(
            call.id,
            Err(RemoteError {
                kind: ErrorKind::UnknownMethod,
                message,
            }),
        );
        return;
    };

    let timeout = Duration::from_millis(call.timeout_ms);
    // A deadline too far away to represent is the same as none.
    let deadline = Instant::now()
        .checked_add(timeout)
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 24 * 3600));

    match handler {
        Handler::Sync(handler) => {
            // A synchronous handler holds the only thread until it returns,
            // so no Cancel can reach it: it shares one signal that never
            // fires instead of paying for a channel per call.
            let ctx = Context::new(call.id, deadline, serving.never_cancelled.subscribe());
            let result = catch_unwind(AssertUnwindSafe(|| handler(&ctx, &call.payload)))
                .unwrap_or_else(|panic| Err(panicked(panic)));
            serving.reply(call.id, result);
        }
        Handler::Async(handler) => {
            let (cancel, cancelled) = watch::channel(false);
            let ctx = Context::new(call.id, deadline, cancelled);
            serving.in_flight.borrow_mut().insert(call.id, cancel);
            let future = CatchUnwind(handler(ctx, &call.payload));
            let serving = Rc::clone(serving);
            tokio::task::spawn_local(async move {
                let result = future.await;
                serving.in_flight.borrow_mut().remove(&call.id);
                serving.reply(call.id, result);
            });
        }
    }
}

/// Turns a panic inside an async handler into a `Panicked` reply, so one bad
/// call does not take the plugin and every other call with it.
struct CatchUnwind(LocalFuture);

impl Future for CatchUnwind {
    type Output = HandlerResult;

    fn poll(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<HandlerResult> {
        let future = &mut self.0;
        match catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(cx))) {
            Ok(poll) => poll,
            Err(panic) => Poll::Ready(Err(panicked(panic))),
        }
    }
}

fn panicked(panic: Box<dyn std::any::Any + Send>) -> RemoteError {
    let detail = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic payload".to_owned());
    RemoteError {
        kind: ErrorKind::Panicked,
        message: detail,
    }
}

async fn write_loop(
    mut socket: ChannelWriter,
    mut outgoing: mpsc::UnboundedReceiver<Outgoing>,
    max_frame: watch::Receiver<u32>,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(8 * 1024);
    let mut closing = false;
    while !closing {
        let Some(first) = outgoing.recv().await else {
            break;
        };
        let limit = *max_frame.borrow();
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Outgoing::Message(message) => {
                    // A large payload goes out from where it lies, right
                    // after what was batched before it.
                    if let Some(around) = encode_or_refuse(&message, limit, &mut buf) {
                        let mut parts = [
                            IoSlice::new(&buf),
                            IoSlice::new(&around.payload),
                            IoSlice::new(&around.tail),
                        ];
                        socket.write_all_vectored(&mut parts).await?;
                        buf.clear();
                    }
                }
                Outgoing::Close => closing = true,
            }
            if buf.len() < WRITE_BATCH && !closing {
                next = outgoing.try_recv().ok();
            }
        }
        if !buf.is_empty() {
            socket.write_all(&buf).await?;
        }
        buf.clear();
    }
    Ok(())
}

/// Encodes `message`; a reply too large for a frame becomes an error reply,
/// so the caller learns why instead of waiting for its deadline.
fn encode_or_refuse(message: &PluginMessage, limit: u32, buf: &mut Vec<u8>) -> Option<Around> {
    let err = match encode_frame_around(message, limit, buf) {
        Ok(around) => return around,
        Err(err) => err,
    };
    let PluginMessage::Reply(reply) = message else {
        // Other messages are small and fixed in shape; a log record with a
        // megabyte field is dropped rather than breaking the connection.
        return None;
    };
    let refusal = PluginMessage::Reply(Reply {
        id: reply.id,
        result: Err(RemoteError {
            kind: ErrorKind::Failed,
            message: format!("response: {err}"),
        }),
    });
    let _ = encode_frame(&refusal, limit, buf);
    None
}
