//! The real `dynakv` binary as a user runs it: a server process killed with SIGKILL after an
//! acknowledged write serves that write after a restart; SIGTERM stops it cleanly; `dev`
//! starts a node; the get/put/delete commands work against it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_dynakv");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `dynakv server` on fresh ports and waits until *this* process answers: a port picked
/// by `free_port` can be taken by a parallel test (or an outgoing connection) before the server
/// binds it, so a start whose process exits, or whose port answers under another node's name,
/// is retried on other ports.
fn start_server(data_dir: &Path, name: &str) -> Server {
    for _ in 0..5 {
        let port = free_port();
        let mut child = Command::new(BIN)
            .args(["server", "--name", name, "--data-dir"])
            .arg(data_dir)
            .args(["--http", &format!("127.0.0.1:{port}")])
            .args(["--peer", &format!("127.0.0.1:{}", free_port())])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut ours = false;
        while Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            let out = cli(&["admin", "status", "--json", "--url", &url]);
            if out.status.success() {
                let status: serde_json::Value =
                    serde_json::from_slice(&out.stdout).unwrap_or_default();
                ours = status["node"].as_str() == Some(name);
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Our process must still be running: another test's node may hold the same name.
        if ours && child.try_wait().unwrap().is_none() {
            return Server { child, url };
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("server {name} did not come up on five sets of free ports");
}

/// A node name no other test in this run uses (the data directory is bound to its name).
fn unique_name() -> String {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("n{n}-{}", std::process::id())
}

fn wait_until_up(port: u16) {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("server on port {port} did not come up");
}

fn cli(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn actor(url: &str) -> String {
    let out = cli(&["admin", "status", "--json", "--url", url]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    status["actor"].as_str().unwrap().to_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn context_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr)
        .lines()
        .find_map(|l| l.strip_prefix("context: "))
        .unwrap()
        .to_owned()
}

#[test]
fn acknowledged_fsynced_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let name = unique_name();
    let mut server = start_server(dir.path(), &name);
    for i in 0..50 {
        let out = cli(&[
            "put",
            "durable",
            &format!("k{i}"),
            &format!("value-{i}"),
            "--url",
            &server.url,
        ]);
        assert!(out.status.success(), "{out:?}");
    }
    // Two siblings too: the sibling set must survive as a whole.
    cli(&["put", "durable", "sib", "left", "--url", &server.url]);
    cli(&["put", "durable", "sib", "right", "--url", &server.url]);
    let actor_before = actor(&server.url);
    server.child.kill().unwrap(); // SIGKILL: no flush, no shutdown hook
    server.child.wait().unwrap();
    let server = start_server(dir.path(), &name);
    assert_ne!(
        actor(&server.url),
        actor_before,
        "after a crash the node writes as a new actor"
    );
    for i in 0..50 {
        let out = cli(&["get", "durable", &format!("k{i}"), "--url", &server.url]);
        assert!(out.status.success(), "{out:?}");
        assert_eq!(stdout(&out), format!("value-{i}\n"));
    }
    let out = cli(&["get", "durable", "sib", "--url", &server.url]);
    let text = stdout(&out);
    assert!(
        text.contains("left") && text.contains("right") && text.contains("sibling 2 of 2"),
        "{text}"
    );
}

#[test]
fn buffered_bucket_writes_survive_sigkill_after_the_flush_interval() {
    let dir = tempfile::tempdir().unwrap();
    let name = unique_name();
    let mut server = start_server(dir.path(), &name);
    let set = Command::new("curl")
        .args([
            "-sf",
            "-XPUT",
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"props":{"durability":"buffered"}}"#,
        ])
        .arg(format!("{}/buckets/fast/props", server.url))
        .status();
    if set.is_err() {
        // No curl: set the property through a raw socket instead.
        use std::io::Write;
        let body = r#"{"props":{"durability":"buffered"}}"#;
        let mut s = std::net::TcpStream::connect(server.url.trim_start_matches("http://")).unwrap();
        write!(s, "PUT /buckets/fast/props HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
        let mut sink = String::new();
        let _ = std::io::Read::read_to_string(&mut s, &mut sink);
    }
    for i in 0..20 {
        let out = cli(&["put", "fast", &format!("k{i}"), "v", "--url", &server.url]);
        assert!(out.status.success(), "{out:?}");
    }
    // The flusher runs every 100 ms by default.
    std::thread::sleep(Duration::from_millis(600));
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let server = start_server(dir.path(), &name);
    for i in 0..20 {
        let out = cli(&["get", "fast", &format!("k{i}"), "--url", &server.url]);
        assert_eq!(stdout(&out), "v\n", "{out:?}");
    }
}

#[test]
fn sigterm_stops_cleanly_and_cli_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let name = unique_name();
    let mut server = start_server(dir.path(), &name);
    let url = server.url.clone();
    let put = cli(&["put", "b", "k", "one", "--url", &url]);
    assert!(put.status.success());
    let context = context_of(&put);
    let put = cli(&["put", "b", "k", "two", "--url", &url, "--context", &context]);
    assert!(stdout(&put).contains("1 sibling"), "{put:?}");
    let bad = cli(&[
        "put",
        "b",
        "k",
        "three",
        "--url",
        &url,
        "--context",
        "forged",
    ]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("400"),
        "{bad:?}"
    );
    let got = cli(&["get", "b", "k", "--url", &url]);
    assert_eq!(stdout(&got), "two\n");
    let context = context_of(&got);
    assert!(
        cli(&["delete", "b", "k", "--url", &url, "--context", &context])
            .status
            .success()
    );
    let gone = cli(&["get", "b", "k", "--url", &url]);
    assert!(!gone.status.success());
    let status = cli(&["admin", "status", "--url", &url]);
    assert!(
        stdout(&status).contains(&format!("node:            {name}\n")),
        "{status:?}"
    );
    let actor_before = actor(&url);
    Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(code) = server.child.try_wait().unwrap() {
            assert!(code.success(), "clean exit on SIGTERM: {code:?}");
            break;
        }
        assert!(Instant::now() < deadline, "server did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    let server = start_server(dir.path(), &name);
    assert_eq!(
        actor(&server.url),
        actor_before,
        "after a clean stop the actor is kept"
    );
}

#[test]
fn dev_starts_a_node_and_refuses_reuse_by_another_name() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let dev = Command::new(BIN)
        .args([
            "dev",
            "--nodes",
            "1",
            "--http-port",
            &port.to_string(),
            "--pb-port",
            "0",
            "--data-dir",
        ])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until_up(port);
    let url = format!("http://127.0.0.1:{port}");
    assert!(cli(&["put", "b", "k", "v", "--url", &url]).status.success());
    assert_eq!(stdout(&cli(&["get", "b", "k", "--url", &url])), "v\n");
    Command::new("kill")
        .args(["-INT", &dev.id().to_string()])
        .status()
        .unwrap();
    let out = dev.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(
        stdout(&out).contains(&format!("dev1  http://127.0.0.1:{port}")),
        "{out:?}"
    );
    // The node's directory now belongs to dev1.
    let wrong = Command::new(BIN)
        .args([
            "server",
            "--name",
            "other",
            "--http",
            "127.0.0.1:0",
            "--peer",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path().join("dev1"))
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("belongs to node \"dev1\""),
        "{wrong:?}"
    );
}

/// `--log-format json`: every line the server logs is one JSON object (level, fields,
/// target); without it the lines are plain text.
#[test]
fn a_server_logs_json_lines_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("server.log");
    let mut child = Command::new(BIN)
        .args([
            "server",
            "--name",
            "j1",
            "--log-format",
            "json",
            "--data-dir",
        ])
        .arg(dir.path().join("data"))
        .args(["--http", "127.0.0.1:0", "--peer", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("node started")
    {
        assert!(Instant::now() < deadline, "the server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 2, "{text}");
    for line in lines {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            value.get("level").is_some() && value.get("fields").is_some(),
            "{line}"
        );
    }
}
