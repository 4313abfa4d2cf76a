//! Seeing inside, end to end: the connection metrics, access logs and admin API of real agents
//! count exactly the traffic the test drives through the mesh.
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::Value;

use mesh_harness::agent::Agent;
use mesh_harness::app::{client, echo_server, testapp, wait_mesh_path};
use mesh_harness::controller::{namespace_yaml, pod_yaml, policy_yaml, service_yaml, Controller};
use mesh_harness::{bin_path, wait_until, Cluster, Node, Pod};

const WAIT: Duration = Duration::from_secs(20);
const VIP: &str = "10.96.0.20";
const TD: &str = "spiffe://cluster.local/ns/shop/sa";

/// Two nodes; `shop` (enrolled) has `client` and `local` on a, `server` on b, and a Service
/// `server` (VIP:80 → 8080). `agents[0]` runs on a, `agents[1]` on b.
struct World {
    cluster: Cluster,
    _controller: Controller,
    a: Node,
    b: Node,
    client: Pod,
    local: Pod,
    server: Pod,
    agents: Vec<Agent>,
}

fn world(name: &str, agent_args: &[&str], extra: &str) -> Result<World> {
    let cluster = Cluster::new(name)?;
    let a = cluster.add_node("a")?;
    let b = cluster.add_node("b")?;
    let client = cluster.add_pod("a", "client")?;
    let local = cluster.add_pod("a", "local")?;
    let server = cluster.add_pod("b", "server")?;
    let controller = Controller::start(&cluster, &[])?;
    let mut agents = Vec::new();
    for node in cluster.nodes() {
        let mut agent = Agent::new(&node, &controller, agent_args)?;
        agent.start(&cluster)?;
        agents.push(agent);
    }
    let mut yaml = namespace_yaml("shop", &[("mesh.dev/enroll", "true")]);
    for pod in [&client, &local, &server] {
        yaml.push_str("---\n");
        yaml.push_str(&pod_yaml(pod, "shop", &pod.name, &[("app", &pod.name)]));
    }
    yaml.push_str("---\n");
    yaml.push_str(&service_yaml("server", "shop", VIP, 80, 8080, "server"));
    yaml.push_str(extra);
    controller.apply("shop", &yaml)?;
    Ok(World {
        cluster,
        _controller: controller,
        a,
        b,
        client,
        local,
        server,
        agents,
    })
}

impl World {
    fn wait_path(&self, dst: SocketAddr) -> Result<()> {
        wait_mesh_path(&self.cluster, &self.agents, &self.client, dst)
    }

    /// Waits until `agent`'s `name` summed over samples with `labels` reaches `want`.
    fn wait_metric(&self, agent: usize, name: &str, labels: &[(&str, &str)], want: f64) -> Result<()> {
        let agent = &self.agents[agent];
        wait_until(WAIT, &format!("{name}{labels:?} = {want}"), || {
            match agent.metric_sum(&self.cluster, name, labels) {
                Ok(v) if v == want => Ok(()),
                Ok(v) => Err(format!("last seen {v}")),
                Err(e) => Err(format!("{e:#}")),
            }
        })
    }
}

fn vip() -> SocketAddr {
    SocketAddr::new(VIP.parse().expect("a valid VIP"), 80)
}

/// `meshctl ARGS --socket <agent's socket>` on `node`: stdout, or an error with stderr.
fn meshctl_text(w: &World, agent: &Agent, node: &Node, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(bin_path("meshctl")?);
    cmd.args(args)
        .arg("--socket")
        .arg(agent.admin_socket())
        .env("COLUMNS", "80");
    let out = w.cluster.exec_on_node(node, cmd)?.success()?;
    Ok(out.stdout)
}

/// The same, with `-o json` parsed.
fn meshctl(w: &World, agent: &Agent, node: &Node, args: &[&str]) -> Result<Value> {
    let text = meshctl_text(w, agent, node, args)?;
    serde_json::from_str(&text).with_context(|| format!("meshctl {args:?}: {text}"))
}

/// The agent's access-log lines (JSON, target `access`).
fn access_lines(agent: &Agent) -> Vec<Value> {
    agent
        .logs()
        .into_iter()
        .filter(|l| l["target"] == "access")
        .collect()
}

