//! One run (one seed): form the cluster, run the clients under the nemesis, heal, wait for
//! convergence, read everything with R = N, check, report.

use crate::checker::{
    self, CounterReport, DtSetReport, Finals, IndexFinals, IndexReport, RegisterReport, SetReport,
    TtlReport,
};
use crate::cluster::{self, Cluster, wait_for};
use crate::history::{Event, EventType, Recorder, decode_set};
use crate::nemesis::{self, FaultKind, FaultRecord, Nemesis, Period};
use crate::workload::{ClientSpec, Family, bucket_path, datatype_path, run_client};
use anyhow::{Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The set-add bucket whose losses must be 0.
pub const SET_BUCKET: &str = "sets";
/// The last-write-wins set-add bucket (the contrast figure).
pub const LWW_BUCKET: &str = "lwwsets";
/// The register bucket.
pub const REG_BUCKET: &str = "regs";
/// The counter data type bucket (`TYPE/BUCKET`; the type's datatype is `counter`).
pub const COUNTER_BUCKET: &str = "ncounters/c";
/// The set data type bucket.
pub const DTSET_BUCKET: &str = "nsets/s";
/// The bucket of the expiry client (values written with a time to live).
pub const TTL_BUCKET: &str = "nttl";
/// The bucket of the secondary index client.
pub const INDEX_BUCKET: &str = "nidx";
/// How long the final index check waits for every node's queries to agree with the history
/// (replicas that missed a write under the faults get it by hinted handoff, read repair or
/// anti-entropy), at most.
const INDEX_SETTLE: Duration = Duration::from_secs(120);
/// The most a `clock-skew` fault moves a node's wall clock (see `nemesis`), in ms.
const MAX_CLOCK_SKEW_MS: u64 = 30_000;
/// What the expiry checker allows beyond the time to live when no clock is skewed (the
/// nodes share the host's clock), in ms.
const TTL_SLOP_MS: u64 = 250;
/// Replication factor and quorums (the bucket defaults).
pub const N: usize = 3;
pub const R: usize = 2;
pub const W: usize = 2;
/// How long the harness waits for convergence after healing.
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(150);

/// What one run does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunPlan {
    pub seed: u64,
    pub duration_s: u64,
    /// Exactly these faults, in order (else drawn from the seed).
    pub forced: Option<Vec<FaultKind>>,
    /// Make the primary set-add bucket last-write-wins (the broken configuration).
    pub lww_primary: bool,
    /// The run must report lost writes (CI's check that the checker catches the broken
    /// configuration): it succeeds when `lost > 0`.
    #[serde(default)]
    pub expect_loss: bool,
}

impl RunPlan {
    /// Whether `report` is what this plan expects.
    pub fn succeeded(&self, report: &RunReport) -> bool {
        if self.expect_loss {
            report.lost > 0
        } else {
            report.pass
        }
    }
}

/// What one run found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunReport {
    pub seed: u64,
    pub lww_primary: bool,
    pub nodes: usize,
    pub n: usize,
    pub r: usize,
    pub w: usize,
    pub faults: Vec<FaultRecord>,
    pub ops: BTreeMap<String, OpCounts>,
    pub ops_total: OpCounts,
    pub sets: SetReport,
    pub registers: RegisterReport,
    pub lww_contrast: SetReport,
    pub counters: CounterReport,
    pub dt_sets: DtSetReport,
    pub ttl: TtlReport,
    pub index: IndexReport,
    /// How long after convergence every node's index queries agreed with the history (ms);
    /// `None`: they never did within `INDEX_SETTLE`.
    pub index_settled_ms: Option<u64>,
    /// Final index queries that failed: `node: error`.
    pub index_query_errors: Vec<String>,
    /// Expired values still stored on some node once the run ended: `bucket/key on node`.
    pub expired_left: Vec<String>,
    /// Acknowledged set-adds and register writes lost (must be 0).
    pub lost: usize,
    pub phantom: usize,
    pub recovered_by_sibling: usize,
    pub lww_lost: usize,
    pub max_siblings: usize,
    /// Tombstones reaped during the run, summed over the nodes' `/stats`.
    pub tombstones_reaped: u64,
    pub converged: bool,
    pub time_to_converge_ms: Option<u64>,
    pub unconverged: Vec<String>,
    pub p99_latency_faulty_ms: Option<u64>,
    pub p99_latency_healthy_ms: Option<u64>,
    pub workload_ms: u64,
    pub total_ms: u64,
    pub failures: Vec<String>,
    pub node_log_alerts: Vec<String>,
    pub pass: bool,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct OpCounts {
    pub attempted: usize,
    pub ok: usize,
    pub failed: usize,
    pub indeterminate: usize,
}

