//! A rolling upgrade (issue 22): a 3-node cluster of the previous release (peer protocol
//! version 3, built from its commit by `scripts/build-previous-release.sh`) is upgraded to this
//! build one node at a time, as an operator does it: SIGTERM, then this build started on the
//! same data directory and addresses. Writers keep writing through every node all along.
//!
//! Shown: every upgraded node speaks version 4 to the upgraded nodes and version 3 to the
//! others, and says which (`/admin/status`, `/admin/members`); no acknowledged write is lost
//! (each one is read back from all three replicas at the end), and the siblings and the
//! tombstone written by the old release are still there.
//!
//! The previous release's executable comes from `DYNAKV_PREVIOUS_BIN`, or from where the
//! script puts it (`target/previous/target/release/dynakv`). Without either the test says so
//! and does not run, unless `DYNAKV_REQUIRE_UPGRADE=1` (set by `.ci/run`, which builds it):
//! then it fails.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{
    BIN, Cluster, Tally, Writers, get_json, get_kv, hints_held, http, put_kv, read_back, serial,
};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const SETTLE: Duration = Duration::from_secs(60);
/// Writes acknowledged between two steps of the upgrade, at least: load on every mix of
/// versions.
const WRITES_PER_STEP: usize = 300;

/// The previous release's executable, if there is one to run.
fn previous_release() -> Option<PathBuf> {
    let required = std::env::var("DYNAKV_REQUIRE_UPGRADE").is_ok_and(|v| v == "1");
    let path = match std::env::var("DYNAKV_PREVIOUS_BIN") {
        Ok(path) => PathBuf::from(path),
        Err(_) => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../target/previous/target/release/dynakv"),
    };
    if path.is_file() {
        return Some(path);
    }
    assert!(
        !required,
        "DYNAKV_REQUIRE_UPGRADE=1 but the previous release is not at {} \
         (build it with scripts/build-previous-release.sh)",
        path.display()
    );
    eprintln!(
        "NOT RUN: the previous release is not at {} (build it with \
         scripts/build-previous-release.sh, or set DYNAKV_PREVIOUS_BIN)",
        path.display()
    );
    None
}

/// Waits until `writers` have `count` more acknowledgements than `since`.
fn wait_for_writes(writers: &Writers, since: usize, count: usize) {
    common::wait_for(
        &format!("{count} more acknowledged writes"),
        Duration::from_secs(60),
        || {
            let now = writers.acked_count();
            if now >= since + count {
                Ok(())
            } else {
                Err(format!("{now} acknowledged; {}", writers.tally.report()))
            }
        },
    );
}

/// What an upgraded node says of the protocol versions: its own (4, accepting 3 and 4), and
/// the version of its connection to each member (4 with the upgraded ones, 3 with the others).
fn versions_check(url: &str, upgraded: &[String], names: &[String]) -> Result<(), String> {
    let status = get_json(&format!("{url}/admin/status"))?;
    if status["protocol_version"] != 4
        || status["protocol_versions_accepted"] != serde_json::json!([3, 4])
    {
        return Err(format!("status: {status}"));
    }
    let members = get_json(&format!("{url}/admin/members"))?;
    for name in names {
        let member = members["members"]
            .as_array()
            .and_then(|all| all.iter().find(|m| m["name"] == name.as_str()))
            .ok_or_else(|| format!("{name} is not a member: {members}"))?;
        let expected = if upgraded.contains(name) { 4 } else { 3 };
        if member["protocol"] != expected || member["up"] != true {
            return Err(format!(
                "{name}: expected protocol {expected}, up: {member}"
            ));
        }
    }
    Ok(())
}

fn sorted_values(url: &str, key: &str) -> Result<(u16, Vec<String>), String> {
    let resp = get_kv(url, "kept", key, Some(3))?;
    let mut values = match resp.status {
        300 => resp.multipart_values(),
        200 => vec![resp.text()],
        _ => Vec::new(),
    };
    values.sort();
    Ok((resp.status, values))
}

/// A write with a secondary index entry through the one upgraded node, while the other two
/// speak version 3: their replicas cannot store it, so it is not acknowledged (never stored
/// without its index entry by an old replica). A query of the index is answered by the
/// upgraded node's coverage alone (the old nodes cannot be asked, and hold no index entry).
fn mixed_cluster_refuses_what_version_3_cannot_carry(url: &str) {
    let put = http(
        "PUT",
        &format!("{url}/buckets/indexed/keys/k?w=2"),
        &[
            ("Content-Type", "text/plain"),
            ("X-Riak-Index-color_bin", "red"),
        ],
        b"v",
    )
    .unwrap();
    eprintln!(
        "[upgrade] an indexed write on a mixed cluster: {}",
        put.summary()
    );
    assert!(put.status >= 500, "{}", put.summary());
    // The answer says why: what the operator has to do.
    assert!(
        put.text()
            .contains("speaks protocol version 3, which cannot carry"),
        "{}",
        put.summary()
    );
    let query = http(
        "GET",
        &format!("{url}/buckets/indexed/index/color_bin/red"),
        &[],
        b"",
    )
    .unwrap();
    eprintln!(
        "[upgrade] an index query on a mixed cluster: {}",
        query.summary()
    );
    assert_eq!(query.status, 200, "{}", query.summary());
}

