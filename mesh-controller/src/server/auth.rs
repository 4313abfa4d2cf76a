//! Which node is calling. Local mode: one token file per node (`<dir>/<node-name>` holds the
//! token), the request carrying `authorization: Bearer <token>` and `x-mesh-node: <name>`.
//! In a cluster, [`super::token_review::TokenReviewAuth`] proves nodes with TokenReview
//! instead; both sit behind [`NodeAuthenticator`].

use std::future::Future;
use std::path::PathBuf;

use mesh_api::client::NODE_HEADER;
use mesh_api::secret_files::{self, SecretFileError};
use ring::digest::{digest, SHA256};
use subtle::ConstantTimeEq;
use tonic::metadata::MetadataMap;
use tonic::Status;

/// What a request presents; either part may be missing.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    pub node: Option<String>,
    pub token: Option<String>,
}

impl Credentials {
    pub fn from_metadata(metadata: &MetadataMap) -> Self {
        let text = |key| metadata.get(key).and_then(|v| v.to_str().ok());
        let token = text("authorization").and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_owned())
        });
        Credentials {
            node: text(NODE_HEADER).map(str::to_owned),
            token,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("credentials required: `authorization: Bearer <token>` and `{NODE_HEADER}: <node>`")]
    Missing,
    #[error("{0:?} is not a valid node name")]
    InvalidNode(String),
    #[error("unknown node {0}")]
    UnknownNode(String),
    #[error("wrong token for node {0}")]
    WrongToken(String),
    #[error("token refused: {0}")]
    Rejected(String),
    #[error("cannot check credentials: {0}")]
    Unavailable(String),
}

pub trait NodeAuthenticator: Send + Sync + 'static {
    /// The name of the node these credentials prove, or why they prove none.
    fn authenticate(
        &self,
        credentials: Credentials,
    ) -> impl Future<Output = Result<String, AuthError>> + Send;
}

/// Tokens in files, read at each call so nodes can be added or their tokens rotated while
/// the controller runs (write the new token beside it and rename it into place). A token
/// file is a secret: one others may read, or a symbolic link, is refused.
pub struct TokenFiles {
    dir: PathBuf,
}

impl TokenFiles {
    /// Refuses a directory others could plant tokens in (see [`secret_files::check_private_dir`]).
    pub fn new(dir: PathBuf) -> Result<Self, SecretFileError> {
        secret_files::check_private_dir(&dir)?;
        Ok(TokenFiles { dir })
    }
}

impl NodeAuthenticator for TokenFiles {
    async fn authenticate(&self, credentials: Credentials) -> Result<String, AuthError> {
        let (Some(node), Some(token)) = (credentials.node, credentials.token) else {
            return Err(AuthError::Missing);
        };
        // The name becomes a file name: only DNS-subdomain names, so never `..` or `/`.
        if !is_node_name(&node) {
            return Err(AuthError::InvalidNode(node));
        }
        let path = self.dir.join(&node);
        let read = tokio::task::spawn_blocking(move || secret_files::read_secret(&path)).await;
        let expected = match read {
            Ok(Ok(text)) => text.trim().to_owned(),
            Ok(Err(SecretFileError::Io { source, .. })) if source.kind() == std::io::ErrorKind::NotFound => {
                return Err(AuthError::UnknownNode(node))
            }
            Ok(Err(e)) => return Err(AuthError::Unavailable(format!("token of node {node}: {e}"))),
            Err(e) => return Err(AuthError::Unavailable(format!("token of node {node}: {e}"))),
        };
        if expected.is_empty() {
            return Err(AuthError::UnknownNode(node));
        }
        // Comparing digests in constant time reveals neither the content nor the length.
        let matches = digest(&SHA256, token.as_bytes())
            .as_ref()
            .ct_eq(digest(&SHA256, expected.as_bytes()).as_ref());
        if bool::from(matches) {
            Ok(node)
        } else {
            Err(AuthError::WrongToken(node))
        }
    }
}

fn is_node_name(name: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    name.len() <= 253
        && name.starts_with(alnum)
        && name.ends_with(alnum)
        && name.chars().all(|c| alnum(c) || c == '-' || c == '.')
}

