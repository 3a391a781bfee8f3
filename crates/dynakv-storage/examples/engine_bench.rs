//! Engine micro-benchmark: the numbers behind the durable engine choice (docs/BENCHMARKS.md).
//!
//! For each engine (memory, fjall, and redb when built with `--features redb`) and each
//! durability, it writes 1 KiB values under pseudo-random keys (a seeded xorshift, so every run
//! and every engine sees the same keys), then reads every key back in a shuffled order, and
//! reports throughput, p50/p99 latency and the bytes allocated on disk. Fsync'd writes are slow,
//! so that variant runs `--ops / 50` operations, once from one thread and once more from
//! `--threads` threads at the same time (where group commit pays off).
//!
//! ```text
//! cargo run --release -p dynakv-storage --example engine_bench --features redb -- --ops 200000
//! ```
//!
//! Options: `--ops N` (default 200000), `--fsync-ops N` (default ops/50), `--threads N`
//! (default 4), `--engines memory,fjall,redb`, `--dir DIR` (where the engines' temporary data
//! directories go; default the system temp dir), `--cache-mib N` (engine cache, default 64).

use std::error::Error;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dynakv_storage::{Durability, FjallOptions, FjallStorage, MemoryStorage, Storage, Table};

const VALUE_BYTES: usize = 1024;
const SEED: u64 = 0x9E37_79B9_7F4A_7C15;

type BoxError = Box<dyn Error>;

struct Args {
    ops: usize,
    fsync_ops: usize,
    threads: usize,
    engines: Vec<String>,
    dir: PathBuf,
    cache_bytes: u64,
}

