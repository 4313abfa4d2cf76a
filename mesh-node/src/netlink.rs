//! Policy routing for inbound capture, set up through rtnetlink (DESIGN.md §4, capture-facts.md).
//!
//! The uplink's tc program marks inbound HBONE packets to local pods with the capture mark; in
//! the node's network namespace, per IP family:
//!
//! ```text
//! rule   pref <priority> iif <uplink> fwmark <mark>/<mark> lookup <table> proto 160
//! rule   pref <priority> fwmark <reply>/<reply> lookup <table> proto 160
//! route  local 0.0.0.0/0 dev lo table <table> proto 160        (IPv6: local ::/0)
//! ```
//!
//! deliver them locally, to the proxy's transparent listener on `*:15008`, or to its
//! transparent socket whose reply it is (a connection made from a pod's or a client's address,
//! `--preserve-source`). The capture rule is scoped to the uplink: unscoped, it would also catch
//! the proxy's own outgoing packets if their mark shared the bit, and the proxy's connects to
//! pods would fail (ENETUNREACH). The reply rule cannot be scoped (pods' replies come in over
//! their veths or their bridge, whichever the CNI uses); its mark is one only the pod veths' tc
//! program sets, disjoint from the proxy's socket mark.
//!
//! What is ours is recognised by the routing protocol number [`RT_PROTO_MESH`] on rules and
//! routes: [`ensure_capture_routing`] makes ours equal the desired ones (keeps what matches,
//! removes what does not, e.g. after a change of table or mark, adds what is missing), so it is
//! idempotent; [`remove_capture_routing`] removes all of ours and needs no configuration, so
//! `mesh-node uninstall` finds them whatever flags the agent ran with.
//!
//! [`pod_link`] (run inside a pod's network namespace) and [`veth_peer`] (on the node) find a
//! pod's host-side veth for `Datapath::set_strict` (see `crate::pod_veth`).
//!
//! Synchronous, over a plain `NETLINK_ROUTE` socket (netlink-sys) with messages built and
//! parsed by netlink-packet-route. The socket lives in the calling thread's network namespace.
//! Every request waits at most [`RECEIVE_TIMEOUT`] for each part of the kernel's answer, so a
//! stuck answer fails the request instead of blocking its caller forever.

use std::{ffi::CString, fmt, net::IpAddr, num::NonZeroI32, os::fd::AsRawFd, time::Duration};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::{
    address::{AddressAttribute, AddressMessage},
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
    route::{RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType},
    rule::{RuleAction, RuleAttribute, RuleMessage},
    AddressFamily, RouteNetlinkMessage,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::ebpf::Marks;

/// Routing table of the capture route. Tables 1-250 are what Calico and the AWS VPC CNI
/// allocate from, Cilium uses 2004/2005, Istio ambient 100/101: 15008 (the HBONE port) is
/// none of them.
pub const DEFAULT_CAPTURE_TABLE: u32 = 15008;
/// Priority of the capture rule: after the kernel's `local` rule (0), before the rules CNIs
/// and Istio add (Calico's WireGuard rule 99, Istio ambient 100-103, Cilium's `local` moved
/// to 100, the AWS VPC CNI's 512/1536) and well before `main` (32766).
pub const DEFAULT_RULE_PRIORITY: u32 = 80;
/// The routing protocol number on mesh's rules and routes (`proto 160` in `ip rule`/`ip route`):
/// 15008 mod 256, outside iproute2's rt_protos list and Calico's 80.
pub const RT_PROTO_MESH: u8 = 160;
/// How long a request waits for each part of the kernel's answer: rtnetlink answers in
/// microseconds, so this only ends a request whose answer never comes.
pub const RECEIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The inbound-capture routing of an agent's config (`--uplink`, `--capture-mark`,
/// `--proxy-mark`, `--capture-table`, `--capture-rule-priority`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureConfig {
    /// The node's uplink; `None`: the interface holding the node IP.
    pub uplink: Option<String>,
    pub marks: Marks,
    pub table: u32,
    pub rule_priority: u32,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            uplink: None,
            marks: Marks::default(),
            table: DEFAULT_CAPTURE_TABLE,
            rule_priority: DEFAULT_RULE_PRIORITY,
        }
    }
}

