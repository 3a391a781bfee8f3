//! Causality observability (issue 22): what reads find, per bucket: how many siblings a
//! key holds and how many entries its clock has, as histograms in `/stats` and `/metrics`;
//! the keys with the most siblings (top-k); and a warning (a log line and a counter) when a
//! read finds a key with more than [`SIBLING_WARNING`] siblings, the sign of writers that
//! never send their context (Riak's sibling explosion).
//!
//! Memory is bounded whatever clients do: at most [`MAX_TRACKED_BUCKETS`] buckets get their
//! own histograms (later ones are counted under [`OTHER_BUCKETS`]), and the top list holds
//! at most [`TOP_KEYS`] keys, each name cut to [`MAX_NAME_CHARS`].

use dynakv_core::bucket_types::{DEFAULT_TYPE, split_bucket};
use parking_lot::{Mutex, RwLock};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// A read finding more siblings than this logs a warning and counts
/// `dynakv_reads_over_sibling_warning_total`.
pub const SIBLING_WARNING: usize = 25;
/// Buckets with histograms of their own; the others share [`OTHER_BUCKETS`].
pub const MAX_TRACKED_BUCKETS: usize = 64;
/// The name the buckets beyond [`MAX_TRACKED_BUCKETS`] are counted under.
pub const OTHER_BUCKETS: &str = "_other";
/// Keys in the top list by siblings.
pub const TOP_KEYS: usize = 20;
/// Longest bucket or key name kept for display (longer ones are cut, marked with `…`).
pub const MAX_NAME_CHARS: usize = 200;
/// Upper bounds of the histograms' buckets (`le`), then `+Inf`.
const BOUNDS: [u64; 9] = [1, 2, 3, 4, 8, 16, 32, 64, 128];

/// A histogram with fixed bounds: counts per bucket (not cumulative), sum and count.
#[derive(Debug, Default)]
struct Histogram {
    counts: [AtomicU64; BOUNDS.len() + 1],
    sum: AtomicU64,
}

impl Histogram {
    fn record(&self, value: u64) {
        let slot = BOUNDS
            .iter()
            .position(|bound| value <= *bound)
            .unwrap_or(BOUNDS.len());
        self.counts[slot].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
    }

    /// `(le, cumulative count)` for each bound and `+Inf`, and the sum.
    fn cumulative(&self) -> (Vec<(String, u64)>, u64) {
        let mut total = 0u64;
        let mut out = Vec::with_capacity(BOUNDS.len() + 1);
        for (i, count) in self.counts.iter().enumerate() {
            total = total.saturating_add(count.load(Ordering::Relaxed));
            let le = BOUNDS
                .get(i)
                .map_or_else(|| "+Inf".to_owned(), u64::to_string);
            out.push((le, total));
        }
        (out, self.sum.load(Ordering::Relaxed))
    }

    fn to_json(&self) -> Value {
        let (buckets, sum) = self.cumulative();
        let count = buckets.last().map_or(0, |(_, c)| *c);
        let le: serde_json::Map<String, Value> =
            buckets.into_iter().map(|(le, c)| (le, json!(c))).collect();
        json!({"le": le, "count": count, "sum": sum})
    }
}

#[derive(Debug, Default)]
struct BucketStats {
    siblings: Histogram,
    clock_entries: Histogram,
}

/// One key of the top list.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TopKey {
    bucket: String,
    key: String,
    siblings: usize,
    clock_entries: usize,
}

/// A node's causality statistics.
#[derive(Debug, Default)]
pub struct Causality {
    buckets: RwLock<BTreeMap<String, Arc<BucketStats>>>,
    other: BucketStats,
    top: Mutex<Vec<TopKey>>,
    /// Keys in `top`: a read of a key with one value skips the list's lock while it is empty
    /// (the common case, on every read).
    top_len: AtomicUsize,
    over_warning: AtomicU64,
}

/// A bucket's name as clients give it (`type/bucket` for a typed bucket), cut for display.
fn display_bucket(internal: &str) -> String {
    let (bucket_type, bucket) = split_bucket(internal);
    if bucket_type == DEFAULT_TYPE {
        cut(bucket)
    } else {
        cut(&format!("{bucket_type}/{bucket}"))
    }
}

fn cut(name: &str) -> String {
    if name.chars().count() <= MAX_NAME_CHARS {
        name.to_owned()
    } else {
        let mut short: String = name.chars().take(MAX_NAME_CHARS).collect();
        short.push('…');
        short
    }
}

