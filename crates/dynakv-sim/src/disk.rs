//! `SimDisk`: the simulated disk under a node's `Replica`, a [`Storage`] that can lose what
//! was not yet synced.
//!
//! Every write is visible at once (`live`). A `Durability::Fsync` write, or a `sync`, makes
//! every write accepted so far durable (as a journal's fsync does: the durable image is a
//! prefix of the writes). A process crash keeps everything (the OS buffers survive); a power
//! loss keeps only the durable image; a wiped disk keeps nothing.

use dynakv_core::storage::{
    DeleteError, Durability, Entry, GetError, PutError, ScanError, Storage, SyncError, Table,
};
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet};

type Image = BTreeMap<(Table, Vec<u8>), Vec<u8>>;

#[derive(Debug, Default)]
struct State {
    live: Image,
    durable: Image,
    /// Keys whose live value differs from the durable one.
    dirty: BTreeSet<(Table, Vec<u8>)>,
}

impl State {
    fn sync(&mut self) {
        for key in std::mem::take(&mut self.dirty) {
            match self.live.get(&key) {
                Some(value) => {
                    self.durable.insert(key, value.clone());
                }
                None => {
                    self.durable.remove(&key);
                }
            }
        }
    }

    fn write(&mut self, table: Table, key: &[u8], value: Option<&[u8]>, durability: Durability) {
        let at = (table, key.to_vec());
        match value {
            Some(value) => {
                self.live.insert(at.clone(), value.to_vec());
            }
            None => {
                self.live.remove(&at);
            }
        }
        self.dirty.insert(at);
        if durability == Durability::Fsync {
            self.sync();
        }
    }
}

/// How a node's disk comes back after a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskLoss {
    /// The process died: everything written survives.
    Nothing,
    /// The machine lost power: writes not yet synced are gone.
    Unsynced,
    /// The disk is gone.
    Everything,
}

/// One node's simulated disk.
#[derive(Debug, Default)]
pub struct SimDisk {
    state: Mutex<State>,
}

impl SimDisk {
    pub fn new() -> Self {
        SimDisk::default()
    }

    /// Apply a crash; returns whether data the node relies on was lost (objects, hints or
    /// metadata: the anti-entropy index and tombstone list are rebuilt from the objects).
    pub fn crash(&self, loss: DiskLoss) -> bool {
        let mut state = self.state.lock();
        match loss {
            DiskLoss::Nothing => {
                state.sync();
                false
            }
            DiskLoss::Unsynced => {
                let lost = state
                    .dirty
                    .iter()
                    .any(|(table, _)| matches!(table, Table::Objects | Table::Hints | Table::Meta));
                state.live = state.durable.clone();
                state.dirty.clear();
                lost
            }
            DiskLoss::Everything => {
                let lost = state
                    .live
                    .keys()
                    .chain(state.durable.keys())
                    .any(|(table, _)| matches!(table, Table::Objects | Table::Hints));
                *state = State::default();
                lost
            }
        }
    }
}

impl Storage for SimDisk {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, GetError> {
        Ok(self.state.lock().live.get(&(table, key.to_vec())).cloned())
    }

    fn put(
        &self,
        table: Table,
        key: &[u8],
        value: &[u8],
        durability: Durability,
    ) -> Result<(), PutError> {
        self.state.lock().write(table, key, Some(value), durability);
        Ok(())
    }

    fn delete(&self, table: Table, key: &[u8], durability: Durability) -> Result<(), DeleteError> {
        self.state.lock().write(table, key, None, durability);
        Ok(())
    }

    fn scan(
        &self,
        table: Table,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>, ScanError> {
        let state = self.state.lock();
        // From the later of the prefix and `start_after` (which may lie before the prefix).
        let from = match start_after {
            Some(after) if after > prefix => after,
            _ => prefix,
        };
        let from = (table, from.to_vec());
        Ok(state
            .live
            .range(from..)
            .take_while(|((t, k), _)| *t == table && k.starts_with(prefix))
            .filter(|((_, k), _)| start_after.is_none_or(|after| k.as_slice() > after))
            .take(limit)
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect())
    }

    fn sync(&self) -> Result<(), SyncError> {
        self.state.lock().sync();
        Ok(())
    }

    fn engine_name(&self) -> &'static str {
        "simulated"
    }

    fn may_wait_for_disk(&self, _durability: Option<Durability>) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(disk: &SimDisk, table: Table, prefix: &[u8], after: Option<&[u8]>) -> Vec<Vec<u8>> {
        disk.scan(table, prefix, after, 10)
            .unwrap_or_default()
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    }

    #[test]
    fn scans_are_ordered_prefixed_and_start_strictly_after() {
        let disk = SimDisk::new();
        for key in [&b"a1"[..], b"a2", b"b1", b"a3"] {
            assert!(
                disk.put(Table::Objects, key, b"v", Durability::Buffered)
                    .is_ok()
            );
        }
        assert!(
            disk.put(Table::Hints, b"a0", b"v", Durability::Buffered)
                .is_ok()
        );
        assert_eq!(
            keys(&disk, Table::Objects, b"a", None),
            vec![b"a1".to_vec(), b"a2".to_vec(), b"a3".to_vec()]
        );
        assert_eq!(
            keys(&disk, Table::Objects, b"a", Some(b"a1")),
            vec![b"a2".to_vec(), b"a3".to_vec()]
        );
        assert_eq!(
            keys(&disk, Table::Objects, b"", Some(b"a3")),
            vec![b"b1".to_vec()]
        );
        assert_eq!(keys(&disk, Table::Hints, b"", None), vec![b"a0".to_vec()]);
        // A start before the prefix still lists the prefix's keys.
        assert_eq!(
            keys(&disk, Table::Objects, b"b", Some(b"a2")),
            vec![b"b1".to_vec()]
        );
    }

    #[test]
    fn power_loss_keeps_the_prefix_an_fsync_covered() {
        let disk = SimDisk::new();
        assert!(
            disk.put(Table::Objects, b"k1", b"1", Durability::Buffered)
                .is_ok()
        );
        assert!(
            disk.put(Table::Objects, b"k2", b"2", Durability::Fsync)
                .is_ok()
        );
        assert!(
            disk.put(Table::Objects, b"k3", b"3", Durability::Buffered)
                .is_ok()
        );
        assert!(
            disk.delete(Table::Objects, b"k1", Durability::Buffered)
                .is_ok()
        );
        assert!(disk.crash(DiskLoss::Unsynced));
        let get = |k: &[u8]| disk.get(Table::Objects, k).ok().flatten();
        assert_eq!(get(b"k1"), Some(b"1".to_vec()));
        assert_eq!(get(b"k2"), Some(b"2".to_vec()));
        assert_eq!(get(b"k3"), None);
        // Only derived tables unsynced: nothing the node relies on is lost.
        assert!(
            disk.put(Table::AaeIndex, b"i", b"h", Durability::Buffered)
                .is_ok()
        );
        assert!(!disk.crash(DiskLoss::Unsynced));
        assert!(!disk.crash(DiskLoss::Nothing));
        assert!(disk.crash(DiskLoss::Everything));
        assert_eq!(get(b"k2"), None);
    }
}