impl CaptureConfig {
    /// The routing to install: the uplink resolved (given, or the interface holding the node
    /// IPs, looked up in this thread's network namespace), one rule and route per family of
    /// `node_ips` (both when none is given).
    pub fn resolve(&self, node_ips: &[IpAddr]) -> Result<CaptureRouting, NetlinkError> {
        let uplink = match &self.uplink {
            Some(name) => {
                ifindex(name).ok_or_else(|| NetlinkError::NoSuchInterface(name.clone()))?;
                name.clone()
            }
            None => uplink_of(node_ips)?,
        };
        let any = node_ips.is_empty();
        Ok(CaptureRouting {
            uplink,
            mark: self.marks.capture,
            reply_mark: self.marks.reply,
            table: self.table,
            priority: self.rule_priority,
            ipv4: any || node_ips.iter().any(IpAddr::is_ipv4),
            ipv6: any || node_ips.iter().any(IpAddr::is_ipv6),
        })
    }
}

/// The rules and routes [`ensure_capture_routing`] installs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureRouting {
    pub uplink: String,
    /// Matched as `fwmark mark/mark`, from the uplink.
    pub mark: u32,
    /// Matched as `fwmark reply_mark/reply_mark` from any interface: pods' replies to the
    /// proxy's transparent sockets, which come in over their veths (or the bridge).
    pub reply_mark: u32,
    pub table: u32,
    pub priority: u32,
    pub ipv4: bool,
    pub ipv6: bool,
}

/// What a call changed, one line per rule or route, in `ip` syntax.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoutingDiff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

impl RoutingDiff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

#[derive(Debug, Error)]
pub enum NetlinkError {
    #[error("opening a NETLINK_ROUTE socket: {0}")]
    Socket(std::io::Error),
    #[error("{action}: no answer from the kernel within {timeout:?}")]
    Timeout { action: String, timeout: Duration },
    #[error("no interface in this network namespace holds {0}")]
    NoPodInterface(IpAddr),
    #[error("interface #{0}, holding the pod's address, is not a veth")]
    NotAVeth(u32),
    #[error("the veth peer of interface #{0} is not in another network namespace")]
    PeerNotOutside(u32),
    #[error("{action}: {err}")]
    Request { action: String, err: std::io::Error },
    #[error("{action}: cannot parse the kernel's answer: {err}")]
    Decode { action: String, err: String },
    #[error("interface {0} not found in this network namespace (--uplink)")]
    NoSuchInterface(String),
    #[error("no interface in this network namespace holds the node IPs {0:?}: pass --uplink")]
    NoUplink(Vec<IpAddr>),
    #[error("the node IPs are on different interfaces ({0} and {1}): pass --uplink")]
    AmbiguousUplink(String, String),
    #[error("invalid capture routing config: {0}")]
    InvalidConfig(String),
    #[error(
        "routing table {table} already holds a default route not made by mesh ({route}): choose another --capture-table"
    )]
    TableInUse { table: u32, route: String },
}

