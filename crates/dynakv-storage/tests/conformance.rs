//! The conformance suite: every engine must pass every case here.
//!
//! Each case is a generic function over a [`Harness`] (how to open an engine in a directory);
//! the `conformance!` macro instantiates all cases as `#[test]`s in one module per engine:
//! `memory`, `faulty_memory` (the fault wrapper with no fault armed), `fjall`, and with the
//! `redb` feature `redb`. Run with
//! `cargo test -p dynakv-storage --all-features --test conformance`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test file: panicking is failing

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use dynakv_storage::{
    BufferedStorage, Durability, FaultyStorage, FjallOptions, FjallStorage, MAX_STORAGE_KEY_BYTES,
    MemoryStorage, PutError, Storage, Table,
};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use tempfile::TempDir;

/// How a case opens the engine under test.
trait Harness {
    type Engine: Storage + 'static;
    /// Whether data survives closing and reopening the engine in the same directory.
    const PERSISTENT: bool;
    fn open(dir: &Path) -> Self::Engine;
}

struct Memory;
impl Harness for Memory {
    type Engine = MemoryStorage;
    const PERSISTENT: bool = false;
    fn open(_dir: &Path) -> MemoryStorage {
        MemoryStorage::new()
    }
}

struct FaultyMemory;
impl Harness for FaultyMemory {
    type Engine = FaultyStorage<MemoryStorage>;
    const PERSISTENT: bool = false;
    fn open(_dir: &Path) -> Self::Engine {
        FaultyStorage::new(MemoryStorage::new())
    }
}

struct BufferedFjall;
impl Harness for BufferedFjall {
    type Engine = BufferedStorage<FjallStorage>;
    const PERSISTENT: bool = true;
    fn open(dir: &Path) -> Self::Engine {
        BufferedStorage::new(Fjall::open(dir))
    }
}

struct BufferedMemory;
impl Harness for BufferedMemory {
    type Engine = BufferedStorage<MemoryStorage>;
    const PERSISTENT: bool = false;
    fn open(_dir: &Path) -> Self::Engine {
        BufferedStorage::new(MemoryStorage::new())
    }
}

struct Fjall;
impl Harness for Fjall {
    type Engine = FjallStorage;
    const PERSISTENT: bool = true;
    fn open(dir: &Path) -> FjallStorage {
        let options = FjallOptions {
            cache_size_bytes: 8 * 1024 * 1024,
            max_memtable_size_bytes: 4 * 1024 * 1024,
            worker_threads: Some(1),
            ..FjallOptions::default()
        };
        FjallStorage::open(dir, options).unwrap()
    }
}

#[cfg(feature = "redb")]
struct Redb;
#[cfg(feature = "redb")]
impl Harness for Redb {
    type Engine = dynakv_storage::RedbStorage;
    const PERSISTENT: bool = true;
    fn open(dir: &Path) -> Self::Engine {
        let options = dynakv_storage::RedbOptions {
            cache_size_bytes: 8 * 1024 * 1024,
        };
        dynakv_storage::RedbStorage::open(dir, options).unwrap()
    }
}

/// A fresh engine in a fresh directory (the directory must outlive the engine).
fn fresh<H: Harness>() -> (TempDir, H::Engine) {
    let dir = tempfile::tempdir().unwrap();
    let engine = H::open(dir.path());
    (dir, engine)
}

fn get(engine: &impl Storage, table: Table, key: &[u8]) -> Option<Vec<u8>> {
    engine.get(table, key).unwrap()
}

fn put(engine: &impl Storage, table: Table, key: &[u8], value: &[u8]) {
    engine.put(table, key, value, Durability::Fsync).unwrap();
}

fn keys(entries: &[(Vec<u8>, Vec<u8>)]) -> Vec<&[u8]> {
    entries.iter().map(|(key, _)| key.as_slice()).collect()
}

mod cases {
    use super::*;

    pub fn get_put_overwrite_delete<H: Harness>() {
        let (_dir, engine) = fresh::<H>();
        for durability in [Durability::Fsync, Durability::Buffered] {
            assert_eq!(get(&engine, Table::Objects, b"k"), None);
            engine
                .put(Table::Objects, b"k", b"one", durability)
                .unwrap();
            assert_eq!(get(&engine, Table::Objects, b"k"), Some(b"one".to_vec()));
            engine
                .put(Table::Objects, b"k", b"two", durability)
                .unwrap();
            assert_eq!(get(&engine, Table::Objects, b"k"), Some(b"two".to_vec()));
            engine.delete(Table::Objects, b"k", durability).unwrap();
            assert_eq!(get(&engine, Table::Objects, b"k"), None);
            // Deleting an absent key is not an error, in either durability.
            engine.delete(Table::Objects, b"k", durability).unwrap();
            engine.delete(Table::Objects, b"never", durability).unwrap();
            assert_eq!(get(&engine, Table::Objects, b"k"), None);
        }
        engine.sync().unwrap();
        assert!(!engine.engine_name().is_empty());
    }