impl Causality {
    /// Record what a read of `bucket`/`key` (the internal bucket name) found: its live
    /// siblings and its clock's entries.
    pub fn record_read(&self, bucket: &str, key: &str, siblings: usize, clock_entries: usize) {
        let stats = self.bucket_stats(bucket);
        let stats = stats.as_deref().unwrap_or(&self.other);
        stats.siblings.record(siblings as u64);
        stats.clock_entries.record(clock_entries as u64);
        if siblings > SIBLING_WARNING {
            self.over_warning.fetch_add(1, Ordering::Relaxed);
        }
        if siblings < 2 && self.top_len.load(Ordering::Relaxed) == 0 {
            return;
        }
        self.update_top(bucket, key, siblings, clock_entries);
    }

    /// The bucket's histograms (`None`: the tracked buckets are full, count it as other).
    fn bucket_stats(&self, internal: &str) -> Option<Arc<BucketStats>> {
        if let Some(stats) = self.buckets.read().get(internal) {
            return Some(Arc::clone(stats));
        }
        let mut buckets = self.buckets.write();
        if buckets.len() >= MAX_TRACKED_BUCKETS && !buckets.contains_key(internal) {
            return None;
        }
        Some(Arc::clone(buckets.entry(internal.to_owned()).or_default()))
    }

    /// Keep the top list: a key with siblings enters (replacing the one with fewest when
    /// full), a key read back to one value leaves. A key passing the warning logs once per
    /// crossing.
    fn update_top(&self, bucket: &str, key: &str, siblings: usize, clock_entries: usize) {
        let (display_bucket, display_key) = (display_bucket(bucket), cut(key));
        let mut top = self.top.lock();
        let held = top
            .iter()
            .position(|t| t.bucket == display_bucket && t.key == display_key);
        let before = held.map_or(0, |i| top[i].siblings);
        match held {
            Some(i) if siblings < 2 => {
                top.swap_remove(i);
            }
            Some(i) => {
                top[i].siblings = siblings;
                top[i].clock_entries = clock_entries;
            }
            None if siblings < 2 => {}
            None => {
                let entry = TopKey {
                    bucket: display_bucket.clone(),
                    key: display_key.clone(),
                    siblings,
                    clock_entries,
                };
                if top.len() < TOP_KEYS {
                    top.push(entry);
                } else if let Some((i, fewest)) =
                    top.iter().enumerate().min_by_key(|(_, t)| t.siblings)
                    && fewest.siblings < siblings
                {
                    top[i] = entry;
                }
            }
        }
        self.top_len.store(top.len(), Ordering::Relaxed);
        drop(top);
        if siblings > SIBLING_WARNING && before <= SIBLING_WARNING {
            tracing::warn!(
                bucket = %display_bucket,
                key = %display_key,
                siblings,
                limit = SIBLING_WARNING,
                "a key has more siblings than the warning level: its writers do not send the \
                 context of their reads (resolve it with a write that carries the read's context)"
            );
        }
    }

    /// The top keys, most siblings first.
    fn top_sorted(&self) -> Vec<TopKey> {
        let mut top = self.top.lock().clone();
        top.sort_by(|a, b| {
            b.siblings
                .cmp(&a.siblings)
                .then_with(|| (&a.bucket, &a.key).cmp(&(&b.bucket, &b.key)))
        });
        top
    }

    /// The `/stats` section.
    pub fn to_json(&self) -> Value {
        let mut buckets = serde_json::Map::new();
        for (internal, stats) in self.buckets.read().iter() {
            buckets.insert(
                display_bucket(internal),
                json!({
                    "siblings": stats.siblings.to_json(),
                    "clock_entries": stats.clock_entries.to_json(),
                }),
            );
        }
        buckets.insert(
            OTHER_BUCKETS.into(),
            json!({
                "siblings": self.other.siblings.to_json(),
                "clock_entries": self.other.clock_entries.to_json(),
            }),
        );
        let top: Vec<Value> = self
            .top_sorted()
            .into_iter()
            .map(|t| {
                json!({"bucket": t.bucket, "key": t.key, "siblings": t.siblings,
                       "clock_entries": t.clock_entries})
            })
            .collect();
        json!({
            "sibling_warning": SIBLING_WARNING,
            "reads_over_sibling_warning_total": self.over_warning.load(Ordering::Relaxed),
            "per_bucket": buckets,
            "top_keys_by_siblings": top,
        })
    }

