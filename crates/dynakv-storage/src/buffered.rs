//! [`BufferedStorage`]: the in-memory object buffer of the Dynamo paper (section 6.1) in front
//! of a durable engine.
//!
//! Every write lands in an in-memory buffer and returns; a writer (the server's flusher, or an
//! fsync'd write that needs it) drains the buffer into the engine and syncs it. Reads look in
//! the buffer first. This keeps foreground writes off the engine's write path entirely: the
//! engine's journal lock is held during its fsync (measured at up to 350 ms on this machine
//! while the engine was also writing table files), and writes that took that lock inline
//! stalled with it.
//!
//! Invariants:
//! - a read sees the newest write to a key: the buffer (`pending`), then the batch being
//!   drained (`draining`), then the engine;
//! - writes reach the engine in the order they were made per key (the buffer keeps the newest
//!   per key; a drain applies a whole batch before the next batch can start);
//! - a [`Durability::Fsync`] write returns only after a drain that included it was synced
//!   (group commit: one drain covers every write made before it started);
//! - the buffer holds at most [`MAX_BUFFERED_BYTES`]: a write that finds it fuller drains it
//!   first (backpressure) rather than growing memory without bound;
//! - a scan first drains the buffer into the engine (without an fsync), so it sees every
//!   write made before it.
//!
//! A process crash loses the buffer (writes acknowledged as buffered that no flush covered),
//! as with the engine's own unsynced writes; the server takes a new causal identity after
//! any unclean stop for exactly this reason.

use crate::{is_storable_key, unstorable_key};
use dynakv_core::storage::{
    BatchWrite, DeleteError, Durability, EngineFailure, Entry, GetError, PutError, ScanError,
    Storage, SyncError, Table,
};
use parking_lot::{Condvar, Mutex};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Most bytes (keys and values) the buffer holds before a write must drain it.
pub const MAX_BUFFERED_BYTES: usize = 64 * 1024 * 1024;
/// Most writes a drain hands the engine as one `write_batch`.
const MAX_WRITES_PER_ENGINE_BATCH: usize = 4096;

/// A buffered change: the new value, or `None` for a delete.
type Change = Option<Vec<u8>>;
type Batch = BTreeMap<(Table, Vec<u8>), Change>;

#[derive(Debug, Default)]
struct Pending {
    changes: Batch,
    bytes: usize,
    /// Sequence number of the newest write in `changes`.
    newest: u64,
}

#[derive(Debug, Default)]
struct DrainState {
    /// The writes of the batch being drained, still visible to readers.
    batch: Arc<Batch>,
    /// Every write with a sequence number up to this one is in the engine and synced.
    synced_through: u64,
    /// Every write up to this one is in the engine (maybe not synced).
    drained_through: u64,
    /// A drain is running.
    running: bool,
}

/// A durable engine behind an in-memory write buffer. See the module documentation.
#[derive(Debug)]
pub struct BufferedStorage<S: Storage> {
    inner: S,
    pending: Mutex<Pending>,
    /// Next write sequence number.
    sequence: std::sync::atomic::AtomicU64,
    drain: Mutex<DrainState>,
    drained: Condvar,
}

impl<S: Storage> BufferedStorage<S> {
    /// Put a buffer in front of `inner`.
    pub fn new(inner: S) -> Self {
        BufferedStorage {
            inner,
            pending: Mutex::new(Pending::default()),
            sequence: std::sync::atomic::AtomicU64::new(0),
            drain: Mutex::new(DrainState::default()),
            drained: Condvar::new(),
        }
    }

    /// The engine behind the buffer.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Bytes waiting in the buffer.
    pub fn buffered_bytes(&self) -> usize {
        self.pending.lock().bytes
    }

    fn buffer(&self, table: Table, key: &[u8], change: Change) -> (u64, usize) {
        let mut pending = self.pending.lock();
        let seq = self
            .sequence
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let added = key.len() + change.as_ref().map_or(0, Vec::len);
        if let Some(old) = pending.changes.insert((table, key.to_vec()), change) {
            pending.bytes = pending
                .bytes
                .saturating_sub(key.len() + old.as_ref().map_or(0, Vec::len));
        }
        pending.bytes += added;
        pending.newest = seq;
        (seq, pending.bytes)
    }