    pub fn binary_keys_and_values<H: Harness>() {
        let (_dir, engine) = fresh::<H>();
        let key = [0u8, 0xFF, 0, 1];
        let value = [0xFFu8, 0, 0, 0xFE];
        put(&engine, Table::Objects, &key, &value);
        assert_eq!(get(&engine, Table::Objects, &key), Some(value.to_vec()));
        // A key that is a prefix of another is distinct from it.
        put(&engine, Table::Objects, &key[..2], b"short");
        assert_eq!(get(&engine, Table::Objects, &key), Some(value.to_vec()));
        assert_eq!(
            get(&engine, Table::Objects, &key[..2]),
            Some(b"short".to_vec())
        );
    }

    pub fn key_limits<H: Harness>() {
        let (_dir, engine) = fresh::<H>();
        let longest = vec![7u8; MAX_STORAGE_KEY_BYTES];
        put(&engine, Table::Objects, &longest, b"v");
        assert_eq!(get(&engine, Table::Objects, &longest), Some(b"v".to_vec()));

        let too_long = vec![7u8; MAX_STORAGE_KEY_BYTES + 1];
        for bad in [&b""[..], &too_long[..]] {
            let result = engine.put(Table::Objects, bad, b"v", Durability::Fsync);
            assert!(matches!(result, Err(PutError::Engine(_))), "{result:?}");
            assert_eq!(get(&engine, Table::Objects, bad), None);
            engine
                .delete(Table::Objects, bad, Durability::Fsync)
                .unwrap();
        }
        // The failed puts wrote nothing.
        let all = engine.scan(Table::Objects, b"", None, 10).unwrap();
        assert_eq!(all.len(), 1);
    }

    pub fn tables_are_isolated<H: Harness>() {
        let (_dir, engine) = fresh::<H>();
        for (index, table) in Table::ALL.into_iter().enumerate() {
            put(&engine, table, b"shared", table.name().as_bytes());
            put(&engine, table, format!("only-{index}").as_bytes(), b"x");
        }
        for (index, table) in Table::ALL.into_iter().enumerate() {
            assert_eq!(
                get(&engine, table, b"shared"),
                Some(table.name().as_bytes().to_vec())
            );
            let scanned = engine.scan(table, b"", None, 100).unwrap();
            let expected_only = format!("only-{index}");
            assert_eq!(keys(&scanned), vec![expected_only.as_bytes(), b"shared"]);
        }
        engine
            .delete(Table::Objects, b"shared", Durability::Fsync)
            .unwrap();
        assert_eq!(get(&engine, Table::Objects, b"shared"), None);
        assert_eq!(get(&engine, Table::Meta, b"shared"), Some(b"meta".to_vec()));
    }

