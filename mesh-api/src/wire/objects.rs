//! Workload, Service and Policy to and from their protobuf messages.

use super::{each, each_leaf, ip, ip_bytes, non_empty, port, WireError};
use crate::identity::Identity;
use crate::objects::*;
use crate::pb;

impl From<MtlsMode> for pb::MtlsMode {
    fn from(mode: MtlsMode) -> Self {
        match mode {
            MtlsMode::Strict => pb::MtlsMode::Strict,
            MtlsMode::Permissive => pb::MtlsMode::Permissive,
        }
    }
}

fn mtls_mode(field: &str, value: i32) -> Result<MtlsMode, WireError> {
    match pb::MtlsMode::try_from(value) {
        Ok(pb::MtlsMode::Strict) => Ok(MtlsMode::Strict),
        Ok(pb::MtlsMode::Permissive) => Ok(MtlsMode::Permissive),
        _ => Err(WireError::new(
            field,
            format!("{value} is not STRICT or PERMISSIVE"),
        )),
    }
}

impl From<Protocol> for pb::Protocol {
    fn from(protocol: Protocol) -> Self {
        match protocol {
            Protocol::Tcp => pb::Protocol::Tcp,
            Protocol::Udp => pb::Protocol::Udp,
            Protocol::Sctp => pb::Protocol::Sctp,
        }
    }
}

fn protocol(field: &str, value: i32) -> Result<Protocol, WireError> {
    match pb::Protocol::try_from(value) {
        Ok(pb::Protocol::Tcp) => Ok(Protocol::Tcp),
        Ok(pb::Protocol::Udp) => Ok(Protocol::Udp),
        Ok(pb::Protocol::Sctp) => Ok(Protocol::Sctp),
        _ => Err(WireError::new(field, format!("{value} is not TCP, UDP or SCTP"))),
    }
}

impl From<Action> for pb::Action {
    fn from(action: Action) -> Self {
        match action {
            Action::Allow => pb::Action::Allow,
            Action::Deny => pb::Action::Deny,
        }
    }
}

fn action(field: &str, value: i32) -> Result<Action, WireError> {
    match pb::Action::try_from(value) {
        Ok(pb::Action::Allow) => Ok(Action::Allow),
        Ok(pb::Action::Deny) => Ok(Action::Deny),
        _ => Err(WireError::new(field, format!("{value} is not ALLOW or DENY"))),
    }
}

fn identity(field: &str, value: &str) -> Result<Identity, WireError> {
    value.parse().map_err(|e| WireError::new(field, e))
}

impl From<NamespacedName> for pb::NamespacedName {
    fn from(key: NamespacedName) -> Self {
        pb::NamespacedName {
            namespace: key.namespace,
            name: key.name,
        }
    }
}

impl TryFrom<pb::NamespacedName> for NamespacedName {
    type Error = WireError;

    fn try_from(key: pb::NamespacedName) -> Result<Self, WireError> {
        Ok(NamespacedName {
            namespace: non_empty("namespace", key.namespace)?,
            name: non_empty("name", key.name)?,
        })
    }
}

impl From<Workload> for pb::Workload {
    fn from(w: Workload) -> Self {
        pb::Workload {
            uid: w.uid,
            name: w.name,
            namespace: w.namespace,
            node: w.node,
            service_account: w.service_account,
            identity: w.identity.to_string(),
            ips: w.ips.into_iter().map(ip_bytes).collect(),
            enrolled: w.enrolled,
            mtls_mode: pb::MtlsMode::from(w.mtls_mode).into(),
            labels: w.labels.into_iter().collect(),
        }
    }
}

impl TryFrom<pb::Workload> for Workload {
    type Error = WireError;

    fn try_from(w: pb::Workload) -> Result<Self, WireError> {
        let namespace = non_empty("namespace", w.namespace)?;
        let service_account = non_empty("service_account", w.service_account)?;
        let identity = identity("identity", &w.identity)?;
        if identity.namespace() != namespace || identity.service_account() != service_account {
            return Err(WireError::new(
                "identity",
                format!("{identity} is not service account {namespace}/{service_account}"),
            ));
        }
        let ips = each_leaf("ips", w.ips, |f, b| ip(f, &b))?;
        if ips.is_empty() {
            return Err(WireError::new("ips", "empty"));
        }
        Ok(Workload {
            uid: non_empty("uid", w.uid)?,
            name: non_empty("name", w.name)?,
            namespace,
            node: non_empty("node", w.node)?,
            service_account,
            identity,
            ips,
            enrolled: w.enrolled,
            mtls_mode: mtls_mode("mtls_mode", w.mtls_mode)?,
            labels: w.labels.into_iter().collect(),
        })
    }
}

impl From<Service> for pb::Service {
    fn from(s: Service) -> Self {
        pb::Service {
            namespace: s.namespace,
            name: s.name,
            vips: s.vips.into_iter().map(ip_bytes).collect(),
            ports: s
                .ports
                .into_iter()
                .map(|p| pb::ServicePort {
                    port: p.port.into(),
                    target_port: p.target_port.into(),
                    protocol: pb::Protocol::from(p.protocol).into(),
                })
                .collect(),
            endpoints: s
                .endpoints
                .into_iter()
                .map(|e| pb::Endpoint {
                    workload_uid: e.workload_uid.unwrap_or_default(),
                    ip: ip_bytes(e.ip),
                    port: e.port.into(),
                    ready: e.ready,
                })
                .collect(),
        }
    }
}

impl TryFrom<pb::Service> for Service {
    type Error = WireError;

