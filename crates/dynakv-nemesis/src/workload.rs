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
//! - **counter** (a `counter` data type, `f` = `increment`): increment by one, blind.
//! - **dt-set** (a `set` data type): add a unique element, blind (`dt-add`); or, one in
//!   `DT_REMOVE_ONE_IN`, read the set and remove one of its elements with the read's context
//!   (`dt-remove`, the completion's value being the element removed).
//!
//! - **ttl**: blind writes with a time to live (`ttl-write`) and reads (`ttl-read`).
//! - **index** (secondary indexes): write a new key `x{value}` carrying the index entries
//!   `grp_bin: g{process}` and `n_int: {value}` (`ix-write`); or delete one of the client's
//!   acknowledged keys with the context of a read (`ix-delete`); or query the client's group
//!   (`ix-query`, the keys found in `seen`, by value).
//!
//! A data type bucket is named `TYPE/BUCKET` (its paths are under `/types/TYPE/`).

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

/// One set data type operation in this many is a removal.
pub const DT_REMOVE_ONE_IN: u32 = 3;

/// What a client thread does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    SetAdd,
    Register,
    /// Registers written once, deleted, then idle (see the module documentation).
    Retire,
    /// A counter data type, incremented.
    Counter,
    /// A set data type, added to and removed from.
    DtSet,
    /// Values written with a time to live (`X-Dynakv-Ttl`) and read back (issue 21's expiry).
    Ttl,
    /// Keys written with secondary index entries, deleted, and found by index queries.
    Index,
}

/// The `Index` family's group index: each client's writes carry `g{process}`.
pub const INDEX_GROUP: &str = "grp_bin";
/// The `Index` family's integer index: each write carries its value.
pub const INDEX_NUMBER: &str = "n_int";

/// The key of the `Index` family's write of `value`.
pub fn index_key(value: u64) -> String {
    format!("x{value}")
}

/// The value of an `Index` family key (`None`: not one of its keys).
pub fn index_value(key: &str) -> Option<u64> {
    key.strip_prefix('x')?.parse().ok()
}

/// The `Index` family's group of client `process`.
pub fn index_group(process: usize) -> String {
    format!("g{process}")
}

/// The values of the keys an index query of `bucket` for `index` from `start` (to `end`)
/// finds on `node`, as the query answers (all of them: no pagination).
///
/// # Errors
/// The query failed or did not answer keys.
pub fn index_query(
    node: usize,
    bucket: &str,
    (index, start, end): (&str, &str, Option<&str>),
) -> Result<Vec<u64>, String> {
    let path = match end {
        Some(end) => format!("{}/index/{index}/{start}/{end}", bucket_path(bucket)),
        None => format!("{}/index/{index}/{start}", bucket_path(bucket)),
    };
    let resp = http::request("GET", &http_addr(node), &path, &[], b"", CLIENT_TIMEOUT)
        .map_err(|e| format!("query: {e}"))?;
    if resp.status != 200 {
        return Err(format!("query: {}", resp.summary()));
    }
    let body: serde_json::Value =
        serde_json::from_slice(&resp.body).map_err(|e| format!("query: not JSON: {e}"))?;
    let keys = body["keys"]
        .as_array()
        .ok_or_else(|| format!("query: no keys in {body}"))?;
    keys.iter()
        .map(|k| {
            k.as_str()
                .and_then(index_value)
                .ok_or_else(|| format!("query: a key that no client writes: {k}"))
        })
        .collect()
}

/// The time to live of the `Ttl` family's writes, in seconds.
pub const TTL_SECS: u64 = 2;

/// The path of a key of a data type bucket `TYPE/BUCKET`.
pub fn datatype_path(bucket: &str, key: &str) -> String {
    let (bucket_type, bucket) = bucket.split_once('/').unwrap_or(("default", bucket));
    format!("/types/{bucket_type}/buckets/{bucket}/datatypes/{key}")
}

/// The path of a bucket as the key routes name it: `/buckets/B`, or `/types/T/buckets/B` for
/// a bucket `T/B`.
pub fn bucket_path(bucket: &str) -> String {
    match bucket.split_once('/') {
        Some((bucket_type, bucket)) => format!("/types/{bucket_type}/buckets/{bucket}"),
        None => format!("/buckets/{bucket}"),
    }
}

