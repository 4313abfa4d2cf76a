//! `meshctl node ...`: one admin API document each, rendered. The renderers are pure (a
//! document and the time in, text out), so tests pin what a person sees.

use std::time::SystemTime;

use mesh_api::admin::{
    paths, BpfInfo, CertInfo, ConnectionInfo, LogLevel, PolicyInfo, ServiceInfo, Status, WorkloadInfo,
    API_VERSION,
};

use crate::client::Client;
use crate::error::Error;
use crate::output::human::{self, yes_no};
use crate::output::table::{wrap, Column, Overflow, Table};
use crate::output::{render, Format};

/// Endpoints listed per service before the rest is only counted.
const MAX_ENDPOINTS: usize = 4;

#[derive(Debug, Clone, clap::Subcommand)]
pub enum NodeCommand {
    /// Who the node is, whether it is ready, its config and controller.
    Status,
    /// The pods on the node: enrolled by their namespace (ENROLLED shows the mTLS mode), and
    /// captured by the kernel.
    Workloads,
    /// The services the node routes to, with their ready endpoints.
    Services,
    /// The authorization policies the node enforces.
    Policies,
    /// The certificates the node holds for its pods' identities.
    Certs,
    /// The connections the proxy carries now (SENT: bytes from the source, RECV: back to it).
    Connections,
    /// The kernel side: attached programs, maps and their fill, counters.
    Bpf,
    /// Show the node's log filter, or set it (e.g. `info,mesh_node::proxy=debug`). Setting it
    /// needs the node's Unix socket (`--socket /run/mesh/admin.sock`, as root): over TCP the
    /// admin API is read-only.
    LogLevel {
        /// The new filter; without it, the current one is shown.
        filter: Option<String>,
    },
}

pub async fn run(
    client: &Client,
    command: &NodeCommand,
    format: Format,
    width: usize,
) -> Result<String, Error> {
    let now = SystemTime::now();
    match command {
        NodeCommand::Status => {
            let status: Status = client.get(paths::STATUS).await?;
            check_status_api(client, &status)?;
            render(format, &status, status_lines)
        }
        NodeCommand::Workloads => {
            let list: Vec<WorkloadInfo> = client.get(paths::WORKLOADS).await?;
            render(format, &list, |l| workloads_table(l, width))
        }
        NodeCommand::Services => {
            let list: Vec<ServiceInfo> = client.get(paths::SERVICES).await?;
            render(format, &list, |l| services_table(l, width))
        }
        NodeCommand::Policies => {
            let list: Vec<PolicyInfo> = client.get(paths::POLICIES).await?;
            render(format, &list, |l| policies_table(l, width))
        }
        NodeCommand::Certs => {
            let list: Vec<CertInfo> = client.get(paths::CERTS).await?;
            render(format, &list, |l| certs_table(l, now, width))
        }
        NodeCommand::Connections => {
            let list: Vec<ConnectionInfo> = client.get(paths::CONNECTIONS).await?;
            render(format, &list, |l| connections_table(l, width))
        }
        NodeCommand::Bpf => {
            let info: BpfInfo = client.get(paths::BPF).await?;
            render(format, &info, |i| bpf_tables(i, width))
        }
        NodeCommand::LogLevel { filter } => {
            let level: LogLevel = match filter {
                None => client.get(paths::LOG_LEVEL).await?,
                Some(filter) => {
                    let body = LogLevel {
                        filter: filter.clone(),
                    };
                    client.put(paths::LOG_LEVEL, &body).await?
                }
            };
            render(format, &level, |l| format!("{}\n", l.filter))
        }
    }
}

/// The header said v1, so the body should too; a node that disagrees with itself is as
/// unusable as one of another version.
pub fn check_status_api(client: &Client, status: &Status) -> Result<(), Error> {
    if status.api == API_VERSION {
        return Ok(());
    }
    Err(Error::VersionMismatch {
        target: client.target().to_string(),
        node: status.api.to_string(),
        ours: API_VERSION,
    })
}

/// `key: value` lines, keys aligned.
fn key_values(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{:<w$}  {v}\n", format!("{k}:")))
        .collect()
}

