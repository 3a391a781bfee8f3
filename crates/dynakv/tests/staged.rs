//! Staged membership changes (issue 22) on real processes: a join staged on a fresh node
//! changes nothing until commit, the plan shows the partitions that move and the resulting
//! ownership, commit applies it; clear drops a staged change and commit refuses an unplanned
//! one; a killed node is force-removed, and every key stays readable.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Cluster, dynakv, get_kv, members, put_kv, serial};
use std::process::Output;
use std::time::Duration;

fn cli(url: &str, plan: &str, args: &[&str]) -> Output {
    let mut all = vec!["admin", "--url", url, "cluster", "--plan-file", plan];
    all.extend_from_slice(args);
    dynakv(&all)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn staged_join_plan_commit_clear_and_force_remove() {
    let _serial = serial();
    let mut cluster = Cluster::start(3);
    let base = cluster.url(0);
    for i in 0..100 {
        let resp = put_kv(
            &base,
            "s",
            &format!("k{i}"),
            &format!("v{i}"),
            Some(3),
            None,
        )
        .unwrap();
        assert_eq!(resp.status, 204);
    }
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.json");
    let plan = plan.to_str().unwrap();

    // A fresh node stages its join: nothing changes yet.
    let fresh = cluster.add_node(None);
    let fresh_name = cluster.name(fresh);
    let peer = cluster.nodes[0].peer_addr();
    let out = cli(&cluster.url(fresh), plan, &["join", &peer]);
    assert!(out.status.success());
    assert!(stdout(&out).contains(&format!("staged: join     {fresh_name}")));
    // Commit before a plan is refused.
    let out = cli(&base, plan, &["commit"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cluster plan"));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(members(&base).unwrap().len(), 3);

    let out = cli(&base, plan, &["plan"]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(text.contains("of 64 partitions move; about "), "{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with(&format!("{fresh_name} ")))
        .unwrap_or_else(|| panic!("no ownership row for {fresh_name}: {text}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[1], "0", "{row}");
    assert!(
        (15..=17).contains(&cells[2].parse::<u32>().unwrap()),
        "{row}"
    );

    let out = cli(&base, plan, &["commit", "--wait"]);
    assert!(out.status.success());
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(progress.contains("partitions moving"), "{progress}");
    assert!(progress.contains("ring settled"), "{progress}");
    assert!(
        !std::path::Path::new(plan).exists(),
        "the plan file is removed at commit"
    );
    cluster.wait_settled(&[0, 1, 2, fresh], Duration::from_secs(60));

    // Clear drops what was staged.
    assert!(cli(&base, plan, &["leave", &fresh_name]).status.success());
    let out = cli(&base, plan, &["clear"]);
    assert!(stdout(&out).contains("cleared the staged changes (1)"));
    let out = cli(&base, plan, &["plan"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing is staged"));

    // A node gone for good: force-removed without handoff; every key stays readable.
    cluster.kill(2);
    let gone = cluster.name(2);
    assert!(cli(&base, plan, &["force-remove", &gone]).status.success());
    assert!(cli(&base, plan, &["plan"]).status.success());
    assert!(cli(&base, plan, &["commit"]).status.success());
    cluster.wait_settled(&[0, 1, fresh], Duration::from_secs(60));
    let listed = members(&cluster.url(1)).unwrap();
    let removed = listed.iter().find(|m| m.name == gone).unwrap();
    assert_eq!(removed.status, "exiting", "{listed:?}");
    for i in 0..100 {
        let resp = get_kv(&cluster.url(i % 2), "s", &format!("k{i}"), Some(3)).unwrap();
        assert_eq!((resp.status, resp.text()), (200, format!("v{i}")), "k{i}");
    }
}
