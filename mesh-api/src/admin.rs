//! The node's admin (inspection) API, `/v1/...` on 127.0.0.1:15000 and a Unix socket: the JSON
//! documents mesh-node serves and meshctl reads. One definition keeps both sides in step; a
//! change that breaks a reader bumps [`API_VERSION`] and the path prefix with it.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The admin API's version: the `/v1` in every path, and the [`Status::api`] a node reports.
pub const API_VERSION: u32 = 1;
/// The response header every admin answer carries, with [`API_VERSION`].
pub const VERSION_HEADER: &str = "x-mesh-admin-api";

pub mod paths {
    pub const STATUS: &str = "/v1/status";
    pub const WORKLOADS: &str = "/v1/workloads";
    pub const SERVICES: &str = "/v1/services";
    pub const POLICIES: &str = "/v1/policies";
    pub const CERTS: &str = "/v1/certs";
    pub const CONNECTIONS: &str = "/v1/connections";
    pub const BPF: &str = "/v1/bpf";
    /// `GET` reads the log filter, `PUT` with a [`LogLevel`] body replaces it.
    pub const LOG_LEVEL: &str = "/v1/log-level";
}

/// `GET /v1/status`: who this node is and whether it is serving.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub api: u32,
    /// mesh-node's version (the crate version).
    pub version: String,
    pub node: String,
    pub ready: bool,
    /// Why the node is not ready, or what is degraded while it is (stale config).
    pub readiness: String,
    pub controller: String,
    /// The config version from the controller (`epoch/version`); none before the first.
    pub config_version: Option<String>,
    /// Seconds since that config was received.
    pub config_age_seconds: Option<f64>,
    /// RFC 3339 time since which the controller stream is down (config kept, may be stale).
    pub config_stale_since: Option<String>,
    pub uptime_seconds: f64,
    pub workloads_local: usize,
    pub workloads_enrolled: usize,
    pub connections_open: usize,
}

/// `GET /v1/workloads`: the pods of this node as the controller describes them, and whether
/// the kernel captures them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub identity: String,
    pub ips: Vec<String>,
    /// Enrolled by its namespace's label (what the controller says).
    pub enrolled: bool,
    /// `STRICT` or `PERMISSIVE`.
    pub mtls_mode: String,
    /// The pod's cgroup v2 directory, once found.
    pub cgroup: Option<String>,
    /// Whether that cgroup is in the kernel's enrolled map right now.
    pub captured: bool,
    /// Why an enrolled pod is not (fully) captured, if it is not.
    pub problem: Option<String>,
    /// Whether its host-side veth was found and its veth programs are attached: only then does
    /// the proxy deliver to it from a client's own address (`--preserve-source`).
    #[serde(default)]
    pub veth_ready: bool,
}

/// `GET /v1/services`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    pub vips: Vec<String>,
    /// `port→target/protocol`, e.g. `80→8080/TCP`.
    pub ports: Vec<String>,
    /// Endpoint addresses (`ip`), ready ones only.
    pub endpoints: Vec<String>,
}

/// `GET /v1/policies`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyInfo {
    pub namespace: String,
    pub name: String,
    /// `ALLOW` or `DENY`.
    pub action: String,
    /// The workload selector as `k=v,k=v`; empty selects the whole namespace.
    pub selector: String,
    /// One line per rule, readable (`from principals [...] to ports [...]`).
    pub rules: Vec<String>,
}

/// `GET /v1/certs`: the certificates this node holds for its pods' identities.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CertInfo {
    pub identity: String,
    pub serial: String,
    pub issuer: String,
    /// RFC 3339.
    pub not_before: String,
    /// RFC 3339.
    pub not_after: String,
    /// The chain, leaf first, in PEM.
    pub chain_pem: String,
}

/// `GET /v1/connections`: connections the proxy carries now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionInfo {
    pub id: u64,
    /// `outbound` (a local pod is the client) or `inbound` (a local pod is the server).
    pub direction: String,
    pub source: String,
    pub destination: String,
    pub source_identity: Option<String>,
    pub destination_identity: Option<String>,
    /// `namespace/name` when the destination was a service address.
    pub service: Option<String>,
    /// `hbone`, `local`, `passthrough` (outbound) or `hbone` (inbound).
    pub route: String,
    /// Bytes from the source towards the destination so far.
    pub bytes_sent: u64,
    /// Bytes from the destination back to the source so far.
    pub bytes_received: u64,
    pub age_seconds: f64,
}

/// `GET /v1/bpf`: the kernel side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BpfInfo {
    pub pin_dir: String,
    pub abi: String,
    pub programs: Vec<BpfProgram>,
    pub maps: Vec<BpfMap>,
    /// The programs' counters by name (redirected, skipped, strict drops, ...).
    pub counters: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BpfProgram {
    pub name: String,
    /// Hook: `cgroup/connect4`, `tcx/ingress`, ...
    pub attach: String,
    /// Where: a cgroup path or an interface name.
    pub target: String,
    pub prog_id: Option<u32>,
    pub link_id: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BpfMap {
    pub name: String,
    pub max_entries: u32,
    /// Entries in use, where countable (hash maps); none for arrays.
    pub entries: Option<u32>,
}

/// `GET`/`PUT /v1/log-level`: the tracing filter, e.g. `info,mesh_node::proxy=debug`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogLevel {
    pub filter: String,
}

/// An admin error answer (any status but 2xx).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}
