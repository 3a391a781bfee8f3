//! The client threads. Each picks a key of its family and a random node for every
//! operation (so clients talk to both sides of every partition) and records the operation in
//! the history.
//!
//! - **set-add**: read the key (multipart siblings), union the sibling sets, add a unique
//!   element, write with the read's `X-Riak-Vclock`.
//! - **register**: read the key, write a unique value with the read's context (the write
//!   replaces exactly what the read returned); one operation in `DELETE_ONE_IN` deletes the
//!   key with the read's context instead (a tombstone; `f` = `delete`), only when the read
//!   returned a context (a 404 of a tombstone carries one).
//! - **retire**: registers too, but each key of the family is used once and then left alone:
//!   write a value (read first), then delete it with the read's context, then the next key.
//!   Those tombstones go idle past the servers' grace period during the run, so the real
//!   binary reaps them under the run's faults, and the register checks (no acknowledged write
//!   lost, nothing deleted or overwritten comes back) cover the reaped keys.

use crate::cluster::http_addr;
use crate::history::{Event, EventType, Recorder, decode_set, encode_set};
use crate::http::{self, HttpError};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Timeout of one client request (the servers answer within a few request timeouts).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(8);

/// One register operation in this many is a delete.
pub const DELETE_ONE_IN: u32 = 7;

/// What a client thread does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    SetAdd,
    Register,
    /// Registers written once, deleted, then idle (see the module documentation).
    Retire,
}

/// One client thread's assignment.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    pub process: usize,
    pub family: Family,
    pub bucket: String,
    pub keys: Vec<String>,
}

/// Outcome of a read: sibling values and context.
struct Read {
    values: Vec<String>,
    vclock: Option<String>,
}

fn read(node: usize, bucket: &str, key: &str) -> Result<Read, String> {
    let path = format!("/buckets/{bucket}/keys/{key}");
    let resp = http::request(
        "GET",
        &http_addr(node),
        &path,
        &[("Accept", "multipart/mixed, */*")],
        b"",
        CLIENT_TIMEOUT,
    )
    .map_err(|e| format!("read: {e}"))?;
    let values = resp.values().map_err(|e| format!("read: {e}"))?;
    Ok(Read {
        values,
        vclock: resp.header("x-riak-vclock").map(str::to_owned),
    })
}

/// Sends the write (or, with `value` `None`, the delete) and classifies its outcome.
fn write(
    node: usize,
    bucket: &str,
    key: &str,
    value: Option<&str>,
    vclock: Option<&str>,
) -> (EventType, Option<String>) {
    let path = format!("/buckets/{bucket}/keys/{key}");
    let mut headers = vec![("Content-Type", "text/plain")];
    if let Some(c) = vclock {
        headers.push(("X-Riak-Vclock", c));
    }
    let method = if value.is_some() { "PUT" } else { "DELETE" };
    match http::request(
        method,
        &http_addr(node),
        &path,
        &headers,
        value.unwrap_or_default().as_bytes(),
        CLIENT_TIMEOUT,
    ) {
        Ok(r) if (200..300).contains(&r.status) => (EventType::Ok, None),
        // A delete of a key with nothing live: nothing to delete, nothing changed.
        Ok(r) if value.is_none() && r.status == 404 => (EventType::Fail, Some(r.summary())),
        // Refused before anything changed (bad input, too many siblings, precondition).
        Ok(r) if (400..500).contains(&r.status) => (EventType::Fail, Some(r.summary())),
        // 503 quorum not met (some replicas may have stored it), 500: indeterminate.
        Ok(r) => (EventType::Info, Some(r.summary())),
        Err(HttpError::Connect(e)) => (EventType::Fail, Some(e)),
        Err(HttpError::Unknown(e)) => (EventType::Info, Some(e)),
    }
}

