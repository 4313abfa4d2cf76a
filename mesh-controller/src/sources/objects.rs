//! The Kubernetes objects the sources read, with only the fields the mesh uses (serde
//! ignores the rest), and their conversion to the cluster model. Both sources go through
//! these: the file source from YAML, the Kubernetes source from the API's JSON, so an object
//! means the same wherever it comes from. Every refusal names the field at fault.

use std::net::IpAddr;

use mesh_api::Policy;
use mesh_api::{Identity, Labels, Protocol, TrustDomain};
use serde::Deserialize;

pub use crate::cluster::Invalid;
use crate::cluster::{
    EndpointPort, EndpointSlice, Namespace, Pod, Service, ServicePort, SliceEndpoint, TargetPort,
};
use crate::crd::{self, AuthorizationPolicySpec};

fn invalid(field: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid::new(field, message)
}

#[derive(Deserialize)]
pub struct Metadata {
    #[serde(default)]
    pub name: String,
    pub namespace: Option<String>,
    pub uid: Option<String>,
    #[serde(default)]
    pub labels: Labels,
}

impl Metadata {
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }

    /// Names become SPIFFE path segments and map keys: they must be non-empty and plain.
    pub(crate) fn check(&self, namespaced: bool) -> Result<(), Invalid> {
        check_segment("metadata.name", &self.name)?;
        if namespaced {
            check_segment("metadata.namespace", self.namespace())?;
        }
        Ok(())
    }
}

fn check_segment(field: &str, value: &str) -> Result<(), Invalid> {
    Identity::new(TrustDomain::default(), value, "x")
        .map(drop)
        .map_err(|e| invalid(field, e.to_string()))
}

fn protocol(field: &str, value: Option<&str>) -> Result<Protocol, Invalid> {
    match value {
        None | Some("TCP") => Ok(Protocol::Tcp),
        Some("UDP") => Ok(Protocol::Udp),
        Some("SCTP") => Ok(Protocol::Sctp),
        Some(other) => Err(invalid(
            field,
            format!("protocol {other:?} is not TCP, UDP or SCTP"),
        )),
    }
}

fn port(field: &str, value: u16) -> Result<u16, Invalid> {
    if value == 0 {
        return Err(invalid(field, "port 0"));
    }
    Ok(value)
}

#[derive(Deserialize)]
pub struct NamespaceDoc {
    metadata: Metadata,
}

impl NamespaceDoc {
    pub fn into_namespace(self) -> Result<Namespace, Invalid> {
        self.metadata.check(false)?;
        Ok(Namespace {
            name: self.metadata.name,
            labels: self.metadata.labels,
        })
    }
}

