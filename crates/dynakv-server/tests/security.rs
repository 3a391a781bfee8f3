//! Client security over plain HTTP (issue 17 item 3; the HTTPS half is in `tls_security.rs`):
//! users, sources and grants made through `/admin/security/...` spread by gossip; once
//! security is enabled, plain HTTP is refused for everything but `/ping`; a node whose client
//! port is reachable from other hosts refuses to start with security disabled unless
//! `--insecure`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use axum::http::{Method, StatusCode};
use bytes::Bytes;
use dynakv_server::ServerError;
use dynakv_server::config::ServerConfig;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::Node;

fn config(name: &str, dir: &std::path::Path, http: SocketAddr) -> ServerConfig {
    let mut config = support::memory_config(name, dir, None);
    config.http_addr = http;
    config
}

async fn start(name: &str, join: Option<SocketAddr>) -> Node {
    support::start_node(|dir| support::memory_config(name, dir, join)).await
}

async fn call(node: &Node, method: Method, path: &str, body: &str) -> (StatusCode, String) {
    let (status, _, body) = node
        .client
        .request(
            method,
            path,
            &[("content-type", "application/json")],
            Bytes::from(body.to_owned()),
        )
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_sources_and_grants_spread_and_enabling_refuses_plain_http() {
    let first = start("s1", None).await;
    let second = start("s2", Some(first.server.peer_addr)).await;
    let ok = |r: (StatusCode, String)| assert_eq!(r.0, StatusCode::OK, "{}", r.1);
    ok(call(
        &first,
        Method::POST,
        "/admin/security/users",
        r#"{"name":"alice","password":"s3cret"}"#,
    )
    .await);
    ok(call(
        &first,
        Method::POST,
        "/admin/security/users",
        r#"{"name":"ops"}"#,
    )
    .await);
    ok(call(
        &first,
        Method::POST,
        "/admin/security/sources",
        r#"{"users":["all"],"cidr":"127.0.0.1/32","method":"password"}"#,
    )
    .await);
    ok(call(
        &first,
        Method::POST,
        "/admin/security/grant",
        r#"{"permissions":["riak_kv.get","riak_kv.put"],"on":"any","users":["alice"]}"#,
    )
    .await);
    // Refusals are clear and change nothing.
    let (status, body) = call(
        &first,
        Method::POST,
        "/admin/security/grant",
        r#"{"permissions":["riak_kv.gett"],"on":"any","users":["alice"]}"#,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("unknown permission"), "{body}");
    let (status, body) = call(
        &first,
        Method::POST,
        "/admin/security/grant",
        r#"{"permissions":["admin"],"on":"any","users":["mallory"]}"#,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, _) = call(
        &first,
        Method::POST,
        "/admin/security/users",
        r#"{"name":"all"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = call(
        &first,
        Method::POST,
        "/admin/security/sources",
        r#"{"users":["alice"],"cidr":"10.0.0.0/33","method":"trust"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // The other node learns it by gossip; no password hash is ever shown.
    let deadline = Instant::now() + Duration::from_secs(20);
    let shown = loop {
        let (status, body) = call(&second, Method::GET, "/admin/security", "").await;
        assert_eq!(status, StatusCode::OK);
        if body.contains("alice") && body.contains("riak_kv.put") && body.contains("127.0.0.1/32") {
            break body;
        }
        assert!(Instant::now() < deadline, "not spread: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(!shown.contains("argon2"), "a hash was shown: {shown}");
    let stored = second.server.cluster.state();
    let hash = stored
        .security
        .user("alice")
        .unwrap()
        .password_hash
        .clone()
        .unwrap();
    assert!(dynakv_server::auth::verify_password(&hash, "s3cret"));

    // Enabled: plain HTTP is refused for everything but /ping, on every node.
    ok(call(&first, Method::POST, "/admin/security/enable", "{}").await);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !second.server.cluster.state().security.enabled() {
        assert!(Instant::now() < deadline, "enable did not spread");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for node in [&first, &second] {
        assert_eq!(call(node, Method::GET, "/ping", "").await.0, StatusCode::OK);
        for (method, path) in [
            (Method::GET, "/buckets/b/keys/k"),
            (Method::PUT, "/buckets/b/keys/k"),
            (Method::GET, "/stats"),
            (Method::POST, "/admin/leave"),
            (Method::POST, "/admin/security/disable"),
            (Method::GET, "/admin/security"),
        ] {
            let (status, body) = call(node, method.clone(), path, "x").await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {body}");
            assert!(body.contains("HTTPS"), "{body}");
        }
    }
    assert_eq!(
        first.server.cluster.state().members.len(),
        2,
        "a refused leave changed the membership"
    );
    for node in [first, second] {
        node.server.shutdown();
        node.server.wait().await.unwrap();
    }
}

#[tokio::test]
async fn a_client_port_reachable_from_other_hosts_needs_security_or_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let open: SocketAddr = "0.0.0.0:0".parse().unwrap();
    match dynakv_server::start(config("open", dir.path(), open)).await {
        Err(ServerError::Config(e)) => {
            let text = e.to_string();
            assert!(
                text.contains("--insecure") && text.contains("security"),
                "{text}"
            );
        }
        Ok(_) => panic!("a node open to other hosts started with security disabled"),
        Err(other) => panic!("unexpected error {other}"),
    }
    let mut insecure = config("open", dir.path(), open);
    insecure.insecure = true;
    let server = dynakv_server::start(insecure).await.unwrap();
    server.shutdown();
    server.wait().await.unwrap();
}
