//! The `baggage` header of an HBONE `CONNECT`, as Istio's ztunnel writes and reads it: W3C
//! baggage members naming the source workload, so a peer that cannot find the source in its own
//! state (a ztunnel, or this proxy for a pod it is not told about) can still label its metrics.
//!
//! ```text
//! baggage: k8s.cluster.name=C,k8s.namespace.name=shop,k8s.deployment.name=web,service.name=web,service.version=v1
//! ```
//!
//! The workload key is `k8s.<kind>.name` with kind `deployment`, `cronjob`, `job` or `pod`;
//! members without a value are left out. The values are Kubernetes names and label values,
//! which need no percent-encoding. What a peer sends is its own word: parsing is bounded, and
//! the result names a source in metrics only, never in policy.
use std::fmt;

use mesh_api::Workload;

/// The header name.
pub const BAGGAGE: &str = "baggage";

/// Bounds on what is read from a peer: all `baggage` values together, and their members.
pub const MAX_BYTES: usize = 2048;
pub const MAX_MEMBERS: usize = 32;
/// The longest value kept: a Kubernetes object name (DNS subdomain).
const MAX_VALUE: usize = 253;

/// The labels Istio takes a workload's canonical service name and revision from, in order.
const NAME_LABELS: [&str; 3] = ["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"];
const REVISION_LABELS: [&str; 3] = [
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/version",
    "version",
];
/// Istio's revision when no label gives one.
const DEFAULT_REVISION: &str = "latest";

/// What created a pod, as the baggage key names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkloadKind {
    Deployment,
    CronJob,
    Job,
    /// A bare pod, or one of a controller without a key of its own (DaemonSet, StatefulSet).
    Pod,
}

impl WorkloadKind {
    fn key(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "k8s.deployment.name",
            WorkloadKind::CronJob => "k8s.cronjob.name",
            WorkloadKind::Job => "k8s.job.name",
            WorkloadKind::Pod => "k8s.pod.name",
        }
    }

    fn from_key(key: &str) -> Option<WorkloadKind> {
        [
            WorkloadKind::Deployment,
            WorkloadKind::CronJob,
            WorkloadKind::Job,
            WorkloadKind::Pod,
        ]
        .into_iter()
        .find(|k| k.key() == key)
    }
}

/// The source workload as the baggage describes it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Baggage {
    pub cluster: Option<String>,
    pub namespace: Option<String>,
    pub workload: Option<(WorkloadKind, String)>,
    /// The canonical service (`service.name`).
    pub service: Option<String>,
    /// The canonical revision (`service.version`).
    pub version: Option<String>,
}

/// Why a peer's baggage was ignored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BaggageError {
    #[error("longer than {MAX_BYTES} bytes")]
    TooLong,
    #[error("more than {MAX_MEMBERS} members")]
    TooManyMembers,
    #[error("not visible ASCII")]
    NotAscii,
}

impl Baggage {
    /// The baggage of a pod, from what the node knows of it: its namespace, the workload that
    /// created it (from the labels its controller sets) and its canonical service and revision
    /// (from the labels Istio reads, with Istio's fallbacks). The node is not told the cluster's
    /// name, so `k8s.cluster.name` is left out, as ztunnel leaves out what it does not know.
    pub fn of(w: &Workload) -> Baggage {
        let (kind, name) = workload_of(w);
        let label = |keys: &[&str]| {
            keys.iter()
                .find_map(|k| w.labels.get(*k).filter(|v| !v.is_empty()))
                .cloned()
        };
        Baggage {
            cluster: None,
            namespace: Some(w.namespace.clone()),
            service: Some(label(&NAME_LABELS).unwrap_or_else(|| name.clone())),
            version: Some(label(&REVISION_LABELS).unwrap_or_else(|| DEFAULT_REVISION.into())),
            workload: Some((kind, name)),
        }
    }

