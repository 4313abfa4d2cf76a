//! CSR inspection on real requests (rcgen-made, and openssl-made fixtures for the key types
//! rcgen cannot generate) and the decision table.

use rcgen::{CertificateParams, KeyPair, SanType, SignatureAlgorithm};

use super::*;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

/// The fixtures were made with `openssl req -new -newkey <type> -addext
/// "subjectAltName=URI:spiffe://cluster.local/ns/shop/sa/web"`.
fn fixture(name: &str) -> &'static str {
    match name {
        "rsa1024" => include_str!("../../../tests/fixtures/rsa1024.csr.pem"),
        "rsa2048" => include_str!("../../../tests/fixtures/rsa2048.csr.pem"),
        "p521" => include_str!("../../../tests/fixtures/p521.csr.pem"),
        "secp256k1" => include_str!("../../../tests/fixtures/secp256k1.csr.pem"),
        _ => unreachable!("no fixture {name}"),
    }
}

fn csr(alg: &'static SignatureAlgorithm, sans: Vec<SanType>) -> Vec<u8> {
    let key = KeyPair::generate_for(alg).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    params.serialize_request(&key).unwrap().der().to_vec()
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().unwrap())
}

#[test]
fn inspects_keys_and_sans() {
    let cases: Vec<(&str, Vec<u8>, KeyKind, bool)> = vec![
        (
            "p256",
            csr(&rcgen::PKCS_ECDSA_P256_SHA256, vec![uri(WEB)]),
            KeyKind::P256,
            true,
        ),
        (
            "p384",
            csr(&rcgen::PKCS_ECDSA_P384_SHA384, vec![uri(WEB)]),
            KeyKind::P384,
            true,
        ),
        (
            "ed25519",
            csr(&rcgen::PKCS_ED25519, vec![uri(WEB)]),
            KeyKind::Ed25519,
            true,
        ),
        (
            "rsa2048",
            fixture("rsa2048").into(),
            KeyKind::Rsa { bits: 2048 },
            true,
        ),
        // ring verifies no RSA signature under 2048 bits; the key check refuses it first.
        (
            "rsa1024",
            fixture("rsa1024").into(),
            KeyKind::Rsa { bits: 1024 },
            false,
        ),
        (
            "p521",
            fixture("p521").into(),
            KeyKind::Other("EC curve 1.3.132.0.35".into()),
            false,
        ),
        (
            "secp256k1",
            fixture("secp256k1").into(),
            KeyKind::Other("EC curve 1.3.132.0.10".into()),
            false,
        ),
    ];
    for (what, bytes, key, signature_valid) in cases {
        let info = inspect(&bytes).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(info.key, key, "{what}");
        assert_eq!(info.signature_valid, signature_valid, "{what}");
        assert_eq!(info.uri_sans, [WEB], "{what}");
        assert!(info.other_sans.is_empty(), "{what}");
    }
}

#[test]
fn reads_pem_and_every_san() {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![
        uri(WEB),
        SanType::DnsName("evil.example".try_into().unwrap()),
        SanType::IpAddress([10, 0, 0, 1].into()),
    ];
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    let info = inspect(pem.as_bytes()).unwrap();
    assert!(info.signature_valid);
    assert_eq!(info.uri_sans, [WEB]);
    assert_eq!(
        info.other_sans,
        ["DNSName(evil.example)", "IPAddress(0a:00:00:01)"]
    );
}

#[test]
fn tampering_breaks_the_signature() {
    let mut der = csr(&rcgen::PKCS_ECDSA_P256_SHA256, vec![uri(WEB)]);
    // The SAN sits in the signed part: change a letter of "web".
    let at = der.windows(3).position(|w| w == b"web").unwrap();
    der[at] = b'x';
    let info = inspect(&der).unwrap();
    assert!(!info.signature_valid);
    assert_eq!(info.uri_sans, ["spiffe://cluster.local/ns/shop/sa/xeb"]);
}

#[test]
fn rejects_what_is_not_a_csr() {
    let cert = rcgen::generate_simple_self_signed(vec!["x".into()])
        .unwrap()
        .cert
        .pem();
    let mut trailing = csr(&rcgen::PKCS_ECDSA_P256_SHA256, vec![uri(WEB)]);
    trailing.push(0);
    for bytes in [
        &b""[..],
        b"garbage",
        b"-----BEGIN nonsense",
        cert.as_bytes(),
        &trailing,
    ] {
        assert!(matches!(inspect(bytes), Err(Refusal::Malformed(_))), "{bytes:?}");
    }
}

