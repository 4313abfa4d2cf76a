//! The cluster controller: sources, translation to per-node views, the CA and the gRPC server.
//!
//! Data flow: a [`sources::Source`] publishes whole [`cluster::ClusterState`]s into the
//! [`store::Store`], which numbers them; each node's Watch stream runs a
//! [`session::Session`] that turns states into that node's view ([`translate`]) and views
//! into snapshots and deltas ([`diff`]). [`ca`] signs certificates after the pure
//! [`ca::csr::decide`] allows them; [`server`] puts both services on TLS.

pub mod ca;
pub mod cluster;
pub mod crd;
pub mod diff;
pub mod health;
pub mod kubeapi;
pub mod server;
pub mod session;
pub mod sources;
pub mod store;
pub mod translate;