    /// Reads the `baggage` values of a request: members this module does not know are skipped,
    /// and so are known ones whose value is not a plausible Kubernetes name; anything over the
    /// bounds, or not text, makes the whole header ignored.
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Result<Baggage, BaggageError> {
        let mut out = Baggage::default();
        let (mut bytes, mut members) = (0usize, 0usize);
        for value in values {
            bytes += value.len();
            if bytes > MAX_BYTES {
                return Err(BaggageError::TooLong);
            }
            let text = std::str::from_utf8(value).map_err(|_| BaggageError::NotAscii)?;
            if !text.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b)) {
                return Err(BaggageError::NotAscii);
            }
            for member in text.split(',').filter(|m| !m.trim().is_empty()) {
                members += 1;
                if members > MAX_MEMBERS {
                    return Err(BaggageError::TooManyMembers);
                }
                // `key=value;property...`: properties carry nothing ztunnel reads.
                let pair = member.split(';').next().unwrap_or_default();
                let Some((key, value)) = pair.split_once('=') else {
                    continue;
                };
                let value = value.trim();
                if !plausible(value) {
                    continue;
                }
                let value = Some(value.to_owned());
                match key.trim() {
                    "k8s.cluster.name" => out.cluster = value,
                    "k8s.namespace.name" => out.namespace = value,
                    "service.name" => out.service = value,
                    "service.version" => out.version = value,
                    key => {
                        if let Some(kind) = WorkloadKind::from_key(key) {
                            out.workload = value.map(|v| (kind, v));
                        }
                    }
                }
            }
        }
        Ok(out)
    }
}

/// The header value, in ztunnel's order; members without a value, or with one that could not
/// be read back, are left out.
impl fmt::Display for Baggage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let workload = self.workload.as_ref().map(|(k, n)| (k.key(), Some(n)));
        let members = [
            ("k8s.cluster.name", self.cluster.as_ref()),
            ("k8s.namespace.name", self.namespace.as_ref()),
        ]
        .into_iter()
        .chain(workload)
        .chain([
            ("service.name", self.service.as_ref()),
            ("service.version", self.version.as_ref()),
        ]);
        let mut first = true;
        for (key, value) in members {
            let Some(value) = value.filter(|v| plausible(v)) else {
                continue;
            };
            if !first {
                f.write_str(",")?;
            }
            first = false;
            write!(f, "{key}={value}")?;
        }
        Ok(())
    }
}

