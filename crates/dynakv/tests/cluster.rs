//! Multi-process cluster tests: real `dynakv server` processes on free ports, each with its
//! own data directory, talking to each other over the peer transport. Written against the
//! user-visible contract (command line, Riak HTTP API, `/admin/*` JSON), not the
//! implementation: replication with quorums, siblings from two coordinators, read repair of a
//! stale replica, SIGKILL of one node of three, join and leave under write load with data
//! handoff, and `dynakv dev --nodes 3`.
//!
//! The tests of this binary run one at a time (see `common::serial`); each owns its
//! directories, ports and processes and kills them on drop. On failure, the last lines of each
//! node's log are printed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{
    Cluster, Resp, Tally, Writers, consecutive_free_ports, get_kv, members, preflist, put_kv,
    read_back, replica, ring, serial, wait_for,
};
use std::collections::BTreeSet;
use std::io::BufRead as _;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SETTLE: Duration = Duration::from_secs(45);

// ---------------------------------------------------------------------------------------------
// Helpers specific to these tests.

/// Evenly spread sample of at most `max` entries.
fn sample<T: Clone>(all: &[T], max: usize) -> Vec<T> {
    if all.len() <= max {
        return all.to_vec();
    }
    (0..max).map(|i| all[i * all.len() / max].clone()).collect()
}

/// For one key: the set of nodes (among `nodes`) whose local storage holds it, and the set of
/// nodes of its preference list (asked of the first node of `nodes`).
fn placement(
    nodes: &[(String, String)],
    bucket: &str,
    key: &str,
) -> Result<(BTreeSet<String>, BTreeSet<String>), String> {
    let pref = preflist(&nodes[0].1, bucket, key)?;
    let pref_nodes: BTreeSet<String> = pref.iter().map(|e| e.node.clone()).collect();
    if pref.len() != 3 || pref_nodes.len() != 3 || pref.iter().any(|e| !e.primary) {
        return Err(format!(
            "{key}: preflist is not 3 distinct primaries: {pref:?}"
        ));
    }
    let mut holders = BTreeSet::new();
    for (name, url) in nodes {
        if replica(url, bucket, key)?.exists {
            holders.insert(name.clone());
        }
    }
    Ok((holders, pref_nodes))
}

/// Checks that, for every key of `keys`, exactly the nodes of its preference list hold it.
/// Keys that do not match at first are looked at again for up to 5 s (writes acknowledged
/// with w=2 may still be reaching their third replica). Returns the keys that never matched.
fn check_placement(nodes: &[(String, String)], bucket: &str, keys: &[String]) -> Vec<String> {
    let mut pending: Vec<String> = keys.to_vec();
    let mut last = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        last.clear();
        let mut still = Vec::new();
        for key in &pending {
            match placement(nodes, bucket, key) {
                Ok((holders, pref)) if holders == pref => {}
                Ok((holders, pref)) => {
                    last.push(format!("{key}: held by {holders:?}, preflist {pref:?}"));
                    still.push(key.clone());
                }
                Err(e) => {
                    last.push(format!("{key}: {e}"));
                    still.push(key.clone());
                }
            }
        }
        pending = still;
        if pending.is_empty() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "[placement] {} keys checked, {} not exactly on their preflist",
        keys.len(),
        last.len()
    );
    last
}

/// Ownership counts (from the node at `url`) must cover exactly `expected` nodes and differ
/// by at most one.
fn assert_balanced(url: &str, expected: &BTreeSet<String>) {
    let r = ring(url).unwrap();
    let nodes: BTreeSet<String> = r.ownership.keys().cloned().collect();
    assert_eq!(&nodes, expected, "ring owners: {r:?}");
    let max = r.ownership.values().max().copied().unwrap_or(0);
    let min = r.ownership.values().min().copied().unwrap_or(0);
    assert!(max - min <= 1, "ownership not balanced: {:?}", r.ownership);
    assert_eq!(r.ownership.values().sum::<u64>(), r.partitions, "{r:?}");
}

