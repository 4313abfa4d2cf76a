//! A real Prometheus scraping a real node agent, and the Grafana dashboard in
//! `daemonset/grafana/` checked against the agreed metric names and against Prometheus's own
//! PromQL parser.
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use mesh_harness::agent::Agent;
use mesh_harness::app::{client, echo_server};
use mesh_harness::controller::{namespace_yaml, pod_yaml, service_yaml, Controller};
use mesh_harness::prometheus::{Prometheus, PromqlError, Sample, ScrapeTarget};
use mesh_harness::{wait_until, Cluster};

const WAIT: Duration = Duration::from_secs(20);
/// The Service in front of the pod outside the mesh.
const OUTSIDER_VIP: &str = "10.96.0.60";
const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../daemonset/grafana/mesh-golden-signals.json"
);

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn prometheus_scrapes_a_node_and_counts_its_connections_by_route() -> Result<()> {
    let cluster = Cluster::new("prom-scrape")?;
    let node = cluster.add_node("a")?;
    let client_pod = cluster.add_pod("a", "client")?;
    let server = cluster.add_pod("a", "server")?;
    let outsider = cluster.add_pod("a", "outsider")?;
    let controller = Controller::start(&cluster, &[])?;
    let mut agent = Agent::new(&node, &controller, &[])?;
    agent.start(&cluster)?;
    let mut shop = namespace_yaml("shop", &[("mesh.dev/enroll", "true")]);
    for pod in [&client_pod, &server] {
        shop.push_str("---\n");
        shop.push_str(&pod_yaml(pod, "shop", &pod.name, &[("app", &pod.name)]));
    }
    controller.apply("shop", &shop)?;
    // The outsider is reached through its Service: the mesh captures only what it serves.
    controller.apply(
        "plain",
        &format!(
            "{}---\n{}---\n{}",
            namespace_yaml("plain", &[]),
            pod_yaml(&outsider, "plain", "default", &[("app", "outsider")]),
            service_yaml("outsider", "plain", OUTSIDER_VIP, 80, 8080, "outsider")
        ),
    )?;
    let _server = echo_server(&cluster, &server, &[8080])?;
    let _outsider = echo_server(&cluster, &outsider, &[8080])?;

    let prom = Prometheus::start(
        &cluster,
        &[ScrapeTarget::mesh_node(&node)],
        Duration::from_millis(200),
    )?;
    let instance = format!("{}:15020", node.ipv4);
    let target = labels(&[("instance", &instance), ("job", "mesh-node"), ("node", "a")]);
    let targets = prom.wait_targets_up(WAIT)?;
    ensure!(
        targets.len() == 1 && targets[0].scrape_pool == "mesh-node" && targets[0].labels == target,
        "the one target, labelled: {targets:?}"
    );
    let up = prom.query(r#"up{job="mesh-node"}"#)?;
    let mut want = target.clone();
    want.insert("__name__".into(), "up".into());
    ensure!(
        up == [Sample {
            labels: want,
            value: 1.0
        }],
        "up: {up:?}"
    );

    // Same node and enrolled: served in the proxy. A Service whose endpoint is not enrolled:
    // passed through as plain TCP.
    const CONNECTIONS: f64 = 3.0;
    let mut local_connections = 0.0;
    for (route, dst) in [
        ("local", SocketAddr::new(server.ipv4.into(), 8080)),
        ("passthrough", SocketAddr::new(OUTSIDER_VIP.parse()?, 80)),
    ] {
        let sample = format!(r#"mesh_outbound_connections_total{{route="{route}"}}"#);
        // The first connection the proxy routes this way: config and capture are in place.
        wait_until(WAIT, &format!("a {route} connection to {dst}"), || {
            client(&cluster, &client_pod, dst, 1024).map_err(|e| format!("{e:#}"))?;
            let n = agent.metric(&cluster, &sample).map_err(|e| format!("{e:#}"))?;
            if n >= 1.0 {
                Ok(())
            } else {
                Err(format!("{sample} = {n}"))
            }
        })?;
        let before = agent.metric(&cluster, &sample)?;
        for _ in 0..CONNECTIONS as usize {
            client(&cluster, &client_pod, dst, 1024)?;
        }
        let count = before + CONNECTIONS;
        if route == "local" {
            local_connections = count;
        }
        let at_agent = agent.metric(&cluster, &sample)?;
        ensure!(
            at_agent == count,
            "the agent counted {at_agent} {route} connections, want {count}"
        );
        let query = format!(r#"mesh_outbound_connections_total{{job="mesh-node", route="{route}"}}"#);
        let seen = prom.wait_for(&query, |s| s.first().is_some_and(|s| s.value == count), WAIT)?;
        let mut want = target.clone();
        want.insert("__name__".into(), "mesh_outbound_connections_total".into());
        want.insert("route".into(), route.into());
        ensure!(
            seen == [Sample {
                labels: want,
                value: count
            }],
            "{query}: {seen:?}"
        );
    }
    // The golden-signal query: connections between two workloads, as each proxy reports them.
    // Every local connection is one closed connection client → server for both reporters.
    let query = r#"sum by (reporter, source_workload, destination_workload, destination_principal, response_flags) (mesh_tcp_connections_closed_total{job="mesh-node", source_workload="client", destination_workload="server"})"#;
    let seen = prom.wait_for(
        query,
        |s| s.len() == 2 && s.iter().all(|s| s.value == local_connections),
        WAIT,
    )?;
    for reporter in ["source", "destination"] {
        let want = labels(&[
            ("reporter", reporter),
            ("source_workload", "client"),
            ("destination_workload", "server"),
            (
                "destination_principal",
                "spiffe://cluster.local/ns/shop/sa/server",
            ),
            ("response_flags", "-"),
        ]);
        ensure!(
            seen.iter().any(|s| s.labels == want),
            "{reporter} reports client → server: {seen:?}"
        );
    }
    let bytes = prom.query(
        r#"sum(mesh_tcp_received_bytes_total{reporter="source", source_workload="client", destination_workload="server"})"#,
    )?;
    ensure!(
        bytes
            .first()
            .is_some_and(|s| s.value == 1024.0 * local_connections),
        "1 KiB per connection: {bytes:?}"
    );
    let by_route = prom.query(r#"sum by (route) (mesh_outbound_connections_total{job="mesh-node"})"#)?;
    let routes: BTreeSet<&str> = by_route.iter().map(|s| s.labels["route"].as_str()).collect();
    ensure!(
        routes.is_superset(&BTreeSet::from(["local", "passthrough"])),
        "an aggregation by route: {by_route:?}"
    );
    Ok(())
}

/// The labels of the per-connection metrics.
const WORKLOAD_LABELS: &[&str] = &[
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_service",
    "response_flags",
];

/// The agreed metrics of the node agent: name, kind, labels.
const AGREED: &[(&str, &str, &[&str])] = &[
    ("mesh_tcp_connections_opened_total", "counter", WORKLOAD_LABELS),
    ("mesh_tcp_connections_closed_total", "counter", WORKLOAD_LABELS),
    ("mesh_tcp_sent_bytes_total", "counter", WORKLOAD_LABELS),
    ("mesh_tcp_received_bytes_total", "counter", WORKLOAD_LABELS),
    (
        "mesh_tcp_connection_duration_seconds",
        "histogram",
        WORKLOAD_LABELS,
    ),
    (
        "mesh_hbone_handshake_duration_seconds",
        "histogram",
        &["direction"],
    ),
    (
        "mesh_hbone_handshake_failures_total",
        "counter",
        &["direction", "reason"],
    ),
    ("mesh_policy_denials_total", "counter", &["policy"]),
    (
        "mesh_certificate_expiration_timestamp_seconds",
        "gauge",
        &["identity"],
    ),
    ("mesh_pool_connections", "gauge", &[]),
    ("mesh_pool_streams", "gauge", &[]),
    ("mesh_bpf_events_total", "counter", &["event"]),
    ("mesh_build_info", "gauge", &["version"]),
    ("process_cpu_seconds_total", "counter", &[]),
    ("process_resident_memory_bytes", "gauge", &[]),
    ("process_open_fds", "gauge", &[]),
];

/// Every series name a query may select, with the labels it carries (the target's own
/// `job` and `instance` included).
fn selectable() -> BTreeMap<String, BTreeSet<&'static str>> {
    let mut out = BTreeMap::new();
    for (name, kind, labels) in AGREED {
        let mut labels: BTreeSet<&str> = labels.iter().copied().collect();
        labels.extend(["job", "instance"]);
        if *kind == "histogram" {
            out.insert(format!("{name}_sum"), labels.clone());
            out.insert(format!("{name}_count"), labels.clone());
            labels.insert("le");
            out.insert(format!("{name}_bucket"), labels);
        } else {
            out.insert(name.to_string(), labels);
        }
    }
    out
}

/// What a PromQL expression names: the series it selects (with the labels its matchers use)
/// and the labels of its `by`/`without`/`on`/`ignoring`/`group_*` clauses.
#[derive(Debug, Default, PartialEq)]
struct Names {
    selectors: Vec<(String, Vec<String>)>,
    grouping: Vec<String>,
}

const GROUPING: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];
const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset"];

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c == b':'
}

fn is_ident(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit()
}

/// A small PromQL scanner, enough to name what an expression uses; Prometheus itself judges
/// the syntax (see the test that runs every expression).
fn names(expr: &str) -> Result<Names> {
    let b = expr.as_bytes();
    let mut out = Names::default();
    let mut i = 0;
    let mut after_metric = false;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c == b'"' || c == b'\'' || c == b'`' {
            i = skip_string(b, i).with_context(|| format!("unterminated string in {expr}"))?;
            after_metric = false;
        } else if c == b'[' {
            i += expr[i..]
                .find(']')
                .with_context(|| format!("unclosed [ in {expr}"))?
                + 1;
        } else if c == b'{' {
            let Some((_, matchers)) = out.selectors.last_mut().filter(|_| after_metric) else {
                bail!("a selector without a metric name in {expr}");
            };
            i += 1;
            loop {
                i = skip_space(b, i);
                match b.get(i) {
                    None => bail!("unclosed {{ in {expr}"),
                    Some(b'}') => break,
                    Some(b'"' | b'\'' | b'`') => {
                        i = skip_string(b, i).with_context(|| format!("unterminated string in {expr}"))?
                    }
                    Some(c) if is_ident_start(*c) => matchers.push(word(expr, &mut i).to_string()),
                    Some(_) => i += 1,
                }
            }
            i += 1;
            after_metric = false;
        } else if c.is_ascii_digit() || c == b'.' {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                i += 1;
            }
            after_metric = false;
        } else if is_ident_start(c) {
            let w = word(expr, &mut i);
            let j = skip_space(b, i);
            let mut k = j;
            // `f(…)`, or an aggregation written `sum by (…) (…)`.
            let call = b.get(j) == Some(&b'(') || ["by", "without"].contains(&word(expr, &mut k));
            after_metric = false;
            if GROUPING.contains(&w) {
                if call {
                    let end = j + expr[j..]
                        .find(')')
                        .with_context(|| format!("unclosed ( in {expr}"))?;
                    out.grouping.extend(
                        expr[j + 1..end]
                            .split(',')
                            .map(str::trim)
                            .filter(|l| !l.is_empty())
                            .map(str::to_string),
                    );
                    i = end + 1;
                }
            } else if !KEYWORDS.contains(&w) && !call {
                out.selectors.push((w.to_string(), Vec::new()));
                after_metric = true;
            }
        } else {
            i += 1;
            after_metric = false;
        }
    }
    Ok(out)
}

