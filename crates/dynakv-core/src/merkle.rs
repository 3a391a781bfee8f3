//! Merkle trees for active anti-entropy: one per (partition, n_val) a node replicates.
//!
//! A tree has `LEAVES` leaves under `SEGMENTS` segments under one root. A key lands in the
//! leaf given by its hash; a leaf's value is the XOR of the entry hashes (key and object bytes)
//! of its keys, so a write updates the tree in O(1) (XOR the old entry out, the new one in)
//! without rebuilding it. Segment and root hashes are computed from the leaves on demand.
//!
//! Invariants: a tree's leaves depend only on the set of (key, object) entries, not on the
//! order they were added in; two replicas with the same entries have equal roots; `diff`
//! returns exactly the leaves whose entries differ (up to hash collisions).

use serde::{Deserialize, Serialize};

/// Leaves per tree.
pub const LEAVES: usize = 1024;
/// Segments (second level) per tree; each covers `LEAVES / SEGMENTS` leaves.
pub const SEGMENTS: usize = 32;
/// Leaves per segment.
pub const LEAVES_PER_SEGMENT: usize = LEAVES / SEGMENTS;
const _: () = assert!(LEAVES.is_multiple_of(SEGMENTS));
const _: () = assert!(LEAVES <= u16::MAX as usize);

/// A 128-bit hash.
pub type Hash = [u8; 16];

/// The hash of one entry: its bucket, key and encoded object.
pub fn entry_hash(bucket: &[u8], key: &[u8], object: &[u8]) -> Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&(bucket.len() as u64).to_le_bytes());
    hasher.update(bucket);
    hasher.update(&(key.len() as u64).to_le_bytes());
    hasher.update(key);
    hasher.update(object);
    truncate(&hasher.finalize())
}

/// The leaf a key belongs to.
pub fn leaf_of(bucket: &[u8], key: &[u8]) -> u16 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"leaf");
    hasher.update(&(bucket.len() as u64).to_le_bytes());
    hasher.update(bucket);
    hasher.update(key);
    let bytes = hasher.finalize();
    let b = bytes.as_bytes();
    (u16::from_le_bytes([b[0], b[1]]) as usize % LEAVES) as u16
}

fn truncate(hash: &blake3::Hash) -> Hash {
    let mut out = [0u8; 16];
    out.copy_from_slice(&hash.as_bytes()[..16]);
    out
}

fn xor(into: &mut Hash, other: &Hash) {
    for (a, b) in into.iter_mut().zip(other) {
        *a ^= b;
    }
}

/// One tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MerkleTree {
    leaves: Vec<Hash>,
    entries: u64,
}

impl Default for MerkleTree {
    fn default() -> Self {
        MerkleTree {
            leaves: vec![[0u8; 16]; LEAVES],
            entries: 0,
        }
    }
}

impl MerkleTree {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of entries (keys) in the tree.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// Record that a key's entry changed from `old` to `new` (either may be absent).
    pub fn update(&mut self, leaf: u16, old: Option<&Hash>, new: Option<&Hash>) {
        let leaf = &mut self.leaves[usize::from(leaf) % LEAVES];
        if let Some(old) = old {
            xor(leaf, old);
            self.entries = self.entries.saturating_sub(1);
        }
        if let Some(new) = new {
            xor(leaf, new);
            self.entries += 1;
        }
    }

    /// The leaf values.
    pub fn leaves(&self) -> &[Hash] {
        &self.leaves
    }

    /// The segment hashes (second level).
    pub fn segments(&self) -> Vec<Hash> {
        self.leaves
            .chunks(LEAVES_PER_SEGMENT)
            .map(|chunk| {
                let mut hasher = blake3::Hasher::new();
                for leaf in chunk {
                    hasher.update(leaf);
                }
                truncate(&hasher.finalize())
            })
            .collect()
    }

    /// The root hash.
    pub fn root(&self) -> Hash {
        let mut hasher = blake3::Hasher::new();
        for segment in self.segments() {
            hasher.update(&segment);
        }
        truncate(&hasher.finalize())
    }

    /// The leaves of the given segments, in order.
    pub fn segment_leaves(&self, segments: &[u16]) -> Vec<(u16, Hash)> {
        let mut out = Vec::new();
        for segment in segments {
            let start = usize::from(*segment) * LEAVES_PER_SEGMENT;
            if start >= LEAVES {
                continue;
            }
            for (i, leaf) in self.leaves[start..start + LEAVES_PER_SEGMENT]
                .iter()
                .enumerate()
            {
                out.push(((start + i) as u16, *leaf));
            }
        }
        out
    }
}

/// Segments whose hashes differ (descend only into these).
pub fn differing_segments(ours: &[Hash], theirs: &[Hash]) -> Vec<u16> {
    (0..SEGMENTS)
        .filter(|i| ours.get(*i) != theirs.get(*i))
        .map(|i| i as u16)
        .collect()
}

