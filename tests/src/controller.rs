//! The real `mesh-controller` in a harness cluster: it runs in the cluster network's namespace
//! (reachable from every node at [`LINK_IPV4`]) on its local-file source, and is fed the same
//! Kubernetes objects a cluster would hold for the harness's namespaces and pods.
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{bin_path, Cluster, Pod, Proc, LINK_IPV4};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
pub const CONTROLLER_PORT: u16 = 15012;

/// A controller and its state directories (manifests, CA, node tokens), which outlive its
/// process so that it can be stopped and started again with the same CA and objects.
pub struct Controller {
    dir: PathBuf,
    extra_args: Vec<String>,
    proc: Option<Proc>,
}

impl Controller {
    /// Prepares the directories and starts the controller.
    pub fn start(cluster: &Cluster, extra_args: &[&str]) -> Result<Controller> {
        let dir = std::env::temp_dir().join(format!("{}-controller", cluster.id()));
        for sub in ["manifests", "ca", "tokens"] {
            // The controller refuses a CA or token directory others could write to.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir.join(sub))
                .with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut c = Controller {
            dir,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            proc: None,
        };
        c.restart(cluster)?;
        Ok(c)
    }

    /// Starts the controller process (again) and waits until it serves.
    pub fn restart(&mut self, cluster: &Cluster) -> Result<&Proc> {
        if self.proc.is_some() {
            bail!("controller already running");
        }
        let mut cmd = Command::new(bin_path("mesh-controller")?);
        cmd.arg("--source")
            .arg(format!("file:{}", self.dir.join("manifests").display()))
            .arg("--listen")
            .arg(self.addr().to_string())
            .arg("--ca-dir")
            .arg(self.dir.join("ca"))
            .arg("--tokens-dir")
            .arg(self.dir.join("tokens"))
            .args(["--log-format", "json"])
            .args(&self.extra_args)
            .env("RUST_LOG", "info");
        let proc = cluster.spawn_in_net(cluster.link_netns(), cmd)?;
        proc.wait_for_line(READY_TIMEOUT, |l| l.contains("mesh-controller starting"))
            .context("mesh-controller did not start")?;
        Ok(self.proc.insert(proc))
    }

    /// Stops the controller process (SIGTERM); its directories stay.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(proc) = self.proc.take() {
            proc.kill(libc::SIGTERM)?;
            proc.wait_exit(READY_TIMEOUT)?;
        }
        Ok(())
    }

    pub fn proc(&self) -> Result<&Proc> {
        self.proc.as_ref().context("controller not running")
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(LINK_IPV4.into(), CONTROLLER_PORT)
    }

    /// The mesh root certificate that nodes pin.
    pub fn root_ca(&self) -> PathBuf {
        self.dir.join("ca").join("root.pem")
    }

    /// Registers `node` and returns the path of its token file (the node reads it from there).
    pub fn node_token(&self, node: &str) -> Result<PathBuf> {
        let path = self.dir.join("tokens").join(node);
        if !path.exists() {
            let token = format!("{:x}{:x}", rand_u64(), rand_u64());
            mesh_api::secret_files::create_secret(&path, token.as_bytes())?;
        }
        Ok(path)
    }

    /// Writes (or replaces) a manifest file, atomically, so the controller never reads half.
    pub fn apply(&self, name: &str, yaml: &str) -> Result<()> {
        let manifests = self.dir.join("manifests");
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, manifests.join(format!("{name}.yaml")))?;
        Ok(())
    }

    /// Removes a manifest file written by [`Controller::apply`].
    pub fn delete(&self, name: &str) -> Result<()> {
        std::fs::remove_file(self.dir.join("manifests").join(format!("{name}.yaml")))?;
        Ok(())
    }

    pub fn manifests_dir(&self) -> PathBuf {
        self.dir.join("manifests")
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        drop(self.proc.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .elapsed()
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// A Namespace object with labels, e.g. `[("mesh.dev/enroll", "true")]`.
pub fn namespace_yaml(name: &str, labels: &[(&str, &str)]) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels: {}\n",
        labels_yaml(labels)
    )
}

/// The Pod object of a harness pod: its node, service account, labels and addresses.
pub fn pod_yaml(pod: &Pod, namespace: &str, service_account: &str, labels: &[(&str, &str)]) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  uid: {uid}\n  \
         labels: {labels}\nspec:\n  nodeName: {node}\n  serviceAccountName: {service_account}\n\
         status:\n  podIP: {ip4}\n  podIPs:\n  - ip: {ip4}\n  - ip: {ip6}\n",
        name = pod.name,
        uid = pod.uid,
        labels = labels_yaml(labels),
        node = pod.node,
        ip4 = pod.ipv4,
        ip6 = pod.ipv6,
    )
}

fn labels_yaml(labels: &[(&str, &str)]) -> String {
    let pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k:?}: {v:?}")).collect();
    format!("{{{}}}", pairs.join(", "))
}

/// A Service with a cluster IP, `port` → `target_port` (TCP), selecting pods labelled `app`.
pub fn service_yaml(
    name: &str,
    namespace: &str,
    vip: &str,
    port: u16,
    target_port: u16,
    app: &str,
) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  \
         clusterIP: {vip}\n  selector: {{app: {app}}}\n  ports: [{{name: tcp, port: {port}, targetPort: {target_port}}}]\n"
    )
}

/// An AuthorizationPolicy on the pods labelled `app`: `action` (ALLOW or DENY) for `principal`
/// (`<trust domain>/ns/<ns>/sa/<sa>`).
pub fn policy_yaml(name: &str, namespace: &str, app: &str, action: &str, principal: &str) -> String {
    format!(
        "apiVersion: mesh.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
         spec:\n  selector: {{matchLabels: {{app: {app}}}}}\n  action: {action}\n  \
         rules: [{{from: [{{source: {{principals: [{principal}]}}}}]}}]\n"
    )
}
