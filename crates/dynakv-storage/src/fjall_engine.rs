//! [`FjallStorage`]: the default durable engine, on fjall 3 (an LSM-tree with a write-ahead
//! journal).
//!
//! Layout: one fjall `Database` in the data directory, one fjall `Keyspace` per [`Table`], named
//! by [`Table::name`].
//!
//! Durability: every write goes to fjall's journal and is flushed to the operating system before
//! the call returns (it survives a crash of the process). A [`Durability::Fsync`] write is then
//! fsync'd (`PersistMode::SyncAll`) before returning, so it also survives a crash of the machine;
//! a [`Durability::Buffered`] write becomes durable at the next [`Storage::sync`].
//!
//! Group commit: fjall's journal is one file, so one fsync makes every write before it durable.
//! Each write takes a ticket after it is in the journal; a thread that needs durability returns
//! at once if an fsync already covered its ticket, else takes the sync lock (handed over fairly)
//! and fsyncs only if no fsync it waited behind covered it. Concurrent fsync'd writers therefore
//! share fsyncs instead of queueing one fsync each.
//!
//! Memory is bounded by configuration, not by data: the block cache ([`FjallOptions`]
//! `cache_size_bytes`) plus the write buffers (`max_memtable_size_bytes` per table).
//!
//! A failed fsync poisons the fjall database: every later write fails with an
//! [`EngineFailure`]; the server then stops the node and starts it again, which recovers from
//! the journal (`dynakv_server::supervise`).

use std::fmt;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use dynakv_core::storage::{
    BatchWrite, DeleteError, Durability, EngineFailure, Entry, GetError, PutError, ScanError,
    Storage, SyncError, Table,
};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use parking_lot::{Mutex, MutexGuard};

use crate::error::{OpenError, failure};
use crate::scan::{initial_capacity, scan_range};
use crate::{TABLE_COUNT, is_storable_key, table_index, unstorable_key};

const ENGINE: &str = "fjall";

const MIB: u64 = 1024 * 1024;

/// Smallest journal budget fjall accepts (it panics below this).
const MIN_JOURNALING_SIZE_BYTES: u64 = 64 * MIB;
/// Smallest write buffer accepted per table.
const MIN_MEMTABLE_SIZE_BYTES: u64 = MIB;

/// Tuning of [`FjallStorage`]. The defaults suit a node with a few GiB of memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FjallOptions {
    /// Block cache shared by all tables, in bytes (default 64 MiB). Reads of data not in the
    /// write buffers go through it; it is the main bound on the engine's memory.
    pub cache_size_bytes: u64,
    /// Largest write buffer (memtable) of one table before it is flushed to a sorted file, in
    /// bytes (default 64 MiB, at least 1 MiB). Flushing one makes fjall hold the table's
    /// version lock across two fsyncs, which stalls its readers: fewer, larger flushes stall
    /// them less often (16 MiB stalled a 3-node benchmark's nodes every 1-2 s).
    pub max_memtable_size_bytes: u64,
    /// Journal bytes kept before fjall forces write buffers to disk so old journals can be
    /// deleted (default 512 MiB, at least 64 MiB). Bounds disk use and recovery time.
    pub max_journaling_size_bytes: u64,
    /// Background flush and compaction threads; `None` lets fjall choose (`min(cores, 4)`).
    pub worker_threads: Option<usize>,
}

impl Default for FjallOptions {
    fn default() -> Self {
        Self {
            cache_size_bytes: 64 * MIB,
            max_memtable_size_bytes: 64 * MIB,
            max_journaling_size_bytes: 512 * MIB,
            worker_threads: None,
        }
    }
}

impl FjallOptions {
    fn validate(&self) -> Result<(), OpenError> {
        if self.max_memtable_size_bytes < MIN_MEMTABLE_SIZE_BYTES {
            return Err(OpenError::InvalidOptions(format!(
                "max_memtable_size_bytes must be at least {MIN_MEMTABLE_SIZE_BYTES}, got {}",
                self.max_memtable_size_bytes
            )));
        }
        if self.max_journaling_size_bytes < MIN_JOURNALING_SIZE_BYTES {
            return Err(OpenError::InvalidOptions(format!(
                "max_journaling_size_bytes must be at least {MIN_JOURNALING_SIZE_BYTES}, got {}",
                self.max_journaling_size_bytes
            )));
        }
        if self.worker_threads == Some(0) {
            return Err(OpenError::InvalidOptions(
                "worker_threads must be at least 1".to_owned(),
            ));
        }
        Ok(())
    }
}

/// Counts writes and remembers how many of them an fsync has covered (see the module doc).
#[derive(Debug, Default)]
struct GroupCommit {
    /// Writes that are in the journal (flushed to the OS). A write's ticket is this count just
    /// after it.
    written: AtomicU64,
    /// The largest ticket known to be on stable storage, readable without the lock (a writer
    /// whose ticket an fsync already covered returns without queueing).
    durable: AtomicU64,
    /// Taken to fsync; held for the whole fsync so that one runs at a time and the writers
    /// that queue behind it find their ticket covered when it ends.
    sync_lock: Mutex<()>,
}

