//! dynakv-client: an async client for dynakv's Riak-compatible HTTP API.
//!
//! It speaks HTTP/1.1 over pooled keep-alive connections with TCP_NODELAY set, plain
//! (`http://`) or over TLS (`https://`, trusting the CA certificate given with
//! [`Client::with_ca_cert`]), optionally with HTTP Basic credentials
//! ([`Client::with_basic_auth`]). It asks for siblings as `multipart/mixed`, and hands back
//! every sibling with the opaque causal context to send with the next write (read, merge,
//! write back: the Dynamo way).

pub mod connector;
pub mod routing;

use connector::Connector;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

/// Characters left as they are in a URL path segment.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');
/// Largest response body the client accepts.
pub const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;
/// Default time limit of one request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// The context header.
pub const VCLOCK_HEADER: &str = "x-riak-vclock";

/// A failed request.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("invalid URL {0:?}")]
    InvalidUrl(String),
    #[error("cannot reach {url}: {message}")]
    Connect { url: String, message: String },
    #[error("request timed out after {0:?}")]
    Timeout(Duration),
    #[error("server answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("unexpected response: {0}")]
    Protocol(String),
    #[error("TLS: {0}")]
    Tls(String),
}

/// One version of a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sibling {
    pub value: Bytes,
    pub content_type: String,
    /// The version's tag (Riak's vtag, sent as `ETag`).
    pub vtag: String,
    pub last_modified: Option<String>,
    /// `X-Riak-Meta-*` entries, names lower-cased without the prefix.
    pub meta: Vec<(String, String)>,
}

/// What a fetch returned: every causally unrelated version and the context that covers them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub siblings: Vec<Sibling>,
    /// Send this back with the next write or delete of the key.
    pub context: Option<String>,
}

/// A client of one dynakv node.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    http: HyperClient<Connector, Full<Bytes>>,
    timeout: Duration,
    /// What `https://` connections trust (`None`: no https).
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The CA certificates given ([`Client::with_ca_cert`]), kept to rebuild `tls` when a
    /// client certificate is given after them.
    ca_pem: Option<Vec<u8>>,
    /// The client certificate presented to nodes that ask for one.
    identity: Option<connector::ClientIdentity>,
    /// The `Authorization` header sent with every request (HTTP Basic), marked sensitive.
    authorization: Option<HeaderValue>,
}

/// How long an idle pooled connection is kept.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

fn hyper_client(tls: Option<Arc<rustls::ClientConfig>>) -> HyperClient<Connector, Full<Bytes>> {
    HyperClient::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .build(Connector::new(tls))
}

/// Options of a store.
#[derive(Debug, Clone, Default)]
pub struct PutOptions<'a> {
    pub content_type: Option<&'a str>,
    pub context: Option<&'a str>,
    pub meta: &'a [(&'a str, &'a str)],
    pub w: Option<u32>,
    pub dw: Option<u32>,
}

