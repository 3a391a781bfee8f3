//! [`FaultyStorage`]: wraps an engine and makes chosen operations fail on demand.
//!
//! Tests of the server's error paths keep a [`FaultSwitch`] (a cheap clone sharing the same
//! atomics) and flip it while the node runs: fail every put, fail only the next three gets, make
//! puts land but report that the fsync failed, and so on. Failures are reported exactly as a real
//! engine would report them, as an [`EngineFailure`] with engine `faulty`, so the code under test
//! cannot tell them apart. While no fault is armed the wrapper forwards every call unchanged (the
//! conformance suite runs against it that way).
//!
//! Invariants: an injected fault never changes the inner engine, except for
//! [`FaultPoint::PutSync`] and [`FaultPoint::DeleteSync`], which apply the write and then report
//! that it may not be durable (the ambiguous outcome a real fsync failure gives).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use dynakv_core::storage::{
    DeleteError, Durability, EngineFailure, Entry, GetError, PutError, ScanError, Storage,
    SyncError, Table,
};

const ENGINE: &str = "faulty";

/// An operation of the wrapped engine where a fault can be injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultPoint {
    /// `get` fails with `GetError::Engine`.
    Get,
    /// `put` fails with `PutError::Engine`; nothing is written.
    Put,
    /// `put` writes to the inner engine, then fails with `PutError::Sync`.
    PutSync,
    /// `delete` fails with `DeleteError::Engine`; nothing is deleted.
    Delete,
    /// `delete` deletes in the inner engine, then fails with `DeleteError::Sync`.
    DeleteSync,
    /// `scan` fails with `ScanError::Engine`.
    Scan,
    /// `sync` fails with `SyncError::Engine`; the inner engine is not synced.
    Sync,
}

impl FaultPoint {
    /// Every fault point.
    pub const ALL: [FaultPoint; 7] = [
        FaultPoint::Get,
        FaultPoint::Put,
        FaultPoint::PutSync,
        FaultPoint::Delete,
        FaultPoint::DeleteSync,
        FaultPoint::Scan,
        FaultPoint::Sync,
    ];

    const fn index(self) -> usize {
        match self {
            FaultPoint::Get => 0,
            FaultPoint::Put => 1,
            FaultPoint::PutSync => 2,
            FaultPoint::Delete => 3,
            FaultPoint::DeleteSync => 4,
            FaultPoint::Scan => 5,
            FaultPoint::Sync => 6,
        }
    }

    fn name(self) -> &'static str {
        match self {
            FaultPoint::Get => "get",
            FaultPoint::Put => "put",
            FaultPoint::PutSync => "put sync",
            FaultPoint::Delete => "delete",
            FaultPoint::DeleteSync => "delete sync",
            FaultPoint::Scan => "scan",
            FaultPoint::Sync => "sync",
        }
    }
}

const POINT_COUNT: usize = FaultPoint::ALL.len();

const _: () = {
    let mut i = 0;
    while i < POINT_COUNT {
        assert!(FaultPoint::ALL[i].index() == i);
        i += 1;
    }
};

#[derive(Debug, Default)]
struct PointState {
    /// Fail every call while set.
    always: AtomicBool,
    /// Fail this many more calls (decremented by each injected failure).
    next: AtomicU64,
    /// Failures injected so far.
    injected: AtomicU64,
}

/// The shared control of a [`FaultyStorage`]. Clones control the same wrapper.
#[derive(Debug, Clone, Default)]
pub struct FaultSwitch {
    points: Arc<[PointState; POINT_COUNT]>,
}

impl FaultSwitch {
    /// A switch with no fault armed.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self, point: FaultPoint) -> &PointState {
        &self.points[point.index()]
    }

    /// Make every call at `point` fail (`true`) or stop doing so (`false`).
    pub fn set(&self, point: FaultPoint, failing: bool) {
        self.state(point).always.store(failing, Ordering::SeqCst);
    }

    /// Make the next `count` calls at `point` fail, then succeed again.
    pub fn fail_next(&self, point: FaultPoint, count: u64) {
        self.state(point).next.store(count, Ordering::SeqCst);
    }

    /// Make every operation fail: reads, writes, deletes, scans and syncs (writes fail before
    /// touching the inner engine).
    pub fn fail_everything(&self) {
        for point in [
            FaultPoint::Get,
            FaultPoint::Put,
            FaultPoint::Delete,
            FaultPoint::Scan,
            FaultPoint::Sync,
        ] {
            self.set(point, true);
        }
    }

    /// Disarm every fault (counts of injected failures are kept).
    pub fn heal(&self) {
        for point in FaultPoint::ALL {
            let state = self.state(point);
            state.always.store(false, Ordering::SeqCst);
            state.next.store(0, Ordering::SeqCst);
        }
    }

    /// Failures injected at `point` so far.
    pub fn injected(&self, point: FaultPoint) -> u64 {
        self.state(point).injected.load(Ordering::SeqCst)
    }

    /// Whether this call at `point` must fail; counts the failure when it must.
    fn trip(&self, point: FaultPoint) -> Option<EngineFailure> {
        let state = self.state(point);
        let failing = state.always.load(Ordering::SeqCst)
            || state
                .next
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                    left.checked_sub(1)
                })
                .is_ok();
        if !failing {
            return None;
        }
        state.injected.fetch_add(1, Ordering::SeqCst);
        Some(EngineFailure {
            engine: ENGINE,
            message: format!("injected {} failure", point.name()),
        })
    }
}

