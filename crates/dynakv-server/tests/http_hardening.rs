//! Issue 17's client-port rows, one test each, in-process over real sockets: HTTP that
//! cannot be held open (rows 11, 12), bounds on the write path (rows 13, 14, 16) and
//! cross-site requests (row 15). Each failed before its fix.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use axum::http::{Method, StatusCode};
use bytes::Bytes;
use dynakv_client::Client;
use dynakv_server::RunningServer;
use dynakv_server::config::{ServerConfig, StorageKind};
use dynakv_server::http_serve::HttpLimits;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

struct Node {
    server: RunningServer,
    client: Client,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

async fn start(adjust: impl FnOnce(&mut ServerConfig), limits: HttpLimits) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut config = ServerConfig::new("h1", any, any, dir.path().to_owned());
    config.storage = StorageKind::Memory;
    config.max_value_bytes = 64 * 1024;
    adjust(&mut config);
    let server = dynakv_server::start_with_http(config, limits)
        .await
        .unwrap();
    let addr = server.http_addr;
    let client = Client::new(&format!("http://{addr}")).unwrap();
    Node {
        server,
        client,
        addr,
        _dir: dir,
    }
}

impl Node {
    async fn req(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> (StatusCode, axum::http::HeaderMap, String) {
        let (status, headers, body) = self
            .client
            .request(method, path, headers, body.into())
            .await
            .unwrap();
        (status, headers, String::from_utf8_lossy(&body).into_owned())
    }

    async fn stop(self) {
        self.server.shutdown();
        tokio::time::timeout(Duration::from_secs(20), self.server.wait())
            .await
            .expect("the node stops")
            .unwrap();
    }
}

/// What a raw connection reads within `wait`: the text, "" for a close, `None` if nothing.
fn read_some(stream: &mut TcpStream, wait: Duration) -> Option<String> {
    stream.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 1024];
    match stream.read(&mut buf) {
        Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Some(String::new()),
        Err(_) => None,
    }
}

/// Row 11: 16 PUTs whose bodies never finish, against an in-flight limit of 4. They hold no
/// permit (a request is admitted once its body has arrived), so every other request is
/// served; and each is answered 408 and closed once the body read timeout passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puts_whose_bodies_never_finish_do_not_take_the_in_flight_permits() {
    let node = start(
        |config| config.max_in_flight_requests = 4,
        HttpLimits {
            body_read_timeout: Duration::from_secs(2),
            ..HttpLimits::default()
        },
    )
    .await;
    let started = Instant::now();
    let mut stalled: Vec<TcpStream> = (0..16)
        .map(|i| {
            let mut stream = TcpStream::connect(node.addr).unwrap();
            let head = format!(
                "PUT /buckets/b/keys/slow{i} HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n\
                 Content-Length: 1000\r\n\r\nhello"
            );
            stream.write_all(head.as_bytes()).unwrap();
            stream
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..8 {
        let path = format!("/buckets/b/keys/k{i}");
        let (status, _, body) = node.req(Method::PUT, &path, &[], "v").await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
        let (status, _, body) = node.req(Method::GET, &path, &[], "").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "v"));
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "served while they stall"
    );
    // Each stalled request is answered 408 once its body is late, and nothing was stored.
    let answers = tokio::task::spawn_blocking(move || {
        stalled
            .iter_mut()
            .map(|s| read_some(s, Duration::from_secs(5)).unwrap_or_default())
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for answer in &answers {
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    }
    assert!(started.elapsed() < Duration::from_secs(6));
    let (status, _, _) = node
        .req(Method::GET, "/buckets/b/keys/slow0", &[], "")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    node.stop().await;
}

/// Row 12: 300 idle connections against a cap of 32. The node holds at most the cap (the
/// others are refused and closed at once), the held ones are closed after the header read
/// timeout, and the node serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_past_the_cap_are_refused_and_idle_ones_time_out() {
    const CAP: usize = 32;
    const OPENED: usize = 300;
    let node = start(
        |_| {},
        HttpLimits {
            max_connections: CAP,
            header_read_timeout: Duration::from_secs(3),
            ..HttpLimits::default()
        },
    )
    .await;
    let addr = node.addr;
    let (refused, held) = tokio::task::spawn_blocking(move || {
        let streams: Vec<TcpStream> = (0..OPENED)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(700));
        let (mut refused, mut held) = (0, Vec::new());
        for mut stream in streams {
            match read_some(&mut stream, Duration::from_millis(5)) {
                Some(answer) => {
                    assert!(
                        answer.is_empty() || answer.starts_with("HTTP/1.1 503"),
                        "{answer}"
                    );
                    refused += 1;
                }
                None => held.push(stream),
            }
        }
        // The held ones, idle, are closed by the server once the header read timeout passes.
        std::thread::sleep(Duration::from_secs(3));
        for stream in &mut held {
            let closed = read_some(stream, Duration::from_secs(2));
            assert!(closed.is_some(), "an idle connection is still open");
        }
        (refused, held.len())
    })
    .await
    .unwrap();
    assert!(held <= CAP, "held {held} connections, cap {CAP}");
    assert_eq!(refused + held, OPENED);
    // The held idle connections were closed by the header read timeout: there is room.
    let (status, _, body) = node.req(Method::GET, "/ping", &[], "").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "OK"));
    node.stop().await;
}

