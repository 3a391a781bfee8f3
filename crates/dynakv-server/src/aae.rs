//! Active anti-entropy state: a Merkle tree per ring partition over the objects this node
//! stores, updated on every object write and rebuilt from storage at startup.
//!
//! The exchange itself (compare segment hashes, descend into differing segments and leaves,
//! exchange the differing keys' full sibling sets, merge on both sides) is driven by
//! `Cluster::anti_entropy_round`. Trees are keyed by the key's primary partition only; buckets
//! with different `n_val`s legitimately differ between replicas, and the exchange skips keys
//! the peer does not replicate.
//!
//! Memory: one `MerkleTree` (16 KiB) per partition this node holds keys of.

use dynakv_core::keys;
use dynakv_core::merkle::{Hash, MerkleTree, entry_hash, leaf_of};
use dynakv_core::ring::{PartitionId, Ring, key_hash};
use dynakv_core::storage::{Storage, Table};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::time::Instant;

/// Objects read per scan step while rebuilding.
const REBUILD_SCAN_PAGE: usize = 1000;

/// What the last exchange of one partition did.
#[derive(Debug, Clone, Default)]
pub struct ExchangeRecord {
    pub last_exchange: Option<Instant>,
    pub last_peer: String,
    pub keys_repaired_last: u64,
    pub keys_repaired_total: u64,
    pub exchanges: u64,
}

/// The node's anti-entropy trees.
#[derive(Debug)]
pub struct AaeTrees {
    partitioning: Ring,
    trees: Mutex<HashMap<PartitionId, MerkleTree>>,
    pub records: Mutex<HashMap<PartitionId, ExchangeRecord>>,
}

impl AaeTrees {
    /// Empty trees for a ring with `partitioning`'s partition count (fixed for the cluster).
    pub fn new(partitioning: Ring) -> Self {
        AaeTrees {
            partitioning,
            trees: Mutex::new(HashMap::new()),
            records: Mutex::new(HashMap::new()),
        }
    }

    /// The partition of a key.
    pub fn partition_of(&self, bucket: &[u8], key: &[u8]) -> PartitionId {
        self.partitioning.partition_of_hash(&key_hash(bucket, key))
    }

    /// Record a change of a stored object (`None` for absent).
    pub fn observe(&self, storage_key: &[u8], old: Option<&[u8]>, new: Option<&[u8]>) {
        let Some((bucket, key)) = keys::split_object_key(storage_key) else {
            return;
        };
        if old == new {
            return;
        }
        let partition = self.partition_of(bucket, key);
        let leaf = leaf_of(bucket, key);
        let old = old.map(|o| entry_hash(bucket, key, o));
        let new = new.map(|n| entry_hash(bucket, key, n));
        self.trees
            .lock()
            .entry(partition)
            .or_default()
            .update(leaf, old.as_ref(), new.as_ref());
    }

    /// Rebuild every tree from storage (at startup). Returns the number of objects hashed.
    pub fn rebuild(&self, storage: &dyn Storage) -> Result<u64, String> {
        let mut trees: HashMap<PartitionId, MerkleTree> = HashMap::new();
        let mut start_after: Option<Vec<u8>> = None;
        let mut count = 0;
        loop {
            let page = storage
                .scan(
                    Table::Objects,
                    &[],
                    start_after.as_deref(),
                    REBUILD_SCAN_PAGE,
                )
                .map_err(|e| e.to_string())?;
            let Some((last, _)) = page.last() else { break };
            start_after = Some(last.clone());
            for (storage_key, value) in &page {
                if let Some((bucket, key)) = keys::split_object_key(storage_key) {
                    let hash = entry_hash(bucket, key, value);
                    trees
                        .entry(self.partition_of(bucket, key))
                        .or_default()
                        .update(leaf_of(bucket, key), None, Some(&hash));
                    count += 1;
                }
            }
        }
        *self.trees.lock() = trees;
        Ok(count)
    }

    /// Segment hashes of a partition's tree (an empty tree's when absent).
    pub fn segments(&self, partition: PartitionId) -> Vec<Hash> {
        self.trees
            .lock()
            .get(&partition)
            .map_or_else(|| MerkleTree::new().segments(), MerkleTree::segments)
    }

    /// Leaves of the given segments of a partition's tree.
    pub fn segment_leaves(&self, partition: PartitionId, segments: &[u16]) -> Vec<(u16, Hash)> {
        self.trees.lock().get(&partition).map_or_else(
            || MerkleTree::new().segment_leaves(segments),
            |t| t.segment_leaves(segments),
        )
    }

    /// Keys held per partition.
    pub fn entries(&self) -> HashMap<PartitionId, u64> {
        self.trees
            .lock()
            .iter()
            .map(|(p, t)| (*p, t.entries()))
            .collect()
    }
}
