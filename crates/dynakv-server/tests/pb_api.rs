//! Riak's Protocol Buffers API (issue 20), in-process over real sockets: each message the
//! node serves, encoded and framed by the test itself, and each bad input the issue lists
//! (an error response, the connection kept where the framing is intact, nothing stored).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use dynakv_pb::{
    RpbBucketProps, RpbCommitHook, RpbContent, RpbDelReq, RpbErrorResp, RpbGetBucketReq,
    RpbGetBucketResp, RpbGetReq, RpbGetResp, RpbGetServerInfoResp, RpbListBucketsReq,
    RpbListBucketsResp, RpbListKeysReq, RpbListKeysResp, RpbPair, RpbPutReq, RpbPutResp,
    RpbSetBucketReq, code, quorum,
};
use prost::Message;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// A node with its PB port on 127.0.0.1 (a port of its choosing).
async fn node_with(adjust: impl FnOnce(&mut dynakv_server::config::ServerConfig)) -> support::Node {
    support::start_node(|dir| {
        let mut config = support::memory_config("pb1", dir, None);
        config.pb_addr = Some("127.0.0.1:0".parse().unwrap());
        adjust(&mut config);
        config
    })
    .await
}

/// A PB connection as a client sees it.
struct Conn<S> {
    stream: S,
}

