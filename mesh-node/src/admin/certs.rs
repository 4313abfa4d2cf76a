//! `GET /v1/certs`: the certificates this node holds for its pods' identities.
use std::time::SystemTime;

use serde::Serialize;

use crate::identity::CertStore;

#[derive(Serialize)]
pub struct CertInfo {
    identity: String,
    serial: String,
    not_before: String,
    not_after: String,
    /// The chain, leaf first, in PEM.
    chain_pem: String,
}

pub fn list(store: &CertStore) -> Vec<CertInfo> {
    store
        .all()
        .values()
        .map(|svid| CertInfo {
            identity: svid.identity().to_string(),
            serial: svid.serial().to_owned(),
            not_before: rfc3339(svid.not_before()),
            not_after: rfc3339(svid.not_after()),
            chain_pem: svid
                .chain()
                .iter()
                .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec())))
                .collect(),
        })
        .collect()
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}
