//! A tiny, bounds-checked binary codec (LEB128 varints, length-prefixed bytes) for the
//! versioned on-disk and on-wire encodings of objects and contexts.
//!
//! Invariant: a [`Reader`] never panics and never allocates more than the bytes it was given;
//! every length is checked against the remaining input before it is used.

use thiserror::Error;

/// Why a byte string could not be decoded.
#[derive(Debug, Error, PartialEq, Eq, Clone)]
pub enum DecodeError {
    #[error("input ends early")]
    Truncated,
    #[error("varint too long")]
    VarintOverflow,
    #[error("{0} exceeds its limit")]
    LimitExceeded(&'static str),
    #[error("unknown encoding version {0}")]
    UnknownVersion(u8),
    #[error("checksum mismatch")]
    Checksum,
    #[error("invalid utf-8 in {0}")]
    Utf8(&'static str),
    #[error("{0}")]
    Invalid(&'static str),
    #[error("{0} trailing bytes")]
    Trailing(usize),
}

/// Appends encoded values to a byte vector.
#[derive(Debug, Default)]
pub struct Writer {
    pub buf: Vec<u8>,
}

impl Writer {
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            buf: Vec::with_capacity(capacity),
        }
    }

    pub fn u8(&mut self, value: u8) {
        self.buf.push(value);
    }

    pub fn u64_fixed(&mut self, value: u64) {
        self.buf.extend_from_slice(&value.to_le_bytes());
    }

    pub fn varint(&mut self, mut value: u64) {
        loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                self.buf.push(byte);
                return;
            }
            self.buf.push(byte | 0x80);
        }
    }

    pub fn bytes(&mut self, value: &[u8]) {
        self.varint(value.len() as u64);
        self.buf.extend_from_slice(value);
    }
}

/// Reads encoded values from a byte slice, checking every bound.
#[derive(Debug)]
pub struct Reader<'a> {
    input: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(input: &'a [u8]) -> Self {
        Self { input }
    }

    pub fn remaining(&self) -> usize {
        self.input.len()
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        let (first, rest) = self.input.split_first().ok_or(DecodeError::Truncated)?;
        self.input = rest;
        Ok(*first)
    }

    pub fn take(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        if len > self.input.len() {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.input.split_at(len);
        self.input = rest;
        Ok(head)
    }

    pub fn u64_fixed(&mut self) -> Result<u64, DecodeError> {
        let bytes = self.take(8)?;
        let mut array = [0u8; 8];
        array.copy_from_slice(bytes);
        Ok(u64::from_le_bytes(array))
    }

    pub fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut value: u64 = 0;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            let low = u64::from(byte & 0x7f);
            if shift == 63 && low > 1 {
                return Err(DecodeError::VarintOverflow);
            }
            value |= low << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::VarintOverflow)
    }

    /// A count, checked against `limit`.
    pub fn count(&mut self, limit: usize, what: &'static str) -> Result<usize, DecodeError> {
        let value = self.varint()?;
        if value > limit as u64 {
            return Err(DecodeError::LimitExceeded(what));
        }
        Ok(value as usize)
    }

    /// Length-prefixed bytes, at most `limit` long.
    pub fn bytes(&mut self, limit: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = self.count(limit, what)?;
        self.take(len)
    }

    /// Length-prefixed UTF-8, at most `limit` bytes.
    pub fn string(&mut self, limit: usize, what: &'static str) -> Result<String, DecodeError> {
        let bytes = self.bytes(limit, what)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| DecodeError::Utf8(what))
    }

    /// Fails unless the whole input was consumed.
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.input.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Trailing(self.input.len()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn varint_roundtrip(v in any::<u64>()) {
            let mut w = Writer::default();
            w.varint(v);
            let mut r = Reader::new(&w.buf);
            prop_assert_eq!(r.varint().unwrap(), v);
            prop_assert!(r.finish().is_ok());
        }

        #[test]
        fn reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut r = Reader::new(&bytes);
            let _ = r.varint();
            let _ = r.bytes(16, "x");
            let _ = r.string(16, "y");
        }
    }
}
