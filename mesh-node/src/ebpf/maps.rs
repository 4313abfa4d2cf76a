//! Typed access to the pinned maps: configuration, exclusions, enrollment, local pod addresses,
//! mesh destinations, counters, and the original-destination lookup the proxy can use instead
//! of `SO_ORIGINAL_DST`.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap},
    net::{IpAddr, SocketAddr},
};

use aya::maps::{lpm_trie::Key, Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray};
use ipnet::IpNet;
use mesh_common::{
    self as common, addr_from_ip, ip_from_addr, Enrollment, OrigDst, PodGateway, ProxyConfig, SockKey,
    TcConfig, CONFIG_CAPTURE_ALL, COUNTER_COUNT, COUNTER_NAMES, DESTINATIONS_MAX_ENTRIES, DEST_SERVICE_VIP,
    ENROLL_CAPTURE_OUTBOUND,
};

use super::{error::EbpfError, DatapathConfig, DestinationsDiff, EnrollDiff};

pub(crate) struct Maps {
    config: Array<MapData, ProxyConfig>,
    enrolled: HashMap<MapData, u64, Enrollment>,
    tuple_dst: HashMap<MapData, SockKey, OrigDst>,
    excl_ports: HashMap<MapData, u16, u8>,
    excl_cidrs: LpmTrie<MapData, [u32; 4], u8>,
    counters: PerCpuArray<MapData, u64>,
    local_ips: HashMap<MapData, [u32; 4], u32>,
    tc_config: Array<MapData, TcConfig>,
    pod_gw: HashMap<MapData, u32, PodGateway>,
    dests: HashMap<MapData, [u32; 4], u32>,
}

fn take<T>(maps: &mut StdHashMap<&'static str, MapData>, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let data = maps.remove(name).ok_or_else(|| EbpfError::Aya {
        action: format!("opening map {name}"),
        err: "not in the pinned set".into(),
    })?;
    let map = Map::from_map_data(data).map_err(|e| EbpfError::aya(format!("opening map {name}"), e))?;
    T::try_from(map).map_err(|e| EbpfError::aya(format!("opening map {name}"), e))
}

impl Maps {
    pub(crate) fn new(mut maps: StdHashMap<&'static str, MapData>) -> Result<Maps, EbpfError> {
        Ok(Maps {
            config: take(&mut maps, common::MAP_CONFIG)?,
            enrolled: take(&mut maps, common::MAP_ENROLLED)?,
            tuple_dst: take(&mut maps, common::MAP_TUPLE_DST)?,
            excl_ports: take(&mut maps, common::MAP_EXCL_PORTS)?,
            excl_cidrs: take(&mut maps, common::MAP_EXCL_CIDRS)?,
            counters: take(&mut maps, common::MAP_COUNTERS)?,
            local_ips: take(&mut maps, common::MAP_LOCAL_IPS)?,
            tc_config: take(&mut maps, common::MAP_TC_CONFIG)?,
            pod_gw: take(&mut maps, common::MAP_POD_GW)?,
            dests: take(&mut maps, common::MAP_DESTINATIONS)?,
        })
    }

    pub(crate) fn tc_config(&self) -> Result<TcConfig, EbpfError> {
        self.tc_config
            .get(&0, 0)
            .map_err(|e| EbpfError::aya("reading mesh_tc_config", e))
    }

    pub(crate) fn set_tc_config(&mut self, cfg: TcConfig) -> Result<(), EbpfError> {
        self.tc_config
            .set(0, cfg, 0)
            .map_err(|e| EbpfError::aya("writing mesh_tc_config", e))
    }

    /// Whether `mesh_pod_gw` has an entry for host-side veth `ifindex`.
    pub(crate) fn has_pod_gateway(&self, ifindex: u32) -> bool {
        self.pod_gw.get(&ifindex, 0).is_ok()
    }