impl Conn<TcpStream> {
    async fn open(node: &support::Node) -> Self {
        let stream = TcpStream::connect(node.server.pb_addr.unwrap())
            .await
            .unwrap();
        Conn { stream }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    async fn send(&mut self, code: u8, message: &impl Message) {
        let mut frame = Vec::new();
        dynakv_pb::encode_frame(&mut frame, code, message);
        self.send_raw(&frame).await;
    }

    /// The next frame's code and body; `None` when the server closed the connection.
    async fn recv(&mut self) -> Option<(u8, Vec<u8>)> {
        let read = async {
            let mut prefix = [0u8; 4];
            self.stream.read_exact(&mut prefix).await.ok()?;
            let length = u32::from_be_bytes(prefix) as usize;
            assert!((1..64 << 20).contains(&length), "frame length {length}");
            let mut frame = vec![0u8; length];
            self.stream.read_exact(&mut frame).await.ok()?;
            Some((frame[0], frame[1..].to_vec()))
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("an answer within 10 s")
    }

    /// Send a request and decode its answer as `T` (which must carry `expect`).
    async fn call<T: Message + Default>(
        &mut self,
        code: u8,
        request: &impl Message,
        expect: u8,
    ) -> T {
        self.send(code, request).await;
        let (got, body) = self.recv().await.expect("an answer");
        if got == dynakv_pb::code::ERROR_RESP {
            let error = RpbErrorResp::decode(body.as_slice()).unwrap();
            panic!(
                "error response: {}",
                String::from_utf8_lossy(&error.errmsg.unwrap())
            );
        }
        assert_eq!(got, expect, "answer code");
        T::decode(body.as_slice()).unwrap()
    }

    /// Send `frame` bytes and expect an error response; its text.
    async fn error_for(&mut self, code: u8, request: &impl Message) -> String {
        self.send(code, request).await;
        self.expect_error().await
    }

    async fn expect_error(&mut self) -> String {
        let (got, body) = self.recv().await.expect("an answer");
        assert_eq!(got, code::ERROR_RESP, "expected an error response");
        let error = RpbErrorResp::decode(body.as_slice()).unwrap();
        String::from_utf8(error.errmsg.unwrap()).unwrap()
    }

    async fn ping(&mut self) {
        let mut frame = Vec::new();
        dynakv_pb::encode_empty(&mut frame, code::PING_REQ);
        self.send_raw(&frame).await;
        assert_eq!(self.recv().await.map(|f| f.0), Some(code::PING_RESP));
    }
}

#[allow(clippy::unnecessary_wraps)] // the fields are Options
fn bytes(s: &str) -> Option<Vec<u8>> {
    Some(s.as_bytes().to_vec())
}

fn put_req(bucket: &str, key: Option<&str>, value: &str) -> RpbPutReq {
    RpbPutReq {
        bucket: bytes(bucket),
        key: key.and_then(bytes),
        content: Some(RpbContent {
            value: bytes(value),
            content_type: bytes("text/plain"),
            ..RpbContent::default()
        }),
        ..RpbPutReq::default()
    }
}

fn get_req(bucket: &str, key: &str) -> RpbGetReq {
    RpbGetReq {
        bucket: bytes(bucket),
        key: bytes(key),
        ..RpbGetReq::default()
    }
}

fn values(response: &RpbGetResp) -> Vec<String> {
    let mut v: Vec<String> = response
        .content
        .iter()
        .map(|c| String::from_utf8(c.value.clone().unwrap()).unwrap())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_served_message_answers_as_riaks_clients_expect() {
    let node = node_with(|_| {}).await;
    let mut c = Conn::open(&node).await;
    c.ping().await;

    // Server info and client ids.
    c.send_raw(&[0, 0, 0, 1, code::GET_SERVER_INFO_REQ]).await;
    let (got, body) = c.recv().await.unwrap();
    assert_eq!(got, code::GET_SERVER_INFO_RESP);
    let info = RpbGetServerInfoResp::decode(body.as_slice()).unwrap();
    assert_eq!(info.node.unwrap(), b"pb1");
    assert!(info.server_version.unwrap().starts_with(b"2."));
    let set = dynakv_pb::RpbSetClientIdReq {
        client_id: Some(vec![1, 2, 3, 4]),
    };
    c.send(code::SET_CLIENT_ID_REQ, &set).await;
    assert_eq!(c.recv().await.unwrap().0, code::SET_CLIENT_ID_RESP);
    c.send_raw(&[0, 0, 0, 1, code::GET_CLIENT_ID_REQ]).await;
    let (got, body) = c.recv().await.unwrap();
    assert_eq!(got, code::GET_CLIENT_ID_RESP);
    assert_eq!(
        dynakv_pb::RpbGetClientIdResp::decode(body.as_slice())
            .unwrap()
            .client_id
            .unwrap(),
        [1, 2, 3, 4]
    );

    // A put without a key makes one; with return_body the stored content and vclock come back.
    let made: RpbPutResp = c
        .call(code::PUT_REQ, &put_req("b", None, "made"), code::PUT_RESP)
        .await;
    let key = String::from_utf8(made.key.unwrap()).unwrap();
    assert!(made.content.is_empty() && made.vclock.is_none());
    let fetched: RpbGetResp = c
        .call(code::GET_REQ, &get_req("b", &key), code::GET_RESP)
        .await;
    assert_eq!(values(&fetched), ["made"]);
    let content = &fetched.content[0];
    assert_eq!(
        content.content_type.as_deref(),
        Some(b"text/plain".as_slice())
    );
    assert!(content.vtag.is_some() && content.last_mod.is_some_and(|s| s > 1_600_000_000));

    // Charset and user metadata are kept; head answers without the value.
    let mut put = put_req("b", Some("meta"), "{}");
    let c0 = put.content.as_mut().unwrap();
    c0.content_type = bytes("application/json");
    c0.charset = bytes("UTF-8");
    c0.usermeta = vec![RpbPair {
        key: bytes("color"),
        value: bytes("blue"),
    }];
    put.return_body = Some(true);
    let stored: RpbPutResp = c.call(code::PUT_REQ, &put, code::PUT_RESP).await;
    assert!(stored.vclock.is_some());
    assert_eq!(
        stored.content[0].charset.as_deref(),
        Some(b"UTF-8".as_slice())
    );
    assert_eq!(
        stored.content[0].usermeta[0].value.as_deref(),
        Some(b"blue".as_slice())
    );
    let head: RpbGetResp = c
        .call(
            code::GET_REQ,
            &RpbGetReq {
                head: Some(true),
                ..get_req("b", "meta")
            },
            code::GET_RESP,
        )
        .await;
    assert_eq!(head.content[0].value.as_deref(), Some(b"".as_slice()));
    assert_eq!(
        head.content[0].content_type.as_deref(),
        Some(b"application/json".as_slice())
    );

    // Siblings: two writes without a vclock; one vclock for both; a write with it resolves.
    for v in ["x", "y"] {
        let _: RpbPutResp = c
            .call(code::PUT_REQ, &put_req("b", Some("sib"), v), code::PUT_RESP)
            .await;
    }
    let both: RpbGetResp = c
        .call(code::GET_REQ, &get_req("b", "sib"), code::GET_RESP)
        .await;
    assert_eq!(values(&both), ["x", "y"]);
    let resolve = RpbPutReq {
        vclock: both.vclock.clone(),
        return_body: Some(true),
        ..put_req("b", Some("sib"), "merged")
    };
    let merged: RpbPutResp = c.call(code::PUT_REQ, &resolve, code::PUT_RESP).await;
    assert_eq!(merged.content.len(), 1);
    // if_modified with the current vclock: unchanged.
    let current: RpbGetResp = c
        .call(code::GET_REQ, &get_req("b", "sib"), code::GET_RESP)
        .await;
    let unchanged: RpbGetResp = c
        .call(
            code::GET_REQ,
            &RpbGetReq {
                if_modified: current.vclock.clone(),
                ..get_req("b", "sib")
            },
            code::GET_RESP,
        )
        .await;
    assert_eq!(unchanged.unchanged, Some(true));
    assert!(unchanged.content.is_empty());

    // Conditional puts: if_none_match on a key with a value, if_not_modified with a stale
    // vclock, are refused and change nothing; with the current vclock it goes through.
    let refused = c
        .error_for(
            code::PUT_REQ,
            &RpbPutReq {
                if_none_match: Some(true),
                ..put_req("b", Some("sib"), "nope")
            },
        )
        .await;
    assert!(refused.contains("already has a value"), "{refused}");
    let stale = c
        .error_for(
            code::PUT_REQ,
            &RpbPutReq {
                vclock: both.vclock.clone(),
                if_not_modified: Some(true),
                ..put_req("b", Some("sib"), "stale")
            },
        )
        .await;
    assert!(stale.contains("modified"), "{stale}");
    let _: RpbPutResp = c
        .call(
            code::PUT_REQ,
            &RpbPutReq {
                vclock: current.vclock.clone(),
                if_not_modified: Some(true),
                ..put_req("b", Some("sib"), "fresh")
            },
            code::PUT_RESP,
        )
        .await;
    let now: RpbGetResp = c
        .call(code::GET_REQ, &get_req("b", "sib"), code::GET_RESP)
        .await;
    assert_eq!(values(&now), ["fresh"]);

    // Quorums in Riak's encoding.
    let _: RpbGetResp = c
        .call(
            code::GET_REQ,
            &RpbGetReq {
                r: Some(quorum::ALL),
                pr: Some(1),
                ..get_req("b", "sib")
            },
            code::GET_RESP,
        )
        .await;

    // Delete: not found after, no content and no vclock; deletedvclock gives the tombstone's.
    let del = RpbDelReq {
        bucket: bytes("b"),
        key: bytes("sib"),
        ..RpbDelReq::default()
    };
    c.send(code::DEL_REQ, &del).await;
    assert_eq!(c.recv().await.unwrap().0, code::DEL_RESP);
    let gone: RpbGetResp = c
        .call(code::GET_REQ, &get_req("b", "sib"), code::GET_RESP)
        .await;
    assert!(gone.content.is_empty() && gone.vclock.is_none());
    let tomb: RpbGetResp = c
        .call(
            code::GET_REQ,
            &RpbGetReq {
                deletedvclock: Some(true),
                ..get_req("b", "sib")
            },
            code::GET_RESP,
        )
        .await;
    assert!(tomb.content.is_empty() && tomb.vclock.is_some());
    // Deleting what is not there is not an error.
    c.send(code::DEL_REQ, &del).await;
    assert_eq!(c.recv().await.unwrap().0, code::DEL_RESP);

    // Key listing: streamed, the last frame says done.
    let list = RpbListKeysReq {
        bucket: bytes("b"),
        ..RpbListKeysReq::default()
    };
    c.send(code::LIST_KEYS_REQ, &list).await;
    let mut keys = Vec::new();
    loop {
        let (got, body) = c.recv().await.unwrap();
        assert_eq!(got, code::LIST_KEYS_RESP);
        let page = RpbListKeysResp::decode(body.as_slice()).unwrap();
        keys.extend(page.keys.into_iter().map(|k| String::from_utf8(k).unwrap()));
        if page.done == Some(true) {
            break;
        }
    }
    keys.sort();
    let mut expected = vec![key.clone(), "meta".to_owned()];
    expected.sort();
    assert_eq!(keys, expected);
    // Bucket listing, whole and streamed.
    let buckets: RpbListBucketsResp = c
        .call(
            code::LIST_BUCKETS_REQ,
            &RpbListBucketsReq::default(),
            code::LIST_BUCKETS_RESP,
        )
        .await;
    assert_eq!(buckets.buckets, [b"b".to_vec()]);
    let streamed = RpbListBucketsReq {
        stream: Some(true),
        ..RpbListBucketsReq::default()
    };
    c.send(code::LIST_BUCKETS_REQ, &streamed).await;
    let mut all = Vec::new();
    loop {
        let (got, body) = c.recv().await.unwrap();
        assert_eq!(got, code::LIST_BUCKETS_RESP);
        let page = RpbListBucketsResp::decode(body.as_slice()).unwrap();
        all.extend(page.buckets);
        if page.done == Some(true) {
            break;
        }
    }
    assert_eq!(all, [b"b".to_vec()]);

    // Bucket properties: read, set (Riak's encoding of quorums), read back, reset.
    let get_props = RpbGetBucketReq {
        bucket: bytes("p"),
        r#type: None,
    };
    let props: RpbGetBucketResp = c
        .call(code::GET_BUCKET_REQ, &get_props, code::GET_BUCKET_RESP)
        .await;
    let props = props.props.unwrap();
    assert_eq!((props.n_val, props.allow_mult), (Some(3), Some(true)));
    assert_eq!(props.r, Some(quorum::QUORUM));
    let set = RpbSetBucketReq {
        bucket: bytes("p"),
        props: Some(RpbBucketProps {
            allow_mult: Some(false),
            r: Some(quorum::ONE),
            w: Some(2),
            young_vclock: Some(20),
            ..RpbBucketProps::default()
        }),
        r#type: None,
    };
    c.send(code::SET_BUCKET_REQ, &set).await;
    assert_eq!(c.recv().await.unwrap().0, code::SET_BUCKET_RESP);
    let props: RpbGetBucketResp = c
        .call(code::GET_BUCKET_REQ, &get_props, code::GET_BUCKET_RESP)
        .await;
    let props = props.props.unwrap();
    assert_eq!(
        (props.allow_mult, props.r, props.w),
        (Some(false), Some(quorum::ONE), Some(2))
    );
    let reset = dynakv_pb::RpbResetBucketReq {
        bucket: bytes("p"),
        r#type: None,
    };
    c.send(code::RESET_BUCKET_REQ, &reset).await;
    assert_eq!(c.recv().await.unwrap().0, code::RESET_BUCKET_RESP);
    let props: RpbGetBucketResp = c
        .call(code::GET_BUCKET_REQ, &get_props, code::GET_BUCKET_RESP)
        .await;
    assert_eq!(props.props.unwrap().allow_mult, Some(true));
    // Known properties dynakv does not serve are refused unless they ask for what it does.
    for (props, expect) in [
        (
            RpbBucketProps {
                precommit: vec![RpbCommitHook {
                    modfun: None,
                    name: bytes("validate"),
                }],
                ..RpbBucketProps::default()
            },
            "commit hooks",
        ),
        (
            RpbBucketProps {
                consistent: Some(true),
                ..RpbBucketProps::default()
            },
            "consistent",
        ),
        (
            RpbBucketProps {
                old_vclock: Some(1),
                ..RpbBucketProps::default()
            },
            "prune",
        ),
        (
            RpbBucketProps {
                n_val: Some(99),
                ..RpbBucketProps::default()
            },
            "n_val",
        ),
    ] {
        let set = RpbSetBucketReq {
            bucket: bytes("p"),
            props: Some(props),
            r#type: None,
        };
        let error = c.error_for(code::SET_BUCKET_REQ, &set).await;
        assert!(error.contains(expect), "{expect}: {error}");
    }

    // A property field RpbBucketProps does not have (a decoder would drop it silently) is
    // refused, and nothing changes.
    let mut unknown = Vec::new();
    dynakv_pb::encode_frame(
        &mut unknown,
        code::SET_BUCKET_REQ,
        &RpbSetBucketReq {
            bucket: bytes("p"),
            props: None,
            r#type: None,
        },
    );
    // props (field 2) = { allow_mult (2): false, field 40: 1 }, appended by hand.
    unknown.extend_from_slice(&[0x12, 5, 0x10, 0, 0xc0, 0x02, 1]);
    let length = u32::try_from(unknown.len() - 4).unwrap();
    unknown[..4].copy_from_slice(&length.to_be_bytes());
    c.send_raw(&unknown).await;
    assert!(c.expect_error().await.contains("field 40"));
    let props: RpbGetBucketResp = c
        .call(code::GET_BUCKET_REQ, &get_props, code::GET_BUCKET_RESP)
        .await;
    assert_eq!(props.props.unwrap().allow_mult, Some(true));

    // Pipelined requests in one write are answered in order.
    let mut batch = Vec::new();
    dynakv_pb::encode_frame(&mut batch, code::PUT_REQ, &put_req("b", Some("pipe"), "1"));
    dynakv_pb::encode_frame(&mut batch, code::GET_REQ, &get_req("b", "pipe"));
    dynakv_pb::encode_empty(&mut batch, code::PING_REQ);
    c.send_raw(&batch).await;
    assert_eq!(c.recv().await.unwrap().0, code::PUT_RESP);
    let (got, body) = c.recv().await.unwrap();
    assert_eq!(got, code::GET_RESP);
    assert_eq!(values(&RpbGetResp::decode(body.as_slice()).unwrap()), ["1"]);
    assert_eq!(c.recv().await.unwrap().0, code::PING_RESP);
    node.server.shutdown();
    node.server.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_an_error_keeps_the_connection_and_stores_nothing() {
    let node = node_with(|config| config.max_value_bytes = 4096).await;
    let mut c = Conn::open(&node).await;
    // Unknown and unimplemented codes.
    c.send_raw(&[0, 0, 0, 1, 200]).await;
    assert!(c.expect_error().await.contains("unknown message code 200"));
    c.send_raw(&[0, 0, 0, 1, code::MAP_RED_REQ]).await;
    assert!(c.expect_error().await.contains("MapReduce"));
    c.send_raw(&[0, 0, 0, 1, code::COUNTER_GET_REQ]).await;
    assert!(c.expect_error().await.contains("not supported"));
    // A data type fetch without its required fields.
    c.send_raw(&[0, 0, 0, 1, code::DT_FETCH_REQ]).await;
    assert!(c.expect_error().await.contains("bucket type"));
    c.ping().await;
    // Malformed protobuf: a length-delimited field whose length runs past the body.
    c.send_raw(&[0, 0, 0, 4, code::GET_REQ, 0x0a, 0x7f, b'b'])
        .await;
    assert!(c.expect_error().await.contains("malformed RpbGetReq"));
    // Missing required fields.
    let no_bucket = RpbGetReq {
        key: bytes("k"),
        ..RpbGetReq::default()
    };
    assert!(
        c.error_for(code::GET_REQ, &no_bucket)
            .await
            .contains("bucket is required")
    );
    let no_content = RpbPutReq {
        bucket: bytes("b"),
        key: bytes("k"),
        ..RpbPutReq::default()
    };
    assert!(
        c.error_for(code::PUT_REQ, &no_content)
            .await
            .contains("needs content")
    );
    let no_value = RpbPutReq {
        content: Some(RpbContent::default()),
        ..put_req("b", Some("k"), "")
    };
    assert!(
        c.error_for(code::PUT_REQ, &no_value)
            .await
            .contains("needs a value")
    );
    // A vclock that is not this cluster's.
    let forged = RpbPutReq {
        vclock: Some(b"g2wAAAABaAJtAAAACCKn".to_vec()),
        ..put_req("b", Some("k"), "forged")
    };
    assert!(
        c.error_for(code::PUT_REQ, &forged)
            .await
            .contains("invalid vclock")
    );
    // A value over the limit, a quorum past n_val, a bad quorum, an unknown bucket type,
    // non-UTF-8 names, links, bad index names, asis, sloppy_quorum false: each refused.
    let big = put_req("b", Some("k"), &"x".repeat(5000));
    assert!(
        c.error_for(code::PUT_REQ, &big)
            .await
            .contains("larger than 4096")
    );
    let w9 = RpbPutReq {
        w: Some(9),
        ..put_req("b", Some("k"), "v")
    };
    assert!(c.error_for(code::PUT_REQ, &w9).await.contains("n_val"));
    let bad_quorum = RpbGetReq {
        r: Some(1_000_000),
        ..get_req("b", "k")
    };
    assert!(
        c.error_for(code::GET_REQ, &bad_quorum)
            .await
            .contains("invalid quorum")
    );
    let typed = RpbGetReq {
        r#type: bytes("nope"),
        ..get_req("b", "k")
    };
    assert!(
        c.error_for(code::GET_REQ, &typed)
            .await
            .contains("bucket type")
    );
    let latin1 = RpbGetReq {
        key: Some(vec![0xff, 0xfe]),
        ..get_req("b", "k")
    };
    assert!(c.error_for(code::GET_REQ, &latin1).await.contains("UTF-8"));
    let mut linked = put_req("b", Some("k"), "v");
    linked.content.as_mut().unwrap().links = vec![dynakv_pb::RpbLink::default()];
    assert!(c.error_for(code::PUT_REQ, &linked).await.contains("links"));
    // Index entries are kept (issue 21); one whose name has no _bin/_int suffix is refused.
    let mut indexed = put_req("b", Some("k"), "v");
    indexed.content.as_mut().unwrap().indexes = vec![RpbPair {
        key: bytes("field"),
        value: bytes("x"),
    }];
    assert!(
        c.error_for(code::PUT_REQ, &indexed)
            .await
            .contains("_bin or _int")
    );
    let asis = RpbPutReq {
        asis: Some(true),
        ..put_req("b", Some("k"), "v")
    };
    assert!(c.error_for(code::PUT_REQ, &asis).await.contains("asis"));
    let strict = RpbGetReq {
        sloppy_quorum: Some(false),
        ..get_req("b", "k")
    };
    assert!(
        c.error_for(code::GET_REQ, &strict)
            .await
            .contains("sloppy_quorum")
    );
    // Nothing of it was stored.
    let nothing: RpbGetResp = c
        .call(code::GET_REQ, &get_req("b", "k"), code::GET_RESP)
        .await;
    assert!(nothing.content.is_empty(), "{nothing:?}");
    c.ping().await;

    // A frame over 64 KiB for anything but a put: refused from its length and code.
    let mut c = Conn::open(&node).await;
    c.send_raw(&[0, 1, 1, 0, code::GET_REQ]).await;
    assert!(c.expect_error().await.contains("only a put or a data"));
    assert!(c.recv().await.is_none(), "closed after an oversized get");
    let mut c = Conn::open(&node).await;
    // A frame of length 0, and one longer than the limit: refused from the length alone
    // (its body is never sent) and the connection closed.
    c.send_raw(&[0, 0, 0, 0]).await;
    assert!(c.expect_error().await.contains("length 0"));
    assert!(c.recv().await.is_none(), "closed after a frame of length 0");
    let mut c = Conn::open(&node).await;
    c.send_raw(&[0x7f, 0xff, 0xff, 0xff]).await;
    assert!(c.expect_error().await.contains("more than the limit"));
    assert!(c.recv().await.is_none(), "closed after an oversized length");
    node.server.shutdown();
    node.server.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slow_connections_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = support::memory_config("pb3", dir.path(), None);
    config.pb_addr = Some("127.0.0.1:0".parse().unwrap());
    let limits = dynakv_server::http_serve::HttpLimits {
        pb_idle_timeout: Duration::from_millis(300),
        body_read_timeout: Duration::from_millis(300),
        ..dynakv_server::http_serve::HttpLimits::default()
    };
    let server = dynakv_server::start_with_http(config, limits)
        .await
        .unwrap();
    let pb = server.pb_addr.unwrap();
    // Idle: closed after the idle timeout.
    let mut idle = Conn {
        stream: TcpStream::connect(pb).await.unwrap(),
    };
    idle.ping().await;
    assert!(idle.recv().await.is_none(), "an idle connection is closed");
    // A frame whose body never comes: closed after the body timeout, nothing stored.
    let mut slow = Conn {
        stream: TcpStream::connect(pb).await.unwrap(),
    };
    let mut frame = Vec::new();
    dynakv_pb::encode_frame(&mut frame, code::PUT_REQ, &put_req("b", Some("slow"), "v"));
    slow.send_raw(&frame[..frame.len() - 2]).await;
    assert!(
        slow.recv().await.is_none(),
        "a stalled frame closes the connection"
    );
    let mut c = Conn {
        stream: TcpStream::connect(pb).await.unwrap(),
    };
    let nothing: RpbGetResp = c
        .call(code::GET_REQ, &get_req("b", "slow"), code::GET_RESP)
        .await;
    assert!(nothing.content.is_empty());
    server.shutdown();
    server.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_security_enabled_nothing_is_served_before_starttls_and_auth() {
    let node = node_with(|_| {}).await;
    let (status, _, body) = node
        .client
        .request(
            axum::http::Method::POST,
            "/admin/security/enable",
            &[("content-type", "application/json")],
            bytes::Bytes::from_static(b"{}"),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !node.server.cluster.state().security.enabled() {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut c = Conn::open(&node).await;
    assert!(
        c.error_for(code::GET_REQ, &get_req("b", "k"))
            .await
            .contains("STARTTLS first")
    );
    let auth = dynakv_pb::RpbAuthReq {
        user: bytes("alice"),
        password: bytes("pw"),
    };
    assert!(
        c.error_for(code::AUTH_REQ, &auth)
            .await
            .contains("STARTTLS first")
    );
    // This node has no certificate: STARTTLS is refused with a reason, the connection kept.
    c.send_raw(&[0, 0, 0, 1, code::START_TLS]).await;
    assert!(c.expect_error().await.contains("no TLS certificate"));
    c.send(code::PUT_REQ, &put_req("b", Some("k"), "v")).await;
    assert!(c.expect_error().await.contains("STARTTLS first"));
}

/// A node with a certificate: a client switches to TLS with `RpbStartTls`, authenticates
/// with `RpbAuthReq` (a wrong password is refused), and is then served what it is granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_then_auth_then_only_what_is_granted() {
    let ca = {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap()
    };
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let files = tempfile::tempdir().unwrap();
    let (cert_file, key_file) = (files.path().join("node.pem"), files.path().join("node.key"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let node = node_with(|config| {
        config.tls_cert_file = Some(cert_file);
        config.tls_key_file = Some(key_file);
    })
    .await;
    let https = dynakv_client::Client::new(&format!("https://{}", node.server.http_addr))
        .unwrap()
        .with_ca_cert(ca.pem().as_bytes())
        .unwrap();
    for (path, body) in [
        (
            "/admin/security/users",
            r#"{"name":"alice","password":"s3cret"}"#,
        ),
        (
            "/admin/security/sources",
            r#"{"users":["all"],"cidr":"127.0.0.1/32","method":"password"}"#,
        ),
        (
            "/admin/security/grant",
            r#"{"permissions":["riak_kv.get","riak_kv.put"],"on":"any","users":["alice"]}"#,
        ),
        ("/admin/security/enable", "{}"),
    ] {
        let (status, _, answer) = https
            .request(
                axum::http::Method::POST,
                path,
                &[("content-type", "application/json")],
                bytes::Bytes::from(body.to_owned()),
            )
            .await
            .unwrap();
        assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&answer));
    }
    let mut roots = rustls::RootCertStore::empty();
    let der = rustls::pki_types::CertificateDer::from(ca.der().to_vec());
    roots.add(der).unwrap();
    #[allow(deprecated)] // as dynakv-client: the ring provider, no post-quantum groups
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
    let open = || async {
        let mut plain = Conn::open(&node).await;
        plain.send_raw(&[0, 0, 0, 1, code::START_TLS]).await;
        assert_eq!(plain.recv().await.unwrap().0, code::START_TLS);
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        Conn {
            stream: connector.connect(name, plain.stream).await.unwrap(),
        }
    };
    let mut c = open().await;
    // Over TLS, still nothing before authentication.
    assert!(
        c.error_for(code::GET_REQ, &get_req("b", "k"))
            .await
            .contains("authenticate first")
    );
    let wrong = dynakv_pb::RpbAuthReq {
        user: bytes("alice"),
        password: bytes("guess"),
    };
    assert!(
        c.error_for(code::AUTH_REQ, &wrong)
            .await
            .contains("Authentication failed")
    );
    let right = dynakv_pb::RpbAuthReq {
        user: bytes("alice"),
        password: bytes("s3cret"),
    };
    c.send(code::AUTH_REQ, &right).await;
    assert_eq!(c.recv().await.unwrap().0, code::AUTH_RESP);
    let _: RpbPutResp = c
        .call(code::PUT_REQ, &put_req("b", Some("k"), "v"), code::PUT_RESP)
        .await;
    let got: RpbGetResp = c
        .call(code::GET_REQ, &get_req("b", "k"), code::GET_RESP)
        .await;
    assert_eq!(values(&got), ["v"]);
    // Not granted: delete and key listing.
    let del = RpbDelReq {
        bucket: bytes("b"),
        key: bytes("k"),
        ..RpbDelReq::default()
    };
    assert!(
        c.error_for(code::DEL_REQ, &del)
            .await
            .contains("riak_kv.delete")
    );
    let list = RpbListKeysReq {
        bucket: bytes("b"),
        ..RpbListKeysReq::default()
    };
    assert!(
        c.error_for(code::LIST_KEYS_REQ, &list)
            .await
            .contains("riak_kv.list_keys")
    );
    c.ping().await;
}

/// The connection cap applies to the PB port: past it a connection gets an error and is
/// closed; one closed frees a place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = support::memory_config("pb4", dir.path(), None);
    config.pb_addr = Some("127.0.0.1:0".parse().unwrap());
    let limits = dynakv_server::http_serve::HttpLimits {
        max_connections: 3,
        ..dynakv_server::http_serve::HttpLimits::default()
    };
    let server = dynakv_server::start_with_http(config, limits)
        .await
        .unwrap();
    let pb = server.pb_addr.unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = Conn {
            stream: TcpStream::connect(pb).await.unwrap(),
        };
        c.ping().await;
        held.push(c);
    }
    let mut refused = Conn {
        stream: TcpStream::connect(pb).await.unwrap(),
    };
    assert!(
        refused
            .expect_error()
            .await
            .contains("too many connections")
    );
    assert!(refused.recv().await.is_none());
    drop(held.pop());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut again = Conn {
            stream: TcpStream::connect(pb).await.unwrap(),
        };
        let mut frame = Vec::new();
        dynakv_pb::encode_empty(&mut frame, code::PING_REQ);
        // A refused connection may already be closed: its write may fail.
        let _ = again.stream.write_all(&frame).await;
        match again.recv().await {
            Some((code::PING_RESP, _)) => break,
            _ => assert!(std::time::Instant::now() < deadline, "no place was freed"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.shutdown();
    server.wait().await.unwrap();
}
