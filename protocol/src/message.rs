//! Every message that crosses a plugin's socket.
//!
//! The supervisor sends [`HostMessage`]s and the plugin sends
//! [`PluginMessage`]s. Each frame body is exactly one of these, encoded by
//! [`crate::codec`]. Every type here is a compatibility promise: changing a
//! field or reordering a variant changes the bytes on the wire, so it must
//! come with a new [`SCHEMA`] text (which changes [`SCHEMA_FINGERPRINT`]) and,
//! for a change old peers cannot survive, a new major [`PROTOCOL_VERSION`].
//! The golden-bytes tests at the bottom fail on any such change so that it
//! cannot happen by accident.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::payload::Payload;

/// The version of the wire protocol this crate speaks.
///
/// Two peers can talk when their major versions are equal; a minor version
/// only adds meaning that an older peer may ignore.
pub const PROTOCOL_VERSION: ProtocolVersion = ProtocolVersion { major: 1, minor: 0 };

/// A textual description of every wire type, in declaration order.
///
/// Its hash, [`SCHEMA_FINGERPRINT`], travels in [`Hello`], so a plugin built
/// against different message types is refused with a clear reason instead of
/// failing on its first call with an undecodable frame.
pub const SCHEMA: &str = "\
PluginMessage=Hello(Hello)|Reply(Reply)|Pong{nonce:u64}|Log(LogRecord);\
HostMessage=Welcome(Welcome)|Reject{reason:str}|Call(Call)|Cancel{id:u64}|Ping{nonce:u64}|Shutdown;\
ProtocolVersion{major:u16,minor:u16};\
Hello{protocol:ProtocolVersion,schema:u64,sdk:str,name:str,version:str,pid:u32,methods:[MethodInfo]};\
MethodInfo{name:str,request:str,response:str};\
Welcome{protocol:ProtocolVersion,max_frame:u32};\
Call{id:u64,method:str,payload:Payload,timeout_ms:u64};\
Reply{id:u64,result:Ok(Payload)|Err(RemoteError)};\
RemoteError{kind:ErrorKind,message:str};\
ErrorKind=UnknownMethod|BadRequest|Failed|Cancelled|DeadlineExceeded|Panicked;\
Payload{encoding:Encoding,bytes:bytes};Encoding=Bincode|Json;\
LogRecord{level:LogLevel,target:str,message:str,fields:[(str,str)]};\
LogLevel=Error|Warn|Info|Debug|Trace";

/// FNV-1a (64-bit) of [`SCHEMA`].
pub const SCHEMA_FINGERPRINT: u64 = fnv1a(SCHEMA.as_bytes());

pub(crate) const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

/// A protocol version: peers are compatible when `major` is equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtocolVersion {
    pub major: u16,
    pub minor: u16,
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// What a plugin sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PluginMessage {
    /// The first frame of every connection: who the plugin is.
    Hello(Hello),
    /// The answer to one [`Call`], matched by id.
    Reply(Reply),
    /// The answer to a [`HostMessage::Ping`], carrying its nonce.
    Pong { nonce: u64 },
    /// A log record emitted inside the plugin.
    Log(LogRecord),
}

/// What the supervisor sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HostMessage {
    /// The handshake succeeded; calls may follow.
    Welcome(Welcome),
    /// The handshake failed; the supervisor closes the socket after this.
    Reject { reason: String },
    /// Run a method.
    Call(Call),
    /// The caller gave up on call `id`; the plugin should stop working on it.
    /// A reply that still arrives for it is discarded.
    Cancel { id: u64 },
    /// A liveness probe; the plugin answers with a `Pong` of the same nonce.
    Ping { nonce: u64 },
    /// Finish or abandon the calls in flight and exit.
    Shutdown,
}

/// The plugin's introduction, sent as its first frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The protocol version the plugin speaks.
    pub protocol: ProtocolVersion,
    /// The [`SCHEMA_FINGERPRINT`] the plugin was built with.
    pub schema: u64,
    /// The SDK that built the plugin, as `name/version`.
    pub sdk: String,
    /// The plugin's own name.
    pub name: String,
    /// The plugin's version, a semver string.
    pub version: String,
    /// The plugin's process id, as it sees it.
    pub pid: u32,
    /// The methods the plugin serves.
    pub methods: Vec<MethodInfo>,
}

/// One method a plugin serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MethodInfo {
    pub name: String,
    /// The request type's name, for people reading `aurora status`.
    pub request: String,
    /// The response type's name.
    pub response: String,
}

/// The supervisor's acceptance of a [`Hello`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The protocol version the supervisor speaks.
    pub protocol: ProtocolVersion,
    /// The largest frame body the supervisor will send or accept.
    pub max_frame: u32,
}

/// A request to run `method`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Call {
    /// Unique among the calls in flight on this connection.
    pub id: u64,
    pub method: String,
    pub payload: Payload,
    /// How long the caller will wait, from when the call was sent. The
    /// deadline is relative because the two processes share no clock reading.
    pub timeout_ms: u64,
}

/// The outcome of one [`Call`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub id: u64,
    pub result: Result<Payload, RemoteError>,
}

