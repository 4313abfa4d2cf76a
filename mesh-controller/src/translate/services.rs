//! A Service with its endpoints, as a node routes to it.
//!
//! Endpoints come from the Service's EndpointSlices, as in a cluster. When a Service has a
//! selector but no slice mentions it (hand-written local state, where no endpoint controller
//! runs), they are derived from the selected pods, as that controller would (pods count as
//! ready: the sources read no readiness). Endpoints are listed for TCP ports only: the mesh
//! carries TCP and passes everything else through.

use std::collections::BTreeSet;

use mesh_api::{Endpoint, Protocol, ServicePort};

use crate::cluster::{self, ClusterState, EndpointSlice, TargetPort};

pub(super) fn service(state: &ClusterState, svc: &cluster::Service) -> mesh_api::Service {
    let slices: Vec<&EndpointSlice> = state
        .endpoint_slices
        .values()
        .filter(|s| s.namespace == svc.namespace && s.service == svc.name)
        .collect();
    let ports = svc
        .ports
        .iter()
        .filter_map(|p| resolve_port(p, &slices))
        .collect();
    let endpoints = if slices.is_empty() {
        selected_endpoints(state, svc)
    } else {
        slice_endpoints(&slices)
    };
    mesh_api::Service {
        namespace: svc.namespace.clone(),
        name: svc.name.clone(),
        vips: svc.cluster_ips.clone(),
        ports,
        endpoints,
    }
}

/// A named target port takes the number of the slice port carrying the service port's name;
/// a port that cannot be resolved has nowhere to go and is left out.
fn resolve_port(port: &cluster::ServicePort, slices: &[&EndpointSlice]) -> Option<ServicePort> {
    let target_port = match &port.target_port {
        TargetPort::Number(n) => *n,
        TargetPort::Name(_) => {
            slices
                .iter()
                .flat_map(|s| &s.ports)
                .find(|sp| sp.name == port.name && sp.protocol == port.protocol)?
                .port
        }
    };
    Some(ServicePort {
        port: port.port,
        target_port,
        protocol: port.protocol,
    })
}

fn slice_endpoints(slices: &[&EndpointSlice]) -> Vec<Endpoint> {
    let mut seen = BTreeSet::new();
    let mut endpoints = Vec::new();
    for slice in slices {
        for port in slice.ports.iter().filter(|p| p.protocol == Protocol::Tcp) {
            for ep in &slice.endpoints {
                for &ip in &ep.addresses {
                    // The same address may sit in two slices while the controller moves it.
                    if seen.insert((ip, port.port)) {
                        endpoints.push(Endpoint {
                            workload_uid: ep.pod_uid.clone(),
                            ip,
                            port: port.port,
                            ready: ep.ready,
                        });
                    }
                }
            }
        }
    }
    endpoints
}

fn selected_endpoints(state: &ClusterState, svc: &cluster::Service) -> Vec<Endpoint> {
    // Kubernetes manages no endpoints for a missing or empty selector.
    let Some(selector) = svc.selector.as_ref().filter(|s| !s.is_empty()) else {
        return Vec::new();
    };
    let target_ports: BTreeSet<u16> = svc
        .ports
        .iter()
        .filter(|p| p.protocol == Protocol::Tcp)
        .filter_map(|p| match p.target_port {
            TargetPort::Number(n) => Some(n),
            TargetPort::Name(_) => None,
        })
        .collect();
    let pods = state.pods.values().filter(|pod| {
        pod.namespace == svc.namespace && selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v))
    });
    let mut endpoints = Vec::new();
    for pod in pods {
        for &ip in &pod.ips {
            for &port in &target_ports {
                let workload_uid = Some(pod.uid.clone());
                endpoints.push(Endpoint {
                    workload_uid,
                    ip,
                    port,
                    ready: true,
                });
            }
        }
    }
    endpoints
}
