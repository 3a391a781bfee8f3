//! The anti-entropy trees live in `dynakv_core::aae_trees` (shared with the simulator), and
//! the per-partition exchange records in `dynakv_core::anti_entropy`; this module
//! re-exports them.

pub use dynakv_core::aae_trees::*;
pub use dynakv_core::anti_entropy::AaeRecord;

#[cfg(test)]
mod tests {
    use super::*;
    use dynakv_core::keys;
    use dynakv_core::merkle;
    use dynakv_core::merkle::{Hash, entry_hash, leaf_of};
    use dynakv_core::object::{Content, Object, PrunePolicy};
    use dynakv_core::ring::Ring;
    use dynakv_core::ring::{NodeId, RingNode};
    use dynakv_core::storage::{Durability, Storage, Table};
    use dynakv_core::version::ActorId;
    use dynakv_core::version::VersionVector;
    use dynakv_storage::MemoryStorage;
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
        let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
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

    #[test]
    fn an_unclean_stop_rebuilds_the_index_from_the_objects() {
        let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
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
}
