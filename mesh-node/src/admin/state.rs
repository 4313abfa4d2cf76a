//! `GET /v1/workloads`, `/v1/services`, `/v1/policies`: the node's config from the controller,
//! joined with what the kernel captures. Pure: config and enrollment report in, documents out.
use mesh_api::admin::{PolicyInfo, ServiceInfo, WorkloadInfo};
use mesh_api::{Action, MtlsMode, Policy, Rule, Service};

use crate::control::NodeState;
use crate::enrollment::Report;

pub fn workloads(state: &NodeState, kernel: &Report) -> Vec<WorkloadInfo> {
    state
        .local
        .values()
        .map(|w| {
            let key = format!("{}/{}", w.namespace, w.name);
            WorkloadInfo {
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                uid: w.uid.clone(),
                identity: w.identity.to_string(),
                ips: w.ips.iter().map(ToString::to_string).collect(),
                enrolled: w.enrolled,
                mtls_mode: match w.mtls_mode {
                    MtlsMode::Strict => "STRICT",
                    MtlsMode::Permissive => "PERMISSIVE",
                }
                .into(),
                cgroup: kernel.cgroups.get(&key).map(|p| p.display().to_string()),
                captured: kernel.captured.contains(&key),
                problem: w.enrolled.then(|| kernel.problems.get(&key).cloned()).flatten(),
                veth_ready: w
                    .ips
                    .iter()
                    .any(|ip| kernel.veths_ready.contains(&ip.to_canonical())),
            }
        })
        .collect()
}

pub fn services(state: &NodeState) -> Vec<ServiceInfo> {
    state.services.values().map(service).collect()
}

fn service(s: &Service) -> ServiceInfo {
    ServiceInfo {
        namespace: s.namespace.clone(),
        name: s.name.clone(),
        vips: s.vips.iter().map(ToString::to_string).collect(),
        ports: s
            .ports
            .iter()
            .map(|p| format!("{}→{}/{:?}", p.port, p.target_port, p.protocol).to_uppercase())
            .collect(),
        endpoints: s
            .endpoints
            .iter()
            .filter(|e| e.ready)
            .map(|e| e.ip.to_string())
            .collect(),
    }
}

pub fn policies(state: &NodeState) -> Vec<PolicyInfo> {
    state.policies.values().map(policy).collect()
}

fn policy(p: &Policy) -> PolicyInfo {
    PolicyInfo {
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        action: match p.action {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
        }
        .into(),
        selector: p
            .selector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(","),
        rules: p.rules.iter().map(rule).collect(),
    }
}

fn rule(r: &Rule) -> String {
    let mut parts = Vec::new();
    for src in &r.from {
        if !src.principals.is_empty() {
            let ids: Vec<_> = src.principals.iter().map(ToString::to_string).collect();
            parts.push(format!("from principals [{}]", ids.join(", ")));
        }
        if !src.namespaces.is_empty() {
            parts.push(format!("from namespaces [{}]", src.namespaces.join(", ")));
        }
    }
    for op in &r.to {
        if !op.ports.is_empty() {
            let ports: Vec<_> = op.ports.iter().map(ToString::to_string).collect();
            parts.push(format!("to ports [{}]", ports.join(", ")));
        }
    }
    if parts.is_empty() {
        "any".into()
    } else {
        parts.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_api::{Operation, Source};

    #[test]
    fn rules_read_as_sentences() {
        let r = Rule {
            from: vec![Source {
                principals: vec!["spiffe://td/ns/a/sa/web".parse().unwrap()],
                namespaces: vec!["b".into()],
            }],
            to: vec![Operation { ports: vec![80, 443] }],
        };
        assert_eq!(
            rule(&r),
            "from principals [spiffe://td/ns/a/sa/web] from namespaces [b] to ports [80, 443]"
        );
        assert_eq!(rule(&Rule::default()), "any");
    }
}
