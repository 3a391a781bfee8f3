//! Secondary indexes (Riak's 2i): index entries a write attaches to its value, kept in a
//! table of their own next to the objects, and queried by exact term or by range.
//!
//! An entry is a name ending in `_bin` (the term is bytes, ordered bytewise) or `_int` (the
//! term is a signed 64-bit integer, ordered numerically) and a term. A version's entries are
//! part of its content (`Content::indexes`) and travel with it; a key's entries are the union
//! of its live siblings' (`object_entries`). Every store of an object on a replica updates the
//! `Index` table with the difference between the old and the new object's entries, in the
//! same storage batch (`Replica`), so entries follow the object through siblings, resolution,
//! deletes, merges, repair, handoff and drops: a tombstone has none.
//!
//! The table's key is `bucket, name, term, key` with the term escaped so that the byte order
//! of table keys is the order of (term, key) (`storage_key`): a range query is one scan.
//! A query covers the ring: each partition once, from one replica that is up
//! (`coverage_plan`); each node answers its share in (term, key) order, and the pages are
//! merged (`merge_pages`), at most `limit` results per page with a continuation.

use crate::message::PeerMessage;
use crate::object::Object;
use crate::ring::{NodeId, PartitionId};
use std::collections::{BTreeMap, BTreeSet};
use thiserror::Error;

/// Most index entries one version carries.
pub const MAX_INDEX_ENTRIES: usize = 128;
/// Longest index name (with its `_bin`/`_int` suffix).
pub const MAX_INDEX_NAME_BYTES: usize = 128;
/// Longest `_bin` term.
pub const MAX_INDEX_TERM_BYTES: usize = 1024;
/// Most results of one page of a query (a query without `max_results` is answered in pages
/// of this many, up to `MAX_INDEX_RESULTS` in all when not streamed).
pub const INDEX_PAGE_RESULTS: usize = 1000;
/// Most results a query that is neither paginated nor streamed returns in one answer.
pub const MAX_INDEX_RESULTS: usize = 100_000;
/// Largest `max_results` a client may ask for.
pub const MAX_PAGE_RESULTS: usize = 10_000;

/// The special index of every key of the bucket (its term is the key).
pub const BUCKET_INDEX: &str = "$bucket";
/// The special index of the keys themselves (its terms are the keys, by range).
pub const KEY_INDEX: &str = "$key";

/// One index entry: the name (lower-case, with its suffix) and the term as given (an
/// `_int`'s in canonical decimal).
pub type IndexEntry = (String, Vec<u8>);

/// Why an index entry or a query was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum IndexError {
    #[error(
        "index name {0:?} must end in _bin or _int (and be at most {MAX_INDEX_NAME_BYTES} bytes)"
    )]
    BadName(String),
    #[error("index {name:?} takes integers: {term:?} is not one")]
    BadInteger { name: String, term: String },
    #[error("an index term is longer than {MAX_INDEX_TERM_BYTES} bytes")]
    TermTooLong,
    #[error("at most {MAX_INDEX_ENTRIES} index entries per value")]
    TooMany,
    #[error("{0}")]
    BadQuery(String),
}

/// Whether `name` is an integer index.
pub fn is_int(name: &str) -> bool {
    name.ends_with("_int")
}

/// Check an entry a client gives; its normal form (lower-case name, canonical integer).
pub fn check_entry(name: &str, term: &[u8]) -> Result<IndexEntry, IndexError> {
    let name = name.to_ascii_lowercase();
    let suffixed = name.ends_with("_bin") || name.ends_with("_int");
    if !suffixed || name.len() <= 4 || name.len() > MAX_INDEX_NAME_BYTES {
        return Err(IndexError::BadName(name));
    }
    if is_int(&name) {
        let value = parse_int(&name, term)?;
        return Ok((name, value.to_string().into_bytes()));
    }
    if term.len() > MAX_INDEX_TERM_BYTES {
        return Err(IndexError::TermTooLong);
    }
    Ok((name, term.to_vec()))
}

fn parse_int(name: &str, term: &[u8]) -> Result<i64, IndexError> {
    std::str::from_utf8(term)
        .ok()
        .and_then(|t| t.trim().parse::<i64>().ok())
        .ok_or_else(|| IndexError::BadInteger {
            name: name.to_owned(),
            term: String::from_utf8_lossy(term).into_owned(),
        })
}

