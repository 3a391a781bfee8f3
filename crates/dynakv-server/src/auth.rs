//! Client authentication and authorization over HTTP, with Riak's security model (users,
//! sources, grants: `dynakv_core::security`).
//!
//! While security is disabled nothing is checked. While it is enabled every request but
//! `GET /ping` must come over TLS (plain HTTP is refused, as Riak does) with HTTP Basic
//! credentials: the user must exist, the most specific source for the client's address must
//! let it in (`trust`, `password` with the right password, or `certificate` with a verified
//! client certificate for the user's name: [`certificate_names_user`]), and a grant must give the
//! permission the request needs ([`required`]) on `any` bucket or on the request's bucket.
//! Missing or wrong credentials answer 401 with `WWW-Authenticate: Basic`; a missing grant
//! answers 403. The reason is logged, not told to the client.
//!
//! Passwords are stored as Argon2id hashes ([`hash_password`]; 19 MiB, 2 passes, the OWASP
//! minimum) with a random 16-byte salt. Checking one costs tens of milliseconds, so a
//! verified `(user, password)` is remembered ([`AuthCache`]) for [`AUTH_CACHE_TTL`] under a
//! keyed hash (the password itself is not kept), as long as the user's stored hash is the one
//! it was verified against; the cache holds at most [`AUTH_CACHE_ENTRIES`] entries.

use crate::http_serve::ClientConnection;
use argon2::{Algorithm, Argon2, Params, Version};
use axum::http::{HeaderMap, Method, header};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use dynakv_core::security::{Permission, SecurityState, SourceCheck};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Argon2id memory cost, KiB.
const ARGON2_MEMORY_KIB: u32 = 19 * 1024;
/// Argon2id passes.
const ARGON2_PASSES: u32 = 2;
/// Argon2id lanes.
const ARGON2_LANES: u32 = 1;
/// Bytes of a password hash.
const HASH_BYTES: usize = 32;
/// Bytes of a salt.
const SALT_BYTES: usize = 16;
/// Longest password accepted, in bytes.
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// How long a verified password is remembered.
pub const AUTH_CACHE_TTL: Duration = Duration::from_secs(600);
/// Most remembered verifications (the cache is emptied when full).
pub const AUTH_CACHE_ENTRIES: usize = 4096;
/// Longest `Authorization` header read, in bytes.
const MAX_AUTHORIZATION_BYTES: usize = 4096;

fn argon2() -> Result<Argon2<'static>, String> {
    let params = Params::new(
        ARGON2_MEMORY_KIB,
        ARGON2_PASSES,
        ARGON2_LANES,
        Some(HASH_BYTES),
    )
    .map_err(|e| format!("argon2 parameters: {e}"))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// The stored form of a password: `argon2id$m=..,t=..,p=..$SALT$HASH` (base64).
pub fn hash_password(password: &str) -> Result<String, String> {
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(format!("a password is at most {MAX_PASSWORD_BYTES} bytes"));
    }
    let salt: [u8; SALT_BYTES] = rand::random();
    let mut hash = [0_u8; HASH_BYTES];
    argon2()?
        .hash_password_into(password.as_bytes(), &salt, &mut hash)
        .map_err(|e| format!("argon2: {e}"))?;
    Ok(format!(
        "argon2id$m={ARGON2_MEMORY_KIB},t={ARGON2_PASSES},p={ARGON2_LANES}${}${}",
        STANDARD.encode(salt),
        STANDARD.encode(hash)
    ))
}

