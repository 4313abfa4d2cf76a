//! The objects a node is told about: workloads (pods), services and authorization policies.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use crate::identity::Identity;

pub type Labels = BTreeMap<String, String>;

/// `namespace/name`, the key of services and policies.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamespacedName {
    pub namespace: String,
    pub name: String,
}

impl NamespacedName {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        NamespacedName {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for NamespacedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Whether an enrolled workload also accepts plaintext (DESIGN.md §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MtlsMode {
    Strict,
    Permissive,
}

/// A pod. `uid` is the pod UID, which is also how the node finds the pod's cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub service_account: String,
    pub identity: Identity,
    pub ips: Vec<IpAddr>,
    pub enrolled: bool,
    pub mtls_mode: MtlsMode,
    pub labels: Labels,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub port: u16,
    /// The port on the endpoints, resolved when the Service named it.
    pub target_port: u16,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The pod behind the endpoint, when it is one.
    pub workload_uid: Option<String>,
    pub ip: IpAddr,
    /// The port on the endpoint.
    pub port: u16,
    pub ready: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
}

impl Service {
    pub fn key(&self) -> NamespacedName {
        NamespacedName::new(&self.namespace, &self.name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    Allow,
    Deny,
}

/// A mesh `AuthorizationPolicy` (DESIGN.md §7), with Istio's semantics: a rule matches
/// when one of its `from` entries and one of its `to` entries match, an empty list
/// matching anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    /// Labels a workload must carry; empty selects the whole namespace.
    pub selector: Labels,
    pub action: Action,
    pub rules: Vec<Rule>,
}

impl Policy {
    pub fn key(&self) -> NamespacedName {
        NamespacedName::new(&self.namespace, &self.name)
    }

    /// Whether this policy applies to a workload with these namespace and labels.
    pub fn selects(&self, namespace: &str, labels: &Labels) -> bool {
        self.namespace == namespace && self.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
}

/// Within one source, every non-empty list must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Source {
    pub principals: Vec<Identity>,
    pub namespaces: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Operation {
    pub ports: Vec<u16>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn policy_selection() {
        let policy = |selector| Policy {
            namespace: "shop".into(),
            name: "p".into(),
            selector,
            action: Action::Allow,
            rules: vec![],
        };
        let web = labels(&[("app", "web"), ("tier", "front")]);
        let cases = [
            (policy(Labels::new()), "shop", &web, true),
            (policy(labels(&[("app", "web")])), "shop", &web, true),
            (policy(labels(&[("app", "web")])), "other", &web, false),
            (policy(labels(&[("app", "cart")])), "shop", &web, false),
            (policy(labels(&[("app", "web"), ("x", "y")])), "shop", &web, false),
        ];
        for (i, (p, ns, l, want)) in cases.into_iter().enumerate() {
            assert_eq!(p.selects(ns, l), want, "case {i}");
        }
    }
}