/// Check and normalise a version's entries: each checked, sorted, duplicates dropped, at
/// most [`MAX_INDEX_ENTRIES`].
pub fn normalize(entries: Vec<(String, Vec<u8>)>) -> Result<Vec<IndexEntry>, IndexError> {
    let set: BTreeSet<IndexEntry> = entries
        .into_iter()
        .map(|(name, term)| check_entry(&name, &term))
        .collect::<Result<_, _>>()?;
    if set.len() > MAX_INDEX_ENTRIES {
        return Err(IndexError::TooMany);
    }
    Ok(set.into_iter().collect())
}

/// The sortable form of a term of `name`: an integer's 8 bytes (sign bit flipped, big
/// endian, so byte order is numeric order), a binary term as it is.
pub fn sortable(name: &str, term: &[u8]) -> Result<Vec<u8>, IndexError> {
    if is_int(name) {
        let value = parse_int(name, term)?;
        return Ok((value.cast_unsigned() ^ (1 << 63)).to_be_bytes().to_vec());
    }
    if term.len() > MAX_INDEX_TERM_BYTES {
        return Err(IndexError::TermTooLong);
    }
    Ok(term.to_vec())
}

/// A term back from its sortable form (an integer as decimal text).
pub fn unsortable(name: &str, sortable: &[u8]) -> Vec<u8> {
    if is_int(name)
        && let Ok(bytes) = <[u8; 8]>::try_from(sortable)
    {
        let value = (u64::from_be_bytes(bytes) ^ (1 << 63)).cast_signed();
        return value.to_string().into_bytes();
    }
    sortable.to_vec()
}

/// Every entry of the key: the union of its live siblings' entries.
pub fn object_entries(object: &Object) -> BTreeSet<IndexEntry> {
    object
        .live_siblings()
        .flat_map(|s| s.content.indexes.iter().cloned())
        .collect()
}

/// `Index` table keys start with `len(bucket) bucket len(name) name`.
pub fn prefix(bucket: &[u8], name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(bucket.len() + name.len() + 4);
    out.extend_from_slice(
        &u16::try_from(bucket.len())
            .unwrap_or(u16::MAX)
            .to_be_bytes(),
    );
    out.extend_from_slice(bucket);
    out.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(name.as_bytes());
    out
}

/// A term escaped so that byte order of `escaped(a) 00 01 ...` is the order of the terms:
/// every 0x00 becomes 0x00 0xff.
fn escape(out: &mut Vec<u8>, term: &[u8]) {
    for &b in term {
        out.push(b);
        if b == 0 {
            out.push(0xff);
        }
    }
}

/// The `Index` table key of `key`'s entry `(name, sortable term)` in `bucket`.
pub fn storage_key(bucket: &[u8], name: &str, sortable: &[u8], key: &[u8]) -> Vec<u8> {
    let mut out = prefix(bucket, name);
    escape(&mut out, sortable);
    out.extend_from_slice(&[0, 1]);
    out.extend_from_slice(key);
    out
}

/// Where a scan for terms from `sortable` (inclusive) starts: strictly after this.
pub fn scan_from(bucket: &[u8], name: &str, sortable: &[u8]) -> Vec<u8> {
    let mut out = prefix(bucket, name);
    escape(&mut out, sortable);
    out
}

/// The sortable term and the key of an `Index` table key under `prefix_len` bytes of prefix.
pub fn split_storage_key(bytes: &[u8], prefix_len: usize) -> Option<(Vec<u8>, String)> {
    let rest = bytes.get(prefix_len..)?;
    let mut term = Vec::new();
    let mut i = 0;
    loop {
        match (rest.get(i), rest.get(i + 1)) {
            (Some(0), Some(0xff)) => {
                term.push(0);
                i += 2;
            }
            (Some(0), Some(1)) => {
                let key = String::from_utf8(rest.get(i + 2..)?.to_vec()).ok()?;
                return Some((term, key));
            }
            (Some(0) | None, _) => return None,
            (Some(b), _) => {
                term.push(*b);
                i += 1;
            }
        }
    }
}