#[derive(Deserialize)]
pub struct PodDoc {
    pub metadata: Metadata,
    #[serde(default)]
    spec: PodSpec,
    #[serde(default)]
    status: PodStatus,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PodSpec {
    node_name: Option<String>,
    service_account_name: Option<String>,
    #[serde(default)]
    host_network: bool,
}

#[derive(Default, Deserialize)]
struct PodStatus {
    #[serde(rename = "podIP")]
    pod_ip: Option<IpAddr>,
    #[serde(rename = "podIPs", default)]
    pod_ips: Vec<PodIp>,
}

#[derive(Deserialize)]
struct PodIp {
    ip: IpAddr,
}

impl PodDoc {
    /// `Ok(None)` for a host-network pod: it has the node's address, not one of its own, so
    /// the mesh cannot tell its traffic apart and leaves it alone.
    pub fn into_pod(self) -> Result<Option<Pod>, Invalid> {
        let PodDoc {
            metadata,
            spec,
            status,
        } = self;
        metadata.check(true)?;
        if spec.host_network {
            return Ok(None);
        }
        let uid = metadata.uid.clone().filter(|u| !u.is_empty());
        let uid = uid.ok_or_else(|| invalid("metadata.uid", "missing"))?;
        let node = spec.node_name.filter(|n| !n.is_empty());
        let node = node.ok_or_else(|| invalid("spec.nodeName", "missing: the pod is not scheduled"))?;
        if let Some(sa) = &spec.service_account_name {
            check_segment("spec.serviceAccountName", sa)?;
        }
        let mut ips: Vec<IpAddr> = status.pod_ips.iter().map(|p| p.ip).collect();
        if ips.is_empty() {
            ips.extend(status.pod_ip);
        }
        if ips.is_empty() {
            return Err(invalid("status.podIP", "missing: the pod has no address yet"));
        }
        Ok(Some(Pod {
            uid,
            namespace: metadata.namespace().to_owned(),
            name: metadata.name,
            node,
            service_account: spec.service_account_name,
            ips,
            labels: metadata.labels,
        }))
    }
}

#[derive(Deserialize)]
pub struct ServiceDoc {
    metadata: Metadata,
    #[serde(default)]
    spec: ServiceSpec,
}

#[derive(Default, Deserialize)]
struct ServiceSpec {
    #[serde(rename = "clusterIP")]
    cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs", default)]
    cluster_ips: Vec<String>,
    #[serde(default)]
    ports: Vec<ServicePortDoc>,
    selector: Option<Labels>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServicePortDoc {
    name: Option<String>,
    port: u16,
    target_port: Option<IntOrString>,
    protocol: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum IntOrString {
    Int(u16),
    String(String),
}

impl ServiceDoc {
    pub fn into_service(self) -> Result<Service, Invalid> {
        let ServiceDoc { metadata, spec } = self;
        metadata.check(true)?;
        let (field, listed) = if spec.cluster_ips.is_empty() {
            ("spec.clusterIP", spec.cluster_ip.into_iter().collect())
        } else {
            ("spec.clusterIPs", spec.cluster_ips)
        };
        let mut cluster_ips = Vec::new();
        // "None" marks a headless service; "" one whose address is not allocated yet.
        for (i, ip) in listed
            .iter()
            .enumerate()
            .filter(|(_, ip)| !ip.is_empty() && *ip != "None")
        {
            let ip = ip
                .parse()
                .map_err(|_| invalid(format!("{field}[{i}]"), format!("{ip:?} is not an IP")))?;
            cluster_ips.push(ip);
        }
        let mut ports = Vec::new();
        for (i, p) in spec.ports.into_iter().enumerate() {
            let at = |f: &str| format!("spec.ports[{i}].{f}");
            let target_port = match p.target_port {
                None => TargetPort::Number(p.port),
                Some(IntOrString::Int(n)) => TargetPort::Number(port(&at("targetPort"), n)?),
                Some(IntOrString::String(name)) => TargetPort::Name(name),
            };
            ports.push(ServicePort {
                name: p.name,
                port: port(&at("port"), p.port)?,
                target_port,
                protocol: protocol(&at("protocol"), p.protocol.as_deref())?,
            });
        }
        Ok(Service {
            namespace: metadata.namespace().to_owned(),
            name: metadata.name,
            cluster_ips,
            ports,
            selector: spec.selector,
        })
    }
}

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSliceDoc {
    metadata: Metadata,
    address_type: String,
    #[serde(default)]
    ports: Vec<EndpointPortDoc>,
    #[serde(default)]
    endpoints: Vec<EndpointDoc>,
}

#[derive(Deserialize)]
struct EndpointPortDoc {
    name: Option<String>,
    port: Option<u16>,
    protocol: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EndpointDoc {
    addresses: Vec<IpAddr>,
    #[serde(default)]
    conditions: Conditions,
    target_ref: Option<TargetRef>,
}

#[derive(Default, Deserialize)]
struct Conditions {
    ready: Option<bool>,
}

#[derive(Deserialize)]
struct TargetRef {
    kind: Option<String>,
    uid: Option<String>,
}

impl EndpointSliceDoc {
    pub fn into_slice(self) -> Result<EndpointSlice, Invalid> {
        let EndpointSliceDoc {
            metadata,
            address_type,
            ports,
            endpoints,
        } = self;
        metadata.check(true)?;
        if address_type != "IPv4" && address_type != "IPv6" {
            return Err(invalid(
                "addressType",
                format!("{address_type:?} is not IPv4 or IPv6"),
            ));
        }
        let service = metadata.labels.get(SERVICE_NAME_LABEL).cloned();
        let service =
            service.ok_or_else(|| invalid(format!("metadata.labels.{SERVICE_NAME_LABEL}"), "missing"))?;
        let mut slice_ports = Vec::new();
        for (i, p) in ports.into_iter().enumerate() {
            // A port without a number means "all ports", which a proxy cannot route by.
            let Some(number) = p.port else { continue };
            slice_ports.push(EndpointPort {
                name: p.name,
                port: port(&format!("ports[{i}].port"), number)?,
                protocol: protocol(&format!("ports[{i}].protocol"), p.protocol.as_deref())?,
            });
        }
        let endpoints = endpoints
            .into_iter()
            .map(|e| SliceEndpoint {
                addresses: e.addresses,
                // Kubernetes: an unknown readiness is to be taken as ready.
                ready: e.conditions.ready.unwrap_or(true),
                pod_uid: e
                    .target_ref
                    .filter(|t| t.kind.as_deref() == Some("Pod"))
                    .and_then(|t| t.uid),
            })
            .collect();
        Ok(EndpointSlice {
            namespace: metadata.namespace().to_owned(),
            name: metadata.name,
            service,
            ports: slice_ports,
            endpoints,
        })
    }
}

/// `mesh.dev/v1alpha1` AuthorizationPolicy: the spec is the CRD's own type.
#[derive(Deserialize)]
pub struct AuthorizationPolicyDoc {
    metadata: Metadata,
    #[serde(default)]
    spec: AuthorizationPolicySpec,
}

impl AuthorizationPolicyDoc {
    pub fn into_policy(self) -> Result<Policy, Invalid> {
        self.metadata.check(true)?;
        crd::to_policy(self.metadata.namespace(), &self.metadata.name, &self.spec)
    }
}

/// One AuthorizationPolicy as read: the policy the nodes enforce, and, when that is not the
/// policy as written because it does not convert, why. A policy that does not convert is
/// never left out (leaving a DENY out would open what it closes): its fail-closed stand-in
/// ([`crd::fail_closed`]) takes its place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRead {
    pub enforced: Policy,
    pub invalid: Option<Invalid>,
}

impl PolicyRead {
    /// `doc` is the whole object as either source holds it (at least metadata and spec).
    pub fn from_doc(doc: serde_json::Value) -> PolicyRead {
        let text = |v: Option<&serde_json::Value>| v.and_then(serde_json::Value::as_str).map(str::to_owned);
        let metadata = doc.get("metadata");
        let namespace =
            text(metadata.and_then(|m| m.get("namespace"))).unwrap_or_else(|| "default".to_owned());
        let name = text(metadata.and_then(|m| m.get("name"))).unwrap_or_default();
        let spec = doc.get("spec").cloned().unwrap_or(serde_json::Value::Null);
        let converted = serde_path_to_error::deserialize::<_, AuthorizationPolicyDoc>(doc)
            .map_err(|e| {
                let field = e.path().to_string();
                // The path of an error at the top is ".", which says nothing.
                let field = if field == "." { String::new() } else { field };
                invalid(field, e.into_inner().to_string())
            })
            .and_then(AuthorizationPolicyDoc::into_policy);
        match converted {
            Ok(policy) => PolicyRead {
                enforced: policy,
                invalid: None,
            },
            Err(why) => PolicyRead::refused(&namespace, &name, &spec, why),
        }
    }

    /// A policy known to be one, but unreadable as a whole: the stand-in from what can be
    /// read of `spec`.
    pub fn refused(namespace: &str, name: &str, spec: &serde_json::Value, why: Invalid) -> PolicyRead {
        PolicyRead {
            enforced: crd::fail_closed(namespace, name, spec),
            invalid: Some(why),
        }
    }

    /// What the nodes enforce instead of the policy as written, when they do.
    pub fn effect(&self) -> Option<&'static str> {
        self.invalid
            .as_ref()
            .map(|_| crd::fail_closed_effect(&self.enforced))
    }
}
