//! mesh-node: the per-node agent. It loads the capture programs into the kernel and runs the
//! node proxy that carries the traffic of every enrolled pod on this node.
pub mod admin;
pub mod cgroups;
pub mod config;
pub mod connections;
pub mod control;
pub mod ebpf;
pub mod enrollment;
pub mod health;
pub mod httpd;
pub mod identity;
pub mod limits;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod netlink;
pub mod pod_veth;
pub mod policy;
pub mod proxy;
pub mod strict;
pub mod tls;
