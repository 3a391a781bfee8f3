//! The load generator's Riak PB client: one connection per bench task, a request framed
//! into a reused buffer and written at once, its answer read whole (bounded, with a time
//! limit), reconnecting after any failure. Only what `dynakv bench --protocol pb` needs.

use dynakv_pb::{RpbContent, RpbErrorResp, RpbGetReq, RpbPutReq, code};
use prost::Message as _;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Longest answer frame read.
const MAX_FRAME: usize = 256 * 1024 * 1024;

/// What one request came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PbAnswer {
    /// The expected response.
    Ok,
    /// `RpbErrorResp` with this text.
    Error(String),
}

/// One connection to a node's PB port, opened on first use and again after a failure.
#[derive(Debug)]
pub struct PbConnection {
    addr: SocketAddr,
    timeout: Duration,
    stream: Option<TcpStream>,
    out: Vec<u8>,
    frame: Vec<u8>,
}

impl PbConnection {
    pub fn new(addr: SocketAddr, timeout: Duration) -> PbConnection {
        PbConnection {
            addr,
            timeout,
            stream: None,
            out: Vec::with_capacity(2048),
            frame: Vec::with_capacity(2048),
        }
    }

    /// Open the connection now (so the first request's latency is not the connect's).
    pub async fn connect(&mut self) -> std::io::Result<()> {
        if self.stream.is_none() {
            let stream = tokio::time::timeout(self.timeout, TcpStream::connect(self.addr))
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect"))??;
            stream.set_nodelay(true)?;
            self.stream = Some(stream);
        }
        Ok(())
    }

    /// A quorum read of `bucket/key`.
    pub async fn get(&mut self, bucket: &str, key: &str) -> std::io::Result<PbAnswer> {
        let request = RpbGetReq {
            bucket: Some(bucket.as_bytes().to_vec()),
            key: Some(key.as_bytes().to_vec()),
            ..RpbGetReq::default()
        };
        self.out.clear();
        dynakv_pb::encode_frame(&mut self.out, code::GET_REQ, &request);
        self.exchange(code::GET_RESP).await
    }

    /// A blind write of `value` to `bucket/key`.
    pub async fn put(
        &mut self,
        bucket: &str,
        key: &str,
        value: &[u8],
    ) -> std::io::Result<PbAnswer> {
        let request = RpbPutReq {
            bucket: Some(bucket.as_bytes().to_vec()),
            key: Some(key.as_bytes().to_vec()),
            content: Some(RpbContent {
                value: Some(value.to_vec()),
                content_type: Some(b"application/octet-stream".to_vec()),
                ..RpbContent::default()
            }),
            ..RpbPutReq::default()
        };
        self.out.clear();
        dynakv_pb::encode_frame(&mut self.out, code::PUT_REQ, &request);
        self.exchange(code::PUT_RESP).await
    }

    /// A data type operation on `bucket/key` of `bucket_type`: a counter's increment by one,
    /// or a set's add of `element`.
    pub async fn dt_update(
        &mut self,
        (bucket_type, bucket, key): (&str, &str, &str),
        set_element: Option<&str>,
    ) -> std::io::Result<PbAnswer> {
        use dynakv_pb::dt::{CounterOp, DtOp, DtUpdateReq, SetOp};
        let op = match set_element {
            None => DtOp {
                counter_op: Some(CounterOp { increment: Some(1) }),
                ..DtOp::default()
            },
            Some(element) => DtOp {
                set_op: Some(SetOp {
                    adds: vec![element.as_bytes().to_vec()],
                    removes: Vec::new(),
                }),
                ..DtOp::default()
            },
        };
        let request = DtUpdateReq {
            bucket: Some(bucket.as_bytes().to_vec()),
            key: Some(key.as_bytes().to_vec()),
            r#type: Some(bucket_type.as_bytes().to_vec()),
            op: Some(op),
            ..DtUpdateReq::default()
        };
        self.out.clear();
        dynakv_pb::encode_frame(&mut self.out, code::DT_UPDATE_REQ, &request);
        self.exchange(code::DT_UPDATE_RESP).await
    }

