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

async fn exchange(addr: SocketAddr, request: &[u8], wait: Duration) -> Vec<u8> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    // Closed with a reset: tens of thousands of runs would otherwise leave as many sockets in
    // TIME_WAIT and run out of ephemeral ports (a harness failure, not the node's).
    #[allow(deprecated)] // Linger 0 resets at once: the drop does not block.
    stream.set_linger(Some(Duration::ZERO)).unwrap();
    let _ = stream.write_all(request).await;
    let _ = stream.shutdown().await;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(wait, stream.read_to_end(&mut response)).await;
    response
}

/// `GET /ping` on a kept-alive connection (reopened when it breaks): `true` on a 200.
async fn ping(connection: &mut Option<tokio::net::TcpStream>, addr: SocketAddr) -> bool {
    let request = b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n";
    for _ in 0..2 {
        if connection.is_none() {
            *connection = tokio::net::TcpStream::connect(addr).await.ok();
        }
        let Some(stream) = connection.as_mut() else {
            continue;
        };
        let mut response = [0_u8; 1024];
        let answered = async {
            stream.write_all(request).await.ok()?;
            let mut read = 0;
            // The whole answer: headers and the 2-byte body "OK".
            while !response[..read].ends_with(b"OK") {
                let n = stream.read(&mut response[read..]).await.ok()?;
                if n == 0 || read + n == response.len() {
                    return None;
                }
                read += n;
            }
            Some(response.starts_with(b"HTTP/1.1 200"))
        };
        match tokio::time::timeout(Duration::from_secs(3), answered).await {
            Ok(Some(ok)) => return ok,
            _ => *connection = None,
        }
    }
    false
}

fuzz_target!(|data: &[u8]| {
    static PING: std::sync::Mutex<Option<tokio::net::TcpStream>> = std::sync::Mutex::new(None);
    let node = node();
    node.runtime.block_on(async {
        // Most inputs are not HTTP at all; give half of them a request line to get further.
        let mut request = Vec::new();
        if data.first().is_some_and(|b| b % 2 == 0) {
            request.extend_from_slice(b"PUT /buckets/f/keys/");
        }
        request.extend_from_slice(data);
        let _ = exchange(node.addr, &request, Duration::from_millis(200)).await;
        // The node must still answer, on a connection of its own kept alive between runs
        // (a new connection per run would churn ports); a node that stopped fails every try.
        let mut connection = PING.lock().unwrap().take();
        let mut answered = false;
        for _ in 0..3 {
            if ping(&mut connection, node.addr).await {
                answered = true;
                break;
            }
        }
        *PING.lock().unwrap() = connection;
        assert!(answered, "the node stopped answering GET /ping");
    });
});
