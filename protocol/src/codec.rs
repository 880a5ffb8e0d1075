//! The one place that knows the body codec.
//!
//! Frame bodies are bincode 2 with a fixed configuration: little-endian,
//! fixed-width integers, no trailing bytes allowed. Keeping bincode behind
//! these two functions means the codec could be swapped by editing one file,
//! and that every decode goes through the same allocation guard.
//!
//! # The allocation guard
//!
//! bincode decodes a string or byte buffer by reading its declared length and
//! allocating that much before it reads the bytes. A hostile peer could
//! declare a 2^60-byte string inside a 20-byte frame. bincode's decode limit
//! stops that, but the limit is a type parameter, so [`decode`] picks the
//! smallest of a few fixed limits that is at least the input's length: no
//! allocation can exceed sixteen times the bytes actually received.

use bincode::config::{self, Configuration, Fixint, Limit, LittleEndian, NoLimit};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why a body could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("cannot encode message: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("cannot decode message: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    #[error("cannot decode message: {trailing} bytes left over after the message")]
    TrailingBytes { trailing: usize },
}

type Base = Configuration<LittleEndian, Fixint, NoLimit>;

const fn base() -> Base {
    config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
}

/// Appends the encoding of `value` to `buf`.
///
/// # Errors
///
/// Fails only if `value`'s `Serialize` implementation fails, which for the
/// protocol's own types it does not.
pub fn encode_into<T: Serialize + ?Sized>(value: &T, buf: &mut Vec<u8>) -> Result<(), CodecError> {
    bincode::serde::encode_into_std_write(value, buf, base())?;
    Ok(())
}

/// Encodes `value` into a new buffer.
///
/// # Errors
///
/// As [`encode_into`].
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut buf = Vec::new();
    encode_into(value, &mut buf)?;
    Ok(buf)
}

/// How many bytes precede a byte string's contents: its length.
pub(crate) const BYTES_LEN_PREFIX: usize = 8;

/// The length prefix of a byte string of `len` bytes, which a frame built
/// around a payload (see [`crate::frame::encode_frame_around`]) writes in
/// place of the prefix of an empty one.
pub(crate) fn bytes_len_prefix(len: usize) -> [u8; BYTES_LEN_PREFIX] {
    (len as u64).to_le_bytes()
}

/// Decodes one value that must fill `bytes` exactly.
///
/// # Errors
///
/// Returns [`CodecError::Decode`] for bytes that are not a valid encoding of
/// `T` (including declared lengths longer than the input) and
/// [`CodecError::TrailingBytes`] when the value ends before the input does.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    const KIB: usize = 1024;
    const MIB: usize = 1024 * KIB;
    match bytes.len() {
        n if n <= 64 * KIB => decode_limited::<T, { 64 * KIB }>(bytes),
        n if n <= MIB => decode_limited::<T, { 16 * MIB }>(bytes),
        n if n <= 16 * MIB => decode_limited::<T, { 256 * MIB }>(bytes),
        _ => decode_limited::<T, { u32::MAX as usize }>(bytes),
    }
}

fn decode_limited<T: DeserializeOwned, const LIMIT: usize>(bytes: &[u8]) -> Result<T, CodecError> {
    let config: Configuration<LittleEndian, Fixint, Limit<LIMIT>> = base().with_limit::<LIMIT>();
    let (value, read) = bincode::serde::decode_from_slice(bytes, config)?;
    if read != bytes.len() {
        return Err(CodecError::TrailingBytes {
            trailing: bytes.len() - read,
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_fixed_width_little_endian() {
        assert_eq!(encode(&0x0102_0304u32).unwrap(), [4, 3, 2, 1]);
        assert_eq!(encode(&"ab").unwrap(), [2, 0, 0, 0, 0, 0, 0, 0, b'a', b'b']);
    }

    #[test]
    fn byte_strings_are_their_length_prefix_then_their_bytes() {
        let encoded = encode(&serde_bytes::Bytes::new(b"abc")).unwrap();
        assert_eq!(encoded[..BYTES_LEN_PREFIX], bytes_len_prefix(3));
        assert_eq!(&encoded[BYTES_LEN_PREFIX..], b"abc");
    }

    #[test]
    fn hostile_string_length_is_an_error_not_an_allocation() {
        // A string that claims to be 2^62 bytes long, followed by nothing.
        let mut bytes = (1u64 << 62).to_le_bytes().to_vec();
        bytes.extend_from_slice(b"abc");
        let err = decode::<String>(&bytes).unwrap_err();
        assert!(matches!(err, CodecError::Decode(_)), "{err}");
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut bytes = encode(&7u8).unwrap();
        bytes.push(0);
        let err = decode::<u8>(&bytes).unwrap_err();
        assert!(
            matches!(err, CodecError::TrailingBytes { trailing: 1 }),
            "{err}"
        );
    }
}
