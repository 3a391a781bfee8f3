//! How (bucket, key) pairs become storage keys, and checks on client-supplied names.
//!
//! Storage key layout: `bucket length (u16 big-endian) | bucket | key`. Big-endian length first
//! keeps every key of a bucket contiguous, so listing a bucket is a prefix scan.

use crate::limits;
use thiserror::Error;

/// Why a bucket or key name was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error("bucket name is empty")]
    EmptyBucket,
    #[error("bucket name is longer than {} bytes", limits::MAX_BUCKET_BYTES)]
    BucketTooLong,
    #[error("key is empty")]
    EmptyKey,
    #[error("key is longer than {} bytes", limits::MAX_KEY_BYTES)]
    KeyTooLong,
}

/// Check a bucket name.
pub fn check_bucket(bucket: &[u8]) -> Result<(), NameError> {
    if bucket.is_empty() {
        return Err(NameError::EmptyBucket);
    }
    if bucket.len() > limits::MAX_BUCKET_BYTES {
        return Err(NameError::BucketTooLong);
    }
    Ok(())
}

/// Check a key.
pub fn check_key(key: &[u8]) -> Result<(), NameError> {
    if key.is_empty() {
        return Err(NameError::EmptyKey);
    }
    if key.len() > limits::MAX_KEY_BYTES {
        return Err(NameError::KeyTooLong);
    }
    Ok(())
}

/// The storage key of an object.
pub fn object_key(bucket: &[u8], key: &[u8]) -> Vec<u8> {
    let mut out = bucket_prefix(bucket);
    out.extend_from_slice(key);
    out
}

/// The prefix shared by every object of a bucket.
pub fn bucket_prefix(bucket: &[u8]) -> Vec<u8> {
    let len = u16::try_from(bucket.len()).unwrap_or(u16::MAX);
    let mut out = Vec::with_capacity(2 + bucket.len() + 32);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bucket);
    out
}

/// Split a storage key into (bucket, key); `None` when it is not a well-formed object key.
pub fn split_object_key(storage_key: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = storage_key.split_first_chunk::<2>()?;
    let len = usize::from(u16::from_be_bytes(*len));
    if rest.len() < len {
        return None;
    }
    Some(rest.split_at(len))
}

/// The storage key of a hint: `u8 len(target) | target | object_key(bucket, key)`, so the
/// hints for one target are contiguous.
pub fn hint_key(target: &str, bucket: &[u8], key: &[u8]) -> Vec<u8> {
    let mut out = hint_prefix(target);
    out.extend_from_slice(&object_key(bucket, key));
    out
}

/// The prefix shared by every hint for `target` (names are at most 64 bytes).
pub fn hint_prefix(target: &str) -> Vec<u8> {
    let name = &target.as_bytes()[..target.len().min(usize::from(u8::MAX))];
    let mut out = Vec::with_capacity(1 + name.len() + 64);
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out
}

/// Split a hint key into (target, bucket, key).
pub fn split_hint_key(hint_key: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let (len, rest) = hint_key.split_first()?;
    let len = usize::from(*len);
    if rest.len() < len {
        return None;
    }
    let (target, object) = rest.split_at(len);
    let (bucket, key) = split_object_key(object)?;
    Some((target, bucket, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_prefix() {
        let k = object_key(b"users", b"alice");
        assert_eq!(split_object_key(&k), Some((&b"users"[..], &b"alice"[..])));
        assert!(k.starts_with(&bucket_prefix(b"users")));
        assert!(!object_key(b"usersX", b"a").starts_with(&bucket_prefix(b"users")));
        assert_eq!(split_object_key(&[0]), None);
        assert_eq!(split_object_key(&[0, 5, b'a']), None);
        assert_eq!(check_key(b""), Err(NameError::EmptyKey));
        assert_eq!(
            check_key(&vec![b'x'; limits::MAX_KEY_BYTES + 1]),
            Err(NameError::KeyTooLong)
        );
        assert_eq!(check_bucket(b""), Err(NameError::EmptyBucket));
        let h = hint_key("n2", b"b", b"k");
        assert!(h.starts_with(&hint_prefix("n2")));
        assert!(!h.starts_with(&hint_prefix("n")));
        assert_eq!(split_hint_key(&h), Some((&b"n2"[..], &b"b"[..], &b"k"[..])));
    }
}
