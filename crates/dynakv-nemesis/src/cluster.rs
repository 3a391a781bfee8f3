//! The `dynakv server` processes, one per node namespace, and the admin views the harness
//! waits on. Every process is killed when the [`Cluster`] is dropped.

use crate::http::{self, Resp};
use crate::net;
use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;
use std::collections::BTreeSet;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Timeout of one admin request.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The configuration every node starts with: short timeouts so that faults are detected and
/// repaired within a run, and a short tombstone grace period (5 s) so that a register key
/// left alone for that long has its tombstone reaped within the run.
pub const CONFIG_TOML: &str =
    "request_timeout_ms = 1000\naae_interval_ms = 1000\ntombstone_grace_ms = 5000\n";

/// HTTP address of node `i`.
pub fn http_addr(i: usize) -> String {
    format!("{}:{}", net::node_ip(i), net::HTTP_PORT)
}

/// Peer address of node `i`.
pub fn peer_addr(i: usize) -> String {
    format!("{}:{}", net::node_ip(i), net::PEER_PORT)
}

/// Name of node `i`.
pub fn node_name(i: usize) -> String {
    format!("n{i}")
}

/// An admin GET that must answer 200 with JSON.
pub fn get_json(i: usize, path: &str) -> Result<Value> {
    let resp = http::request("GET", &http_addr(i), path, &[], b"", ADMIN_TIMEOUT)
        .map_err(|e| anyhow!("n{i} GET {path}: {e}"))?;
    if resp.status != 200 {
        bail!("n{i} GET {path}: {}", resp.summary());
    }
    resp.json().map_err(|e| anyhow!("n{i} GET {path}: {e}"))
}

/// Any request to node `i` with the admin timeout.
pub fn call(
    i: usize,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Resp> {
    http::request(method, &http_addr(i), path, headers, body, ADMIN_TIMEOUT)
        .map_err(|e| anyhow!("n{i} {method} {path}: {e}"))
}

/// One member as `/admin/members` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub status: String,
    pub up: bool,
    pub peer_addr: String,
    pub http_addr: String,
}

pub fn members(i: usize) -> Result<Vec<Member>> {
    let v = get_json(i, "/admin/members")?;
    let list = v
        .get("members")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("no members in {v}"))?;
    let text = |m: &Value, field: &str| {
        m.get(field)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    Ok(list
        .iter()
        .map(|m| Member {
            name: text(m, "name"),
            status: text(m, "status"),
            up: m.get("up").and_then(Value::as_bool).unwrap_or(false),
            peer_addr: text(m, "peer_addr"),
            http_addr: text(m, "http_addr"),
        })
        .collect())
}

