//! `cargo xtask manifests`: regenerates the CRD YAML in `daemonset/base/crds/` from the Rust
//! types (mesh-controller's `crd` module, through `mesh-controller crds`); a test in
//! mesh-controller fails when the checked-in files differ.
//!
//! [`validate`], a step of `cargo xtask test`: renders every kustomization with
//! `kubectl kustomize` and checks the result with `daemonset/validate/validate.py` against
//! the real Kubernetes JSON schemas (kubernetes-validate, every minor from 1.29 to the
//! newest it knows), the example and refused policies against the CRD's schema, and the
//! install's own rules (no privileged agent, exactly three capabilities, ...).
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};

use crate::run::{cargo, root, step};

const CRD_DIR: &str = "daemonset/base/crds";
/// The kustomizations that must render and validate.
const KUSTOMIZATIONS: [(&str, &str); 2] = [("base", "daemonset/base"), ("kind", "daemonset/overlays/kind")];

pub fn run() -> anyhow::Result<()> {
    let dir = root().join(CRD_DIR);
    // Generated files only: a CRD that the code no longer defines must go.
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "yaml") {
                std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            }
        }
    }
    step(
        "generate CRDs",
        cargo().args([
            "run",
            "-q",
            "-p",
            "mesh-controller",
            "--",
            "crds",
            "--out-dir",
            CRD_DIR,
        ]),
    )
}

pub fn validate() -> anyhow::Result<()> {
    let out = root().join("target/manifests");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut rendered: Vec<PathBuf> = Vec::new();
    for (name, dir) in KUSTOMIZATIONS {
        let output = Command::new("kubectl")
            .args(["kustomize", dir])
            .current_dir(root())
            .output()
            .context("running `kubectl kustomize` (kubectl must be on PATH)")?;
        if !output.status.success() {
            bail!(
                "kubectl kustomize {dir} failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let path = out.join(format!("{name}.yaml"));
        std::fs::write(&path, &output.stdout).with_context(|| format!("writing {}", path.display()))?;
        rendered.push(path);
    }
    let probe = Command::new("python3")
        .args(["-c", "import kubernetes_validate, jsonschema, yaml"])
        .status()
        .context("running python3")?;
    if !probe.success() {
        bail!(
            "python3 lacks kubernetes-validate: run `cargo xtask setup` (xtask/scripts/setup.sh installs it)"
        );
    }
    let mut cmd = Command::new("python3");
    cmd.arg("daemonset/validate/validate.py");
    for path in &rendered {
        cmd.arg("--rendered").arg(path);
    }
    cmd.args([
        "--examples",
        "daemonset/examples",
        "--refusals",
        "daemonset/validate/invalid-policies.yaml",
    ]);
    step("manifest validation (kustomize + Kubernetes schemas)", &mut cmd)
}
