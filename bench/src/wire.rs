//! The protocol frames the floor speaks, read and written by hand.
//!
//! The floor is meant to cost what the operating system costs and nothing
//! more, so neither it nor the harness side that drives it builds protocol
//! values for calls: a call's fields are read straight out of the frame that
//! carried them, and a reply's bytes are written around the payload it echoes,
//! with no copy into an owned message. The layouts are the ones PROTOCOL.md
//! describes (little-endian fixed-width integers, `u32` enum tags, `u64`
//! lengths). The tests check each of them against `aurora-protocol`'s own
//! codec, so a change to the wire format fails here rather than skewing the
//! figures.
//!
//! The handshake is not handled here: it happens once per process, so both
//! sides use `aurora-protocol`'s encoder and decoder for it.

use std::fmt;
use std::io::{self, Read, Write};

/// The length of a frame's header, a `u32` giving the body's length.
pub const HEADER_LEN: usize = 4;

/// The variant index of `HostMessage::Call`.
pub const HOST_CALL: u32 = 2;

/// The variant index of `HostMessage::Cancel`.
pub const HOST_CANCEL: u32 = 3;

/// The variant index of `HostMessage::Ping`.
pub const HOST_PING: u32 = 4;

/// The variant index of `HostMessage::Shutdown`.
pub const HOST_SHUTDOWN: u32 = 5;

/// The variant index of `PluginMessage::Reply`.
pub const PLUGIN_REPLY: u32 = 1;

/// The variant index of `PluginMessage::Pong`.
pub const PLUGIN_PONG: u32 = 2;

/// The index of `Encoding::Bincode`, the encoding Rust callers send.
pub const ENCODING_BINCODE: u32 = 0;

/// The index of `ErrorKind::BadRequest`.
pub const ERROR_BAD_REQUEST: u32 = 1;

/// The index of `ErrorKind::DeadlineExceeded`.
pub const ERROR_DEADLINE_EXCEEDED: u32 = 4;

/// The tag of `Result::Ok` on the wire.
const RESULT_OK: u32 = 0;

/// The tag of `Result::Err` on the wire.
const RESULT_ERR: u32 = 1;

/// A frame body that does not hold the message it should.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed(&'static str);

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed frame: {}", self.0)
    }
}

impl std::error::Error for Malformed {}

impl From<Malformed> for io::Error {
    fn from(malformed: Malformed) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, malformed)
    }
}

/// A call as it lies in a frame body, borrowing its method and payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallView<'a> {
    pub id: u64,
    pub method: &'a [u8],
    /// The payload's `Encoding` index.
    pub encoding: u32,
    pub payload: &'a [u8],
    pub timeout_ms: u64,
}

/// A message from the supervisor, as the floor sees it after the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostFrame<'a> {
    Call(CallView<'a>),
    Cancel {
        id: u64,
    },
    Ping {
        nonce: u64,
    },
    Shutdown,
    /// `Welcome` or `Reject`, which only belong to the handshake.
    Handshake,
}

/// How a reply ended, borrowing its bytes from the frame body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyOutcome<'a> {
    Ok { encoding: u32, payload: &'a [u8] },
    Err { kind: u32, message: &'a [u8] },
}

/// A reply as it lies in a frame body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyView<'a> {
    pub id: u64,
    pub outcome: ReplyOutcome<'a>,
}

