//! The Riak-compatible HTTP API of one node, end to end over real sockets: the happy paths,
//! siblings and their resolution, and every kind of bad input (which must get a clear 4xx and
//! change nothing).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use axum::http::{HeaderMap, Method, StatusCode};
use bytes::Bytes;
use dynakv_client::Client;
use dynakv_server::RunningServer;
use dynakv_server::config::{ServerConfig, StorageKind};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

struct Node {
    server: Option<RunningServer>,
    client: Client,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

async fn start(storage: StorageKind) -> Node {
    start_with(storage, |_| {}).await
}

async fn start_with(storage: StorageKind, adjust: impl FnOnce(&mut ServerConfig)) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut config = ServerConfig::new("t1", any, any, dir.path().to_owned());
    config.storage = storage;
    config.max_value_bytes = 64 * 1024;
    adjust(&mut config);
    let server = dynakv_server::start(config).await.unwrap();
    let addr = server.http_addr;
    let client = Client::new(&format!("http://{addr}")).unwrap();
    Node {
        server: Some(server),
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
        body: &str,
    ) -> (StatusCode, HeaderMap, String) {
        let (status, headers, body) = self
            .client
            .request(method, path, headers, Bytes::from(body.to_owned()))
            .await
            .unwrap();
        (status, headers, String::from_utf8_lossy(&body).into_owned())
    }

    async fn put(&self, path: &str, value: &str, context: Option<&str>) -> (StatusCode, String) {
        let mut headers = vec![("content-type", "text/plain")];
        if let Some(c) = context {
            headers.push(("x-riak-vclock", c));
        }
        let (status, _, body) = self.req(Method::PUT, path, &headers, value).await;
        (status, body)
    }

    async fn vclock(&self, path: &str) -> String {
        let (_, headers, _) = self.req(Method::GET, path, &[], "").await;
        headers
            .get("x-riak-vclock")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned()
    }

    async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown();
            server.wait().await.unwrap();
        }
    }
}

#[tokio::test]
async fn discovery_ping_stats() {
    let node = start(StorageKind::Memory).await;
    let (status, _, body) = node.req(Method::GET, "/ping", &[], "").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "OK"));
    let (status, headers, body) = node
        .req(Method::GET, "/", &[("accept", "application/json")], "")
        .await;
    assert_eq!(status, StatusCode::OK);
    let resources: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(resources["riak_kv_wm_buckets"], "/buckets");
    assert!(
        resources
            .as_object()
            .unwrap()
            .values()
            .all(serde_json::Value::is_string)
    );
    assert!(headers.get("link").is_some());
    let stats = node.client.get_json("/stats").await.unwrap();
    assert_eq!(stats["riak_kv_version"], "2.1.4");
    // The node's process and its CPU time (a load generator's CPU per operation).
    assert_eq!(stats["process_id"], std::process::id());
    assert!(
        stats["process_cpu_seconds"]
            .as_f64()
            .is_some_and(|s| s > 0.0),
        "{stats}"
    );
    node.stop().await;
}

#[tokio::test]
async fn store_fetch_metadata_and_conditional_get() {
    let node = start(StorageKind::Disk).await;
    let (status, _, _) = node
        .req(
            Method::PUT,
            "/buckets/users/keys/alice",
            &[
                ("content-type", "application/json"),
                ("x-riak-meta-color", "blue"),
            ],
            "{\"age\":30}",
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, headers, body) = node
        .req(Method::GET, "/buckets/users/keys/alice", &[], "")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "{\"age\":30}");
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["x-riak-meta-color"], "blue");
    let etag = headers["etag"].to_str().unwrap().to_owned();
    let last_modified = headers["last-modified"].to_str().unwrap().to_owned();
    assert!(
        httpdate::parse_http_date(&last_modified).is_ok(),
        "RFC 1123 date"
    );
    let (status, _, _) = node
        .req(
            Method::GET,
            "/buckets/users/keys/alice",
            &[("if-none-match", &etag)],
            "",
        )
        .await;
    assert_eq!(status, StatusCode::NOT_MODIFIED);
    // Same key through the bucket-type path, and an encoded key with a space and a slash.
    let (status, _, body) = node
        .req(
            Method::GET,
            "/types/default/buckets/users/keys/alice",
            &[],
            "",
        )
        .await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "{\"age\":30}"));
    node.put("/buckets/users/keys/a%2Fb+c", "odd", None).await;
    let fetched = node.client.get("users", "a/b c").await.unwrap().unwrap();
    assert_eq!(fetched.siblings[0].value, Bytes::from_static(b"odd"));
    node.stop().await;
}

