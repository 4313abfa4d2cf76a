//! Node authentication in a cluster: the node agent presents its projected ServiceAccount
//! token (audience `mesh-controller`, a few minutes' life, rotated by the kubelet) as the
//! bearer token, and the API server says whose it is.
//!
//! A caller is node N only when all of these hold:
//! 1. a TokenReview (with our audience) says `authenticated`, with our audience among the
//!    token's audiences;
//! 2. the user is the node agents' service account
//!    (`system:serviceaccount:<namespace>:mesh-node`);
//! 3. the token is bound to a pod (`authentication.kubernetes.io/pod-name` and `pod-uid` in
//!    the user's extra), that pod exists in the agents' namespace with that UID, and its
//!    `spec.nodeName` is N (and equals the token's own `node-name` extra, on clusters that add
//!    it);
//! 4. if the request also names a node (`x-mesh-node`), it names N.
//!
//! Positive answers are cached for [`CACHE_TTL`] (at most [`CACHE_SIZE`] tokens, keyed by the
//! token's SHA-256), so reconnect storms do not become TokenReview storms. A cached answer can
//! outlive the pod by that long; the token itself already outlives it until it expires.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::{Api, Client};
use ring::digest::{digest, SHA256};

use super::auth::{AuthError, Credentials, NodeAuthenticator};
use crate::kubeapi::ApiError;

pub const CACHE_TTL: Duration = Duration::from_secs(30);
pub const CACHE_SIZE: usize = 4096;

pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

#[derive(Debug, Clone)]
pub struct TokenReviewConfig {
    /// The audience node tokens must be bound to.
    pub audience: String,
    /// Namespace of the node agents (their service account and pods).
    pub namespace: String,
    /// The node agents' service account.
    pub service_account: String,
}

impl TokenReviewConfig {
    pub fn username(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        )
    }
}

pub struct TokenReviewAuth {
    reviews: Api<TokenReview>,
    pods: Api<Pod>,
    config: TokenReviewConfig,
    cache: Mutex<Cache>,
}

impl TokenReviewAuth {
    pub fn new(client: Client, config: TokenReviewConfig) -> Self {
        TokenReviewAuth {
            reviews: Api::all(client.clone()),
            pods: Api::namespaced(client, &config.namespace),
            config,
            cache: Mutex::new(Cache::default()),
        }
    }

    async fn review(&self, token: &str) -> Result<TokenReviewStatus, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.config.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let answer = self
            .reviews
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| unavailable(ApiError::new("create", "tokenreviews.authentication.k8s.io", e)))?;
        answer
            .status
            .ok_or_else(|| AuthError::Unavailable("the TokenReview came back without a status".into()))
    }

    /// The node the pod bound to a reviewed token runs on.
    async fn node_of(&self, status: &TokenReviewStatus) -> Result<String, AuthError> {
        let decision = check_review(&self.config, status)?;
        let resource = format!("pods {}/{}", self.config.namespace, decision.pod_name);
        let pod = self
            .pods
            .get_opt(&decision.pod_name)
            .await
            .map_err(|e| unavailable(ApiError::new("get", resource.clone(), e)))?
            .ok_or_else(|| AuthError::Rejected(format!("the token's pod {resource} does not exist")))?;
        check_pod(&decision, &pod)
    }
}

fn unavailable(e: ApiError) -> AuthError {
    if e.is_forbidden() {
        tracing::error!(verb = e.verb, resource = %e.resource, "{e}");
    }
    AuthError::Unavailable(e.to_string())
}

/// What a review allows, before the pod is looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reviewed {
    pub pod_name: String,
    pub pod_uid: Option<String>,
    pub node_name: Option<String>,
}

/// Checks a TokenReview's answer: authenticated, for our audience, as the agents' service
/// account, bound to a pod.
pub fn check_review(config: &TokenReviewConfig, status: &TokenReviewStatus) -> Result<Reviewed, AuthError> {
    if status.authenticated != Some(true) {
        let why = status.error.as_deref().unwrap_or("not authenticated");
        return Err(AuthError::Rejected(format!(
            "token refused by the API server: {why}"
        )));
    }
    let audiences = status.audiences.as_deref().unwrap_or_default();
    if !audiences.contains(&config.audience) {
        return Err(AuthError::Rejected(format!(
            "the token is not for audience {:?} (it is for {audiences:?})",
            config.audience
        )));
    }
    let user = status.user.clone().unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let want = config.username();
    if username != want {
        return Err(AuthError::Rejected(format!(
            "the token belongs to {username:?}, not to the node agents' service account {want:?}"
        )));
    }
    let extra = user.extra.unwrap_or_default();
    let single = |key: &str| match extra.get(key).map(Vec::as_slice) {
        Some([value]) if !value.is_empty() => Some(value.clone()),
        _ => None,
    };
    let pod_name = single(POD_NAME_EXTRA).ok_or_else(|| {
        AuthError::Rejected("the token is not bound to a pod (use a projected service account token)".into())
    })?;
    Ok(Reviewed {
        pod_name,
        pod_uid: single(POD_UID_EXTRA),
        node_name: single(NODE_NAME_EXTRA),
    })
}

