//! YAML text → cluster state. Every object left out leaves a [`Problem`] naming the file,
//! the line its document starts on, the object and the field; the rest is kept. A policy
//! that does not convert is not left out but replaced by its fail-closed stand-in.

use std::collections::btree_map::{BTreeMap, Entry};
use std::fmt;

use mesh_api::manifests::{documents, Document};
use mesh_api::NamespacedName;
use serde::de::DeserializeOwned;
use serde_norway::Value;

use crate::cluster::ClusterState;
use crate::sources::objects::*;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    /// 1-based line where the object's document starts.
    pub line: usize,
    /// Such as `Pod shop/web-1`, when the document got that far.
    pub object: Option<String>,
    pub field: Option<String>,
    pub message: String,
    /// What is enforced in place of the object, when it is not simply left out: the
    /// fail-closed stand-in of a policy ([`crate::crd::fail_closed`]).
    pub fail_closed: Option<&'static str>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.file, self.line)?;
        if let Some(object) = &self.object {
            write!(f, "{object}: ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        write!(f, "{}; {}", self.message, self.fail_closed.unwrap_or("skipped"))
    }
}

/// Collects the objects of many files into one state.
#[derive(Default)]
pub struct Loader {
    state: ClusterState,
    problems: Vec<Problem>,
}

/// Where a document sits, for problems.
struct At<'a> {
    file: &'a str,
    line: usize,
}

impl Loader {
    pub fn add_file(&mut self, file: &str, text: &str) {
        for Document {
            first_line,
            text: document,
            ..
        } in documents(text)
        {
            let at = At {
                file,
                line: first_line + 1,
            };
            // Leading newlines keep the parser's line numbers those of the whole file.
            let padded = "\n".repeat(first_line) + document;
            match serde_norway::from_str::<Value>(&padded) {
                Ok(Value::Null) => {}
                Ok(value) => self.add_object(&at, "", value),
                Err(e) => self.problem(&at, None, None, e.to_string()),
            }
        }
    }

    pub fn finish(self) -> (ClusterState, Vec<Problem>) {
        (self.state, self.problems)
    }

    /// `prefix` locates objects inside a `List`, such as `items[3].`.
    fn add_object(&mut self, at: &At, prefix: &str, value: Value) {
        let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_owned();
        let (api_version, kind) = (text(value.get("apiVersion")), text(value.get("kind")));
        let meta = value.get("metadata");
        let (name, namespace) = (
            text(meta.and_then(|m| m.get("name"))),
            text(meta.and_then(|m| m.get("namespace"))),
        );
        let namespace = if namespace.is_empty() {
            "default".to_owned()
        } else {
            namespace
        };
        let object = match kind.as_str() {
            "" => None,
            "Namespace" | "List" => Some(format!("{kind} {name}")),
            _ => Some(format!("{kind} {namespace}/{name}")),
        };
        let key = NamespacedName::new(namespace, name);
        // What is enforced in place of an object that does not convert, when something is.
        let mut effect = None;
        let added = match (api_version.as_str(), kind.as_str()) {
            ("v1", "List") => {
                let items = value
                    .get("items")
                    .and_then(Value::as_sequence)
                    .cloned()
                    .unwrap_or_default();
                for (i, item) in items.into_iter().enumerate() {
                    self.add_object(at, &format!("{prefix}items[{i}]."), item);
                }
                Ok(())
            }
            ("v1", "Namespace") => decode::<NamespaceDoc>(value)
                .and_then(NamespaceDoc::into_namespace)
                .and_then(|ns| insert(&mut self.state.namespaces, ns.name.clone(), ns)),
            ("v1", "Pod") => decode::<PodDoc>(value)
                .and_then(PodDoc::into_pod)
                .and_then(|pod| match pod {
                    Some(pod) => insert(&mut self.state.pods, pod.uid.clone(), pod),
                    None => Ok(()),
                }),
            ("v1", "Service") => decode::<ServiceDoc>(value)
                .and_then(ServiceDoc::into_service)
                .and_then(|svc| insert(&mut self.state.services, key, svc)),
            ("discovery.k8s.io/v1", "EndpointSlice") => decode::<EndpointSliceDoc>(value)
                .and_then(EndpointSliceDoc::into_slice)
                .and_then(|slice| insert(&mut self.state.endpoint_slices, key, slice)),
            ("mesh.dev/v1alpha1", "AuthorizationPolicy") => {
                let read = match serde_json::to_value(&value) {
                    Ok(doc) => PolicyRead::from_doc(doc),
                    // Such as a map key that is not a string: nothing of the spec is readable.
                    Err(e) => PolicyRead::refused(
                        &key.namespace,
                        &key.name,
                        &serde_json::Value::Null,
                        Invalid::new("", e.to_string()),
                    ),
                };
                effect = read.effect();
                insert(&mut self.state.policies, key, read.enforced).and(read.invalid.map_or(Ok(()), Err))
            }
            _ => Err(Invalid {
                field: "kind".into(),
                message: format!("unsupported kind {kind:?} of apiVersion {api_version:?}"),
            }),
        };
        if let Err(Invalid { field, message }) = added {
            let field = if field.is_empty() {
                None
            } else {
                Some(format!("{prefix}{field}"))
            };
            self.problems.push(Problem {
                fail_closed: effect,
                ..self.problem_at(at, object, field, message)
            });
        }
    }

    fn problem(&mut self, at: &At, object: Option<String>, field: Option<String>, message: String) {
        let problem = self.problem_at(at, object, field, message);
        self.problems.push(problem);
    }

    fn problem_at(&self, at: &At, object: Option<String>, field: Option<String>, message: String) -> Problem {
        Problem {
            file: at.file.to_owned(),
            line: at.line,
            object,
            field,
            message,
            fail_closed: None,
        }
    }
}

fn decode<T: DeserializeOwned>(value: Value) -> Result<T, Invalid> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        // The path of an error at the top is ".", which says nothing.
        let field = if field == "." { String::new() } else { field };
        Invalid {
            field,
            message: e.into_inner().to_string(),
        }
    })
}

/// Keeps the first of two objects with one key, as the API server would never hold both.
fn insert<K: Ord, V>(map: &mut BTreeMap<K, V>, key: K, value: V) -> Result<(), Invalid> {
    match map.entry(key) {
        Entry::Occupied(_) => Err(Invalid {
            field: String::new(),
            message: "another object of this kind has the same key".into(),
        }),
        Entry::Vacant(slot) => {
            slot.insert(value);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests;
