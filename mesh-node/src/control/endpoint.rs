//! How to reach the controller: target, pinned root, node name and token, read fresh from
//! their files at every (re)connect so a rotated token or root needs no agent restart.
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use mesh_api::client::{NodeCredentials, Target, SERVER_NAME};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

/// Default bound on one connection attempt (TCP connect and TLS handshake).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 PINGs on an idle channel, so a controller that vanished without closing the
/// connection (a partition, a frozen VM) is noticed within interval + timeout.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything needed to open an authenticated channel to the controller.
#[derive(Debug, Clone)]
pub struct ControllerEndpoint {
    pub target: Target,
    /// PEM file of the mesh root(s) the controller's serving certificate must chain to
    /// (`--controller-ca`).
    pub ca_file: PathBuf,
    /// File holding this node's bearer token (`--controller-token-file`); surrounding
    /// whitespace is ignored.
    pub token_file: PathBuf,
    /// This node's name, as the controller knows it.
    pub node: String,
    pub connect_timeout: Duration,
}

/// Why talking to the controller failed, worded for an operator.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("controller CA file {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error("controller token file {path}: {reason}")]
    TokenFile { path: PathBuf, reason: String },
    #[error("connecting to the controller at {target}: {reason}")]
    Connect { target: String, reason: String },
    #[error(
        "the controller refused this node's credentials (Unauthenticated): {0}; \
         check --controller-token-file and the node name"
    )]
    Unauthenticated(String),
    #[error("the controller denied the request (PermissionDenied): {0}")]
    PermissionDenied(String),
    #[error("the controller is unavailable: {0}")]
    Unavailable(String),
    #[error("the controller call failed ({code:?}): {message}")]
    Rpc { code: Code, message: String },
    #[error("the controller ended the config stream")]
    StreamEnded,
    #[error("unreadable message from the controller: {0}")]
    Protocol(String),
}

impl ControlError {
    pub fn from_status(status: &Status) -> Self {
        let message = status.message().to_owned();
        match status.code() {
            Code::Unauthenticated => ControlError::Unauthenticated(message),
            Code::PermissionDenied => ControlError::PermissionDenied(message),
            Code::Unavailable => ControlError::Unavailable(message),
            code => ControlError::Rpc { code, message },
        }
    }

    /// Whether retrying cannot help until an operator changes something (token, node name).
    pub fn needs_operator(&self) -> bool {
        matches!(
            self,
            ControlError::Unauthenticated(_)
                | ControlError::PermissionDenied(_)
                | ControlError::CaFile { .. }
                | ControlError::TokenFile { .. }
        )
    }
}

/// Parses `--controller`: `unix:/path/to/socket` or `host:port`.
pub fn parse_target(value: &str) -> Result<Target, String> {
    if let Some(path) = value.strip_prefix("unix:") {
        if !path.starts_with('/') {
            return Err(format!(
                "{value:?}: a Unix socket needs an absolute path, as in unix:/run/mesh/controller.sock"
            ));
        }
        return Ok(Target::Unix(PathBuf::from(path)));
    }
    let Some((host, port)) = value.rsplit_once(':') else {
        return Err(format!("{value:?}: expected host:port or unix:/path"));
    };
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(format!("{value:?}: expected host:port or unix:/path"));
    }
    Ok(Target::Tcp(value.to_owned()))
}

/// `host:port` or `unix:/path`, as [`parse_target`] reads it.
pub fn display_target(target: &Target) -> String {
    match target {
        Target::Tcp(addr) => addr.clone(),
        Target::Unix(path) => format!("unix:{}", path.display()),
    }
}

impl fmt::Display for ControllerEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (node {})", display_target(&self.target), self.node)
    }
}

