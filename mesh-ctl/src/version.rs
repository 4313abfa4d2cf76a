//! `meshctl version`: meshctl's own version, then the node's (which fails like any node
//! command when the node cannot be asked, so a script learns that they do not match).

use mesh_api::admin::{paths, Status, API_VERSION};
use serde::Serialize;

use crate::client::Client;
use crate::error::Error;
use crate::node::check_status_api;
use crate::output::{print, render, Format};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Versions {
    pub meshctl: String,
    pub api: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeVersion>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeVersion {
    pub address: String,
    pub name: String,
    pub version: String,
    pub api: u32,
}

fn node_line(node: &NodeVersion) -> String {
    format!(
        "mesh-node  {} (admin API v{}) on node {} at {}\n",
        node.version, node.api, node.name, node.address
    )
}

pub fn lines(v: &Versions) -> String {
    let mut out = format!("meshctl    {} (admin API v{})\n", v.meshctl, v.api);
    if let Some(node) = &v.node {
        out.push_str(&node_line(node));
    }
    out
}

pub async fn run(client: Option<&Client>, format: Format) -> Result<(), Error> {
    let mut versions = Versions {
        meshctl: env!("CARGO_PKG_VERSION").to_owned(),
        api: API_VERSION,
        node: None,
    };
    let Some(client) = client else {
        return print(&render(format, &versions, lines)?);
    };
    // In a table ours comes first, so it is shown even when the node cannot be asked.
    if format == Format::Table {
        print(&lines(&versions))?;
    }
    let status: Status = client.get(paths::STATUS).await?;
    check_status_api(client, &status)?;
    let node = NodeVersion {
        address: client.target().to_string(),
        name: status.node,
        version: status.version,
        api: status.api,
    };
    if format == Format::Table {
        return print(&node_line(&node));
    }
    versions.node = Some(node);
    print(&render(format, &versions, lines)?)
}
