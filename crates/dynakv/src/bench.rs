//! `dynakv bench`: a YCSB-style load generator for dynakv's HTTP API.
//!
//! A load phase inserts `records` keys, then a run phase issues `ops` operations with the
//! workload's read/update mix over uniform or zipfian keys, from `concurrency` tasks spread over
//! the given node URLs. Each task has its own keep-alive connection (TCP_NODELAY) and writes
//! pre-built HTTP/1.1 requests on it (`crate::rawhttp`); `--generator hyper` (and any https://
//! URL, `--client-routing`, etcd) uses the full pooled client instead, which costs the
//! generator about three times the CPU per operation. Latency is
//! recorded per operation in HDR histograms (microseconds, 3 significant digits); a progress line
//! goes to stderr every second; `--json` prints one object at the end.
//!
//! The benchmark bucket is set to `last_write_wins` (`allow_mult: false`) before loading: YCSB
//! updates are blind writes, which in a sibling-keeping bucket would pile up siblings on hot
//! keys. Every other setting is the bucket default (N=3, R=2, W=2); `--durability buffered`
//! makes the bucket's writes buffered (flushed every `flush_interval_ms`) instead of fsync'd.
//!
//! CPU per operation: the run phase's CPU time of the node processes (each node's `/stats`
//! gives its process id and CPU seconds; the nodes of one `dynakv dev` share a process, counted
//! once) and of the generator itself (`/proc/self/stat`), divided by the operations done, and
//! as cores used over the run, so a reader sees how the machine was shared.

use crate::rawhttp::{RawConnection, RawRequest, RawTarget};
use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use dynakv_client::Client;
use dynakv_client::routing::{self, RoutingClient};
use dynakv_server::stats::own_cpu_seconds;
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Highest latency recorded exactly (60 s, in µs).
const MAX_LATENCY_US: u64 = 60_000_000;
/// Most concurrent client tasks.
const MAX_CONCURRENCY: usize = 4096;
/// Most requests a bench client pipelines at once.
const MAX_PIPELINE: usize = 256;
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
    /// Route each request to a replica of its key (client-driven coordination).
    pub client_routing: bool,
    /// Offered operations per second in all (open loop); 0 = closed loop, as fast as possible.
    pub rate: f64,
    pub target: Target,
    /// Time limit of the run phase in seconds (0 = none).
    pub duration_secs: u64,
    /// CA and credentials of every client (https:// URLs, HTTP Basic).
    pub client: crate::ClientSettings,
    /// The HTTP client of the generator.
    pub generator: Generator,
    /// Requests each client writes at once before reading their responses (1 = none).
    pub pipeline: usize,
    /// The client API of the operations.
    pub protocol: Protocol,
    /// The nodes' PB addresses (`Protocol::Pb`).
    pub pb_addrs: Vec<std::net::SocketAddr>,
    /// Operate on a data type instead of plain values: updates increment a counter or add a
    /// new element to a set, reads fetch it (bucket type `bench_counter` or `bench_set`).
    pub datatype: Option<BenchDatatype>,
    /// Secondary indexes: every write carries the index entry `n_int` = its key's number,
    /// and every read is a range query of this many terms from its key's number.
    pub index_range: Option<u64>,
}

/// The data type a bench operates on (`--datatype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchDatatype {
    Counter,
    Set,
}

impl std::str::FromStr for BenchDatatype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "counter" => Ok(BenchDatatype::Counter),
            "set" => Ok(BenchDatatype::Set),
            other => Err(format!("unknown data type {other:?} (counter or set)")),
        }
    }
}

impl BenchDatatype {
    /// The bucket type the bench makes for it.
    fn bucket_type(self) -> &'static str {
        match self {
            BenchDatatype::Counter => "bench_counter",
            BenchDatatype::Set => "bench_set",
        }
    }
}

/// One operation: what, on which key, and for a set's add the element.
#[derive(Debug, Clone, Copy)]
struct Operation<'a> {
    bucket: &'a str,
    key: &'a str,
    is_read: bool,
    datatype: Option<BenchDatatype>,
    element: u64,
    index_range: Option<u64>,
}

/// The client API a bench's operations use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    /// Riak's Protocol Buffers API.
    Pb,
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "http" => Ok(Protocol::Http),
            "pb" => Ok(Protocol::Pb),
            other => Err(format!("unknown protocol {other:?} (expected http or pb)")),
        }
    }
}

/// The load generator's HTTP client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generator {
    /// One raw keep-alive connection per task (plain http:// URLs; the others fall back to hyper).
    Raw,
    /// The full client (hyper, pooled connections).
    Hyper,
}