/// The nodes owning partitions in node `i`'s settled ring (`Err` when not settled).
pub fn settled_owners(i: usize) -> Result<BTreeSet<String>> {
    let v = get_json(i, "/admin/ring")?;
    if v.get("settled").and_then(Value::as_bool) != Some(true) {
        bail!("n{i}: ring not settled");
    }
    Ok(v.get("ownership")
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .filter_map(|o| o.get("node").and_then(Value::as_str).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

/// Polls `check` until it succeeds or `timeout` passes (then the last error).
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!("waiting {timeout:?} for {what}")));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

#[derive(Debug)]
struct Node {
    data_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    paused: bool,
    /// The data directory is a tmpfs of its own (unmounted on drop).
    mounted: bool,
    /// Started with its wall clock this many seconds off (libfaketime), for `clock-skew`.
    clock_skew_s: Option<i64>,
}

/// Size of each node's data filesystem (a tmpfs, so that `disk-full` can fill it).
pub const DATA_FS_SIZE: &str = "1g";
/// The file `disk-full` writes to fill a node's data filesystem.
const FILLER: &str = "nemesis-disk-full";

/// The server processes of one run.
#[derive(Debug)]
pub struct Cluster {
    bin: PathBuf,
    config: PathBuf,
    nodes: Vec<Node>,
}

impl Cluster {
    /// `size` nodes (not started) with data and logs under `dir`.
    pub fn new(bin: &Path, dir: &Path, size: usize) -> Result<Cluster> {
        let config = dir.join("config.toml");
        std::fs::write(&config, CONFIG_TOML).context("writing config")?;
        let mut cluster = Cluster {
            bin: bin.to_path_buf(),
            config,
            nodes: Vec::new(),
        };
        for i in 1..=size {
            let data_dir = dir.join(format!("data-n{i}"));
            std::fs::create_dir_all(&data_dir)
                .with_context(|| format!("creating {}", data_dir.display()))?;
            cluster.nodes.push(Node {
                data_dir: data_dir.clone(),
                log: dir.join(format!("n{i}.log")),
                child: None,
                paused: false,
                mounted: false,
                clock_skew_s: None,
            });
            // Each data directory is its own small filesystem, so one node's disk can fill.
            // The mount lives in this (inner) process's mount namespace (`ip netns exec`
            // gives it one), which the servers' namespaces copy: it is gone once this
            // process and its servers are, even after a SIGKILL.
            run_checked(
                Command::new("mount")
                    .args([
                        "-t",
                        "tmpfs",
                        "-o",
                        &format!("size={DATA_FS_SIZE}"),
                        "tmpfs",
                    ])
                    .arg(&data_dir),
                "mounting a tmpfs data directory",
            )?;
            cluster.nodes[i - 1].mounted = true;
        }
        Ok(cluster)
    }

    /// Fills node `i`'s data filesystem (a file of zeros until the disk reports it full).
    /// Returns the bytes written.
    pub fn fill_disk(&mut self, i: usize) -> Result<u64> {
        use std::io::Write as _;
        let path = self.nodes[i - 1].data_dir.join(FILLER);
        let mut file =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let chunk = vec![0u8; 1 << 20];
        let mut written = 0u64;
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => {
                    // Not recorded as an active fault, so no heal would free it.
                    let _ = std::fs::remove_file(&path);
                    return Err(e).with_context(|| format!("filling {}", path.display()));
                }
            }
        }
        Ok(written)
    }

    /// Frees what `fill_disk` took.
    pub fn free_disk(&mut self, i: usize) -> Result<()> {
        let path = self.nodes[i - 1].data_dir.join(FILLER);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("removing {}", path.display()))
            }
            _ => Ok(()),
        }
    }

    pub fn size(&self) -> usize {
        self.nodes.len()
    }

    fn node(&mut self, i: usize) -> &mut Node {
        &mut self.nodes[i - 1]
    }

    pub fn log_path(&self, i: usize) -> PathBuf {
        self.nodes[i - 1].log.clone()
    }

    /// Starts node `i` in its namespace (`--join` node `join`'s peer address when given).
    pub fn start(&mut self, i: usize, join: Option<usize>) -> Result<()> {
        let bin = self.bin.clone();
        let config = self.config.clone();
        // The operator's step for a joining node: a copy of a member's cluster secret.
        let secret = join.map(|j| self.node(j).data_dir.join("cluster.secret"));
        let node = self.node(i);
        if node.child.is_some() {
            bail!("n{i} is already running");
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .context("opening node log")?;
        let log2 = log.try_clone().context("cloning log handle")?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &net::node_ns(i)]);
        if let Some(skew) = node.clock_skew_s {
            // libfaketime shifts the wall clock only: the monotonic clock (timeouts, failure
            // detection) stays true, as with a node whose NTP is wrong.
            cmd.arg("env")
                .arg(format!("LD_PRELOAD={}", faketime_library()?.display()))
                .arg(format!("FAKETIME={skew:+}s"))
                .arg("FAKETIME_DONT_FAKE_MONOTONIC=1")
                .arg("FAKETIME_DONT_RESET=1");
        }
        cmd.arg(&bin)
            // Nodes serve clients on their namespace's address with security disabled.
            .args(["server", "--insecure", "--name", &node_name(i)])
            .args(["--http", &http_addr(i), "--peer", &peer_addr(i)])
            .arg("--data-dir")
            .arg(&node.data_dir)
            .arg("--config")
            .arg(&config);
        if let (Some(j), Some(secret)) = (join, secret) {
            cmd.args(["--join", &peer_addr(j)])
                .arg("--cluster-secret-file")
                .arg(secret);
        }
        let child = cmd
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log2)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning n{i}"))?;
        node.child = Some(child);
        node.paused = false;
        Ok(())
    }

    /// Waits until node `i` answers `/ping`.
    pub fn wait_up(&mut self, i: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited(i) {
                bail!(
                    "n{i} exited with {status}; log tail:\n{}",
                    tail(&self.log_path(i), 30)
                );
            }
            let ok = http::request(
                "GET",
                &http_addr(i),
                "/ping",
                &[],
                b"",
                Duration::from_secs(2),
            )
            .is_ok_and(|r| r.status == 200);
            if ok {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "n{i} did not answer /ping within {timeout:?}; log tail:\n{}",
                    tail(&self.log_path(i), 30)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Node `i`'s wall clock at its next start: `skew_s` seconds off (`None`: the true time).
    pub fn set_clock_skew(&mut self, i: usize, skew_s: Option<i64>) {
        self.node(i).clock_skew_s = skew_s;
    }

    /// `Some(status)` when node `i`'s process has exited on its own.
    pub fn exited(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        self.node(i)
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i - 1].child.is_some()
    }

    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i - 1].child.as_ref().map(Child::id)
    }

    /// SIGKILL (also of a paused process), then reap.
    pub fn kill(&mut self, i: usize) {
        let node = self.node(i);
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            net::signal(child.id(), "CONT");
            let _ = child.wait();
        }
        node.paused = false;
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, i: usize, grace: Duration) {
        let node = self.node(i);
        if let Some(mut child) = node.child.take() {
            if node.paused {
                net::signal(child.id(), "CONT");
            }
            net::signal(child.id(), "TERM");
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        node.paused = false;
    }

    pub fn pause(&mut self, i: usize) {
        if let Some(pid) = self.pid(i) {
            net::signal(pid, "STOP");
            self.node(i).paused = true;
        }
    }

    pub fn resume(&mut self, i: usize) {
        if let Some(pid) = self.pid(i) {
            net::signal(pid, "CONT");
        }
        self.node(i).paused = false;
    }

    pub fn resume_all(&mut self) {
        for i in 1..=self.size() {
            if self.nodes[i - 1].paused {
                self.resume(i);
            }
        }
    }

    /// Removes everything in node `i`'s data directory (the node must be stopped); the
    /// directory itself is a mount point and stays.
    pub fn wipe(&mut self, i: usize) -> Result<()> {
        let dir = self.nodes[i - 1].data_dir.clone();
        if !dir.exists() {
            return Ok(());
        }
        for entry in std::fs::read_dir(&dir).with_context(|| format!("wiping {}", dir.display()))? {
            let path = entry?.path();
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed.with_context(|| format!("wiping {}", path.display()))?;
        }
        Ok(())
    }

    /// Starts every node: n1 founds the cluster, the others join it one at a time, then waits
    /// until every node shows a settled ring owned by all of them.
    pub fn form(&mut self) -> Result<()> {
        self.start(1, None)?;
        self.wait_up(1, Duration::from_secs(30))?;
        for i in 2..=self.size() {
            self.start(i, Some(1))?;
            self.wait_up(i, Duration::from_secs(30))?;
            let name = node_name(i);
            wait_for(
                &format!("n1 to list {name}"),
                Duration::from_secs(30),
                || {
                    if members(1)?.iter().any(|m| m.name == name) {
                        Ok(())
                    } else {
                        bail!("{name} not a member yet")
                    }
                },
            )?;
        }
        self.wait_settled(
            &(1..=self.size()).collect::<Vec<_>>(),
            Duration::from_secs(90),
        )
    }

    /// Waits until every node of `on` shows a settled ring owned by exactly `on`, with every
    /// one of them valid and up.
    pub fn wait_settled(&self, on: &[usize], timeout: Duration) -> Result<()> {
        let expected: BTreeSet<String> = on.iter().map(|&i| node_name(i)).collect();
        wait_for(&format!("ring settled on {expected:?}"), timeout, || {
            for &i in on {
                let owners = settled_owners(i)?;
                if owners != expected {
                    bail!("n{i}: ring owned by {owners:?}");
                }
                for m in members(i)? {
                    if expected.contains(&m.name) && !(m.status == "valid" && m.up) {
                        bail!("n{i}: member {m:?}");
                    }
                }
            }
            Ok(())
        })
    }

    /// The lines of node logs that mention a panic or an error (for reports).
    pub fn log_alerts(&self, max: usize) -> Vec<String> {
        let mut out = Vec::new();
        for (idx, node) in self.nodes.iter().enumerate() {
            let Ok(file) = std::fs::File::open(&node.log) else {
                continue;
            };
            for line in BufReader::new(file).lines().map_while(Result::ok) {
                if line.contains("panicked") || line.contains(" ERROR ") {
                    out.push(format!("n{}: {line}", idx + 1));
                    if out.len() >= max {
                        return out;
                    }
                }
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 1..=self.size() {
            self.kill(i);
        }
        for node in &mut self.nodes {
            if node.mounted {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(&node.data_dir)
                    .status();
                node.mounted = false;
            }
        }
    }
}

/// Where Debian's `faketime` package puts the multi-threaded libfaketime.
const FAKETIME_LIBRARIES: [&str; 2] = [
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
];

/// The libfaketime the `clock-skew` fault preloads.
fn faketime_library() -> Result<PathBuf> {
    FAKETIME_LIBRARIES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| {
            anyhow!("libfaketime not found (apt-get install faketime): {FAKETIME_LIBRARIES:?}")
        })
}

/// Runs `cmd`, failing with its stderr unless it exits 0.
fn run_checked(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().with_context(|| what.to_owned())?;
    if !out.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
