//! The load generator's own HTTP/1.1 client: one keep-alive TCP connection per bench task,
//! requests written from a reused buffer in one write, responses parsed just enough to know the
//! status and where the body ends (`Content-Length` or chunked), the body read and dropped.
//!
//! `dynakv bench` measures the server; hyper's pooled client costs the generator about three
//! times what this does per operation on the same two cores, CPU the server then lacks. Plain
//! `http://` only: an `https://` node goes through the full client.
//!
//! The server is not trusted either: the head is bounded ([`MAX_HEAD`]), a body longer than
//! [`MAX_BODY`] or a malformed length is an error, and every request has a time limit.

use std::net::SocketAddr;
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Longest response head (status line and headers).
pub const MAX_HEAD: usize = 64 * 1024;
/// Longest response body read (and dropped).
pub const MAX_BODY: u64 = 256 * 1024 * 1024;

#[derive(Debug, Error)]
pub enum RawError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the connection closed before a whole response")]
    Closed,
    #[error("malformed response: {0}")]
    Malformed(&'static str),
}

/// Where a plain-HTTP node is and what each request to it carries.
#[derive(Debug, Clone)]
pub struct RawTarget {
    addr: SocketAddr,
    /// `Host` and, with credentials, `Authorization` header lines, each ending in CRLF.
    fixed_headers: String,
}

impl RawTarget {
    /// The target of an `http://host:port` URL whose host is an IP address; `None` for any
    /// other URL (https, a name to resolve), which the full client serves.
    pub fn from_url(url: &str, basic_auth: Option<(&str, &str)>) -> Option<RawTarget> {
        let rest = url.strip_prefix("http://")?;
        let authority = rest.split('/').next()?;
        let addr: SocketAddr = authority.parse().ok()?;
        let mut fixed_headers = format!("Host: {authority}\r\n");
        if let Some((user, password)) = basic_auth {
            use base64::Engine as _;
            let token =
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
            fixed_headers.push_str("Authorization: Basic ");
            fixed_headers.push_str(&token);
            fixed_headers.push_str("\r\n");
        }
        Some(RawTarget {
            addr,
            fixed_headers,
        })
    }
}

/// One keep-alive connection, opened on first use and again after any failure.
#[derive(Debug)]
pub struct RawConnection {
    target: RawTarget,
    timeout: Duration,
    stream: Option<TcpStream>,
    out: Vec<u8>,
    /// Bytes read and not yet consumed (`buf[start..end]`).
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Some byte of the current response arrived.
    answered: bool,
    /// The statuses of the responses read by the last send.
    statuses: Vec<u16>,
}

/// One request of a pipelined batch.
#[derive(Debug, Clone, Copy)]
pub struct RawRequest<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
}

/// Where a response's body ends.
enum BodyLength {
    Fixed(u64),
    Chunked,
}

impl RawConnection {
    pub fn new(target: RawTarget, timeout: Duration) -> RawConnection {
        RawConnection {
            target,
            timeout,
            stream: None,
            out: Vec::with_capacity(2048),
            buf: vec![0; 16 * 1024],
            start: 0,
            end: 0,
            answered: false,
            statuses: Vec::new(),
        }
    }

    /// Send one request and return the response's status. A connection the server closed
    /// while idle is reopened and the request sent once more (nothing of it was answered).
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<u16, RawError> {
        self.out.clear();
        self.push_request(method, path, headers, body);
        self.statuses.clear();
        self.send(1).await?;
        self.statuses.first().copied().ok_or(RawError::Closed)
    }

