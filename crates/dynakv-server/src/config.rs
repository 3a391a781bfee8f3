//! Node configuration: command-line flags, optionally overlaid on a TOML file.
//!
//! Every setting has a default and a checked range; a bad value is an error at startup, never
//! a surprise later.

use dynakv_core::limits;
use serde::Deserialize;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use thiserror::Error;

/// Default `overload_latency_target_ms`: the p99 service time a saturated node aims at by
/// lowering its in-flight limit.
pub const DEFAULT_OVERLOAD_LATENCY_TARGET_MS: u64 = 100;

/// Default `group_commit_window_ms` (measured: BENCHMARKS.md, *Group commit window*).
pub const DEFAULT_GROUP_COMMIT_WINDOW_MS: u64 = 2;

/// Which local storage engine a node uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StorageKind {
    /// Ordered maps in memory: fast, lost on exit.
    Memory,
    /// The durable embedded engine (fjall).
    #[default]
    Disk,
}

impl std::str::FromStr for StorageKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "memory" => Ok(StorageKind::Memory),
            "disk" => Ok(StorageKind::Disk),
            other => Err(format!(
                "unknown storage kind {other:?} (expected memory or disk)"
            )),
        }
    }
}

/// Everything a node needs to start.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Node name, unique in the cluster (shown in preference lists and stats).
    pub name: String,
    /// Client HTTP API address.
    pub http_addr: SocketAddr,
    /// Peer transport address (used by the cluster protocol).
    pub peer_addr: SocketAddr,
    /// Riak's Protocol Buffers API address (`None`: not served).
    pub pb_addr: Option<SocketAddr>,
    /// Where the node keeps its data and identity.
    pub data_dir: PathBuf,
    /// A peer of an existing cluster to join.
    pub join: Option<SocketAddr>,
    /// A copy of the cluster's secret (`cluster.secret` of a member), needed to join; copied
    /// into the data directory. Without it a node uses the data directory's own, or founds a
    /// cluster with a new one.
    pub cluster_secret_file: Option<PathBuf>,
    /// The client HTTP port's certificate chain (PEM, the node's certificate first): with
    /// `tls_key_file`, the port speaks only TLS (see [`crate::tls`]).
    pub tls_cert_file: Option<PathBuf>,
    /// The private key of `tls_cert_file` (PEM: PKCS#8, PKCS#1 or SEC1).
    pub tls_key_file: Option<PathBuf>,
    /// CA certificates (PEM) that sign client certificates: with it the TLS port asks clients
    /// for a certificate and verifies any presented (`certificate` security sources); clients
    /// without one still connect. Only with `tls_cert_file` and `tls_key_file`.
    pub tls_client_ca_file: Option<PathBuf>,
    /// Availability zone (data center) of this node; empty when unset.
    pub zone: String,
    pub storage: StorageKind,
    /// Largest value accepted by a put, in bytes.
    pub max_value_bytes: usize,
    /// How often buffered writes are flushed to disk, in ms.
    pub flush_interval_ms: u64,
    /// Block cache of the durable engine, in bytes.
    pub cache_size_bytes: u64,
    /// Write buffer (memtable) of one table of the durable engine before it is flushed to a
    /// sorted file, in bytes (default 64 MiB). Each flush, and each compaction, makes fjall
    /// hold its table's version lock across two fsyncs, stalling every read of the table
    /// (see BENCHMARKS.md): larger buffers flush less often.
    pub memtable_size_bytes: u64,
    /// Background threads of the durable engine (memtable flushes and compactions). Default 1:
    /// with two or more, fjall 3.1's first worker hands compaction requests back to the
    /// queue in a loop while another worker compacts, which burned about half of the workers'
    /// CPU in the 3-node benchmark (see BENCHMARKS.md).
    pub storage_worker_threads: usize,
    /// Ring partitions (Q) used when this node founds a cluster.
    pub ring_partitions: u32,
    /// Name every node of the cluster shares (checked in the peer handshake).
    pub cluster_name: String,
    /// Time limit of one request to a peer replica, in ms.
    pub request_timeout_ms: u64,
    /// A sync of buffered writes starts at least this long after the previous one ended, so
    /// durable writes arriving meanwhile share it (ms; 0: back to back).
    pub group_commit_window_ms: u64,
    /// Time between anti-entropy rounds, in ms.
    pub aae_interval_ms: u64,
    /// Foreground p99 latency above which anti-entropy slows down, in ms.
    pub aae_latency_target_ms: u64,
    /// How long a tombstone is kept after the delete before it may be reaped, in ms.
    pub tombstone_grace_ms: u64,
    /// Most client data requests served at once; more are answered 503 at once.
    pub max_in_flight_requests: usize,
    /// While the in-flight limit is reached and the p99 service time of admitted requests is
    /// above this (ms), the limit shrinks below `max_in_flight_requests` (0: never).
    pub overload_latency_target_ms: u64,
    /// Serve clients on a non-loopback address while the cluster's security is disabled
    /// (without it such a node refuses to start: anyone reaching the port could read, write
    /// and reconfigure everything).
    pub insecure: bool,
    /// `Origin`s whose state-changing requests are served (browsers' cross-site requests from
    /// any other origin are refused with 403); empty by default.
    pub allowed_origins: Vec<String>,
    /// Test hook, not settable from a file: wrap the engine in a [`FaultyStorage`] controlled
    /// by this switch, so tests can make the node's storage fail while it serves (and after
    /// [`crate::supervise`] restarts it, since the restarted node shares the switch).
    ///
    /// [`FaultyStorage`]: dynakv_storage::FaultyStorage
    pub storage_faults: Option<dynakv_storage::FaultSwitch>,
    /// Test hook, not settable from a file: this node's wall clock runs this many ms ahead
    /// of the system's (negative: behind), to test nodes whose clocks disagree.
    pub clock_skew_ms: i64,
}