    /// Sets (`Some`) or clears where a pod's frames on host-side veth `ifindex` are sent when
    /// they belong to the proxy's transparent sockets: (interface, its MAC address).
    pub(crate) fn set_pod_gateway(
        &mut self,
        ifindex: u32,
        gw: Option<(u32, [u8; 6])>,
    ) -> Result<(), EbpfError> {
        let want = gw.map(|(index, mac)| PodGateway {
            ifindex: index,
            mac,
            reserved: [0; 2],
        });
        if self.pod_gw.get(&ifindex, 0).ok() == want {
            return Ok(());
        }
        match want {
            Some(gw) => self
                .pod_gw
                .insert(ifindex, gw, 0)
                .map_err(|e| EbpfError::aya(format!("writing mesh_pod_gw for interface #{ifindex}"), e)),
            None => remove_ok(self.pod_gw.remove(&ifindex))
                .map_err(|e| EbpfError::aya(format!("removing mesh_pod_gw for interface #{ifindex}"), e)),
        }
    }

    /// The local pod addresses and their flags.
    pub(crate) fn local_ips(&self) -> Result<BTreeMap<IpAddr, u32>, EbpfError> {
        self.local_ips
            .iter()
            .map(|r| r.map(|(k, f)| (ip_from_addr(&k), f)))
            .collect::<Result<BTreeMap<IpAddr, u32>, _>>()
            .map_err(|e| EbpfError::aya("reading mesh_local_ips", e))
    }

    /// Makes `mesh_local_ips` equal `desired` (address → flags). Returns the addresses (added,
    /// removed).
    pub(crate) fn set_local_ips(
        &mut self,
        desired: &BTreeMap<IpAddr, u32>,
    ) -> Result<(Vec<IpAddr>, Vec<IpAddr>), EbpfError> {
        sync_addr_map(&mut self.local_ips, &map_form(desired), "local pod address")
    }

