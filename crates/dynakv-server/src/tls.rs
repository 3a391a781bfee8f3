//! TLS on the client HTTP port (`--tls-cert FILE --tls-key FILE`, or `tls_cert_file` /
//! `tls_key_file` in the config file).
//!
//! rustls 0.23 with the `ring` crypto provider, TLS 1.2 and 1.3, ALPN `http/1.1` (the port
//! speaks HTTP/1.1 only). The certificate file holds the chain in PEM, the node's certificate
//! first; the key file one private key in PEM (PKCS#8, PKCS#1 or SEC1). Both are read once at
//! start: a file that cannot be read, holds no certificate or key, or a key that does not
//! belong to the certificate stops the node with a message naming the file.
//!
//! With TLS on, the port speaks only TLS: a plain HTTP request is answered by nothing but the
//! end of its connection (rustls refuses the bytes as a ClientHello).
//!
//! With `--tls-client-ca FILE` (`tls_client_ca_file`) as well, the port asks every client for
//! a certificate and verifies any presented against the CA certificates in that file (chain,
//! validity period, client-auth usage); a client that presents none still connects (password
//! and trust sources keep working), one whose certificate does not verify fails the
//! handshake. The verified end-entity certificate reaches the request
//! ([`crate::http_serve::ClientConnection::client_certificate`]) for `certificate` sources.

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;
use thiserror::Error;

/// The ALPN protocol the client port offers (HTTP/1.1 only: no HTTP/2 server here).
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Most certificates read from a certificate file (a chain is a handful; this bounds a
/// mistaken file, such as a whole CA bundle).
pub const MAX_CHAIN_CERTIFICATES: usize = 16;

/// A certificate or key that cannot be used.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("TLS: cannot read the certificate file {path}: {message}")]
    Certificate { path: String, message: String },
    #[error("TLS: cannot read the private key file {path}: {message}")]
    Key { path: String, message: String },
    #[error(
        "TLS: the certificate in {cert} and the key in {key} cannot be used together: {message}"
    )]
    Mismatch {
        cert: String,
        key: String,
        message: String,
    },
    #[error(
        "TLS: give both --tls-cert and --tls-key (or tls_cert_file and tls_key_file), or neither"
    )]
    Incomplete,
    #[error("TLS: cannot use the client CA file {path}: {message}")]
    ClientCa { path: String, message: String },
    #[error(
        "TLS: --tls-client-ca (tls_client_ca_file) needs --tls-cert and --tls-key (tls_cert_file and tls_key_file)"
    )]
    ClientCaWithoutTls,
}

/// Read a PEM certificate chain.
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let error = |message: String| TlsError::Certificate {
        path: path.display().to_string(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| error(e.to_string()))?;
    parse_certificates(&bytes).map_err(error)
}

/// Parse a PEM certificate chain (at least one, at most [`MAX_CHAIN_CERTIFICATES`]).
pub fn parse_certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    parse_at_most(
        pem,
        MAX_CHAIN_CERTIFICATES,
        "give the node's certificate and its chain",
    )
}

/// At least one PEM certificate, at most `limit`.
fn parse_at_most(
    pem: &[u8],
    limit: usize,
    hint: &str,
) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut chain = Vec::new();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| format!("not a PEM certificate: {e}"))?;
        if chain.len() == limit {
            return Err(format!("more than {limit} certificates ({hint})"));
        }
        chain.push(cert);
    }
    if chain.is_empty() {
        return Err("no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into());
    }
    Ok(chain)
}

/// Most certificates read from a client CA file.
pub const MAX_CLIENT_CA_CERTIFICATES: usize = 256;

/// The verifier of client certificates signed by the CAs in `path`: asks every client for a
/// certificate, lets in those that present none.
pub fn client_verifier(
    path: &Path,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let error = |message: String| TlsError::ClientCa {
        path: path.display().to_string(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| error(e.to_string()))?;
    let cas = parse_at_most(
        &bytes,
        MAX_CLIENT_CA_CERTIFICATES,
        "give the CAs that sign client certificates",
    )
    .map_err(error)?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        roots
            .add(ca)
            .map_err(|e| error(format!("not a usable CA certificate: {e}")))?;
    }
    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), crypto_provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| error(e.to_string()))
}

