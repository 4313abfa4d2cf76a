//! SPIFFE IDs in certificates: `spiffe://<trust-domain>/ns/<ns>/sa/<sa>` in a URI SAN.
use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

use super::TlsError;

const SCHEME: &str = "spiffe://";

/// The SPIFFE ID of a certificate: its one `spiffe://` URI SAN (an X.509-SVID has exactly one).
pub fn spiffe_id(cert: &CertificateDer<'_>) -> Result<String, TlsError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| TlsError::BadCertificate(format!("unparsable certificate: {e}")))?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| TlsError::BadCertificate(format!("unparsable subjectAltName: {e}")))?
        .ok_or(TlsError::NoSpiffeId)?;
    let mut ids = san.value.general_names.iter().filter_map(|name| match name {
        GeneralName::URI(uri) if is_spiffe(uri) => Some(*uri),
        _ => None,
    });
    let id = ids.next().ok_or(TlsError::NoSpiffeId)?;
    if ids.next().is_some() {
        return Err(TlsError::BadCertificate(
            "more than one SPIFFE ID in the URI SANs".into(),
        ));
    }
    Ok(id.to_string())
}

/// The identity of the peer of an established connection (server or client side): the SPIFFE ID
/// of its leaf certificate. `&ServerConnection` and `&ClientConnection` coerce to `&CommonState`;
/// for a tokio-rustls stream pass `stream.get_ref().1`.
pub fn peer_identity(conn: &rustls::CommonState) -> Result<String, TlsError> {
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or(TlsError::NoClientCert)?;
    spiffe_id(leaf)
}

/// The trust domain of a SPIFFE ID (`cluster.local` in `spiffe://cluster.local/ns/a/sa/b`).
pub fn trust_domain_of(id: &str) -> Option<&str> {
    if !is_spiffe(id) {
        return None;
    }
    let rest = &id[SCHEME.len()..];
    let td = rest.split('/').next().unwrap_or("");
    (!td.is_empty()).then_some(td)
}

/// Whether `id` is a SPIFFE ID in `trust_domain` (trust domains compare case-insensitively).
pub fn in_trust_domain(id: &str, trust_domain: &str) -> bool {
    trust_domain_of(id).is_some_and(|td| td.eq_ignore_ascii_case(trust_domain))
}

fn is_spiffe(uri: &str) -> bool {
    uri.get(..SCHEME.len())
        .is_some_and(|s| s.eq_ignore_ascii_case(SCHEME))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_domains() {
        assert_eq!(
            trust_domain_of("spiffe://cluster.local/ns/a/sa/b"),
            Some("cluster.local")
        );
        assert_eq!(trust_domain_of("SPIFFE://td/ns/a/sa/b"), Some("td"));
        assert_eq!(trust_domain_of("spiffe:///ns/a"), None);
        assert_eq!(trust_domain_of("https://cluster.local/ns/a"), None);
        assert!(in_trust_domain(
            "spiffe://Cluster.Local/ns/a/sa/b",
            "cluster.local"
        ));
        assert!(!in_trust_domain(
            "spiffe://cluster.local.evil/ns/a/sa/b",
            "cluster.local"
        ));
    }
}
