//! The outbound routing decision (DESIGN.md §5): where a captured connection goes, from its
//! original destination and the node's config.
//!
//! Pure: [`route`] reads a [`NodeState`] and returns a [`Route`]; the caller does the
//! connecting, and supplies the endpoint choice through `pick` so this module holds no
//! counter or clock.
use std::net::{IpAddr, SocketAddr};

use mesh_api::{Endpoint, Identity, NamespacedName, Protocol};

use crate::control::NodeState;

/// Where an outbound connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Not a mesh destination: connect to `dst` as plain TCP. The kernel captures only mesh
    /// destinations, so this is a Service VIP whose endpoint is outside the mesh, or an address
    /// the kernel still held as the mesh's while this node's view moved on.
    Passthrough {
        dst: SocketAddr,
        reason: PassthroughReason,
        /// The service whose VIP the client dialled, if it dialled one.
        service: Option<NamespacedName>,
    },
    /// An enrolled pod: open an HBONE stream to it.
    Hbone {
        /// The pod's `ip:port`, the CONNECT `:authority`. The IP is the pod's address as the
        /// mesh lists it (IPv4 stays IPv4 even when the client dialled it IPv4-mapped): the
        /// peer checks the authority against the address it was dialled on.
        dst: SocketAddr,
        workload_uid: String,
        /// What the server's certificate must name.
        identity: Identity,
        /// The pod runs on this node.
        local: bool,
        /// The service whose VIP the client dialled, if it dialled one.
        service: Option<NamespacedName>,
    },
    /// A service VIP and port with no ready endpoint: the caller resets the client, as
    /// kube-proxy rejects such a connection.
    NoEndpoint { service: NamespacedName },
}

/// Why a connection is passed through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassthroughReason {
    /// No workload has the address: outside the mesh (or a pod this node is not told about).
    UnknownAddress,
    /// A pod that is not enrolled in the mesh.
    NotEnrolled,
    /// A service VIP, but not one of the service's TCP ports; left to the network.
    UnknownServicePort,
}

/// Routes a connection captured on its way to `orig_dst`.
///
/// A service VIP on one of its TCP ports resolves to a ready endpoint of the port's target
/// port and of the VIP's address family (kube-proxy's choice); `pick(n)` chooses among the
/// `n > 0` candidates and its result is taken modulo `n`, so a raw round-robin counter will
/// do. The chosen (or original) address then goes over HBONE if it is an enrolled pod's,
/// local or remote, and as plain TCP otherwise.
///
/// IPv4-mapped IPv6 destinations (a dual-stack socket dialling `::ffff:a.b.c.d`) are looked up
/// as IPv4; a plain-TCP destination keeps the family the client used, so the proxy dials the
/// way the client did.
pub fn route(state: &NodeState, orig_dst: SocketAddr, pick: &mut impl FnMut(usize) -> usize) -> Route {
    let ip = orig_dst.ip().to_canonical();
    let (dst, service) = match state.service_by_vip(ip) {
        None => (orig_dst, None),
        Some(svc) => {
            // The capture is TCP only; a UDP port of the same number is not this connection's.
            let port = svc
                .ports
                .iter()
                .find(|p| p.port == orig_dst.port() && p.protocol == Protocol::Tcp);
            let Some(port) = port else {
                return Route::Passthrough {
                    dst: orig_dst,
                    reason: PassthroughReason::UnknownServicePort,
                    service: Some(svc.key()),
                };
            };
            // Endpoints are listed per (address, port); a dual-stack service lists both
            // families, and a VIP of one family is served by endpoints of that family.
            let candidates: Vec<&Endpoint> = svc
                .endpoints
                .iter()
                .filter(|e| {
                    e.ready && e.port == port.target_port && e.ip.to_canonical().is_ipv4() == ip.is_ipv4()
                })
                .collect();
            if candidates.is_empty() {
                return Route::NoEndpoint { service: svc.key() };
            }
            let chosen = candidates[pick(candidates.len()) % candidates.len()];
            let dst = SocketAddr::new(in_family_of(chosen.ip.to_canonical(), orig_dst), chosen.port);
            (dst, Some(svc.key()))
        }
    };
    let ip = dst.ip().to_canonical();
    match state.workload_by_ip(ip) {
        Some(w) if w.enrolled => Route::Hbone {
            dst: SocketAddr::new(ip, dst.port()),
            workload_uid: w.uid.clone(),
            identity: w.identity.clone(),
            local: w.node == state.node,
            service,
        },
        Some(_) => Route::Passthrough {
            dst,
            reason: PassthroughReason::NotEnrolled,
            service,
        },
        None => Route::Passthrough {
            dst,
            reason: PassthroughReason::UnknownAddress,
            service,
        },
    }
}

