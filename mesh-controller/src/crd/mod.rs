//! mesh's Kubernetes custom resources, defined once in Rust: the CRD YAML in
//! `daemonset/base/crds/` is generated from these types (`cargo xtask manifests`, or
//! `mesh-controller crds`), and both sources (local files and the Kubernetes API) read
//! policies through the same [`AuthorizationPolicySpec`] and [`to_policy`].
//!
//! The schema refuses what it can: unknown fields (with kubectl's default strict field
//! validation), actions other than ALLOW|DENY, ports outside 1–65535, principals that are
//! not `[spiffe://]<trust-domain>/ns/<namespace>/sa/<service-account>`, and oversized lists.
//! [`to_policy`] checks the same rules again (the file source has no API server in front of
//! it), so a policy is either converted whole or refused whole. A refused policy is not
//! dropped: [`fail_closed`] puts a stand-in in its place that never allows more than the
//! policy could have.

mod policy;
mod schema;

pub use self::policy::{
    fail_closed, fail_closed_effect, to_policy, AuthorizationPolicy, AuthorizationPolicySpec,
    AuthorizationPolicyStatus, OperationSpec, PolicyAction, PortSpec, RuleFrom, RuleSpec, RuleTo, SourceSpec,
    WorkloadSelector, ACCEPTED_CONDITION,
};
pub use self::schema::{NAMESPACE_PATTERN, PORT_PATTERN, PRINCIPAL_PATTERN};

use kube::CustomResourceExt;

/// One generated manifest: its file name in `daemonset/base/crds/` and its YAML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrdFile {
    pub name: String,
    pub yaml: String,
}

const HEADER: &str = "# Generated from mesh-controller/src/crd by `cargo xtask manifests`; do not edit.\n";

/// Every CRD mesh installs, as the files `daemonset/base/crds/` holds.
pub fn crd_files() -> Vec<CrdFile> {
    let crd = AuthorizationPolicy::crd();
    let name = format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("crd"));
    // serde_norway writes maps in the order serde_json gives them: sorted, so stable.
    let value = serde_json::to_value(&crd).expect("a CRD serializes");
    let yaml = serde_norway::to_string(&value).expect("a JSON value serializes as YAML");
    vec![CrdFile {
        name,
        yaml: format!("{HEADER}{yaml}"),
    }]
}

#[cfg(test)]
mod fail_closed_tests;
#[cfg(test)]
mod tests;
