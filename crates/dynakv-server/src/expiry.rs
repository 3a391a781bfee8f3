//! Expiry (issue 21): values with a time to live (a bucket's `ttl_secs`, a write's
//! `X-Dynakv-Ttl`) are answered as not found once expired (`requests::get`), and removed by
//! a tombstone written through the normal write path, so that reaping, anti-entropy, read
//! repair and hinted handoff treat them as deletes and an expired value cannot come back.
//!
//! Every node sweeps its `expiry` table (kept with every object write, `AaeTrees`) once a
//! second: for each key due by this node's clock whose first replica that is up is this node,
//! a quorum read; when every live value of what it returns has expired, a tombstone with the
//! read's context (a newer write the read did not see survives it as a sibling). The other
//! replicas' entries go when the tombstone reaches them. A node whose clock is ahead removes
//! values early by its skew; one behind answers them as found for as long.

use crate::view::Cluster;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How often a node sweeps its expired keys.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Keys read from the `expiry` table per step of a sweep.
const SWEEP_PAGE: usize = 100;
/// Most tombstones one sweep writes (the rest wait for the next).
const SWEEP_BUDGET: usize = 1000;

/// Sweep once a `SWEEP_INTERVAL` until shutdown.
pub async fn sweep_loop(cluster: Arc<Cluster>, mut shutdown: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(SWEEP_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        match sweep(&cluster).await {
            Ok(0) => {}
            Ok(removed) => tracing::debug!(removed, "expired values removed"),
            Err(error) => tracing::warn!(%error, "expiry sweep failed; retried next round"),
        }
    }
}

/// One sweep: the tombstones written.
///
/// # Errors
/// The `expiry` table could not be read.
pub async fn sweep(cluster: &Arc<Cluster>) -> Result<usize, String> {
    let now = cluster.now_ms();
    let mut start_after: Option<Vec<u8>> = None;
    let mut removed = 0;
    while removed < SWEEP_BUDGET {
        let replica = Arc::clone(cluster.replica());
        let after = start_after.clone();
        let due = tokio::task::spawn_blocking(move || {
            replica.expired_keys(now, after.as_deref(), SWEEP_PAGE)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        let Some((last, ..)) = due.last() else {
            break;
        };
        start_after = Some(last.clone());
        let full = due.len() == SWEEP_PAGE;
        for (_, bucket, key) in due {
            let first_up = cluster
                .preflist(&bucket, &key)
                .into_iter()
                .map(|(_, node)| node)
                .find(|node| node == cluster.me() || cluster.is_up(node));
            if first_up.as_ref() != Some(cluster.me()) {
                continue;
            }
            if remove_if_expired(cluster, &bucket, &key).await {
                removed += 1;
            }
        }
        if !full {
            break;
        }
    }
    Ok(removed)
}

/// A quorum read of the key; when every live value expired, a tombstone with its context.
async fn remove_if_expired(cluster: &Arc<Cluster>, bucket: &str, key: &str) -> bool {
    let Ok(object) = crate::requests::get_raw(cluster, bucket, key, None, None).await else {
        return false;
    };
    if object.expires_ms().is_none_or(|at| at > cluster.now_ms()) {
        return false;
    }
    let op =
        crate::requests::tombstone((bucket.to_owned(), key.to_owned()), object.clock().clone());
    crate::requests::put(cluster, op, cluster.now_ms())
        .await
        .is_ok()
}