pub fn status_lines(s: &Status) -> String {
    let mut pairs = vec![
        ("node", s.node.clone()),
        (
            "version",
            format!("mesh-node {} (admin API v{})", s.version, s.api),
        ),
        ("ready", yes_no(s.ready)),
    ];
    if !s.readiness.is_empty() {
        pairs.push(("readiness", s.readiness.clone()));
    }
    pairs.push(("controller", s.controller.clone()));
    let config = match (&s.config_version, s.config_age_seconds) {
        (Some(v), Some(age)) => format!("{v}, received {} ago", human::seconds(age)),
        (Some(v), None) => v.clone(),
        (None, _) => "none received yet".into(),
    };
    pairs.push(("config", config));
    if let Some(since) = &s.config_stale_since {
        let (when, _) = human::timestamp(since);
        pairs.push((
            "stale",
            format!("controller stream down since {when} UTC; serving the last config"),
        ));
    }
    pairs.push(("uptime", human::seconds(s.uptime_seconds)));
    pairs.push((
        "workloads",
        format!(
            "{} on this node, {} enrolled",
            s.workloads_local, s.workloads_enrolled
        ),
    ));
    pairs.push(("connections", format!("{} open", s.connections_open)));
    key_values(&pairs)
}

fn none_or(table: &Table, width: usize, what: &str) -> String {
    if table.is_empty() {
        format!("No {what}.\n")
    } else {
        table.render(width)
    }
}

/// The identity's account alone where its namespace is the pod's (the usual case).
fn account(w: &WorkloadInfo) -> String {
    let short = human::identity(&w.identity);
    match short.split_once('/') {
        Some((ns, sa)) if ns == w.namespace => sa.to_owned(),
        _ => short,
    }
}

/// `  subject: text` lines under a table, wrapped to `width` with the rest indented.
fn notes(title: &str, items: &[(String, String)], width: usize) -> String {
    if items.is_empty() {
        return String::new();
    }
    let mut out = format!("\n{title}:\n");
    for (subject, text) in items {
        let mut lines = wrap(&format!("{subject}: {text}"), width.saturating_sub(2)).into_iter();
        if let Some(first) = lines.next() {
            out.push_str(&format!("  {first}\n"));
        }
        for rest in lines.flat_map(|l| wrap(&l, width.saturating_sub(4))) {
            out.push_str(&format!("    {rest}\n"));
        }
    }
    out
}

/// Pods as `namespace/name`; ENROLLED is the mTLS mode of an enrolled pod, or `no`.
pub fn workloads_table(list: &[WorkloadInfo], width: usize) -> String {
    let mut t = Table::new(vec![
        Column::new("POD", Overflow::Cut),
        Column::new("ACCOUNT", Overflow::Cut),
        Column::new("IPS", Overflow::Keep),
        Column::new("ENROLLED", Overflow::Keep),
        Column::new("CAPTURED", Overflow::Keep),
    ]);
    let mut problems = Vec::new();
    for w in list {
        let pod = format!("{}/{}", w.namespace, w.name);
        let enrolled = if w.enrolled {
            w.mtls_mode.to_lowercase()
        } else {
            "no".into()
        };
        let captured = if w.enrolled || w.captured {
            yes_no(w.captured)
        } else {
            "-".into()
        };
        t.row(vec![
            pod.clone(),
            account(w),
            w.ips.join("\n"),
            enrolled,
            captured,
        ]);
        if let Some(problem) = &w.problem {
            problems.push((pod, problem.clone()));
        }
    }
    let mut out = none_or(&t, width, "workloads on this node");
    out.push_str(&notes("Problems", &problems, width));
    out
}

/// Services as `namespace/name`, then their addresses, ports and ready endpoints one per line.
pub fn services_table(list: &[ServiceInfo], width: usize) -> String {
    let mut t = Table::new(vec![
        Column::new("SERVICE", Overflow::Cut),
        Column::new("VIPS", Overflow::Keep),
        Column::new("PORTS", Overflow::Keep),
        Column::new("ENDPOINTS", Overflow::Keep),
    ]);
    for s in list {
        let mut endpoints: Vec<String> = s.endpoints.iter().take(MAX_ENDPOINTS).cloned().collect();
        if s.endpoints.len() > MAX_ENDPOINTS {
            endpoints.push(format!("+{} more", s.endpoints.len() - MAX_ENDPOINTS));
        }
        if endpoints.is_empty() {
            endpoints.push("none ready".into());
        }
        t.row(vec![
            format!("{}/{}", s.namespace, s.name),
            s.vips.join("\n"),
            s.ports.join("\n"),
            endpoints.join("\n"),
        ]);
    }
    none_or(&t, width, "services")
}

