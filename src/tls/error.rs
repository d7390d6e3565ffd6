//! Errors from loading TLS material and building configs. Each one names
//! the file (or the setting) at fault, because the person reading it is an
//! operator with a config file open, not a developer with a backtrace.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },

    #[error("{}: bad PEM: {message}", path.display())]
    Pem { path: PathBuf, message: String },

    #[error("{}: no certificate found (expected a PEM `BEGIN CERTIFICATE` block)", path.display())]
    NoCertificates { path: PathBuf },

    #[error("{}: no private key found (expected a PEM `BEGIN PRIVATE KEY`, `BEGIN RSA PRIVATE KEY` or `BEGIN EC PRIVATE KEY` block){hint}", path.display())]
    NoPrivateKey { path: PathBuf, hint: &'static str },

    #[error("{}: the private key is encrypted; store it decrypted (e.g. `openssl pkey -in KEY -out KEY.plain`) and protect the file with permissions", path.display())]
    EncryptedKey { path: PathBuf },

    #[error("{}: unusable private key: {source}", path.display())]
    BadKey {
        path: PathBuf,
        source: rustls::Error,
    },

    #[error("private key {} does not match certificate {}{hint}", key.display(), cert.display())]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        hint: String,
    },

    #[error("{}: certificate #{index} is not usable as a trust anchor: {source}", path.display())]
    BadCa {
        path: PathBuf,
        /// 1-based position in the file.
        index: usize,
        source: rustls::Error,
    },

    #[error("unknown cipher suite `{name}`; valid names: {valid}")]
    UnknownCipherSuite { name: String, valid: String },

    #[error("invalid server name `{name}`: {reason}")]
    BadName { name: String, reason: String },

    #[error("invalid TLS settings: {0}")]
    Config(String),

    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),

    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),

    #[error("generating a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

impl TlsError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        TlsError::Io {
            path: path.into(),
            source,
        }
    }
}
