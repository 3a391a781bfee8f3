//! The nemesis: a schedule of faulty and healthy periods drawn from a seed, and the faults
//! themselves (nftables partitions and packet loss inside the node namespaces, SIGKILL,
//! SIGKILL with the data directory wiped, SIGSTOP/SIGCONT, a leave and re-join under load,
//! an intruder without the cluster secret at every peer port).

use crate::cluster::{self, Cluster, members, node_name, wait_for};
use crate::intruder;
use crate::net;
use anyhow::{Context, Result, anyhow, bail};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng as _, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a node whose disk was full may take to serve again once it is freed (its
/// restart delay is at most 30 s).
const DISK_FULL_RECOVERY: Duration = Duration::from_secs(45);

/// The kinds of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// Two random halves (2 | 3 nodes).
    Halves,
    /// One node cut off from every other node.
    Isolate,
    /// A key's preference list split: one of its primaries (with some other nodes) cut off
    /// from the other primaries.
    PreflistSplit,
    /// Non-transitive: {a,b} and {d,e} cannot talk, c talks to everyone.
    Bridge,
    /// Every node drops a share of the packets from the other nodes (nftables numgen).
    Loss,
    /// SIGKILL of one or two nodes, restarted at the end of the period.
    Kill,
    /// SIGKILL of one node, its data directory wiped, restarted with `--join`.
    KillWipe,
    /// SIGSTOP of one or two nodes, SIGCONT at the end of the period.
    Pause,
    /// A node leaves the cluster under load, then comes back empty with `--join`.
    LeaveJoin,
    /// One node's data filesystem filled to the last byte; freed at the end of the period.
    DiskFull,
    /// One node restarted with its wall clock 5-30 s ahead or behind (libfaketime); restarted
    /// with the true time at the end of the period.
    ClockSkew,
    /// A process in the clients' namespace, without the cluster secret, attacks every peer
    /// port for the period ([`crate::intruder`]): every attempt must be refused, and no
    /// member may be added or moved.
    Intruder,
}

impl FaultKind {
    pub const ALL: [FaultKind; 12] = [
        FaultKind::Halves,
        FaultKind::Isolate,
        FaultKind::PreflistSplit,
        FaultKind::Bridge,
        FaultKind::Loss,
        FaultKind::Kill,
        FaultKind::KillWipe,
        FaultKind::Pause,
        FaultKind::LeaveJoin,
        FaultKind::DiskFull,
        FaultKind::ClockSkew,
        FaultKind::Intruder,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Halves => "halves",
            FaultKind::Isolate => "isolate",
            FaultKind::PreflistSplit => "preflist-split",
            FaultKind::Bridge => "bridge",
            FaultKind::Loss => "loss",
            FaultKind::Kill => "kill",
            FaultKind::KillWipe => "kill-wipe",
            FaultKind::Pause => "pause",
            FaultKind::LeaveJoin => "leave-join",
            FaultKind::DiskFull => "disk-full",
            FaultKind::ClockSkew => "clock-skew",
            FaultKind::Intruder => "intruder",
        }
    }

    pub fn parse(s: &str) -> Option<FaultKind> {
        FaultKind::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// One period of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Healthy(Duration),
    Faulty(FaultKind, Duration),
}

/// The periods of one run: a short healthy warm-up, then faults alternating with healthy
/// periods until `duration` is filled (or exactly the `forced` faults, in that order); the
/// last period is a fault, healed by the final heal.
/// At most one `kill-wipe` and one `leave-join` per run (each loses a replica's data, and
/// W = 2 of N = 3 is only meant to survive one such loss at a time).
pub fn schedule(seed: u64, duration: Duration, forced: Option<&[FaultKind]>) -> Vec<Period> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x005E_ED0F_FA17);
    let mut periods = vec![Period::Healthy(Duration::from_secs(3))];
    let mut total = Duration::from_secs(3);
    let mut used: BTreeSet<FaultKind> = BTreeSet::new();
    let mut index = 0;
    loop {
        let kind = if let Some(list) = forced {
            let Some(k) = list.get(index) else { break };
            *k
        } else {
            if total >= duration {
                break;
            }
            let mut k = FaultKind::ALL[rng.random_range(0..FaultKind::ALL.len())];
            while matches!(k, FaultKind::KillWipe | FaultKind::LeaveJoin) && used.contains(&k) {
                k = FaultKind::ALL[rng.random_range(0..FaultKind::ALL.len())];
            }
            k
        };
        index += 1;
        used.insert(kind);
        let fault = Duration::from_millis(rng.random_range(8_000..=12_000));
        let healthy = Duration::from_millis(rng.random_range(4_000..=7_000));
        periods.push(Period::Faulty(kind, fault));
        periods.push(Period::Healthy(healthy));
        total += fault + healthy;
    }
    // The run ends with the last fault: the final heal then measures real repair (hints,
    // anti-entropy) rather than a quiet cluster.
    if matches!(periods.last(), Some(Period::Healthy(_))) && periods.len() > 1 {
        periods.pop();
    }
    periods
}

