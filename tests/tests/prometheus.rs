//! A real Prometheus scraping a real node agent.
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Result};

use mesh_harness::agent::Agent;
use mesh_harness::app::{client, echo_server};
use mesh_harness::controller::{namespace_yaml, pod_yaml, Controller};
use mesh_harness::prometheus::{Prometheus, Sample, ScrapeTarget};
use mesh_harness::{wait_until, Cluster};

const WAIT: Duration = Duration::from_secs(20);

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn prometheus_scrapes_a_node_and_counts_its_connections_by_route() -> Result<()> {
    let cluster = Cluster::new("prom-scrape")?;
    let node = cluster.add_node("a")?;
    let client_pod = cluster.add_pod("a", "client")?;
    let server = cluster.add_pod("a", "server")?;
    let outsider = cluster.add_pod("a", "outsider")?;
    let controller = Controller::start(&cluster, &[])?;
    let mut agent = Agent::new(&node, &controller, &[])?;
    agent.start(&cluster)?;
    let mut shop = namespace_yaml("shop", &[("mesh.dev/enroll", "true")]);
    for pod in [&client_pod, &server] {
        shop.push_str("---\n");
        shop.push_str(&pod_yaml(pod, "shop", &pod.name, &[("app", &pod.name)]));
    }
    controller.apply("shop", &shop)?;
    controller.apply(
        "plain",
        &format!(
            "{}---\n{}",
            namespace_yaml("plain", &[]),
            pod_yaml(&outsider, "plain", "default", &[])
        ),
    )?;
    let _server = echo_server(&cluster, &server, &[8080])?;
    let _outsider = echo_server(&cluster, &outsider, &[8080])?;

    let prom = Prometheus::start(
        &cluster,
        &[ScrapeTarget::mesh_node(&node)],
        Duration::from_millis(200),
    )?;
    let instance = format!("{}:15020", node.ipv4);
    let target = labels(&[("instance", &instance), ("job", "mesh-node"), ("node", "a")]);
    let targets = prom.wait_targets_up(WAIT)?;
    ensure!(
        targets.len() == 1 && targets[0].scrape_pool == "mesh-node" && targets[0].labels == target,
        "the one target, labelled: {targets:?}"
    );
    let up = prom.query(r#"up{job="mesh-node"}"#)?;
    let mut want = target.clone();
    want.insert("__name__".into(), "up".into());
    ensure!(
        up == [Sample {
            labels: want,
            value: 1.0
        }],
        "up: {up:?}"
    );

    // Same node and enrolled: served in the proxy. Not enrolled: passed through as plain TCP.
    const CONNECTIONS: f64 = 3.0;
    for (route, dst) in [
        ("local", SocketAddr::new(server.ipv4.into(), 8080)),
        ("passthrough", SocketAddr::new(outsider.ipv4.into(), 8080)),
    ] {
        let sample = format!(r#"mesh_outbound_connections_total{{route="{route}"}}"#);
        // The first connection the proxy routes this way: config and capture are in place.
        wait_until(WAIT, &format!("a {route} connection to {dst}"), || {
            client(&cluster, &client_pod, dst, 1024).map_err(|e| format!("{e:#}"))?;
            let n = agent.metric(&cluster, &sample).map_err(|e| format!("{e:#}"))?;
            if n >= 1.0 {
                Ok(())
            } else {
                Err(format!("{sample} = {n}"))
            }
        })?;
        let before = agent.metric(&cluster, &sample)?;
        for _ in 0..CONNECTIONS as usize {
            client(&cluster, &client_pod, dst, 1024)?;
        }
        let count = before + CONNECTIONS;
        let at_agent = agent.metric(&cluster, &sample)?;
        ensure!(
            at_agent == count,
            "the agent counted {at_agent} {route} connections, want {count}"
        );
        let query = format!(r#"mesh_outbound_connections_total{{job="mesh-node", route="{route}"}}"#);
        let seen = prom.wait_for(&query, |s| s.first().is_some_and(|s| s.value == count), WAIT)?;
        let mut want = target.clone();
        want.insert("__name__".into(), "mesh_outbound_connections_total".into());
        want.insert("route".into(), route.into());
        ensure!(
            seen == [Sample {
                labels: want,
                value: count
            }],
            "{query}: {seen:?}"
        );
    }
    let by_route = prom.query(r#"sum by (route) (mesh_outbound_connections_total{job="mesh-node"})"#)?;
    let routes: BTreeSet<&str> = by_route.iter().map(|s| s.labels["route"].as_str()).collect();
    ensure!(
        routes.is_superset(&BTreeSet::from(["local", "passthrough"])),
        "an aggregation by route: {by_route:?}"
    );
    Ok(())
}
