//! `dynakv bench`: a YCSB-style load generator for dynakv's HTTP API.
//!
//! A load phase inserts `records` keys, then a run phase issues `ops` operations with the
//! workload's read/update mix over uniform or zipfian keys, from `concurrency` tasks sharing
//! pooled keep-alive connections (TCP_NODELAY) spread over the given node URLs. Latency is
//! recorded per operation in HDR histograms (microseconds, 3 significant digits); a progress line
//! goes to stderr every second; `--json` prints one object at the end.
//!
//! The benchmark bucket is set to `last_write_wins` (`allow_mult: false`) before loading: YCSB
//! updates are blind writes, which in a sibling-keeping bucket would pile up siblings on hot
//! keys. Every other setting is the bucket default (N=3, R=2, W=2); `--durability buffered`
//! makes the bucket's writes buffered (flushed every `flush_interval_ms`) instead of fsync'd.

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use dynakv_client::Client;
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Highest latency recorded exactly (60 s, in µs).
const MAX_LATENCY_US: u64 = 60_000_000;
/// Most concurrent client tasks.
const MAX_CONCURRENCY: usize = 4096;
/// YCSB's zipfian constant.
const ZIPFIAN_THETA: f64 = 0.99;

/// The mix of operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// 50% reads, 50% updates.
    A,
    /// 95% reads, 5% updates.
    B,
    /// Reads only.
    C,
    /// Updates only.
    W,
}

impl std::str::FromStr for Workload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "a" => Ok(Workload::A),
            "b" => Ok(Workload::B),
            "c" => Ok(Workload::C),
            "w" | "write" => Ok(Workload::W),
            other => Err(format!("unknown workload {other:?} (a, b, c or w)")),
        }
    }
}

impl Workload {
    fn read_fraction(self) -> f64 {
        match self {
            Workload::A => 0.5,
            Workload::B => 0.95,
            Workload::C => 1.0,
            Workload::W => 0.0,
        }
    }
}

/// Key popularity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Distribution {
    Uniform,
    Zipfian,
}

impl std::str::FromStr for Distribution {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "uniform" => Ok(Distribution::Uniform),
            "zipfian" => Ok(Distribution::Zipfian),
            other => Err(format!(
                "unknown distribution {other:?} (uniform or zipfian)"
            )),
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub urls: Vec<String>,
    pub workload: Workload,
    pub distribution: Distribution,
    pub records: u64,
    pub ops: u64,
    pub concurrency: usize,
    pub value_size: usize,
    pub bucket: String,
    pub skip_load: bool,
    pub json: bool,
    pub seed: u64,
    /// The bench bucket's durability: `fsync` (every write) or `buffered` (periodic flush).
    pub durability: String,
}

/// YCSB's zipfian generator over `0..items` (Gray et al.), scrambled so hot keys spread over
/// the ring.
#[derive(Debug, Clone)]
struct Zipfian {
    items: u64,
    alpha: f64,
    zetan: f64,
    eta: f64,
}

impl Zipfian {
    fn new(items: u64) -> Self {
        let zeta = |n: u64| {
            (1..=n)
                .map(|i| 1.0 / (i as f64).powf(ZIPFIAN_THETA))
                .sum::<f64>()
        };
        let zetan = zeta(items);
        let zeta2 = zeta(2);
        let alpha = 1.0 / (1.0 - ZIPFIAN_THETA);
        let eta = (1.0 - (2.0 / items as f64).powf(1.0 - ZIPFIAN_THETA)) / (1.0 - zeta2 / zetan);
        Zipfian {
            items,
            alpha,
            zetan,
            eta,
        }
    }

    fn next(&self, rng: &mut StdRng) -> u64 {
        let u: f64 = rng.random();
        let uz = u * self.zetan;
        let rank = if uz < 1.0 {
            0
        } else if uz < 1.0 + 0.5f64.powf(ZIPFIAN_THETA) {
            1
        } else {
            ((self.items as f64) * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64
        };
        // Scramble (FNV-1a of the rank) so popular keys are not neighbours.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in rank.min(self.items - 1).to_le_bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        hash % self.items
    }
}

fn histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).context("creating a histogram")
}

#[derive(Debug)]
struct Shared {
    done: AtomicU64,
    errors: AtomicU64,
    next_op: AtomicU64,
}

fn key_name(i: u64) -> String {
    format!("user{i:012}")
}