/// Every SPIFFE ID in a text shortened as [`human::identity`] does.
fn shorten_identities(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("spiffe://") {
        out.push_str(&rest[..at]);
        let id_len = rest[at..]
            .find(|c: char| c == ',' || c == ']' || c == ')' || c.is_whitespace())
            .unwrap_or(rest.len() - at);
        out.push_str(&human::identity(&rest[at..at + id_len]));
        rest = &rest[at + id_len..];
    }
    out.push_str(rest);
    out
}

/// Policies as `namespace/name`; selector terms and rules one per line.
pub fn policies_table(list: &[PolicyInfo], width: usize) -> String {
    let mut t = Table::new(vec![
        Column::new("POLICY", Overflow::Cut),
        Column::new("ACTION", Overflow::Keep),
        Column::new("SELECTOR", Overflow::Wrap),
        Column::new("RULES", Overflow::Wrap),
    ]);
    for p in list {
        let selector = if p.selector.is_empty() {
            "(all)".to_owned()
        } else {
            p.selector.replace(',', "\n")
        };
        let rules = if p.rules.is_empty() {
            "(none)".to_owned()
        } else {
            p.rules
                .iter()
                .map(|r| shorten_identities(r))
                .collect::<Vec<_>>()
                .join("\n")
        };
        t.row(vec![
            format!("{}/{}", p.namespace, p.name),
            p.action.clone(),
            selector,
            rules,
        ]);
    }
    none_or(&t, width, "policies")
}

pub fn certs_table(list: &[CertInfo], now: SystemTime, width: usize) -> String {
    let mut t = Table::new(vec![
        Column::new("IDENTITY", Overflow::Cut),
        Column::new("SERIAL", Overflow::Cut),
        Column::new("NOT-AFTER (UTC)", Overflow::Keep),
        Column::new("EXPIRES", Overflow::Keep),
    ]);
    for c in list {
        let (not_after, when) = human::timestamp(&c.not_after);
        let expires = when
            .map(|t| human::relative(t, now))
            .unwrap_or_else(|| "?".into());
        t.row(vec![
            human::identity(&c.identity),
            c.serial.clone(),
            not_after,
            expires,
        ]);
    }
    none_or(&t, width, "certificates")
}

/// One row per connection: each end's address with the identity behind it under it, the
/// service (if the destination was one) under the destination. SENT is what the source sent,
/// RECV what it got back.
pub fn connections_table(list: &[ConnectionInfo], width: usize) -> String {
    let mut t = Table::new(vec![
        Column::new("DIR", Overflow::Keep),
        Column::new("ROUTE", Overflow::Keep),
        Column::new("SOURCE", Overflow::Cut),
        Column::new("DESTINATION", Overflow::Cut),
        Column::number("SENT"),
        Column::number("RECV"),
        Column::number("AGE"),
    ]);
    for c in list {
        let dir = match c.direction.as_str() {
            "outbound" => "out".to_owned(),
            "inbound" => "in".to_owned(),
            other => other.to_owned(),
        };
        let mut source = vec![c.source.clone()];
        source.extend(c.source_identity.as_deref().map(human::identity));
        let mut destination = vec![c.destination.clone()];
        destination.extend(c.destination_identity.as_deref().map(human::identity));
        destination.extend(c.service.as_ref().map(|s| format!("svc {s}")));
        t.row(vec![
            dir,
            c.route.clone(),
            source.join("\n"),
            destination.join("\n"),
            human::bytes(c.bytes_sent),
            human::bytes(c.bytes_received),
            human::seconds(c.age_seconds),
        ]);
    }
    none_or(&t, width, "open connections")
}

