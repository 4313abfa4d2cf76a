//! `Ca.Sign`: certificates for the identities of pods scheduled on the calling node.

use std::sync::Arc;

use mesh_api::pb::{self, ca_server};
use mesh_api::Identity;
use tonic::{Request, Response, Status};

use super::auth::{authenticate, NodeAuthenticator};
use super::Controller;
use crate::ca::csr;
use crate::translate;

pub struct CaService<A> {
    ctl: Arc<Controller<A>>,
}

impl<A> CaService<A> {
    pub fn new(ctl: Arc<Controller<A>>) -> Self {
        CaService { ctl }
    }
}

#[tonic::async_trait]
impl<A: NodeAuthenticator> ca_server::Ca for CaService<A> {
    async fn sign(&self, request: Request<pb::SignRequest>) -> Result<Response<pb::SignResponse>, Status> {
        let ctl = &self.ctl;
        let node = authenticate(&ctl.auth, request.metadata(), "Ca.Sign").await?;
        let request = request.into_inner();
        let identity: Identity = request.identity.parse().map_err(|e| {
            tracing::warn!(%node, identity = %request.identity, reason = %e, "refused to sign");
            Status::invalid_argument(format!("identity: {e}"))
        })?;
        let Some(generation) = ctl.store.latest() else {
            return Err(Status::unavailable(
                "the controller has not loaded the cluster yet",
            ));
        };
        let allowed = translate::local_identities(&generation.state, &node, &ctl.trust_domain);
        let decision = csr::inspect(&request.csr).and_then(|info| {
            csr::decide(&node, &identity, &ctl.trust_domain, &allowed, &info).map(|()| info)
        });
        let info = decision.map_err(|refusal| {
            tracing::warn!(%node, %identity, reason = %refusal, "refused to sign");
            if refusal.is_permission() {
                Status::permission_denied(refusal.to_string())
            } else {
                Status::invalid_argument(refusal.to_string())
            }
        })?;
        let cert_chain = ctl.ca.sign(&identity, &info).map_err(|e| {
            tracing::error!(%node, %identity, error = %e, "signing failed");
            Status::internal("signing failed")
        })?;
        tracing::info!(%node, %identity, "signed a certificate");
        Ok(Response::new(pb::SignResponse { cert_chain }))
    }
}