#[tokio::test]
async fn siblings_are_kept_and_resolved_with_the_context() {
    let node = start(StorageKind::Memory).await;
    let path = "/buckets/b/keys/k";
    node.put(path, "red", None).await;
    let base = node.vclock(path).await;
    // Two writes with the same stale context: both kept.
    node.put(path, "green", Some(&base)).await;
    node.put(path, "blue", Some(&base)).await;
    let (status, headers, body) = node.req(Method::GET, path, &[], "").await;
    assert_eq!(status, StatusCode::MULTIPLE_CHOICES);
    assert_eq!(headers["content-type"], "text/plain");
    let vtags: Vec<&str> = body.lines().skip(1).collect();
    assert!(body.starts_with("Siblings:\n"));
    assert_eq!(vtags.len(), 2);
    let mut seen = Vec::new();
    for vtag in &vtags {
        let (status, headers, value) = node
            .req(Method::GET, &format!("{path}?vtag={vtag}"), &[], "")
            .await;
        assert_eq!(status, StatusCode::OK);
        assert!(headers.contains_key("x-riak-vclock"));
        seen.push(value);
    }
    seen.sort();
    assert_eq!(seen, vec!["blue".to_owned(), "green".to_owned()]);
    // Multipart form, parsed by the client.
    let fetched = node.client.get("b", "k").await.unwrap().unwrap();
    let mut values: Vec<_> = fetched.siblings.iter().map(|s| s.value.clone()).collect();
    values.sort();
    assert_eq!(
        values,
        vec![Bytes::from_static(b"blue"), Bytes::from_static(b"green")]
    );
    // Resolve: write back with the context of the read.
    let context = fetched.context.unwrap();
    let (status, _, body) = node
        .req(
            Method::PUT,
            &format!("{path}?returnbody=true"),
            &[("content-type", "text/plain"), ("x-riak-vclock", &context)],
            "teal",
        )
        .await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "teal"));
    let (status, _, body) = node.req(Method::GET, path, &[], "").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "teal"));
    node.stop().await;
}

#[tokio::test]
async fn delete_with_context_leaves_a_tombstone_context() {
    let node = start(StorageKind::Memory).await;
    let path = "/buckets/b/keys/gone";
    node.put(path, "v", None).await;
    node.put("/buckets/b/keys/kept", "v", None).await;
    let context = node.vclock(path).await;
    let (status, _, _) = node
        .req(Method::DELETE, path, &[("x-riak-vclock", &context)], "")
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, headers, _) = node.req(Method::GET, path, &[], "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(headers.contains_key("x-riak-vclock"));
    assert_eq!(headers["x-riak-deleted"], "true");
    let (status, _, _) = node.req(Method::DELETE, path, &[], "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let keys = node
        .client
        .get_json("/buckets/b/keys?keys=true")
        .await
        .unwrap();
    assert_eq!(keys["keys"], serde_json::json!(["kept"]));
    // A write with the tombstone's context replaces it.
    let tomb = node.vclock(path).await;
    node.put(path, "again", Some(&tomb)).await;
    let (status, _, body) = node.req(Method::GET, path, &[], "").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "again"));
    node.stop().await;
}