/// Settings a `--config` TOML file may hold (all optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub pb_addr: Option<SocketAddr>,
    pub insecure: Option<bool>,
    pub allowed_origins: Option<Vec<String>>,
    pub cluster_secret_file: Option<PathBuf>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub tls_client_ca_file: Option<PathBuf>,
    pub max_value_bytes: Option<usize>,
    pub flush_interval_ms: Option<u64>,
    pub group_commit_window_ms: Option<u64>,
    pub cache_size_bytes: Option<u64>,
    pub memtable_size_bytes: Option<u64>,
    pub storage_worker_threads: Option<usize>,
    pub ring_partitions: Option<u32>,
    pub zone: Option<String>,
    pub storage: Option<StorageKind>,
    pub cluster_name: Option<String>,
    pub request_timeout_ms: Option<u64>,
    pub aae_interval_ms: Option<u64>,
    pub aae_latency_target_ms: Option<u64>,
    pub tombstone_grace_ms: Option<u64>,
    pub max_in_flight_requests: Option<usize>,
    pub overload_latency_target_ms: Option<u64>,
}

/// A configuration that cannot be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl ServerConfig {
    /// Defaults for the given addresses and directory.
    pub fn new(
        name: &str,
        http_addr: SocketAddr,
        peer_addr: SocketAddr,
        data_dir: PathBuf,
    ) -> Self {
        ServerConfig {
            name: name.to_owned(),
            http_addr,
            peer_addr,
            pb_addr: None,
            data_dir,
            join: None,
            cluster_secret_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_client_ca_file: None,
            zone: String::new(),
            storage: StorageKind::Disk,
            max_value_bytes: limits::DEFAULT_MAX_VALUE_BYTES,
            flush_interval_ms: 100,
            group_commit_window_ms: DEFAULT_GROUP_COMMIT_WINDOW_MS,
            cache_size_bytes: 64 * 1024 * 1024,
            memtable_size_bytes: 64 * 1024 * 1024,
            storage_worker_threads: 1,
            ring_partitions: limits::DEFAULT_RING_PARTITIONS,
            cluster_name: "dynakv".to_owned(),
            request_timeout_ms: limits::DEFAULT_REQUEST_TIMEOUT_MS,
            aae_interval_ms: 2000,
            aae_latency_target_ms: 50,
            tombstone_grace_ms: 3_600_000,
            max_in_flight_requests: limits::DEFAULT_MAX_IN_FLIGHT_REQUESTS,
            overload_latency_target_ms: DEFAULT_OVERLOAD_LATENCY_TARGET_MS,
            insecure: false,
            allowed_origins: Vec::new(),
            storage_faults: None,
            clock_skew_ms: 0,
        }
    }

    /// Overlay the settings of a TOML file.
    pub fn apply_file(&mut self, path: &std::path::Path) -> Result<(), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let file: FileConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        // File names are relative to the config file's directory, as an operator reads them.
        let relative = |v: PathBuf| match path.parent() {
            Some(dir) if v.is_relative() => dir.join(v),
            _ => v,
        };
        if let Some(v) = file.pb_addr {
            self.pb_addr = Some(v);
        }
        if let Some(v) = file.insecure {
            self.insecure = v;
        }
        if let Some(v) = file.allowed_origins {
            self.allowed_origins = v;
        }
        if let Some(v) = file.cluster_secret_file {
            self.cluster_secret_file = Some(relative(v));
        }
        if let Some(v) = file.tls_cert_file {
            self.tls_cert_file = Some(relative(v));
        }
        if let Some(v) = file.tls_key_file {
            self.tls_key_file = Some(relative(v));
        }
        if let Some(v) = file.tls_client_ca_file {
            self.tls_client_ca_file = Some(relative(v));
        }
        if let Some(v) = file.max_value_bytes {
            self.max_value_bytes = v;
        }
        if let Some(v) = file.flush_interval_ms {
            self.flush_interval_ms = v;
        }
        if let Some(v) = file.group_commit_window_ms {
            self.group_commit_window_ms = v;
        }
        if let Some(v) = file.cache_size_bytes {
            self.cache_size_bytes = v;
        }
        if let Some(v) = file.memtable_size_bytes {
            self.memtable_size_bytes = v;
        }
        if let Some(v) = file.storage_worker_threads {
            self.storage_worker_threads = v;
        }
        if let Some(v) = file.ring_partitions {
            self.ring_partitions = v;
        }
        if let Some(v) = file.zone {
            self.zone = v;
        }
        if let Some(v) = file.storage {
            self.storage = v;
        }
        if let Some(v) = file.cluster_name {
            self.cluster_name = v;
        }
        if let Some(v) = file.max_in_flight_requests {
            self.max_in_flight_requests = v;
        }
        if let Some(v) = file.overload_latency_target_ms {
            self.overload_latency_target_ms = v;
        }
        if let Some(v) = file.request_timeout_ms {
            self.request_timeout_ms = v;
        }
        if let Some(v) = file.aae_interval_ms {
            self.aae_interval_ms = v;
        }
        if let Some(v) = file.aae_latency_target_ms {
            self.aae_latency_target_ms = v;
        }
        if let Some(v) = file.tombstone_grace_ms {
            self.tombstone_grace_ms = v;
        }
        Ok(())
    }

    /// Check every setting against its limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.name.is_empty() || self.name.len() > limits::MAX_ACTOR_BYTES {
            return invalid(format!(
                "node name must be 1 to {} bytes",
                limits::MAX_ACTOR_BYTES
            ));
        }
        if self.max_value_bytes == 0 || self.max_value_bytes > limits::HARD_MAX_VALUE_BYTES {
            return invalid(format!(
                "max_value_bytes must be 1 to {}",
                limits::HARD_MAX_VALUE_BYTES
            ));
        }
        if !(1..=60_000).contains(&self.flush_interval_ms) {
            return invalid("flush_interval_ms must be 1 to 60000".into());
        }
        if self.group_commit_window_ms > 1000 {
            return invalid("group_commit_window_ms must be 0 to 1000".into());
        }
        if !self.ring_partitions.is_power_of_two()
            || self.ring_partitions > limits::MAX_RING_PARTITIONS
        {
            return invalid(format!(
                "ring_partitions must be a power of two up to {}",
                limits::MAX_RING_PARTITIONS
            ));
        }
        if self.cluster_name.is_empty() || self.cluster_name.len() > limits::MAX_ACTOR_BYTES {
            return invalid(format!(
                "cluster_name must be 1 to {} bytes",
                limits::MAX_ACTOR_BYTES
            ));
        }
        if !(1..=limits::HARD_MAX_IN_FLIGHT_REQUESTS).contains(&self.max_in_flight_requests) {
            return invalid(format!(
                "max_in_flight_requests must be 1 to {}",
                limits::HARD_MAX_IN_FLIGHT_REQUESTS
            ));
        }
        if self.overload_latency_target_ms > 60_000 {
            return invalid("overload_latency_target_ms must be 0 (off) to 60000".into());
        }
        if !(10..=600_000).contains(&self.request_timeout_ms) {
            return invalid("request_timeout_ms must be 10 to 600000".into());
        }
        if !(100..=3_600_000).contains(&self.aae_interval_ms) {
            return invalid("aae_interval_ms must be 100 to 3600000".into());
        }
        if !(1..=60_000).contains(&self.aae_latency_target_ms) {
            return invalid("aae_latency_target_ms must be 1 to 60000".into());
        }
        if self.tombstone_grace_ms > 365 * 24 * 3_600_000 {
            return invalid("tombstone_grace_ms must be at most a year".into());
        }
        if self.cache_size_bytes < 1024 * 1024 {
            return invalid("cache_size_bytes must be at least 1 MiB".into());
        }
        if !(1024 * 1024..=1024 * 1024 * 1024).contains(&self.memtable_size_bytes) {
            return invalid("memtable_size_bytes must be 1 MiB to 1 GiB".into());
        }
        if !(1..=16).contains(&self.storage_worker_threads) {
            return invalid("storage_worker_threads must be 1 to 16".into());
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return invalid(crate::tls::TlsError::Incomplete.to_string());
        }
        if self.tls_client_ca_file.is_some() && self.tls_cert_file.is_none() {
            return invalid(crate::tls::TlsError::ClientCaWithoutTls.to_string());
        }
        Ok(())
    }
}