fn info(key: KeyKind, signature_valid: bool, uris: &[&str], others: &[&str]) -> CsrInfo {
    CsrInfo {
        key,
        public_key: vec![],
        signature_valid,
        uri_sans: uris.iter().map(|s| s.to_string()).collect(),
        other_sans: others.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn decision_table() {
    let web: Identity = WEB.parse().unwrap();
    let on_node = BTreeSet::from([web.clone()]);
    let good = || info(KeyKind::P256, true, &[WEB], &[]);
    let refused = |r: Refusal| Err::<(), _>(r);
    let san_mismatch = |found: &str| {
        refused(Refusal::SanMismatch {
            expected: WEB.into(),
            found: found.into(),
        })
    };
    let cases: Vec<(&str, &str, CsrInfo, Result<(), Refusal>)> = vec![
        ("all good", WEB, good(), Ok(())),
        ("Ed25519", WEB, info(KeyKind::Ed25519, true, &[WEB], &[]), Ok(())),
        ("P-384", WEB, info(KeyKind::P384, true, &[WEB], &[]), Ok(())),
        (
            "RSA 2048",
            WEB,
            info(KeyKind::Rsa { bits: 2048 }, true, &[WEB], &[]),
            Ok(()),
        ),
        (
            "another trust domain",
            "spiffe://evil.org/ns/shop/sa/web",
            good(),
            refused(Refusal::ForeignTrustDomain {
                identity: "spiffe://evil.org/ns/shop/sa/web".into(),
                trust_domain: "cluster.local".into(),
            }),
        ),
        (
            "identity of no pod on this node",
            "spiffe://cluster.local/ns/shop/sa/cart",
            info(
                KeyKind::P256,
                true,
                &["spiffe://cluster.local/ns/shop/sa/cart"],
                &[],
            ),
            refused(Refusal::NotOnNode {
                identity: "spiffe://cluster.local/ns/shop/sa/cart".into(),
                node: "node-a".into(),
            }),
        ),
        (
            "RSA 1024",
            WEB,
            info(KeyKind::Rsa { bits: 1024 }, false, &[WEB], &[]),
            refused(Refusal::WeakKey("an RSA key of 1024 bits".into())),
        ),
        (
            "RSA 16384",
            WEB,
            info(KeyKind::Rsa { bits: 16384 }, true, &[WEB], &[]),
            refused(Refusal::WeakKey("an RSA key of 16384 bits".into())),
        ),
        (
            "P-521",
            WEB,
            info(KeyKind::Other("EC curve 1.3.132.0.35".into()), true, &[WEB], &[]),
            refused(Refusal::WeakKey("EC curve 1.3.132.0.35".into())),
        ),
        (
            "bad signature",
            WEB,
            info(KeyKind::P256, false, &[WEB], &[]),
            refused(Refusal::BadSignature),
        ),
        (
            "no SAN",
            WEB,
            info(KeyKind::P256, true, &[], &[]),
            san_mismatch("none"),
        ),
        (
            "extra DNS SAN",
            WEB,
            info(KeyKind::P256, true, &[WEB], &["DNSName(x)"]),
            san_mismatch(&format!("{WEB}, DNSName(x)")),
        ),
        (
            "two URIs",
            WEB,
            info(KeyKind::P256, true, &[WEB, WEB], &[]),
            san_mismatch(&format!("{WEB}, {WEB}")),
        ),
        (
            "SAN differs from the request",
            WEB,
            info(
                KeyKind::P256,
                true,
                &["spiffe://cluster.local/ns/shop/sa/cart"],
                &[],
            ),
            san_mismatch("spiffe://cluster.local/ns/shop/sa/cart"),
        ),
    ];
    for (what, requested, csr, want) in cases {
        let requested: Identity = requested.parse().unwrap();
        let got = decide("node-a", &requested, &TrustDomain::default(), &on_node, &csr);
        assert_eq!(got, want, "{what}");
    }
}

#[test]
fn bit_lengths() {
    assert_eq!(bit_length(&[]), 0);
    assert_eq!(bit_length(&[0, 0x80, 0]), 16);
    assert_eq!(bit_length(&[0x01, 0xff]), 9);
}