/// Checks the pod a token is bound to and returns its node.
pub fn check_pod(reviewed: &Reviewed, pod: &Pod) -> Result<String, AuthError> {
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    if let Some(want) = &reviewed.pod_uid {
        if uid != want {
            return Err(AuthError::Rejected(format!(
                "pod {} is not the pod the token was issued to (uid {uid}, token for {want})",
                reviewed.pod_name
            )));
        }
    }
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            AuthError::Rejected(format!("pod {} is not scheduled on a node", reviewed.pod_name))
        })?;
    if let Some(token_node) = &reviewed.node_name {
        if *token_node != node {
            return Err(AuthError::Rejected(format!(
                "the token names node {token_node} but pod {} runs on {node}",
                reviewed.pod_name
            )));
        }
    }
    Ok(node)
}

impl NodeAuthenticator for TokenReviewAuth {
    async fn authenticate(&self, credentials: Credentials) -> Result<String, AuthError> {
        let Some(token) = credentials.token.filter(|t| !t.is_empty()) else {
            return Err(AuthError::Missing);
        };
        let key: [u8; 32] = digest(&SHA256, token.as_bytes())
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes");
        let cached = self.lock_cache().get(&key, Instant::now());
        let node = match cached {
            Some(node) => node,
            None => {
                let status = self.review(&token).await?;
                let node = self.node_of(&status).await?;
                self.lock_cache()
                    .insert(key, node.clone(), Instant::now() + CACHE_TTL);
                node
            }
        };
        match credentials.node {
            Some(claimed) if claimed != node => Err(AuthError::Rejected(format!(
                "the token proves node {node}, but the request names {claimed}"
            ))),
            _ => Ok(node),
        }
    }
}

impl TokenReviewAuth {
    fn lock_cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Positive answers by token digest, each until its deadline; at most [`CACHE_SIZE`].
#[derive(Default)]
struct Cache {
    entries: HashMap<[u8; 32], (String, Instant)>,
}

impl Cache {
    fn get(&mut self, key: &[u8; 32], now: Instant) -> Option<String> {
        match self.entries.get(key) {
            Some((node, until)) if *until > now => Some(node.clone()),
            Some(_) => {
                self.entries.remove(key);
                None
            }
            None => None,
        }
    }

    fn insert(&mut self, key: [u8; 32], node: String, until: Instant) {
        if self.entries.len() >= CACHE_SIZE && !self.entries.contains_key(&key) {
            let now = Instant::now();
            self.entries.retain(|_, (_, deadline)| *deadline > now);
            if self.entries.len() >= CACHE_SIZE {
                // Still full of live entries: drop the one closest to expiry.
                if let Some(oldest) = self.entries.iter().min_by_key(|(_, (_, d))| *d).map(|(k, _)| *k) {
                    self.entries.remove(&oldest);
                }
            }
        }
        self.entries.insert(key, (node, until));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_is_bounded_and_expires() {
        let mut cache = Cache::default();
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        for i in 0..CACHE_SIZE + 10 {
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&(i as u64).to_le_bytes());
            cache.insert(key, format!("n{i}"), later + Duration::from_millis(i as u64));
        }
        assert_eq!(cache.entries.len(), CACHE_SIZE);
        let mut first = [0u8; 32];
        first[..8].copy_from_slice(&0u64.to_le_bytes());
        assert_eq!(cache.get(&first, now), None, "the oldest entries made room");
        let mut last = [0u8; 32];
        last[..8].copy_from_slice(&((CACHE_SIZE + 9) as u64).to_le_bytes());
        assert_eq!(
            cache.get(&last, now).as_deref(),
            Some(&*format!("n{}", CACHE_SIZE + 9))
        );
        assert_eq!(
            cache.get(&last, later + Duration::from_secs(3600)),
            None,
            "expired"
        );
        assert!(!cache.entries.contains_key(&last));
    }
}