/// Makes mesh's capture rules and routes in this network namespace equal the ones of
/// `routing`: keeps those that match, removes other ones of ours, adds the missing ones.
/// Running it again changes nothing.
pub fn ensure_capture_routing(routing: &CaptureRouting) -> Result<RoutingDiff, NetlinkError> {
    validate(routing)?;
    let lo = ifindex("lo").ok_or_else(|| NetlinkError::NoSuchInterface("lo".into()))?;
    let mut nl = Netlink::open()?;
    let mut diff = RoutingDiff::default();
    let families: Vec<Family> = [(routing.ipv4, Family::V4), (routing.ipv6, Family::V6)]
        .into_iter()
        .filter_map(|(on, f)| on.then_some(f))
        .collect();

    // Order: wanted routes, wanted rules, then stale rules and stale routes, so that no rule
    // ever points at a table without its route (marked packets would fall through to `main`
    // and be forwarded to the pod instead of reaching the proxy).
    let want_routes: Vec<Route> = families
        .iter()
        .map(|f| Route {
            family: *f,
            table: routing.table,
            oif: Some(lo),
            local_default: true,
            protocol: RT_PROTO_MESH,
        })
        .collect();
    let routes = nl.routes()?;
    for route in &want_routes {
        if routes.iter().any(|(r, _)| r == route) {
            continue;
        }
        let same_slot =
            |r: &Route, m: &RouteMessage| r.family == route.family && r.table == route.table && is_default(m);
        match routes.iter().find(|(r, m)| same_slot(r, m)) {
            // Ours, but not the desired one (e.g. another oif): replace it.
            Some((r, m)) if r.protocol == RT_PROTO_MESH => {
                nl.ack(RouteNetlinkMessage::DelRoute(m.clone()), 0, || {
                    format!("removing route {r}")
                })?;
                diff.removed.push(format!("route {r}"));
            }
            // A `local default dev lo` someone else made does the job: leave it be.
            Some((r, _)) if r.local_default && r.oif == Some(lo) => {
                warn!(route = %r, "capture table already has a suitable route not made by mesh; leaving it");
                continue;
            }
            Some((r, _)) => {
                return Err(NetlinkError::TableInUse {
                    table: route.table,
                    route: r.to_string(),
                })
            }
            None => {}
        }
        nl.ack(
            RouteNetlinkMessage::NewRoute(route.message()),
            NLM_F_CREATE | NLM_F_EXCL,
            || format!("adding route {route}"),
        )?;
        diff.added.push(format!("route {route}"));
    }

    let want_rules: Vec<Rule> = families
        .iter()
        .flat_map(|f| {
            [
                (Some(routing.uplink.clone()), routing.mark),
                (None, routing.reply_mark),
            ]
            .map(|(iif, mark)| Rule {
                family: *f,
                priority: routing.priority,
                iif,
                fwmark: mark,
                fwmask: mark,
                table: routing.table,
                protocol: RT_PROTO_MESH,
            })
        })
        .collect();
    let rules = nl.rules()?;
    // New ones in before stale ones out, so a change of mark or table never leaves a gap.
    for rule in &want_rules {
        if !rules.iter().any(|(r, _)| r == rule) {
            nl.ack(
                RouteNetlinkMessage::NewRule(rule.message()),
                NLM_F_CREATE | NLM_F_EXCL,
                || format!("adding rule {rule}"),
            )?;
            diff.added.push(format!("rule {rule}"));
        }
    }
    for (rule, msg) in &rules {
        if rule.protocol == RT_PROTO_MESH && !want_rules.contains(rule) {
            nl.ack(RouteNetlinkMessage::DelRule(msg.clone()), 0, || {
                format!("removing rule {rule}")
            })?;
            diff.removed.push(format!("rule {rule}"));
        }
    }
    // Stale routes of ours (e.g. in a previous table) last, once no rule points at them.
    for (route, msg) in nl.routes()? {
        if route.protocol == RT_PROTO_MESH && !want_routes.contains(&route) {
            nl.ack(RouteNetlinkMessage::DelRoute(msg), 0, || {
                format!("removing route {route}")
            })?;
            diff.removed.push(format!("route {route}"));
        }
    }
    if !diff.is_empty() {
        info!(added = ?diff.added, removed = ?diff.removed, "capture routing updated");
    }
    Ok(diff)
}

