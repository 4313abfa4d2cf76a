//! The labels of the connection metrics, Istio's names (DESIGN.md §5): who talked to whom,
//! by workload and identity, never by address or port, so their number stays bounded.
use mesh_api::Workload;

pub const UNKNOWN: &str = "unknown";

/// The label names, in the order [`TcpLabels::values`] gives them.
pub const NAMES: [&str; 9] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_service",
    "response_flags",
];

/// Which proxy reports: the source's node (outbound) or the destination's (inbound).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reporter {
    Source,
    Destination,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// How a connection ended short of carrying bytes, Envoy-style: `-` when it did not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFlags {
    None,
    /// Refused by authorization policy (here or at the peer).
    Denied,
    /// The destination refused or did not answer the connect.
    ConnectFailed,
    /// A service with no ready endpoint.
    NoEndpoint,
    /// The HBONE tunnel could not be opened (TLS, protocol, timeout).
    HboneFailed,
}

impl ResponseFlags {
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlags::None => "-",
            ResponseFlags::Denied => "DENIED",
            ResponseFlags::ConnectFailed => "CONNECT_FAILED",
            ResponseFlags::NoEndpoint => "NO_ENDPOINT",
            ResponseFlags::HboneFailed => "HBONE_FAILED",
        }
    }
}

/// One side of a connection as the labels name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub workload: String,
    pub namespace: String,
    /// The SPIFFE ID, or `unknown` outside the mesh.
    pub principal: String,
}

impl Peer {
    pub fn unknown() -> Peer {
        Peer {
            workload: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
            principal: UNKNOWN.into(),
        }
    }

    pub fn of(w: &Workload) -> Peer {
        Peer {
            workload: canonical_workload(w),
            namespace: w.namespace.clone(),
            principal: w.identity.to_string(),
        }
    }

    /// A mesh peer known only by its identity (a pod of a node this one is not told about).
    pub fn principal_only(principal: &str) -> Peer {
        Peer {
            principal: principal.into(),
            ..Peer::unknown()
        }
    }
}

/// The full label set of one connection for one reporter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpLabels<'a> {
    pub reporter: Reporter,
    pub source: &'a Peer,
    pub destination: &'a Peer,
    pub service: &'a str,
    pub flags: ResponseFlags,
}

impl TcpLabels<'_> {
    pub fn values(&self) -> [&str; 9] {
        [
            self.reporter.as_str(),
            &self.source.workload,
            &self.source.namespace,
            &self.source.principal,
            &self.destination.workload,
            &self.destination.namespace,
            &self.destination.principal,
            self.service,
            self.flags.as_str(),
        ]
    }
}

/// The workload a pod belongs to, stable across its replicas and restarts: the app label if
/// it has one, else the pod name without the suffixes a Deployment or StatefulSet adds.
pub fn canonical_workload(w: &Workload) -> String {
    for key in ["app.kubernetes.io/name", "app"] {
        if let Some(v) = w.labels.get(key).filter(|v| !v.is_empty()) {
            return v.clone();
        }
    }
    strip_generated_suffix(&w.name).to_owned()
}

/// `api-7d4b9c8f6-x2k9q` → `api` (Deployment), `web-x2k9q` → `web` (DaemonSet, Job);
/// `db-0` stays `db-0`: a StatefulSet's ordinal names one replica on purpose, and the count
/// of replicas bounds it.
fn strip_generated_suffix(name: &str) -> &str {
    let is_pod_hash =
        |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let is_rs_hash = |s: &str| {
        (6..=10).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    let Some((rest, last)) = name.rsplit_once('-') else {
        return name;
    };
    if !is_pod_hash(last) || !last.bytes().any(|b| b.is_ascii_digit()) {
        return name;
    }
    match rest.rsplit_once('-') {
        Some((base, rs)) if is_rs_hash(rs) && rs.bytes().any(|b| b.is_ascii_digit()) => base,
        _ => rest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_suffixes_are_stripped() {
        assert_eq!(strip_generated_suffix("api-7d4b9c8f6-x2k9q"), "api");
        assert_eq!(strip_generated_suffix("web-x2k9q"), "web");
        assert_eq!(strip_generated_suffix("db-0"), "db-0");
        assert_eq!(strip_generated_suffix("client"), "client");
        // Plain words are names, not hashes.
        assert_eq!(strip_generated_suffix("my-front-proxy"), "my-front-proxy");
    }

    #[test]
    fn labels_come_in_the_declared_order() {
        let src = Peer {
            workload: "web".into(),
            namespace: "shop".into(),
            principal: "spiffe://td/ns/shop/sa/web".into(),
        };
        let dst = Peer::unknown();
        let l = TcpLabels {
            reporter: Reporter::Source,
            source: &src,
            destination: &dst,
            service: "shop/api",
            flags: ResponseFlags::Denied,
        };
        let v = l.values();
        assert_eq!(v.len(), NAMES.len());
        assert_eq!(v[0], "source");
        assert_eq!(v[1], "web");
        assert_eq!(v[7], "shop/api");
        assert_eq!(v[8], "DENIED");
    }
}
