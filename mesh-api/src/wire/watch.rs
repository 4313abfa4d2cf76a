//! The NodeConfig.Watch stream messages to and from their protobuf form.

use std::collections::BTreeSet;

use super::{each, each_leaf, non_empty, required, WireError};
use crate::objects::NamespacedName;
use crate::pb;
use crate::view::{Delta, NodeMessage, NodeView, Removed, Update, UpdateKind, Version};

impl From<Version> for pb::Version {
    fn from(v: Version) -> Self {
        pb::Version {
            epoch: v.epoch,
            number: v.number,
        }
    }
}

impl TryFrom<pb::Version> for Version {
    type Error = WireError;

    fn try_from(v: pb::Version) -> Result<Self, WireError> {
        Ok(Version {
            epoch: non_empty("epoch", v.epoch)?,
            number: v.number,
        })
    }
}

fn required_version(field: &str, v: Option<pb::Version>) -> Result<Version, WireError> {
    Version::try_from(required(field, v)?).map_err(|e| e.within(field))
}

impl From<NodeView> for pb::Resources {
    fn from(view: NodeView) -> Self {
        pb::Resources {
            workloads: view.workloads.into_values().map(Into::into).collect(),
            services: view.services.into_values().map(Into::into).collect(),
            policies: view.policies.into_values().map(Into::into).collect(),
        }
    }
}

/// Rejects a list that names the same object twice: which copy wins would be arbitrary.
fn unique<K: Ord + std::fmt::Display>(field: &str, keys: impl Iterator<Item = K>) -> Result<(), WireError> {
    let mut seen = BTreeSet::new();
    for (i, key) in keys.enumerate() {
        if let Some(dup) = seen.replace(key) {
            return Err(WireError::new(
                &format!("{field}[{i}]"),
                format!("duplicate {dup}"),
            ));
        }
    }
    Ok(())
}

impl TryFrom<pb::Resources> for NodeView {
    type Error = WireError;

    fn try_from(r: pb::Resources) -> Result<Self, WireError> {
        let mut view = NodeView::default();
        let workloads = each("workloads", r.workloads, TryInto::try_into)?;
        unique(
            "workloads",
            workloads.iter().map(|w: &crate::Workload| w.uid.clone()),
        )?;
        workloads.into_iter().for_each(|w| view.insert_workload(w));
        let services = each("services", r.services, TryInto::try_into)?;
        unique("services", services.iter().map(crate::Service::key))?;
        services.into_iter().for_each(|s| view.insert_service(s));
        let policies = each("policies", r.policies, TryInto::try_into)?;
        unique("policies", policies.iter().map(crate::Policy::key))?;
        policies.into_iter().for_each(|p| view.insert_policy(p));
        Ok(view)
    }
}

impl From<Removed> for pb::Removed {
    fn from(r: Removed) -> Self {
        pb::Removed {
            workloads: r.workloads.into_iter().collect(),
            services: r.services.into_iter().map(Into::into).collect(),
            policies: r.policies.into_iter().map(Into::into).collect(),
        }
    }
}

impl TryFrom<pb::Removed> for Removed {
    type Error = WireError;

    fn try_from(r: pb::Removed) -> Result<Self, WireError> {
        let keys = |field, list| -> Result<BTreeSet<NamespacedName>, WireError> {
            Ok(each(field, list, NamespacedName::try_from)?.into_iter().collect())
        };
        Ok(Removed {
            workloads: each_leaf("workloads", r.workloads, non_empty)?
                .into_iter()
                .collect(),
            services: keys("services", r.services)?,
            policies: keys("policies", r.policies)?,
        })
    }
}

impl From<Update> for pb::WatchResponse {
    fn from(u: Update) -> Self {
        let kind = match u.kind {
            UpdateKind::Snapshot(view) => pb::watch_response::Kind::Snapshot(view.into()),
            UpdateKind::Delta { base, delta } => pb::watch_response::Kind::Delta(pb::Delta {
                base: Some(base.into()),
                upserted: Some(delta.upserted.into()),
                removed: Some(delta.removed.into()),
            }),
        };
        pb::WatchResponse {
            version: Some(u.version.into()),
            kind: Some(kind),
        }
    }
}

impl TryFrom<pb::WatchResponse> for Update {
    type Error = WireError;

    fn try_from(r: pb::WatchResponse) -> Result<Self, WireError> {
        let version = required_version("version", r.version)?;
        let kind = match required("kind", r.kind)? {
            pb::watch_response::Kind::Snapshot(resources) => {
                UpdateKind::Snapshot(NodeView::try_from(resources).map_err(|e| e.within("snapshot"))?)
            }
            pb::watch_response::Kind::Delta(d) => {
                let in_delta = |e: WireError| e.within("delta");
                UpdateKind::Delta {
                    base: required_version("base", d.base).map_err(in_delta)?,
                    delta: Delta {
                        upserted: NodeView::try_from(d.upserted.unwrap_or_default())
                            .map_err(|e| in_delta(e.within("upserted")))?,
                        removed: Removed::try_from(d.removed.unwrap_or_default())
                            .map_err(|e| in_delta(e.within("removed")))?,
                    },
                }
            }
        };
        Ok(Update { version, kind })
    }
}

impl From<NodeMessage> for pb::WatchRequest {
    fn from(m: NodeMessage) -> Self {
        use pb::watch_request::Kind;
        let kind = match m {
            NodeMessage::Hello { node, last_applied } => Kind::Hello(pb::Hello {
                node,
                last_applied: last_applied.map(Into::into),
            }),
            NodeMessage::Ack(v) => Kind::Ack(pb::Ack {
                version: Some(v.into()),
            }),
            NodeMessage::Nack { version, reason } => Kind::Nack(pb::Nack {
                version: Some(version.into()),
                reason,
            }),
        };
        pb::WatchRequest { kind: Some(kind) }
    }
}

