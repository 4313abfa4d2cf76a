//! SPIFFE identities of workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! Validation follows the SPIFFE ID specification: the trust domain uses lowercase letters,
//! digits, `.`, `-` and `_` (at most 255 bytes); path segments use letters, digits, `.`, `-`
//! and `_`, are non-empty and are not `.` or `..`; the whole ID is at most 2048 bytes. No
//! port, userinfo, query or fragment can pass because their characters are not allowed.

use std::fmt;
use std::str::FromStr;

const SCHEME: &str = "spiffe://";
const MAX_ID_LEN: usize = 2048;
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not a valid identity or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("must start with `spiffe://`")]
    Scheme,
    #[error("longer than {MAX_ID_LEN} bytes")]
    TooLong,
    #[error("trust domain is empty")]
    EmptyTrustDomain,
    #[error("trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    #[error("trust domain has {0:?}; only a-z, 0-9, `.`, `-` and `_` are allowed")]
    TrustDomainChar(char),
    #[error("path must be /ns/<namespace>/sa/<service-account>")]
    Path,
    #[error("path segment {0:?} is empty, `.` or `..`")]
    Segment(String),
    #[error("path segment {segment:?} has {found:?}; only letters, digits, `.`, `-` and `_` are allowed")]
    SegmentChar { segment: String, found: char },
}

/// A SPIFFE trust domain such as `cluster.local`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for TrustDomain {
    fn default() -> Self {
        TrustDomain("cluster.local".to_owned())
    }
}

impl FromStr for TrustDomain {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(IdentityError::EmptyTrustDomain);
        }
        if s.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(IdentityError::TrustDomainTooLong);
        }
        let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c);
        match s.chars().find(|&c| !allowed(c)) {
            Some(c) => Err(IdentityError::TrustDomainChar(c)),
            None => Ok(TrustDomain(s.to_owned())),
        }
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The identity of a Kubernetes service account in a trust domain.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Identity {
    trust_domain: TrustDomain,
    namespace: String,
    service_account: String,
}

impl Identity {
    pub fn new(
        trust_domain: TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        check_segment(namespace)?;
        check_segment(service_account)?;
        let id = Identity {
            trust_domain,
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        };
        if id.to_string().len() > MAX_ID_LEN {
            return Err(IdentityError::TooLong);
        }
        Ok(id)
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

fn check_segment(segment: &str) -> Result<(), IdentityError> {
    if segment.is_empty() || segment == "." || segment == ".." {
        return Err(IdentityError::Segment(segment.to_owned()));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
    match segment.chars().find(|&c| !allowed(c)) {
        Some(found) => Err(IdentityError::SegmentChar {
            segment: segment.to_owned(),
            found,
        }),
        None => Ok(()),
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_ID_LEN {
            return Err(IdentityError::TooLong);
        }
        let rest = s.strip_prefix(SCHEME).ok_or(IdentityError::Scheme)?;
        let (trust_domain, path) = rest.split_once('/').unwrap_or((rest, ""));
        let trust_domain = trust_domain.parse()?;
        if path.is_empty() {
            return Err(IdentityError::Path);
        }
        match path.split('/').collect::<Vec<_>>().as_slice() {
            ["ns", namespace, "sa", service_account] => {
                Identity::new(trust_domain, namespace, service_account)
            }
            segments => {
                // Report a bad segment before the shape, so `ns/../sa/x` says what is wrong.
                segments.iter().try_for_each(|s| check_segment(s))?;
                Err(IdentityError::Path)
            }
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_round_trip() {
        let s = "spiffe://cluster.local/ns/shop/sa/web";
        let id: Identity = s.parse().unwrap();
        assert_eq!(id.trust_domain().as_str(), "cluster.local");
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.service_account(), "web");
        assert_eq!(id.to_string(), s);
    }

    #[test]
    fn accepts_the_full_charsets() {
        for s in [
            "spiffe://a_b-c.9/ns/Ns.-_9/sa/SA",
            "spiffe://x/ns/a/sa/b",
            "spiffe://td/ns/.../sa/b",
        ] {
            assert_eq!(s.parse::<Identity>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn rejects_invalid_ids() {
        use IdentityError::*;
        let long_segment = "a".repeat(2040);
        let long_td = "a".repeat(256);
        let cases: Vec<(String, IdentityError)> = vec![
            ("http://cluster.local/ns/a/sa/b".into(), Scheme),
            ("SPIFFE://cluster.local/ns/a/sa/b".into(), Scheme),
            ("spiffe:///ns/a/sa/b".into(), EmptyTrustDomain),
            ("spiffe://Cluster.local/ns/a/sa/b".into(), TrustDomainChar('C')),
            ("spiffe://td:443/ns/a/sa/b".into(), TrustDomainChar(':')),
            ("spiffe://user@td/ns/a/sa/b".into(), TrustDomainChar('@')),
            (format!("spiffe://{long_td}/ns/a/sa/b"), TrustDomainTooLong),
            ("spiffe://td".into(), Path),
            ("spiffe://td/".into(), Path),
            ("spiffe://td/ns/a/sa/b/".into(), Segment(String::new())),
            ("spiffe://td/ns/a/sa".into(), Path),
            ("spiffe://td/ns/a/sa/b/c".into(), Path),
            ("spiffe://td/namespace/a/sa/b".into(), Path),
            ("spiffe://td/ns//sa/b".into(), Segment(String::new())),
            ("spiffe://td/ns/../sa/b".into(), Segment("..".into())),
            ("spiffe://td/ns/./sa/b".into(), Segment(".".into())),
            (
                "spiffe://td/ns/a/sa/b?x=1".into(),
                SegmentChar {
                    segment: "b?x=1".into(),
                    found: '?',
                },
            ),
            (
                "spiffe://td/ns/a/sa/b#f".into(),
                SegmentChar {
                    segment: "b#f".into(),
                    found: '#',
                },
            ),
            (
                "spiffe://td/ns/a%20/sa/b".into(),
                SegmentChar {
                    segment: "a%20".into(),
                    found: '%',
                },
            ),
            (format!("spiffe://td/ns/{long_segment}/sa/b"), TooLong),
        ];
        for (input, want) in cases {
            assert_eq!(input.parse::<Identity>(), Err(want), "{input}");
        }
    }

    #[test]
    fn new_validates_segments() {
        let td = TrustDomain::default();
        assert!(Identity::new(td.clone(), "shop", "web").is_ok());
        assert_eq!(
            Identity::new(td, "shop", "a/b"),
            Err(IdentityError::SegmentChar {
                segment: "a/b".into(),
                found: '/'
            })
        );
    }

    #[test]
    fn trust_domain_default_and_validation() {
        assert_eq!(TrustDomain::default().as_str(), "cluster.local");
        assert!("example.org".parse::<TrustDomain>().is_ok());
        assert_eq!("".parse::<TrustDomain>(), Err(IdentityError::EmptyTrustDomain));
        assert_eq!(
            "a/b".parse::<TrustDomain>(),
            Err(IdentityError::TrustDomainChar('/'))
        );
    }
}