/// Once every node runs this build, the same write and query work.
fn new_features_work_once_every_node_is_upgraded(url: &str) {
    let put = http(
        "PUT",
        &format!("{url}/buckets/indexed/keys/k?w=3"),
        &[
            ("Content-Type", "text/plain"),
            ("X-Riak-Index-color_bin", "red"),
        ],
        b"v",
    )
    .unwrap();
    assert_eq!(put.status, 204, "{}", put.summary());
    let query = get_json(&format!("{url}/buckets/indexed/index/color_bin/red")).unwrap();
    assert_eq!(query["keys"], serde_json::json!(["k"]), "{query}");
}

#[test]
fn a_cluster_upgraded_one_node_at_a_time_under_write_load_loses_nothing() {
    let _serial = serial();
    let Some(previous) = previous_release() else {
        return;
    };
    let started = Instant::now();
    let mut cluster = Cluster::start_with(3, Cluster::with_binary(&previous));
    let names: Vec<String> = (0..3).map(|i| cluster.name(i)).collect();
    let targets: Vec<(String, String)> =
        (0..3).map(|i| (cluster.name(i), cluster.url(i))).collect();
    // The old release says nothing of protocol versions.
    let old_status = get_json(&format!("{}/admin/status", cluster.url(0))).unwrap();
    assert_eq!(old_status["protocol_version"], Value::Null, "{old_status}");

    // Written by the old release: two siblings (two coordinators, no context) and a delete.
    for (i, value) in [(0, "from-n1"), (1, "from-n2")] {
        let put = put_kv(&cluster.url(i), "kept", "siblings", value, Some(3), None).unwrap();
        assert_eq!(put.status, 204, "{}", put.summary());
    }
    let put = put_kv(
        &cluster.url(2),
        "kept",
        "deleted",
        "soon gone",
        Some(3),
        None,
    )
    .unwrap();
    assert_eq!(put.status, 204, "{}", put.summary());
    let read = get_kv(&cluster.url(2), "kept", "deleted", Some(3)).unwrap();
    let context = read.vclock().unwrap();
    let delete = http(
        "DELETE",
        &format!("{}/buckets/kept/keys/deleted?w=3", cluster.url(2)),
        &[("X-Riak-Vclock", context.as_str())],
        b"",
    )
    .unwrap();
    assert_eq!(delete.status, 204, "{}", delete.summary());

    let writers = Writers::start(&targets, "upgrade", 2, Duration::from_millis(2));
    let mut steps = Vec::new();
    let mut upgraded: Vec<String> = Vec::new();
    for i in 0..3 {
        wait_for_writes(&writers, writers.acked_count(), WRITES_PER_STEP);
        let before = writers.acked_count();
        let down = Instant::now();
        cluster.nodes[i].stop(Duration::from_secs(30));
        cluster.nodes[i].bin = PathBuf::from(BIN);
        cluster.restart(i);
        let down_for = down.elapsed();
        upgraded.push(cluster.name(i));
        // Every upgraded node speaks 4 with the upgraded ones and 3 with the others.
        common::wait_for(
            &format!("the versions spoken once {} is upgraded", cluster.name(i)),
            Duration::from_secs(30),
            || {
                for name in &upgraded {
                    let url = cluster.url(cluster.index_of(name));
                    versions_check(&url, &upgraded, &names).map_err(|e| format!("{name}: {e}"))?;
                }
                Ok(())
            },
        );
        let step = format!(
            "{} upgraded: down {} ms (SIGTERM to answering /ping on this build), \
             {} writes acknowledged meanwhile",
            cluster.name(i),
            down_for.as_millis(),
            writers.acked_count() - before
        );
        eprintln!("[upgrade] {step}");
        steps.push(step);
        if i == 0 {
            mixed_cluster_refuses_what_version_3_cannot_carry(&cluster.url(0));
        }
        cluster.assert_alive(&[]);
    }
    wait_for_writes(&writers, writers.acked_count(), WRITES_PER_STEP);
    let tally_report = writers.tally.report();
    // A write is not acknowledged only when it went to the node being restarted (connection
    // refused): the others never refuse one for the versions they speak, and a restarted node
    // serves its first writes with its peers up.
    let refused: Vec<String> = writers
        .tally
        .failures()
        .into_keys()
        .filter(|kind| !kind.ends_with("io-error"))
        .collect();
    assert!(refused.is_empty(), "writes refused: {tally_report}");
    let acked = writers.finish();

    cluster.wait_settled(&[0, 1, 2], SETTLE);
    common::wait_for("every hint delivered", SETTLE, || {
        let held: u64 = (0..3)
            .map(|i| hints_held(&cluster.url(i)))
            .sum::<Result<u64, String>>()?;
        if held == 0 {
            Ok(())
        } else {
            Err(format!("{held} hints held"))
        }
    });
    let tally = Tally::new("read back r=3");
    let lost = read_back(&targets, "upgrade", &acked, 3, &tally);
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes not read back: {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(20)]
    );
    new_features_work_once_every_node_is_upgraded(&cluster.url(1));
    for (name, url) in &targets {
        assert_eq!(
            sorted_values(url, "siblings").unwrap(),
            (300, vec!["from-n1".to_owned(), "from-n2".to_owned()]),
            "the siblings via {name}"
        );
        assert_eq!(
            sorted_values(url, "deleted").unwrap().0,
            404,
            "the delete via {name}"
        );
    }
    eprintln!(
        "[upgrade] {} acknowledged writes, all read back with r=3; writers: {tally_report}; \
         {:.0?} in all",
        acked.len(),
        started.elapsed()
    );
    for step in steps {
        eprintln!("[upgrade]   {step}");
    }
}
