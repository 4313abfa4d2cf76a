//! The generated CRD against the checked-in YAML, the schema's patterns against the Rust
//! checks, and the CEL rules (run client-side by kube's CEL engine) against the examples
//! and the refusals in `daemonset/`.

use std::path::{Path, PathBuf};

use regex::Regex;
use serde_json::Value;

use super::*;
use crate::cluster::Invalid;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

#[test]
fn checked_in_crds_are_what_the_code_generates() {
    let dir = repo().join("daemonset/base/crds");
    let files = crd_files();
    for file in &files {
        let path = dir.join(&file.name);
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            on_disk == file.yaml,
            "{} differs from what mesh-controller/src/crd generates: run `cargo xtask manifests`",
            path.display()
        );
    }
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect();
    names.sort();
    let mut want: Vec<String> = files.iter().map(|f| f.name.clone()).collect();
    want.sort();
    assert_eq!(names, want, "stale CRD files in {}", dir.display());
}

fn anchored(pattern: &str) -> Regex {
    Regex::new(pattern).unwrap()
}

#[test]
fn port_pattern_and_bounds_agree_with_the_rust_check() {
    let re = anchored(PORT_PATTERN);
    for n in 0..=70_000i64 {
        let text = n.to_string();
        let rust = PortSpec::Text(text.clone()).number();
        assert_eq!(re.is_match(&text), rust.is_some(), "{text}");
        assert_eq!(
            PortSpec::Number(n).number().is_some(),
            (1..=65535).contains(&n),
            "{n}"
        );
    }
    for s in [
        "", "080", "+80", "-1", " 80", "80 ", "8o", "0x50", "65536", "99999",
    ] {
        assert!(!re.is_match(s), "{s:?}");
        assert_eq!(PortSpec::Text(s.into()).number(), None, "{s:?}");
    }
}

#[test]
fn principal_pattern_agrees_with_the_rust_check() {
    let re = anchored(PRINCIPAL_PATTERN);
    let long_td = "a".repeat(256);
    let cases = [
        "cluster.local/ns/shop/sa/web",
        "spiffe://cluster.local/ns/shop/sa/web",
        "spiffe://a_b-c.9/ns/Ns.-_9/sa/SA",
        "td/ns/.../sa/b",
        "td/ns/.a/sa/..b",
        "td/ns/./sa/b",
        "td/ns/../sa/b",
        "td/ns/a/sa/.",
        "td/ns//sa/b",
        "Cluster.local/ns/a/sa/b",
        "td:443/ns/a/sa/b",
        "user@td/ns/a/sa/b",
        "td/ns/a/sa/b/",
        "td/ns/a/sa",
        "td/ns/a/sa/b/c",
        "td/namespace/a/sa/b",
        "td/ns/a/sa/b?x=1",
        "td/ns/a%20/sa/b",
        "http://td/ns/a/sa/b",
        "spiffe:///ns/a/sa/b",
        "*",
        "td/ns/*/sa/b",
        "td/ns/a/sa/b*",
        &format!("{long_td}/ns/a/sa/b"),
    ];
    for p in cases {
        let spec = spec_with_principal(p);
        let rust = to_policy("shop", "p", &spec).is_ok();
        assert_eq!(re.is_match(p), rust, "{p}");
    }
}

fn spec_with_principal(p: &str) -> AuthorizationPolicySpec {
    AuthorizationPolicySpec {
        rules: vec![RuleSpec {
            from: vec![RuleFrom {
                source: SourceSpec {
                    principals: vec![p.to_owned()],
                    namespaces: vec![],
                },
            }],
            to: vec![],
        }],
        ..AuthorizationPolicySpec::default()
    }
}

#[test]
fn namespace_pattern_agrees_with_the_rust_check() {
    let re = anchored(NAMESPACE_PATTERN);
    let long = "a".repeat(64);
    for ns in ["ops", "a", "a-b", "0", "-a", "a-", "A", "a.b", "a_b", "", &long] {
        let spec = AuthorizationPolicySpec {
            rules: vec![RuleSpec {
                from: vec![RuleFrom {
                    source: SourceSpec {
                        principals: vec![],
                        namespaces: vec![ns.to_owned()],
                    },
                }],
                to: vec![],
            }],
            ..AuthorizationPolicySpec::default()
        };
        let schema_ok = re.is_match(ns) && ns.len() <= 63;
        assert_eq!(schema_ok, to_policy("shop", "p", &spec).is_ok(), "{ns:?}");
    }
}

