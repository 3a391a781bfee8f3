//! `dynakv-sim`: run many seeds (or replay one) and print a summary.
//!
//! ```text
//! cargo run --release -p dynakv-sim -- --seeds 5000 [--start SEED] [--lww]
//!     [--bug drop-sibling|datatype-max-merge|expiry-unfiltered-read|expiry-drop-locally]
//!     [--datatypes] [--expiry]
//!     [--ops N] [--keep-actor] [--no-faults] [--no-deletes] [--membership join|leave|join-leave|none] [--grace-ms MS]
//!     [--clock-skew-ms MS]
//!     [--old-rule unchecked-handoff|per-key-counters|primaries-only-reap|retry-unanswered-forward]
//!     [--seed S --verbose]
//! ```
//! Exits with status 1 when a seed fails (unless `--lww` or `--bug`, where failures are the
//! expected outcome and only the summary matters).

use dynakv_sim::node::Bug;
use dynakv_sim::sim::MembershipChange;
use dynakv_sim::{RunReport, SimConfig, run_seed};
use std::process::ExitCode;

/// Failing seeds printed in full; the rest are only counted.
const MAX_FAILURES_SHOWN: usize = 10;

#[derive(Debug, Default)]
#[allow(clippy::struct_excessive_bools)] // independent command-line switches
struct Args {
    seeds: u64,
    start: u64,
    seed: Option<u64>,
    lww: bool,
    bug: Option<Bug>,
    ops: Option<usize>,
    keep_actor: bool,
    no_faults: bool,
    /// Override the seed's membership change (`membership_given`; `None`: no change).
    membership_given: bool,
    membership: Option<MembershipChange>,
    verbose: bool,
    /// Run the server's old rule (`Handoff` without a ring check), to reproduce the finding.
    unchecked_handoff: bool,
    /// Issue dot counters per key only (the rule before the reaping finding).
    per_key_counters: bool,
    no_deletes: bool,
    datatypes: bool,
    expiry: bool,
    /// Validate the PBS predictor (`--pbs`): measured vs predicted staleness.
    pbs: bool,
    /// Reap after checking the primaries only (the rule before the reaping finding).
    primaries_only_reap: bool,
    /// Retry an unanswered forward elsewhere, with no expiry (the rule before finding 5).
    retry_unanswered_forward: bool,
    /// Override the seed's tombstone grace period.
    grace_ms: Option<u64>,
    /// Skew each machine's wall clock by up to this much.
    clock_skew_ms: u64,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        seeds: 100,
        ..Args::default()
    };
    let mut it = std::env::args().skip(1);
    let number = |v: Option<String>, name: &str| -> Result<u64, String> {
        v.ok_or_else(|| format!("{name} needs a value"))?
            .parse()
            .map_err(|e| format!("{name}: {e}"))
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--seeds" => args.seeds = number(it.next(), "--seeds")?,
            "--start" => args.start = number(it.next(), "--start")?,
            "--seed" => args.seed = Some(number(it.next(), "--seed")?),
            "--ops" => args.ops = Some(number(it.next(), "--ops")? as usize),
            "--lww" => args.lww = true,
            "--grace-ms" => args.grace_ms = Some(number(it.next(), "--grace-ms")?),
            "--clock-skew-ms" => args.clock_skew_ms = number(it.next(), "--clock-skew-ms")?,
            "--keep-actor" => args.keep_actor = true,
            "--old-rule" => match it.next().as_deref() {
                Some("unchecked-handoff") => args.unchecked_handoff = true,
                Some("per-key-counters") => args.per_key_counters = true,
                Some("primaries-only-reap") => args.primaries_only_reap = true,
                Some("retry-unanswered-forward") => args.retry_unanswered_forward = true,
                other => {
                    return Err(format!(
                        "unknown old rule {other:?} (known: unchecked-handoff, per-key-counters, primaries-only-reap, retry-unanswered-forward)"
                    ));
                }
            },
            "--no-faults" => args.no_faults = true,
            "--no-deletes" => args.no_deletes = true,
            "--datatypes" => args.datatypes = true,
            "--expiry" => args.expiry = true,
            "--pbs" => args.pbs = true,
            "--verbose" => args.verbose = true,
            "--membership" => {
                args.membership_given = true;
                args.membership = match it.next().as_deref() {
                    Some("join") => Some(MembershipChange::Join),
                    Some("leave") => Some(MembershipChange::Leave),
                    Some("join-leave") => Some(MembershipChange::JoinThenLeave),
                    Some("none") => None,
                    other => {
                        return Err(format!(
                            "unknown membership change {other:?} (known: join, leave, join-leave, none)"
                        ));
                    }
                };
            }
            "--bug" => match it.next().as_deref() {
                Some("drop-sibling") => args.bug = Some(Bug::DropSiblingOnMerge),
                Some("datatype-max-merge") => args.bug = Some(Bug::DatatypeMaxMerge),
                Some("expiry-unfiltered-read") => args.bug = Some(Bug::ExpiryUnfilteredRead),
                Some("expiry-drop-locally") => {
                    args.bug = Some(Bug::ExpiryDropLocally);
                }
                other => {
                    return Err(format!(
                        "unknown bug {other:?} (known: drop-sibling, datatype-max-merge, expiry-unfiltered-read, expiry-drop-locally)"
                    ));
                }
            },
            "-h" | "--help" => {
                return Err("usage: dynakv-sim [--seeds N] [--start S] [--seed S] [--lww] [--bug drop-sibling|datatype-max-merge|expiry-unfiltered-read|expiry-drop-locally] [--datatypes] [--expiry] [--ops N] [--keep-actor] [--no-faults] [--no-deletes] [--membership join|leave|join-leave|none] [--old-rule unchecked-handoff|per-key-counters|primaries-only-reap|retry-unanswered-forward] [--grace-ms MS] [--clock-skew-ms MS] [--verbose]".into());
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

/// `--pbs`: for 3 and 5 nodes (N = 3) and several R, W, the share of reads issued t ms
/// after a write's acknowledgement that returned it, measured in the simulation, beside the
/// core predictor's figure from the round trips the same nodes measured.
fn pbs_table() -> ExitCode {
    use dynakv_core::storage::Durability;
    use dynakv_sim::pbs::{ProbeConfig, probe};
    let t_ms = vec![0, 1, 2, 5, 10, 20, 50];
    println!("| nodes | durability | R | W | trials | t (ms) | measured | predicted |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut worst: f64 = 0.0;
    for (nodes, durability) in [
        (3, Durability::Buffered),
        (3, Durability::Fsync),
        (5, Durability::Buffered),
    ] {
        for (r, w) in [(1, 1), (1, 2), (2, 1), (2, 2)] {
            let config = ProbeConfig {
                seed: 42,
                nodes,
                r,
                w,
                t_ms: t_ms.clone(),
                trials: 1000,
                durability,
            };
            let report = match probe(config) {
                Ok(report) => report,
                Err(e) => {
                    eprintln!("probe failed: {e}");
                    return ExitCode::FAILURE;
                }
            };
            worst = worst.max(report.max_error());
            for ((t, hits, reads), p) in report.measured.iter().zip(&report.predicted) {
                #[allow(clippy::cast_precision_loss)]
                let measured = *hits as f64 / (*reads).max(1) as f64;
                println!(
                    "| {nodes} | {durability:?} | {r} | {w} | {reads} | {t} | {measured:.3} | {:.3} |",
                    p.consistent
                );
            }
        }
    }
    println!("largest difference between measured and predicted: {worst:.3}");
    ExitCode::SUCCESS
}

fn adjust(args: &Args) -> impl Fn(&mut SimConfig) + '_ {
    move |c: &mut SimConfig| {
        c.node.props.last_write_wins = args.lww;
        c.node.sim.bug = args.bug;
        c.keep_actor_after_loss = args.keep_actor;
        c.node.sim.handoff_checks_ring = !args.unchecked_handoff;
        c.node.sim.per_key_counters = args.per_key_counters;
        c.node.sim.primaries_only_reap = args.primaries_only_reap;
        c.node.sim.retry_unanswered_forward = args.retry_unanswered_forward;
        c.faults = !args.no_faults;
        c.deletes = !args.no_deletes;
        c.datatypes = args.datatypes;
        c.expiry = args.expiry;
        if let Some(grace) = args.grace_ms {
            c.node.tombstone_grace_ms = grace;
        }
        c.clock_skew_ms = args.clock_skew_ms;
        if let Some(ops) = args.ops {
            c.ops = ops;
        }
        if args.membership_given {
            c.membership = args.membership;
        }
    }
}

fn main() -> ExitCode {
    if std::env::args().any(|a| a == "--pbs") {
        return pbs_table();
    }
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let seeds: Vec<u64> = match args.seed {
        Some(s) => vec![s],
        None => (args.start..args.start + args.seeds).collect(),
    };
    let started = std::time::Instant::now();
    let mut totals = Totals::default();
    for seed in &seeds {
        let report = match run_seed(*seed, adjust(&args)) {
            Ok(report) => report,
            Err(e) => {
                eprintln!("seed {seed}: cannot build the cluster: {e}");
                return ExitCode::from(2);
            }
        };
        if args.verbose {
            print!("{}", report.history.render());
            println!("{}", report.describe());
        }
        totals.add(&report);
    }
    totals.print(seeds.len(), started.elapsed().as_secs_f64());
    let expected_to_fail = args.lww || args.bug.is_some() || args.keep_actor;
    if totals.failing.is_empty() || expected_to_fail {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[derive(Debug, Default)]
struct Totals {
    attempted: usize,
    ok: usize,
    failed: usize,
    info: usize,
    adds_acked: usize,
    lost_adds: usize,
    writes_acked: usize,
    lost_writes: usize,
    phantom: usize,
    seeds_with_loss: usize,
    not_converged: usize,
    max_siblings: usize,
    max_clock_entries: usize,
    convergence_ms: Vec<u64>,
    joins: usize,
    leaves: usize,
    join_leaves: usize,
    membership_ok: usize,
    strays: usize,
    handoff_keys: u64,
    deletes_acked: usize,
    tombstones_reaped: u64,
    resurrected: usize,
    applied_twice: usize,
    cleanup_dropped: u64,
    stale_ring_refusals: u64,
    replans: u64,
    pauses: usize,
    late_forwards_refused: u64,
    datatype_ops: (usize, usize, usize),
    datatype_problems: usize,
    expiry_reads: (usize, usize),
    expiry_problems: usize,
    failing: Vec<String>,
}

impl Totals {
    fn add(&mut self, r: &RunReport) {
        self.attempted += r.ops_attempted;
        self.ok += r.ops_ok;
        self.failed += r.ops_failed;
        self.info += r.ops_indeterminate;
        self.adds_acked += r.check.adds_acknowledged;
        self.lost_adds += r.check.lost_adds.len();
        self.writes_acked += r.check.writes_acknowledged;
        self.lost_writes += r.check.lost_writes.len();
        self.phantom += r.check.phantom();
        self.seeds_with_loss += usize::from(r.check.lost() > 0);
        self.not_converged += usize::from(!r.converged);
        self.max_siblings = self.max_siblings.max(r.max_siblings);
        self.max_clock_entries = self.max_clock_entries.max(r.max_clock_entries);
        if let Some(ms) = r.convergence_ms {
            self.convergence_ms.push(ms);
        }
        match r.config.membership {
            Some(MembershipChange::Join) => self.joins += 1,
            Some(MembershipChange::Leave) => self.leaves += 1,
            Some(MembershipChange::JoinThenLeave) => self.join_leaves += 1,
            None => {}
        }
        if r.config.membership.is_some() && r.membership_ok {
            self.membership_ok += 1;
        }
        self.strays += r.strays.len();
        self.handoff_keys += r.handoff_keys;
        self.deletes_acked += r.check.deletes_acknowledged;
        self.tombstones_reaped += r.tombstones_reaped;
        self.resurrected += r.check.resurrected.len();
        self.applied_twice += r.check.applied_twice.len();
        self.cleanup_dropped += r.cleanup_dropped;
        self.stale_ring_refusals += r.stale_ring_refusals;
        self.replans += r.replans;
        self.pauses += r.pauses;
        self.late_forwards_refused += r.late_forwards_refused;
        self.datatype_ops.0 += r.datatype_ops.0;
        self.datatype_ops.1 += r.datatype_ops.1;
        self.datatype_ops.2 += r.datatype_ops.2;
        self.datatype_problems += r.datatype_problems.len();
        self.expiry_reads.0 += r.expiry_reads.0;
        self.expiry_reads.1 += r.expiry_reads.1;
        self.expiry_problems += r.expiry_problems.len();
        if !r.passed() {
            if self.failing.len() < MAX_FAILURES_SHOWN {
                print!("FAIL {}", r.describe());
            }
            self.failing.push(r.config.seed.to_string());
        }
    }

    fn print(&mut self, seeds: usize, seconds: f64) {
        self.convergence_ms.sort_unstable();
        let pct = |q: f64| -> u64 {
            if self.convergence_ms.is_empty() {
                return 0;
            }
            let i = ((self.convergence_ms.len() - 1) as f64 * q).round() as usize;
            self.convergence_ms[i]
        };
        println!("seeds {seeds} ({seconds:.1} s)");
        println!(
            "ops attempted {} ok {} failed {} indeterminate {}",
            self.attempted, self.ok, self.failed, self.info
        );
        println!(
            "set-add: acknowledged {} lost {} (loss rate {:.4}); register: acknowledged {} lost {}; phantom {}",
            self.adds_acked,
            self.lost_adds,
            if self.adds_acked == 0 {
                0.0
            } else {
                self.lost_adds as f64 / self.adds_acked as f64
            },
            self.writes_acked,
            self.lost_writes,
            self.phantom
        );
        println!(
            "seeds with a loss {}; not converged {}; max siblings {}; max clock entries {}",
            self.seeds_with_loss, self.not_converged, self.max_siblings, self.max_clock_entries
        );
        println!(
            "convergence after heal (simulated ms): p50 {} p99 {} max {}",
            pct(0.5),
            pct(0.99),
            self.convergence_ms.last().copied().unwrap_or(0)
        );
        println!(
            "membership: join {} leave {} join-then-leave {} (completed {}); keys stored off their preference list {}; handoff keys {} cleanup dropped {} stale-ring refusals {} re-plans {}",
            self.joins,
            self.leaves,
            self.join_leaves,
            self.membership_ok,
            self.strays,
            self.handoff_keys,
            self.cleanup_dropped,
            self.stale_ring_refusals,
            self.replans
        );
        println!(
            "deletes: acknowledged {}; tombstone copies reaped {}; resurrected {}",
            self.deletes_acked, self.tombstones_reaped, self.resurrected
        );
        println!(
            "pauses {}; forwarded puts refused for arriving late {}; puts applied twice {}",
            self.pauses, self.late_forwards_refused, self.applied_twice
        );
        if self.datatype_ops != (0, 0, 0) || self.datatype_problems > 0 {
            println!(
                "data types: increments acknowledged {}; set adds acknowledged {} removes acknowledged {}; problems {}",
                self.datatype_ops.0,
                self.datatype_ops.1,
                self.datatype_ops.2,
                self.datatype_problems
            );
        }
        if self.expiry_reads != (0, 0) || self.expiry_problems > 0 {
            println!(
                "expiry: reads checked {} (issued after some value of their key expired {}); problems {}",
                self.expiry_reads.0, self.expiry_reads.1, self.expiry_problems
            );
        }
        if self.failing.is_empty() {
            println!("all seeds passed");
        } else {
            let shown: Vec<&str> = self.failing.iter().take(50).map(String::as_str).collect();
            println!(
                "{} failing seeds: {}{}",
                self.failing.len(),
                shown.join(" "),
                if self.failing.len() > shown.len() {
                    " ..."
                } else {
                    ""
                }
            );
        }
    }
}
