//! `AuthorizationPolicy` (`mesh.dev/v1alpha1`): the type, its schema and its conversion to
//! the mesh's [`Policy`].

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use mesh_api::{Action, Identity, Labels, Operation, Policy, Rule, Source};
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::schema;
use crate::cluster::Invalid;

/// The condition type the controller writes on every policy it has read.
pub const ACCEPTED_CONDITION: &str = "Accepted";

/// Who may reach the selected workloads, with Istio's semantics: `ALLOW` policies make a
/// workload default-deny and let through what one of their rules matches; a matching `DENY`
/// rule refuses, before any ALLOW is looked at. Fields the mesh does not enforce (yet) are
/// refused rather than ignored: ignoring one would widen what a policy allows.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "mesh.dev",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    namespaced,
    status = "AuthorizationPolicyStatus",
    category = "mesh",
    doc = "An authorization policy of the mesh: which peers may reach the selected pods.",
    printcolumn = r#"{"name": "Action", "type": "string", "jsonPath": ".spec.action"}"#,
    printcolumn = r#"{"name": "Accepted", "type": "string", "jsonPath": ".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// The pods of the policy's namespace it applies to; absent selects all of them.
    #[serde(default, skip_serializing_if = "WorkloadSelector::is_empty")]
    pub selector: WorkloadSelector,
    /// ALLOW (the default) or DENY.
    #[serde(default)]
    pub action: PolicyAction,
    /// A request matches the policy when it matches one rule. No rules: an ALLOW policy
    /// allows nothing, a DENY policy denies nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub rules: Vec<RuleSpec>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    #[schemars(schema_with = "schema::match_labels")]
    pub match_labels: Labels,
}

impl WorkloadSelector {
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty()
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum PolicyAction {
    #[default]
    Allow,
    Deny,
}

/// Matches when one `from` entry and one `to` entry match; an empty list matches anything.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub from: Vec<RuleFrom>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub to: Vec<RuleTo>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleFrom {
    pub source: SourceSpec,
}

/// The peer. Every list given must match; an empty source matches any peer.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "schema::principals")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "schema::namespaces")]
    pub namespaces: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleTo {
    pub operation: OperationSpec,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OperationSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "schema::ports")]
    pub ports: Vec<PortSpec>,
}

/// A port as written: Istio writes ports as strings; numbers are accepted too. Checked by
/// [`to_policy`] (and by the schema's bounds and pattern).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortSpec {
    Number(i64),
    Text(String),
}

impl Serialize for PortSpec {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            PortSpec::Number(n) => serializer.serialize_i64(*n),
            PortSpec::Text(s) => serializer.serialize_str(s),
        }
    }
}