/// Runs `op` and retries it (at most twice more) only while less than `grace` has passed
/// since `since`; `ok` says whether an answer counts as success.
fn with_grace(
    since: Instant,
    grace: Duration,
    node: &str,
    tally: &Tally,
    mut op: impl FnMut() -> Result<Resp, String>,
    ok: impl Fn(&Resp) -> bool,
) -> Result<Resp, String> {
    let mut tries = 0;
    tally.attempt();
    loop {
        let outcome = op();
        tries += 1;
        if matches!(outcome, Ok(ref r) if ok(r)) {
            tally.ack();
            return outcome;
        }
        if tries < 3 && since.elapsed() < grace {
            tally.retry();
            std::thread::sleep(Duration::from_millis(300));
            continue;
        }
        tally.fail(node, &outcome);
        return Err(format!(
            "after {tries} tries ({:.1?} after the event): {}",
            since.elapsed(),
            outcome.map_or_else(|e| e, |r| r.summary())
        ));
    }
}

fn named_urls(cluster: &Cluster, nodes: &[usize]) -> Vec<(String, String)> {
    nodes
        .iter()
        .map(|&i| (cluster.name(i), cluster.url(i)))
        .collect()
}

/// Waits until the node at every url of `on` lists every name of `all` as a member that is up.
fn wait_all_up(on: &[(String, String)], all: &BTreeSet<String>, timeout: Duration) {
    wait_for(&format!("every node to show {all:?} up"), timeout, || {
        for (name, url) in on {
            let m = members(url)?;
            for n in all {
                match m.iter().find(|m| &m.name == n) {
                    Some(m) if m.up && m.status == "valid" => {}
                    other => return Err(format!("{name} sees {n} as {other:?}")),
                }
            }
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[test]
fn three_nodes_write_through_one_read_through_another() {
    let _serial = serial();
    let cluster = Cluster::start(3);
    let names: BTreeSet<String> = (0..3).map(|i| cluster.name(i)).collect();

    // The members view, through the CLI and over HTTP.
    let out = cluster.admin(0, &["members", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed = common::parse_members(&json).unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|m| m.name.clone())
            .collect::<BTreeSet<_>>(),
        names,
        "{listed:?}"
    );
    for m in &listed {
        let node = &cluster.nodes[cluster.index_of(&m.name)];
        assert_eq!(m.status, "valid", "{m:?}");
        assert!(m.up, "{m:?}");
        assert!(
            m.peer_addr.ends_with(&format!(":{}", node.peer_port)),
            "peer_addr of {m:?}"
        );
        assert!(
            m.http_addr.ends_with(&format!(":{}", node.http_port)),
            "http_addr of {m:?}"
        );
    }
    assert_eq!(members(&cluster.url(1)).unwrap().len(), 3);
    // For people: a table, one row per member (its partitions of 64), then a summary.
    let out = cluster.admin(1, &["members"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("NAME "), "{table}");
    for name in &names {
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no row for {name}: {table}"));
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(&cells[1..3], ["valid", "yes"], "{row}");
        let partitions: u32 = cells[4].parse().unwrap();
        assert!((21..=22).contains(&partitions), "{row}");
    }
    assert!(table.ends_with("3 members, 3 up\n"), "{table}");
    // Nothing pending once settled; both ways of asking answer JSON.
    let out = cluster.admin(2, &["handoffs"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("no ring transition in progress"), "{text}");
    let out = cluster.admin(2, &["handoffs", "--json"]);
    serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap();
    common::get_json(&format!("{}/admin/handoffs", cluster.url(0))).unwrap();

    let tally = Tally::new("puts w=2 via n1");
    let mut failures = Vec::new();
    for i in 0..100 {
        tally.attempt();
        let outcome = put_kv(
            &cluster.url(0),
            "t1",
            &format!("k{i}"),
            &format!("v{i}"),
            Some(2),
            None,
        );
        if matches!(outcome, Ok(ref r) if r.status == 204) {
            tally.ack();
        } else {
            tally.fail("n1", &outcome);
            failures.push(format!("k{i}: {outcome:?}"));
        }
    }
    tally.print();
    assert!(failures.is_empty(), "puts failed: {failures:#?}");

    let writes: Vec<(String, String)> = (0..100)
        .map(|i| (format!("k{i}"), format!("v{i}")))
        .collect();
    for via in [1, 2] {
        let tally = Tally::new(&format!("gets r=2 via {}", cluster.name(via)));
        let failures = read_back(&named_urls(&cluster, &[via]), "t1", &writes, 2, &tally);
        assert!(failures.is_empty(), "reads failed: {failures:#?}");
    }

    // The preference list names 3 distinct members, the same whichever node is asked.
    for key in ["k0", "k1", "k42"] {
        let pref = preflist(&cluster.url(0), "t1", key).unwrap();
        assert_eq!(pref.len(), 3, "{pref:?}");
        let nodes: BTreeSet<String> = pref.iter().map(|e| e.node.clone()).collect();
        assert_eq!(nodes, names, "{key}: {pref:?}");
        assert!(
            pref.iter().all(|e| e.primary && e.partition < 64),
            "{pref:?}"
        );
        for via in [1, 2] {
            assert_eq!(
                preflist(&cluster.url(via), "t1", key).unwrap(),
                pref,
                "via {via}"
            );
        }
    }
}

#[test]
fn siblings_from_two_coordinators() {
    let _serial = serial();
    let cluster = Cluster::start(3);
    let (n1, n2, n3) = (cluster.url(0), cluster.url(1), cluster.url(2));

    let r = put_kv(&n1, "sib", "k", "base", Some(3), None).unwrap();
    assert_eq!(r.status, 204, "{}", r.summary());
    let read = get_kv(&n1, "sib", "k", Some(3)).unwrap();
    assert_eq!(
        (read.status, read.text().as_str()),
        (200, "base"),
        "{}",
        read.summary()
    );
    let ctx = read.vclock().expect("a context on the read");

    // Two writers saw the same version, each writes through its own coordinator.
    let r = put_kv(&n1, "sib", "k", "from-n1", Some(2), Some(&ctx)).unwrap();
    assert_eq!(r.status, 204, "{}", r.summary());
    let r = put_kv(&n2, "sib", "k", "from-n2", Some(2), Some(&ctx)).unwrap();
    assert_eq!(r.status, 204, "{}", r.summary());

    let fetched = get_kv(&n3, "sib", "k", Some(3)).unwrap();
    assert_eq!(fetched.status, 300, "{}", fetched.summary());
    let mut values = fetched.multipart_values();
    values.sort();
    assert_eq!(values, ["from-n1", "from-n2"], "{}", fetched.summary());
    let ctx = fetched.vclock().expect("a context on the 300");

    // Writing back with the context of the read that saw both resolves them.
    let r = put_kv(&n3, "sib", "k", "merged", Some(3), Some(&ctx)).unwrap();
    assert_eq!(r.status, 204, "{}", r.summary());
    for (name, url) in named_urls(&cluster, &[0, 1, 2]) {
        let read = get_kv(&url, "sib", "k", Some(3)).unwrap();
        assert_eq!(
            (read.status, read.text().as_str()),
            (200, "merged"),
            "via {name}: {}",
            read.summary()
        );
    }
}

#[test]
fn stale_replica_is_repaired_by_a_read() {
    // V (a replica of the key) misses a write while it is down. The write's coordinator A
    // may keep a hint for V (hinted handoff); A is killed before V comes back, so the only
    // way V can learn the new value is the read (through the third node C), which with A
    // down needs V's answer.
    //
    // Active anti-entropy, where the build has it, would repair V by itself within moments of
    // its restart and leave nothing for the read to repair: it is pushed out of the way here
    // (an hour between rounds) when the build has that setting.
    let _serial = serial();
    let no_aae = "aae_interval_ms = 3600000\n";
    let cluster = if common::config_accepted(no_aae) {
        Cluster::with_config(no_aae)
    } else {
        Cluster::new()
    };
    let mut cluster = Cluster::start_with(3, cluster);
    let pref = preflist(&cluster.url(0), "repair", "k").unwrap();
    let victim = cluster.index_of(&pref[0].node);
    let coordinator = (victim + 1) % 3;
    let third = (victim + 2) % 3;
    let (victim_url, coordinator_url, third_url) = (
        cluster.url(victim),
        cluster.url(coordinator),
        cluster.url(third),
    );
    eprintln!(
        "preflist {pref:?}; V={} A={} C={}",
        cluster.name(victim),
        cluster.name(coordinator),
        cluster.name(third)
    );

    let r = put_kv(&coordinator_url, "repair", "k", "old", Some(3), None).unwrap();
    assert_eq!(r.status, 204, "{}", r.summary());
    let read = get_kv(&coordinator_url, "repair", "k", Some(3)).unwrap();
    assert_eq!(
        (read.status, read.text().as_str()),
        (200, "old"),
        "{}",
        read.summary()
    );
    let ctx = read.vclock().unwrap();
    assert_eq!(replica(&victim_url, "repair", "k").unwrap().values, ["old"]);

    cluster.kill(victim);
    let killed = Instant::now();
    let tally = Tally::new("put w=2 with one replica down");
    with_grace(
        killed,
        Duration::from_secs(3),
        &cluster.name(coordinator),
        &tally,
        || put_kv(&coordinator_url, "repair", "k", "new", Some(2), Some(&ctx)),
        |r| r.status == 204,
    )
    .unwrap();
    tally.print();
    assert_eq!(
        replica(&third_url, "repair", "k").unwrap().values,
        ["new"],
        "the write was acknowledged by A and C"
    );
    cluster.kill(coordinator);

    cluster.restart(victim);
    let v_and_c = named_urls(&cluster, &[victim, third]);
    let v_name = cluster.name(victim);
    wait_for(
        &format!("{v_name} up and valid in its own and C's view"),
        Duration::from_secs(30),
        || {
            for (name, url) in &v_and_c {
                let m = members(url)?;
                match m.iter().find(|m| m.name == v_name) {
                    Some(m) if m.up && m.status == "valid" => {}
                    other => return Err(format!("{name} sees {v_name} as {other:?}")),
                }
            }
            Ok(())
        },
    );

    let stale = replica(&victim_url, "repair", "k").unwrap();
    assert_eq!(
        stale.values,
        ["old"],
        "the restarted replica should hold only the old value before any read: {stale:?}"
    );

    // With A down, a read with r=2 needs the restarted node; its answer is the new value.
    let answered = wait_for(
        "a r=2 read (through C, A down) of the new value",
        Duration::from_secs(10),
        || {
            let r = get_kv(&third_url, "repair", "k", Some(2))?;
            match r.status {
                200 if r.text() == "new" => Ok(r),
                200 | 300 => panic!("r=2 read returned the wrong version: {}", r.summary()),
                _ => Err(r.summary()),
            }
        },
    );
    eprintln!("read: {}", answered.summary());

    wait_for(
        "read repair of the stale replica",
        Duration::from_secs(10),
        || {
            let now = replica(&victim_url, "repair", "k")?;
            if now.values == ["new"] && !now.deleted {
                Ok(())
            } else {
                Err(format!("{now:?}"))
            }
        },
    );
}

#[test]
fn sigkill_one_of_three_keeps_quorum_operations_working() {
    let _serial = serial();
    let mut cluster = Cluster::start(3);
    let live = named_urls(&cluster, &[1, 2]);

    cluster.kill(0);
    let killed = Instant::now();
    let grace = Duration::from_secs(3);

    let puts = Tally::new("puts w=2 through n2/n3 with n1 killed");
    let mut failures = Vec::new();
    for i in 0..100 {
        let (name, url) = &live[i % 2];
        let (key, value) = (format!("k{i}"), format!("v{i}"));
        if let Err(e) = with_grace(
            killed,
            grace,
            name,
            &puts,
            || put_kv(url, "down", &key, &value, Some(2), None),
            |r| r.status == 204,
        ) {
            failures.push(format!("put {key} via {name}: {e}"));
        }
    }
    puts.print();
    let gets = Tally::new("gets r=2 through n2/n3 with n1 killed");
    for i in 0..100 {
        let (name, url) = &live[(i + 1) % 2];
        let (key, value) = (format!("k{i}"), format!("v{i}"));
        if let Err(e) = with_grace(
            killed,
            grace,
            name,
            &gets,
            || get_kv(url, "down", &key, Some(2)),
            |r| r.status == 200 && r.text() == value,
        ) {
            failures.push(format!("get {key} via {name}: {e}"));
        }
    }
    gets.print();
    assert!(
        failures.is_empty(),
        "{} operations failed with one node of three down:\n{}",
        failures.len(),
        failures.join("\n")
    );
    cluster.assert_alive(&[0]);

    // Asking for all three replicas cannot succeed: 503, with a body saying how many answered
    // (the format is not specified; it is a count below 3, and the count may be taken when
    // the quorum became impossible, before every live replica answered).
    let says_fewer = |r: &Resp| r.text().chars().any(|c| ('0'..='2').contains(&c));
    let r = put_kv(&live[0].1, "down", "w3", "x", Some(3), None).unwrap();
    eprintln!("put w=3 with n1 down: {}", r.summary());
    assert_eq!(
        r.status,
        503,
        "put w=3 with a replica down: {}",
        r.summary()
    );
    assert!(says_fewer(&r), "{}", r.summary());
    let r = get_kv(&live[1].1, "down", "k0", Some(3)).unwrap();
    eprintln!("get r=3 with n1 down: {}", r.summary());
    assert_eq!(
        r.status,
        503,
        "get r=3 with a replica down: {}",
        r.summary()
    );
    assert!(says_fewer(&r), "{}", r.summary());

    // The survivors notice that n1 is down (so that seeing it up again below means something).
    wait_for("n2 and n3 to show n1 down", Duration::from_secs(15), || {
        for (name, url) in &live {
            let m = members(url)?;
            match m.iter().find(|m| m.name == "n1") {
                Some(m) if !m.up => {}
                other => return Err(format!("{name} sees n1 as {other:?}")),
            }
        }
        Ok(())
    });

    // Restart without any admin step: it rejoins by itself.
    cluster.restart(0);
    let all: BTreeSet<String> = (0..3).map(|i| cluster.name(i)).collect();
    wait_all_up(
        &named_urls(&cluster, &[0, 1, 2]),
        &all,
        Duration::from_secs(30),
    );

    // And it serves the keys written while it was down.
    let up = Instant::now();
    let tally = Tally::new("gets r=2 through the restarted n1");
    let n1 = cluster.url(0);
    let mut failures = Vec::new();
    for i in (0..100).step_by(5) {
        let (key, value) = (format!("k{i}"), format!("v{i}"));
        if let Err(e) = with_grace(
            up,
            grace,
            "n1",
            &tally,
            || get_kv(&n1, "down", &key, Some(2)),
            |r| r.status == 200 && r.text() == value,
        ) {
            failures.push(format!("get {key} via n1: {e}"));
        }
    }
    tally.print();
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn join_under_write_load_loses_nothing() {
    let _serial = serial();
    let mut cluster = Cluster::start(3);
    let writers = Writers::start(
        &named_urls(&cluster, &[0, 1, 2]),
        "join",
        3,
        Duration::from_millis(30),
    );
    wait_for(
        "100 acknowledged writes before the join",
        Duration::from_secs(30),
        || {
            let n = writers.acked_count();
            if n >= 100 {
                Ok(())
            } else {
                Err(format!("{n} acknowledged; {}", writers.tally.report()))
            }
        },
    );

    let joined_at = Instant::now();
    let before = writers.acked_count();
    let n4 = cluster.add_node(Some(0));
    cluster.wait_settled(&[0, 1, 2, 3], SETTLE);
    eprintln!(
        "[join] settled {:.1?} after starting n4; {} writes acknowledged meanwhile",
        joined_at.elapsed(),
        writers.acked_count() - before
    );
    std::thread::sleep(Duration::from_secs(1));
    let tally = Arc::clone(&writers.tally);
    let writes = writers.finish();
    cluster.assert_alive(&[]);
    assert!(!writes.is_empty());

    let all = named_urls(&cluster, &[0, 1, 2, n4]);
    let reads = Tally::new("read back r=2 after the join");
    let failures = read_back(&all, "join", &writes, 2, &reads);
    assert!(
        failures.is_empty(),
        "{} of {} acknowledged writes did not read back:\n{}",
        failures.len(),
        writes.len(),
        failures
            .iter()
            .take(30)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );

    let names: BTreeSet<String> = all.iter().map(|(n, _)| n.clone()).collect();
    assert_balanced(&cluster.url(0), &names);

    let keys: Vec<String> = sample(&writes, 300).into_iter().map(|(k, _)| k).collect();
    let misplaced = check_placement(&all, "join", &keys);
    assert!(
        misplaced.is_empty(),
        "{} of {} sampled keys are not exactly on their preflist:\n{}",
        misplaced.len(),
        keys.len(),
        misplaced
            .iter()
            .take(30)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );

    // The contract allows a write to be refused only with 503 (fewer than W replicas
    // answered); anything else (500, a dropped connection, a timeout) is a bug.
    let other = tally.failures_other_than(&[503]);
    assert!(
        other.is_empty(),
        "writes during the join failed other than with 503: {other:?}\n{}",
        tally.report()
    );
}

#[test]
fn leave_under_write_load_loses_nothing() {
    let _serial = serial();
    let mut cluster = Cluster::start(4);
    let remaining = named_urls(&cluster, &[0, 1, 2]);
    let writers = Writers::start(&remaining, "leave", 3, Duration::from_millis(30));
    wait_for(
        "100 acknowledged writes before the leave",
        Duration::from_secs(30),
        || {
            let n = writers.acked_count();
            if n >= 100 {
                Ok(())
            } else {
                Err(format!("{n} acknowledged; {}", writers.tally.report()))
            }
        },
    );

    let left_at = Instant::now();
    let before = writers.acked_count();
    // `--wait` follows the handoff until the node has exited, showing its progress.
    let out = cluster.admin(3, &["leave", "--wait"]);
    assert!(out.status.success(), "dynakv admin leave failed: {out:?}");
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(progress.contains("partitions moving"), "{progress}");
    assert!(progress.contains("ring settled"), "{progress}");
    cluster.wait_settled(&[0, 1, 2], SETTLE);
    eprintln!(
        "[leave] settled {:.1?} after the leave; {} writes acknowledged meanwhile; n4 {}",
        left_at.elapsed(),
        writers.acked_count() - before,
        cluster.nodes[3]
            .exited()
            .map_or_else(|| "still running".to_owned(), |s| format!("exited: {s}"))
    );
    std::thread::sleep(Duration::from_secs(1));
    let tally = Arc::clone(&writers.tally);
    let writes = writers.finish();
    cluster.assert_alive(&[3]);
    assert!(!writes.is_empty());

    // n4 is no longer a member (exiting, or gone) in the others' view.
    for (name, url) in &remaining {
        let m = members(url).unwrap();
        if let Some(n4) = m.iter().find(|m| m.name == "n4") {
            assert_eq!(n4.status, "exiting", "{name} still sees n4 as {n4:?}");
        }
    }

    let reads = Tally::new("read back r=2 after the leave");
    let failures = read_back(&remaining, "leave", &writes, 2, &reads);
    assert!(
        failures.is_empty(),
        "{} of {} acknowledged writes did not read back:\n{}",
        failures.len(),
        writes.len(),
        failures
            .iter()
            .take(30)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );

    let names: BTreeSet<String> = remaining.iter().map(|(n, _)| n.clone()).collect();
    assert_balanced(&cluster.url(0), &names);

    let keys: Vec<String> = sample(&writes, 300).into_iter().map(|(k, _)| k).collect();
    let misplaced = check_placement(&remaining, "leave", &keys);
    assert!(
        misplaced.is_empty(),
        "{} of {} sampled keys are not exactly on their preflist:\n{}",
        misplaced.len(),
        keys.len(),
        misplaced
            .iter()
            .take(30)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );

    // The contract allows a write to be refused only with 503 (fewer than W replicas
    // answered); anything else (500, a dropped connection, a timeout) is a bug.
    let other = tally.failures_other_than(&[503]);
    assert!(
        other.is_empty(),
        "writes during the leave failed other than with 503: {other:?}\n{}",
        tally.report()
    );
}

#[test]
fn admin_join_of_a_running_node() {
    let _serial = serial();
    let mut cluster = Cluster::new();
    cluster.add_node(None);
    // Founds a cluster of its own, with its own secret: it cannot join n1's.
    let stranger = cluster.create_node();
    cluster.nodes[stranger].with_secret = false;
    cluster.nodes[stranger].spawn(None);
    cluster.nodes[stranger].wait_up(Duration::from_secs(20));
    let out = cluster.admin(stranger, &["join", &cluster.nodes[0].peer_addr()]);
    assert!(
        !out.status.success(),
        "a node without the secret joined: {out:?}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cluster's secret"), "{stderr}");
    // Founds a cluster of its own too, but holds n1's secret (--cluster-secret-file): it can.
    let holder = cluster.add_node(None);
    let out = cluster.admin(holder, &["join", &cluster.nodes[0].peer_addr()]);
    assert!(out.status.success(), "dynakv admin join failed: {out:?}");
    cluster.wait_settled(&[0, holder], SETTLE);
    let r = put_kv(&cluster.url(holder), "aj", "k", "v", Some(2), None).unwrap();
    assert_eq!(r.status, 204, "{}", r.summary());
    let r = get_kv(&cluster.url(0), "aj", "k", Some(2)).unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "v"), "{}", r.summary());
}

/// Kills the `dev` process on drop unless it was already reaped.
struct DevProc(Option<std::process::Child>);

impl Drop for DevProc {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn dev_runs_three_nodes() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let base = consecutive_free_ports(3);
    let log = dir.path().join("dev.log");
    let mut child = Command::new(common::BIN)
        .args([
            "dev",
            "--nodes",
            "3",
            "--http-port",
            &base.to_string(),
            "--pb-port",
            &(base + 2000).to_string(),
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut dev = DevProc(Some(child));
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let wanted: Vec<Vec<String>> = (0..3u16)
        .map(|i| {
            vec![
                format!("dev{}", i + 1),
                format!("http://127.0.0.1:{}", base + i),
                "pb".to_owned(),
                format!("127.0.0.1:{}", base + 2000 + i),
            ]
        })
        .collect();
    let mut seen = [false; 3];
    let mut printed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.iter().any(|s| !s) {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(line) => line,
            Err(e) => panic!(
                "dev did not print its three nodes ({e}); stdout so far: {printed:#?}; log:\n{}",
                common::tail(&log, 40)
            ),
        };
        let tokens: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        if let Some(i) = wanted.iter().position(|w| *w == tokens) {
            seen[i] = true;
        }
        printed.push(line);
    }
    eprintln!("[dev] printed: {printed:#?}");
    // Its log goes to a file: plain text, no terminal colour codes.
    let logged = std::fs::read(&log).unwrap();
    assert!(
        !logged.is_empty() && !logged.contains(&0x1b),
        "colour codes in a log file"
    );

    let urls: Vec<String> = (0..3u16)
        .map(|i| format!("http://127.0.0.1:{}", base + i))
        .collect();
    let r = put_kv(&urls[0], "dev", "k", "hello", None, None).unwrap();
    assert_eq!(r.status, 204, "{}", r.summary());
    // Each node answers Riak's PB ping on its PB port.
    for i in 0..3u16 {
        use std::io::{Read as _, Write as _};
        let mut pb = std::net::TcpStream::connect(("127.0.0.1", base + 2000 + i)).unwrap();
        pb.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        pb.write_all(&[0, 0, 0, 1, 1]).unwrap();
        let mut answer = [0u8; 5];
        pb.read_exact(&mut answer).unwrap();
        assert_eq!(answer, [0, 0, 0, 1, 2], "PB ping of dev{}", i + 1);
    }
    for url in &urls[1..] {
        let r = get_kv(url, "dev", "k", None).unwrap();
        assert_eq!(
            (r.status, r.text().as_str()),
            (200, "hello"),
            "via {url}: {}",
            r.summary()
        );
    }
    assert_eq!(members(&urls[0]).unwrap().len(), 3);

    // Data types from the command line: a counter type, updated and read with `dynakv dt`,
    // and `dynakv bench --datatype counter` over PB.
    let cli = |args: &[&str]| {
        let out = Command::new(common::BIN)
            .args(args)
            .args(["--url", &urls[0]])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, _, err) = cli(&[
        "admin",
        "bucket-type",
        "create",
        "hits",
        r#"{"props":{"datatype":"counter"}}"#,
    ]);
    assert!(ok, "{err}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cli(&["admin", "bucket-type", "activate", "hits"]).0 {
        assert!(Instant::now() < deadline, "the type was never activated");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    let (ok, out, err) = cli(&["dt", "update", "hits", "b", "k", r#"{"increment":3}"#]);
    assert!(ok && out.contains(r#""value":3"#), "{out} {err}");
    let (ok, out, err) = cli(&["dt", "get", "hits", "b", "k"]);
    assert!(ok && out.contains(r#""type":"counter""#), "{out} {err}");
    let (ok, _, err) = cli(&["dt", "update", "hits", "b", "k", "not json"]);
    assert!(!ok && err.contains("not JSON"), "{err}");
    let pb = format!("127.0.0.1:{}", base + 2000);
    let (ok, out, err) = cli(&[
        "bench",
        "--datatype",
        "counter",
        "--protocol",
        "pb",
        "--pb",
        &pb,
        "--workload",
        "a",
        "--ops",
        "300",
        "--records",
        "10",
        "--concurrency",
        "4",
        "--json",
    ]);
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["errors"], 0, "{out}");

    let pid = dev.0.as_ref().unwrap().id();
    let kill = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = dev.0.as_mut().unwrap().try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "dev did not stop within 20 s of SIGINT; log:\n{}",
            common::tail(&log, 40)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    dev.0 = None;
    reader.join().unwrap();
    assert!(
        status.success(),
        "dev exited with {status} on SIGINT; log:\n{}",
        common::tail(&log, 40)
    );
}