/// `ip` (canonical) in the family of the client's destination: IPv4-mapped when the client
/// dialled over IPv6.
fn in_family_of(ip: IpAddr, orig_dst: SocketAddr) -> IpAddr {
    match (ip, orig_dst) {
        (IpAddr::V4(v4), SocketAddr::V6(_)) => IpAddr::V6(v4.to_ipv6_mapped()),
        _ => ip,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use mesh_api::{MtlsMode, NodeView, Service, ServicePort, Update, UpdateKind, Version, Workload};

    use super::*;
    use crate::control::apply;

    fn workload(uid: &str, node: &str, ips: &[&str], enrolled: bool) -> Workload {
        Workload {
            uid: uid.into(),
            name: format!("pod-{uid}"),
            namespace: "shop".into(),
            node: node.into(),
            service_account: uid.into(),
            identity: id(uid),
            ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            enrolled,
            mtls_mode: MtlsMode::Strict,
            labels: BTreeMap::new(),
        }
    }

    fn id(sa: &str) -> Identity {
        format!("spiffe://cluster.local/ns/shop/sa/{sa}").parse().unwrap()
    }

    fn ep(ip: &str, port: u16, ready: bool) -> Endpoint {
        Endpoint {
            workload_uid: None,
            ip: ip.parse().unwrap(),
            port,
            ready,
        }
    }

    fn tcp(port: u16, target_port: u16) -> ServicePort {
        ServicePort {
            port,
            target_port,
            protocol: Protocol::Tcp,
        }
    }

    fn service(name: &str, vips: &[&str], ports: Vec<ServicePort>, endpoints: Vec<Endpoint>) -> Service {
        Service {
            namespace: "shop".into(),
            name: name.into(),
            vips: vips.iter().map(|ip| ip.parse().unwrap()).collect(),
            ports,
            endpoints,
        }
    }

    fn key(name: &str) -> Option<NamespacedName> {
        Some(NamespacedName::new("shop", name))
    }

    /// Node `a`'s view: pods on `a` and `b`, one not enrolled, and services over them.
    fn state() -> NodeState {
        let mut view = NodeView::default();
        for w in [
            workload("web", "a", &["10.0.0.1", "fd00::1"], true),
            workload("plain", "a", &["10.0.0.2"], false),
            workload("cart", "b", &["10.0.1.1", "fd00:1::1"], true),
        ] {
            view.insert_workload(w);
        }
        for s in [
            // Dual stack; port 80 -> 8080 and 9090 -> 9090. Endpoints of other ports and
            // unready ones are never chosen.
            service(
                "web",
                &["10.96.0.1", "fd00:96::1"],
                vec![tcp(80, 8080), tcp(9090, 9090)],
                vec![
                    ep("10.0.0.1", 8080, true),
                    ep("10.0.0.1", 9090, true),
                    ep("10.0.0.3", 8080, false),
                    ep("10.0.1.1", 8080, true),
                    ep("fd00::1", 8080, true),
                    ep("fd00:1::1", 8080, true),
                ],
            ),
            service(
                "plain",
                &["10.96.0.2"],
                vec![tcp(80, 8000)],
                vec![ep("10.0.0.2", 8000, true)],
            ),
            service(
                "external",
                &["10.96.0.3"],
                vec![tcp(443, 443)],
                vec![ep("192.0.2.7", 443, true)],
            ),
            service(
                "empty",
                &["10.96.0.4"],
                vec![tcp(80, 80)],
                vec![ep("10.0.0.1", 80, false)],
            ),
            service(
                "dns",
                &["10.96.0.10"],
                vec![ServicePort {
                    port: 53,
                    target_port: 53,
                    protocol: Protocol::Udp,
                }],
                vec![ep("10.0.0.1", 53, true)],
            ),
        ] {
            view.insert_service(s);
        }
        let update = Update {
            version: Version {
                epoch: "e".into(),
                number: 1,
            },
            kind: UpdateKind::Snapshot(view),
        };
        apply(&NodeState::new("a"), update).unwrap()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn hbone(dst: &str, uid: &str, local: bool, service: Option<NamespacedName>) -> Route {
        Route::Hbone {
            dst: sa(dst),
            workload_uid: uid.into(),
            identity: id(uid),
            local,
            service,
        }
    }

    fn pass(dst: &str, reason: PassthroughReason, service: Option<NamespacedName>) -> Route {
        Route::Passthrough {
            dst: sa(dst),
            reason,
            service,
        }
    }

    #[test]
    fn routes() {
        use PassthroughReason::*;
        // (what, original destination, what `pick` returns, the `n` it must be asked with
        // (None: not asked), expected route)
        let cases: Vec<(&str, &str, usize, Option<usize>, Route)> = vec![
            (
                "unknown IPv4",
                "192.0.2.1:443",
                0,
                None,
                pass("192.0.2.1:443", UnknownAddress, None),
            ),
            (
                "unknown IPv6",
                "[2001:db8::1]:443",
                0,
                None,
                pass("[2001:db8::1]:443", UnknownAddress, None),
            ),
            (
                "local enrolled pod",
                "10.0.0.1:8080",
                0,
                None,
                hbone("10.0.0.1:8080", "web", true, None),
            ),
            (
                "remote enrolled pod",
                "10.0.1.1:8080",
                0,
                None,
                hbone("10.0.1.1:8080", "cart", false, None),
            ),
            (
                "local pod by IPv6",
                "[fd00::1]:8080",
                0,
                None,
                hbone("[fd00::1]:8080", "web", true, None),
            ),
            (
                "remote pod by IPv6",
                "[fd00:1::1]:80",
                0,
                None,
                hbone("[fd00:1::1]:80", "cart", false, None),
            ),
            (
                "pod not enrolled",
                "10.0.0.2:8000",
                0,
                None,
                pass("10.0.0.2:8000", NotEnrolled, None),
            ),
            (
                "VIP: first ready endpoint of the target port",
                "10.96.0.1:80",
                0,
                Some(2),
                hbone("10.0.0.1:8080", "web", true, key("web")),
            ),
            (
                "VIP: second ready endpoint, on another node",
                "10.96.0.1:80",
                1,
                Some(2),
                hbone("10.0.1.1:8080", "cart", false, key("web")),
            ),
            (
                "VIP: pick's result is taken modulo n",
                "10.96.0.1:80",
                7,
                Some(2),
                hbone("10.0.1.1:8080", "cart", false, key("web")),
            ),
            (
                "VIP: another port maps to its own endpoints",
                "10.96.0.1:9090",
                0,
                Some(1),
                hbone("10.0.0.1:9090", "web", true, key("web")),
            ),
            (
                "IPv6 VIP: IPv6 endpoints only",
                "[fd00:96::1]:80",
                1,
                Some(2),
                hbone("[fd00:1::1]:8080", "cart", false, key("web")),
            ),
            (
                "VIP with an unknown port",
                "10.96.0.1:81",
                0,
                None,
                pass("10.96.0.1:81", UnknownServicePort, key("web")),
            ),
            (
                "VIP with only a UDP port of that number",
                "10.96.0.10:53",
                0,
                None,
                pass("10.96.0.10:53", UnknownServicePort, key("dns")),
            ),
            (
                "VIP without a ready endpoint",
                "10.96.0.4:80",
                0,
                None,
                Route::NoEndpoint {
                    service: NamespacedName::new("shop", "empty"),
                },
            ),
            (
                "VIP whose endpoint is not enrolled",
                "10.96.0.2:80",
                0,
                Some(1),
                pass("10.0.0.2:8000", NotEnrolled, key("plain")),
            ),
            (
                "VIP whose endpoint is outside the mesh",
                "10.96.0.3:443",
                0,
                Some(1),
                pass("192.0.2.7:443", UnknownAddress, key("external")),
            ),
            (
                "IPv4-mapped pod: HBONE to the IPv4 address",
                "[::ffff:10.0.0.1]:8080",
                0,
                None,
                hbone("10.0.0.1:8080", "web", true, None),
            ),
            (
                "IPv4-mapped VIP: IPv4 endpoints",
                "[::ffff:10.96.0.1]:80",
                1,
                Some(2),
                hbone("10.0.1.1:8080", "cart", false, key("web")),
            ),
            (
                "IPv4-mapped VIP, plain endpoint: stays IPv6",
                "[::ffff:10.96.0.2]:80",
                0,
                Some(1),
                pass("[::ffff:10.0.0.2]:8000", NotEnrolled, key("plain")),
            ),
            (
                "IPv4-mapped pod not enrolled: unchanged",
                "[::ffff:10.0.0.2]:8000",
                0,
                None,
                pass("[::ffff:10.0.0.2]:8000", NotEnrolled, None),
            ),
            (
                "IPv4-mapped unknown address: unchanged",
                "[::ffff:192.0.2.1]:443",
                0,
                None,
                pass("[::ffff:192.0.2.1]:443", UnknownAddress, None),
            ),
        ];
        let state = state();
        for (what, orig_dst, choice, want_n, want) in cases {
            let mut asked = None;
            let got = route(&state, sa(orig_dst), &mut |n| {
                asked = Some(n);
                choice
            });
            assert_eq!(got, want, "{what}");
            assert_eq!(asked, want_n, "{what}: pick's n");
        }
    }

    #[test]
    fn empty_state_passes_everything_through() {
        let state = NodeState::new("a");
        let mut pick = |_| 0;
        assert_eq!(
            route(&state, sa("10.96.0.1:80"), &mut pick),
            pass("10.96.0.1:80", PassthroughReason::UnknownAddress, None)
        );
    }
}
