//! `dynakv-nemesis`: run seeds of the real-network fault test, the bounded CI mode, or clean
//! up what a previous run left. Needs root.
//!
//! The outer process (root namespace) builds the network and always tears it down (a guard,
//! a SIGINT/SIGTERM/SIGHUP handler, and `cleanup`); it runs the inner process (the clients,
//! the nemesis and the checkers) inside the client namespace with `ip netns exec dk-cl`.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use dynakv_nemesis::intruder;
use dynakv_nemesis::nemesis::FaultKind;
use dynakv_nemesis::net;
use dynakv_nemesis::run::{self, RunPlan, RunReport};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Number of server processes.
const NODES: usize = 5;

#[derive(Debug, Parser)]
#[command(
    name = "dynakv-nemesis",
    about = "Jepsen-style fault test of real dynakv servers in network namespaces (root)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run seeds: faults drawn from each seed.
    Run {
        #[arg(long, default_value_t = 1)]
        seeds: u64,
        /// Workload length of each seed, seconds (faults alternate with healthy periods).
        #[arg(long, default_value_t = 60)]
        duration_per_seed: u64,
        /// First seed (default: from the clock; printed).
        #[arg(long)]
        start_seed: Option<u64>,
        /// Make the primary set-add bucket last-write-wins: the checker must report losses.
        #[arg(long)]
        lww_primary: bool,
        /// Only these fault kinds, in this order, for every seed (comma-separated).
        #[arg(long, value_delimiter = ',')]
        faults: Vec<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Bounded CI mode: 4 seeds covering every fault kind once (three per run), fails on any
    /// lost write, unconverged replica or leaked namespace; a 5th run with a last-write-wins
    /// primary bucket must be reported as losing writes.
    Ci {
        #[arg(long, default_value_t = 1)]
        start_seed: u64,
        #[command(flatten)]
        common: Common,
    },
    /// Remove processes, namespaces and the bridge left by a previous run.
    Cleanup,
    /// The `intruder` fault's attacker (the nemesis runs it in the clients' namespace):
    /// without the cluster secret, attack every peer port until the duration passes; exit 1
    /// when any attempt got an answer that is not a refusal, or was held open.
    Intruder {
        /// Every node's peer address (comma-separated).
        #[arg(long, value_delimiter = ',', required = true)]
        peers: Vec<SocketAddr>,
        /// Live member names to claim (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "n1")]
        names: Vec<String>,
        /// The cluster name to claim.
        #[arg(long, default_value = "dynakv")]
        cluster_name: String,
        /// The address the forged gossip and joins move members to.
        #[arg(long, default_value_t = format!("{}:{}", net::CLIENT_IP, net::PEER_PORT))]
        own_addr: String,
        #[arg(long)]
        duration_ms: u64,
        /// Where the JSON report goes.
        #[arg(long)]
        report: PathBuf,
    },
    /// (internal) the clients, nemesis and checkers, run inside the client namespace.
    #[command(hide = true)]
    Inner {
        #[arg(long)]
        spec: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct Common {
    /// Where histories, logs and reports go (default: a new directory under the temp dir).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The dynakv binary (default: build `target/release/dynakv` with cargo).
    #[arg(long)]
    bin: Option<PathBuf>,
}

/// What the inner process runs.
#[derive(Debug, Serialize, Deserialize)]
struct Spec {
    runs: Vec<RunPlan>,
    bin: PathBuf,
    out: PathBuf,
    nodes: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Cleanup => cleanup_command(),
        Cmd::Intruder {
            peers,
            names,
            cluster_name,
            own_addr,
            duration_ms,
            report,
        } => (|| {
            let target = intruder::Target {
                peers,
                names,
                cluster_name,
                own_addr,
            };
            let r = intruder::run_to_file(&target, Duration::from_millis(duration_ms), &report)?;
            println!("{}", r.summary());
            for (reason, count) in &r.refusal_reasons {
                println!("  refused {count}x: {reason:?}");
            }
            for f in &r.failures {
                println!("  FAILURE: {f}");
            }
            Ok(r.passed() && r.failures.is_empty())
        })(),
        Cmd::Inner { spec } => inner(&spec),
        Cmd::Run {
            seeds,
            duration_per_seed,
            start_seed,
            lww_primary,
            faults,
            common,
        } => (|| {
            let forced = parse_faults(&faults)?;
            let start = start_seed.unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(1, |d| d.as_secs() % 1_000_000)
            });
            let runs = (start..start + seeds)
                .map(|seed| RunPlan {
                    seed,
                    duration_s: duration_per_seed,
                    forced: forced.clone(),
                    lww_primary,
                    expect_loss: false,
                })
                .collect();
            outer(runs, &common)
        })(),
        Cmd::Ci { start_seed, common } => {
            // Every fault kind once, shuffled by the seed, three per run; then one short run
            // with the primary set-add bucket last-write-wins, which must report losses.
            let mut kinds = FaultKind::ALL.to_vec();
            kinds.shuffle(&mut StdRng::seed_from_u64(start_seed));
            let mut runs: Vec<RunPlan> = kinds
                .chunks(3)
                .enumerate()
                .map(|(i, chunk)| RunPlan {
                    seed: start_seed + i as u64,
                    duration_s: 0,
                    forced: Some(chunk.to_vec()),
                    lww_primary: false,
                    expect_loss: false,
                })
                .collect();
            runs.push(RunPlan {
                seed: start_seed + runs.len() as u64,
                duration_s: 0,
                forced: Some(vec![FaultKind::Halves]),
                lww_primary: true,
                expect_loss: true,
            });
            outer(runs, &common)
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("dynakv-nemesis: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_faults(names: &[String]) -> Result<Option<Vec<FaultKind>>> {
    if names.is_empty() {
        return Ok(None);
    }
    names
        .iter()
        .map(|n| {
            FaultKind::parse(n).with_context(|| {
                format!(
                    "unknown fault {n:?}; known: {}",
                    FaultKind::ALL.map(FaultKind::name).join(",")
                )
            })
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn require_root() -> Result<()> {
    let out = net::run("id", &["-u"])?;
    if out.trim() != "0" {
        bail!("dynakv-nemesis needs root (network namespaces, nftables)");
    }
    Ok(())
}

fn cleanup_command() -> Result<bool> {
    require_root()?;
    let removed = teardown();
    if removed.is_empty() {
        println!("nothing to clean up");
    }
    for r in &removed {
        println!("removed {r}");
    }
    let left = net::our_namespaces()?;
    if !left.is_empty() {
        bail!("namespaces still present: {left:?}");
    }
    Ok(true)
}

/// Removes what a run leaves behind: namespaces, bridge and rules (and with the processes
/// in them, the tmpfs data directories, which live in the inner process's mount namespace).
fn teardown() -> Vec<String> {
    net::cleanup()
}

/// Tears the network down when dropped (also on a panic or an error).
struct NetGuard;

impl Drop for NetGuard {
    fn drop(&mut self) {
        for r in teardown() {
            eprintln!("[nemesis] teardown: removed {r}");
        }
    }
}

/// On SIGINT, SIGTERM or SIGHUP: remove everything, then exit 130.
fn install_signal_cleanup() {
    std::thread::spawn(|| {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        let got = rt.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
                signal(SignalKind::interrupt()),
                signal(SignalKind::terminate()),
                signal(SignalKind::hangup()),
            ) else {
                return false;
            };
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
                _ = hup.recv() => {}
            }
            true
        });
        if got {
            eprintln!("[nemesis] signal: tearing everything down");
            for r in teardown() {
                eprintln!("[nemesis] removed {r}");
            }
            std::process::exit(130);
        }
    });
}

fn resolve_bin(bin: Option<&PathBuf>) -> Result<PathBuf> {
    if let Some(b) = bin {
        return std::fs::canonicalize(b).with_context(|| format!("--bin {}", b.display()));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    eprintln!("[nemesis] cargo build --release -p dynakv");
    let status = Command::new("cargo")
        .args(["build", "--release", "-p", "dynakv", "--bin", "dynakv"])
        .current_dir(&root)
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("cargo build failed: {status}");
    }
    std::fs::canonicalize(root.join("target/release/dynakv"))
        .context("finding target/release/dynakv")
}

fn outer(runs: Vec<RunPlan>, common: &Common) -> Result<bool> {
    require_root()?;
    let started = Instant::now();
    install_signal_cleanup();
    for r in teardown() {
        eprintln!("[nemesis] removed a leftover: {r}");
    }
    let bin = resolve_bin(common.bin.as_ref())?;
    let out = match &common.out {
        Some(o) => o.clone(),
        None => std::env::temp_dir().join(format!(
            "dynakv-nemesis-{}",
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        )),
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let out = std::fs::canonicalize(&out)?;
    eprintln!(
        "[nemesis] seeds {:?}; output in {}",
        runs.iter().map(|r| r.seed).collect::<Vec<_>>(),
        out.display()
    );
    let spec = Spec {
        runs,
        bin,
        out: out.clone(),
        nodes: NODES,
    };
    let spec_path = out.join("spec.json");
    std::fs::write(&spec_path, serde_json::to_vec_pretty(&spec)?)?;
    let inner_ok = {
        let _guard = NetGuard;
        net::setup(NODES)?;
        let exe = std::env::current_exe().context("finding this executable")?;
        let status = Command::new("ip")
            .args(["netns", "exec", net::CLIENT_NS])
            .arg(exe)
            .arg("inner")
            .arg("--spec")
            .arg(&spec_path)
            .status()
            .context("running the inner harness")?;
        status.success()
    };
    let leaked = net::our_namespaces()?;
    let elapsed = started.elapsed().as_secs();
    if !leaked.is_empty() {
        eprintln!("[nemesis] FAIL: leaked namespaces after teardown: {leaked:?}");
    }
    eprintln!(
        "[nemesis] {} in {elapsed} s; namespaces left: {}; reports in {}",
        if inner_ok && leaked.is_empty() {
            "PASS"
        } else {
            "FAIL"
        },
        leaked.len(),
        out.display()
    );
    Ok(inner_ok && leaked.is_empty())
}

fn inner(spec_path: &Path) -> Result<bool> {
    let spec: Spec = serde_json::from_slice(&std::fs::read(spec_path)?)?;
    let mut reports: Vec<RunReport> = Vec::new();
    let mut ok = true;
    for plan in &spec.runs {
        let dir = run::seed_dir(&spec.out, plan.seed, plan.lww_primary);
        std::fs::create_dir_all(&dir)?;
        eprintln!("[nemesis] ===== seed {} =====", plan.seed);
        let report = run::run_one(plan, &spec.bin, &dir, spec.nodes);
        std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(&report)?)?;
        let mut table = run::table(&report);
        if plan.expect_loss {
            table.push_str(if plan.succeeded(&report) {
                "  (expected: the last-write-wins primary bucket must lose writes, and the checker caught it)\n"
            } else {
                "  UNEXPECTED: the last-write-wins primary bucket lost nothing the checker saw\n"
            });
        }
        std::fs::write(dir.join("report.txt"), &table)?;
        println!("{table}");
        ok &= plan.succeeded(&report);
        reports.push(report);
    }
    std::fs::write(
        spec.out.join("summary.json"),
        serde_json::to_vec_pretty(&reports)?,
    )?;
    let summary = run::summary(&reports);
    std::fs::write(spec.out.join("summary.txt"), &summary)?;
    println!("{summary}");
    Ok(ok)
}
