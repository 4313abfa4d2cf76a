//! The optional peer path: another proxy chain, given by the user as two shell command
//! templates that the bench starts in the client's and the server's node namespaces, once per
//! service it loads (HTTP and iperf3), with the addresses filled in.
use std::net::SocketAddr;

/// The text `cargo xtask bench --help` shows about the peer commands.
pub const HELP: &str = "\
Peer path (--peer-client-cmd and --peer-server-cmd, given together):
  Two shell commands (run with `sh -c`) that make a proxy chain beside the mesh: the bench
  starts each in its node's network namespace (client node, server node), once per service
  (HTTP, then iperf3), with these placeholders replaced:
    {listen} {listen_ip} {listen_port}         where this command must accept connections
    {upstream} {upstream_ip} {upstream_port}   where it must forward them: for the client
                                               command, the server command's {listen}; for
                                               the server command, the server pod
    {target} {target_ip} {target_port}         the server pod (for chains that carry it)
    {service}                                  `http` or `iperf3`
    {dir}                                      a scratch directory for both (keys, configs),
                                               removed after the run
  The client pod sends its load to the client command's {listen}. The commands run until the
  bench ends; their CPU and memory are counted like the mesh proxies'.
  Example, a TLS chain of socat relays:
    --peer-name socat-tls \\
    --peer-server-cmd 'cd {dir} && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 \\
        -nodes -subj /CN=peer -days 1 -keyout {service}.key -out {service}.pem 2>/dev/null \\
        && exec socat OPENSSL-LISTEN:{listen_port},bind={listen_ip},fork,reuseaddr,cert={service}.pem,key={service}.key,verify=0 TCP:{upstream}' \\
    --peer-client-cmd 'exec socat TCP-LISTEN:{listen_port},bind={listen_ip},fork,reuseaddr OPENSSL:{upstream},verify=0'";

/// The commands of a peer, as the user gave them.
#[derive(Clone, Debug)]
pub struct PeerSpec {
    pub name: String,
    pub client_cmd: String,
    pub server_cmd: String,
}

impl PeerSpec {
    /// A plain-TCP chain of socat relays: what `--smoke` runs when no peer is given, so the
    /// peer machinery is exercised too.
    pub fn socat_relays() -> PeerSpec {
        let relay = "exec socat TCP-LISTEN:{listen_port},bind={listen_ip},fork,reuseaddr TCP:{upstream}";
        PeerSpec {
            name: "socat".into(),
            client_cmd: relay.into(),
            server_cmd: relay.into(),
        }
    }
}

/// The addresses one command of the chain is given.
pub struct Hop {
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
    pub target: SocketAddr,
    pub service: &'static str,
    pub dir: String,
}

/// `template` with every placeholder of `hop` replaced; other braces are left alone (they may
/// be the shell's).
pub fn fill(template: &str, hop: &Hop) -> String {
    let vars = [
        ("listen", hop.listen.to_string()),
        ("listen_ip", hop.listen.ip().to_string()),
        ("listen_port", hop.listen.port().to_string()),
        ("upstream", hop.upstream.to_string()),
        ("upstream_ip", hop.upstream.ip().to_string()),
        ("upstream_port", hop.upstream.port().to_string()),
        ("target", hop.target.to_string()),
        ("target_ip", hop.target.ip().to_string()),
        ("target_port", hop.target.port().to_string()),
        ("service", hop.service.to_owned()),
        ("dir", hop.dir.clone()),
    ];
    vars.iter()
        .fold(template.to_owned(), |s, (k, v)| s.replace(&format!("{{{k}}}"), v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop() -> Hop {
        Hop {
            listen: "10.1.1.1:15101".parse().unwrap(),
            upstream: "10.0.0.2:15201".parse().unwrap(),
            target: "10.1.2.10:8080".parse().unwrap(),
            service: "http",
            dir: "/tmp/peer".into(),
        }
    }

    #[test]
    fn placeholders_are_filled() {
        let cmd = fill(&PeerSpec::socat_relays().client_cmd, &hop());
        assert_eq!(
            cmd,
            "exec socat TCP-LISTEN:15101,bind=10.1.1.1,fork,reuseaddr TCP:10.0.0.2:15201"
        );
        assert_eq!(
            fill(
                "{target_ip} {target_port} {upstream_ip}:{upstream_port} {listen} {service} {dir}",
                &hop()
            ),
            "10.1.2.10 8080 10.0.0.2:15201 10.1.1.1:15101 http /tmp/peer"
        );
    }

    #[test]
    fn shell_braces_are_left_alone() {
        assert_eq!(
            fill("awk '{print $1}' ${HOME} {listen_port}", &hop()),
            "awk '{print $1}' ${HOME} 15101"
        );
    }

    #[test]
    fn the_help_example_uses_known_placeholders() {
        let filled = fill(HELP.split("Example").nth(1).unwrap(), &hop());
        assert!(!filled.contains("{listen") && !filled.contains("{upstream") && !filled.contains("{dir}"));
    }
}
