//! A policy the controller cannot read fails closed on the data path: the node proxy refuses
//! what a broken DENY selects, a broken ALLOW admits nothing, and fixing the policy restores
//! the path. The controller runs on its local-file source, as the cluster's YAML is written.
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Result};

use mesh_harness::agent::Agent;
use mesh_harness::app::{client, echo_server, wait_mesh_path};
use mesh_harness::controller::{namespace_yaml, pod_yaml, policy_yaml, Controller};
use mesh_harness::{wait_until, Cluster, Pod};

const WAIT: Duration = Duration::from_secs(20);

/// `shop` (enrolled), `client` on node a and `server` on node b, and `policy` (YAML).
fn shop(controller: &Controller, client: &Pod, server: &Pod, policy: &str) -> Result<()> {
    let mut yaml = namespace_yaml("shop", &[("mesh.dev/enroll", "true")]);
    for pod in [client, server] {
        yaml.push_str("---\n");
        yaml.push_str(&pod_yaml(pod, "shop", &pod.name, &[("app", &pod.name)]));
    }
    if !policy.is_empty() {
        yaml.push_str("---\n");
        yaml.push_str(policy);
    }
    controller.apply("shop", &yaml)
}

#[test]
fn a_policy_the_controller_cannot_read_fails_closed_on_the_data_path() -> Result<()> {
    let cluster = Cluster::new("dp-failclosed")?;
    cluster.add_node("a")?;
    cluster.add_node("b")?;
    let client_pod = cluster.add_pod("a", "client")?;
    let server_pod = cluster.add_pod("b", "server")?;
    let controller = Controller::start(&cluster, &[])?;
    let mut agents = Vec::new();
    for node in cluster.nodes() {
        let mut agent = Agent::new(&node, &controller, &[])?;
        agent.start(&cluster)?;
        agents.push(agent);
    }
    shop(&controller, &client_pod, &server_pod, "")?;
    let _server = echo_server(&cluster, &server_pod, &[8080])?;
    let dst = SocketAddr::new(server_pod.ipv4.into(), 8080);
    wait_mesh_path(&cluster, &agents, &client_pod, dst)?;
    let refused = || match client(&cluster, &client_pod, dst, 1024) {
        Ok(report) => Err(format!("the client got through: {report:?}")),
        Err(_) => Ok(()),
    };

    // Meant to deny one peer, but its principal is malformed: it denies every peer.
    let broken_deny = policy_yaml("broken", "shop", "server", "DENY", "not-a-principal");
    shop(&controller, &client_pod, &server_pod, &broken_deny)?;
    wait_until(WAIT, "the broken DENY to refuse the client", refused)?;
    let denials = agents[1].metric(&cluster, r#"mesh_policy_denials_total{policy="shop/broken"}"#)?;
    ensure!(
        denials >= 1.0,
        "node b names the broken policy in its denials: {denials}"
    );

    // Fixed (it denies someone else now): the client gets through again.
    let fixed = policy_yaml(
        "broken",
        "shop",
        "server",
        "DENY",
        "cluster.local/ns/shop/sa/other",
    );
    shop(&controller, &client_pod, &server_pod, &fixed)?;
    wait_mesh_path(&cluster, &agents, &client_pod, dst)?;

    // An ALLOW with a wildcard principal (not supported): it allows nothing, so the server
    // is default-deny; leaving it out would have allowed everyone.
    let broken_allow = policy_yaml("broken", "shop", "server", "ALLOW", "'*'");
    shop(&controller, &client_pod, &server_pod, &broken_allow)?;
    wait_until(WAIT, "the broken ALLOW to leave the server default-deny", refused)?;
    let denials = agents[1].metric(&cluster, r#"mesh_policy_denials_total{policy="default-deny"}"#)?;
    ensure!(denials >= 1.0, "node b counts default-deny denials: {denials}");
    Ok(())
}