#[test]
fn connection_metrics_and_access_logs_count_exactly_the_traffic() -> Result<()> {
    let w = world("obs-count", &[], "")?;
    let _server = echo_server(&w.cluster, &w.server, &[8080])?;
    w.wait_path(vip())?;

    let source = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("source_workload_namespace", "shop"),
        ("source_principal", &format!("{TD}/client")),
        ("destination_workload", "server"),
        ("destination_workload_namespace", "shop"),
        ("destination_principal", &format!("{TD}/server")),
        ("destination_service", "shop/server"),
        ("response_flags", "-"),
    ]
    .map(|(k, v)| (k, v.to_owned()));
    let source: Vec<(&str, &str)> = source.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // The destination's proxy knows the client by its certificate and address, and the service
    // by the source's word (forwarded's host=), which its own state confirms.
    let destination: Vec<(&str, &str)> = source
        .iter()
        .map(|&(k, v)| match k {
            "reporter" => (k, "destination"),
            _ => (k, v),
        })
        .collect();
    // Everything the warm-up left behind is settled before the baseline is taken.
    let (a, b) = (&w.agents[0], &w.agents[1]);
    let settled = |agent: &Agent, labels: &[(&str, &str)]| -> Result<f64> {
        let opened = agent.metric_sum(&w.cluster, "mesh_tcp_connections_opened_total", labels)?;
        w.wait_metric(
            if std::ptr::eq(agent, a) { 0 } else { 1 },
            "mesh_tcp_connections_closed_total",
            labels,
            opened,
        )?;
        Ok(opened)
    };
    let base_a = settled(a, &source)?;
    let base_b = settled(b, &destination)?;
    let bytes_a = a.metric_sum(&w.cluster, "mesh_tcp_received_bytes_total", &source)?;
    let redirected = a.metric_sum(&w.cluster, "mesh_bpf_events_total", &[("event", "redirected_v4")])?;
    let logged = access_lines(a).len();

    const N: usize = 5;
    const BYTES: usize = 10_000;
    for _ in 0..N {
        client(&w.cluster, &w.client, vip(), BYTES)?;
    }
    let n = N as f64;
    for (i, labels, base) in [(0, &source, base_a), (1, &destination, base_b)] {
        w.wait_metric(i, "mesh_tcp_connections_closed_total", labels, base + n)?;
        let agent = &w.agents[i];
        let opened = agent.metric_sum(&w.cluster, "mesh_tcp_connections_opened_total", labels)?;
        ensure!(
            opened == base + n,
            "agent {i}: opened {opened}, want {}",
            base + n
        );
        let count = agent.metric_sum(&w.cluster, "mesh_tcp_connection_duration_seconds_count", labels)?;
        ensure!(count == base + n, "agent {i}: duration count {count}");
    }
    for name in ["mesh_tcp_received_bytes_total", "mesh_tcp_sent_bytes_total"] {
        let got = a.metric_sum(&w.cluster, name, &source)?;
        let want = bytes_a + (N * BYTES) as f64;
        ensure!(got == want, "{name} on a: {got}, want {want}");
    }
    let got = a.metric_sum(&w.cluster, "mesh_bpf_events_total", &[("event", "redirected_v4")])?;
    ensure!(
        got == redirected + n,
        "redirected_v4: {got}, want {}",
        redirected + n
    );

    // The gauges and histograms beside them.
    let handshakes = a.metric_sum(
        &w.cluster,
        "mesh_hbone_handshake_duration_seconds_count",
        &[("direction", "client")],
    )?;
    ensure!(handshakes >= 1.0, "client handshakes: {handshakes}");
    let served = b.metric_sum(
        &w.cluster,
        "mesh_hbone_handshake_duration_seconds_count",
        &[("direction", "server")],
    )?;
    ensure!(served >= 1.0, "server handshakes: {served}");
    ensure!(a.metric_sum(&w.cluster, "mesh_pool_connections", &[])? >= 1.0);
    let expiry = a.metric_sum(
        &w.cluster,
        "mesh_certificate_expiration_timestamp_seconds",
        &[("identity", &format!("{TD}/client"))],
    )?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    ensure!(
        expiry > now,
        "client certificate expiry {expiry} is not after now {now}"
    );
    ensure!(a.metric_sum(&w.cluster, "process_resident_memory_bytes", &[])? > 0.0);

    // One access-log line per connection, with what the metrics count.
    wait_until(WAIT, "five access-log lines", || {
        let n = access_lines(a).len() - logged;
        (n == N).then_some(()).ok_or(format!("{n} new lines"))
    })?;
    for line in &access_lines(a)[logged..] {
        ensure!(
            line["direction"] == "outbound" && line["route"] == "hbone",
            "{line}"
        );
        ensure!(line["src.identity"] == format!("{TD}/client").as_str(), "{line}");
        ensure!(line["dst.identity"] == format!("{TD}/server").as_str(), "{line}");
        ensure!(
            line["dst.service"] == "shop/server" && line["result"] == "-",
            "{line}"
        );
        ensure!(
            line["bytes_sent"] == BYTES && line["bytes_received"] == BYTES,
            "{line}"
        );
        ensure!(line["duration_ms"].is_u64(), "{line}");
    }
    Ok(())
}