/// Removes every rule and route of mesh's (protocol [`RT_PROTO_MESH`]) from this network
/// namespace. Nothing to remove is a success.
pub fn remove_capture_routing() -> Result<RoutingDiff, NetlinkError> {
    let mut nl = Netlink::open()?;
    let mut diff = RoutingDiff::default();
    // Rules first: they stop steering packets into the table before its route goes.
    for (rule, msg) in nl.rules()? {
        if rule.protocol == RT_PROTO_MESH {
            nl.ack(RouteNetlinkMessage::DelRule(msg), 0, || {
                format!("removing rule {rule}")
            })?;
            diff.removed.push(format!("rule {rule}"));
        }
    }
    for (route, msg) in nl.routes()? {
        if route.protocol == RT_PROTO_MESH {
            nl.ack(RouteNetlinkMessage::DelRoute(msg), 0, || {
                format!("removing route {route}")
            })?;
            diff.removed.push(format!("route {route}"));
        }
    }
    if !diff.is_empty() {
        info!(removed = ?diff.removed, "capture routing removed");
    }
    Ok(diff)
}

/// mesh's rules and routes in this network namespace, in `ip` syntax (for inspection).
pub fn capture_routing() -> Result<Vec<String>, NetlinkError> {
    let mut nl = Netlink::open()?;
    let mut out: Vec<String> = nl
        .rules()?
        .into_iter()
        .filter(|(r, _)| r.protocol == RT_PROTO_MESH)
        .map(|(r, _)| format!("rule {r}"))
        .collect();
    out.extend(
        nl.routes()?
            .into_iter()
            .filter(|(r, _)| r.protocol == RT_PROTO_MESH)
            .map(|(r, _)| format!("route {r}")),
    );
    Ok(out)
}

/// The interface holding `ip` in this network namespace.
pub fn interface_with_address(ip: IpAddr) -> Result<Option<String>, NetlinkError> {
    Ok(Netlink::open()?
        .address_holder(ip)?
        .map(|index| ifname(index).unwrap_or_else(|| index.to_string())))
}

/// Every address of this network namespace's interfaces.
pub fn local_addresses() -> Result<std::collections::HashSet<IpAddr>, NetlinkError> {
    Ok(Netlink::open()?
        .addresses()?
        .into_iter()
        .map(|(_, ip)| ip)
        .collect())
}

/// Whether this network namespace has policy routing for the family of `ip` (FIB rules:
/// `CONFIG_IP_MULTIPLE_TABLES`, `CONFIG_IPV6_MULTIPLE_TABLES`): a dump of that family's rules
/// fails on a kernel without it.
pub fn probe_policy_routing(ip: IpAddr) -> Result<(), NetlinkError> {
    let family = if ip.is_ipv4() { Family::V4 } else { Family::V6 };
    let mut query = RuleMessage::default();
    query.header.family = family.af();
    Netlink::open()?
        .dump(RouteNetlinkMessage::GetRule(query), || {
            format!(
                "listing the {} routing rules",
                if ip.is_ipv4() { "IPv4" } else { "IPv6" }
            )
        })
        .map(drop)
}

/// A pod's interface in its own network namespace and the index of its veth peer in the
/// namespace across the pair (`IFLA_LINK`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodLink {
    pub ifindex: u32,
    pub peer_ifindex: u32,
}

/// Run inside a pod's network namespace: the interface holding `pod_ip`, which must be one end
/// of a veth pair whose other end is in another namespace.
pub fn pod_link(pod_ip: IpAddr) -> Result<PodLink, NetlinkError> {
    let mut nl = Netlink::open()?;
    let ifindex = nl
        .address_holder(pod_ip)?
        .ok_or(NetlinkError::NoPodInterface(pod_ip))?;
    let link = nl.link(ifindex)?;
    if !link.veth {
        return Err(NetlinkError::NotAVeth(ifindex));
    }
    match (link.peer, link.peer_netns) {
        (Some(peer_ifindex), true) => Ok(PodLink {
            ifindex,
            peer_ifindex,
        }),
        _ => Err(NetlinkError::PeerNotOutside(ifindex)),
    }
}

