//! The HTTP request path through a real node (memory storage, one node, 127.0.0.1): the fuzz
//! input is sent as raw bytes on a new connection; whatever it is, the node answers or closes,
//! and then still answers `GET /ping`.
#![no_main]

use dynakv_server::config::{ServerConfig, StorageKind};
use libfuzzer_sys::fuzz_target;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Node {
    runtime: tokio::runtime::Runtime,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

fn node() -> &'static Node {
    static NODE: OnceLock<Node> = OnceLock::new();
    NODE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut config = ServerConfig::new("fuzz", any, any, dir.path().to_owned());
        config.storage = StorageKind::Memory;
        let server = runtime.block_on(dynakv_server::start(config)).unwrap();
        let addr = server.http_addr;
        std::mem::forget(server);
        Node {
            runtime,
            addr,
            _dir: dir,
        }
    })
}

async fn exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    // Closed with a reset: tens of thousands of runs would otherwise leave as many sockets in
    // TIME_WAIT and run out of ephemeral ports (a harness failure, not the node's).
    stream.set_linger(Some(Duration::ZERO)).unwrap();
    let _ = stream.write_all(request).await;
    let _ = stream.shutdown().await;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_millis(500),
        stream.read_to_end(&mut response),
    )
    .await;
    response
}

fuzz_target!(|data: &[u8]| {
    let node = node();
    node.runtime.block_on(async {
        // Most inputs are not HTTP at all; give half of them a request line to get further.
        let mut request = Vec::new();
        if data.first().is_some_and(|b| b % 2 == 0) {
            request.extend_from_slice(b"PUT /buckets/f/keys/");
        }
        request.extend_from_slice(data);
        let _ = exchange(node.addr, &request).await;
        // The node must still answer (a few tries: one slow answer is not a failure).
        let mut answers = Vec::new();
        for _ in 0..5 {
            let ping = exchange(
                node.addr,
                b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .await;
            if ping.starts_with(b"HTTP/1.1 200") {
                return;
            }
            answers.push(String::from_utf8_lossy(&ping).into_owned());
        }
        panic!("the node stopped answering: {answers:?}");
    });
});
