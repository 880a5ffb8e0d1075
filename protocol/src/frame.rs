//! Length-prefixed framing over a byte stream.
//!
//! A frame is a 4-byte little-endian length followed by that many bytes of
//! body. The reader checks the declared length against its limit before it
//! allocates anything, so a hostile header costs four bytes of reading and a
//! typed error. A frame that arrives in pieces is simply waited for; only
//! end-of-stream inside a frame is an error.

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, BufReader};

use crate::codec::{self, CodecError};
use crate::message::CarriesPayload;
use crate::payload;

/// The default largest frame body, in bytes (16 MiB).
pub const DEFAULT_MAX_FRAME: u32 = 16 * 1024 * 1024;

/// The size of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Bodies of at least this many bytes are read into a buffer of their own,
/// which the payloads decoded from them then share. Smaller ones are read
/// into one reused buffer and their payloads copied out, which costs less
/// than an allocation.
const SHARE_FROM: usize = 4 * 1024;

/// The largest body buffer kept for reuse: one outsized frame should not pin
/// its memory for the connection's whole life.
const KEEP_SPARE: usize = 1024 * 1024;

/// How much the reader asks the socket for at a time. Small enough that a
/// thousand idle plugins cost little, large enough that a burst of small
/// frames is read in one system call.
const READ_BUFFER: usize = 2 * 1024;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u64, max: u32 },
    #[error("stream ended inside a frame after {read} of {expected} bytes")]
    Truncated { read: usize, expected: usize },
    #[error("malformed frame: {0}")]
    Malformed(#[source] CodecError),
    #[error(transparent)]
    Encode(CodecError),
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads whole frames from a stream and decodes their bodies.
#[derive(Debug)]
pub struct FrameReader<R> {
    stream: BufReader<R>,
    /// The reused buffer for bodies smaller than [`SHARE_FROM`].
    body: Vec<u8>,
    /// The buffer of the last larger body, up to [`KEEP_SPARE`] bytes.
    spare: Option<Bytes>,
    max_frame: u32,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps `stream`; frames longer than `max_frame` bytes are refused.
    pub fn new(stream: R, max_frame: u32) -> Self {
        FrameReader {
            stream: BufReader::with_capacity(READ_BUFFER, stream),
            body: Vec::new(),
            spare: None,
            max_frame,
        }
    }

    /// Changes the frame limit, for instance after the handshake agreed one.
    pub fn set_max_frame(&mut self, max_frame: u32) {
        self.max_frame = max_frame;
    }

    /// Reads the next frame and decodes its body as `T`.
    ///
    /// Returns `Ok(None)` when the stream ends cleanly between frames. Not
    /// cancel-safe: dropping the future mid-frame loses the frame's start,
    /// so read from one task and do not race this against other futures.
    ///
    /// # Errors
    ///
    /// [`FrameError::TooLarge`] for a declared length over the limit (the
    /// body is not read, so the stream is unusable afterwards),
    /// [`FrameError::Truncated`] for end-of-stream inside a frame,
    /// [`FrameError::Malformed`] for a body that is not a `T`, and
    /// [`FrameError::Io`] for socket errors.
    pub async fn read<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        let Some(len) = self.read_header().await? else {
            return Ok(None);
        };
        if len > self.max_frame {
            return Err(FrameError::TooLarge {
                len: u64::from(len),
                max: self.max_frame,
            });
        }

        let len = len as usize;
        if len >= SHARE_FROM {
            return self.read_shared(len).await.map(Some);
        }
        if self.body.len() < len {
            self.body.resize(len, 0);
        }
        let body = &mut self.body[..len];
        let mut read = 0;
        while read < len {
            match self.stream.read(&mut body[read..]).await? {
                0 => {
                    return Err(FrameError::Truncated {
                        read,
                        expected: len,
                    });
                }
                n => read += n,
            }
        }
        codec::decode(body).map(Some).map_err(FrameError::Malformed)
    }

    /// Reads a large body into a buffer of its own, never zeroed, so that
    /// the payloads decoded from it are slices of it and not copies.
    async fn read_shared<T: DeserializeOwned>(&mut self, len: usize) -> Result<T, FrameError> {
        // The last large frame's buffer is free again once nothing decoded
        // from it is alive; reusing it spares the allocator a large block
        // (which glibc would hand back to the kernel and fault in again).
        let mut body = match self.spare.take().map(Bytes::try_into_mut) {
            Some(Ok(mut spare)) => {
                spare.clear();
                spare.reserve(len);
                spare
            }
            _ => BytesMut::with_capacity(len),
        };
        while body.len() < len {
            let missing = len - body.len();
            let mut rest = (&mut body).limit(missing);
            if self.stream.read_buf(&mut rest).await? == 0 {
                return Err(FrameError::Truncated {
                    read: body.len(),
                    expected: len,
                });
            }
        }
        let body = body.freeze();
        let decoded = payload::decode_sharing(&body, codec::decode);
        if body.len() <= KEEP_SPARE {
            self.spare = Some(body);
        }
        decoded.map_err(FrameError::Malformed)
    }

    async fn read_header(&mut self) -> Result<Option<u32>, FrameError> {
        let mut header = [0u8; HEADER_LEN];
        let mut read = 0;
        while read < HEADER_LEN {
            match self.stream.read(&mut header[read..]).await? {
                0 if read == 0 => return Ok(None),
                0 => {
                    return Err(FrameError::Truncated {
                        read,
                        expected: HEADER_LEN,
                    });
                }
                n => read += n,
            }
        }
        Ok(Some(u32::from_le_bytes(header)))
    }
}

