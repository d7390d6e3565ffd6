//! Why a terminating listener refused a TLS handshake, as a bounded set of
//! reasons: the `reason` label of `fleetgate_tls_handshakes_total` and the
//! words of the log line an operator reads when a device cannot connect.
//!
//! The reason is taken where the failure happens: a certificate verifier
//! error reaches the handshake as a `rustls::Error`, the ClientHello
//! parser's verdict (not TLS, malformed, too large) as a
//! [`HelloError`], and a closed or broken socket as an `io::Error`.

use std::fmt;
use std::io;

use rustls::{AlertDescription, CertificateError, PeerIncompatible};

use super::client_hello::HelloError;
use super::v1_client::V1Refused;

/// Why a handshake did not complete. `None` is the label of a completed
/// one, `Timeout` of one cut by `handshake_timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    None,
    Timeout,
    ClientCertV1,
    ClientCertUnknownIssuer,
    ClientCertExpired,
    ClientCertNotYetValid,
    ClientCertRevoked,
    ClientCertMissing,
    ClientCertBad,
    ServerCertRefused,
    ClientAlert,
    NoSharedCipher,
    NoSharedVersion,
    NoSharedAlpn,
    NotTls,
    BadClientHello,
    HelloTooLarge,
    ProtocolError,
    PeerClosed,
    Io,
    Other,
}

impl Reason {
    /// Every reason, in label order; `ALL[r as usize] == r`.
    pub const ALL: [Reason; 21] = [
        Reason::None,
        Reason::Timeout,
        Reason::ClientCertV1,
        Reason::ClientCertUnknownIssuer,
        Reason::ClientCertExpired,
        Reason::ClientCertNotYetValid,
        Reason::ClientCertRevoked,
        Reason::ClientCertMissing,
        Reason::ClientCertBad,
        Reason::ServerCertRefused,
        Reason::ClientAlert,
        Reason::NoSharedCipher,
        Reason::NoSharedVersion,
        Reason::NoSharedAlpn,
        Reason::NotTls,
        Reason::BadClientHello,
        Reason::HelloTooLarge,
        Reason::ProtocolError,
        Reason::PeerClosed,
        Reason::Io,
        Reason::Other,
    ];

