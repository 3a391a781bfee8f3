//! The real binary with HTTPS on the client port: `dynakv server --tls-cert --tls-key` serves
//! the CLI's get/put/admin/bench given `--ca-cert` (and Basic credentials, sent over TLS);
//! without the CA, or over plain HTTP, the CLI fails with a clear message; a certificate and
//! key that do not go together stop the server at start with one. With `--tls-client-ca`, the
//! CLI's `--client-cert --client-key` authenticate a user of a `certificate` source.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A test CA's certificate, and a node certificate it signed for 127.0.0.1 with its key.
struct Certs {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn make_certs(dir: &Path) -> Certs {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "dynakv process test CA");
    let ca_cert = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let node_key = rcgen::KeyPair::generate().unwrap();
    let node_cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&node_key, &ca_cert)
        .unwrap();
    let certs = Certs {
        ca: dir.join("ca.pem"),
        cert: dir.join("node.pem"),
        key: dir.join("node.key"),
    };
    std::fs::write(&certs.ca, ca_cert.pem()).unwrap();
    std::fs::write(&certs.cert, node_cert.pem()).unwrap();
    std::fs::write(&certs.key, node_key.serialize_pem()).unwrap();
    certs
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn server_command(dir: &Path, http: u16, peer: u16) -> Command {
    let mut command = Command::new(common::BIN);
    command
        .args([
            "server",
            "--name",
            "tls1",
            "--storage",
            "memory",
            "--data-dir",
        ])
        .arg(dir.join("data"))
        .args(["--http", &format!("127.0.0.1:{http}")])
        .args(["--peer", &format!("127.0.0.1:{peer}")]);
    command
}

