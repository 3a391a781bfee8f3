//! A minimal blocking HTTP/1.1 client on `std::net` (one connection per request), which tells
//! apart a request that was certainly never sent (connect failed) from one whose outcome is
//! unknown (sent, then the answer failed or timed out).

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Why a request has no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    /// The connection was never made: the request was not sent.
    Connect(String),
    /// The request may have been sent (or partly): its effect is unknown.
    Unknown(String),
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpError::Connect(e) => write!(f, "connect: {e}"),
            HttpError::Unknown(e) => write!(f, "unknown: {e}"),
        }
    }
}

/// An answer.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// One short line for logs.
    pub fn summary(&self) -> String {
        let mut text = self.text();
        if text.len() > 200 {
            text.truncate(200);
            text.push_str("...");
        }
        format!("{} {}", self.status, text.trim_end())
    }

    pub fn json(&self) -> Result<serde_json::Value, String> {
        serde_json::from_slice(&self.body)
            .map_err(|e| format!("not JSON ({e}): {}", self.summary()))
    }

    /// The values of the answer of a key read: one for 200, one per sibling for a
    /// `multipart/mixed` 300, none for 404. `Err` for anything else.
    pub fn values(&self) -> Result<Vec<String>, String> {
        match self.status {
            200 => Ok(vec![self.text()]),
            404 => Ok(Vec::new()),
            300 => self.multipart_values(),
            _ => Err(self.summary()),
        }
    }

    fn multipart_values(&self) -> Result<Vec<String>, String> {
        let ctype = self
            .header("content-type")
            .ok_or_else(|| format!("300 without content-type: {}", self.summary()))?;
        if !ctype.to_ascii_lowercase().starts_with("multipart/mixed") {
            return Err(format!("300 not multipart: {ctype}"));
        }
        let boundary = ctype
            .split(';')
            .map(str::trim)
            .find_map(|p| {
                p.strip_prefix("boundary=")
                    .or_else(|| p.strip_prefix("Boundary="))
            })
            .ok_or_else(|| format!("no boundary in {ctype}"))?
            .trim_matches('"')
            .to_owned();
        let body = self.text();
        let delimiter = format!("--{boundary}");
        let mut values = Vec::new();
        for part in body.split(delimiter.as_str()).skip(1) {
            if part.starts_with("--") {
                break;
            }
            let part = part.strip_prefix("\r\n").unwrap_or(part);
            let Some(split) = part.find("\r\n\r\n") else {
                return Err(format!("multipart part without headers: {part:?}"));
            };
            let value = &part[split + 4..];
            let value = value.strip_suffix("\r\n").unwrap_or(value);
            values.push(value.to_owned());
        }
        Ok(values)
    }
}

/// One request on a fresh connection (`Connection: close`), with an overall `timeout`.
pub fn request(
    method: &str,
    addr: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<Resp, HttpError> {
    let sock: SocketAddr = addr
        .parse()
        .map_err(|e| HttpError::Connect(format!("bad address {addr}: {e}")))?;
    let connect_timeout = timeout.min(Duration::from_secs(2));
    let mut stream = TcpStream::connect_timeout(&sock, connect_timeout)
        .map_err(|e| HttpError::Connect(format!("{method} {addr}{path}: {e}")))?;
    stream.set_read_timeout(Some(timeout)).ok();
    stream.set_write_timeout(Some(timeout)).ok();
    stream.set_nodelay(true).ok();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        let _ = write!(head, "{name}: {value}\r\n");
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    stream
        .write_all(&bytes)
        .map_err(|e| HttpError::Unknown(format!("{method} {addr}{path}: write: {e}")))?;
    let started = Instant::now();
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) => {
                return Err(HttpError::Unknown(format!(
                    "{method} {addr}{path}: read after {:?}: {e}",
                    started.elapsed()
                )));
            }
        }
        if started.elapsed() > timeout {
            return Err(HttpError::Unknown(format!(
                "{method} {addr}{path}: answer took longer than {timeout:?}"
            )));
        }
    }
    parse_response(&raw).map_err(|e| HttpError::Unknown(format!("{method} {addr}{path}: {e}")))
}

fn parse_response(raw: &[u8]) -> Result<Resp, String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no complete answer head in {} bytes", raw.len()))?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let rest = &raw[end + 4..];
    let chunked = headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked")
    });
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(len) = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        if rest.len() < len {
            return Err(format!("body truncated: {} of {len} bytes", rest.len()));
        }
        rest[..len].to_vec()
    } else {
        rest.to_vec()
    };
    Ok(Resp {
        status,
        headers,
        body,
    })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunked body truncated")?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|e| format!("bad chunk size {size_text:?}: {e}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err("chunk truncated".into());
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_multipart_siblings() {
        let body = "\r\n--B\r\nContent-Type: text/plain\r\nEtag: x\r\n\r\n1,2\r\n--B\r\nContent-Type: text/plain\r\n\r\n3\r\n--B--\r\n";
        let raw = format!(
            "HTTP/1.1 300 Multiple Choices\r\ncontent-type: multipart/mixed; boundary=B\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let resp = parse_response(raw.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(resp.values(), Ok(vec!["1,2".to_owned(), "3".to_owned()]));
    }
}
