//! Group commit for async callers: a durable write waits for the flusher's next sync instead
//! of holding a blocking-pool thread through its own.
//!
//! A replica asked for a durable write (paper 6.1: with buffered writes the coordinator asks
//! one replica of each put for one; every write of an `fsync` bucket) stores it buffered,
//! inline, and then awaits [`SyncBarrier::wait`]. The flusher ([`crate::flush_loop`]) wakes
//! on the request, syncs the engine once for every write made before the sync started, and
//! publishes the outcome. Before this, each such write ran on tokio's blocking pool and waited
//! there for a drain and fsync of its own: at a few thousand puts per second the node kept
//! hundreds of threads parked (up to the pool's 512), and a slow fsync made every put behind
//! it wait for a thread.
//!
//! Invariants:
//! - a waiter's ticket is taken after its write is buffered, and the flusher reads the newest
//!   ticket before it starts a sync, so a sync published for ticket `t` covers every write
//!   whose ticket is at most `t`;
//! - a waiter is answered `Ok` only by a sync that covers it and succeeded, and `Err` only by
//!   one that covered it and failed (a later successful sync also covers the writes a failed
//!   one left in the buffer, so a waiter that sees the success first is durable);
//! - a waiter never waits without a sync being due: taking a ticket wakes the flusher, and the
//!   flusher runs until the server has stopped serving requests.

use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{Notify, watch};

/// What the flusher's syncs achieved so far.
#[derive(Debug, Clone, Default)]
struct Synced {
    /// Every ticket up to this one is durable.
    through: u64,
    /// The newest failed sync: the tickets it covered and why it failed.
    failed: Option<(u64, String)>,
    /// No sync will come any more (the engine failed, or the flusher stopped): every ticket
    /// not yet durable is answered with this.
    closed: Option<String>,
}

/// See the module documentation.
#[derive(Debug)]
pub struct SyncBarrier {
    tickets: AtomicU64,
    synced: watch::Sender<Synced>,
    wake: Notify,
}

impl Default for SyncBarrier {
    fn default() -> Self {
        SyncBarrier {
            tickets: AtomicU64::new(0),
            synced: watch::Sender::new(Synced::default()),
            wake: Notify::new(),
        }
    }
}

impl SyncBarrier {
    /// Wait until a sync that started after this call covers the caller's buffered writes.
    ///
    /// # Errors
    /// The sync that covered them failed (the message says why), or the flusher stopped.
    pub async fn wait(&self) -> Result<(), String> {
        let ticket = self.tickets.fetch_add(1, Ordering::AcqRel) + 1;
        let mut synced = self.synced.subscribe();
        self.wake.notify_one();
        let seen = synced
            .wait_for(|s| {
                s.through >= ticket
                    || s.failed.as_ref().is_some_and(|(t, _)| *t >= ticket)
                    || s.closed.is_some()
            })
            .await
            .map_err(|_| "the flusher stopped before the write was synced".to_owned())?;
        if seen.through >= ticket {
            return Ok(());
        }
        match (&seen.failed, &seen.closed) {
            (Some((t, why)), _) if *t >= ticket => Err(why.clone()),
            (_, Some(why)) => Err(why.clone()),
            _ => Err(String::new()),
        }
    }

    /// No sync will follow: answer every waiter not yet durable, now and later, with `why`.
    pub fn close(&self, why: &str) {
        self.synced.send_modify(|s| {
            if s.closed.is_none() {
                s.closed = Some(why.to_owned());
            }
        });
    }

    /// The newest ticket taken: a sync started now covers every ticket up to it.
    pub fn newest_ticket(&self) -> u64 {
        self.tickets.load(Ordering::Acquire)
    }

    /// Whether some waiter's ticket is newer than every published sync.
    pub fn waiting(&self) -> bool {
        let synced = self.synced.borrow();
        let answered = synced
            .through
            .max(synced.failed.as_ref().map_or(0, |(t, _)| *t));
        self.newest_ticket() > answered
    }

    /// Resolves when a waiter took a ticket since the last call (at once if one did).
    pub async fn requested(&self) {
        self.wake.notified().await;
    }

    /// Publish the outcome of a sync that started when `newest_ticket` was `through`.
    pub fn publish(&self, through: u64, outcome: Result<(), String>) {
        self.synced.send_modify(|s| match outcome {
            Ok(()) => s.through = s.through.max(through),
            Err(why) => s.failed = Some((through, why)),
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    /// A durable write waiting on `barrier`, once it has taken its ticket.
    async fn waiter(barrier: &Arc<SyncBarrier>) -> tokio::task::JoinHandle<Result<(), String>> {
        let waiting = tokio::spawn({
            let barrier = Arc::clone(barrier);
            async move { barrier.wait().await }
        });
        tokio::time::timeout(Duration::from_secs(5), barrier.requested())
            .await
            .unwrap();
        waiting
    }

    #[tokio::test]
    async fn a_closed_barrier_answers_every_waiter_not_yet_durable() {
        let barrier = Arc::new(SyncBarrier::default());
        let waiting = waiter(&barrier).await;
        barrier.close("the engine failed");
        assert_eq!(waiting.await.unwrap(), Err("the engine failed".to_owned()));
        // A waiter arriving after the close does not wait for a sync that will not come.
        let late = tokio::time::timeout(Duration::from_secs(5), barrier.wait())
            .await
            .expect("a waiter after the close waited");
        assert_eq!(late, Err("the engine failed".to_owned()));
    }

    #[tokio::test]
    async fn a_waiter_is_answered_by_the_first_sync_that_covers_it() {
        let barrier = Arc::new(SyncBarrier::default());
        // A sync published before the waiter's ticket does not answer it.
        barrier.publish(barrier.newest_ticket(), Ok(()));
        let waiter = waiter(&barrier).await;
        assert!(barrier.waiting());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "answered without a sync");
        let through = barrier.newest_ticket();
        barrier.publish(through, Ok(()));
        assert_eq!(waiter.await.unwrap(), Ok(()));
        assert!(!barrier.waiting());
    }

    #[tokio::test]
    async fn a_failed_sync_fails_the_writes_it_covered_and_a_later_one_succeeds() {
        let barrier = Arc::new(SyncBarrier::default());
        let first = tokio::spawn({
            let barrier = Arc::clone(&barrier);
            async move { barrier.wait().await }
        });
        barrier.requested().await;
        barrier.publish(barrier.newest_ticket(), Err("disk full".into()));
        assert_eq!(first.await.unwrap(), Err("disk full".to_owned()));
        let second = tokio::spawn({
            let barrier = Arc::clone(&barrier);
            async move { barrier.wait().await }
        });
        barrier.requested().await;
        barrier.publish(barrier.newest_ticket(), Ok(()));
        assert_eq!(second.await.unwrap(), Ok(()));
    }
}
