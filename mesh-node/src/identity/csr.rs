//! A fresh key and a CSR for exactly one SPIFFE ID.
use mesh_api::Identity;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use zeroize::Zeroizing;

/// A key pair that exists only on this node, and the request to certify it.
pub struct KeyAndCsr {
    /// PKCS#8 DER of the private key; wiped on drop.
    pub key: Zeroizing<Vec<u8>>,
    /// The raw public key (the uncompressed EC point), to compare with what comes back.
    pub public_key: Vec<u8>,
    /// PKCS#10 DER: empty subject, one URI SAN (the identity), signed with the key.
    pub csr: Vec<u8>,
}

/// Generates an ECDSA P-256 key and a CSR for `identity`.
///
/// The key bytes this module keeps are zeroized on drop; rcgen's own copy inside the
/// short-lived `KeyPair` is freed (not wiped) when this function returns.
pub fn generate(identity: &Identity) -> Result<KeyAndCsr, rcgen::Error> {
    let key_pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
    let csr = params.serialize_request(&key_pair)?;
    Ok(KeyAndCsr {
        key: Zeroizing::new(key_pair.serialize_der()),
        public_key: key_pair.public_key_raw().to_vec(),
        csr: csr.der().to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::cri_attributes::ParsedCriAttribute;
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::prelude::FromDer;

    use super::*;

    #[test]
    fn csr_names_exactly_the_identity_with_a_p256_key() {
        let id: Identity = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let made = generate(&id).unwrap();
        let (rest, req) = X509CertificationRequest::from_der(&made.csr).unwrap();
        assert!(rest.is_empty());
        let info = &req.certification_request_info;
        assert_eq!(info.subject.iter().count(), 0, "empty subject");
        assert_eq!(
            info.subject_pki.subject_public_key.data.as_ref(),
            &made.public_key[..]
        );
        assert_eq!(
            info.subject_pki
                .algorithm
                .parameters
                .as_ref()
                .unwrap()
                .as_oid()
                .unwrap(),
            x509_parser::oid_registry::OID_EC_P256
        );
        let mut names = vec![];
        for attr in info.iter_attributes() {
            if let ParsedCriAttribute::ExtensionRequest(req) = attr.parsed_attribute() {
                for ext in &req.extensions {
                    if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
                        for name in &san.general_names {
                            match name {
                                GeneralName::URI(u) => names.push(u.to_string()),
                                other => panic!("unexpected SAN {other:?}"),
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(names, [id.to_string()]);
        // Two calls, two different keys.
        assert_ne!(generate(&id).unwrap().public_key, made.public_key);
        assert!(!made.key.is_empty());
    }
}