/// The outcome of a request that changes something.
fn outcome(result: Result<http::Resp, HttpError>) -> (EventType, Option<String>) {
    match result {
        Ok(r) if (200..300).contains(&r.status) => (EventType::Ok, None),
        // Refused before anything changed (bad input, a removal of what is gone).
        Ok(r) if (400..500).contains(&r.status) => (EventType::Fail, Some(r.summary())),
        Ok(r) => (EventType::Info, Some(r.summary())),
        Err(HttpError::Connect(e)) => (EventType::Fail, Some(e)),
        Err(HttpError::Unknown(e)) => (EventType::Info, Some(e)),
    }
}

fn datatype_update(
    node: usize,
    bucket: &str,
    key: &str,
    body: &str,
) -> (EventType, Option<String>) {
    outcome(http::request(
        "POST",
        &http_addr(node),
        &datatype_path(bucket, key),
        &[("Content-Type", "application/json")],
        body.as_bytes(),
        CLIENT_TIMEOUT,
    ))
}

/// A set data type's elements and context (`None` context: not found).
fn datatype_read(
    node: usize,
    bucket: &str,
    key: &str,
) -> Result<(Vec<u64>, Option<String>), String> {
    let resp = http::request(
        "GET",
        &http_addr(node),
        &datatype_path(bucket, key),
        &[],
        b"",
        CLIENT_TIMEOUT,
    )
    .map_err(|e| format!("read: {e}"))?;
    match resp.status {
        404 => Ok((Vec::new(), None)),
        200 => {
            let json = resp.json()?;
            let elements = json["value"]
                .as_array()
                .map(|a| a.iter().filter_map(|e| e.as_str()?.parse().ok()).collect())
                .unwrap_or_default();
            Ok((elements, json["context"].as_str().map(str::to_owned)))
        }
        _ => Err(format!("read: {}", resp.summary())),
    }
}

