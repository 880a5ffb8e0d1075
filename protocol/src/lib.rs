//! The Aurora wire protocol: every type that crosses a plugin's socket, the
//! framing around it, and the handshake rules.
//!
//! This crate is the only place that defines what a supervisor and a plugin
//! say to each other; the supervisor and the SDK convert to their own types at
//! the edge. `PROTOCOL.md` beside this crate describes the bytes for anyone
//! writing a plugin in another language.
//!
//! Layout:
//! - [`channel`]: the socket between a supervisor and a plugin, split into
//!   a reader and a writer;
//! - [`codec`]: the body encoding (bincode, hidden behind two functions);
//! - [`control`]: the daemon's control socket: the CLI's requests and the
//!   daemon's answers;
//! - [`frame`]: length-prefixed frames with a size limit;
//! - [`message`]: the messages and the handshake compatibility check;
//! - [`payload`]: call payloads tagged with their encoding.

pub mod channel;
pub mod codec;
pub mod control;
pub mod frame;
pub mod message;
pub mod payload;

pub use frame::{
    Around, DEFAULT_MAX_FRAME, FrameError, FrameReader, encode_frame, encode_frame_around,
};
pub use message::{
    Call, CarriesPayload, ErrorKind, HandshakeError, Hello, HostMessage, LogLevel, LogRecord,
    MethodInfo, PROTOCOL_VERSION, PluginMessage, ProtocolVersion, RemoteError, Reply,
    SCHEMA_FINGERPRINT, Welcome,
};
pub use payload::{Encoding, Payload, PayloadError};

/// The environment variable through which the supervisor tells a plugin which
/// file descriptor is its end of the socket.
pub const CHANNEL_FD_ENV: &str = "AURORA_CHANNEL_FD";

/// The file descriptor the supervisor places the plugin's socket at.
pub const CHANNEL_FD: i32 = 3;

/// The environment variable that carries the most verbose log level the
/// plugin should forward (`error`, `warn`, `info`, `debug` or `trace`).
pub const LOG_LEVEL_ENV: &str = "AURORA_LOG_LEVEL";
