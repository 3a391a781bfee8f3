//! Riak's `certificate` source method, in-process over real sockets: a node with TLS and a
//! client CA (`tls_client_ca_file`), security enabled with `add-source all 127.0.0.1/32
//! certificate`. A client certificate for the user, signed by the client CA, authenticates
//! (the password is ignored); one for another name, none, or one signed by another CA does
//! not. A user with a `password` source of its own keeps working on the same node, without a
//! client certificate.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use axum::http::{Method, StatusCode};
use bytes::Bytes;
use dynakv_client::{Client, ClientError, PutOptions};
use dynakv_server::RunningServer;
use dynakv_server::config::{ServerConfig, StorageKind};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fn ca(name: &str) -> rcgen::CertifiedIssuer<'static, rcgen::KeyPair> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap()
}

/// A certificate for `names` signed by `issuer` and its key, as PEM.
fn issue(
    issuer: &rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    names: &[&str],
    client: bool,
) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
            .unwrap();
    if client {
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, names[0]);
    }
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

struct Node {
    server: RunningServer,
    addr: SocketAddr,
    server_ca: String,
    client_ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    _dir: tempfile::TempDir,
}

async fn start(dir: tempfile::TempDir) -> Node {
    let server_ca = ca("dynakv test server CA");
    let client_ca = ca("dynakv test client CA");
    let (cert, key) = issue(&server_ca, &["localhost", "127.0.0.1"], false);
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut config = ServerConfig::new("c1", any, any, dir.path().join("data"));
    config.storage = StorageKind::Memory;
    config.tls_cert_file = Some(write("node.pem", &cert));
    config.tls_key_file = Some(write("node.key", &key));
    config.tls_client_ca_file = Some(write("clients.pem", &client_ca.pem()));
    let server = dynakv_server::start(config).await.unwrap();
    let addr = server.http_addr;
    Node {
        server,
        addr,
        server_ca: server_ca.pem(),
        client_ca,
        _dir: dir,
    }
}

impl Node {
    fn client(&self) -> Client {
        Client::new(&format!("https://{}", self.addr))
            .unwrap()
            .with_ca_cert(self.server_ca.as_bytes())
            .unwrap()
            .with_timeout(Duration::from_secs(5))
    }

    async fn admin(&self, path: &str, body: &str) {
        let (status, _, answer) = self
            .client()
            .request(
                Method::POST,
                path,
                &[("content-type", "application/json")],
                Bytes::from(body.to_owned()),
            )
            .await
            .unwrap();
        assert_eq!(
            status,
            StatusCode::OK,
            "{path}: {}",
            String::from_utf8_lossy(&answer)
        );
    }
}

fn status_of<T: std::fmt::Debug>(result: Result<T, ClientError>) -> u16 {
    match result {
        Err(ClientError::Status { status, .. }) => status,
        other => panic!("expected an HTTP error status, got {other:?}"),
    }
}

