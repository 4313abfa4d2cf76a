//! What an HBONE peer says about a connection beyond what its certificate proves — the service
//! the source dialled, and who the source workload is — believed only as far as this node's
//! own state bears it out, and never used for policy, which goes by the certificate alone.
//!
//! The metrics' label sets stay bounded: a destination service is reported only if it is one
//! this node knows, and a source's namespace is always its certificate's. Only a source workload
//! this node cannot find is named by the peer's own word (as ztunnel names it), from a peer that
//! holds a mesh certificate, in a value the baggage parser bounds in length and characters.
use mesh_api::{Identity, NamespacedName, Workload};

use super::hbone::Baggage;
use crate::control::NodeState;
use crate::metrics::labels::Peer;

/// The destination service to report: the claimed one, if it is a service this node knows
/// with the destination workload among its endpoints on the destination port.
pub fn destination_service(
    state: &NodeState,
    claimed: Option<&NamespacedName>,
    dst: &Workload,
    port: u16,
) -> Option<NamespacedName> {
    let svc = state.services.get(claimed?)?;
    svc.endpoints
        .iter()
        .any(|e| {
            e.port == port
                && match &e.workload_uid {
                    Some(uid) => *uid == dst.uid,
                    None => dst.ips.iter().any(|ip| ip.to_canonical() == e.ip.to_canonical()),
                }
        })
        .then(|| svc.key())
}

/// The source as its baggage names it, for a source this node cannot find in its state (a
/// ztunnel's pod, a pod of a node it is not told about): the namespace is the verified
/// identity's, and baggage naming another namespace is not believed at all. The workload is
/// named as this mesh's labels name workloads (the canonical service, as the app label is here),
/// else by the workload the baggage gives.
pub fn source_from_baggage(identity: &Identity, baggage: &Baggage) -> Option<Peer> {
    if baggage
        .namespace
        .as_deref()
        .is_some_and(|ns| ns != identity.namespace())
    {
        return None;
    }
    let workload = baggage
        .service
        .clone()
        .or_else(|| baggage.workload.as_ref().map(|(_, name)| name.clone()))?;
    Some(Peer {
        workload,
        namespace: identity.namespace().to_owned(),
        principal: identity.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use mesh_api::{Endpoint, MtlsMode, Service};

    use super::*;
    use crate::proxy::hbone::baggage::WorkloadKind;

    fn server() -> Workload {
        Workload {
            uid: "uid-server".into(),
            name: "server-abcde".into(),
            namespace: "shop".into(),
            node: "b".into(),
            service_account: "server".into(),
            identity: "spiffe://cluster.local/ns/shop/sa/server".parse().unwrap(),
            ips: vec!["10.1.2.10".parse().unwrap()],
            enrolled: true,
            mtls_mode: MtlsMode::Strict,
            labels: BTreeMap::new(),
        }
    }

    fn service(name: &str, endpoints: Vec<Endpoint>) -> Service {
        Service {
            namespace: "shop".into(),
            name: name.into(),
            vips: vec!["10.96.0.20".parse().unwrap()],
            ports: vec![],
            endpoints,
        }
    }

    fn endpoint(uid: Option<&str>, ip: &str, port: u16) -> Endpoint {
        Endpoint {
            workload_uid: uid.map(Into::into),
            ip: ip.parse().unwrap(),
            port,
            ready: true,
        }
    }

    fn state(services: Vec<Service>) -> NodeState {
        let mut state = NodeState::new("b");
        state.services = services.into_iter().map(|s| (s.key(), s)).collect();
        state
    }

    #[test]
    fn a_claimed_service_counts_only_when_it_serves_the_destination() {
        let st = state(vec![
            service("server", vec![endpoint(Some("uid-server"), "10.1.2.10", 8080)]),
            service("by-ip", vec![endpoint(None, "10.1.2.10", 8080)]),
            service("other", vec![endpoint(Some("uid-other"), "10.1.2.11", 8080)]),
        ]);
        let check = |name: &str, port| {
            destination_service(&st, Some(&NamespacedName::new("shop", name)), &server(), port)
        };
        assert_eq!(check("server", 8080), Some(NamespacedName::new("shop", "server")));
        assert_eq!(check("by-ip", 8080), Some(NamespacedName::new("shop", "by-ip")));
        // Not an endpoint of it, not on that port, not a known service, no claim.
        assert_eq!(check("other", 8080), None);
        assert_eq!(check("server", 9090), None);
        assert_eq!(check("made-up-1234", 8080), None);
        assert_eq!(destination_service(&st, None, &server(), 8080), None);
    }

    #[test]
    fn baggage_names_a_source_only_within_its_verified_namespace() {
        let id: Identity = "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap();
        let b = Baggage {
            namespace: Some("shop".into()),
            workload: Some((WorkloadKind::Deployment, "web-v2".into())),
            service: Some("web".into()),
            ..Baggage::default()
        };
        let peer = source_from_baggage(&id, &b).unwrap();
        assert_eq!(
            peer,
            Peer {
                workload: "web".into(),
                namespace: "shop".into(),
                principal: id.to_string()
            }
        );
        let workload_only = Baggage {
            service: None,
            ..b.clone()
        };
        assert_eq!(
            source_from_baggage(&id, &workload_only).unwrap().workload,
            "web-v2"
        );
        let elsewhere = Baggage {
            namespace: Some("bank".into()),
            ..b.clone()
        };
        assert_eq!(source_from_baggage(&id, &elsewhere), None);
        assert_eq!(source_from_baggage(&id, &Baggage::default()), None);
    }
}