    pub fn scan_order_prefix_start_after_limit<H: Harness>() {
        let (_dir, engine) = fresh::<H>();
        // Inserted out of order, including keys just outside the prefix on both sides.
        let stored: [&[u8]; 9] = [
            b"b/3",
            b"a/9",
            b"b/1",
            b"b/",
            b"c",
            b"b/2/x",
            b"b/2",
            b"b0",
            &[b'b', b'/', 0xFF],
        ];
        for key in stored {
            put(&engine, Table::Objects, key, key);
        }
        let all = engine.scan(Table::Objects, b"", None, 100).unwrap();
        let mut sorted = stored.to_vec();
        sorted.sort_unstable();
        assert_eq!(keys(&all), sorted);
        for (key, value) in &all {
            assert_eq!(key, value);
        }

        let prefixed = engine.scan(Table::Objects, b"b/", None, 100).unwrap();
        let expected: Vec<&[u8]> =
            vec![b"b/", b"b/1", b"b/2", b"b/2/x", b"b/3", &[b'b', b'/', 0xFF]];
        assert_eq!(keys(&prefixed), expected);

        // Limit.
        let first_two = engine.scan(Table::Objects, b"b/", None, 2).unwrap();
        assert_eq!(keys(&first_two), vec![&b"b/"[..], b"b/1"]);
        assert!(
            engine
                .scan(Table::Objects, b"b/", None, 0)
                .unwrap()
                .is_empty()
        );

        // start_after is exclusive, whether or not it is a stored key.
        let after = engine.scan(Table::Objects, b"b/", Some(b"b/2"), 2).unwrap();
        assert_eq!(keys(&after), vec![&b"b/2/x"[..], b"b/3"]);
        let after_absent = engine
            .scan(Table::Objects, b"b/", Some(b"b/25"), 100)
            .unwrap();
        assert_eq!(keys(&after_absent), vec![&b"b/3"[..], &[b'b', b'/', 0xFF]]);
        // start_after before the prefix: the whole prefix.
        let before = engine.scan(Table::Objects, b"b/", Some(b"a"), 100).unwrap();
        assert_eq!(keys(&before), expected);
        // start_after past the prefix: nothing.
        assert!(
            engine
                .scan(Table::Objects, b"b/", Some(b"b0"), 100)
                .unwrap()
                .is_empty()
        );
        assert!(
            engine
                .scan(Table::Objects, b"b/", Some(&[b'b', b'/', 0xFF]), 100)
                .unwrap()
                .is_empty()
        );
        // Empty prefix with start_after.
        let tail = engine.scan(Table::Objects, b"", Some(b"b0"), 100).unwrap();
        assert_eq!(keys(&tail), vec![&b"c"[..]]);
        // Prefix that matches nothing, and a prefix of all 0xFF bytes.
        assert!(
            engine
                .scan(Table::Objects, b"zz", None, 100)
                .unwrap()
                .is_empty()
        );
        put(&engine, Table::Objects, &[0xFF, 0xFF], b"top");
        let top = engine.scan(Table::Objects, &[0xFF], None, 100).unwrap();
        assert_eq!(keys(&top), vec![&[0xFF, 0xFF][..]]);

        // Paging through a prefix with start_after visits every key exactly once.
        let mut paged = Vec::new();
        let mut cursor: Option<Vec<u8>> = None;
        loop {
            let page = engine
                .scan(Table::Objects, b"b/", cursor.as_deref(), 2)
                .unwrap();
            if page.is_empty() {
                break;
            }
            cursor = page.last().map(|(key, _)| key.clone());
            paged.extend(page.into_iter().map(|(key, _)| key));
        }
        let paged: Vec<&[u8]> = paged.iter().map(Vec::as_slice).collect();
        assert_eq!(paged, expected);

        // Deleted keys disappear from scans.
        engine
            .delete(Table::Objects, b"b/2", Durability::Buffered)
            .unwrap();
        let after_delete = engine.scan(Table::Objects, b"b/2", None, 100).unwrap();
        assert_eq!(keys(&after_delete), vec![&b"b/2/x"[..]]);
    }

    pub fn empty_values<H: Harness>() {
        let (_dir, engine) = fresh::<H>();
        put(&engine, Table::Objects, b"empty", b"");
        assert_eq!(get(&engine, Table::Objects, b"empty"), Some(Vec::new()));
        let scanned = engine.scan(Table::Objects, b"e", None, 10).unwrap();
        assert_eq!(scanned, vec![(b"empty".to_vec(), Vec::new())]);
    }

