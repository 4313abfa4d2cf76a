//! The agent's configuration: command-line flags and environment, validated into one `Config`
//! that every other module reads.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use thiserror::Error;

use mesh_api::client::Target;

use crate::control::{self, ControllerEndpoint};
use crate::ebpf::{DatapathConfig, Marks};
use crate::limits::{Carried, Keepalive, Limits};
use crate::netlink::{CaptureConfig, DEFAULT_CAPTURE_TABLE, DEFAULT_RULE_PRIORITY};
use crate::{admin, health, httpd, metrics};

/// The ports of DESIGN.md §5 that the agent owns.
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PLAIN_PORT: u16 = mesh_common::DEFAULT_INBOUND_PLAIN_PORT;

#[derive(Debug, Parser)]
#[command(
    name = "mesh-node",
    version,
    about = "mesh node agent: captures enrolled pods' TCP connections in the kernel and proxies them",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Detach every capture program, remove the pinned state and the capture routing, then exit.
    Uninstall {
        /// bpffs directory holding the agent's pins.
        #[arg(long, env = "MESH_BPFFS_DIR", default_value = "/sys/fs/bpf/mesh")]
        bpffs_dir: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Name of this node, used in logs (defaults to the host name).
    #[arg(long, env = "MESH_NODE_NAME")]
    pub node_name: Option<String>,

    /// Node address that enrolled pods' connections are redirected to: one IPv4 and/or one
    /// IPv6 address, reachable from inside the pods (e.g. the node's InternalIP).
    #[arg(
        long = "node-ip",
        env = "MESH_NODE_IPS",
        value_delimiter = ',',
        required = true
    )]
    pub node_ips: Vec<IpAddr>,

    /// bpffs directory where maps and program links are pinned; a restarted agent re-uses them.
    #[arg(long, env = "MESH_BPFFS_DIR", default_value = "/sys/fs/bpf/mesh")]
    pub bpffs_dir: PathBuf,

    /// cgroup v2 directory that holds every pod's cgroup (the kubelet's pods root); the capture
    /// programs attach here once. Defaults to the root of the cgroup v2 hierarchy.
    #[arg(long, env = "MESH_PODS_CGROUP")]
    pub pods_cgroup: Option<PathBuf>,

    /// Port of the outbound capture listener.
    #[arg(long, env = "MESH_OUTBOUND_PORT", default_value_t = OUTBOUND_PORT)]
    pub outbound_port: u16,

    /// Destination ports never captured (comma-separated or repeated).
    #[arg(long = "exclude-port", env = "MESH_EXCLUDE_PORTS", value_delimiter = ',')]
    pub exclude_ports: Vec<u16>,

    /// Destination CIDRs never captured (comma-separated or repeated).
    #[arg(long = "exclude-cidr", env = "MESH_EXCLUDE_CIDRS", value_delimiter = ',')]
    pub exclude_cidrs: Vec<IpNet>,

    /// The controller: `host:port` or `unix:/path`. It streams this node's config (which pods
    /// are enrolled, services, policies) and signs the pods' certificates.
    #[arg(long, env = "MESH_CONTROLLER", value_parser = control::parse_target)]
    pub controller: Option<Target>,

    /// The mesh root certificate (PEM) that the controller's certificate must chain to.
    #[arg(long, env = "MESH_CONTROLLER_CA")]
    pub controller_ca: Option<PathBuf>,

    /// File holding this node's bearer token for the controller; re-read on every reconnect,
    /// so a rotated (e.g. projected ServiceAccount) token is picked up.
    #[arg(long, env = "MESH_CONTROLLER_TOKEN_FILE")]
    pub controller_token_file: Option<PathBuf>,

    /// The mesh's SPIFFE trust domain: peers must present identities in it.
    #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// Address of the readiness endpoint (`GET /healthz/ready`).
    #[arg(long, env = "MESH_HEALTH_ADDR", default_value_t = health::DEFAULT_ADDR)]
    pub health_addr: SocketAddr,

    /// Address of the Prometheus endpoint (`GET /metrics`).
    #[arg(long, env = "MESH_METRICS_ADDR", default_value = metrics::DEFAULT_ADDR)]
    pub metrics_addr: SocketAddr,

    /// Address of the admin (inspection) API; keep it on loopback.
    #[arg(long, env = "MESH_ADMIN_ADDR", default_value = admin::DEFAULT_ADDR)]
    pub admin_addr: SocketAddr,

    /// The admin API's Unix socket (mode 0600: root only), for meshctl on the node.
    #[arg(long, env = "MESH_ADMIN_SOCKET", default_value = admin::DEFAULT_SOCKET)]
    pub admin_socket: PathBuf,

    /// Threads of the proxy's async runtime; 0 means one per CPU the agent may use.
    #[arg(long, env = "MESH_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,

    /// The share of successful connections written to the access log (target `access`), from
    /// 0 (none) to 1 (all). Failed and denied connections are always written.
    #[arg(long, env = "MESH_ACCESS_LOG_SAMPLE_RATE", default_value_t = 1.0)]
    pub access_log_sample_rate: f64,

    /// How often the kernel's enrollment state is reconciled against the desired state.
    #[arg(long, env = "MESH_RECONCILE_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub reconcile_interval: Duration,

    /// How long in-flight connections may take to finish after SIGTERM.
    #[arg(long, env = "MESH_DRAIN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// Timeout for the proxy's connect to the original destination, and for setting up an
    /// HBONE connection (TCP, mTLS and HTTP/2).
    #[arg(long, env = "MESH_CONNECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// How long a pooled HBONE connection with no open stream is kept before it is closed.
    #[arg(long, env = "MESH_HBONE_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub hbone_idle_timeout: Duration,

    /// Log format.
    #[arg(long, env = "MESH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter, in tracing's EnvFilter syntax (e.g. `info,mesh_node::proxy=debug`).
    #[arg(long, env = "MESH_LOG", default_value = "info")]
    pub log: String,

    /// The node's uplink, where inbound HBONE to local pods is captured (tc ingress) and which
    /// the capture routing rule is scoped to. Defaults to the interface holding the node IP.
    #[arg(long, env = "MESH_UPLINK")]
    pub uplink: Option<String>,

    /// Mark bit(s) put on captured inbound packets and matched by the capture routing rule
    /// (decimal or 0x-hex). Must not share bits with --proxy-mark.
    #[arg(long, env = "MESH_CAPTURE_MARK", default_value = "0x1000", value_parser = parse_mark)]
    pub capture_mark: u32,

    /// Mark (SO_MARK) on the proxy's connections to pods: a STRICT pod accepts connections
    /// only with it (decimal or 0x-hex).
    #[arg(long, env = "MESH_PROXY_MARK", default_value = "0x2000", value_parser = parse_mark)]
    pub proxy_mark: u32,

    /// Mark bit(s) put on a pod's replies to the proxy's transparent sockets (--preserve-source)
    /// at the pod's veth, and matched by an unscoped routing rule to deliver them locally
    /// (decimal or 0x-hex). Must not share bits with the other marks.
    #[arg(long, env = "MESH_REPLY_MARK", default_value = "0x40", value_parser = parse_mark)]
    pub reply_mark: u32,

    /// Routing table holding the capture route (`local 0.0.0.0/0 dev lo`, `local ::/0 dev lo`).
    #[arg(long, env = "MESH_CAPTURE_TABLE", default_value_t = DEFAULT_CAPTURE_TABLE)]
    pub capture_table: u32,

    /// Priority of the capture routing rule (`iif <uplink> fwmark M/M lookup <table>`).
    #[arg(long, env = "MESH_CAPTURE_RULE_PRIORITY", default_value_t = DEFAULT_RULE_PRIORITY)]
    pub capture_rule_priority: u32,

    /// Port of the inbound plaintext listener: plaintext from outside the mesh to PERMISSIVE
    /// pods is steered there and admitted by policy.
    #[arg(long, env = "MESH_INBOUND_PLAIN_PORT", default_value_t = INBOUND_PLAIN_PORT)]
    pub inbound_plain_port: u16,
    /// Connections each of the metrics, admin and readiness servers holds at once; more are
    /// closed when accepted (counted in `mesh_listener_refused_total`).
    #[arg(long, env = "MESH_HTTP_MAX_CONNECTIONS", default_value_t = 256)]
    pub http_max_connections: usize,

    /// Connections each of those servers holds at once from one address.
    #[arg(long, env = "MESH_HTTP_MAX_CONNECTIONS_PER_PEER", default_value_t = 32)]
    pub http_max_connections_per_peer: usize,

    /// How long a client of those servers may take to send a request (head, then body); an
    /// idle keep-alive connection is closed after it.
    #[arg(long, env = "MESH_HTTP_REQUEST_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub http_request_timeout: Duration,

    /// Inbound HBONE connections in their TLS and HTTP/2 set-up at once; more are closed.
    #[arg(long, env = "MESH_HBONE_MAX_HANDSHAKES", default_value_t = 1024)]
    pub hbone_max_handshakes: usize,

    /// Inbound HBONE connections held at once from one address (a node's proxy, usually); the
    /// same cap holds plaintext connections to PERMISSIVE pods from one address.
    #[arg(long, env = "MESH_HBONE_MAX_CONNECTIONS_PER_PEER", default_value_t = 512)]
    pub hbone_max_connections_per_peer: usize,

    /// Bound on an inbound HBONE connection's set-up: TLS handshake and HTTP/2 preface.
    #[arg(long, env = "MESH_HBONE_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub hbone_handshake_timeout: Duration,

    /// A carried connection (any direction) with no byte either way for this long is closed.
    #[arg(long, env = "MESH_IDLE_TIMEOUT", default_value = "1h", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// TCP keepalive on every socket a peer can hold: idle time before the first probe (then
    /// one every quarter of it, four in all).
    #[arg(long, env = "MESH_TCP_KEEPALIVE", default_value = "60s", value_parser = humantime::parse_duration)]
    pub tcp_keepalive: Duration,

    /// TCP_USER_TIMEOUT on those sockets: how long sent data may go unacknowledged (0: the
    /// kernel's default).
    #[arg(long, env = "MESH_TCP_USER_TIMEOUT", default_value = "120s", value_parser = humantime::parse_duration)]
    pub tcp_user_timeout: Duration,

    /// Keep the pod's own address on the proxy's connections (HBONE to other nodes, passthrough,
    /// delivery to the destination pod from the original client's), so peers, apps and NetworkPolicies see the client pod rather than
    /// the node. Needs transparent sockets (CAP_NET_ADMIN) and policy routing; the agent refuses
    /// to start without them. `--preserve-source=false` connects from the node's address.
    #[arg(
        long,
        env = "MESH_PRESERVE_SOURCE",
        action = ArgAction::Set,
        num_args = 0..=1,
        default_value_t = true,
        default_missing_value = "true",
        value_name = "BOOL"
    )]
    pub preserve_source: bool,
}