    /// Adds or updates addresses (map form → flags) without removing any.
    pub(crate) fn add_local_ips<'a>(
        &mut self,
        entries: impl Iterator<Item = (&'a [u32; 4], &'a u32)>,
    ) -> Result<(), EbpfError> {
        insert_all(&mut self.local_ips, entries, "local pod address")
    }

    /// Writes the proxy config and makes the exclusion maps equal the desired ones. New
    /// entries go in before old ones come out, so nothing still wanted is ever missing.
    /// `CONFIG_CAPTURE_ALL` is kept as it is: it follows `mesh_dests`, not the config.
    pub(crate) fn apply_config(&mut self, cfg: &DatapathConfig, proxy_cgroup: u64) -> Result<(), EbpfError> {
        let mut proxy = ProxyConfig::new(
            cfg.proxy_ipv4,
            cfg.proxy_ipv6,
            cfg.outbound_port,
            cfg.inbound_plain_port,
            proxy_cgroup,
        );
        proxy.flags |= self.proxy_config()?.flags & CONFIG_CAPTURE_ALL;
        self.config
            .set(0, proxy, 0)
            .map_err(|e| EbpfError::aya("writing mesh_config", e))?;

        let want_ports: BTreeSet<u16> = cfg.exclude_ports.iter().copied().collect();
        let have_ports = self
            .excl_ports
            .keys()
            .collect::<Result<BTreeSet<u16>, _>>()
            .map_err(|e| EbpfError::aya("reading mesh_excl_ports", e))?;
        for port in want_ports.difference(&have_ports) {
            self.excl_ports
                .insert(port, 1, 0)
                .map_err(|e| EbpfError::aya(format!("excluding port {port}"), e))?;
        }
        for port in have_ports.difference(&want_ports) {
            remove_ok(self.excl_ports.remove(port))
                .map_err(|e| EbpfError::aya("updating mesh_excl_ports", e))?;
        }

        let want_cidrs: BTreeSet<(u32, [u32; 4])> = cfg.exclude_cidrs.iter().map(cidr_key).collect();
        let have_cidrs = self
            .excl_cidrs
            .keys()
            .map(|k| k.map(|k| (k.prefix_len(), k.data())))
            .collect::<Result<BTreeSet<_>, _>>()
            .map_err(|e| EbpfError::aya("reading mesh_excl_cidrs", e))?;
        for (prefix, addr) in want_cidrs.difference(&have_cidrs) {
            self.excl_cidrs
                .insert(&Key::new(*prefix, *addr), 1, 0)
                .map_err(|e| EbpfError::aya("updating mesh_excl_cidrs", e))?;
        }
        for (prefix, addr) in have_cidrs.difference(&want_cidrs) {
            remove_ok(self.excl_cidrs.remove(&Key::new(*prefix, *addr)))
                .map_err(|e| EbpfError::aya("updating mesh_excl_cidrs", e))?;
        }
        Ok(())
    }

    pub(crate) fn enrolled(&self) -> Result<BTreeSet<u64>, EbpfError> {
        self.enrolled
            .keys()
            .collect::<Result<BTreeSet<u64>, _>>()
            .map_err(|e| EbpfError::aya("reading mesh_enrolled", e))
    }

    /// Makes `mesh_enrolled` equal `desired`.
    pub(crate) fn set_enrolled(&mut self, desired: &BTreeSet<u64>) -> Result<EnrollDiff, EbpfError> {
        let have = self.enrolled()?;
        let value = Enrollment {
            flags: ENROLL_CAPTURE_OUTBOUND,
            reserved: 0,
        };
        let added: Vec<u64> = desired.difference(&have).copied().collect();
        let removed: Vec<u64> = have.difference(desired).copied().collect();
        for id in &added {
            self.enrolled
                .insert(id, value, 0)
                .map_err(|e| EbpfError::aya(format!("enrolling cgroup {id}"), e))?;
        }
        for id in &removed {
            remove_ok(self.enrolled.remove(id))
                .map_err(|e| EbpfError::aya(format!("unenrolling cgroup {id}"), e))?;
        }
        Ok(EnrollDiff { added, removed })
    }

    /// Adds cgroup ids (carried over from a replaced set) without removing any.
    pub(crate) fn add_enrolled(&mut self, ids: &BTreeSet<u64>) -> Result<(), EbpfError> {
        let value = Enrollment {
            flags: ENROLL_CAPTURE_OUTBOUND,
            reserved: 0,
        };
        for id in ids {
            self.enrolled
                .insert(id, value, 0)
                .map_err(|e| EbpfError::aya(format!("enrolling cgroup {id}"), e))?;
        }
        Ok(())
    }

    /// The mesh destinations and their `DEST_*` flags.
    pub(crate) fn destinations(&self) -> Result<BTreeMap<IpAddr, u32>, EbpfError> {
        self.dests
            .iter()
            .map(|r| r.map(|(k, f)| (ip_from_addr(&k), f)))
            .collect::<Result<BTreeMap<IpAddr, u32>, _>>()
            .map_err(|e| EbpfError::aya("reading mesh_dests", e))
    }

    /// Makes `mesh_dests` equal `desired` (address → `DEST_*` flags), or as much of it as fits:
    /// Service VIPs first, then workload addresses, each in address order.
    pub(crate) fn set_destinations(
        &mut self,
        desired: &BTreeMap<IpAddr, u32>,
    ) -> Result<DestinationsDiff, EbpfError> {
        let (want, left_out) = fit(map_form(desired), DESTINATIONS_MAX_ENTRIES as usize);
        let (added, removed) = sync_addr_map(&mut self.dests, &want, "mesh destination")?;
        Ok(DestinationsDiff {
            added,
            removed,
            left_out,
        })
    }

    /// Adds destinations (map form → flags, carried over from a replaced set) without removing
    /// any.
    pub(crate) fn add_destinations(&mut self, entries: &BTreeMap<[u32; 4], u32>) -> Result<(), EbpfError> {
        insert_all(&mut self.dests, entries.iter(), "mesh destination")
    }

    pub(crate) fn counters(&self) -> Result<Vec<(&'static str, u64)>, EbpfError> {
        (0..COUNTER_COUNT)
            .map(|i| {
                let per_cpu = self
                    .counters
                    .get(&i, 0)
                    .map_err(|e| EbpfError::aya("reading mesh_counters", e))?;
                let sum = per_cpu.iter().fold(0u64, |acc, v| acc.wrapping_add(*v));
                Ok((COUNTER_NAMES[i as usize], sum))
            })
            .collect()
    }

    /// Entries of the tuple→original-destination map (an LRU: full is normal under load).
    pub(crate) fn tuple_dst_len(&self) -> usize {
        self.tuple_dst.keys().filter(Result::is_ok).count()
    }

    pub(crate) fn original_dst(
        &self,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Result<Option<SocketAddr>, EbpfError> {
        match self.tuple_dst.get(&SockKey::new(peer, local), 0) {
            Ok(orig) => Ok(Some(orig.socket_addr())),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(EbpfError::aya("reading mesh_tuple_dst", e)),
        }
    }

    pub(crate) fn proxy_config(&self) -> Result<ProxyConfig, EbpfError> {
        self.config
            .get(&0, 0)
            .map_err(|e| EbpfError::aya("reading mesh_config", e))
    }

    /// Sets or clears `CONFIG_CAPTURE_ALL`. Returns whether it changed.
    pub(crate) fn set_capture_all(&mut self, on: bool) -> Result<bool, EbpfError> {
        let mut proxy = self.proxy_config()?;
        let was = proxy.flags & CONFIG_CAPTURE_ALL != 0;
        if was == on {
            return Ok(false);
        }
        proxy.flags ^= CONFIG_CAPTURE_ALL;
        self.config
            .set(0, proxy, 0)
            .map_err(|e| EbpfError::aya("writing mesh_config", e))?;
        Ok(true)
    }

    pub(crate) fn exclusions(&self) -> Result<(BTreeSet<u16>, BTreeSet<IpNet>), EbpfError> {
        let ports = self
            .excl_ports
            .keys()
            .collect::<Result<BTreeSet<u16>, _>>()
            .map_err(|e| EbpfError::aya("reading mesh_excl_ports", e))?;
        let cidrs = self
            .excl_cidrs
            .keys()
            .map(|k| k.map(|k| cidr_of_key(k.prefix_len(), &k.data())))
            .collect::<Result<BTreeSet<IpNet>, _>>()
            .map_err(|e| EbpfError::aya("reading mesh_excl_cidrs", e))?;
        Ok((ports, cidrs))
    }
}

