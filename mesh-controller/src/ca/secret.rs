//! The root in a Kubernetes Secret (type `kubernetes.io/tls`: `tls.crt`, `tls.key` PKCS#8)
//! in the controller's namespace, and the trust bundle (the root certificate only) in a
//! ConfigMap the node agents mount.
//!
//! Create-if-absent: a replica that finds no Secret creates one; the API server admits one
//! create, so when two replicas race, the loser gets 409 Conflict (AlreadyExists) and reads
//! the winner's root. A Secret is never overwritten: one that lacks a key is an error for an
//! operator to resolve, since a new root would invalidate every certificate in the mesh.
//! An operator may also create the Secret beforehand with a root of their own
//! (`kubectl create secret tls mesh-ca --cert root.pem --key root.key`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};

use super::{CaError, RootPem, RootStore};
use crate::kubeapi::{status_code, ApiError};

const CERT_KEY: &str = "tls.crt";
const KEY_KEY: &str = "tls.key";
/// The key of the trust bundle ConfigMap that holds the root certificate(s), PEM.
pub const TRUST_BUNDLE_KEY: &str = "root.pem";

fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([("app.kubernetes.io/part-of".to_owned(), "mesh".to_owned())])
}

pub struct SecretRoot {
    api: Api<Secret>,
    namespace: String,
    name: String,
}

impl SecretRoot {
    pub fn new(client: Client, namespace: &str, name: &str) -> Self {
        SecretRoot {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    fn resource(&self) -> String {
        format!("secrets {}/{}", self.namespace, self.name)
    }

    fn parse(&self, secret: Secret) -> Result<RootPem, CaError> {
        let data = secret.data.unwrap_or_default();
        let text = |key: &'static str| {
            let bytes = data.get(key).ok_or_else(|| CaError::IncompleteSecret {
                location: self.location(),
                missing: key,
            })?;
            String::from_utf8(bytes.0.clone()).map_err(|_| CaError::InvalidRoot {
                location: self.location(),
                reason: format!("{key} is not PEM text"),
            })
        };
        Ok(RootPem {
            cert_pem: text(CERT_KEY)?,
            key_pem: text(KEY_KEY)?,
        })
    }
}

impl RootStore for SecretRoot {
    fn location(&self) -> String {
        format!("Secret {}/{}", self.namespace, self.name)
    }

    async fn load_or_store(
        &self,
        create: &(dyn Fn() -> Result<RootPem, CaError> + Sync),
    ) -> Result<(RootPem, bool), CaError> {
        let found = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| ApiError::new("get", self.resource(), e))?;
        if let Some(secret) = found {
            return Ok((self.parse(secret)?, false));
        }
        let root = create()?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(labels()),
                ..ObjectMeta::default()
            },
            type_: Some("kubernetes.io/tls".to_owned()),
            data: Some(BTreeMap::from([
                (
                    CERT_KEY.to_owned(),
                    ByteString(root.cert_pem.clone().into_bytes()),
                ),
                (KEY_KEY.to_owned(), ByteString(root.key_pem.clone().into_bytes())),
            ])),
            immutable: Some(true),
            ..Secret::default()
        };
        match self.api.create(&PostParams::default(), &secret).await {
            Ok(_) => Ok((root, true)),
            Err(e) if status_code(&e) == Some(409) => {
                tracing::info!(location = %self.location(), "another replica created the root first; using it");
                let winner = self
                    .api
                    .get(&self.name)
                    .await
                    .map_err(|e| ApiError::new("get", self.resource(), e))?;
                Ok((self.parse(winner)?, false))
            }
            Err(e) => Err(ApiError::new("create", self.resource(), e).into()),
        }
    }
}

/// Makes ConfigMap `namespace/name` hold exactly `root_pem` under [`TRUST_BUNDLE_KEY`]:
/// creates it when absent, patches it when it differs. Returns whether it changed anything.
/// Every replica may call this: they all publish the same root.
pub async fn publish_trust_bundle(
    client: Client,
    namespace: &str,
    name: &str,
    root_pem: &str,
) -> Result<bool, ApiError> {
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    let resource = format!("configmaps {namespace}/{name}");
    let data = BTreeMap::from([(TRUST_BUNDLE_KEY.to_owned(), root_pem.to_owned())]);
    let current = api
        .get_opt(name)
        .await
        .map_err(|e| ApiError::new("get", &resource, e))?;
    match current {
        Some(cm)
            if cm
                .data
                .as_ref()
                .and_then(|d| d.get(TRUST_BUNDLE_KEY))
                .map(String::as_str)
                == Some(root_pem) =>
        {
            Ok(false)
        }
        Some(_) => {
            let patch = serde_json::json!({ "data": data });
            api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(|e| ApiError::new("patch", &resource, e))?;
            Ok(true)
        }
        None => {
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    namespace: Some(namespace.to_owned()),
                    labels: Some(labels()),
                    ..ObjectMeta::default()
                },
                data: Some(data),
                ..ConfigMap::default()
            };
            match api.create(&PostParams::default(), &cm).await {
                Ok(_) => Ok(true),
                // Another replica published it a moment ago: the same root.
                Err(e) if status_code(&e) == Some(409) => Ok(false),
                Err(e) => Err(ApiError::new("create", &resource, e)),
            }
        }
    }
}
