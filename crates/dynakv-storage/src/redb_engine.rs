//! `RedbStorage`: a copy-on-write B-tree engine on redb 4 (cargo feature `redb`).
//!
//! Kept to compare engines (see docs/BENCHMARKS.md) and as a second durable engine for the
//! conformance suite; the server uses fjall.
//!
//! Layout: one file, `dynakv.redb`, in the data directory; one redb table per [`Table`], named by
//! [`Table::name`], all created when the engine opens (so readers never meet a missing table).
//!
//! Durability: one write transaction per put or delete. [`Durability::Fsync`] commits with
//! `redb::Durability::Immediate` (fsync'd before `commit` returns); [`Durability::Buffered`]
//! commits with `redb::Durability::None` (visible at once, durable at the next immediate commit).
//! [`Storage::sync`] commits an empty transaction with `Immediate` durability. redb allows one
//! write transaction at a time, so concurrent writers queue and each pays its own fsync.

use std::fmt;
use std::path::{Path, PathBuf};

use dynakv_core::storage::{
    DeleteError, Durability, EngineFailure, Entry, GetError, PutError, ScanError, Storage,
    SyncError, Table,
};
use redb::{Database, ReadableDatabase, TableDefinition};

use crate::error::{OpenError, failure};
use crate::scan::{initial_capacity, scan_range};
use crate::{is_storable_key, unstorable_key};

const ENGINE: &str = "redb";

/// The database file inside the data directory.
pub const REDB_FILE_NAME: &str = "dynakv.redb";

type RawTable = TableDefinition<'static, &'static [u8], &'static [u8]>;

fn definition(table: Table) -> RawTable {
    TableDefinition::new(table.name())
}

/// Tuning of [`RedbStorage`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedbOptions {
    /// Page cache, in bytes (default 64 MiB).
    pub cache_size_bytes: usize,
}

impl Default for RedbOptions {
    fn default() -> Self {
        Self {
            cache_size_bytes: 64 * 1024 * 1024,
        }
    }
}

/// The redb engine. All methods take `&self` and are safe to call from many threads.
pub struct RedbStorage {
    database: Database,
    path: PathBuf,
    options: RedbOptions,
}

impl fmt::Debug for RedbStorage {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("RedbStorage")
            .field("path", &self.path)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl RedbStorage {
    /// Opens the engine in `dir` (file [`REDB_FILE_NAME`]), creating the directory, the file and
    /// the tables if needed. Fails if another process has the file open.
    pub fn open(dir: &Path, options: RedbOptions) -> Result<Self, OpenError> {
        std::fs::create_dir_all(dir).map_err(|source| OpenError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = dir.join(REDB_FILE_NAME);
        let database = Database::builder()
            .set_cache_size(options.cache_size_bytes)
            .create(&path)
            .map_err(|error| failure(ENGINE, error))?;

        let transaction = database
            .begin_write()
            .map_err(|error| failure(ENGINE, error))?;
        for table in Table::ALL {
            transaction
                .open_table(definition(table))
                .map_err(|error| failure(ENGINE, error))?;
        }
        transaction
            .commit()
            .map_err(|error| failure(ENGINE, error))?;
        tracing::debug!(path = %path.display(), ?options, "opened redb storage");

        Ok(Self {
            database,
            path,
            options,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `change` in one write transaction committed with the durability asked for.
    ///
    /// Errors before the commit are write errors (nothing written); a failed commit is reported
    /// as a durability error, since the engine cannot say what reached the disk.
    fn write(
        &self,
        table: Table,
        durability: Durability,
        change: impl FnOnce(
            &mut redb::Table<'_, &'static [u8], &'static [u8]>,
        ) -> Result<(), redb::StorageError>,
    ) -> Result<(), WriteFailure> {
        let mut transaction = self
            .database
            .begin_write()
            .map_err(|error| WriteFailure::Write(failure(ENGINE, error)))?;
        transaction
            .set_durability(match durability {
                Durability::Fsync => redb::Durability::Immediate,
                Durability::Buffered => redb::Durability::None,
            })
            .map_err(|error| WriteFailure::Write(failure(ENGINE, error)))?;
        {
            let mut open_table = transaction
                .open_table(definition(table))
                .map_err(|error| WriteFailure::Write(failure(ENGINE, error)))?;
            change(&mut open_table).map_err(|error| WriteFailure::Write(failure(ENGINE, error)))?;
        }
        transaction
            .commit()
            .map_err(|error| WriteFailure::Commit(failure(ENGINE, error)))
    }
}

/// Where a write transaction failed.
enum WriteFailure {
    Write(EngineFailure),
    Commit(EngineFailure),
}

impl Storage for RedbStorage {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, GetError> {
        if !is_storable_key(key) {
            return Ok(None);
        }
        let transaction = self
            .database
            .begin_read()
            .map_err(|error| failure(ENGINE, error))?;
        let open_table = transaction
            .open_table(definition(table))
            .map_err(|error| failure(ENGINE, error))?;
        let value = open_table
            .get(key)
            .map_err(|error| failure(ENGINE, error))?;
        Ok(value.map(|guard| guard.value().to_vec()))
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
        self.write(table, durability, |open_table| {
            open_table.insert(key, value).map(drop)
        })
        .map_err(|error| match error {
            WriteFailure::Write(failure) => PutError::Engine(failure),
            WriteFailure::Commit(failure) => PutError::Sync(failure),
        })
    }

    fn delete(&self, table: Table, key: &[u8], durability: Durability) -> Result<(), DeleteError> {
        if !is_storable_key(key) {
            return Ok(());
        }
        self.write(table, durability, |open_table| {
            open_table.remove(key).map(drop)
        })
        .map_err(|error| match error {
            WriteFailure::Write(failure) => DeleteError::Engine(failure),
            WriteFailure::Commit(failure) => DeleteError::Sync(failure),
        })
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
        let transaction = self
            .database
            .begin_read()
            .map_err(|error| failure(ENGINE, error))?;
        let open_table = transaction
            .open_table(definition(table))
            .map_err(|error| failure(ENGINE, error))?;
        let bounds = (
            lower.as_ref().map(Vec::as_slice),
            upper.as_ref().map(Vec::as_slice),
        );
        let range = open_table
            .range::<&[u8]>(bounds)
            .map_err(|error| failure(ENGINE, error))?;
        let mut entries = Vec::with_capacity(initial_capacity(limit));
        for item in range.take(limit) {
            let (key, value) = item.map_err(|error| failure(ENGINE, error))?;
            entries.push((key.value().to_vec(), value.value().to_vec()));
        }
        Ok(entries)
    }

    fn sync(&self) -> Result<(), SyncError> {
        let mut transaction = self
            .database
            .begin_write()
            .map_err(|error| failure(ENGINE, error))?;
        transaction
            .set_durability(redb::Durability::Immediate)
            .map_err(|error| failure(ENGINE, error))?;
        transaction
            .commit()
            .map_err(|error| failure(ENGINE, error))?;
        Ok(())
    }

    fn engine_name(&self) -> &'static str {
        ENGINE
    }
}
