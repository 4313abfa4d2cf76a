//! Which node is calling. Local mode: one token file per node (`<dir>/<node-name>` holds the
//! token), the request carrying `authorization: Bearer <token>` and `x-mesh-node: <name>`.
//! In a cluster, [`super::token_review::TokenReviewAuth`] proves nodes with TokenReview
//! instead; both sit behind [`NodeAuthenticator`].

use std::future::Future;
use std::path::PathBuf;

use mesh_api::client::NODE_HEADER;
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
/// the controller runs.
pub struct TokenFiles {
    dir: PathBuf,
}

impl TokenFiles {
    pub fn new(dir: PathBuf) -> Self {
        TokenFiles { dir }
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
        let expected = match tokio::fs::read_to_string(self.dir.join(&node)).await {
            Ok(text) => text.trim().to_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(AuthError::UnknownNode(node)),
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
        std::fs::write(dir.path().join("node-a"), "s3cret\n").unwrap();
        std::fs::write(dir.path().join("node-e"), "\n").unwrap();
        let auth = TokenFiles::new(dir.path().to_owned());
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
