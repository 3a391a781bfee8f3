//! The recorded history: one JSON object per line, as Jepsen records it. Every operation is an
//! `invoke` line followed by exactly one completion: `ok` (acknowledged), `fail` (certainly not
//! applied: the write was never sent, or was refused) or `info` (indeterminate: the write was
//! sent but not acknowledged; Dynamo may keep it anyway).

use serde::{Deserialize, Serialize};
use std::io::{BufWriter, Write as _};
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

/// How an event ends an operation, or that it starts one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    Invoke,
    Ok,
    Fail,
    Info,
}

/// One history line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    #[serde(rename = "type")]
    pub kind: EventType,
    /// The client thread.
    pub process: usize,
    /// `add` (set-add) or `write` (register).
    pub f: String,
    pub bucket: String,
    pub key: String,
    /// The element added or the value written.
    pub value: u64,
    /// The node the client talked to (1-based).
    pub node: usize,
    /// Milliseconds since the start of the run.
    pub time: u64,
    /// Completions: how long the operation took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// Register writes: the values the read before the write returned (the write's context
    /// covers them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seen: Vec<u64>,
    /// Set-adds: elements the read found in some but not all of its siblings (present only
    /// because the siblings were kept).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partial: Vec<u64>,
    /// Siblings the read before the write returned.
    #[serde(default)]
    pub siblings: usize,
    /// Why an operation failed or is indeterminate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Collects events in memory and appends them to a JSON-lines file.
#[derive(Debug)]
pub struct Recorder {
    start: Instant,
    inner: Mutex<(Vec<Event>, Option<BufWriter<std::fs::File>>)>,
}

impl Recorder {
    pub fn new(path: &Path, start: Instant) -> anyhow::Result<Recorder> {
        let file = std::fs::File::create(path)?;
        Ok(Recorder {
            start,
            inner: Mutex::new((Vec::new(), Some(BufWriter::new(file)))),
        })
    }

    /// Milliseconds since the start of the run.
    pub fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    pub fn record(&self, event: Event) {
        let mut guard = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let (Some(out), Ok(line)) = (guard.1.as_mut(), serde_json::to_string(&event)) {
            let _ = writeln!(out, "{line}");
        }
        guard.0.push(event);
    }

    /// Flushes the file and returns every event recorded.
    pub fn finish(&self) -> Vec<Event> {
        let mut guard = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(mut out) = guard.1.take() {
            let _ = out.flush();
        }
        guard.0.clone()
    }
}

/// A set value: its elements, comma-separated, sorted.
pub fn encode_set(set: &std::collections::BTreeSet<u64>) -> String {
    set.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

/// Decodes a set value; `None` when it is not one.
pub fn decode_set(text: &str) -> Option<std::collections::BTreeSet<u64>> {
    if text.trim().is_empty() {
        return Some(std::collections::BTreeSet::new());
    }
    text.split(',').map(|e| e.trim().parse().ok()).collect()
}

/// Reads a JSON-lines history file.
pub fn load(path: &Path) -> anyhow::Result<Vec<Event>> {
    let text = std::fs::read_to_string(path)?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| Ok(serde_json::from_str(l)?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_round_trip() {
        let set: std::collections::BTreeSet<u64> = [3, 1, 1_000_007].into_iter().collect();
        assert_eq!(decode_set(&encode_set(&set)), Some(set));
        assert_eq!(decode_set(""), Some(std::collections::BTreeSet::new()));
        assert_eq!(decode_set("1,x"), None);
    }
}
