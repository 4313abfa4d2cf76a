//! The HBONE request's header values, as ztunnel writes and reads them.
use std::net::{IpAddr, SocketAddr};

/// The `forwarded` header carrying the original source.
pub const FORWARDED: &str = "forwarded";

/// `for="10.0.0.1:4000"` / `for="[fd00::1]:4000"` (RFC 7239 quotes an address with a port).
pub fn forwarded_for_value(src: SocketAddr) -> String {
    format!("for=\"{src}\"")
}

/// The original source from a `forwarded` header: the `for=` of its first element, quoted or
/// not, IPv6 in brackets. An address without a port yields port 0.
pub fn parse_forwarded_for(value: &str) -> Option<SocketAddr> {
    let first = value.split(',').next()?;
    let node = first.split(';').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        k.trim().eq_ignore_ascii_case("for").then(|| v.trim())
    })?;
    let node = node
        .strip_prefix('"')
        .and_then(|n| n.strip_suffix('"'))
        .unwrap_or(node);
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
            assert_eq!(parse_forwarded_for(&forwarded_for_value(sa)), Some(sa));
        }
        assert_eq!(
            forwarded_for_value("[fd00::1]:443".parse().unwrap()),
            "for=\"[fd00::1]:443\""
        );
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
