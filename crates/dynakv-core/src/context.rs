//! The opaque causal context handed to clients (`X-Riak-Vclock`).
//!
//! A context is a version vector, authenticated with a keyed BLAKE3 MAC over the bucket, the
//! key and the vector, under a secret every node of the cluster shares. A client can only send
//! back a context the cluster gave it for that very key: a truncated, corrupted, forged or
//! transplanted context is rejected (never treated as empty), because a context that claims to
//! have seen writes it never saw would silently overwrite them.
//!
//! Wire format: base64 (standard alphabet, padded) of
//! `version u8 = 1 | clock (see object::encode_clock) | mac [16 bytes]`.

use crate::codec::{DecodeError, Reader, Writer};
use crate::limits;
use crate::object::{decode_clock, encode_clock};
use crate::version::VersionVector;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use thiserror::Error;

const CONTEXT_VERSION: u8 = 1;
const MAC_BYTES: usize = 16;

/// The cluster-wide secret that authenticates contexts.
#[derive(Clone)]
pub struct ContextKey([u8; 32]);

impl std::fmt::Debug for ContextKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ContextKey(..)")
    }
}

impl ContextKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        ContextKey(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn mac(&self, bucket: &[u8], key: &[u8], clock_bytes: &[u8]) -> [u8; MAC_BYTES] {
        let mut hasher = blake3::Hasher::new_keyed(&self.0);
        hasher.update(b"dynakv-context-v1");
        hasher.update(&(bucket.len() as u64).to_le_bytes());
        hasher.update(bucket);
        hasher.update(&(key.len() as u64).to_le_bytes());
        hasher.update(key);
        hasher.update(clock_bytes);
        let mut out = [0u8; MAC_BYTES];
        out.copy_from_slice(&hasher.finalize().as_bytes()[..MAC_BYTES]);
        out
    }
}

/// Why a client's context was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ContextError {
    #[error("context is longer than {} bytes", limits::MAX_CONTEXT_BYTES)]
    TooLong,
    #[error("context is not valid base64")]
    NotBase64,
    #[error("context is malformed: {0}")]
    Malformed(DecodeError),
    #[error(
        "context was not issued by this cluster for this bucket and key (forged, corrupted or copied from another key)"
    )]
    NotAuthentic,
}

/// What the MAC of a context of `version` covers: an object context's clock only (version 1,
/// as it always has), a data type context's version byte too (so neither is taken for the
/// other).
fn covered(body: &[u8]) -> &[u8] {
    if body.first() == Some(&CONTEXT_VERSION) {
        &body[1..]
    } else {
        body
    }
}

/// `body` (its version byte first) with its MAC for `bucket`/`key`, in base64.
fn seal(secret: &ContextKey, bucket: &[u8], key: &[u8], mut body: Vec<u8>) -> String {
    let mac = secret.mac(bucket, key, covered(&body));
    body.extend_from_slice(&mac);
    STANDARD.encode(&body)
}

/// The body after the version byte of a context of `version` a client sent for
/// `bucket`/`key`, once its length, encoding, version and MAC are checked.
fn open(
    secret: &ContextKey,
    (bucket, key): (&[u8], &[u8]),
    text: &str,
    version: u8,
) -> Result<Vec<u8>, ContextError> {
    let text = text.trim();
    if text.len() > limits::MAX_CONTEXT_BYTES {
        return Err(ContextError::TooLong);
    }
    let bytes = STANDARD.decode(text).map_err(|_| ContextError::NotBase64)?;
    if bytes.len() < 1 + MAC_BYTES {
        return Err(ContextError::Malformed(DecodeError::Truncated));
    }
    let (body, mac) = bytes.split_at(bytes.len() - MAC_BYTES);
    if body[0] != version {
        return Err(ContextError::Malformed(DecodeError::UnknownVersion(
            body[0],
        )));
    }
    // Not constant-time: the MAC guards against mistakes and forged clocks, not timing attacks
    // by a client that can already write the key.
    if secret.mac(bucket, key, covered(body)) != mac {
        return Err(ContextError::NotAuthentic);
    }
    Ok(body[1..].to_vec())
}

/// Encode `clock` as the context for `bucket`/`key`.
pub fn encode(secret: &ContextKey, bucket: &[u8], key: &[u8], clock: &VersionVector) -> String {
    let mut w = Writer::with_capacity(16 + clock.len() * 20);
    w.u8(CONTEXT_VERSION);
    encode_clock(&mut w, clock);
    seal(secret, bucket, key, w.buf)
}

