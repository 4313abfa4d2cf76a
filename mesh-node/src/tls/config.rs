//! rustls configs of the mesh: who we are (an [`Svid`]), whom we trust (the mesh roots), and the
//! HBONE handshake rules (TLS 1.3, ALPN h2, no SNI, SPIFFE identities).
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use zeroize::Zeroize;

use super::provider::{load_signing_key, provider};
use super::verify::{ClientTrustDomainVerifier, ServerIdentityVerifier};
use super::{spiffe_id, TlsError};

/// The ALPN protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

/// An X.509-SVID with its private key: one local identity. The key is parsed once; clones share
/// it.
#[derive(Clone)]
pub struct Svid {
    identity: Arc<str>,
    /// The leaf's serial number (hex, colon-separated), which tells one issued certificate of
    /// the identity from the next.
    serial: Arc<str>,
    key: Arc<CertifiedKey>,
}

impl Svid {
    /// `chain` is leaf first, then intermediates (not the root). Fails if the key does not
    /// match the leaf or the leaf has no single SPIFFE ID. The DER copy of the key passed in is
    /// wiped once parsed.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        mut key: PrivateKeyDer<'static>,
    ) -> Result<Svid, TlsError> {
        let parsed = Svid::from_key(chain, &key);
        key.zeroize();
        parsed
    }

    /// Same as [`Svid::new`] from a borrowed key, which is parsed without being copied.
    pub fn from_key(chain: Vec<CertificateDer<'static>>, key: &PrivateKeyDer<'_>) -> Result<Svid, TlsError> {
        let leaf = chain
            .first()
            .ok_or_else(|| TlsError::InvalidMaterial("empty certificate chain".into()))?;
        let identity = spiffe_id(leaf)?;
        let serial = serial_of(leaf)?;
        let signer = load_signing_key(key)?;
        let key = CertifiedKey::new(chain, signer);
        match key.keys_match() {
            // A key that cannot tell its public half is taken on trust, as rustls does.
            Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
            Err(e) => return Err(TlsError::InvalidMaterial(e.to_string())),
        }
        Ok(Svid {
            identity: identity.into(),
            serial: serial.into(),
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

    /// The leaf's serial number, hex with colons.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// The certificate chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.key.cert
    }

    /// Whether two values are the same issued certificate: the same identity and serial.
    fn same_certificate(&self, other: &Svid) -> bool {
        self.identity == other.identity && self.serial == other.serial
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

/// What [`ConfigCache`] built rather than reused: a key parsed, a client or a server config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Build {
    Key,
    Client,
    Server,
}

impl Build {
    pub fn as_str(self) -> &'static str {
        match self {
            Build::Key => "key",
            Build::Client => "client",
            Build::Server => "server",
        }
    }
}

/// Told of every build (metrics, tests).
pub type BuildObserver = Box<dyn Fn(Build) + Send + Sync>;

/// Parsed keys and built configs, reused, each keyed by identity and certificate serial: an
/// [`Svid`] per local identity, client configs per (source identity, destination identity),
/// server configs per local identity. A renewed certificate (a new serial) replaces its
/// entries; [`ConfigCache::retain`] forgets identities that left the node;
/// [`ConfigCache::set_roots`] drops every config.
pub struct ConfigCache {
    trust_domain: String,
    roots: RwLock<Arc<RootCertStore>>,
    svids: Mutex<HashMap<Arc<str>, Svid>>,
    clients: Mutex<HashMap<ClientKey, Built<ClientConfig>>>,
    servers: Mutex<HashMap<Arc<str>, Built<ServerConfig>>>,
    observer: OnceLock<BuildObserver>,
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
            svids: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
            servers: Mutex::new(HashMap::new()),
            observer: OnceLock::new(),
        }
    }

    /// Sets the build observer; only the first call takes effect.
    pub fn observe_builds(&self, observer: BuildObserver) {
        let _ = self.observer.set(observer);
    }

    fn built(&self, what: Build) {
        if let Some(observe) = self.observer.get() {
            observe(what);
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

    /// The TLS material of certificate `serial` of the local `identity`. `load` (which parses
    /// the key) runs only when the cache holds no other certificate for the identity than
    /// `serial`'s.
    pub fn svid(
        &self,
        identity: &str,
        serial: &str,
        load: impl FnOnce() -> Result<Svid, TlsError>,
    ) -> Result<Svid, TlsError> {
        if let Some(svid) = lock(&self.svids).get(identity) {
            if &*svid.serial == serial {
                return Ok(svid.clone());
            }
        }
        let svid = load()?;
        self.built(Build::Key);
        lock(&self.svids).insert(identity.into(), svid.clone());
        Ok(svid)
    }

    /// The client config for `source` dialing a server that must be `expected_server_identity`.
    pub fn client(
        &self,
        source: &Svid,
        expected_server_identity: &str,
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let key = (source.identity.clone(), expected_server_identity.to_string());
        if let Some((svid, cfg)) = lock(&self.clients).get(&key) {
            if svid.same_certificate(source) {
                return Ok(cfg.clone());
            }
        }
        let cfg = client_config(source, self.roots(), expected_server_identity)?;
        self.built(Build::Client);
        lock(&self.clients).insert(key, (source.clone(), cfg.clone()));
        Ok(cfg)
    }

    /// The server config of the local identity `svid`.
    pub fn server(&self, svid: &Svid) -> Result<Arc<ServerConfig>, TlsError> {
        if let Some((cached, cfg)) = lock(&self.servers).get(svid.identity()) {
            if cached.same_certificate(svid) {
                return Ok(cfg.clone());
            }
        }
        let cfg = server_config(svid, self.roots(), &self.trust_domain)?;
        self.built(Build::Server);
        lock(&self.servers).insert(svid.identity.clone(), (svid.clone(), cfg.clone()));
        Ok(cfg)
    }

    /// Keeps only what was built from certificates `current(identity, serial)` accepts: the
    /// rest (identities that left the node, certificates since renewed) is dropped, and with
    /// the last reference its parsed key.
    pub fn retain(&self, current: impl Fn(&str, &str) -> bool) {
        let keep = |svid: &Svid| current(&svid.identity, &svid.serial);
        lock(&self.svids).retain(|_, svid| keep(svid));
        lock(&self.clients).retain(|_, (svid, _)| keep(svid));
        lock(&self.servers).retain(|_, (svid, _)| keep(svid));
    }
}

/// The leaf's serial number as [`x509_parser`] prints it (hex with colons).
fn serial_of(leaf: &CertificateDer<'_>) -> Result<String, TlsError> {
    let (_, x509) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| TlsError::BadCertificate(format!("unparsable certificate: {e}")))?;
    Ok(x509.raw_serial_as_string())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use rcgen::{CertificateParams, KeyPair, SanType};

    use super::*;

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
    const CART: &str = "spiffe://cluster.local/ns/shop/sa/cart";

    /// A self-signed certificate for `id` (a fresh serial each time) and its key.
    fn issue(id: &str) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        let cert = params.self_signed(&key).unwrap();
        let der = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        (vec![cert.der().clone()], der)
    }

    fn counted(cache: &ConfigCache) -> Arc<[AtomicUsize; 3]> {
        let counts = Arc::new([const { AtomicUsize::new(0) }; 3]);
        let c = counts.clone();
        cache.observe_builds(Box::new(move |b| {
            c[b as usize].fetch_add(1, Ordering::SeqCst);
        }));
        counts
    }

    fn loaded(
        cache: &ConfigCache,
        id: &str,
        cert: &(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>),
    ) -> Svid {
        let serial = serial_of(&cert.0[0]).unwrap();
        cache
            .svid(id, &serial, || Svid::new(cert.0.clone(), cert.1.clone_key()))
            .unwrap()
    }

    #[test]
    fn keys_and_configs_are_built_once_per_certificate_and_forgotten_with_it() {
        let (ca, _) = issue(CART);
        let cache = ConfigCache::new(roots_from_der(&ca).unwrap(), "cluster.local");
        let builds = counted(&cache);
        let count = |b: Build| builds[b as usize].load(Ordering::SeqCst);

        let first = issue(WEB);
        for _ in 0..3 {
            let svid = loaded(&cache, WEB, &first);
            cache.client(&svid, CART).unwrap();
            cache.server(&svid).unwrap();
        }
        assert_eq!(
            (count(Build::Key), count(Build::Client), count(Build::Server)),
            (1, 1, 1),
            "three connections, one build of each"
        );

        // A renewed certificate (a new serial) is parsed and built for anew.
        let renewed = issue(WEB);
        let svid = loaded(&cache, WEB, &renewed);
        assert_eq!(svid.serial(), serial_of(&renewed.0[0]).unwrap());
        cache.client(&svid, CART).unwrap();
        cache.server(&svid).unwrap();
        assert_eq!(
            (count(Build::Key), count(Build::Client), count(Build::Server)),
            (2, 2, 2)
        );

        // The identity leaves the node: nothing of it stays.
        cache.retain(|_, _| false);
        assert!(lock(&cache.svids).is_empty());
        assert!(lock(&cache.clients).is_empty());
        assert!(lock(&cache.servers).is_empty());
        loaded(&cache, WEB, &renewed);
        assert_eq!(count(Build::Key), 3);
    }

    #[test]
    fn retain_keeps_only_the_current_certificates() {
        let (ca, _) = issue(CART);
        let cache = ConfigCache::new(roots_from_der(&ca).unwrap(), "cluster.local");
        let web = loaded(&cache, WEB, &issue(WEB));
        let cart = loaded(&cache, CART, &issue(CART));
        cache.server(&web).unwrap();
        cache.server(&cart).unwrap();
        cache.client(&web, CART).unwrap();
        let web_serial = web.serial().to_owned();
        cache.retain(|id, serial| id == WEB && serial == web_serial);
        assert_eq!(lock(&cache.svids).keys().map(|k| &**k).collect::<Vec<_>>(), [WEB]);
        assert_eq!(lock(&cache.servers).len(), 1);
        assert_eq!(lock(&cache.clients).len(), 1);
    }
}
