//! The bench's cluster: two nodes, a client pod on node a and a server pod on node b for each
//! path, the mesh on both nodes, the servers, and the peer chain when one is given.
//!
//! - direct: `plain-client` → `plain-server`, namespace `plain`, not enrolled: the kernel's
//!   path between two nodes, with the mesh installed but not in the way.
//! - mesh: `mesh-client` → `mesh-server`, namespace `bench`, enrolled and STRICT: captured on
//!   node a, HBONE (mTLS) to node b's proxy, which connects to the pod.
//! - peer: `plain-client` → the peer's listener on node a → … → `plain-server`.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use mesh_harness::agent::Agent;
use mesh_harness::controller::{namespace_yaml, pod_yaml, Controller};
use mesh_harness::{wait_until, Cluster, Node, Pod, Proc};

use super::iperf;
use super::peer::{fill, Hop, PeerSpec};
use super::report::PathKind;

pub const HTTP_PORT: u16 = 8080;
pub const IPERF_PORT: u16 = 5201;
/// The response body every HTTP figure asks for.
const BODY_BYTES: usize = 1024;
/// How long a path may take to start answering.
const READY: Duration = Duration::from_secs(30);
/// The peer's listeners: client side on node a's pod gateway, server side on node b's uplink.
const PEER_CLIENT_PORTS: [u16; 2] = [15101, 15102];
const PEER_SERVER_PORTS: [u16; 2] = [15201, 15202];

pub struct Pair {
    pub client: Pod,
    pub server: Pod,
}

/// Everything the bench runs. Fields drop in order: the processes stop before the cluster goes.
pub struct Topology {
    peers: Vec<Proc>,
    _servers: Vec<Proc>,
    agents: Vec<Agent>,
    _controller: Controller,
    _scratch: Vec<Scratch>,
    peer_entry: Option<[SocketAddr; 2]>,
    pub direct: Pair,
    pub mesh: Pair,
    client_node: Node,
    server_node: Node,
    pub cluster: Cluster,
}

impl Topology {
    pub fn up(peer: Option<&PeerSpec>) -> Result<Topology> {
        let cluster = Cluster::new("bench")?;
        let client_node = cluster.add_node("a")?;
        let server_node = cluster.add_node("b")?;
        let direct = Pair {
            client: cluster.add_pod("a", "plain-client")?,
            server: cluster.add_pod("b", "plain-server")?,
        };
        let mesh = Pair {
            client: cluster.add_pod("a", "mesh-client")?,
            server: cluster.add_pod("b", "mesh-server")?,
        };
        let controller = Controller::start(&cluster, &[])?;
        controller.apply("bench", &objects(&direct, &mesh))?;
        let mut agents = Vec::new();
        for (node, enrolled) in [(&client_node, &mesh.client), (&server_node, &mesh.server)] {
            let mut agent = Agent::new(node, &controller, &[])?;
            agent.set_log_filter("info");
            // The production interval: the tests' 100 ms would add a reconcile's work to
            // every measurement.
            agent.set_reconcile_interval("1s");
            agent.start(&cluster)?;
            agent.wait_enrolled(&[enrolled])?;
            agents.push(agent);
        }
        let mut scratch = Vec::new();
        let mut servers = Vec::new();
        for pod in [&direct.server, &mesh.server] {
            let dir = Scratch::new(format!("{}-nginx-{}", cluster.id(), pod.name))?;
            servers.push(start_nginx(&cluster, pod, &dir.0)?);
            scratch.push(dir);
            let mut iperf = Command::new("iperf3");
            iperf.args(["-s", "-p", &IPERF_PORT.to_string()]);
            servers.push(cluster.spawn_in_pod(pod, iperf)?);
        }
        let peer_dir = match peer {
            Some(_) => {
                let dir = Scratch::new(format!("{}-peer", cluster.id()))?;
                let path = dir.0.display().to_string();
                scratch.push(dir);
                Some(path)
            }
            None => None,
        };
        let mut topo = Topology {
            peers: Vec::new(),
            _servers: servers,
            agents,
            _controller: controller,
            _scratch: scratch,
            peer_entry: None,
            direct,
            mesh,
            client_node,
            server_node,
            cluster,
        };
        topo.wait_ready(PathKind::Direct)?;
        topo.wait_ready(PathKind::Mesh)?;
        let hbone =
            topo.agents[0].metric(&topo.cluster, "mesh_outbound_connections_total{route=\"hbone\"}")?;
        if hbone < 1.0 {
            bail!("the mesh path answered, but not over HBONE: the client's connections were not captured");
        }
        if let Some((spec, dir)) = peer.zip(peer_dir) {
            topo.start_peer(spec, &dir)?;
            topo.wait_ready(PathKind::Peer).map_err(|e| {
                let output: Vec<String> = topo
                    .peers
                    .iter()
                    .map(|p| format!("{}:\n{}{}", p.label(), p.stdout(), p.stderr()))
                    .collect();
                e.context(format!(
                    "the peer chain does not work; its output:\n{}",
                    output.join("\n")
                ))
            })?;
        }
        Ok(topo)
    }

    pub fn paths(&self) -> Vec<PathKind> {
        let mut paths = vec![PathKind::Direct, PathKind::Mesh];
        if self.peer_entry.is_some() {
            paths.push(PathKind::Peer);
        }
        paths
    }

    pub fn client(&self, path: PathKind) -> &Pod {
        match path {
            PathKind::Mesh => &self.mesh.client,
            PathKind::Direct | PathKind::Peer => &self.direct.client,
        }
    }

    pub fn server(&self, path: PathKind) -> &Pod {
        match path {
            PathKind::Mesh => &self.mesh.server,
            PathKind::Direct | PathKind::Peer => &self.direct.server,
        }
    }