/// Read a PEM private key (PKCS#8, PKCS#1 or SEC1: the first one in the file).
pub fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let error = |message: String| TlsError::Key {
        path: path.display().to_string(),
        message,
    };
    let bytes = std::fs::read(path).map_err(|e| error(e.to_string()))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            error("no PEM private key (PKCS#8, PKCS#1 or SEC1) in it".into())
        }
        other => error(format!("not a PEM private key: {other}")),
    })
}

/// The rustls provider every TLS endpoint of dynakv uses: ring (docs/SECURITY.md). rustls
/// 0.23.48 marks it deprecated because only its aws-lc-rs provider offers post-quantum key
/// exchange; that provider needs cmake and a long C build, which DEPENDENCIES.md rules out.
#[allow(deprecated)]
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The client port's TLS configuration from a certificate file and a key file (no client
/// certificates).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    server_config_with_client_ca(cert, key, None)
}

/// [`server_config`], verifying client certificates against the CAs in `client_ca` when
/// given ([`client_verifier`]).
pub fn server_config_with_client_ca(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let verifier = client_ca.map(client_verifier).transpose()?;
    let chain = read_certificates(cert)?;
    let key_der = read_private_key(key)?;
    let mismatch = |message: String| TlsError::Mismatch {
        cert: cert.display().to_string(),
        key: key.display().to_string(),
        message,
    };
    let builder = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| mismatch(e.to_string()))?;
    let builder = match verifier {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key_der)
        .map_err(|e| mismatch(e.to_string()))?;
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(Arc::new(config))
}

/// [`server_config_with_client_ca`] when both files are given, `None` when neither is (and
/// no client CA either).
pub fn optional_server_config(
    cert: Option<&Path>,
    key: Option<&Path>,
    client_ca: Option<&Path>,
) -> Result<Option<Arc<rustls::ServerConfig>>, TlsError> {
    match (cert, key) {
        (Some(cert), Some(key)) => server_config_with_client_ca(cert, key, client_ca).map(Some),
        (None, None) if client_ca.is_some() => Err(TlsError::ClientCaWithoutTls),
        (None, None) => Ok(None),
        _ => Err(TlsError::Incomplete),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed() -> (String, String) {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        (certified.cert.pem(), certified.signing_key.serialize_pem())
    }

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_certificate_and_its_key_make_a_config() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed();
        let cert = write(dir.path(), "cert.pem", &cert);
        let key = write(dir.path(), "key.pem", &key);
        let config = server_config(&cert, &key).unwrap();
        assert_eq!(config.alpn_protocols, vec![ALPN_HTTP11.to_vec()]);
    }

    #[test]
    fn unusable_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_a, key_a) = self_signed();
        let (_, key_b) = self_signed();
        let cert = write(dir.path(), "cert.pem", &cert_a);
        let key = write(dir.path(), "key.pem", &key_a);
        let other_key = write(dir.path(), "other.pem", &key_b);
        let garbage = write(dir.path(), "garbage.pem", "hello\n");
        let missing = dir.path().join("missing.pem");

        let e = server_config(&missing, &key).unwrap_err().to_string();
        assert!(
            e.contains("certificate file") && e.contains("missing.pem"),
            "{e}"
        );
        let e = server_config(&garbage, &key).unwrap_err().to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
        let e = server_config(&cert, &garbage).unwrap_err().to_string();
        assert!(e.contains("no PEM private key"), "{e}");
        // The key file given as the certificate and the reverse.
        let e = server_config(&key, &cert).unwrap_err().to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
        let e = server_config(&cert, &other_key).unwrap_err().to_string();
        assert!(e.contains("cannot be used together"), "{e}");
        let e = optional_server_config(Some(&cert), None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("both"), "{e}");
        assert!(optional_server_config(None, None, None).unwrap().is_none());
        let e = optional_server_config(None, None, Some(&cert))
            .unwrap_err()
            .to_string();
        assert!(e.contains("tls-client-ca"), "{e}");
        // A client CA file that cannot be used.
        let e = server_config_with_client_ca(&cert, &key, Some(&garbage))
            .unwrap_err()
            .to_string();
        assert!(e.contains("client CA") && e.contains("garbage.pem"), "{e}");
        assert!(server_config_with_client_ca(&cert, &key, Some(&cert)).is_ok());
    }
}
