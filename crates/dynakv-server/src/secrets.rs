//! The two secrets a node keeps as files in its data directory.
//!
//! - `cluster.secret` ([`CLUSTER_SECRET_FILE`]): 32 random bytes made by the node that founds
//!   the cluster, written as 64 hex digits and a newline, mode 0600. Every member holds the
//!   same bytes: a joining node is given a copy by its operator (`--cluster-secret-file`). Two
//!   keys are derived from it with BLAKE3's key derivation, each under its own context string:
//!   the pre-shared key of the peer links' Noise handshake ([`ClusterSecret::link_psk`]) and the
//!   key of the MAC that authenticates client contexts ([`ClusterSecret::context_key`]). Neither
//!   the secret nor a derived key is ever sent to anyone.
//! - `node.key` ([`NODE_KEY_FILE`]): this node's X25519 private key (64 hex digits), made at the
//!   first start, mode 0600. Its public key is the node's identity on peer links and in the
//!   membership (the node name is only a label).
//!
//! Invariants: a file is written whole to a temporary name, synced and renamed, so a crash
//! leaves either no file or a complete one; a file that does not parse is an error naming the
//! file, never replaced silently (that would split the node from its cluster).

use dynakv_core::context::ContextKey;
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// File name of the cluster secret in a data directory.
pub const CLUSTER_SECRET_FILE: &str = "cluster.secret";
/// File name of the node's private key in a data directory.
pub const NODE_KEY_FILE: &str = "node.key";
/// Bytes of the cluster secret and of a node key.
pub const SECRET_BYTES: usize = 32;
/// Largest secret or key file read (64 hex digits plus whitespace).
const MAX_SECRET_FILE_BYTES: u64 = 1024;

/// BLAKE3 key-derivation contexts: one per use, so no derived key serves two purposes.
const LINK_PSK_CONTEXT: &str = "dynakv 2026-12 peer link Noise pre-shared key v1";
const CONTEXT_MAC_CONTEXT: &str = "dynakv 2026-12 client context MAC key v1";

/// Why a secret could not be read or written.
#[derive(Debug, Error)]
pub enum SecretError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a dynakv secret: expected 64 hex digits ({reason})")]
    Malformed { path: PathBuf, reason: String },
}

/// The cluster's shared secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSecret([u8; SECRET_BYTES]);

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

impl ClusterSecret {
    /// A new random secret (the operating system's generator).
    pub fn generate() -> Self {
        ClusterSecret(rand::random())
    }

    pub fn from_bytes(bytes: [u8; SECRET_BYTES]) -> Self {
        ClusterSecret(bytes)
    }

    /// Read a secret file (64 hex digits, surrounding whitespace ignored).
    pub fn read(path: &Path) -> Result<Self, SecretError> {
        read_hex_file(path).map(ClusterSecret)
    }

    /// Write the secret to `path` (mode 0600, synced, atomically renamed into place).
    pub fn write(&self, path: &Path) -> Result<(), SecretError> {
        write_hex_file(path, &self.0)
    }

    /// The pre-shared key of the peer links' Noise handshake.
    pub fn link_psk(&self) -> [u8; SECRET_BYTES] {
        blake3::derive_key(LINK_PSK_CONTEXT, &self.0)
    }

    /// The key of the MAC over client contexts.
    pub fn context_key(&self) -> ContextKey {
        ContextKey::from_bytes(blake3::derive_key(CONTEXT_MAC_CONTEXT, &self.0))
    }
}

/// A node's long-term X25519 key pair.
#[derive(Clone)]
pub struct NodeKey {
    private: [u8; SECRET_BYTES],
    public: [u8; SECRET_BYTES],
}

impl fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeKey(public {})", hex(&self.public))
    }
}

impl NodeKey {
    /// A new random key pair.
    pub fn generate() -> Self {
        Self::from_private(rand::random())
    }