#[tokio::test]
async fn create_with_server_key_and_listings() {
    let node = start(StorageKind::Disk).await;
    let (status, headers, _) = node
        .req(
            Method::POST,
            "/buckets/made/keys",
            &[("content-type", "text/plain")],
            "x",
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let location = headers["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with("/buckets/made/keys/"));
    let key = location.rsplit('/').next().unwrap().to_owned();
    let (status, _, body) = node.req(Method::GET, &location, &[], "").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "x"));
    for i in 0..2500 {
        node.put(&format!("/buckets/many/keys/k{i:05}"), "v", None)
            .await;
    }
    let listed = node
        .client
        .get_json("/buckets/many/keys?keys=true")
        .await
        .unwrap();
    assert_eq!(listed["keys"].as_array().unwrap().len(), 2500);
    let (status, _, body) = node
        .req(Method::GET, "/buckets/many/keys?keys=stream", &[], "")
        .await;
    assert_eq!(status, StatusCode::OK);
    let streamed: usize = serde_json::Deserializer::from_str(&body)
        .into_iter::<serde_json::Value>()
        .map(|chunk| chunk.unwrap()["keys"].as_array().unwrap().len())
        .sum();
    assert_eq!(streamed, 2500);
    let buckets = node.client.get_json("/buckets?buckets=true").await.unwrap();
    assert_eq!(buckets["buckets"], serde_json::json!(["made", "many"]));
    let made = node
        .client
        .get_json("/buckets/made/keys?keys=true")
        .await
        .unwrap();
    assert_eq!(made["keys"], serde_json::json!([key]));
    let preflist = node
        .client
        .get_json("/buckets/made/keys/x/preflist")
        .await
        .unwrap();
    assert_eq!(preflist["preflist"][0]["node"], "t1");
    assert_eq!(preflist["preflist"][0]["primary"], true);
    node.stop().await;
}

#[tokio::test]
async fn bucket_props_roundtrip_and_refusals() {
    let node = start(StorageKind::Memory).await;
    let json = [("content-type", "application/json")];
    let (status, _, _) = node
        .req(
            Method::PUT,
            "/buckets/p/props",
            &json,
            r#"{"props":{"n_val":2,"r":1}}"#,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let props = node.client.get_json("/buckets/p/props").await.unwrap();
    assert_eq!(props["props"]["n_val"], 2);
    assert_eq!(props["props"]["r"], 1);
    for bad in [
        r#"{"props":{"no_such_prop":1}}"#,
        r#"{"props":{"n_val":0}}"#,
        r#"{"props":{"w":7}}"#,
        r#"{"props":{"allow_mult":"yes"}}"#,
        r#"{"n_val":2}"#,
        "not json",
    ] {
        let (status, _, body) = node.req(Method::PUT, "/buckets/p/props", &json, bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert!(!body.is_empty());
    }
    let after = node.client.get_json("/buckets/p/props").await.unwrap();
    assert_eq!(after, props, "refused updates change nothing");
    let (status, _, _) = node.req(Method::DELETE, "/buckets/p/props", &[], "").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let reset = node.client.get_json("/buckets/p/props").await.unwrap();
    assert_eq!(reset["props"]["n_val"], 3);
    node.stop().await;
}

#[tokio::test]
async fn last_write_wins_and_allow_mult_false() {
    let node = start(StorageKind::Memory).await;
    let json = [("content-type", "application/json")];
    node.req(
        Method::PUT,
        "/buckets/lww/props",
        &json,
        r#"{"props":{"allow_mult":false,"last_write_wins":true}}"#,
    )
    .await;
    node.put("/buckets/lww/keys/k", "one", None).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    node.put("/buckets/lww/keys/k", "two", None).await;
    let (status, _, body) = node.req(Method::GET, "/buckets/lww/keys/k", &[], "").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "two"));
    node.req(
        Method::PUT,
        "/buckets/single/props",
        &json,
        r#"{"props":{"allow_mult":false}}"#,
    )
    .await;
    node.put("/buckets/single/keys/k", "one", None).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    node.put("/buckets/single/keys/k", "two", None).await;
    let (status, _, body) = node
        .req(Method::GET, "/buckets/single/keys/k", &[], "")
        .await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "two"));
    node.stop().await;
}

