//! API objects → the cluster model, through the same object readers as the file source
//! ([`crate::sources::objects`]), so an object means the same from either source. Each
//! object converts on its own: one that does not convert is left out (and reported) without
//! touching the others.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::DynamicObject;
use kube::ResourceExt;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::cluster::{self, Invalid};
use crate::crd::AuthorizationPolicyStatus;
use crate::sources::objects::{EndpointSliceDoc, NamespaceDoc, PodDoc, PolicyRead, ServiceDoc};

fn decode<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, Invalid> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." { String::new() } else { field };
        Invalid::new(field, e.into_inner().to_string())
    })
}

fn reread<T: DeserializeOwned>(object: &impl Serialize) -> Result<T, Invalid> {
    let value = serde_json::to_value(object).map_err(|e| Invalid::new("", e.to_string()))?;
    decode(value)
}

pub fn namespace(ns: &Namespace) -> Result<Option<cluster::Namespace>, Invalid> {
    reread::<NamespaceDoc>(ns)?.into_namespace().map(Some)
}

/// `None` for pods the mesh leaves alone: host-network pods, and pods that have finished
/// (Succeeded or Failed), whose addresses the network may already have given to others.
pub fn pod(pod: &Pod) -> Result<Option<cluster::Pod>, Invalid> {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return Ok(None);
    }
    // Not scheduled or no address yet: normal for a while, not a problem worth a warning.
    let spec = pod.spec.as_ref();
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    let scheduled = spec
        .and_then(|s| s.node_name.as_deref())
        .is_some_and(|n| !n.is_empty());
    let addressed = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .is_some_and(|ip| !ip.is_empty());
    if !(host_network || scheduled && addressed) {
        return Ok(None);
    }
    reread::<PodDoc>(pod)?.into_pod()
}

pub fn service(svc: &Service) -> Result<Option<cluster::Service>, Invalid> {
    reread::<ServiceDoc>(svc)?.into_service().map(Some)
}

pub fn endpoint_slice(slice: &EndpointSlice) -> Result<Option<cluster::EndpointSlice>, Invalid> {
    // FQDN slices name hosts, not addresses: nothing a proxy can route to.
    if slice.address_type == "FQDN" {
        return Ok(None);
    }
    reread::<EndpointSliceDoc>(slice)?.into_slice().map(Some)
}

/// An `AuthorizationPolicy` as the API server holds it (untyped, so that one object that
/// does not fit the Rust type cannot stop the list of all the others).
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyObject {
    pub uid: Option<String>,
    pub generation: Option<i64>,
    /// What the nodes enforce: the policy, or its fail-closed stand-in.
    pub read: PolicyRead,
    /// The status as last written; `None` when absent or unreadable.
    pub status: Option<AuthorizationPolicyStatus>,
}

pub fn policy(object: &DynamicObject) -> PolicyObject {
    let doc = serde_json::json!({
        "metadata": {
            "name": object.name_any(),
            "namespace": object.namespace(),
        },
        "spec": object.data.get("spec").cloned().unwrap_or(serde_json::Value::Null),
    });
    let status = object
        .data
        .get("status")
        .and_then(|s| serde_json::from_value(s.clone()).ok());
    PolicyObject {
        uid: object.metadata.uid.clone(),
        generation: object.metadata.generation,
        read: PolicyRead::from_doc(doc),
        status,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_json(phase: &str, host_network: bool) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "u1", "labels": {"app": "web"}},
            "spec": {"nodeName": "node-a", "serviceAccountName": "web", "hostNetwork": host_network,
                     "containers": [{"name": "c"}]},
            "status": {"phase": phase, "podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}]},
        }))
        .unwrap()
    }

    #[test]
    fn pods() {
        let running = pod(&pod_json("Running", false)).unwrap().unwrap();
        assert_eq!((running.uid.as_str(), running.node.as_str()), ("u1", "node-a"));
        assert_eq!(running.service_account.as_deref(), Some("web"));
        assert_eq!(pod(&pod_json("Succeeded", false)), Ok(None));
        assert_eq!(pod(&pod_json("Failed", false)), Ok(None));
        assert_eq!(pod(&pod_json("Running", true)), Ok(None));
        let mut pending = pod_json("Pending", false);
        pending.status.as_mut().unwrap().pod_ip = None;
        pending.status.as_mut().unwrap().pod_ips = None;
        assert_eq!(pod(&pending), Ok(None));
    }

    #[test]
    fn policies_convert_whole_or_not_at_all() {
        let object = |spec: serde_json::Value| -> DynamicObject {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "mesh.dev/v1alpha1", "kind": "AuthorizationPolicy",
                "metadata": {"name": "p", "namespace": "shop", "uid": "pu", "generation": 3},
                "spec": spec,
                "status": {"observedGeneration": 2, "conditions": []},
            }))
            .unwrap()
        };
        let good = policy(&object(serde_json::json!({
            "action": "DENY",
            "rules": [{"from": [{"source": {"namespaces": ["ops"]}}], "to": [{"operation": {"ports": ["8080"]}}]}],
        })));
        assert_eq!(good.generation, Some(3));
        assert_eq!(good.status.unwrap().observed_generation, Some(2));
        assert_eq!(good.read.invalid, None);
        let p = good.read.enforced;
        assert_eq!(p.action, mesh_api::Action::Deny);
        assert_eq!(p.rules[0].to[0].ports, [8080]);

        let bad = policy(&object(serde_json::json!({
            "rules": [{"to": [{"operation": {"ports": ["8080", "70000"]}}]}],
        })));
        let err = bad.read.invalid.unwrap();
        assert_eq!(err.field, "spec.rules[0].to[0].operation.ports[1]");
        let unknown = policy(&object(serde_json::json!({"rules": [{"when": []}]})))
            .read
            .invalid
            .unwrap();
        assert_eq!(unknown.field, "spec.rules[0].when");
    }
}
