//! Node statistics: operation counters and latency histograms (HDR, microseconds), rendered
//! as Riak-style `/stats` JSON and Prometheus `/metrics` text.
//!
//! Memory is fixed: one histogram per operation kind with a 60 s ceiling (slower operations
//! are clamped into the top bucket).

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Highest latency tracked exactly, in microseconds.
const MAX_TRACKED_LATENCY_US: u64 = 60_000_000;
/// The recent window's latencies (`*_recent` in `/stats`) come from snapshots of the
/// histograms taken this often when `/stats` is read, kept for [`RECENT_WINDOW`].
const SNAPSHOT_EVERY: Duration = Duration::from_secs(60);
const RECENT_WINDOW: Duration = Duration::from_secs(5 * 60);
/// At most this many snapshots are held (each a copy of the three histograms).
const MAX_SNAPSHOTS: usize = 6;

/// Clock ticks per second of `/proc/PID/stat`'s CPU times (`USER_HZ`: 100 on every Linux
/// architecture this builds for; the kernel reports in these units whatever its own HZ).
const USER_HZ: f64 = 100.0;

/// The CPU time (user + system, seconds) in a `/proc/PID/stat` line: fields 14 and 15, read
/// after the command name's closing parenthesis (the name may hold spaces and parentheses).
/// `None` for a line that does not parse.
pub fn cpu_seconds_in_stat(stat: &str) -> Option<f64> {
    let (_, after_name) = stat.rsplit_once(')')?;
    let mut fields = after_name.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user.saturating_add(system) as f64 / USER_HZ)
}

/// The CPU time this process has used, in seconds, its exited threads' included (`None`
/// where `/proc` is not there).
pub fn own_cpu_seconds() -> Option<f64> {
    cpu_seconds_in_stat(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

/// The operations whose latency is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Get,
    Put,
    Delete,
}

impl Op {
    const ALL: [Op; 3] = [Op::Get, Op::Put, Op::Delete];
    fn name(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Put => "put",
            Op::Delete => "delete",
        }
    }
    fn index(self) -> usize {
        self as usize
    }
}

/// One operation's latencies over the recent window: the operation, its count, and its
/// p50, p99 and p99.9 in µs.
pub type RecentLatency = (Op, u64, u64, u64, u64);

#[derive(Debug)]
struct OpStats {
    count: AtomicU64,
    errors: AtomicU64,
    latency_us: Mutex<Histogram<u64>>,
}

/// All counters of one node.
#[derive(Debug)]
pub struct Stats {
    ops: [OpStats; 3],
    /// Every operation since the last `take_recent_p99_us` (admission control's window).
    recent_us: Mutex<Histogram<u64>>,
    pub not_found: AtomicU64,
    pub siblings_returned: AtomicU64,
    pub max_siblings_seen: AtomicU64,
    pub bad_requests: AtomicU64,
    /// Data requests answered 503 because the in-flight limit was reached.
    pub requests_shed: AtomicU64,
    /// Syncs of buffered writes by the flusher (periodic, and for durable writes).
    pub syncs: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Siblings and clock entries per read, per bucket; the keys with most siblings.
    pub causality: crate::causality::Causality,
    /// Copies of the operations' histograms, oldest first (see `SNAPSHOT_EVERY`).
    snapshots: Mutex<std::collections::VecDeque<(std::time::Instant, Vec<Histogram<u64>>)>>,
}

impl Stats {
    /// Fresh counters.
    pub fn new() -> Result<Self, hdrhistogram::CreationError> {
        let op = || -> Result<OpStats, hdrhistogram::CreationError> {
            Ok(OpStats {
                count: AtomicU64::new(0),
                errors: AtomicU64::new(0),
                latency_us: Mutex::new(Histogram::new_with_bounds(1, MAX_TRACKED_LATENCY_US, 3)?),
            })
        };
        Ok(Stats {
            ops: [op()?, op()?, op()?],
            recent_us: Mutex::new(Histogram::new_with_bounds(1, MAX_TRACKED_LATENCY_US, 2)?),
            not_found: AtomicU64::new(0),
            siblings_returned: AtomicU64::new(0),
            max_siblings_seen: AtomicU64::new(0),
            bad_requests: AtomicU64::new(0),
            requests_shed: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            causality: crate::causality::Causality::default(),
            snapshots: Mutex::new(std::collections::VecDeque::new()),
        })
    }