#[tokio::test]
async fn bad_names_methods_and_parameters_are_refused() {
    let node = start(StorageKind::Memory).await;
    let long_key = "k".repeat(2000);
    for (method, path) in [
        (Method::PUT, "/buckets/b/keys/".to_owned()),
        (Method::GET, "/buckets/b/keys/".to_owned()),
        (Method::PUT, format!("/buckets/b/keys/{long_key}")),
        (Method::GET, format!("/buckets/b/keys/{long_key}")),
        (Method::PUT, "/buckets/b/keys/k?w=abc".to_owned()),
        (Method::PUT, "/buckets/b/keys/k?w=9".to_owned()),
        (Method::GET, "/buckets/b/keys/k?r=many".to_owned()),
        (Method::PUT, "/buckets/b/keys/k?returnbody=maybe".to_owned()),
        (Method::GET, "/buckets/b/keys".to_owned()),
        (Method::GET, "/buckets/b/keys/%FF".to_owned()),
    ] {
        let (status, _, body) = node.req(method.clone(), &path, &[], "v").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{method} {path}: {body}");
        assert!(!body.trim().is_empty(), "{method} {path}: {body:?}");
    }
    let (status, _, _) = node.req(Method::PATCH, "/buckets/b/keys/k", &[], "").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let (status, _, _) = node.req(Method::DELETE, "/ping", &[], "").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    let keys = node.client.get_json("/buckets?buckets=true").await.unwrap();
    assert_eq!(
        keys["buckets"],
        serde_json::json!([]),
        "nothing was written"
    );
    node.stop().await;
}

#[tokio::test]
async fn malformed_forged_or_foreign_contexts_are_refused_and_change_nothing() {
    let node = start(StorageKind::Memory).await;
    let path = "/buckets/b/keys/k";
    node.put(path, "original", None).await;
    node.put("/buckets/b/keys/other", "x", None).await;
    let good = node.vclock(path).await;
    let foreign = node.vclock("/buckets/b/keys/other").await;
    // Flip one character of a valid context: still base64, no longer authentic.
    let mut forged: Vec<char> = good.chars().collect();
    forged[4] = if forged[4] == 'A' { 'B' } else { 'A' };
    let forged: String = forged.into_iter().collect();
    for context in [
        "not base64!",
        "AAAA",
        "a",
        &forged,
        &foreign,
        &"A".repeat(20_000),
    ] {
        let (status, body) = node.put(path, "overwrite", Some(context)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{context}: {body}");
        assert!(body.contains("X-Riak-Vclock"), "{body}");
        let (status, _, _) = node
            .req(Method::DELETE, path, &[("x-riak-vclock", context)], "")
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }
    let (status, _, body) = node.req(Method::GET, path, &[], "").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "original"));
    // Conditional create refuses an existing key.
    let (status, _, _) = node
        .req(Method::PUT, path, &[("if-none-match", "*")], "new")
        .await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED);
    node.stop().await;
}

/// Write raw bytes to the API and read the whole answer (the server closes or answers).
fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut response = vec![0u8; 4096];
    let n = stream.read(&mut response).unwrap();
    String::from_utf8_lossy(&response[..n]).into_owned()
}

