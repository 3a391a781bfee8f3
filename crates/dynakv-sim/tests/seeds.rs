//! The simulation over fixed seeds: the sibling mode must lose nothing (joins and leaves
//! included), the checkers must catch last-write-wins and a planted bug, and a seed must
//! replay exactly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use dynakv_sim::node::Bug;
use dynakv_sim::run_seed;
use dynakv_sim::sim::MembershipChange;

/// Seeds run in the sibling-mode test (debug build: keep it under about a minute).
const SIBLING_SEEDS: u64 = 500;
/// Seeds run by the tests that expect the checkers to find losses.
const DETECTION_SEEDS: u64 = 40;

#[test]
fn sibling_mode_loses_nothing_and_converges() {
    let mut failures = Vec::new();
    let mut acknowledged = 0;
    let (mut joins, mut leaves, mut orphan_seeds) = (0, 0, 0);
    for seed in 0..SIBLING_SEEDS {
        let report = run_seed(seed, |_| {}).unwrap();
        acknowledged += report.check.adds_acknowledged + report.check.writes_acknowledged;
        assert!(report.history.events.len() > 100, "seed {seed} did little");
        match report.config.membership {
            Some(MembershipChange::Join) => joins += 1,
            Some(MembershipChange::Leave) => leaves += 1,
            Some(MembershipChange::JoinThenLeave) | None => {}
        }
        orphan_seeds += usize::from(!report.strays.is_empty());
        if !report.passed() {
            failures.push(report.describe());
        }
    }
    println!("{joins} joins, {leaves} leaves, {orphan_seeds} seeds with an orphan copy");
    assert!(joins > 50 && leaves > 50, "joins {joins} leaves {leaves}");
    assert_eq!(orphan_seeds, 0, "keys stored outside their preference list");
    assert!(
        acknowledged > 10_000,
        "too few acknowledged writes: {acknowledged}"
    );
    assert!(
        failures.is_empty(),
        "failing seeds:\n{}",
        failures.join("\n")
    );
}

#[test]
fn last_write_wins_loses_acknowledged_adds() {
    let mut seeds_with_loss = 0;
    let (mut lost, mut acked) = (0, 0);
    for seed in 0..DETECTION_SEEDS {
        let report = run_seed(seed, |c| c.node.props.last_write_wins = true).unwrap();
        assert_eq!(report.check.phantom(), 0, "seed {seed}");
        assert!(report.converged, "seed {seed}");
        lost += report.check.lost_adds.len();
        acked += report.check.adds_acknowledged;
        seeds_with_loss += usize::from(!report.check.lost_adds.is_empty());
    }
    println!(
        "LWW: {lost} of {acked} acknowledged adds lost ({:.3}), {seeds_with_loss} of {DETECTION_SEEDS} seeds",
        lost as f64 / acked as f64
    );
    assert!(
        seeds_with_loss * 2 > DETECTION_SEEDS as usize,
        "LWW lost adds on only {seeds_with_loss} seeds"
    );
}

#[test]
fn last_write_wins_loses_adds_in_runs_with_partitions() {
    // A partition makes both sides accept adds concurrently, and LWW keeps one side's set
    // (with two clients; concurrent clients alone also lose adds under LWW).
    let mut found = false;
    for seed in 0..DETECTION_SEEDS {
        let report = run_seed(seed, |c| {
            c.node.props.last_write_wins = true;
            c.clients = 2;
        })
        .unwrap();
        if report.fault_log.iter().any(|f| f.contains("partition"))
            && !report.check.lost_adds.is_empty()
        {
            found = true;
            break;
        }
    }
    assert!(found, "no seed with a partition lost an add under LWW");
}

#[test]
fn planted_drop_sibling_bug_is_caught() {
    let mut caught = 0;
    for seed in 0..DETECTION_SEEDS {
        let report = run_seed(seed, |c| c.node.sim.bug = Some(Bug::DropSiblingOnMerge)).unwrap();
        caught += usize::from(report.check.lost() > 0);
    }
    assert!(
        caught * 4 > 3 * DETECTION_SEEDS as usize,
        "the planted bug was caught on only {caught} of {DETECTION_SEEDS} seeds"
    );
}

