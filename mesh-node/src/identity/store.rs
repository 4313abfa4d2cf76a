//! The node's certificates: one X.509-SVID per local identity, in a map the proxy reads
//! without locking (an `ArcSwap`), replaced whole by the one writer, the manager.
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use mesh_api::Identity;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;
use zeroize::Zeroizing;

/// A certificate for one identity with its private key. The key was generated on this node
/// and never left it; its bytes are wiped when the last holder drops the `Svid`.
pub struct Svid {
    identity: Identity,
    /// Leaf first, then intermediates; the root is not included (see [`Svid::roots`]).
    chain: Vec<CertificateDer<'static>>,
    /// PKCS#8 DER of an ECDSA P-256 key.
    key: Zeroizing<Vec<u8>>,
    not_before: SystemTime,
    not_after: SystemTime,
    /// The leaf's serial number, hex with colons.
    serial: String,
    roots: Arc<[CertificateDer<'static>]>,
    received_at: SystemTime,
}

/// What [`super::verify::verify_chain`] established about a signed chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedChain {
    pub chain: Vec<CertificateDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub serial: String,
}

impl Svid {
    pub(crate) fn new(
        identity: Identity,
        verified: VerifiedChain,
        key: Zeroizing<Vec<u8>>,
        roots: Arc<[CertificateDer<'static>]>,
        received_at: SystemTime,
    ) -> Svid {
        Svid {
            identity,
            chain: verified.chain,
            key,
            not_before: verified.not_before,
            not_after: verified.not_after,
            serial: verified.serial,
            roots,
            received_at,
        }
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The chain to present in a handshake: leaf first, then intermediates (no root).
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// The private key, borrowed (PKCS#8). Parse it from the borrow (`tls::Svid::from_key`):
    /// a `clone_key()` copy is not wiped when dropped.
    pub fn private_key(&self) -> PrivateKeyDer<'_> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(&self.key[..]))
    }

    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The leaf's serial number (hex, colon-separated): changes with every renewal.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// The mesh root(s) the chain was verified against: the trust anchors for peers too.
    pub fn roots(&self) -> &Arc<[CertificateDer<'static>]> {
        &self.roots
    }

    /// When this node received the certificate.
    pub fn received_at(&self) -> SystemTime {
        self.received_at
    }

    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now < self.not_after
    }
}

impl fmt::Debug for Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Svid")
            .field("identity", &self.identity.to_string())
            .field("serial", &self.serial)
            .field("not_before", &humantime::format_rfc3339_seconds(self.not_before))
            .field("not_after", &humantime::format_rfc3339_seconds(self.not_after))
            .field("chain_len", &self.chain.len())
            .finish_non_exhaustive()
    }
}

pub type SvidMap = BTreeMap<Identity, Arc<Svid>>;

/// The shared certificate store. Clones share one store. Reads never block and never wait
/// for a writer; a reader holding an `Arc<Svid>` keeps that certificate (and key) alive
/// for the connection it is handshaking, even if it is replaced meanwhile.
#[derive(Clone)]
pub struct CertStore {
    inner: Arc<Inner>,
}

struct Inner {
    map: ArcSwap<SvidMap>,
    changes: watch::Sender<u64>,
}

impl Default for CertStore {
    fn default() -> Self {
        CertStore::new()
    }
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.all().values()).finish()
    }
}

impl CertStore {
    pub fn new() -> Self {
        CertStore {
            inner: Arc::new(Inner {
                map: ArcSwap::from_pointee(SvidMap::new()),
                changes: watch::Sender::new(0),
            }),
        }
    }

    /// The current certificate of `identity`, if this node holds one.
    pub fn get(&self, identity: &Identity) -> Option<Arc<Svid>> {
        self.inner.map.load().get(identity).cloned()
    }

    /// Every certificate, as one consistent snapshot.
    pub fn all(&self) -> Arc<SvidMap> {
        self.inner.map.load_full()
    }

    pub fn len(&self) -> usize {
        self.inner.map.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A counter bumped on every change, for caches built from the certificates (TLS
    /// configs) to know when to rebuild.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// Replaces (or adds) the certificate of its identity.
    pub(crate) fn insert(&self, svid: Arc<Svid>) {
        self.update(|map| {
            map.insert(svid.identity.clone(), svid.clone());
        });
    }

    /// Removes the certificate of `identity`; its key is wiped once no reader holds it.
    pub(crate) fn remove(&self, identity: &Identity) {
        if self.inner.map.load().contains_key(identity) {
            self.update(|map| {
                map.remove(identity);
            });
        }
    }

    fn update(&self, change: impl Fn(&mut SvidMap)) {
        self.inner.map.rcu(|map| {
            let mut map = SvidMap::clone(map);
            change(&mut map);
            map
        });
        self.inner.changes.send_modify(|n| *n += 1);
    }
}
