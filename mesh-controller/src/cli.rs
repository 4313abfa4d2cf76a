//! Command-line flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use mesh_api::TrustDomain;

/// The mesh controller: watches the cluster, streams each node the config it needs
/// (NodeConfig.Watch) and signs the certificates of the pods on it (Ca.Sign), over TLS
/// from the mesh's own CA. Log levels come from RUST_LOG (default: info).
#[derive(Debug, Parser)]
#[command(
    name = "mesh-controller",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Where the cluster state comes from: `file:DIR`, a directory of Kubernetes YAML
    /// (Namespaces, Pods, Services, EndpointSlices, AuthorizationPolicies) reloaded on change,
    /// with the CA in --ca-dir and node tokens in --tokens-dir; or `kubernetes`, the API
    /// server (in-cluster config or KUBECONFIG), with the CA in a Secret, nodes proven by
    /// TokenReview and a Lease electing the replica that writes policy status.
    #[arg(long, value_name = "file:DIR|kubernetes", value_parser = parse_source, required = true)]
    pub source: Option<SourceArg>,

    /// TCP address to serve gRPC over TLS on, or `none`. 15012 is the port Istio's control
    /// plane uses for the same purpose.
    #[arg(long, value_name = "ADDR|none", default_value = "0.0.0.0:15012", value_parser = parse_listen)]
    pub listen: Listen,

    /// Also serve on this Unix socket (TLS as well, with the same certificate).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// Directory of the CA root (root.pem, root.key with mode 0600); created (0700) on first
    /// start. Refused when others can write to it or it is not ours.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/mesh-controller/ca")]
    pub ca_dir: PathBuf,

    /// Directory of node tokens: the file named after a node holds that node's token (mode
    /// 0600, no symbolic links). Refused when others can write to it or it is not ours.
    #[arg(long, value_name = "DIR", default_value = "/etc/mesh-controller/node-tokens")]
    pub tokens_dir: PathBuf,

    /// SPIFFE trust domain of the identities signed.
    #[arg(long, value_name = "DOMAIN", default_value = "cluster.local")]
    pub trust_domain: TrustDomain,

    /// Lifetime of the certificates signed for workloads (and of the serving certificate).
    #[arg(long, value_name = "DURATION", default_value = "24h", value_parser = humantime::parse_duration)]
    pub cert_ttl: Duration,

    /// Extra DNS name or IP for the serving certificate, beyond `mesh-controller`,
    /// `localhost` and the listen address (repeatable).
    #[arg(long = "server-name", value_name = "NAME|IP")]
    pub server_names: Vec<String>,

    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Plain-HTTP health endpoint: `/healthz/live` (the process answers) and
    /// `/healthz/ready` (the cluster state is loaded, so nodes can be served), or `none`.
    #[arg(long, value_name = "ADDR|none", default_value = "none", value_parser = parse_listen)]
    pub health_listen: Listen,

    #[command(flatten)]
    pub kubernetes: KubernetesArgs,
}

/// Flags of `--source kubernetes` (ignored otherwise).
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "With --source kubernetes")]
pub struct KubernetesArgs {
    /// The controller's own namespace (Secret, ConfigMap, Lease and the node agents' pods
    /// live there). Default: the namespace of the pod's service account, else mesh-system.
    #[arg(long, env = "POD_NAMESPACE", value_name = "NAMESPACE")]
    pub namespace: Option<String>,

    /// This replica's name in the leader Lease. Default: the host name.
    #[arg(long, env = "POD_NAME", value_name = "NAME")]
    pub pod_name: Option<String>,

    /// Secret (type kubernetes.io/tls) holding the mesh root; created if absent, never
    /// overwritten.
    #[arg(long, value_name = "NAME", default_value = "mesh-ca")]
    pub ca_secret: String,

    /// ConfigMap the root certificate (key `root.pem`) is published in, for node agents.
    #[arg(long, value_name = "NAME", default_value = "mesh-root-ca")]
    pub trust_bundle: String,

