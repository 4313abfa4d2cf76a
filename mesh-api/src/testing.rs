//! Sample objects for the unit tests.

use std::collections::BTreeMap;

use crate::objects::*;

pub fn workload(uid: &str, node: &str) -> Workload {
    Workload {
        uid: uid.into(),
        name: format!("web-{uid}"),
        namespace: "shop".into(),
        node: node.into(),
        service_account: "web".into(),
        identity: "spiffe://cluster.local/ns/shop/sa/web".parse().unwrap(),
        ips: vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
        enrolled: true,
        mtls_mode: MtlsMode::Strict,
        labels: BTreeMap::from([("app".into(), "web".into())]),
    }
}

pub fn service() -> Service {
    Service {
        namespace: "shop".into(),
        name: "web".into(),
        vips: vec!["10.96.0.20".parse().unwrap()],
        ports: vec![ServicePort {
            port: 80,
            target_port: 8080,
            protocol: Protocol::Tcp,
        }],
        endpoints: vec![
            Endpoint {
                workload_uid: Some("uid-1".into()),
                ip: "10.0.0.5".parse().unwrap(),
                port: 8080,
                ready: true,
            },
            Endpoint {
                workload_uid: None,
                ip: "10.0.9.9".parse().unwrap(),
                port: 8080,
                ready: false,
            },
        ],
    }
}

pub fn policy() -> Policy {
    Policy {
        namespace: "shop".into(),
        name: "allow-cart".into(),
        selector: BTreeMap::from([("app".into(), "web".into())]),
        action: Action::Allow,
        rules: vec![Rule {
            from: vec![Source {
                principals: vec!["spiffe://cluster.local/ns/shop/sa/cart".parse().unwrap()],
                namespaces: vec!["shop".into()],
            }],
            to: vec![Operation { ports: vec![8080] }],
        }],
    }
}
