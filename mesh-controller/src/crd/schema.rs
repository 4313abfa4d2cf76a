//! The hand-written parts of the CRD's OpenAPI schema: what `schemars` cannot derive from a
//! Rust type (patterns, bounds, int-or-string, CEL rules). Every list and string is bounded,
//! which keeps the API server's CEL cost estimate low and objects small.
//!
//! The patterns use only what Go's RE2 (the API server), Rust's `regex` and Python's `re`
//! agree on: no look-around, no back-references.

use schemars::{json_schema, Schema, SchemaGenerator};

/// Items in any list of a policy.
pub const MAX_ITEMS: u64 = 64;

/// A port, 1–65535, as decimal digits without sign or leading zero.
pub const PORT_PATTERN: &str =
    "^([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$";

/// `[spiffe://]<trust-domain>/ns/<namespace>/sa/<service-account>` (SPIFFE ID syntax: a
/// lowercase trust domain; path segments of letters, digits, `.`, `-`, `_` that are not
/// `.` or `..`). Istio writes principals without the scheme; both forms are accepted.
pub const PRINCIPAL_PATTERN: &str = concat!(
    "^(spiffe://)?[a-z0-9._-]{1,255}",
    "/ns/([A-Za-z0-9_-][A-Za-z0-9._-]*|[.][A-Za-z0-9_-][A-Za-z0-9._-]*|[.][.][A-Za-z0-9._-]+)",
    "/sa/([A-Za-z0-9_-][A-Za-z0-9._-]*|[.][A-Za-z0-9_-][A-Za-z0-9._-]*|[.][.][A-Za-z0-9._-]+)$",
);

/// A namespace name: an RFC 1123 label.
pub const NAMESPACE_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// A label value: empty, or up to 63 alphanumerics, `-`, `_`, `.`, alphanumeric at both ends.
pub const LABEL_VALUE_PATTERN: &str = "^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$";

pub fn match_labels(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "Labels a pod must all carry to be selected; empty or absent selects \
                        every pod of the policy's namespace.",
        "type": "object",
        "maxProperties": MAX_ITEMS,
        "additionalProperties": {
            "type": "string",
            "maxLength": 63,
            "pattern": LABEL_VALUE_PATTERN,
        },
    })
}

pub fn principals(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "Peer identities, as `[spiffe://]<trust-domain>/ns/<namespace>/sa/<service-account>` \
                        (Istio's form, without the scheme, is accepted). No wildcards.",
        "type": "array",
        "maxItems": MAX_ITEMS,
        "items": {
            "type": "string",
            "maxLength": 2048,
            "pattern": PRINCIPAL_PATTERN,
            "x-kubernetes-validations": [
                {
                    "rule": "!self.contains('*')",
                    "message": "wildcards are not supported in principals",
                },
                {
                    // The SPIFFE limit is on the whole ID, scheme included, which a pattern
                    // cannot count when the scheme is optional.
                    "rule": "(self.startsWith('spiffe://') ? size(self) : size(self) + 9) <= 2048",
                    "message": "a SPIFFE ID is at most 2048 bytes long, spiffe:// included",
                },
            ],
        },
    })
}

pub fn namespaces(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "Peer namespaces.",
        "type": "array",
        "maxItems": MAX_ITEMS,
        "items": {
            "type": "string",
            "maxLength": 63,
            "pattern": NAMESPACE_PATTERN,
        },
    })
}

pub fn ports(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "Destination ports (of the pod, after Service translation), 1–65535, as \
                        numbers or strings (Istio writes strings).",
        "type": "array",
        "maxItems": MAX_ITEMS,
        "items": {
            // The API server admits only integers and strings here. Numbers are checked by
            // the bounds, strings by the pattern (each keyword applies only to its type).
            "x-kubernetes-int-or-string": true,
            "minimum": 1,
            "maximum": 65535,
            "pattern": PORT_PATTERN,
        },
    })
}