/// Where the node's IP stack receives what a pod on host-side veth `ifindex` sends, and that
/// interface's link-layer address: its bridge, when the veth is a bridge port (a frame to
/// another port's address would be switched past the stack), else the veth itself. `None`
/// without a link-layer address.
pub fn pod_gateway(ifindex: u32) -> Result<Option<(u32, [u8; 6])>, NetlinkError> {
    let mut nl = Netlink::open()?;
    let veth = nl.link(ifindex)?;
    let (index, link) = match veth.master {
        Some(master) => (master, nl.link(master)?),
        None => (ifindex, veth),
    };
    Ok(link.mac.map(|mac| (index, mac)))
}

/// The veth peer index of interface `ifindex` of this network namespace, if it is a veth whose
/// peer is in another one.
pub fn veth_peer(ifindex: u32) -> Result<Option<u32>, NetlinkError> {
    let link = Netlink::open()?.link(ifindex)?;
    Ok((link.veth && link.peer_netns).then_some(link.peer).flatten())
}

fn uplink_of(node_ips: &[IpAddr]) -> Result<String, NetlinkError> {
    let mut found: Option<String> = None;
    for ip in node_ips {
        if let Some(name) = interface_with_address(*ip)? {
            match &found {
                Some(prev) if *prev != name => return Err(NetlinkError::AmbiguousUplink(prev.clone(), name)),
                _ => found = Some(name),
            }
        }
    }
    found.ok_or_else(|| NetlinkError::NoUplink(node_ips.to_vec()))
}

fn validate(r: &CaptureRouting) -> Result<(), NetlinkError> {
    if r.mark == 0 || r.reply_mark == 0 {
        return Err(NetlinkError::InvalidConfig("capture or reply mark is 0".into()));
    }
    // 0 is "unspecified"; 253-255 are the kernel's default, main and local tables.
    if r.table == 0 || (253..=255).contains(&r.table) {
        return Err(NetlinkError::InvalidConfig(format!(
            "table {} is reserved (0, 253 default, 254 main, 255 local)",
            r.table
        )));
    }
    if r.priority == 0 || r.priority >= 32766 {
        return Err(NetlinkError::InvalidConfig(format!(
            "rule priority {} must be between 1 and 32765 (after `local`, before `main`)",
            r.priority
        )));
    }
    if !r.ipv4 && !r.ipv6 {
        return Err(NetlinkError::InvalidConfig(
            "neither IPv4 nor IPv6 selected".into(),
        ));
    }
    Ok(())
}

fn ifindex(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: valid C string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (index != 0).then_some(index)
}

