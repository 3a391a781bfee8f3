//! [`MemoryStorage`]: one `BTreeMap` per table, each behind its own `RwLock`.
//!
//! Durability is ignored (there is nothing to sync), so a process restart loses everything.
//! Readers of one table never wait for writers of another. Scans walk the map's range and stop
//! after `limit` entries.

use std::collections::BTreeMap;

use dynakv_core::storage::{
    DeleteError, Durability, Entry, GetError, PutError, ScanError, Storage, SyncError, Table,
};
use parking_lot::RwLock;

use crate::scan::{initial_capacity, scan_range};
use crate::{TABLE_COUNT, is_storable_key, table_index, unstorable_key};

const ENGINE: &str = "memory";

type Map = BTreeMap<Vec<u8>, Vec<u8>>;

/// An in-memory engine: fast, never fails, forgets everything when dropped.
#[derive(Debug, Default)]
pub struct MemoryStorage {
    tables: [RwLock<Map>; TABLE_COUNT],
}

impl MemoryStorage {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of keys in `table`.
    pub fn len(&self, table: Table) -> usize {
        self.map(table).read().len()
    }

    /// Whether `table` holds no key.
    pub fn is_empty(&self, table: Table) -> bool {
        self.map(table).read().is_empty()
    }

    fn map(&self, table: Table) -> &RwLock<Map> {
        &self.tables[table_index(table)]
    }
}

impl Storage for MemoryStorage {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, GetError> {
        if !is_storable_key(key) {
            return Ok(None);
        }
        Ok(self.map(table).read().get(key).cloned())
    }

    fn put(
        &self,
        table: Table,
        key: &[u8],
        value: &[u8],
        _durability: Durability,
    ) -> Result<(), PutError> {
        if !is_storable_key(key) {
            return Err(unstorable_key(ENGINE, key).into());
        }
        self.map(table).write().insert(key.to_vec(), value.to_vec());
        Ok(())
    }

    fn delete(&self, table: Table, key: &[u8], _durability: Durability) -> Result<(), DeleteError> {
        self.map(table).write().remove(key);
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
        let Some(range) = scan_range(prefix, start_after) else {
            return Ok(Vec::new());
        };
        let map = self.map(table).read();
        let mut entries = Vec::with_capacity(initial_capacity(limit));
        entries.extend(
            map.range(range)
                .take(limit)
                .map(|(key, value)| (key.clone(), value.clone())),
        );
        Ok(entries)
    }

    fn sync(&self) -> Result<(), SyncError> {
        Ok(())
    }

    fn engine_name(&self) -> &'static str {
        ENGINE
    }

    fn may_wait_for_disk(&self, _durability: Option<Durability>) -> bool {
        false
    }
}