#[tokio::test]
async fn oversized_values_are_refused_before_the_body_is_read() {
    let node = start(StorageKind::Memory).await;
    let addr = node.addr;
    // Only the headers are sent: the 413 must come from Content-Length alone.
    let answer = tokio::task::spawn_blocking(move || {
        raw_exchange(
            addr,
            b"PUT /buckets/b/keys/big HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 1000000000\r\n\r\n",
        )
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // Chunked without a length: cut off at the limit.
    let big = "x".repeat(70 * 1024);
    let (status, _, _) = node
        .req(Method::PUT, "/buckets/b/keys/big", &[], &big)
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let addr = node.addr;
    let answer = tokio::task::spawn_blocking(move || {
        let mut request =
            b"PUT /buckets/b/keys/big HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                .to_vec();
        for _ in 0..20 {
            request.extend_from_slice(b"1000\r\n");
            request.extend_from_slice(&[b'y'; 0x1000]);
            request.extend_from_slice(b"\r\n");
        }
        request.extend_from_slice(b"0\r\n\r\n");
        raw_exchange(addr, &request)
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    let (status, _, _) = node.req(Method::GET, "/buckets/b/keys/big", &[], "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Exactly at the limit is fine.
    let fits = "z".repeat(64 * 1024);
    let (status, _) = node.put("/buckets/b/keys/big", &fits, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    node.stop().await;
}

#[tokio::test]
async fn old_style_riak_paths_reach_the_same_objects() {
    let node = start(StorageKind::Memory).await;
    node.put("/riak/old/k", "v1", None).await;
    let (status, _, body) = node.req(Method::GET, "/buckets/old/keys/k", &[], "").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "v1"));
    let context = node.vclock("/riak/old/k").await;
    node.put("/buckets/old/keys/k", "v2", Some(&context)).await;
    let (status, _, body) = node.req(Method::GET, "/riak/old/k", &[], "").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "v2"));
    let props = node.client.get_json("/riak/old").await.unwrap();
    assert_eq!(props["props"]["n_val"], 3);
    let (status, _, _) = node.req(Method::DELETE, "/riak/old/k", &[], "").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _, _) = node.req(Method::GET, "/buckets/old/keys/k", &[], "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excess_requests_are_shed_at_once_and_the_node_recovers() {
    let node = Arc::new(
        start_with(StorageKind::Disk, |config| {
            config.max_in_flight_requests = 2;
            config.flush_interval_ms = 60_000;
            config.group_commit_window_ms = 1_000;
        })
        .await,
    );
    // A durable write syncs at once and starts the group commit window: the next two
    // durable writes wait for its end, each holding an in-flight permit. (A request whose
    // body stalls holds none: it is admitted once its body has arrived.)
    let (status, _) = node.put("/buckets/b/keys/first?dw=all", "v", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let waiting: Vec<_> = (0..2)
        .map(|i| {
            let node = Arc::clone(&node);
            tokio::spawn(async move {
                node.put(
                    &format!("/buckets/b/keys/slow{i}?dw=all"),
                    "helloworld",
                    None,
                )
                .await
                .0
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;

    // A third data request is refused at once, with a reason and Retry-After.
    let started = std::time::Instant::now();
    let (status, headers, body) = node.req(Method::GET, "/buckets/b/keys/k", &[], "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(body.contains("overloaded"), "{body}");
    assert_eq!(headers.get("retry-after").unwrap(), "1");
    let (status, _, _) = node.req(Method::PUT, "/riak/b/k", &[], "v").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    // The node can still be observed.
    let (status, _, _) = node.req(Method::GET, "/ping", &[], "").await;
    assert_eq!(status, StatusCode::OK);
    let (_, _, stats) = node.req(Method::GET, "/stats", &[], "").await;
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["requests_shed_total"], 2);

    // The waiting writes finish and are stored; then requests are served again.
    for put in waiting {
        assert_eq!(put.await.unwrap(), StatusCode::NO_CONTENT);
    }
    let (status, _, body) = node
        .req(Method::GET, "/buckets/b/keys/slow0", &[], "")
        .await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "helloworld"));
    Arc::into_inner(node).unwrap().stop().await;
}

/// One keep-alive connection that sends durable puts (each waits for a group commit, so it
/// is slow once admitted), until `stop`; returns how many were answered 204 and how many
/// 503.
fn slow_put_loop(id: usize, addr: SocketAddr, stop: &std::sync::atomic::AtomicBool) -> (u32, u32) {
    let (mut ok, mut shed) = (0, 0);
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        // A key per put: blind puts to one key would pile up siblings to their limit.
        let request = format!(
            "PUT /buckets/b/keys/slow{id}-{}?dw=all HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n\r\nhelloworld",
            ok + shed
        );
        stream.write_all(request.as_bytes()).unwrap();
        let mut buf = [0u8; 1024];
        let n = stream.read(&mut buf).unwrap();
        let answer = String::from_utf8_lossy(&buf[..n]);
        if answer.starts_with("HTTP/1.1 204") {
            ok += 1;
        } else if answer.starts_with("HTTP/1.1 503") {
            shed += 1;
            stream = std::net::TcpStream::connect(addr).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
        } else {
            panic!("unexpected answer: {answer}");
        }
    }
    (ok, shed)
}

/// One counter or gauge of the node's `/stats`.
async fn stat(node: &Node, name: &str) -> u64 {
    let (_, _, stats) = node.req(Method::GET, "/stats", &[], "").await;
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    stats[name].as_u64().unwrap()
}

async fn in_flight_limit(node: &Node) -> u64 {
    stat(node, "in_flight_limit").await
}

/// The in-flight limit adapts: while every permit is taken and admitted requests take longer
/// than `overload_latency_target_ms`, the limit shrinks below `max_in_flight_requests` (so the
/// excess is answered 503 instead of waiting); once the pressure is gone it grows back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_slow_node_lowers_its_in_flight_limit_and_restores_it_after() {
    let node = start_with(StorageKind::Disk, |config| {
        config.max_in_flight_requests = 16;
        config.overload_latency_target_ms = 5;
        config.flush_interval_ms = 60_000;
        config.group_commit_window_ms = 20;
    })
    .await;
    assert_eq!(in_flight_limit(&node).await, 16);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loops: Vec<_> = (0..16)
        .map(|id| {
            let stop = Arc::clone(&stop);
            let addr = node.addr;
            std::thread::spawn(move || slow_put_loop(id, addr, &stop))
        })
        .collect();
    let mut lowest = 16;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        lowest = lowest.min(in_flight_limit(&node).await);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut shed) = (0, 0);
    for handle in loops {
        let (o, s) = handle.join().unwrap();
        ok += o;
        shed += s;
    }
    assert!(lowest < 16, "the limit never went below the ceiling");
    assert!(lowest >= 8, "the limit went below its floor: {lowest}");
    assert!(ok > 0 && shed > 0, "ok {ok} shed {shed}");
    // No pressure: back to the ceiling within a few windows.
    let mut restored = false;
    for _ in 0..80 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if in_flight_limit(&node).await == 16 {
            restored = true;
            break;
        }
    }
    assert!(restored, "the limit did not grow back");
    node.stop().await;
}

/// The group commit window: durable writes that arrive while a window runs share the sync
/// that ends it. Four waves of ten durable puts, 100 ms apart, against a 500 ms window: the
/// first sync starts at once, the next not before the window has passed, by when every wave
/// has arrived. Back to back (no window) each wave would have had a sync of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_writes_arriving_within_the_window_share_one_sync() {
    let node = Arc::new(
        start_with(StorageKind::Disk, |config| {
            config.flush_interval_ms = 60_000;
            config.group_commit_window_ms = 500;
        })
        .await,
    );
    let before = stat(&node, "syncs_total").await;
    let started = std::time::Instant::now();
    let mut puts = tokio::task::JoinSet::new();
    for wave in 0..4 {
        for i in 0..10 {
            let node = Arc::clone(&node);
            puts.spawn(async move {
                node.put(&format!("/buckets/durable/keys/w{wave}-{i}"), "v", None)
                    .await
                    .0
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all = tokio::time::timeout(Duration::from_secs(20), puts.join_all())
        .await
        .expect("durable writes were never synced");
    assert!(all.iter().all(|s| *s == StatusCode::NO_CONTENT), "{all:?}");
    let took = started.elapsed();
    let used = stat(&node, "syncs_total").await - before;
    assert!(
        (1..=3).contains(&used),
        "{used} syncs for 4 waves in {took:?}"
    );
    // The window delays a durable write by at most about its length.
    assert!(took < Duration::from_secs(5), "{took:?}");
    let node = Arc::into_inner(node).unwrap();
    node.stop().await;
}

/// Durable writes on the disk engine wait for the flusher's group commit, which a waiting
/// write wakes at once: with the periodic flush a minute away, concurrent fsync'd puts are
/// all answered promptly, each counted as one durable write, and the node still stops cleanly
/// (the flusher outlives the request handlers that wait for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_writes_wake_the_flusher_instead_of_waiting_for_its_tick() {
    let node = Arc::new(
        start_with(StorageKind::Disk, |config| {
            config.flush_interval_ms = 60_000;
        })
        .await,
    );
    let cluster = Arc::clone(&node.server.as_ref().unwrap().cluster);
    let before = cluster.replica().fsync_writes();
    let started = std::time::Instant::now();
    let mut puts = tokio::task::JoinSet::new();
    for i in 0..40 {
        let node = Arc::clone(&node);
        puts.spawn(async move {
            node.put(&format!("/buckets/durable/keys/k{i}"), "v", None)
                .await
                .0
        });
    }
    let all = tokio::time::timeout(Duration::from_secs(20), puts.join_all())
        .await
        .expect("durable writes waited for the periodic flush");
    assert!(all.iter().all(|s| *s == StatusCode::NO_CONTENT), "{all:?}");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(cluster.replica().fsync_writes() - before, 40);
    drop(cluster);
    let node = Arc::into_inner(node).unwrap();
    tokio::time::timeout(Duration::from_secs(20), node.stop())
        .await
        .expect("the node stopped");
}