#[test]
fn same_seed_replays_exactly() {
    for seed in [3, 1234] {
        let a = run_seed(seed, |_| {}).unwrap();
        let b = run_seed(seed, |_| {}).unwrap();
        assert_eq!(a.history.render().as_bytes(), b.history.render().as_bytes());
        assert_eq!(a.fault_log, b.fault_log);
        assert_eq!(a.finals, b.finals);
        assert_eq!(a.messages_sent, b.messages_sent);
        assert_eq!(a.end_ms, b.end_ms);
        let other = run_seed(seed + 1, |_| {}).unwrap();
        assert_ne!(a.history.render(), other.history.render());
    }
}

#[test]
fn without_faults_every_operation_succeeds() {
    for seed in 0..10 {
        let report = run_seed(seed, |c| c.faults = false).unwrap();
        assert!(report.passed(), "{}", report.describe());
        assert_eq!(report.ops_indeterminate, 0, "{}", report.describe());
    }
}

#[test]
fn stale_hint_delivery_left_an_orphan_copy_under_the_old_rule() {
    // Seed 154 (found by this simulator, replaced by 336 below): n4 joins; n2, still on the transition's ring
    // (version 4), delivers a hint for set-0 to n1 as a plain `Handoff`, after n1 switched to
    // version 5 (where it no longer replicates set-0) and ran its cleanup. Under the old rule
    // the `Handoff` handler neither refused an older ring nor called `check_orphan`, so the
    // copy stayed on n1 for good. The server now has the checked rule (the default here).
    // Without deletes, the seed runs the workload it was found with.
    // Since cleanup hands doomed keys over before dropping them, the simulation takes other
    // paths; seed 336 (no deletes) showed the same stray copy under the old rule until the
    // anti-entropy rounds moved onto the core's `AaeRound`, which changed the runs'
    // trajectories, and seeds 548, 641 and 1531 showed it until syncs became the node's
    // outputs (an fsync takes 1-8 simulated ms), and seeds 114, 148 and 273 showed it until
    // the node's handoff and cleanup were paged as the server's, and seeds 105, 241 and 264
    // (with a forced join) until the anti-entropy round became the core's `AaeRun` (its
    // repairs' writes are buffered, as the server's always were), and seeds 45, 88 and 245
    // until hint delivery became one round over the targets (`DeliveryRound`). Pinned seeds
    // kept moving, so the test now scans: with a forced join and no deletes, about 1 run in
    // 100 leaves a stray copy under the old rule (20 of 2000 at 46ae438, the first at seed
    // 42: `dynakv-sim --seeds 2000 --membership join --old-rule unchecked-handoff
    // --no-deletes`); the first such seed below `STRAY_SCAN_SEEDS` must show it, and the
    // same seed under the current rule must pass.
    const STRAY_SCAN_SEEDS: u64 = 600;
    let setup = |c: &mut dynakv_sim::sim::SimConfig| {
        c.deletes = false;
        c.membership = Some(MembershipChange::Join);
    };
    let found = (0..STRAY_SCAN_SEEDS).find(|&seed| {
        let old = run_seed(seed, |c| {
            setup(c);
            c.node.sim.handoff_checks_ring = false;
        })
        .unwrap();
        assert_eq!(old.check.lost(), 0, "seed {seed}");
        assert!(old.converged, "{}", old.describe());
        !old.strays.is_empty()
    });
    let Some(seed) = found else {
        panic!("the old rule left no stray copy in seeds 0..{STRAY_SCAN_SEEDS}");
    };
    println!("seed {seed} shows the stray copy under the old rule");
    let fixed = run_seed(seed, setup).unwrap();
    assert!(fixed.passed(), "{}", fixed.describe());
}

/// Deletes under faults with short grace periods: tombstones are reaped, and nothing a client
/// deleted or overwrote (and was told so) ever comes back. (With a grace period of 0, 2 of
/// 3000 seeds bring a value back: a leaver's cleanup hands over an old copy after the reap;
/// the grace period is what covers copies in flight.)
#[test]
fn reaped_tombstones_never_bring_deleted_values_back() {
    let (mut deletes, mut reaped) = (0, 0);
    let mut failures = Vec::new();
    // Most reaps come from the short grace period (a run is too short for many 3 s
    // tombstones), so it gets twice the seeds: 80 seeds of each reaped 12 copies once the
    // anti-entropy round became the core's `AaeRun` (a changed trajectory; 400 seeds reap
    // about as many as before), short of the bound below.
    let runs = (0..DETECTION_SEEDS * 4)
        .map(|seed| (seed, 500))
        .chain((0..DETECTION_SEEDS * 2).map(|seed| (seed, 3_000)));
    for (seed, grace) in runs {
        let report = run_seed(seed, |c| c.node.tombstone_grace_ms = grace).unwrap();
        deletes += report.check.deletes_acknowledged;
        reaped += report.tombstones_reaped;
        if !report.passed() {
            failures.push(report.describe());
        }
    }
    println!("{deletes} deletes acknowledged, {reaped} tombstone copies reaped");
    assert!(
        deletes > 500 && reaped > 20,
        "deletes {deletes} reaped {reaped}"
    );
    assert!(
        failures.is_empty(),
        "failing seeds:\n{}",
        failures.join("\n")
    );
}