/// The table writes that take a key from `old`'s entries to `new`'s: deletes of the entries
/// gone, puts (empty values) of the new ones.
pub fn delta(
    bucket: &[u8],
    key: &[u8],
    old: &BTreeSet<IndexEntry>,
    new: &BTreeSet<IndexEntry>,
) -> Vec<(Vec<u8>, bool)> {
    let table_key = |(name, term): &IndexEntry| {
        sortable(name, term)
            .ok()
            .map(|s| storage_key(bucket, name, &s, key))
    };
    let mut out = Vec::new();
    for gone in old.difference(new) {
        if let Some(k) = table_key(gone) {
            out.push((k, false));
        }
    }
    for added in new.difference(old) {
        if let Some(k) = table_key(added) {
            out.push((k, true));
        }
    }
    out
}

/// One query: an index of a bucket, terms from `start` to `end` (inclusive, sortable form),
/// after `after` (a continuation: the last (sortable term, key) of the previous page).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub bucket: String,
    pub index: String,
    pub start: Vec<u8>,
    pub end: Vec<u8>,
    pub after: Option<(Vec<u8>, String)>,
    pub limit: usize,
}

impl Query {
    /// A query of `index` in `bucket` for `start` (with `end`: a range), after a
    /// continuation; `$bucket` and `$key` are the special indexes. Checks the index name and
    /// the terms.
    pub fn new(
        bucket: &str,
        index: &str,
        (start, end): (&[u8], Option<&[u8]>),
        continuation: Option<&str>,
        limit: usize,
    ) -> Result<Query, IndexError> {
        let index = index.to_ascii_lowercase();
        let (start, end) = match index.as_str() {
            BUCKET_INDEX => (Vec::new(), vec![0xff; crate::limits::MAX_KEY_BYTES + 1]),
            KEY_INDEX => (start.to_vec(), end.unwrap_or(start).to_vec()),
            name => {
                check_entry(name, start)?;
                let s = sortable(name, start)?;
                let e = match end {
                    Some(end) => sortable(name, end)?,
                    None => s.clone(),
                };
                (s, e)
            }
        };
        let after = continuation.map(decode_continuation).transpose()?;
        Ok(Query {
            bucket: bucket.to_owned(),
            index,
            start,
            end,
            after,
            limit: limit.clamp(1, MAX_PAGE_RESULTS),
        })
    }

    /// Whether the query reads the objects' keys rather than the `Index` table.
    pub fn on_keys(&self) -> bool {
        self.index == BUCKET_INDEX || self.index == KEY_INDEX
    }
}

/// One result: the sortable term and the key.
pub type Hit = (Vec<u8>, String);