fn ifname(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes, as the call requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    Some(
        unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}

// ---------------------------------------------------------------------------------------------
// Rules and routes, as far as capture cares.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn of(f: AddressFamily) -> Option<Family> {
        match f {
            AddressFamily::Inet => Some(Family::V4),
            AddressFamily::Inet6 => Some(Family::V6),
            _ => None,
        }
    }

    fn af(self) -> AddressFamily {
        match self {
            Family::V4 => AddressFamily::Inet,
            Family::V6 => AddressFamily::Inet6,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    family: Family,
    priority: u32,
    iif: Option<String>,
    fwmark: u32,
    fwmask: u32,
    table: u32,
    protocol: u8,
}

impl Rule {
    fn parse(msg: &RuleMessage) -> Option<Rule> {
        let mut rule = Rule {
            family: Family::of(msg.header.family)?,
            priority: 0,
            iif: None,
            fwmark: 0,
            fwmask: 0,
            table: u32::from(msg.header.table),
            protocol: 0,
        };
        if msg.header.action != RuleAction::ToTable {
            // Only "lookup" rules are ours; a different action never equals a wanted rule.
            rule.table = 0;
        }
        for attr in &msg.attributes {
            match attr {
                RuleAttribute::Priority(p) => rule.priority = *p,
                RuleAttribute::Iifname(n) => rule.iif = Some(n.clone()),
                RuleAttribute::FwMark(m) => rule.fwmark = *m,
                RuleAttribute::FwMask(m) => rule.fwmask = *m,
                RuleAttribute::Table(t) if msg.header.action == RuleAction::ToTable => rule.table = *t,
                RuleAttribute::Protocol(p) => rule.protocol = u8::from(*p),
                _ => {}
            }
        }
        Some(rule)
    }

    fn message(&self) -> RuleMessage {
        let mut msg = RuleMessage::default();
        msg.header.family = self.family.af();
        msg.header.table = u8::try_from(self.table).unwrap_or(0);
        msg.header.action = RuleAction::ToTable;
        msg.attributes = vec![
            RuleAttribute::Priority(self.priority),
            RuleAttribute::FwMark(self.fwmark),
            RuleAttribute::FwMask(self.fwmask),
            RuleAttribute::Table(self.table),
            RuleAttribute::Protocol(RouteProtocol::from(self.protocol)),
        ];
        if let Some(iif) = &self.iif {
            msg.attributes.push(RuleAttribute::Iifname(iif.clone()));
        }
        msg
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let family = if self.family == Family::V4 { "-4" } else { "-6" };
        write!(f, "{family} pref {}", self.priority)?;
        if let Some(iif) = &self.iif {
            write!(f, " iif {iif}")?;
        }
        write!(
            f,
            " fwmark {:#x}/{:#x} lookup {} proto {}",
            self.fwmark, self.fwmask, self.table, self.protocol
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Route {
    family: Family,
    table: u32,
    oif: Option<u32>,
    /// `local` type with a /0 destination.
    local_default: bool,
    protocol: u8,
}

fn is_default(msg: &RouteMessage) -> bool {
    msg.header.destination_prefix_length == 0
}

impl Route {
    fn parse(msg: &RouteMessage) -> Option<Route> {
        let mut route = Route {
            family: Family::of(msg.header.address_family)?,
            table: u32::from(msg.header.table),
            oif: None,
            local_default: msg.header.kind == RouteType::Local && is_default(msg),
            protocol: u8::from(msg.header.protocol),
        };
        for attr in &msg.attributes {
            match attr {
                RouteAttribute::Table(t) => route.table = *t,
                RouteAttribute::Oif(i) => route.oif = Some(*i),
                _ => {}
            }
        }
        Some(route)
    }

    fn message(&self) -> RouteMessage {
        let mut msg = RouteMessage::default();
        msg.header.address_family = self.family.af();
        msg.header.destination_prefix_length = 0;
        msg.header.table = u8::try_from(self.table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
        msg.header.protocol = RouteProtocol::from(self.protocol);
        msg.header.scope = RouteScope::Host;
        msg.header.kind = RouteType::Local;
        msg.attributes = vec![RouteAttribute::Table(self.table)];
        if let Some(oif) = self.oif {
            msg.attributes.push(RouteAttribute::Oif(oif));
        }
        msg
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (family, dst) = if self.family == Family::V4 {
            ("-4", "0.0.0.0/0")
        } else {
            ("-6", "::/0")
        };
        let kind = if self.local_default { "local" } else { "(other)" };
        write!(f, "{family} {kind} {dst}")?;
        if let Some(oif) = self.oif {
            match ifname(oif) {
                Some(name) => write!(f, " dev {name}")?,
                None => write!(f, " dev #{oif}")?,
            }
        }
        write!(f, " table {} proto {}", self.table, self.protocol)
    }
}

// ---------------------------------------------------------------------------------------------
// The socket.

struct Netlink {
    socket: Socket,
    /// `SO_RCVTIMEO` of the socket.
    timeout: Duration,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    fn open() -> Result<Netlink, NetlinkError> {
        Netlink::open_with(RECEIVE_TIMEOUT)
    }

    fn open_with(timeout: Duration) -> Result<Netlink, NetlinkError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
        socket.bind_auto().map_err(NetlinkError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(NetlinkError::Socket)?;
        set_receive_timeout(&socket, timeout).map_err(NetlinkError::Socket)?;
        Ok(Netlink {
            socket,
            timeout,
            seq: 0,
            buf: vec![0; 64 * 1024],
        })
    }

    /// The index of the interface holding `ip`.
    fn address_holder(&mut self, ip: IpAddr) -> Result<Option<u32>, NetlinkError> {
        Ok(self
            .addresses()?
            .into_iter()
            .find_map(|(index, a)| (a == ip).then_some(index)))
    }

    /// Every address of this namespace's interfaces, with the index of the interface holding it.
    fn addresses(&mut self) -> Result<Vec<(u32, IpAddr)>, NetlinkError> {
        let msgs = self.dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()), || {
            "listing addresses".to_string()
        })?;
        Ok(msgs
            .into_iter()
            .filter_map(|msg| match msg {
                RouteNetlinkMessage::NewAddress(addr) => Some(addr),
                _ => None,
            })
            .flat_map(|addr| {
                let index = addr.header.index;
                addr.attributes.into_iter().filter_map(move |a| match a {
                    AddressAttribute::Address(ip) | AddressAttribute::Local(ip) => Some((index, ip)),
                    _ => None,
                })
            })
            .collect())
    }

    /// Interface `index`: whether it is a veth, and its peer (`IFLA_LINK`, and whether that
    /// index is in another namespace: `IFLA_LINK_NETNSID`).
    fn link(&mut self, index: u32) -> Result<Link, NetlinkError> {
        let mut query = LinkMessage::default();
        query.header.index = index;
        let action = || format!("reading interface #{index}");
        let answer = self
            .request(RouteNetlinkMessage::GetLink(query), NLM_F_ACK, &action)?
            .into_iter()
            .find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) if l.header.index == index => Some(l),
                _ => None,
            })
            .ok_or_else(|| NetlinkError::Decode {
                action: action(),
                err: "no such interface in the answer".into(),
            })?;
        let mut link = Link::default();
        for attr in &answer.attributes {
            match attr {
                LinkAttribute::Link(peer) => link.peer = Some(*peer),
                LinkAttribute::LinkNetNsId(_) => link.peer_netns = true,
                LinkAttribute::Controller(master) => link.master = Some(*master),
                LinkAttribute::Address(mac) => link.mac = <[u8; 6]>::try_from(mac.as_slice()).ok(),
                LinkAttribute::LinkInfo(infos) => {
                    link.veth |= infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
                }
                _ => {}
            }
        }
        Ok(link)
    }

    /// mesh's view of every IPv4/IPv6 rule, with the message to delete it by.
    fn rules(&mut self) -> Result<Vec<(Rule, RuleMessage)>, NetlinkError> {
        let msgs = self.dump(RouteNetlinkMessage::GetRule(RuleMessage::default()), || {
            "listing rules".to_string()
        })?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRule(r) => Some((Rule::parse(&r)?, r)),
                _ => None,
            })
            .collect())
    }

    /// Every IPv4/IPv6 route of every table, with the message to delete it by.
    fn routes(&mut self) -> Result<Vec<(Route, RouteMessage)>, NetlinkError> {
        let msgs = self.dump(RouteNetlinkMessage::GetRoute(RouteMessage::default()), || {
            "listing routes".to_string()
        })?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => Some((Route::parse(&r)?, r)),
                _ => None,
            })
            .collect())
    }

    fn dump(
        &mut self,
        msg: RouteNetlinkMessage,
        action: impl Fn() -> String,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.request(msg, NLM_F_DUMP, &action)
    }

    /// A change request, answered by an ACK.
    fn ack(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        action: impl Fn() -> String,
    ) -> Result<(), NetlinkError> {
        debug!(action = %action(), "netlink request");
        self.request(msg, NLM_F_ACK | flags, &action).map(|_| ())
    }

    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        action: &dyn Fn() -> String,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        let request_err = |err: std::io::Error| NetlinkError::Request {
            action: action(),
            err,
        };
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        self.socket.send(&out, 0).map_err(request_err)?;
        self.answers(seq, flags & NLM_F_DUMP == NLM_F_DUMP, action)
    }

    /// The kernel's answers to request `seq`, up to their end (`NLMSG_DONE`, or the ACK of a
    /// request that is not a dump).
    fn answers(
        &mut self,
        seq: u32,
        is_dump: bool,
        action: &dyn Fn() -> String,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        let request_err = |err: std::io::Error| NetlinkError::Request {
            action: action(),
            err,
        };
        let mut answers = Vec::new();
        loop {
            let size = self.socket.recv(&mut &mut self.buf[..], 0).map_err(|err| {
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) {
                    NetlinkError::Timeout {
                        action: action(),
                        timeout: self.timeout,
                    }
                } else {
                    request_err(err)
                }
            })?;
            let mut offset = 0;
            while offset < size {
                let bytes = &self.buf[offset..size];
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes).map_err(|e| {
                    NetlinkError::Decode {
                        action: action(),
                        err: e.to_string(),
                    }
                })?;
                let len = reply.header.length as usize;
                if len == 0 {
                    break;
                }
                offset += len;
                if reply.header.sequence_number != seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::Error(e) => match e.code {
                        None if !is_dump => return Ok(answers),
                        None => {}
                        Some(code) => return Err(request_err(errno(code))),
                    },
                    NetlinkPayload::InnerMessage(m) => answers.push(m),
                    _ => {}
                }
            }
        }
    }
}