impl Client {
    /// A client of the node at `url` (e.g. `http://127.0.0.1:8098`, or `https://...` with
    /// [`Client::with_ca_cert`]).
    pub fn new(url: &str) -> Result<Client, ClientError> {
        let base = url.trim_end_matches('/').to_owned();
        let uri: Uri = base
            .parse()
            .map_err(|_| ClientError::InvalidUrl(url.to_owned()))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(ClientError::InvalidUrl(url.to_owned()));
        }
        Ok(Client {
            base,
            http: hyper_client(None),
            timeout: DEFAULT_TIMEOUT,
            tls: None,
            ca_pem: None,
            identity: None,
            authorization: None,
        })
    }

    /// Trust the CA certificate(s) in `ca_pem` (PEM) for `https://` URLs, and only them (no
    /// system roots). The node's certificate must name the URL's host (a DNS name or an IP
    /// address in its subject alternative names).
    pub fn with_ca_cert(mut self, ca_pem: &[u8]) -> Result<Self, ClientError> {
        self.ca_pem = Some(ca_pem.to_vec());
        self.rebuild_tls()?;
        Ok(self)
    }

    /// Present the client certificate in `cert_pem` (PEM, the client's certificate first,
    /// then any intermediates) with its private key `key_pem` (PEM: PKCS#8, PKCS#1 or SEC1)
    /// to `https://` nodes that ask for one: a node with `--tls-client-ca` authenticates a
    /// user of a `certificate` source by it (the certificate must name the user as a DNS
    /// subjectAltName; Basic credentials still name the user). Give the CA too
    /// ([`Client::with_ca_cert`], before or after).
    pub fn with_client_cert(
        mut self,
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<Self, ClientError> {
        self.identity =
            Some(connector::ClientIdentity::from_pem(cert_pem, key_pem).map_err(ClientError::Tls)?);
        self.rebuild_tls()?;
        Ok(self)
    }

    /// `tls` (and the connection pool) from the CA and the client certificate given.
    fn rebuild_tls(&mut self) -> Result<(), ClientError> {
        let Some(ca_pem) = &self.ca_pem else {
            return Ok(());
        };
        let config =
            connector::client_config(ca_pem, self.identity.as_ref()).map_err(ClientError::Tls)?;
        self.http = hyper_client(Some(Arc::clone(&config)));
        self.tls = Some(config);
        Ok(())
    }

    /// Send HTTP Basic credentials with every request (use them over `https://` only: over
    /// plain HTTP anyone on the path reads them).
    #[must_use]
    pub fn with_basic_auth(mut self, user: &str, password: &str) -> Self {
        use base64::Engine as _;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        // Base64 is always a valid header value.
        self.authorization =
            HeaderValue::from_str(&format!("Basic {token}"))
                .ok()
                .map(|mut value| {
                    value.set_sensitive(true);
                    value
                });
        self
    }

    /// A client of another node (`host:port`) of the same cluster, with this client's scheme,
    /// CA, credentials and time limit, and its own connection pool.
    pub fn for_node(&self, addr: &str) -> Result<Client, ClientError> {
        let scheme = if self.base.starts_with("https://") {
            "https"
        } else {
            "http"
        };
        let mut client = Client::new(&format!("{scheme}://{addr}"))?;
        client.http = hyper_client(self.tls.clone());
        client.tls.clone_from(&self.tls);
        client.ca_pem.clone_from(&self.ca_pem);
        client.identity.clone_from(&self.identity);
        client.authorization.clone_from(&self.authorization);
        client.timeout = self.timeout;
        Ok(client)
    }

    /// Change the per-request time limit.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The node's base URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    fn object_path(bucket: &str, key: &str) -> String {
        format!(
            "/buckets/{}/keys/{}",
            utf8_percent_encode(bucket, SEGMENT),
            utf8_percent_encode(key, SEGMENT)
        )
    }

    /// Send a request; returns status, headers and body.
    pub async fn request(
        &self,
        method: Method,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<(StatusCode, HeaderMap, Bytes), ClientError> {
        let url = format!("{}{}", self.base, path_and_query);
        let mut builder = Request::builder().method(method).uri(&url);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        if let Some(authorization) = &self.authorization {
            builder = builder.header(header::AUTHORIZATION, authorization.clone());
        }
        let request = builder
            .body(Full::new(body))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let exchange = async {
            let response = self.http.request(request).await.map_err(|e| {
                let mut message = error_chain(&e);
                // What a TLS alert read as an HTTP answer looks like.
                if self.base.starts_with("http://") && message.contains("invalid HTTP version") {
                    message.push_str(" (does the node speak HTTPS? try an https:// URL)");
                }
                ClientError::Connect {
                    url: self.base.clone(),
                    message,
                }
            })?;
            let (parts, body) = response.into_parts();
            let body = http_body_util::Limited::new(body, MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| ClientError::Protocol(format!("reading the response: {e}")))?
                .to_bytes();
            Ok((parts.status, parts.headers, body))
        };
        tokio_timeout(self.timeout, exchange).await
    }

    /// Fetch a key: `None` when it does not exist.
    pub async fn get(&self, bucket: &str, key: &str) -> Result<Option<Fetched>, ClientError> {
        let path = Self::object_path(bucket, key);
        let (status, headers, body) = self
            .request(
                Method::GET,
                &path,
                &[("accept", "multipart/mixed, */*;q=0.5")],
                Bytes::new(),
            )
            .await?;
        match status {
            StatusCode::NOT_FOUND => Ok(None),
            StatusCode::OK | StatusCode::MULTIPLE_CHOICES => {
                parse_object(status, &headers, body).map(Some)
            }
            other => Err(status_error(other, &body)),
        }
    }

    /// Store a value; returns what the key holds afterwards (`returnbody=true`).
    pub async fn put(
        &self,
        bucket: &str,
        key: &str,
        value: Bytes,
        options: &PutOptions<'_>,
    ) -> Result<Fetched, ClientError> {
        let mut query = String::from("?returnbody=true");
        if let Some(w) = options.w {
            query = format!("{query}&w={w}");
        }
        if let Some(dw) = options.dw {
            query = format!("{query}&dw={dw}");
        }
        let path = format!("{}{query}", Self::object_path(bucket, key));
        let meta_names: Vec<String> = options
            .meta
            .iter()
            .map(|(name, _)| format!("x-riak-meta-{name}"))
            .collect();
        let mut headers: Vec<(&str, &str)> = vec![
            (
                "content-type",
                options.content_type.unwrap_or("application/octet-stream"),
            ),
            ("accept", "multipart/mixed, */*;q=0.5"),
        ];
        if let Some(context) = options.context {
            headers.push((VCLOCK_HEADER, context));
        }
        for (name, (_, value)) in meta_names.iter().zip(options.meta) {
            headers.push((name.as_str(), value));
        }
        let (status, response_headers, body) =
            self.request(Method::PUT, &path, &headers, value).await?;
        match status {
            StatusCode::OK | StatusCode::MULTIPLE_CHOICES => {
                parse_object(status, &response_headers, body)
            }
            other => Err(status_error(other, &body)),
        }
    }

    /// Delete a key with the context of a read (or without: deletes what the node holds).
    /// Returns false when the key did not exist.
    pub async fn delete(
        &self,
        bucket: &str,
        key: &str,
        context: Option<&str>,
    ) -> Result<bool, ClientError> {
        let path = Self::object_path(bucket, key);
        let mut headers = Vec::new();
        if let Some(context) = context {
            headers.push((VCLOCK_HEADER, context));
        }
        let (status, _, body) = self
            .request(Method::DELETE, &path, &headers, Bytes::new())
            .await?;
        match status {
            StatusCode::NO_CONTENT => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            other => Err(status_error(other, &body)),
        }
    }

    /// The path of a data type key of `bucket_type`.
    fn datatype_path(bucket_type: &str, bucket: &str, key: &str) -> String {
        format!(
            "/types/{}/buckets/{}/datatypes/{}",
            utf8_percent_encode(bucket_type, SEGMENT),
            utf8_percent_encode(bucket, SEGMENT),
            utf8_percent_encode(key, SEGMENT)
        )
    }

    /// Fetch a data type key (a bucket type with a `datatype`): Riak's JSON
    /// `{"type": .., "value": .., "context": ..}`, or `None` when not found.
    pub async fn fetch_datatype(
        &self,
        bucket_type: &str,
        bucket: &str,
        key: &str,
    ) -> Result<Option<serde_json::Value>, ClientError> {
        let path = Self::datatype_path(bucket_type, bucket, key);
        let (status, _, body) = self.request(Method::GET, &path, &[], Bytes::new()).await?;
        match status {
            StatusCode::NOT_FOUND => Ok(None),
            StatusCode::OK => serde_json::from_slice(&body)
                .map(Some)
                .map_err(|e| ClientError::Protocol(e.to_string())),
            other => Err(status_error(other, &body)),
        }
    }

    /// Apply an operation to a data type key (Riak's JSON: `{"increment": 1}`,
    /// `{"add_all": [..], "context": ..}`, `{"update": {..}}`); returns the value after it.
    pub async fn update_datatype(
        &self,
        bucket_type: &str,
        bucket: &str,
        key: &str,
        operation: &serde_json::Value,
    ) -> Result<serde_json::Value, ClientError> {
        let path = format!(
            "{}?returnbody=true",
            Self::datatype_path(bucket_type, bucket, key)
        );
        let (status, _, body) = self
            .request(
                Method::POST,
                &path,
                &[("content-type", "application/json")],
                Bytes::from(operation.to_string()),
            )
            .await?;
        match status {
            StatusCode::OK => {
                serde_json::from_slice(&body).map_err(|e| ClientError::Protocol(e.to_string()))
            }
            other => Err(status_error(other, &body)),
        }
    }

    /// GET a JSON resource (`/stats`, `/admin/...`).
    pub async fn get_json(&self, path: &str) -> Result<serde_json::Value, ClientError> {
        let (status, _, body) = self
            .request(
                Method::GET,
                path,
                &[("accept", "application/json")],
                Bytes::new(),
            )
            .await?;
        if status != StatusCode::OK {
            return Err(status_error(status, &body));
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// POST a JSON body to a resource (`/admin/join`, ...) and return the JSON answer.
    pub async fn post_json(
        &self,
        path: &str,
        body: &str,
    ) -> Result<serde_json::Value, ClientError> {
        let (status, _, body) = self
            .request(
                Method::POST,
                path,
                &[("content-type", "application/json")],
                Bytes::from(body.to_owned()),
            )
            .await?;
        if status != StatusCode::OK {
            return Err(status_error(status, &body));
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::Protocol(e.to_string()))
    }

    /// `GET /ping`.
    pub async fn ping(&self) -> Result<(), ClientError> {
        let (status, _, body) = self
            .request(Method::GET, "/ping", &[], Bytes::new())
            .await?;
        if status == StatusCode::OK && body.as_ref() == b"OK" {
            Ok(())
        } else {
            Err(status_error(status, &body))
        }
    }
}

async fn tokio_timeout<T>(
    limit: Duration,
    future: impl Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    match tokio::time::timeout(limit, future).await {
        Ok(result) => result,
        Err(_) => Err(ClientError::Timeout(limit)),
    }
}

/// An error and its sources, `: `-separated (hyper-util's connect errors say only
/// "client error (Connect)" at the top; the reason is in the sources).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn status_error(status: StatusCode, body: &[u8]) -> ClientError {
    ClientError::Status {
        status: status.as_u16(),
        message: String::from_utf8_lossy(body).trim().to_owned(),
    }
}

fn header_string(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v: &HeaderValue| v.to_str().ok())
        .map(str::to_owned)
}