#[test]
fn a_denied_connection_is_counted_by_policy_and_flag_and_logged_whatever_the_sampling() -> Result<()> {
    let policy = format!(
        "---\n{}",
        policy_yaml("no-client", "shop", "local", "DENY", &format!("{TD}/client"))
    );
    let w = world("obs-deny", &["--access-log-sample-rate", "0"], &policy)?;
    let _server = echo_server(&w.cluster, &w.server, &[8080])?;
    let _local = echo_server(&w.cluster, &w.local, &[8080])?;
    w.wait_path(vip())?;
    let a = &w.agents[0];
    let denials = [("policy", "shop/no-client")];
    let before = a.metric_sum(&w.cluster, "mesh_policy_denials_total", &denials)?;

    let dst = SocketAddr::new(w.local.ipv4.into(), 8080);
    let mut cmd = testapp()?;
    cmd.args(["client", "--connect", &dst.to_string(), "--bytes", "100"]);
    let out = w.cluster.exec_in_pod(&w.client, cmd)?;
    ensure!(
        out.stdout.contains(r#""ok":false"#),
        "the client was refused: {}",
        out.stdout
    );

    w.wait_metric(0, "mesh_policy_denials_total", &denials, before + 1.0)?;
    for reporter in ["source", "destination"] {
        let labels = [
            ("reporter", reporter),
            ("destination_workload", "local"),
            ("response_flags", "DENIED"),
        ];
        let closed = a.metric_sum(&w.cluster, "mesh_tcp_connections_closed_total", &labels)?;
        ensure!(closed == 1.0, "{reporter}: closed DENIED {closed}");
    }
    // Sampling at 0 keeps successes out of the log, never failures.
    let lines = access_lines(a);
    let denied: Vec<_> = lines.iter().filter(|l| l["result"] == "DENIED").collect();
    ensure!(denied.len() == 1, "one denied line: {lines:?}");
    ensure!(
        denied[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("shop/no-client")),
        "{:?}",
        denied[0]
    );
    ensure!(
        lines.iter().all(|l| l["result"] != "-"),
        "no successful connection is logged at rate 0: {lines:?}"
    );
    Ok(())
}

#[test]
fn the_admin_api_shows_live_connections_workloads_certificates_and_the_kernel() -> Result<()> {
    let w = world("obs-admin", &["--admin-addr", "0.0.0.0:15000"], "")?;
    let _server = echo_server(&w.cluster, &w.server, &[8080])?;
    w.wait_path(vip())?;
    let (a, b) = (&w.agents[0], &w.agents[1]);

    // A slow transfer keeps one connection open while the admin API is read.
    let mut cmd = testapp()?;
    cmd.args(["client", "--connect", &vip().to_string(), "--bytes", "2000000"]);
    cmd.args(["--pace-ms", "20", "--timeout-ms", "60000"]);
    let slow = w.cluster.spawn_in_pod(&w.client, cmd)?;
    // The source is the TCP peer: the client for its own node's proxy, and for b's too, since
    // node a's proxy connects from the client pod's address.
    let source_ip = w.client.ipv4.to_string();
    let live = |agent: &Agent, node: &Node, direction: &str| -> Result<Value> {
        let mut found = Value::Null;
        wait_until(WAIT, &format!("a live {direction} connection"), || {
            let list = meshctl(&w, agent, node, &["node", "connections", "-o", "json"])
                .map_err(|e| format!("{e:#}"))?;
            let hit = list.as_array().into_iter().flatten().find(|c| {
                c["direction"] == direction
                    && c["source"]
                        .as_str()
                        .is_some_and(|s| s.starts_with(source_ip.as_str()))
                    && c["bytes_sent"].as_u64().is_some_and(|n| n > 0)
            });
            match hit {
                Some(c) => {
                    found = c.clone();
                    Ok(())
                }
                None => Err(format!("last seen {list}")),
            }
        })?;
        Ok(found)
    };
    let out = live(a, &w.a, "outbound")?;
    ensure!(
        out["destination_identity"] == format!("{TD}/server").as_str(),
        "{out}"
    );
    ensure!(out["source_identity"] == format!("{TD}/client").as_str(), "{out}");
    ensure!(
        out["service"] == "shop/server" && out["route"] == "hbone",
        "{out}"
    );
    let inb = live(b, &w.b, "inbound")?;
    // The table an operator reads, while the connection is open.
    let table = meshctl_text(&w, a, &w.a, &["node", "connections"])?;
    ensure!(
        table.lines().next().is_some_and(|h| h.starts_with("DIR")) && table.contains("shop/server"),
        "{table}"
    );
    ensure!(
        table.lines().all(|l| l.chars().count() <= 80),
        "fits 80 columns:\n{table}"
    );
    println!("meshctl node connections on a:\n{table}");
    ensure!(inb["source_identity"] == format!("{TD}/client").as_str(), "{inb}");
    slow.wait_exit(Duration::from_secs(60))?;

    let status = a.admin_get(&w.cluster, "/v1/status")?;
    ensure!(status["api"] == 1 && status["ready"] == true, "{status}");
    ensure!(
        status["config_version"].is_string() && status["node"] == w.a.name.as_str(),
        "{status}"
    );

    let workloads = meshctl(&w, a, &w.a, &["node", "workloads", "-o", "json"])?;
    for pod in [&w.client, &w.local] {
        let wl = workloads
            .as_array()
            .into_iter()
            .flatten()
            .find(|x| x["name"] == pod.name.as_str())
            .with_context(|| format!("{} in {workloads}", pod.name))?;
        ensure!(wl["enrolled"] == true && wl["captured"] == true, "{wl}");
        ensure!(
            wl["cgroup"].as_str().is_some_and(|c| c.contains(&pod.uid)),
            "{wl}"
        );
        ensure!(wl["identity"] == format!("{TD}/{}", pod.name).as_str(), "{wl}");
    }

    let certs = meshctl(&w, a, &w.a, &["node", "certs", "-o", "json"])?;
    let cert = certs
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["identity"] == format!("{TD}/client").as_str())
        .with_context(|| format!("client certificate in {certs}"))?;
    ensure!(cert["issuer"].as_str().is_some_and(|i| !i.is_empty()), "{cert}");

    let bpf = a.admin_get(&w.cluster, "/v1/bpf")?;
    let programs = bpf["programs"].as_array().context("programs")?;
    ensure!(
        programs
            .iter()
            .any(|p| p["attach"] == "cgroup/connect4" && p["link_id"].is_u64()),
        "{bpf}"
    );
    let enrolled = bpf["maps"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["name"] == "mesh_enrolled")
        .context("mesh_enrolled")?;
    ensure!(
        enrolled["entries"] == 2,
        "client and local are enrolled: {enrolled}"
    );
    ensure!(bpf["counters"]["redirected_v4"].as_u64() >= Some(1), "{bpf}");

    let services = a.admin_get(&w.cluster, "/v1/services")?;
    ensure!(
        services
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["name"] == "server" && s["vips"][0] == VIP),
        "{services}"
    );

    // The log filter changes at run time; a malformed one is refused and the old one stays.
    let set = a.admin_unix(
        &w.cluster,
        "PUT",
        "/v1/log-level",
        Some(r#"{"filter":"warn,mesh_node::proxy=debug"}"#),
    )?;
    // The filter comes back as the parser prints it: the same directives, most specific first.
    let same = |v: &Value| {
        v["filter"].as_str().is_some_and(|f| {
            f.split(',').any(|d| d == "warn") && f.split(',').any(|d| d == "mesh_node::proxy=debug")
        })
    };
    ensure!(same(&set), "{set}");
    let bad = a.admin_unix(&w.cluster, "PUT", "/v1/log-level", Some(r#"{"filter":"=["}"#))?;
    ensure!(
        bad["error"].as_str().is_some_and(|e| e.contains("filter")),
        "{bad}"
    );
    let now = a.admin_unix(&w.cluster, "GET", "/v1/log-level", None)?;
    ensure!(same(&now), "{now}");

    // Listening on every address, the API still answers only the node itself.
    let mut remote = Command::new("curl");
    remote.args(["-sS", "--max-time", "5"]);
    remote.arg(format!("http://{}:15000/v1/status", w.a.ipv4));
    let out = w.cluster.exec_in_net(w.cluster.link_netns(), remote)?;
    ensure!(
        !out.stdout.contains("\"api\""),
        "a remote client got an answer: {}",
        out.stdout
    );
    Ok(())
}