/// Authenticates a call, logging a refusal with the node's name.
pub async fn authenticate<A: NodeAuthenticator>(
    auth: &A,
    metadata: &MetadataMap,
    rpc: &str,
) -> Result<String, Status> {
    let credentials = Credentials::from_metadata(metadata);
    let claimed = credentials.node.clone().unwrap_or_default();
    auth.authenticate(credentials).await.map_err(|e| {
        tracing::warn!(node = %claimed, rpc, reason = %e, "refused unauthenticated call");
        match e {
            AuthError::Unavailable(_) => Status::unavailable(e.to_string()),
            _ => Status::unauthenticated(e.to_string()),
        }
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn creds(node: Option<&str>, token: Option<&str>) -> Credentials {
        Credentials {
            node: node.map(Into::into),
            token: token.map(Into::into),
        }
    }

    #[tokio::test]
    async fn token_files() {
        let dir = tempfile::tempdir().unwrap();
        secret_files::create_secret(&dir.path().join("node-a"), b"s3cret\n").unwrap();
        secret_files::create_secret(&dir.path().join("node-e"), b"\n").unwrap();
        // Others may read it: whoever can, can be node-r.
        std::fs::write(dir.path().join("node-r"), "s3cret\n").unwrap();
        std::fs::set_permissions(dir.path().join("node-r"), PermissionsExt::from_mode(0o644)).unwrap();
        std::os::unix::fs::symlink(dir.path().join("node-a"), dir.path().join("node-l")).unwrap();
        let auth = TokenFiles::new(dir.path().to_owned()).unwrap();
        for node in ["node-r", "node-l"] {
            let refused = auth.authenticate(creds(Some(node), Some("s3cret"))).await;
            assert!(
                matches!(refused, Err(AuthError::Unavailable(_))),
                "{node}: {refused:?}"
            );
        }
        let cases = [
            (creds(Some("node-a"), Some("s3cret")), Ok("node-a".to_owned())),
            (
                creds(Some("node-a"), Some("s3cre")),
                Err(AuthError::WrongToken("node-a".into())),
            ),
            (
                creds(Some("node-a"), Some("s3cret\n")),
                Err(AuthError::WrongToken("node-a".into())),
            ),
            (
                creds(Some("node-b"), Some("s3cret")),
                Err(AuthError::UnknownNode("node-b".into())),
            ),
            (
                creds(Some("node-e"), Some("")),
                Err(AuthError::UnknownNode("node-e".into())),
            ),
            (
                creds(Some("../node-a"), Some("s3cret")),
                Err(AuthError::InvalidNode("../node-a".into())),
            ),
            (
                creds(Some("Node-A"), Some("s3cret")),
                Err(AuthError::InvalidNode("Node-A".into())),
            ),
            (creds(None, Some("s3cret")), Err(AuthError::Missing)),
            (creds(Some("node-a"), None), Err(AuthError::Missing)),
        ];
        for (credentials, want) in cases {
            let what = format!("{credentials:?}");
            assert_eq!(auth.authenticate(credentials).await, want, "{what}");
        }
    }

    #[test]
    fn a_token_directory_others_can_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), PermissionsExt::from_mode(0o777)).unwrap();
        let err = TokenFiles::new(dir.path().to_owned()).err().expect("refused");
        let text = err.to_string();
        assert!(
            text.contains(&dir.path().display().to_string()) && text.contains("chmod go-w"),
            "{text}"
        );
    }

    #[test]
    fn reads_metadata() {
        let mut metadata = MetadataMap::new();
        metadata.insert("authorization", "bearer  tok ".parse().unwrap());
        metadata.insert(NODE_HEADER, "node-a".parse().unwrap());
        let c = Credentials::from_metadata(&metadata);
        assert_eq!(
            (c.node.as_deref(), c.token.as_deref()),
            (Some("node-a"), Some("tok"))
        );
        metadata.insert("authorization", "Basic dXNlcg==".parse().unwrap());
        assert_eq!(Credentials::from_metadata(&metadata).token, None);
    }
}
