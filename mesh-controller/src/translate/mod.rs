//! Cluster state → one node's view: a pure function, so every rule here is table-tested.
//!
//! - Enrollment: a namespace labelled `mesh.dev/enroll=true` enrolls its pods; a pod labelled
//!   `mesh.dev/enroll=false` opts out.
//! - Identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, the service
//!   account defaulting to `default` as in Kubernetes.
//! - mTLS mode: the namespace label `mesh.dev/mtls=strict|permissive`, PERMISSIVE when absent
//!   (as Istio): enrolling a namespace must not cut off the clients that are not in the mesh
//!   yet (other namespaces, kubelet probes from the node); STRICT is a deliberate second step.
//! - What a node gets: its own pods in full (enrolled or not, so it can release opted-out
//!   ones). If at least one of them is enrolled, also the enrolled pods elsewhere (addresses
//!   and identity, no labels: enough to route to them), every service with its endpoints, and
//!   the policies selecting one of its enrolled pods. A node without enrolled pods carries
//!   no traffic and needs nothing more.

mod services;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;

use mesh_api::{Identity, MtlsMode, NodeView, TrustDomain, Workload};

use crate::cluster::{ClusterState, Pod};

pub const ENROLL_LABEL: &str = "mesh.dev/enroll";
pub const MTLS_LABEL: &str = "mesh.dev/mtls";
pub const DEFAULT_MTLS_MODE: MtlsMode = MtlsMode::Permissive;
const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// Reads a `mesh.dev/mtls` label value; `None` for anything else.
pub fn parse_mtls_mode(value: &str) -> Option<MtlsMode> {
    if value.eq_ignore_ascii_case("strict") {
        Some(MtlsMode::Strict)
    } else if value.eq_ignore_ascii_case("permissive") {
        Some(MtlsMode::Permissive)
    } else {
        None
    }
}

/// The view `node` should hold of `state`.
pub fn node_view(state: &ClusterState, node: &str, trust_domain: &TrustDomain) -> NodeView {
    let mut view = NodeView::default();
    let workloads = state
        .pods
        .values()
        .filter_map(|pod| workload(state, pod, trust_domain));
    let (local, remote): (Vec<_>, Vec<_>) = workloads.partition(|w| w.node == node);
    if !local.iter().any(|w| w.enrolled) {
        local.into_iter().for_each(|w| view.insert_workload(w));
        return view;
    }
    for policy in state.policies.values() {
        if local
            .iter()
            .any(|w| w.enrolled && policy.selects(&w.namespace, &w.labels))
        {
            view.insert_policy(policy.clone());
        }
    }
    for service in state.services.values() {
        view.insert_service(services::service(state, service));
    }
    local.into_iter().for_each(|w| view.insert_workload(w));
    for mut w in remote.into_iter().filter(|w| w.enrolled) {
        w.labels.clear();
        view.insert_workload(w);
    }
    view
}

/// The identities `node` may hold certificates for: those of its enrolled pods.
pub fn local_identities(state: &ClusterState, node: &str, trust_domain: &TrustDomain) -> BTreeSet<Identity> {
    state
        .pods
        .values()
        .filter(|pod| pod.node == node)
        .filter_map(|pod| workload(state, pod, trust_domain))
        .filter(|w| w.enrolled)
        .map(|w| w.identity)
        .collect()
}

fn workload(state: &ClusterState, pod: &Pod, trust_domain: &TrustDomain) -> Option<Workload> {
    let ns_labels = state.namespaces.get(&pod.namespace).map(|ns| &ns.labels);
    let ns_label = |key| ns_labels.and_then(|labels| labels.get(key));
    let enrolled = ns_label(ENROLL_LABEL).is_some_and(|v| v == "true")
        && pod.labels.get(ENROLL_LABEL).is_none_or(|v| v != "false");
    let mtls_mode = ns_label(MTLS_LABEL)
        .and_then(|v| parse_mtls_mode(v))
        .unwrap_or(DEFAULT_MTLS_MODE);
    let service_account = pod.service_account.as_deref().unwrap_or(DEFAULT_SERVICE_ACCOUNT);
    // Sources only admit names that are valid SPIFFE path segments, so this cannot fail.
    let identity = Identity::new(trust_domain.clone(), &pod.namespace, service_account).ok()?;
    Some(Workload {
        uid: pod.uid.clone(),
        name: pod.name.clone(),
        namespace: pod.namespace.clone(),
        node: pod.node.clone(),
        service_account: service_account.to_owned(),
        identity,
        ips: pod.ips.clone(),
        enrolled,
        mtls_mode,
        labels: pod.labels.clone(),
    })
}
