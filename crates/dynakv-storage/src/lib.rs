//! dynakv-storage: the local storage engines behind [`dynakv_core::Storage`].
//!
//! - [`MemoryStorage`]: ordered maps in memory; durability is ignored. For tests and
//!   `--storage memory`.
//! - [`FjallStorage`]: the default durable engine, an LSM-tree (fjall 3) with one keyspace per
//!   [`Table`]. Fsync'd writes from concurrent threads share fsyncs (group commit).
//! - `RedbStorage` (cargo feature `redb`): a copy-on-write B-tree (redb 4), kept for the
//!   conformance suite and the engine benchmark that chose fjall (docs/BENCHMARKS.md).
//! - [`BufferedStorage`]: an in-memory write buffer in front of an engine (paper 6.1): writes
//!   return once buffered, a writer drains and syncs them; the server puts it in front of fjall.
//! - [`FaultyStorage`]: wraps any engine and fails chosen operations on demand, so the error
//!   paths of the server can be tested.
//!
//! Every engine passes the conformance suite in `tests/conformance.rs`, which checks the
//! invariants written on the trait: ascending scans strictly after `start_after` and bounded by
//! `limit`, tables isolated, `Fsync` writes surviving a reopen, and agreement with a `BTreeMap`
//! reference model over random operation sequences.

mod buffered;
mod error;
mod faulty;
mod fjall_engine;
mod memory;
#[cfg(feature = "redb")]
mod redb_engine;
mod scan;

pub use buffered::{BufferedStorage, MAX_BUFFERED_BYTES};
pub use dynakv_core::storage::{
    DeleteError, Durability, EngineFailure, Entry, GetError, PutError, ScanError, Storage,
    SyncError, Table,
};
pub use error::OpenError;
pub use faulty::{FaultPoint, FaultSwitch, FaultyStorage};
pub use fjall_engine::{FjallOptions, FjallStorage};
pub use memory::MemoryStorage;
#[cfg(feature = "redb")]
pub use redb_engine::{RedbOptions, RedbStorage};

/// Longest key an engine accepts, in bytes. fjall stores key lengths in a `u16`; every engine
/// keeps the same limit so they all behave alike. Keys must also be non-empty: a `put` of an
/// empty or longer key fails with an [`EngineFailure`] (and writes nothing), a `get` of one
/// returns `None` and a `delete` of one succeeds, since such a key can never be stored.
pub const MAX_STORAGE_KEY_BYTES: usize = u16::MAX as usize;

/// Room left in a storage key for the encoding around a bucket and a key (length prefixes,
/// table tags).
const KEY_ENCODING_OVERHEAD_BYTES: usize = 64;

const _: () = assert!(
    dynakv_core::limits::MAX_BUCKET_BYTES
        + dynakv_core::limits::MAX_KEY_BYTES
        + KEY_ENCODING_OVERHEAD_BYTES
        <= MAX_STORAGE_KEY_BYTES
);

/// Whether `key` can be stored: non-empty and at most [`MAX_STORAGE_KEY_BYTES`] long.
pub fn is_storable_key(key: &[u8]) -> bool {
    !key.is_empty() && key.len() <= MAX_STORAGE_KEY_BYTES
}

/// The failure a `put` of an unstorable key reports.
pub(crate) fn unstorable_key(engine: &'static str, key: &[u8]) -> EngineFailure {
    EngineFailure {
        engine,
        message: format!(
            "cannot store a key of {} bytes: keys must be 1 to {MAX_STORAGE_KEY_BYTES} bytes",
            key.len()
        ),
    }
}

/// The position of a table in per-table arrays (`[_; Table::ALL.len()]`).
pub(crate) const fn table_index(table: Table) -> usize {
    match table {
        Table::Objects => 0,
        Table::BucketProps => 1,
        Table::Meta => 2,
        Table::Hints => 3,
        Table::AaeIndex => 4,
        Table::Tombstones => 5,
        Table::Index => 6,
        Table::Expiry => 7,
    }
}

/// Number of tables, the length of per-table arrays.
pub(crate) const TABLE_COUNT: usize = Table::ALL.len();

const _: () = {
    let mut i = 0;
    while i < TABLE_COUNT {
        assert!(table_index(Table::ALL[i]) == i);
        i += 1;
    }
};