/// Decode and authenticate a context a client sent for `bucket`/`key`.
pub fn decode(
    secret: &ContextKey,
    bucket: &[u8],
    key: &[u8],
    text: &str,
) -> Result<VersionVector, ContextError> {
    let body = open(secret, (bucket, key), text, CONTEXT_VERSION)?;
    let mut r = Reader::new(&body);
    let clock = decode_clock(&mut r).map_err(ContextError::Malformed)?;
    r.finish().map_err(ContextError::Malformed)?;
    Ok(clock)
}

/// The version byte of a data type's context (a set's or a map's clock, see
/// `crdt::encode_context`), authenticated like an object's context.
const DATATYPE_CONTEXT_VERSION: u8 = 2;

/// Encode a data type's `clock` as the context for `bucket`/`key` (sets and maps give it with
/// a read; a removal needs it back).
pub fn encode_datatype(
    secret: &ContextKey,
    bucket: &[u8],
    key: &[u8],
    clock: &crate::crdt::SetContext,
) -> String {
    let mut w = Writer::with_capacity(16 + clock.len() * 12);
    w.u8(DATATYPE_CONTEXT_VERSION);
    crate::crdt::encode_context(&mut w, clock);
    seal(secret, bucket, key, w.buf)
}

/// Decode and authenticate a data type context a client sent for `bucket`/`key`.
pub fn decode_datatype(
    secret: &ContextKey,
    bucket: &[u8],
    key: &[u8],
    text: &str,
) -> Result<crate::crdt::SetContext, ContextError> {
    let body = open(secret, (bucket, key), text, DATATYPE_CONTEXT_VERSION)?;
    let mut r = Reader::new(&body);
    let clock = crate::crdt::decode_context(&mut r).map_err(ContextError::Malformed)?;
    r.finish().map_err(ContextError::Malformed)?;
    Ok(clock)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::ActorId;
    use proptest::prelude::*;

    fn secret() -> ContextKey {
        ContextKey::from_bytes([7u8; 32])
    }

    /// An object's context is not a data type's, nor the other way round, for the same key.
    #[test]
    fn object_and_data_type_contexts_are_not_interchangeable() {
        let mut clock = VersionVector::new();
        clock.observe(ActorId(1), 3, 10);
        let object = encode(&secret(), b"b", b"k", &clock);
        let set = encode_datatype(&secret(), b"b", b"k", &[(ActorId(1), 3)].into());
        assert!(decode_datatype(&secret(), b"b", b"k", &object).is_err());
        assert!(decode(&secret(), b"b", b"k", &set).is_err());
        assert!(decode_datatype(&secret(), b"b", b"k", &set).is_ok());
    }

    #[test]
    fn roundtrip_and_binding() {
        let mut clock = VersionVector::new();
        clock.observe(ActorId(1), 3, 10);
        clock.observe(ActorId(9), 1, 11);
        let text = encode(&secret(), b"b", b"k", &clock);
        assert_eq!(decode(&secret(), b"b", b"k", &text), Ok(clock.clone()));
        assert_eq!(
            decode(&secret(), b"b", b"other", &text),
            Err(ContextError::NotAuthentic)
        );
        let other_secret = ContextKey::from_bytes([8u8; 32]);
        assert_eq!(
            decode(&other_secret, b"b", b"k", &text),
            Err(ContextError::NotAuthentic)
        );
        assert_eq!(
            decode(&secret(), b"b", b"k", "!!!"),
            Err(ContextError::NotBase64)
        );
        assert!(matches!(
            decode(&secret(), b"b", b"k", "AAAA"),
            Err(ContextError::Malformed(_))
        ));
        let empty = encode(&secret(), b"b", b"k", &VersionVector::new());
        assert_eq!(
            decode(&secret(), b"b", b"k", &empty),
            Ok(VersionVector::new())
        );
    }

    proptest! {
        #[test]
        fn any_bit_flip_is_rejected(byte in 0usize..64, bit in 0u8..8) {
            let mut clock = VersionVector::new();
            clock.observe(ActorId(42), 5, 99);
            let text = encode(&secret(), b"b", b"k", &clock);
            let mut bytes = STANDARD.decode(&text).unwrap();
            let index = byte % bytes.len();
            bytes[index] ^= 1 << bit;
            let forged = STANDARD.encode(&bytes);
            prop_assert!(decode(&secret(), b"b", b"k", &forged).is_err());
        }

        #[test]
        fn random_text_never_panics_nor_passes(text in ".{0,200}") {
            prop_assert!(decode(&secret(), b"b", b"k", &text).is_err());
        }
    }
}