fn sibling_from(headers: &HeaderMap, value: Bytes) -> Sibling {
    let meta = headers
        .iter()
        .filter_map(|(name, value)| {
            let name = name.as_str().strip_prefix("x-riak-meta-")?;
            Some((name.to_owned(), value.to_str().ok()?.to_owned()))
        })
        .collect();
    Sibling {
        value,
        content_type: header_string(headers, "content-type").unwrap_or_default(),
        vtag: header_string(headers, "etag").unwrap_or_default(),
        last_modified: header_string(headers, "last-modified"),
        meta,
    }
}

fn parse_object(
    status: StatusCode,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Fetched, ClientError> {
    let context = header_string(headers, VCLOCK_HEADER);
    if status == StatusCode::OK {
        return Ok(Fetched {
            siblings: vec![sibling_from(headers, body)],
            context,
        });
    }
    let content_type = header_string(headers, "content-type").unwrap_or_default();
    let boundary = content_type
        .split(';')
        .map(str::trim)
        .find_map(|p| p.strip_prefix("boundary="))
        .map(|b| b.trim_matches('"').to_owned())
        .ok_or_else(|| ClientError::Protocol("300 without a multipart boundary".into()))?;
    let siblings = parse_multipart(&body, &boundary)?;
    Ok(Fetched { siblings, context })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Split a `multipart/mixed` body into siblings.
pub fn parse_multipart(body: &Bytes, boundary: &str) -> Result<Vec<Sibling>, ClientError> {
    let delimiter = format!("\r\n--{boundary}");
    let mut siblings = Vec::new();
    // Accept a body that starts with the delimiter without its leading CRLF.
    let mut rest: Bytes = if body.starts_with(&delimiter.as_bytes()[2..]) {
        body.slice(delimiter.len() - 2..)
    } else {
        let start = find(body, delimiter.as_bytes())
            .ok_or_else(|| ClientError::Protocol("multipart body without a boundary".into()))?;
        body.slice(start + delimiter.len()..)
    };
    loop {
        if rest.starts_with(b"--") {
            return Ok(siblings);
        }
        let part_start = if rest.starts_with(b"\r\n") { 2 } else { 0 };
        let part = rest.slice(part_start..);
        let end = find(&part, delimiter.as_bytes())
            .ok_or_else(|| ClientError::Protocol("unterminated multipart part".into()))?;
        let whole = part.slice(..end);
        let split = find(&whole, b"\r\n\r\n")
            .ok_or_else(|| ClientError::Protocol("multipart part without headers".into()))?;
        let mut headers = HeaderMap::new();
        for line in whole[..split].split(|b| *b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(colon) = line.iter().position(|b| *b == b':') else {
                continue;
            };
            let (Ok(name), Ok(value)) = (
                header::HeaderName::from_bytes(line[..colon].trim_ascii()),
                HeaderValue::from_bytes(line[colon + 1..].trim_ascii()),
            ) else {
                continue;
            };
            headers.append(name, value);
        }
        siblings.push(sibling_from(&headers, whole.slice(split + 4..)));
        rest = part.slice(end + delimiter.len()..);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_riak_style_multipart() {
        let body = Bytes::from_static(
            b"\r\n--XYZ\r\nContent-Type: text/plain\r\nEtag: a1\r\n\r\nred\r\n--XYZ\r\nContent-Type: text/plain\r\nEtag: b2\r\nX-Riak-Meta-Color: blue\r\n\r\nblue\r\n--XYZ--\r\n",
        );
        let siblings = parse_multipart(&body, "XYZ").unwrap();
        assert_eq!(siblings.len(), 2);
        assert_eq!(siblings[0].value, Bytes::from_static(b"red"));
        assert_eq!(siblings[0].vtag, "a1");
        assert_eq!(siblings[1].value, Bytes::from_static(b"blue"));
        assert_eq!(
            siblings[1].meta,
            vec![("color".to_owned(), "blue".to_owned())]
        );
        assert!(parse_multipart(&Bytes::from_static(b"junk"), "XYZ").is_err());
        assert!(
            parse_multipart(
                &Bytes::from_static(b"\r\n--XYZ\r\nA: b\r\n\r\nno end"),
                "XYZ"
            )
            .is_err()
        );
    }
}