/// A failure reported by the plugin itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteError {
    pub kind: ErrorKind,
    pub message: String,
}

impl fmt::Display for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

/// The broad reason a plugin gives for a failed call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The plugin serves no method of that name.
    UnknownMethod,
    /// The payload did not decode into the method's request type.
    BadRequest,
    /// The handler ran and returned an error.
    Failed,
    /// The handler stopped because the call was cancelled.
    Cancelled,
    /// The handler stopped because the call's deadline passed.
    DeadlineExceeded,
    /// The handler panicked; the plugin survived it.
    Panicked,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorKind::UnknownMethod => "unknown method",
            ErrorKind::BadRequest => "bad request",
            ErrorKind::Failed => "failed",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::DeadlineExceeded => "deadline exceeded",
            ErrorKind::Panicked => "handler panicked",
        })
    }
}

/// A log record forwarded from inside a plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    pub level: LogLevel,
    /// The module or target that emitted the record.
    pub target: String,
    pub message: String,
    /// Structured fields, each rendered as text.
    pub fields: Vec<(String, String)>,
}

/// A log record's severity, most severe first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

/// A message that may carry a large payload, which a writer can send from
/// where it lies instead of copying it into the frame (see
/// [`crate::frame::encode_frame_around`]).
pub trait CarriesPayload: Serialize + Sized {
    /// The payload, if this message carries one.
    fn payload(&self) -> Option<&Payload>;

    /// The same message with an empty payload in place of its own. Built
    /// only for large payloads, so a small call costs no copy of its method
    /// name.
    fn without_payload(&self) -> Option<Self>;

    /// How many bytes of the message's encoding follow the payload's bytes.
    const AFTER_PAYLOAD: usize;
}

/// `payload` with its bytes left out.
fn hollow(payload: &Payload) -> Payload {
    Payload {
        encoding: payload.encoding,
        bytes: bytes::Bytes::new(),
    }
}

impl CarriesPayload for HostMessage {
    fn payload(&self) -> Option<&Payload> {
        match self {
            HostMessage::Call(call) => Some(&call.payload),
            _ => None,
        }
    }

    fn without_payload(&self) -> Option<Self> {
        let HostMessage::Call(call) = self else {
            return None;
        };
        Some(HostMessage::Call(Call {
            id: call.id,
            method: call.method.clone(),
            payload: hollow(&call.payload),
            timeout_ms: call.timeout_ms,
        }))
    }

    /// `timeout_ms`.
    const AFTER_PAYLOAD: usize = 8;
}

impl CarriesPayload for PluginMessage {
    fn payload(&self) -> Option<&Payload> {
        match self {
            PluginMessage::Reply(Reply {
                result: Ok(payload),
                ..
            }) => Some(payload),
            _ => None,
        }
    }

    fn without_payload(&self) -> Option<Self> {
        let payload = self.payload()?;
        let PluginMessage::Reply(reply) = self else {
            return None;
        };
        Some(PluginMessage::Reply(Reply {
            id: reply.id,
            result: Ok(hollow(payload)),
        }))
    }

    /// The payload is the last field of a reply.
    const AFTER_PAYLOAD: usize = 0;
}

/// Why a [`Hello`] is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error(
        "plugin speaks protocol {plugin}, supervisor speaks {supervisor}: major versions differ"
    )]
    IncompatibleProtocol {
        plugin: ProtocolVersion,
        supervisor: ProtocolVersion,
    },
    #[error(
        "plugin was built with wire schema {plugin:016x}, supervisor with {supervisor:016x}: \
         rebuild the plugin against the same aurora-protocol"
    )]
    SchemaMismatch { plugin: u64, supervisor: u64 },
}