/// Tombstones reaped by the nodes' current processes (`tombstones_reaped_total` in `/stats`).
fn reaped_so_far(nodes: usize, seed: u64) -> u64 {
    (1..=nodes)
        .filter_map(|n| match cluster::get_json(n, "/stats") {
            Ok(v) => v["tombstones_reaped_total"].as_u64(),
            Err(e) => {
                eprintln!("[nemesis] seed {seed}: no reap count from n{n}: {e:#}");
                None
            }
        })
        .sum()
}

/// Keys the retire client writes once, deletes, and leaves idle so their tombstones are
/// reaped during the run (about 50 ms per key, so the last is retired well before a run ends).
const RETIRED_KEYS: usize = 150;

fn keys(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// Every (bucket, key) of the workload.
fn all_keys() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (bucket, ks) in [
        (SET_BUCKET, keys("s", 4)),
        (LWW_BUCKET, keys("l", 2)),
        (REG_BUCKET, keys("r", 4)),
        (REG_BUCKET, keys("z", RETIRED_KEYS)),
        (COUNTER_BUCKET, keys("c", 2)),
        (DTSET_BUCKET, keys("d", 4)),
    ] {
        out.extend(ks.into_iter().map(|k| (bucket.to_owned(), k)));
    }
    out
}

fn clients() -> Vec<ClientSpec> {
    let mut specs = Vec::new();
    let mut add = |family, bucket: &str, ks: Vec<String>, count: usize| {
        for _ in 0..count {
            specs.push(ClientSpec {
                process: specs.len(),
                family,
                bucket: bucket.to_owned(),
                keys: ks.clone(),
            });
        }
    };
    add(Family::SetAdd, SET_BUCKET, keys("s", 4), 4);
    add(Family::SetAdd, LWW_BUCKET, keys("l", 2), 2);
    add(Family::Register, REG_BUCKET, keys("r", 4), 3);
    add(Family::Retire, REG_BUCKET, keys("z", RETIRED_KEYS), 1);
    add(Family::Counter, COUNTER_BUCKET, keys("c", 2), 2);
    add(Family::DtSet, DTSET_BUCKET, keys("d", 4), 2);
    add(Family::Ttl, TTL_BUCKET, keys("t", 2), 2);
    add(Family::Index, INDEX_BUCKET, Vec::new(), 2);
    specs
}

/// Creates and activates the bucket type `name` holding `datatype`, and waits until every
/// node serves it.
fn make_datatype_type(nodes: usize, name: &str, datatype: &str) -> Result<()> {
    let path = format!("/admin/bucket-types/{name}");
    let body = format!("{{\"props\":{{\"datatype\":\"{datatype}\"}}}}");
    let resp = cluster::call(
        1,
        "POST",
        &path,
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )?;
    if !(200..300).contains(&resp.status) {
        bail!("POST {path}: {}", resp.summary());
    }
    wait_for(
        &format!("{name} activated"),
        Duration::from_secs(30),
        || {
            let resp = cluster::call(1, "POST", &format!("{path}/activate"), &[], b"{}")?;
            if !(200..300).contains(&resp.status) {
                bail!("not yet: {}", resp.summary());
            }
            Ok(())
        },
    )?;
    wait_for(
        &format!("{name} on every node"),
        Duration::from_secs(30),
        || {
            for i in 1..=nodes {
                let v = cluster::get_json(i, &format!("/types/{name}/props"))?;
                if v.pointer("/props/datatype").and_then(Value::as_str) != Some(datatype) {
                    bail!("n{i} does not serve {name} yet");
                }
            }
            Ok(())
        },
    )
}

/// Sets a bucket last-write-wins and waits until every node has the props.
fn make_lww(nodes: usize, bucket: &str) -> Result<()> {
    let body = br#"{"props":{"allow_mult":false,"last_write_wins":true}}"#;
    let path = format!("/buckets/{bucket}/props");
    let resp = cluster::call(
        1,
        "PUT",
        &path,
        &[("Content-Type", "application/json")],
        body,
    )?;
    if !(200..300).contains(&resp.status) {
        bail!("PUT {path}: {}", resp.summary());
    }
    wait_for(
        &format!("{bucket} props on every node"),
        Duration::from_secs(30),
        || {
            for i in 1..=nodes {
                let v = cluster::get_json(i, &path)?;
                if v.pointer("/props/last_write_wins").and_then(Value::as_bool) != Some(true) {
                    bail!("n{i} does not have {bucket} lww yet");
                }
            }
            Ok(())
        },
    )
}

