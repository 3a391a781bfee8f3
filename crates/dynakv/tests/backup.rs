//! Backup and restore (issue 22) on real `dynakv server` processes: a backup taken while a
//! node is down holds every key with its siblings and tombstones; a restore into the same
//! cluster never replaces a newer write; a restore into a wiped cluster brings every key and
//! sibling back; a damaged file is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Cluster, dynakv, get_kv, http, put_kv, replica, serial};

const KEYS: usize = 200;

/// Whether every primary of `bucket/key` holds a tombstone of it.
fn tombstoned(cluster: &Cluster, bucket: &str, key: &str) -> bool {
    (0..3).all(|i| replica(&cluster.url(i), bucket, key).is_ok_and(|r| r.exists && r.deleted))
}

#[test]
fn backup_keeps_siblings_and_tombstones_and_restore_never_replaces_newer_data() {
    let _serial = serial();
    let mut old = Cluster::start(3);
    let base = old.url(0);
    for i in 0..KEYS {
        let resp = put_kv(
            &base,
            "data",
            &format!("k{i}"),
            &format!("v{i}"),
            Some(3),
            None,
        )
        .unwrap();
        assert_eq!(resp.status, 204, "{}", resp.summary());
    }
    // Two blind writes through two nodes: siblings.
    put_kv(&old.url(1), "data", "sib", "one", Some(3), None).unwrap();
    put_kv(&old.url(2), "data", "sib", "two", Some(3), None).unwrap();
    // A delete: its tombstone is part of the backup.
    put_kv(&base, "data", "gone", "soon", Some(3), None).unwrap();
    let resp = http(
        "DELETE",
        &format!("{base}/buckets/data/keys/gone?w=3"),
        &[],
        b"",
    )
    .unwrap();
    assert_eq!(resp.status, 204, "{}", resp.summary());
    assert!(tombstoned(&old, "data", "gone"));

    // A node down: every partition still comes from a replica that is up.
    old.kill(2);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cluster.dkv");
    let file_arg = file.to_str().unwrap();
    let out = dynakv(&["admin", "backup", "--url", &base, "--out", file_arg]);
    assert!(out.status.success());
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(progress.contains("partition   64/64"), "{progress}");
    assert!(
        progress.contains(&format!("{} objects", KEYS + 2)),
        "{progress}"
    );
    assert!(!dir.path().join("cluster.partial").exists());

    // A newer write (with its read's context) survives a restore of the older backup.
    let read = get_kv(&base, "data", "k0", None).unwrap();
    let context = read.vclock().unwrap();
    put_kv(&base, "data", "k0", "newer", Some(2), Some(&context)).unwrap();
    let out = dynakv(&["admin", "restore", "--url", &base, file_arg]);
    assert!(out.status.success());
    let after = get_kv(&base, "data", "k0", None).unwrap();
    assert_eq!((after.status, after.text()), (200, "newer".to_owned()));
    drop(old);

    // A wiped cluster: everything comes back, siblings and tombstones included.
    let new = Cluster::start(3);
    let base = new.url(0);
    assert_eq!(get_kv(&base, "data", "k1", None).unwrap().status, 404);
    let out = dynakv(&["admin", "restore", "--url", &base, file_arg]);
    assert!(out.status.success());
    let report = String::from_utf8_lossy(&out.stderr);
    assert!(
        report.contains(&format!(
            "{} records, {} restored, 0 failed",
            KEYS + 2,
            KEYS + 2
        )),
        "{report}"
    );
    for i in 0..KEYS {
        let resp = get_kv(&new.url(i % 3), "data", &format!("k{i}"), None).unwrap();
        assert_eq!((resp.status, resp.text()), (200, format!("v{i}")), "k{i}");
    }
    let sib = get_kv(&new.url(2), "data", "sib", None).unwrap();
    assert_eq!(sib.status, 300, "{}", sib.summary());
    let mut values = sib.multipart_values();
    values.sort();
    assert_eq!(values, ["one", "two"]);
    assert_eq!(get_kv(&base, "data", "gone", None).unwrap().status, 404);
    assert!(tombstoned(&new, "data", "gone"));

    // A damaged file is refused, naming the problem; a cut one too.
    let mut bytes = std::fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    let bad = dir.path().join("bad.dkv");
    std::fs::write(&bad, &bytes).unwrap();
    let out = dynakv(&["admin", "restore", "--url", &base, bad.to_str().unwrap()]);
    assert!(!out.status.success());
    // (A flipped length reads past the end; any other flip fails its record's checksum.)
    assert!(String::from_utf8_lossy(&out.stderr).contains("corrupt"));
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() - 5]).unwrap();
    let out = dynakv(&["admin", "restore", "--url", &base, bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cut short"));
}
