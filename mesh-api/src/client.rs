//! Connecting to the controller: TLS pinned to the mesh root, node credentials on every call.

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

use crate::pb;

/// Request metadata naming the node that calls.
pub const NODE_HEADER: &str = "x-mesh-node";
/// The DNS name the controller's serving certificate always carries.
pub const SERVER_NAME: &str = "mesh-controller";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("node name or token is not valid in request metadata")]
    Metadata,
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}

/// Where the controller listens.
#[derive(Debug, Clone)]
pub enum Target {
    /// `host:port`.
    Tcp(String),
    Unix(PathBuf),
}

/// Opens a TLS channel that trusts only `root_pem` and expects [`SERVER_NAME`].
pub async fn connect(target: &Target, root_pem: &[u8]) -> Result<Channel, ClientError> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(root_pem))
        .domain_name(SERVER_NAME);
    let channel = match target {
        Target::Tcp(addr) => {
            Endpoint::from_shared(format!("https://{addr}"))?
                .tls_config(tls)?
                .connect()
                .await?
        }
        Target::Unix(path) => {
            let path = path.clone();
            // The authority is only a placeholder: the connector below decides where to go.
            Endpoint::from_static("https://mesh-controller")
                .tls_config(tls)?
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move { tokio::net::UnixStream::connect(path).await.map(TokioIo::new) }
                }))
                .await?
        }
    };
    Ok(channel)
}

/// Adds `authorization: Bearer <token>` and `x-mesh-node: <node>` to every request.
#[derive(Clone)]
pub struct NodeCredentials {
    node: AsciiMetadataValue,
    authorization: AsciiMetadataValue,
}

impl NodeCredentials {
    pub fn new(node: &str, token: &str) -> Result<Self, ClientError> {
        Ok(NodeCredentials {
            node: node.parse().map_err(|_| ClientError::Metadata)?,
            authorization: format!("Bearer {token}")
                .parse()
                .map_err(|_| ClientError::Metadata)?,
        })
    }

    fn apply(&self, metadata: &mut MetadataMap) {
        metadata.insert(NODE_HEADER, self.node.clone());
        metadata.insert("authorization", self.authorization.clone());
    }
}

impl tonic::service::Interceptor for NodeCredentials {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        self.apply(request.metadata_mut());
        Ok(request)
    }
}

pub type NodeConfigClient =
    pb::node_config_client::NodeConfigClient<InterceptedService<Channel, NodeCredentials>>;
pub type CaClient = pb::ca_client::CaClient<InterceptedService<Channel, NodeCredentials>>;

pub fn node_config_client(channel: Channel, credentials: NodeCredentials) -> NodeConfigClient {
    pb::node_config_client::NodeConfigClient::with_interceptor(channel, credentials)
}

pub fn ca_client(channel: Channel, credentials: NodeCredentials) -> CaClient {
    pb::ca_client::CaClient::with_interceptor(channel, credentials)
}
