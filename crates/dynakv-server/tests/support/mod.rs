//! Helpers shared by the in-process cluster tests.
#![allow(clippy::unwrap_used, dead_code)]

/// One cluster secret file for every node these tests start (the operator's copy).
pub fn shared_secret_file() -> std::path::PathBuf {
    static FILE: std::sync::OnceLock<(tempfile::TempDir, std::path::PathBuf)> =
        std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.secret");
        dynakv_server::secrets::ClusterSecret::generate()
            .write(&path)
            .unwrap();
        (dir, path)
    })
    .1
    .clone()
}

/// A node running in this process, with a client for its HTTP port.
pub struct Node {
    pub server: dynakv_server::RunningServer,
    pub client: dynakv_client::Client,
    pub _dir: tempfile::TempDir,
}

/// The configuration of an in-memory node on 127.0.0.1 ports of its choosing, holding the
/// shared cluster secret, in `dir`.
pub fn memory_config(
    name: &str,
    dir: &std::path::Path,
    join: Option<std::net::SocketAddr>,
) -> dynakv_server::config::ServerConfig {
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut config = dynakv_server::config::ServerConfig::new(name, any, any, dir.to_owned());
    config.storage = dynakv_server::config::StorageKind::Memory;
    config.join = join;
    config.request_timeout_ms = 500;
    config.cluster_secret_file = Some(shared_secret_file());
    config
}

/// Start a node from `config(dir)` in a new temporary directory.
pub async fn start_node(
    config: impl FnOnce(&std::path::Path) -> dynakv_server::config::ServerConfig,
) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let server = dynakv_server::start(config(dir.path())).await.unwrap();
    let client = dynakv_client::Client::new(&format!("http://{}", server.http_addr)).unwrap();
    Node {
        server,
        client,
        _dir: dir,
    }
}

/// One request to `node`: its status and body as text.
pub async fn call(
    node: &Node,
    method: axum::http::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (axum::http::StatusCode, String) {
    let (status, _, body) = node
        .client
        .request(method, path, headers, bytes::Bytes::from(body.to_owned()))
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Poll `check` every 100 ms until it holds; panics after 30 s naming `what`.
pub async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Three in-memory nodes named `{prefix}1..3`, the second and third joined to the first,
/// once every node sees a settled ring of three.
pub async fn three_nodes(prefix: &str) -> Vec<Node> {
    let names: Vec<String> = (1..=3).map(|i| format!("{prefix}{i}")).collect();
    let first = start_node(|dir| memory_config(&names[0], dir, None)).await;
    let join = Some(first.server.peer_addr);
    let second = start_node(|dir| memory_config(&names[1], dir, join)).await;
    let third = start_node(|dir| memory_config(&names[2], dir, join)).await;
    let nodes = vec![first, second, third];
    wait_for("three members and a settled ring", async || {
        nodes.iter().all(|n| {
            let state = n.server.cluster.state();
            state.ring.current.nodes().len() == 3 && state.settled()
        })
    })
    .await;
    nodes
}

/// One PB request on a new connection to `node`'s PB port; the answer's code and body.
pub async fn pb(node: &Node, code: u8, message: &impl prost::Message) -> (u8, Vec<u8>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(node.server.pb_addr.unwrap())
        .await
        .unwrap();
    let mut frame = Vec::new();
    dynakv_pb::encode_frame(&mut frame, code, message);
    stream.write_all(&frame).await.unwrap();
    let mut prefix = [0u8; 4];
    stream.read_exact(&mut prefix).await.unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(prefix) as usize];
    stream.read_exact(&mut body).await.unwrap();
    (body[0], body[1..].to_vec())
}
