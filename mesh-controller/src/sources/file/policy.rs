//! `mesh.dev/v1alpha1` AuthorizationPolicy documents, shaped like Istio's, to [`Policy`].

use mesh_api::{Action, Identity, Labels, Operation, Policy, Rule, Source};
use serde::Deserialize;

use super::objects::{invalid, port, IntOrString, Invalid, Metadata};

/// `mesh.dev/v1alpha1` AuthorizationPolicy, shaped like Istio's. Fields the mesh does not
/// enforce yet are refused rather than ignored: ignoring one would widen what the policy
/// allows.
#[derive(Deserialize)]
pub struct AuthorizationPolicyDoc {
    metadata: Metadata,
    #[serde(default)]
    spec: PolicySpec,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicySpec {
    selector: Option<Selector>,
    action: Option<String>,
    #[serde(default)]
    rules: Vec<RuleDoc>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Selector {
    #[serde(default)]
    match_labels: Labels,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleDoc {
    #[serde(default)]
    from: Vec<FromDoc>,
    #[serde(default)]
    to: Vec<ToDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FromDoc {
    source: SourceDoc,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceDoc {
    #[serde(default)]
    principals: Vec<String>,
    #[serde(default)]
    namespaces: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ToDoc {
    operation: OperationDoc,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OperationDoc {
    /// Istio writes ports as strings; numbers are accepted too.
    #[serde(default)]
    ports: Vec<IntOrString>,
}

impl AuthorizationPolicyDoc {
    pub fn into_policy(self) -> Result<Policy, Invalid> {
        let AuthorizationPolicyDoc { metadata, spec } = self;
        metadata.check(true)?;
        let action = match spec.action.as_deref() {
            None | Some("ALLOW") => Action::Allow,
            Some("DENY") => Action::Deny,
            Some(other) => return Err(invalid("spec.action", format!("{other:?} is not ALLOW or DENY"))),
        };
        let mut rules = Vec::new();
        for (r, rule) in spec.rules.into_iter().enumerate() {
            let mut from = Vec::new();
            for (f, source) in rule.from.into_iter().enumerate() {
                let at = format!("spec.rules[{r}].from[{f}].source");
                from.push(Source {
                    principals: source
                        .source
                        .principals
                        .iter()
                        .enumerate()
                        .map(|(i, p)| principal(&format!("{at}.principals[{i}]"), p))
                        .collect::<Result<_, _>>()?,
                    namespaces: source.source.namespaces,
                });
            }
            let mut to = Vec::new();
            for (t, op) in rule.to.into_iter().enumerate() {
                let mut ports = Vec::new();
                for (i, p) in op.operation.ports.into_iter().enumerate() {
                    let field = format!("spec.rules[{r}].to[{t}].operation.ports[{i}]");
                    ports.push(match p {
                        IntOrString::Int(n) => port(&field, n)?,
                        IntOrString::String(s) => port(
                            &field,
                            s.parse()
                                .map_err(|_| invalid(&field, format!("{s:?} is not a port")))?,
                        )?,
                    });
                }
                to.push(Operation { ports });
            }
            rules.push(Rule { from, to });
        }
        Ok(Policy {
            namespace: metadata.namespace().to_owned(),
            name: metadata.name,
            selector: spec.selector.map(|s| s.match_labels).unwrap_or_default(),
            action,
            rules,
        })
    }
}

/// Istio writes principals without the scheme (`cluster.local/ns/x/sa/y`); both forms are
/// accepted. Wildcards are not supported yet.
fn principal(field: &str, value: &str) -> Result<Identity, Invalid> {
    if value.contains('*') {
        return Err(invalid(field, "wildcards are not supported"));
    }
    let full = if value.starts_with("spiffe://") {
        value.to_owned()
    } else {
        format!("spiffe://{value}")
    };
    full.parse()
        .map_err(|e: mesh_api::IdentityError| invalid(field, e.to_string()))
}
