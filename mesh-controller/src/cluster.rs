//! Cluster state as sources report it: the few fields of Kubernetes objects the mesh reads.
//! Sources validate names and addresses; `translate` gives the objects their mesh meaning.

use std::collections::BTreeMap;
use std::net::IpAddr;

use mesh_api::{Labels, NamespacedName, Policy, Protocol};

/// Every object the controller knows, keyed like the Kubernetes API keys them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterState {
    pub namespaces: BTreeMap<String, Namespace>,
    /// By pod UID.
    pub pods: BTreeMap<String, Pod>,
    pub services: BTreeMap<NamespacedName, Service>,
    pub endpoint_slices: BTreeMap<NamespacedName, EndpointSlice>,
    /// `AuthorizationPolicy` objects, already in their mesh form.
    pub policies: BTreeMap<NamespacedName, Policy>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

/// A pod that is scheduled and has an address (sources drop the others).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub node: String,
    /// `spec.serviceAccountName`; Kubernetes means `default` when it is absent.
    pub service_account: Option<String>,
    pub ips: Vec<IpAddr>,
    pub labels: Labels,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// Empty for a headless service.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// `None` when the service's endpoints are managed by hand (no selector).
    pub selector: Option<Labels>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub target_port: TargetPort,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    /// A container port name, resolved through the EndpointSlices.
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSlice {
    pub namespace: String,
    pub name: String,
    /// The `kubernetes.io/service-name` label.
    pub service: String,
    pub ports: Vec<EndpointPort>,
    pub endpoints: Vec<SliceEndpoint>,
}

/// Named like the service port it serves, carrying the resolved number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointPort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub addresses: Vec<IpAddr>,
    pub ready: bool,
    /// UID of the pod behind the endpoint (`targetRef`), when it is a pod.
    pub pod_uid: Option<String>,
}

/// A field that keeps an object out of the cluster state, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// Such as `spec.ports[0].port`; empty when the object as a whole is at fault.
    pub field: String,
    pub message: String,
}

impl Invalid {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}
