//! The command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::check::CheckArgs;
use crate::client::{parse_node_addr, Target};
use crate::enroll::parse_namespace;
use crate::node::NodeCommand;
use crate::output::Format;

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  a pre-flight check or the operation failed
  2  usage error (bad flags or arguments)
  3  the node could not be reached (no such host or socket, refused, timed out)
  4  the node speaks another admin API version (or is not a mesh node)
  5  the node answered with an error";

/// Inspect and operate a mesh node.
#[derive(Debug, Parser)]
#[command(
    name = "meshctl",
    version,
    long_about = "Inspect and operate a mesh node: read one node's admin API, check that this \
                  machine can run the datapath, and enroll namespaces.",
    after_long_help = EXIT_CODES
)]
pub struct Cli {
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value = "table")]
    pub output: Format,

    #[command(subcommand)]
    pub command: Command,
}

/// Which node's admin API to talk to, and how long to wait for it.
#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// The node's admin API address.
    #[arg(
        long,
        global = true,
        value_name = "HOST:PORT",
        env = "MESHCTL_NODE",
        default_value = "127.0.0.1:15000",
        value_parser = parse_node_addr
    )]
    pub node: String,

    /// The node's admin API Unix socket (mesh-node --admin-socket); used instead of --node.
    #[arg(long, global = true, value_name = "PATH", env = "MESHCTL_SOCKET")]
    pub socket: Option<PathBuf>,

    /// How long to wait for the connection.
    #[arg(long, global = true, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// How long to wait for the whole answer.
    #[arg(long, global = true, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

impl NodeArgs {
    pub fn target(&self) -> Target {
        match &self.socket {
            Some(path) => Target::Unix(path.clone()),
            None => Target::Tcp(self.node.clone()),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Read one node's admin API.
    Node {
        #[command(flatten)]
        node: NodeArgs,
        #[command(subcommand)]
        command: NodeCommand,
    },

    /// Pre-flight: can mesh-node's datapath run on this machine?
    ///
    /// One PASS/FAIL line per requirement (kernel, BTF, cgroup v2, bpffs, capabilities), each
    /// failure with its fix.
    Check(CheckArgs),

    /// Enroll a namespace's pods in the mesh (label it mesh.dev/enroll=true).
    Enroll(EnrollArgs),

    /// Take a namespace's pods out of the mesh (remove its mesh.dev/enroll label).
    Unenroll(EnrollArgs),

    /// meshctl's version, and the node's.
    Version {
        /// Only meshctl's own version; do not ask the node.
        #[arg(long)]
        client: bool,
        #[command(flatten)]
        node: NodeArgs,
    },

    /// Print a shell completion script.
    ///
    /// For example: `meshctl completions bash > /etc/bash_completion.d/meshctl`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Clone, Args)]
pub struct EnrollArgs {
    /// The namespace to label.
    #[arg(value_parser = parse_namespace)]
    pub namespace: String,

    /// Edit the Namespace in this mesh-controller local-file source directory
    /// (`--source file:DIR`) instead of the cluster.
    #[arg(long, value_name = "DIR")]
    pub source_dir: Option<PathBuf>,

    /// The kubeconfig context to use (default: the current one, or the pod's service account).
    #[arg(long, value_name = "NAME", conflicts_with = "source_dir")]
    pub context: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn node_flags_go_with_node_commands_and_socket_wins() {
        let target = |args: &[&str]| match Cli::try_parse_from(args).unwrap().command {
            Command::Node { node, .. } | Command::Version { node, .. } => node.target(),
            other => panic!("{other:?}"),
        };
        let node = Target::Tcp("10.1.2.3:15000".into());
        assert_eq!(
            target(&["meshctl", "node", "status", "--node", "10.1.2.3:15000"]),
            node
        );
        assert_eq!(
            target(&["meshctl", "node", "--node", "10.1.2.3:15000", "status"]),
            node
        );
        assert_eq!(target(&["meshctl", "version", "--node", "10.1.2.3:15000"]), node);
        let socket = Target::Unix("/run/mesh/admin.sock".into());
        assert_eq!(
            target(&["meshctl", "node", "--socket", "/run/mesh/admin.sock", "certs"]),
            socket
        );
        let both = [
            "meshctl",
            "node",
            "certs",
            "--node",
            "10.1.2.3:15000",
            "--socket",
            "/run/mesh/admin.sock",
        ];
        assert_eq!(target(&both), socket);
        let cli = Cli::try_parse_from(["meshctl", "node", "status", "-o", "json"]).unwrap();
        assert_eq!(cli.output, Format::Json);
        // Node flags belong to the commands that talk to a node.
        assert!(Cli::try_parse_from(["meshctl", "check", "--node", "10.1.2.3:15000"]).is_err());
        assert!(Cli::try_parse_from(["meshctl", "node", "status", "--node", "nohost"]).is_err());
        assert!(Cli::try_parse_from(["meshctl", "enroll", "Bad_Name"]).is_err());
    }

    #[test]
    fn help_documents_the_exit_codes() {
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("3  the node could not be reached"), "{help}");
    }
}