/// An engine wrapper that fails on demand (see the module doc).
#[derive(Debug)]
pub struct FaultyStorage<S> {
    inner: S,
    switch: FaultSwitch,
}

impl<S: Storage> FaultyStorage<S> {
    /// Wraps `inner` with a new switch, no fault armed.
    pub fn new(inner: S) -> Self {
        Self::with_switch(inner, FaultSwitch::new())
    }

    /// Wraps `inner`, controlled by `switch` (which may control other wrappers too).
    pub fn with_switch(inner: S, switch: FaultSwitch) -> Self {
        Self { inner, switch }
    }

    /// A handle on the switch; flipping it affects this wrapper at once.
    pub fn switch(&self) -> FaultSwitch {
        self.switch.clone()
    }

    /// The wrapped engine.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Unwraps the engine.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Storage> Storage for FaultyStorage<S> {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, GetError> {
        if let Some(failure) = self.switch.trip(FaultPoint::Get) {
            return Err(GetError::Engine(failure));
        }
        self.inner.get(table, key)
    }

    fn put(
        &self,
        table: Table,
        key: &[u8],
        value: &[u8],
        durability: Durability,
    ) -> Result<(), PutError> {
        if let Some(failure) = self.switch.trip(FaultPoint::Put) {
            return Err(PutError::Engine(failure));
        }
        self.inner.put(table, key, value, durability)?;
        if let Some(failure) = self.switch.trip(FaultPoint::PutSync) {
            return Err(PutError::Sync(failure));
        }
        Ok(())
    }

    fn delete(&self, table: Table, key: &[u8], durability: Durability) -> Result<(), DeleteError> {
        if let Some(failure) = self.switch.trip(FaultPoint::Delete) {
            return Err(DeleteError::Engine(failure));
        }
        self.inner.delete(table, key, durability)?;
        if let Some(failure) = self.switch.trip(FaultPoint::DeleteSync) {
            return Err(DeleteError::Sync(failure));
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
        if let Some(failure) = self.switch.trip(FaultPoint::Scan) {
            return Err(ScanError::Engine(failure));
        }
        self.inner.scan(table, prefix, start_after, limit)
    }

    fn sync(&self) -> Result<(), SyncError> {
        if let Some(failure) = self.switch.trip(FaultPoint::Sync) {
            return Err(SyncError::Engine(failure));
        }
        self.inner.sync()
    }

    fn engine_name(&self) -> &'static str {
        ENGINE
    }

    fn may_wait_for_disk(&self, durability: Option<Durability>) -> bool {
        self.inner.may_wait_for_disk(durability)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStorage;

    #[test]
    fn faults_are_injected_on_demand() {
        let storage = FaultyStorage::new(MemoryStorage::new());
        let switch = storage.switch();
        storage
            .put(Table::Objects, b"k", b"v", Durability::Fsync)
            .unwrap();

        switch.set(FaultPoint::Get, true);
        assert!(matches!(
            storage.get(Table::Objects, b"k"),
            Err(GetError::Engine(EngineFailure {
                engine: "faulty",
                ..
            }))
        ));
        switch.set(FaultPoint::Get, false);
        assert_eq!(
            storage.get(Table::Objects, b"k").unwrap(),
            Some(b"v".to_vec())
        );

        switch.fail_next(FaultPoint::Put, 2);
        for _ in 0..2 {
            assert!(matches!(
                storage.put(Table::Objects, b"x", b"1", Durability::Fsync),
                Err(PutError::Engine(_))
            ));
        }
        assert_eq!(storage.get(Table::Objects, b"x").unwrap(), None);
        storage
            .put(Table::Objects, b"x", b"1", Durability::Fsync)
            .unwrap();
        assert_eq!(switch.injected(FaultPoint::Put), 2);

        // An ambiguous write: applied, but reported as possibly not durable.
        switch.fail_next(FaultPoint::PutSync, 1);
        assert!(matches!(
            storage.put(Table::Objects, b"y", b"2", Durability::Fsync),
            Err(PutError::Sync(_))
        ));
        assert_eq!(
            storage.get(Table::Objects, b"y").unwrap(),
            Some(b"2".to_vec())
        );

        switch.fail_everything();
        assert!(storage.sync().is_err());
        assert!(storage.scan(Table::Objects, b"", None, 10).is_err());
        assert!(
            storage
                .delete(Table::Objects, b"k", Durability::Fsync)
                .is_err()
        );
        switch.heal();
        storage.sync().unwrap();
        storage
            .delete(Table::Objects, b"k", Durability::Fsync)
            .unwrap();
        assert_eq!(storage.get(Table::Objects, b"k").unwrap(), None);
    }
}