/// A Kubernetes name or label value: what the members carry, and nothing that needs
/// percent-encoding or could grow a metric label without bound.
fn plausible(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= MAX_VALUE
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

/// The workload that created a pod, Istio's way (by its controller), read from the labels the
/// controllers set since the node is not told the pod's owner: a ReplicaSet's
/// `pod-template-hash` in `<deployment>-<hash>-<suffix>` names a Deployment; a Job's
/// `batch.kubernetes.io/job-name` (or `job-name`) names the Job, or its CronJob when it ends in
/// the CronJob's 8-10 digit schedule stamp; a DaemonSet's or StatefulSet's
/// `controller-revision-hash` names the controller by the pod name without its last segment,
/// as a pod (ztunnel has no key for them). Anything else is a pod by its own name.
fn workload_of(w: &Workload) -> (WorkloadKind, String) {
    let label = |k: &str| w.labels.get(k).filter(|v| !v.is_empty());
    if let Some(hash) = label("pod-template-hash") {
        let deployment = w
            .name
            .rsplit_once('-')
            .and_then(|(rs, _)| rs.strip_suffix(hash.as_str()))
            .and_then(|d| d.strip_suffix('-'))
            .filter(|d| !d.is_empty());
        if let Some(d) = deployment {
            return (WorkloadKind::Deployment, d.to_owned());
        }
    }
    if let Some(job) = label("batch.kubernetes.io/job-name").or_else(|| label("job-name")) {
        let cronjob = job
            .rsplit_once('-')
            .filter(|(c, stamp)| {
                !c.is_empty() && (8..=10).contains(&stamp.len()) && stamp.bytes().all(|b| b.is_ascii_digit())
            })
            .map(|(c, _)| c);
        return match cronjob {
            Some(c) => (WorkloadKind::CronJob, c.to_owned()),
            None => (WorkloadKind::Job, job.clone()),
        };
    }
    if label("controller-revision-hash").is_some() {
        if let Some((controller, _)) = w.name.rsplit_once('-').filter(|(c, _)| !c.is_empty()) {
            return (WorkloadKind::Pod, controller.to_owned());
        }
    }
    (WorkloadKind::Pod, w.name.clone())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn pod(name: &str, labels: &[(&str, &str)]) -> Workload {
        Workload {
            uid: "uid-1".into(),
            name: name.into(),
            namespace: "shop".into(),
            node: "a".into(),
            service_account: "web".into(),
            identity: "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap(),
            ips: vec!["10.0.0.5".parse().unwrap()],
            enrolled: true,
            mtls_mode: mesh_api::MtlsMode::Strict,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
        }
    }

    fn parse(values: &[&str]) -> Result<Baggage, BaggageError> {
        Baggage::parse(values.iter().map(|v| v.as_bytes()))
    }

    #[test]
    fn a_deployments_pod_is_named_as_ztunnel_names_it() {
        let w = pod(
            "web-7d4b9c8f6-x2k9q",
            &[
                ("pod-template-hash", "7d4b9c8f6"),
                ("app", "web"),
                ("version", "v2"),
            ],
        );
        assert_eq!(
            Baggage::of(&w).to_string(),
            "k8s.namespace.name=shop,k8s.deployment.name=web,service.name=web,service.version=v2"
        );
    }

    #[test]
    fn canonical_labels_win_and_fall_back_like_istio() {
        let w = pod(
            "api-0",
            &[
                ("service.istio.io/canonical-name", "orders"),
                ("app.kubernetes.io/name", "api"),
                ("app", "x"),
                ("app.kubernetes.io/version", "1.2.3"),
                ("controller-revision-hash", "api-5d8f"),
            ],
        );
        let b = Baggage::of(&w);
        assert_eq!(b.workload, Some((WorkloadKind::Pod, "api".into())));
        assert_eq!(b.service.as_deref(), Some("orders"));
        assert_eq!(b.version.as_deref(), Some("1.2.3"));
        // No label: the workload's name and Istio's "latest".
        let b = Baggage::of(&pod("lonely", &[]));
        assert_eq!(
            b.to_string(),
            "k8s.namespace.name=shop,k8s.pod.name=lonely,service.name=lonely,service.version=latest"
        );
    }

    #[test]
    fn jobs_and_cronjobs() {
        let job = pod("migrate-abcde", &[("batch.kubernetes.io/job-name", "migrate")]);
        assert_eq!(
            Baggage::of(&job).workload,
            Some((WorkloadKind::Job, "migrate".into()))
        );
        let cron = pod("backup-28471230-x1y2z", &[("job-name", "backup-28471230")]);
        assert_eq!(
            Baggage::of(&cron).workload,
            Some((WorkloadKind::CronJob, "backup".into()))
        );
        // A pod-template-hash that is not in the name does not make a Deployment.
        let odd = pod("web-x2k9q", &[("pod-template-hash", "7d4b9c8f6")]);
        assert_eq!(
            Baggage::of(&odd).workload,
            Some((WorkloadKind::Pod, "web-x2k9q".into()))
        );
    }

    #[test]
    fn what_ztunnel_sends_is_read_back() {
        let z = "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.deployment.name=web,service.name=web,service.version=v1";
        let b = parse(&[z]).unwrap();
        assert_eq!(b.cluster.as_deref(), Some("Kubernetes"));
        assert_eq!(b.namespace.as_deref(), Some("shop"));
        assert_eq!(b.workload, Some((WorkloadKind::Deployment, "web".into())));
        assert_eq!(b.service.as_deref(), Some("web"));
        assert_eq!(b.version.as_deref(), Some("v1"));
        assert_eq!(b.to_string(), z);
        // Split over several header lines, with spaces and properties, as W3C allows.
        let split = parse(&[
            "k8s.namespace.name = shop ;p=1",
            " k8s.cronjob.name=nightly , other=%20x",
        ])
        .unwrap();
        assert_eq!(split.namespace.as_deref(), Some("shop"));
        assert_eq!(split.workload, Some((WorkloadKind::CronJob, "nightly".into())));
        assert_eq!(parse(&[]).unwrap(), Baggage::default());
    }

    #[test]
    fn garbage_is_bounded_and_skipped() {
        // Empty or implausible values of known keys are skipped, the rest is kept.
        let b = parse(&["k8s.namespace.name=,service.name=a b,service.version=v1,junk,=x"]).unwrap();
        assert_eq!(
            b,
            Baggage {
                version: Some("v1".into()),
                ..Baggage::default()
            }
        );
        let long = format!("service.name={}", "a".repeat(300));
        assert_eq!(parse(&[&long]).unwrap().service, None);
        assert_eq!(parse(&[&"x=1,".repeat(700)]), Err(BaggageError::TooLong));
        assert_eq!(parse(&[&"x=1,".repeat(40)]), Err(BaggageError::TooManyMembers));
        assert_eq!(parse(&["service.name=caf\u{e9}"]), Err(BaggageError::NotAscii));
        assert_eq!(Baggage::parse([&b"\xff\xfe"[..]]), Err(BaggageError::NotAscii));
    }

    #[test]
    fn implausible_own_values_are_left_out_of_the_header() {
        let b = Baggage {
            namespace: Some("shop".into()),
            service: Some("has space".into()),
            ..Baggage::default()
        };
        assert_eq!(b.to_string(), "k8s.namespace.name=shop");
    }
}