#[test]
fn selector_keys_the_schema_cannot_check_are_refused_here() {
    let with_key = |k: &str, v: &str| AuthorizationPolicySpec {
        selector: WorkloadSelector {
            match_labels: [(k.to_owned(), v.to_owned())].into(),
        },
        ..AuthorizationPolicySpec::default()
    };
    assert!(to_policy("s", "p", &with_key("app", "web")).is_ok());
    assert!(to_policy("s", "p", &with_key("app.kubernetes.io/name", "web")).is_ok());
    assert!(to_policy("s", "p", &with_key("app", "")).is_ok());
    for (k, v) in [
        ("-app", "web"),
        ("app/", "web"),
        ("/app", "web"),
        ("a/b/c", "x"),
        ("app", "-web"),
        ("", "x"),
    ] {
        let err: Invalid = to_policy("s", "p", &with_key(k, v)).unwrap_err();
        assert!(err.field.starts_with("spec.selector.matchLabels."), "{k}: {err}");
    }
}

/// The CRD's `openAPIV3Schema`, as JSON.
fn openapi_schema() -> Value {
    let crd = serde_json::to_value(AuthorizationPolicy::crd()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

fn rules(schema: &Value, out: &mut Vec<(String, Value)>) {
    match schema {
        Value::Object(map) => {
            if let Some(Value::Array(list)) = map.get("x-kubernetes-validations") {
                for rule in list {
                    out.push((rule["rule"].as_str().unwrap().to_owned(), schema.clone()));
                }
            }
            map.values().for_each(|v| rules(v, out));
        }
        Value::Array(list) => list.iter().for_each(|v| rules(v, out)),
        _ => {}
    }
}

#[test]
fn cel_rules_compile_and_stay_within_the_cost_budget() {
    use kube::core::cel::{analyze_rule, compile_schema, ScopeContext};
    let schema = openapi_schema();
    let compiled = compile_schema(&schema);
    assert!(!compiled.has_errors(), "{:?}", compiled.compilation_errors());
    let mut found = Vec::new();
    rules(&schema, &mut found);
    assert!(found.len() >= 2, "{found:?}");
    for (rule, node) in found {
        let warnings = analyze_rule(&rule, &compile_schema(&node), ScopeContext::CrdValidation);
        assert!(warnings.is_empty(), "{rule}: {warnings:?}");
    }
}

/// The documents of every YAML file in `dir`.
fn documents(dir: &Path) -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_norway::Deserializer::from_str(&text) {
            let value: Value = serde::Deserialize::deserialize(doc).unwrap();
            if !value.is_null() {
                out.push((path.file_name().unwrap().to_string_lossy().into_owned(), value));
            }
        }
    }
    out
}

fn is_policy(doc: &Value) -> bool {
    doc["apiVersion"] == "mesh.dev/v1alpha1" && doc["kind"] == "AuthorizationPolicy"
}

fn convert(doc: &Value) -> Result<mesh_api::Policy, Invalid> {
    let spec: AuthorizationPolicySpec =
        serde_json::from_value(doc["spec"].clone()).map_err(|e| Invalid::new("spec", e.to_string()))?;
    let ns = doc["metadata"]["namespace"].as_str().unwrap_or("default");
    to_policy(ns, doc["metadata"]["name"].as_str().unwrap(), &spec)
}

#[test]
fn examples_pass_cel_and_convert() {
    let schema = openapi_schema();
    let examples = documents(&repo().join("daemonset/examples"));
    let policies: Vec<_> = examples.iter().filter(|(_, d)| is_policy(d)).collect();
    assert!(policies.len() >= 3, "examples of AuthorizationPolicy");
    for (file, doc) in policies {
        if let Err(errors) = kube::core::cel::Validator::new().validate(&schema, doc, None) {
            panic!("{file}: {errors:?}");
        }
        if let Err(e) = convert(doc) {
            panic!("{file}: {e}");
        }
    }
}

/// `daemonset/validate/invalid-policies.yaml`: each document says, in the annotation
/// `validate.mesh.dev/refused-by`, what refuses it: `schema` (checked by the manifest
/// validation in Python), `cel` (checked here) or `controller` (schema and CEL admit it;
/// the controller refuses it whole, `Accepted=False`). All of them, the controller refuses.
#[test]
fn refusals_are_refused_where_they_say() {
    let schema = openapi_schema();
    let docs = documents(&repo().join("daemonset/validate"));
    let mut seen = std::collections::BTreeSet::new();
    for (file, doc) in docs.iter().filter(|(_, d)| is_policy(d)) {
        let name = doc["metadata"]["name"].as_str().unwrap();
        let by = doc["metadata"]["annotations"]["validate.mesh.dev/refused-by"]
            .as_str()
            .unwrap_or_else(|| panic!("{file} {name}: no refused-by annotation"));
        seen.insert(by.to_owned());
        assert!(convert(doc).is_err(), "{file} {name}: the controller accepts it");
        let cel = kube::core::cel::Validator::new().validate(&schema, doc, None);
        match by {
            "cel" => assert!(cel.is_err(), "{file} {name}: CEL admits it"),
            "controller" => assert!(cel.is_ok(), "{file} {name}: {cel:?}"),
            "schema" => {}
            other => panic!("{file} {name}: refused-by {other:?}"),
        }
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["cel", "controller", "schema"]
    );
}
