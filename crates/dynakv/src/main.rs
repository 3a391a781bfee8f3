//! The `dynakv` command: run a node (`server`), a local cluster (`dev`), and talk to one
//! (`get`, `put`, `delete`, `admin`).

mod backup;
mod bench;
mod pbclient;
mod pbs_probe;
mod progress;
mod rawhttp;
mod staging;
mod tables;

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use dynakv_client::{Client, PutOptions};
use dynakv_server::config::{ServerConfig, StorageKind};
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;

/// mimalloc instead of glibc's allocator: glibc's `malloc`/`free`/`malloc_consolidate` took
/// about a tenth of a 3-node cluster's CPU under load (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DEFAULT_URL: &str = "http://127.0.0.1:8098";

/// How the client commands (get, put, delete, admin, bench) reach a node: the CA to trust for
/// `https://` URLs, a client certificate, and HTTP Basic credentials.
#[derive(Debug, Clone, Args)]
struct ClientOptions {
    /// PEM file of the CA certificate(s) that signed the node's certificate (for https://
    /// URLs; no system roots are trusted).
    #[arg(long, global = true, value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    /// PEM client certificate (chain) to present to a node that verifies client certificates
    /// (for a `certificate` security source; the certificate names --user). With --client-key.
    #[arg(long, global = true, value_name = "FILE", requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// PEM private key of --client-cert (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, global = true, value_name = "FILE", requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// User name for HTTP Basic authentication (with --password or DYNAKV_PASSWORD; with
    /// --client-cert no password is needed).
    #[arg(long, global = true, value_name = "NAME")]
    user: Option<String>,
    /// Password of --user (prefer the DYNAKV_PASSWORD environment variable: a command line
    /// is visible to other users of the host).
    #[arg(long, global = true, env = "DYNAKV_PASSWORD", hide_env_values = true)]
    password: Option<String>,
}

/// What every client a command makes shares (read once from [`ClientOptions`]).
#[derive(Debug, Clone, Default)]
pub struct ClientSettings {
    ca_pem: Option<Vec<u8>>,
    /// The client certificate and its key (PEM).
    client_cert: Option<(Vec<u8>, Vec<u8>)>,
    basic_auth: Option<(String, String)>,
}

impl ClientSettings {
    fn from_options(options: &ClientOptions) -> Result<Self> {
        let ca_pem = match &options.ca_cert {
            Some(path) => Some(
                std::fs::read(path)
                    .with_context(|| format!("reading the CA certificate {}", path.display()))?,
            ),
            None => None,
        };
        let client_cert = match (&options.client_cert, &options.client_key) {
            (Some(cert), Some(key)) => Some((
                std::fs::read(cert).with_context(|| {
                    format!("reading the client certificate {}", cert.display())
                })?,
                std::fs::read(key)
                    .with_context(|| format!("reading the client key {}", key.display()))?,
            )),
            (None, None) => None,
            _ => bail!("give both --client-cert and --client-key, or neither"),
        };
        let basic_auth = match (&options.user, &options.password) {
            (Some(user), Some(password)) => Some((user.clone(), password.clone())),
            // A certificate source ignores the password: the certificate authenticates.
            (Some(user), None) if client_cert.is_some() => Some((user.clone(), String::new())),
            (Some(_), None) => bail!("--user needs a password: --password or DYNAKV_PASSWORD"),
            // A password in the environment without --user is not an error (the variable
            // may be set for other commands); one given as --password alone is unused.
            (None, _) => None,
        };
        Ok(ClientSettings {
            ca_pem,
            client_cert,
            basic_auth,
        })
    }

    /// A client of the node at `url` with these settings.
    /// The HTTP Basic credentials, if any.
    pub fn basic_auth(&self) -> Option<(&str, &str)> {
        self.basic_auth
            .as_ref()
            .map(|(user, password)| (user.as_str(), password.as_str()))
    }

