//! HTTPS on the client port (issue 17 item 3), in-process over real sockets: a node started
//! with a certificate made by rcgen serves dynakv-client over TLS; every request carries its
//! `ClientConnection`; plain HTTP, a garbage ClientHello and a handshake that never
//! finishes each close only their own connection, within the header read timeout, while the
//! node keeps serving.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use dynakv_client::{Client, ClientError, PutOptions};
use dynakv_server::RunningServer;
use dynakv_server::config::{ServerConfig, StorageKind};
use dynakv_server::http_serve::{self, ClientConnection, HttpLimits};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A test CA and a node certificate it signed for `localhost` and `127.0.0.1`, as PEM files.
struct Certs {
    ca_pem: String,
    cert: PathBuf,
    key: PathBuf,
}

fn make_certs(dir: &Path) -> Certs {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "dynakv test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let node_key = rcgen::KeyPair::generate().unwrap();
    let node_params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    let node_cert = node_params.signed_by(&node_key, &ca).unwrap();
    let cert = dir.join("node.pem");
    let key = dir.join("node.key");
    std::fs::write(&cert, node_cert.pem()).unwrap();
    std::fs::write(&key, node_key.serialize_pem()).unwrap();
    Certs {
        ca_pem: ca.pem(),
        cert,
        key,
    }
}

struct Node {
    server: RunningServer,
    addr: SocketAddr,
    certs: Certs,
    _dir: tempfile::TempDir,
}

async fn start_tls(limits: HttpLimits) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut config = ServerConfig::new("t1", any, any, dir.path().join("data"));
    config.storage = StorageKind::Memory;
    config.tls_cert_file = Some(certs.cert.clone());
    config.tls_key_file = Some(certs.key.clone());
    let server = dynakv_server::start_with_http(config, limits)
        .await
        .unwrap();
    let addr = server.http_addr;
    Node {
        server,
        addr,
        certs,
        _dir: dir,
    }
}

impl Node {
    fn client(&self) -> Client {
        Client::new(&format!("https://{}", self.addr))
            .unwrap()
            .with_ca_cert(self.certs.ca_pem.as_bytes())
            .unwrap()
            .with_timeout(Duration::from_secs(5))
    }

    async fn stop(self) {
        self.server.shutdown();
        tokio::time::timeout(Duration::from_secs(5), self.server.wait())
            .await
            .expect("the node stops within 5 s")
            .unwrap();
    }
}