/// Leaves whose values differ, given both sides' leaves of the same segments.
pub fn differing_leaves(ours: &[(u16, Hash)], theirs: &[(u16, Hash)]) -> Vec<u16> {
    let theirs: std::collections::HashMap<u16, Hash> = theirs.iter().copied().collect();
    ours.iter()
        .filter(|(leaf, hash)| theirs.get(leaf) != Some(hash))
        .map(|(leaf, _)| *leaf)
        .collect()
}

/// The keys listed with different entry hashes by the two sides of an exchange (present on
/// one side only, or hashed differently), in key order: the keys to repair.
pub fn differing_keys<K: Ord + Clone>(
    ours: &std::collections::BTreeMap<K, Hash>,
    theirs: &std::collections::BTreeMap<K, Hash>,
) -> Vec<K> {
    let mut keys: Vec<K> = ours
        .keys()
        .chain(theirs.keys())
        .filter(|k| ours.get(*k) != theirs.get(*k))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    #[test]
    fn differing_keys_are_the_one_sided_and_the_changed() {
        let ours: BTreeMap<&str, Hash> = [("a", [1; 16]), ("b", [2; 16]), ("c", [3; 16])].into();
        let theirs: BTreeMap<&str, Hash> = [("b", [2; 16]), ("c", [9; 16]), ("d", [4; 16])].into();
        assert_eq!(differing_keys(&ours, &theirs), vec!["a", "c", "d"]);
        assert!(differing_keys(&ours, &ours).is_empty());
    }

    fn tree_of(entries: &BTreeMap<String, Vec<u8>>) -> MerkleTree {
        let mut tree = MerkleTree::new();
        for (key, value) in entries {
            let h = entry_hash(b"b", key.as_bytes(), value);
            tree.update(leaf_of(b"b", key.as_bytes()), None, Some(&h));
        }
        tree
    }

    /// Walk the tree diff like an exchange does and return the keys found to differ.
    fn diff_keys(a: &BTreeMap<String, Vec<u8>>, b: &BTreeMap<String, Vec<u8>>) -> BTreeSet<String> {
        let (ta, tb) = (tree_of(a), tree_of(b));
        if ta.root() == tb.root() {
            return BTreeSet::new();
        }
        let segments = differing_segments(&ta.segments(), &tb.segments());
        let leaves: BTreeSet<u16> =
            differing_leaves(&ta.segment_leaves(&segments), &tb.segment_leaves(&segments))
                .into_iter()
                .collect();
        let in_leaves = |m: &BTreeMap<String, Vec<u8>>| -> BTreeMap<String, Vec<u8>> {
            m.iter()
                .filter(|(k, _)| leaves.contains(&leaf_of(b"b", k.as_bytes())))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        let (la, lb) = (in_leaves(a), in_leaves(b));
        la.keys()
            .chain(lb.keys())
            .filter(|k| la.get(*k) != lb.get(*k))
            .cloned()
            .collect()
    }

    proptest! {
        #[test]
        fn diff_finds_exactly_the_changed_keys(
            base in proptest::collection::btree_map("[a-z]{1,6}", proptest::collection::vec(any::<u8>(), 0..8), 0..200),
            changes in proptest::collection::btree_map("[a-z]{1,6}", proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8)), 0..20),
        ) {
            let mut other = base.clone();
            for (k, v) in &changes {
                match v {
                    Some(v) => { other.insert(k.clone(), v.clone()); }
                    None => { other.remove(k); }
                }
            }
            let expected: BTreeSet<String> = base
                .keys()
                .chain(other.keys())
                .filter(|k| base.get(*k) != other.get(*k))
                .cloned()
                .collect();
            prop_assert_eq!(diff_keys(&base, &other), expected);
        }

        #[test]
        fn incremental_updates_equal_a_rebuild(
            ops in proptest::collection::vec(("[a-d]{1,2}", proptest::option::of(any::<u8>())), 0..100)
        ) {
            let mut live: BTreeMap<String, Vec<u8>> = BTreeMap::new();
            let mut tree = MerkleTree::new();
            for (k, v) in ops {
                let leaf = leaf_of(b"b", k.as_bytes());
                let old = live.get(&k).map(|v| entry_hash(b"b", k.as_bytes(), v));
                let new_value = v.map(|v| vec![v]);
                let new = new_value.as_ref().map(|v| entry_hash(b"b", k.as_bytes(), v));
                tree.update(leaf, old.as_ref(), new.as_ref());
                match new_value {
                    Some(v) => { live.insert(k, v); }
                    None => { live.remove(&k); }
                }
            }
            prop_assert_eq!(tree.root(), tree_of(&live).root());
            prop_assert_eq!(tree.entries(), live.len() as u64);
        }
    }
}
