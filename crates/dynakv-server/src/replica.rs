//! The replica lives in `dynakv_core::replica` (shared with the simulator); this module
//! re-exports it and adds the async shell's way of running a storage call.

pub use dynakv_core::replica::*;

use dynakv_core::storage::Durability;
use std::future::Future;

/// Running a replica call from async code.
pub trait ReplicaRun {
    /// Run a storage call: inline when the engine says it cannot wait on the disk
    /// (`durability` is the write's, `None` for a read), else on tokio's blocking pool. Inline
    /// saves the two thread hand-overs per call that dominated a profile of the memory engine
    /// (a third of the node's CPU went to waking blocking-pool threads).
    ///
    /// # Errors
    /// The blocking task panicked or was cancelled.
    fn run<T: Send + 'static>(
        &self,
        durability: Option<Durability>,
        call: impl FnOnce() -> T + Send + 'static,
    ) -> impl Future<Output = Result<T, tokio::task::JoinError>> + Send;
}

impl ReplicaRun for Replica {
    fn run<T: Send + 'static>(
        &self,
        durability: Option<Durability>,
        call: impl FnOnce() -> T + Send + 'static,
    ) -> impl Future<Output = Result<T, tokio::task::JoinError>> + Send {
        let wait = self.storage().may_wait_for_disk(durability);
        async move {
            if wait {
                tokio::task::spawn_blocking(call).await
            } else {
                Ok(call())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use dynakv_core::bucket::BucketProps;
    use dynakv_core::keys;
    use dynakv_core::object::{Content, Object};
    use dynakv_core::storage::{Storage, Table};
    use dynakv_core::version::ActorId;
    use dynakv_storage::MemoryStorage;
    use std::sync::Arc;

    fn replica(storage: &Arc<MemoryStorage>, actor: u64) -> Replica {
        let storage: Arc<dyn Storage> = Arc::clone(storage) as Arc<dyn Storage>;
        Replica::new(
            storage,
            ActorId(actor),
            Arc::new(std::sync::atomic::AtomicBool::new(false)),
        )
    }

    fn blind_put(replica: &Replica, key: &str, value: &[u8]) -> Object {
        replica
            .write(write_of(key, value, Durability::Fsync))
            .unwrap()
    }

    fn dot_of(object: &Object) -> dynakv_core::version::Dot {
        object.siblings().iter().map(|s| s.dot).max().unwrap()
    }

    /// A key whose object is gone here (a reaped tombstone) and is written again must not get
    /// a dot its actor issued before, within a run and after a restart (the lease).
    #[test]
    fn dots_are_never_reissued_for_a_key_whose_history_is_gone() {
        let storage = Arc::new(MemoryStorage::new());
        let first = replica(&storage, 7);
        let old = dot_of(&blind_put(&first, "k", b"old"));
        let storage_key = keys::object_key(b"b", b"k");
        storage
            .delete(Table::Objects, &storage_key, Durability::Fsync)
            .unwrap();
        let new = dot_of(&blind_put(&first, "k", b"new"));
        assert_eq!(new.actor, old.actor);
        assert!(new.counter > old.counter, "{new:?} reissues {old:?}");
        // Writes to other keys move the same counter.
        let other = dot_of(&blind_put(&first, "other", b"x"));
        assert!(other.counter > new.counter);

        // A restart of the same actor (clean shutdown): the counter continues past the lease.
        drop(first);
        storage
            .delete(Table::Objects, &storage_key, Durability::Fsync)
            .unwrap();
        let second = replica(&storage, 7);
        let after = dot_of(&blind_put(&second, "k", b"after restart"));
        assert!(after.counter > other.counter, "{after:?} after {other:?}");
    }

    /// A storage whose `sync` waits until the test opens a gate, after saying it started.
    #[derive(Debug)]
    struct GatedSync {
        inner: MemoryStorage,
        started: std::sync::mpsc::SyncSender<()>,
        gate: parking_lot::Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl Storage for GatedSync {
        fn get(
            &self,
            table: Table,
            key: &[u8],
        ) -> Result<Option<Vec<u8>>, dynakv_core::storage::GetError> {
            self.inner.get(table, key)
        }
        fn put(
            &self,
            table: Table,
            key: &[u8],
            value: &[u8],
            durability: Durability,
        ) -> Result<(), dynakv_core::storage::PutError> {
            if table == Table::Objects {
                assert_eq!(
                    durability,
                    Durability::Buffered,
                    "object writes are buffered under the stripe lock; the fsync comes after"
                );
            }
            self.inner.put(table, key, value, durability)
        }
        fn delete(
            &self,
            table: Table,
            key: &[u8],
            durability: Durability,
        ) -> Result<(), dynakv_core::storage::DeleteError> {
            self.inner.delete(table, key, durability)
        }
        fn scan(
            &self,
            table: Table,
            prefix: &[u8],
            start_after: Option<&[u8]>,
            limit: usize,
        ) -> Result<Vec<dynakv_core::storage::Entry>, dynakv_core::storage::ScanError> {
            self.inner.scan(table, prefix, start_after, limit)
        }
        fn sync(&self) -> Result<(), dynakv_core::storage::SyncError> {
            let _ = self.started.send(());
            let _ = self.gate.lock().recv();
            Ok(())
        }
        fn engine_name(&self) -> &'static str {
            "gated"
        }
    }

    fn write_of<'a>(key: &'a str, value: &[u8], durability: Durability) -> WriteRequest<'a> {
        WriteRequest {
            bucket: "b",
            key,
            context: None,
            content: Content {
                value: value.to_vec(),
                ..Content::default()
            },
            props: &DEFAULT_PROPS,
            durability,
            precondition: Precondition::None,
            now_ms: 1,
        }
    }

    static DEFAULT_PROPS: std::sync::LazyLock<BucketProps> =
        std::sync::LazyLock::new(BucketProps::default);

    /// A durable write waiting for its fsync does not hold its key's stripe lock: another
    /// write of the same key (which the server runs inline on an async worker) goes through
    /// meanwhile instead of stopping that worker for the whole flush.
    #[test]
    fn a_write_waiting_for_its_fsync_does_not_block_the_next_write_of_its_key() {
        let (started_tx, started_rx) = std::sync::mpsc::sync_channel(16);
        let (gate_tx, gate_rx) = std::sync::mpsc::channel();
        let storage = Arc::new(GatedSync {
            inner: MemoryStorage::new(),
            started: started_tx,
            gate: parking_lot::Mutex::new(gate_rx),
        });
        let replica = Arc::new(Replica::new(
            Arc::clone(&storage) as Arc<dyn Storage>,
            ActorId(3),
            Arc::new(std::sync::atomic::AtomicBool::new(false)),
        ));
        // The lease first (a durable put, not a sync): not what this test is about.
        replica.renew_counter_lease().unwrap();

        let durable = {
            let replica = Arc::clone(&replica);
            std::thread::spawn(move || {
                replica
                    .write(write_of("hot", b"durable", Durability::Fsync))
                    .unwrap()
            })
        };
        started_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the durable write reached its fsync");
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let buffered = {
            let replica = Arc::clone(&replica);
            std::thread::spawn(move || {
                let stored = replica
                    .write(write_of("hot", b"buffered", Durability::Buffered))
                    .unwrap();
                let _ = done_tx.send(());
                stored
            })
        };
        let finished = done_rx.recv_timeout(std::time::Duration::from_secs(5));
        gate_tx.send(()).unwrap();
        let first = durable.join().unwrap();
        let second = buffered.join().unwrap();
        assert!(
            finished.is_ok(),
            "the buffered write of the same key waited for the other write's fsync"
        );
        // Both writes are there: the second saw nothing (no context), so they are siblings.
        assert_eq!(second.siblings().len(), 2, "{second:?}");
        assert!(second.clock().descends(first.clock()));
        assert_eq!(replica.fsync_writes(), 1);
    }

    /// The flusher renews the dot-counter lease ahead of need, so a client write does not
    /// have to reserve it (an fsync under its key's stripe lock) itself.
    #[test]
    fn the_counter_lease_is_renewed_before_writes_need_it() {
        let storage = Arc::new(MemoryStorage::new());
        let replica = replica(&storage, 9);
        let lease = || {
            storage
                .get(Table::Meta, b"dot_counter_lease")
                .unwrap()
                .map(|b| u64::from_be_bytes(b.as_slice().try_into().unwrap()))
        };
        assert!(
            replica.counter_lease_low(),
            "nothing reserved in this run yet"
        );
        assert!(replica.renew_counter_lease().unwrap());
        let reserved = lease().unwrap();
        assert!(!replica.counter_lease_low());
        assert!(
            !replica.renew_counter_lease().unwrap(),
            "more than half is left"
        );
        for i in 0..10 {
            blind_put(&replica, &format!("k{i}"), b"v");
        }
        assert_eq!(
            lease(),
            Some(reserved),
            "no write reserved the lease itself"
        );
        // A restart of the same actor continues past the renewed lease.
        drop(replica);
        let again = Replica::new(
            Arc::clone(&storage) as Arc<dyn Storage>,
            ActorId(9),
            Arc::new(std::sync::atomic::AtomicBool::new(false)),
        );
        let dot = dot_of(&blind_put(&again, "k0", b"after"));
        assert!(
            dot.counter > reserved,
            "{dot:?} within the old lease {reserved}"
        );
    }
}
