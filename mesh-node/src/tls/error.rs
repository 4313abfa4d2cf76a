//! Why a handshake or a certificate was refused, as a type a caller can match and count.
use std::error::Error as StdError;
use std::io;
use std::sync::Arc;

use rustls::{AlertDescription, CertificateError};

/// A TLS failure of the mesh. Cheap to clone (the dial of one pooled connection reports the same
/// failure to every caller that waited on it).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The peer's chain does not lead to the mesh root.
    #[error("certificate is not issued by the mesh CA")]
    UnknownCa,
    /// The peer's certificate (or one in its chain) has expired.
    #[error("certificate has expired")]
    Expired,
    /// The peer's certificate is not valid yet.
    #[error("certificate is not valid yet")]
    NotYetValid,
    /// The server is not the identity the client meant to reach.
    #[error("peer identity is {presented}, expected {expected}")]
    WrongIdentity { expected: String, presented: String },
    /// The client's identity belongs to another trust domain.
    #[error("peer identity {identity} is outside trust domain {trust_domain}")]
    ForeignTrustDomain { identity: String, trust_domain: String },
    /// The client did not present a certificate.
    #[error("the peer presented no certificate")]
    NoClientCert,
    /// The certificate carries no `spiffe://` URI SAN.
    #[error("certificate carries no SPIFFE ID (URI SAN)")]
    NoSpiffeId,
    /// The certificate is unusable for another reason (encoding, signature, purpose, ...).
    #[error("invalid certificate: {0}")]
    BadCertificate(String),
    /// The peer refused our certificate (or the handshake) with this alert.
    #[error("the peer rejected the handshake: {0:?}")]
    PeerRejected(AlertDescription),
    /// Our own key, certificate or roots are unusable.
    #[error("invalid key or certificate material: {0}")]
    InvalidMaterial(String),
    /// The handshake did not finish in time.
    #[error("TLS handshake timed out")]
    Timeout,
    /// Any other TLS protocol failure (no common cipher suite or ALPN, garbage, ...).
    #[error("TLS protocol error: {0}")]
    Protocol(rustls::Error),
    /// The socket failed during the handshake.
    #[error("I/O error during the TLS handshake: {0}")]
    Io(#[source] Arc<io::Error>),
}

impl TlsError {
    /// A short, stable label for metrics (`tls_handshake_failures_total{reason=...}`).
    pub fn reason(&self) -> &'static str {
        match self {
            TlsError::UnknownCa => "unknown_ca",
            TlsError::Expired => "expired",
            TlsError::NotYetValid => "not_yet_valid",
            TlsError::WrongIdentity { .. } => "wrong_identity",
            TlsError::ForeignTrustDomain { .. } => "foreign_trust_domain",
            TlsError::NoClientCert => "no_client_cert",
            TlsError::NoSpiffeId => "no_spiffe_id",
            TlsError::BadCertificate(_) => "bad_certificate",
            TlsError::PeerRejected(_) => "peer_rejected",
            TlsError::InvalidMaterial(_) => "invalid_material",
            TlsError::Timeout => "timeout",
            TlsError::Protocol(_) => "protocol",
            TlsError::Io(_) => "io",
        }
    }

    /// Classifies a rustls error: our verifiers' own [`TlsError`]s come back out unchanged.
    pub fn from_rustls(e: &rustls::Error) -> TlsError {
        use rustls::Error as E;
        match e {
            E::InvalidCertificate(ce) => match ce {
                CertificateError::UnknownIssuer => TlsError::UnknownCa,
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => TlsError::Expired,
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    TlsError::NotYetValid
                }
                CertificateError::Other(other) => match other.0.downcast_ref::<TlsError>() {
                    Some(t) => t.clone(),
                    None => TlsError::BadCertificate(other.0.to_string()),
                },
                other => TlsError::BadCertificate(other.to_string()),
            },
            E::Other(other) => match other.0.downcast_ref::<TlsError>() {
                Some(t) => t.clone(),
                None => TlsError::Protocol(e.clone()),
            },
            E::NoCertificatesPresented => TlsError::NoClientCert,
            E::AlertReceived(alert) => TlsError::PeerRejected(*alert),
            other => TlsError::Protocol(other.clone()),
        }
    }

    /// Classifies an I/O error from tokio-rustls (which wraps rustls errors as `InvalidData`).
    pub fn from_io(e: io::Error) -> TlsError {
        if let Some(t) = find_in_chain(&e) {
            return t;
        }
        TlsError::Io(Arc::new(e))
    }

    /// Looks for a TLS failure anywhere in an error's source chain (a hyper or h2 error whose
    /// root cause is a refused certificate, for instance).
    pub fn find(err: &(dyn StdError + 'static)) -> Option<TlsError> {
        let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
        while let Some(e) = cur {
            if let Some(t) = e.downcast_ref::<TlsError>() {
                return Some(t.clone());
            }
            if let Some(r) = e.downcast_ref::<rustls::Error>() {
                return Some(TlsError::from_rustls(r));
            }
            if let Some(io) = e.downcast_ref::<io::Error>() {
                if let Some(t) = find_in_chain(io) {
                    return Some(t);
                }
            }
            cur = e.source();
        }
        None
    }
}

fn find_in_chain(e: &io::Error) -> Option<TlsError> {
    // io::Error::source() skips the wrapped error for custom errors in some cases; look at
    // get_ref() explicitly.
    let inner = e.get_ref()?;
    if let Some(r) = inner.downcast_ref::<rustls::Error>() {
        return Some(TlsError::from_rustls(r));
    }
    if let Some(t) = inner.downcast_ref::<TlsError>() {
        return Some(t.clone());
    }
    let inner: &(dyn StdError + 'static) = inner;
    inner.source().and_then(TlsError::find)
}

/// Wraps a [`TlsError`] so a rustls verifier can return it and [`TlsError::from_rustls`] can
/// take it back out.
pub(crate) fn into_rustls(e: TlsError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_rustls_and_io() {
        let e = TlsError::WrongIdentity {
            expected: "a".into(),
            presented: "b".into(),
        };
        let r = into_rustls(e);
        assert!(matches!(
            TlsError::from_rustls(&r),
            TlsError::WrongIdentity { .. }
        ));
        let io = io::Error::new(io::ErrorKind::InvalidData, r);
        let t = TlsError::from_io(io);
        assert_eq!(t.reason(), "wrong_identity");
        let io = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
        );
        assert_eq!(TlsError::from_io(io).reason(), "unknown_ca");
        let io = io::Error::new(io::ErrorKind::ConnectionReset, "reset");
        assert_eq!(TlsError::from_io(io).reason(), "io");
    }
}
