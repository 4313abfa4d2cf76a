//! From samples to the verdict: medians with min–max per path, ratios mesh/direct and
//! mesh/peer, the targets, rendered as a Markdown table and as JSON.
use std::collections::BTreeMap;

use serde::Serialize;

/// The paths a figure is measured on, in the order each round visits them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PathKind {
    Direct,
    Mesh,
    Peer,
}

/// What a figure must show for the mesh, judged on medians.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// mesh ≥ ratio × direct.
    RatioToDirectAtLeast { ratio: f64 },
    /// mesh − direct ≤ limit (in the figure's unit).
    AddedOverDirectAtMost { limit: f64 },
    /// mesh ≤ limit.
    AtMost { limit: f64 },
}

impl Target {
    fn describe(&self, unit: &str) -> String {
        match self {
            Target::RatioToDirectAtLeast { ratio } => format!("≥ {ratio}× direct"),
            Target::AddedOverDirectAtMost { limit } => format!("≤ +{limit} {unit} over direct"),
            Target::AtMost { limit } => format!("≤ {limit} {unit}"),
        }
    }

    fn met(&self, mesh: f64, direct: Option<f64>) -> Option<bool> {
        match *self {
            Target::RatioToDirectAtLeast { ratio } => direct.map(|d| mesh >= ratio * d),
            Target::AddedOverDirectAtMost { limit } => direct.map(|d| mesh - d <= limit),
            Target::AtMost { limit } => Some(mesh <= limit),
        }
    }
}

/// One row of the table.
#[derive(Clone, Copy, Debug)]
pub struct Metric {
    pub id: &'static str,
    pub label: &'static str,
    pub unit: &'static str,
    pub target: Option<Target>,
}

/// Median and range of one metric on one path.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: Vec<f64>,
}

impl Summary {
    /// `None` for no samples.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = match n {
            0 => return None,
            _ if n % 2 == 1 => sorted[n / 2],
            _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        };
        Some(Summary {
            median,
            min: sorted[0],
            max: sorted[n - 1],
            samples: samples.to_vec(),
        })
    }
}

/// Samples by metric id and path, in the order they were taken.
#[derive(Default, Debug)]
pub struct Samples(BTreeMap<&'static str, BTreeMap<PathKind, Vec<f64>>>);

impl Samples {
    pub fn add(&mut self, metric: &'static str, path: PathKind, value: f64) {
        self.0
            .entry(metric)
            .or_default()
            .entry(path)
            .or_default()
            .push(value);
    }
}

/// A metric's figures on every path, its ratios and its verdict.
#[derive(Debug, Serialize)]
pub struct Row {
    pub id: &'static str,
    pub label: &'static str,
    pub unit: &'static str,
    pub paths: BTreeMap<PathKind, Summary>,
    pub mesh_over_direct: Option<f64>,
    pub mesh_over_peer: Option<f64>,
    pub target: Option<Target>,
    /// `Some(true)` met, `Some(false)` missed, `None` nothing to judge.
    pub met: Option<bool>,
}

pub fn rows(metrics: &[Metric], samples: &Samples) -> Vec<Row> {
    metrics
        .iter()
        .filter_map(|m| {
            let by_path = samples.0.get(m.id)?;
            let paths: BTreeMap<PathKind, Summary> = by_path
                .iter()
                .filter_map(|(p, v)| Some((*p, Summary::of(v)?)))
                .collect();
            let median = |p| paths.get(&p).map(|s: &Summary| s.median);
            let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) if b != 0.0 => Some(a / b),
                _ => None,
            };
            let (direct, mesh, peer) = (
                median(PathKind::Direct),
                median(PathKind::Mesh),
                median(PathKind::Peer),
            );
            Some(Row {
                id: m.id,
                label: m.label,
                unit: m.unit,
                mesh_over_direct: ratio(mesh, direct),
                mesh_over_peer: ratio(mesh, peer),
                met: m.target.zip(mesh).and_then(|(t, mesh)| t.met(mesh, direct)),
                target: m.target,
                paths,
            })
        })
        .collect()
}

/// The Markdown table: one row per metric, a column per path, ratios and targets.
pub fn markdown(rows: &[Row], peer_name: Option<&str>) -> String {
    let mut head = vec!["figure".to_owned(), "direct".to_owned(), "mesh".to_owned()];
    if let Some(peer) = peer_name {
        head.push(peer.to_owned());
    }
    head.push("mesh/direct".to_owned());
    if let Some(peer) = peer_name {
        head.push(format!("mesh/{peer}"));
    }
    head.extend(["target".to_owned(), "result".to_owned()]);
    let mut out = table_row(&head);
    out.push_str(&table_row(
        &head.iter().map(|_| "---".to_owned()).collect::<Vec<_>>(),
    ));
    for row in rows {
        let cell = |p: PathKind| row.paths.get(&p).map_or("—".to_owned(), cell_text);
        let mut cells = vec![
            format!("{} ({})", row.label, row.unit),
            cell(PathKind::Direct),
            cell(PathKind::Mesh),
        ];
        if peer_name.is_some() {
            cells.push(cell(PathKind::Peer));
        }
        cells.push(ratio_text(row.mesh_over_direct));
        if peer_name.is_some() {
            cells.push(ratio_text(row.mesh_over_peer));
        }
        cells.push(row.target.map_or(String::new(), |t| t.describe(row.unit)));
        cells.push(
            match row.met {
                Some(true) => "pass",
                Some(false) => "MISS",
                None => "",
            }
            .to_owned(),
        );
        out.push_str(&table_row(&cells));
    }
    out
}