    /// Record one finished operation.
    pub fn record(&self, op: Op, elapsed: Duration, ok: bool) {
        let stats = &self.ops[op.index()];
        stats.count.fetch_add(1, Ordering::Relaxed);
        if !ok {
            stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        let us = u64::try_from(elapsed.as_micros())
            .unwrap_or(u64::MAX)
            .clamp(1, MAX_TRACKED_LATENCY_US);
        stats.latency_us.lock().saturating_record(us);
        self.recent_us.lock().saturating_record(us);
    }

    /// The p99 latency of foreground operations since the last call (0 when there were
    /// none), and start a new window.
    pub fn take_recent_p99_us(&self) -> u64 {
        let mut recent = self.recent_us.lock();
        let p99 = if recent.is_empty() {
            0
        } else {
            recent.value_at_quantile(0.99)
        };
        recent.reset();
        p99
    }

    /// Record how many siblings a read returned.
    pub fn record_siblings(&self, count: usize) {
        self.siblings_returned
            .fetch_add(count as u64, Ordering::Relaxed);
        self.max_siblings_seen
            .fetch_max(count as u64, Ordering::Relaxed);
    }

    /// The operations' latencies over the recent window: the seconds it spans (since the
    /// oldest snapshot within `RECENT_WINDOW`, 0 before the first), and per operation its
    /// count and p50/p99/p99.9 in µs. Takes a snapshot when the last is `SNAPSHOT_EVERY` old.
    pub fn recent(&self) -> (u64, Vec<RecentLatency>) {
        let now = std::time::Instant::now();
        let current: Vec<Histogram<u64>> = Op::ALL
            .iter()
            .map(|op| self.ops[op.index()].latency_us.lock().clone())
            .collect();
        let mut snapshots = self.snapshots.lock();
        if snapshots
            .back()
            .is_none_or(|(at, _)| now.duration_since(*at) >= SNAPSHOT_EVERY)
        {
            snapshots.push_back((now, current.clone()));
        }
        while snapshots.len() > MAX_SNAPSHOTS
            || (snapshots.len() > 1
                && snapshots
                    .front()
                    .is_some_and(|(at, _)| now.duration_since(*at) > RECENT_WINDOW))
        {
            snapshots.pop_front();
        }
        let Some((since, base)) = snapshots.front() else {
            return (0, Vec::new());
        };
        let seconds = now.duration_since(*since).as_secs();
        let out = Op::ALL
            .iter()
            .zip(current)
            .zip(base)
            .map(|((op, mut window), base)| {
                // The base is an earlier copy of the same histogram: it never holds more.
                if window.subtract(base).is_err() {
                    window.reset();
                }
                let q = |q| {
                    if window.is_empty() {
                        0
                    } else {
                        window.value_at_quantile(q)
                    }
                };
                (*op, window.len(), q(0.5), q(0.99), q(0.999))
            })
            .collect();
        (seconds, out)
    }

    fn percentiles(&self, op: Op) -> (u64, u64, u64, u64, u64, f64) {
        let h = self.ops[op.index()].latency_us.lock();
        (
            h.len(),
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            h.max(),
            h.mean(),
        )
    }

    /// Riak-compatible `/stats` JSON (with dynakv's own fields beside Riak's).
    pub fn to_json(&self, node: &str, ring_members: &[String], partitions: u32) -> Value {
        let mut map = serde_json::Map::new();
        map.insert("riak_kv_version".into(), json!(crate::RIAK_COMPAT_VERSION));
        map.insert(
            "riak_core_version".into(),
            json!(crate::RIAK_COMPAT_VERSION),
        );
        map.insert("dynakv_version".into(), json!(env!("CARGO_PKG_VERSION")));
        map.insert("nodename".into(), json!(node));
        map.insert("ring_members".into(), json!(ring_members));
        map.insert("connected_nodes".into(), json!(Vec::<String>::new()));
        map.insert("ring_num_partitions".into(), json!(partitions));
        map.insert("storage_backend".into(), json!("dynakv"));
        // The process and its CPU time, for a load generator's CPU per operation (the nodes
        // of one `dynakv dev` share a process).
        map.insert("process_id".into(), json!(std::process::id()));
        if let Some(cpu) = own_cpu_seconds() {
            map.insert("process_cpu_seconds".into(), json!(cpu));
        }
        for op in Op::ALL {
            let (count, p50, p99, p999, max, mean) = self.percentiles(op);
            let name = op.name();
            let stats = &self.ops[op.index()];
            map.insert(
                format!("node_{name}s_total"),
                json!(stats.count.load(Ordering::Relaxed)),
            );
            map.insert(
                format!("node_{name}_errors_total"),
                json!(stats.errors.load(Ordering::Relaxed)),
            );
            map.insert(
                format!("node_{name}_fsm_time_mean"),
                json!(mean.round() as u64),
            );
            map.insert(format!("node_{name}_fsm_time_median"), json!(p50));
            map.insert(format!("node_{name}_fsm_time_99"), json!(p99));
            map.insert(format!("node_{name}_fsm_time_999"), json!(p999));
            map.insert(format!("node_{name}_fsm_time_100"), json!(max));
            map.insert(format!("{name}_latency_samples"), json!(count));
        }
        map.insert(
            "node_gets".into(),
            json!(self.ops[0].count.load(Ordering::Relaxed)),
        );
        map.insert(
            "node_puts".into(),
            json!(self.ops[1].count.load(Ordering::Relaxed)),
        );
        map.insert(
            "not_found_total".into(),
            json!(self.not_found.load(Ordering::Relaxed)),
        );
        map.insert(
            "siblings_returned_total".into(),
            json!(self.siblings_returned.load(Ordering::Relaxed)),
        );
        map.insert(
            "max_siblings_seen".into(),
            json!(self.max_siblings_seen.load(Ordering::Relaxed)),
        );
        map.insert(
            "bad_requests_total".into(),
            json!(self.bad_requests.load(Ordering::Relaxed)),
        );
        map.insert(
            "requests_shed_total".into(),
            json!(self.requests_shed.load(Ordering::Relaxed)),
        );
        map.insert(
            "syncs_total".into(),
            json!(self.syncs.load(Ordering::Relaxed)),
        );
        map.insert(
            "bytes_written_total".into(),
            json!(self.bytes_written.load(Ordering::Relaxed)),
        );
        map.insert("causality".into(), self.causality.to_json());
        let (seconds, recent) = self.recent();
        map.insert("recent_window_seconds".into(), json!(seconds));
        for (op, count, p50, p99, p999) in recent {
            let name = op.name();
            map.insert(format!("node_{name}s_recent"), json!(count));
            map.insert(format!("node_{name}_fsm_time_median_recent"), json!(p50));
            map.insert(format!("node_{name}_fsm_time_99_recent"), json!(p99));
            map.insert(format!("node_{name}_fsm_time_999_recent"), json!(p999));
        }
        Value::Object(map)
    }

    /// Prometheus text exposition.
    pub fn to_prometheus(&self) -> String {
        let mut out = String::with_capacity(2048);
        if let Some(cpu) = own_cpu_seconds() {
            let _ = writeln!(out, "# TYPE process_cpu_seconds_total counter");
            let _ = writeln!(out, "process_cpu_seconds_total {cpu}");
        }
        let _ = writeln!(out, "# TYPE dynakv_requests_total counter");
        for op in Op::ALL {
            let s = &self.ops[op.index()];
            let _ = writeln!(
                out,
                "dynakv_requests_total{{op=\"{}\"}} {}",
                op.name(),
                s.count.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "# TYPE dynakv_request_errors_total counter");
        for op in Op::ALL {
            let s = &self.ops[op.index()];
            let _ = writeln!(
                out,
                "dynakv_request_errors_total{{op=\"{}\"}} {}",
                op.name(),
                s.errors.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "# TYPE dynakv_request_latency_seconds summary");
        for op in Op::ALL {
            let (count, p50, p99, p999, _, mean) = self.percentiles(op);
            for (q, v) in [("0.5", p50), ("0.99", p99), ("0.999", p999)] {
                let _ = writeln!(
                    out,
                    "dynakv_request_latency_seconds{{op=\"{}\",quantile=\"{q}\"}} {}",
                    op.name(),
                    v as f64 / 1e6
                );
            }
            let _ = writeln!(
                out,
                "dynakv_request_latency_seconds_sum{{op=\"{}\"}} {}",
                op.name(),
                mean * count as f64 / 1e6
            );
            let _ = writeln!(
                out,
                "dynakv_request_latency_seconds_count{{op=\"{}\"}} {count}",
                op.name()
            );
        }
        for (name, kind, value) in [
            ("dynakv_not_found_total", "counter", &self.not_found),
            (
                "dynakv_siblings_returned_total",
                "counter",
                &self.siblings_returned,
            ),
            ("dynakv_max_siblings_seen", "gauge", &self.max_siblings_seen),
            ("dynakv_bad_requests_total", "counter", &self.bad_requests),
            ("dynakv_requests_shed_total", "counter", &self.requests_shed),
            ("dynakv_syncs_total", "counter", &self.syncs),
            ("dynakv_bytes_written_total", "counter", &self.bytes_written),
        ] {
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {}", value.load(Ordering::Relaxed));
        }
        self.causality.to_prometheus(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU fields are read after the name's last parenthesis, whatever the name holds;
    /// a line that is cut short or not numeric reads as nothing.
    #[test]
    fn cpu_time_is_read_from_a_stat_line() {
        let line = "4242 (tokio) (x y) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 75 0 0 20 0 9 0";
        assert_eq!(cpu_seconds_in_stat(line), Some(3.25));
        assert_eq!(cpu_seconds_in_stat("4242 (short) S 1 2"), None);
        assert_eq!(
            cpu_seconds_in_stat("1 (n) S 1 1 1 0 -1 0 0 0 0 0 x 1 0"),
            None
        );
        assert_eq!(cpu_seconds_in_stat("no parenthesis"), None);
        assert!(own_cpu_seconds().is_some_and(|s| s >= 0.0));
    }
}