fn p99(mut v: Vec<u64>) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let idx = ((v.len() as f64) * 0.99).ceil() as usize;
    Some(v[idx.saturating_sub(1).min(v.len() - 1)])
}

/// The primaries of a key (from any running node).
fn primaries(nodes: usize, bucket: &str, key: &str) -> Result<Vec<usize>> {
    let path = format!("{}/keys/{key}/preflist", bucket_path(bucket));
    let mut last = anyhow!("no node answered");
    for i in 1..=nodes {
        match cluster::get_json(i, &path) {
            Ok(v) => {
                return Ok(v
                    .get("preflist")
                    .and_then(Value::as_array)
                    .map(|l| {
                        l.iter()
                            .filter_map(|e| e.get("node").and_then(Value::as_str))
                            .filter_map(|n| n.strip_prefix('n')?.parse().ok())
                            .collect()
                    })
                    .unwrap_or_default());
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// One observation of convergence: no hints held anywhere, no transition, and every key's
/// primaries store the same thing. `Err` says what differs.
fn convergence_check(nodes: usize) -> Result<()> {
    for i in 1..=nodes {
        let v = cluster::get_json(i, "/admin/handoffs")?;
        if v.get("in_progress").and_then(Value::as_bool) != Some(false) {
            bail!("n{i}: transition in progress");
        }
        let held: u64 = v
            .pointer("/hints/held_per_target")
            .and_then(Value::as_array)
            .map_or(0, |l| {
                l.iter()
                    .filter_map(|t| t.get("keys").and_then(Value::as_u64))
                    .sum()
            });
        if held > 0 {
            bail!("n{i}: {held} hints held");
        }
    }
    for (bucket, key) in all_keys() {
        let prims = primaries(nodes, &bucket, &key)?;
        if prims.len() != N {
            bail!("{bucket}/{key}: preflist {prims:?}");
        }
        let mut seen: Option<(usize, Value)> = None;
        for &p in &prims {
            let mut v = cluster::get_json(p, &format!("/admin/replica/{bucket}/{key}"))?;
            if let Some(values) = v.get_mut("values").and_then(Value::as_array_mut) {
                values.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
            }
            match &seen {
                None => seen = Some((p, v)),
                Some((q, w)) if *w != v => {
                    bail!(
                        "{bucket}/{key}: n{q} and n{p} differ ({} vs {} bytes)",
                        w.to_string().len(),
                        v.to_string().len()
                    )
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

/// Expired values still stored anywhere once the run ended: every node's own copy of each
/// key of the expiry client must hold no live value after the time to live and a few sweeps
/// (a value stamped by a node whose clock was skewed back may live that much longer).
/// Polled for up to a minute past that.
fn expired_left(nodes: usize) -> Vec<String> {
    let deadline = std::time::Instant::now()
        + Duration::from_secs(crate::workload::TTL_SECS)
        + Duration::from_millis(2 * MAX_CLOCK_SKEW_MS)
        + Duration::from_secs(30);
    loop {
        let mut left = Vec::new();
        for key in keys("t", 2) {
            for node in 1..=nodes {
                match cluster::get_json(node, &format!("/admin/replica/{TTL_BUCKET}/{key}")) {
                    Ok(v) if v["values"].as_array().is_none_or(Vec::is_empty) => {}
                    Ok(v) => left.push(format!("{TTL_BUCKET}/{key} on n{node}: {}", v["values"])),
                    Err(e) => left.push(format!("{TTL_BUCKET}/{key} on n{node}: {e:#}")),
                }
            }
        }
        if left.is_empty() || std::time::Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Every node's index queries once the run ended (see `checker::IndexFinals`), polled until
/// they agree with the history (`checker::check_index` finds nothing missing, undeleted or
/// disagreeing) or `INDEX_SETTLE` passes. Returns the last queries, the failed queries of the
/// last poll, and how long it took when it settled.
fn index_finals(nodes: usize, history: &[Event]) -> (IndexFinals, Vec<String>, Option<u64>) {
    let started = std::time::Instant::now();
    let groups: Vec<String> = clients()
        .iter()
        .filter(|c| c.family == Family::Index)
        .map(|c| crate::workload::index_group(c.process))
        .collect();
    loop {
        let mut finals = IndexFinals::default();
        let mut errors = Vec::new();
        for node in 1..=nodes {
            let mut found = std::collections::BTreeSet::new();
            for group in &groups {
                let query = (crate::workload::INDEX_GROUP, group.as_str(), None);
                match crate::workload::index_query(node, INDEX_BUCKET, query) {
                    Ok(values) => found.extend(values),
                    Err(e) => errors.push(format!("n{node}: {e}")),
                }
            }
            finals.by_group.insert(node, found);
            let all = (crate::workload::INDEX_NUMBER, "0", Some("999999999999"));
            match crate::workload::index_query(node, INDEX_BUCKET, all) {
                Ok(values) => {
                    finals.by_number.insert(node, values.into_iter().collect());
                }
                Err(e) => errors.push(format!("n{node}: {e}")),
            }
        }
        let check = checker::check_index(history, INDEX_BUCKET, &finals);
        let settled = errors.is_empty()
            && check.missing.is_empty()
            && check.undeleted.is_empty()
            && check.disagreeing.is_empty();
        let waited = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if settled {
            return (finals, errors, Some(waited));
        }
        if started.elapsed() > INDEX_SETTLE {
            return (finals, errors, None);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Reads every key with R = N and decodes its siblings.
fn final_reads(nodes: usize) -> Result<Finals> {
    let mut finals = Finals::new();
    for (bucket, key) in all_keys() {
        if bucket == COUNTER_BUCKET || bucket == DTSET_BUCKET {
            let value = final_datatype(nodes, &bucket, &key, finals.len())?;
            finals.insert((bucket, key), value);
            continue;
        }
        let path = format!("/buckets/{bucket}/keys/{key}?r={N}");
        let resp = wait_for(
            &format!("R=N read of {bucket}/{key}"),
            Duration::from_secs(30),
            || {
                let node = 1 + (finals.len() % nodes);
                let r = cluster::call(
                    node,
                    "GET",
                    &path,
                    &[("Accept", "multipart/mixed, */*")],
                    b"",
                )?;
                r.values().map_err(|e| anyhow!("{e}"))
            },
        )?;
        let decoded: Vec<BTreeSet<u64>> = resp
            .iter()
            .map(|v| {
                if bucket == REG_BUCKET {
                    v.trim().parse::<u64>().ok().map(|x| BTreeSet::from([x]))
                } else {
                    decode_set(v)
                }
                .ok_or_else(|| anyhow!("{bucket}/{key}: undecodable final value {v:?}"))
            })
            .collect::<Result<_>>()?;
        finals.insert((bucket, key), decoded);
    }
    Ok(finals)
}

/// A data type key read with R = N: a counter's value, or a set's elements (one entry; none
/// when not found).
fn final_datatype(nodes: usize, bucket: &str, key: &str, n: usize) -> Result<Vec<BTreeSet<u64>>> {
    let path = format!("{}?r={N}", datatype_path(bucket, key));
    wait_for(
        &format!("R=N read of {bucket}/{key}"),
        Duration::from_secs(30),
        || {
            let node = 1 + (n % nodes);
            let r = cluster::call(node, "GET", &path, &[], b"")?;
            match r.status {
                404 => Ok(Vec::new()),
                200 => {
                    let json = r.json().map_err(|e| anyhow!("{e}"))?;
                    let value: BTreeSet<u64> = match &json["value"] {
                        Value::Number(n) => n.as_u64().into_iter().collect(),
                        Value::Array(items) => items
                            .iter()
                            .map(|e| {
                                e.as_str()
                                    .and_then(|t| t.parse().ok())
                                    .ok_or_else(|| anyhow!("{bucket}/{key}: element {e}"))
                            })
                            .collect::<Result<_>>()?,
                        other => bail!("{bucket}/{key}: undecodable final value {other}"),
                    };
                    Ok(vec![value])
                }
                _ => bail!("{}", r.summary()),
            }
        },
    )
}

/// Runs one seed with the cluster's data and logs under `dir`.
pub fn run_one(plan: &RunPlan, bin: &Path, dir: &Path, nodes: usize) -> RunReport {
    let started = Instant::now();
    let mut report = RunReport {
        seed: plan.seed,
        lww_primary: plan.lww_primary,
        nodes,
        n: N,
        r: R,
        w: W,
        ..RunReport::default()
    };
    let mut cluster = match Cluster::new(bin, dir, nodes) {
        Ok(c) => c,
        Err(e) => {
            report.failures.push(format!("harness: {e:#}"));
            return report;
        }
    };
    if let Err(e) = body(plan, &mut cluster, &mut report, dir) {
        report.failures.push(format!("harness: {e:#}"));
    }
    report.node_log_alerts = cluster.log_alerts(20);
    drop(cluster);
    report.total_ms = started.elapsed().as_millis() as u64;
    judge(&mut report);
    report
}

fn judge(report: &mut RunReport) {
    judge_index(report);
    if report.lost > 0 {
        report.failures.push(format!(
            "{} acknowledged writes lost (set-add {:?}, register {:?}, overwritten or deleted values back {:?}, counters {:?}, set data type adds {:?}, removed elements back {:?})",
            report.lost,
            report.sets.lost.iter().take(10).collect::<Vec<_>>(),
            report.registers.lost.iter().take(10).collect::<Vec<_>>(),
            report.registers.resurrected.iter().take(10).collect::<Vec<_>>(),
            report.counters.wrong.iter().take(10).collect::<Vec<_>>(),
            report.dt_sets.lost.iter().take(10).collect::<Vec<_>>(),
            report.dt_sets.resurrected.iter().take(10).collect::<Vec<_>>()
        ));
    }
    if report.phantom > 0 {
        report
            .failures
            .push(format!("{} phantom values", report.phantom));
    }
    if !report.ttl.expired_reads.is_empty() {
        report.failures.push(format!(
            "{} reads returned expired values: {:?}",
            report.ttl.expired_reads.len(),
            report.ttl.expired_reads.iter().take(5).collect::<Vec<_>>()
        ));
    }
    if !report.expired_left.is_empty() {
        report.failures.push(format!(
            "expired values never removed: {:?}",
            report.expired_left
        ));
    }
    if !report.converged {
        report.failures.push(format!(
            "replicas did not converge: {:?}",
            report.unconverged
        ));
    }
    for f in &report.faults {
        for e in &f.errors {
            report
                .failures
                .push(format!("fault {} at {} ms: {e}", f.kind.name(), f.start_ms));
        }
    }
    report.pass = report.failures.is_empty();
}

fn body(plan: &RunPlan, cluster: &mut Cluster, report: &mut RunReport, dir: &Path) -> Result<()> {
    let nodes = cluster.size();
    eprintln!(
        "[nemesis] seed {}: forming a {nodes}-node cluster",
        plan.seed
    );
    cluster.form()?;
    make_lww(nodes, LWW_BUCKET)?;
    make_datatype_type(nodes, "ncounters", "counter")?;
    make_datatype_type(nodes, "nsets", "set")?;
    if plan.lww_primary {
        make_lww(nodes, SET_BUCKET)?;
    }
    let periods = nemesis::schedule(
        plan.seed,
        Duration::from_secs(plan.duration_s),
        plan.forced.as_deref(),
    );
    let workload_start = Instant::now();
    let recorder = Arc::new(Recorder::new(&dir.join("history.jsonl"), workload_start)?);
    let stop = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = clients()
        .into_iter()
        .map(|spec| {
            let recorder = Arc::clone(&recorder);
            let stop = Arc::clone(&stop);
            let seed = plan.seed;
            std::thread::spawn(move || run_client(&spec, nodes, seed, &recorder, &stop))
        })
        .collect();
    let mut nemesis = Nemesis::new(plan.seed, nodes, SET_BUCKET, keys("s", 4), dir);
    let mut result = Ok(());
    for period in &periods {
        match *period {
            Period::Healthy(d) => std::thread::sleep(d),
            Period::Faulty(kind, d) => {
                let start_ms = recorder.now_ms();
                let (active, mut detail, mut errors) = match nemesis.start(kind, cluster, d) {
                    Ok((a, d)) => (Some(a), d, Vec::new()),
                    Err(e) => (None, String::new(), vec![format!("inject: {e:#}")]),
                };
                eprintln!(
                    "[nemesis] seed {} t={:>6} ms  start {:<14} {detail}",
                    plan.seed,
                    start_ms,
                    kind.name()
                );
                std::thread::sleep(d);
                if let Some(a) = &active {
                    errors.extend(nemesis.heal(a, cluster));
                }
                if let Some(note) = nemesis.take_note() {
                    detail = format!("{detail}: {note}");
                }
                let end_ms = recorder.now_ms();
                eprintln!(
                    "[nemesis] seed {} t={:>6} ms  healed {}{}",
                    plan.seed,
                    end_ms,
                    kind.name(),
                    if errors.is_empty() {
                        String::new()
                    } else {
                        format!(" ERRORS {errors:?}")
                    }
                );
                report.faults.push(FaultRecord {
                    kind,
                    detail,
                    start_ms,
                    end_ms,
                    errors,
                });
            }
        }
        for i in 1..=nodes {
            if let Some(status) = cluster.exited(i) {
                result = Err(anyhow!(
                    "n{i} exited on its own with {status}; log tail:\n{}",
                    cluster::tail(&cluster.log_path(i), 20)
                ));
            }
        }
        if result.is_err() {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    report.workload_ms = workload_start.elapsed().as_millis() as u64;
    let history = recorder.finish();
    result?;

    // Heal everything (rules, pauses), then restart every node one at a time (SIGTERM, or
    // start it if it is down), so recovery also goes through a restart of each process.
    let heal_start = Instant::now();
    nemesis::heal_rules(nodes)?;
    cluster.resume_all();
    // The counters live in each process: take them before the restarts (a node killed
    // during the run took its count with it, so this is a lower bound), and once more at
    // the end for what was reaped after the restarts.
    report.tombstones_reaped = reaped_so_far(nodes, plan.seed);
    for i in 1..=nodes {
        cluster.stop(i, Duration::from_secs(15));
        cluster.start(i, None)?;
        cluster.wait_up(i, Duration::from_secs(30))?;
    }
    cluster.wait_settled(&(1..=nodes).collect::<Vec<_>>(), Duration::from_secs(60))?;
    eprintln!(
        "[nemesis] seed {}: healed; waiting for hints to drain and replicas to agree",
        plan.seed
    );
    match wait_for("convergence", CONVERGE_TIMEOUT, || convergence_check(nodes)) {
        Ok(()) => {
            report.converged = true;
            report.time_to_converge_ms = Some(heal_start.elapsed().as_millis() as u64);
        }
        Err(e) => report.unconverged.push(format!("{e:#}")),
    }
    report
        .failures
        .extend(nemesis.final_membership_check(cluster));
    let finals = final_reads(nodes)?;
    report.expired_left = expired_left(nodes);
    report.tombstones_reaped += reaped_so_far(nodes, plan.seed);
    std::fs::write(
        dir.join("finals.json"),
        serde_json::to_vec_pretty(
            &finals
                .iter()
                .map(|((b, k), v)| (format!("{b}/{k}"), v))
                .collect::<BTreeMap<_, _>>(),
        )?,
    )?;
    analyse(&history, &finals, report);
    let (index_finals, errors, settled) = index_finals(nodes, &history);
    report.index = checker::check_index(&history, INDEX_BUCKET, &index_finals);
    report.index_settled_ms = settled;
    report.index_query_errors = errors;
    std::fs::write(
        dir.join("index-finals.json"),
        serde_json::to_vec_pretty(&index_finals)?,
    )?;
    Ok(())
}

/// Fills the report's counts and checker verdicts from the history and the final state.
pub fn analyse(history: &[Event], finals: &Finals, report: &mut RunReport) {
    for e in history {
        let family = format!("{}:{}", e.bucket, e.f);
        let c = report.ops.entry(family).or_default();
        for c in [c, &mut report.ops_total] {
            match e.kind {
                EventType::Invoke => c.attempted += 1,
                EventType::Ok => c.ok += 1,
                EventType::Fail => c.failed += 1,
                EventType::Info => c.indeterminate += 1,
            }
        }
    }
    report.sets = checker::check_sets(history, SET_BUCKET, finals);
    report.lww_contrast = checker::check_sets(history, LWW_BUCKET, finals);
    report.registers = checker::check_registers(history, REG_BUCKET, finals);
    report.counters = checker::check_counters(history, COUNTER_BUCKET, finals);
    report.dt_sets = checker::check_dt_sets(history, DTSET_BUCKET, finals);
    let skewed: Vec<(u64, u64)> = report
        .faults
        .iter()
        .filter(|f| f.kind == FaultKind::ClockSkew)
        .map(|f| (f.start_ms, f.end_ms))
        .collect();
    report.ttl = checker::check_ttl(
        history,
        TTL_BUCKET,
        crate::workload::TTL_SECS * 1000,
        (&skewed, MAX_CLOCK_SKEW_MS, TTL_SLOP_MS),
    );
    report.lost = report.sets.lost.len()
        + report.registers.lost.len()
        + report.registers.resurrected.len()
        + report.counters.wrong.len()
        + report.dt_sets.lost.len()
        + report.dt_sets.resurrected.len();
    report.phantom = report.sets.phantom.len()
        + report.registers.phantom.len()
        + report.lww_contrast.phantom.len()
        + report.dt_sets.phantom.len();
    report.recovered_by_sibling = report.sets.recovered_by_sibling;
    report.lww_lost = report.lww_contrast.lost.len();
    report.max_siblings = history
        .iter()
        .map(|e| e.siblings)
        .chain(finals.values().map(Vec::len))
        .max()
        .unwrap_or(0);
    let windows: Vec<(u64, u64)> = report
        .faults
        .iter()
        .map(|f| (f.start_ms, f.end_ms))
        .collect();
    let (mut faulty, mut healthy) = (Vec::new(), Vec::new());
    for e in history {
        if let Some(lat) = e.latency_ms {
            let invoked = e.time.saturating_sub(lat);
            if windows.iter().any(|(s, t)| invoked >= *s && invoked < *t) {
                faulty.push(lat);
            } else {
                healthy.push(lat);
            }
        }
    }
    report.p99_latency_faulty_ms = p99(faulty);
    report.p99_latency_healthy_ms = p99(healthy);
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_owned(), |x| x.to_string())
}

/// A short table of one run.
/// The secondary index verdict's failures (see `checker::check_index`).
fn judge_index(report: &mut RunReport) {
    let index = &report.index;
    let mut failures = Vec::new();
    if !index.phantom.is_empty() {
        failures.push(format!(
            "index queries found keys never written: {:?}",
            index.phantom.iter().take(5).collect::<Vec<_>>()
        ));
    }
    if !index.missing.is_empty() {
        failures.push(format!(
            "{} acknowledged index writes not found by the final queries: {:?}",
            index.missing.len(),
            index.missing.iter().take(5).collect::<Vec<_>>()
        ));
    }
    if !index.undeleted.is_empty() {
        failures.push(format!(
            "{} acknowledged deletes still found by the final queries: {:?}",
            index.undeleted.len(),
            index.undeleted.iter().take(5).collect::<Vec<_>>()
        ));
    }
    if !index.disagreeing.is_empty() {
        failures.push(format!(
            "nodes whose group and integer index queries disagree: {:?}",
            index.disagreeing
        ));
    }
    if !report.index_query_errors.is_empty() {
        failures.push(format!(
            "final index queries failed: {:?}",
            report.index_query_errors.iter().take(5).collect::<Vec<_>>()
        ));
    }
    report.failures.extend(failures);
}

pub fn table(r: &RunReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "seed {}{}  N/R/W {}/{}/{}  nodes {}  {}",
        r.seed,
        if r.lww_primary {
            " (--lww-primary)"
        } else {
            ""
        },
        r.n,
        r.r,
        r.w,
        r.nodes,
        if r.pass { "PASS" } else { "FAIL" }
    );
    for f in &r.faults {
        let _ = writeln!(
            s,
            "  fault {:>6}-{:>6} ms  {:<14} {}{}",
            f.start_ms,
            f.end_ms,
            f.kind.name(),
            f.detail,
            if f.errors.is_empty() {
                String::new()
            } else {
                format!("  ERRORS {:?}", f.errors)
            }
        );
    }
    let _ = writeln!(
        s,
        "  {:<14} {:>9} {:>7} {:>7} {:>7}",
        "ops", "attempted", "ok", "failed", "info"
    );
    for (family, c) in r
        .ops
        .iter()
        .chain(std::iter::once((&"total".to_owned(), &r.ops_total)))
    {
        let _ = writeln!(
            s,
            "  {:<14} {:>9} {:>7} {:>7} {:>7}",
            family, c.attempted, c.ok, c.failed, c.indeterminate
        );
    }
    let _ = writeln!(
        s,
        "  lost {}  phantom {}  recovered-by-sibling {}  LWW lost {}/{} acked  max siblings {}",
        r.lost,
        r.phantom,
        r.recovered_by_sibling,
        r.lww_lost,
        r.lww_contrast.adds_acknowledged,
        r.max_siblings
    );
    let _ = writeln!(
        s,
        "  data types: increments acked {} (indeterminate {}), set adds acked {} removes acked {}",
        r.counters.increments_acknowledged,
        r.counters.increments_indeterminate,
        r.dt_sets.adds_acknowledged,
        r.dt_sets.removes_acknowledged
    );
    let _ = writeln!(
        s,
        "  2i: writes acked {} deletes acked {} queries {} phantom {} missing {} undeleted {} settled {}",
        r.index.writes_acknowledged,
        r.index.deletes_acknowledged,
        r.index.queries,
        r.index.phantom.len(),
        r.index.missing.len(),
        r.index.undeleted.len(),
        r.index_settled_ms
            .map_or_else(|| "never".to_owned(), |ms| format!("in {ms} ms")),
    );
    let _ = writeln!(
        s,
        "  expiry: writes acked {} reads {} (after an expiry {}) expired reads {} expired left {}",
        r.ttl.writes_acknowledged,
        r.ttl.reads,
        r.ttl.reads_after_an_expiry,
        r.ttl.expired_reads.len(),
        r.expired_left.len()
    );
    let _ = writeln!(
        s,
        "  registers: acked {} present {} overwritten {} deletes acked {} (reaped {}) resurrected {}  converged {} in {} ms  p99 faulty {} ms healthy {} ms  run {} s",
        r.registers.writes_acknowledged,
        r.registers.present,
        r.registers.overwritten,
        r.registers.deletes_acknowledged,
        r.tombstones_reaped,
        r.registers.resurrected.len(),
        r.converged,
        opt(r.time_to_converge_ms),
        opt(r.p99_latency_faulty_ms),
        opt(r.p99_latency_healthy_ms),
        r.total_ms / 1000
    );
    for f in &r.failures {
        let _ = writeln!(s, "  FAILURE: {f}");
    }
    for a in r.node_log_alerts.iter().take(5) {
        let _ = writeln!(s, "  node log: {a}");
    }
    s
}

/// Where run `seed`'s files go.
pub fn seed_dir(out: &Path, seed: u64, lww_primary: bool) -> PathBuf {
    out.join(format!(
        "seed-{seed}{}",
        if lww_primary { "-lww-primary" } else { "" }
    ))
}

/// One line per run and the totals.
pub fn summary(reports: &[RunReport]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>8} {:>5} {:<44} {:>6} {:>6} {:>5} {:>5} {:>5} {:>6} {:>8} {:>8} {:>6} {:>6}",
        "seed",
        "pass",
        "faults",
        "ops",
        "ok",
        "info",
        "lost",
        "rbs",
        "lwwlst",
        "converge",
        "p99f/h",
        "maxsib",
        "secs"
    );
    let mut totals = (0usize, 0usize, 0usize, 0usize, 0usize, 0usize);
    for r in reports {
        let faults = r
            .faults
            .iter()
            .map(|f| f.kind.name())
            .collect::<Vec<_>>()
            .join(",");
        let _ = writeln!(
            s,
            "{:>8} {:>5} {:<44} {:>6} {:>6} {:>5} {:>5} {:>5} {:>6} {:>8} {:>8} {:>6} {:>6}",
            r.seed,
            if r.pass { "yes" } else { "NO" },
            faults,
            r.ops_total.attempted,
            r.ops_total.ok,
            r.ops_total.indeterminate,
            r.lost,
            r.recovered_by_sibling,
            format!("{}/{}", r.lww_lost, r.lww_contrast.adds_acknowledged),
            r.time_to_converge_ms
                .map_or_else(|| "never".to_owned(), |t| format!("{t}ms")),
            format!(
                "{}/{}",
                opt(r.p99_latency_faulty_ms),
                opt(r.p99_latency_healthy_ms)
            ),
            r.max_siblings,
            r.total_ms / 1000
        );
        totals.0 += r.faults.len();
        totals.1 += r.ops_total.attempted;
        totals.2 += r.ops_total.ok;
        totals.3 += r.lost;
        totals.4 += r.lww_lost;
        totals.5 += r.lww_contrast.adds_acknowledged;
    }
    let _ = writeln!(
        s,
        "runs {} passed {} faults {} ops {} ok {} lost {} LWW-contrast lost {}/{} acked adds",
        reports.len(),
        reports.iter().filter(|r| r.pass).count(),
        totals.0,
        totals.1,
        totals.2,
        totals.3,
        totals.4,
        totals.5
    );
    s
}