/// Appends one frame holding `message` to `buf`.
///
/// # Errors
///
/// [`FrameError::TooLarge`] when the body would exceed `max_frame` bytes; `buf`
/// is then left as it was.
pub fn encode_frame<T: Serialize + ?Sized>(
    message: &T,
    max_frame: u32,
    buf: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let start = buf.len();
    buf.extend_from_slice(&[0; HEADER_LEN]);
    if let Err(err) = codec::encode_into(message, buf) {
        buf.truncate(start);
        return Err(FrameError::Encode(err));
    }

    let len = buf.len() - start - HEADER_LEN;
    write_header(buf, start, len, max_frame)
}

/// Writes the header of the frame that starts at `buf[start]` and holds
/// `len` bytes of body, or, when they exceed `max_frame`, removes the frame
/// from `buf` and says so.
fn write_header(
    buf: &mut Vec<u8>,
    start: usize,
    len: usize,
    max_frame: u32,
) -> Result<(), FrameError> {
    let fits = u32::try_from(len).ok().filter(|&len| len <= max_frame);
    let Some(len) = fits else {
        buf.truncate(start);
        return Err(FrameError::TooLarge {
            len: len as u64,
            max: max_frame,
        });
    };
    buf[start..start + HEADER_LEN].copy_from_slice(&len.to_le_bytes());
    Ok(())
}

/// Payloads smaller than this are copied into the frame like any field;
/// the extra write of a separate piece costs more than copying them.
pub const SPLICE_FROM: usize = 16 * 1024;

/// The pieces of a frame that follow the part [`encode_frame_around`] put in
/// the buffer: write the buffer, then `payload`, then `tail`.
#[derive(Debug)]
pub struct Around {
    pub payload: Bytes,
    pub tail: Vec<u8>,
}