/// Whether `password` matches a stored hash (any parameters [`hash_password`] may have used;
/// a malformed hash matches nothing).
pub fn verify_password(stored: &str, password: &str) -> bool {
    let parts: Vec<&str> = stored.split('$').collect();
    let [algorithm, params, salt, hash] = parts[..] else {
        return false;
    };
    if algorithm != "argon2id" || password.len() > MAX_PASSWORD_BYTES {
        return false;
    }
    let (Ok(salt), Ok(expected)) = (STANDARD.decode(salt), STANDARD.decode(hash)) else {
        return false;
    };
    let mut numbers = params
        .split(',')
        .map(|kv| kv.split_once('=').and_then(|(_, v)| v.parse::<u32>().ok()));
    let (Some(Some(m)), Some(Some(t)), Some(Some(p))) =
        (numbers.next(), numbers.next(), numbers.next())
    else {
        return false;
    };
    // Bounded work: a hash with absurd parameters (from a peer with a bug) is refused.
    if m > 1024 * 1024 || t > 16 || p > 16 || expected.len() != HASH_BYTES {
        return false;
    }
    let Ok(params) = Params::new(m, t, p, Some(HASH_BYTES)) else {
        return false;
    };
    let mut actual = [0_u8; HASH_BYTES];
    if Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(password.as_bytes(), &salt, &mut actual)
        .is_err()
    {
        return false;
    }
    // Constant time in the content of the hashes.
    actual
        .iter()
        .zip(&expected)
        .fold(0_u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

/// Verified `(user, password)` pairs, remembered under a keyed hash.
#[derive(Debug)]
pub struct AuthCache {
    key: [u8; 32],
    /// keyed hash of (user, password) -> (the stored hash verified against, when).
    verified: Mutex<HashMap<[u8; 32], (String, Instant)>>,
}

impl Default for AuthCache {
    fn default() -> Self {
        AuthCache {
            key: rand::random(),
            verified: Mutex::new(HashMap::new()),
        }
    }
}

impl AuthCache {
    fn entry_key(&self, user: &str, password: &str) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new_keyed(&self.key);
        hasher.update(&(user.len() as u64).to_le_bytes());
        hasher.update(user.as_bytes());
        hasher.update(password.as_bytes());
        *hasher.finalize().as_bytes()
    }

    /// Whether `password` matches `stored` for `user`, from the cache or by hashing (on the
    /// blocking pool).
    pub async fn check(&self, user: &str, password: &str, stored: &str) -> bool {
        let key = self.entry_key(user, password);
        if let Some((hash, at)) = self.verified.lock().get(&key)
            && hash == stored
            && at.elapsed() < AUTH_CACHE_TTL
        {
            return true;
        }
        let (owned_stored, owned_password) = (stored.to_owned(), password.to_owned());
        let ok =
            tokio::task::spawn_blocking(move || verify_password(&owned_stored, &owned_password))
                .await
                .unwrap_or(false);
        if ok {
            let mut verified = self.verified.lock();
            if verified.len() >= AUTH_CACHE_ENTRIES {
                verified.clear();
            }
            verified.insert(key, (stored.to_owned(), Instant::now()));
        }
        ok
    }
}

/// What a request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Required {
    /// Nothing (`GET /ping`).
    Nothing,
    /// Valid credentials, no particular grant (`/`, `/stats`, `/metrics`).
    Authenticated,
    /// A permission, on a bucket or on none.
    Permission(Permission, Option<String>),
}

/// The permission a request needs, from its method and path (Riak's new-style, bucket-type
/// and old-style paths). Anything not recognised needs `admin` (fail closed).
pub fn required(method: &Method, path: &str) -> Required {
    // `/types/T/...`: the bucket of a grant is the type's bucket (its internal name).
    let (bucket_type, path) = match path.strip_prefix("/types/") {
        Some(rest) => match rest.split_once('/') {
            Some((t, rest)) => (Some(t), &path[path.len() - rest.len() - 1..]),
            None => (Some(rest), "/"),
        },
        None => (None, path),
    };
    let decode = |s: &str| {
        let bucket = percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned();
        match bucket_type {
            Some(t) => {
                let t = percent_encoding::percent_decode_str(t).decode_utf8_lossy();
                dynakv_core::bucket_types::internal_bucket(&t, &bucket)
            }
            None => bucket,
        }
    };
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let write = |bucket: &str| {
        let permission = if method == Method::DELETE {
            Permission::Delete
        } else if method == Method::GET || method == Method::HEAD {
            Permission::Get
        } else {
            Permission::Put
        };
        Required::Permission(permission, Some(decode(bucket)))
    };
    let read_or_set_props = |bucket: &str| {
        let permission = if method == Method::GET || method == Method::HEAD {
            Permission::GetBucket
        } else {
            Permission::SetBucket
        };
        Required::Permission(permission, Some(decode(bucket)))
    };
    match segments.as_slice() {
        ["ping"] if method == Method::GET || method == Method::HEAD => Required::Nothing,
        [] | ["stats" | "metrics"] if method == Method::GET || method == Method::HEAD => {
            Required::Authenticated
        }
        ["buckets"] => Required::Permission(Permission::ListBuckets, None),
        ["buckets", bucket, "keys"] if method == Method::POST => write(bucket),
        ["buckets", bucket, "keys"] => {
            Required::Permission(Permission::ListKeys, Some(decode(bucket)))
        }
        ["buckets", bucket, "keys", _key, ..] => write(bucket),
        ["buckets", bucket, "index", ..] => {
            Required::Permission(Permission::Index, Some(decode(bucket)))
        }
        // Data types: a fetch is a get, an update (also under a generated key) a put.
        ["buckets", bucket, "datatypes", ..] => write(bucket),
        ["riak", bucket] if method == Method::POST => write(bucket),
        ["buckets", bucket, "props"] | ["riak", bucket] => read_or_set_props(bucket),
        // A type's properties (`/types/T/props`): read as PB's RpbGetBucketTypeReq is,
        // changed by admins only.
        ["props"] if bucket_type.is_some() && (method == Method::GET || method == Method::HEAD) => {
            Required::Permission(Permission::GetBucket, None)
        }
        ["riak", bucket, _key] => write(bucket),
        _ => Required::Permission(Permission::Admin, None),
    }
}