impl std::str::FromStr for Generator {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "raw" => Ok(Generator::Raw),
            "hyper" => Ok(Generator::Hyper),
            other => Err(format!("unknown generator {other:?} (raw or hyper)")),
        }
    }
}

/// The system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// dynakv's Riak-compatible HTTP API.
    Dynakv,
    /// etcd's v3 JSON gateway (`/v3/kv/put`, `/v3/kv/range`), base64 keys and values.
    Etcd,
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "dynakv" => Ok(Target::Dynakv),
            "etcd" => Ok(Target::Etcd),
            other => Err(format!("unknown target {other:?} (dynakv or etcd)")),
        }
    }
}

/// How one operation reaches the system under test.
#[derive(Debug, Clone)]
enum Sender {
    /// The node `clients[task % len]`, which coordinates (or forwards) the request.
    Dynakv(Client),
    /// A dynakv node or an etcd member, over the task's own raw connection (made per task
    /// from this target).
    Raw(RawTarget, Target),
    /// A replica of the key, from the client's copy of the ring.
    Routed(RoutingClient),
    Etcd(Client),
    /// A node's PB port, over the task's own connection.
    Pb(std::net::SocketAddr),
}

/// What became of one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    /// 503: the node shed the request (overload) or could not reach a quorum.
    Unavailable,
    Failed,
}

impl Outcome {
    /// The outcome of an answer with this status (`None`: no answer).
    fn of(status: Option<u16>) -> Outcome {
        match status {
            // A read of a key that is not there yet is an answer, not a failure.
            Some(status) if (200..300).contains(&status) || status == 404 => Outcome::Ok,
            Some(503) => Outcome::Unavailable,
            _ => Outcome::Failed,
        }
    }
}

/// One task's way to the system under test: its own raw connection, or a shared client.
#[derive(Debug)]
enum TaskSender {
    Raw(RawConnection, Target),
    Pb(crate::pbclient::PbConnection),
    Shared(Sender),
}

impl TaskSender {
    fn of(sender: Sender) -> TaskSender {
        match sender {
            Sender::Raw(raw, target) => {
                TaskSender::Raw(RawConnection::new(raw, RAW_TIMEOUT), target)
            }
            Sender::Pb(addr) => {
                TaskSender::Pb(crate::pbclient::PbConnection::new(addr, RAW_TIMEOUT))
            }
            other => TaskSender::Shared(other),
        }
    }

    async fn execute(&mut self, op: Operation<'_>, value: &Bytes) -> Outcome {
        let Operation {
            bucket,
            key,
            is_read,
            ..
        } = op;
        if let Some(datatype) = op.datatype {
            return self.execute_datatype(op, datatype).await;
        }
        if let (Some(range), TaskSender::Raw(conn, Target::Dynakv)) = (op.index_range, &mut *self) {
            let n: u64 = key.trim_start_matches("user").parse().unwrap_or(0);
            let answer = if is_read {
                let end = n.saturating_add(range.saturating_sub(1));
                let path = format!("/buckets/{bucket}/index/n_int/{n}/{end}?max_results={range}");
                conn.request("GET", &path, &[], b"").await
            } else {
                let path = format!("/buckets/{bucket}/keys/{key}");
                let n = n.to_string();
                let headers = [
                    ("content-type", "application/octet-stream"),
                    ("x-riak-index-n_int", n.as_str()),
                ];
                conn.request("PUT", &path, &headers, value).await
            };
            return Outcome::of(answer.ok());
        }
        match self {
            TaskSender::Raw(conn, Target::Dynakv) => {
                let path = format!("/buckets/{bucket}/keys/{key}");
                let answer = if is_read {
                    conn.request("GET", &path, &[], b"").await
                } else {
                    conn.request("PUT", &path, OCTETS, value).await
                };
                Outcome::of(answer.ok())
            }
            TaskSender::Raw(conn, Target::Etcd) => {
                let (path, body) = etcd_request(bucket, key, value, is_read);
                let answer = conn
                    .request("POST", path, JSON, body.to_string().as_bytes())
                    .await;
                Outcome::of(answer.ok())
            }
            TaskSender::Pb(conn) => {
                use crate::pbclient::PbAnswer;
                let answer = if is_read {
                    conn.get(bucket, key).await
                } else {
                    conn.put(bucket, key, value).await
                };
                match answer {
                    Ok(PbAnswer::Ok) => Outcome::Ok,
                    // The node's refusals for load (the in-flight limit, the body budget).
                    Ok(PbAnswer::Error(text)) if text.starts_with("overloaded") => {
                        Outcome::Unavailable
                    }
                    Ok(PbAnswer::Error(_)) | Err(_) => Outcome::Failed,
                }
            }
            TaskSender::Shared(sender) => sender.execute(bucket, key, value, is_read).await,
        }
    }