/// A mark: decimal, or hexadecimal with a `0x` prefix.
fn parse_mark(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|e| format!("{s:?} is not a 32-bit mark: {e}"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The validated configuration of a running agent.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_name: String,
    pub datapath: DatapathConfig,
    pub outbound_listeners: Vec<SocketAddr>,
    pub controller: ControllerEndpoint,
    pub trust_domain: String,
    pub health_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub admin_socket: PathBuf,
    pub access_log_sample_rate: f64,
    /// Threads of the async runtime (0: one per CPU).
    pub worker_threads: usize,
    pub reconcile_interval: Duration,
    pub drain_timeout: Duration,
    pub connect_timeout: Duration,
    pub hbone_idle_timeout: Duration,
    /// Inbound capture and STRICT: uplink, marks, routing table and rule priority.
    pub capture: CaptureConfig,
    /// Caps and timeouts of the listeners and carried connections.
    pub limits: Limits,
    /// Connect to pods, HBONE peers and passthrough destinations from the client's own address.
    pub preserve_source: bool,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{0}: required")]
    Missing(&'static str),
    #[error("--node-ip: give at most one IPv4 and one IPv6 address, got {0:?}")]
    TooManyNodeIps(Vec<IpAddr>),
    #[error("--node-ip: {0} cannot be a redirect target (loopback, unspecified or multicast)")]
    UnusableNodeIp(IpAddr),
    #[error("--access-log-sample-rate: {0} is not between 0 and 1")]
    SampleRate(String),
    #[error("--outbound-port: must not be 0")]
    ZeroOutboundPort,
    #[error("--exclude-port: 0 is not a port")]
    ZeroExcludedPort,
    #[error("--capture-mark/--proxy-mark/--reply-mark: {0}")]
    BadMarks(String),
    #[error("--capture-table: {0} is reserved (0, 253 default, 254 main, 255 local)")]
    ReservedCaptureTable(u32),
    #[error("--capture-rule-priority: {0} must be between 1 and 32765")]
    BadRulePriority(u32),
    #[error("--inbound-plain-port: must not be 0, nor the outbound or HBONE port")]
    BadInboundPlainPort,
    #[error("{0}: must be at least {1}")]
    TooSmall(&'static str, &'static str),
}

impl Config {
    /// The HBONE listeners (port 15008), one per address family the node has.
    pub fn hbone_listeners(&self) -> Vec<SocketAddr> {
        self.outbound_listeners
            .iter()
            .map(|a| SocketAddr::new(a.ip(), crate::proxy::hbone::HBONE_PORT))
            .collect()
    }

    /// The inbound plaintext listeners, one per address family the node has.
    pub fn inbound_plain_listeners(&self) -> Vec<SocketAddr> {
        self.outbound_listeners
            .iter()
            .map(|a| SocketAddr::new(a.ip(), self.datapath.inbound_plain_port))
            .collect()
    }
}

impl RunArgs {
    /// Validates the flags; `pods_cgroup` and `proxy_cgroup` come from the host when not given.
    pub fn into_config(
        self,
        default_pods_cgroup: PathBuf,
        proxy_cgroup: PathBuf,
        host_name: String,
    ) -> Result<Config, ConfigError> {
        let (ipv4, ipv6) = split_node_ips(&self.node_ips)?;
        if self.outbound_port == 0 {
            return Err(ConfigError::ZeroOutboundPort);
        }
        if self.exclude_ports.contains(&0) {
            return Err(ConfigError::ZeroExcludedPort);
        }
        if !(0.0..=1.0).contains(&self.access_log_sample_rate) {
            return Err(ConfigError::SampleRate(self.access_log_sample_rate.to_string()));
        }
        let marks = Marks {
            capture: self.capture_mark,
            proxy: self.proxy_mark,
            reply: self.reply_mark,
        };
        marks.validate().map_err(ConfigError::BadMarks)?;
        if self.capture_table == 0 || (253..=255).contains(&self.capture_table) {
            return Err(ConfigError::ReservedCaptureTable(self.capture_table));
        }
        if self.capture_rule_priority == 0 || self.capture_rule_priority >= 32766 {
            return Err(ConfigError::BadRulePriority(self.capture_rule_priority));
        }
        if [0, self.outbound_port, crate::proxy::hbone::HBONE_PORT].contains(&self.inbound_plain_port) {
            return Err(ConfigError::BadInboundPlainPort);
        }
        let limits = self.limits()?;
        let outbound_listeners = [
            ipv4.map(|_| SocketAddr::from((Ipv4Addr::UNSPECIFIED, self.outbound_port))),
            ipv6.map(|_| SocketAddr::from((Ipv6Addr::UNSPECIFIED, self.outbound_port))),
        ]
        .into_iter()
        .flatten()
        .collect();
        let node_name = self.node_name.unwrap_or(host_name);
        // Optional for clap only, so that `mesh-node uninstall` needs none of them.
        let controller = self.controller.ok_or(ConfigError::Missing("--controller"))?;
        let controller_ca = self
            .controller_ca
            .ok_or(ConfigError::Missing("--controller-ca"))?;
        let controller_token_file = self
            .controller_token_file
            .ok_or(ConfigError::Missing("--controller-token-file"))?;
        Ok(Config {
            datapath: DatapathConfig {
                pin_dir: self.bpffs_dir,
                pods_cgroup: self.pods_cgroup.unwrap_or(default_pods_cgroup),
                proxy_cgroup,
                proxy_ipv4: ipv4,
                proxy_ipv6: ipv6,
                outbound_port: self.outbound_port,
                exclude_ports: self.exclude_ports,
                exclude_cidrs: self.exclude_cidrs,
                inbound_plain_port: self.inbound_plain_port,
            },
            outbound_listeners,
            controller: ControllerEndpoint::new(
                controller,
                controller_ca,
                controller_token_file,
                node_name.clone(),
            ),
            node_name,
            trust_domain: self.trust_domain,
            health_addr: self.health_addr,
            metrics_addr: self.metrics_addr,
            admin_addr: self.admin_addr,
            admin_socket: self.admin_socket,
            access_log_sample_rate: self.access_log_sample_rate,
            worker_threads: self.worker_threads,
            reconcile_interval: self.reconcile_interval,
            drain_timeout: self.drain_timeout,
            connect_timeout: self.connect_timeout,
            hbone_idle_timeout: self.hbone_idle_timeout,
            capture: CaptureConfig {
                uplink: self.uplink,
                marks,
                table: self.capture_table,
                rule_priority: self.capture_rule_priority,
            },
            limits,
            preserve_source: self.preserve_source,
        })
    }

    fn limits(&self) -> Result<Limits, ConfigError> {
        let too_small = [
            (self.http_max_connections == 0, "--http-max-connections", "1"),
            (
                self.http_max_connections_per_peer == 0,
                "--http-max-connections-per-peer",
                "1",
            ),
            (
                self.http_request_timeout.is_zero(),
                "--http-request-timeout",
                "1ms",
            ),
            (self.hbone_max_handshakes == 0, "--hbone-max-handshakes", "1"),
            (
                self.hbone_max_connections_per_peer == 0,
                "--hbone-max-connections-per-peer",
                "1",
            ),
            (
                self.hbone_handshake_timeout.is_zero(),
                "--hbone-handshake-timeout",
                "1ms",
            ),
            (self.idle_timeout.is_zero(), "--idle-timeout", "1ms"),
            // The kernel counts keepalive in whole seconds.
            (
                self.tcp_keepalive < Duration::from_secs(1),
                "--tcp-keepalive",
                "1s",
            ),
        ];
        if let Some((_, flag, least)) = too_small.iter().find(|(small, _, _)| *small) {
            return Err(ConfigError::TooSmall(flag, least));
        }
        let keepalive = Keepalive {
            time: self.tcp_keepalive,
            user_timeout: self.tcp_user_timeout,
        };
        Ok(Limits {
            http: httpd::Limits {
                max_connections: self.http_max_connections,
                max_connections_per_peer: self.http_max_connections_per_peer,
                request_timeout: self.http_request_timeout,
                keepalive,
            },
            hbone_max_handshakes: self.hbone_max_handshakes,
            hbone_max_connections_per_peer: self.hbone_max_connections_per_peer,
            hbone_handshake_timeout: self.hbone_handshake_timeout,
            carried: Carried {
                keepalive,
                idle_timeout: self.idle_timeout,
            },
        })
    }
}

fn split_node_ips(ips: &[IpAddr]) -> Result<(Option<Ipv4Addr>, Option<Ipv6Addr>), ConfigError> {
    let mut v4 = None;
    let mut v6 = None;
    for ip in ips {
        if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
            return Err(ConfigError::UnusableNodeIp(*ip));
        }
        let duplicate = match ip {
            IpAddr::V4(a) => v4.replace(*a).is_some(),
            IpAddr::V6(a) => v6.replace(*a).is_some(),
        };
        if duplicate {
            return Err(ConfigError::TooManyNodeIps(ips.to_vec()));
        }
    }
    Ok((v4, v6))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let required = ["--controller", "10.0.0.254:15012", "--controller-ca", "/ca.pem"];
        let required = required.iter().chain(&["--controller-token-file", "/token"]);
        let cli = Cli::try_parse_from(["mesh-node"].iter().chain(required).chain(args))
            .map_err(|e| e.to_string())?;
        cli.run
            .into_config("/cg".into(), "/cg/agent".into(), "host".into())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn dual_stack_node_gets_two_listeners() {
        let c = parse(&["--node-ip", "10.0.0.1,fd00::1"]).unwrap();
        assert_eq!(c.datapath.proxy_ipv4, Some("10.0.0.1".parse().unwrap()));
        assert_eq!(c.datapath.proxy_ipv6, Some("fd00::1".parse().unwrap()));
        assert_eq!(
            c.outbound_listeners,
            vec!["0.0.0.0:15001".parse().unwrap(), "[::]:15001".parse().unwrap()]
        );
        assert_eq!(c.node_name, "host");
        assert_eq!(c.datapath.pods_cgroup, PathBuf::from("/cg"));
    }

    #[test]
    fn ipv4_only_node_listens_on_ipv4_only() {
        let c = parse(&["--node-ip", "10.0.0.1", "--outbound-port", "16001"]).unwrap();
        assert_eq!(c.datapath.proxy_ipv6, None);
        assert_eq!(c.outbound_listeners, vec!["0.0.0.0:16001".parse().unwrap()]);
    }

    #[test]
    fn bad_input_names_the_flag() {
        for (args, want) in [
            (vec!["--node-ip", "10.0.0.1,10.0.0.2"], "--node-ip"),
            (vec!["--node-ip", "127.0.0.1"], "--node-ip"),
            (vec!["--node-ip", "::"], "--node-ip"),
            (
                vec!["--node-ip", "10.0.0.1", "--outbound-port", "0"],
                "--outbound-port",
            ),
            (
                vec!["--node-ip", "10.0.0.1", "--exclude-port", "0"],
                "--exclude-port",
            ),
            (
                vec!["--node-ip", "10.0.0.1", "--exclude-cidr", "10.0.0.0/33"],
                "--exclude-cidr",
            ),
            (vec!["--node-ip", "nonsense"], "--node-ip"),
            (vec![], "--node-ip"),
        ] {
            let err = parse(&args).unwrap_err();
            assert!(err.contains(want), "{args:?}: {err}");
        }
    }

    #[test]
    fn capture_defaults_and_flags() {
        let c = parse(&["--node-ip", "10.0.0.1"]).unwrap();
        assert_eq!(c.capture, CaptureConfig::default());
        assert_eq!(
            c.capture.marks,
            Marks {
                capture: 0x1000,
                proxy: 0x2000,
                reply: 0x40
            }
        );
        let c = parse(&[
            "--node-ip",
            "10.0.0.1",
            "--uplink",
            "ens5",
            "--capture-mark",
            "0x40000000",
            "--proxy-mark",
            "256",
            "--capture-table",
            "300",
            "--capture-rule-priority",
            "90",
        ])
        .unwrap();
        assert_eq!(c.capture.uplink.as_deref(), Some("ens5"));
        assert_eq!(
            c.capture.marks,
            Marks {
                capture: 0x4000_0000,
                proxy: 0x100,
                reply: 0x40
            }
        );
        assert_eq!((c.capture.table, c.capture.rule_priority), (300, 90));
        for (args, want) in [
            (vec!["--capture-mark", "0x3000"], "--capture-mark"),
            (vec!["--capture-mark", "0"], "--capture-mark"),
            (vec!["--proxy-mark", "zz"], "--proxy-mark"),
            (vec!["--reply-mark", "0x1040"], "--reply-mark"),
            (vec!["--capture-table", "254"], "--capture-table"),
            (vec!["--capture-rule-priority", "0"], "--capture-rule-priority"),
        ] {
            let mut all = vec!["--node-ip", "10.0.0.1"];
            all.extend(args.iter());
            let err = parse(&all).unwrap_err();
            assert!(err.contains(want), "{args:?}: {err}");
        }
    }

    #[test]
    fn controller_flags_are_required() {
        let cli = Cli::try_parse_from([
            "mesh-node",
            "--node-ip",
            "10.0.0.1",
            "--controller",
            "unix:/c.sock",
        ]);
        let err = cli
            .unwrap()
            .run
            .into_config("/cg".into(), "/cg/a".into(), "h".into())
            .unwrap_err();
        assert_eq!(err.to_string(), "--controller-ca: required");
        assert!(
            Cli::try_parse_from(["mesh-node", "uninstall"]).is_ok(),
            "uninstall needs no controller"
        );
    }

    #[test]
    fn exclusions_are_lists() {
        let c = parse(&[
            "--node-ip",
            "10.0.0.1",
            "--exclude-port",
            "22,53",
            "--exclude-cidr",
            "169.254.0.0/16",
            "--exclude-cidr",
            "fd00:99::/64",
        ])
        .unwrap();
        assert_eq!(c.datapath.exclude_ports, vec![22, 53]);
        assert_eq!(c.datapath.exclude_cidrs.len(), 2);
    }

    #[test]
    fn inbound_plain_port_defaults_and_refuses_the_proxys_other_ports() {
        let c = parse(&["--node-ip", "10.0.0.1,fd00::1"]).unwrap();
        assert_eq!(c.datapath.inbound_plain_port, 15006);
        assert_eq!(
            c.inbound_plain_listeners(),
            vec!["0.0.0.0:15006".parse().unwrap(), "[::]:15006".parse().unwrap()]
        );
        for port in ["0", "15001", "15008"] {
            let err = parse(&["--node-ip", "10.0.0.1", "--inbound-plain-port", port]).unwrap_err();
            assert!(err.contains("--inbound-plain-port"), "{port}: {err}");
        }
    }

    #[test]
    fn preserve_source_is_on_unless_turned_off() {
        let on = |args: &[&str]| {
            let mut all = vec!["--node-ip", "10.0.0.1"];
            all.extend(args);
            parse(&all).map(|c| c.preserve_source)
        };
        assert_eq!(on(&[]), Ok(true));
        assert_eq!(on(&["--preserve-source"]), Ok(true));
        assert_eq!(on(&["--preserve-source=true"]), Ok(true));
        assert_eq!(on(&["--preserve-source=false"]), Ok(false));
        assert_eq!(on(&["--preserve-source", "false"]), Ok(false));
        let err = on(&["--preserve-source=maybe"]).unwrap_err();
        assert!(err.contains("--preserve-source"), "{err}");
    }

    #[test]
    fn limits_defaults_and_flags() {
        let c = parse(&["--node-ip", "10.0.0.1"]).unwrap();
        assert_eq!(c.limits.http, httpd::Limits::default());
        assert_eq!(c.limits.carried, Carried::default());
        assert_eq!(c.limits.hbone_max_handshakes, 1024);
        let c = parse(&[
            "--node-ip",
            "10.0.0.1",
            "--http-max-connections",
            "10",
            "--hbone-max-connections-per-peer",
            "7",
            "--idle-timeout",
            "5m",
            "--tcp-user-timeout",
            "0s",
        ])
        .unwrap();
        assert_eq!(c.limits.http.max_connections, 10);
        assert_eq!(c.limits.hbone_max_connections_per_peer, 7);
        assert_eq!(c.limits.carried.idle_timeout, Duration::from_secs(300));
        assert_eq!(c.limits.carried.keepalive.user_timeout, Duration::ZERO);
        let err = parse(&["--node-ip", "10.0.0.1", "--hbone-max-handshakes", "0"]).unwrap_err();
        assert_eq!(err, "--hbone-max-handshakes: must be at least 1");
        let err = parse(&["--node-ip", "10.0.0.1", "--tcp-keepalive", "500ms"]).unwrap_err();
        assert_eq!(err, "--tcp-keepalive: must be at least 1s");
    }
}