pub fn bpf_tables(info: &BpfInfo, width: usize) -> String {
    let mut out = format!("pin dir: {}\nabi:     {}\n\n", info.pin_dir, info.abi);
    let id = |v: Option<u32>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
    let mut programs = Table::new(vec![
        Column::new("PROGRAM", Overflow::Cut),
        Column::new("ATTACH", Overflow::Keep),
        Column::new("TARGET", Overflow::Cut),
        Column::number("PROG-ID"),
        Column::number("LINK-ID"),
    ]);
    for p in &info.programs {
        programs.row(vec![
            p.name.clone(),
            p.attach.clone(),
            p.target.clone(),
            id(p.prog_id),
            id(p.link_id),
        ]);
    }
    out.push_str(&none_or(&programs, width, "programs attached"));
    let mut maps = Table::new(vec![
        Column::new("MAP", Overflow::Cut),
        Column::number("ENTRIES"),
        Column::number("MAX"),
        Column::number("FILL"),
    ]);
    for m in &info.maps {
        let (entries, fill) = match m.entries {
            Some(n) if m.max_entries > 0 => (
                n.to_string(),
                format!("{:.0}%", f64::from(n) * 100.0 / f64::from(m.max_entries)),
            ),
            Some(n) => (n.to_string(), "-".into()),
            None => ("-".into(), "-".into()),
        };
        maps.row(vec![m.name.clone(), entries, m.max_entries.to_string(), fill]);
    }
    out.push('\n');
    out.push_str(&none_or(&maps, width, "maps"));
    let mut counters = Table::new(vec![
        Column::new("COUNTER", Overflow::Cut),
        Column::number("VALUE"),
    ]);
    for (name, value) in &info.counters {
        counters.row(vec![name.clone(), value.to_string()]);
    }
    out.push('\n');
    out.push_str(&none_or(&counters, width, "counters"));
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde::de::DeserializeOwned;
    use serde::Serialize;

    use super::*;

    fn fixture<T: DeserializeOwned>(name: &str) -> T {
        let path = format!("{}/tests/fixtures/{name}.json", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap();
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// 2026-11-21 21:00 UTC, an hour after the fixtures' first certificate was issued.
    fn now() -> SystemTime {
        humantime::parse_rfc3339("2026-11-21T21:00:00Z").unwrap()
    }

    fn fits(text: &str, width: usize) {
        for line in text.lines() {
            assert!(
                line.chars().count() <= width,
                "wider than {width}: {line:?}\n{text}"
            );
        }
    }

    fn all_tables(width: usize) -> Vec<String> {
        vec![
            status_lines(&fixture("status")),
            workloads_table(&fixture::<Vec<_>>("workloads"), width),
            services_table(&fixture::<Vec<_>>("services"), width),
            policies_table(&fixture::<Vec<_>>("policies"), width),
            certs_table(&fixture::<Vec<_>>("certs"), now(), width),
            connections_table(&fixture::<Vec<_>>("connections"), width),
            bpf_tables(&fixture("bpf"), width),
        ]
    }

    #[test]
    fn every_table_fits_80_columns_with_long_names_and_identities() {
        for table in all_tables(80) {
            fits(&table, 80);
        }
    }

    #[test]
    fn workloads() {
        let out = workloads_table(&fixture::<Vec<_>>("workloads"), 80);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            "POD                 ACCOUNT              IPS                ENROLLED    CAPTURED"
        );
        assert_eq!(
            lines[1],
            "shop/web…6b5-x2x7q  web                  10.244.1.17        strict      yes"
        );
        // The second address of a dual-stack pod on its own line, never cut.
        assert_eq!(lines[2].trim(), "fd00:10:244:1::17");
        assert!(
            lines[3].contains("ledger-re…on-worker") && lines[3].ends_with("permissive  no"),
            "{out}"
        );
        assert!(lines[4].ends_with("10.244.1.2         no          -"), "{out}");
        assert!(
            out.ends_with(
                "\nProblems:\n  payments-processing-eu-west/ledger-reconciliation-worker-5f6d7c8b9a-qwert:\n    \
                 cgroup of pod 7a1b2c3d not found under /sys/fs/cgroup yet\n"
            ),
            "{out}"
        );
    }

    #[test]
    fn policies_shorten_identities_and_list_rules() {
        let out = policies_table(&fixture::<Vec<_>>("policies"), 80);
        assert!(
            out.contains("ALLOW   app=db         from principals [shop/api]\n"),
            "{out}"
        );
        assert!(out.contains("from principals [ci/runner,"), "{out}");
        assert!(!out.contains("spiffe://"), "{out}");
        assert!(out.contains("(all)") && out.contains("(none)"), "{out}");
        assert_eq!(
            shorten_identities("from principals [spiffe://td/ns/a/sa/b, spiffe://td/ns/c/sa/d]"),
            "from principals [a/b, c/d]"
        );
    }

    #[test]
    fn services_list_addresses_whole() {
        let out = services_table(&fixture::<Vec<_>>("services"), 80);
        for want in [
            "fd00:10:96::20",
            "15090→15090/TCP",
            "10.244.4.40",
            "+2 more",
            "none ready",
        ] {
            assert!(out.contains(want), "{want} missing from\n{out}");
        }
    }

    #[test]
    fn certs_show_identity_and_time_left() {
        let out = certs_table(&fixture::<Vec<_>>("certs"), now(), 80);
        assert!(out.contains("shop/web "), "{out}");
        assert!(out.contains("2026-11-22 20:00  in 23h"), "{out}");
        assert!(out.contains("2026-11-22 08:30  in 11h30m"), "{out}");
        assert!(!out.contains("spiffe://"), "{out}");
        let later = certs_table(
            &fixture::<Vec<_>>("certs"),
            now() + Duration::from_secs(86_400),
            80,
        );
        assert!(later.contains("1h ago"), "{later}");
    }

    #[test]
    fn connections_in_human_units() {
        let out = connections_table(&fixture::<Vec<_>>("connections"), 80);
        assert!(out.lines().next().unwrap().starts_with("DIR  ROUTE"), "{out}");
        let first: Vec<&str> = out.lines().skip(1).take(3).map(str::trim_end).collect();
        assert_eq!(
            first,
            [
                "out  hbone        10.244.1.17:41234   10.244.2.9:8080     1.5 KiB  20 MiB  3m12s",
                "                  shop/web            shop/api",
                "                                      svc shop/api",
            ],
            "{out}"
        );
        for want in ["700 MiB", "88 B", "1d2h", "passthrough", "93.184.215.14:443"] {
            assert!(out.contains(want), "{want} missing from\n{out}");
        }
    }

    #[test]
    fn bpf_maps_show_their_fill() {
        let out = bpf_tables(&fixture("bpf"), 80);
        assert!(out.starts_with("pin dir: /sys/fs/bpf/mesh\n"), "{out}");
        let original = out.lines().find(|l| l.starts_with("original_dst")).unwrap();
        assert!(original.ends_with("98304  131072   75%"), "{original:?}");
        let config = out.lines().find(|l| l.starts_with("config")).unwrap();
        assert!(config.ends_with("-       1     -"), "{config:?}");
        assert!(out.contains("strict_dropped"), "{out}");
    }

    #[test]
    fn status_is_aligned_key_values() {
        let out = status_lines(&fixture("status"));
        assert_eq!(
            out,
            "node:         node-a\n\
             version:      mesh-node 0.1.0 (admin API v1)\n\
             ready:        yes\n\
             controller:   mesh-controller.mesh-system.svc:15012\n\
             config:       5f3a9c1e/42, received 3m12s ago\n\
             uptime:       2h5m\n\
             workloads:    5 on this node, 4 enrolled\n\
             connections:  12 open\n"
        );
    }

    #[test]
    fn a_status_of_another_api_version_is_a_mismatch() {
        let client = Client::new(
            crate::client::Target::Tcp("127.0.0.1:15000".into()),
            Duration::from_secs(1),
            Duration::from_secs(1),
        );
        let mut status: Status = fixture("status");
        assert!(check_status_api(&client, &status).is_ok());
        status.api = 2;
        let e = check_status_api(&client, &status).unwrap_err();
        assert_eq!(e.exit_code(), crate::exit::VERSION_MISMATCH);
        assert!(
            e.to_string()
                .contains("speaks admin API v2, this meshctl speaks v1"),
            "{e}"
        );
    }

    #[test]
    fn empty_lists_say_so() {
        assert_eq!(connections_table(&[], 80), "No open connections.\n");
    }

    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(name: &str) {
        let value: T = fixture(name);
        let json = render(Format::Json, &value, |_| unreachable!()).unwrap();
        assert_eq!(serde_json::from_str::<T>(&json).unwrap(), value, "json of {name}");
        let yaml = render(Format::Yaml, &value, |_| unreachable!()).unwrap();
        assert_eq!(
            serde_norway::from_str::<T>(&yaml).unwrap(),
            value,
            "yaml of {name}:\n{yaml}"
        );
    }

    #[test]
    fn json_and_yaml_round_trip_every_admin_document() {
        round_trip::<Status>("status");
        round_trip::<Vec<WorkloadInfo>>("workloads");
        round_trip::<Vec<ServiceInfo>>("services");
        round_trip::<Vec<PolicyInfo>>("policies");
        round_trip::<Vec<CertInfo>>("certs");
        round_trip::<Vec<ConnectionInfo>>("connections");
        round_trip::<BpfInfo>("bpf");
        round_trip::<LogLevel>("log-level");
    }
}
