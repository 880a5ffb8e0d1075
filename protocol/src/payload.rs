//! Call payloads: bytes tagged with the encoding that produced them.
//!
//! Rust callers send bincode, which is compact and fast. The CLI and any
//! caller without Rust types send JSON. A plugin decodes either into its
//! handler's serde types and answers in the encoding it was asked in.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

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
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
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
    pub fn json(bytes: Vec<u8>) -> Payload {
        Payload {
            encoding: Encoding::Json,
            bytes,
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
        Ok(Payload { encoding, bytes })
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
    fn wrong_type_is_an_error() {
        let payload = Payload::json(b"{\"a\":1}".to_vec());
        let err = payload.decode::<String>().unwrap_err();
        assert!(err.to_string().starts_with("invalid JSON"), "{err}");
    }
}