    /// Where the client sends HTTP load.
    pub fn http(&self, path: PathKind) -> SocketAddr {
        self.entry(path, 0, HTTP_PORT)
    }

    /// Where the client sends iperf3 load.
    pub fn iperf(&self, path: PathKind) -> SocketAddr {
        self.entry(path, 1, IPERF_PORT)
    }

    fn entry(&self, path: PathKind, service: usize, port: u16) -> SocketAddr {
        match (path, self.peer_entry) {
            (PathKind::Peer, Some(entry)) => entry[service],
            _ => SocketAddr::new(self.server(path).ipv4.into(), port),
        }
    }

    /// The cgroups of the proxies on a path, one per node (none for direct).
    pub fn proxy_cgroups(&self, path: PathKind) -> Vec<PathBuf> {
        let nodes = [&self.client_node, &self.server_node];
        match path {
            PathKind::Direct => Vec::new(),
            PathKind::Mesh => nodes.iter().map(|n| n.agent_cgroup.clone()).collect(),
            PathKind::Peer => nodes.iter().map(|n| n.cgroup.join("peer")).collect(),
        }
    }

    /// Waits until an HTTP request and a short iperf3 run both get through `path`.
    fn wait_ready(&self, path: PathKind) -> Result<()> {
        let client = self.client(path);
        let url = format!("http://{}/", self.http(path));
        wait_until(READY, &format!("HTTP over the {path:?} path"), || {
            let mut curl = Command::new("curl");
            curl.args(["-sSf", "-o", "/dev/null", "--max-time", "2", &url]);
            match self.cluster.exec_in_pod(client, curl) {
                Ok(out) if out.status.success() => Ok(()),
                Ok(out) => Err(out.stderr),
                Err(e) => Err(format!("{e:#}")),
            }
        })?;
        wait_until(READY, &format!("iperf3 over the {path:?} path"), || {
            iperf::run(&self.cluster, client, self.iperf(path), 1, None)
                .map(|_| ())
                .map_err(|e| format!("{e:#}"))
        })
    }

    fn start_peer(&mut self, spec: &PeerSpec, dir: &str) -> Result<()> {
        let mut entry = [SocketAddr::from(([0, 0, 0, 0], 0)); 2];
        let services = [("http", HTTP_PORT), ("iperf3", IPERF_PORT)];
        for (i, (service, port)) in services.into_iter().enumerate() {
            let target = SocketAddr::new(self.direct.server.ipv4.into(), port);
            let server_listen = SocketAddr::new(self.server_node.ipv4.into(), PEER_SERVER_PORTS[i]);
            let client_listen = SocketAddr::new(self.client_node.bridge_ipv4.into(), PEER_CLIENT_PORTS[i]);
            let hops = [
                (&self.server_node, &spec.server_cmd, server_listen, target),
                (&self.client_node, &spec.client_cmd, client_listen, server_listen),
            ];
            for (node, template, listen, upstream) in hops {
                let hop = Hop {
                    listen,
                    upstream,
                    target,
                    service,
                    dir: dir.to_owned(),
                };
                let mut sh = Command::new("sh");
                sh.arg("-c").arg(fill(template, &hop));
                self.peers
                    .push(self.cluster.spawn_in_node_cgroup(node, "peer", sh)?);
            }
            entry[i] = client_listen;
        }
        self.peer_entry = Some(entry);
        Ok(())
    }
}

/// The Kubernetes objects the controller is given: `plain` as it is, `bench` enrolled.
fn objects(direct: &Pair, mesh: &Pair) -> String {
    let mut yaml = namespace_yaml("plain", &[]);
    for pod in [&direct.client, &direct.server] {
        yaml.push_str("---\n");
        yaml.push_str(&pod_yaml(pod, "plain", &pod.name, &[("app", &pod.name)]));
    }
    yaml.push_str("---\n");
    yaml.push_str(&namespace_yaml(
        "bench",
        &[("mesh.dev/enroll", "true"), ("mesh.dev/mtls", "strict")],
    ));
    for pod in [&mesh.client, &mesh.server] {
        yaml.push_str("---\n");
        yaml.push_str(&pod_yaml(pod, "bench", &pod.name, &[("app", &pod.name)]));
    }
    yaml
}

fn start_nginx(cluster: &Cluster, pod: &Pod, dir: &std::path::Path) -> Result<Proc> {
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, nginx_conf(&dir.display().to_string(), HTTP_PORT))
        .with_context(|| format!("writing {}", conf.display()))?;
    let mut cmd = Command::new("nginx");
    cmd.args(["-e", "stderr", "-p"]).arg(dir).arg("-c").arg(&conf);
    cluster.spawn_in_pod(pod, cmd)
}

/// nginx answering every request with a 1 KiB body, keep-alive for as long as a run lasts.
fn nginx_conf(dir: &str, port: u16) -> String {
    let body = "x".repeat(BODY_BYTES);
    format!(
        "daemon off;\nmaster_process on;\nworker_processes auto;\nworker_rlimit_nofile 8192;\n\
         pid {dir}/nginx.pid;\nerror_log stderr warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  keepalive_timeout 300s;\n  keepalive_requests 100000000;\n  \
         default_type text/plain;\n  client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n  \
         fastcgi_temp_path {dir}/fastcgi;\n  uwsgi_temp_path {dir}/uwsgi;\n  scgi_temp_path {dir}/scgi;\n  \
         server {{\n    listen {port};\n    location / {{ return 200 \"{body}\"; }}\n  }}\n}}\n"
    )
}

/// A directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: String) -> Result<Scratch> {
        let dir = std::env::temp_dir().join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
