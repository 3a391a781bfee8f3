//! Shared harness for the multi-process tests: spawn real `dynakv` server processes on free
//! ports with their own data directories, talk to them over plain HTTP/1.1 (a tiny blocking
//! client on `std::net`, so the tests depend on nothing but the wire contract), wait for
//! cluster conditions by polling with deadlines, and kill every process on drop (also when a
//! test panics, in which case the tail of each node's log is printed first).

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::missing_panics_doc
)]

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const BIN: &str = env!("CARGO_BIN_EXE_dynakv");

/// How long a single HTTP request may take before the harness calls it failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
pub const POLL: Duration = Duration::from_millis(200);

// ---------------------------------------------------------------------------------------------
// Serialisation of the tests of one binary (they each run several processes on a 2-core box).

static SERIAL: Mutex<()> = Mutex::new(());

/// Taken at the start of every cluster test, so the tests of the binary run one at a time
/// whatever `--test-threads` says (each runs 3-4 server processes).
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------------
// Ports.

/// `n` distinct free ports (all bound at once, then released).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// A base port `p` such that `p..p+n` are free (and, because `dev` may derive its peer ports
/// from its HTTP ports, `p+1000..p+1000+n` too; `p+2000..p+2000+n` for PB ports).
pub fn consecutive_free_ports(n: u16) -> u16 {
    let mut rng = Rng::seeded(0xdead_beef);
    for _ in 0..200 {
        let base = 20_000 + (rng.next() % 10_000) as u16;
        let mut held = Vec::new();
        let ok = (0..n)
            .flat_map(|i| [base + i, base + 1000 + i, base + 2000 + i])
            .all(|p| match TcpListener::bind(("127.0.0.1", p)) {
                Ok(l) => {
                    held.push(l);
                    true
                }
                Err(_) => false,
            });
        if ok {
            return base;
        }
    }
    panic!("no {n} consecutive free ports found");
}

// ---------------------------------------------------------------------------------------------
// A small non-cryptographic RNG (xorshift), seeded from the clock and a salt.

#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn seeded(salt: u64) -> Rng {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        Rng((nanos ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

// ---------------------------------------------------------------------------------------------
// A minimal blocking HTTP/1.1 client.

#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response is not JSON ({e}): status {} body {:?}",
                self.status,
                self.text()
            )
        })
    }

    /// The context (`X-Riak-Vclock`) of the answer.
    pub fn vclock(&self) -> Option<String> {
        self.header("x-riak-vclock").map(str::to_owned)
    }

    /// One line for failure messages.
    pub fn summary(&self) -> String {
        let mut text = self.text();
        if text.len() > 300 {
            text.truncate(300);
            text.push_str("...");
        }
        format!("{} {:?}", self.status, text.trim_end())
    }

    /// The sibling values of a `multipart/mixed` answer (Riak's framing), in body order.
    pub fn multipart_values(&self) -> Vec<String> {
        let ctype = self
            .header("content-type")
            .unwrap_or_else(|| panic!("no content-type: {}", self.summary()));
        assert!(
            ctype.to_ascii_lowercase().starts_with("multipart/mixed"),
            "not multipart: {ctype}; {}",
            self.summary()
        );
        let boundary = ctype
            .split(';')
            .map(str::trim)
            .find_map(|p| {
                p.strip_prefix("boundary=")
                    .or_else(|| p.strip_prefix("Boundary="))
            })
            .unwrap_or_else(|| panic!("no boundary in {ctype}"))
            .trim_matches('"')
            .to_owned();
        let body = self.text();
        let delimiter = format!("--{boundary}");
        let mut values = Vec::new();
        for part in body.split(delimiter.as_str()).skip(1) {
            if part.starts_with("--") {
                break; // the closing delimiter
            }
            let part = part.strip_prefix("\r\n").unwrap_or(part);
            let Some(split) = part.find("\r\n\r\n") else {
                panic!("multipart part without a header block: {part:?}");
            };
            let value = &part[split + 4..];
            let value = value.strip_suffix("\r\n").unwrap_or(value);
            values.push(value.to_owned());
        }
        values
    }
}

