//! Every way a meshctl command can fail, each with its exit code. The message is the one line
//! the user sees after `meshctl: `, so it names what failed and, where there is one, the cure.

use std::path::PathBuf;

use crate::enroll::EnrollError;

/// The exit codes, as `meshctl --help` documents them.
pub mod exit {
    pub const OK: u8 = 0;
    /// A pre-flight check or an operation failed.
    pub const FAILED: u8 = 1;
    /// Bad flags or arguments (clap's own code).
    pub const USAGE: u8 = 2;
    /// The node could not be reached: no such host or socket, refused, timed out.
    pub const UNREACHABLE: u8 = 3;
    /// The node speaks another admin API version, or is not a mesh node's admin API.
    pub const VERSION_MISMATCH: u8 = 4;
    /// The node answered with an error, or with something that is not the document asked for.
    pub const NODE_ERROR: u8 = 5;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach node {target}: {reason}")]
    Unreachable { target: String, reason: String },

    #[error("node {target} speaks admin API v{node}, this meshctl speaks v{ours}; use a matching meshctl")]
    VersionMismatch { target: String, node: String, ours: u32 },

    #[error(
        "{target} answered without the {header} header: it is not a mesh node's admin API \
         (or a mesh-node older than admin API v{ours})"
    )]
    NotAdminApi {
        target: String,
        header: &'static str,
        ours: u32,
    },

    #[error("node {target} answered {status} to {method} {path}: {message}")]
    NodeAnswered {
        target: String,
        method: String,
        path: String,
        status: u16,
        message: String,
    },

    #[error("node {target} sent an unreadable answer to {path}: {reason}")]
    BadAnswer {
        target: String,
        path: String,
        reason: String,
    },

    #[error("{failed} of {total} pre-flight checks failed")]
    CheckFailed { failed: usize, total: usize },

    #[error(transparent)]
    Enroll(#[from] EnrollError),

    /// Something failed on this side (encoding a request, writing the output).
    #[error("{0}")]
    Local(String),

    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    #[error("starting the async runtime: {0}")]
    Runtime(std::io::Error),
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Unreachable { .. } => exit::UNREACHABLE,
            Error::VersionMismatch { .. } | Error::NotAdminApi { .. } => exit::VERSION_MISMATCH,
            Error::NodeAnswered { .. } | Error::BadAnswer { .. } => exit::NODE_ERROR,
            Error::CheckFailed { .. }
            | Error::Enroll(_)
            | Error::Local(_)
            | Error::Io { .. }
            | Error::Runtime(_) => exit::FAILED,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_failure_has_its_exit_code() {
        let target = || "127.0.0.1:15000".to_owned();
        let cases = [
            (
                Error::Unreachable {
                    target: target(),
                    reason: "connection refused".into(),
                },
                3,
            ),
            (
                Error::VersionMismatch {
                    target: target(),
                    node: "2".into(),
                    ours: 1,
                },
                4,
            ),
            (
                Error::NotAdminApi {
                    target: target(),
                    header: "x-mesh-admin-api",
                    ours: 1,
                },
                4,
            ),
            (
                Error::NodeAnswered {
                    target: target(),
                    method: "GET".into(),
                    path: "/v1/status".into(),
                    status: 500,
                    message: "boom".into(),
                },
                5,
            ),
            (
                Error::BadAnswer {
                    target: target(),
                    path: "/v1/status".into(),
                    reason: "expected value".into(),
                },
                5,
            ),
            (Error::CheckFailed { failed: 1, total: 5 }, 1),
            (Error::Local("writing the output: no space left".into()), 1),
        ];
        for (error, code) in cases {
            assert_eq!(error.exit_code(), code, "{error}");
        }
    }

    #[test]
    fn the_version_mismatch_says_what_to_do() {
        let e = Error::VersionMismatch {
            target: "127.0.0.1:15000".into(),
            node: "2".into(),
            ours: 1,
        };
        assert_eq!(
            e.to_string(),
            "node 127.0.0.1:15000 speaks admin API v2, this meshctl speaks v1; use a matching meshctl"
        );
    }
}