    /// A data type fetch of `bucket/key` of `bucket_type`.
    pub async fn dt_fetch(
        &mut self,
        (bucket_type, bucket, key): (&str, &str, &str),
    ) -> std::io::Result<PbAnswer> {
        let request = dynakv_pb::dt::DtFetchReq {
            bucket: Some(bucket.as_bytes().to_vec()),
            key: Some(key.as_bytes().to_vec()),
            r#type: Some(bucket_type.as_bytes().to_vec()),
            ..dynakv_pb::dt::DtFetchReq::default()
        };
        self.out.clear();
        dynakv_pb::encode_frame(&mut self.out, code::DT_FETCH_REQ, &request);
        self.exchange(code::DT_FETCH_RESP).await
    }

    async fn exchange(&mut self, expect: u8) -> std::io::Result<PbAnswer> {
        let timeout = self.timeout;
        let result = tokio::time::timeout(timeout, self.write_and_read()).await;
        let result = match result {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer",
            )),
        };
        match result {
            Ok(got) if got == expect => Ok(PbAnswer::Ok),
            Ok(code::ERROR_RESP) => {
                let error = RpbErrorResp::decode(&self.frame[1..])
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                let text = String::from_utf8_lossy(&error.errmsg.unwrap_or_default()).into_owned();
                Ok(PbAnswer::Error(text))
            }
            Ok(other) => {
                self.stream = None;
                Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("answer code {other}, expected {expect}"),
                ))
            }
            Err(e) => {
                self.stream = None;
                Err(e)
            }
        }
    }

    /// Write `out`, read one frame into `frame`; its code.
    async fn write_and_read(&mut self) -> std::io::Result<u8> {
        self.connect().await?;
        let Some(stream) = self.stream.as_mut() else {
            return Err(std::io::ErrorKind::NotConnected.into());
        };
        stream.write_all(&self.out).await?;
        let mut prefix = [0u8; dynakv_pb::LENGTH_BYTES];
        stream.read_exact(&mut prefix).await?;
        let length = dynakv_pb::frame_length(prefix, MAX_FRAME)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        self.frame.resize(length, 0);
        stream.read_exact(&mut self.frame).await?;
        Ok(self.frame[0])
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::net::TcpListener;

    /// A server that answers every frame with `answer` (raw bytes).
    async fn server(answer: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            while socket.read(&mut buf).await.unwrap_or(0) > 0 {
                if socket.write_all(answer).await.is_err() {
                    return;
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn answers_errors_and_a_hostile_server() {
        let ok = server(&[0, 0, 0, 1, code::PUT_RESP]).await;
        let mut c = PbConnection::new(ok, Duration::from_secs(5));
        assert_eq!(c.put("b", "k", b"v").await.unwrap(), PbAnswer::Ok);
        // An error response: its text.
        let error = server(&[0, 0, 0, 6, 0, 0x0a, 3, b'n', b'o', b'!']).await;
        let mut c = PbConnection::new(error, Duration::from_secs(5));
        assert_eq!(
            c.get("b", "k").await.unwrap(),
            PbAnswer::Error("no!".into())
        );
        // A length past the limit is refused before reading; a wrong code is an error.
        let huge = server(&[0xff, 0xff, 0xff, 0xff]).await;
        let mut c = PbConnection::new(huge, Duration::from_secs(5));
        assert!(c.get("b", "k").await.is_err());
        let wrong = server(&[0, 0, 0, 1, code::PING_RESP]).await;
        let mut c = PbConnection::new(wrong, Duration::from_secs(5));
        assert!(c.get("b", "k").await.is_err());
        // A silent server: the time limit.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent = listener.local_addr().unwrap();
        let hold = tokio::spawn(async move { listener.accept().await });
        let mut c = PbConnection::new(silent, Duration::from_millis(200));
        assert!(c.get("b", "k").await.is_err());
        hold.abort();
    }
}
