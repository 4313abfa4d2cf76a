//! `meshctl enroll|unenroll NAMESPACE`: set or remove the namespace label the controller
//! enrolls pods by, either on the cluster's Namespace (a JSON merge patch through the
//! Kubernetes API) or on the Namespace object in the controller's local-file source directory.
//!
//! In a source directory only the one YAML document holding the Namespace is rewritten (its
//! comments are lost, its other fields kept); every other byte of the file stays as it was. The
//! file is replaced by a rename, so the controller never reads half of it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, Patch, PatchParams};
use mesh_api::manifests;
use serde_norway::{Mapping, Value};

/// The namespace label the controller enrolls pods by (`mesh.dev/enroll=true`).
pub const ENROLL_LABEL: &str = "mesh.dev/enroll";
/// The controller reads no deeper than this into a source directory, nor do we.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Enroll,
    Unenroll,
}

impl Change {
    /// The label value this change leaves: `true`, or none.
    fn wanted(self) -> Option<&'static str> {
        match self {
            Change::Enroll => Some("true"),
            Change::Unenroll => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub namespace: String,
    pub change: Change,
    /// Whether anything had to be written.
    pub changed: bool,
    /// Where: `the cluster`, or the file written.
    pub place: String,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ns = &self.namespace;
        match (self.change, self.changed) {
            (Change::Enroll, true) => write!(
                f,
                "namespace {ns} enrolled ({ENROLL_LABEL}=true) in {}",
                self.place
            ),
            (Change::Enroll, false) => write!(f, "namespace {ns} is already enrolled in {}", self.place),
            (Change::Unenroll, true) => write!(
                f,
                "namespace {ns} unenrolled ({ENROLL_LABEL} removed) in {}",
                self.place
            ),
            (Change::Unenroll, false) => write!(f, "namespace {ns} is not enrolled in {}", self.place),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("no Kubernetes configuration: {0} (set KUBECONFIG, or use --source-dir for a local controller)")]
    KubeConfig(String),
    #[error("namespace {0} does not exist in the cluster")]
    NoSuchNamespace(String),
    #[error("the Kubernetes API refused to {verb} namespace {namespace}: {message} (meshctl needs get and patch on namespaces)")]
    Forbidden {
        verb: &'static str,
        namespace: String,
        message: String,
    },
    #[error("the Kubernetes API failed to {verb} namespace {namespace}: {message}")]
    Kube {
        verb: &'static str,
        namespace: String,
        message: String,
    },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {reason}", path.display())]
    Manifest { path: PathBuf, reason: String },
}

/// `DNS-1123` label: what Kubernetes accepts as a namespace name (and safe in a file name).
pub fn parse_namespace(value: &str) -> Result<String, String> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(value.to_owned())
    } else {
        Err(format!(
            "{value:?} is not a namespace name: lowercase letters, digits and '-', at most 63"
        ))
    }
}

fn kube_error(verb: &'static str, namespace: &str, e: kube::Error) -> EnrollError {
    match e {
        kube::Error::Api(status) if status.code == 403 => EnrollError::Forbidden {
            verb,
            namespace: namespace.to_owned(),
            message: status.message,
        },
        kube::Error::Api(status) => EnrollError::Kube {
            verb,
            namespace: namespace.to_owned(),
            message: format!("{} ({})", status.message, status.code),
        },
        other => EnrollError::Kube {
            verb,
            namespace: namespace.to_owned(),
            message: other.to_string(),
        },
    }
}

/// A client from the kubeconfig (its `context`, or the current one) or the pod's account.
pub async fn kube_client(context: Option<&str>) -> Result<kube::Client, EnrollError> {
    // kube asks rustls for the process's crypto provider, and a workspace build may compile
    // in more than one, leaving none chosen.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut config = match context {
        Some(context) => {
            let options = kube::config::KubeConfigOptions {
                context: Some(context.to_owned()),
                ..Default::default()
            };
            kube::Config::from_kubeconfig(&options)
                .await
                .map_err(|e| EnrollError::KubeConfig(e.to_string()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| EnrollError::KubeConfig(e.to_string()))?,
    };
    // An operator waits at the prompt: fail in seconds, not after kube's long defaults.
    config.connect_timeout = Some(Duration::from_secs(10));
    config.read_timeout = Some(Duration::from_secs(30));
    kube::Client::try_from(config).map_err(|e| EnrollError::KubeConfig(e.to_string()))
}

/// Labels (or unlabels) the cluster's Namespace, if it is not already so.
pub async fn in_cluster(
    client: kube::Client,
    namespace: &str,
    change: Change,
) -> Result<Outcome, EnrollError> {
    let api: Api<Namespace> = Api::all(client);
    let current = api
        .get_opt(namespace)
        .await
        .map_err(|e| kube_error("get", namespace, e))?
        .ok_or_else(|| EnrollError::NoSuchNamespace(namespace.to_owned()))?;
    let label = current
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(ENROLL_LABEL))
        .map(String::as_str);
    let mut outcome = Outcome {
        namespace: namespace.to_owned(),
        change,
        changed: false,
        place: "the cluster".into(),
    };
    if label == change.wanted() {
        return Ok(outcome);
    }
    // A merge patch touches this one label; `null` removes it.
    let patch = serde_json::json!({ "metadata": { "labels": { ENROLL_LABEL: change.wanted() } } });
    let params = PatchParams {
        field_manager: Some("meshctl".into()),
        ..PatchParams::default()
    };
    api.patch(namespace, &params, &Patch::Merge(&patch))
        .await
        .map_err(|e| kube_error("patch", namespace, e))?;
    outcome.changed = true;
    Ok(outcome)
}

