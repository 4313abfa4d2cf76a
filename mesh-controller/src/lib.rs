//! The cluster controller: sources, translation to per-node views, the CA and the gRPC server.

pub mod ca;
pub mod cluster;
pub mod diff;
pub mod server;
pub mod session;
pub mod sources;
pub mod store;
pub mod translate;
