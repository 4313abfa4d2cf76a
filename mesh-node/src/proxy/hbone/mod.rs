//! HBONE: TCP connections tunnelled as HTTP/2 `CONNECT` streams over mTLS (DESIGN.md §5),
//! wire-compatible with Istio's ztunnel.
//!
//! - [`client::Pool`]: pooled, multiplexed HTTP/2 connections per [`PoolKey`]; `connect` opens
//!   one `CONNECT` stream per proxied TCP connection and returns it as an
//!   `AsyncRead + AsyncWrite` ([`HboneStream`]).
//! - [`server::serve_tls`] / [`server::serve_connection`]: the inbound side; authorization and
//!   the upstream connect are the [`Handler`]'s.
//!
//! Wire: `:method CONNECT`, `:authority <dst ip:port>`, `forwarded: for="<src ip:port>"`
//! with `;host=<service hostname>` when the source dialled a service, and `baggage` naming the
//! source workload (all optional, ztunnel's forms; `traceparent` is ignored). Answers 200, 400
//! (not CONNECT, or an authority that is not an address or not the address dialled), 403
//! (policy), 503 (upstream refused or unreachable).
pub mod baggage;
pub mod client;
pub mod server;
pub mod wire;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

use crate::tls::TlsError;

pub use baggage::Baggage;
pub use client::{Dialer, HboneStream, Origin, Pool, PoolConfig, PoolKey, PoolStats};
pub use server::{serve_connection, serve_tls, serve_tls_holding, Deny, Handler, Request, ServerSettings};

/// The HBONE port on every enrolled pod address.
pub const HBONE_PORT: u16 = 15008;

/// HTTP/2 settings both sides use (ztunnel's values).
#[derive(Clone, Debug)]
pub struct H2Settings {
    /// Initial flow-control window of a stream (4 MiB).
    pub stream_window: u32,
    /// Initial flow-control window of a connection (16 MiB).
    pub connection_window: u32,
    /// Largest frame we accept (1 MiB).
    pub max_frame_size: u32,
    /// Concurrent streams the server allows per connection (200).
    pub max_concurrent_streams: u32,
    /// A PING is sent after this long without a frame from the peer (10 s).
    pub keepalive_interval: Duration,
    /// The connection is closed if a PING is not answered within this (20 s).
    pub keepalive_timeout: Duration,
}

impl Default for H2Settings {
    fn default() -> Self {
        H2Settings {
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            max_concurrent_streams: 200,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// An HBONE failure. Cheap to clone: one failed dial is reported to every caller waiting on it.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum HboneError {
    /// The TCP connection to the HBONE peer failed.
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: std::net::SocketAddr,
        #[source]
        source: Arc<io::Error>,
    },
    /// The mTLS handshake failed, or the peer refused our certificate.
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    /// Something did not happen in time (dial, response, preface).
    #[error("timed out {0}")]
    Timeout(&'static str),
    /// The HTTP/2 layer failed (connection lost, protocol error).
    #[error("HTTP/2: {0}")]
    Http(#[source] Arc<hyper::Error>),
    /// Not HTTP/2 at all (server side: the client preface was wrong).
    #[error("not an HTTP/2 connection")]
    NotH2,
    /// 401/403: the destination's policy denied the connection.
    #[error("denied by the destination's policy ({status})")]
    Denied { status: StatusCode },
    /// 502/503/504: the destination's proxy could not reach the destination port.
    #[error("the destination refused or is unreachable ({status})")]
    UpstreamRefused { status: StatusCode },
    /// 400: the peer found the request malformed.
    #[error("the peer rejected the request as malformed ({status})")]
    BadRequest { status: StatusCode },
    /// Any other non-200 answer.
    #[error("the peer answered {status}")]
    Status { status: StatusCode },
    /// An I/O failure outside the handshakes.
    #[error("I/O: {0}")]
    Io(#[source] Arc<io::Error>),
    /// The dial this call waited on ended before it finished (its task was cancelled).
    #[error("the HBONE dial was cancelled")]
    Cancelled,
}

impl HboneError {
    /// The HTTP status the peer answered, for the status variants.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            HboneError::Denied { status }
            | HboneError::UpstreamRefused { status }
            | HboneError::BadRequest { status }
            | HboneError::Status { status } => Some(*status),
            _ => None,
        }
    }

    /// The typed error of a non-200 answer (None for 200).
    pub fn from_status(status: StatusCode) -> Option<HboneError> {
        match status.as_u16() {
            200 => None,
            400 => Some(HboneError::BadRequest { status }),
            401 | 403 => Some(HboneError::Denied { status }),
            502..=504 => Some(HboneError::UpstreamRefused { status }),
            _ => Some(HboneError::Status { status }),
        }
    }

    /// A short, stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            HboneError::Connect { .. } => "connect",
            HboneError::Tls(t) => t.reason(),
            HboneError::Timeout(_) => "timeout",
            HboneError::Http(_) => "http2",
            HboneError::NotH2 => "not_h2",
            HboneError::Denied { .. } => "denied",
            HboneError::UpstreamRefused { .. } => "upstream_refused",
            HboneError::BadRequest { .. } => "bad_request",
            HboneError::Status { .. } => "status",
            HboneError::Io(_) => "io",
            HboneError::Cancelled => "cancelled",
        }
    }

    /// A hyper error, classified: a TLS failure underneath (the server refused our
    /// certificate, which TLS 1.3 reports only after the client's handshake finished) comes out
    /// as [`HboneError::Tls`].
    pub(crate) fn from_hyper(e: hyper::Error) -> HboneError {
        match TlsError::find(&e) {
            Some(t) => HboneError::Tls(t),
            None => HboneError::Http(Arc::new(e)),
        }
    }
}
