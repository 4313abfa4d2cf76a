//! Authorization of inbound connections by `AuthorizationPolicy` (DESIGN.md §7), with Istio's
//! semantics: DENY policies first, then ALLOW; default allow until an ALLOW policy selects
//! the workload, which then admits only what one of its rules matches.
//!
//! Two kinds of source: a peer authenticated by its mesh certificate ([`authorize`]), and
//! plaintext from outside the mesh, which has no principal ([`authorize_plaintext`]). For the
//! latter a `from` entry that names principals or namespaces never matches (nothing vouches
//! for the source), while rules on ports do; DENY still comes first.
//!
//! Pure: the caller hands in the policies it knows (the node's applied config) and logs,
//! counts and enforces the [`Decision`].
use mesh_api::{Action, Identity, Operation, Policy, Rule, Source, Workload};

/// What [`Decision::Deny`] names when no DENY policy matched but ALLOW policies select the
/// workload and none of them allows the connection.
pub const DEFAULT_DENY: &str = "default-deny";

/// The verdict on one connection, naming the policy responsible (`namespace/name`) for logs
/// and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// `policy` is the ALLOW policy whose rule matched, or `None` when no ALLOW policy
    /// selects the workload (default allow).
    Allow { policy: Option<String> },
    /// `policy` is the DENY policy whose rule matched, or [`DEFAULT_DENY`].
    Deny { policy: String },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }
}

/// Decides whether `src_identity` may reach `dst` on `dst_port`.
///
/// Only policies that select `dst` (its namespace and labels) count. A matching DENY rule
/// denies, whatever the ALLOW policies say. Otherwise, when at least one ALLOW policy selects
/// `dst`, the connection is allowed only if one of their rules matches; with none, it is
/// allowed. When several policies match, the first in `policies`' order is named, so a sorted
/// input (the config's `BTreeMap`) names the same one every time.
pub fn authorize<'a>(
    policies: impl IntoIterator<Item = &'a Policy>,
    dst: &Workload,
    src_identity: &Identity,
    dst_port: u16,
) -> Decision {
    decide(policies, dst, Some(src_identity), dst_port)
}

/// Decides whether plaintext from outside the mesh may reach `dst` on `dst_port`: as
/// [`authorize`], with no authenticated principal. A rule whose `from` names principals or
/// namespaces does not match, so an ALLOW for a principal admits no plaintext, and a DENY for
/// one does not deny it (a DENY by port, or with no `from`, does).
pub fn authorize_plaintext<'a>(
    policies: impl IntoIterator<Item = &'a Policy>,
    dst: &Workload,
    dst_port: u16,
) -> Decision {
    decide(policies, dst, None, dst_port)
}

/// `src`: the authenticated source, `None` for plaintext.
fn decide<'a>(
    policies: impl IntoIterator<Item = &'a Policy>,
    dst: &Workload,
    src: Option<&Identity>,
    dst_port: u16,
) -> Decision {
    let mut allow_policies = false;
    let mut allowed_by = None;
    for policy in policies {
        if !policy.selects(&dst.namespace, &dst.labels) {
            continue;
        }
        // Istio: a policy without rules matches nothing, so an ALLOW one allows nothing (it
        // still turns on default deny) and a DENY one denies nothing.
        let matched = policy.rules.iter().any(|r| rule_matches(r, src, dst_port));
        match policy.action {
            // DENY wins outright; no need to look further.
            Action::Deny if matched => {
                return Decision::Deny {
                    policy: policy.key().to_string(),
                }
            }
            Action::Deny => {}
            Action::Allow => {
                allow_policies = true;
                if matched && allowed_by.is_none() {
                    allowed_by = Some(policy.key().to_string());
                }
            }
        }
    }
    match allowed_by {
        Some(policy) => Decision::Allow { policy: Some(policy) },
        None if allow_policies => Decision::Deny {
            policy: DEFAULT_DENY.to_owned(),
        },
        None => Decision::Allow { policy: None },
    }
}

/// One of the `from` entries and one of the `to` entries match; an empty list matches all.
fn rule_matches(rule: &Rule, src: Option<&Identity>, port: u16) -> bool {
    let from = rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, src));
    let to = rule.to.is_empty() || rule.to.iter().any(|o| operation_matches(o, port));
    from && to
}

