//! A node whose storage fails while it serves (a sync of buffered writes fails: a full disk,
//! an I/O error) stops itself without a clean-shutdown mark and is started again by
//! `supervise` from what is on disk, under a new causal identity, on the same addresses.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use axum::http::{Method, StatusCode};
use bytes::Bytes;
use dynakv_client::Client;
use dynakv_server::config::{ServerConfig, StorageKind};
use dynakv_storage::{FaultPoint, FaultSwitch};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

async fn put(client: &Client, key: &str, value: &str) -> Option<StatusCode> {
    client
        .request(
            Method::PUT,
            &format!("/buckets/b/keys/{key}"),
            &[("content-type", "text/plain")],
            Bytes::from(value.to_owned()),
        )
        .await
        .ok()
        .map(|(status, _, _)| status)
}

async fn get(client: &Client, key: &str) -> Option<(StatusCode, String)> {
    client
        .request(
            Method::GET,
            &format!("/buckets/b/keys/{key}"),
            &[],
            Bytes::new(),
        )
        .await
        .ok()
        .map(|(status, _, body)| (status, String::from_utf8_lossy(&body).into_owned()))
}

/// The node's causal identity, or `None` while it does not answer.
async fn actor(client: &Client) -> Option<String> {
    let status = client.get_json("/admin/status").await.ok()?;
    status["actor"].as_str().map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_sync_fails_restarts_from_disk_under_a_new_identity() {
    let dir = tempfile::tempdir().unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut config = ServerConfig::new("t1", any, any, dir.path().to_owned());
    config.storage = StorageKind::Disk;
    let switch = FaultSwitch::new();
    config.storage_faults = Some(switch.clone());
    let server = dynakv_server::start(config.clone()).await.unwrap();
    let addr = server.http_addr;
    let client = Client::new(&format!("http://{addr}")).unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let node = tokio::spawn(dynakv_server::supervise(server, config, stopped));

    // Acknowledged (fsync'd) before the failure.
    assert_eq!(
        put(&client, "before", "kept").await,
        Some(StatusCode::NO_CONTENT)
    );
    let first = actor(&client).await.unwrap();

    // The next sync fails: the durable put waiting for it is not acknowledged.
    switch.fail_next(FaultPoint::Sync, 1);
    let refused = put(&client, "during", "maybe").await;
    assert_ne!(
        refused,
        Some(StatusCode::NO_CONTENT),
        "a write whose sync failed was acknowledged"
    );
    assert_eq!(switch.injected(FaultPoint::Sync), 1);

    // The node comes back on the same address, under a new causal identity.
    let deadline = Instant::now() + Duration::from_secs(30);
    let second = loop {
        if let Some(now) = actor(&client).await
            && now != first
        {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "the node did not restart after its sync failed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(first, second);

    // What was acknowledged before is there; new writes are accepted again.
    assert_eq!(
        get(&client, "before").await,
        Some((StatusCode::OK, "kept".to_owned()))
    );
    assert_eq!(
        put(&client, "after", "new").await,
        Some(StatusCode::NO_CONTENT)
    );
    assert_eq!(
        get(&client, "after").await,
        Some((StatusCode::OK, "new".to_owned()))
    );

    // A disk that stays broken: every sync fails until it is healed. The node keeps stopping
    // and retrying; no durable write is acknowledged meanwhile.
    switch.set(FaultPoint::Sync, true);
    let broken_until = Instant::now() + Duration::from_secs(3);
    let mut i = 0;
    while Instant::now() < broken_until {
        let status = put(&client, &format!("broken{i}"), "no").await;
        assert_ne!(
            status,
            Some(StatusCode::NO_CONTENT),
            "acknowledged while every sync fails"
        );
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(switch.injected(FaultPoint::Sync) > 1);
    switch.heal();
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if let Some(now) = actor(&client).await
            && now != first
            && now != second
            && put(&client, "healed", "yes").await == Some(StatusCode::NO_CONTENT)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the node did not come back once its disk healed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        get(&client, "before").await,
        Some((StatusCode::OK, "kept".to_owned()))
    );
    assert_eq!(
        get(&client, "after").await,
        Some((StatusCode::OK, "new".to_owned()))
    );

    let _ = stop.send(true);
    tokio::time::timeout(Duration::from_secs(20), node)
        .await
        .expect("the node stopped")
        .unwrap()
        .unwrap();
}