/// A node with TLS and a client CA, security enabled: alice (no password) and `all` from
/// loopback by `certificate`; carol by `password` (her own source beats `all`); both granted
/// get and put. `b/k` holds `v1`.
async fn secured() -> Node {
    let node = start(tempfile::tempdir().unwrap()).await;
    // Set up while security is disabled, from loopback, over HTTPS without a certificate.
    node.admin("/admin/security/users", r#"{"name":"alice"}"#)
        .await;
    node.admin(
        "/admin/security/users",
        r#"{"name":"carol","password":"s3cret"}"#,
    )
    .await;
    node.admin(
        "/admin/security/sources",
        r#"{"users":["all"],"cidr":"127.0.0.1/32","method":"certificate"}"#,
    )
    .await;
    node.admin(
        "/admin/security/sources",
        r#"{"users":["carol"],"cidr":"127.0.0.1/32","method":"password"}"#,
    )
    .await;
    node.admin(
        "/admin/security/grant",
        r#"{"permissions":["riak_kv.get","riak_kv.put"],"on":"any","users":["alice","carol"]}"#,
    )
    .await;
    node.client()
        .put("b", "k", Bytes::from_static(b"v1"), &PutOptions::default())
        .await
        .unwrap();
    node.admin("/admin/security/enable", "{}").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !node.server.cluster.state().security.enabled() {
        assert!(Instant::now() < deadline, "security was not enabled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Security is on: no credentials, 401.
    assert_eq!(status_of(node.client().get("b", "k").await), 401);
    node
}

impl Node {
    fn with_cert(&self, (cert, key): &(String, String)) -> Client {
        self.client()
            .with_client_cert(cert.as_bytes(), key.as_bytes())
            .unwrap()
    }

    async fn stop(self) {
        self.server.shutdown();
        tokio::time::timeout(Duration::from_secs(5), self.server.wait())
            .await
            .expect("the node stops within 5 s")
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_the_user_from_the_client_ca_authenticates() {
    let node = secured().await;
    let alice_cert = issue(&node.client_ca, &["alice"], true);
    // Whatever the password: a certificate source ignores it.
    let alice = node.with_cert(&alice_cert).with_basic_auth("alice", "");
    alice
        .put("b", "a", Bytes::from_static(b"v2"), &PutOptions::default())
        .await
        .unwrap();
    let got = alice.get("b", "a").await.unwrap().unwrap();
    assert_eq!(got.siblings.len(), 1);
    assert_eq!(got.siblings[0].value, Bytes::from_static(b"v2"));
    let any_password = node
        .with_cert(&alice_cert)
        .with_basic_auth("alice", "anything");
    assert!(any_password.get("b", "k").await.unwrap().is_some());
    // The certificate given before the CA works as well.
    let reversed = Client::new(&format!("https://{}", node.addr))
        .unwrap()
        .with_client_cert(alice_cert.0.as_bytes(), alice_cert.1.as_bytes())
        .unwrap()
        .with_ca_cert(node.server_ca.as_bytes())
        .unwrap()
        .with_basic_auth("alice", "");
    assert!(reversed.get("b", "k").await.unwrap().is_some());
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_name_is_refused() {
    let node = secured().await;
    let bob_cert = issue(&node.client_ca, &["bob"], true);
    let as_bob = node.with_cert(&bob_cert).with_basic_auth("alice", "");
    assert_eq!(status_of(as_bob.get("b", "k").await), 401);
    let put = as_bob
        .put("b", "k", Bytes::from_static(b"x"), &PutOptions::default())
        .await;
    assert_eq!(status_of(put), 401);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_certificate_is_refused() {
    let node = secured().await;
    for password in ["", "s3cret"] {
        let bare = node.client().with_basic_auth("alice", password);
        assert_eq!(status_of(bare.get("b", "k").await), 401);
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused() {
    let node = secured().await;
    let other_ca = ca("someone else's CA");
    let forged = node
        .with_cert(&issue(&other_ca, &["alice"], true))
        .with_basic_auth("alice", "");
    match forged.get("b", "k").await {
        Err(ClientError::Status { status: 401, .. }) => {}
        Err(ClientError::Status { status, .. }) => panic!("a forged certificate got {status}"),
        Err(_) => {} // the TLS handshake failed
        Ok(got) => panic!("a certificate from another CA was accepted: {got:?}"),
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_user_keeps_working_on_the_same_node() {
    let node = secured().await;
    let carol = node.client().with_basic_auth("carol", "s3cret");
    let got = carol.get("b", "k").await.unwrap().unwrap();
    assert_eq!(got.siblings[0].value, Bytes::from_static(b"v1"));
    carol
        .put("b", "k2", Bytes::from_static(b"c"), &PutOptions::default())
        .await
        .unwrap();
    let wrong = node.client().with_basic_auth("carol", "guess");
    assert_eq!(status_of(wrong.get("b", "k").await), 401);
    node.stop().await;
}

#[test]
fn a_client_ca_without_a_certificate_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut config = ServerConfig::new("c1", any, any, path("data"));
    config.tls_client_ca_file = Some(path("clients.pem"));
    let e = config.validate().unwrap_err().to_string();
    assert!(e.contains("tls-client-ca"), "{e}");
}
