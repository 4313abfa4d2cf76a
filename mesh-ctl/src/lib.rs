//! `meshctl`, the operator CLI (DESIGN.md §8): it reads one node's admin API
//! ([`mesh_api::admin`]), checks that a machine can run the datapath, and enrolls namespaces.
//! `main.rs` only parses the command line and turns an [`Error`] into its exit code.

pub mod check;
pub mod cli;
pub mod client;
pub mod enroll;
pub mod error;
pub mod node;
pub mod output;
pub mod probe;
pub mod version;

use clap::CommandFactory;

pub use crate::cli::Cli;
use crate::cli::{Command, EnrollArgs, NodeArgs};
use crate::client::Client;
use crate::enroll::Change;
pub use crate::error::{exit, Error};
use crate::output::{print, render};

/// Runs one command, printing its result to stdout.
pub async fn run(cli: Cli) -> Result<(), Error> {
    let format = cli.output;
    let client = |node: &NodeArgs| Client::new(node.target(), node.connect_timeout, node.timeout);
    match &cli.command {
        Command::Node { node, command } => {
            print(&node::run(&client(node), command, format, output::width()).await?)
        }
        Command::Check(args) => {
            let lines = check::evaluate(&check::Facts::gather(args));
            print(&render(format, &lines, |l| check::render(l))?)?;
            let failed = lines.iter().filter(|l| !l.pass).count();
            if failed == 0 {
                Ok(())
            } else {
                Err(Error::CheckFailed {
                    failed,
                    total: lines.len(),
                })
            }
        }
        Command::Enroll(args) => enroll(args, Change::Enroll).await,
        Command::Unenroll(args) => enroll(args, Change::Unenroll).await,
        Command::Version {
            client: only_ours,
            node,
        } => {
            let client = (!only_ours).then(|| client(node));
            version::run(client.as_ref(), format).await
        }
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "meshctl", &mut script);
            print(&String::from_utf8_lossy(&script))
        }
    }
}

async fn enroll(args: &EnrollArgs, change: Change) -> Result<(), Error> {
    let outcome = match &args.source_dir {
        Some(dir) => enroll::in_source_dir(dir, &args.namespace, change)?,
        None => {
            let client = enroll::kube_client(args.context.as_deref()).await?;
            enroll::in_cluster(client, &args.namespace, change).await?
        }
    };
    print(&format!("{outcome}\n"))
}