/// Appends one frame holding `message` to `buf`, except that a payload of
/// at least [`SPLICE_FROM`] bytes is left where it is and returned with the
/// bytes that follow it, to be written after `buf` without being copied.
///
/// # Errors
///
/// As [`encode_frame`]; `buf` is then left as it was.
pub fn encode_frame_around<T: CarriesPayload>(
    message: &T,
    max_frame: u32,
    buf: &mut Vec<u8>,
) -> Result<Option<Around>, FrameError> {
    let large = message
        .payload()
        .filter(|payload| payload.bytes.len() >= SPLICE_FROM);
    let (Some(payload), Some(hollow)) = (large, large.and_then(|_| message.without_payload()))
    else {
        return encode_frame(message, max_frame, buf).map(|()| None);
    };

    // The hollow message encodes exactly like the real one but for the
    // payload: its byte string's length says zero and its bytes are absent.
    // Fix the length, move what follows the payload out, and count the
    // payload in the frame header.
    let start = buf.len();
    encode_frame(&hollow, u32::MAX, buf)?;
    let tail = buf.split_off(buf.len() - T::AFTER_PAYLOAD);
    let len = buf.len() - start - HEADER_LEN + payload.bytes.len() + tail.len();
    write_header(buf, start, len, max_frame)?;
    let payload_len = buf.len() - codec::BYTES_LEN_PREFIX;
    buf[payload_len..].copy_from_slice(&codec::bytes_len_prefix(payload.bytes.len()));
    Ok(Some(Around {
        payload: payload.bytes.clone(),
        tail,
    }))
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::message::{HostMessage, PluginMessage, Reply};

    fn frames(messages: &[HostMessage]) -> Vec<u8> {
        let mut buf = Vec::new();
        for message in messages {
            encode_frame(message, DEFAULT_MAX_FRAME, &mut buf).unwrap();
        }
        buf
    }

    #[tokio::test]
    async fn back_to_back_frames_then_clean_eof() {
        let sent = [HostMessage::Ping { nonce: 1 }, HostMessage::Shutdown];
        let bytes = frames(&sent);
        let mut reader = FrameReader::new(&bytes[..], DEFAULT_MAX_FRAME);
        assert_eq!(
            reader.read::<HostMessage>().await.unwrap(),
            Some(sent[0].clone())
        );
        assert_eq!(
            reader.read::<HostMessage>().await.unwrap(),
            Some(sent[1].clone())
        );
        assert!(reader.read::<HostMessage>().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_frame_arriving_byte_by_byte_is_waited_for() {
        let bytes = frames(&[HostMessage::Ping { nonce: 77 }]);
        let (mut tx, rx) = tokio::io::duplex(1);
        let writer = tokio::spawn(async move {
            for byte in bytes {
                tx.write_all(&[byte]).await.unwrap();
            }
        });
        let mut reader = FrameReader::new(rx, DEFAULT_MAX_FRAME);
        let got = reader.read::<HostMessage>().await.unwrap();
        assert_eq!(got, Some(HostMessage::Ping { nonce: 77 }));
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn eof_inside_header_and_body_is_truncation() {
        let bytes = frames(&[HostMessage::Ping { nonce: 1 }]);
        for cut in 1..bytes.len() {
            let mut reader = FrameReader::new(&bytes[..cut], DEFAULT_MAX_FRAME);
            let err = reader.read::<HostMessage>().await.unwrap_err();
            assert!(
                matches!(err, FrameError::Truncated { .. }),
                "cut {cut}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn large_frames_are_read_whole_or_reported_truncated() {
        let call = HostMessage::Call(crate::Call {
            id: 9,
            method: "bytes".to_owned(),
            payload: crate::Payload::json(vec![b'7'; 3 * SHARE_FROM]),
            timeout_ms: 1,
        });
        let bytes = frames(&[call.clone(), HostMessage::Shutdown]);
        let mut reader = FrameReader::new(&bytes[..], DEFAULT_MAX_FRAME);
        assert_eq!(reader.read::<HostMessage>().await.unwrap(), Some(call));
        assert_eq!(
            reader.read::<HostMessage>().await.unwrap(),
            Some(HostMessage::Shutdown),
            "the large frame's reader took bytes of the next frame"
        );

        let first_len = bytes.len() - frames(&[HostMessage::Shutdown]).len();
        for cut in [HEADER_LEN + 1, first_len / 2, first_len - 1] {
            let mut reader = FrameReader::new(&bytes[..cut], DEFAULT_MAX_FRAME);
            let err = reader.read::<HostMessage>().await.unwrap_err();
            assert!(
                matches!(err, FrameError::Truncated { read, .. } if read == cut - HEADER_LEN),
                "cut {cut}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn hostile_length_is_refused_before_allocating() {
        // Declares 4 GiB - 1 and sends nothing else.
        let bytes = u32::MAX.to_le_bytes();
        let mut reader = FrameReader::new(&bytes[..], DEFAULT_MAX_FRAME);
        let err = reader.read::<HostMessage>().await.unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len, .. } if len == u64::from(u32::MAX)));
        assert!(reader.body.capacity() == 0, "allocated for a refused frame");
    }

    #[tokio::test]
    async fn garbage_body_is_malformed() {
        let mut bytes = 3u32.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[0xff, 0xff, 0xff]);
        let mut reader = FrameReader::new(&bytes[..], DEFAULT_MAX_FRAME);
        let err = reader.read::<HostMessage>().await.unwrap_err();
        assert!(matches!(err, FrameError::Malformed(_)), "{err}");
    }

    #[test]
    fn frames_encoded_around_a_payload_equal_whole_frames() {
        let large = crate::Payload::json(vec![b'1'; SPLICE_FROM + 3]);
        let small = crate::Payload::json(vec![b'2'; 10]);
        let call = |payload: &crate::Payload| {
            HostMessage::Call(crate::Call {
                id: 77,
                method: "bytes".to_owned(),
                payload: payload.clone(),
                timeout_ms: 0x0102_0304_0506,
            })
        };
        let reply = |payload: &crate::Payload| {
            PluginMessage::Reply(Reply {
                id: 78,
                result: Ok(payload.clone()),
            })
        };
        let reassemble = |mut buf: Vec<u8>, around: Option<Around>| {
            if let Some(around) = around {
                buf.extend_from_slice(&around.payload);
                buf.extend_from_slice(&around.tail);
            }
            buf
        };
        for payload in [&large, &small] {
            let mut whole = Vec::new();
            encode_frame(&call(payload), DEFAULT_MAX_FRAME, &mut whole).unwrap();
            let mut buf = vec![9];
            let around = encode_frame_around(&call(payload), DEFAULT_MAX_FRAME, &mut buf).unwrap();
            assert_eq!(around.is_some(), payload.bytes.len() >= SPLICE_FROM);
            assert_eq!(reassemble(buf, around)[1..], whole[..]);

            let mut whole = Vec::new();
            encode_frame(&reply(payload), DEFAULT_MAX_FRAME, &mut whole).unwrap();
            let mut buf = Vec::new();
            let around = encode_frame_around(&reply(payload), DEFAULT_MAX_FRAME, &mut buf).unwrap();
            assert_eq!(reassemble(buf, around), whole);
        }

        let mut buf = vec![1, 2];
        let err = encode_frame_around(&reply(&large), 100, &mut buf).unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { max: 100, .. }),
            "{err}"
        );
        assert_eq!(buf, [1, 2], "buffer must be left as it was");
    }

    #[test]
    fn oversized_message_is_refused_when_encoding() {
        let mut buf = vec![1, 2, 3];
        let big = HostMessage::Reject {
            reason: "x".repeat(100),
        };
        let err = encode_frame(&big, 50, &mut buf).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { max: 50, .. }), "{err}");
        assert_eq!(buf, [1, 2, 3], "buffer must be left as it was");
    }
}