/// What [`Netlink::link`] reads of an interface.
#[derive(Debug, Default)]
struct Link {
    veth: bool,
    peer: Option<u32>,
    peer_netns: bool,
    /// The bridge (or other master) it is a port of.
    master: Option<u32>,
    mac: Option<[u8; 6]>,
}

/// `SO_RCVTIMEO`: a `recv` on the socket fails with `EAGAIN` after `timeout`.
fn set_receive_timeout(socket: &Socket, timeout: Duration) -> std::io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: the option value is a valid timeval of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn errno(code: NonZeroI32) -> std::io::Error {
    std::io::Error::from_raw_os_error(code.get().abs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_and_route_messages_round_trip() {
        let rule = Rule {
            family: Family::V6,
            priority: 80,
            iif: Some("eth0".into()),
            fwmark: 0x1000,
            fwmask: 0x1000,
            table: 15008,
            protocol: RT_PROTO_MESH,
        };
        assert_eq!(Rule::parse(&rule.message()), Some(rule.clone()));
        assert_eq!(
            rule.to_string(),
            "-6 pref 80 iif eth0 fwmark 0x1000/0x1000 lookup 15008 proto 160"
        );
        let route = Route {
            family: Family::V4,
            table: 100,
            oif: Some(1),
            local_default: true,
            protocol: RT_PROTO_MESH,
        };
        assert_eq!(Route::parse(&route.message()), Some(route.clone()));
    }

    #[test]
    fn an_answer_that_never_comes_times_out() {
        let mut nl = Netlink::open_with(Duration::from_millis(50)).unwrap();
        let started = std::time::Instant::now();
        let err = nl.answers(1, false, &|| "listing nothing".into()).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(matches!(err, NetlinkError::Timeout { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "listing nothing: no answer from the kernel within 50ms"
        );
    }

    #[test]
    fn reserved_tables_and_priorities_are_refused() {
        let ok = CaptureRouting {
            uplink: "eth0".into(),
            mark: 0x1000,
            reply_mark: 0x40,
            table: DEFAULT_CAPTURE_TABLE,
            priority: DEFAULT_RULE_PRIORITY,
            ipv4: true,
            ipv6: true,
        };
        assert!(validate(&ok).is_ok());
        for bad in [
            CaptureRouting {
                table: 254,
                ..ok.clone()
            },
            CaptureRouting {
                table: 0,
                ..ok.clone()
            },
            CaptureRouting {
                priority: 0,
                ..ok.clone()
            },
            CaptureRouting {
                priority: 32766,
                ..ok.clone()
            },
            CaptureRouting {
                mark: 0,
                ..ok.clone()
            },
            CaptureRouting {
                reply_mark: 0,
                ..ok.clone()
            },
            CaptureRouting {
                ipv4: false,
                ipv6: false,
                ..ok.clone()
            },
        ] {
            assert!(validate(&bad).is_err(), "{bad:?}");
        }
    }
}
