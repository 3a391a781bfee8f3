//! Active anti-entropy state: a Merkle tree per ring partition over the objects this node
//! stores, updated on every object write and rebuilt from storage at startup.
//!
//! The exchange itself (compare segment hashes, descend into differing segments and leaves,
//! exchange the differing keys' full sibling sets, merge on both sides) is driven by the
//! core's `AaeRound`/`AaeExchange` (driven by `Node`, in the server and the simulator). Trees are keyed by the key's primary partition only; buckets
//! with different `n_val`s legitimately differ between replicas, and the exchange skips keys
//! the peer does not replicate.
//!
//! The same hook keeps [`Table::Tombstones`], the keys whose object is all tombstones, so
//! tombstone reaping reads only deleted keys. The keys under one leaf are found through an
//! index table ([`Table::AaeIndex`]: partition,
//! leaf, object key → the object's entry hash) written next to every object write, so an
//! exchange reads only the few keys of the leaves that differ instead of scanning the node's
//! objects. The index is derived data: it is trusted at startup only after a clean shutdown
//! (and when the marker saying it was built is present); otherwise it is rebuilt from the
//! objects, as the trees are.
//!
//! Memory: one `MerkleTree` (16 KiB) per partition this node holds keys of; the index lives in
//! storage; and the entry hashes of the last [`MAX_RECENT_HASHES`] objects written (a write
//! XORs the old object's hash out of its leaf, and the old object is most often the one the
//! previous write of the key stored: its hash is reused when the old bytes have the same
//! length and CRC-32 as those, instead of hashing them again).

use crate::keys;
use crate::merkle::{Hash, MerkleTree, entry_hash, leaf_of};
use crate::ring::{PartitionId, Ring, key_hash};
use crate::storage::{Durability, Storage, Table};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::Arc;

/// A page of a partition's stored keys: `(index key, object key)`.
pub type PartitionPage = Vec<(Vec<u8>, Vec<u8>)>;

/// The `Table::Expiry` key of an object that expires at `at_ms`.
pub fn expiry_key(at_ms: u64, storage_key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + storage_key.len());
    out.extend_from_slice(&at_ms.to_be_bytes());
    out.extend_from_slice(storage_key);
    out
}

/// Objects (or index entries) read per scan step while rebuilding.
const REBUILD_SCAN_PAGE: usize = 1000;
/// Meta key present while the anti-entropy index is complete (written after a rebuild).
const KEY_INDEX_BUILT: &[u8] = b"aae_index_v1";
/// Most recently written objects whose entry hash is remembered (about 100 bytes each); the
/// memo is emptied when it is full.
pub const MAX_RECENT_HASHES: usize = 65_536;

/// The entry hash of the bytes last written under an object key, and those bytes' length and
/// CRC-32: the hash is reused only for bytes that match both.
type RecentHash = (usize, u32, Hash);

/// How the trees were built at startup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebuildReport {
    /// Objects (or index entries) hashed into the trees.
    pub entries: u64,
    /// True when the index was trusted and the objects were not read.
    pub from_index: bool,
}

/// Call `visit` on every entry of `table` under `prefix`, in key order, a page at a time,
/// until it returns `Break` or the entries end.
fn for_each_entry(
    storage: &dyn Storage,
    table: Table,
    prefix: &[u8],
    mut visit: impl FnMut(&[u8], &[u8]) -> Result<ControlFlow<()>, String>,
) -> Result<(), String> {
    let mut start_after: Option<Vec<u8>> = None;
    loop {
        let page = storage
            .scan(table, prefix, start_after.as_deref(), REBUILD_SCAN_PAGE)
            .map_err(|e| e.to_string())?;
        let Some((last, _)) = page.last() else {
            return Ok(());
        };
        start_after = Some(last.clone());
        for (key, value) in &page {
            if visit(key, value)?.is_break() {
                return Ok(());
            }
        }
    }
}

/// Whether encoded object bytes are all tombstones (an undecodable header counts as not).
fn is_tombstone(bytes: &[u8]) -> bool {
    crate::object::Object::encoded_is_deleted(bytes).unwrap_or(false)
}