impl ControllerEndpoint {
    pub fn new(target: Target, ca_file: PathBuf, token_file: PathBuf, node: impl Into<String>) -> Self {
        ControllerEndpoint {
            target,
            ca_file,
            token_file,
            node: node.into(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }

    /// Reads the pinned root(s), PEM.
    pub async fn root_pem(&self) -> Result<Vec<u8>, ControlError> {
        read_nonempty(&self.ca_file)
            .await
            .map_err(|reason| ControlError::CaFile {
                path: self.ca_file.clone(),
                reason,
            })
    }

    /// Reads the token file and builds the request metadata.
    pub async fn credentials(&self) -> Result<NodeCredentials, ControlError> {
        let error = |reason: String| ControlError::TokenFile {
            path: self.token_file.clone(),
            reason,
        };
        let bytes = read_nonempty(&self.token_file).await.map_err(error)?;
        let token = String::from_utf8(bytes).map_err(|_| error("not UTF-8".into()))?;
        NodeCredentials::new(&self.node, token.trim())
            .map_err(|_| error("the token or node name is not valid in a request header".into()))
    }

    /// Opens a TLS channel trusting only the pinned root, within the connect timeout.
    ///
    /// Like `mesh_api::client::connect`, plus a connect timeout and HTTP/2 keepalive, which
    /// the node needs to notice a controller that disappeared without closing the stream.
    pub async fn connect(&self) -> Result<Channel, ControlError> {
        let root = self.root_pem().await?;
        let connect_error = |reason: String| ControlError::Connect {
            target: display_target(&self.target),
            reason,
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(root))
            .domain_name(SERVER_NAME);
        let configure = |endpoint: Endpoint| {
            endpoint
                .connect_timeout(self.connect_timeout)
                .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(true)
                .tls_config(tls.clone())
        };
        let connecting = async {
            match &self.target {
                Target::Tcp(addr) => {
                    let endpoint = Endpoint::from_shared(format!("https://{addr}"))
                        .map_err(|e| connect_error(error_chain(&e)))?;
                    configure(endpoint)
                        .map_err(|e| connect_error(error_chain(&e)))?
                        .connect()
                        .await
                }
                Target::Unix(path) => {
                    let path = path.clone();
                    // The authority is a placeholder: the connector decides where to go.
                    configure(Endpoint::from_static("https://mesh-controller"))
                        .map_err(|e| connect_error(error_chain(&e)))?
                        .connect_with_connector(tower::service_fn(move |_| {
                            let path = path.clone();
                            async move { tokio::net::UnixStream::connect(path).await.map(TokioIo::new) }
                        }))
                        .await
                }
            }
            .map_err(|e| connect_error(error_chain(&e)))
        };
        tokio::time::timeout(self.connect_timeout, connecting)
            .await
            .map_err(|_| connect_error(format!("no connection within {:?}", self.connect_timeout)))?
    }
}

async fn read_nonempty(path: &Path) -> Result<Vec<u8>, String> {
    let bytes = tokio::fs::read(path).await.map_err(|e| e.to_string())?;
    if bytes.trim_ascii().is_empty() {
        return Err("empty".into());
    }
    Ok(bytes)
}

/// An error with its sources, as tonic's transport errors say little at the top level.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert!(matches!(parse_target("127.0.0.1:15012"), Ok(Target::Tcp(a)) if a == "127.0.0.1:15012"));
        assert!(matches!(
            parse_target("mesh-controller.mesh-system:15012"),
            Ok(Target::Tcp(_))
        ));
        assert!(matches!(parse_target("[::1]:15012"), Ok(Target::Tcp(_))));
        assert!(
            matches!(parse_target("unix:/run/mesh/c.sock"), Ok(Target::Unix(p)) if p == Path::new("/run/mesh/c.sock"))
        );
        for bad in [
            "unix:rel.sock",
            "nohost",
            ":15012",
            "host:",
            "host:0",
            "host:99999",
        ] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
        assert_eq!(display_target(&Target::Unix("/x".into())), "unix:/x".to_owned());
    }

    #[test]
    fn statuses_map_to_operator_errors() {
        let e = ControlError::from_status(&Status::unauthenticated("wrong token for node a"));
        assert_eq!(e, ControlError::Unauthenticated("wrong token for node a".into()));
        assert!(e.to_string().contains("Unauthenticated"));
        assert!(e.needs_operator());
        assert!(matches!(
            ControlError::from_status(&Status::unavailable("x")),
            ControlError::Unavailable(_)
        ));
        assert!(!ControlError::from_status(&Status::internal("x")).needs_operator());
    }

    #[tokio::test]
    async fn credentials_are_read_fresh_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        let endpoint = ControllerEndpoint::new(
            Target::Tcp("127.0.0.1:1".into()),
            dir.path().join("ca.pem"),
            token.clone(),
            "a",
        );
        assert!(matches!(
            endpoint.credentials().await,
            Err(ControlError::TokenFile { .. })
        ));
        std::fs::write(&token, "  \n").unwrap();
        let err = endpoint.credentials().await.err().unwrap();
        assert!(err.to_string().contains("empty"), "{err}");
        std::fs::write(&token, "s3cret\n").unwrap();
        assert!(endpoint.credentials().await.is_ok());
        std::fs::write(&token, "bad\ntoken").unwrap();
        assert!(endpoint.credentials().await.is_err());
        assert!(matches!(
            endpoint.connect().await,
            Err(ControlError::CaFile { .. })
        ));
    }
}