/// Addresses in map form: an IPv4 address and its v4-mapped IPv6 form are one key.
fn map_form(desired: &BTreeMap<IpAddr, u32>) -> BTreeMap<[u32; 4], u32> {
    desired.iter().map(|(ip, f)| (addr_from_ip(*ip), *f)).collect()
}

/// The part of `want` that fits in `max` entries, Service VIPs first, and how many were left
/// out.
fn fit(want: BTreeMap<[u32; 4], u32>, max: usize) -> (BTreeMap<[u32; 4], u32>, usize) {
    if want.len() <= max {
        return (want, 0);
    }
    let left_out = want.len() - max;
    let (vips, others): (Vec<_>, Vec<_>) = want.into_iter().partition(|(_, f)| f & DEST_SERVICE_VIP != 0);
    (vips.into_iter().chain(others).take(max).collect(), left_out)
}

/// Makes an address map equal `want`: stale entries out first (so a nearly full map has room
/// for the new ones; a stale entry is not wanted either way), then new and changed ones in.
/// Returns the addresses (added, removed), ascending.
fn sync_addr_map(
    map: &mut HashMap<MapData, [u32; 4], u32>,
    want: &BTreeMap<[u32; 4], u32>,
    what: &str,
) -> Result<(Vec<IpAddr>, Vec<IpAddr>), EbpfError> {
    let have = map
        .iter()
        .collect::<Result<BTreeMap<[u32; 4], u32>, _>>()
        .map_err(|e| EbpfError::aya(format!("reading the {what} map"), e))?;
    let added: Vec<[u32; 4]> = want.keys().filter(|k| !have.contains_key(*k)).copied().collect();
    let removed: Vec<[u32; 4]> = have.keys().filter(|k| !want.contains_key(*k)).copied().collect();
    for key in &removed {
        remove_ok(map.remove(key))
            .map_err(|e| EbpfError::aya(format!("removing {what} {}", ip_from_addr(key)), e))?;
    }
    insert_all(map, want.iter().filter(|(k, f)| have.get(*k) != Some(*f)), what)?;
    let sorted = |keys: &[[u32; 4]]| {
        let mut ips: Vec<IpAddr> = keys.iter().map(ip_from_addr).collect();
        ips.sort();
        ips
    };
    Ok((sorted(&added), sorted(&removed)))
}

