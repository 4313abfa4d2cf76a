//! rustls configs of the mesh: who we are (an [`Svid`]), whom we trust (the mesh roots), and the
//! HBONE handshake rules (TLS 1.3, ALPN h2, no SNI, SPIFFE identities).
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};

use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::provider::provider;
use super::verify::{ClientTrustDomainVerifier, ServerIdentityVerifier};
use super::{spiffe_id, TlsError};

/// The ALPN protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

/// An X.509-SVID with its private key: one local identity. The key is parsed once; clones share
/// it.
#[derive(Clone)]
pub struct Svid {
    identity: Arc<str>,
    key: Arc<CertifiedKey>,
}

impl Svid {
    /// `chain` is leaf first, then intermediates (not the root). Fails if the key does not
    /// match the leaf or the leaf has no single SPIFFE ID.
    pub fn new(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Result<Svid, TlsError> {
        let leaf = chain
            .first()
            .ok_or_else(|| TlsError::InvalidMaterial("empty certificate chain".into()))?;
        let identity = spiffe_id(leaf)?;
        let key = CertifiedKey::from_der(chain, key, &provider())
            .map_err(|e| TlsError::InvalidMaterial(e.to_string()))?;
        Ok(Svid {
            identity: identity.into(),
            key: Arc::new(key),
        })
    }

    /// Same as [`Svid::new`] from PEM text (certificates leaf first; a PKCS#8, SEC1 or PKCS#1 key).
    pub fn from_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<Svid, TlsError> {
        let chain = CertificateDer::pem_slice_iter(chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::InvalidMaterial(format!("certificate PEM: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| TlsError::InvalidMaterial(format!("key PEM: {e}")))?;
        Svid::new(chain, key)
    }

    /// The SPIFFE ID of the leaf.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The certificate chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.key.cert
    }

    /// Whether two values are the same issued certificate and key (not merely the same identity).
    pub fn same_key(&self, other: &Svid) -> bool {
        Arc::ptr_eq(&self.key, &other.key)
    }
}

impl fmt::Debug for Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Svid")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// A root store from DER certificates (the mesh root, plus the next root during a rotation).
pub fn roots_from_der(certs: &[CertificateDer<'_>]) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots
            .add(c.clone().into_owned())
            .map_err(|e| TlsError::InvalidMaterial(format!("root: {e}")))?;
    }
    if roots.is_empty() {
        return Err(TlsError::InvalidMaterial("no root certificate".into()));
    }
    Ok(Arc::new(roots))
}

/// A root store from PEM text holding one or more certificates.
pub fn roots_from_pem(pem: &[u8]) -> Result<Arc<RootCertStore>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::InvalidMaterial(format!("root PEM: {e}")))?;
    roots_from_der(&certs)
}

/// The client side of an HBONE handshake from `source` to a server that must prove
/// `expected_server_identity` exactly. TLS 1.3 only, ALPN h2, no SNI (dial with a
/// `ServerName::IpAddress`), no session resumption. Prefer [`ConfigCache::client`], which reuses
/// configs per (source, destination identity).
pub fn client_config(
    source: &Svid,
    roots: Arc<RootCertStore>,
    expected_server_identity: &str,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = ServerIdentityVerifier::new(roots, expected_server_identity.to_string(), provider.clone());
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::InvalidMaterial(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(source.key.clone())));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.enable_sni = false;
    // Pooled HBONE connections make resumption pointless, and a resumed session would skip the
    // certificate checks above.
    cfg.resumption = Resumption::disabled();
    Ok(Arc::new(cfg))
}

/// The server side of an HBONE handshake for the local identity `svid`: TLS 1.3 only, ALPN h2,
/// a client certificate required that chains to `roots` and names an identity in
/// `trust_domain`. The proxy picks this config by the accepted socket's local address (the
/// destination pod), never by SNI.
pub fn server_config(
    svid: &Svid,
    roots: Arc<RootCertStore>,
    trust_domain: &str,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let webpki = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .clear_root_hint_subjects()
        .build()
        .map_err(|e| TlsError::InvalidMaterial(e.to_string()))?;
    let verifier = ClientTrustDomainVerifier::new(webpki, trust_domain.to_string());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::InvalidMaterial(e.to_string()))?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(svid.key.clone())));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.session_storage = Arc::new(NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// Built configs, reused: client configs per (source identity, destination identity), server
/// configs per local identity. An entry is rebuilt when the [`Svid`] passed in is a different
/// (rotated) certificate than the one it was built from; [`ConfigCache::set_roots`] drops all.
pub struct ConfigCache {
    trust_domain: String,
    roots: RwLock<Arc<RootCertStore>>,
    clients: Mutex<HashMap<ClientKey, Built<ClientConfig>>>,
    servers: Mutex<HashMap<Arc<str>, Built<ServerConfig>>>,
}

/// (source identity, expected destination identity).
type ClientKey = (Arc<str>, String);

/// A config and the certificate it was built from.
type Built<C> = (Svid, Arc<C>);

impl ConfigCache {
    pub fn new(roots: Arc<RootCertStore>, trust_domain: impl Into<String>) -> ConfigCache {
        ConfigCache {
            trust_domain: trust_domain.into(),
            roots: RwLock::new(roots),
            clients: Mutex::new(HashMap::new()),
            servers: Mutex::new(HashMap::new()),
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn roots(&self) -> Arc<RootCertStore> {
        self.roots.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the trusted roots (root rotation) and forgets every built config.
    pub fn set_roots(&self, roots: Arc<RootCertStore>) {
        *self.roots.write().unwrap_or_else(|e| e.into_inner()) = roots;
        lock(&self.clients).clear();
        lock(&self.servers).clear();
    }

    /// The client config for `source` dialing a server that must be `expected_server_identity`.
    pub fn client(
        &self,
        source: &Svid,
        expected_server_identity: &str,
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let key = (source.identity.clone(), expected_server_identity.to_string());
        if let Some((svid, cfg)) = lock(&self.clients).get(&key) {
            if svid.same_key(source) {
                return Ok(cfg.clone());
            }
        }
        let cfg = client_config(source, self.roots(), expected_server_identity)?;
        lock(&self.clients).insert(key, (source.clone(), cfg.clone()));
        Ok(cfg)
    }

    /// The server config of the local identity `svid`.
    pub fn server(&self, svid: &Svid) -> Result<Arc<ServerConfig>, TlsError> {
        if let Some((cached, cfg)) = lock(&self.servers).get(svid.identity()) {
            if cached.same_key(svid) {
                return Ok(cfg.clone());
            }
        }
        let cfg = server_config(svid, self.roots(), &self.trust_domain)?;
        lock(&self.servers).insert(svid.identity.clone(), (svid.clone(), cfg.clone()));
        Ok(cfg)
    }

    /// Forgets every config of a local identity (its workload left the node).
    pub fn forget(&self, identity: &str) {
        lock(&self.clients).retain(|(src, _), _| &**src != identity);
        lock(&self.servers).remove(identity);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