/// Seeds 1048 and 3509 at 0.5 s grace (found by this simulator once hint delivery became one
/// round over the targets): a leaver completed its leave while still holding hints, answered
/// no reap check once it had left (counted as clear), and delivered an old version after the
/// reap. A leaver now hands its hints over (to their targets, or to an heir for a target that
/// is down) before its handoff completes. (Seed 2914 still brings one back at 0.5 s: a handoff
/// batch queued at a node paused for 3.9 s is applied after the reap, the in-flight case the
/// grace period covers; see docs/architecture.md, *Tombstones*.)
#[test]
fn a_leaver_hands_its_hints_over_before_it_leaves() {
    for seed in [1048, 3509] {
        let report = run_seed(seed, |c| c.node.tombstone_grace_ms = 500).unwrap();
        assert!(report.passed(), "{}", report.describe());
        assert!(report.membership_ok, "{}", report.describe());
    }
}

/// The two reaping rules the simulation found wanting bring deleted values back, and the
/// resurrection checker reports it: per-key dot counters (a key reaped here restarts at 1 and
/// reissues an old dot for a new value, Riak's KV679), and checking only the primaries before
/// a reap (a hint of an older version held elsewhere is delivered after the reap).
#[test]
fn the_old_reaping_rules_resurrect_and_are_caught() {
    for (rule, apply) in [
        (
            "per-key counters",
            (|c: &mut dynakv_sim::sim::SimConfig| c.node.sim.per_key_counters = true)
                as fn(&mut dynakv_sim::sim::SimConfig),
        ),
        ("primaries-only reap", |c| {
            c.node.sim.primaries_only_reap = true;
        }),
    ] {
        let mut resurrected = 0;
        for seed in 0..DETECTION_SEEDS * 5 {
            let report = run_seed(seed, |c| {
                c.node.tombstone_grace_ms = 500;
                apply(c);
            })
            .unwrap();
            resurrected += report.check.resurrected.len();
        }
        println!("{rule}: {resurrected} resurrected siblings");
        assert!(resurrected > 0, "{rule}: the checker found nothing");
    }
}

#[test]
fn joins_and_leaves_complete() {
    for seed in 0..20 {
        for change in [MembershipChange::Join, MembershipChange::Leave] {
            let report = run_seed(seed, |c| {
                c.membership = Some(change);
                if change == MembershipChange::Leave {
                    c.nodes = c.nodes.max(4);
                }
            })
            .unwrap();
            assert!(report.passed(), "{}", report.describe());
            assert!(report.membership_ok, "{}", report.describe());
        }
    }
}

/// Seed 31 with a leave forced (found by this simulator): a write that landed on the leaver
/// after the transition's handoff was the last copy once the other replica was wiped, and the
/// leaver's cleanup dropped it. Cleanup now hands every doomed key to its primaries first;
/// 1000 forced-leave seeds pass (`--seeds 1000 --membership leave`), 40 run here.
#[test]
fn cleanup_hands_a_late_write_over_before_dropping_it() {
    // The seed now takes another path (cleanup sends messages); the forced-leave runs around
    // it must all pass.
    let mut failures = Vec::new();
    for seed in 0..DETECTION_SEEDS {
        let report = run_seed(seed + 31, |c| c.membership = Some(MembershipChange::Leave)).unwrap();
        if !report.passed() {
            failures.push(report.describe());
        }
    }
    assert!(
        failures.is_empty(),
        "failing seeds:\n{}",
        failures.join("\n")
    );
}

