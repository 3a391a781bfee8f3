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
            .write(WriteRequest {
                bucket: "b",
                key,
                context: None,
                content: Content {
                    value: value.to_vec(),
                    ..Content::default()
                },
                props: &BucketProps::default(),
                durability: Durability::Fsync,
                precondition: Precondition::None,
                now_ms: 1,
            })
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
}