/// Every non-empty list of the source matches (AND across lists, OR within one). Without an
/// authenticated source, a non-empty list never matches.
fn source_matches(source: &Source, src: Option<&Identity>) -> bool {
    let principal = source.principals.is_empty() || src.is_some_and(|id| source.principals.contains(id));
    let namespace = source.namespaces.is_empty()
        || src.is_some_and(|id| source.namespaces.iter().any(|n| n == id.namespace()));
    principal && namespace
}

fn operation_matches(operation: &Operation, port: u16) -> bool {
    operation.ports.is_empty() || operation.ports.contains(&port)
}

#[cfg(test)]
mod tests {
    use mesh_api::{Labels, MtlsMode};

    use super::*;

    fn id(ns: &str, sa: &str) -> Identity {
        format!("spiffe://cluster.local/ns/{ns}/sa/{sa}").parse().unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The destination of every case: `shop/web`, labelled `app=web`, listening on 8080.
    fn web() -> Workload {
        Workload {
            uid: "u-web".into(),
            name: "web-0".into(),
            namespace: "shop".into(),
            node: "a".into(),
            service_account: "web".into(),
            identity: id("shop", "web"),
            ips: vec!["10.0.0.1".parse().unwrap()],
            enrolled: true,
            mtls_mode: MtlsMode::Strict,
            labels: labels(&[("app", "web")]),
        }
    }

    fn policy(ns: &str, name: &str, selector: &[(&str, &str)], action: Action, rules: Vec<Rule>) -> Policy {
        Policy {
            namespace: ns.into(),
            name: name.into(),
            selector: labels(selector),
            action,
            rules,
        }
    }

    fn allow(name: &str, rules: Vec<Rule>) -> Policy {
        policy("shop", name, &[], Action::Allow, rules)
    }

    fn deny(name: &str, rules: Vec<Rule>) -> Policy {
        policy("shop", name, &[], Action::Deny, rules)
    }

    fn rule(from: Vec<Source>, ports: &[u16]) -> Rule {
        let to = if ports.is_empty() {
            vec![]
        } else {
            vec![Operation {
                ports: ports.to_vec(),
            }]
        };
        Rule { from, to }
    }

    fn principals(ids: &[&Identity]) -> Source {
        Source {
            principals: ids.iter().map(|&id| id.clone()).collect(),
            namespaces: vec![],
        }
    }

    fn namespaces(ns: &[&str]) -> Source {
        Source {
            principals: vec![],
            namespaces: ns.iter().map(|n| n.to_string()).collect(),
        }
    }

    fn allowed(by: Option<&str>) -> Decision {
        Decision::Allow {
            policy: by.map(str::to_owned),
        }
    }

    fn denied(by: &str) -> Decision {
        Decision::Deny { policy: by.into() }
    }

    #[test]
    fn decisions() {
        let cart = id("shop", "cart");
        let admin = id("ops", "admin");
        let other_sa = id("shop", "other");
        let other_td: Identity = "spiffe://other.td/ns/shop/sa/cart".parse().unwrap();
        let both = || Source {
            principals: vec![cart.clone()],
            namespaces: vec!["shop".into()],
        };
        // (what, policies, source, port, expected)
        let cases: Vec<(&str, Vec<Policy>, &Identity, u16, Decision)> = vec![
            ("no policies: default allow", vec![], &cart, 8080, allowed(None)),
            (
                "a single empty rule allows everything",
                vec![allow("all", vec![Rule::default()])],
                &admin,
                9,
                allowed(Some("shop/all")),
            ),
            (
                "an ALLOW policy without rules allows nothing",
                vec![allow("none", vec![])],
                &cart,
                8080,
                denied(DEFAULT_DENY),
            ),
            (
                "a DENY policy without rules denies nothing",
                vec![deny("none", vec![])],
                &cart,
                8080,
                allowed(None),
            ),
            (
                "a DENY policy with an empty rule denies everything",
                vec![deny("all", vec![Rule::default()])],
                &cart,
                8080,
                denied("shop/all"),
            ),
            (
                "deny wins over allow, whatever the order",
                vec![
                    allow("a-all", vec![Rule::default()]),
                    deny("z-cart", vec![rule(vec![principals(&[&cart])], &[])]),
                ],
                &cart,
                8080,
                denied("shop/z-cart"),
            ),
            (
                "a DENY rule that does not match leaves the ALLOW decision",
                vec![
                    allow("a-all", vec![Rule::default()]),
                    deny("z-admin", vec![rule(vec![principals(&[&admin])], &[])]),
                ],
                &cart,
                8080,
                allowed(Some("shop/a-all")),
            ),
            (
                "principal-only rule: the principal is allowed",
                vec![allow("cart", vec![rule(vec![principals(&[&cart])], &[])])],
                &cart,
                8080,
                allowed(Some("shop/cart")),
            ),
            (
                "principal-only rule: another principal falls to default deny",
                vec![allow("cart", vec![rule(vec![principals(&[&cart])], &[])])],
                &admin,
                8080,
                denied(DEFAULT_DENY),
            ),
            (
                "principals within a source are ORed",
                vec![allow("two", vec![rule(vec![principals(&[&admin, &cart])], &[])])],
                &cart,
                8080,
                allowed(Some("shop/two")),
            ),
            (
                "principals compare the whole identity, trust domain included",
                vec![allow("cart", vec![rule(vec![principals(&[&cart])], &[])])],
                &other_td,
                8080,
                denied(DEFAULT_DENY),
            ),
            (
                "port-only rule: the port is allowed from anyone",
                vec![allow("http", vec![rule(vec![], &[80, 8080])])],
                &admin,
                8080,
                allowed(Some("shop/http")),
            ),
            (
                "port-only rule: another port is denied",
                vec![allow("http", vec![rule(vec![], &[80, 8080])])],
                &admin,
                9090,
                denied(DEFAULT_DENY),
            ),
            (
                "an operation with no ports matches any port",
                vec![allow(
                    "any",
                    vec![Rule {
                        from: vec![],
                        to: vec![Operation::default()],
                    }],
                )],
                &admin,
                1,
                allowed(Some("shop/any")),
            ),
            (
                "from AND to: the right source on the wrong port",
                vec![allow("cart-http", vec![rule(vec![principals(&[&cart])], &[80])])],
                &cart,
                8080,
                denied(DEFAULT_DENY),
            ),
            (
                "sources are ORed: the second one matches",
                vec![allow(
                    "two",
                    vec![rule(vec![principals(&[&admin]), namespaces(&["shop"])], &[])],
                )],
                &cart,
                8080,
                allowed(Some("shop/two")),
            ),
            (
                "rules are ORed: the second one matches",
                vec![allow(
                    "two",
                    vec![rule(vec![], &[80]), rule(vec![namespaces(&["ops"])], &[])],
                )],
                &admin,
                8080,
                allowed(Some("shop/two")),
            ),
            (
                "lists within a source are ANDed: both match",
                vec![allow("both", vec![rule(vec![both()], &[])])],
                &cart,
                8080,
                allowed(Some("shop/both")),
            ),
            (
                "lists within a source are ANDed: principal without namespace",
                vec![allow(
                    "both",
                    vec![rule(
                        vec![Source {
                            principals: vec![cart.clone()],
                            namespaces: vec!["ops".into()],
                        }],
                        &[],
                    )],
                )],
                &cart,
                8080,
                denied(DEFAULT_DENY),
            ),
            (
                "lists within a source are ANDed: namespace without principal",
                vec![allow("both", vec![rule(vec![both()], &[])])],
                &other_sa,
                8080,
                denied(DEFAULT_DENY),
            ),
            (
                "namespaces match the source identity's namespace",
                vec![allow("ops", vec![rule(vec![namespaces(&["x", "ops"])], &[])])],
                &admin,
                8080,
                allowed(Some("shop/ops")),
            ),
            (
                "namespace-wide selector applies to every workload of the namespace",
                vec![policy("shop", "ns", &[], Action::Deny, vec![Rule::default()])],
                &cart,
                8080,
                denied("shop/ns"),
            ),
            (
                "label selector that matches the workload",
                vec![policy(
                    "shop",
                    "web",
                    &[("app", "web")],
                    Action::Deny,
                    vec![Rule::default()],
                )],
                &cart,
                8080,
                denied("shop/web"),
            ),
            (
                "label selector for other workloads: ignored, default allow",
                vec![policy("shop", "db", &[("app", "db")], Action::Allow, vec![])],
                &cart,
                8080,
                allowed(None),
            ),
            (
                "other namespaces' policies are ignored",
                vec![
                    policy("ops", "deny", &[], Action::Deny, vec![Rule::default()]),
                    policy("ops", "allow", &[], Action::Allow, vec![]),
                ],
                &cart,
                8080,
                allowed(None),
            ),
            (
                "several ALLOW policies: the first that matches is named",
                vec![
                    allow("a-admin", vec![rule(vec![principals(&[&admin])], &[])]),
                    allow("b-http", vec![rule(vec![], &[8080])]),
                    allow("c-all", vec![Rule::default()]),
                ],
                &cart,
                8080,
                allowed(Some("shop/b-http")),
            ),
        ];
        let dst = web();
        for (what, policies, src, port, want) in cases {
            let got = authorize(&policies, &dst, src, port);
            assert_eq!(got, want, "{what}");
            assert_eq!(got.is_allowed(), matches!(want, Decision::Allow { .. }), "{what}");
        }
    }

    #[test]
    fn takes_the_configs_policy_map() {
        // How the proxy calls it: the node state's policies, by key.
        let policies: std::collections::BTreeMap<_, _> =
            [deny("b", vec![Rule::default()]), deny("a", vec![Rule::default()])]
                .into_iter()
                .map(|p| (p.key(), p))
                .collect();
        assert_eq!(
            authorize(policies.values(), &web(), &id("shop", "cart"), 80),
            denied("shop/a")
        );
    }

    #[test]
    fn plaintext_has_no_principal() {
        let frontend = id("shop", "frontend");
        let only_frontend = || allow("frontend", vec![rule(vec![principals(&[&frontend])], &[])]);
        // (what, policies, port, expected)
        let cases: Vec<(&str, Vec<Policy>, u16, Decision)> = vec![
            ("no policies: default allow", vec![], 8080, allowed(None)),
            (
                "an ALLOW for a principal admits no plaintext",
                vec![only_frontend()],
                8080,
                denied(DEFAULT_DENY),
            ),
            (
                "an ALLOW for a namespace admits no plaintext",
                vec![allow("shop-ns", vec![rule(vec![namespaces(&["shop"])], &[])])],
                8080,
                denied(DEFAULT_DENY),
            ),
            (
                "a source with an empty principal list and a namespace still needs the namespace",
                vec![allow(
                    "ns",
                    vec![rule(
                        vec![Source {
                            principals: vec![],
                            namespaces: vec!["shop".into()],
                        }],
                        &[8080],
                    )],
                )],
                8080,
                denied(DEFAULT_DENY),
            ),
            (
                "a port-only ALLOW admits plaintext on that port",
                vec![only_frontend(), allow("http", vec![rule(vec![], &[8080])])],
                8080,
                allowed(Some("shop/http")),
            ),
            (
                "... and not on another",
                vec![only_frontend(), allow("http", vec![rule(vec![], &[8080])])],
                9090,
                denied(DEFAULT_DENY),
            ),
            (
                "an empty ALLOW rule admits plaintext",
                vec![allow("all", vec![Rule::default()])],
                9,
                allowed(Some("shop/all")),
            ),
            (
                "a DENY by port holds for plaintext, before any ALLOW",
                vec![
                    allow("a-all", vec![Rule::default()]),
                    deny("z-port", vec![rule(vec![], &[9090])]),
                ],
                9090,
                denied("shop/z-port"),
            ),
            (
                "a DENY with an empty rule denies plaintext",
                vec![deny("all", vec![Rule::default()])],
                8080,
                denied("shop/all"),
            ),
            (
                "a DENY for a principal does not match plaintext",
                vec![deny(
                    "no-frontend",
                    vec![rule(vec![principals(&[&frontend])], &[])],
                )],
                8080,
                allowed(None),
            ),
            (
                "a DENY for a namespace does not match plaintext",
                vec![deny("no-ops", vec![rule(vec![namespaces(&["ops"])], &[])])],
                8080,
                allowed(None),
            ),
            (
                "rules are ORed: the port rule matches where the principal rule cannot",
                vec![allow(
                    "two",
                    vec![rule(vec![principals(&[&frontend])], &[]), rule(vec![], &[8080])],
                )],
                8080,
                allowed(Some("shop/two")),
            ),
            (
                "from AND to: a principal with a port does not match plaintext on that port",
                vec![allow(
                    "fe-http",
                    vec![rule(vec![principals(&[&frontend])], &[8080])],
                )],
                8080,
                denied(DEFAULT_DENY),
            ),
        ];
        let dst = web();
        for (what, policies, port, want) in cases {
            assert_eq!(authorize_plaintext(&policies, &dst, port), want, "{what}");
        }
        // The same policies still admit the authenticated frontend.
        assert_eq!(
            authorize(&[only_frontend()], &dst, &frontend, 8080),
            allowed(Some("shop/frontend"))
        );
    }
}
