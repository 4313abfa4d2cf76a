//! The root's life cycle on disk and the certificates it signs, read back with x509-parser.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use rcgen::{CertificateParams, KeyPair};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::*;

use super::*;

const DAY: Duration = Duration::from_secs(24 * 3600);
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

fn csr_for(uri: &str) -> CsrInfo {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    csr::inspect(params.serialize_request(&key).unwrap().der()).unwrap()
}

fn pem_der(pem: &str) -> Vec<u8> {
    x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .unwrap()
        .1
        .contents
}

#[test]
fn root_is_created_once_and_kept_private() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let first = Ca::load_or_create(&ca_dir, DAY).unwrap();
    let key_mode = fs::metadata(ca_dir.join("root.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    let again = Ca::load_or_create(&ca_dir, DAY).unwrap();
    assert_eq!(first.root_pem(), again.root_pem());

    let root_der = pem_der(first.root_pem());
    let (_, root) = X509Certificate::from_der(&root_der).unwrap();
    assert!(root.is_ca());
    assert_eq!(root.subject(), root.issuer());
}

#[test]
fn refuses_a_readable_key() {
    let dir = tempfile::tempdir().unwrap();
    Ca::load_or_create(dir.path(), DAY).unwrap();
    let key = dir.path().join("root.key");
    for mode in [0o644, 0o640, 0o604] {
        fs::set_permissions(&key, fs::Permissions::from_mode(mode)).unwrap();
        let err = Ca::load_or_create(dir.path(), DAY).err().expect("refused");
        assert!(
            matches!(err, CaError::File(SecretFileError::Readable { mode: m, .. }) if m == mode),
            "{err}"
        );
    }
    fs::set_permissions(&key, fs::Permissions::from_mode(0o400)).unwrap();
    assert!(Ca::load_or_create(dir.path(), DAY).is_ok());
}

#[test]
fn refuses_half_a_root_and_a_foreign_key() {
    let dir = tempfile::tempdir().unwrap();
    Ca::load_or_create(dir.path(), DAY).unwrap();
    let cert = fs::read_to_string(dir.path().join("root.pem")).unwrap();
    fs::remove_file(dir.path().join("root.pem")).unwrap();
    let err = Ca::load_or_create(dir.path(), DAY).err().expect("refused");
    assert!(matches!(err, CaError::Incomplete { .. }), "{err}");

    fs::write(dir.path().join("root.pem"), cert).unwrap();
    let other = KeyPair::generate().unwrap().serialize_pem();
    fs::write(dir.path().join("root.key"), other).unwrap();
    let err = Ca::load_or_create(dir.path(), DAY).err().expect("refused");
    assert!(matches!(err, CaError::InvalidRoot { .. }), "{err}");
}

#[test]
fn signs_x509_svids() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::load_or_create(dir.path(), DAY).unwrap();
    let identity: Identity = WEB.parse().unwrap();
    let chain = ca.sign(&identity, &csr_for(WEB)).unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1], ca.root_pem());

    let (leaf_der, root_der) = (pem_der(&chain[0]), pem_der(ca.root_pem()));
    let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
    let (_, root) = X509Certificate::from_der(&root_der).unwrap();
    leaf.verify_signature(Some(root.public_key()))
        .expect("chains to the root");
    assert_eq!(leaf.issuer(), root.subject());
    assert!(!leaf.is_ca());

    let san = leaf.subject_alternative_name().unwrap().expect("has SAN");
    assert!(san.critical, "empty subject: SAN must be critical");
    assert_eq!(san.value.general_names, [GeneralName::URI(WEB)]);
    let ku = leaf.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth && !eku.any);
    let bc = leaf.extensions().iter().find_map(|e| match e.parsed_extension() {
        ParsedExtension::BasicConstraints(bc) => Some(bc.ca),
        _ => None,
    });
    assert_eq!(bc, Some(false));

    let validity = leaf.validity();
    let (not_before, not_after) = (
        validity.not_before.to_datetime(),
        validity.not_after.to_datetime(),
    );
    assert_eq!(
        (not_after - not_before).whole_seconds(),
        (DAY + BACKDATE).as_secs() as i64
    );
    let started = OffsetDateTime::now_utc() - not_before;
    assert!(started >= ::time::Duration::minutes(5) && started < ::time::Duration::minutes(6));

    let again = ca.sign(&identity, &csr_for(WEB)).unwrap();
    let other_der = pem_der(&again[0]);
    let (_, other) = X509Certificate::from_der(&other_der).unwrap();
    assert_ne!(leaf.raw_serial(), other.raw_serial(), "serials are random");
    assert!(leaf.raw_serial().len() <= 16);
}

#[test]
fn issues_serving_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::load_or_create(dir.path(), DAY).unwrap();
    let names = [
        SanType::DnsName("mesh-controller".try_into().unwrap()),
        SanType::IpAddress([127, 0, 0, 1].into()),
    ];
    let (cert, _key) = ca.issue_serving(&names, DAY).unwrap();
    let (_, cert) = X509Certificate::from_der(&cert).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        san.value.general_names,
        [
            GeneralName::DNSName("mesh-controller"),
            GeneralName::IPAddress(&[127, 0, 0, 1])
        ]
    );
    assert!(cert.extended_key_usage().unwrap().unwrap().value.server_auth);
}