    /// HTTP/1.1 pipelining: send every request of `batch` in one write, then read their
    /// responses in order; the statuses, one per request. The time limit is the batch's.
    pub async fn pipeline(&mut self, batch: &[RawRequest<'_>]) -> Result<&[u16], RawError> {
        self.out.clear();
        for r in batch {
            self.push_request(r.method, r.path, r.headers, r.body);
        }
        self.statuses.clear();
        self.send(batch.len()).await?;
        Ok(&self.statuses)
    }

    fn push_request(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) {
        self.out.extend_from_slice(method.as_bytes());
        self.out.push(b' ');
        self.out.extend_from_slice(path.as_bytes());
        self.out.extend_from_slice(b" HTTP/1.1\r\n");
        self.out
            .extend_from_slice(self.target.fixed_headers.as_bytes());
        for (name, value) in headers {
            self.out.extend_from_slice(name.as_bytes());
            self.out.extend_from_slice(b": ");
            self.out.extend_from_slice(value.as_bytes());
            self.out.extend_from_slice(b"\r\n");
        }
        if !body.is_empty() || method == "PUT" || method == "POST" {
            self.out
                .extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
        }
        self.out.extend_from_slice(b"\r\n");
        self.out.extend_from_slice(body);
    }

    /// Write `out` and read `count` responses into `statuses`, retrying once on a connection
    /// the server had closed while idle (no byte of any answer arrived).
    async fn send(&mut self, count: usize) -> Result<(), RawError> {
        let timeout = self.timeout;
        let reused = self.stream.is_some();
        let first = tokio::time::timeout(timeout, self.exchange(count)).await;
        let outcome = match first {
            Ok(Err(RawError::Closed)) if reused && !self.answered => {
                self.reset();
                self.statuses.clear();
                tokio::time::timeout(timeout, self.exchange(count)).await
            }
            other => other,
        };
        match outcome {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.reset();
                Err(e)
            }
            Err(_) => {
                self.reset();
                Err(RawError::Timeout(timeout))
            }
        }
    }

    /// Open the connection now (it is otherwise opened by the first request), so that the
    /// first request's latency is not the connection's. An error is the first request's too.
    pub async fn connect(&mut self) -> Result<(), RawError> {
        if self.stream.is_none() {
            let addr = self.target.addr;
            let connecting = tokio::time::timeout(self.timeout, TcpStream::connect(addr));
            let stream = connecting
                .await
                .map_err(|_| RawError::Timeout(self.timeout))?
                .map_err(|source| RawError::Connect { addr, source })?;
            stream.set_nodelay(true)?;
            self.stream = Some(stream);
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.stream = None;
        self.start = 0;
        self.end = 0;
    }

    async fn exchange(&mut self, count: usize) -> Result<(), RawError> {
        self.answered = false;
        self.connect().await?;
        let Some(stream) = self.stream.as_mut() else {
            return Err(RawError::Closed);
        };
        if let Err(e) = stream.write_all(&self.out).await {
            return Err(match e.kind() {
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                    RawError::Closed
                }
                _ => RawError::Io(e),
            });
        }
        for answer in 0..count {
            let (status, length, close) = loop {
                if let Some(head) = parse_head(&self.buf[self.start..self.end])? {
                    self.start += head.len;
                    if (100..200).contains(&head.status) {
                        continue;
                    }
                    break (head.status, head.body, head.close);
                }
                self.fill().await?;
            };
            match length {
                BodyLength::Fixed(n) => self.skip(n).await?,
                BodyLength::Chunked => self.skip_chunks().await?,
            }
            self.statuses.push(status);
            if close {
                self.reset();
                // The server will not answer the rest of the batch on this connection.
                if answer + 1 < count {
                    return Err(RawError::Malformed("connection closed inside a pipeline"));
                }
            }
        }
        Ok(())
    }

    /// Read more bytes after `end`, making room first; `Closed` at end of stream.
    async fn fill(&mut self) -> Result<(), RawError> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.buf.len() < MAX_HEAD {
                self.buf.resize(MAX_HEAD, 0);
            } else {
                return Err(RawError::Malformed("response head too long"));
            }
        }
        let Some(stream) = self.stream.as_mut() else {
            return Err(RawError::Closed);
        };
        let n = match stream.read(&mut self.buf[self.end..]).await {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
            Err(e) => return Err(RawError::Io(e)),
        };
        if n == 0 {
            return Err(RawError::Closed);
        }
        self.end += n;
        self.answered = true;
        Ok(())
    }

    /// Consume `n` body bytes.
    async fn skip(&mut self, mut n: u64) -> Result<(), RawError> {
        loop {
            let have = (self.end - self.start) as u64;
            let take = have.min(n);
            // `take <= have`, which is a usize.
            self.start += take as usize;
            n -= take;
            if n == 0 {
                return Ok(());
            }
            self.fill().await?;
        }
    }

    /// One CRLF-terminated line (without the CRLF), consumed; bounded by the buffer.
    async fn line(&mut self) -> Result<Vec<u8>, RawError> {
        loop {
            let window = &self.buf[self.start..self.end];
            if let Some(at) = window.windows(2).position(|w| w == b"\r\n") {
                let line = window[..at].to_vec();
                self.start += at + 2;
                return Ok(line);
            }
            if self.end - self.start >= 1024 {
                return Err(RawError::Malformed("chunk size line too long"));
            }
            self.fill().await?;
        }
    }

    async fn skip_chunks(&mut self) -> Result<(), RawError> {
        let mut total: u64 = 0;
        loop {
            let line = self.line().await?;
            let size = line.split(|b| *b == b';').next().unwrap_or_default();
            let size = std::str::from_utf8(size)
                .ok()
                .and_then(|s| u64::from_str_radix(s.trim(), 16).ok())
                .ok_or(RawError::Malformed("bad chunk size"))?;
            total = total
                .checked_add(size)
                .filter(|t| *t <= MAX_BODY)
                .ok_or(RawError::Malformed("body too long"))?;
            if size == 0 {
                // Trailers, if any, end with an empty line.
                while !self.line().await?.is_empty() {}
                return Ok(());
            }
            self.skip(size).await?;
            if !self.line().await?.is_empty() {
                return Err(RawError::Malformed("chunk not followed by CRLF"));
            }
        }
    }
}