/// Read until the server closes the connection (or `wait` passes: `None`).
fn read_to_close(stream: &mut TcpStream, wait: Duration) -> Option<Vec<u8>> {
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + wait;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Some(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Some(got),
            Err(_) => return None,
        }
        if Instant::now() > deadline {
            return None;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_and_get_over_https() {
    let node = start_tls(HttpLimits::default()).await;
    let client = node.client();
    client.ping().await.unwrap();
    let stored = client
        .put(
            "b",
            "k",
            Bytes::from_static(b"secret value"),
            &PutOptions::default(),
        )
        .await
        .unwrap();
    assert!(stored.context.is_some());
    let fetched = client
        .get("b", "k")
        .await
        .unwrap()
        .expect("the key is there");
    assert_eq!(fetched.siblings.len(), 1);
    assert_eq!(fetched.siblings[0].value.as_ref(), b"secret value");

    // The certificate names localhost too.
    let by_name = Client::new(&format!("https://localhost:{}", node.addr.port()))
        .unwrap()
        .with_ca_cert(node.certs.ca_pem.as_bytes())
        .unwrap();
    by_name.ping().await.unwrap();

    // A client that trusts another CA refuses the node's certificate.
    let other_dir = tempfile::tempdir().unwrap();
    let other = make_certs(other_dir.path());
    let stranger = Client::new(&format!("https://{}", node.addr))
        .unwrap()
        .with_ca_cert(other.ca_pem.as_bytes())
        .unwrap();
    let refused = stranger.ping().await.unwrap_err();
    assert!(
        matches!(&refused, ClientError::Connect { message, .. } if message.contains("certificate")),
        "{refused}"
    );
    // An https:// URL with no CA given says what is missing.
    let no_ca = Client::new(&format!("https://{}", node.addr)).unwrap();
    let missing = no_ca.ping().await.unwrap_err().to_string();
    assert!(missing.contains("CA certificate"), "{missing}");

    client.ping().await.unwrap();
    node.stop().await;
}

/// The contract other code builds on: every request served, plain or TLS, carries the
/// connection's `ClientConnection` (here echoed by a router of the test's own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_carries_its_client_connection() {
    async fn echo(request: axum::extract::Request) -> String {
        let authorization = request
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned();
        match request.extensions().get::<ClientConnection>() {
            Some(c) => format!("{} {} {authorization}", c.remote_addr, c.tls),
            None => "none".to_owned(),
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let tls = dynakv_server::tls::server_config(&certs.cert, &certs.key).unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut addrs = Vec::new();
    let mut tasks = Vec::new();
    for tls in [None, Some(tls)] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push(listener.local_addr().unwrap());
        let app = Router::new().route("/echo", get(echo));
        let mut stopped = stopped.clone();
        tasks.push(tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            http_serve::serve(listener, app, &HttpLimits::default(), tls, shutdown).await;
        }));
    }
    let plain = Client::new(&format!("http://{}", addrs[0])).unwrap();
    let secure = Client::new(&format!("https://{}", addrs[1]))
        .unwrap()
        .with_ca_cert(certs.ca_pem.as_bytes())
        .unwrap()
        .with_basic_auth("alice", "pa:ss");
    for (client, tls) in [(&plain, false), (&secure, true)] {
        for _ in 0..2 {
            // Twice: the second request reuses the kept-alive connection.
            let (status, _, body) = client
                .request(hyper::Method::GET, "/echo", &[], Bytes::new())
                .await
                .unwrap();
            assert_eq!(status, 200);
            let body = String::from_utf8_lossy(&body).into_owned();
            let fields: Vec<&str> = body.splitn(3, ' ').collect();
            let [addr, flag, authorization] = fields[..] else {
                panic!("{body}");
            };
            let addr: SocketAddr = addr.parse().unwrap();
            assert!(addr.ip().is_loopback() && addr.port() != 0, "{body}");
            assert_eq!(flag, tls.to_string(), "{body}");
            // base64("alice:pa:ss"): HTTP Basic splits at the first colon.
            let expected = if tls { "Basic YWxpY2U6cGE6c3M=" } else { "-" };
            assert_eq!(authorization, expected, "{body}");
        }
    }
    let _ = stop.send(true);
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_and_garbage_close_only_their_connection() {
    let node = start_tls(HttpLimits::default()).await;
    let client = node.client();
    client.ping().await.unwrap(); // a kept-alive TLS connection, used again below

    // Plain HTTP to the TLS port: no HTTP answer, the connection closes at once.
    let mut plain = TcpStream::connect(node.addr).unwrap();
    plain
        .write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let answer = read_to_close(&mut plain, Duration::from_secs(3)).expect("closed");
    assert!(!answer.starts_with(b"HTTP/"), "{answer:?}");
    let plain_client = Client::new(&format!("http://{}", node.addr))
        .unwrap()
        .with_timeout(Duration::from_secs(3));
    let e = plain_client.ping().await.unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }), "{e}");

    // A TLS record header announcing a ClientHello, then garbage.
    let mut garbage = TcpStream::connect(node.addr).unwrap();
    garbage
        .write_all(&[
            0x16, 0x03, 0x01, 0x00, 0x10, 0x01, 0x00, 0x00, 0x0c, 0xde, 0xad, 0xbe, 0xef, 0xde,
            0xad, 0xbe, 0xef, 0xde, 0xad, 0xbe, 0xef,
        ])
        .unwrap();
    let answer = read_to_close(&mut garbage, Duration::from_secs(3)).expect("closed");
    // At most a TLS alert record (content type 21), never an HTTP answer.
    assert!(answer.is_empty() || answer[0] == 0x15, "{answer:?}");

    // The node and the kept-alive connection go on.
    client.ping().await.unwrap();
    node.client().ping().await.unwrap();

    // A connection in its handshake does not hold the node's shutdown back.
    let _silent = TcpStream::connect(node.addr).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_that_never_finishes_is_closed_after_the_timeout() {
    let limits = HttpLimits {
        header_read_timeout: Duration::from_secs(1),
        max_connections: 2,
        ..HttpLimits::default()
    };
    let node = start_tls(limits).await;
    let client = node.client();
    client.ping().await.unwrap();
    // The pooled connection holds one of the 2 slots; drop it.
    drop(client);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let started = Instant::now();
    // One connection sends half a ClientHello, the other nothing: both hold a slot.
    let mut half = TcpStream::connect(node.addr).unwrap();
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .unwrap();
    let mut silent = TcpStream::connect(node.addr).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Meanwhile the cap is reached: a third connection is closed at once.
    let refused = node
        .client()
        .with_timeout(Duration::from_millis(900))
        .ping()
        .await;
    assert!(refused.is_err(), "past the cap: {refused:?}");

    for stream in [&mut half, &mut silent] {
        let answer = read_to_close(stream, Duration::from_secs(5)).expect("closed by the node");
        assert!(answer.is_empty() || answer[0] == 0x15, "{answer:?}");
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(4),
        "closed after {waited:?}"
    );
    // Their slots are free again.
    node.client().ping().await.unwrap();
    node.stop().await;
}