    /// A data type operation (raw HTTP or PB only: `run` checks).
    async fn execute_datatype(&mut self, op: Operation<'_>, datatype: BenchDatatype) -> Outcome {
        let bucket_type = datatype.bucket_type();
        let element = format!("e{}", op.element);
        match self {
            TaskSender::Raw(conn, Target::Dynakv) => {
                let path = format!(
                    "/types/{bucket_type}/buckets/{}/datatypes/{}",
                    op.bucket, op.key
                );
                let answer = if op.is_read {
                    conn.request("GET", &path, &[], b"").await
                } else {
                    let body = match datatype {
                        BenchDatatype::Counter => r#"{"increment":1}"#.to_owned(),
                        BenchDatatype::Set => format!(r#"{{"add":"{element}"}}"#),
                    };
                    conn.request("POST", &path, JSON, body.as_bytes()).await
                };
                Outcome::of(answer.ok())
            }
            TaskSender::Pb(conn) => {
                use crate::pbclient::PbAnswer;
                let name = (bucket_type, op.bucket, op.key);
                let answer = if op.is_read {
                    conn.dt_fetch(name).await
                } else {
                    let element = (datatype == BenchDatatype::Set).then_some(element.as_str());
                    conn.dt_update(name, element).await
                };
                match answer {
                    Ok(PbAnswer::Ok) => Outcome::Ok,
                    Ok(PbAnswer::Error(text)) if text.starts_with("overloaded") => {
                        Outcome::Unavailable
                    }
                    Ok(PbAnswer::Error(_)) | Err(_) => Outcome::Failed,
                }
            }
            _ => Outcome::Failed,
        }
    }
}

/// etcd's v3 JSON gateway: the path and body of a read or a write of `bucket/key`.
fn etcd_request(
    bucket: &str,
    key: &str,
    value: &Bytes,
    is_read: bool,
) -> (&'static str, serde_json::Value) {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let etcd_key = b64.encode(format!("{bucket}/{key}"));
    if is_read {
        ("/v3/kv/range", serde_json::json!({"key": etcd_key}))
    } else {
        (
            "/v3/kv/put",
            serde_json::json!({"key": etcd_key, "value": b64.encode(value)}),
        )
    }
}

const JSON: &[(&str, &str)] = &[("content-type", "application/json")];
/// The content type of a benchmark write.
const OCTETS: &[(&str, &str)] = &[("content-type", "application/octet-stream")];
/// Time limit of one request on a raw connection (the full client's default).
const RAW_TIMEOUT: Duration = Duration::from_secs(30);

impl Sender {
    async fn execute(&self, bucket: &str, key: &str, value: &Bytes, is_read: bool) -> Outcome {
        let path = format!("/buckets/{bucket}/keys/{key}");
        let (method, headers, body) = if is_read {
            (hyper::Method::GET, &[][..], Bytes::new())
        } else {
            (hyper::Method::PUT, OCTETS, value.clone())
        };
        let answer = match self {
            // A task makes its own connection of a raw or PB target (`TaskSender::of`).
            Sender::Raw(..) | Sender::Pb(_) => return Outcome::Failed,
            Sender::Dynakv(client) => client.request(method, &path, headers, body).await,
            Sender::Routed(routing) => {
                routing
                    .request(bucket, key, method, &path, headers, body)
                    .await
            }
            Sender::Etcd(client) => {
                let (path, body) = etcd_request(bucket, key, value, is_read);
                client
                    .request(
                        hyper::Method::POST,
                        path,
                        JSON,
                        Bytes::from(body.to_string()),
                    )
                    .await
            }
        };
        Outcome::of(answer.ok().map(|(status, _, _)| status.as_u16()))
    }
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
    unavailable: AtomicU64,
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
    if !config.rate.is_finite() || config.rate < 0.0 {
        bail!("--rate must be a number of operations per second, 0 for as fast as possible");
    }
    if config.durability != "fsync" && config.durability != "buffered" {
        bail!("--durability must be fsync or buffered");
    }
    if config.client_routing && config.target != Target::Dynakv {
        bail!("--client-routing works with --target dynakv only");
    }
    if config.protocol == Protocol::Pb
        && (config.pb_addrs.is_empty() || config.target != Target::Dynakv || config.client_routing)
    {
        bail!(
            "--protocol pb needs --pb ADDR for each node, --target dynakv and no --client-routing"
        );
    }
    if config.pipeline == 0 || config.pipeline > MAX_PIPELINE {
        bail!("--pipeline must be from 1 to {MAX_PIPELINE}");
    }
    if config.pipeline > 1
        && (config.rate > 0.0
            || config.target != Target::Dynakv
            || config.generator != Generator::Raw
            || config.client_routing
            || config
                .urls
                .iter()
                .any(|u| RawTarget::from_url(u, None).is_none()))
    {
        bail!(
            "--pipeline works in a closed loop (--rate 0) against plain http://IP:PORT dynakv \
             nodes with the raw generator and no --client-routing"
        );
    }
    let clients: Vec<Client> = config
        .urls
        .iter()
        .map(|u| config.client.client(u))
        .collect::<Result<_, _>>()?;
    if config.index_range.is_some()
        && (config.datatype.is_some()
            || config.protocol != Protocol::Http
            || config.generator != Generator::Raw
            || config.pipeline > 1
            || config.client_routing
            || config.target != Target::Dynakv)
    {
        bail!(
            "--index-range works over HTTP with the raw generator against dynakv nodes, \
             without --datatype, --pipeline or --client-routing"
        );
    }
    if let Some(datatype) = config.datatype {
        if config.target != Target::Dynakv
            || config.client_routing
            || config.pipeline > 1
            || (config.protocol == Protocol::Http
                && (config.generator != Generator::Raw
                    || config
                        .urls
                        .iter()
                        .any(|u| RawTarget::from_url(u, None).is_none())))
        {
            bail!(
                "--datatype works against dynakv nodes, over PB or over plain http://IP:PORT \
                 with the raw generator, without --client-routing or --pipeline"
            );
        }
        make_bench_type(&config, &clients[0], datatype).await?;
    } else if config.target == Target::Dynakv {
        set_bench_props(&config, &clients[0]).await?;
    }
    // The node processes whose CPU time is measured (dynakv's `/stats` reports it).
    let nodes: Vec<(String, Client)> = if config.target == Target::Dynakv {
        config
            .urls
            .iter()
            .cloned()
            .zip(clients.iter().cloned())
            .collect()
    } else {
        Vec::new()
    };
    let raw = |url: &str| {
        (config.generator == Generator::Raw)
            .then(|| RawTarget::from_url(url, config.client.basic_auth()))
            .flatten()
    };
    let senders: Vec<Sender> = match config.target {
        Target::Etcd => clients
            .into_iter()
            .zip(&config.urls)
            .map(|(client, url)| {
                raw(url).map_or(Sender::Etcd(client), |r| Sender::Raw(r, Target::Etcd))
            })
            .collect(),
        Target::Dynakv if config.client_routing => {
            let routing = RoutingClient::connect_with(clients, routing::DEFAULT_N_VAL)
                .await
                .context("fetching the routing table")?;
            vec![Sender::Routed(routing)]
        }
        Target::Dynakv if config.protocol == Protocol::Pb => {
            config.pb_addrs.iter().copied().map(Sender::Pb).collect()
        }
        Target::Dynakv => clients
            .into_iter()
            .zip(&config.urls)
            .map(|(client, url)| {
                raw(url).map_or(Sender::Dynakv(client), |r| Sender::Raw(r, Target::Dynakv))
            })
            .collect(),
    };
    let value = Bytes::from(vec![b'x'; config.value_size]);
    // A data type key is made by its first update: there is nothing to load.
    if !config.skip_load && config.datatype.is_none() {
        let started = Instant::now();
        let report = phase(&config, &senders, &value, Phase::Load).await?;
        eprintln!(
            "load: {} records in {:.1?} ({:.0} ops/s, {} errors)",
            config.records,
            started.elapsed(),
            report.throughput,
            report.errors + report.unavailable
        );
    }
    let before = CpuSample::take(&nodes).await;
    let report = phase(&config, &senders, &value, Phase::Run).await?;
    let cpu = CpuSample::take(&nodes).await.since(&before, &report);
    let read = summary(&report.read);
    let update = summary(&report.update);
    if config.json {
        let out = serde_json::json!({
            "target": format!("{:?}", config.target).to_lowercase(),
            "workload": format!("{:?}", config.workload).to_lowercase(),
            "distribution": format!("{:?}", config.distribution).to_lowercase(),
            "records": config.records,
            "ops": report.done,
            "errors": report.errors,
            "unavailable": report.unavailable,
            "concurrency": config.concurrency,
            "protocol": format!("{:?}", config.protocol).to_lowercase(),
            "pipeline": config.pipeline,
            "value_size": config.value_size,
            "durability": config.durability,
            "client_routing": config.client_routing,
            "offered_rate": config.rate,
            "elapsed_sec": report.elapsed.as_secs_f64(),
            "throughput_ops_per_sec": report.throughput,
            "read": read,
            "update": update,
            "unavailable_latency": summary(&report.rejected),
            "accepted_service": summary(&report.served),
            "server_cpu_us_per_op": cpu.server_us_per_op,
            "server_cores": cpu.server_cores,
            "server_processes": cpu.server_processes,
            "generator_cpu_us_per_op": cpu.generator_us_per_op,
            "generator_cores": cpu.generator_cores,
        });
        println!("{out}");
    } else {
        println!(
            "{} ops in {:.1?}: {:.0} ops/s, {} errors, {} unavailable (503)",
            report.done, report.elapsed, report.throughput, report.errors, report.unavailable
        );
        for (name, h) in [
            ("read", &report.read),
            ("update", &report.update),
            ("503", &report.rejected),
            ("served", &report.served),
        ] {
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
        println!("  {}", cpu.line());
    }
    Ok(())
}

/// CPU seconds used so far: by each node process (keyed by host and process id), and by this
/// generator.
struct CpuSample {
    /// `None` when a node did not report its CPU time (not dynakv, `/stats` refused).
    servers: Option<BTreeMap<(String, u64), f64>>,
    generator: Option<f64>,
}

/// CPU per operation over a run.
#[derive(Debug, Default)]
struct CpuReport {
    server_us_per_op: Option<f64>,
    server_cores: Option<f64>,
    server_processes: usize,
    generator_us_per_op: Option<f64>,
    generator_cores: Option<f64>,
}

impl CpuSample {
    async fn take(nodes: &[(String, Client)]) -> CpuSample {
        let mut servers = Some(BTreeMap::new());
        for (url, client) in nodes {
            let sample = client.get_json("/stats").await.ok().and_then(|stats| {
                let pid = stats.get("process_id")?.as_u64()?;
                let cpu = stats.get("process_cpu_seconds")?.as_f64()?;
                let host = url.parse::<hyper::Uri>().ok()?.host()?.to_owned();
                Some(((host, pid), cpu))
            });
            match (sample, servers.as_mut()) {
                (Some((process, cpu)), Some(map)) => {
                    map.insert(process, cpu);
                }
                _ => servers = None,
            }
        }
        if nodes.is_empty() {
            servers = None;
        }
        CpuSample {
            servers,
            generator: own_cpu_seconds(),
        }
    }