/// Finding 5 (found by the nemesis's SIGSTOP, reproduced here with the pause fault): under
/// the old forwarding rule a forward that timed out was retried on the next primary, and the
/// paused first candidate coordinated it too when it resumed, so one put was applied twice
/// (two dots for one value) and could bring back a value the client had overwritten. The
/// current rule (stop on an unanswered forward, refuse a forward that arrives late) applies
/// every put once, and pauses do exercise the late refusal.
#[test]
fn a_paused_coordinator_never_applies_a_forwarded_put_twice() {
    let (mut twice_old, mut twice_now, mut pauses, mut refused) = (0, 0, 0, 0);
    for seed in 0..DETECTION_SEEDS * 5 {
        let old = run_seed(seed, |c| c.node.sim.retry_unanswered_forward = true).unwrap();
        twice_old += old.check.applied_twice.len();
        let now = run_seed(seed, |_| {}).unwrap();
        twice_now += now.check.applied_twice.len();
        pauses += now.pauses;
        refused += now.late_forwards_refused;
    }
    println!(
        "old rule: {twice_old} puts applied twice; now: {twice_now}, {pauses} pauses, {refused} late forwards refused"
    );
    assert!(
        twice_old > 0,
        "the exactly-once checker found nothing under the old rule"
    );
    assert_eq!(twice_now, 0);
    assert!(
        pauses > 0 && refused > 0,
        "pauses {pauses} refused {refused}"
    );
}

/// A node joins and, once settled, leaves again while clients keep writing (blind writes
/// among them): the nodes that handed it their ranges and dropped them in cleanup become
/// those ranges' replicas again and coordinate writes of keys whose history they dropped.
/// A coordinator whose copy lacked one of its own earlier dots for such a key would issue a
/// dot covering it (dot counters are node-wide) and the merge would drop that sibling; the
/// checkers would report it lost. Handoff before every drop and before every ring switch
/// must prevent it (`--seeds 1000 --membership join-leave --ops 600` runs more).
#[test]
fn ranges_regained_after_a_join_then_leave_lose_nothing() {
    let (mut dropped, mut failures) = (0, Vec::new());
    for seed in 0..DETECTION_SEEDS / 2 {
        let report = run_seed(seed + 500, |c| {
            c.membership = Some(MembershipChange::JoinThenLeave);
            c.ops = c.ops.max(400);
        })
        .unwrap();
        dropped += report.cleanup_dropped;
        if !report.passed() || !report.membership_ok {
            failures.push(report.describe());
        }
    }
    assert!(
        failures.is_empty(),
        "failing seeds:\n{}",
        failures.join("\n")
    );
    assert!(
        dropped > 0,
        "no node dropped a range: the scenario did not happen"
    );
}

/// Skewed wall clocks (each machine up to 5 s off, its timers not): no acknowledged write is
/// lost, and forwarded puts are judged by the forwarder's clock converted with the offset
/// its hello measured (`Input::Hello`), so the skew does not make coordinators refuse
/// them as late (unconverted, a 5 s skew against the 500 ms limit refuses most of them).
#[test]
fn skewed_wall_clocks_lose_nothing_and_forwards_are_judged_on_converted_clocks() {
    let (mut refused_plain, mut refused_skewed) = (0, 0);
    let mut failures = Vec::new();
    for seed in 0..DETECTION_SEEDS {
        refused_plain += run_seed(seed, |_| {}).unwrap().late_forwards_refused;
        let skewed = run_seed(seed, |c| c.clock_skew_ms = 5_000).unwrap();
        refused_skewed += skewed.late_forwards_refused;
        if !skewed.passed() {
            failures.push(skewed.describe());
        }
    }
    println!("late forwards refused: {refused_plain} without skew, {refused_skewed} with");
    assert!(
        failures.is_empty(),
        "failing seeds:\n{}",
        failures.join("\n")
    );
    assert!(
        refused_skewed <= refused_plain * 2 + 20,
        "skew made coordinators refuse forwards: {refused_skewed} vs {refused_plain}"
    );
}

/// The data type workloads (issue 21): counters and sets updated through every node under
/// faults lose no acknowledged increment, add or removal, and join-then-leave runs (which
/// drop and regain ranges) too.
#[test]
fn data_types_lose_nothing_under_faults() {
    let mut acked = (0, 0, 0);
    for seed in 0..40 {
        let report = run_seed(seed, |c| c.datatypes = true).unwrap();
        assert!(report.passed(), "{}", report.describe());
        acked.0 += report.datatype_ops.0;
        acked.1 += report.datatype_ops.1;
        acked.2 += report.datatype_ops.2;
    }
    for seed in 0..10 {
        let report = run_seed(seed, |c| {
            c.datatypes = true;
            c.membership = Some(MembershipChange::JoinThenLeave);
        })
        .unwrap();
        assert!(report.datatype_problems.is_empty(), "{}", report.describe());
    }
    assert!(
        acked.0 > 1000 && acked.1 > 500 && acked.2 > 100,
        "{acked:?}"
    );
}