    /// The `/metrics` lines.
    pub fn to_prometheus(&self, out: &mut String) {
        let buckets = self.buckets.read();
        let all = buckets
            .iter()
            .map(|(name, stats)| (display_bucket(name), &**stats))
            .chain(std::iter::once((OTHER_BUCKETS.to_owned(), &self.other)));
        let all: Vec<(String, &BucketStats)> = all.collect();
        for (metric, pick) in [
            (
                "dynakv_read_siblings",
                (|s: &BucketStats| &s.siblings) as fn(&BucketStats) -> &Histogram,
            ),
            ("dynakv_read_clock_entries", |s: &BucketStats| {
                &s.clock_entries
            }),
        ] {
            let _ = writeln!(out, "# TYPE {metric} histogram");
            for (bucket, stats) in &all {
                let bucket = label(bucket);
                let (counts, sum) = pick(stats).cumulative();
                let count = counts.last().map_or(0, |(_, c)| *c);
                for (le, c) in counts {
                    let _ = writeln!(
                        out,
                        "{metric}_bucket{{bucket=\"{bucket}\",le=\"{le}\"}} {c}"
                    );
                }
                let _ = writeln!(out, "{metric}_sum{{bucket=\"{bucket}\"}} {sum}");
                let _ = writeln!(out, "{metric}_count{{bucket=\"{bucket}\"}} {count}");
            }
        }
        let _ = writeln!(
            out,
            "# TYPE dynakv_reads_over_sibling_warning_total counter"
        );
        let _ = writeln!(
            out,
            "dynakv_reads_over_sibling_warning_total {}",
            self.over_warning.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# TYPE dynakv_top_key_siblings gauge");
        for t in self.top_sorted() {
            let _ = writeln!(
                out,
                "dynakv_top_key_siblings{{bucket=\"{}\",key=\"{}\"}} {}",
                label(&t.bucket),
                label(&t.key),
                t.siblings
            );
        }
    }
}

/// A Prometheus label value: backslash, double quote and line feed escaped; other control
/// characters (never in a valid name, but a name is the client's) dropped.
fn label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_count_per_bucket_and_the_top_list_follows_the_keys() {
        let c = Causality::default();
        for (key, siblings) in [("a", 1), ("b", 3), ("c", 30), ("b", 5)] {
            c.record_read("users", key, siblings, siblings + 1);
        }
        let typed = dynakv_core::bucket_types::internal_bucket("carts", "eu");
        c.record_read(&typed, "k", 2, 2);
        let stats = c.to_json();
        let users = &stats["per_bucket"]["users"];
        assert_eq!(users["siblings"]["count"], 4);
        assert_eq!(users["siblings"]["sum"], 39);
        assert_eq!(users["siblings"]["le"]["1"], 1);
        assert_eq!(users["siblings"]["le"]["4"], 2);
        assert_eq!(users["siblings"]["le"]["32"], 4);
        assert_eq!(users["clock_entries"]["le"]["+Inf"], 4);
        assert_eq!(stats["per_bucket"]["carts/eu"]["siblings"]["count"], 1);
        assert_eq!(stats["reads_over_sibling_warning_total"], 1);
        let top = stats["top_keys_by_siblings"].as_array().unwrap().clone();
        let keys: Vec<(&str, u64)> = top
            .iter()
            .map(|t| (t["key"].as_str().unwrap(), t["siblings"].as_u64().unwrap()))
            .collect();
        assert_eq!(keys, [("c", 30), ("b", 5), ("k", 2)]);
        // Resolved: a read that finds one value takes the key off the list.
        c.record_read("users", "c", 1, 31);
        assert_eq!(
            c.to_json()["top_keys_by_siblings"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        let mut text = String::new();
        c.to_prometheus(&mut text);
        assert!(
            text.contains("dynakv_read_siblings_bucket{bucket=\"users\",le=\"4\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("dynakv_read_siblings_count{bucket=\"users\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("dynakv_reads_over_sibling_warning_total 1"),
            "{text}"
        );
        assert!(
            text.contains("dynakv_top_key_siblings{bucket=\"users\",key=\"b\"} 5"),
            "{text}"
        );
    }

    /// The attacker: a client reading from thousands of buckets and keys with hostile names
    /// cannot grow the statistics past their bounds, nor break the metrics' syntax.
    #[test]
    fn memory_is_bounded_and_names_are_escaped() {
        let c = Causality::default();
        for i in 0..1000 {
            c.record_read(&format!("b{i}"), &format!("k{i}"), 2 + i % 7, 3);
        }
        let long = "x".repeat(10_000);
        c.record_read("evil\"\n\\", &long, 99, 1);
        let stats = c.to_json();
        assert_eq!(
            stats["per_bucket"].as_object().unwrap().len(),
            MAX_TRACKED_BUCKETS + 1
        );
        assert!(stats["per_bucket"][OTHER_BUCKETS]["siblings"]["count"].as_u64() > Some(900));
        let top = stats["top_keys_by_siblings"].as_array().unwrap();
        assert_eq!(top.len(), TOP_KEYS);
        assert_eq!(top[0]["siblings"], 99);
        assert_eq!(
            top[0]["key"].as_str().unwrap().chars().count(),
            MAX_NAME_CHARS + 1
        );
        let mut text = String::new();
        c.to_prometheus(&mut text);
        assert!(
            text.contains("bucket=\"evil\\\"\\n\\\\\""),
            "{}",
            &text[..200]
        );
        for line in text.lines() {
            assert!(
                line.starts_with('#') || line.starts_with("dynakv_"),
                "a broken line: {line}"
            );
        }
    }
}
