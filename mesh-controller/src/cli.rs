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
#[command(name = "mesh-controller", version)]
pub struct Args {
    /// Where the cluster state comes from: `file:DIR`, a directory of Kubernetes YAML
    /// (Namespaces, Pods, Services, EndpointSlices, AuthorizationPolicies) reloaded on change.
    /// (`kubernetes` is reserved for the API-server watch, not yet supported.)
    #[arg(long, value_name = "file:DIR", value_parser = parse_source)]
    pub source: SourceArg,

    /// TCP address to serve gRPC over TLS on, or `none`. 15012 is the port Istio's control
    /// plane uses for the same purpose.
    #[arg(long, value_name = "ADDR|none", default_value = "0.0.0.0:15012", value_parser = parse_listen)]
    pub listen: Listen,

    /// Also serve on this Unix socket (TLS as well, with the same certificate).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// Directory of the CA root (root.pem, root.key with mode 0600); created on first start.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/mesh-controller/ca")]
    pub ca_dir: PathBuf,

    /// Directory of node tokens: the file named after a node holds that node's token.
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
}

#[derive(Debug, Clone)]
pub enum SourceArg {
    File(PathBuf),
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
        return Err("the kubernetes source is not yet supported; use file:DIR".into());
    }
    Err(format!("unknown source {value:?}; use file:DIR"))
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
        assert!(matches!(args.source, SourceArg::File(ref d) if d == &PathBuf::from("/tmp/c")));
        assert_eq!(args.listen.0, Some("0.0.0.0:15012".parse().unwrap()));
        assert_eq!(args.cert_ttl, Duration::from_secs(24 * 3600));
        assert_eq!(args.trust_domain.as_str(), "cluster.local");

        let args = parse(&["--source", "file:d", "--listen", "none", "--cert-ttl", "90m"]).unwrap();
        assert_eq!(args.listen.0, None);
        assert_eq!(args.cert_ttl, Duration::from_secs(90 * 60));
    }

    #[test]
    fn refusals() {
        let err = parse(&["--source", "kubernetes"]).unwrap_err();
        assert!(err.contains("not yet supported"), "{err}");
        assert!(parse(&["--source", "file:"]).is_err());
        assert!(parse(&["--source", "http://x"]).is_err());
        assert!(parse(&["--source", "file:d", "--trust-domain", "Bad"]).is_err());
        assert!(parse(&["--source", "file:d", "--listen", "nowhere"]).is_err());
        assert!(parse(&[]).is_err(), "--source is required");
    }
}
