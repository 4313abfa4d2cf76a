//! Workload identities on this node (DESIGN.md §3): a key per local identity, generated
//! here and never sent anywhere; a CSR for exactly that SPIFFE ID; the signed X.509-SVID
//! checked (URI SAN, our key, chains to the pinned root) and kept in one shared
//! [`CertStore`] the proxy reads without blocking; renewal at half-life.
//!
//! - [`IdentityManager`] runs the whole life cycle for the set of identities the control
//!   plane names (see its module docs).
//! - [`Signer`] is where CSRs go: [`CaSigner`] is the controller's `Ca.Sign`.
//! - [`schedule`] holds the pure timing decisions; [`verify_chain`] the pure acceptance test.
mod csr;
mod manager;
pub mod schedule;
mod signer;
mod store;
mod verify;

pub use csr::{generate as generate_key_and_csr, KeyAndCsr};
pub use manager::{IdentityManager, RequestError};
pub use schedule::RenewPolicy;
pub use signer::{CaSigner, SignError, Signer};
pub use store::{CertStore, Svid, SvidMap, VerifiedChain};
pub use verify::{roots_from_pem, verify_chain, VerifyError};
