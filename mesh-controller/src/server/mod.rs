//! The gRPC server: `NodeConfig` and `Ca` over TLS, on TCP and on a Unix socket alike (the
//! Unix socket is TLS too, so a node has one way to connect and always pins the root).

pub mod auth;
mod ca_service;
pub mod tls;
pub mod token_review;
mod watch;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use mesh_api::pb::{ca_server::CaServer, node_config_server::NodeConfigServer};
use mesh_api::TrustDomain;
use rcgen::SanType;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch as signal;
use tonic::transport::Server;

use self::auth::NodeAuthenticator;
use self::tls::{ServingCert, TlsError};
use crate::ca::Ca;
use crate::store::Store;

/// Largest request accepted: hellos, ACKs and CSRs are small; a larger one is refused with
/// OUT_OF_RANGE and only its own stream ends.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
const KEEPALIVE: Duration = Duration::from_secs(30);

/// What the services share.
pub struct Controller<A> {
    pub store: Arc<Store>,
    pub ca: Arc<Ca>,
    pub auth: A,
    pub trust_domain: TrustDomain,
    /// Set when shutting down, to end the watch streams (which never end on their own).
    stopping: signal::Sender<bool>,
}

impl<A> Controller<A> {
    pub fn new(store: Arc<Store>, ca: Arc<Ca>, auth: A, trust_domain: TrustDomain) -> Self {
        Controller {
            store,
            ca,
            auth,
            trust_domain,
            stopping: signal::Sender::new(false),
        }
    }
}

#[derive(Default)]
pub struct Listeners {
    pub tcp: Option<TcpListener>,
    pub unix: Option<UnixListener>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("serving: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves until `shutdown` completes. `names` are the SANs of the serving certificate,
/// which lives `cert_lifetime` and is renewed at half of it.
pub async fn serve<A: NodeAuthenticator>(
    ctl: Arc<Controller<A>>,
    listeners: Listeners,
    names: Vec<SanType>,
    cert_lifetime: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let acceptor = ServingCert::new(ctl.ca.clone(), names, cert_lifetime)?.acceptor()?;
    let stopping = ctl.stopping.clone();
    tokio::spawn(async move {
        shutdown.await;
        stopping.send_replace(true);
    });
    let stopped = |ctl: &Controller<A>| {
        let mut rx = ctl.stopping.subscribe();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let tcp = listeners.tcp.map(|l| {
        router(&ctl).serve_with_incoming_shutdown(tls::incoming(l, acceptor.clone()), stopped(&ctl))
    });
    let unix = listeners.unix.map(|l| {
        router(&ctl).serve_with_incoming_shutdown(tls::incoming(l, acceptor.clone()), stopped(&ctl))
    });
    let (tcp, unix) = tokio::join!(optional(tcp), optional(unix));
    tcp?;
    unix?;
    Ok(())
}

async fn optional<E>(serving: Option<impl Future<Output = Result<(), E>>>) -> Result<(), E> {
    match serving {
        Some(serving) => serving.await,
        None => Ok(()),
    }
}

fn router<A: NodeAuthenticator>(ctl: &Arc<Controller<A>>) -> tonic::transport::server::Router {
    let node_config = NodeConfigServer::new(watch::WatchService::new(ctl.clone()))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let ca =
        CaServer::new(ca_service::CaService::new(ctl.clone())).max_decoding_message_size(MAX_REQUEST_BYTES);
    Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE))
        .http2_keepalive_timeout(Some(KEEPALIVE))
        .add_service(node_config)
        .add_service(ca)
}