    pub fn large_values<H: Harness>() {
        let (dir, engine) = fresh::<H>();
        let large: Vec<u8> = (0..1024 * 1024u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        put(&engine, Table::Objects, b"large", &large);
        put(
            &engine,
            Table::Objects,
            b"large2",
            &large[..large.len() - 1],
        );
        assert_eq!(
            get(&engine, Table::Objects, b"large").as_ref(),
            Some(&large)
        );
        let scanned = engine.scan(Table::Objects, b"large", None, 10).unwrap();
        assert_eq!(scanned.len(), 2);
        assert_eq!(scanned[0].1, large);
        assert_eq!(scanned[1].1.len(), large.len() - 1);
        if H::PERSISTENT {
            drop(engine);
            let engine = H::open(dir.path());
            assert_eq!(
                get(&engine, Table::Objects, b"large").as_ref(),
                Some(&large)
            );
        }
    }

    /// `write_batch` applies puts and deletes in order, across tables, visible at once and
    /// durable after a sync (also across a reopen); an unstorable key is refused for a put and
    /// ignored for a delete, as by `put`/`delete`.
    pub fn write_batch_applies_in_order<H: Harness>() {
        let dir = tempfile::tempdir().unwrap();
        {
            let engine = H::open(dir.path());
            put(&engine, Table::Objects, b"old", b"x");
            let too_long = vec![1u8; MAX_STORAGE_KEY_BYTES + 1];
            engine
                .write_batch(&[
                    (Table::Objects, b"a", Some(b"1")),
                    (Table::AaeIndex, b"a", Some(b"idx")),
                    (Table::Objects, b"old", None),
                    (Table::Objects, b"b", Some(b"first")),
                    (Table::Objects, b"b", Some(b"second")),
                    (Table::Objects, b"c", Some(b"gone")),
                    (Table::Objects, b"c", None),
                    (Table::Objects, &too_long, None),
                ])
                .unwrap();
            assert!(
                engine
                    .write_batch(&[(Table::Objects, &too_long, Some(b"v"))])
                    .is_err()
            );
            engine.write_batch(&[]).unwrap();
            assert_eq!(get(&engine, Table::Objects, b"a"), Some(b"1".to_vec()));
            assert_eq!(get(&engine, Table::AaeIndex, b"a"), Some(b"idx".to_vec()));
            assert_eq!(get(&engine, Table::Objects, b"b"), Some(b"second".to_vec()));
            assert_eq!(get(&engine, Table::Objects, b"old"), None);
            assert_eq!(get(&engine, Table::Objects, b"c"), None);
            engine.sync().unwrap();
        }
        if !H::PERSISTENT {
            return;
        }
        let engine = H::open(dir.path());
        assert_eq!(get(&engine, Table::Objects, b"a"), Some(b"1".to_vec()));
        assert_eq!(get(&engine, Table::Objects, b"b"), Some(b"second".to_vec()));
        assert_eq!(get(&engine, Table::Objects, b"old"), None);
        assert_eq!(get(&engine, Table::Objects, b"c"), None);
    }

    pub fn reopen_keeps_data<H: Harness>() {
        if !H::PERSISTENT {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        {
            let engine = H::open(dir.path());
            put(&engine, Table::Objects, b"fsynced", b"1");
            put(&engine, Table::Meta, b"node", b"id");
            engine
                .put(Table::BucketProps, b"bucket", b"{}", Durability::Buffered)
                .unwrap();
            put(&engine, Table::Objects, b"deleted", b"gone soon");
            engine
                .delete(Table::Objects, b"deleted", Durability::Fsync)
                .unwrap();
            put(&engine, Table::Objects, b"overwritten", b"old");
            engine
                .put(Table::Objects, b"overwritten", b"new", Durability::Buffered)
                .unwrap();
            engine.sync().unwrap();
        }
        let engine = H::open(dir.path());
        assert_eq!(
            get(&engine, Table::Objects, b"fsynced"),
            Some(b"1".to_vec())
        );
        assert_eq!(get(&engine, Table::Meta, b"node"), Some(b"id".to_vec()));
        assert_eq!(
            get(&engine, Table::BucketProps, b"bucket"),
            Some(b"{}".to_vec())
        );
        assert_eq!(get(&engine, Table::Objects, b"deleted"), None);
        assert_eq!(
            get(&engine, Table::Objects, b"overwritten"),
            Some(b"new".to_vec())
        );
        let objects = engine.scan(Table::Objects, b"", None, 100).unwrap();
        assert_eq!(keys(&objects), vec![&b"fsynced"[..], b"overwritten"]);
        // And it is writable again, and reopens a second time.
        put(&engine, Table::Objects, b"second", b"2");
        drop(engine);
        let engine = H::open(dir.path());
        assert_eq!(get(&engine, Table::Objects, b"second"), Some(b"2".to_vec()));
        assert_eq!(
            get(&engine, Table::Objects, b"fsynced"),
            Some(b"1".to_vec())
        );
    }

    pub fn concurrent_writers<H: Harness>() {
        const THREADS: usize = 4;
        const KEYS_PER_THREAD: usize = 200;
        let (dir, engine) = fresh::<H>();
        let engine = Arc::new(engine);
        let writers: Vec<_> = (0..THREADS)
            .map(|thread| {
                let engine = Arc::clone(&engine);
                std::thread::spawn(move || {
                    for i in 0..KEYS_PER_THREAD {
                        let key = format!("t{thread}/{i:04}");
                        // Mix durabilities so fsync'd writes share fsyncs with buffered ones.
                        let durability = if i % 4 == 0 {
                            Durability::Fsync
                        } else {
                            Durability::Buffered
                        };
                        engine
                            .put(Table::Objects, key.as_bytes(), key.as_bytes(), durability)
                            .unwrap();
                        // Readers run alongside writers.
                        assert_eq!(
                            engine.get(Table::Objects, key.as_bytes()).unwrap(),
                            Some(key.clone().into_bytes())
                        );
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.join().unwrap();
        }
        engine.sync().unwrap();
        let check = |engine: &H::Engine| {
            for thread in 0..THREADS {
                let prefix = format!("t{thread}/");
                let scanned = engine
                    .scan(Table::Objects, prefix.as_bytes(), None, usize::MAX)
                    .unwrap();
                assert_eq!(scanned.len(), KEYS_PER_THREAD);
                for (i, (key, value)) in scanned.iter().enumerate() {
                    let expected = format!("t{thread}/{i:04}");
                    assert_eq!(key, expected.as_bytes());
                    assert_eq!(value, expected.as_bytes());
                }
            }
        };
        check(&engine);
        if H::PERSISTENT {
            drop(engine);
            let engine = H::open(dir.path());
            check(&engine);
        }
    }

    /// Environment variable that turns the `crash_child` test into the crashing writer.
    pub const CRASH_DIR_VAR: &str = "DYNAKV_CONFORMANCE_CRASH_DIR";
    /// Keys the crashing writer fsyncs before it aborts.
    const CRASH_KEYS: usize = 50;

    /// The child half of `survives_process_abort`: when started by it (the environment variable
    /// names a directory), write with `Fsync`, then abort without closing anything.
    pub fn crash_child<H: Harness>() {
        let Some(dir) = std::env::var_os(CRASH_DIR_VAR) else {
            return;
        };
        let engine = H::open(Path::new(&dir));
        for i in 0..CRASH_KEYS {
            let key = format!("crash/{i:03}");
            engine
                .put(
                    Table::Objects,
                    key.as_bytes(),
                    key.as_bytes(),
                    Durability::Fsync,
                )
                .unwrap();
            engine
                .put(
                    Table::Meta,
                    key.as_bytes(),
                    b"buffered",
                    Durability::Buffered,
                )
                .unwrap();
        }
        engine
            .delete(Table::Objects, b"crash/000", Durability::Fsync)
            .unwrap();
        // No drop, no sync: the process dies with the engine open.
        std::process::abort();
    }

    /// An acknowledged `Fsync` write survives the process dying right after it: run this test
    /// binary again as a child that writes and aborts, then reopen its directory.
    pub fn survives_process_abort<H: Harness>(child_test: &str) {
        if !H::PERSISTENT {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([child_test, "--exact", "--nocapture", "--test-threads=1"])
            .env(CRASH_DIR_VAR, dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(
            !status.success(),
            "the child should have aborted: {status:?}"
        );
        let engine = H::open(dir.path());
        assert_eq!(get(&engine, Table::Objects, b"crash/000"), None);
        for i in 1..CRASH_KEYS {
            let key = format!("crash/{i:03}");
            assert_eq!(
                get(&engine, Table::Objects, key.as_bytes()),
                Some(key.clone().into_bytes()),
                "lost acknowledged write {key}"
            );
        }
        let objects = engine
            .scan(Table::Objects, b"crash/", None, usize::MAX)
            .unwrap();
        assert_eq!(objects.len(), CRASH_KEYS - 1);
    }

    // ---- the reference model ----

    #[derive(Debug, Clone)]
    pub enum Op {
        Put {
            table: Table,
            key: Vec<u8>,
            value: Vec<u8>,
            durability: Durability,
        },
        Delete {
            table: Table,
            key: Vec<u8>,
            durability: Durability,
        },
        Get {
            table: Table,
            key: Vec<u8>,
        },
        Scan {
            table: Table,
            prefix: Vec<u8>,
            start_after: Option<Vec<u8>>,
            limit: usize,
        },
        Sync,
        /// Close and reopen the engine (disk engines only; a no-op for memory).
        Reopen,
    }

    fn table() -> impl Strategy<Value = Table> {
        prop::sample::select(Table::ALL.to_vec())
    }

    /// Short keys over a tiny alphabet (with the edge bytes 0x00 and 0xFF), so that operations
    /// collide, prefixes overlap and prefix successors wrap.
    fn bytes(max_len: usize) -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(
            prop::sample::select(vec![0u8, 1, b'a', b'b', 0xFF]),
            0..=max_len,
        )
    }

    fn key() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(prop::sample::select(vec![0u8, 1, b'a', b'b', 0xFF]), 1..=4)
    }

    /// Mostly buffered: fsyncs cost milliseconds on a busy disk, and one in five still covers
    /// the fsync path (and group commit) in every sequence of any length.
    fn durability() -> impl Strategy<Value = Durability> {
        prop_oneof![4 => Just(Durability::Buffered), 1 => Just(Durability::Fsync)]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (table(), key(), prop::collection::vec(any::<u8>(), 0..16), durability())
                .prop_map(|(table, key, value, durability)| Op::Put { table, key, value, durability }),
            3 => (table(), key(), durability())
                .prop_map(|(table, key, durability)| Op::Delete { table, key, durability }),
            4 => (table(), key()).prop_map(|(table, key)| Op::Get { table, key }),
            4 => (table(), bytes(2), prop::option::of(bytes(4)), 0usize..8)
                .prop_map(|(table, prefix, start_after, limit)| Op::Scan { table, prefix, start_after, limit }),
            1 => Just(Op::Sync),
            1 => Just(Op::Reopen),
        ]
    }

    /// What a scan must return, computed on the model by brute force.
    fn model_scan(
        model: &BTreeMap<Vec<u8>, Vec<u8>>,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
    ) -> Vec<(Vec<u8>, Vec<u8>)> {
        model
            .iter()
            .filter(|(key, _)| key.starts_with(prefix))
            .filter(|(key, _)| start_after.is_none_or(|after| key.as_slice() > after))
            .take(limit)
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect()
    }

    fn run_against_model<H: Harness>(ops: &[Op]) -> Result<(), TestCaseError> {
        let dir = tempfile::tempdir().unwrap();
        let mut engine = Some(H::open(dir.path()));
        let mut models: BTreeMap<Table, BTreeMap<Vec<u8>, Vec<u8>>> = Table::ALL
            .iter()
            .map(|table| (*table, BTreeMap::new()))
            .collect();
        for op in ops {
            let current = engine.as_ref().unwrap();
            match op {
                Op::Put {
                    table,
                    key,
                    value,
                    durability,
                } => {
                    current.put(*table, key, value, *durability).unwrap();
                    models
                        .get_mut(table)
                        .unwrap()
                        .insert(key.clone(), value.clone());
                }
                Op::Delete {
                    table,
                    key,
                    durability,
                } => {
                    current.delete(*table, key, *durability).unwrap();
                    models.get_mut(table).unwrap().remove(key);
                }
                Op::Get { table, key } => {
                    prop_assert_eq!(
                        current.get(*table, key).unwrap(),
                        models[table].get(key).cloned(),
                        "get {:?} {:?}",
                        table,
                        key
                    );
                }
                Op::Scan {
                    table,
                    prefix,
                    start_after,
                    limit,
                } => {
                    let got = current
                        .scan(*table, prefix, start_after.as_deref(), *limit)
                        .unwrap();
                    let expected =
                        model_scan(&models[table], prefix, start_after.as_deref(), *limit);
                    prop_assert_eq!(got, expected, "scan {:?}", op);
                }
                Op::Sync => current.sync().unwrap(),
                Op::Reopen => {
                    if H::PERSISTENT {
                        // Sync first: only synced writes are promised to survive.
                        current.sync().unwrap();
                        drop(engine.take());
                        engine = Some(H::open(dir.path()));
                    }
                }
            }
        }
        // Finally, every table agrees with its model in full.
        let current = engine.as_ref().unwrap();
        for table in Table::ALL {
            let all = current.scan(table, b"", None, usize::MAX).unwrap();
            let expected = model_scan(&models[&table], b"", None, usize::MAX);
            prop_assert_eq!(all, expected, "final contents of {:?}", table);
        }
        Ok(())
    }

    pub fn matches_reference_model<H: Harness>() {
        // Disk engines open a directory per case: fewer cases keep the suite quick.
        let cases = if H::PERSISTENT { 32 } else { 256 };
        let mut runner = TestRunner::new(ProptestConfig {
            cases,
            failure_persistence: None,
            ..ProptestConfig::default()
        });
        runner
            .run(&prop::collection::vec(op(), 1..120), |ops| {
                run_against_model::<H>(&ops)
            })
            .unwrap();
    }
}

macro_rules! conformance {
    ($module:ident, $harness:ty) => {
        mod $module {
            use super::*;

            #[test]
            fn get_put_overwrite_delete() {
                cases::get_put_overwrite_delete::<$harness>();
            }
            #[test]
            fn binary_keys_and_values() {
                cases::binary_keys_and_values::<$harness>();
            }
            #[test]
            fn key_limits() {
                cases::key_limits::<$harness>();
            }
            #[test]
            fn tables_are_isolated() {
                cases::tables_are_isolated::<$harness>();
            }
            #[test]
            fn scan_order_prefix_start_after_limit() {
                cases::scan_order_prefix_start_after_limit::<$harness>();
            }
            #[test]
            fn empty_values() {
                cases::empty_values::<$harness>();
            }
            #[test]
            fn large_values() {
                cases::large_values::<$harness>();
            }
            #[test]
            fn write_batch_applies_in_order() {
                cases::write_batch_applies_in_order::<$harness>();
            }
            #[test]
            fn reopen_keeps_data() {
                cases::reopen_keeps_data::<$harness>();
            }
            #[test]
            fn concurrent_writers() {
                cases::concurrent_writers::<$harness>();
            }
            #[test]
            fn crash_child() {
                cases::crash_child::<$harness>();
            }
            #[test]
            fn survives_process_abort() {
                cases::survives_process_abort::<$harness>(concat!(
                    stringify!($module),
                    "::crash_child"
                ));
            }
            #[test]
            fn matches_reference_model() {
                cases::matches_reference_model::<$harness>();
            }
        }
    };
}

conformance!(memory, Memory);
conformance!(faulty_memory, FaultyMemory);
conformance!(fjall, Fjall);
conformance!(buffered_fjall, BufferedFjall);
conformance!(buffered_memory, BufferedMemory);

/// The write buffer: buffered writes stay out of the engine until a sync or a scan drains them,
/// reads see them meanwhile, and an fsync'd write drains everything before it.
#[test]
fn buffered_writes_wait_in_memory_until_drained() {
    let buffered = BufferedStorage::new(MemoryStorage::new());
    put_with(&buffered, b"a", b"1", Durability::Buffered);
    put_with(&buffered, b"b", b"2", Durability::Buffered);
    buffered
        .delete(Table::Objects, b"b", Durability::Buffered)
        .unwrap();
    assert_eq!(
        get(buffered.inner(), Table::Objects, b"a"),
        None,
        "still buffered"
    );
    assert_eq!(get(&buffered, Table::Objects, b"a"), Some(b"1".to_vec()));
    assert_eq!(get(&buffered, Table::Objects, b"b"), None);
    assert!(buffered.buffered_bytes() > 0);
    // An fsync'd write carries every earlier buffered write with it.
    put_with(&buffered, b"c", b"3", Durability::Fsync);
    assert_eq!(buffered.buffered_bytes(), 0);
    assert_eq!(
        get(buffered.inner(), Table::Objects, b"a"),
        Some(b"1".to_vec())
    );
    assert_eq!(
        get(buffered.inner(), Table::Objects, b"c"),
        Some(b"3".to_vec())
    );
    // A scan sees buffered writes (it drains first).
    put_with(&buffered, b"d", b"4", Durability::Buffered);
    let listed = buffered.scan(Table::Objects, b"", None, 10).unwrap();
    assert_eq!(keys(&listed), vec![&b"a"[..], b"c", b"d"]);
    // The buffer is bounded: past its limit a buffered write drains it.
    let big = vec![7u8; 1024 * 1024];
    for i in 0..(dynakv_storage::MAX_BUFFERED_BYTES / big.len() + 2) {
        put_with(
            &buffered,
            format!("big{i}").as_bytes(),
            &big,
            Durability::Buffered,
        );
        assert!(buffered.buffered_bytes() <= dynakv_storage::MAX_BUFFERED_BYTES + big.len() + 16);
    }
    assert!(get(buffered.inner(), Table::Objects, b"big0").is_some());
    buffered.sync().unwrap();
    assert_eq!(buffered.buffered_bytes(), 0);
}

/// Concurrent fsync'd writers share drains and every acknowledged write is in the engine.
#[test]
fn buffered_fsync_writers_all_reach_the_engine() {
    let buffered = Arc::new(BufferedStorage::new(MemoryStorage::new()));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let buffered = Arc::clone(&buffered);
            std::thread::spawn(move || {
                for i in 0..200 {
                    let key = format!("t{t}/{i}");
                    put_with(
                        buffered.as_ref(),
                        key.as_bytes(),
                        key.as_bytes(),
                        Durability::Fsync,
                    );
                    assert_eq!(
                        get(buffered.inner(), Table::Objects, key.as_bytes()),
                        Some(key.clone().into_bytes()),
                        "acknowledged fsync write {key} is not in the engine"
                    );
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    let all = buffered
        .inner()
        .scan(Table::Objects, b"t", None, usize::MAX)
        .unwrap();
    assert_eq!(all.len(), 8 * 200);
}

fn put_with(engine: &impl Storage, key: &[u8], value: &[u8], durability: Durability) {
    engine.put(Table::Objects, key, value, durability).unwrap();
}
#[cfg(feature = "redb")]
conformance!(redb, Redb);

/// Opening a directory that another open engine holds fails cleanly instead of corrupting it.
#[test]
fn fjall_refuses_a_second_opener() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Fjall::open(dir.path());
    let second = FjallStorage::open(dir.path(), FjallOptions::default());
    assert!(second.is_err(), "{second:?}");
}

#[test]
fn fjall_rejects_invalid_options() {
    let dir = tempfile::tempdir().unwrap();
    let options = FjallOptions {
        max_journaling_size_bytes: 1024,
        ..FjallOptions::default()
    };
    assert!(matches!(
        FjallStorage::open(dir.path(), options),
        Err(dynakv_storage::OpenError::InvalidOptions(_))
    ));
}

/// The files of a fjall directory under `dir` that hold sorted tables.
fn fjall_table_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(at) = stack.pop() {
        for entry in std::fs::read_dir(&at).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.parent().is_some_and(|p| p.ends_with("tables")) {
                found.push(path);
            }
        }
    }
    found
}

/// A fjall directory, closed, whose objects were flushed to sorted tables; and the options
/// it was written with.
fn fjall_dir_with_tables() -> (tempfile::TempDir, FjallOptions) {
    let dir = tempfile::tempdir().unwrap();
    let options = FjallOptions {
        max_memtable_size_bytes: 1024 * 1024,
        ..FjallOptions::default()
    };
    let engine = FjallStorage::open(dir.path(), options.clone()).unwrap();
    let value = vec![7u8; 1024];
    for i in 0..4000u32 {
        let key = format!("key-{i:06}");
        put_with(&engine, key.as_bytes(), &value, Durability::Buffered);
    }
    engine.sync().unwrap();
    // Memtables past 1 MiB are flushed to tables in the background.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while fjall_table_files(dir.path()).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no table file written"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    drop(engine);
    (dir, options)
}

/// Where the damage starts, counted from a table's end (its index and meta blocks, which fjall
/// reads and checks at open).
const FLIP_FROM_END: usize = 1000;

/// A damaged data directory (its sorted tables overwritten) is refused at open as corrupt,
/// not as an I/O or lock error, so the server can tell the operator how to recover.
#[test]
fn fjall_reports_damaged_tables_as_corrupt() {
    let (dir, options) = fjall_dir_with_tables();
    let tables = fjall_table_files(dir.path());
    for table in &tables {
        let mut bytes = std::fs::read(table).unwrap();
        let at = bytes.len().saturating_sub(FLIP_FROM_END);
        for b in &mut bytes[at..at + 64] {
            *b ^= 0xFF;
        }
        std::fs::write(table, bytes).unwrap();
    }
    match FjallStorage::open(dir.path(), options) {
        Err(dynakv_storage::OpenError::Corrupt(failure)) => {
            assert!(!failure.message.is_empty());
        }
        other => panic!("{} damaged tables: {other:?}", tables.len()),
    }
}

/// A stray file in fjall's directories is not called corruption: the advice to wipe the
/// directory is only given for failed checksums and undecodable files.
#[test]
fn fjall_does_not_call_a_stray_file_corruption() {
    let (dir, options) = fjall_dir_with_tables();
    let tables = fjall_table_files(dir.path());
    let folder = tables[0].parent().unwrap();
    std::fs::write(folder.join("notes.txt"), b"left here by hand").unwrap();
    // fjall refuses the directory as unrecoverable (its log names the file), which the
    // server words as "a damaged file or a file fjall does not expect".
    match FjallStorage::open(dir.path(), options) {
        Err(dynakv_storage::OpenError::Unrecoverable(_)) | Ok(_) => {}
        other => panic!("a stray file: {other:?}"),
    }
}