/// One request on a fresh connection (`Connection: close`).
pub fn http(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Resp, String> {
    http_with_timeout(method, url, headers, body, REQUEST_TIMEOUT)
}

pub fn http_with_timeout(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<Resp, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("not an http url: {url}"))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr: SocketAddr = host.parse().map_err(|e| format!("bad host {host}: {e}"))?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("{method} {url}: connect: {e}"))?;
    stream.set_read_timeout(Some(timeout)).ok();
    stream.set_write_timeout(Some(timeout)).ok();
    stream.set_nodelay(true).ok();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    head.push_str("\r\n");
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    stream
        .write_all(&request)
        .map_err(|e| format!("{method} {url}: write: {e}"))?;
    let started = Instant::now();
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) => {
                return Err(format!(
                    "{method} {url}: read after {:?}: {e}",
                    started.elapsed()
                ));
            }
        }
        if started.elapsed() > timeout {
            return Err(format!(
                "{method} {url}: response took longer than {timeout:?}"
            ));
        }
    }
    parse_response(&raw).map_err(|e| format!("{method} {url}: {e}"))
}

fn parse_response(raw: &[u8]) -> Result<Resp, String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no complete response head in {} bytes", raw.len()))?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let rest = &raw[end + 4..];
    let chunked = headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked")
    });
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(len) = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        if rest.len() < len {
            return Err(format!("body truncated: {} of {len} bytes", rest.len()));
        }
        rest[..len].to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Resp {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunked body truncated")?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|e| format!("bad chunk size {size_text:?}: {e}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err("chunk truncated".into());
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

pub fn get(url: &str) -> Result<Resp, String> {
    http("GET", url, &[], b"")
}

/// `GET url` that must answer 200 with JSON.
pub fn get_json(url: &str) -> Result<Value, String> {
    let resp = get(url)?;
    if resp.status != 200 {
        return Err(format!("GET {url}: {}", resp.summary()));
    }
    serde_json::from_slice(&resp.body)
        .map_err(|e| format!("GET {url}: not JSON ({e}): {}", resp.summary()))
}

/// The hints a node holds, over every target (`/admin/handoffs`).
pub fn hints_held(url: &str) -> Result<u64, String> {
    let handoffs = get_json(&format!("{url}/admin/handoffs"))?;
    handoffs["hints"]["held_per_target"]
        .as_array()
        .map(|targets| targets.iter().filter_map(|t| t["keys"].as_u64()).sum())
        .ok_or_else(|| format!("no hints in {handoffs}"))
}

/// `PUT /buckets/B/keys/K?w=W` with a text/plain value and an optional context.
pub fn put_kv(
    base: &str,
    bucket: &str,
    key: &str,
    value: &str,
    w: Option<u32>,
    context: Option<&str>,
) -> Result<Resp, String> {
    let mut url = format!("{base}/buckets/{bucket}/keys/{key}");
    if let Some(w) = w {
        let _ = write!(url, "?w={w}");
    }
    let mut headers = vec![("Content-Type", "text/plain")];
    if let Some(c) = context {
        headers.push(("X-Riak-Vclock", c));
    }
    http("PUT", &url, &headers, value.as_bytes())
}

/// `GET /buckets/B/keys/K?r=R`, asking for multipart siblings.
pub fn get_kv(base: &str, bucket: &str, key: &str, r: Option<u32>) -> Result<Resp, String> {
    let mut url = format!("{base}/buckets/{bucket}/keys/{key}");
    if let Some(r) = r {
        let _ = write!(url, "?r={r}");
    }
    http("GET", &url, &[("Accept", "multipart/mixed, */*")], b"")
}

// ---------------------------------------------------------------------------------------------
// The admin views, parsed.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub zone: String,
    pub status: String,
    pub peer_addr: String,
    pub http_addr: String,
    pub up: bool,
}

pub fn parse_members(v: &Value) -> Result<Vec<Member>, String> {
    let list = v
        .get("members")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("no members array in {v}"))?;
    list.iter()
        .map(|m| {
            let s = |k: &str| m.get(k).and_then(Value::as_str).map(str::to_owned);
            Ok(Member {
                name: s("name").ok_or_else(|| format!("member without name: {m}"))?,
                zone: s("zone").unwrap_or_default(),
                status: s("status").ok_or_else(|| format!("member without status: {m}"))?,
                peer_addr: s("peer_addr").unwrap_or_default(),
                http_addr: s("http_addr").unwrap_or_default(),
                up: m
                    .get("up")
                    .and_then(Value::as_bool)
                    .ok_or_else(|| format!("member without up: {m}"))?,
            })
        })
        .collect()
}