/// Keys (bucket, key, entry hash) of some leaves, and whether the list was cut at its limit.
pub type LeafKeys = (Vec<(String, String, Hash)>, bool);

/// The node's anti-entropy trees.
#[derive(Debug)]
pub struct AaeTrees {
    partitioning: Ring,
    storage: Arc<dyn Storage>,
    trees: Mutex<HashMap<PartitionId, MerkleTree>>,
    /// Per object key, the entry hash of the bytes the last write stored.
    recent: Mutex<HashMap<Vec<u8>, RecentHash>>,
}

impl AaeTrees {
    /// Empty trees for a ring with `partitioning`'s partition count (fixed for the cluster).
    pub fn new(partitioning: Ring, storage: Arc<dyn Storage>) -> Self {
        AaeTrees {
            partitioning,
            storage,
            trees: Mutex::new(HashMap::new()),
            recent: Mutex::new(HashMap::new()),
        }
    }

    /// The partition of a key.
    pub fn partition_of(&self, bucket: &[u8], key: &[u8]) -> PartitionId {
        self.partitioning.partition_of_hash(&key_hash(bucket, key))
    }

    /// Keep the tables derived from an object's values for a change of `storage_key`: the
    /// secondary index (`Table::Index`: the difference between the old and the new live
    /// entries) and `Table::Expiry` (`expiry_key`: the object's expiry when every live value
    /// expires). Each object is decoded once, and only when its header says it has entries
    /// or expires.
    fn update_value_tables(
        &self,
        (storage_key, bucket, key): (&[u8], &[u8], &[u8]),
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<(), String> {
        use crate::object::Object;
        let derived = |bytes: Option<&[u8]>| {
            bytes
                .filter(|b| Object::encoded_has_indexes(b) || Object::encoded_expires(b))
                .and_then(|b| Object::decode_stored(b).ok())
                .map(|o| (crate::index::object_entries(&o), o.expires_ms()))
                .unwrap_or_default()
        };
        let ((old_entries, old_expiry), (new_entries, new_expiry)) = (derived(old), derived(new));
        let mut writes: Vec<(Table, Vec<u8>, bool)> =
            crate::index::delta(bucket, key, &old_entries, &new_entries)
                .into_iter()
                .map(|(table_key, present)| (Table::Index, table_key, present))
                .collect();
        if old_expiry != new_expiry {
            writes.extend(old_expiry.map(|at| (Table::Expiry, expiry_key(at, storage_key), false)));
            writes.extend(new_expiry.map(|at| (Table::Expiry, expiry_key(at, storage_key), true)));
        }
        for (table, table_key, present) in writes {
            let written = if present {
                self.storage
                    .put(table, &table_key, &[], Durability::Buffered)
                    .map_err(|e| e.to_string())
            } else {
                self.storage
                    .delete(table, &table_key, Durability::Buffered)
                    .map_err(|e| e.to_string())
            };
            written?;
        }
        Ok(())
    }

    /// Record a change of a stored object (`None` for absent).
    pub fn observe(&self, storage_key: &[u8], old: Option<&[u8]>, new: Option<&[u8]>) {
        let Some((bucket, key)) = keys::split_object_key(storage_key) else {
            return;
        };
        if old == new {
            return;
        }
        let (old_bytes, new_bytes) = (old, new);
        let partition = self.partition_of(bucket, key);
        let leaf = leaf_of(bucket, key);
        let (old, new) = self.entry_hashes(storage_key, (bucket, key), old, new);
        self.trees
            .lock()
            .entry(partition)
            .or_default()
            .update(leaf, old.as_ref(), new.as_ref());
        let index_key = keys::aae_index_key(partition, leaf, storage_key);
        let indexed = match new {
            Some(hash) => self
                .storage
                .put(Table::AaeIndex, &index_key, &hash, Durability::Buffered)
                .map_err(|e| e.to_string()),
            None => self
                .storage
                .delete(Table::AaeIndex, &index_key, Durability::Buffered)
                .map_err(|e| e.to_string()),
        };
        let secondary = self.update_value_tables((storage_key, bucket, key), old_bytes, new_bytes);
        let was_tombstone = old_bytes.is_some_and(is_tombstone);
        let is_now_tombstone = new_bytes.is_some_and(is_tombstone);
        let listed = if is_now_tombstone && !was_tombstone {
            self.storage
                .put(Table::Tombstones, storage_key, &[], Durability::Buffered)
                .map_err(|e| e.to_string())
        } else if was_tombstone && !is_now_tombstone {
            self.storage
                .delete(Table::Tombstones, storage_key, Durability::Buffered)
                .map_err(|e| e.to_string())
        } else {
            Ok(())
        };
        if let Err(error) = indexed.and(listed).and(secondary) {
            // The tree is right but the index misses this change: have the next start rebuild
            // it (a failing engine most likely fails the delete too; the log says so).
            tracing::warn!(%error, "anti-entropy index write failed; it is rebuilt at the next start");
            if let Err(error) = self
                .storage
                .delete(Table::Meta, KEY_INDEX_BUILT, Durability::Fsync)
            {
                tracing::error!(%error, "could not clear the anti-entropy index marker");
            }
        }
    }

    /// The entry hashes of a write's old and new bytes. The old one is the hash remembered
    /// from the write that stored those bytes when their length and CRC-32 match, else
    /// computed; the new one is remembered for the next write of the key.
    fn entry_hashes(
        &self,
        storage_key: &[u8],
        (bucket, key): (&[u8], &[u8]),
        old: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> (Option<Hash>, Option<Hash>) {
        let remembered = self.recent.lock().get(storage_key).copied();
        let old = old.map(|old| match remembered {
            Some((len, crc, hash)) if len == old.len() && crc == crc32fast::hash(old) => hash,
            _ => entry_hash(bucket, key, old),
        });
        let new = new.map(|new| {
            (
                new.len(),
                crc32fast::hash(new),
                entry_hash(bucket, key, new),
            )
        });
        let mut recent = self.recent.lock();
        match new {
            Some(entry) => {
                if recent.len() >= MAX_RECENT_HASHES && !recent.contains_key(storage_key) {
                    recent.clear();
                }
                recent.insert(storage_key.to_vec(), entry);
            }
            None => {
                recent.remove(storage_key);
            }
        }
        (old, new.map(|(_, _, hash)| hash))
    }

    /// The keys (bucket, key, entry hash) under the given leaves of a partition, in leaf order,
    /// at most `limit` of them; the flag says the list was cut at `limit`.
    ///
    /// # Errors
    /// The index could not be read.
    pub fn leaf_keys(
        &self,
        partition: PartitionId,
        leaves: &std::collections::BTreeSet<u16>,
        limit: usize,
    ) -> Result<LeafKeys, String> {
        let mut out = Vec::new();
        let mut cut = false;
        for &leaf in leaves {
            let prefix = keys::aae_leaf_prefix(partition, leaf);
            for_each_entry(
                self.storage.as_ref(),
                Table::AaeIndex,
                &prefix,
                |index_key, hash| {
                    let Some((_, _, object_key)) = keys::split_aae_index_key(index_key) else {
                        return Ok(ControlFlow::Continue(()));
                    };
                    let (Some((bucket, key)), Ok(hash)) =
                        (keys::split_object_key(object_key), <Hash>::try_from(hash))
                    else {
                        return Ok(ControlFlow::Continue(()));
                    };
                    if out.len() >= limit {
                        cut = true;
                        return Ok(ControlFlow::Break(()));
                    }
                    out.push((
                        String::from_utf8_lossy(bucket).into_owned(),
                        String::from_utf8_lossy(key).into_owned(),
                        hash,
                    ));
                    Ok(ControlFlow::Continue(()))
                },
            )?;
            if cut {
                return Ok((out, true));
            }
        }
        Ok((out, false))
    }

    /// One page of the stored keys of `partition` (from the index, so a partition is read
    /// without scanning the others): up to `limit` `(index key, object key)` after
    /// `start_after` (an index key of this partition), in index order.
    ///
    /// # Errors
    /// The index could not be read.
    pub fn partition_page(
        &self,
        partition: PartitionId,
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Result<PartitionPage, String> {
        let page = self
            .storage
            .scan(
                Table::AaeIndex,
                &partition.to_be_bytes(),
                start_after,
                limit,
            )
            .map_err(|e| e.to_string())?;
        Ok(page
            .into_iter()
            .filter_map(|(index_key, _)| {
                let (_, _, object_key) = keys::split_aae_index_key(&index_key)?;
                let object_key = object_key.to_vec();
                Some((index_key, object_key))
            })
            .collect())
    }

    /// Build every tree at startup: from the index when `trust_index` (the last run ended
    /// cleanly) and the index is marked complete, else from the objects, rewriting the index.
    ///
    /// # Errors
    /// Storage failed.
    pub fn rebuild(&self, trust_index: bool) -> Result<RebuildReport, String> {
        let built = self
            .storage
            .get(Table::Meta, KEY_INDEX_BUILT)
            .map_err(|e| e.to_string())?
            .is_some();
        if trust_index
            && built
            && let Some(entries) = self.trees_from_index()?
        {
            return Ok(RebuildReport {
                entries,
                from_index: true,
            });
        }
        let entries = self.rebuild_from_objects()?;
        Ok(RebuildReport {
            entries,
            from_index: false,
        })
    }

    /// Trees from the index; `None` when an entry is malformed (then the caller rebuilds).
    fn trees_from_index(&self) -> Result<Option<u64>, String> {
        let mut trees: HashMap<PartitionId, MerkleTree> = HashMap::new();
        let mut count = 0;
        let mut malformed = false;
        for_each_entry(
            self.storage.as_ref(),
            Table::AaeIndex,
            &[],
            |index_key, hash| {
                let (Some((partition, leaf, _)), Ok(hash)) =
                    (keys::split_aae_index_key(index_key), <Hash>::try_from(hash))
                else {
                    malformed = true;
                    return Ok(ControlFlow::Break(()));
                };
                trees
                    .entry(partition)
                    .or_default()
                    .update(leaf, None, Some(&hash));
                count += 1;
                Ok(ControlFlow::Continue(()))
            },
        )?;
        if malformed {
            tracing::warn!("malformed anti-entropy index entry; rebuilding from objects");
            return Ok(None);
        }
        *self.trees.lock() = trees;
        Ok(Some(count))
    }

    /// Clear the index, then hash every object into the trees and the index.
    fn rebuild_from_objects(&self) -> Result<u64, String> {
        let storage = self.storage.as_ref();
        storage
            .delete(Table::Meta, KEY_INDEX_BUILT, Durability::Fsync)
            .map_err(|e| e.to_string())?;
        for table in [
            Table::AaeIndex,
            Table::Tombstones,
            Table::Index,
            Table::Expiry,
        ] {
            loop {
                let page = storage
                    .scan(table, &[], None, REBUILD_SCAN_PAGE)
                    .map_err(|e| e.to_string())?;
                if page.is_empty() {
                    break;
                }
                for (index_key, _) in &page {
                    storage
                        .delete(table, index_key, Durability::Buffered)
                        .map_err(|e| e.to_string())?;
                }
            }
        }
        let mut trees: HashMap<PartitionId, MerkleTree> = HashMap::new();
        let mut count = 0;
        for_each_entry(storage, Table::Objects, &[], |storage_key, value| {
            let Some((bucket, key)) = keys::split_object_key(storage_key) else {
                return Ok(ControlFlow::Continue(()));
            };
            let hash = entry_hash(bucket, key, value);
            let (partition, leaf) = (self.partition_of(bucket, key), leaf_of(bucket, key));
            trees
                .entry(partition)
                .or_default()
                .update(leaf, None, Some(&hash));
            storage
                .put(
                    Table::AaeIndex,
                    &keys::aae_index_key(partition, leaf, storage_key),
                    &hash,
                    Durability::Buffered,
                )
                .map_err(|e| e.to_string())?;
            if is_tombstone(value) {
                storage
                    .put(Table::Tombstones, storage_key, &[], Durability::Buffered)
                    .map_err(|e| e.to_string())?;
            }
            self.update_value_tables((storage_key, bucket, key), None, Some(value))?;
            count += 1;
            Ok(ControlFlow::Continue(()))
        })?;
        storage.sync().map_err(|e| e.to_string())?;
        storage
            .put(Table::Meta, KEY_INDEX_BUILT, b"1", Durability::Fsync)
            .map_err(|e| e.to_string())?;
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

    /// The root hash of a partition's tree (an empty tree's when absent).
    pub fn root(&self, partition: PartitionId) -> Hash {
        self.trees
            .lock()
            .get(&partition)
            .map_or_else(|| MerkleTree::new().root(), MerkleTree::root)
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::keys;
    use crate::merkle;
    use crate::merkle::{Hash, entry_hash, leaf_of};
    use crate::object::{Content, Object, PrunePolicy};
    use crate::ring::Ring;
    use crate::ring::{NodeId, RingNode};
    use crate::storage::{Durability, Storage, Table};
    use crate::test_support::MapStorage;
    use crate::version::ActorId;
    use crate::version::VersionVector;
    use std::collections::BTreeSet;
    use std::sync::Arc;

    fn ring() -> Ring {
        Ring::new(
            8,
            RingNode {
                id: NodeId("n1".into()),
                zone: String::new(),
            },
        )
        .unwrap()
    }

    fn object(value: &str, deleted: bool) -> Vec<u8> {
        let content = if deleted {
            Content::tombstone(1)
        } else {
            Content {
                value: value.as_bytes().to_vec(),
                last_modified_ms: 1,
                ..Content::default()
            }
        };
        Object::new()
            .update(
                &VersionVector::default(),
                content,
                ActorId(1),
                1,
                PrunePolicy::default(),
            )
            .unwrap()
            .encode()
    }

    /// Store an object the way the replica does: write it, then tell the trees.
    fn store(trees: &AaeTrees, storage: &dyn Storage, key: &str, new: Option<&[u8]>) {
        let storage_key = keys::object_key(b"b", key.as_bytes());
        let old = storage.get(Table::Objects, &storage_key).unwrap();
        match new {
            Some(bytes) => storage
                .put(Table::Objects, &storage_key, bytes, Durability::Buffered)
                .unwrap(),
            None => storage
                .delete(Table::Objects, &storage_key, Durability::Buffered)
                .unwrap(),
        }
        trees.observe(&storage_key, old.as_deref(), new);
    }

    fn all_segments(trees: &AaeTrees) -> Vec<Vec<Hash>> {
        (0..8).map(|p| trees.segments(p)).collect()
    }

    #[test]
    fn index_lists_leaf_keys_and_rebuilds_the_same_trees() {
        let storage: Arc<dyn Storage> = Arc::new(MapStorage::default());
        let trees = AaeTrees::new(ring(), Arc::clone(&storage));
        // A new store: nothing to trust, so the objects are read (there are none).
        assert!(!trees.rebuild(true).unwrap().from_index);
        for i in 0..200 {
            store(
                &trees,
                storage.as_ref(),
                &format!("k{i}"),
                Some(&object("v", false)),
            );
        }
        store(&trees, storage.as_ref(), "k7", Some(&object("v2", false)));
        store(&trees, storage.as_ref(), "k8", None);
        store(&trees, storage.as_ref(), "k9", Some(&object("", true)));

        // Every key is listed under its own partition and leaf, with its current hash.
        let mut listed = 0;
        for partition in 0..8 {
            let leaves: BTreeSet<u16> = (0..merkle::LEAVES as u16).collect();
            let (keys, cut) = trees.leaf_keys(partition, &leaves, usize::MAX).unwrap();
            assert!(!cut);
            for (bucket, key, hash) in &keys {
                assert_eq!(
                    trees.partition_of(bucket.as_bytes(), key.as_bytes()),
                    partition
                );
                let bytes = storage
                    .get(Table::Objects, &keys::object_key(b"b", key.as_bytes()))
                    .unwrap()
                    .unwrap();
                assert_eq!(*hash, entry_hash(b"b", key.as_bytes(), &bytes));
            }
            listed += keys.len();
        }
        assert_eq!(listed, 199, "200 keys, one removed");
        // One leaf alone lists only its keys; a limit cuts the list and says so.
        let one_leaf = leaf_of(b"b", b"k1");
        let partition = trees.partition_of(b"b", b"k1");
        let (keys, _) = trees
            .leaf_keys(partition, &BTreeSet::from([one_leaf]), usize::MAX)
            .unwrap();
        assert!(keys.iter().any(|(_, k, _)| k == "k1"));
        assert!(
            keys.iter()
                .all(|(b, k, _)| leaf_of(b.as_bytes(), k.as_bytes()) == one_leaf)
        );
        let everything: BTreeSet<u16> = (0..merkle::LEAVES as u16).collect();
        let (keys, cut) = trees.leaf_keys(partition, &everything, 3).unwrap();
        assert_eq!((keys.len(), cut), (3, true));

        // Only the tombstone is on the tombstone list.
        let tombstones = storage.scan(Table::Tombstones, &[], None, 100).unwrap();
        assert_eq!(tombstones.len(), 1);
        assert_eq!(tombstones[0].0, keys::object_key(b"b", b"k9"));
        store(&trees, storage.as_ref(), "k9", Some(&object("back", false)));
        assert!(
            storage
                .scan(Table::Tombstones, &[], None, 100)
                .unwrap()
                .is_empty()
        );
        store(&trees, storage.as_ref(), "k9", Some(&object("", true)));
        let live = all_segments(&trees);

        // After a clean stop the index is trusted and gives the same trees.
        let trusted = AaeTrees::new(ring(), Arc::clone(&storage));
        let report = trusted.rebuild(true).unwrap();
        assert!(report.from_index);
        assert_eq!(report.entries, 199);
        assert_eq!(all_segments(&trusted), live);
    }

    /// A write's old object is hashed out of its leaf with the hash remembered from the write
    /// that stored it, and only when the old bytes are those: bytes that changed under the
    /// memo (same key, other bytes) are hashed again, so the leaf stays exact; and the memo
    /// stays bounded.
    #[test]
    fn the_old_objects_hash_is_reused_only_for_the_same_bytes() {
        let storage: Arc<dyn Storage> = Arc::new(MapStorage::default());
        let trees = AaeTrees::new(ring(), Arc::clone(&storage));
        let storage_key = keys::object_key(b"b", b"k");
        let (a, b, c) = (object("a", false), object("b", false), object("c", false));
        assert_eq!(
            a.len(),
            b.len(),
            "same length: only the CRC tells them apart"
        );
        trees.observe(&storage_key, None, Some(&a));
        // The stored bytes were b, not the a the memo remembers.
        trees.observe(&storage_key, Some(&b), Some(&c));
        let mut expected = MerkleTree::new();
        let leaf = leaf_of(b"b", b"k");
        let hash = |bytes: &[u8]| entry_hash(b"b", b"k", bytes);
        expected.update(leaf, None, Some(&hash(&a)));
        expected.update(leaf, Some(&hash(&b)), Some(&hash(&c)));
        let partition = trees.partition_of(b"b", b"k");
        assert_eq!(trees.segments(partition), expected.segments());
        // The usual case: the old bytes are the last written, and the leaf is exact too.
        let d = object("d", false);
        trees.observe(&storage_key, Some(&c), Some(&d));
        expected.update(leaf, Some(&hash(&c)), Some(&hash(&d)));
        assert_eq!(trees.segments(partition), expected.segments());
        trees.observe(&storage_key, Some(&d), None);
        assert!(!trees.recent.lock().contains_key(storage_key.as_slice()));

        for i in 0..MAX_RECENT_HASHES + 10 {
            let key = keys::object_key(b"b", format!("k{i}").as_bytes());
            trees.observe(&key, None, Some(&a));
        }
        assert!(trees.recent.lock().len() <= MAX_RECENT_HASHES);
    }

    #[test]
    fn an_unclean_stop_rebuilds_the_index_from_the_objects() {
        let storage: Arc<dyn Storage> = Arc::new(MapStorage::default());
        let trees = AaeTrees::new(ring(), Arc::clone(&storage));
        trees.rebuild(false).unwrap();
        for i in 0..50 {
            store(
                &trees,
                storage.as_ref(),
                &format!("k{i}"),
                Some(&object("v", false)),
            );
        }
        // A crash lost the index entry of one write but kept the object (and an index entry
        // for an object that is gone): only a rebuild from the objects is right.
        let kept = keys::object_key(b"b", b"crash");
        storage
            .put(
                Table::Objects,
                &kept,
                &object("x", true),
                Durability::Buffered,
            )
            .unwrap();
        let gone = keys::object_key(b"b", b"k3");
        storage
            .delete(Table::Objects, &gone, Durability::Buffered)
            .unwrap();

        let restarted = AaeTrees::new(ring(), Arc::clone(&storage));
        let report = restarted.rebuild(false).unwrap();
        assert!(!report.from_index);
        assert_eq!(report.entries, 50);
        let partition = restarted.partition_of(b"b", b"crash");
        let leaves = BTreeSet::from([leaf_of(b"b", b"crash")]);
        let (keys, _) = restarted.leaf_keys(partition, &leaves, usize::MAX).unwrap();
        assert!(keys.iter().any(|(_, k, _)| k == "crash"));
        let partition = restarted.partition_of(b"b", b"k3");
        let leaves = BTreeSet::from([leaf_of(b"b", b"k3")]);
        let (keys, _) = restarted.leaf_keys(partition, &leaves, usize::MAX).unwrap();
        assert!(keys.iter().all(|(_, k, _)| k != "k3"));
        let tombstones = storage.scan(Table::Tombstones, &[], None, 100).unwrap();
        assert_eq!(tombstones.len(), 1);
        assert_eq!(tombstones[0].0, kept);

        // The rebuilt index is trusted by the next clean start, with the same trees.
        let again = AaeTrees::new(ring(), Arc::clone(&storage));
        assert!(again.rebuild(true).unwrap().from_index);
        assert_eq!(all_segments(&again), all_segments(&restarted));
    }

    /// A write whose secondary index or expiry entry could not be written (the engine
    /// failed on that table) leaves the object stored without it: the failure clears the
    /// index-built mark, so the next start rebuilds every derived table from the objects and
    /// the entry is there again (an index query or the expiry sweep never misses it for good).
    #[test]
    fn a_failed_index_or_expiry_write_is_repaired_by_the_next_start() {
        for table in [Table::Index, Table::Expiry] {
            let storage = Arc::new(MapStorage::default());
            let trees = AaeTrees::new(ring(), Arc::clone(&storage) as Arc<dyn Storage>);
            trees.rebuild(false).unwrap();
            assert!(storage.get(Table::Meta, KEY_INDEX_BUILT).unwrap().is_some());
            let content = Content {
                value: b"v".to_vec(),
                last_modified_ms: 1,
                indexes: vec![("age_int".into(), b"42".to_vec())],
                expires_ms: Some(5_000),
                ..Content::default()
            };
            let bytes = Object::new()
                .update(
                    &VersionVector::default(),
                    content,
                    ActorId(1),
                    1,
                    PrunePolicy::default(),
                )
                .unwrap()
                .encode();
            *storage.failing_table.lock() = Some(table);
            store(&trees, storage.as_ref(), "k", Some(&bytes));
            *storage.failing_table.lock() = None;
            let derived = |storage: &MapStorage| storage.scan(table, &[], None, 10).unwrap().len();
            assert_eq!(
                derived(&storage),
                0,
                "{table:?}: the injected failure wrote nothing"
            );
            assert!(
                storage.get(Table::Meta, KEY_INDEX_BUILT).unwrap().is_none(),
                "{table:?}: the failure must clear the index-built mark"
            );
            // The next start trusts only a marked index: it rebuilds, entry included.
            let restarted = AaeTrees::new(ring(), Arc::clone(&storage) as Arc<dyn Storage>);
            let report = restarted.rebuild(true).unwrap();
            assert!(!report.from_index, "{table:?}");
            assert_eq!(derived(&storage), 1, "{table:?}: rebuilt from the object");
            assert!(storage.get(Table::Meta, KEY_INDEX_BUILT).unwrap().is_some());
        }
    }
}