/// Run the benchmark and print the report.
pub async fn run(config: BenchConfig) -> Result<()> {
    if config.urls.is_empty() {
        bail!("give at least one --url");
    }
    if config.records == 0 {
        bail!("--records must be at least 1");
    }
    if config.concurrency == 0 || config.concurrency > MAX_CONCURRENCY {
        bail!("--concurrency must be from 1 to {MAX_CONCURRENCY}");
    }
    let clients: Vec<Client> = config
        .urls
        .iter()
        .map(|u| Client::new(u))
        .collect::<Result<_, _>>()?;
    if config.durability != "fsync" && config.durability != "buffered" {
        bail!("--durability must be fsync or buffered");
    }
    let props = format!(
        r#"{{"props":{{"allow_mult":false,"last_write_wins":true,"durability":"{}"}}}}"#,
        config.durability
    );
    let path = format!("/buckets/{}/props", config.bucket);
    let (status, _, body) = clients[0]
        .request(
            hyper::Method::PUT,
            &path,
            &[("content-type", "application/json")],
            Bytes::from(props),
        )
        .await?;
    if !status.is_success() {
        bail!(
            "setting the bench bucket's properties: {status} {}",
            String::from_utf8_lossy(&body)
        );
    }
    // Let the properties spread by gossip before loading.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let value = Bytes::from(vec![b'x'; config.value_size]);
    if !config.skip_load {
        let started = Instant::now();
        let report = phase(&config, &clients, &value, Phase::Load).await?;
        eprintln!(
            "load: {} records in {:.1?} ({:.0} ops/s, {} errors)",
            config.records,
            started.elapsed(),
            report.throughput,
            report.errors
        );
    }
    let report = phase(&config, &clients, &value, Phase::Run).await?;
    let read = summary(&report.read);
    let update = summary(&report.update);
    if config.json {
        let out = serde_json::json!({
            "workload": format!("{:?}", config.workload).to_lowercase(),
            "distribution": format!("{:?}", config.distribution).to_lowercase(),
            "records": config.records,
            "ops": report.done,
            "errors": report.errors,
            "concurrency": config.concurrency,
            "value_size": config.value_size,
            "durability": config.durability,
            "elapsed_sec": report.elapsed.as_secs_f64(),
            "throughput_ops_per_sec": report.throughput,
            "read": read,
            "update": update,
        });
        println!("{out}");
    } else {
        println!(
            "{} ops in {:.1?}: {:.0} ops/s, {} errors",
            report.done, report.elapsed, report.throughput, report.errors
        );
        for (name, h) in [("read", &report.read), ("update", &report.update)] {
            if h.is_empty() {
                continue;
            }
            println!(
                "  {name:<6} n={:<8} p50={:.3}ms p99={:.3}ms p99.9={:.3}ms max={:.3}ms",
                h.len(),
                ms(h.value_at_quantile(0.5)),
                ms(h.value_at_quantile(0.99)),
                ms(h.value_at_quantile(0.999)),
                ms(h.max())
            );
        }
    }
    Ok(())
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn summary(h: &Histogram<u64>) -> serde_json::Value {
    if h.is_empty() {
        return serde_json::json!({"count": 0});
    }
    serde_json::json!({
        "count": h.len(),
        "p50_ms": ms(h.value_at_quantile(0.5)),
        "p99_ms": ms(h.value_at_quantile(0.99)),
        "p999_ms": ms(h.value_at_quantile(0.999)),
        "max_ms": ms(h.max()),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Load,
    Run,
}

struct PhaseReport {
    read: Histogram<u64>,
    update: Histogram<u64>,
    done: u64,
    errors: u64,
    elapsed: Duration,
    throughput: f64,
}

async fn phase(
    config: &BenchConfig,
    clients: &[Client],
    value: &Bytes,
    phase: Phase,
) -> Result<PhaseReport> {
    let total = match phase {
        Phase::Load => config.records,
        Phase::Run => config.ops,
    };
    let shared = Arc::new(Shared {
        done: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        next_op: AtomicU64::new(0),
    });
    let zipfian = Arc::new(Zipfian::new(config.records));
    let started = Instant::now();
    let progress = {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let done = shared.done.load(Ordering::Relaxed);
                eprintln!(
                    "  {phase:?}: {done}/{total} ops, {}/s, {} errors",
                    done - last,
                    shared.errors.load(Ordering::Relaxed)
                );
                last = done;
            }
        })
    };
    let mut tasks = Vec::with_capacity(config.concurrency);
    for task in 0..config.concurrency {
        let client = clients[task % clients.len()].clone();
        let shared = Arc::clone(&shared);
        let zipfian = Arc::clone(&zipfian);
        let (config, value) = (config.clone(), value.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng =
                StdRng::seed_from_u64(config.seed ^ (task as u64).wrapping_mul(0x9e37_79b9));
            let mut read = histogram()?;
            let mut update = histogram()?;
            loop {
                let op = shared.next_op.fetch_add(1, Ordering::Relaxed);
                if op >= total {
                    break;
                }
                let (is_read, key) = match phase {
                    Phase::Load => (false, op),
                    Phase::Run => {
                        let key = match config.distribution {
                            Distribution::Uniform => rng.random_range(0..config.records),
                            Distribution::Zipfian => zipfian.next(&mut rng),
                        };
                        (rng.random::<f64>() < config.workload.read_fraction(), key)
                    }
                };
                let name = key_name(key);
                let started = Instant::now();
                let ok = if is_read {
                    client.get(&config.bucket, &name).await.is_ok()
                } else {
                    let path = format!("/buckets/{}/keys/{name}", config.bucket);
                    matches!(
                        client
                            .request(
                                hyper::Method::PUT,
                                &path,
                                &[("content-type", "application/octet-stream")],
                                value.clone(),
                            )
                            .await,
                        Ok((status, _, _)) if status.is_success()
                    )
                };
                let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                let h = if is_read { &mut read } else { &mut update };
                h.saturating_record(us.clamp(1, MAX_LATENCY_US));
                shared.done.fetch_add(1, Ordering::Relaxed);
                if !ok {
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            anyhow::Ok((read, update))
        }));
    }
    let mut read = histogram()?;
    let mut update = histogram()?;
    for task in tasks {
        let (r, u) = task.await.context("bench task")??;
        read.add(&r).context("merging histograms")?;
        update.add(&u).context("merging histograms")?;
    }
    progress.abort();
    let elapsed = started.elapsed();
    let done = shared.done.load(Ordering::Relaxed);
    Ok(PhaseReport {
        read,
        update,
        done,
        errors: shared.errors.load(Ordering::Relaxed),
        elapsed,
        throughput: done as f64 / elapsed.as_secs_f64().max(1e-9),
    })
}
