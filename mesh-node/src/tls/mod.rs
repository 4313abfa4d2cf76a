//! The mesh's TLS (DESIGN.md §3, §5): X.509-SVIDs whose URI SAN is a SPIFFE ID
//! (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`), chains to the mesh root, TLS 1.3 only.
//!
//! - [`client_config`]: HBONE client; verifies the server chain to the mesh root and requires the
//!   server's SPIFFE ID to equal the expected destination identity exactly; no SNI.
//! - [`server_config`]: HBONE server for one local identity; requires a client certificate that
//!   chains to the mesh root with a SPIFFE ID in the trust domain.
//! - [`ConfigCache`]: reuses parsed keys and both configs, keyed by identity and certificate
//!   serial; rebuilt on certificate or root rotation, forgotten when an identity leaves.
//! - [`peer_identity`]: the peer's SPIFFE ID after a handshake.
//! - [`TlsError::reason`]: why a handshake failed, as a metrics label.
//!
//! Identities are plain strings at this boundary. The crypto backend is chosen in one place,
//! [`provider()`].
mod config;
mod error;
mod handshake;
mod identity;
mod provider;
mod verify;

pub use config::{
    client_config, roots_from_der, roots_from_pem, server_config, Build, BuildObserver, ConfigCache, Svid,
    ALPN_H2,
};
pub use error::TlsError;
pub use handshake::{accept, connect};
pub use identity::{in_trust_domain, peer_identity, spiffe_id, trust_domain_of};
pub use provider::provider;

/// Re-exported so callers name the same rustls types this module uses.
pub use rustls::pki_types::{CertificateDer, PrivateKeyDer};
pub use rustls::{ClientConfig, RootCertStore, ServerConfig};