/// A continuation: base64 of the last result of a page.
pub fn encode_continuation((term, key): &Hit) -> String {
    use base64::Engine as _;
    let mut bytes = Vec::with_capacity(term.len() + key.len() + 4);
    bytes.extend_from_slice(&u32::try_from(term.len()).unwrap_or(u32::MAX).to_be_bytes());
    bytes.extend_from_slice(term);
    bytes.extend_from_slice(key.as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn decode_continuation(text: &str) -> Result<Hit, IndexError> {
    use base64::Engine as _;
    let bad = || IndexError::BadQuery("the continuation is not one this cluster gave".into());
    if text.len() > 4 * (MAX_INDEX_TERM_BYTES + crate::limits::MAX_KEY_BYTES) {
        return Err(bad());
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text.trim())
        .map_err(|_| bad())?;
    let (len, rest) = bytes.split_first_chunk::<4>().ok_or_else(bad)?;
    let len = u32::from_be_bytes(*len) as usize;
    let term = rest.get(..len).ok_or_else(bad)?.to_vec();
    let key = String::from_utf8(rest.get(len..).ok_or_else(bad)?.to_vec()).map_err(|_| bad())?;
    Ok((term, key))
}

/// Which node answers for which partitions: each partition of the ring once, from the first
/// replica of its preference list (`n_val` long) that is up, `me` first when it is one.
/// `Err`: the partitions no replica that is up holds (a query would miss their keys).
pub fn coverage_plan(
    state: &crate::membership::ClusterState,
    n_val: u32,
    me: &NodeId,
    is_up: impl Fn(&NodeId) -> bool,
) -> Result<BTreeMap<NodeId, Vec<PartitionId>>, Vec<PartitionId>> {
    let ring = &state.ring.current;
    let mut plan: BTreeMap<NodeId, Vec<PartitionId>> = BTreeMap::new();
    let mut uncovered = Vec::new();
    for partition in 0..ring.partition_count() {
        let replicas: Vec<NodeId> = state
            .preference_list(partition, n_val)
            .into_iter()
            .filter(|n| n == me || is_up(n))
            .collect();
        let chosen = if replicas.contains(me) {
            Some(me.clone())
        } else {
            replicas.into_iter().next()
        };
        match chosen {
            Some(node) => plan.entry(node).or_default().push(partition),
            None => uncovered.push(partition),
        }
    }
    if uncovered.is_empty() {
        Ok(plan)
    } else {
        Err(uncovered)
    }
}

/// Merge the nodes' pages (each sorted, each at most `limit` long) into the first `limit`
/// results overall, and whether more may follow (some node had a full page, or results were
/// cut).
pub fn merge_pages(pages: Vec<Vec<Hit>>, limit: usize) -> (Vec<Hit>, bool) {
    let full = pages.iter().any(|p| p.len() >= limit);
    let merged: BTreeSet<Hit> = pages.into_iter().flatten().collect();
    let more = full || merged.len() > limit;
    (merged.into_iter().take(limit).collect(), more)
}

impl Query {
    /// The request for `node`'s share: the keys of `partitions`.
    pub fn message(&self, partitions: Vec<PartitionId>, partition_count: u32) -> PeerMessage {
        PeerMessage::IndexQuery(Box::new(crate::message::IndexRequest {
            bucket: self.bucket.clone(),
            index: self.index.clone(),
            start: self.start.clone(),
            end: self.end.clone(),
            after: self.after.clone(),
            limit: u32::try_from(self.limit).unwrap_or(u32::MAX),
            partitions,
            partition_count,
        }))
    }
}

/// A node's answer to an `IndexQuery` (the server's and the simulator's): its results among
/// the keys of the asked partitions, or why the query was refused (a bound past its limit).
pub fn answer(replica: &crate::replica::Replica, message: PeerMessage) -> PeerMessage {
    let PeerMessage::IndexQuery(request) = message else {
        return PeerMessage::Error(format!("unexpected request {}", message.name()));
    };
    let crate::message::IndexRequest {
        bucket,
        index,
        start,
        end,
        after,
        limit,
        partitions,
        partition_count,
    } = *request;
    let limit = limit as usize;
    let term_limit = MAX_INDEX_TERM_BYTES.max(crate::limits::MAX_KEY_BYTES + 1);
    if limit == 0
        || limit > MAX_PAGE_RESULTS
        || !partition_count.is_power_of_two()
        || partitions.iter().any(|p| *p >= partition_count)
        || start.len() > term_limit
        || end.len() > term_limit
        || after.as_ref().is_some_and(|(t, _)| t.len() > term_limit)
    {
        return PeerMessage::Error("index query out of bounds".into());
    }
    let partitions: BTreeSet<PartitionId> = partitions.into_iter().collect();
    let keep = |key: &str| {
        let hash = crate::ring::key_hash(bucket.as_bytes(), key.as_bytes());
        partitions.contains(&crate::ring::partition_of_hash_in(partition_count, &hash))
    };
    let query = Query {
        bucket: bucket.clone(),
        index,
        start,
        end,
        after,
        limit,
    };
    match replica.index_page(&query, &keep) {
        Ok(hits) => PeerMessage::IndexPage { hits },
        Err(e) => PeerMessage::Error(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn integer_terms_sort_numerically_and_keys_sort_by_term_then_key() {
        let mut keys: Vec<(i64, &str)> = vec![(-5, "a"), (3, "b"), (-100, "c"), (3, "a"), (0, "z")];
        let mut table: Vec<Vec<u8>> = keys
            .iter()
            .map(|(t, k)| {
                let s = sortable("age_int", t.to_string().as_bytes()).unwrap();
                storage_key(b"b", "age_int", &s, k.as_bytes())
            })
            .collect();
        table.sort();
        keys.sort_unstable();
        let prefix_len = prefix(b"b", "age_int").len();
        let back: Vec<(i64, String)> = table
            .iter()
            .map(|k| {
                let (term, key) = split_storage_key(k, prefix_len).unwrap();
                let text = String::from_utf8(unsortable("age_int", &term)).unwrap();
                (text.parse().unwrap(), key)
            })
            .collect();
        let expected: Vec<(i64, String)> =
            keys.iter().map(|(t, k)| (*t, (*k).to_owned())).collect();
        assert_eq!(back, expected);
    }

    #[test]
    fn binary_terms_with_zero_bytes_and_prefixes_keep_their_order() {
        let terms: Vec<&[u8]> = vec![b"a", b"a\0", b"a\0\0", b"ab", b"", b"\0", b"b"];
        let mut table: Vec<(Vec<u8>, &[u8])> = terms
            .iter()
            .map(|t| (storage_key(b"b", "x_bin", t, b"k"), *t))
            .collect();
        table.sort();
        let mut sorted = terms.clone();
        sorted.sort();
        assert_eq!(table.iter().map(|(_, t)| *t).collect::<Vec<_>>(), sorted);
        let prefix_len = prefix(b"b", "x_bin").len();
        for (key, term) in &table {
            assert_eq!(
                split_storage_key(key, prefix_len).unwrap(),
                (term.to_vec(), "k".into())
            );
            // A scan from a term starts at it, not after it.
            assert!(scan_from(b"b", "x_bin", term) < *key);
        }
    }

    #[test]
    fn bad_entries_and_queries_are_refused() {
        assert!(matches!(
            check_entry("age", b"1"),
            Err(IndexError::BadName(_))
        ));
        assert!(matches!(
            check_entry("_int", b"1"),
            Err(IndexError::BadName(_))
        ));
        assert!(matches!(
            check_entry("age_int", b"x"),
            Err(IndexError::BadInteger { .. })
        ));
        assert_eq!(
            check_entry("Age_INT", b" 007").unwrap(),
            ("age_int".into(), b"7".to_vec())
        );
        assert_eq!(
            check_entry("n_bin", &[0; 2000]),
            Err(IndexError::TermTooLong)
        );
        let many: Vec<(String, Vec<u8>)> = (0..200)
            .map(|i| ("n_int".into(), i.to_string().into_bytes()))
            .collect();
        assert_eq!(normalize(many), Err(IndexError::TooMany));
        assert!(Query::new("b", "n_int", (b"1", None), Some("!!"), 10).is_err());
        let hit = (b"t".to_vec(), "k".to_owned());
        let q = Query::new(
            "b",
            "n_bin",
            (b"a", Some(b"z")),
            Some(&encode_continuation(&hit)),
            10,
        )
        .unwrap();
        assert_eq!(q.after, Some(hit));
    }

    #[test]
    fn pages_merge_in_order_and_say_when_more_may_follow() {
        let hit = |t: &str, k: &str| (t.as_bytes().to_vec(), k.to_owned());
        let (merged, more) = merge_pages(
            vec![vec![hit("a", "1"), hit("c", "3")], vec![hit("b", "2")]],
            2,
        );
        assert_eq!(merged, vec![hit("a", "1"), hit("b", "2")]);
        assert!(more);
        let (merged, more) = merge_pages(vec![vec![hit("a", "1")], vec![]], 5);
        assert_eq!(merged.len(), 1);
        assert!(!more);
    }

    /// A peer's index query past its bounds is refused before any scan (a hostile or broken
    /// peer cannot make a node read without limit or index outside its ring).
    #[test]
    fn a_peer_query_out_of_bounds_is_refused() {
        let storage = std::sync::Arc::new(crate::test_support::MapStorage::default());
        let replica = crate::replica::Replica::new(
            storage,
            crate::version::ActorId(1),
            std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
        );
        let ok = Query::new("b", "n_int", (b"1", Some(b"9")), None, 10).unwrap();
        assert!(matches!(
            answer(&replica, ok.message(vec![0, 1], 4)),
            PeerMessage::IndexPage { .. }
        ));
        let mut limit_zero = ok.clone();
        limit_zero.limit = 0;
        let mut huge = ok.clone();
        huge.limit = MAX_PAGE_RESULTS + 1;
        let mut long_term = ok.clone();
        long_term.start = vec![0; 4096];
        for message in [
            limit_zero.message(vec![0], 4),
            huge.message(vec![0], 4),
            long_term.message(vec![0], 4),
            ok.message(vec![4], 4),
            ok.message(vec![0], 3),
            PeerMessage::Ack,
        ] {
            assert!(matches!(answer(&replica, message), PeerMessage::Error(_)));
        }
    }
}