    fn try_from(s: pb::Service) -> Result<Self, WireError> {
        Ok(Service {
            namespace: non_empty("namespace", s.namespace)?,
            name: non_empty("name", s.name)?,
            vips: each_leaf("vips", s.vips, |f, b| ip(f, &b))?,
            ports: each("ports", s.ports, |p| {
                Ok(ServicePort {
                    port: port("port", p.port)?,
                    target_port: port("target_port", p.target_port)?,
                    protocol: protocol("protocol", p.protocol)?,
                })
            })?,
            endpoints: each("endpoints", s.endpoints, |e| {
                Ok(Endpoint {
                    workload_uid: Some(e.workload_uid).filter(|uid| !uid.is_empty()),
                    ip: ip("ip", &e.ip)?,
                    port: port("port", e.port)?,
                    ready: e.ready,
                })
            })?,
        })
    }
}

impl From<Policy> for pb::Policy {
    fn from(p: Policy) -> Self {
        pb::Policy {
            namespace: p.namespace,
            name: p.name,
            selector: p.selector.into_iter().collect(),
            action: pb::Action::from(p.action).into(),
            rules: p
                .rules
                .into_iter()
                .map(|r| pb::Rule {
                    from: r
                        .from
                        .into_iter()
                        .map(|s| pb::Source {
                            principals: s.principals.iter().map(ToString::to_string).collect(),
                            namespaces: s.namespaces,
                        })
                        .collect(),
                    to: r
                        .to
                        .into_iter()
                        .map(|o| pb::Operation {
                            ports: o.ports.into_iter().map(u32::from).collect(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

impl TryFrom<pb::Policy> for Policy {
    type Error = WireError;

    fn try_from(p: pb::Policy) -> Result<Self, WireError> {
        Ok(Policy {
            namespace: non_empty("namespace", p.namespace)?,
            name: non_empty("name", p.name)?,
            selector: p.selector.into_iter().collect(),
            action: action("action", p.action)?,
            rules: each("rules", p.rules, |r| {
                Ok(Rule {
                    from: each("from", r.from, |s| {
                        Ok(Source {
                            principals: each_leaf("principals", s.principals, |f, v| identity(f, &v))?,
                            namespaces: each_leaf("namespaces", s.namespaces, non_empty)?,
                        })
                    })?,
                    to: each("to", r.to, |o| {
                        Ok(Operation {
                            ports: each_leaf("ports", o.ports, port)?,
                        })
                    })?,
                })
            })?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{policy, service, workload};

    #[test]
    fn objects_round_trip() {
        let w = workload("uid-1", "node-a");
        assert_eq!(Workload::try_from(pb::Workload::from(w.clone())), Ok(w));
        let s = service();
        assert_eq!(Service::try_from(pb::Service::from(s.clone())), Ok(s));
        let p = policy();
        assert_eq!(Policy::try_from(pb::Policy::from(p.clone())), Ok(p));
    }

    /// Each case spoils one field of a valid message and expects that field named.
    #[test]
    fn invalid_workloads_name_the_field() {
        type Spoil = fn(&mut pb::Workload);
        let cases: [(Spoil, &str); 9] = [
            (|w| w.uid.clear(), "uid"),
            (|w| w.node.clear(), "node"),
            (|w| w.identity = "spiffe://x/ns/other/sa/web".into(), "identity"),
            (|w| w.identity = "not-an-id".into(), "identity"),
            (|w| w.ips.push(vec![1, 2, 3]), "ips[2]"),
            (|w| w.ips.clear(), "ips"),
            (|w| w.mtls_mode = 0, "mtls_mode"),
            (|w| w.mtls_mode = 7, "mtls_mode"),
            (|w| w.service_account.clear(), "service_account"),
        ];
        for (spoil, field) in cases {
            let mut wire = pb::Workload::from(workload("uid-1", "node-a"));
            spoil(&mut wire);
            assert_eq!(Workload::try_from(wire).unwrap_err().field(), field);
        }
    }

    #[test]
    fn invalid_services_name_the_field() {
        type Spoil = fn(&mut pb::Service);
        let cases: [(Spoil, &str); 6] = [
            (|s| s.name.clear(), "name"),
            (|s| s.vips[0] = vec![], "vips[0]"),
            (|s| s.ports[0].port = 70000, "ports[0].port"),
            (|s| s.ports[0].target_port = 0, "ports[0].target_port"),
            (|s| s.ports[0].protocol = 0, "ports[0].protocol"),
            (|s| s.endpoints[1].ip = vec![0; 5], "endpoints[1].ip"),
        ];
        for (spoil, field) in cases {
            let mut wire = pb::Service::from(service());
            spoil(&mut wire);
            assert_eq!(Service::try_from(wire).unwrap_err().field(), field);
        }
    }

    #[test]
    fn invalid_policies_name_the_field() {
        type Spoil = fn(&mut pb::Policy);
        let cases: [(Spoil, &str); 4] = [
            (|p| p.action = 0, "action"),
            (
                |p| p.rules[0].from[0].principals[0] = "spiffe://x".into(),
                "rules[0].from[0].principals[0]",
            ),
            (
                |p| p.rules[0].from[0].namespaces[0].clear(),
                "rules[0].from[0].namespaces[0]",
            ),
            (|p| p.rules[0].to[0].ports[0] = 0, "rules[0].to[0].ports[0]"),
        ];
        for (spoil, field) in cases {
            let mut wire = pb::Policy::from(policy());
            spoil(&mut wire);
            assert_eq!(Policy::try_from(wire).unwrap_err().field(), field);
        }
    }
}