/// The user and password of a Basic `Authorization` header.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    if value.len() > MAX_AUTHORIZATION_BYTES {
        return None;
    }
    let text = std::str::from_utf8(value).ok()?;
    let (scheme, encoded) = text.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = STANDARD.decode(encoded.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// Whether a client certificate (already verified against the client CAs by the TLS
/// handshake) names `user`: the user name must be one of its DNS subjectAltNames. Riak
/// matches the subject's CN instead; modern verifiers (webpki among them) ignore the CN, so
/// dynakv does too (docs/SECURITY.md).
pub fn certificate_names_user(
    der: &rustls::pki_types::CertificateDer<'_>,
    user: &str,
) -> Result<(), String> {
    let cert = webpki::EndEntityCert::try_from(der)
        .map_err(|e| format!("unreadable client certificate for {user:?}: {e}"))?;
    // A DNS name only: a user named like an IP address is not matched with an IP SAN.
    let Ok(name @ rustls::pki_types::ServerName::DnsName(_)) =
        rustls::pki_types::ServerName::try_from(user)
    else {
        return Err(format!(
            "user name {user:?} cannot be a certificate's DNS name"
        ));
    };
    cert.verify_is_valid_for_subject_name(&name)
        .map_err(|e| format!("the client certificate is not for {user:?}: {e}"))
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Security is enabled and the request came over plain HTTP.
    NeedsTls,
    /// No, malformed or wrong credentials (the reason is for the log).
    Unauthenticated(String),
    /// Authenticated, without the grant.
    Forbidden { user: String, needed: String },
}

/// Check a request against the security state (see the module documentation).
pub async fn check(
    security: &SecurityState,
    cache: &AuthCache,
    connection: Option<&ClientConnection>,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
) -> Result<(), Refusal> {
    if !security.enabled() {
        return Ok(());
    }
    let needed = required(method, path);
    if needed == Required::Nothing {
        return Ok(());
    }
    // Fail closed: a request whose connection is unknown counts as plain and from nowhere.
    let Some(connection) = connection.filter(|c| c.tls) else {
        return Err(Refusal::NeedsTls);
    };
    let Some((user, password)) = basic_credentials(headers) else {
        return Err(Refusal::Unauthenticated("no Basic credentials".to_owned()));
    };
    authenticate(security, cache, connection, &user, &password).await?;
    permit(security, &user, needed)
}

/// Check `user`'s credentials against the source that applies to the connection's address
/// (trust, password or certificate): the one rule of the HTTP and PB ports.
pub async fn authenticate(
    security: &SecurityState,
    cache: &AuthCache,
    connection: &ClientConnection,
    user: &str,
    password: &str,
) -> Result<(), Refusal> {
    match security.source_for(user, connection.remote_addr.ip()) {
        SourceCheck::Trust => Ok(()),
        SourceCheck::Password(stored) => {
            if cache.check(user, password, stored).await {
                Ok(())
            } else {
                Err(Refusal::Unauthenticated(format!(
                    "wrong password for {user:?}"
                )))
            }
        }
        SourceCheck::Certificate => {
            let Some(der) = &connection.client_certificate else {
                return Err(Refusal::Unauthenticated(format!(
                    "no client certificate for {user:?}"
                )));
            };
            certificate_names_user(der, user).map_err(Refusal::Unauthenticated)
        }
        SourceCheck::Refuse(reason) => Err(Refusal::Unauthenticated(reason)),
    }
}

/// Whether an authenticated `user` may make a request that needs `needed`.
pub fn permit(security: &SecurityState, user: &str, needed: Required) -> Result<(), Refusal> {
    let user = user.to_owned();
    match needed {
        Required::Nothing | Required::Authenticated => Ok(()),
        Required::Permission(permission, bucket) => {
            if security.permits(&user, permission, bucket.as_deref()) {
                Ok(())
            } else {
                Err(Refusal::Forbidden {
                    user,
                    needed: match bucket {
                        Some(bucket) => format!("{} on {bucket}", permission.name()),
                        None => format!("{} on any", permission.name()),
                    },
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn passwords_verify_and_wrong_ones_do_not() {
        let stored = hash_password("s3cret").unwrap();
        assert!(stored.starts_with("argon2id$m=19456,t=2,p=1$"));
        assert!(verify_password(&stored, "s3cret"));
        assert!(!verify_password(&stored, "s3cret "));
        assert!(!verify_password(&stored, ""));
        assert_ne!(hash_password("s3cret").unwrap(), stored, "salted");
        for bad in [
            "",
            "argon2id$",
            "md5$x$y$z",
            "argon2id$m=99999999,t=2,p=1$AA==$AA==",
        ] {
            assert!(!verify_password(bad, "s3cret"), "{bad}");
        }
    }

    #[test]
    fn requests_map_to_riak_permissions() {
        use Permission as P;
        let b = |p, bucket: &str| Required::Permission(p, Some(bucket.to_owned()));
        let cases = [
            (Method::GET, "/ping", Required::Nothing),
            (Method::GET, "/stats", Required::Authenticated),
            (Method::GET, "/", Required::Authenticated),
            (Method::GET, "/buckets/b/keys/k", b(P::Get, "b")),
            (Method::GET, "/buckets/b/keys/k/preflist", b(P::Get, "b")),
            (Method::PUT, "/buckets/b/keys/k", b(P::Put, "b")),
            (Method::POST, "/buckets/b/keys", b(P::Put, "b")),
            (Method::DELETE, "/buckets/b/keys/k", b(P::Delete, "b")),
            (Method::GET, "/buckets/b/keys", b(P::ListKeys, "b")),
            (
                Method::GET,
                "/buckets",
                Required::Permission(P::ListBuckets, None),
            ),
            (Method::GET, "/buckets/b/props", b(P::GetBucket, "b")),
            (Method::PUT, "/buckets/b/props", b(P::SetBucket, "b")),
            (Method::DELETE, "/buckets/b/props", b(P::SetBucket, "b")),
            (
                Method::GET,
                "/types/default/buckets/b%20x/keys/k",
                b(P::Get, "b x"),
            ),
            (Method::GET, "/riak/b/k", b(P::Get, "b")),
            (Method::PUT, "/riak/b", b(P::SetBucket, "b")),
            (Method::POST, "/riak/b", b(P::Put, "b")),
            (
                Method::POST,
                "/admin/leave",
                Required::Permission(P::Admin, None),
            ),
            (
                Method::GET,
                "/admin/members",
                Required::Permission(P::Admin, None),
            ),
            (Method::POST, "/ping", Required::Permission(P::Admin, None)),
            (
                Method::GET,
                "/anything/else",
                Required::Permission(P::Admin, None),
            ),
        ];
        for (method, path, expected) in cases {
            assert_eq!(required(&method, path), expected, "{method} {path}");
        }
    }

    #[test]
    fn a_certificate_names_the_users_of_its_dns_names_only() {
        let cert = |names: &[&str]| {
            let names = names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();
            rcgen::generate_simple_self_signed(names)
                .unwrap()
                .cert
                .der()
                .clone()
        };
        let alice = cert(&["alice"]);
        assert!(certificate_names_user(&alice, "alice").is_ok());
        assert!(certificate_names_user(&alice, "bob").is_err());
        assert!(certificate_names_user(&alice, "alic").is_err());
        assert!(certificate_names_user(&cert(&["bob", "alice"]), "alice").is_ok());
        // An IP address is not a user name, nor a user name with characters DNS refuses.
        assert!(certificate_names_user(&cert(&["127.0.0.1"]), "127.0.0.1").is_err());
        assert!(certificate_names_user(&alice, "al!ce").is_err());
        let garbage = rustls::pki_types::CertificateDer::from(vec![1_u8, 2, 3]);
        assert!(certificate_names_user(&garbage, "alice").is_err());
    }

    #[test]
    fn basic_credentials_are_parsed_strictly() {
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, value.parse().unwrap());
            basic_credentials(&headers)
        };
        let encoded = STANDARD.encode("alice:pa:ss");
        assert_eq!(
            with(&format!("Basic {encoded}")),
            Some(("alice".into(), "pa:ss".into()))
        );
        assert_eq!(with(&format!("Bearer {encoded}")), None);
        assert_eq!(with("Basic !!!"), None);
        assert_eq!(with(&format!("Basic {}", STANDARD.encode("nocolon"))), None);
    }
}
