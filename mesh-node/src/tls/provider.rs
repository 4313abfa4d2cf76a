//! The one place that chooses the crypto backend. mesh uses *ring* (it builds fast and is what
//! the rest of the workspace already links through tonic's `tls-ring`). To move to aws-lc-rs,
//! change the `backend` import below and the `ring` features of rustls/tokio-rustls in
//! Cargo.toml; nothing else names a backend.
use std::sync::{Arc, OnceLock};

use rustls::crypto::ring as backend;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::PrivateKeyDer;
use rustls::sign::SigningKey;

use super::TlsError;

/// The provider every mesh TLS config is built with: TLS 1.3 AES-GCM suites only, x25519 or
/// P-256 key exchange (the HBONE wire facts of DESIGN.md §5).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            Arc::new(CryptoProvider {
                cipher_suites: vec![
                    backend::cipher_suite::TLS13_AES_128_GCM_SHA256,
                    backend::cipher_suite::TLS13_AES_256_GCM_SHA384,
                ],
                kx_groups: vec![backend::kx_group::X25519, backend::kx_group::SECP256R1],
                ..backend::default_provider()
            })
        })
        .clone()
}

/// Parses a private key for signing with the chosen backend, from a borrowed DER so that no
/// copy of the key is left behind unwiped.
pub(crate) fn load_signing_key(key: &PrivateKeyDer<'_>) -> Result<Arc<dyn SigningKey>, TlsError> {
    backend::sign::any_supported_type(key).map_err(|e| TlsError::InvalidMaterial(e.to_string()))
}