/// Labels (or unlabels) the Namespace in a controller source directory: the first one the
/// controller would read (files in path order, documents in file order); a new file
/// `namespace-NAME.yaml` when there is none and it is to be enrolled.
pub fn in_source_dir(dir: &Path, namespace: &str, change: Change) -> Result<Outcome, EnrollError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| EnrollError::Io { path, source }
    };
    std::fs::read_dir(dir).map_err(io(dir))?;
    let (files, _) = manifests::files(dir);
    let mut outcome = Outcome {
        namespace: namespace.to_owned(),
        change,
        changed: false,
        place: dir.display().to_string(),
    };
    for path in files {
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let Some(edit) = edit_text(&text, namespace, change).map_err(|reason| EnrollError::Manifest {
            path: path.clone(),
            reason,
        })?
        else {
            continue;
        };
        outcome.place = path.display().to_string();
        if let Some(new_text) = edit {
            replace_file(&path, &new_text)?;
            outcome.changed = true;
        }
        return Ok(outcome);
    }
    if change == Change::Unenroll {
        return Ok(outcome);
    }
    let path = dir.join(format!("namespace-{namespace}.yaml"));
    let mut object = namespace_object(namespace);
    set_label(&mut object, change).map_err(|reason| EnrollError::Manifest {
        path: path.clone(),
        reason,
    })?;
    let text = serde_norway::to_string(&object).map_err(|e| EnrollError::Manifest {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    // `create_new`: a file of that name that holds no Namespace is someone else's.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
        .map_err(io(&path))?;
    outcome.place = path.display().to_string();
    outcome.changed = true;
    Ok(outcome)
}

/// Writes `text` over `path` by a rename from a hidden file beside it (which the controller
/// skips), keeping the file's permissions.
fn replace_file(path: &Path, text: &str) -> Result<(), EnrollError> {
    let real = std::fs::canonicalize(path).map_err(|source| EnrollError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let name = real
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = real.with_file_name(format!(".{name}.meshctl-{}", std::process::id()));
    let result = (|| {
        std::fs::write(&tmp, text)?;
        let permissions = std::fs::metadata(&real)?.permissions();
        std::fs::set_permissions(&tmp, permissions)?;
        std::fs::rename(&tmp, &real)
    })();
    result.map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        EnrollError::Io { path: real, source }
    })
}

fn namespace_object(name: &str) -> Value {
    let mut metadata = Mapping::new();
    metadata.insert("name".into(), name.into());
    let mut object = Mapping::new();
    object.insert("apiVersion".into(), "v1".into());
    object.insert("kind".into(), "Namespace".into());
    object.insert("metadata".into(), Value::Mapping(metadata));
    Value::Mapping(object)
}

/// Where the Namespace `name` is in a file and what its new text is: `None` when the file
/// holds no such Namespace, `Some(None)` when it is there and already as wanted.
pub fn edit_text(text: &str, name: &str, change: Change) -> Result<Option<Option<String>>, String> {
    for doc in manifests::documents(text) {
        let (start, end, document) = (doc.start, doc.start + doc.text.len(), doc.text);
        // Documents the controller cannot read are skipped by it too.
        let Ok(mut value) = serde_norway::from_str::<Value>(document) else {
            continue;
        };
        let Some(object) = find_namespace(&mut value, name) else {
            continue;
        };
        if !set_label(object, change)? {
            return Ok(Some(None));
        }
        let yaml = serde_norway::to_string(&value).map_err(|e| e.to_string())?;
        let keep = preamble(document);
        let new = format!("{}{}{yaml}{}", &text[..start], &document[..keep], &text[end..]);
        return Ok(Some(Some(new)));
    }
    Ok(None)
}

/// The leading comment and blank lines of a document, with its `---` marker: kept as written.
fn preamble(document: &str) -> usize {
    let mut keep = 0;
    for line in document.split_inclusive('\n') {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') || t == "---" {
            keep += line.len();
        } else {
            break;
        }
    }
    keep
}

fn text_of<'v>(value: &'v Value, key: &str) -> Option<&'v str> {
    value.get(key).and_then(Value::as_str)
}

/// The Namespace `name` in a document: the document itself, or an item of a `v1 List`.
fn find_namespace<'v>(value: &'v mut Value, name: &str) -> Option<&'v mut Value> {
    let is_it = |v: &Value| {
        text_of(v, "apiVersion") == Some("v1")
            && text_of(v, "kind") == Some("Namespace")
            && v.get("metadata").and_then(|m| text_of(m, "name")) == Some(name)
    };
    if is_it(value) {
        return Some(value);
    }
    if text_of(value, "apiVersion") == Some("v1") && text_of(value, "kind") == Some("List") {
        return value
            .get_mut("items")
            .and_then(Value::as_sequence_mut)?
            .iter_mut()
            .find(|item| is_it(item));
    }
    None
}