fn table_row(cells: &[String]) -> String {
    format!("| {} |\n", cells.join(" | "))
}

fn cell_text(s: &Summary) -> String {
    if s.samples.len() == 1 {
        fmt(s.median)
    } else {
        format!("{} ({}–{})", fmt(s.median), fmt(s.min), fmt(s.max))
    }
}

fn ratio_text(r: Option<f64>) -> String {
    r.map_or("—".to_owned(), |r| format!("{}×", fmt(r)))
}

/// Three significant digits or so, without a pointless fraction on big numbers.
fn fmt(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RPS: Metric = Metric {
        id: "rps",
        label: "64 conns",
        unit: "req/s",
        target: Some(Target::RatioToDirectAtLeast { ratio: 0.57 }),
    };
    const P50: Metric = Metric {
        id: "p50",
        label: "p50 at 1000 req/s",
        unit: "µs",
        target: Some(Target::AddedOverDirectAtMost { limit: 60.0 }),
    };
    const RSS: Metric = Metric {
        id: "rss",
        label: "idle RSS",
        unit: "MiB",
        target: Some(Target::AtMost { limit: 10.0 }),
    };

    #[test]
    fn median_and_range() {
        let s = Summary::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(s.samples, vec![3.0, 1.0, 2.0]);
        assert_eq!(Summary::of(&[4.0, 1.0, 3.0, 2.0]).unwrap().median, 2.5);
        assert_eq!(Summary::of(&[]), None);
    }

    #[test]
    fn ratios_and_verdicts_from_medians() {
        let mut s = Samples::default();
        for (d, m, p) in [(100.0, 50.0, 40.0), (110.0, 60.0, 50.0), (90.0, 70.0, 45.0)] {
            s.add("rps", PathKind::Direct, d);
            s.add("rps", PathKind::Mesh, m);
            s.add("rps", PathKind::Peer, p);
        }
        for (d, m) in [(40.0, 90.0), (42.0, 95.0)] {
            s.add("p50", PathKind::Direct, d);
            s.add("p50", PathKind::Mesh, m);
        }
        s.add("rss", PathKind::Mesh, 8.0);
        let rows = rows(&[RPS, P50, RSS], &s);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].mesh_over_direct, Some(0.6));
        assert_eq!(rows[0].mesh_over_peer, Some(60.0 / 45.0));
        assert_eq!(rows[0].met, Some(true));
        // p50: mesh 92.5 − direct 41 = 51.5 ≤ 60.
        assert_eq!(rows[1].met, Some(true));
        assert_eq!(rows[1].mesh_over_peer, None);
        assert_eq!(rows[2].met, Some(true));
        assert_eq!(rows[2].mesh_over_direct, None);
    }

    #[test]
    fn misses_are_reported_and_missing_metrics_skipped() {
        let mut s = Samples::default();
        s.add("rps", PathKind::Direct, 100.0);
        s.add("rps", PathKind::Mesh, 50.0);
        s.add("rss", PathKind::Mesh, 12.5);
        let rows = rows(&[RPS, P50, RSS], &s);
        assert_eq!(rows.iter().map(|r| r.id).collect::<Vec<_>>(), ["rps", "rss"]);
        assert_eq!(rows[0].met, Some(false));
        assert_eq!(rows[1].met, Some(false));
    }

    #[test]
    fn markdown_table() {
        let mut s = Samples::default();
        for (d, m) in [(1000.0, 600.0), (1200.0, 700.0), (1100.0, 650.0)] {
            s.add("rps", PathKind::Direct, d);
            s.add("rps", PathKind::Mesh, m);
        }
        s.add("rss", PathKind::Mesh, 7.25);
        let table = markdown(&rows(&[RPS, RSS], &s), None);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "| figure | direct | mesh | mesh/direct | target | result |"
        );
        assert_eq!(lines[1], "| --- | --- | --- | --- | --- | --- |");
        assert_eq!(
            lines[2],
            "| 64 conns (req/s) | 1100 (1000–1200) | 650 (600–700) | 0.59× | ≥ 0.57× direct | pass |"
        );
        assert_eq!(lines[3], "| idle RSS (MiB) | — | 7.25 | — | ≤ 10 MiB | pass |");
        let with_peer = markdown(&rows(&[RPS], &s), Some("socat"));
        assert!(with_peer.starts_with("| figure | direct | mesh | socat | mesh/direct | mesh/socat |"));
    }

    #[test]
    fn json_names_paths_and_targets() {
        let mut s = Samples::default();
        s.add("rss", PathKind::Mesh, 7.0);
        let json = serde_json::to_value(rows(&[RSS], &s)).unwrap();
        assert_eq!(json[0]["paths"]["mesh"]["median"], 7.0);
        assert_eq!(json[0]["target"]["kind"], "at_most");
        assert_eq!(json[0]["met"], true);
    }
}
