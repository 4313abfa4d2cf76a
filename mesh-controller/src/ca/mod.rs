//! The mesh CA: a root created on first start and kept in a [`RootStore`] (files in local
//! mode, a Kubernetes Secret in a cluster), signing X.509-SVIDs.
//!
//! The root signs leaves directly (no intermediate yet): the chain handed out is
//! `[leaf, root]`. Rotation will add an intermediate and a second trusted root side by side;
//! until then the root lives 10 years. Leaves carry only the URI SAN of their SPIFFE ID (an
//! empty subject, so the SAN is critical), digitalSignature + keyEncipherment, serverAuth +
//! clientAuth, a random 127-bit serial, and are backdated a little against clock skew.

pub mod csr;
mod files;
#[cfg(test)]
mod files_tests;
mod secret;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_api::secret_files::SecretFileError;
use mesh_api::Identity;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use self::csr::CsrInfo;
pub use self::files::FilesRoot;
pub use self::secret::{publish_trust_bundle, SecretRoot, TRUST_BUNDLE_KEY};
use crate::kubeapi::ApiError;

const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start this long before they are issued, for nodes whose clocks lag.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the CA's files: {0}")]
    File(#[from] SecretFileError),
    #[error("{missing} is missing while the other root file exists; restore it or remove both")]
    Incomplete { missing: PathBuf },
    #[error("root in {location}: {reason}")]
    InvalidRoot { location: String, reason: String },
    #[error("{location} lacks {missing}; restore it or delete the Secret (which creates a new root and invalidates every certificate)")]
    IncompleteSecret { location: String, missing: &'static str },
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("lifetime {0:?} is out of range")]
    Lifetime(Duration),
    #[error("the system random generator failed")]
    Random,
}

/// A root certificate and its PKCS#8 key, PEM.
#[derive(Clone)]
pub struct RootPem {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Where the root lives. One root per mesh: a store never replaces a root it holds, and
/// when two controllers create one at once, both end up with the one that was stored first.
pub trait RootStore: Send + Sync {
    /// Such as `directory /var/lib/mesh-controller/ca` or `Secret mesh-system/mesh-ca`.
    fn location(&self) -> String;

    /// The stored root; if there is none, `create`'s root, stored. Returns the root and
    /// whether this call created it.
    fn load_or_store(
        &self,
        create: &(dyn Fn() -> Result<RootPem, CaError> + Sync),
    ) -> impl Future<Output = Result<(RootPem, bool), CaError>> + Send;
}

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
    leaf_lifetime: Duration,
}

impl Ca {
    /// Loads the root from `dir`, creating it on first start.
    pub fn load_or_create(dir: &Path, leaf_lifetime: Duration) -> Result<Ca, CaError> {
        let store = FilesRoot::new(dir.to_owned());
        let (root, created) = store.load_or_store_now(&new_root)?;
        if created {
            tracing::info!(dir = %dir.display(), "created a new mesh root");
        }
        Ca::from_root(root, &store.location(), leaf_lifetime)
    }

    /// Loads the root from `store`, creating it there if it holds none.
    pub async fn from_store(store: &impl RootStore, leaf_lifetime: Duration) -> Result<Ca, CaError> {
        let (root, created) = store.load_or_store(&new_root).await?;
        if created {
            tracing::info!(location = %store.location(), "created a new mesh root");
        } else {
            tracing::info!(location = %store.location(), "loaded the mesh root");
        }
        Ca::from_root(root, &store.location(), leaf_lifetime)
    }

    fn from_root(root: RootPem, location: &str, leaf_lifetime: Duration) -> Result<Ca, CaError> {
        let invalid = |reason: &dyn std::fmt::Display| CaError::InvalidRoot {
            location: location.to_owned(),
            reason: reason.to_string(),
        };
        let key = KeyPair::from_pem(&root.key_pem).map_err(|e| invalid(&e))?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(root.cert_pem.as_bytes()).map_err(|e| invalid(&e))?;
        let cert = pem.parse_x509().map_err(|e| invalid(&e))?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(invalid(&"root.pem does not belong to root.key"));
        }
        if !cert.validity().is_valid() {
            return Err(invalid(&format!(
                "root.pem is not valid now (until {})",
                cert.validity().not_after
            )));
        }
        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(pem.contents.clone()), key)?;
        Ok(Ca {
            issuer,
            root_pem: root.cert_pem,
            leaf_lifetime,
        })
    }

    /// The root certificate nodes pin, PEM.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Signs an X.509-SVID for `identity` over the key of a CSR that [`csr::decide`] has
    /// accepted; returns the chain, PEM, leaf first.
    pub fn sign(&self, identity: &Identity, csr: &CsrInfo) -> Result<Vec<String>, CaError> {
        let mut params = leaf_params(self.leaf_lifetime)?;
        params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let public_key = SubjectPublicKeyInfo::from_der(&csr.public_key)?;
        let cert = params.signed_by(&public_key, &self.issuer)?;
        Ok(vec![cert.pem(), self.root_pem.clone()])
    }

    /// A fresh key and certificate for the controller's own TLS listener.
    pub fn issue_serving(
        &self,
        names: &[SanType],
        lifetime: Duration,
    ) -> Result<(CertificateDer<'static>, PrivatePkcs8KeyDer<'static>), CaError> {
        let key = KeyPair::generate()?;
        let mut params = leaf_params(lifetime)?;
        params
            .distinguished_name
            .push(DnType::CommonName, "mesh-controller");
        params.subject_alt_names = names.to_vec();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.der().clone(), PrivatePkcs8KeyDer::from(key.serialize_der())))
    }
}

fn leaf_params(lifetime: Duration) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.is_ca = IsCa::ExplicitNoCa;
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial()?);
    (params.not_before, params.not_after) = validity(lifetime)?;
    Ok(params)
}

fn new_root() -> Result<RootPem, CaError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, "mesh");
    params.distinguished_name.push(DnType::CommonName, "mesh root CA");
    // Path length 1 leaves room for the intermediate that rotation will bring.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial()?);
    (params.not_before, params.not_after) = validity(ROOT_LIFETIME)?;
    let cert = params.self_signed(&key)?;
    Ok(RootPem {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn validity(lifetime: Duration) -> Result<(OffsetDateTime, OffsetDateTime), CaError> {
    let now = OffsetDateTime::now_utc();
    let span = |d: Duration| time::Duration::try_from(d).map_err(|_| CaError::Lifetime(d));
    let not_after = now
        .checked_add(span(lifetime)?)
        .ok_or(CaError::Lifetime(lifetime))?;
    Ok((now - span(BACKDATE)?, not_after))
}

fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CaError::Random)?;
    // A serial is a positive integer: clearing the top bit keeps it so in 16 bytes.
    bytes[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&bytes))
}

#[cfg(test)]
mod tests;
