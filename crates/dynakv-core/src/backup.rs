//! The backup format (issue 22): stored objects as they are, with their clocks, every
//! sibling and tombstones, so a restore merges them back causally (Riak's old backup kept
//! only one value per key, riak_kv#538).
//!
//! A backup file is a header, object records, and an end record:
//!
//! ```text
//! header:  "DYNAKVB1" | u16 format version | u16 len | cluster name | u32 partitions
//!          | u64 created (wall ms) | u32 crc32 of everything before it
//! object:  u8 1 | u16 len | bucket (internal name) | u16 len | key | u32 len | object
//!          (`Object::encode`) | u32 crc32 of the record before it
//! end:     u8 2 | u64 objects in the file | u32 crc32
//! ```
//!
//! All integers big-endian. A node's backup page and a restore request body are object
//! records alone, in the same encoding. Every length is bounded before anything is
//! allocated, every record's checksum is verified, and the object inside decodes with its
//! own checks (`Object::decode`), so a corrupt or hostile file is refused with the offset of
//! the first bad record, never half-read.

use crate::limits;
use crate::object::Object;
use std::io::Read;
use thiserror::Error;

/// The file's first bytes.
pub const MAGIC: &[u8; 8] = b"DYNAKVB1";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// The longest bucket name a record may hold (an internal name: `NUL type NUL bucket`).
pub const MAX_RECORD_BUCKET_BYTES: usize = 2 * limits::MAX_BUCKET_BYTES + 2;
/// The longest cluster name a header may hold.
pub const MAX_CLUSTER_NAME_BYTES: usize = 255;

const TAG_OBJECT: u8 = 1;
const TAG_END: u8 = 2;

/// Why a backup could not be read.
#[derive(Debug, Error)]
pub enum BackupError {
    #[error("not a dynakv backup (the file does not start with {MAGIC:?})")]
    NotABackup,
    #[error(
        "backup format version {0} is not supported (this build reads version {FORMAT_VERSION})"
    )]
    Version(u16),
    #[error("corrupt backup at byte {offset}: {what}")]
    Corrupt { offset: u64, what: String },
    #[error(
        "the backup ends early at byte {offset} (no end record): it was cut short or is corrupt"
    )]
    Truncated { offset: u64 },
    #[error("reading the backup: {0}")]
    Io(#[from] std::io::Error),
}

/// A backup file's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub cluster: String,
    pub partitions: u32,
    pub created_ms: u64,
}

