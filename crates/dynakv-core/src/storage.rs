//! The `Storage` trait: the small, synchronous interface every local engine implements.
//!
//! An engine is an ordered map of byte keys to byte values, split into a few [`Table`]s so that
//! objects, bucket properties and node metadata never collide. Engines know nothing about
//! objects, clocks or buckets: the core encodes those (see `crate::keys` and `crate::object`).
//!
//! Invariants every engine keeps (checked by the conformance suite in `dynakv-storage`):
//! - a `put` that returned `Ok` with [`Durability::Fsync`] survives a crash of the process or
//!   the machine;
//! - a `put` with [`Durability::Buffered`] is visible to readers at once and becomes durable at
//!   the next successful [`Storage::sync`];
//! - `scan` returns keys in ascending byte order, starting strictly after `start_after`, and at
//!   most `limit` entries.

use thiserror::Error;

/// The separate keyspaces of a node's storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// Encoded objects (sibling sets with their causal context), keyed by `keys::object_key`.
    Objects,
    /// Bucket properties (JSON), keyed by bucket name.
    BucketProps,
    /// Node metadata: identity, cluster secret, membership.
    Meta,
    /// Hinted handoff: versions held for another node, keyed by `keys::hint_key`.
    Hints,
    /// Anti-entropy index: the hash of every stored object, keyed by its partition, Merkle
    /// leaf and object key (`keys::aae_index_key`), so the keys of one leaf are one short scan.
    AaeIndex,
    /// The object keys whose stored object is all tombstones (empty values), so reaping reads
    /// only deleted keys.
    Tombstones,
    /// Secondary index entries (`index::storage_key`: bucket, index, term, key; empty values),
    /// kept with every object write.
    Index,
    /// Objects whose every live value expires: `u64 BE expiry ms | object key` (empty values),
    /// kept with every object write, read by the expiry sweep.
    Expiry,
}

impl Table {
    /// Every table, in a fixed order.
    pub const ALL: [Table; 8] = [
        Table::Objects,
        Table::BucketProps,
        Table::Meta,
        Table::Hints,
        Table::AaeIndex,
        Table::Tombstones,
        Table::Index,
        Table::Expiry,
    ];

    /// A stable name for the table, used by engines as a file or partition name.
    pub fn name(self) -> &'static str {
        match self {
            Table::Objects => "objects",
            Table::BucketProps => "bucket_props",
            Table::Meta => "meta",
            Table::Hints => "hints",
            Table::AaeIndex => "aae_index",
            Table::Tombstones => "tombstones",
            Table::Index => "secondary_index",
            Table::Expiry => "expiry",
        }
    }
}

/// How durable a write must be before the call returns.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// The write is on stable storage (fsync'd) when `put`/`delete` returns.
    #[default]
    Fsync,
    /// The write is in the engine's buffers; a periodic [`Storage::sync`] makes it durable.
    Buffered,
}

/// An I/O or corruption failure inside an engine, with the engine's own message.
#[derive(Debug, Error)]
#[error("{engine} engine: {message}")]
pub struct EngineFailure {
    /// Which engine failed (`memory`, `fjall`, `redb`).
    pub engine: &'static str,
    /// What the engine reported.
    pub message: String,
}

/// Failure of [`Storage::get`].
#[derive(Debug, Error)]
pub enum GetError {
    #[error("read failed: {0}")]
    Engine(#[from] EngineFailure),
}

/// Failure of [`Storage::put`].
#[derive(Debug, Error)]
pub enum PutError {
    #[error("write failed: {0}")]
    Engine(#[from] EngineFailure),
    #[error("durable write failed (data may not be on disk): {0}")]
    Sync(EngineFailure),
}

/// Failure of [`Storage::delete`].
#[derive(Debug, Error)]
pub enum DeleteError {
    #[error("delete failed: {0}")]
    Engine(#[from] EngineFailure),
    #[error("durable delete failed (may not be on disk): {0}")]
    Sync(EngineFailure),
}

/// Failure of [`Storage::scan`].
#[derive(Debug, Error)]
pub enum ScanError {
    #[error("scan failed: {0}")]
    Engine(#[from] EngineFailure),
}

/// Failure of [`Storage::sync`].
#[derive(Debug, Error)]
pub enum SyncError {
    #[error("sync failed: {0}")]
    Engine(#[from] EngineFailure),
}

/// One key and its value, as returned by a scan.
pub type Entry = (Vec<u8>, Vec<u8>);

/// One write of [`Storage::write_batch`]: a value to store, or `None` to remove the key.
pub type BatchWrite<'a> = (Table, &'a [u8], Option<&'a [u8]>);

/// A local storage engine. Small and synchronous: the server calls it inline on its async
/// workers when [`Storage::may_wait_for_disk`] says the call cannot stall, else on its blocking
/// pool.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// The value stored under `key`, if any.
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, GetError>;

    /// Store `value` under `key`, replacing what was there.
    fn put(
        &self,
        table: Table,
        key: &[u8],
        value: &[u8],
        durability: Durability,
    ) -> Result<(), PutError>;

    /// Remove `key`; removing an absent key is not an error.
    fn delete(&self, table: Table, key: &[u8], durability: Durability) -> Result<(), DeleteError>;

    /// Up to `limit` entries whose keys start with `prefix`, in ascending key order, beginning
    /// strictly after `start_after` when it is given.
    fn scan(
        &self,
        table: Table,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>, ScanError>;

    /// Apply several puts and deletes as [`Durability::Buffered`] writes (durable at the next
    /// [`Storage::sync`]), in order. Engines with a cheaper multi-key write (one journal
    /// record) override the default, which applies them one by one. Not promised atomic: a
    /// crash may keep a prefix of them, and only a synced batch is durable.
    fn write_batch(&self, writes: &[BatchWrite<'_>]) -> Result<(), PutError> {
        for (table, key, value) in writes {
            match value {
                Some(value) => self.put(*table, key, value, Durability::Buffered)?,
                None => self
                    .delete(*table, key, Durability::Buffered)
                    .map_err(|e| match e {
                        DeleteError::Engine(f) | DeleteError::Sync(f) => PutError::Engine(f),
                    })?,
            }
        }
        Ok(())
    }

    /// Make every write accepted so far durable.
    fn sync(&self) -> Result<(), SyncError>;

    /// A short engine name for logs and stats.
    fn engine_name(&self) -> &'static str;

    /// Whether a call may wait on the disk: `durability` is `Some` for a write and `None` for
    /// a read. The server runs calls that may wait on its blocking pool and the others inline,
    /// which saves two thread hand-overs per request. The default is the safe answer, `true`.
    fn may_wait_for_disk(&self, durability: Option<Durability>) -> bool {
        let _ = durability;
        true
    }
}