    /// What was used since `before`, over the run `report` describes.
    fn since(&self, before: &CpuSample, report: &PhaseReport) -> CpuReport {
        let ops = report.done.max(1) as f64;
        let secs = report.elapsed.as_secs_f64().max(1e-9);
        let server = match (&self.servers, &before.servers) {
            (Some(after), Some(before)) if after.keys().eq(before.keys()) => Some(
                after
                    .iter()
                    .map(|(process, cpu)| cpu - before.get(process).copied().unwrap_or(*cpu))
                    .sum::<f64>(),
            ),
            _ => None,
        };
        let generator = self.generator.zip(before.generator).map(|(a, b)| a - b);
        CpuReport {
            server_us_per_op: server.map(|s| s * 1e6 / ops),
            server_cores: server.map(|s| s / secs),
            server_processes: self.servers.as_ref().map_or(0, BTreeMap::len),
            generator_us_per_op: generator.map(|g| g * 1e6 / ops),
            generator_cores: generator.map(|g| g / secs),
        }
    }
}

impl CpuReport {
    fn line(&self) -> String {
        let part = |per_op: Option<f64>, cores: Option<f64>| match per_op.zip(cores) {
            Some((per_op, cores)) => format!("{per_op:.1} us/op ({cores:.2} cores)"),
            None => "not measured".to_owned(),
        };
        format!(
            "cpu: server {} over {} process(es), generator {}",
            part(self.server_us_per_op, self.server_cores),
            self.server_processes,
            part(self.generator_us_per_op, self.generator_cores)
        )
    }
}

/// Make the bench bucket `last_write_wins` with the chosen durability, and give gossip a
/// moment to spread it.
/// Create and activate the bench's bucket type for `datatype` (kept when it exists).
async fn make_bench_type(
    config: &BenchConfig,
    client: &Client,
    datatype: BenchDatatype,
) -> Result<()> {
    let name = datatype.bucket_type();
    let kind = match datatype {
        BenchDatatype::Counter => "counter",
        BenchDatatype::Set => "set",
    };
    let props = format!(
        r#"{{"props":{{"datatype":"{kind}","durability":"{}"}}}}"#,
        config.durability
    );
    let path = format!("/admin/bucket-types/{name}");
    let (status, _, body) = client
        .request(hyper::Method::POST, &path, JSON, Bytes::from(props))
        .await?;
    // 409: it exists (an earlier bench made it).
    if !status.is_success() && status.as_u16() != 409 {
        bail!(
            "creating the bench's bucket type: {status} {}",
            String::from_utf8_lossy(&body)
        );
    }
    let activate = format!("{path}/activate");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _, body) = client
            .request(
                hyper::Method::POST,
                &activate,
                JSON,
                Bytes::from_static(b"{}"),
            )
            .await?;
        if status.is_success() {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "activating the bench's bucket type: {status} {}",
                String::from_utf8_lossy(&body)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Activation spreads by gossip.
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(())
}

async fn set_bench_props(config: &BenchConfig, client: &Client) -> Result<()> {
    let props = format!(
        r#"{{"props":{{"allow_mult":false,"last_write_wins":true,"durability":"{}"}}}}"#,
        config.durability
    );
    let path = format!("/buckets/{}/props", config.bucket);
    let (status, _, body) = client
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
    tokio::time::sleep(Duration::from_millis(1500)).await;
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
    /// Latency of the operations answered 503.
    rejected: Histogram<u64>,
    /// Service time of the answered (not 503) reads and updates: from the moment the request
    /// was sent, so an open-loop generator's own backlog (a due operation waiting for a free
    /// task) is left out. The server's share of the latency.
    served: Histogram<u64>,
    done: u64,
    errors: u64,
    unavailable: u64,
    elapsed: Duration,
    throughput: f64,
}

/// Operations due but not yet taken by a task, at most (the schedule waits beyond that; the
/// operations it then hands out late are measured from their due time all the same).
const SCHEDULE_QUEUE: usize = 65_536;

/// The open loop's schedule: a thread hands out each operation with its due time
/// (`started + op / rate`) when it is due. A thread's sleep wakes within tens of µs; the
/// runtime's timer rounds up to the next millisecond, which made every operation look late
/// by about a millisecond at low rates.
fn schedule(
    started: Instant,
    rate: f64,
    total: u64,
    deadline: Option<Instant>,
) -> Result<tokio::sync::mpsc::Receiver<(u64, Instant)>> {
    let (due_ops, receiver) = tokio::sync::mpsc::channel(SCHEDULE_QUEUE);
    std::thread::Builder::new()
        .name("bench-schedule".into())
        .spawn(move || {
            for op in 0..total {
                let due = started + Duration::from_secs_f64(op as f64 / rate);
                if deadline.is_some_and(|d| due >= d) {
                    break;
                }
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                if due_ops.blocking_send((op, due)).is_err() {
                    break;
                }
            }
        })
        .context("starting the schedule's thread")?;
    Ok(receiver)
}

/// Histograms of one task: reads, updates, 503s.
type TaskHistograms = (
    Histogram<u64>,
    Histogram<u64>,
    Histogram<u64>,
    Histogram<u64>,
);

/// The next operation of a task: a read or not, and its key.
fn choose(
    config: &BenchConfig,
    phase: Phase,
    zipfian: &Zipfian,
    rng: &mut StdRng,
    op: u64,
) -> (bool, u64) {
    match phase {
        Phase::Load => (false, op),
        Phase::Run => {
            let key = match config.distribution {
                Distribution::Uniform => rng.random_range(0..config.records),
                Distribution::Zipfian => zipfian.next(rng),
            };
            (rng.random::<f64>() < config.workload.read_fraction(), key)
        }
    }
}

/// One task's histograms.
struct Recorder {
    read: Histogram<u64>,
    update: Histogram<u64>,
    rejected: Histogram<u64>,
    served: Histogram<u64>,
}

impl Recorder {
    /// Count one answered operation, due at `due` and sent at `sent`.
    fn record(
        &mut self,
        outcome: Outcome,
        is_read: bool,
        due: Instant,
        sent: Instant,
        shared: &Shared,
    ) {
        let us = u64::try_from(due.elapsed().as_micros()).unwrap_or(u64::MAX);
        if !matches!(outcome, Outcome::Unavailable) {
            let service = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
            self.served
                .saturating_record(service.clamp(1, MAX_LATENCY_US));
        }
        let h = match outcome {
            Outcome::Unavailable => &mut self.rejected,
            _ if is_read => &mut self.read,
            _ => &mut self.update,
        };
        h.saturating_record(us.clamp(1, MAX_LATENCY_US));
        shared.done.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Outcome::Ok => {}
            Outcome::Unavailable => {
                shared.unavailable.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Failed => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Send a batch of operations pipelined on one connection; each operation's latency is the
/// batch's, from its write to the last response (as redis-benchmark -P counts).
async fn send_pipelined(
    conn: &mut RawConnection,
    bucket: &str,
    value: &Bytes,
    batch: &[(bool, String)],
    hs: &mut Recorder,
    shared: &Shared,
) {
    let paths: Vec<String> = batch
        .iter()
        .map(|(_, key)| format!("/buckets/{bucket}/keys/{key}"))
        .collect();
    let requests: Vec<RawRequest<'_>> = batch
        .iter()
        .zip(&paths)
        .map(|((is_read, _), path)| RawRequest {
            method: if *is_read { "GET" } else { "PUT" },
            path,
            headers: if *is_read { &[] } else { OCTETS },
            body: if *is_read { b"" } else { value },
        })
        .collect();
    let sent = Instant::now();
    let statuses = conn.pipeline(&requests).await.map(<[u16]>::to_vec);
    for (i, (is_read, _)) in batch.iter().enumerate() {
        let status = statuses.as_ref().ok().and_then(|s| s.get(i).copied());
        hs.record(Outcome::of(status), *is_read, sent, sent, shared);
    }
}

async fn phase(
    config: &BenchConfig,
    senders: &[Sender],
    value: &Bytes,
    phase: Phase,
) -> Result<PhaseReport> {
    let total = match phase {
        Phase::Load => config.records,
        Phase::Run => config.ops,
    };
    // The open-loop schedule applies to the run phase; loading goes as fast as it can.
    let rate = if phase == Phase::Run {
        config.rate
    } else {
        0.0
    };
    let deadline = (phase == Phase::Run && config.duration_secs > 0)
        .then(|| Instant::now() + Duration::from_secs(config.duration_secs));
    let shared = Arc::new(Shared {
        done: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        unavailable: AtomicU64::new(0),
        next_op: AtomicU64::new(0),
    });
    let zipfian = Arc::new(Zipfian::new(config.records));
    // Every task's connection is open and its histograms allocated before the clock starts:
    // otherwise the first operation of each task also measures a TCP connect, and the tasks'
    // histograms (4 x 256 KiB each, 200 MiB of page faults for 200 tasks) held the first
    // operations of an open-loop run back by ~50 ms, more than its p99.9.
    let mut task_senders = Vec::with_capacity(config.concurrency);
    for task in 0..config.concurrency {
        let mut sender = TaskSender::of(senders[task % senders.len()].clone());
        if let TaskSender::Raw(conn, _) = &mut sender
            && let Err(e) = conn.connect().await
        {
            eprintln!("  client {task}: {e}");
        }
        if let TaskSender::Pb(conn) = &mut sender
            && let Err(e) = conn.connect().await
        {
            eprintln!("  client {task}: {e}");
        }
        let histograms: TaskHistograms = (histogram()?, histogram()?, histogram()?, histogram()?);
        task_senders.push((sender, histograms));
    }
    let started = Instant::now();
    let schedule = if rate > 0.0 {
        Some(Arc::new(tokio::sync::Mutex::new(schedule(
            started, rate, total, deadline,
        )?)))
    } else {
        None
    };
    let progress = {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let done = shared.done.load(Ordering::Relaxed);
                eprintln!(
                    "  {phase:?}: {done}/{total} ops, {}/s, {} errors, {} unavailable",
                    done - last,
                    shared.errors.load(Ordering::Relaxed),
                    shared.unavailable.load(Ordering::Relaxed)
                );
                last = done;
            }
        })
    };
    let mut tasks = Vec::with_capacity(config.concurrency);
    for (task, (mut sender, histograms)) in task_senders.into_iter().enumerate() {
        let shared = Arc::clone(&shared);
        let zipfian = Arc::clone(&zipfian);
        let (config, value) = (config.clone(), value.clone());
        let schedule = schedule.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng =
                StdRng::seed_from_u64(config.seed ^ (task as u64).wrapping_mul(0x9e37_79b9));
            let (read, update, rejected, served) = histograms;
            let mut hs = Recorder {
                read,
                update,
                rejected,
                served,
            };
            let pipelined =
                config.pipeline > 1 && matches!(sender, TaskSender::Raw(_, Target::Dynakv));
            let mut batch: Vec<(bool, String)> = Vec::with_capacity(config.pipeline);
            loop {
                // Open loop: operation `op` is due at `op / rate` seconds and handed out then
                // by the schedule's thread; its latency counts from then, so time spent
                // waiting for a free task is measured, not hidden.
                let (op, due) = match &schedule {
                    Some(schedule) => match schedule.lock().await.recv().await {
                        Some(next) => next,
                        None => break,
                    },
                    None => (
                        shared.next_op.fetch_add(1, Ordering::Relaxed),
                        Instant::now(),
                    ),
                };
                if op >= total || deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                let (is_read, key) = choose(&config, phase, &zipfian, &mut rng, op);
                if pipelined {
                    batch.push((is_read, key_name(key)));
                    // The batch goes when full or when the ops run out (checked next turn).
                    let last = shared.next_op.load(Ordering::Relaxed) >= total;
                    if batch.len() < config.pipeline && !last {
                        continue;
                    }
                    if let TaskSender::Raw(conn, _) = &mut sender {
                        send_pipelined(conn, &config.bucket, &value, &batch, &mut hs, &shared)
                            .await;
                    }
                    batch.clear();
                    continue;
                }
                let sent = Instant::now();
                let key = key_name(key);
                let operation = Operation {
                    bucket: &config.bucket,
                    key: &key,
                    is_read,
                    datatype: config.datatype,
                    element: rng.random(),
                    index_range: config.index_range,
                };
                let outcome = sender.execute(operation, &value).await;
                hs.record(outcome, is_read, due, sent, &shared);
            }
            if let TaskSender::Raw(conn, _) = &mut sender
                && !batch.is_empty()
            {
                send_pipelined(conn, &config.bucket, &value, &batch, &mut hs, &shared).await;
            }
            anyhow::Ok::<TaskHistograms>((hs.read, hs.update, hs.rejected, hs.served))
        }));
    }
    let mut read = histogram()?;
    let mut update = histogram()?;
    let mut rejected = histogram()?;
    let mut served = histogram()?;
    for task in tasks {
        let (r, u, x, s) = task.await.context("bench task")??;
        read.add(&r).context("merging histograms")?;
        update.add(&u).context("merging histograms")?;
        rejected.add(&x).context("merging histograms")?;
        served.add(&s).context("merging histograms")?;
    }
    progress.abort();
    let elapsed = started.elapsed();
    let done = shared.done.load(Ordering::Relaxed);
    Ok(PhaseReport {
        read,
        update,
        rejected,
        served,
        done,
        errors: shared.errors.load(Ordering::Relaxed),
        unavailable: shared.unavailable.load(Ordering::Relaxed),
        elapsed,
        throughput: done as f64 / elapsed.as_secs_f64().max(1e-9),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The open loop's schedule hands out every operation in order, never before it is due,
    /// with its due time, and nothing due after the deadline.
    #[tokio::test]
    async fn the_schedule_hands_out_each_operation_when_due() {
        let started = Instant::now();
        let mut due_ops = schedule(started, 2_000.0, 100, None).unwrap();
        for expect in 0..100u64 {
            let (op, due) = due_ops.recv().await.unwrap();
            assert_eq!(op, expect);
            assert_eq!(due, started + Duration::from_secs_f64(op as f64 / 2_000.0));
            assert!(Instant::now() >= due, "operation {op} handed out early");
        }
        assert!(due_ops.recv().await.is_none());
        let deadline = Some(started + Duration::from_millis(20));
        let mut due_ops = schedule(started, 1_000.0, 1_000, deadline).unwrap();
        let mut handed = 0;
        while due_ops.recv().await.is_some() {
            handed += 1;
        }
        assert_eq!(
            handed, 20,
            "operations due before the 20 ms deadline at 1,000/s"
        );
    }

    /// The zipfian generator stays in range and favours a few keys.
    #[test]
    fn zipfian_keys_are_in_range_and_skewed() {
        let zipfian = Zipfian::new(1_000);
        let mut rng = StdRng::seed_from_u64(7);
        let mut counts = BTreeMap::new();
        for _ in 0..20_000 {
            let key = zipfian.next(&mut rng);
            assert!(key < 1_000);
            *counts.entry(key).or_insert(0u32) += 1;
        }
        let hottest = counts.values().max().copied().unwrap_or(0);
        assert!(hottest > 1_000, "the hottest key drew {hottest} of 20,000");
    }
}
