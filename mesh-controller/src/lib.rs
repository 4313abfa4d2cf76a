//! The cluster controller: sources, translation to per-node views, the CA and the gRPC server.
