//! May this node get this identity with this CSR? Both steps are pure: [`inspect`] reads
//! the facts out of the CSR bytes, [`decide`] judges them.

use std::collections::BTreeSet;

use mesh_api::{Identity, TrustDomain};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::cri_attributes::ParsedCriAttribute;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION, OID_SIG_ED25519,
    OID_X509_EXT_SUBJECT_ALT_NAME,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

const MIN_RSA_BITS: usize = 2048;
/// Larger RSA keys buy nothing and make every verification slow.
const MAX_RSA_BITS: usize = 8192;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyKind {
    Rsa {
        bits: usize,
    },
    P256,
    P384,
    Ed25519,
    /// Anything else, described for the refusal message.
    Other(String),
}

/// What a CSR asks for and whether it is genuine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsrInfo {
    pub key: KeyKind,
    /// The DER SubjectPublicKeyInfo, which the certificate will carry.
    pub public_key: Vec<u8>,
    /// Whether the CSR is signed by the key it carries (proof of possession).
    pub signature_valid: bool,
    pub uri_sans: Vec<String>,
    /// SANs of other kinds (DNS, IP, e-mail, ...), as text.
    pub other_sans: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("CSR is not a PKCS#10 request in PEM or DER: {0}")]
    Malformed(String),
    #[error("CSR signature does not verify")]
    BadSignature,
    #[error("{0} is not accepted; use RSA of {MIN_RSA_BITS}-{MAX_RSA_BITS} bits, P-256, P-384 or Ed25519")]
    WeakKey(String),
    #[error("CSR must name exactly one SAN, URI {expected}; it names {found}")]
    SanMismatch { expected: String, found: String },
    #[error("{identity} is not in trust domain {trust_domain}")]
    ForeignTrustDomain { identity: String, trust_domain: String },
    #[error("no enrolled pod with identity {identity} is scheduled on node {node}")]
    NotOnNode { identity: String, node: String },
}

impl Refusal {
    /// Whether the caller asked for something it may not have (as opposed to asking badly).
    pub fn is_permission(&self) -> bool {
        matches!(
            self,
            Refusal::ForeignTrustDomain { .. } | Refusal::NotOnNode { .. }
        )
    }
}

/// Reads a CSR in PEM or DER.
pub fn inspect(csr: &[u8]) -> Result<CsrInfo, Refusal> {
    let malformed = |e: &dyn std::fmt::Display| Refusal::Malformed(e.to_string());
    let der;
    let der_bytes = if csr.trim_ascii_start().starts_with(b"-----BEGIN") {
        let (_, pem) = x509_parser::pem::parse_x509_pem(csr).map_err(|e| malformed(&e))?;
        if !pem.label.contains("CERTIFICATE REQUEST") {
            return Err(Refusal::Malformed(format!("PEM block is {:?}", pem.label)));
        }
        der = pem.contents;
        &der[..]
    } else {
        csr
    };
    let (rest, req) = X509CertificationRequest::from_der(der_bytes).map_err(|e| malformed(&e))?;
    if !rest.is_empty() {
        return Err(Refusal::Malformed(format!(
            "{} bytes after the request",
            rest.len()
        )));
    }
    let info = &req.certification_request_info;
    let (uri_sans, other_sans) = sans(&req)?;
    Ok(CsrInfo {
        key: key_kind(&info.subject_pki),
        public_key: info.subject_pki.raw.to_vec(),
        signature_valid: req.verify_signature().is_ok(),
        uri_sans,
        other_sans,
    })
}

/// All SANs of all extension requests: a second request must not smuggle in a name.
fn sans(req: &X509CertificationRequest) -> Result<(Vec<String>, Vec<String>), Refusal> {
    let (mut uris, mut others) = (Vec::new(), Vec::new());
    for attribute in req.certification_request_info.iter_attributes() {
        let ParsedCriAttribute::ExtensionRequest(request) = attribute.parsed_attribute() else {
            continue;
        };
        for ext in request
            .extensions
            .iter()
            .filter(|e| e.oid == OID_X509_EXT_SUBJECT_ALT_NAME)
        {
            let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() else {
                return Err(Refusal::Malformed("unreadable subjectAltName".into()));
            };
            for name in &san.general_names {
                match name {
                    GeneralName::URI(uri) => uris.push(uri.to_string()),
                    other => others.push(other.to_string()),
                }
            }
        }
    }
    Ok((uris, others))
}

fn key_kind(spki: &SubjectPublicKeyInfo) -> KeyKind {
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_PKCS1_RSAENCRYPTION {
        match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => KeyKind::Rsa {
                bits: bit_length(rsa.modulus),
            },
            _ => KeyKind::Other("an unreadable RSA key".into()),
        }
    } else if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        match spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok()) {
            Some(curve) if curve == OID_EC_P256 => KeyKind::P256,
            Some(curve) if curve == OID_NIST_EC_P384 => KeyKind::P384,
            Some(curve) => KeyKind::Other(format!("EC curve {curve}")),
            None => KeyKind::Other("an EC key without a named curve".into()),
        }
    } else if *alg == OID_SIG_ED25519 {
        KeyKind::Ed25519
    } else {
        KeyKind::Other(format!("key algorithm {alg}"))
    }
}

/// The bit length of a big-endian unsigned integer (DER may pad it with zero bytes).
fn bit_length(bytes: &[u8]) -> usize {
    let digits = bytes.iter().skip_while(|b| **b == 0).collect::<Vec<_>>();
    match digits.first() {
        Some(first) => digits.len() * 8 - first.leading_zeros() as usize,
        None => 0,
    }
}

/// The decision: `node`, holding the certificates of `node_identities`, asks for
/// `requested` with `csr`.
pub fn decide(
    node: &str,
    requested: &Identity,
    trust_domain: &TrustDomain,
    node_identities: &BTreeSet<Identity>,
    csr: &CsrInfo,
) -> Result<(), Refusal> {
    if requested.trust_domain() != trust_domain {
        return Err(Refusal::ForeignTrustDomain {
            identity: requested.to_string(),
            trust_domain: trust_domain.to_string(),
        });
    }
    if !node_identities.contains(requested) {
        return Err(Refusal::NotOnNode {
            identity: requested.to_string(),
            node: node.to_owned(),
        });
    }
    match &csr.key {
        KeyKind::Rsa { bits } if (MIN_RSA_BITS..=MAX_RSA_BITS).contains(bits) => {}
        KeyKind::Rsa { bits } => return Err(Refusal::WeakKey(format!("an RSA key of {bits} bits"))),
        KeyKind::P256 | KeyKind::P384 | KeyKind::Ed25519 => {}
        KeyKind::Other(what) => return Err(Refusal::WeakKey(what.clone())),
    }
    if !csr.signature_valid {
        return Err(Refusal::BadSignature);
    }
    let expected = requested.to_string();
    if csr.uri_sans != [expected.as_str()] || !csr.other_sans.is_empty() {
        let found: Vec<&str> = csr
            .uri_sans
            .iter()
            .chain(&csr.other_sans)
            .map(String::as_str)
            .collect();
        let found = if found.is_empty() {
            "none".to_owned()
        } else {
            found.join(", ")
        };
        return Err(Refusal::SanMismatch { expected, found });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