/// Sets or removes the label on a Namespace object; whether anything changed.
fn set_label(object: &mut Value, change: Change) -> Result<bool, String> {
    let metadata = object
        .get_mut("metadata")
        .and_then(Value::as_mapping_mut)
        .ok_or("the Namespace's metadata is not a mapping")?;
    if !metadata.contains_key("labels") || metadata.get("labels") == Some(&Value::Null) {
        if change.wanted().is_none() {
            return Ok(false);
        }
        metadata.insert("labels".into(), Value::Mapping(Mapping::new()));
    }
    let labels = metadata
        .get_mut("labels")
        .and_then(Value::as_mapping_mut)
        .ok_or("the Namespace's metadata.labels is not a mapping")?;
    let current = labels.get(ENROLL_LABEL);
    match change.wanted() {
        Some(want) if current.and_then(Value::as_str) == Some(want) => Ok(false),
        // A string, quoted: the API (and the controller) refuse a YAML boolean as a label.
        Some(want) => {
            labels.insert(ENROLL_LABEL.into(), Value::String(want.into()));
            Ok(true)
        }
        None => Ok(labels.shift_remove(ENROLL_LABEL).is_some()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
# the shop
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, uid: u1}
spec: {nodeName: node-a}
---
# enrolled by meshctl
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    team: blue
---
apiVersion: v1
kind: Namespace
metadata: {name: other}
";

    #[test]
    fn enrolling_rewrites_only_the_namespace_document() {
        let new = edit_text(FILE, "shop", Change::Enroll).unwrap().unwrap().unwrap();
        let (before, rest) = FILE.split_once("---\n").unwrap();
        assert!(
            new.starts_with(&format!("{before}---\n# enrolled by meshctl\n")),
            "{new}"
        );
        assert!(
            new.ends_with("---\napiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n"),
            "{new}"
        );
        assert!(rest.contains("team: blue"));
        let doc: Value = serde_norway::from_str(new.split("---\n").nth(1).unwrap()).unwrap();
        assert_eq!(doc["metadata"]["labels"]["team"], Value::from("blue"));
        assert_eq!(doc["metadata"]["labels"][ENROLL_LABEL], Value::from("true"));
        assert!(new.contains("mesh.dev/enroll: 'true'") || new.contains("mesh.dev/enroll: \"true\""));

        // Again: nothing to do.
        assert_eq!(edit_text(&new, "shop", Change::Enroll).unwrap(), Some(None));
        // And back: the label goes, the rest stays.
        let back = edit_text(&new, "shop", Change::Unenroll)
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(!back.contains(ENROLL_LABEL), "{back}");
        assert!(back.contains("team: blue"), "{back}");
        assert_eq!(edit_text(&back, "shop", Change::Unenroll).unwrap(), Some(None));
    }

    #[test]
    fn a_namespace_without_labels_or_in_a_list() {
        let new = edit_text(FILE, "other", Change::Enroll)
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(new.starts_with(&FILE[..FILE.rfind("---").unwrap()]));
        assert!(new.ends_with("labels:\n    mesh.dev/enroll: 'true'\n"), "{new}");
        assert_eq!(edit_text(FILE, "other", Change::Unenroll).unwrap(), Some(None));

        let list = "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: shop}}\n";
        let new = edit_text(list, "shop", Change::Enroll).unwrap().unwrap().unwrap();
        let value: Value = serde_norway::from_str(&new).unwrap();
        assert_eq!(
            value["items"][0]["metadata"]["labels"][ENROLL_LABEL],
            Value::from("true")
        );
        assert_eq!(edit_text(list, "absent", Change::Enroll).unwrap(), None);
    }

    #[test]
    fn a_boolean_label_becomes_a_string() {
        let text =
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels: {mesh.dev/enroll: true}\n";
        let new = edit_text(text, "shop", Change::Enroll).unwrap().unwrap().unwrap();
        let value: Value = serde_norway::from_str(&new).unwrap();
        assert_eq!(value["metadata"]["labels"][ENROLL_LABEL], Value::from("true"));
    }

    #[test]
    fn malformed_objects_are_reported_and_unreadable_documents_skipped() {
        let bad = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels: [a]\n";
        assert!(edit_text(bad, "shop", Change::Enroll)
            .unwrap_err()
            .contains("labels"));
        let broken = "a: [\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n";
        let new = edit_text(broken, "shop", Change::Enroll)
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(new.starts_with("a: [\n---\n"), "{new}");
    }

    #[test]
    fn namespace_names() {
        assert!(parse_namespace("shop").is_ok());
        assert!(parse_namespace("team-7").is_ok());
        for bad in ["", "Shop", "-a", "a-", "a/b", "../x", &"a".repeat(64)] {
            assert!(parse_namespace(bad).is_err(), "{bad}");
        }
    }
}