    /// Make every write up to `seq` reach the engine, synced when `sync`. Concurrent callers
    /// share drains: a caller whose writes another drain covered just waits for it.
    fn drain_through(&self, seq: u64, sync: bool) -> Result<(), EngineFailure> {
        let mut state = self.drain.lock();
        loop {
            let done = if sync {
                state.synced_through
            } else {
                state.drained_through
            };
            if done >= seq {
                return Ok(());
            }
            if !state.running {
                break;
            }
            self.drained.wait(&mut state);
        }
        // This thread drains: take the whole buffer as one batch.
        state.running = true;
        let (batch, newest) = {
            let mut pending = self.pending.lock();
            let newest = pending.newest;
            let changes = std::mem::take(&mut pending.changes);
            pending.bytes = 0;
            (Arc::new(changes), newest)
        };
        state.batch = Arc::clone(&batch);
        drop(state);

        let result = self.apply(&batch, sync);

        let mut state = self.drain.lock();
        state.running = false;
        state.batch = Arc::new(Batch::new());
        if result.is_ok() {
            state.drained_through = state.drained_through.max(newest);
            if sync {
                state.synced_through = state.synced_through.max(newest);
            }
        } else {
            // Put the batch back under any newer writes, so nothing is lost and a retry
            // applies it in order.
            let mut pending = self.pending.lock();
            for ((table, key), change) in batch.iter() {
                if !pending.changes.contains_key(&(*table, key.clone())) {
                    pending.bytes += key.len() + change.as_ref().map_or(0, Vec::len);
                    pending
                        .changes
                        .insert((*table, key.clone()), change.clone());
                }
            }
        }
        self.drained.notify_all();
        result
    }

    fn apply(&self, batch: &Batch, sync: bool) -> Result<(), EngineFailure> {
        // One engine batch per slice of the drain (bounded so that one journal record stays
        // a few MiB at most).
        let writes: Vec<BatchWrite<'_>> = batch
            .iter()
            .map(|((table, key), change)| (*table, key.as_slice(), change.as_deref()))
            .collect();
        for chunk in writes.chunks(MAX_WRITES_PER_ENGINE_BATCH) {
            self.inner.write_batch(chunk).map_err(put_failure)?;
        }
        if sync {
            self.inner.sync().map_err(|SyncError::Engine(e)| e)?;
        }
        Ok(())
    }

    /// After a write: wait for durability, or drain a buffer that grew past its bound.
    fn settle(
        &self,
        seq: u64,
        buffered: usize,
        durability: Durability,
    ) -> Result<(), EngineFailure> {
        match durability {
            Durability::Fsync => self.drain_through(seq, true),
            Durability::Buffered if buffered > MAX_BUFFERED_BYTES => self.drain_through(seq, false),
            Durability::Buffered => Ok(()),
        }
    }

    /// Drain everything written so far into the engine, without syncing.
    fn drain_all(&self) -> Result<(), EngineFailure> {
        let seq = self.sequence.load(std::sync::atomic::Ordering::Relaxed);
        self.drain_through(seq, false)
    }
}

fn put_failure(e: PutError) -> EngineFailure {
    match e {
        PutError::Engine(f) | PutError::Sync(f) => f,
    }
}

impl<S: Storage> Storage for BufferedStorage<S> {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, GetError> {
        if !is_storable_key(key) {
            return Ok(None);
        }
        let lookup = (table, key.to_vec());
        if let Some(change) = self.pending.lock().changes.get(&lookup) {
            return Ok(change.clone());
        }
        let draining = Arc::clone(&self.drain.lock().batch);
        if let Some(change) = draining.get(&lookup) {
            return Ok(change.clone());
        }
        // Not buffered when we looked; a write buffered since then is newer than what we
        // return, which is fine (it happened after this read began).
        self.inner.get(table, key)
    }

    fn put(
        &self,
        table: Table,
        key: &[u8],
        value: &[u8],
        durability: Durability,
    ) -> Result<(), PutError> {
        if !is_storable_key(key) {
            return Err(PutError::Engine(unstorable_key(
                self.inner.engine_name(),
                key,
            )));
        }
        let (seq, buffered) = self.buffer(table, key, Some(value.to_vec()));
        self.settle(seq, buffered, durability)
            .map_err(|e| match durability {
                Durability::Fsync => PutError::Sync(e),
                Durability::Buffered => PutError::Engine(e),
            })
    }

    fn delete(&self, table: Table, key: &[u8], durability: Durability) -> Result<(), DeleteError> {
        if !is_storable_key(key) {
            return Ok(());
        }
        let (seq, buffered) = self.buffer(table, key, None);
        self.settle(seq, buffered, durability)
            .map_err(|e| match durability {
                Durability::Fsync => DeleteError::Sync(e),
                Durability::Buffered => DeleteError::Engine(e),
            })
    }

    fn scan(
        &self,
        table: Table,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<Entry>, ScanError> {
        self.drain_all().map_err(ScanError::Engine)?;
        self.inner.scan(table, prefix, start_after, limit)
    }

    fn sync(&self) -> Result<(), SyncError> {
        let seq = self.sequence.load(std::sync::atomic::Ordering::Relaxed);
        self.drain_through(seq, true).map_err(SyncError::Engine)
    }

    fn engine_name(&self) -> &'static str {
        self.inner.engine_name()
    }

    /// A buffered write only touches memory (unless the buffer is over its bound); an fsync'd
    /// write and a scan wait for a drain; a read may read the engine, which does not block.
    fn may_wait_for_disk(&self, durability: Option<Durability>) -> bool {
        match durability {
            None => self.inner.may_wait_for_disk(None),
            Some(Durability::Fsync) => true,
            Some(Durability::Buffered) => self.buffered_bytes() > MAX_BUFFERED_BYTES / 2,
        }
    }
}