/// A data type merge that keeps the largest version instead of merging them (the counter
/// merge "max instead of per-actor max") is caught by both the counter and the set checker.
#[test]
fn planted_datatype_max_merge_is_caught() {
    let (mut counters, mut sets) = (0, 0);
    for seed in 0..DETECTION_SEEDS {
        let report = run_seed(seed, |c| {
            c.datatypes = true;
            c.node.sim.bug = Some(Bug::DatatypeMaxMerge);
        })
        .unwrap();
        counters += usize::from(
            report
                .datatype_problems
                .iter()
                .any(|p| p.contains("counter")),
        );
        sets += usize::from(report.datatype_problems.iter().any(|p| p.contains("add")));
    }
    assert!(
        counters * 2 > DETECTION_SEEDS as usize && sets > 0,
        "caught by the counter checker on {counters} and the set checker on {sets} of \
         {DETECTION_SEEDS} seeds"
    );
}

/// The expiry workload (issue 21): values written with a time to live of a second, read
/// through every node under faults and with clocks skewed, are never returned once expired
/// (by the time to live plus twice the skew bound after their acknowledgement), and every
/// key's replicas converge to its tombstone (the convergence check fails while an expired
/// value is still stored anywhere).
#[test]
fn expired_values_are_never_read_and_always_removed() {
    let mut late_reads = 0;
    for seed in 0..40 {
        let skew = if seed % 2 == 0 { 0 } else { 150 };
        let report = run_seed(seed, |c| {
            c.expiry = true;
            c.clock_skew_ms = skew;
        })
        .unwrap();
        assert!(report.passed(), "{}", report.describe());
        late_reads += report.expiry_reads.1;
    }
    assert!(late_reads > 1000, "{late_reads} reads came after an expiry");
}

/// Reads that do not leave expired values out are caught by the expiry checker; a sweep that
/// drops its own copy instead of writing a tombstone (riak_kv#1649) never converges, since
/// anti-entropy brings the value back from the other replicas.
#[test]
fn planted_expiry_bugs_are_caught() {
    // A run that never converges simulates up to the convergence bound: fewer seeds.
    const DROP_SEEDS: u64 = 8;
    let (mut unfiltered, mut dropped) = (0, 0);
    for seed in 0..DETECTION_SEEDS {
        let report = run_seed(seed, |c| {
            c.expiry = true;
            c.node.sim.bug = Some(Bug::ExpiryUnfilteredRead);
        })
        .unwrap();
        unfiltered += usize::from(!report.expiry_problems.is_empty());
    }
    for seed in 0..DROP_SEEDS {
        let report = run_seed(seed, |c| {
            c.expiry = true;
            c.node.sim.bug = Some(Bug::ExpiryDropLocally);
        })
        .unwrap();
        dropped += usize::from(!report.converged);
    }
    assert!(
        unfiltered * 2 > DETECTION_SEEDS as usize && dropped * 2 > DROP_SEEDS as usize,
        "unfiltered reads caught on {unfiltered} of {DETECTION_SEEDS} seeds, local drops on \
         {dropped} of {DROP_SEEDS}"
    );
}

/// The PBS predictor (issue 22) against the simulation: the share of reads issued t ms after
/// a write's acknowledgement that returned it, measured, is within 0.15 of what the core's
/// predictor makes of the round trips the same nodes measured, for partial and strict
/// quorums, 3 and 5 nodes.
#[test]
fn pbs_predictions_match_measured_staleness() {
    use dynakv_core::storage::Durability;
    use dynakv_sim::pbs::{ProbeConfig, probe};
    for (nodes, r, w) in [(3, 1, 1), (3, 2, 1), (5, 1, 1), (3, 2, 2)] {
        let report = probe(ProbeConfig {
            seed: 7,
            nodes,
            r,
            w,
            t_ms: vec![0, 2, 5, 10, 20],
            trials: 400,
            durability: Durability::Buffered,
        })
        .unwrap();
        assert!(
            report.samples.0 > 100 && report.samples.1 > 100,
            "{report:?}"
        );
        assert!(report.max_error() < 0.15, "{report:?}");
        if r + w > 3 {
            assert!(
                report.measured.iter().all(|(_, hits, reads)| hits == reads),
                "{report:?}"
            );
        } else {
            let (_, hits, reads) = report.measured[0];
            assert!(
                hits < reads,
                "a partial quorum is sometimes stale at t = 0: {report:?}"
            );
        }
    }
}