impl Hello {
    /// Checks that this plugin can talk to a peer built from this crate.
    ///
    /// # Errors
    ///
    /// Fails when the major protocol versions differ or, with equal versions,
    /// when the schema fingerprints differ.
    pub fn check_compatible(&self) -> Result<(), HandshakeError> {
        if self.protocol.major != PROTOCOL_VERSION.major {
            return Err(HandshakeError::IncompatibleProtocol {
                plugin: self.protocol,
                supervisor: PROTOCOL_VERSION,
            });
        }
        if self.schema != SCHEMA_FINGERPRINT {
            return Err(HandshakeError::SchemaMismatch {
                plugin: self.schema,
                supervisor: SCHEMA_FINGERPRINT,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};
    use crate::payload::Encoding;

    fn hello() -> Hello {
        Hello {
            protocol: PROTOCOL_VERSION,
            schema: SCHEMA_FINGERPRINT,
            sdk: "sdk/1".into(),
            name: "echo".into(),
            version: "1.2.3".into(),
            pid: 42,
            methods: vec![MethodInfo {
                name: "upper".into(),
                request: "String".into(),
                response: "String".into(),
            }],
        }
    }

    fn every_plugin_message() -> Vec<PluginMessage> {
        vec![
            PluginMessage::Hello(hello()),
            PluginMessage::Reply(Reply {
                id: 7,
                result: Ok(Payload::json(b"\"HI\"".to_vec())),
            }),
            PluginMessage::Reply(Reply {
                id: 8,
                result: Err(RemoteError {
                    kind: ErrorKind::Panicked,
                    message: "boom".into(),
                }),
            }),
            PluginMessage::Pong { nonce: 9 },
            PluginMessage::Log(LogRecord {
                level: LogLevel::Warn,
                target: "echo::upper".into(),
                message: "slow".into(),
                fields: vec![("ms".into(), "12".into())],
            }),
        ]
    }

    fn every_host_message() -> Vec<HostMessage> {
        vec![
            HostMessage::Welcome(Welcome {
                protocol: PROTOCOL_VERSION,
                max_frame: 1 << 24,
            }),
            HostMessage::Reject {
                reason: "no".into(),
            },
            HostMessage::Call(Call {
                id: 1,
                method: "upper".into(),
                payload: Payload {
                    encoding: Encoding::Bincode,
                    bytes: vec![1, 2, 3].into(),
                },
                timeout_ms: 5000,
            }),
            HostMessage::Cancel { id: 1 },
            HostMessage::Ping { nonce: 3 },
            HostMessage::Shutdown,
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for message in every_plugin_message() {
            let bytes = encode(&message).unwrap();
            assert_eq!(decode::<PluginMessage>(&bytes).unwrap(), message);
        }
        for message in every_host_message() {
            let bytes = encode(&message).unwrap();
            assert_eq!(decode::<HostMessage>(&bytes).unwrap(), message);
        }
    }

    #[test]
    fn every_truncation_of_every_message_is_an_error() {
        fn check<T: serde::Serialize + serde::de::DeserializeOwned>(messages: Vec<T>) {
            for message in messages {
                let bytes = encode(&message).unwrap();
                for cut in 0..bytes.len() {
                    assert!(
                        decode::<T>(&bytes[..cut]).is_err(),
                        "prefix {cut} of {bytes:?}"
                    );
                }
            }
        }
        check(every_plugin_message());
        check(every_host_message());
    }

    #[test]
    fn garbage_does_not_decode_or_panic() {
        // A deterministic spread of byte strings; none may panic, and an
        // unknown variant index must be rejected.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for len in 0..200 {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            let _ = decode::<PluginMessage>(&bytes);
            let _ = decode::<HostMessage>(&bytes);
        }
        assert!(decode::<HostMessage>(&[99, 0, 0, 0]).is_err());
    }

    /// Pins the byte layout documented in PROTOCOL.md. If this fails, the
    /// wire format changed: update SCHEMA, PROTOCOL.md and these bytes together.
    #[test]
    fn golden_bytes() {
        let ping = encode(&HostMessage::Ping { nonce: 0x0102 }).unwrap();
        assert_eq!(ping, [4, 0, 0, 0, 2, 1, 0, 0, 0, 0, 0, 0]);

        let call = encode(&HostMessage::Call(Call {
            id: 5,
            method: "up".into(),
            payload: Payload::json(b"1".to_vec()),
            timeout_ms: 1000,
        }))
        .unwrap();
        #[rustfmt::skip]
        let expected = [
            2, 0, 0, 0,                         // variant 2: Call
            5, 0, 0, 0, 0, 0, 0, 0,             // id
            2, 0, 0, 0, 0, 0, 0, 0, b'u', b'p', // method
            1, 0, 0, 0,                         // encoding 1: Json
            1, 0, 0, 0, 0, 0, 0, 0, b'1',       // payload bytes
            0xe8, 3, 0, 0, 0, 0, 0, 0,          // timeout_ms
        ];
        assert_eq!(call, expected);

        let reply = encode(&PluginMessage::Reply(Reply {
            id: 5,
            result: Err(RemoteError {
                kind: ErrorKind::Failed,
                message: "x".into(),
            }),
        }))
        .unwrap();
        #[rustfmt::skip]
        let expected = [
            1, 0, 0, 0,                 // variant 1: Reply
            5, 0, 0, 0, 0, 0, 0, 0,     // id
            1, 0, 0, 0,                 // Result variant 1: Err
            2, 0, 0, 0,                 // ErrorKind 2: Failed
            1, 0, 0, 0, 0, 0, 0, 0, b'x',
        ];
        assert_eq!(reply, expected);

        assert_eq!(SCHEMA_FINGERPRINT, fnv1a(SCHEMA.as_bytes()));
    }

    #[test]
    fn handshake_compatibility() {
        assert_eq!(hello().check_compatible(), Ok(()));

        let mut newer_minor = hello();
        newer_minor.protocol.minor += 1;
        assert_eq!(newer_minor.check_compatible(), Ok(()));

        let mut other_major = hello();
        other_major.protocol.major += 1;
        assert!(matches!(
            other_major.check_compatible(),
            Err(HandshakeError::IncompatibleProtocol { .. })
        ));

        let mut other_schema = hello();
        other_schema.schema ^= 1;
        let err = other_schema.check_compatible().unwrap_err();
        assert!(err.to_string().contains("rebuild the plugin"), "{err}");
    }
}
