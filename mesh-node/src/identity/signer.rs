//! Who signs CSRs: the controller's `Ca.Sign` in production, anything else in tests.
use std::future::Future;
use std::time::Duration;

use mesh_api::client::ca_client;
use mesh_api::{pb, Identity};
use tokio::sync::Mutex;
use tonic::transport::Channel;
use tonic::Code;

use crate::control::{ControlError, ControllerEndpoint};

/// Why a signing request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    /// The CA could not be reached or did not answer in time; worth retrying.
    #[error("CA unreachable: {0}")]
    Unavailable(String),
    /// The node's credentials were refused; retrying helps only once they are fixed.
    #[error("the CA refused this node's credentials (Unauthenticated): {0}")]
    Unauthenticated(String),
    /// The CA will not sign this (identity not on this node, bad CSR).
    #[error("the CA refused to sign: {0}")]
    Refused(String),
    #[error("{0}")]
    Other(String),
}

/// Signs a CSR (PKCS#10 DER) for `identity`, returning the chain as PEM, leaf first.
pub trait Signer: Send + Sync + 'static {
    fn sign(
        &self,
        identity: &Identity,
        csr: Vec<u8>,
    ) -> impl Future<Output = Result<Vec<String>, SignError>> + Send;
}

/// Bound on one `Ca.Sign` call.
const SIGN_TIMEOUT: Duration = Duration::from_secs(10);

/// `Ca.Sign` on the controller, over a channel opened on first use and re-opened after a
/// transport failure; the token file is read at every call.
pub struct CaSigner {
    endpoint: ControllerEndpoint,
    channel: Mutex<Option<Channel>>,
}

impl CaSigner {
    pub fn new(endpoint: ControllerEndpoint) -> Self {
        CaSigner {
            endpoint,
            channel: Mutex::new(None),
        }
    }

    async fn channel(&self) -> Result<Channel, SignError> {
        let mut cached = self.channel.lock().await;
        if let Some(channel) = cached.as_ref() {
            return Ok(channel.clone());
        }
        let channel = self.endpoint.connect().await.map_err(from_control)?;
        *cached = Some(channel.clone());
        Ok(channel)
    }
}

fn from_control(e: ControlError) -> SignError {
    match e {
        ControlError::Unauthenticated(m) => SignError::Unauthenticated(m),
        ControlError::PermissionDenied(m) => SignError::Refused(m),
        e @ (ControlError::CaFile { .. } | ControlError::TokenFile { .. }) => SignError::Other(e.to_string()),
        e => SignError::Unavailable(e.to_string()),
    }
}

impl Signer for CaSigner {
    async fn sign(&self, identity: &Identity, csr: Vec<u8>) -> Result<Vec<String>, SignError> {
        let channel = self.channel().await?;
        let credentials = self.endpoint.credentials().await.map_err(from_control)?;
        let mut client = ca_client(channel, credentials);
        let mut request = tonic::Request::new(pb::SignRequest {
            csr,
            identity: identity.to_string(),
        });
        request.set_timeout(SIGN_TIMEOUT);
        match client.sign(request).await {
            Ok(response) => Ok(response.into_inner().cert_chain),
            Err(status) => {
                let message = status.message().to_owned();
                Err(match status.code() {
                    Code::Unauthenticated => SignError::Unauthenticated(message),
                    Code::PermissionDenied | Code::InvalidArgument => SignError::Refused(message),
                    Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled => {
                        // Maybe a dead connection: open a new one next time.
                        *self.channel.lock().await = None;
                        SignError::Unavailable(format!("{:?}: {message}", status.code()))
                    }
                    code => SignError::Other(format!("{code:?}: {message}")),
                })
            }
        }
    }
}
