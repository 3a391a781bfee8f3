//! Riak's PB port of a real node (memory storage, one node, 127.0.0.1): the fuzz input is
//! sent on a new connection, half the time as the body of a well-framed message of the code
//! its second byte names (so the protobuf decoders and handlers see it), else as raw bytes;
//! whatever it is, the node answers or closes, and then still answers a PB ping.
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
        config.pb_addr = Some(any);
        let server = runtime.block_on(dynakv_server::start(config)).unwrap();
        let addr = server.pb_addr.unwrap();
        std::mem::forget(server);
        Node {
            runtime,
            addr,
            _dir: dir,
        }
    })
}

async fn exchange(addr: SocketAddr, request: &[u8], wait: Duration) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    // Closed with a reset: no TIME_WAIT sockets piling up over many runs.
    #[allow(deprecated)]
    stream.set_linger(Some(Duration::ZERO)).unwrap();
    let _ = stream.write_all(request).await;
    let _ = stream.shutdown().await;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(wait, stream.read_to_end(&mut response)).await;
}

/// A PB ping on a kept-alive connection (reopened when it breaks): `true` when answered.
async fn ping(connection: &mut Option<tokio::net::TcpStream>, addr: SocketAddr) -> bool {
    for _ in 0..2 {
        if connection.is_none() {
            *connection = tokio::net::TcpStream::connect(addr).await.ok();
        }
        let Some(stream) = connection.as_mut() else {
            continue;
        };
        let answered = async {
            stream.write_all(&[0, 0, 0, 1, 1]).await.ok()?;
            let mut answer = [0u8; 5];
            stream.read_exact(&mut answer).await.ok()?;
            Some(answer == [0, 0, 0, 1, 2])
        };
        match tokio::time::timeout(Duration::from_secs(3), answered).await {
            Ok(Some(true)) => return true,
            _ => *connection = None,
        }
    }
    false
}

fuzz_target!(|data: &[u8]| {
    static PING: std::sync::Mutex<Option<tokio::net::TcpStream>> = std::sync::Mutex::new(None);
    let node = node();
    node.runtime.block_on(async {
        let mut request = Vec::new();
        match data {
            [mode, code, body @ ..] if mode % 2 == 0 => {
                let length = u32::try_from(body.len() + 1).unwrap_or(u32::MAX);
                request.extend_from_slice(&length.to_be_bytes());
                request.push(*code);
                request.extend_from_slice(body);
            }
            _ => request.extend_from_slice(data),
        }
        exchange(node.addr, &request, Duration::from_millis(200)).await;
        let mut connection = PING.lock().unwrap().take();
        let mut answered = false;
        for _ in 0..3 {
            if ping(&mut connection, node.addr).await {
                answered = true;
                break;
            }
        }
        *PING.lock().unwrap() = connection;
        assert!(answered, "the node stopped answering PB pings");
    });
});