/// The identifier at `*i`, moving `*i` past it.
fn word<'a>(expr: &'a str, i: &mut usize) -> &'a str {
    let start = *i;
    while *i < expr.len() && is_ident(expr.as_bytes()[*i]) {
        *i += 1;
    }
    &expr[start..*i]
}

/// The index of the first non-space at or after `i`.
fn skip_space(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// The index just past the string literal starting at `start`.
fn skip_string(b: &[u8], start: usize) -> Option<usize> {
    let quote = b[start];
    let mut i = start + 1;
    while i < b.len() {
        match b[i] {
            b'\\' if quote != b'`' => i += 2,
            c if c == quote => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

fn dashboard() -> Result<Value> {
    let text = std::fs::read_to_string(DASHBOARD).with_context(|| format!("reading {DASHBOARD}"))?;
    serde_json::from_str(&text).with_context(|| format!("{DASHBOARD} is not JSON"))
}

/// (where, PromQL) for every panel target and every `label_values(selector, label)` variable
/// query; the variables' labels are returned as a `by` clause, so they are checked too.
fn dashboard_queries(d: &Value) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let top = d["panels"].as_array().context("no panels")?;
    // A collapsed row holds its panels inside it.
    let nested = top.iter().filter_map(|p| p["panels"].as_array()).flatten();
    for panel in top.iter().chain(nested) {
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        ensure!(
            panel["datasource"]["uid"] == "${datasource}",
            "panel {title:?} uses the datasource variable: {}",
            panel["datasource"]
        );
        let targets = panel["targets"]
            .as_array()
            .filter(|t| !t.is_empty())
            .with_context(|| format!("panel {title:?} has no targets"))?;
        for t in targets {
            ensure!(
                t["datasource"]["uid"] == "${datasource}",
                "a target of {title:?} uses the datasource variable: {}",
                t["datasource"]
            );
            let expr = t["expr"]
                .as_str()
                .filter(|e| !e.trim().is_empty())
                .with_context(|| format!("a target of panel {title:?} has no PromQL expr: {t}"))?;
            out.push((format!("panel {title:?}"), expr.to_string()));
        }
    }
    for var in d["templating"]["list"].as_array().context("no templating")? {
        if var["type"] != "query" {
            continue;
        }
        let name = var["name"].as_str().unwrap_or("(unnamed)");
        let query = var["query"].as_str().or(var["query"]["query"].as_str());
        let inner = query
            .and_then(|q| q.strip_prefix("label_values("))
            .and_then(|q| q.strip_suffix(')'))
            .and_then(|q| q.rsplit_once(','))
            .with_context(|| format!("variable {name}: label_values(selector, label), not {query:?}"))?;
        let (selector, label) = inner;
        out.push((
            format!("variable {name}"),
            format!("count by ({}) ({})", label.trim(), selector.trim()),
        ));
    }
    Ok(out)
}

/// `expr` as Grafana sends it: every dashboard variable as "all" (`.*`) and the rate window
/// chosen; fails if a variable is left that the dashboard does not define.
fn as_grafana_sends_it(d: &Value, expr: &str) -> Result<String> {
    let mut q = expr.replace("$__rate_interval", "1m");
    for var in d["templating"]["list"].as_array().into_iter().flatten() {
        if let Some(name) = var["name"].as_str() {
            q = q
                .replace(&format!("${{{name}}}"), ".*")
                .replace(&format!("${name}"), ".*");
        }
    }
    ensure!(!q.contains('$'), "an undefined variable in {expr}");
    Ok(q)
}

#[test]
fn the_dashboard_uses_only_the_agreed_metrics_and_their_labels() -> Result<()> {
    let d = dashboard()?;
    ensure!(
        d["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "a current schema"
    );
    let datasource = d["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == "datasource");
    ensure!(
        datasource.is_some_and(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
        "a prometheus datasource variable: {datasource:?}"
    );
    let selectable = selectable();
    let all_labels: BTreeSet<&str> = selectable.values().flatten().copied().collect();
    let mut used = BTreeSet::new();
    for (place, expr) in dashboard_queries(&d)? {
        let names = names(&expr).with_context(|| place.clone())?;
        ensure!(!names.selectors.is_empty(), "{place} selects no metric: {expr}");
        for (metric, matchers) in &names.selectors {
            let known = selectable
                .get(metric)
                .with_context(|| format!("{place}: {metric} is not an agreed metric"))?;
            for label in matchers {
                ensure!(
                    known.contains(label.as_str()),
                    "{place}: {metric} has no label {label}"
                );
            }
            used.insert(metric.clone());
        }
        for label in &names.grouping {
            ensure!(
                all_labels.contains(label.as_str()),
                "{place}: no agreed metric has label {label}"
            );
        }
    }
    println!("the dashboard uses {} series names: {used:?}", used.len());
    Ok(())
}

#[test]
fn the_promql_scanner_finds_selectors_and_grouping_labels() -> Result<()> {
    let n = names(
        r#"histogram_quantile(0.99, sum by (le, a) (rate(x_bucket{a=~"$v", b!="}"}[$__rate_interval]))) - on (c) group_left (d) y and z offset 5m"#,
    )?;
    ensure!(
        n == Names {
            selectors: vec![
                ("x_bucket".into(), vec!["a".into(), "b".into()]),
                ("y".into(), vec![]),
                ("z".into(), vec![]),
            ],
            grouping: vec!["le".into(), "a".into(), "c".into(), "d".into()],
        },
        "{n:?}"
    );
    ensure!(
        names(r#"{a="b"}"#).is_err(),
        "a selector needs a metric name here"
    );
    Ok(())
}

#[test]
fn every_dashboard_expression_parses_in_prometheus() -> Result<()> {
    let d = dashboard()?;
    let cluster = Cluster::new("prom-dashboard")?;
    let prom = Prometheus::start(&cluster, &[], Duration::from_secs(1))?;
    let queries = dashboard_queries(&d)?;
    for (place, expr) in &queries {
        let q = as_grafana_sends_it(&d, expr)?;
        prom.query(&q).with_context(|| format!("{place}: {q}"))?;
    }
    // And a typo is caught, in Prometheus's words.
    let err = match prom.query("sum(rate(mesh_tcp_connections_opened_total[1m])") {
        Ok(samples) => bail!("an unclosed parenthesis parsed: {samples:?}"),
        Err(e) => e,
    };
    let promql = err
        .downcast_ref::<PromqlError>()
        .with_context(|| format!("not Prometheus's refusal: {err:#}"))?;
    ensure!(
        promql.error_type == "bad_data" && promql.message.contains("unclosed left parenthesis"),
        "{promql}"
    );
    println!("{} dashboard queries parse", queries.len());
    Ok(())
}