/// A parsed response head.
struct Head {
    /// Bytes of the head, blank line included.
    len: usize,
    status: u16,
    body: BodyLength,
    close: bool,
}

/// The head at the start of `bytes`, or `None` when it is not all there yet.
fn parse_head(bytes: &[u8]) -> Result<Option<Head>, RawError> {
    let Some(at) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        if bytes.len() >= MAX_HEAD {
            return Err(RawError::Malformed("response head too long"));
        }
        return Ok(None);
    };
    let head =
        std::str::from_utf8(&bytes[..at]).map_err(|_| RawError::Malformed("head not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err(RawError::Malformed("not an HTTP/1.x status line"));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|s| (100..600).contains(s))
        .ok_or(RawError::Malformed("bad status code"))?;
    let mut length = None;
    let mut chunked = false;
    let mut close = status_line.starts_with("HTTP/1.0");
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(RawError::Malformed("header line without a colon"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse::<u64>()
                .map_err(|_| RawError::Malformed("bad content-length"))?;
            if n > MAX_BODY {
                return Err(RawError::Malformed("body too long"));
            }
            if length.is_some_and(|l| l != n) {
                return Err(RawError::Malformed("conflicting content-length"));
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
            if !chunked {
                return Err(RawError::Malformed("unsupported transfer-encoding"));
            }
        } else if name.eq_ignore_ascii_case("connection") {
            close = value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("close"));
        }
    }
    let no_body = (100..200).contains(&status) || status == 204 || status == 304;
    let body = if no_body {
        BodyLength::Fixed(0)
    } else if chunked {
        BodyLength::Chunked
    } else if let Some(n) = length {
        BodyLength::Fixed(n)
    } else {
        return Err(RawError::Malformed("a body of unknown length"));
    };
    Ok(Some(Head {
        len: at + 4,
        status,
        body,
        close,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A server that answers each request it reads with the next of `answers` (raw bytes),
    /// and records what it read.
    async fn server(answers: Vec<Vec<u8>>) -> (RawTarget, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            for answer in answers {
                let mut buf = [0u8; 4096];
                loop {
                    let n = socket.read(&mut buf).await.unwrap();
                    seen.extend_from_slice(&buf[..n]);
                    if n == 0 || seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                socket.write_all(&answer).await.unwrap();
            }
            seen
        });
        let target = RawTarget::from_url(&format!("http://{addr}"), Some(("u", "p"))).unwrap();
        (target, task)
    }

    #[tokio::test]
    async fn keep_alive_fixed_and_chunked_bodies_are_read_through() {
        let (target, task) = server(vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello".to_vec(),
            b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
            b"HTTP/1.1 300 Multiple\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n".to_vec(),
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
        ])
        .await;
        let mut conn = RawConnection::new(target, Duration::from_secs(5));
        assert_eq!(conn.request("GET", "/a", &[], b"").await.unwrap(), 200);
        let put = conn
            .request("PUT", "/b", &[("content-type", "text/plain")], b"xyz")
            .await
            .unwrap();
        assert_eq!(put, 204);
        assert_eq!(conn.request("GET", "/c", &[], b"").await.unwrap(), 300);
        assert_eq!(conn.request("GET", "/d", &[], b"").await.unwrap(), 404);
        let seen = String::from_utf8(task.await.unwrap()).unwrap();
        assert!(
            seen.starts_with("GET /a HTTP/1.1\r\nHost: 127.0.0.1:"),
            "{seen}"
        );
        assert!(seen.contains("Authorization: Basic dTpw\r\n"), "{seen}");
        assert!(
            seen.contains("PUT /b HTTP/1.1\r\n")
                && seen.contains("content-type: text/plain\r\nContent-Length: 3\r\n\r\nxyz"),
            "{seen}"
        );
    }

    #[tokio::test]
    async fn a_hostile_server_gets_an_error_not_a_hang_or_a_huge_buffer() {
        let endless_head = {
            let mut v = b"HTTP/1.1 200 OK\r\n".to_vec();
            v.extend(std::iter::repeat_n(b'a', MAX_HEAD + 10));
            v
        };
        for (answer, expect) in [
            (endless_head, "too long"),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999\r\n\r\n".to_vec(),
                "too long",
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n".to_vec(),
                "conflicting",
            ),
            (b"HTTP/1.1 200 OK\r\n\r\nbody".to_vec(), "unknown length"),
            (b"SSH-2.0-x\r\n\r\n".to_vec(), "status line"),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n".to_vec(),
                "chunk size",
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort".to_vec(),
                "closed",
            ),
        ] {
            let (target, task) = server(vec![answer]).await;
            let mut conn = RawConnection::new(target, Duration::from_secs(5));
            let error = conn.request("GET", "/", &[], b"").await.unwrap_err();
            assert!(
                error.to_string().contains(expect),
                "expected {expect:?}, got {error}"
            );
            task.abort();
        }
        // A server that never answers: the request's time limit ends it.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hold = tokio::spawn(async move { listener.accept().await });
        let target = RawTarget::from_url(&format!("http://{addr}/"), None).unwrap();
        let mut conn = RawConnection::new(target, Duration::from_millis(200));
        let error = conn.request("GET", "/", &[], b"").await.unwrap_err();
        assert!(matches!(error, RawError::Timeout(_)), "{error}");
        hold.abort();
    }

    /// A server that reads until it has seen `requests` request heads, then writes `answer`.
    async fn batch_server(requests: usize, answer: &'static [u8]) -> RawTarget {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            while seen.windows(4).filter(|w| *w == b"\r\n\r\n").count() < requests {
                let n = socket.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                seen.extend_from_slice(&buf[..n]);
            }
            socket.write_all(answer).await.unwrap();
            // Hold the connection open: the client must not wait for a close.
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        RawTarget::from_url(&format!("http://{addr}"), None).unwrap()
    }

    #[tokio::test]
    async fn a_pipeline_reads_every_response_in_order() {
        let get = RawRequest {
            method: "GET",
            path: "/k",
            headers: &[],
            body: b"",
        };
        let put = RawRequest {
            method: "PUT",
            body: b"v",
            ..get
        };
        let target = batch_server(
            3,
            b"HTTP/1.1 204 No Content\r\n\r\n\
              HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\nv\r\n0\r\n\r\n\
              HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\nno",
        )
        .await;
        let mut conn = RawConnection::new(target, Duration::from_secs(5));
        let statuses = conn.pipeline(&[put, get, get]).await.unwrap();
        assert_eq!(statuses, [204, 200, 404]);
        // A server that closes the connection in the middle of a pipeline: an error, not a
        // wait for answers that will not come.
        let target = batch_server(
            2,
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
        )
        .await;
        let mut conn = RawConnection::new(target, Duration::from_secs(5));
        let error = conn.pipeline(&[get, get]).await.unwrap_err();
        assert!(error.to_string().contains("inside a pipeline"), "{error}");
    }

    #[test]
    fn only_plain_http_to_an_address_is_served_raw() {
        assert!(RawTarget::from_url("https://127.0.0.1:8098", None).is_none());
        assert!(RawTarget::from_url("http://localhost:8098", None).is_none());
        assert!(RawTarget::from_url("http://127.0.0.1:8098/", None).is_some());
        assert!(RawTarget::from_url("http://[::1]:8098", None).is_some());
    }
}