    /// The URL of a member's client port `addr` (`HOST:PORT`, as `/admin/members` lists
    /// it), with the scheme of `url`, the node the command was pointed at.
    pub fn member_url(url: &str, addr: &str) -> String {
        let scheme = if url.starts_with("https://") {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{addr}")
    }

    pub fn client(&self, url: &str) -> Result<Client> {
        let mut client = Client::new(url)?;
        if let Some(pem) = &self.ca_pem {
            client = client
                .with_ca_cert(pem)
                .context("the --ca-cert file cannot be used")?;
        } else if url.starts_with("https://") {
            bail!(
                "an https:// URL needs --ca-cert FILE (the CA that signed the node's certificate)"
            );
        }
        if let Some((cert, key)) = &self.client_cert {
            client = client
                .with_client_cert(cert, key)
                .context("the --client-cert and --client-key files cannot be used")?;
        }
        if let Some((user, password)) = &self.basic_auth {
            client = client.with_basic_auth(user, password);
        }
        Ok(client)
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "dynakv",
    version,
    about = "A Dynamo-style, always-writable, replicated key-value store"
)]
struct Cli {
    /// Log lines as plain text (`text`) or one JSON object per line (`json`), on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// The log format asked for on the command line (set once, before logging starts).
static LOG_FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one node.
    Server {
        /// Node name, unique in the cluster.
        #[arg(long)]
        name: String,
        /// Address of the client HTTP API.
        #[arg(long, default_value = "127.0.0.1:8098")]
        http: SocketAddr,
        /// Address of the peer transport.
        #[arg(long, default_value = "127.0.0.1:9098")]
        peer: SocketAddr,
        /// Address of Riak's Protocol Buffers API (Riak's port is 8087, e.g.
        /// 127.0.0.1:8087); not served unless given here or as pb_addr in --config.
        #[arg(long, value_name = "ADDR")]
        pb: Option<SocketAddr>,
        /// Directory for the node's data.
        #[arg(long)]
        data_dir: PathBuf,
        /// Peer address of a node of an existing cluster to join.
        #[arg(long)]
        join: Option<SocketAddr>,
        /// The cluster's secret, needed to join: a copy of DATA_DIR/cluster.secret of a member
        /// (keep it mode 0600). A founding node makes one in its data directory.
        #[arg(long)]
        cluster_secret_file: Option<PathBuf>,
        /// Serve clients on a non-loopback address although the cluster's security is
        /// disabled (otherwise such a node refuses to start).
        #[arg(long)]
        insecure: bool,
        /// Availability zone of this node.
        #[arg(long)]
        zone: Option<String>,
        /// TOML file with further settings (see docs/architecture.md).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Storage engine.
        #[arg(long)]
        storage: Option<StorageKind>,
        /// PEM certificate chain of the client HTTP port (the node's certificate first): with
        /// --tls-key, the port speaks only HTTPS.
        #[arg(long, value_name = "FILE", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1).
        #[arg(long, value_name = "FILE", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// PEM CA certificate(s) that sign client certificates: the HTTPS port asks clients
        /// for one and verifies any presented (`certificate` security sources); clients
        /// without one still connect. Needs --tls-cert and --tls-key (or the config file's).
        #[arg(long, value_name = "FILE")]
        tls_client_ca: Option<PathBuf>,
        /// Print the effective settings (flags and --config) as a documented config file,
        /// and exit without starting.
        #[arg(long)]
        print_config: bool,
    },
    /// Run a local cluster in this process; node i serves HTTP on P+i-1, peers on P+1000+i-1
    /// and Riak's PB API on --pb-port + i-1.
    Dev {
        #[arg(long, default_value_t = 3)]
        nodes: u16,
        #[arg(long, default_value_t = 8098)]
        http_port: u16,
        /// First node's PB port (0: no PB API).
        #[arg(long, default_value_t = 8087)]
        pb_port: u16,
        #[arg(long, default_value = "dynakv-data")]
        data_dir: PathBuf,
        #[arg(long, default_value = "disk")]
        storage: StorageKind,
        /// `per-node`: one single-threaded runtime per node, each on its own thread (measured
        /// faster on 2 cores: docs/BENCHMARKS.md); `shared`: one runtime for every node, a
        /// worker per core (as `dynakv server` runs).
        #[arg(long, value_enum, default_value = "per-node")]
        runtime: DevRuntime,
    },
    /// Fetch a key: prints the value (or every sibling) and its context.
    Get {
        bucket: String,
        key: String,
        #[arg(long, default_value = DEFAULT_URL)]
        url: String,
        #[command(flatten)]
        client: ClientOptions,
    },
    /// Store a value (from the argument, or stdin when omitted).
    Put {
        bucket: String,
        key: String,
        value: Option<String>,
        #[arg(long, default_value = DEFAULT_URL)]
        url: String,
        /// Context from the read this write is based on.
        #[arg(long)]
        context: Option<String>,
        #[arg(long, default_value = "application/octet-stream")]
        content_type: String,
        #[command(flatten)]
        client: ClientOptions,
    },
    /// Delete a key.
    Delete {
        bucket: String,
        key: String,
        #[arg(long, default_value = DEFAULT_URL)]
        url: String,
        #[arg(long)]
        context: Option<String>,
        #[command(flatten)]
        client: ClientOptions,
    },
    /// YCSB-style benchmark against running nodes (see docs/BENCHMARKS.md).
    Bench {
        /// Node URLs (repeat for several); requests are spread over them.
        #[arg(long = "url", default_value = DEFAULT_URL)]
        urls: Vec<String>,
        /// a: 50/50 read/update, b: 95/5, c: read-only, w: update-only.
        #[arg(long, default_value = "a")]
        workload: bench::Workload,
        #[arg(long, default_value = "zipfian")]
        distribution: bench::Distribution,
        #[arg(long, default_value_t = 100_000)]
        records: u64,
        #[arg(long, default_value_t = 100_000)]
        ops: u64,
        #[arg(long, default_value_t = 50)]
        concurrency: usize,
        #[arg(long, default_value_t = 1024)]
        value_size: usize,
        #[arg(long, default_value = "bench")]
        bucket: String,
        /// Skip the load phase (the records are already there).
        #[arg(long)]
        skip_load: bool,
        /// Print one JSON object at the end.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// The bench bucket's durability: fsync or buffered.
        #[arg(long, default_value = "fsync")]
        durability: String,
        /// Send each request to a replica of its key (the client keeps the ring), instead of
        /// to the next --url in turn.
        #[arg(long)]
        client_routing: bool,
        /// Offer this many operations per second in all (open loop: latency is measured from
        /// when each operation was due, so queueing is counted); 0 = as fast as possible.
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        /// What the --url's are: dynakv nodes, or etcd members (its v3 JSON gateway), for a
        /// reference measured with the same client.
        #[arg(long, default_value = "dynakv")]
        target: bench::Target,
        /// Stop the run phase after this many seconds even if --ops are not done (0 = no limit).
        #[arg(long, default_value_t = 0)]
        duration_secs: u64,
        /// The generator's HTTP client: raw (one pre-built keep-alive connection per client,
        /// plain http:// only) or hyper (the full pooled client, as https:// always uses).
        #[arg(long, default_value = "raw")]
        generator: bench::Generator,
        /// HTTP/1.1 pipelining: each client writes this many requests at once and then reads
        /// their responses (closed loop, raw generator, dynakv target; 1 = no pipelining).
        #[arg(long, default_value_t = 1)]
        pipeline: usize,
        /// The client API the operations use: http, or pb (Riak's Protocol Buffers, to the
        /// --pb addresses; --url still serves the bucket setup and the CPU readings).
        #[arg(long, default_value = "http")]
        protocol: bench::Protocol,
        /// A node's PB address (repeat per node), for --protocol pb.
        #[arg(long = "pb", value_name = "ADDR")]
        pb_addrs: Vec<std::net::SocketAddr>,
        /// Operate on a data type instead of plain values: counter (updates increment) or
        /// set (updates add a new element); reads fetch it. Makes the bucket type
        /// bench_counter or bench_set; no load phase.
        #[arg(long)]
        datatype: Option<bench::BenchDatatype>,
        /// Secondary indexes: writes carry the entry n_int = the key's number, and reads
        /// are range queries of this many terms (max_results the same).
        #[arg(long, value_name = "TERMS")]
        index_range: Option<u64>,
        #[command(flatten)]
        client: ClientOptions,
    },
    /// Data types (counters, sets, maps, hlls, gsets) of a bucket type with a datatype, as
    /// Riak's: `dt get counters b k`, `dt update counters b k '{"increment":1}'`.
    Dt {
        #[arg(long, default_value = DEFAULT_URL, global = true)]
        url: String,
        #[command(flatten)]
        client: ClientOptions,
        #[command(subcommand)]
        command: DtCommand,
    },
    /// Inspect a node.
    Admin {
        #[arg(long, default_value = DEFAULT_URL, global = true)]
        url: String,
        /// Print the node's JSON answer instead of a table (for scripts).
        #[arg(long, global = true)]
        json: bool,
        #[command(flatten)]
        client: ClientOptions,
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Node status (a table; `--json` for the node's JSON).
    Status,
    /// Cluster members: status, up, zone, partitions now and after a transition.
    Members,
    /// Ring ownership per node, and the ring drawn partition by partition.
    Ring,
    /// Partitions moving in a ring transition, and the hints this node holds.
    Handoffs,
    /// Anti-entropy per partition held here: last exchange, keys repaired.
    Aae,
    /// Probabilistically bounded staleness: for each t, the probability that a read issued
    /// t ms after a write's acknowledgement returns it, predicted from this node's measured
    /// replica round trips (Bailis et al.), and the k-staleness form.
    Pbs {
        #[arg(long, default_value_t = 3)]
        n: usize,
        #[arg(long, default_value_t = 1)]
        r: usize,
        #[arg(long, default_value_t = 1)]
        w: usize,
        /// Times after the acknowledgement, in ms, comma-separated.
        #[arg(long, default_value = "0,1,2,5,10,20,50,100")]
        t_ms: String,
        /// Also measure it: this many writer/reader trials per t on the live cluster, printed
        /// beside the prediction (the probe's keys are deleted afterwards).
        #[arg(long, value_name = "TRIALS")]
        probe: Option<usize>,
    },
    /// Make the node at --url join the cluster of PEER_ADDR (a member's peer address).
    Join { peer_addr: String },
    /// Make the node at --url leave its cluster (its data moves to the others).
    Leave {
        /// Follow the handoff until the node has exited, printing its progress.
        #[arg(long)]
        wait: bool,
    },
    /// Membership changes staged, reviewed and applied together (Riak's `cluster` commands):
    /// join, leave, replace, force-remove, then plan, commit or clear.
    Cluster {
        /// Where the staged changes are kept until commit or clear.
        #[arg(long, default_value = "dynakv-cluster-plan.json", global = true)]
        plan_file: std::path::PathBuf,
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Back the whole cluster up into a file: every stored object with its clock, siblings
    /// and tombstones, each partition read from a replica that is up (progress on stderr).
    Backup {
        /// The file to write (written as FILE.partial, renamed once complete).
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Merge a backup file into the cluster of the node at --url: every key and sibling comes
    /// back with its clock; newer data is never replaced (running it twice changes nothing).
    Restore {
        /// A file written by `dynakv admin backup`.
        file: std::path::PathBuf,
    },
    /// Client security, as Riak's `riak-admin security` (users, sources, grants).
    #[command(subcommand)]
    Security(SecurityCommand),
    /// Bucket types, as Riak's `riak admin bucket-type`.
    #[command(subcommand)]
    BucketType(BucketTypeCommand),
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Stage the join of the node at --url (a fresh node) through the member at PEER_ADDR.
    Join { peer_addr: String },
    /// Stage the leave of NODE (default: the node at --url); its data is handed off.
    Leave { node: Option<String> },
    /// Stage OLD's leave and the join of the fresh node at NEW_URL in its place.
    Replace { old: String, new_url: String },
    /// Stage taking NODE, gone for good, out of the ring without handoff (its partitions'
    /// new owners get the data from the other replicas; what only it held is lost).
    ForceRemove { node: String },
    /// Show what the staged changes do: partitions moving, keys to transfer, ownership.
    Plan,
    /// Apply the staged changes (after `plan`, if the ring has not changed since).
    Commit {
        /// Follow the transition until the ring has settled, printing its progress.
        #[arg(long)]
        wait: bool,
    },
    /// Drop the staged changes.
    Clear,
}

#[derive(Debug, Subcommand)]
enum DtCommand {
    /// Print a key's value and context as JSON (`{"type":..,"value":..,"context":..}`).
    Get {
        bucket_type: String,
        bucket: String,
        key: String,
    },
    /// Apply an operation (Riak's JSON: `{"increment":5}`, `{"add_all":["a","b"]}`,
    /// `{"remove":"a","context":"..."}`, `{"update":{"name_register":"x"}}`) and print the
    /// value after it.
    Update {
        bucket_type: String,
        bucket: String,
        key: String,
        operation: String,
    },
}

#[derive(Debug, Subcommand)]
enum BucketTypeCommand {
    /// Create a type: `create maps '{"props":{"n_val":3}}'` (then activate it).
    Create { name: String, props: Option<String> },
    /// Serve buckets of a created type (once every member knows it: see `status`).
    Activate { name: String },
    /// Change a type's properties: `update maps '{"props":{"r":1}}'`.
    Update { name: String, props: String },
    /// A type's status (created, ready to activate, active) and properties.
    Status { name: String },
    /// Every type.
    List,
}

#[derive(Debug, Subcommand)]
enum SecurityCommand {
    /// Check credentials and grants from now on (HTTPS only; see docs/SECURITY.md).
    Enable,
    /// Stop checking.
    Disable,
    /// Whether security is enabled, and the users, sources and grants.
    Status,
    /// The users.
    ListUsers,
    /// Add a user: `add-user alice password=s3cret` (no password: trust or certificate
    /// sources only).
    AddUser { name: String, options: Vec<String> },
    /// Change a user's password: `alter-user alice password=n3w`.
    AlterUser { name: String, options: Vec<String> },
    /// Remove a user.
    DelUser { name: String },
    /// Let USERS (comma-separated, or `all`) in from CIDR with METHOD (trust|password|certificate).
    AddSource {
        users: String,
        cidr: String,
        method: String,
    },
    /// Remove the sources of USERS for exactly CIDR.
    DelSource { users: String, cidr: String },
    /// `grant riak_kv.get,riak_kv.put on any|BUCKET to USERS`.
    Grant {
        permissions: String,
        on: String,
        scope: String,
        to: String,
        users: String,
    },
    /// `revoke riak_kv.put on any|BUCKET from USERS`.
    Revoke {
        permissions: String,
        on: String,
        scope: String,
        from: String,
        users: String,
    },
}

/// Comma-separated names.
fn names(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `password=...` among Riak-style `key=value` options.
fn password_option(options: &[String]) -> Result<Option<String>> {
    let mut password = None;
    for option in options {
        match option.split_once('=') {
            Some(("password", value)) => password = Some(value.to_owned()),
            _ => bail!("unknown option {option:?}: the only option is password=PASSWORD"),
        }
    }
    Ok(password)
}

async fn bucket_type_command(
    client: &Client,
    command: BucketTypeCommand,
) -> Result<serde_json::Value> {
    let path = |name: &str| {
        format!(
            "/admin/bucket-types/{}",
            percent_encoding::utf8_percent_encode(name, percent_encoding::NON_ALPHANUMERIC)
        )
    };
    // The props argument is Riak's `{"props":{...}}`; the node checks it.
    let body = |props: Option<String>| props.unwrap_or_else(|| r#"{"props":{}}"#.to_owned());
    Ok(match command {
        BucketTypeCommand::Create { name, props } => {
            client.post_json(&path(&name), &body(props)).await?
        }
        BucketTypeCommand::Activate { name } => {
            client
                .post_json(&format!("{}/activate", path(&name)), "{}")
                .await?
        }
        BucketTypeCommand::Update { name, props } => {
            let (status, _, answer) = client
                .request(
                    hyper::Method::PUT,
                    &path(&name),
                    &[("content-type", "application/json")],
                    bytes::Bytes::from(props),
                )
                .await?;
            if status != hyper::StatusCode::OK {
                bail!("{status}: {}", String::from_utf8_lossy(&answer).trim_end());
            }
            serde_json::from_slice(&answer)?
        }
        BucketTypeCommand::Status { name } => client.get_json(&path(&name)).await?,
        BucketTypeCommand::List => client.get_json("/admin/bucket-types").await?,
    })
}

async fn security_command(client: &Client, command: SecurityCommand) -> Result<serde_json::Value> {
    use serde_json::json;
    let post = |path: &'static str, body: serde_json::Value| async move {
        client.post_json(path, &body.to_string()).await
    };
    Ok(match command {
        SecurityCommand::Enable => post("/admin/security/enable", json!({})).await?,
        SecurityCommand::Disable => post("/admin/security/disable", json!({})).await?,
        SecurityCommand::Status => client.get_json("/admin/security").await?,
        SecurityCommand::ListUsers => {
            let status = client.get_json("/admin/security").await?;
            status.get("users").cloned().unwrap_or_default()
        }
        SecurityCommand::AddUser { name, options }
        | SecurityCommand::AlterUser { name, options } => {
            let password = password_option(&options)?;
            post(
                "/admin/security/users",
                json!({"name": name, "password": password}),
            )
            .await?
        }
        SecurityCommand::DelUser { name } => {
            let path = format!(
                "/admin/security/users/{}",
                percent_encoding::utf8_percent_encode(&name, percent_encoding::NON_ALPHANUMERIC)
            );
            let (status, _, body) = client
                .request(hyper::Method::DELETE, &path, &[], bytes::Bytes::new())
                .await?;
            if !status.is_success() {
                bail!(
                    "server answered {status}: {}",
                    String::from_utf8_lossy(&body).trim()
                );
            }
            serde_json::from_slice(&body)?
        }
        SecurityCommand::AddSource {
            users,
            cidr,
            method,
        } => {
            post(
                "/admin/security/sources",
                json!({"users": names(&users), "cidr": cidr, "method": method}),
            )
            .await?
        }
        SecurityCommand::DelSource { users, cidr } => {
            post(
                "/admin/security/sources/delete",
                json!({"users": names(&users), "cidr": cidr}),
            )
            .await?
        }
        SecurityCommand::Grant {
            permissions,
            on,
            scope,
            to,
            users,
        } => {
            if on != "on" || to != "to" {
                bail!("usage: grant PERMISSIONS on any|BUCKET to USERS");
            }
            post(
                "/admin/security/grant",
                json!({"permissions": names(&permissions), "on": scope, "users": names(&users)}),
            )
            .await?
        }
        SecurityCommand::Revoke {
            permissions,
            on,
            scope,
            from,
            users,
        } => {
            if on != "on" || from != "from" {
                bail!("usage: revoke PERMISSIONS on any|BUCKET from USERS");
            }
            post(
                "/admin/security/revoke",
                json!({"permissions": names(&permissions), "on": scope, "users": names(&users)}),
            )
            .await?
        }
    })
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if LOG_FORMAT.get() == Some(&LogFormat::Json) {
        builder.json().init();
    } else {
        // Colour codes only on a terminal: a log written to a file or a pipe stays plain text.
        let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
        builder.with_ansi(terminal).init();
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let _ = LOG_FORMAT.set(cli.log_format);
    // The load generator runs on one thread: on a small machine the server under test needs
    // the other cores, and a task waking another thread costs more than the request.
    let mut builder = if matches!(cli.command, Command::Bench { .. }) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Server {
            name,
            http,
            peer,
            pb,
            data_dir,
            join,
            cluster_secret_file,
            insecure,
            zone,
            config,
            storage,
            tls_cert,
            tls_key,
            tls_client_ca,
            print_config,
        } => {
            if !print_config {
                init_logging("info,fjall=warn,lsm_tree=warn");
            }
            let mut server_config = ServerConfig::new(&name, http, peer, data_dir);
            if let Some(path) = config {
                server_config.apply_file(&path)?;
            }
            if let Some(zone) = zone {
                server_config.zone = zone;
            }
            if let Some(storage) = storage {
                server_config.storage = storage;
            }
            server_config.join = join;
            if pb.is_some() {
                server_config.pb_addr = pb;
            }
            if let Some(file) = cluster_secret_file {
                server_config.cluster_secret_file = Some(file);
            }
            server_config.insecure |= insecure;
            if let (Some(cert), Some(key)) = (tls_cert, tls_key) {
                server_config.tls_cert_file = Some(cert);
                server_config.tls_key_file = Some(key);
            }
            if let Some(ca) = tls_client_ca {
                server_config.tls_client_ca_file = Some(ca);
            }
            if print_config {
                server_config.validate()?;
                print!("{}", server_config.print_config());
                return Ok(());
            }
            let server = dynakv_server::start(server_config.clone()).await?;
            let handle = ShutdownOnSignal::install()?;
            // The node restarts itself after a storage failure (see `supervise`).
            let (stop, stopped) = tokio::sync::watch::channel(false);
            let supervised = dynakv_server::supervise(server, server_config, stopped);
            tokio::pin!(supervised);
            tokio::select! {
                ended = &mut supervised => ended?,
                () = handle.wait() => {
                    tracing::info!("shutting down");
                    let _ = stop.send(true);
                    supervised.await?;
                }
            }
            Ok(())
        }
        Command::Dev {
            nodes,
            http_port,
            pb_port,
            data_dir,
            storage,
            runtime,
        } => {
            init_logging("info,fjall=warn,lsm_tree=warn");
            dev(nodes, (http_port, pb_port), data_dir, (storage, runtime)).await
        }
        Command::Get {
            bucket,
            key,
            url,
            client,
        } => {
            init_logging("warn");
            let client = ClientSettings::from_options(&client)?.client(&url)?;
            match client.get(&bucket, &key).await? {
                None => bail!("not found: {bucket}/{key}"),
                Some(fetched) => {
                    let mut out = std::io::stdout().lock();
                    if let [only] = fetched.siblings.as_slice() {
                        out.write_all(&only.value)?;
                        if !only.value.ends_with(b"\n") {
                            writeln!(out)?;
                        }
                    } else {
                        for (i, sibling) in fetched.siblings.iter().enumerate() {
                            writeln!(
                                out,
                                "--- sibling {} of {} (vtag {}, {})",
                                i + 1,
                                fetched.siblings.len(),
                                sibling.vtag,
                                sibling.content_type
                            )?;
                            out.write_all(&sibling.value)?;
                            if !sibling.value.ends_with(b"\n") {
                                writeln!(out)?;
                            }
                        }
                    }
                    if let Some(context) = fetched.context {
                        eprintln!("context: {context}");
                    }
                    Ok(())
                }
            }
        }
        Command::Put {
            bucket,
            key,
            value,
            url,
            context,
            content_type,
            client,
        } => {
            init_logging("warn");
            let value = if let Some(v) = value {
                Bytes::from(v.into_bytes())
            } else {
                let mut buf = Vec::new();
                std::io::stdin()
                    .read_to_end(&mut buf)
                    .context("reading the value from stdin")?;
                Bytes::from(buf)
            };
            let client = ClientSettings::from_options(&client)?.client(&url)?;
            let stored = client
                .put(
                    &bucket,
                    &key,
                    value,
                    &PutOptions {
                        content_type: Some(&content_type),
                        context: context.as_deref(),
                        ..PutOptions::default()
                    },
                )
                .await?;
            println!(
                "stored {bucket}/{key}: {} sibling(s)",
                stored.siblings.len()
            );
            if let Some(context) = stored.context {
                eprintln!("context: {context}");
            }
            Ok(())
        }
        Command::Delete {
            bucket,
            key,
            url,
            context,
            client,
        } => {
            init_logging("warn");
            let client = ClientSettings::from_options(&client)?.client(&url)?;
            if client.delete(&bucket, &key, context.as_deref()).await? {
                println!("deleted {bucket}/{key}");
                Ok(())
            } else {
                bail!("not found: {bucket}/{key}")
            }
        }
        Command::Bench {
            urls,
            workload,
            distribution,
            records,
            ops,
            concurrency,
            value_size,
            bucket,
            skip_load,
            json,
            seed,
            durability,
            client_routing,
            rate,
            target,
            duration_secs,
            generator,
            pipeline,
            protocol,
            pb_addrs,
            datatype,
            index_range,
            client,
        } => {
            init_logging("warn");
            let client = ClientSettings::from_options(&client)?;
            bench::run(bench::BenchConfig {
                urls,
                workload,
                distribution,
                records,
                ops,
                concurrency,
                value_size,
                bucket,
                skip_load,
                json,
                seed,
                durability,
                client_routing,
                rate,
                target,
                duration_secs,
                client,
                generator,
                pipeline,
                protocol,
                pb_addrs,
                datatype,
                index_range,
            })
            .await
        }
        Command::Dt {
            url,
            client,
            command,
        } => {
            init_logging("warn");
            let client = ClientSettings::from_options(&client)?.client(&url)?;
            let value = match command {
                DtCommand::Get {
                    bucket_type,
                    bucket,
                    key,
                } => client
                    .fetch_datatype(&bucket_type, &bucket, &key)
                    .await?
                    .with_context(|| format!("not found: {bucket_type}/{bucket}/{key}"))?,
                DtCommand::Update {
                    bucket_type,
                    bucket,
                    key,
                    operation,
                } => {
                    let operation: serde_json::Value =
                        serde_json::from_str(&operation).context("the operation is not JSON")?;
                    client
                        .update_datatype(&bucket_type, &bucket, &key, &operation)
                        .await?
                }
            };
            println!("{value}");
            Ok(())
        }
        Command::Admin {
            url,
            json,
            client,
            command,
        } => {
            init_logging("warn");
            let settings = ClientSettings::from_options(&client)?;
            match &command {
                AdminCommand::Cluster { plan_file, command } => {
                    let command = match command {
                        ClusterCommand::Join { peer_addr } => staging::Command::Join {
                            peer: peer_addr.clone(),
                        },
                        ClusterCommand::Leave { node } => {
                            staging::Command::Leave { node: node.clone() }
                        }
                        ClusterCommand::Replace { old, new_url } => staging::Command::Replace {
                            old: old.clone(),
                            new_url: new_url.clone(),
                        },
                        ClusterCommand::ForceRemove { node } => {
                            staging::Command::ForceRemove { node: node.clone() }
                        }
                        ClusterCommand::Plan => staging::Command::Plan,
                        ClusterCommand::Commit { wait } => staging::Command::Commit { wait: *wait },
                        ClusterCommand::Clear => staging::Command::Clear,
                    };
                    return staging::run(&settings, &url, plan_file, command).await;
                }
                AdminCommand::Backup { out } => return backup::backup(&settings, &url, out).await,
                AdminCommand::Restore { file } => {
                    return backup::restore(&settings, &url, file).await;
                }
                _ => {}
            }
            let client = settings.client(&url)?;
            let show = async |view, path| -> Result<()> {
                let value = client.get_json(path).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&value)?);
                } else {
                    print!("{}", tables::render(view, &value));
                }
                Ok(())
            };
            let value = match command {
                AdminCommand::Status => return show(tables::View::Status, "/admin/status").await,
                AdminCommand::Members => {
                    return show(tables::View::Members, "/admin/members").await;
                }
                AdminCommand::Ring => return show(tables::View::Ring, "/admin/ring").await,
                AdminCommand::Handoffs => {
                    return show(tables::View::Handoffs, "/admin/handoffs").await;
                }
                AdminCommand::Aae => return show(tables::View::Aae, "/admin/aae").await,
                AdminCommand::Pbs {
                    n,
                    r,
                    w,
                    t_ms,
                    probe,
                } => {
                    let t: String = t_ms.chars().filter(|c| !c.is_whitespace()).collect();
                    let path = format!("/admin/pbs?n={n}&r={r}&w={w}&t={t}");
                    let Some(trials) = probe.filter(|t| *t > 0) else {
                        return show(tables::View::Pbs, &path).await;
                    };
                    let times = t
                        .split(',')
                        .map(str::parse::<u64>)
                        .collect::<Result<Vec<_>, _>>()
                        .context("--t-ms must be whole milliseconds with --probe")?;
                    let measured =
                        pbs_probe::probe(&settings, &url, (r, w), &times, trials).await?;
                    let mut value = client.get_json(&path).await?;
                    value["measured"] = serde_json::json!(measured
                        .iter()
                        .map(|(t, fresh, trials)| serde_json::json!({"t_ms": t, "fresh": fresh, "reads": trials}))
                        .collect::<Vec<_>>());
                    if json {
                        println!("{}", serde_json::to_string_pretty(&value)?);
                    } else {
                        print!("{}", tables::render(tables::View::Pbs, &value));
                    }
                    return Ok(());
                }
                AdminCommand::Join { peer_addr } => {
                    let body = serde_json::json!({ "peer": peer_addr }).to_string();
                    client.post_json("/admin/join", &body).await?
                }
                AdminCommand::Leave { wait } => {
                    let answer = client.post_json("/admin/leave", "{}").await?;
                    if wait {
                        println!("{}", serde_json::to_string_pretty(&answer)?);
                        let name = client.get_json("/admin/status").await?["node"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned();
                        progress::follow(&client, Some(&name)).await?;
                        return Ok(());
                    }
                    answer
                }
                AdminCommand::Backup { .. }
                | AdminCommand::Restore { .. }
                | AdminCommand::Cluster { .. } => return Ok(()),
                AdminCommand::Security(command) => security_command(&client, command).await?,
                AdminCommand::BucketType(command) => bucket_type_command(&client, command).await?,
            };
            println!("{}", serde_json::to_string_pretty(&value)?);
            Ok(())
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
struct ShutdownOnSignal {
    terminate: tokio::signal::unix::Signal,
}

impl ShutdownOnSignal {
    fn install() -> Result<Self> {
        let terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        Ok(ShutdownOnSignal { terminate })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// How `dynakv dev` runs its nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DevRuntime {
    /// One multi-threaded runtime shared by every node.
    Shared,
    /// One single-threaded runtime per node, each on its own thread.
    PerNode,
}

/// A running node of `dynakv dev`.
struct DevNode {
    name: String,
    http_addr: SocketAddr,
    peer_addr: SocketAddr,
    pb_addr: Option<SocketAddr>,
    cluster: std::sync::Arc<dynakv_server::view::Cluster>,
    /// How its supervision ended (after `stopped` turned true, or a failure it cannot fix).
    done: tokio::sync::oneshot::Receiver<Result<(), dynakv_server::ServerError>>,
}

/// Start a node of `dynakv dev` (supervised: it restarts after a storage failure) on the
/// shared runtime or on a runtime of its own, until `stopped` turns true.
async fn start_dev_node(
    config: ServerConfig,
    stopped: tokio::sync::watch::Receiver<bool>,
    runtime: DevRuntime,
) -> Result<DevNode> {
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let (done_tx, done) = tokio::sync::oneshot::channel();
    let thread_name = format!("dynakv-{}", config.name);
    let run = async move {
        match dynakv_server::start(config.clone()).await {
            Ok(server) => {
                let started = (
                    server.name.clone(),
                    (server.http_addr, server.peer_addr, server.pb_addr),
                    std::sync::Arc::clone(&server.cluster),
                );
                let _ = started_tx.send(Ok(started));
                let _ = done_tx.send(dynakv_server::supervise(server, config, stopped).await);
            }
            Err(e) => {
                let _ = started_tx.send(Err(e));
            }
        }
    };
    match runtime {
        DevRuntime::Shared => {
            tokio::spawn(run);
        }
        DevRuntime::PerNode => {
            let own = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting a node's runtime")?;
            std::thread::Builder::new()
                .name(thread_name)
                .spawn(move || own.block_on(run))
                .context("starting a node's thread")?;
        }
    }
    let (name, (http_addr, peer_addr, pb_addr), cluster) =
        started_rx.await.context("the node's task ended")??;
    Ok(DevNode {
        name,
        http_addr,
        peer_addr,
        pb_addr,
        cluster,
        done,
    })
}

async fn dev(
    nodes: u16,
    (http_port, pb_port): (u16, u16),
    data_dir: PathBuf,
    (storage, runtime): (StorageKind, DevRuntime),
) -> Result<()> {
    if nodes == 0 || nodes > 16 {
        bail!("--nodes must be from 1 to 16");
    }
    // Each node restarts itself after a storage failure (see `supervise`) until `stop`.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut servers: Vec<DevNode> = Vec::new();
    for i in 1..=nodes {
        let name = format!("dev{i}");
        let port = http_port
            .checked_add(i - 1)
            .context("--http-port too high for that many nodes")?;
        let peer_port = port.checked_add(1000).context("--http-port too high")?;
        let mut config = ServerConfig::new(
            &name,
            SocketAddr::from(([127, 0, 0, 1], port)),
            SocketAddr::from(([127, 0, 0, 1], peer_port)),
            data_dir.join(&name),
        );
        config.storage = storage;
        if pb_port != 0 {
            let port = pb_port
                .checked_add(i - 1)
                .context("--pb-port too high for that many nodes")?;
            config.pb_addr = Some(SocketAddr::from(([127, 0, 0, 1], port)));
        }
        config.join = servers.first().map(|first| first.peer_addr);
        if i > 1 {
            // dev1 founded the cluster and made its secret; the others are given a copy.
            config.cluster_secret_file = Some(
                data_dir
                    .join("dev1")
                    .join(dynakv_server::secrets::CLUSTER_SECRET_FILE),
            );
        }
        let server = start_dev_node(config, stopped.clone(), runtime)
            .await
            .with_context(|| format!("starting node {name}"))?;
        servers.push(server);
    }
    let signals = ShutdownOnSignal::install()?;
    if servers.len() > 1 {
        eprintln!("waiting for the ring to settle...");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while !servers.iter().all(|s| {
            let state = s.cluster.state();
            state.settled() && state.ring.current.nodes().len() == servers.len()
        }) {
            if std::time::Instant::now() > deadline {
                bail!("the ring did not settle within 120 s");
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
    println!("dynakv dev cluster: {} node(s)", servers.len());
    for server in &servers {
        match server.pb_addr {
            Some(pb) => println!("  {}  http://{}  pb {pb}", server.name, server.http_addr),
            None => println!("  {}  http://{}", server.name, server.http_addr),
        }
    }
    println!("data in {}; press Ctrl-C to stop", data_dir.display());
    signals.wait().await;
    println!("stopping");
    let _ = stop.send(true);
    for node in servers {
        node.done.await.context("a node's task failed")??;
    }
    Ok(())
}