    /// Lease electing the replica that writes AuthorizationPolicy status.
    #[arg(long, value_name = "NAME", default_value = "mesh-controller")]
    pub lease: String,

    /// Service account of the node agents, in the controller's namespace: only its tokens
    /// prove a node.
    #[arg(long, value_name = "NAME", default_value = "mesh-node")]
    pub node_service_account: String,

    /// Audience the node agents' projected tokens are bound to.
    #[arg(long, value_name = "AUDIENCE", default_value = "mesh-controller")]
    pub token_audience: String,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Print the CustomResourceDefinitions mesh installs, or write them into a directory
    /// (one file each, as daemonset/base/crds/ holds them).
    Crds {
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Clone)]
pub enum SourceArg {
    File(PathBuf),
    Kubernetes,
}

#[derive(Debug, Clone, Copy)]
pub struct Listen(pub Option<SocketAddr>);

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

fn parse_source(value: &str) -> Result<SourceArg, String> {
    if let Some(dir) = value.strip_prefix("file:") {
        if dir.is_empty() {
            return Err("file: needs a directory, as in file:/etc/mesh/cluster".into());
        }
        return Ok(SourceArg::File(dir.into()));
    }
    if value == "kubernetes" {
        return Ok(SourceArg::Kubernetes);
    }
    Err(format!("unknown source {value:?}; use file:DIR or kubernetes"))
}

fn parse_listen(value: &str) -> Result<Listen, String> {
    if value == "none" {
        return Ok(Listen(None));
    }
    value
        .parse()
        .map(|addr| Listen(Some(addr)))
        .map_err(|e| format!("{value:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, String> {
        let argv = ["mesh-controller"].iter().chain(args);
        Args::try_parse_from(argv).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_values() {
        let args = parse(&["--source", "file:/tmp/c"]).unwrap();
        assert!(matches!(args.source, Some(SourceArg::File(ref d)) if d == &PathBuf::from("/tmp/c")));
        assert_eq!(args.health_listen.0, None);
        assert_eq!(args.listen.0, Some("0.0.0.0:15012".parse().unwrap()));
        assert_eq!(args.cert_ttl, Duration::from_secs(24 * 3600));
        assert_eq!(args.trust_domain.as_str(), "cluster.local");

        let args = parse(&["--source", "file:d", "--listen", "none", "--cert-ttl", "90m"]).unwrap();
        assert_eq!(args.listen.0, None);
        assert_eq!(args.cert_ttl, Duration::from_secs(90 * 60));
    }

    #[test]
    fn kubernetes_and_crds() {
        let args = parse(&[
            "--source",
            "kubernetes",
            "--namespace",
            "ms",
            "--health-listen",
            "0.0.0.0:15021",
        ])
        .unwrap();
        assert!(matches!(args.source, Some(SourceArg::Kubernetes)));
        assert_eq!(args.kubernetes.namespace.as_deref(), Some("ms"));
        assert_eq!(args.kubernetes.ca_secret, "mesh-ca");
        assert_eq!(args.kubernetes.trust_bundle, "mesh-root-ca");
        assert_eq!(args.kubernetes.node_service_account, "mesh-node");
        assert_eq!(args.kubernetes.token_audience, "mesh-controller");
        assert_eq!(args.health_listen.0, Some("0.0.0.0:15021".parse().unwrap()));

        let args = parse(&["crds", "--out-dir", "d"]).unwrap();
        assert!(matches!(args.command, Some(Command::Crds { out_dir: Some(_) })));
        assert!(args.source.is_none());
        assert!(parse(&["crds", "--source", "kubernetes"]).is_err());
    }

    #[test]
    fn refusals() {
        assert!(parse(&["--source", "file:"]).is_err());
        assert!(parse(&["--source", "http://x"]).is_err());
        assert!(parse(&["--source", "file:d", "--trust-domain", "Bad"]).is_err());
        assert!(parse(&["--source", "file:d", "--listen", "nowhere"]).is_err());
        assert!(parse(&[]).is_err(), "--source is required");
    }
}