impl TryFrom<pb::WatchRequest> for NodeMessage {
    type Error = WireError;

    fn try_from(r: pb::WatchRequest) -> Result<Self, WireError> {
        use pb::watch_request::Kind;
        Ok(match required("kind", r.kind)? {
            Kind::Hello(h) => NodeMessage::Hello {
                node: non_empty("node", h.node).map_err(|e| e.within("hello"))?,
                last_applied: h
                    .last_applied
                    .map(|v| Version::try_from(v).map_err(|e| e.within("hello.last_applied")))
                    .transpose()?,
            },
            Kind::Ack(a) => {
                NodeMessage::Ack(required_version("version", a.version).map_err(|e| e.within("ack"))?)
            }
            Kind::Nack(n) => NodeMessage::Nack {
                version: required_version("version", n.version).map_err(|e| e.within("nack"))?,
                reason: n.reason,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{policy, service, workload};

    fn v(number: u64) -> Version {
        Version {
            epoch: "e1".into(),
            number,
        }
    }

    fn view() -> NodeView {
        let mut view = NodeView::default();
        view.insert_workload(workload("uid-1", "node-a"));
        view.insert_workload(workload("uid-2", "node-b"));
        view.insert_service(service());
        view.insert_policy(policy());
        view
    }

    #[test]
    fn updates_round_trip() {
        let snapshot = Update {
            version: v(3),
            kind: UpdateKind::Snapshot(view()),
        };
        let mut delta = Delta {
            upserted: view(),
            ..Delta::default()
        };
        delta.removed.workloads.insert("uid-9".into());
        delta.removed.services.insert(NamespacedName::new("shop", "old"));
        delta.removed.policies.insert(NamespacedName::new("shop", "gone"));
        let delta = Update {
            version: v(4),
            kind: UpdateKind::Delta { base: v(3), delta },
        };
        for update in [snapshot, delta] {
            assert_eq!(
                Update::try_from(pb::WatchResponse::from(update.clone())),
                Ok(update)
            );
        }
    }

    #[test]
    fn node_messages_round_trip() {
        for m in [
            NodeMessage::Hello {
                node: "n".into(),
                last_applied: None,
            },
            NodeMessage::Hello {
                node: "n".into(),
                last_applied: Some(v(7)),
            },
            NodeMessage::Ack(v(8)),
            NodeMessage::Nack {
                version: v(9),
                reason: "bad ip".into(),
            },
        ] {
            assert_eq!(NodeMessage::try_from(pb::WatchRequest::from(m.clone())), Ok(m));
        }
    }

    fn snapshot(r: &mut pb::WatchResponse) -> &mut pb::Resources {
        match &mut r.kind {
            Some(pb::watch_response::Kind::Snapshot(s)) => s,
            _ => panic!("not a snapshot"),
        }
    }

    fn delta(r: &mut pb::WatchResponse) -> &mut pb::Delta {
        match &mut r.kind {
            Some(pb::watch_response::Kind::Delta(d)) => d,
            _ => panic!("not a delta"),
        }
    }

    #[test]
    fn invalid_updates_name_the_field() {
        type Spoil = fn(&mut pb::WatchResponse);
        let cases: [(bool, Spoil, &str); 7] = [
            (true, |r| r.version = None, "version"),
            (
                true,
                |r| r.version.as_mut().unwrap().epoch.clear(),
                "version.epoch",
            ),
            (true, |r| r.kind = None, "kind"),
            (
                true,
                |r| {
                    let s = snapshot(r);
                    s.workloads[1].uid = s.workloads[0].uid.clone();
                },
                "snapshot.workloads[1]",
            ),
            (
                true,
                |r| snapshot(r).services[0].ports[0].port = 0,
                "snapshot.services[0].ports[0].port",
            ),
            (false, |r| delta(r).base = None, "delta.base"),
            (
                false,
                |r| delta(r).removed.as_mut().unwrap().workloads.push(String::new()),
                "delta.removed.workloads[0]",
            ),
        ];
        for (is_snapshot, spoil, field) in cases {
            let kind = if is_snapshot {
                UpdateKind::Snapshot(view())
            } else {
                UpdateKind::Delta {
                    base: v(1),
                    delta: Delta::default(),
                }
            };
            let mut wire = pb::WatchResponse::from(Update { version: v(2), kind });
            spoil(&mut wire);
            assert_eq!(Update::try_from(wire).unwrap_err().field(), field);
        }
    }

    #[test]
    fn invalid_node_messages_name_the_field() {
        let cases = [
            (pb::WatchRequest { kind: None }, "kind"),
            (
                NodeMessage::Hello {
                    node: String::new(),
                    last_applied: None,
                }
                .into(),
                "hello.node",
            ),
            (
                pb::WatchRequest {
                    kind: Some(pb::watch_request::Kind::Ack(pb::Ack { version: None })),
                },
                "ack.version",
            ),
            (
                NodeMessage::Nack {
                    version: Version {
                        epoch: String::new(),
                        number: 1,
                    },
                    reason: "x".into(),
                }
                .into(),
                "nack.version.epoch",
            ),
        ];
        for (wire, field) in cases {
            assert_eq!(NodeMessage::try_from(wire).unwrap_err().field(), field);
        }
    }
}