fn insert_all<'a>(
    map: &mut HashMap<MapData, [u32; 4], u32>,
    entries: impl Iterator<Item = (&'a [u32; 4], &'a u32)>,
    what: &str,
) -> Result<(), EbpfError> {
    for (key, flags) in entries {
        map.insert(key, flags, 0)
            .map_err(|e| EbpfError::aya(format!("adding {what} {}", ip_from_addr(key)), e))?;
    }
    Ok(())
}

/// A removal of something already gone is a success.
fn remove_ok(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

/// The LPM key of a CIDR: network address in v6 form, IPv4 prefixes offset by 96.
fn cidr_key(net: &IpNet) -> (u32, [u32; 4]) {
    let net = net.trunc();
    let prefix = match net {
        IpNet::V4(v4) => u32::from(v4.prefix_len()) + common::CIDR_V4_MAPPED_OFFSET,
        IpNet::V6(v6) => u32::from(v6.prefix_len()),
    };
    (prefix, addr_from_ip(net.addr()))
}

fn cidr_of_key(prefix: u32, addr: &[u32; 4]) -> IpNet {
    let ip = common::ip_from_addr(addr);
    let len = if ip.is_ipv4() {
        prefix.saturating_sub(common::CIDR_V4_MAPPED_OFFSET)
    } else {
        prefix
    };
    IpNet::new(ip, len.min(128) as u8).unwrap_or_else(|_| IpNet::from(ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_keys_are_v6_form() {
        let (p, a) = cidr_key(&"10.1.2.3/8".parse().unwrap());
        assert_eq!(p, 104);
        assert_eq!(
            common::octets_from_addr(&a),
            std::net::Ipv4Addr::new(10, 0, 0, 0).to_ipv6_mapped().octets()
        );
        assert_eq!(cidr_of_key(p, &a), "10.0.0.0/8".parse::<IpNet>().unwrap());
        let (p, a) = cidr_key(&"2001:db8::1/32".parse().unwrap());
        assert_eq!(p, 32);
        assert_eq!(cidr_of_key(p, &a), "2001:db8::/32".parse::<IpNet>().unwrap());
    }

    #[test]
    fn destinations_that_do_not_fit_leave_workloads_out_first() {
        let entry = |ip: &str, flags: u32| (addr_from_ip(ip.parse().unwrap()), flags);
        let want: BTreeMap<[u32; 4], u32> = [
            entry("10.1.0.1", common::DEST_WORKLOAD),
            entry("10.1.0.2", common::DEST_WORKLOAD),
            entry("10.96.0.1", DEST_SERVICE_VIP),
            entry("fd00:96::1", DEST_SERVICE_VIP),
        ]
        .into();
        assert_eq!(fit(want.clone(), 4), (want.clone(), 0));
        let (kept, left_out) = fit(want, 3);
        assert_eq!(left_out, 1);
        let kept: Vec<IpAddr> = kept.keys().map(ip_from_addr).collect();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(kept, [ip("10.1.0.1"), ip("10.96.0.1"), ip("fd00:96::1")]);
    }
}
