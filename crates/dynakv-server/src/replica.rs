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
