//! Checking what the CA sent back before trusting it: the certificate must be for exactly
//! the identity asked for, over the key this node generated, and chain to the pinned mesh
//! root (for both TLS server and client use). A pure function of its inputs.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_api::Identity;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::extensions::GeneralName;
use x509_parser::time::ASN1Time;

use super::store::VerifiedChain;

/// Why a signed chain was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the CA returned no certificate")]
    Empty,
    #[error("certificate {index} of the chain is not a PEM certificate: {reason}")]
    Malformed { index: usize, reason: String },
    #[error("the certificate names {found}, not {expected}")]
    WrongIdentity { expected: String, found: String },
    #[error("the certificate is not for the key this node generated")]
    WrongKey,
    #[error("the certificate does not chain to the pinned mesh root: {0}")]
    Untrusted(String),
    #[error("no pinned mesh root to verify against")]
    NoRoots,
}

/// Verifies `chain_pem` (leaf first, maybe ending with the root) as the certificate of
/// `identity` over `public_key` (the raw public key bytes), trusted through `roots`, at
/// `now`. Returns the chain to present (the roots left out) and the leaf's facts.
pub fn verify_chain(
    identity: &Identity,
    public_key: &[u8],
    chain_pem: &[String],
    roots: &[CertificateDer<'static>],
    now: SystemTime,
) -> Result<VerifiedChain, VerifyError> {
    if roots.is_empty() {
        return Err(VerifyError::NoRoots);
    }
    let mut chain = Vec::new();
    for (index, pem) in chain_pem.iter().enumerate() {
        let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| VerifyError::Malformed {
                index,
                reason: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(VerifyError::Malformed {
                index,
                reason: "no CERTIFICATE block".into(),
            });
        }
        chain.extend(certs);
    }
    // The root at the end is only informative: trust comes from the pinned copy.
    chain.retain(|c| !roots.contains(c));
    let leaf = chain.first().ok_or(VerifyError::Empty)?;

    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| VerifyError::Malformed {
        index: 0,
        reason: e.to_string(),
    })?;
    let expected = identity.to_string();
    let names: Vec<String> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::URI(uri) => uri.to_string(),
                other => other.to_string(),
            })
            .collect(),
        Ok(None) => vec![],
        Err(e) => {
            return Err(VerifyError::Malformed {
                index: 0,
                reason: format!("subjectAltName: {e}"),
            })
        }
    };
    if names != [expected.as_str()] {
        return Err(VerifyError::WrongIdentity {
            expected,
            found: if names.is_empty() {
                "no SAN".into()
            } else {
                names.join(", ")
            },
        });
    }
    if cert.public_key().subject_public_key.data.as_ref() != public_key {
        return Err(VerifyError::WrongKey);
    }

    let anchors = roots
        .iter()
        .map(|r| {
            webpki::anchor_from_trusted_cert(r)
                .map_err(|e| VerifyError::Untrusted(format!("pinned root: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let end_entity = EndEntityCert::try_from(leaf).map_err(|e| VerifyError::Untrusted(format!("{e:?}")))?;
    let at = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default());
    for usage in [KeyUsage::server_auth(), KeyUsage::client_auth()] {
        end_entity
            .verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &anchors,
                &chain[1..],
                at,
                usage,
                None,
                None,
            )
            .map_err(|e| VerifyError::Untrusted(format!("{e:?}")))?;
    }

    let validity = cert.validity();
    Ok(VerifiedChain {
        serial: cert.raw_serial_as_string(),
        not_before: system_time(validity.not_before),
        not_after: system_time(validity.not_after),
        chain,
    })
}

fn system_time(t: ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// Reads the pinned root(s) from PEM text (the `--controller-ca` file).
pub fn roots_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let roots = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if roots.is_empty() {
        return Err("no CERTIFICATE block".into());
    }
    for root in &roots {
        webpki::anchor_from_trusted_cert(root).map_err(|e| format!("not a usable root: {e:?}"))?;
    }
    Ok(roots)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
    };

    use super::*;

    /// A small CA for tests, issuing certificates the way the controller's does.
    pub(crate) struct TestCa {
        issuer: Issuer<'static, KeyPair>,
        pub root_pem: String,
        pub root_der: CertificateDer<'static>,
    }

    /// A P-256 public key by its raw point, as [`KeyAndCsr::public_key`] holds it.
    ///
    /// [`KeyAndCsr::public_key`]: super::super::csr::KeyAndCsr
    struct RawP256<'a>(&'a [u8]);

    impl PublicKeyData for RawP256<'_> {
        fn der_bytes(&self) -> &[u8] {
            self.0
        }

        fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
            &rcgen::PKCS_ECDSA_P256_SHA256
        }
    }

    impl TestCa {
        pub(crate) fn new() -> TestCa {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, "test root");
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let cert = params.self_signed(&key).unwrap();
            TestCa {
                root_pem: cert.pem(),
                root_der: cert.der().clone(),
                issuer: Issuer::new(params, key),
            }
        }

        /// A leaf for `sans` over `public_key` (a raw P-256 point), valid from 5 minutes
        /// ago (as the controller backdates) for `lifetime` from now; PEM, ending with the root.
        pub(crate) fn sign(&self, public_key: &[u8], sans: &[&str], lifetime: Duration) -> Vec<String> {
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            params.is_ca = IsCa::ExplicitNoCa;
            params.subject_alt_names = sans
                .iter()
                .map(|s| SanType::URI((*s).try_into().unwrap()))
                .collect();
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now - time::Duration::minutes(5);
            params.not_after = now + lifetime;
            let cert = params.signed_by(&RawP256(public_key), &self.issuer).unwrap();
            vec![cert.pem(), self.root_pem.clone()]
        }
    }

    fn web() -> Identity {
        "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap()
    }

    #[test]
    fn accepts_a_right_chain_and_drops_the_root() {
        let ca = TestCa::new();
        let made = super::super::csr::generate(&web()).unwrap();
        let chain = ca.sign(&made.public_key, &[&web().to_string()], Duration::from_secs(3600));
        let roots = vec![ca.root_der.clone()];
        let now = SystemTime::now();
        let v = verify_chain(&web(), &made.public_key, &chain, &roots, now).unwrap();
        assert_eq!(v.chain.len(), 1, "the root is not part of the presented chain");
        assert!(v.not_before < now && now < v.not_after);
        assert!(v.not_after > now + Duration::from_secs(3500));
        assert!(!v.serial.is_empty());
        // Without the root at the end, too.
        assert!(verify_chain(&web(), &made.public_key, &chain[..1], &roots, now).is_ok());
    }

    #[test]
    fn refuses_what_it_did_not_ask_for() {
        let ca = TestCa::new();
        let other_ca = TestCa::new();
        let made = super::super::csr::generate(&web()).unwrap();
        let other_key = super::super::csr::generate(&web()).unwrap();
        let roots = vec![ca.root_der.clone()];
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let id = web().to_string();
        let cart = "spiffe://cluster.local/ns/shop/sa/cart";

        type Case<'a> = (
            &'a str,
            Vec<String>,
            &'a [u8],
            SystemTime,
            fn(&VerifyError) -> bool,
        );
        let cases: Vec<Case> = vec![
            (
                "other identity",
                ca.sign(&made.public_key, &[cart], hour),
                &made.public_key,
                now,
                |e| matches!(e, VerifyError::WrongIdentity { .. }),
            ),
            (
                "extra SAN",
                ca.sign(&made.public_key, &[&id, cart], hour),
                &made.public_key,
                now,
                |e| matches!(e, VerifyError::WrongIdentity { .. }),
            ),
            (
                "other key",
                ca.sign(&other_key.public_key, &[&id], hour),
                &made.public_key,
                now,
                |e| *e == VerifyError::WrongKey,
            ),
            (
                "other CA",
                other_ca.sign(&made.public_key, &[&id], hour),
                &made.public_key,
                now,
                |e| matches!(e, VerifyError::Untrusted(_)),
            ),
            (
                "expired",
                ca.sign(&made.public_key, &[&id], hour),
                &made.public_key,
                now + 2 * hour,
                |e| matches!(e, VerifyError::Untrusted(r) if r.contains("Expired")),
            ),
            ("empty", vec![], &made.public_key, now, |e| {
                *e == VerifyError::Empty
            }),
            ("garbage", vec!["hello".into()], &made.public_key, now, |e| {
                matches!(e, VerifyError::Malformed { index: 0, .. })
            }),
        ];
        for (what, chain, key, at, check) in cases {
            let err = verify_chain(&web(), key, &chain, &roots, at).unwrap_err();
            assert!(check(&err), "{what}: {err}");
        }
        let chain = ca.sign(&made.public_key, &[&id], hour);
        assert_eq!(
            verify_chain(&web(), &made.public_key, &chain, &[], now).unwrap_err(),
            VerifyError::NoRoots
        );
    }

    #[test]
    fn roots_file() {
        let ca = TestCa::new();
        assert_eq!(
            roots_from_pem(ca.root_pem.as_bytes()).unwrap(),
            vec![ca.root_der.clone()]
        );
        assert!(roots_from_pem(b"").is_err());
        assert!(roots_from_pem(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").is_err());
    }
}
