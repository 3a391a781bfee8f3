//! Recovery of real `dynakv server` processes: a node killed while 1,000 writes land gets
//! every one of them by hinted handoff after it restarts; a node whose data directory is wiped
//! gets every key back by anti-entropy. Both tests count the keys on the recovered node.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Cluster, get_json, put_kv, replica, serial, wait_for};
use std::time::{Duration, Instant};

const KEYS: usize = 1000;

fn count_on(url: &str, bucket: &str) -> usize {
    (0..KEYS)
        .filter(|i| {
            replica(url, bucket, &format!("k{i}")).is_ok_and(|r| r.values == [format!("v{i}")])
        })
        .count()
}

/// The hints a node holds (`u64::MAX` when it does not say).
fn hints_held(url: &str) -> u64 {
    common::hints_held(url).unwrap_or(u64::MAX)
}

#[test]
fn killed_node_gets_every_missed_write_by_hinted_handoff() {
    let _serial = serial();
    // Anti-entropy pushed out of the way (first round after an hour): only hints can do it.
    let mut cluster = Cluster::start_with(3, Cluster::with_config("aae_interval_ms = 3600000\n"));
    cluster.kill(2);
    let (a, b) = (cluster.url(0), cluster.url(1));
    for i in 0..KEYS {
        let url = if i % 2 == 0 { &a } else { &b };
        let mut attempts = 0;
        loop {
            let r = put_kv(url, "hh", &format!("k{i}"), &format!("v{i}"), Some(2), None).unwrap();
            if r.status == 204 {
                break;
            }
            attempts += 1;
            assert!(attempts < 3, "k{i}: {}", r.summary());
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    assert_eq!(
        count_on(&cluster.url(2), "hh"),
        0,
        "down: holds nothing yet"
    );
    let held = hints_held(&a) + hints_held(&b);
    assert_eq!(
        held, KEYS as u64,
        "every write to the down replica left one hint"
    );
    let restarted = Instant::now();
    cluster.restart(2);
    let c = cluster.url(2);
    wait_for(
        "every hinted key on the restarted node",
        Duration::from_secs(60),
        || {
            let n = count_on(&c, "hh");
            if n == KEYS {
                Ok(())
            } else {
                Err(format!("{n} of {KEYS}"))
            }
        },
    );
    eprintln!(
        "{KEYS} keys delivered by hinted handoff {:.1?} after the restart",
        restarted.elapsed()
    );
    wait_for("hint stores drained", Duration::from_secs(30), || {
        let held = hints_held(&a) + hints_held(&b);
        if held == 0 {
            Ok(())
        } else {
            Err(format!("{held} hints held"))
        }
    });
}

#[test]
fn wiped_node_gets_every_key_back_by_anti_entropy() {
    let _serial = serial();
    let mut cluster = Cluster::start(3);
    let a = cluster.url(0);
    for i in 0..KEYS {
        let r = put_kv(
            &a,
            "wipe",
            &format!("k{i}"),
            &format!("v{i}"),
            Some(3),
            None,
        )
        .unwrap();
        assert_eq!(r.status, 204, "{}", r.summary());
    }
    assert_eq!(count_on(&cluster.url(2), "wipe"), KEYS);
    cluster.kill(2);
    std::fs::remove_dir_all(&cluster.nodes[2].data_dir).unwrap();
    let seed = cluster.nodes[0].peer_addr();
    cluster.nodes[2].spawn(Some(&seed));
    cluster.nodes[2].wait_up(Duration::from_secs(20));
    let restarted = Instant::now();
    let c = cluster.url(2);
    wait_for(
        "every key back on the wiped node",
        Duration::from_secs(120),
        || {
            let n = count_on(&c, "wipe");
            if n == KEYS {
                Ok(())
            } else {
                Err(format!("{n} of {KEYS}"))
            }
        },
    );
    eprintln!(
        "{KEYS} keys restored by anti-entropy {:.1?} after the restart",
        restarted.elapsed()
    );
    let aae = get_json(&format!("{c}/admin/aae")).unwrap();
    let held: u64 = aae["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["keys"].as_u64().unwrap())
        .sum();
    assert_eq!(held, KEYS as u64, "its trees count every key");
}
