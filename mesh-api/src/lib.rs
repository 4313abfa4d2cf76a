//! The control API: protobuf contract and domain types shared by controller, node and CLI.
//!
//! `pb` is the wire form (`proto/mesh.proto`); the plain types beside it are what code works
//! with. Conversions: `From<domain> for pb::X` and `TryFrom<pb::X> for domain`, the latter
//! failing with a [`WireError`] that names the offending field.

pub mod admin;
pub mod client;
mod identity;
pub mod manifests;
mod objects;
pub mod secret_files;
mod view;
mod wire;

#[cfg(test)]
mod testing;

/// Generated protobuf messages and tonic services (`proto/mesh.proto`).
pub mod pb {
    tonic::include_proto!("mesh.v1");
}

pub use identity::{Identity, IdentityError, TrustDomain};
pub use objects::{
    Action, Endpoint, Labels, MtlsMode, NamespacedName, Operation, Policy, Protocol, Rule, Service,
    ServicePort, Source, Workload,
};
pub use view::{Delta, NodeMessage, NodeView, Removed, Update, UpdateKind, Version};
pub use wire::WireError;