fn cli(args: &[&str], password: Option<&str>) -> Output {
    let mut command = Command::new(common::BIN);
    command.args(args).env_remove("DYNAKV_PASSWORD");
    if let Some(password) = password {
        command.env("DYNAKV_PASSWORD", password);
    }
    command.stdin(Stdio::null()).output().unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `dynakv server` with `--tls-cert`/`--tls-key` and `extra` arguments, its log in
/// `dir/server.log`, once its client port accepts connections; and its URL.
fn start_tls_server(dir: &Path, certs: &Certs, extra: &[&std::ffi::OsStr]) -> (Server, String) {
    let ports = common::free_ports(2);
    let log = std::fs::File::create(dir.join("server.log")).unwrap();
    let server = Server(
        server_command(dir, ports[0], ports[1])
            .arg("--tls-cert")
            .arg(&certs.cert)
            .arg("--tls-key")
            .arg(&certs.key)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let addr: SocketAddr = format!("127.0.0.1:{}", ports[0]).parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(Instant::now() < deadline, "the server did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    (server, format!("https://127.0.0.1:{}", ports[0]))
}

#[test]
fn the_cli_talks_https_to_a_server_started_with_a_certificate() {
    let _serial = common::serial();
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let (_server, url) = start_tls_server(dir.path(), &certs, &[]);
    let ca = certs.ca.to_str().unwrap();

    let put = cli(
        &["put", "b", "k", "over tls", "--url", &url, "--ca-cert", ca],
        None,
    );
    assert!(put.status.success(), "{}", text(&put));
    // Basic credentials from the environment travel with the request (no users yet: unused).
    let got = cli(
        &[
            "get",
            "b",
            "k",
            "--url",
            &url,
            "--ca-cert",
            ca,
            "--user",
            "ann",
        ],
        Some("pw"),
    );
    assert!(got.status.success(), "{}", text(&got));
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "over tls");
    let status = cli(&["admin", "status", "--url", &url, "--ca-cert", ca], None);
    assert!(status.status.success(), "{}", text(&status));
    assert!(String::from_utf8_lossy(&status.stdout).contains("tls1"));
    let bench = cli(
        &[
            "bench",
            "--url",
            &url,
            "--ca-cert",
            ca,
            "--records",
            "50",
            // Enough operations for the generator's CPU time, read from /proc in 10 ms
            // clock ticks, to be more than zero ticks (200 took ~2 ms and sometimes read 0).
            "--ops",
            "3000",
            "--concurrency",
            "4",
            "--durability",
            "buffered",
            "--json",
        ],
        None,
    );
    assert!(bench.status.success(), "{}", text(&bench));
    let report: serde_json::Value = serde_json::from_slice(&bench.stdout).unwrap();
    assert_eq!(report["ops"], 3000, "{report}");
    assert_eq!(report["errors"], 0, "{report}");
    // CPU per operation: the node's process (one) and the generator's, both measured.
    assert_eq!(report["server_processes"], 1, "{report}");
    assert!(
        report["server_cpu_us_per_op"]
            .as_f64()
            .is_some_and(|c| c > 0.0),
        "{report}"
    );
    assert!(
        report["generator_cpu_us_per_op"]
            .as_f64()
            .is_some_and(|c| c > 0.0),
        "{report}"
    );

    // No CA given, a CA that did not sign the node's certificate, plain HTTP: clear failures.
    let no_ca = cli(&["get", "b", "k", "--url", &url], None);
    assert!(!no_ca.status.success());
    assert!(text(&no_ca).contains("--ca-cert"), "{}", text(&no_ca));
    let other = make_certs(&subdir(dir.path(), "other"));
    let wrong_ca = cli(
        &[
            "get",
            "b",
            "k",
            "--url",
            &url,
            "--ca-cert",
            other.ca.to_str().unwrap(),
        ],
        None,
    );
    assert!(!wrong_ca.status.success());
    assert!(
        text(&wrong_ca).contains("certificate"),
        "{}",
        text(&wrong_ca)
    );
    let plain_url = url.replacen("https://", "http://", 1);
    let plain = cli(&["get", "b", "k", "--url", &plain_url], None);
    assert!(!plain.status.success(), "{}", text(&plain));
    assert!(text(&plain).contains("https://"), "{}", text(&plain));
    let user_without_password = cli(
        &[
            "get",
            "b",
            "k",
            "--url",
            &url,
            "--ca-cert",
            ca,
            "--user",
            "ann",
        ],
        None,
    );
    assert!(text(&user_without_password).contains("DYNAKV_PASSWORD"));

    // The server still serves.
    let again = cli(&["get", "b", "k", "--url", &url, "--ca-cert", ca], None);
    assert!(again.status.success(), "{}", text(&again));
}

#[test]
fn a_key_that_does_not_match_stops_the_server_at_start() {
    let _serial = common::serial();
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let other = make_certs(&subdir(dir.path(), "other"));
    let ports = common::free_ports(2);
    // Through the config file, with paths relative to it.
    std::fs::write(
        dir.path().join("dynakv.toml"),
        "tls_cert_file = \"node.pem\"\ntls_key_file = \"other/node.key\"\n",
    )
    .unwrap();
    let started = Instant::now();
    let output = server_command(dir.path(), ports[0], ports[1])
        .arg("--config")
        .arg(dir.path().join("dynakv.toml"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success(), "{}", text(&output));
    assert!(started.elapsed() < Duration::from_secs(10));
    let message = text(&output);
    assert!(message.contains("cannot be used together"), "{message}");
    assert!(
        message.contains(other.key.to_str().unwrap()),
        "names the key file: {message}"
    );
    // The certificate given as the key: says which file holds no key.
    let output = server_command(dir.path(), ports[0], ports[1])
        .arg("--tls-cert")
        .arg(&certs.cert)
        .arg("--tls-key")
        .arg(&certs.cert)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        text(&output).contains("no PEM private key"),
        "{}",
        text(&output)
    );
}

/// `parent/name`, made.
fn subdir(parent: &Path, name: &str) -> PathBuf {
    let dir = parent.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Issue 17's done-when: three `dynakv server` processes with HTTPS and the cluster secret,
/// security set up with the commands of docs/SECURITY.md, then the README's walk-through with
/// credentials: alice writes on one node and reads on another; no credentials, a wrong
/// password, a missing grant and plain HTTP are refused (401, 401, 403, and no answer).
#[test]
fn a_secure_three_node_cluster_serves_the_walk_through_with_credentials() {
    let _serial = common::serial();
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let ca = certs.ca.to_str().unwrap().to_owned();
    let ports = common::free_ports(6);
    let url = |i: usize| format!("https://127.0.0.1:{}", ports[2 * i]);
    let mut servers = Vec::new();
    for i in 0..3 {
        let data = dir.path().join(format!("n{}", i + 1));
        let log = std::fs::File::create(dir.path().join(format!("n{}.log", i + 1))).unwrap();
        let mut command = Command::new(common::BIN);
        command
            .args(["server", "--name", &format!("n{}", i + 1)])
            .args(["--http", &format!("127.0.0.1:{}", ports[2 * i])])
            .args(["--peer", &format!("127.0.0.1:{}", ports[2 * i + 1])])
            .arg("--data-dir")
            .arg(&data)
            .arg("--tls-cert")
            .arg(&certs.cert)
            .arg("--tls-key")
            .arg(&certs.key);
        if i > 0 {
            // The operator's copy of the founder's secret.
            command
                .args(["--join", &format!("127.0.0.1:{}", ports[1])])
                .arg("--cluster-secret-file")
                .arg(dir.path().join("n1").join("cluster.secret"));
        }
        servers.push(Server(
            command.stdout(Stdio::null()).stderr(log).spawn().unwrap(),
        ));
        // Wait until it answers (the next joins through n1, which must be up).
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = cli(
                &["admin", "status", "--url", &url(i), "--ca-cert", &ca],
                None,
            );
            if status.status.success() {
                break;
            }
            assert!(Instant::now() < deadline, "n{} did not come up", i + 1);
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let admin = |args: &[&str], password: Option<&str>, user: Option<&str>| {
        let first = url(0);
        let mut all = vec!["admin", "--url", &first];
        all.extend_from_slice(&["--ca-cert", &ca]);
        if let Some(user) = user {
            all.extend_from_slice(&["--user", user]);
        }
        all.extend_from_slice(args);
        cli(&all, password)
    };
    for step in [
        &["security", "add-user", "alice", "password=s3cret"][..],
        &["security", "add-user", "ops", "password=0ps-pw"],
        &["security", "add-source", "all", "127.0.0.1/32", "password"],
        &[
            "security",
            "grant",
            "riak_kv.get,riak_kv.put",
            "on",
            "any",
            "to",
            "alice",
        ],
        &["security", "grant", "admin", "on", "any", "to", "ops"],
        &["security", "enable"],
    ] {
        let out = admin(step, None, None);
        assert!(out.status.success(), "{step:?}: {}", text(&out));
    }
    // Every node sees it enabled (gossip): without credentials, 401.
    for i in 0..3 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = cli(
                &[
                    "get",
                    "demo",
                    "greeting",
                    "--url",
                    &url(i),
                    "--ca-cert",
                    &ca,
                ],
                None,
            );
            if text(&out).contains("401") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "n{} does not ask for credentials: {}",
                i + 1,
                text(&out)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let as_user = |user: &str, password: &str, args: &[&str], node: usize| {
        let mut all = args.to_vec();
        let node_url = url(node);
        all.extend_from_slice(&["--url", &node_url, "--ca-cert", &ca, "--user", user]);
        cli(&all, Some(password))
    };
    // The walk-through: store on n1, fetch on n2 and n3.
    let put = as_user("alice", "s3cret", &["put", "demo", "greeting", "hello"], 0);
    assert!(put.status.success(), "{}", text(&put));
    for node in [1, 2] {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = as_user("alice", "s3cret", &["get", "demo", "greeting"], node);
            if got.status.success() {
                assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), "hello");
                break;
            }
            // A node may not have learnt alice's grant yet.
            assert!(Instant::now() < deadline, "{}", text(&got));
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let wrong = as_user("alice", "guess", &["get", "demo", "greeting"], 0);
    assert!(
        !wrong.status.success() && text(&wrong).contains("401"),
        "{}",
        text(&wrong)
    );
    let no_grant = as_user("alice", "s3cret", &["delete", "demo", "greeting"], 0);
    assert!(
        !no_grant.status.success() && text(&no_grant).contains("403"),
        "{}",
        text(&no_grant)
    );
    let members = admin(&["members"], Some("s3cret"), Some("alice"));
    assert!(text(&members).contains("403"), "{}", text(&members));
    let members = admin(&["members"], Some("0ps-pw"), Some("ops"));
    assert!(members.status.success(), "{}", text(&members));
    let listed = String::from_utf8_lossy(&members.stdout).into_owned();
    assert!(
        ["n1", "n2", "n3"].iter().all(|n| listed.contains(n)),
        "{listed}"
    );
    let plain = cli(
        &[
            "get",
            "demo",
            "greeting",
            "--url",
            &format!("http://127.0.0.1:{}", ports[0]),
        ],
        None,
    );
    assert!(!plain.status.success(), "{}", text(&plain));
    drop(servers);
}

/// A client certificate for `name` (DNS subjectAltName, client-auth usage) signed by a new
/// CA; the CA, the certificate and its key are written to `dir` as `{stem}-ca.pem`,
/// `{stem}.pem` and `{stem}.key`.
fn make_client_cert(dir: &Path, stem: &str, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &ca).unwrap();
    let paths = (
        dir.join(format!("{stem}-ca.pem")),
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

/// `--tls-client-ca` on the server and `--client-cert --client-key` on the CLI: a user of a
/// `certificate` source gets in with a certificate for its name (no password needed), and
/// not with a certificate from another CA or without one.
#[test]
fn the_cli_authenticates_with_a_client_certificate() {
    let _serial = common::serial();
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let (client_ca, alice_cert, alice_key) = make_client_cert(dir.path(), "alice", "alice");
    let (_, forged_cert, forged_key) = make_client_cert(dir.path(), "forged", "alice");
    let (_server, url) = start_tls_server(
        dir.path(),
        &certs,
        &["--tls-client-ca".as_ref(), client_ca.as_os_str()],
    );
    let ca = certs.ca.to_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = cli(&["admin", "status", "--url", &url, "--ca-cert", &ca], None);
        if status.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "the server did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    for step in [
        &["security", "add-user", "alice"][..],
        &[
            "security",
            "add-source",
            "all",
            "127.0.0.1/32",
            "certificate",
        ],
        &[
            "security",
            "grant",
            "riak_kv.get,riak_kv.put",
            "on",
            "any",
            "to",
            "alice",
        ],
        &["security", "enable"],
    ] {
        let mut args = vec!["admin", "--url", &url, "--ca-cert", &ca];
        args.extend_from_slice(step);
        let out = cli(&args, None);
        assert!(out.status.success(), "{step:?}: {}", text(&out));
    }
    let with = |cert: &Path, key: &Path, args: &[&str]| {
        let mut all = args.to_vec();
        all.extend_from_slice(&["--url", &url, "--ca-cert", &ca, "--user", "alice"]);
        let mut command = Command::new(common::BIN);
        command
            .args(&all)
            .arg("--client-cert")
            .arg(cert)
            .arg("--client-key")
            .arg(key)
            .env_remove("DYNAKV_PASSWORD")
            .stdin(Stdio::null());
        command.output().unwrap()
    };
    let put = with(
        &alice_cert,
        &alice_key,
        &["put", "b", "k", "by certificate"],
    );
    assert!(put.status.success(), "{}", text(&put));
    let got = with(&alice_cert, &alice_key, &["get", "b", "k"]);
    assert!(got.status.success(), "{}", text(&got));
    assert!(text(&got).contains("by certificate"), "{}", text(&got));
    let forged = with(&forged_cert, &forged_key, &["get", "b", "k"]);
    assert!(!forged.status.success(), "{}", text(&forged));
    let bare = cli(
        &[
            "get",
            "b",
            "k",
            "--url",
            &url,
            "--ca-cert",
            &ca,
            "--user",
            "alice",
        ],
        Some(""),
    );
    assert!(
        !bare.status.success() && text(&bare).contains("401"),
        "{}",
        text(&bare)
    );
    let half = cli(
        &[
            "get",
            "b",
            "k",
            "--url",
            &url,
            "--ca-cert",
            &ca,
            "--client-cert",
            "x.pem",
        ],
        None,
    );
    assert!(
        !half.status.success() && text(&half).contains("--client-key"),
        "{}",
        text(&half)
    );
}
