//! The node's side of the control plane (DESIGN.md §6): the `NodeConfig.Watch` stream from
//! the controller and the config it delivers.
//!
//! - [`ControlClient`] keeps one stream open (TLS pinned to the mesh root, a bearer token
//!   re-read from its file at every reconnect, TCP `host:port` or `unix:/path`), says hello
//!   with the last applied version so the controller can resume with a delta, ACKs every
//!   version it applied and NACKs, with the reason, one it could not. It reconnects with
//!   exponential backoff and jitter, forever.
//! - [`NodeState`] is the applied config: local workloads (identity, pod UID, IPs, mTLS mode),
//!   remote workloads, services and policies, with address indexes. [`ControlHandle`]
//!   publishes it as `Arc<NodeState>` through a `tokio::sync::watch`.
//! - [`apply`] is the pure step from one version to the next.
//! - With the controller gone the agent keeps its last state: `stale_since` tells since when.
pub mod backoff;
mod client;
mod endpoint;
mod state;

pub use backoff::Backoff;
pub use client::{ConnectionStatus, ControlClient, ControlHandle, DEFAULT_BACKOFF};
pub use endpoint::{display_target, parse_target, ControlError, ControllerEndpoint, DEFAULT_CONNECT_TIMEOUT};
pub use state::{apply, apply_message, ApplyError, NodeState, Rejection};
