//! Call payloads: bytes tagged with the encoding that produced them.
//!
//! Rust callers send bincode, which is compact and fast. The CLI and any
//! caller without Rust types send JSON. A plugin decodes either into its
//! handler's serde types and answers in the encoding it was asked in.
//!
//! A payload's bytes are a [`Bytes`]: when a large frame is decoded, the
//! payload inside it is a slice of the frame's own buffer rather than a
//! copy (see [`decode_sharing`]).

use std::cell::RefCell;

use bytes::Bytes;
use serde::de::{DeserializeOwned, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::codec;

/// How a payload's bytes were produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Encoding {
    /// [`crate::codec`]'s bincode configuration.
    Bincode,
    /// UTF-8 JSON text.
    Json,
}

/// A request or response body.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    pub encoding: Encoding,
    #[serde(with = "shared_bytes")]
    pub bytes: Bytes,
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Bodies can be megabytes; print the shape, not the contents.
        write!(
            f,
            "Payload({:?}, {} bytes)",
            self.encoding,
            self.bytes.len()
        )
    }
}

/// Why a payload could not be converted to or from a typed value.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Bincode(#[from] codec::CodecError),
}

impl Payload {
    /// Wraps bytes that are already JSON text.
    pub fn json(bytes: impl Into<Bytes>) -> Payload {
        Payload {
            encoding: Encoding::Json,
            bytes: bytes.into(),
        }
    }

    /// Encodes `value` in `encoding`.
    ///
    /// # Errors
    ///
    /// Fails if `value`'s `Serialize` implementation fails, or for JSON, if
    /// it produces something JSON cannot hold (such as a map with non-string
    /// keys).
    pub fn encode<T: Serialize + ?Sized>(
        encoding: Encoding,
        value: &T,
    ) -> Result<Payload, PayloadError> {
        let bytes = match encoding {
            Encoding::Bincode => codec::encode(value)?,
            Encoding::Json => serde_json::to_vec(value)?,
        };
        Ok(Payload {
            encoding,
            bytes: bytes.into(),
        })
    }

    /// Decodes the payload into `T`.
    ///
    /// # Errors
    ///
    /// Fails when the bytes are not a valid encoding of `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, PayloadError> {
        match self.encoding {
            Encoding::Bincode => Ok(codec::decode(&self.bytes)?),
            Encoding::Json => Ok(serde_json::from_slice(&self.bytes)?),
        }
    }
}

thread_local! {
    /// The frame being decoded by [`decode_sharing`] on this thread.
    static SHARED_FRAME: RefCell<Option<Bytes>> = const { RefCell::new(None) };
}

/// Runs `decode` on `frame` so that every payload it decodes borrows from
/// `frame`'s buffer instead of copying out of it.
///
/// The codec hands payload bytes to [`Payload`]'s deserializer as a slice of
/// its input. Serde has no way to pass the buffer that slice belongs to, so
/// it is lent through a thread-local for the duration of the call; a slice
/// from anywhere else is copied as usual.
pub(crate) fn decode_sharing<T>(frame: &Bytes, decode: impl FnOnce(&[u8]) -> T) -> T {
    struct Lent;
    impl Drop for Lent {
        fn drop(&mut self) {
            SHARED_FRAME.with_borrow_mut(|lent| *lent = None);
        }
    }
    SHARED_FRAME.with_borrow_mut(|lent| *lent = Some(frame.clone()));
    let _lent = Lent;
    decode(frame)
}

mod shared_bytes {
    use super::*;

    pub(super) fn serialize<S: Serializer>(
        bytes: &Bytes,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Bytes, D::Error> {
        deserializer.deserialize_bytes(BytesVisitor)
    }

    struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Bytes;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_borrowed_bytes<E>(self, bytes: &'de [u8]) -> Result<Bytes, E> {
            let shared = SHARED_FRAME.with_borrow(|frame| {
                let frame = frame.as_ref()?;
                let inside = frame.as_ptr_range();
                let slice = bytes.as_ptr_range();
                let within = inside.start <= slice.start && slice.end <= inside.end;
                within.then(|| frame.slice_ref(bytes))
            });
            Ok(shared.unwrap_or_else(|| Bytes::copy_from_slice(bytes)))
        }

        fn visit_bytes<E>(self, bytes: &[u8]) -> Result<Bytes, E> {
            Ok(Bytes::copy_from_slice(bytes))
        }

        fn visit_byte_buf<E>(self, bytes: Vec<u8>) -> Result<Bytes, E> {
            Ok(Bytes::from(bytes))
        }

        // Self-describing formats such as JSON write bytes as a sequence.
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
            let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(byte) = seq.next_element()? {
                bytes.push(byte);
            }
            Ok(Bytes::from(bytes))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_encodings_round_trip() {
        for encoding in [Encoding::Bincode, Encoding::Json] {
            let payload = Payload::encode(encoding, &("hi", 3u32)).unwrap();
            assert_eq!(payload.encoding, encoding);
            assert_eq!(
                payload.decode::<(String, u32)>().unwrap(),
                ("hi".to_owned(), 3)
            );
        }
    }

    #[test]
    fn payloads_decoded_while_sharing_borrow_the_frame() {
        let payload = Payload::encode(Encoding::Bincode, &vec![7u8; 100]).unwrap();
        let frame = Bytes::from(codec::encode(&payload).unwrap());
        let decoded: Payload = decode_sharing(&frame, codec::decode).unwrap();
        assert_eq!(decoded, payload);
        let inside = frame.as_ptr_range();
        assert!(
            inside.contains(&decoded.bytes.as_ptr()),
            "the payload was copied"
        );

        // Outside the call, nothing is lent: the same bytes are copied.
        let copied: Payload = codec::decode(&frame).unwrap();
        assert!(!inside.contains(&copied.bytes.as_ptr()));
        assert_eq!(copied, payload);
    }

    #[test]
    fn wrong_type_is_an_error() {
        let payload = Payload::json(b"{\"a\":1}".to_vec());
        let err = payload.decode::<String>().unwrap_err();
        assert!(err.to_string().starts_with("invalid JSON"), "{err}");
    }
}