pub fn members(base: &str) -> Result<Vec<Member>, String> {
    parse_members(&get_json(&format!("{base}/admin/members"))?)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingView {
    pub partitions: u64,
    pub version: Option<u64>,
    pub settled: bool,
    /// node -> number of partitions it owns
    pub ownership: BTreeMap<String, u64>,
    pub owners: Value,
}

pub fn ring(base: &str) -> Result<RingView, String> {
    let v = get_json(&format!("{base}/admin/ring"))?;
    let partitions = v
        .get("partitions")
        .and_then(Value::as_u64)
        .ok_or_else(|| format!("ring without partitions: {v}"))?;
    let settled = v
        .get("settled")
        .and_then(Value::as_bool)
        .ok_or_else(|| format!("ring without settled: {v}"))?;
    let mut ownership = BTreeMap::new();
    for o in v
        .get("ownership")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("ring without ownership: {v}"))?
    {
        let node = o
            .get("node")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("ownership entry without node: {o}"))?;
        let n = o
            .get("partitions")
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("ownership entry without partitions: {o}"))?;
        ownership.insert(node.to_owned(), n);
    }
    Ok(RingView {
        partitions,
        version: v.get("version").and_then(Value::as_u64),
        settled,
        ownership,
        owners: v.get("owners").cloned().unwrap_or(Value::Null),
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefEntry {
    pub partition: u64,
    pub node: String,
    pub primary: bool,
}

pub fn preflist(base: &str, bucket: &str, key: &str) -> Result<Vec<PrefEntry>, String> {
    let v = get_json(&format!("{base}/buckets/{bucket}/keys/{key}/preflist"))?;
    v.get("preflist")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("no preflist array: {v}"))?
        .iter()
        .map(|e| {
            Ok(PrefEntry {
                partition: e
                    .get("partition")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| format!("preflist entry without partition: {e}"))?,
                node: e
                    .get("node")
                    .and_then(Value::as_str)
                    .ok_or_else(|| format!("preflist entry without node: {e}"))?
                    .to_owned(),
                primary: e
                    .get("primary")
                    .and_then(Value::as_bool)
                    .ok_or_else(|| format!("preflist entry without primary: {e}"))?,
            })
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReplica {
    pub exists: bool,
    pub deleted: bool,
    pub values: Vec<String>,
}

/// What the node at `base` holds for the key in its own storage (`/admin/replica`).
pub fn replica(base: &str, bucket: &str, key: &str) -> Result<LocalReplica, String> {
    let v = get_json(&format!("{base}/admin/replica/{bucket}/{key}"))?;
    Ok(LocalReplica {
        exists: v
            .get("exists")
            .and_then(Value::as_bool)
            .ok_or_else(|| format!("replica without exists: {v}"))?,
        deleted: v.get("deleted").and_then(Value::as_bool).unwrap_or(false),
        values: v
            .get("values")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default(),
    })
}

/// Runs `dynakv ARGS...`, logging its output (shown when the test fails).
pub fn dynakv(args: &[&str]) -> Output {
    let out = Command::new(BIN).args(args).output().unwrap();
    eprintln!(
        "[harness] dynakv {}: {} stdout {:?} stderr {:?}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

// ---------------------------------------------------------------------------------------------
// Polling.

/// Polls `check` every `POLL` until it returns `Ok`, or panics at the deadline with the last
/// error (`what` says what was awaited).
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let started = Instant::now();
    let deadline = started + timeout;
    let mut last;
    loop {
        match check() {
            Ok(v) => {
                eprintln!("[harness] {what}: after {:.1?}", started.elapsed());
                return v;
            }
            Err(e) => last = e,
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; last observation: {last}"
        );
        std::thread::sleep(POLL);
    }
}

// ---------------------------------------------------------------------------------------------
// Tallies of what a test attempted and what was acknowledged.

/// Counts of attempts and outcomes, printable for diagnosis.
#[derive(Debug, Default)]
pub struct Tally {
    name: String,
    attempted: AtomicU64,
    acked: AtomicU64,
    retries: AtomicU64,
    /// "node status" or "node error" -> count, for everything that was not acknowledged
    failures: Mutex<BTreeMap<String, u64>>,
    /// a few failure messages, verbatim
    samples: Mutex<Vec<String>>,
}

impl Tally {
    pub fn new(name: &str) -> Tally {
        Tally {
            name: name.to_owned(),
            ..Tally::default()
        }
    }

    pub fn attempt(&self) {
        self.attempted.fetch_add(1, Ordering::Relaxed);
    }

    pub fn ack(&self) {
        self.acked.fetch_add(1, Ordering::Relaxed);
    }

    pub fn retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    pub fn fail(&self, node: &str, outcome: &Result<Resp, String>) {
        let (kind, detail) = match outcome {
            Ok(r) => (format!("{node} HTTP {}", r.status), r.summary()),
            Err(e) => (format!("{node} io-error"), e.clone()),
        };
        *self
            .failures
            .lock()
            .unwrap()
            .entry(kind.clone())
            .or_insert(0) += 1;
        let mut samples = self.samples.lock().unwrap();
        if samples.len() < 10 {
            samples.push(format!("{kind}: {detail}"));
        }
    }

    /// Outcomes that were not acknowledged: "node HTTP status" or "node io-error" -> count.
    pub fn failures(&self) -> BTreeMap<String, u64> {
        self.failures.lock().unwrap().clone()
    }

    /// The outcomes that were neither acknowledged nor one of `allowed` statuses.
    pub fn failures_other_than(&self, allowed: &[u16]) -> BTreeMap<String, u64> {
        self.failures()
            .into_iter()
            .filter(|(kind, _)| {
                !allowed
                    .iter()
                    .any(|status| kind.ends_with(&format!("HTTP {status}")))
            })
            .collect()
    }

    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    pub fn attempted(&self) -> u64 {
        self.attempted.load(Ordering::Relaxed)
    }

    pub fn report(&self) -> String {
        let mut s = format!(
            "[{}] attempted {} acknowledged {} retries {}",
            self.name,
            self.attempted(),
            self.acked(),
            self.retries.load(Ordering::Relaxed)
        );
        let failures = self.failures.lock().unwrap();
        if !failures.is_empty() {
            let _ = write!(s, "; not acknowledged: {failures:?}");
        }
        for sample in self.samples.lock().unwrap().iter() {
            let _ = write!(s, "\n    e.g. {sample}");
        }
        s
    }

    pub fn print(&self) {
        eprintln!("{}", self.report());
    }
}

// ---------------------------------------------------------------------------------------------
// Load: writers in the background, and reading their writes back.

/// Background writers: each thread writes unique keys `t{thread}-{i}` (value
/// `value-t{thread}-{i}`) with `w=2` through a random node of `targets`, pausing between
/// writes, and records every acknowledged (204) key.
pub struct Writers {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
    acked: Arc<Mutex<Vec<(String, String)>>>,
    pub tally: Arc<Tally>,
}

impl Writers {
    pub fn start(
        targets: &[(String, String)],
        bucket: &str,
        threads: usize,
        pause: Duration,
    ) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let tally = Arc::new(Tally::new(&format!("writers {bucket}")));
        let handles = (0..threads)
            .map(|t| {
                let stop = Arc::clone(&stop);
                let acked = Arc::clone(&acked);
                let tally = Arc::clone(&tally);
                let targets = targets.to_vec();
                let bucket = bucket.to_owned();
                std::thread::spawn(move || {
                    let mut rng = Rng::seeded(t as u64 + 1);
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let key = format!("t{t}-{i}");
                        let value = format!("value-{key}");
                        i += 1;
                        let (name, url) = &targets[rng.below(targets.len())];
                        tally.attempt();
                        let outcome = put_kv(url, &bucket, &key, &value, Some(2), None);
                        if matches!(outcome, Ok(ref r) if r.status == 204) {
                            tally.ack();
                            acked.lock().unwrap().push((key, value));
                        } else {
                            tally.fail(name, &outcome);
                        }
                        std::thread::sleep(pause);
                    }
                })
            })
            .collect();
        Writers {
            stop,
            handles,
            acked,
            tally,
        }
    }

    pub fn acked_count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Stops the threads; returns every acknowledged write.
    pub fn finish(mut self) -> Vec<(String, String)> {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            h.join().unwrap();
        }
        self.tally.print();
        std::mem::take(&mut *self.acked.lock().unwrap())
    }
}

impl Drop for Writers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// Reads every key with `r` through the nodes of `via` in turn; returns one line per key that
/// did not come back with its value.
pub fn read_back(
    via: &[(String, String)],
    bucket: &str,
    writes: &[(String, String)],
    r: u32,
    tally: &Tally,
) -> Vec<String> {
    let mut failures = Vec::new();
    for (n, (key, value)) in writes.iter().enumerate() {
        let (name, url) = &via[n % via.len()];
        tally.attempt();
        let outcome = get_kv(url, bucket, key, Some(r));
        match &outcome {
            Ok(resp) if resp.status == 200 && resp.text() == *value => tally.ack(),
            _ => {
                tally.fail(name, &outcome);
                failures.push(format!(
                    "{key} via {name}: {}",
                    outcome.map_or_else(|e| e, |r| r.summary())
                ));
            }
        }
    }
    tally.print();
    failures
}

// ---------------------------------------------------------------------------------------------
// Server processes.

#[derive(Debug)]
pub struct NodeProc {
    pub name: String,
    pub http_port: u16,
    pub peer_port: u16,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    /// `--config FILE` for every start, when set.
    pub config: Option<PathBuf>,
    /// `--cluster-secret-file FILE` for a start with `--join`, and for every start of a node
    /// other than n1 while `with_secret`: the founder's secret, as an operator copies it to
    /// a new node.
    pub secret_file: PathBuf,
    pub with_secret: bool,
    /// The `dynakv` executable every start runs: this build's ([`BIN`]) unless a test runs
    /// another (a previous release, for an upgrade).
    pub bin: PathBuf,
    child: Option<Child>,
}

impl NodeProc {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub fn peer_addr(&self) -> String {
        format!("127.0.0.1:{}", self.peer_port)
    }

    /// Starts the process (`--join` when given); does not wait for it.
    pub fn spawn(&mut self, join: Option<&str>) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(&self.bin);
        cmd.args(["server", "--name", &self.name])
            .args(["--http", &format!("127.0.0.1:{}", self.http_port)])
            .args(["--peer", &self.peer_addr()])
            .arg("--data-dir")
            .arg(&self.data_dir);
        if let Some(peer) = join {
            cmd.args(["--join", peer]);
        }
        if join.is_some() || self.with_secret {
            cmd.arg("--cluster-secret-file").arg(&self.secret_file);
        }
        if let Some(config) = &self.config {
            cmd.arg("--config").arg(config);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        eprintln!(
            "[harness] started {} (pid {}) http {} peer {}{}",
            self.name,
            child.id(),
            self.http_port,
            self.peer_port,
            join.map(|j| format!(" --join {j}")).unwrap_or_default()
        );
        self.child = Some(child);
    }

    /// Waits until the node answers `GET /ping` (panics if the process exits first).
    pub fn wait_up(&mut self, timeout: Duration) {
        let url = format!("{}/ping", self.url());
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                panic!(
                    "{} exited with {status} before answering /ping; log:\n{}",
                    self.name,
                    tail(&self.log, 60)
                );
            }
            let answer = http_with_timeout("GET", &url, &[], b"", Duration::from_secs(2));
            if matches!(answer, Ok(ref r) if r.status == 200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not answer /ping within {timeout:?}; log:\n{}",
                self.name,
                tail(&self.log, 60)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM (how an operator stops a node), then waits for a clean exit (panics when the
    /// node does not exit within `timeout`, or exits with a failure).
    pub fn stop(&mut self, timeout: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success(), "kill -TERM {pid} failed");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "{} exited with {status} on SIGTERM; log:\n{}",
                    self.name,
                    tail(&self.log, 40)
                );
                eprintln!("[harness] stopped {} (SIGTERM)", self.name);
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not stop within {timeout:?} of SIGTERM; log:\n{}",
                    self.name,
                    tail(&self.log, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            eprintln!("[harness] killed {} (SIGKILL)", self.name);
        }
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A set of server processes with their own temporary directory.
#[derive(Debug)]
pub struct Cluster {
    pub nodes: Vec<NodeProc>,
    root: tempfile::TempDir,
    /// The `--config` file every node of this cluster starts with, if any.
    config: Option<PathBuf>,
    /// The executable of the nodes it creates (see [`NodeProc::bin`]).
    bin: PathBuf,
}

impl Default for Cluster {
    fn default() -> Self {
        Self::new()
    }
}

impl Cluster {
    pub fn new() -> Cluster {
        Cluster {
            nodes: Vec::new(),
            root: tempfile::tempdir().unwrap(),
            config: None,
            bin: PathBuf::from(BIN),
        }
    }

    /// A cluster whose nodes run the executable `bin` (until a test sets a node's own).
    pub fn with_binary(bin: &Path) -> Cluster {
        let mut cluster = Cluster::new();
        bin.clone_into(&mut cluster.bin);
        cluster
    }

    /// A cluster whose nodes all start with `--config` holding `toml`.
    pub fn with_config(toml: &str) -> Cluster {
        let mut cluster = Cluster::new();
        let path = cluster.root.path().join("config.toml");
        std::fs::write(&path, toml).unwrap();
        cluster.config = Some(path);
        cluster
    }

    /// Forms a cluster of `n` nodes: `n1` founds it, each other node starts with
    /// `--join <n1's peer address>` (one at a time: the next starts once `n1` lists the
    /// previous one as a member), then waits until every node reports the ring settled.
    pub fn start(n: usize) -> Cluster {
        Cluster::start_with(n, Cluster::new())
    }

    /// `start`, on an empty `cluster` (e.g. from `with_config`).
    pub fn start_with(n: usize, mut cluster: Cluster) -> Cluster {
        assert!(cluster.nodes.is_empty());
        cluster.add_node(None);
        for _ in 1..n {
            cluster.add_node(Some(0));
        }
        cluster.wait_settled(&(0..n).collect::<Vec<_>>(), Duration::from_secs(45));
        cluster
    }

    /// Creates, spawns and waits for a new node `n{len+1}`; with `join_via = Some(i)` it
    /// starts with `--join` to node i's peer address and this waits until node i lists it.
    pub fn add_node(&mut self, join_via: Option<usize>) -> usize {
        let index = self.create_node();
        let join = join_via.map(|i| self.nodes[i].peer_addr());
        self.nodes[index].spawn(join.as_deref());
        self.nodes[index].wait_up(Duration::from_secs(20));
        if let Some(i) = join_via {
            let name = self.nodes[index].name.clone();
            let url = self.url(i);
            wait_for(
                &format!("{} to list {name} as a member", self.nodes[i].name),
                Duration::from_secs(20),
                || {
                    let m = members(&url)?;
                    if m.iter().any(|m| m.name == name) {
                        Ok(())
                    } else {
                        Err(format!("{m:?}"))
                    }
                },
            );
        }
        index
    }

    /// Allocates ports and a data directory for a new node without starting it.
    pub fn create_node(&mut self) -> usize {
        let index = self.nodes.len();
        let name = format!("n{}", index + 1);
        let ports = free_ports(2);
        let data_dir = self.root.path().join(&name);
        let log = self.root.path().join(format!("{name}.log"));
        let secret_file = self.root.path().join("n1").join("cluster.secret");
        self.nodes.push(NodeProc {
            secret_file,
            with_secret: index > 0,
            name,
            http_port: ports[0],
            peer_port: ports[1],
            data_dir,
            log,
            config: self.config.clone(),
            bin: self.bin.clone(),
            child: None,
        });
        index
    }

    pub fn url(&self, i: usize) -> String {
        self.nodes[i].url()
    }

    pub fn name(&self, i: usize) -> String {
        self.nodes[i].name.clone()
    }

    pub fn index_of(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node named {name}"))
    }

    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Starts a stopped node again with its data directory and no `--join`.
    pub fn restart(&mut self, i: usize) {
        self.nodes[i].spawn(None);
        self.nodes[i].wait_up(Duration::from_secs(20));
    }

    /// Runs `dynakv admin --url <node i> ARGS...`.
    pub fn admin(&self, i: usize, args: &[&str]) -> Output {
        let url = self.url(i);
        let mut all = vec!["admin", "--url", &url];
        all.extend_from_slice(args);
        dynakv(&all)
    }

    /// Waits until, on every node in `on`: the ring is settled and owned by exactly the
    /// nodes in `on`, every node of `on` is a member with status `valid` and up, no other node
    /// is `joining`/`valid`/`leaving`, and all of them show the same ownership.
    pub fn wait_settled(&self, on: &[usize], timeout: Duration) {
        let expected: BTreeSet<String> = on.iter().map(|&i| self.name(i)).collect();
        let urls: Vec<(String, String)> = on.iter().map(|&i| (self.name(i), self.url(i))).collect();
        wait_for(&format!("ring settled on {expected:?}"), timeout, || {
            settled_check(&urls, &expected)
        });
    }

    /// Panics when any node other than `allowed_dead` has exited on its own.
    pub fn assert_alive(&mut self, allowed_dead: &[usize]) {
        for (i, node) in self.nodes.iter_mut().enumerate() {
            if allowed_dead.contains(&i) {
                continue;
            }
            if let Some(status) = node.exited() {
                panic!(
                    "{} exited unexpectedly with {status}; log:\n{}",
                    node.name,
                    tail(&node.log, 60)
                );
            }
        }
    }
}

/// One observation of the settled condition (see `Cluster::wait_settled`).
pub fn settled_check(urls: &[(String, String)], expected: &BTreeSet<String>) -> Result<(), String> {
    let mut first: Option<(String, RingView)> = None;
    for (name, url) in urls {
        let r = ring(url)?;
        if !r.settled {
            return Err(format!("{name}: ring not settled: {r:?}"));
        }
        let owners: BTreeSet<String> = r.ownership.keys().cloned().collect();
        if &owners != expected {
            return Err(format!(
                "{name}: ring owned by {owners:?}, expected {expected:?}"
            ));
        }
        let total: u64 = r.ownership.values().sum();
        if total != r.partitions {
            return Err(format!(
                "{name}: ownership sums to {total}, not {}: {r:?}",
                r.partitions
            ));
        }
        let m = members(url)?;
        for e in expected {
            match m.iter().find(|m| &m.name == e) {
                Some(m) if m.status == "valid" && m.up => {}
                other => return Err(format!("{name}: member {e} is {other:?}")),
            }
        }
        for other in &m {
            if !expected.contains(&other.name)
                && matches!(other.status.as_str(), "joining" | "valid" | "leaving")
            {
                return Err(format!("{name}: unexpected member {other:?}"));
            }
        }
        match &first {
            None => first = Some((name.clone(), r)),
            Some((first_name, f)) => {
                if f.ownership != r.ownership || f.owners != r.owners {
                    return Err(format!(
                        "{first_name} and {name} disagree: {:?} vs {:?}",
                        f.ownership, r.ownership
                    ));
                }
            }
        }
    }
    Ok(())
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for node in &self.nodes {
                eprintln!(
                    "----- last lines of {} ({}) -----\n{}",
                    node.name,
                    node.log.display(),
                    tail(&node.log, 40)
                );
            }
        }
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Whether a server accepts `toml` as its `--config` file (unknown settings are an error, so
/// this tells whether this build has a setting): starts one throw-away node with it and sees
/// whether it answers `/ping` or exits.
pub fn config_accepted(toml: &str) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("probe.toml");
    std::fs::write(&path, toml).unwrap();
    let ports = free_ports(2);
    let mut child = Command::new(BIN)
        .args(["server", "--name", "probe"])
        .args(["--http", &format!("127.0.0.1:{}", ports[0])])
        .args(["--peer", &format!("127.0.0.1:{}", ports[1])])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--config")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{}/ping", ports[0]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let accepted = loop {
        if let Ok(Some(_)) = child.try_wait() {
            break false;
        }
        let answer = http_with_timeout("GET", &url, &[], b"", Duration::from_secs(2));
        if matches!(answer, Ok(ref r) if r.status == 200) {
            break true;
        }
        assert!(
            Instant::now() < deadline,
            "probe server neither started nor exited"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    eprintln!("[harness] config {toml:?} accepted: {accepted}");
    accepted
}