/// A TOML value's text (strings quoted and escaped as TOML wants).
fn toml_text(value: impl Into<toml::Value>) -> String {
    value.into().to_string()
}

impl ServerConfig {
    /// The effective configuration as a `--config` file: every setting a file may hold with
    /// its value, its range and what it does (settings not set are commented out), and the
    /// command-line-only ones as comments. A node started with this file and the same flags
    /// runs with the same settings (`dynakv server ... --print-config`).
    pub fn print_config(&self) -> String {
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| toml_text(p.display().to_string()));
        let number = |n: u64| toml_text(i64::try_from(n).unwrap_or(i64::MAX));
        let size = |n: usize| number(n as u64);
        let settings: Vec<(&str, Option<String>, &str)> = vec![
            (
                "pb_addr",
                self.pb_addr.map(|a| toml_text(a.to_string())),
                "address of Riak's Protocol Buffers API (Riak's port: 8087); not served when unset",
            ),
            (
                "insecure",
                Some(toml_text(self.insecure)),
                "serve clients on a non-loopback address while the cluster's security is disabled",
            ),
            (
                "allowed_origins",
                Some(toml_text(toml::Value::Array(
                    self.allowed_origins
                        .iter()
                        .map(|o| toml::Value::String(o.clone()))
                        .collect(),
                ))),
                "Origins whose state-changing browser requests are served (others get 403)",
            ),
            (
                "cluster_secret_file",
                path(&self.cluster_secret_file),
                "a copy of a member's DATA_DIR/cluster.secret (mode 0600): needed to join a cluster",
            ),
            (
                "tls_cert_file",
                path(&self.tls_cert_file),
                "PEM certificate chain of the client port: with tls_key_file it speaks only HTTPS",
            ),
            (
                "tls_key_file",
                path(&self.tls_key_file),
                "PEM private key of tls_cert_file",
            ),
            (
                "tls_client_ca_file",
                path(&self.tls_client_ca_file),
                "PEM CAs of client certificates (`certificate` security sources)",
            ),
            (
                "max_value_bytes",
                Some(size(self.max_value_bytes)),
                "largest value a put accepts, bytes (1 to 67108864)",
            ),
            (
                "flush_interval_ms",
                Some(number(self.flush_interval_ms)),
                "buffered writes are flushed this often, ms (1 to 60000)",
            ),
            (
                "group_commit_window_ms",
                Some(number(self.group_commit_window_ms)),
                "a sync starts at least this long after the previous one so durable writes share it, ms (0 to 1000)",
            ),
            (
                "cache_size_bytes",
                Some(number(self.cache_size_bytes)),
                "block cache of the disk engine, bytes (at least 1 MiB)",
            ),
            (
                "memtable_size_bytes",
                Some(number(self.memtable_size_bytes)),
                "write buffer of one table of the disk engine, bytes (1 MiB to 1 GiB)",
            ),
            (
                "storage_worker_threads",
                Some(size(self.storage_worker_threads)),
                "flush and compaction threads of the disk engine (1 to 16)",
            ),
            (
                "ring_partitions",
                Some(number(u64::from(self.ring_partitions))),
                "ring partitions (Q) when this node founds a cluster (a power of two)",
            ),
            (
                "zone",
                Some(toml_text(self.zone.clone())),
                "availability zone of this node: replicas are spread over zones",
            ),
            (
                "storage",
                Some(toml_text(match self.storage {
                    StorageKind::Memory => "memory",
                    StorageKind::Disk => "disk",
                })),
                "storage engine: disk (durable) or memory (lost on exit)",
            ),
            (
                "cluster_name",
                Some(toml_text(self.cluster_name.clone())),
                "the name every node of the cluster shares",
            ),
            (
                "request_timeout_ms",
                Some(number(self.request_timeout_ms)),
                "time limit of one request to a peer replica, ms (10 to 600000)",
            ),
            (
                "aae_interval_ms",
                Some(number(self.aae_interval_ms)),
                "time between anti-entropy rounds, ms (100 to 3600000)",
            ),
            (
                "aae_latency_target_ms",
                Some(number(self.aae_latency_target_ms)),
                "foreground p99 above which anti-entropy slows down, ms (1 to 60000)",
            ),
            (
                "tombstone_grace_ms",
                Some(number(self.tombstone_grace_ms)),
                "a tombstone is kept this long after its delete before it may be reaped, ms (up to a year)",
            ),
            (
                "max_in_flight_requests",
                Some(size(self.max_in_flight_requests)),
                "client data requests served at once; more get 503 at once (1 to 65536)",
            ),
            (
                "overload_latency_target_ms",
                Some(number(self.overload_latency_target_ms)),
                "the p99 a saturated node aims at by lowering its in-flight limit, ms (0: off, to 60000)",
            ),
        ];
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# dynakv server configuration (--print-config): the effective settings of node {:?}.",
            self.name
        );
        let _ = writeln!(out, "# Use it as --config FILE. Command-line only:");
        let _ = writeln!(
            out,
            "#   --name {}  --http {}  --peer {}",
            self.name, self.http_addr, self.peer_addr
        );
        let _ = writeln!(out, "#   --data-dir {}", self.data_dir.display());
        if let Some(join) = self.join {
            let _ = writeln!(out, "#   --join {join}");
        }
        for (name, value, doc) in settings {
            out.push('\n');
            let _ = writeln!(out, "# {doc}");
            match value {
                Some(value) => {
                    let _ = writeln!(out, "{name} = {value}");
                }
                None => {
                    let _ = writeln!(out, "# {name} = (not set)");
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ServerConfig {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        ServerConfig::new("n1", addr, addr, PathBuf::from("/nonexistent"))
    }

    /// `--print-config` writes every file setting with its value, and a node reading it back
    /// gets the same settings.
    #[test]
    fn printed_config_reads_back_as_the_same_settings() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config();
        config.pb_addr = Some("127.0.0.1:8087".parse().unwrap());
        config.zone = "eu \"west\"".into();
        config.allowed_origins = vec!["https://app.example".into()];
        config.cluster_secret_file = Some(dir.path().join("cluster.secret"));
        config.tls_cert_file = Some(dir.path().join("cert.pem"));
        config.tls_key_file = Some(dir.path().join("key.pem"));
        config.tls_client_ca_file = Some(dir.path().join("ca.pem"));
        config.storage = StorageKind::Memory;
        config.tombstone_grace_ms = 60_000;
        config.max_in_flight_requests = 7;
        let text = config.print_config();
        let table: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(table.len(), 23, "every file setting is printed:\n{text}");
        let path = dir.path().join("printed.toml");
        std::fs::write(&path, &text).unwrap();
        let mut read = ServerConfig::new(
            &config.name,
            config.http_addr,
            config.peer_addr,
            config.data_dir.clone(),
        );
        read.apply_file(&path).unwrap();
        assert_eq!(format!("{read:?}"), format!("{config:?}"));
        // Unset settings are commented out, and the defaults read back as defaults too.
        let defaults = self::config().print_config();
        assert!(defaults.contains("# pb_addr = (not set)"), "{defaults}");
        std::fs::write(&path, &defaults).unwrap();
        let mut read = self::config();
        read.apply_file(&path).unwrap();
        assert_eq!(format!("{read:?}"), format!("{:?}", self::config()));
    }

    fn with_file(text: &str) -> Result<ServerConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dynakv.toml");
        std::fs::write(&path, text).unwrap();
        let mut config = config();
        config.apply_file(&path)?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn security_settings_come_from_the_file_and_the_secret_is_relative_to_it() {
        let config = with_file(
            "insecure = true\nallowed_origins = [\"https://app.example\"]\ncluster_secret_file = \"cluster.secret\"\n",
        )
        .unwrap();
        assert!(config.insecure);
        assert_eq!(
            config.allowed_origins,
            vec!["https://app.example".to_owned()]
        );
        let secret = config.cluster_secret_file.unwrap();
        assert!(
            secret.is_absolute() || secret.components().count() > 1,
            "{secret:?}"
        );
        assert!(secret.ends_with("cluster.secret"));
        assert!(with_file("insecure = \"yes\"\n").is_err());
    }

    #[test]
    fn storage_worker_threads_defaults_to_one_and_is_bounded() {
        assert_eq!(config().storage_worker_threads, 1);
        assert_eq!(
            with_file("storage_worker_threads = 3\n")
                .unwrap()
                .storage_worker_threads,
            3
        );
        let zero = with_file("storage_worker_threads = 0\n").unwrap_err();
        assert!(
            zero.to_string().contains("storage_worker_threads"),
            "{zero}"
        );
        assert!(with_file("storage_worker_threads = 17\n").is_err());
        assert!(with_file("no_such_setting = 1\n").is_err());
    }

    #[test]
    fn memtable_size_defaults_to_64_mib_and_is_bounded() {
        assert_eq!(config().memtable_size_bytes, 64 * 1024 * 1024);
        let set = with_file("memtable_size_bytes = 2097152\n").unwrap();
        assert_eq!(set.memtable_size_bytes, 2 * 1024 * 1024);
        for bad in ["1024", "2147483648"] {
            let refused = with_file(&format!("memtable_size_bytes = {bad}\n")).unwrap_err();
            assert!(
                refused.to_string().contains("memtable_size_bytes"),
                "{refused}"
            );
        }
    }

    #[test]
    fn tls_files_are_relative_to_the_config_file_and_come_in_pairs() {
        let config =
            with_file("tls_cert_file = \"cert.pem\"\ntls_key_file = \"/etc/key.pem\"\n").unwrap();
        let cert = config.tls_cert_file.unwrap();
        assert!(cert.ends_with("cert.pem") && cert.is_absolute(), "{cert:?}");
        assert_eq!(config.tls_key_file, Some(PathBuf::from("/etc/key.pem")));
        let half = with_file("tls_cert_file = \"cert.pem\"\n").unwrap_err();
        assert!(half.to_string().contains("tls-key"), "{half}");
        let config = with_file(
            "tls_cert_file = \"cert.pem\"\ntls_key_file = \"key.pem\"\ntls_client_ca_file = \"clients.pem\"\n",
        )
        .unwrap();
        let ca = config.tls_client_ca_file.unwrap();
        assert!(ca.ends_with("clients.pem") && ca.is_absolute(), "{ca:?}");
        let alone = with_file("tls_client_ca_file = \"clients.pem\"\n").unwrap_err();
        assert!(alone.to_string().contains("tls-client-ca"), "{alone}");
    }
}
