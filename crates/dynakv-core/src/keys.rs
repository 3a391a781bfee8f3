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
    #[error("bucket name contains the NUL character (reserved for bucket types)")]
    BucketHasNul,
}

/// Check a bucket name.
pub fn check_bucket(bucket: &[u8]) -> Result<(), NameError> {
    if bucket.is_empty() {
        return Err(NameError::EmptyBucket);
    }
    if bucket.len() > limits::MAX_BUCKET_BYTES {
        return Err(NameError::BucketTooLong);
    }
    // A bucket of a type other than default is stored as `NUL type NUL bucket`
    // (`bucket_types::internal_bucket`): no name a client gives may look like one.
    if bucket.contains(&0) {
        return Err(NameError::BucketHasNul);
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

/// The prefix of the anti-entropy index entries of one Merkle leaf of one partition:
/// `u32 partition | u16 leaf`, both big-endian, so a leaf's keys are contiguous and a
/// partition's leaves come in order.
pub fn aae_leaf_prefix(partition: u32, leaf: u16) -> [u8; 6] {
    let mut out = [0u8; 6];
    out[..4].copy_from_slice(&partition.to_be_bytes());
    out[4..].copy_from_slice(&leaf.to_be_bytes());
    out
}

/// The anti-entropy index key of an object: `aae_leaf_prefix(partition, leaf) | object_key`.
pub fn aae_index_key(partition: u32, leaf: u16, object_key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(6 + object_key.len());
    out.extend_from_slice(&aae_leaf_prefix(partition, leaf));
    out.extend_from_slice(object_key);
    out
}

/// Split an anti-entropy index key into (partition, leaf, object key).
pub fn split_aae_index_key(index_key: &[u8]) -> Option<(u32, u16, &[u8])> {
    let (partition, rest) = index_key.split_first_chunk::<4>()?;
    let (leaf, object_key) = rest.split_first_chunk::<2>()?;
    Some((
        u32::from_be_bytes(*partition),
        u16::from_be_bytes(*leaf),
        object_key,
    ))
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

    #[test]
    fn aae_index_keys_group_by_partition_then_leaf() {
        let k = object_key(b"b", b"k");
        let index = aae_index_key(7, 300, &k);
        assert!(index.starts_with(&aae_leaf_prefix(7, 300)));
        assert!(!index.starts_with(&aae_leaf_prefix(7, 301)));
        assert_eq!(split_aae_index_key(&index), Some((7, 300, &k[..])));
        assert_eq!(split_aae_index_key(&[0, 0, 0]), None);
        // Big-endian: leaf 1 of partition 1 sorts after every leaf of partition 0.
        assert!(aae_index_key(1, 1, &k) > aae_index_key(0, u16::MAX, &k));
        assert!(aae_index_key(1, 2, b"a") > aae_index_key(1, 1, b"z"));
    }
}