/// A fault as it happened.
#[derive(Debug, Clone, Serialize)]
pub struct FaultRecord {
    pub kind: FaultKind,
    pub detail: String,
    pub start_ms: u64,
    pub end_ms: u64,
    /// Problems while injecting or healing (a node that did not come back, a leave that did
    /// not finish): these fail the run.
    pub errors: Vec<String>,
}

/// What an active fault needs to be healed.
#[derive(Debug, Clone)]
pub enum Active {
    Rules,
    Killed(Vec<usize>),
    Wiped(usize),
    Paused(Vec<usize>),
    Leaving(usize),
    DiskFull(usize),
    ClockSkew(usize),
    /// The intruder process runs (held in [`Nemesis`]); its report goes to `report`, and
    /// every node's membership must still be `baseline` when it is done.
    Intruder {
        report: PathBuf,
        baseline: Box<MembershipView>,
    },
}

/// What each running node says of the membership and the ring: `node -> (members as
/// (name, peer address, HTTP address, status), ring version)`.
pub type MembershipView = BTreeMap<usize, (BTreeSet<(String, String, String, String)>, u64)>;

/// How long after its window the intruder may take to finish (its last attempt may wait
/// [`intruder::HOLD_LIMIT`] for a node to close).
const INTRUDER_GRACE: Duration = Duration::from_secs(15);
/// Poll interval while waiting for the intruder to exit.
const INTRUDER_POLL: Duration = Duration::from_millis(100);

/// The membership and ring version every running node shows now.
fn membership_view(cluster: &Cluster, nodes: usize) -> Result<MembershipView> {
    let mut view = MembershipView::new();
    for i in (1..=nodes).filter(|&i| cluster.is_running(i)) {
        let m = members(i)?
            .into_iter()
            .map(|m| (m.name, m.peer_addr, m.http_addr, m.status))
            .collect();
        let version = cluster::get_json(i, "/admin/ring")?
            .get("version")
            .and_then(Value::as_u64)
            .ok_or_else(|| anyhow!("n{i}: no ring version in /admin/ring"))?;
        view.insert(i, (m, version));
    }
    Ok(view)
}

/// The differences between two views (members added, removed, moved or changed status; a
/// ring version changed), one line per node.
fn membership_diff(before: &MembershipView, after: &MembershipView) -> Vec<String> {
    let mut out = Vec::new();
    for (i, (members, version)) in before {
        let Some((now, now_version)) = after.get(i) else {
            continue;
        };
        let gone: Vec<_> = members.difference(now).collect();
        let new: Vec<_> = now.difference(members).collect();
        if !gone.is_empty() || !new.is_empty() {
            out.push(format!(
                "n{i}: membership changed during the intruder: was {gone:?}, now {new:?}"
            ));
        }
        if version != now_version {
            out.push(format!(
                "n{i}: ring version changed during the intruder: {version} -> {now_version}"
            ));
        }
    }
    out
}

/// Drives the faults of one run.
#[derive(Debug)]
pub struct Nemesis {
    rng: StdRng,
    nodes: usize,
    /// A key whose preference list `preflist-split` splits.
    pub split_bucket: String,
    pub split_keys: Vec<String>,
    /// Where the intruder's reports and logs go.
    dir: PathBuf,
    /// The running intruder process, if any (killed on drop).
    intruder: Option<Child>,
    /// Intruder faults started so far (numbers their files).
    intruder_runs: usize,
    /// The membership every node showed before the first intruder (names and addresses must
    /// be the same at the end of the run).
    intruder_baseline: Option<MembershipView>,
    /// What the last heal found out (shown with the fault's detail).
    note: Option<String>,
}