impl Header {
    pub fn encode(&self) -> Vec<u8> {
        let name = &self.cluster.as_bytes()[..self.cluster.len().min(MAX_CLUSTER_NAME_BYTES)];
        let mut out = Vec::with_capacity(32 + name.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
        out.extend_from_slice(&u16::try_from(name.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(name);
        out.extend_from_slice(&self.partitions.to_be_bytes());
        out.extend_from_slice(&self.created_ms.to_be_bytes());
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }
}

/// One stored object of a backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The internal bucket name (`bucket_types::internal_bucket`).
    pub bucket: String,
    pub key: String,
    /// The object's encoding (`Object::encode`), checked by `Object::decode` when read.
    pub object: Vec<u8>,
}

/// The encoding of one object record (a file's, a backup page's, a restore body's).
/// `None` when a name or the object is longer than a record may hold.
pub fn encode_record(bucket: &str, key: &str, object: &[u8]) -> Option<Vec<u8>> {
    if bucket.len() > MAX_RECORD_BUCKET_BYTES
        || key.len() > limits::MAX_KEY_BYTES
        || object.len() > limits::MAX_OBJECT_BYTES
    {
        return None;
    }
    let mut out = Vec::with_capacity(13 + bucket.len() + key.len() + object.len());
    out.push(TAG_OBJECT);
    out.extend_from_slice(&u16::try_from(bucket.len()).ok()?.to_be_bytes());
    out.extend_from_slice(bucket.as_bytes());
    out.extend_from_slice(&u16::try_from(key.len()).ok()?.to_be_bytes());
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(&u32::try_from(object.len()).ok()?.to_be_bytes());
    out.extend_from_slice(object);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    Some(out)
}

/// The end record of a file holding `objects` records.
pub fn encode_end(objects: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(13);
    out.push(TAG_END);
    out.extend_from_slice(&objects.to_be_bytes());
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

/// Reads records from a file (after [`Reader::header`]) or a page (records only).
#[derive(Debug)]
pub struct Reader<R> {
    input: R,
    offset: u64,
    objects: u64,
    /// A file ends with an end record; a page or a restore body at the end of its input.
    expect_end: bool,
    ended: bool,
}

impl<R: Read> Reader<R> {
    /// A reader of a backup file: reads and checks its header.
    ///
    /// # Errors
    /// Not a backup, another format version, a corrupt header.
    pub fn file(input: R) -> Result<(Reader<R>, Header), BackupError> {
        let mut reader = Reader {
            input,
            offset: 0,
            objects: 0,
            expect_end: true,
            ended: false,
        };
        let mut fixed = [0u8; 12];
        if !reader.read_exact_or_eof(&mut fixed)? {
            return Err(BackupError::NotABackup);
        }
        if &fixed[..8] != MAGIC {
            return Err(BackupError::NotABackup);
        }
        let version = u16::from_be_bytes([fixed[8], fixed[9]]);
        if version != FORMAT_VERSION {
            return Err(BackupError::Version(version));
        }
        let name_len = usize::from(u16::from_be_bytes([fixed[10], fixed[11]]));
        if name_len > MAX_CLUSTER_NAME_BYTES {
            return Err(reader.corrupt("cluster name too long"));
        }
        let mut rest = vec![0u8; name_len + 16];
        reader.read_all(&mut rest)?;
        let mut whole = fixed.to_vec();
        whole.extend_from_slice(&rest[..name_len + 12]);
        let crc = u32::from_be_bytes(rest[name_len + 12..].try_into().unwrap_or_default());
        if crc32fast::hash(&whole) != crc {
            return Err(reader.corrupt("header checksum mismatch"));
        }
        let cluster = String::from_utf8(rest[..name_len].to_vec())
            .map_err(|_| reader.corrupt("cluster name is not UTF-8"))?;
        let partitions =
            u32::from_be_bytes(rest[name_len..name_len + 4].try_into().unwrap_or_default());
        let created_ms = u64::from_be_bytes(
            rest[name_len + 4..name_len + 12]
                .try_into()
                .unwrap_or_default(),
        );
        Ok((
            reader,
            Header {
                cluster,
                partitions,
                created_ms,
            },
        ))
    }

    /// A reader of records alone (a backup page, a restore request's body).
    pub fn records(input: R) -> Reader<R> {
        Reader {
            input,
            offset: 0,
            objects: 0,
            expect_end: false,
            ended: false,
        }
    }

    /// Bytes read so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The next object record; `None` at the end (a file's end record, checked against the
    /// records read; or the end of a page's input).
    ///
    /// # Errors
    /// A corrupt or cut-short input.
    pub fn next_record(&mut self) -> Result<Option<Record>, BackupError> {
        if self.ended {
            return Ok(None);
        }
        let start = self.offset;
        let mut tag = [0u8; 1];
        if !self.read_exact_or_eof(&mut tag)? {
            if self.expect_end {
                return Err(BackupError::Truncated { offset: start });
            }
            self.ended = true;
            return Ok(None);
        }
        match tag[0] {
            TAG_OBJECT => self.object_record(start).map(Some),
            TAG_END if self.expect_end => {
                let mut body = [0u8; 12];
                self.read_all(&mut body)?;
                let mut whole = vec![TAG_END];
                whole.extend_from_slice(&body[..8]);
                let crc = u32::from_be_bytes(body[8..].try_into().unwrap_or_default());
                if crc32fast::hash(&whole) != crc {
                    return Err(Self::corrupt_at(start, "end record checksum mismatch"));
                }
                let count = u64::from_be_bytes(body[..8].try_into().unwrap_or_default());
                if count != self.objects {
                    return Err(Self::corrupt_at(
                        start,
                        &format!(
                            "the end record counts {count} objects, {} were read",
                            self.objects
                        ),
                    ));
                }
                let mut extra = [0u8; 1];
                if self.read_exact_or_eof(&mut extra)? {
                    return Err(Self::corrupt_at(
                        self.offset - 1,
                        "bytes after the end record",
                    ));
                }
                self.ended = true;
                Ok(None)
            }
            other => Err(Self::corrupt_at(
                start,
                &format!("unknown record tag {other}"),
            )),
        }
    }

    fn object_record(&mut self, start: u64) -> Result<Record, BackupError> {
        let mut whole = vec![TAG_OBJECT];
        let bucket = self.field(&mut whole, 2, MAX_RECORD_BUCKET_BYTES, "bucket name")?;
        let key = self.field(&mut whole, 2, limits::MAX_KEY_BYTES, "key")?;
        let object = self.field(&mut whole, 4, limits::MAX_OBJECT_BYTES, "object")?;
        let mut crc = [0u8; 4];
        self.read_all(&mut crc)?;
        if crc32fast::hash(&whole) != u32::from_be_bytes(crc) {
            return Err(Self::corrupt_at(start, "record checksum mismatch"));
        }
        let text = |bytes: Vec<u8>, what: &str| {
            String::from_utf8(bytes)
                .map_err(|_| Self::corrupt_at(start, &format!("{what} is not UTF-8")))
        };
        let record = Record {
            bucket: text(bucket, "bucket name")?,
            key: text(key, "key")?,
            object,
        };
        if let Err(e) = Object::decode(&record.object) {
            return Err(Self::corrupt_at(
                start,
                &format!("object of {}: {e}", record.key),
            ));
        }
        self.objects = self.objects.saturating_add(1);
        Ok(record)
    }

    /// A length-prefixed field (`width` bytes of length, at most `max`), appended to `whole`.
    fn field(
        &mut self,
        whole: &mut Vec<u8>,
        width: usize,
        max: usize,
        what: &str,
    ) -> Result<Vec<u8>, BackupError> {
        let mut len = [0u8; 4];
        self.read_all(&mut len[4 - width..])?;
        whole.extend_from_slice(&len[4 - width..]);
        let len = usize::try_from(u32::from_be_bytes(len)).unwrap_or(usize::MAX);
        if len > max {
            return Err(self.corrupt(&format!("{what} of {len} bytes (at most {max})")));
        }
        let mut bytes = vec![0u8; len];
        self.read_all(&mut bytes)?;
        whole.extend_from_slice(&bytes);
        Ok(bytes)
    }

    fn corrupt(&self, what: &str) -> BackupError {
        Self::corrupt_at(self.offset, what)
    }

    fn corrupt_at(offset: u64, what: &str) -> BackupError {
        BackupError::Corrupt {
            offset,
            what: what.to_owned(),
        }
    }

    /// Fill `buf`; a clean end before its first byte is `false`, an end inside it is an
    /// error (cut short).
    fn read_exact_or_eof(&mut self, buf: &mut [u8]) -> Result<bool, BackupError> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.input.read(&mut buf[filled..]) {
                Ok(0) if filled == 0 => return Ok(false),
                Ok(0) => {
                    return Err(BackupError::Truncated {
                        offset: self.offset + filled as u64,
                    });
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.offset += buf.len() as u64;
        Ok(true)
    }

    fn read_all(&mut self, buf: &mut [u8]) -> Result<(), BackupError> {
        if buf.is_empty() || self.read_exact_or_eof(buf)? {
            Ok(())
        } else {
            Err(BackupError::Truncated {
                offset: self.offset,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::object::{Content, PrunePolicy};
    use crate::version::ActorId;

    fn object(values: &[&str], deleted: bool) -> Vec<u8> {
        let values: Vec<(&[u8], Option<u64>)> =
            values.iter().map(|v| (v.as_bytes(), None)).collect();
        let mut object = crate::test_support::siblings(&values);
        if deleted {
            object = object
                .update(
                    &object.clock().clone(),
                    Content::tombstone(2),
                    ActorId(9),
                    2,
                    PrunePolicy::default(),
                )
                .unwrap();
        }
        object.encode()
    }

    fn file(records: &[(&str, &str, Vec<u8>)]) -> Vec<u8> {
        let mut out = Header {
            cluster: "prod".into(),
            partitions: 64,
            created_ms: 7,
        }
        .encode();
        for (b, k, o) in records {
            out.extend(encode_record(b, k, o).unwrap());
        }
        out.extend(encode_end(records.len() as u64));
        out
    }

    #[test]
    fn a_file_round_trips_siblings_and_tombstones() {
        let records = vec![
            ("b", "two", object(&["x", "y"], false)),
            ("\0t\0b", "gone", object(&["z"], true)),
        ];
        let bytes = file(&records);
        let (mut reader, header) = Reader::file(bytes.as_slice()).unwrap();
        assert_eq!(
            (
                header.cluster.as_str(),
                header.partitions,
                header.created_ms
            ),
            ("prod", 64, 7)
        );
        for (b, k, o) in &records {
            let r = reader.next_record().unwrap().unwrap();
            assert_eq!((r.bucket.as_str(), r.key.as_str(), &r.object), (*b, *k, o));
        }
        assert!(reader.next_record().unwrap().is_none());
        assert_eq!(reader.offset(), bytes.len() as u64);
    }

    /// The attacker's file: every cut and every flipped byte is refused (never a panic, never
    /// a record that was not written), and lengths are bounded before allocation.
    #[test]
    fn cut_or_corrupt_files_are_refused() {
        let bytes = file(&[
            ("b", "k", object(&["v"], false)),
            ("b", "l", object(&["w"], false)),
        ]);
        let read_all = |bytes: &[u8]| -> Result<usize, BackupError> {
            let (mut reader, _) = Reader::file(bytes)?;
            let mut n = 0;
            while reader.next_record()?.is_some() {
                n += 1;
            }
            Ok(n)
        };
        assert_eq!(read_all(&bytes).unwrap(), 2);
        for cut in 0..bytes.len() {
            assert!(read_all(&bytes[..cut]).is_err(), "cut at {cut} accepted");
        }
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(read_all(&bad).is_err(), "flip at {i} accepted");
        }
        let mut huge = Header {
            cluster: String::new(),
            partitions: 1,
            created_ms: 0,
        }
        .encode();
        huge.extend_from_slice(&[TAG_OBJECT, 0, 1, b'b', 0, 1, b'k', 0xFF, 0xFF, 0xFF, 0xFF]);
        assert!(matches!(read_all(&huge), Err(BackupError::Corrupt { .. })));
        assert!(matches!(
            read_all(b"PK\x03\x04 a zip file"),
            Err(BackupError::NotABackup)
        ));
        let mut later = bytes.clone();
        later[9] = 2;
        assert!(matches!(read_all(&later), Err(BackupError::Version(2))));
        let mut extra = bytes;
        extra.push(0);
        assert!(read_all(&extra).is_err());
        assert!(encode_record("b", &"k".repeat(limits::MAX_KEY_BYTES + 1), &[]).is_none());
    }

    #[test]
    fn pages_are_records_alone() {
        let mut page = encode_record("b", "k", &object(&["v"], false)).unwrap();
        page.extend(encode_record("b", "l", &object(&["w"], false)).unwrap());
        let mut reader = Reader::records(page.as_slice());
        assert_eq!(reader.next_record().unwrap().unwrap().key, "k");
        assert_eq!(reader.next_record().unwrap().unwrap().key, "l");
        assert!(reader.next_record().unwrap().is_none());
        assert!(
            Reader::records(&page[..page.len() - 1])
                .next_record()
                .is_ok()
        );
        let mut cut = Reader::records(&page[..page.len() - 1]);
        cut.next_record().unwrap();
        assert!(cut.next_record().is_err());
    }
}
