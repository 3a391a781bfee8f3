//! The backup endpoints as an attacker meets them (issue 22): `GET /admin/backup/{p}` and
//! `POST /admin/restore` refuse what is not theirs (a partition outside the ring, a cursor of
//! another partition, a page size past the limit, a body that is not backup records) with a
//! 400 and change nothing; a page's records carry the object as stored.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use axum::http::{Method, StatusCode};
use dynakv_core::backup::{Reader, encode_record};
use support::call;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_backup_and_restore_requests_are_refused() {
    let nodes = support::three_nodes("bk").await;
    let (status, _) = call(
        &nodes[0],
        Method::PUT,
        "/buckets/b/keys/k",
        &[("content-type", "text/plain")],
        "v",
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    for path in [
        "/admin/backup/64",
        "/admin/backup/-1",
        "/admin/backup/x",
        "/admin/backup/0?limit=0",
        "/admin/backup/0?limit=10001",
        "/admin/backup/0?after=zz",
        "/admin/backup/0?after=00000001aa",
    ] {
        let (status, body) = call(&nodes[0], Method::GET, path, &[], "").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
    }
    // Every partition's page, from every node: the key is in some, as stored.
    let mut found = 0;
    for node in &nodes {
        for partition in 0..64 {
            let (status, _, body) = node
                .client
                .request(
                    Method::GET,
                    &format!("/admin/backup/{partition}"),
                    &[],
                    bytes::Bytes::new(),
                )
                .await
                .unwrap();
            assert_eq!(status, StatusCode::OK);
            let mut reader = Reader::records(body.as_ref());
            while let Some(record) = reader.next_record().unwrap() {
                assert_eq!((record.bucket.as_str(), record.key.as_str()), ("b", "k"));
                found += 1;
            }
        }
    }
    assert_eq!(found, 3, "the key's three replicas");
    // Garbage, a record with a bad checksum, a record whose object does not decode.
    let mut bad_crc = encode_record("b", "k", b"not an object").unwrap();
    let last = bad_crc.len() - 1;
    bad_crc[last] ^= 1;
    for body in [
        b"garbage".to_vec(),
        bad_crc,
        encode_record("b", "k", b"not an object").unwrap(),
    ] {
        let (status, _, answer) = nodes[1]
            .client
            .request(
                Method::POST,
                "/admin/restore",
                &[],
                bytes::Bytes::from(body),
            )
            .await
            .unwrap();
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
    let (status, body) = call(&nodes[2], Method::GET, "/buckets/b/keys/k", &[], "").await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "v"));
}

/// `POST /admin/force-remove` as a careless or hostile client meets it: a body that is not
/// `{"node": NAME}`, an empty or overlong name, a node that is not a member and the node
/// itself are refused with a 400, and the ring does not change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_force_removals_are_refused_and_change_nothing() {
    let nodes = support::three_nodes("fr").await;
    let ring = |body: String| -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["version"].clone()
    };
    let (_, before) = call(&nodes[0], Method::GET, "/admin/ring", &[], "").await;
    let (_, status) = call(&nodes[0], Method::GET, "/admin/status", &[], "").await;
    let me: serde_json::Value = serde_json::from_str(&status).unwrap();
    let me = me["node"].as_str().unwrap().to_owned();
    let long = "x".repeat(1000);
    for body in [
        "garbage".to_owned(),
        "{}".to_owned(),
        r#"{"node":""}"#.to_owned(),
        format!(r#"{{"node":"{long}"}}"#),
        r#"{"node":"nosuch"}"#.to_owned(),
        format!(r#"{{"node":"{me}"}}"#),
    ] {
        let (status, answer) = call(
            &nodes[0],
            Method::POST,
            "/admin/force-remove",
            &[("content-type", "application/json")],
            &body,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
    }
    let (_, after) = call(&nodes[0], Method::GET, "/admin/ring", &[], "").await;
    assert_eq!(ring(before), ring(after));
}
