//! `cargo xtask demo`: a node with two pods in network namespaces and the real agent. A
//! connection from the enrolled pod is captured in the kernel and carried by the node proxy,
//! which reads its original destination; the demo shows what each end saw, then cleans up.
use std::net::SocketAddr;

use anyhow::{ensure, Result};

use mesh_harness::agent::Agent;
use mesh_harness::app::{accept_peer, client, echo_server};
use mesh_harness::controller::{namespace_yaml, pod_yaml, Controller};
use mesh_harness::Cluster;

use crate::run::{cargo, require_root, step};

#[derive(clap::Args)]
pub struct Args {
    /// Skip the machine set-up (when you know it is done).
    #[arg(long)]
    no_setup: bool,
}

pub fn run(args: Args) -> Result<()> {
    require_root("cargo xtask demo")?;
    if !args.no_setup {
        crate::setup::run()?;
    }
    step("build binaries", cargo().args(["build", "--workspace", "--bins"]))?;

    let cluster = Cluster::new("demo")?;
    let node = cluster.add_node("a")?;
    let web = cluster.add_pod("a", "web")?;
    let api = cluster.add_pod("a", "api")?;
    let server = echo_server(&cluster, &api, &[8080])?;
    let controller = Controller::start(&cluster, &[])?;
    let shop = namespace_yaml("shop", &[("mesh.dev/enroll", "true")]);
    controller.apply(
        "shop",
        &format!("{shop}---\n{}", pod_yaml(&web, "shop", "web", &[])),
    )?;
    controller.apply(
        "backend",
        &format!(
            "{}---\n{}",
            namespace_yaml("backend", &[]),
            pod_yaml(&api, "backend", "api", &[])
        ),
    )?;
    let mut agent = Agent::new(&node, &controller, &[])?;
    agent.start(&cluster)?;
    agent.wait_enrolled(&[&web])?;

    println!();
    println!(
        "node a runs mesh-node; pod web ({}) is enrolled, pod api runs a TCP echo server.",
        web.ipv4
    );
    println!("web connects to api:8080; the kernel sends the connection to the node proxy instead:");
    println!();
    println!(
        "{:<24} {:<24} {:<26} {:<8}",
        "web connected to", "proxy read original dst", "api saw a connection from", "echoed"
    );
    let targets = [
        SocketAddr::new(api.ipv4.into(), 8080),
        SocketAddr::new(api.ipv6.into(), 8080),
    ];
    for (i, dst) in targets.into_iter().enumerate() {
        let report = client(&cluster, &web, dst, 64 * 1024)?;
        let (src, original) = agent.wait_nth_captured(i + 1)?;
        let seen = accept_peer(&server, i + 1)?;
        let echoed = format!("{} B", report.received);
        println!(
            "{:<24} {:<24} {:<26} {echoed:<8}",
            dst.to_string(),
            original.to_string(),
            seen.ip().to_string()
        );
        ensure!(
            original == dst,
            "the proxy read {original} as the original destination of {dst}"
        );
        ensure!(
            seen.ip() != src.ip(),
            "api saw the client pod itself: the connection was not captured"
        );
    }
    println!();
    println!("api saw the node's address, not web's: the connection went through the node proxy,");
    println!("which found the original destination in the kernel's maps. Cleaning up.");
    Ok(())
}