/// The durable engine on fjall 3. Cheap to share behind an `Arc`; all methods take `&self` and
/// are safe to call from many threads.
pub struct FjallStorage {
    database: Database,
    /// One per table, indexed by `table_index` (so `TABLE_COUNT` long).
    keyspaces: Box<[Keyspace]>,
    group_commit: GroupCommit,
    path: PathBuf,
    options: FjallOptions,
}

impl fmt::Debug for FjallStorage {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("FjallStorage")
            .field("path", &self.path)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Why fjall could not open the data directory: damage it will find again at every start
/// (failed checksums, undecodable blocks or journal batches, files cut short) is
/// [`OpenError::Corrupt`]; fjall's `Unrecoverable`, which stands for a damaged file as well as
/// a stray file in its directories (its log says which), [`OpenError::Unrecoverable`]; the
/// rest (I/O, a lock held by another process) [`OpenError::Engine`].
fn open_failure(error: fjall::Error) -> OpenError {
    use fjall::{JournalRecoveryError as Journal, LsmError};
    let cut_short = |e: &std::io::Error| {
        matches!(
            e.kind(),
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData
        )
    };
    let corrupt = match &error {
        fjall::Error::Storage(
            LsmError::ChecksumMismatch { .. }
            | LsmError::InvalidTag(_)
            | LsmError::InvalidTrailer
            | LsmError::InvalidHeader(_)
            | LsmError::Decompress(_)
            | LsmError::Utf8(_),
        )
        | fjall::Error::JournalRecovery(
            Journal::ChecksumMismatch | Journal::InsufficientLength | Journal::TooManyItems,
        )
        | fjall::Error::InvalidTrailer
        | fjall::Error::InvalidTag(_)
        | fjall::Error::Decompress(_) => true,
        fjall::Error::Io(e) | fjall::Error::Storage(LsmError::Io(e)) => cut_short(e),
        _ => false,
    };
    let unrecoverable = matches!(
        &error,
        fjall::Error::Unrecoverable | fjall::Error::Storage(LsmError::Unrecoverable)
    );
    let failure = failure(ENGINE, error);
    if corrupt {
        OpenError::Corrupt(failure)
    } else if unrecoverable {
        OpenError::Unrecoverable(failure)
    } else {
        OpenError::Engine(failure)
    }
}

impl FjallStorage {
    /// Opens the engine in `dir`, creating the directory and the tables if needed and recovering
    /// the journal otherwise. Fails if another process holds the directory.
    pub fn open(dir: &Path, options: FjallOptions) -> Result<Self, OpenError> {
        options.validate()?;
        std::fs::create_dir_all(dir).map_err(|source| OpenError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;

        let mut builder = Database::builder(dir)
            .cache_size(options.cache_size_bytes)
            .max_journaling_size(options.max_journaling_size_bytes);
        if let Some(threads) = options.worker_threads {
            builder = builder.worker_threads(threads);
        }
        let database = builder.open().map_err(open_failure)?;

        let memtable_bytes = options.max_memtable_size_bytes;
        let open_keyspace = |table: Table| {
            database
                .keyspace(table.name(), || {
                    KeyspaceCreateOptions::default().max_memtable_size(memtable_bytes)
                })
                .map_err(open_failure)
        };
        // Indexed by `table_index`, which follows the order of `Table::ALL`.
        let keyspaces = Table::ALL
            .into_iter()
            .map(open_keyspace)
            .collect::<Result<Box<[Keyspace]>, _>>()?;
        debug_assert_eq!(keyspaces.len(), TABLE_COUNT);
        tracing::debug!(path = %dir.display(), ?options, "opened fjall storage");

        Ok(Self {
            database,
            keyspaces,
            group_commit: GroupCommit::default(),
            path: dir.to_path_buf(),
            options,
        })
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of the journal and the live tables, as fjall accounts them. Files of tables that a
    /// compaction replaced stay on disk (uncounted here) until a later flush or compaction
    /// collects their version, or the next open; `du` can show up to about 3x this figure
    /// right after a write burst.
    pub fn disk_space_bytes(&self) -> Result<u64, EngineFailure> {
        self.database
            .disk_space()
            .map_err(|error| failure(ENGINE, error))
    }

    fn keyspace(&self, table: Table) -> &Keyspace {
        &self.keyspaces[table_index(table)]
    }

    /// Records a write that is now in the journal and returns its ticket.
    fn written(&self) -> u64 {
        self.group_commit.written.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Returns once every write up to `ticket` is on stable storage, fsyncing unless a
    /// concurrent fsync already covered it.
    fn sync_through(&self, ticket: u64) -> Result<(), EngineFailure> {
        let group = &self.group_commit;
        if group.durable.load(Ordering::Acquire) >= ticket {
            return Ok(());
        }
        let guard = group.sync_lock.lock();
        if group.durable.load(Ordering::Acquire) >= ticket {
            // Covered by the fsync we queued behind. Hand the lock straight to the next waiter:
            // an unfair lock lets one writer barge ahead repeatedly and starves the others.
            MutexGuard::unlock_fair(guard);
            return Ok(());
        }
        // Every ticket up to `covered` was taken after its write reached the journal, so this
        // fsync covers it.
        let covered = group.written.load(Ordering::Acquire);
        let persisted = self.database.persist(PersistMode::SyncAll);
        if persisted.is_ok() {
            group.durable.fetch_max(covered, Ordering::AcqRel);
        }
        MutexGuard::unlock_fair(guard);
        persisted.map_err(|error| {
            tracing::error!(
                path = %self.path.display(),
                %error,
                "fjall fsync failed; writes are refused until the node restarts"
            );
            failure(ENGINE, error)
        })
    }
}

impl Storage for FjallStorage {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, GetError> {
        if !is_storable_key(key) {
            return Ok(None);
        }
        let value = self
            .keyspace(table)
            .get(key)
            .map_err(|error| failure(ENGINE, error))?;
        Ok(value.map(|value| value.to_vec()))
    }

    fn put(
        &self,
        table: Table,
        key: &[u8],
        value: &[u8],
        durability: Durability,
    ) -> Result<(), PutError> {
        if !is_storable_key(key) {
            return Err(unstorable_key(ENGINE, key).into());
        }
        self.keyspace(table)
            .insert(key, value)
            .map_err(|error| failure(ENGINE, error))?;
        let ticket = self.written();
        if durability == Durability::Fsync {
            self.sync_through(ticket).map_err(PutError::Sync)?;
        }
        Ok(())
    }

    fn delete(&self, table: Table, key: &[u8], durability: Durability) -> Result<(), DeleteError> {
        if !is_storable_key(key) {
            return Ok(());
        }
        self.keyspace(table)
            .remove(key)
            .map_err(|error| failure(ENGINE, error))?;
        let ticket = self.written();
        if durability == Durability::Fsync {
            self.sync_through(ticket).map_err(DeleteError::Sync)?;
        }
        Ok(())
    }

    fn scan(
        &self,
        table: Table,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>, ScanError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let Some((lower, upper)) = scan_range(prefix, start_after) else {
            return Ok(Vec::new());
        };
        let keyspace = self.keyspace(table);
        let iter = match (&lower, &upper) {
            // The common case without `start_after`: let fjall use its prefix scan.
            // (fjall panics on an empty prefix, which the range form handles.)
            (Bound::Included(_), _) if !prefix.is_empty() => keyspace.prefix(prefix),
            _ => keyspace.range::<Vec<u8>, _>((lower, upper)),
        };
        let mut entries = Vec::with_capacity(initial_capacity(limit));
        for guard in iter.take(limit) {
            let (key, value) = guard.into_inner().map_err(|error| failure(ENGINE, error))?;
            debug_assert!(key.starts_with(prefix), "scan left its prefix");
            entries.push((key.to_vec(), value.to_vec()));
        }
        Ok(entries)
    }

    /// One fjall batch: a single journal record and one journal-lock acquisition for the whole
    /// batch (the write buffer's drains), instead of one per key.
    fn write_batch(&self, writes: &[BatchWrite<'_>]) -> Result<(), PutError> {
        let mut batch = self.database.batch();
        for (table, key, value) in writes {
            match value {
                Some(value) => {
                    if !is_storable_key(key) {
                        return Err(unstorable_key(ENGINE, key).into());
                    }
                    batch.insert(self.keyspace(*table), *key, *value);
                }
                // Removing an unstorable key removes nothing, as `delete` does.
                None if !is_storable_key(key) => {}
                None => batch.remove(self.keyspace(*table), *key),
            }
        }
        batch.commit().map_err(|error| failure(ENGINE, error))?;
        self.written();
        Ok(())
    }

    fn sync(&self) -> Result<(), SyncError> {
        let ticket = self.group_commit.written.load(Ordering::Acquire);
        // Nothing written since open: still fsync, so `sync` is always a durability barrier
        // (writes recovered from an earlier run may not be fsync'd yet).
        self.sync_through(ticket.max(1))
            .map_err(SyncError::Engine)?;
        Ok(())
    }

    fn engine_name(&self) -> &'static str {
        ENGINE
    }

    /// Reads do not wait: they come from the memtables, the block cache or the page cache.
    /// Every write may: besides an fsync, fjall applies backpressure inside `insert` (it
    /// sleeps 10-100 ms while flushes or compactions are behind), a memtable rotation runs
    /// maintenance in the writer's thread, and a buffered write queues behind a running
    /// `sync` (fjall holds its journal lock during the fsync). None of that may stop an async
    /// worker.
    fn may_wait_for_disk(&self, durability: Option<Durability>) -> bool {
        durability.is_some()
    }
}