/// One data type operation of a client: its `f`, and the completion (the element removed is
/// written into `done.value`).
fn datatype_op(
    spec: &ClientSpec,
    rng: &mut StdRng,
    node: usize,
    key: &str,
    done: &mut Event,
) -> (EventType, Option<String>) {
    if spec.family == Family::Counter {
        return datatype_update(node, &spec.bucket, key, r#"{"increment":1}"#);
    }
    if done.f == "dt-add" {
        let body = format!("{{\"add\":\"{}\"}}", done.value);
        return datatype_update(node, &spec.bucket, key, &body);
    }
    match datatype_read(node, &spec.bucket, key) {
        Err(e) => (EventType::Fail, Some(e)),
        Ok((elements, _)) if elements.is_empty() => {
            (EventType::Fail, Some("nothing to remove".to_owned()))
        }
        Ok((elements, context)) => {
            let element = elements[rng.random_range(0..elements.len())];
            done.value = element;
            let body = serde_json::json!({
                "remove": element.to_string(),
                "context": context,
            });
            datatype_update(node, &spec.bucket, key, &body.to_string())
        }
    }
}

/// One operation of the `Ttl` family: a blind write of `value` with a time to live of
/// [`TTL_SECS`], or (`read`) a read whose values go into `done.seen`.
fn ttl_op(
    node: usize,
    bucket: &str,
    key: &str,
    value: u64,
    read: bool,
    done: &mut Event,
) -> (EventType, Option<String>) {
    if read {
        return match self::read(node, bucket, key) {
            Ok(r) => {
                done.seen = r
                    .values
                    .iter()
                    .filter_map(|v| v.trim().parse().ok())
                    .collect();
                (EventType::Ok, None)
            }
            Err(e) => (EventType::Fail, Some(e)),
        };
    }
    let path = format!("/buckets/{bucket}/keys/{key}");
    let ttl = TTL_SECS.to_string();
    outcome(http::request(
        "PUT",
        &http_addr(node),
        &path,
        &[("Content-Type", "text/plain"), ("X-Dynakv-Ttl", &ttl)],
        value.to_string().as_bytes(),
        CLIENT_TIMEOUT,
    ))
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
    let path = format!("{}/keys/{key}", bucket_path(bucket));
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

/// The invocation of operation `f` on `key` with `value` through `node`, recorded; returns
/// the event its completion is made from.
fn invocation(
    spec: &ClientSpec,
    (f, key, value): (&str, &str, u64),
    node: usize,
    recorder: &Recorder,
) -> Event {
    let base = Event {
        kind: EventType::Invoke,
        process: spec.process,
        f: f.to_owned(),
        bucket: spec.bucket.clone(),
        key: key.to_owned(),
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
    base
}

/// Records the completion `done` of an operation invoked at `started` with its outcome.
fn complete(
    recorder: &Recorder,
    mut done: Event,
    (kind, error): (EventType, Option<String>),
    started: Instant,
) {
    done.kind = kind;
    done.error = error;
    done.time = recorder.now_ms();
    done.latency_ms = Some(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
    recorder.record(done);
}

/// One operation of the `Index` family (see the module documentation), recorded: two in ten
/// delete one of `acked` (the client's acknowledged keys still there), two in ten query the
/// client's group, the others write a new key with `value`.
fn index_step(
    spec: &ClientSpec,
    rng: &mut StdRng,
    (node, value): (usize, u64),
    acked: &mut Vec<u64>,
    recorder: &Recorder,
) {
    let roll = rng.random_range(0..10);
    let group = index_group(spec.process);
    let (f, key, value) = if roll < 2 && !acked.is_empty() {
        let victim = acked.swap_remove(rng.random_range(0..acked.len()));
        ("ix-delete", index_key(victim), victim)
    } else if roll < 4 {
        ("ix-query", group.clone(), value)
    } else {
        ("ix-write", index_key(value), value)
    };
    let mut done = invocation(spec, (f, &key, value), node, recorder);
    let started = Instant::now();
    let outcome = match f {
        "ix-write" => {
            let number = value.to_string();
            let path = format!("/buckets/{}/keys/{key}", spec.bucket);
            let group_header = format!("X-Riak-Index-{INDEX_GROUP}");
            let number_header = format!("X-Riak-Index-{INDEX_NUMBER}");
            outcome(http::request(
                "PUT",
                &http_addr(node),
                &path,
                &[
                    ("Content-Type", "text/plain"),
                    (group_header.as_str(), group.as_str()),
                    (number_header.as_str(), number.as_str()),
                ],
                number.as_bytes(),
                CLIENT_TIMEOUT,
            ))
        }
        "ix-delete" => match read(node, &spec.bucket, &key) {
            Err(e) => (EventType::Fail, Some(e)),
            Ok(r) if r.values.is_empty() => (
                EventType::Fail,
                Some("the read found nothing to delete".to_owned()),
            ),
            Ok(r) => write(node, &spec.bucket, &key, None, r.vclock.as_deref()),
        },
        _ => match index_query(node, &spec.bucket, (INDEX_GROUP, &group, None)) {
            Ok(values) => {
                done.seen = values;
                (EventType::Ok, None)
            }
            Err(e) => (EventType::Fail, Some(e)),
        },
    };
    if f == "ix-write" && outcome.0 == EventType::Ok {
        acked.push(value);
    }
    complete(recorder, done, outcome, started);
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
    // The `Index` family's acknowledged keys (by value) not yet deleted.
    let mut index_acked = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        counter += 1;
        let value = (spec.process as u64 + 1) * 1_000_000 + counter;
        let node = rng.random_range(1..=nodes);
        if spec.family == Family::Index {
            index_step(spec, &mut rng, (node, value), &mut index_acked, recorder);
            std::thread::sleep(Duration::from_millis(rng.random_range(5..25)));
            continue;
        }
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
            Family::SetAdd | Family::Counter => (
                spec.keys[rng.random_range(0..spec.keys.len())].clone(),
                false,
            ),
            Family::DtSet => (
                spec.keys[rng.random_range(0..spec.keys.len())].clone(),
                rng.random_range(0..DT_REMOVE_ONE_IN) == 0,
            ),
            // Its operations are made by `index_step` (above).
            Family::Index => (String::new(), false),
            // `delete` stands for a read here.
            Family::Ttl => (
                spec.keys[rng.random_range(0..spec.keys.len())].clone(),
                rng.random_bool(0.6),
            ),
        };
        let f = match spec.family {
            Family::SetAdd => "add",
            Family::Counter => "increment",
            Family::DtSet if delete => "dt-remove",
            Family::DtSet => "dt-add",
            Family::Ttl if delete => "ttl-read",
            Family::Ttl => "ttl-write",
            Family::Index => "ix-write",
            Family::Register | Family::Retire if delete => "delete",
            Family::Register | Family::Retire => "write",
        };
        let started = Instant::now();
        let mut done = invocation(spec, (f, &key, value), node, recorder);
        if matches!(spec.family, Family::Ttl | Family::Counter | Family::DtSet) {
            let outcome = if spec.family == Family::Ttl {
                ttl_op(node, &spec.bucket, &key, value, delete, &mut done)
            } else {
                datatype_op(spec, &mut rng, node, &key, &mut done)
            };
            complete(recorder, done, outcome, started);
            std::thread::sleep(Duration::from_millis(rng.random_range(5..25)));
            continue;
        }
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
                    Family::Counter | Family::DtSet | Family::Ttl | Family::Index => (
                        EventType::Fail,
                        Some("not a read-modify-write family".to_owned()),
                    ),
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
