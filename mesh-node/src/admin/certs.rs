//! `GET /v1/certs`: the certificates this node holds for its pods' identities.
use std::time::SystemTime;

use mesh_api::admin::CertInfo;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identity::CertStore;

pub fn list(store: &CertStore) -> Vec<CertInfo> {
    store
        .all()
        .values()
        .map(|svid| CertInfo {
            identity: svid.identity().to_string(),
            serial: svid.serial().to_owned(),
            issuer: svid
                .chain()
                .first()
                .and_then(|leaf| X509Certificate::from_der(leaf).ok())
                .map(|(_, c)| c.issuer().to_string())
                .unwrap_or_default(),
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

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}