/// Reads one frame into `buf`, growing it when needed, and returns the body's
/// length; the body is `buf[..len]`. Returns `Ok(None)` at a clean end of
/// stream between frames.
///
/// # Errors
///
/// `InvalidData` when the declared length exceeds `max_frame` (checked before
/// anything is allocated), `UnexpectedEof` for a stream that ends inside a
/// frame, and any error of the underlying reader.
pub fn read_frame(
    input: &mut impl Read,
    max_frame: u32,
    buf: &mut Vec<u8>,
) -> io::Result<Option<usize>> {
    let mut header = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        match input.read(&mut header[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(read) => filled += read,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }

    let declared = u32::from_le_bytes(header);
    if declared > max_frame {
        let message = format!("frame of {declared} bytes exceeds the limit of {max_frame}");
        return Err(io::Error::new(io::ErrorKind::InvalidData, message));
    }
    let len = declared as usize;
    if buf.len() < len {
        buf.resize(len, 0);
    }
    input.read_exact(&mut buf[..len])?;
    Ok(Some(len))
}

/// Appends a whole `Call` frame to `out`.
///
/// # Panics
///
/// When the body would not fit the `u32` length of a frame header; callers
/// build calls from payloads of a few KiB.
pub fn append_call(out: &mut Vec<u8>, call: &CallView<'_>) {
    let body_len = 4 + 8 + 8 + call.method.len() + 4 + 8 + call.payload.len() + 8;
    let body_len = u32::try_from(body_len).expect("benchmark calls are far below 4 GiB");
    out.extend_from_slice(&body_len.to_le_bytes());
    out.extend_from_slice(&HOST_CALL.to_le_bytes());
    out.extend_from_slice(&call.id.to_le_bytes());
    out.extend_from_slice(&(call.method.len() as u64).to_le_bytes());
    out.extend_from_slice(call.method);
    out.extend_from_slice(&call.encoding.to_le_bytes());
    out.extend_from_slice(&(call.payload.len() as u64).to_le_bytes());
    out.extend_from_slice(call.payload);
    out.extend_from_slice(&call.timeout_ms.to_le_bytes());
}

/// Writes a successful `Reply` frame carrying `payload`.
///
/// # Errors
///
/// `InvalidInput` for a payload too large for a frame, and any error of
/// `out`.
pub fn write_reply_ok(
    out: &mut impl Write,
    id: u64,
    encoding: u32,
    payload: &[u8],
) -> io::Result<()> {
    let body_len = frame_len(4 + 8 + 4 + 4 + 8 + payload.len())?;
    out.write_all(&body_len.to_le_bytes())?;
    out.write_all(&PLUGIN_REPLY.to_le_bytes())?;
    out.write_all(&id.to_le_bytes())?;
    out.write_all(&RESULT_OK.to_le_bytes())?;
    out.write_all(&encoding.to_le_bytes())?;
    out.write_all(&(payload.len() as u64).to_le_bytes())?;
    out.write_all(payload)
}

/// Writes a failed `Reply` frame with an `ErrorKind` index and a message.
///
/// # Errors
///
/// As [`write_reply_ok`].
pub fn write_reply_err(out: &mut impl Write, id: u64, kind: u32, message: &str) -> io::Result<()> {
    let body_len = frame_len(4 + 8 + 4 + 4 + 8 + message.len())?;
    out.write_all(&body_len.to_le_bytes())?;
    out.write_all(&PLUGIN_REPLY.to_le_bytes())?;
    out.write_all(&id.to_le_bytes())?;
    out.write_all(&RESULT_ERR.to_le_bytes())?;
    out.write_all(&kind.to_le_bytes())?;
    out.write_all(&(message.len() as u64).to_le_bytes())?;
    out.write_all(message.as_bytes())
}

/// Writes a `Pong` frame answering the ping `nonce`.
///
/// # Errors
///
/// Any error of `out`.
pub fn write_pong(out: &mut impl Write, nonce: u64) -> io::Result<()> {
    const BODY_LEN: u32 = 4 + 8;
    out.write_all(&BODY_LEN.to_le_bytes())?;
    out.write_all(&PLUGIN_PONG.to_le_bytes())?;
    out.write_all(&nonce.to_le_bytes())
}

/// Reads a supervisor's message out of a frame body.
///
/// # Errors
///
/// [`Malformed`] for an unknown variant, a body that ends early, or bytes left
/// over after the message.
pub fn parse_host_frame(body: &[u8]) -> Result<HostFrame<'_>, Malformed> {
    let mut fields = Fields { rest: body };
    let frame = match fields.u32()? {
        HOST_CALL => HostFrame::Call(CallView {
            id: fields.u64()?,
            method: fields.bytes()?,
            encoding: fields.u32()?,
            payload: fields.bytes()?,
            timeout_ms: fields.u64()?,
        }),
        HOST_CANCEL => HostFrame::Cancel { id: fields.u64()? },
        HOST_PING => HostFrame::Ping {
            nonce: fields.u64()?,
        },
        HOST_SHUTDOWN => HostFrame::Shutdown,
        // Welcome and Reject: the caller treats them as out of place, so
        // their fields need not be read.
        0 | 1 => return Ok(HostFrame::Handshake),
        _ => return Err(Malformed("unknown host message")),
    };
    fields.finish()?;
    Ok(frame)
}

/// Reads a plugin's `Reply` out of a frame body.
///
/// # Errors
///
/// [`Malformed`] for any other message, an unknown result tag, a body that
/// ends early, or bytes left over after the reply.
pub fn parse_reply(body: &[u8]) -> Result<ReplyView<'_>, Malformed> {
    let mut fields = Fields { rest: body };
    if fields.u32()? != PLUGIN_REPLY {
        return Err(Malformed("expected a reply"));
    }
    let id = fields.u64()?;
    let outcome = match fields.u32()? {
        RESULT_OK => ReplyOutcome::Ok {
            encoding: fields.u32()?,
            payload: fields.bytes()?,
        },
        RESULT_ERR => ReplyOutcome::Err {
            kind: fields.u32()?,
            message: fields.bytes()?,
        },
        _ => return Err(Malformed("unknown result tag")),
    };
    fields.finish()?;
    Ok(ReplyView { id, outcome })
}