    /// The key pair of an X25519 private key (clamped as X25519 does).
    pub fn from_private(private: [u8; SECRET_BYTES]) -> Self {
        let public = curve25519_dalek::MontgomeryPoint::mul_base_clamped(private).to_bytes();
        NodeKey { private, public }
    }

    pub fn private(&self) -> &[u8; SECRET_BYTES] {
        &self.private
    }

    /// The node's identity.
    pub fn public(&self) -> &[u8; SECRET_BYTES] {
        &self.public
    }

    /// Load `DIR/node.key`, or make one and write it there when there is none.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, SecretError> {
        let path = data_dir.join(NODE_KEY_FILE);
        if path.exists() {
            return read_hex_file(&path).map(Self::from_private);
        }
        let key = Self::generate();
        write_hex_file(&path, &key.private)?;
        Ok(key)
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn read_hex_file(path: &Path) -> Result<[u8; SECRET_BYTES], SecretError> {
    let read_error = |source| SecretError::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_error)?;
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(file, MAX_SECRET_FILE_BYTES),
        &mut text,
    )
    .map_err(read_error)?;
    warn_if_readable_by_others(path);
    parse_hex(text.trim()).map_err(|reason| SecretError::Malformed {
        path: path.to_owned(),
        reason,
    })
}

fn parse_hex(text: &str) -> Result<[u8; SECRET_BYTES], String> {
    if text.len() != SECRET_BYTES * 2 {
        return Err(format!("found {} characters", text.len()));
    }
    let mut out = [0_u8; SECRET_BYTES];
    for (i, byte) in out.iter_mut().enumerate() {
        let pair = text
            .get(i * 2..i * 2 + 2)
            .ok_or_else(|| "not ASCII".to_owned())?;
        *byte = u8::from_str_radix(pair, 16).map_err(|_| format!("{pair:?} is not hex"))?;
    }
    Ok(out)
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777), "a secret file is readable by other users: chmod 600 it");
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_: &Path) {}

fn write_hex_file(path: &Path, bytes: &[u8; SECRET_BYTES]) -> Result<(), SecretError> {
    let write_error = |source| SecretError::Write {
        path: path.to_owned(),
        source,
    };
    let temporary = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(&temporary).map_err(write_error)?;
    file.write_all(format!("{}\n", hex(bytes)).as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(write_error)?;
    drop(file);
    std::fs::rename(&temporary, path).map_err(write_error)?;
    if let Some(dir) = path.parent()
        && let Ok(dir) = std::fs::File::open(dir)
    {
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn secret_round_trips_through_its_file_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CLUSTER_SECRET_FILE);
        let secret = ClusterSecret::generate();
        secret.write(&path).unwrap();
        assert_eq!(ClusterSecret::read(&path).unwrap(), secret);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn malformed_secret_files_are_refused_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.secret");
        for text in [
            "",
            "abc",
            &"zz".repeat(32),
            &"00".repeat(33),
            "ü".repeat(32).as_str(),
        ] {
            std::fs::write(&path, text).unwrap();
            let error = ClusterSecret::read(&path).unwrap_err().to_string();
            assert!(error.contains("bad.secret"), "{error}");
        }
    }

    #[test]
    fn derived_keys_differ_from_each_other_and_between_secrets() {
        let a = ClusterSecret::from_bytes([1; 32]);
        let b = ClusterSecret::from_bytes([2; 32]);
        assert_ne!(a.link_psk(), *a.context_key().as_bytes());
        assert_ne!(a.link_psk(), b.link_psk());
        assert_ne!(a.context_key().as_bytes(), b.context_key().as_bytes());
        assert_ne!(a.link_psk(), [1; 32]);
    }

    #[test]
    fn node_key_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = NodeKey::load_or_create(dir.path()).unwrap();
        let again = NodeKey::load_or_create(dir.path()).unwrap();
        assert_eq!(first.public(), again.public());
        let other = tempfile::tempdir().unwrap();
        assert_ne!(
            NodeKey::load_or_create(other.path()).unwrap().public(),
            first.public()
        );
    }
}
