//! The idempotent machine set-up, shared by every task that builds the eBPF side.
use std::process::Command;

use crate::run::{require_root, root, step};

pub fn run() -> anyhow::Result<()> {
    require_root("set-up")?;
    let script = root().join("xtask/scripts/setup.sh");
    step("set-up", Command::new("bash").arg(script))
}