fn frame_len(body_len: usize) -> io::Result<u32> {
    u32::try_from(body_len).map_err(|_| {
        let message = format!("a body of {body_len} bytes does not fit a frame");
        io::Error::new(io::ErrorKind::InvalidInput, message)
    })
}

/// The unread part of a frame body, consumed field by field.
struct Fields<'a> {
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], Malformed> {
        if self.rest.len() < len {
            return Err(Malformed("body ends inside a field"));
        }
        let (field, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(field)
    }

    fn u32(&mut self) -> Result<u32, Malformed> {
        let field = self.take(4)?;
        Ok(u32::from_le_bytes(field.try_into().expect("took 4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, Malformed> {
        let field = self.take(8)?;
        Ok(u64::from_le_bytes(field.try_into().expect("took 8 bytes")))
    }

    /// A `u64` length followed by that many bytes, as strings and byte
    /// buffers are encoded.
    fn bytes(&mut self) -> Result<&'a [u8], Malformed> {
        let declared = self.u64()?;
        let len = usize::try_from(declared).map_err(|_| Malformed("length out of range"))?;
        self.take(len)
    }

    fn finish(self) -> Result<(), Malformed> {
        if !self.rest.is_empty() {
            return Err(Malformed("bytes left over after the message"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use aurora_protocol::codec::{decode, encode};
    use aurora_protocol::{
        Call, DEFAULT_MAX_FRAME, Encoding, ErrorKind, HostMessage, Payload, PluginMessage,
        RemoteError, Reply, encode_frame,
    };

    use super::*;

    fn body_of(frame: &[u8]) -> &[u8] {
        let declared = u32::from_le_bytes(frame[..HEADER_LEN].try_into().unwrap()) as usize;
        assert_eq!(declared, frame.len() - HEADER_LEN, "header counts the body");
        &frame[HEADER_LEN..]
    }

    #[test]
    fn a_hand_written_call_decodes_as_the_protocol_call() {
        let mut frame = Vec::new();
        append_call(
            &mut frame,
            &CallView {
                id: 9,
                method: b"bytes",
                encoding: ENCODING_BINCODE,
                payload: &[1, 2, 3],
                timeout_ms: 1500,
            },
        );
        let expected = HostMessage::Call(Call {
            id: 9,
            method: "bytes".into(),
            payload: Payload {
                encoding: Encoding::Bincode,
                bytes: vec![1, 2, 3].into(),
            },
            timeout_ms: 1500,
        });
        assert_eq!(decode::<HostMessage>(body_of(&frame)).unwrap(), expected);
    }

    #[test]
    fn protocol_host_messages_parse_by_hand() {
        let call = HostMessage::Call(Call {
            id: 5,
            method: "spin".into(),
            payload: Payload::json(b"12".to_vec()),
            timeout_ms: 30,
        });
        let body = encode(&call).unwrap();
        let HostFrame::Call(view) = parse_host_frame(&body).unwrap() else {
            panic!("a call parsed as something else");
        };
        assert_eq!(
            (
                view.id,
                view.method,
                view.encoding,
                view.payload,
                view.timeout_ms
            ),
            (5, &b"spin"[..], 1, &b"12"[..], 30)
        );

        let cases = [
            (HostMessage::Cancel { id: 4 }, HostFrame::Cancel { id: 4 }),
            (HostMessage::Ping { nonce: 8 }, HostFrame::Ping { nonce: 8 }),
            (HostMessage::Shutdown, HostFrame::Shutdown),
            (
                HostMessage::Reject {
                    reason: "no".into(),
                },
                HostFrame::Handshake,
            ),
        ];
        for (message, expected) in cases {
            let body = encode(&message).unwrap();
            assert_eq!(parse_host_frame(&body).unwrap(), expected, "{message:?}");
        }
    }

    #[test]
    fn hand_written_replies_and_pongs_decode_as_protocol_messages() {
        let mut frames = Vec::new();
        write_reply_ok(&mut frames, 3, ENCODING_BINCODE, b"abc").unwrap();
        let first_len = frames.len();
        write_reply_err(&mut frames, 4, ERROR_DEADLINE_EXCEEDED, "late").unwrap();
        let second_len = frames.len();
        write_pong(&mut frames, 77).unwrap();

        let ok = PluginMessage::Reply(Reply {
            id: 3,
            result: Ok(Payload {
                encoding: Encoding::Bincode,
                bytes: b"abc".to_vec().into(),
            }),
        });
        let err = PluginMessage::Reply(Reply {
            id: 4,
            result: Err(RemoteError {
                kind: ErrorKind::DeadlineExceeded,
                message: "late".into(),
            }),
        });
        let pong = PluginMessage::Pong { nonce: 77 };
        let decode_frame = |frame: &[u8]| decode::<PluginMessage>(body_of(frame)).unwrap();
        assert_eq!(decode_frame(&frames[..first_len]), ok);
        assert_eq!(decode_frame(&frames[first_len..second_len]), err);
        assert_eq!(decode_frame(&frames[second_len..]), pong);
    }

    #[test]
    fn protocol_replies_parse_by_hand() {
        let ok = PluginMessage::Reply(Reply {
            id: 11,
            result: Ok(Payload::json(b"\"x\"".to_vec())),
        });
        let body = encode(&ok).unwrap();
        let view = parse_reply(&body).unwrap();
        let expected = ReplyOutcome::Ok {
            encoding: 1,
            payload: b"\"x\"",
        };
        assert_eq!((view.id, view.outcome), (11, expected));

        let err = PluginMessage::Reply(Reply {
            id: 12,
            result: Err(RemoteError {
                kind: ErrorKind::BadRequest,
                message: "no".into(),
            }),
        });
        let body = encode(&err).unwrap();
        let view = parse_reply(&body).unwrap();
        let expected = ReplyOutcome::Err {
            kind: ERROR_BAD_REQUEST,
            message: b"no",
        };
        assert_eq!((view.id, view.outcome), (12, expected));
    }

    #[test]
    fn truncated_and_padded_bodies_are_malformed() {
        let body = encode(&HostMessage::Ping { nonce: 1 }).unwrap();
        for cut in 0..body.len() {
            assert!(parse_host_frame(&body[..cut]).is_err(), "cut at {cut}");
        }
        let mut padded = body.clone();
        padded.push(0);
        assert!(parse_host_frame(&padded).is_err());
        assert!(parse_host_frame(&[99, 0, 0, 0]).is_err());
        assert!(parse_reply(&body).is_err(), "a ping is not a reply");
    }

    #[test]
    fn hostile_lengths_are_refused_without_allocating() {
        // A call whose method claims 2^62 bytes.
        let mut body = HOST_CALL.to_le_bytes().to_vec();
        body.extend_from_slice(&1u64.to_le_bytes());
        body.extend_from_slice(&(1u64 << 62).to_le_bytes());
        assert!(parse_host_frame(&body).is_err());

        let mut buf = Vec::new();
        let header = u32::MAX.to_le_bytes();
        let err = read_frame(&mut &header[..], DEFAULT_MAX_FRAME, &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(buf.capacity(), 0, "allocated for a refused frame");
    }

    #[test]
    fn frames_are_read_back_to_back_then_end_cleanly_or_truncated() {
        let mut stream = Vec::new();
        encode_frame(
            &HostMessage::Ping { nonce: 1 },
            DEFAULT_MAX_FRAME,
            &mut stream,
        )
        .unwrap();
        encode_frame(&HostMessage::Shutdown, DEFAULT_MAX_FRAME, &mut stream).unwrap();

        let mut input = &stream[..];
        let mut buf = Vec::new();
        let len = read_frame(&mut input, DEFAULT_MAX_FRAME, &mut buf)
            .unwrap()
            .unwrap();
        assert_eq!(
            parse_host_frame(&buf[..len]),
            Ok(HostFrame::Ping { nonce: 1 })
        );
        let len = read_frame(&mut input, DEFAULT_MAX_FRAME, &mut buf)
            .unwrap()
            .unwrap();
        assert_eq!(parse_host_frame(&buf[..len]), Ok(HostFrame::Shutdown));
        assert!(
            read_frame(&mut input, DEFAULT_MAX_FRAME, &mut buf)
                .unwrap()
                .is_none()
        );

        for cut in 1..stream.len() {
            let mut input = &stream[..cut];
            let mut outcome = Ok(Some(0));
            while let Ok(Some(_)) = outcome {
                outcome = read_frame(&mut input, DEFAULT_MAX_FRAME, &mut buf);
            }
            if cut == 16 {
                // Exactly the first frame: a clean end between frames.
                assert!(outcome.unwrap().is_none());
                continue;
            }
            let err = outcome.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "cut at {cut}");
        }
    }
}