fn parse_args() -> Result<Args, BoxError> {
    let mut ops = 200_000;
    let mut fsync_ops = None;
    let mut threads = 4;
    let mut engines = vec!["memory".to_owned(), "fjall".to_owned()];
    if cfg!(feature = "redb") {
        engines.push("redb".to_owned());
    }
    let mut dir = std::env::temp_dir();
    let mut cache_mib: u64 = 64;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--ops" => ops = value()?.parse()?,
            "--fsync-ops" => fsync_ops = Some(value()?.parse()?),
            "--threads" => threads = value()?.parse()?,
            "--engines" => engines = value()?.split(',').map(str::to_owned).collect(),
            "--dir" => dir = PathBuf::from(value()?),
            "--cache-mib" => cache_mib = value()?.parse()?,
            "--help" | "-h" => {
                println!(
                    "engine_bench [--ops N] [--fsync-ops N] [--threads N] \
                     [--engines memory,fjall,redb] [--dir DIR] [--cache-mib N]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    if ops == 0 || threads == 0 {
        return Err("--ops and --threads must be positive".into());
    }
    Ok(Args {
        ops,
        fsync_ops: fsync_ops.unwrap_or((ops / 50).max(threads)),
        threads,
        engines,
        dir,
        cache_bytes: cache_mib * 1024 * 1024,
    })
}

/// xorshift64: a full-period generator, so its first 2^64 - 1 outputs are distinct keys.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn fill(&mut self, buffer: &mut [u8]) {
        for chunk in buffer.chunks_mut(8) {
            let bytes = self.next().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

fn make_keys(count: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut rng = XorShift(seed);
    (0..count)
        .map(|_| format!("bench/{:016x}", rng.next()).into_bytes())
        .collect()
}

fn shuffled(keys: &[Vec<u8>], seed: u64) -> Vec<&[u8]> {
    let mut order: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
    let mut rng = XorShift(seed);
    for i in (1..order.len()).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// Throughput and latency of one phase.
struct Phase {
    ops: usize,
    elapsed: Duration,
    latencies_ns: Vec<u64>,
}

impl Phase {
    fn from_samples(elapsed: Duration, mut latencies_ns: Vec<u64>) -> Self {
        latencies_ns.sort_unstable();
        Self {
            ops: latencies_ns.len(),
            elapsed,
            latencies_ns,
        }
    }

    fn per_second(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    /// The latency below which `per_mille`/1000 of the operations finished, in µs (nearest
    /// rank on the sorted samples).
    fn percentile_us(&self, per_mille: usize) -> f64 {
        if self.latencies_ns.is_empty() {
            return 0.0;
        }
        let index = (self.latencies_ns.len() * per_mille / 1000).min(self.latencies_ns.len() - 1);
        self.latencies_ns[index] as f64 / 1000.0
    }
}

/// Puts every key from `threads` threads (the keys split evenly between them).
fn run_puts(
    engine: &dyn Storage,
    keys: &[Vec<u8>],
    durability: Durability,
    threads: usize,
) -> Result<Phase, BoxError> {
    let chunk = keys.len().div_ceil(threads);
    let started = Instant::now();
    let results: Vec<Result<Vec<u64>, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = keys
            .chunks(chunk)
            .enumerate()
            .map(|(thread, keys)| {
                scope.spawn(move || {
                    let mut rng = XorShift(SEED ^ (thread as u64 + 1).wrapping_mul(0x2545_F491));
                    let mut value = vec![0u8; VALUE_BYTES];
                    let mut latencies = Vec::with_capacity(keys.len());
                    for key in keys {
                        rng.fill(&mut value);
                        let start = Instant::now();
                        engine
                            .put(Table::Objects, key, &value, durability)
                            .map_err(|error| error.to_string())?;
                        latencies.push(start.elapsed().as_nanos() as u64);
                    }
                    Ok(latencies)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| {
                handle
                    .join()
                    .unwrap_or_else(|_| Err("writer thread panicked".to_owned()))
            })
            .collect()
    });
    let elapsed = started.elapsed();
    let mut latencies = Vec::with_capacity(keys.len());
    for result in results {
        latencies.extend(result?);
    }
    Ok(Phase::from_samples(elapsed, latencies))
}

/// Gets every key once, in a shuffled order, from one thread; every key must be found.
fn run_gets(engine: &dyn Storage, keys: &[Vec<u8>]) -> Result<Phase, BoxError> {
    let order = shuffled(keys, SEED.rotate_left(17));
    let mut latencies = Vec::with_capacity(order.len());
    let started = Instant::now();
    for key in order {
        let start = Instant::now();
        let value = engine.get(Table::Objects, key)?;
        latencies.push(start.elapsed().as_nanos() as u64);
        if value.map(|value| value.len()) != Some(VALUE_BYTES) {
            return Err(format!("key {} missing after put", String::from_utf8_lossy(key)).into());
        }
    }
    Ok(Phase::from_samples(started.elapsed(), latencies))
}

/// Bytes allocated on disk under `path` (what `du` reports; journals may be preallocated
/// sparse files, so the apparent length would overstate them).
fn disk_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        let metadata = entry.metadata()?;
        if metadata.is_dir() {
            total += disk_bytes(&entry.path())?;
        } else {
            total += metadata.blocks() * 512;
        }
    }
    Ok(total)
}

fn open_engine(name: &str, dir: &Path, cache_bytes: u64) -> Result<Box<dyn Storage>, BoxError> {
    match name {
        "memory" => Ok(Box::new(MemoryStorage::new())),
        "fjall" => {
            let options = FjallOptions {
                cache_size_bytes: cache_bytes,
                ..FjallOptions::default()
            };
            Ok(Box::new(FjallStorage::open(dir, options)?))
        }
        #[cfg(feature = "redb")]
        "redb" => {
            let options = dynakv_storage::RedbOptions {
                cache_size_bytes: usize::try_from(cache_bytes)?,
            };
            Ok(Box::new(dynakv_storage::RedbStorage::open(dir, options)?))
        }
        other => Err(format!("unknown engine {other} (redb needs `--features redb`)").into()),
    }
}

fn format_rate(rate: f64) -> String {
    if rate >= 10_000.0 {
        format!("{:.0}k", rate / 1000.0)
    } else if rate >= 1_000.0 {
        format!("{:.1}k", rate / 1000.0)
    } else {
        format!("{rate:.0}")
    }
}

fn format_bytes(bytes: Option<u64>) -> String {
    match bytes {
        None => "-".to_owned(),
        Some(bytes) if bytes >= 1024 * 1024 => {
            format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
        }
        Some(bytes) => format!("{:.0} KiB", bytes as f64 / 1024.0),
    }
}

struct Row {
    engine: String,
    durability: &'static str,
    threads: usize,
    puts: Phase,
    gets: Option<Phase>,
    disk: Option<u64>,
}

impl Row {
    fn markdown(&self) -> String {
        let mut line = format!(
            "| {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} |",
            self.engine,
            self.durability,
            self.threads,
            self.puts.ops,
            format_rate(self.puts.per_second()),
            self.puts.percentile_us(500),
            self.puts.percentile_us(990),
            self.puts.percentile_us(999),
        );
        match &self.gets {
            Some(gets) => {
                let _ = write!(
                    line,
                    " {} | {:.1} | {:.1} |",
                    format_rate(gets.per_second()),
                    gets.percentile_us(500),
                    gets.percentile_us(990)
                );
            }
            None => line.push_str(" - | - | - |"),
        }
        let _ = write!(line, " {} |", format_bytes(self.disk));
        line
    }
}

fn bench_engine(name: &str, args: &Args) -> Result<Vec<Row>, BoxError> {
    let mut rows = Vec::new();
    let variants = [
        (Durability::Buffered, "buffered", args.ops),
        (Durability::Fsync, "fsync", args.fsync_ops),
    ];
    for (durability, label, ops) in variants {
        let dir = tempfile::Builder::new()
            .prefix(&format!("engine_bench_{name}_{label}_"))
            .tempdir_in(&args.dir)?;
        let engine = open_engine(name, dir.path(), args.cache_bytes)?;
        let on_disk = name != "memory";

        let keys = make_keys(ops, SEED);
        let puts = run_puts(engine.as_ref(), &keys, durability, 1)?;
        let sync_started = Instant::now();
        engine.sync()?;
        let sync_time = sync_started.elapsed();
        let gets = run_gets(engine.as_ref(), &keys)?;
        let disk = if on_disk {
            Some(disk_bytes(dir.path())?)
        } else {
            None
        };
        eprintln!(
            "{name} {label}: {ops} puts in {:.2?} (sync after: {sync_time:.2?}), gets in {:.2?}",
            puts.elapsed, gets.elapsed
        );
        rows.push(Row {
            engine: name.to_owned(),
            durability: label,
            threads: 1,
            puts,
            gets: Some(gets),
            disk,
        });

        if durability == Durability::Fsync && args.threads > 1 {
            // Fresh keys, same engine: concurrent fsync'd writers.
            let keys = make_keys(ops, SEED.rotate_left(29));
            let puts = run_puts(engine.as_ref(), &keys, durability, args.threads)?;
            eprintln!(
                "{name} {label}: {ops} puts from {} threads in {:.2?}",
                args.threads, puts.elapsed
            );
            rows.push(Row {
                engine: name.to_owned(),
                durability: label,
                threads: args.threads,
                puts,
                gets: None,
                disk: None,
            });
        }
        drop(engine);
    }
    Ok(rows)
}

/// The floor under every durable engine: append 1 KiB to a plain file and `sync_all` it, from
/// one thread. Reported as a row of its own, so engine fsync rates can be read against it.
fn raw_fsync_baseline(args: &Args) -> Result<Row, BoxError> {
    use std::io::Write as _;
    let dir = tempfile::Builder::new()
        .prefix("engine_bench_raw_")
        .tempdir_in(&args.dir)?;
    let path = dir.path().join("append.log");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    let mut rng = XorShift(SEED);
    let mut value = vec![0u8; VALUE_BYTES];
    let mut latencies = Vec::with_capacity(args.fsync_ops);
    let started = Instant::now();
    for _ in 0..args.fsync_ops {
        rng.fill(&mut value);
        let start = Instant::now();
        file.write_all(&value)?;
        file.sync_all()?;
        latencies.push(start.elapsed().as_nanos() as u64);
    }
    let puts = Phase::from_samples(started.elapsed(), latencies);
    let disk = Some(disk_bytes(dir.path())?);
    Ok(Row {
        engine: "raw file (append + fsync)".to_owned(),
        durability: "fsync",
        threads: 1,
        puts,
        gets: None,
        disk,
    })
}

fn main() -> Result<(), BoxError> {
    let args = parse_args()?;
    eprintln!(
        "engine_bench: {} buffered ops, {} fsync ops, {} threads, {} B values, cache {} MiB, dir {}",
        args.ops,
        args.fsync_ops,
        args.threads,
        VALUE_BYTES,
        args.cache_bytes / (1024 * 1024),
        args.dir.display()
    );
    let mut rows = vec![raw_fsync_baseline(&args)?];
    for engine in &args.engines {
        rows.extend(bench_engine(engine, &args)?);
    }
    println!(
        "| engine | durability | threads | ops | puts/s | put p50 µs | put p99 µs | put p99.9 µs \
         | gets/s | get p50 µs | get p99 µs | disk |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for row in &rows {
        println!("{}", row.markdown());
    }
    Ok(())
}