    /// The reasons of `result="failed"`: all but `None` and `Timeout`.
    pub const FAILURES: &'static [Reason] = {
        let (_, failures) = Self::ALL.split_at(2);
        failures
    };

    /// The position in [`Reason::FAILURES`]; `None` and `Timeout`, which
    /// are no refusals, count as `Other`.
    pub fn failure_index(self) -> usize {
        match self {
            Reason::None | Reason::Timeout => Reason::Other as usize - 2,
            r => r as usize - 2,
        }
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Reason::None => "none",
            Reason::Timeout => "timeout",
            Reason::ClientCertV1 => "client_cert_v1",
            Reason::ClientCertUnknownIssuer => "client_cert_unknown_issuer",
            Reason::ClientCertExpired => "client_cert_expired",
            Reason::ClientCertNotYetValid => "client_cert_not_yet_valid",
            Reason::ClientCertRevoked => "client_cert_revoked",
            Reason::ClientCertMissing => "client_cert_missing",
            Reason::ClientCertBad => "client_cert_bad",
            Reason::ServerCertRefused => "server_cert_refused",
            Reason::ClientAlert => "client_alert",
            Reason::NoSharedCipher => "no_shared_cipher",
            Reason::NoSharedVersion => "no_shared_version",
            Reason::NoSharedAlpn => "no_shared_alpn",
            Reason::NotTls => "not_tls",
            Reason::BadClientHello => "bad_client_hello",
            Reason::HelloTooLarge => "hello_too_large",
            Reason::ProtocolError => "protocol_error",
            Reason::PeerClosed => "peer_closed",
            Reason::Io => "io",
            Reason::Other => "other",
        }
    }

    /// The reason in words, for the log line.
    pub fn words(self) -> &'static str {
        match self {
            Reason::None => "completed",
            Reason::Timeout => "handshake timed out",
            Reason::ClientCertV1 => "client certificate: unsupported X.509 version 1",
            Reason::ClientCertUnknownIssuer => "client certificate: unknown issuer",
            Reason::ClientCertExpired => "client certificate: expired",
            Reason::ClientCertNotYetValid => "client certificate: not yet valid",
            Reason::ClientCertRevoked => "client certificate: revoked",
            Reason::ClientCertMissing => "client certificate: none presented",
            Reason::ClientCertBad => "client certificate: invalid",
            Reason::ServerCertRefused => "the client refused the server certificate",
            Reason::ClientAlert => "the client aborted the handshake",
            Reason::NoSharedCipher => "no shared cipher",
            Reason::NoSharedVersion => "no shared version",
            Reason::NoSharedAlpn => "no shared application protocol (ALPN)",
            Reason::NotTls => "not TLS",
            Reason::BadClientHello => "malformed ClientHello",
            Reason::HelloTooLarge => "ClientHello too large",
            Reason::ProtocolError => "TLS protocol error",
            Reason::PeerClosed => "the client closed the connection",
            Reason::Io => "network error",
            Reason::Other => "handshake failed",
        }
    }

    /// A refusal because of the client's certificate (counted in
    /// `fleetgate_tls_client_certificates_total{state="rejected"}`).
    pub fn is_client_cert(self) -> bool {
        matches!(
            self,
            Reason::ClientCertV1
                | Reason::ClientCertUnknownIssuer
                | Reason::ClientCertExpired
                | Reason::ClientCertNotYetValid
                | Reason::ClientCertRevoked
                | Reason::ClientCertMissing
                | Reason::ClientCertBad
        )
    }

    /// The reason for an error from the handshake. `after_hello` is
    /// whether rustls had already taken the ClientHello: a malformed
    /// message before that is a bad hello, after it a protocol error.
    pub fn of_io(error: &io::Error, after_hello: bool) -> Reason {
        if let Some(inner) = error.get_ref() {
            if let Some(e) = inner.downcast_ref::<rustls::Error>() {
                return Reason::of_rustls(e, after_hello);
            }
            if let Some(e) = inner.downcast_ref::<HelloError>() {
                return Reason::of_hello(e);
            }
        }
        match error.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => Reason::PeerClosed,
            io::ErrorKind::InvalidData => Reason::ProtocolError,
            _ => Reason::Io,
        }
    }

    /// The ClientHello parser's verdict.
    pub fn of_hello(error: &HelloError) -> Reason {
        match error {
            HelloError::NotTls(_) => Reason::NotTls,
            HelloError::TooLarge { .. } => Reason::HelloTooLarge,
            HelloError::Malformed(_) | HelloError::NoClientHello(_) => Reason::BadClientHello,
        }
    }

    pub fn of_rustls(error: &rustls::Error, after_hello: bool) -> Reason {
        use rustls::Error as E;
        match error {
            E::InvalidCertificate(c) => Reason::of_certificate(c),
            E::NoCertificatesPresented => Reason::ClientCertMissing,
            E::PeerIncompatible(p) => match p {
                PeerIncompatible::NoCipherSuitesInCommon
                | PeerIncompatible::NoKxGroupsInCommon
                | PeerIncompatible::NoSignatureSchemesInCommon
                | PeerIncompatible::NoEcPointFormatsInCommon => Reason::NoSharedCipher,
                PeerIncompatible::Tls12NotOffered
                | PeerIncompatible::Tls12NotOfferedOrEnabled
                | PeerIncompatible::SupportedVersionsExtensionRequired
                | PeerIncompatible::ServerTlsVersionIsDisabledByOurConfig => {
                    Reason::NoSharedVersion
                }
                _ => Reason::BadClientHello,
            },
            E::NoApplicationProtocol => Reason::NoSharedAlpn,
            E::AlertReceived(alert) => match alert {
                AlertDescription::BadCertificate
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::CertificateRevoked
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateUnknown
                | AlertDescription::UnknownCA => Reason::ServerCertRefused,
                AlertDescription::ProtocolVersion => Reason::NoSharedVersion,
                AlertDescription::HandshakeFailure | AlertDescription::InsufficientSecurity
                    if !after_hello =>
                {
                    Reason::NoSharedCipher
                }
                _ => Reason::ClientAlert,
            },
            E::InvalidMessage(_)
            | E::PeerMisbehaved(_)
            | E::InappropriateMessage { .. }
            | E::InappropriateHandshakeMessage { .. } => {
                if after_hello {
                    Reason::ProtocolError
                } else {
                    Reason::BadClientHello
                }
            }
            E::DecryptError | E::PeerSentOversizedRecord => Reason::ProtocolError,
            _ => Reason::Other,
        }
    }

    /// What the client-certificate verifier refused.
    pub fn of_certificate(error: &CertificateError) -> Reason {
        match error {
            CertificateError::UnknownIssuer => Reason::ClientCertUnknownIssuer,
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                Reason::ClientCertExpired
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                Reason::ClientCertNotYetValid
            }
            CertificateError::Revoked => Reason::ClientCertRevoked,
            CertificateError::Other(other) => {
                let inner = &*other.0;
                if inner.downcast_ref::<V1Refused>().is_some()
                    || matches!(
                        inner.downcast_ref::<webpki::Error>(),
                        Some(webpki::Error::UnsupportedCertVersion)
                    )
                {
                    Reason::ClientCertV1
                } else {
                    Reason::ClientCertBad
                }
            }
            _ => Reason::ClientCertBad,
        }
    }
}