impl<'de> Deserialize<'de> for PortSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = PortSpec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a port number or string")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PortSpec, E> {
                Ok(PortSpec::Number(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PortSpec, E> {
                Ok(PortSpec::Number(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PortSpec, E> {
                Ok(PortSpec::Text(v.to_owned()))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl JsonSchema for PortSpec {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PortSpec".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        // Only used inside `schema::ports`, which writes the item schema itself.
        schemars::json_schema!({ "x-kubernetes-int-or-string": true })
    }
}

impl PortSpec {
    pub fn number(&self) -> Option<u16> {
        match self {
            PortSpec::Number(n) => u16::try_from(*n).ok().filter(|&p| p != 0),
            // Exactly what PORT_PATTERN accepts: digits, no sign, no leading zero.
            PortSpec::Text(s) if s.bytes().all(|b| b.is_ascii_digit()) && !s.starts_with('0') => {
                s.parse().ok()
            }
            PortSpec::Text(_) => None,
        }
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortSpec::Number(n) => write!(f, "{n}"),
            PortSpec::Text(s) => write!(f, "{s:?}"),
        }
    }
}

/// What the controller last concluded about a policy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicyStatus {
    /// `Accepted`: True when the policy is in force, False (with the reason and the field at
    /// fault in the message) when it was refused as a whole.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` the conditions describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl AuthorizationPolicyStatus {
    pub fn accepted(&self) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == ACCEPTED_CONDITION)
    }
}

/// The mesh policy of an `AuthorizationPolicy` named `namespace/name`, or the first field
/// that keeps it out. Shared by both sources: nothing is applied unless all of it converts.
pub fn to_policy(namespace: &str, name: &str, spec: &AuthorizationPolicySpec) -> Result<Policy, Invalid> {
    let selector = spec.selector.match_labels.clone();
    check_selector(&selector)?;
    let action = match spec.action {
        PolicyAction::Allow => Action::Allow,
        PolicyAction::Deny => Action::Deny,
    };
    let mut rules = Vec::new();
    for (r, rule) in spec.rules.iter().enumerate() {
        let mut from = Vec::new();
        for (f, entry) in rule.from.iter().enumerate() {
            let at = format!("spec.rules[{r}].from[{f}].source");
            let principals = entry
                .source
                .principals
                .iter()
                .enumerate()
                .map(|(i, p)| principal(&format!("{at}.principals[{i}]"), p))
                .collect::<Result<_, _>>()?;
            for (i, ns) in entry.source.namespaces.iter().enumerate() {
                if !is_dns_label(ns) {
                    return Err(Invalid::new(
                        format!("{at}.namespaces[{i}]"),
                        format!("{ns:?} is not a namespace name"),
                    ));
                }
            }
            from.push(Source {
                principals,
                namespaces: entry.source.namespaces.clone(),
            });
        }
        let mut to = Vec::new();
        for (t, entry) in rule.to.iter().enumerate() {
            let mut ports = Vec::new();
            for (i, p) in entry.operation.ports.iter().enumerate() {
                let field = format!("spec.rules[{r}].to[{t}].operation.ports[{i}]");
                let port = p
                    .number()
                    .ok_or_else(|| Invalid::new(field, format!("{p} is not a port (1-65535)")))?;
                ports.push(port);
            }
            to.push(Operation { ports });
        }
        rules.push(Rule { from, to });
    }
    Ok(Policy {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        selector,
        action,
        rules,
    })
}

/// What the nodes enforce in place of a policy that does not convert, so that a mistake in a
/// policy never opens access:
/// - a DENY policy denies every connection to the workloads it selects, until it is fixed;
/// - an ALLOW policy allows nothing, so its workloads stay default-deny (as an ALLOW policy
///   with no rules);
/// - an action that cannot be read counts as DENY: the stand-in must cover the worst case.
///
/// A selector that cannot be read (or is not an object, or has a bad label) selects the whole
/// namespace: a policy only ever selects workloads of its own namespace, so that is the one
/// scope sure to hold every workload it was meant for. A policy whose labels are fine keeps
/// its selector. `spec` is the policy's spec as written, untyped, since it did not convert.
pub fn fail_closed(namespace: &str, name: &str, spec: &serde_json::Value) -> Policy {
    let action = match spec.get("action") {
        None if spec.is_object() => PolicyAction::Allow,
        None => PolicyAction::Deny,
        Some(value) => PolicyAction::deserialize(value).unwrap_or(PolicyAction::Deny),
    };
    let selector = spec
        .get("selector")
        .and_then(|s| WorkloadSelector::deserialize(s).ok())
        .filter(|s| check_selector(&s.match_labels).is_ok())
        .map(|s| s.match_labels)
        .unwrap_or_default();
    let (action, rules) = match action {
        PolicyAction::Deny => (Action::Deny, vec![Rule::default()]),
        PolicyAction::Allow => (Action::Allow, Vec::new()),
    };
    Policy {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        selector,
        action,
        rules,
    }
}

/// What a [`fail_closed`] stand-in does, for logs and the policy's status.
pub fn fail_closed_effect(policy: &Policy) -> &'static str {
    match policy.action {
        Action::Deny => "until it is fixed, the workloads it selects refuse every connection",
        Action::Allow => "until it is fixed, it allows nothing: the workloads it selects stay default-deny",
    }
}

fn check_selector(selector: &Labels) -> Result<(), Invalid> {
    for (key, value) in selector {
        let field = format!("spec.selector.matchLabels.{key}");
        check_label_key(&field, key)?;
        if !is_label_value(value) {
            return Err(Invalid::new(
                field,
                format!("{value:?} is not a valid label value"),
            ));
        }
    }
    Ok(())
}

/// Istio writes principals without the scheme (`cluster.local/ns/x/sa/y`); both forms are
/// accepted. Wildcards are not supported yet.
fn principal(field: &str, value: &str) -> Result<Identity, Invalid> {
    if value.contains('*') {
        return Err(Invalid::new(field, "wildcards are not supported"));
    }
    let full = if value.starts_with("spiffe://") {
        value.to_owned()
    } else {
        format!("spiffe://{value}")
    };
    full.parse()
        .map_err(|e: mesh_api::IdentityError| Invalid::new(field, e.to_string()))
}

fn is_dns_label(s: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && alnum(bytes[0])
        && alnum(bytes[bytes.len() - 1])
        && bytes.iter().all(|&b| alnum(b) || b == b'-')
}

fn is_label_value(s: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_alphanumeric();
    let bytes = s.as_bytes();
    bytes.is_empty()
        || (bytes.len() <= 63
            && alnum(bytes[0])
            && alnum(bytes[bytes.len() - 1])
            && bytes.iter().all(|&b| alnum(b) || b"-_.".contains(&b)))
}

/// A label key: `[prefix/]name`, the prefix a DNS subdomain, the name a label value that is
/// not empty. The schema cannot check map keys, so this is where a bad key is refused.
fn check_label_key(field: &str, key: &str) -> Result<(), Invalid> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let bad = |why: &str| {
        Err(Invalid::new(
            field,
            format!("{key:?} is not a valid label key: {why}"),
        ))
    };
    if name.is_empty() || !is_label_value(name) {
        return bad("the name must be 1-63 alphanumerics, '-', '_' or '.', alphanumeric at both ends");
    }
    if let Some(prefix) = prefix {
        if prefix.is_empty() || prefix.len() > 253 || !prefix.split('.').all(is_dns_label) {
            return bad("the prefix must be a DNS subdomain");
        }
    }
    Ok(())
}
