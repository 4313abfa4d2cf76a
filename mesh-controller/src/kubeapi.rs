//! Small helpers for talking to the Kubernetes API: errors that say which verb on which
//! resource failed (so a missing RBAC rule is one log line away from its fix).

use std::fmt;

/// A failed API call: `verb` on `resource` (such as `create` on `secrets mesh-system/mesh-ca`).
#[derive(Debug, thiserror::Error)]
pub struct ApiError {
    pub verb: &'static str,
    pub resource: String,
    #[source]
    pub source: kube::Error,
}

impl ApiError {
    pub fn new(verb: &'static str, resource: impl Into<String>, source: kube::Error) -> Self {
        ApiError {
            verb,
            resource: resource.into(),
            source,
        }
    }

    /// The HTTP status of the API's answer, when it answered.
    pub fn code(&self) -> Option<u16> {
        status_code(&self.source)
    }

    /// RBAC refused the call (403).
    pub fn is_forbidden(&self) -> bool {
        self.code() == Some(403)
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            kube::Error::Api(status) if status.code == 403 => write!(
                f,
                "{} {}: forbidden by RBAC (grant the controller's service account `{}` on it): {}",
                self.verb, self.resource, self.verb, status.message
            ),
            kube::Error::Api(status) => write!(
                f,
                "{} {}: {} {} {}",
                self.verb, self.resource, status.code, status.reason, status.message
            ),
            other => write!(f, "{} {}: {other}", self.verb, self.resource),
        }
    }
}

/// The HTTP status of an API error, when the API answered.
pub fn status_code(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}