/// A refused handshake: why, the server name the client asked for (when
/// its ClientHello got that far), and the error itself for the details.
#[derive(Debug)]
pub struct Refused {
    pub reason: Reason,
    pub sni: Option<String>,
    pub error: io::Error,
    /// The client closed or reset the connection before sending a byte:
    /// TCP health checks and port scans, not devices failing to connect.
    pub silent: bool,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.reason.words(), self.error)
    }
}

impl std::error::Error for Refused {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl From<Refused> for io::Error {
    fn from(r: Refused) -> io::Error {
        r.error
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_and_in_order() {
        let mut seen = std::collections::HashSet::new();
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
            assert!(seen.insert(r.label()), "{r:?}");
            assert!(!r.words().is_empty());
        }
        for (i, r) in Reason::FAILURES.iter().enumerate() {
            assert_eq!(r.failure_index(), i, "{r:?}");
        }
    }

    #[test]
    fn errors_map_to_reasons() {
        let tls = |e: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, e);
        let cases = [
            (
                tls(CertificateError::UnknownIssuer.into()),
                Reason::ClientCertUnknownIssuer,
            ),
            (
                tls(rustls::Error::InvalidCertificate(CertificateError::Other(
                    rustls::OtherError(std::sync::Arc::new(webpki::Error::UnsupportedCertVersion)),
                ))),
                Reason::ClientCertV1,
            ),
            (
                tls(rustls::Error::NoCertificatesPresented),
                Reason::ClientCertMissing,
            ),
            (
                tls(PeerIncompatible::NoCipherSuitesInCommon.into()),
                Reason::NoSharedCipher,
            ),
            (
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    HelloError::NotTls("first byte is not a TLS handshake record"),
                ),
                Reason::NotTls,
            ),
            (io::ErrorKind::UnexpectedEof.into(), Reason::PeerClosed),
            (io::ErrorKind::PermissionDenied.into(), Reason::Io),
        ];
        for (error, want) in cases {
            assert_eq!(Reason::of_io(&error, true), want, "{error}");
        }
    }
}