/// Row 13: blind large PUTs to one key. The write that would make the object (all its
/// siblings) larger than `MAX_WRITE_OBJECT_BYTES` is refused with 409 and a message asking
/// to resolve, and is not stored; the key still reads, and a write with its context
/// resolves it. Before: the object grew past `MAX_OBJECT_BYTES` and every later request of
/// the key answered 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blind_large_puts_to_one_key_are_refused_before_the_object_is_unusable() {
    const MIB: usize = 1024 * 1024;
    let node = start(|config| config.max_value_bytes = MIB, HttpLimits::default()).await;
    let path = "/buckets/big/keys/k";
    let value = Bytes::from(vec![b'x'; MIB]);
    let mut refused = None;
    for i in 0..80 {
        let (status, _, body) = node.req(Method::PUT, path, &[], value.clone()).await;
        if status != StatusCode::NO_CONTENT {
            refused = Some((i, status, body));
            break;
        }
    }
    let (accepted, status, body) = refused.expect("a blind put is refused");
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body.contains("resolve the siblings"), "{body}");
    // The refused write was not stored: the key holds what was accepted, and reads.
    let (status, headers, body) = node
        .req(Method::GET, path, &[("accept", "text/plain")], "")
        .await;
    assert_eq!(status, StatusCode::MULTIPLE_CHOICES, "{body}");
    assert_eq!(body.lines().count(), 1 + accepted, "{accepted} siblings");
    let context = headers.get("x-riak-vclock").unwrap().to_str().unwrap();
    let (status, _, body) = node
        .req(Method::PUT, path, &[("x-riak-vclock", context)], "resolved")
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, _, body) = node.req(Method::GET, path, &[], "").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "resolved"));
    let (status, _, _) = node.req(Method::DELETE, path, &[], "").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    node.stop().await;
}

/// Row 14: concurrent multipart GETs of a large sibling set, read by nobody. The bytes of
/// responses being sent are bounded by the node's response budget: past it a GET is
/// answered 503 at once instead of building one more copy of the object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_gets_of_a_large_sibling_set_are_bounded_by_the_response_budget() {
    const MIB: usize = 1024 * 1024;
    const SIBLINGS: usize = 12;
    let node = start(
        |config| config.max_value_bytes = MIB,
        HttpLimits {
            response_budget_bytes: 16 * MIB,
            ..HttpLimits::default()
        },
    )
    .await;
    let path = "/buckets/big/keys/k";
    for i in 0..SIBLINGS {
        let value = Bytes::from(vec![b'a' + i as u8; MIB]);
        let (status, _, _) = node.req(Method::PUT, path, &[], value).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
    }
    let addr = node.addr;
    let answers = tokio::task::spawn_blocking(move || {
        let mut streams = Vec::new();
        let mut answers = Vec::new();
        for _ in 0..5 {
            let mut stream = TcpStream::connect(addr).unwrap();
            stream
                .write_all(
                    format!("GET {path} HTTP/1.1\r\nHost: x\r\nAccept: multipart/mixed\r\n\r\n")
                        .as_bytes(),
                )
                .unwrap();
            // Read the status line only, then leave the response unread.
            let answer = read_some(&mut stream, Duration::from_secs(5)).unwrap_or_default();
            answers.push(answer.lines().next().unwrap_or_default().to_owned());
            streams.push(stream);
        }
        answers
    })
    .await
    .unwrap();
    let sending = answers.iter().filter(|a| a.contains(" 300 ")).count();
    let refused = answers.iter().filter(|a| a.contains(" 503 ")).count();
    // One 12 MiB response fits the 16 MiB budget; a second would not.
    assert_eq!((sending, refused), (1, 4), "{answers:?}");
    // The unread responses were dropped with their connections: the budget is back.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, _, body) = node
        .req(Method::GET, path, &[("accept", "multipart/mixed")], "")
        .await;
    assert_eq!(status, StatusCode::MULTIPLE_CHOICES);
    assert!(body.len() > SIBLINGS * MIB);
    node.stop().await;
}