impl Drop for Nemesis {
    fn drop(&mut self) {
        if let Some(mut child) = self.intruder.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Node `i` may not talk to the nodes it shares no group with.
fn partition(nodes: usize, groups: &[Vec<usize>]) -> Result<()> {
    for i in 1..=nodes {
        let blocked: Vec<String> = (1..=nodes)
            .filter(|&j| j != i && !groups.iter().any(|g| g.contains(&i) && g.contains(&j)))
            .map(net::node_ip)
            .collect();
        net::set_rules(i, &blocked, &[], 0)?;
    }
    Ok(())
}

/// Removes every rule of every node.
pub fn heal_rules(nodes: usize) -> Result<()> {
    for i in 1..=nodes {
        net::set_rules(i, &[], &[], 0)?;
    }
    Ok(())
}

fn show(groups: &[Vec<usize>]) -> String {
    groups
        .iter()
        .map(|g| {
            g.iter()
                .map(|i| node_name(*i))
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

impl Nemesis {
    /// A nemesis whose intruder (if any) writes its files under `dir`.
    pub fn new(
        seed: u64,
        nodes: usize,
        split_bucket: &str,
        split_keys: Vec<String>,
        dir: &Path,
    ) -> Nemesis {
        Nemesis {
            rng: StdRng::seed_from_u64(seed ^ 0x00FA_0175),
            nodes,
            split_bucket: split_bucket.to_owned(),
            split_keys,
            dir: dir.to_path_buf(),
            intruder: None,
            intruder_runs: 0,
            intruder_baseline: None,
            note: None,
        }
    }

    /// What the last heal found out, once.
    pub fn take_note(&mut self) -> Option<String> {
        self.note.take()
    }

    /// Starts the intruder process in the clients' namespace for `window`.
    fn start_intruder(&mut self, cluster: &Cluster, window: Duration) -> Result<(Active, String)> {
        let n = self.nodes;
        let baseline = membership_view(cluster, n)?;
        self.intruder_baseline
            .get_or_insert_with(|| baseline.clone());
        self.intruder_runs += 1;
        let report = self
            .dir
            .join(format!("intruder-{}.json", self.intruder_runs));
        let log_path = self
            .dir
            .join(format!("intruder-{}.log", self.intruder_runs));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let log2 = log.try_clone().context("cloning the intruder log")?;
        let peers: Vec<String> = (1..=n).map(cluster::peer_addr).collect();
        let names: Vec<String> = (1..=n).map(node_name).collect();
        let exe = std::env::current_exe().context("finding this executable")?;
        let child = Command::new("ip")
            .args(["netns", "exec", net::CLIENT_NS])
            .arg(exe)
            .arg("intruder")
            .arg("--peers")
            .arg(peers.join(","))
            .arg("--names")
            .arg(names.join(","))
            .arg("--duration-ms")
            .arg(window.as_millis().to_string())
            .arg("--report")
            .arg(&report)
            .stdin(Stdio::null())
            .stdout(log2)
            .stderr(log)
            .spawn()
            .context("spawning the intruder")?;
        self.intruder = Some(child);
        Ok((
            Active::Intruder {
                report,
                baseline: Box::new(baseline),
            },
            format!(
                "intruder in {} without the secret at every peer port for {} ms",
                net::CLIENT_NS,
                window.as_millis()
            ),
        ))
    }

    /// Waits for the intruder, reads its report, and checks the membership against
    /// `baseline`: errors fail the run.
    fn finish_intruder(
        &mut self,
        report: &Path,
        baseline: &MembershipView,
        cluster: &Cluster,
    ) -> Vec<String> {
        let mut errors = Vec::new();
        if let Some(mut child) = self.intruder.take() {
            let deadline = Instant::now() + INTRUDER_GRACE;
            let status = loop {
                match child.try_wait() {
                    Ok(Some(status)) => break Some(status),
                    Ok(None) if Instant::now() < deadline => std::thread::sleep(INTRUDER_POLL),
                    Ok(None) | Err(_) => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break None;
                    }
                }
            };
            match status {
                None => errors.push(format!(
                    "the intruder did not finish within {INTRUDER_GRACE:?} of its window"
                )),
                Some(s) if !s.success() => {
                    errors.push(format!("the intruder exited with {s} (see its report)"));
                }
                Some(_) => {}
            }
        }
        match std::fs::read(report)
            .map_err(anyhow::Error::from)
            .and_then(|b| Ok(serde_json::from_slice::<intruder::Report>(&b)?))
        {
            Ok(r) => {
                eprintln!("[nemesis] intruder: {}", r.summary());
                self.note = Some(r.summary());
                if r.total.attempts == 0 {
                    errors.push("the intruder made no attempt".to_owned());
                }
                errors.extend(r.failures.iter().map(|f| format!("intruder: {f}")));
                if !r.passed() && r.failures.is_empty() {
                    errors.push(format!("intruder: {}", r.summary()));
                }
            }
            Err(e) => errors.push(format!("intruder report {}: {e:#}", report.display())),
        }
        match membership_view(cluster, self.nodes) {
            Ok(after) => errors.extend(membership_diff(baseline, &after)),
            Err(e) => errors.push(format!("membership after the intruder: {e:#}")),
        }
        errors
    }

    /// At the end of a run with an intruder fault: every member's name and addresses, on
    /// every node, as before the first intruder (other faults may change statuses and ring
    /// versions, never names or addresses).
    pub fn final_membership_check(&self, cluster: &Cluster) -> Vec<String> {
        let Some(baseline) = &self.intruder_baseline else {
            return Vec::new();
        };
        let strip = |view: &MembershipView| -> BTreeMap<usize, BTreeSet<(String, String, String)>> {
            view.iter()
                .map(|(i, (m, _))| {
                    (
                        *i,
                        m.iter()
                            .map(|(n, p, h, _)| (n.clone(), p.clone(), h.clone()))
                            .collect(),
                    )
                })
                .collect()
        };
        match membership_view(cluster, self.nodes) {
            Ok(after) => {
                let (before, after) = (strip(baseline), strip(&after));
                before
                    .iter()
                    .filter_map(|(i, m)| {
                        let now = after.get(i)?;
                        (now != m).then(|| {
                            format!("n{i}: members at the end {now:?}, before the intruder {m:?}")
                        })
                    })
                    .collect()
            }
            Err(e) => vec![format!("final membership check: {e:#}")],
        }
    }

    fn shuffled(&mut self) -> Vec<usize> {
        let mut v: Vec<usize> = (1..=self.nodes).collect();
        v.shuffle(&mut self.rng);
        v
    }

    /// Injects a fault; returns what to heal and a description.
    /// `window` is how long the fault lasts (the intruder attacks for that long).
    pub fn start(
        &mut self,
        kind: FaultKind,
        cluster: &mut Cluster,
        window: Duration,
    ) -> Result<(Active, String)> {
        let n = self.nodes;
        match kind {
            FaultKind::Intruder => self.start_intruder(cluster, window),
            FaultKind::Halves => {
                let v = self.shuffled();
                let groups = vec![v[..2].to_vec(), v[2..].to_vec()];
                partition(n, &groups)?;
                Ok((Active::Rules, show(&groups)))
            }
            FaultKind::Isolate => {
                let v = self.shuffled();
                let groups = vec![vec![v[0]], v[1..].to_vec()];
                partition(n, &groups)?;
                Ok((Active::Rules, show(&groups)))
            }
            FaultKind::Bridge => {
                let v = self.shuffled();
                let groups = vec![v[..3].to_vec(), v[2..].to_vec()];
                partition(n, &groups)?;
                Ok((
                    Active::Rules,
                    format!("{} (bridge {})", show(&groups), node_name(v[2])),
                ))
            }
            FaultKind::PreflistSplit => {
                let key = self.split_keys[self.rng.random_range(0..self.split_keys.len())].clone();
                let primaries = self.preflist(cluster, &key)?;
                let mut primaries = primaries;
                primaries.shuffle(&mut self.rng);
                let mut others: Vec<usize> = (1..=n).filter(|i| !primaries.contains(i)).collect();
                others.shuffle(&mut self.rng);
                let take = self.rng.random_range(0..=others.len());
                let mut a = vec![primaries[0]];
                a.extend_from_slice(&others[..take]);
                let mut b: Vec<usize> = primaries[1..].to_vec();
                b.extend_from_slice(&others[take..]);
                let groups = vec![a, b];
                partition(n, &groups)?;
                Ok((
                    Active::Rules,
                    format!(
                        "{}/{key} primaries {:?}: {}",
                        self.split_bucket,
                        primaries,
                        show(&groups)
                    ),
                ))
            }
            FaultKind::Loss => {
                let percent = self.rng.random_range(20..=40);
                for i in 1..=n {
                    let lossy: Vec<String> =
                        (1..=n).filter(|&j| j != i).map(net::node_ip).collect();
                    net::set_rules(i, &[], &lossy, percent)?;
                }
                Ok((Active::Rules, format!("{percent}% of peer packets dropped")))
            }
            FaultKind::Kill => {
                let count = self.rng.random_range(1..=2);
                let victims: Vec<usize> = self.shuffled()[..count].to_vec();
                for &i in &victims {
                    cluster.kill(i);
                }
                Ok((
                    Active::Killed(victims.clone()),
                    format!("SIGKILL {}", names(&victims)),
                ))
            }
            FaultKind::KillWipe => {
                let i = self.shuffled()[0];
                cluster.kill(i);
                cluster.wipe(i)?;
                Ok((
                    Active::Wiped(i),
                    format!("SIGKILL n{i}, data directory wiped"),
                ))
            }
            FaultKind::Pause => {
                let count = self.rng.random_range(1..=2);
                let victims: Vec<usize> = self.shuffled()[..count].to_vec();
                for &i in &victims {
                    cluster.pause(i);
                }
                Ok((
                    Active::Paused(victims.clone()),
                    format!("SIGSTOP {}", names(&victims)),
                ))
            }
            FaultKind::LeaveJoin => {
                let i = self.rng.random_range(2..=n);
                let resp = cluster::call(i, "POST", "/admin/leave", &[], b"")?;
                if !(200..300).contains(&resp.status) {
                    bail!("n{i} POST /admin/leave: {}", resp.summary());
                }
                Ok((
                    Active::Leaving(i),
                    format!("n{i} leaves, then re-joins empty"),
                ))
            }
            FaultKind::ClockSkew => {
                let i = self.shuffled()[0];
                let seconds: i64 = self.rng.random_range(5..=30);
                let skew = if self.rng.random_bool(0.5) {
                    seconds
                } else {
                    -seconds
                };
                if let Err(e) = restart_with_clock(cluster, i, Some(skew)) {
                    // Not an active fault, so no heal: later restarts get the true time.
                    cluster.set_clock_skew(i, None);
                    return Err(e);
                }
                Ok((
                    Active::ClockSkew(i),
                    format!(
                        "n{i} restarted with its clock {} s {}",
                        skew.abs(),
                        if skew > 0 { "ahead" } else { "behind" }
                    ),
                ))
            }
            FaultKind::DiskFull => {
                let i = self.shuffled()[0];
                let bytes = cluster.fill_disk(i)?;
                Ok((
                    Active::DiskFull(i),
                    format!(
                        "n{i}'s data filesystem filled ({} MiB written)",
                        bytes >> 20
                    ),
                ))
            }
        }
    }

    /// The primaries of `bucket/key` as some running node sees them.
    fn preflist(&self, cluster: &Cluster, key: &str) -> Result<Vec<usize>> {
        let path = format!("/buckets/{}/keys/{key}/preflist", self.split_bucket);
        let mut last = anyhow!("no node running");
        for i in 1..=self.nodes {
            if !cluster.is_running(i) {
                continue;
            }
            match cluster::get_json(i, &path) {
                Ok(v) => {
                    let list = v
                        .get("preflist")
                        .and_then(Value::as_array)
                        .ok_or_else(|| anyhow!("no preflist in {v}"))?;
                    let nodes: Vec<usize> = list
                        .iter()
                        .filter_map(|e| e.get("node").and_then(Value::as_str))
                        .filter_map(|name| name.strip_prefix('n')?.parse().ok())
                        .collect();
                    if nodes.is_empty() {
                        bail!("empty preflist {v}");
                    }
                    return Ok(nodes);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Heals a fault. Errors are problems to report (the harness goes on healing).
    pub fn heal(&mut self, active: &Active, cluster: &mut Cluster) -> Vec<String> {
        let mut errors = Vec::new();
        match active {
            Active::Rules => {
                if let Err(e) = heal_rules(self.nodes) {
                    errors.push(format!("{e:#}"));
                }
            }
            Active::Killed(victims) => {
                for &i in victims {
                    if let Err(e) = cluster
                        .start(i, None)
                        .and_then(|()| cluster.wait_up(i, Duration::from_secs(30)))
                    {
                        errors.push(format!("restart n{i}: {e:#}"));
                    }
                }
            }
            Active::Wiped(i) => {
                let via = (1..=self.nodes)
                    .find(|&j| j != *i && cluster.is_running(j))
                    .unwrap_or(1);
                if let Err(e) = cluster
                    .start(*i, Some(via))
                    .and_then(|()| cluster.wait_up(*i, Duration::from_secs(30)))
                {
                    errors.push(format!("restart wiped n{i} --join n{via}: {e:#}"));
                }
            }
            Active::Paused(victims) => {
                for &i in victims {
                    cluster.resume(i);
                }
            }
            Active::Leaving(i) => {
                if let Err(e) = self.finish_leave_join(*i, cluster) {
                    errors.push(format!("{e:#}"));
                }
            }
            Active::ClockSkew(i) => {
                if let Err(e) = restart_with_clock(cluster, *i, None) {
                    errors.push(format!("n{i} back to the true time: {e:#}"));
                }
            }
            Active::Intruder { report, baseline } => {
                errors.extend(self.finish_intruder(report, baseline, cluster));
            }
            Active::DiskFull(i) => {
                // The node stopped itself at its first failed sync and retries its start
                // every 1-30 s (`supervise`): once the space is back it must serve again.
                if let Err(e) = cluster
                    .free_disk(*i)
                    .and_then(|()| cluster.wait_up(*i, DISK_FULL_RECOVERY))
                {
                    errors.push(format!("n{i} after its disk was freed: {e:#}"));
                }
            }
        }
        errors
    }

    /// Waits for node `i`'s leave to finish, stops it, wipes it and joins it again.
    fn finish_leave_join(&mut self, i: usize, cluster: &mut Cluster) -> Result<()> {
        let others: Vec<usize> = (1..=self.nodes).filter(|&j| j != i).collect();
        let observer = others[0];
        let name = node_name(i);
        wait_for(
            &format!("{name} to finish leaving"),
            Duration::from_secs(90),
            || {
                let m = members(observer)?;
                match m.iter().find(|m| m.name == name) {
                    Some(m) if m.status != "exiting" => bail!("{name} is {}", m.status),
                    _ => Ok(()),
                }
            },
        )?;
        cluster.wait_settled(&others, Duration::from_secs(60))?;
        cluster.stop(i, Duration::from_secs(10));
        cluster.wipe(i)?;
        cluster.start(i, Some(observer))?;
        cluster.wait_up(i, Duration::from_secs(30))?;
        cluster.wait_settled(
            &(1..=self.nodes).collect::<Vec<_>>(),
            Duration::from_secs(120),
        )
    }
}

/// Stops node `i` cleanly and starts it again with its wall clock `skew_s` seconds off.
fn restart_with_clock(cluster: &mut Cluster, i: usize, skew_s: Option<i64>) -> Result<()> {
    cluster.stop(i, Duration::from_secs(10));
    cluster.set_clock_skew(i, skew_s);
    cluster.start(i, None)?;
    cluster.wait_up(i, Duration::from_secs(30))
}

fn names(v: &[usize]) -> String {
    v.iter()
        .map(|i| node_name(*i))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(members: &[(&str, &str)], version: u64) -> MembershipView {
        let set = members
            .iter()
            .map(|(n, peer)| {
                (
                    (*n).to_owned(),
                    (*peer).to_owned(),
                    String::new(),
                    "valid".to_owned(),
                )
            })
            .collect();
        BTreeMap::from([(1, (set, version))])
    }

    #[test]
    fn membership_diff_sees_added_moved_members_and_ring_changes() {
        let before = view(&[("n1", "a:1"), ("n2", "b:1")], 7);
        assert!(membership_diff(&before, &before.clone()).is_empty());
        let moved = view(&[("n1", "a:1"), ("n2", "evil:1")], 7);
        assert_eq!(membership_diff(&before, &moved).len(), 1);
        let added = view(&[("n1", "a:1"), ("n2", "b:1"), ("intruder", "evil:1")], 7);
        assert_eq!(membership_diff(&before, &added).len(), 1);
        let ring = view(&[("n1", "a:1"), ("n2", "b:1")], 1 << 40);
        assert_eq!(membership_diff(&before, &ring).len(), 1);
    }
}
