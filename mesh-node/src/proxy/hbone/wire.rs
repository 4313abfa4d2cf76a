//! The HBONE request's header values, as ztunnel writes and reads them.
use std::net::{IpAddr, SocketAddr};

use mesh_api::NamespacedName;

/// The `forwarded` header carrying the original source, and the service the source dialled.
pub const FORWARDED: &str = "forwarded";

/// The DNS domain of the cluster's Service names; ztunnel names a service by its
/// `<name>.<namespace>.svc.<domain>` hostname.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// `for="10.0.0.1:4000"` / `for="[fd00::1]:4000"` (RFC 7239 quotes an address with a port),
/// followed by `;host=<service hostname>` when the source dialled a service: ztunnel's form,
/// from which a ztunnel destination names the destination service too.
pub fn forwarded_value(src: SocketAddr, service: Option<&NamespacedName>) -> String {
    match service {
        None => format!("for=\"{src}\""),
        Some(s) => format!("for=\"{src}\";host={}", service_hostname(s)),
    }
}

/// `<name>.<namespace>.svc.cluster.local`.
pub fn service_hostname(s: &NamespacedName) -> String {
    format!("{}.{}.svc.{CLUSTER_DOMAIN}", s.name, s.namespace)
}

/// The service a `<name>.<namespace>.svc[.<domain>]` hostname names, whatever the domain: a
/// claim for the caller to check against its own state.
pub fn parse_service_hostname(host: &str) -> Option<NamespacedName> {
    let mut labels = host.split('.');
    let (name, namespace) = (labels.next()?, labels.next()?);
    let dns_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    (labels.next() == Some("svc") && dns_label(name) && dns_label(namespace))
        .then(|| NamespacedName::new(namespace, name))
}

/// The `host=` of a `forwarded` header's first element, quoted or not.
pub fn parse_forwarded_host(value: &str) -> Option<&str> {
    forwarded_param(value, "host").filter(|h| !h.is_empty())
}

/// The value of parameter `name` in the first element of a `forwarded` header, unquoted.
fn forwarded_param<'a>(value: &'a str, name: &str) -> Option<&'a str> {
    let first = value.split(',').next()?;
    let v = first.split(';').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })?;
    Some(v.strip_prefix('"').and_then(|n| n.strip_suffix('"')).unwrap_or(v))
}

/// The original source from a `forwarded` header: the `for=` of its first element, quoted or
/// not, IPv6 in brackets. An address without a port yields port 0.
pub fn parse_forwarded_for(value: &str) -> Option<SocketAddr> {
    let node = forwarded_param(value, "for")?;
    if let Ok(sa) = node.parse::<SocketAddr>() {
        return Some(sa);
    }
    let ip = node
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(node);
    ip.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 0))
}

/// The destination of a CONNECT: `:authority` must be a literal `ip:port` (IPv6 in brackets).
pub fn parse_authority(authority: &str) -> Option<SocketAddr> {
    let sa: SocketAddr = authority.parse().ok()?;
    (sa.port() != 0).then_some(sa)
}

/// Whether two addresses are the same host, IPv4-mapped IPv6 and IPv4 alike.
pub fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    a.to_canonical() == b.to_canonical()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_round_trip() {
        for s in ["10.1.2.3:4000", "[fd00::1]:443", "[::ffff:10.0.0.1]:80"] {
            let sa: SocketAddr = s.parse().unwrap();
            assert_eq!(parse_forwarded_for(&forwarded_value(sa, None)), Some(sa));
        }
        assert_eq!(
            forwarded_value("[fd00::1]:443".parse().unwrap(), None),
            "for=\"[fd00::1]:443\""
        );
    }

    #[test]
    fn the_dialled_service_rides_in_forwarded_as_ztunnel_puts_it() {
        let svc = NamespacedName::new("shop", "server");
        let v = forwarded_value("10.1.2.3:4000".parse().unwrap(), Some(&svc));
        assert_eq!(v, "for=\"10.1.2.3:4000\";host=server.shop.svc.cluster.local");
        assert_eq!(parse_forwarded_for(&v), Some("10.1.2.3:4000".parse().unwrap()));
        let host = parse_forwarded_host(&v).unwrap();
        assert_eq!(parse_service_hostname(host), Some(svc.clone()));
        assert_eq!(
            parse_forwarded_host("for=1.2.3.4;host=\"a.b.svc\""),
            Some("a.b.svc")
        );
        assert_eq!(parse_forwarded_host("for=1.2.3.4;host="), None);
        assert_eq!(
            parse_forwarded_host("for=1.2.3.4, host=x.y.svc"),
            None,
            "first element only"
        );
        assert_eq!(
            parse_service_hostname("server.shop.svc.corp.example"),
            Some(svc),
            "any cluster domain"
        );
        for bad in [
            "server.shop",
            "server.shop.pod.cluster.local",
            "Server.shop.svc",
            "a..svc",
            "",
            "x.y.svc:80",
        ] {
            assert_eq!(parse_service_hostname(bad), None, "{bad}");
        }
    }

    #[test]
    fn forwarded_variants() {
        let p = parse_forwarded_for;
        assert_eq!(p("for=10.0.0.1"), Some("10.0.0.1:0".parse().unwrap()));
        assert_eq!(
            p("For=\"[fd00::2]\";proto=http"),
            Some("[fd00::2]:0".parse().unwrap())
        );
        assert_eq!(
            p("proto=https; for=\"1.2.3.4:5\", for=9.9.9.9"),
            Some("1.2.3.4:5".parse().unwrap())
        );
        assert_eq!(p("for=unknown"), None);
        assert_eq!(p("by=1.2.3.4"), None);
        assert_eq!(p(""), None);
    }

    #[test]
    fn authorities() {
        assert_eq!(
            parse_authority("10.0.0.1:80"),
            Some("10.0.0.1:80".parse().unwrap())
        );
        assert_eq!(
            parse_authority("[fd00::1]:8080"),
            Some("[fd00::1]:8080".parse().unwrap())
        );
        assert_eq!(parse_authority("example.com:80"), None);
        assert_eq!(parse_authority("10.0.0.1"), None);
        assert_eq!(parse_authority("10.0.0.1:0"), None);
        assert!(same_ip(
            "::ffff:10.0.0.1".parse().unwrap(),
            "10.0.0.1".parse().unwrap()
        ));
    }
}