/// Row 15 (cross-site part): state-changing requests from a web page of a foreign origin
/// (a `text/plain` POST needs no CORS preflight) are refused with 403 and change nothing;
/// reads and clients that send no `Origin` are served; an allowed origin is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_changing_requests_from_a_foreign_origin_are_refused() {
    let node = start(
        |_| {},
        HttpLimits {
            allowed_origins: vec!["http://console.example:8098".into()],
            ..HttpLimits::default()
        },
    )
    .await;
    let evil = [
        ("origin", "http://evil.example"),
        ("content-type", "text/plain"),
    ];
    let (status, _, body) = node.req(Method::POST, "/admin/leave", &evil, "").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("cross-site"), "{body}");
    let props = r#"{"props":{"last_write_wins":true,"allow_mult":false}}"#;
    let (status, _, _) = node
        .req(
            Method::PUT,
            "/buckets/b/props",
            &[
                ("origin", "http://evil.example"),
                ("content-type", "application/json"),
            ],
            props,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    for method in [Method::PUT, Method::POST, Method::DELETE] {
        let (status, _, _) = node.req(method, "/buckets/b/keys/k", &evil, "x").await;
        assert_eq!(status, StatusCode::FORBIDDEN);
    }
    // Nothing changed.
    let (status, _, body) = node.req(Method::GET, "/buckets/b/props", &evil, "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains(r#""last_write_wins":false"#), "{body}");
    let (status, _, _) = node.req(Method::GET, "/buckets/b/keys/k", &evil, "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, _, status_body) = node.req(Method::GET, "/admin/members", &[], "").await;
    assert!(status_body.contains(r#""status":"valid""#), "{status_body}");
    // No Origin (any client that is not a browser), or an allowed one: served.
    let (status, _, _) = node.req(Method::PUT, "/buckets/b/keys/k", &[], "v").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let allowed = [("origin", "http://console.example:8098")];
    let (status, _, _) = node
        .req(Method::PUT, "/buckets/b/keys/k2", &allowed, "v")
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    node.stop().await;
}

/// Row 16: with `MAX_CUSTOM_BUCKETS` buckets holding custom properties (as gossip brings
/// them), a change for one more bucket is refused with 400 and a clear message at the
/// node that receives it, and changes nothing there; buckets that have properties may
/// still change them. Before: acknowledged, and kept on this node alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_props_change_past_the_custom_bucket_limit_is_refused_where_it_is_received() {
    use dynakv_core::membership::{BucketPropsEntry, MAX_CUSTOM_BUCKETS};
    use dynakv_core::message::PeerMessage;
    let node = start(|_| {}, HttpLimits::default()).await;
    let cluster = &node.server.cluster;
    let mut gossip = (*cluster.state()).clone();
    let other = dynakv_core::ring::NodeId("other".into());
    for i in 0..MAX_CUSTOM_BUCKETS {
        gossip.bucket_props.insert(
            format!("custom{i}"),
            BucketPropsEntry {
                timestamp_ms: 1,
                node: other.clone(),
                props_json: Some(r#"{"n_val":2}"#.into()),
            },
        );
    }
    let from = dynakv_server::transport::PeerInfo {
        node_name: "other".into(),
        public_key: [0; 32],
        remote_addr: "127.0.0.1:9".parse().unwrap(),
        clock_offset_ms: 0,
        protocol_version: dynakv_server::transport::PROTOCOL_VERSION,
    };
    let reply = std::sync::Arc::clone(cluster)
        .handle_peer(from, PeerMessage::Gossip(Box::new(gossip)))
        .await;
    assert!(matches!(reply, PeerMessage::Gossip(_)));
    assert_eq!(cluster.state().bucket_props.len(), MAX_CUSTOM_BUCKETS);
    let json = [("content-type", "application/json")];
    let (status, _, body) = node
        .req(
            Method::PUT,
            "/buckets/one-more/props",
            &json,
            r#"{"props":{"n_val":1}}"#,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("at most 10000 buckets"), "{body}");
    let (status, _, _) = node
        .req(Method::DELETE, "/buckets/one-more/props", &[], "")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (_, _, body) = node
        .req(Method::GET, "/buckets/one-more/props", &[], "")
        .await;
    assert!(body.contains(r#""n_val":3"#), "{body}");
    assert_eq!(cluster.state().bucket_props.len(), MAX_CUSTOM_BUCKETS);
    // A bucket that has its own properties may change them.
    let (status, _, body) = node
        .req(
            Method::PUT,
            "/buckets/custom7/props",
            &json,
            r#"{"props":{"n_val":1}}"#,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    node.stop().await;
}

/// HTTP/1.1 pipelining (issue 19): requests written at once on one connection, a write then
/// reads of it and of a missing key, are each served, in order, with nothing lost between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    let node = start(|_| {}, HttpLimits::default()).await;
    let addr = node.addr;
    let answers = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        let put = "PUT /buckets/p/keys/k HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n\
                   Content-Length: 5\r\n\r\nhello";
        let get = "GET /buckets/p/keys/k HTTP/1.1\r\nHost: x\r\n\r\n";
        let missing = "GET /buckets/p/keys/none HTTP/1.1\r\nHost: x\r\n\r\n";
        let last = "GET /buckets/p/keys/k HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        let batch = [put, get, missing, last].concat();
        stream.write_all(batch.as_bytes()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut all = Vec::new();
        stream.read_to_end(&mut all).unwrap();
        String::from_utf8_lossy(&all).into_owned()
    })
    .await
    .unwrap();
    let statuses: Vec<&str> = answers
        .match_indices("HTTP/1.1 ")
        .map(|(at, _)| &answers[at + 9..at + 12])
        .collect();
    assert_eq!(statuses, ["204", "200", "404", "200"], "{answers}");
    assert_eq!(answers.matches("hello").count(), 2, "{answers}");
    node.stop().await;
}