/// Runs one client until `stop`; returns how many operations it invoked.
pub fn run_client(
    spec: &ClientSpec,
    nodes: usize,
    seed: u64,
    recorder: &Arc<Recorder>,
    stop: &Arc<AtomicBool>,
) -> u64 {
    let mut rng =
        StdRng::seed_from_u64(seed ^ (spec.process as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut counter = 0u64;
    while !stop.load(Ordering::Relaxed) {
        counter += 1;
        let value = (spec.process as u64 + 1) * 1_000_000 + counter;
        let node = rng.random_range(1..=nodes);
        let (key, delete) = match spec.family {
            // Operation 2i writes key i, operation 2i + 1 deletes it; then it stays idle.
            Family::Retire => {
                let index = usize::try_from((counter - 1) / 2).unwrap_or(usize::MAX);
                let Some(key) = spec.keys.get(index) else {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    break;
                };
                (key.clone(), counter.is_multiple_of(2))
            }
            Family::Register => (
                spec.keys[rng.random_range(0..spec.keys.len())].clone(),
                rng.random_range(0..DELETE_ONE_IN) == 0,
            ),
            Family::SetAdd => (
                spec.keys[rng.random_range(0..spec.keys.len())].clone(),
                false,
            ),
        };
        let f = match spec.family {
            Family::SetAdd => "add",
            Family::Register | Family::Retire if delete => "delete",
            Family::Register | Family::Retire => "write",
        };
        let base = Event {
            kind: EventType::Invoke,
            process: spec.process,
            f: f.to_owned(),
            bucket: spec.bucket.clone(),
            key: key.clone(),
            value,
            node,
            time: recorder.now_ms(),
            latency_ms: None,
            seen: Vec::new(),
            partial: Vec::new(),
            siblings: 0,
            error: None,
        };
        recorder.record(base.clone());
        let started = Instant::now();
        let mut done = base;
        match read(node, &spec.bucket, &key) {
            Err(e) => {
                done.kind = EventType::Fail;
                done.error = Some(e);
            }
            Ok(r) => {
                done.siblings = r.values.len();
                let (kind, error) = match spec.family {
                    Family::SetAdd => {
                        let sets: Option<Vec<BTreeSet<u64>>> =
                            r.values.iter().map(|v| decode_set(v)).collect();
                        match sets {
                            None => (
                                EventType::Fail,
                                Some(format!(
                                    "read returned a value that is not a set: {:?}",
                                    r.values
                                )),
                            ),
                            Some(sets) => {
                                let mut union: BTreeSet<u64> =
                                    sets.iter().flatten().copied().collect();
                                if sets.len() > 1 {
                                    done.partial = union
                                        .iter()
                                        .filter(|e| sets.iter().any(|s| !s.contains(e)))
                                        .copied()
                                        .collect();
                                }
                                union.insert(value);
                                write(
                                    node,
                                    &spec.bucket,
                                    &key,
                                    Some(&encode_set(&union)),
                                    r.vclock.as_deref(),
                                )
                            }
                        }
                    }
                    Family::Register | Family::Retire => {
                        done.seen = r
                            .values
                            .iter()
                            .filter_map(|v| v.trim().parse().ok())
                            .collect();
                        let value = value.to_string();
                        if delete && r.vclock.is_none() {
                            // Nothing was read: a delete without a context would remove
                            // whatever the replicas hold by then, which no history can check.
                            (EventType::Fail, Some("nothing read to delete".to_owned()))
                        } else {
                            write(
                                node,
                                &spec.bucket,
                                &key,
                                (!delete).then_some(value.as_str()),
                                r.vclock.as_deref(),
                            )
                        }
                    }
                };
                done.kind = kind;
                done.error = error;
            }
        }
        done.time = recorder.now_ms();
        done.latency_ms = Some(started.elapsed().as_millis() as u64);
        recorder.record(done);
        std::thread::sleep(Duration::from_millis(rng.random_range(5..25)));
    }
    counter
}
